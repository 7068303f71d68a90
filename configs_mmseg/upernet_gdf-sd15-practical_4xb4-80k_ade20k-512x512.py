# Meng et al. (NeurIPS 2024) recommended SD1.5 activations ('gdf_practical'), noisy SD1.5 at t=50 as in their ADE20K
# configs: up-level3-repeat0 self-attention key (320 ch, stride 8), up-level2-repeat1 cross-attention query (640, 16),
# up-level1-repeat2 resnet output (1280, 32), up-level1-repeat1 cross-attention query (1280, 32).
_base_ = './upernet/upernet_cleandift-sd21_4xb4-80k_ade20k-512x512.py'
model = dict(
    backbone=dict(model_name='sd15', out_indices='gdf_practical', model_kwargs=dict(timestep=50, ensemble=1)),
    decode_head=dict(in_channels=[320, 640, 1280, 1280], in_index=[0, 1, 2, 3]),
    auxiliary_head=dict(in_channels=640, in_index=1))
# Taps inside transformer blocks leave the rest of the deepest tapped block (e.g. its attention's to_k/to_v/to_out)
# without gradients; DistributedDataParallel must be told.
find_unused_parameters = True
