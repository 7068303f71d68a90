"""One cold-start run, `python coldstart_child.py ours|reference SPEC_JSON DTYPE SIZE TAPS...`, run by its path so
that the reference run imports nothing of diffbackbone (nor timm): each side pays only its own imports.

Prints one JSON line: peak RSS, the RSS once the imports were done, and the wall-clock times (`time.time()`) at which
the imports, the load and the first feature were done.
"""
import json
import resource
import sys
import time


def _rss() -> int:
    """The process's resident memory now, in bytes (Linux; 0 elsewhere)."""
    try:
        with open('/proc/self/statm') as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except OSError:
        return 0


def _image(torch, size: int, dtype):
    gen = torch.Generator().manual_seed(0)
    return (torch.rand(1, 3, size, size, generator=gen) * 2 - 1).to(dtype)


def ours(model_name: str, spec: dict, taps: list, size: int, dtype_name: str, marks: dict) -> None:
    import torch
    import timm
    import diffbackbone  # noqa: F401
    marks['imports'], marks['rss_imports'] = time.time(), _rss()
    dtype = getattr(torch, dtype_name)
    kwargs = {} if spec.get('hub') else dict(base_repo=spec['base'], pretrained_cfg_overlay=dict(file=spec['unet_file']))
    if spec.get('timestep_source'):
        kwargs['timestep_source'] = spec['timestep_source']
    model = timm.create_model(model_name, pretrained=True, features_only=True, out_indices=tuple(taps), dtype=dtype,
                              **kwargs).eval()
    marks['load'] = time.time()
    with torch.inference_mode():
        model(_image(torch, size, dtype))


def reference(spec: dict, size: int, dtype_name: str, timestep: float, marks: dict) -> None:
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors.torch import load_file
    from transformers import CLIPTextModel, CLIPTokenizer
    marks['imports'], marks['rss_imports'] = time.time(), _rss()
    dtype = getattr(torch, dtype_name)
    base = spec['base']
    if spec['clean']:  # CleanDIFT's way
        unet = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(base, subfolder='unet'))
        unet.load_state_dict(load_file(spec['unet_file']), strict=True)
        unet.to(dtype)
    else:
        unet = UNet2DConditionModel.from_pretrained(base, subfolder='unet', torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(base, subfolder='vae', torch_dtype=dtype)
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder='tokenizer')
    encoder = CLIPTextModel.from_pretrained(base, subfolder='text_encoder')
    marks['load'] = time.time()
    with torch.inference_mode():
        ids = tokenizer([''], padding='max_length', max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors='pt').input_ids
        ctx = encoder(ids)[0].to(dtype)
        latent = vae.encode(_image(torch, size, dtype)).latent_dist.mode() * vae.config.scaling_factor
        unet(latent, timestep, encoder_hidden_states=ctx)


def main(argv: list) -> None:
    kind, spec, dtype, size, timestep, model, *taps = argv
    marks: dict = {}
    if kind == 'ours':
        ours(model, json.loads(spec), taps, int(size), dtype, marks)
    else:
        reference(json.loads(spec), int(size), dtype, float(timestep), marks)
    marks['feature'] = time.time()
    print(json.dumps(dict(peak_rss=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **marks)), flush=True)


if __name__ == '__main__':
    main(sys.argv[1:])
