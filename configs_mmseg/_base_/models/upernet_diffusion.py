# UPerNet on a diffusion backbone: the stride 8/16/32/64 'pyramid' taps (us9, us6, us3, mid) of a Stable Diffusion
# UNet, CleanDIFT's clean model by default. Leaf configs swap `model.backbone.model_name`.
_base_ = ['mmseg::_base_/models/upernet_r50.py']
custom_imports = dict(imports=['diffbackbone.mmseg'], allow_failed_imports=False)
norm_cfg = dict(type='SyncBN', requires_grad=True)
# Stable Diffusion expects RGB in [-1, 1].
data_preprocessor = dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5], bgr_to_rgb=True)
model = dict(
    type='DiffusionEncoderDecoder',  # EncoderDecoder that checks the heads' in_channels against the backbone
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
    decode_head=dict(in_channels=[640, 1280, 1280, 1280], in_index=[0, 1, 2, 3], norm_cfg=norm_cfg),
    auxiliary_head=dict(in_channels=1280, in_index=1, norm_cfg=norm_cfg))  # us6, stride 16
