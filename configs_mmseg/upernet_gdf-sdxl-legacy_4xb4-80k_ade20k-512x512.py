# The SDXL block outputs Meng et al. compare against ('gdf_legacy', config_xl_legacy), noisy SDXL at t=50:
# up-level2-repeat2 resnet output (the decoder's last, 320 ch, stride 8), upsampler outputs of up levels 1 (640, 8)
# and 0 (1280, 16).
_base_ = './upernet/upernet_cleandift-sd21_4xb4-80k_ade20k-512x512.py'
model = dict(
    backbone=dict(model_name='sdxl', out_indices='gdf_legacy', model_kwargs=dict(timestep=50, ensemble=1)),
    decode_head=dict(in_channels=[320, 640, 1280], in_index=[0, 1, 2], pool_scales=(1, 2, 3)),
    auxiliary_head=dict(in_channels=640, in_index=1))
