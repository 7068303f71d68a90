"""On-disk cache of per-image feature maps, so that an interrupted evaluation resumes where it stopped.

Files live in `<root>/<key>/<group>/<image>.safetensors`, where `<key>` hashes everything that changes the features
(model, weights file, size, taps, prompt, dtype, model arguments): another configuration never reads them; each file
records the size and mtime of its image, so a replaced image is computed again. Each file is written atomically
(`hub.save_safetensors`), so a killed run leaves no half-written entry. A file holds one map, or several (`tap.<name>`,
e.g. the raw maps a fused model's co-PCA needs).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError, safe_open

from ..hub import save_safetensors, write_text_atomic

__all__ = ['FeatureCache', 'weights_fingerprint']


def weights_fingerprint(path: Optional[str]) -> Optional[dict[str, Any]]:
    """Identity of a local weights file: resolved path, size and modification time (None for Hub weights)."""
    if not path:
        return None
    st = Path(path).stat()
    return dict(path=str(Path(path).resolve()), bytes=st.st_size, mtime_ns=st.st_mtime_ns)


class FeatureCache:
    """Feature maps keyed by (group, image name) under a folder named by the hash of `config`."""

    def __init__(self, root: str | Path, config: dict[str, Any]):
        text = json.dumps(config, sort_keys=True, default=str)
        self.key = hashlib.sha256(text.encode()).hexdigest()[:16]
        self.folder = Path(root) / self.key
        self.config = config
        info = self.folder / 'config.json'
        if not info.is_file():  # human-readable record of what the features are
            write_text_atomic(info, json.dumps(config, sort_keys=True, indent=1, default=str) + '\n')

    def path(self, group: str, name: str) -> Path:
        return self.folder / group / f'{name}.safetensors'

    def get(self, group: str, name: str, source: Optional[Path] = None
            ) -> Optional[torch.Tensor | dict[str, torch.Tensor]]:
        """The cached map (or {tap: map} as put), or None when absent, unreadable, or computed from another version of
        `source` (the image)."""
        path = self.path(group, name)
        if not path.is_file():
            return None
        try:
            with safe_open(path, 'pt') as f:
                stale = source is not None and (f.metadata() or {}).get('source') != _stamp(source)
                keys = list(f.keys())
                if stale:
                    features = None
                elif keys == ['features']:
                    features = f.get_tensor('features')
                else:  # several maps, stored as `tap.<name>`
                    features = {k[4:]: f.get_tensor(k) for k in keys if k.startswith('tap.')}
                    if len(features) != len(keys):
                        features = None
        except (SafetensorError, OSError, KeyError):  # not written by us (writes are atomic): compute it again
            features = None
        if features is None:
            path.unlink(missing_ok=True)
        return features

    def put(self, group: str, name: str, features: torch.Tensor | dict[str, torch.Tensor],
            source: Optional[Path] = None) -> None:
        """Store one map, or several ({tap: map}, e.g. the raw maps a fused model's co-PCA needs)."""
        metadata = dict(cache_key=self.key, **({'source': _stamp(source)} if source is not None else {}))
        tensors = ({f'tap.{k}': v.contiguous() for k, v in features.items()} if isinstance(features, dict)
                   else {'features': features})
        save_safetensors(tensors, self.path(group, name), metadata=metadata)


def _stamp(path: Path) -> str:
    """Size and modification time of a file: a replaced image invalidates its cached features."""
    st = Path(path).stat()
    return f'{st.st_size}:{st.st_mtime_ns}'
