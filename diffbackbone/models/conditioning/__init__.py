"""What conditions the denoiser besides the image: prompt text encoders (SDXL's included), LoRA, ControlNet, DDIM
inversion."""
