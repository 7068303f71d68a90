# Noisy counterpart of the CleanDIFT probe: SD2.1 features at t=100 (the best noisy timestep of CleanDIFT's probe).
_base_ = './linear_cleandift-sd21-frozen-us6_4xb4-20k_voc12aug-512x512.py'
model = dict(backbone=dict(model_name='sd21', model_kwargs=dict(timestep=100, ensemble=1)))
