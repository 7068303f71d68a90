# Noisy baseline (DIFT-style): the original SD UNet sees the latent noised at t=100, the best noisy timestep of
# CleanDIFT's segmentation probe; one noise draw (`ensemble` multiplies the backbone's cost).
_base_ = './fpn_cleandift-sd21_4xb4-80k_ade20k-512x512.py'
model = dict(backbone=dict(model_name='sd21', model_kwargs=dict(timestep=100, ensemble=1)))
