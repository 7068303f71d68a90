"""`diffbackbone eval davis`: semi-supervised video object segmentation by label propagation on DAVIS 2017, DIFT's
protocol (`eval_davis.py`, itself DINO's `eval_video_segmentation.py` with diffusion features).

The propagation, the per-frame noise, the `shooting` cap and the `--protocol` presets (`dift`, `ditf`: Gan et al.'s
`eval_davis.py` / `eval_davis.sh`): docs/tasks.md#davis-2017."""
from __future__ import annotations

import argparse
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from ..errors import InputError
from .davis_data import VOID, DavisError, DavisSequence, load_davis, read_mask
from .davis_metrics import evaluate_sequence, summarise
from .feature_cache import FeatureCache

__all__ = ['input_size', 'load_frame', 'propagate', 'one_hot', 'label_video', 'FrameFeatures', 'run_davis',
           'DavisError', 'LAST_FRAMES_CAP', 'DavisProtocol', 'PROTOCOLS']

LAST_FRAMES_CAP = {'shooting': 10}  # DIFT's eval_davis.py (DiTF's too; with its 7 frames it never applies)


@dataclass(frozen=True)
class DavisProtocol:
    """The settings of a published DAVIS run: model, tap and model arguments (`timestep` for a noisy model), and the
    propagation's."""
    model: str
    tap: str
    model_kwargs: tuple[tuple[str, object], ...]
    temperature: float
    topk: int
    n_last_frames: int
    neighborhood: int
    short_side: int = 480


def _protocols() -> dict[str, DavisProtocol]:
    from ..models.ditf import PRESET_SETTINGS

    return {
        'dift': DavisProtocol('sd21', 'us9', (('timestep', 51),), temperature=0.2, topk=15, n_last_frames=28,
                              neighborhood=15),  # DIFT's eval_davis.py (DINO's defaults but the temperature)
        'ditf': DavisProtocol('ditf_flux', 'ditf_davis', tuple(PRESET_SETTINGS['ditf_davis'].items()),
                              temperature=0.1, topk=5, n_last_frames=7, neighborhood=12),  # DiTF's eval_davis.py
    }


PROTOCOLS = _protocols()
_CHUNK_ELEMENTS = 2 ** 26  # affinity entries per chunk of target positions (256 MB in float32)


