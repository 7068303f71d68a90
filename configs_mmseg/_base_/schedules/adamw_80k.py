# 80k iterations with AdamW as VPD trains Stable Diffusion backbones: the UNet at 0.1x the heads' learning rate
# (parameters named backbone.model.unet.*), 1500 warm-up iterations, then linear decay. Our constructor builds the
# same parameter groups as mmengine's default and logs a summary instead of ~1,800 lines (one per parameter).
_base_ = ['mmseg::_base_/schedules/schedule_80k.py']
optim_wrapper = dict(
    _delete_=True,
    type='OptimWrapper',
    constructor='DiffusionOptimWrapperConstructor',
    optimizer=dict(type='AdamW', lr=8e-5, betas=(0.9, 0.999), weight_decay=1e-3),
    clip_grad=None,
    paramwise_cfg=dict(custom_keys={'backbone.model.unet': dict(lr_mult=0.1)}))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=80000, by_epoch=False),
]
