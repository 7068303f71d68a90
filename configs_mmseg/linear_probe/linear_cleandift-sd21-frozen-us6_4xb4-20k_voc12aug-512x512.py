_base_ = [
    '../_base_/models/linear_diffusion.py', 'mmseg::_base_/datasets/pascal_voc12_aug.py',
    'mmseg::_base_/default_runtime.py', '../_base_/schedules/linear-probe_20k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(data_preprocessor=data_preprocessor, backbone=dict(model_name='cleandift_sd21'))