def input_size(size: tuple[int, int], short: int = 480) -> tuple[int, int]:
    """(W, H) a frame is resized to: the short side `short`, the long side scaled and floored to a multiple of 32."""
    w, h = size
    if h > w:
        return short, int((short * h / w) // 32 * 32)
    return int((short * w / h) // 32 * 32), short


def load_frame(path: Path, size: tuple[int, int], mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(3, H, W) float32 frame: OpenCV read and bilinear resize to `size` (W, H), RGB, (x / 255 - mean) / std."""
    import cv2

    img = cv2.imread(str(path))
    if img is None:
        raise DavisError(f'{path}: OpenCV cannot read this frame.')
    img = cv2.resize(img, size)[:, :, ::-1].astype(np.float32) / 255.0
    x = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))
    return (x - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)


def one_hot(labels: np.ndarray) -> torch.Tensor:
    """(K + 1, h, w) float one-hot of (h, w) labels 0..K (K = their maximum)."""
    t = torch.from_numpy(labels.astype(np.int64))
    return F.one_hot(t, int(t.max()) + 1).permute(2, 0, 1).float()


def propagate(target: torch.Tensor, sources: torch.Tensor, masks: torch.Tensor, temperature: float = 0.2,
              topk: int = 15, neighborhood: int = 15) -> torch.Tensor:
    """Soft (K, h, w) mask of a target frame from its context.

    Args:
        target: (C, h, w) features of the target frame.
        sources: (n, C, h, w) features of the n context frames.
        masks: (n, K, h, w) soft masks of the context frames.
        temperature, topk, neighborhood: see the module docstring (neighborhood 0: no spatial restriction).
    """
    n, c, h, w = sources.shape
    hw, k = h * w, masks.shape[1]
    if topk > n * hw:
        raise InputError(f'--topk {topk} is more than the {n * hw} source positions of the context ({n} frames of '
                         f'{w}x{h} features); use a smaller --topk or a larger --short-side.')
    tgt = F.normalize(target.float().reshape(c, hw), dim=0)
    keys = F.normalize(sources.float().reshape(n, c, hw), dim=1).permute(1, 0, 2).reshape(c, n * hw)
    values = masks.float().reshape(n, k, hw).permute(0, 2, 1).reshape(n * hw, k)
    ys = torch.arange(h, device=target.device).repeat_interleave(w)
    xs = torch.arange(w, device=target.device).repeat(h)
    out = torch.empty(hw, k, device=target.device)
    step = max(1, _CHUNK_ELEMENTS // (n * hw))
    for q in range(0, hw, step):
        qs = slice(q, min(q + step, hw))
        aff = torch.exp(tgt[:, qs].T @ keys / temperature).view(-1, n, hw)  # (Q, n, hw)
        if neighborhood > 0:
            near = (((ys[qs, None] - ys[None]).abs() <= neighborhood)
                    & ((xs[qs, None] - xs[None]).abs() <= neighborhood))
            aff = aff * near[:, None, :]
        aff = aff.reshape(aff.shape[0], n * hw)
        kth = aff.topk(topk, dim=1).values.min(dim=1, keepdim=True).values
        aff = torch.where(aff < kth, torch.zeros((), device=aff.device), aff)
        out[qs] = (aff / aff.sum(dim=1, keepdim=True)) @ values
    return out.T.reshape(k, h, w)


def _norm_mask(mask: torch.Tensor) -> torch.Tensor:
    """Each channel with a positive maximum min-max normalised to [0, 1] (DINO's `norm_mask`)."""
    out = mask.clone()
    for i in range(mask.shape[0]):
        if mask[i].max() > 0:
            m = mask[i] - mask[i].min()
            out[i] = m / m.max()
    return out


def label_video(features: Iterator[torch.Tensor], first_mask: np.ndarray, size: tuple[int, int],
                model_size: tuple[int, int], temperature: float = 0.2, topk: int = 15, n_last_frames: int = 28,
                neighborhood: int = 15) -> Iterator[np.ndarray]:
    """(H, W) uint8 labels of frames 1, 2, ... from their (C, h, w) `features` (frame 0's first) and frame 0's
    labels; `size` is the frames' (W, H), `model_size` the (W, H) they were resized to for the model."""
    from PIL import Image

    first_feat = next(features)
    c, h, w = first_feat.shape
    stride = round(model_size[1] / h)  # the tap's (DIFT's scale_factor: 8 for up_ft_index=2)
    small = np.array(Image.fromarray(first_mask).resize((w, h), Image.NEAREST))
    first_seg = one_hot(small).to(first_feat.device)
    context: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=n_last_frames)
    for feat in features:
        srcs = torch.stack([first_feat] + [f for f, _ in context])
        segs = torch.stack([first_seg] + [s for _, s in context])
        soft = propagate(feat, srcs, segs, temperature, topk, neighborhood)
        context.append((feat, soft))
        up = F.interpolate(soft[None], scale_factor=stride, mode='bilinear', align_corners=False,
                           recompute_scale_factor=False)[0]
        labels = torch.max(_norm_mask(up), dim=0).indices.to(torch.uint8).cpu().numpy()
        yield np.array(Image.fromarray(labels).resize(size, Image.NEAREST))


class FrameFeatures:
    """Features of a sequence's frames in order: from the cache when present, else computed in batches (and cached)."""

    def __init__(self, model_fn: Callable[[], torch.nn.Module], short_side: int = 480, batch_size: int = 8,
                 cache: Optional[FeatureCache] = None, device: str | torch.device = 'cpu', frame_noise: bool = False):
        """`frame_noise`: a noisy model draws its noise with seed `noise_seed` + the frame's index (DIFT draws fresh
        noise per frame), one frame per call; otherwise one draw for all frames, in batches."""
        self.model_fn, self.model = model_fn, None  # built only when a feature is missing from the cache
        self.short_side, self.batch_size, self.cache, self.device = short_side, batch_size, cache, device
        self.frame_noise = frame_noise
        self.computed = 0

    def _run(self, x: torch.Tensor, index: int) -> torch.Tensor:
        """The model on a batch of frames starting at `index`; with `frame_noise` each frame is its own call."""
        net = getattr(self.model, 'model', self.model)  # the features_only wrapper holds the model
        if not self.frame_noise or getattr(net, 'clean', True):
            out = self.model(x)
            return out[0] if isinstance(out, (list, tuple)) else out
        seed, outs = net.noise_seed, []
        try:
            for k in range(x.shape[0]):
                net.noise_seed = seed + index + k
                out = self.model(x[k:k + 1])
                outs.append(out[0] if isinstance(out, (list, tuple)) else out)
        finally:
            net.noise_seed = seed
        return torch.cat(outs)

    @torch.inference_mode()
    def __call__(self, seq: DavisSequence) -> Iterator[torch.Tensor]:
        size = input_size(seq.size, self.short_side)
        for start in range(0, len(seq.frames), self.batch_size):
            frames = seq.frames[start:start + self.batch_size]
            got = {f: g for f in frames if self.cache and (g := self.cache.get(seq.name, f.name, f)) is not None}
            todo = [f for f in frames if f not in got]
            if todo:
                if self.model is None:
                    self.model = self.model_fn()
                cfg = self.model.pretrained_cfg
                param = next(p for p in self.model.parameters() if p.ndim > 1)
                x = torch.stack([load_frame(f, size, cfg['mean'], cfg['std']) for f in todo])
                x = x.to(device=param.device, dtype=param.dtype)
                if self.frame_noise:  # each frame's draw is seeded by its index in the sequence
                    out = torch.cat([self._run(x[k:k + 1], seq.frames.index(f)) for k, f in enumerate(todo)])
                else:
                    out = self._run(x, 0)
                for f, feat in zip(todo, out):
                    feat = feat.detach().cpu().clone()
                    if self.cache:
                        self.cache.put(seq.name, f.name, feat, f)
                    got[f] = feat
                self.computed += len(todo)
            for f in frames:
                yield got[f].to(self.device)


def _palette(path: Path) -> list[int]:
    """The first mask's palette (DAVIS's), else the PASCAL VOC colour map."""
    from PIL import Image

    from .pixel_pictures import voc_palette

    with Image.open(path) as img:
        if img.mode == 'P' and img.getpalette():
            return img.getpalette()
    return [v for rgb in voc_palette() for v in rgb]


def _foreign_masks(folder: Path) -> list[str]:
    """Entries of a sequence's `--masks` folder that are not masks `eval davis` wrote."""
    from ..data.outputs import is_ours

    return [p.name for p in folder.iterdir() if not (p.suffix == '.png' and is_ours(p, 'eval davis'))]


def _write_masks(folder: Path, seq: DavisSequence, labels: list[np.ndarray]) -> None:
    """The sequence's masks as indexed PNGs (marked as ours), written to a temporary folder renamed into place when
    complete."""
    import os
    import shutil
    import tempfile

    from PIL import Image

    from ..data.outputs import save_picture
    from ..hub import umask

    folder.mkdir(parents=True, exist_ok=True)
    final, palette = folder / seq.name, _palette(seq.masks[0])
    tmp = Path(tempfile.mkdtemp(dir=folder, prefix=f'.{seq.name}.', suffix='.tmp'))
    try:
        for frame, lab in zip(seq.frames, labels):
            img = Image.fromarray(lab, 'P')
            img.putpalette(palette)
            save_picture(img, tmp / f'{frame.stem}.png', 'eval davis')
        os.chmod(tmp, 0o777 & ~umask())
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _table(per_seq: dict[str, dict[str, float]], total: dict) -> str:
    head = f'{"sequence":<22}{"objects":>8}{"J&F":>8}{"J":>8}{"F":>8}'
    rows = [head, '-' * len(head)]
    for name, s in per_seq.items():
        rows.append(f'{name:<22}{s["num_objects"]:>8}{s["J&F-Mean"]:>8.2f}{s["J-Mean"]:>8.2f}{s["F-Mean"]:>8.2f}')
    rows.append(f'{"all":<22}{total["num_objects"]:>8}{total["J&F-Mean"]:>8.2f}{total["J-Mean"]:>8.2f}'
                f'{total["F-Mean"]:>8.2f}')
    return '\n'.join(rows)


def _apply_protocol(args: argparse.Namespace) -> DavisProtocol:
    """Fill every option left unset (None) with `--protocol`'s setting; return the protocol."""
    proto = PROTOCOLS[args.protocol]
    for name in ('model', 'temperature', 'topk', 'n_last_frames', 'neighborhood', 'short_side'):
        if getattr(args, name) is None:
            setattr(args, name, getattr(proto, name))
    if args.taps is None:
        args.taps = [proto.tap]
    return proto


def protocol_kwargs(args: argparse.Namespace, proto: DavisProtocol) -> dict:
    """The model arguments: `--model-kwargs` / `--prompt` / `--timestep` as given, else the protocol's (its timestep
    for a noisy model, `common.eval_model_kwargs`). The protocol's prompt is left out with `--random-weights` (its
    embedding is computed while pretrained weights load)."""
    from .common import eval_model_kwargs

    defaults = dict(proto.model_kwargs)
    kwargs = eval_model_kwargs(args, default_timestep=defaults.pop('timestep'))
    for key, value in defaults.items():
        if key not in kwargs and not (key == 'prompt' and args.random_weights):
            kwargs[key] = value
    return kwargs


def run_davis(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone eval davis`."""
    from ..cli_args import check_size_fits
    from ..data.outputs import check_replaceable, write_json
    from .common import check_outputs, feature_cache, model_builder

    proto = _apply_protocol(args)
    if len(args.taps) != 1:
        raise InputError(f'--taps takes exactly one tap (DIFT: us9, their up_ft_index=2), got {args.taps}.')
    if not args.temperature > 0:
        raise InputError(f'--temperature must be positive, got {args.temperature}.')
    if args.neighborhood < 0:
        raise InputError(f'--neighborhood must be 0 (no restriction) or more, got {args.neighborhood}.')
    tap = args.taps[0]
    check_outputs(args, [args.data])
    check_size_fits(args.short_side, args.batch_size, args.device, '--short-side', model=args.model)
    sequences = load_davis(args.data, args.split, args.sequences, args.limit)  # checked before any model is built
    if args.masks:
        for seq in sequences:
            check_replaceable(Path(args.masks) / seq.name, '--masks', 'masks', 'eval davis', _foreign_masks)
    kwargs = protocol_kwargs(args, proto)
    model_fn = model_builder(args, tap, kwargs)
    frame_noise = not getattr(args, 'same_noise', False)
    cache = feature_cache(args, tap, kwargs, short_side=args.short_side, version=1,
                          protocol='davis-cv2-bilinear-short-side-floor32-[-1,1]' + ('-noise-per-frame' * frame_noise))
    feats = FrameFeatures(model_fn, args.short_side, args.batch_size, cache, args.device, frame_noise)
    results: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    per_seq: dict[str, dict] = {}
    for i, seq in enumerate(sequences):
        print(f'[{i + 1}/{len(sequences)}] {seq.name}: {len(seq.frames)} frames, {seq.num_objects} objects', flush=True)
        first = read_mask(seq.masks[0])
        first = np.where(first == VOID, 0, first).astype(np.uint8)
        frames = feats(seq)
        n_last = min(args.n_last_frames, LAST_FRAMES_CAP.get(seq.name, args.n_last_frames))
        with torch.inference_mode():
            labels = [read_mask(seq.masks[0])] + list(label_video(
                frames, first, seq.size, input_size(seq.size, args.short_side), args.temperature, args.topk, n_last,
                args.neighborhood))
        if args.masks:
            _write_masks(Path(args.masks), seq, labels)
        gt = [read_mask(m) for m in seq.masks]
        results[seq.name] = evaluate_sequence(gt, labels)
        per_seq[seq.name] = summarise({seq.name: results[seq.name]})
    total = summarise(results)
    print(_table(per_seq, total))
    print(f'{args.model} {tap} {kwargs}: J&F {total["J&F-Mean"]:.2f}, J {total["J-Mean"]:.2f}, F {total["F-Mean"]:.2f} '
          f'({len(sequences)} sequences, {total["num_objects"]} objects, {feats.computed} frames run, the rest from '
          'the cache)')
    if args.masks:
        print(f'wrote masks to {args.masks}')
    if args.json:
        result = {k: v for k, v in total.items()}
        result.update(per_sequence={k: {m: v for m, v in s.items() if m != 'per_object'} for k, s in per_seq.items()},
                      protocol=args.protocol, model=args.model, weights=args.weights, tap=tap, model_kwargs=kwargs,
                      short_side=args.short_side, temperature=args.temperature, topk=args.topk,
                      n_last_frames=args.n_last_frames, neighborhood=args.neighborhood, split=args.split,
                      noise='same seeded draw for every frame' if not frame_noise else 'seeded draw per frame')
        write_json(args.json, result, 'eval davis')
        print(f'wrote {args.json}')
    return 0
