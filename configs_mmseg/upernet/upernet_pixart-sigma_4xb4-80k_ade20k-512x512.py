# UPerNet on PixArt-Sigma (a diffusion transformer, Meng et al.'s noisy extraction at t=50): its 'pyramid' preset is
# four evenly spaced block outputs (blocks 6, 13, 20, 27: 1152 channels, all at stride 16). mmseg's own
# MultiLevelNeck resamples them to strides 4/8/16/32, as mmseg's ViT configs do. Any crop side divisible by 16 works.
_base_ = [
    '../_base_/models/upernet_diffusion.py', 'mmseg::_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py', '../_base_/schedules/adamw_80k.py'
]
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(model_name='pixart_sigma', out_indices='pyramid'),
    neck=dict(type='MultiLevelNeck', in_channels=[1152, 1152, 1152, 1152], out_channels=768, scales=[4, 2, 1, 0.5]),
    decode_head=dict(in_channels=[768, 768, 768, 768], num_classes=150),
    auxiliary_head=dict(in_channels=768, in_index=2, num_classes=150))
# The transformer (not a UNet) is fine-tuned at 0.1x the heads' learning rate.
optim_wrapper = dict(paramwise_cfg=dict(custom_keys={'backbone.model.transformer': dict(lr_mult=0.1)}))
