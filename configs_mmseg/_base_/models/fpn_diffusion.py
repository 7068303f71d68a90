# Semantic FPN on a diffusion backbone (as VPD): the stride 8/16/32/64 'pyramid' taps of a Stable Diffusion UNet,
# CleanDIFT's clean model by default. Leaf configs swap `model.backbone.model_name`.
_base_ = ['mmseg::_base_/models/fpn_r50.py']
custom_imports = dict(imports=['diffbackbone.mmseg'], allow_failed_imports=False)
norm_cfg = dict(type='SyncBN', requires_grad=True)
# Stable Diffusion expects RGB in [-1, 1].
data_preprocessor = dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5], bgr_to_rgb=True)
model = dict(
    type='DiffusionEncoderDecoder',  # EncoderDecoder that checks the neck's in_channels against the backbone
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='DiffusionBackbone',
        model_name='cleandift_sd21',
        pretrained=True,
        out_indices='pyramid',  # us9 (640 ch, stride 8), us6 (1280, 16), us3 (1280, 32), mid (1280, 64)
        freeze_vae=True,  # fine-tune the UNet only
        dtype='float32'),
    neck=dict(in_channels=[640, 1280, 1280, 1280], out_channels=256, num_outs=4),
    decode_head=dict(feature_strides=[8, 16, 32, 64], norm_cfg=norm_cfg))
