# Meng et al. (NeurIPS 2024) recommended SDXL activations ('gdf_practical'), noisy SDXL at t=50: up-level1-repeat0
# cross-attention query and transformer-block-0 output (640 ch, stride 16), up-level0-repeat0 transformer blocks 7 and 5
# outputs (1280, 32). SDXL has 3 UNet levels (strides 8/16/32), and these taps use the two coarse ones.
_base_ = './upernet/upernet_cleandift-sd21_4xb4-80k_ade20k-512x512.py'
model = dict(
    backbone=dict(model_name='sdxl', out_indices='gdf_practical', model_kwargs=dict(timestep=50, ensemble=1)),
    decode_head=dict(in_channels=[640, 640, 1280, 1280], in_index=[0, 1, 2, 3], pool_scales=(1, 2, 3)),
    auxiliary_head=dict(in_channels=640, in_index=1))
# Taps inside transformer blocks leave the rest of the deepest tapped block (e.g. its attention's to_k/to_v/to_out)
# without gradients; DistributedDataParallel must be told.
find_unused_parameters = True
