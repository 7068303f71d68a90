_base_ = './upernet_cleandift-sd21_4xb2-80k_cityscapes-512x1024.py'
model = dict(backbone=dict(model_name='cleandift_sd15'))
