_base_ = './upernet_cleandift-sd21_4xb4-40k_voc12aug-512x512.py'
model = dict(backbone=dict(model_name='cleandift_sd15'))
