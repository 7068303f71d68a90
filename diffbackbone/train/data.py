"""Training images: a folder searched recursively, optional sidecar captions, seeded random resized crops.

Every random choice of a sample (its crop) is seeded from (seed, epoch, index), and the order of an epoch from
(seed, epoch), so a resumed run sees exactly the batches the uninterrupted one would have seen, whatever the number
of loader workers. An image that cannot be read is replaced by the next readable one and reported in the batch.
Images are read by `diffbackbone.data.images.open_image`, as everywhere in the package (EXIF orientation applied, 16-bit
images scaled, transparency on white).
"""
from __future__ import annotations

import itertools
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Sampler
from torchvision.transforms import v2

from ..data.images import IMAGE_EXTENSIONS, open_image
from ..errors import DiffbackboneError

__all__ = [
    'IMAGE_EXTENSIONS',
    'DataError',
    'ImageFolder',
    'ResumableSampler',
    'collate',
    'find_images',
    'read_caption',
    'split_files',
]

class DataError(DiffbackboneError, ValueError):
    """The training data cannot be used; the message says why and what to do."""


def find_images(root: str | Path) -> list[Path]:
    """Image files under `root` (recursive, following linked folders, by extension, sorted)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f'Data folder {root} does not exist or is not a folder. Point --data at a folder of images.')
    from ..data.pipeline import folder_images  # deferred: `--help` imports no handler library

    files = sorted(Path(p) for p in folder_images(root) if os.path.isfile(p))  # the walk of every command: links too
    if not files:
        raise DataError(f'No images found under {root} (searched recursively for {", ".join(IMAGE_EXTENSIONS)}). '
                        'Point --data at a folder of images.')
    return files


def read_caption(image: Path) -> str:
    """Caption of an image from a sidecar `<name>.txt` or `<name>.json` (key "caption"); '' when there is none."""
    txt, js = image.with_suffix('.txt'), image.with_suffix('.json')
    try:
        if txt.is_file():
            return txt.read_text(encoding='utf-8').strip()
        if js.is_file():
            caption = json.loads(js.read_text(encoding='utf-8')).get('caption', '')
            return caption if isinstance(caption, str) else ''
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError):
        pass  # an unreadable caption falls back to the empty prompt, as a missing one does
    return ''


def _load_rgb(path: Path) -> Image.Image:
    """8-bit RGB pixels of an image file, read by the package's one loader (`images.open_image`)."""
    img = open_image(path)
    if img.mode == 'F':  # grey of a high bit depth, in [0, 1]: the crops work on 8-bit RGB
        grey = np.asarray(img, dtype=np.float32) * 255.0 + 0.5
        img = Image.fromarray(grey.clip(0, 255).astype(np.uint8), 'L').convert('RGB')
    return img


class ImageFolder(Dataset):
    """Images as tensors in [-1, 1] at `size` x `size`, with captions when asked for.

    Training samples are random resized crops seeded by (seed, epoch, index); evaluation samples are a resize of the
    short side followed by a centre crop.
    """

    def __init__(
            self,
            files: Sequence[Path],
            size: int,
            train: bool = True,
            seed: int = 0,
            scale: tuple[float, float] = (0.5, 1.0),
            captions: bool = False,
    ):
        if not files:
            raise DataError('No images to load.')
        self.files = list(files)
        self.size = size
        self.train = train
        self.seed = seed
        self.captions = captions
        self.epoch = 0
        if train:
            self.transform = v2.RandomResizedCrop(size, scale=scale, antialias=True)
        else:
            self.transform = v2.Compose([v2.Resize(size, antialias=True), v2.CenterCrop(size)])

    def __len__(self) -> int:
        return len(self.files)

    def read(self, path: Path, index: int = 0) -> torch.Tensor | None:
        """The transformed image in [-1, 1] (crop seeded by epoch and `index`), or None when it cannot be read."""
        try:
            x = v2.functional.pil_to_tensor(_load_rgb(path))
        except Exception:  # noqa: BLE001 (any decoder failure: corrupt, truncated, bomb, unsupported) skips the file
            return None
        if self.train:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(hash((self.seed, self.epoch, index)) & 0x7FFF_FFFF)
                x = self.transform(x)
        else:
            x = self.transform(x)
        return x.float() / 127.5 - 1

    def __getitem__(self, index: int) -> dict:
        skipped = []
        for k in range(len(self.files)):
            path = self.files[(index + k) % len(self.files)]
            x = self.read(path, index)
            if x is None:
                skipped.append(str(path))
                continue
            return dict(image=x, caption=read_caption(path) if self.captions else '', skipped=skipped)
        raise DataError(f'None of the {len(self.files)} images could be read (first: {self.files[0]}). '
                        'Check that the folder holds image files PIL can open.')


def collate(samples: list[dict]) -> dict:
    """Stack images; keep captions as a list; gather the paths of skipped files."""
    return dict(images=torch.stack([s['image'] for s in samples]), captions=[s['caption'] for s in samples],
                skipped=[p for s in samples for p in s['skipped']])


class ResumableSampler(Sampler[int]):
    """`DistributedSampler` (shuffled per epoch, rank's share, drop_last) that can start part-way into an epoch."""

    def __init__(self, dataset: Dataset, rank: int = 0, world_size: int = 1, seed: int = 0):
        self.inner = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed,
                                        drop_last=True)
        self.start = 0

    def set_state(self, epoch: int, start: int) -> None:
        """Iterate epoch `epoch` from its `start`-th index (of this rank)."""
        self.inner.set_epoch(epoch)
        self.start = start

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.inner), self.start, None)

    def __len__(self) -> int:
        return max(0, len(self.inner) - self.start)


def split_files(files: Sequence[Path], n_val: int, seed: int) -> tuple[list[Path], list[Path]]:
    """A seeded split of `files` into (train, held-out validation of n_val files)."""
    order = torch.randperm(len(files), generator=torch.Generator().manual_seed(seed)).tolist()
    val = sorted(files[i] for i in order[:n_val])
    train = sorted(files[i] for i in order[n_val:])
    return train, val

