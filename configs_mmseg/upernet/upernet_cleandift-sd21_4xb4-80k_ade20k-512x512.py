_base_ = [
    '../_base_/models/upernet_diffusion.py', 'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py', '../_base_/schedules/adamw_80k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(model_name='cleandift_sd21'),
    decode_head=dict(num_classes=150),
    auxiliary_head=dict(num_classes=150))
