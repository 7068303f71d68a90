"""`python -m diffbackbone.bench.store`: the old name of the feature-store benchmark, now `bench/store_speed.py`
(`data/store.py` is the store itself). Kept so that command lines and notes using it still run; it warns once."""
from __future__ import annotations

import warnings
from typing import Optional, Sequence

__all__ = ['main']


def main(argv: Optional[Sequence[str]] = None) -> dict:
    """Warn that the module moved, then run `bench.store_speed.main`."""
    from .store_speed import main as store_speed_main

    warnings.warn('diffbackbone.bench.store is now diffbackbone.bench.store_speed; the old name will go.',
                  DeprecationWarning, stacklevel=2)
    return store_speed_main(argv)


if __name__ == '__main__':
    main()
