# The block outputs Meng et al. compare against ('gdf_legacy', their config_15_legacy), noisy SD1.5 at t=50:
# up-level3-repeat2 transformer output (320 ch, stride 8), upsampler outputs of up levels 2 (640, 8), 1 (1280, 16),
# 0 (1280, 32).
_base_ = './upernet/upernet_cleandift-sd21_4xb4-80k_ade20k-512x512.py'
model = dict(
    backbone=dict(model_name='sd15', out_indices='gdf_legacy', model_kwargs=dict(timestep=50, ensemble=1)),
    decode_head=dict(in_channels=[320, 640, 1280, 1280], in_index=[0, 1, 2, 3]),
    auxiliary_head=dict(in_channels=1280, in_index=2))
