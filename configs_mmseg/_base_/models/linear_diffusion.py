# Linear probe as in CleanDIFT: a frozen diffusion backbone, one tap (us6: 1280 ch, stride 16, DIFT's up_ft_index=1),
# and a single 1x1 convolution to the classes; the logits are upsampled bilinearly to the label size.
_base_ = ['mmseg::_base_/models/fpn_r50.py']
custom_imports = dict(imports=['diffbackbone.mmseg'], allow_failed_imports=False)
# Stable Diffusion expects RGB in [-1, 1].
data_preprocessor = dict(mean=[127.5, 127.5, 127.5], std=[127.5, 127.5, 127.5], bgr_to_rgb=True)
model = dict(
    type='DiffusionEncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='DiffusionBackbone',
        model_name='cleandift_sd21',
        pretrained=True,
        out_indices=('us6', ),
        frozen=True,  # no gradients, eval mode, forward under torch.no_grad
        dtype='float32'),
    neck=None,
    decode_head=dict(
        _delete_=True,
        type='FCNHead',  # num_convs=0 and no concat: dropout (off) + one 1x1 conv = a linear classifier per pixel
        in_channels=1280,
        in_index=0,
        channels=1280,
        num_convs=0,
        concat_input=False,
        dropout_ratio=0.0,
        num_classes=21,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=None)
