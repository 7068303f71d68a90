"""Benchmarks, each printing ratios against a reference run in the same process.

    python -m diffbackbone.bench             our extractor vs plain diffusers (`speed`; `--profile`: where time goes)
    python -m diffbackbone.bench.store_speed the feature store at dataset scale: memory, pipeline vs model-only rate
    python -m diffbackbone.bench.cost        FLOPs, parameters and the activation peak of a model at its native size
    python -m diffbackbone.bench.train_step  one clean-train optimizer step
    python -m diffbackbone.bench.coldstart   import to first feature, ours vs the reference loader, in fresh processes
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Optional

__all__ = ['check_json_arg']


def check_json_arg(p: argparse.ArgumentParser, path: Optional[str]) -> None:
    """A benchmark's `--json`, before the run: its folder exists and it is not a file someone else wrote."""
    if not path:
        return
    if not Path(path).resolve().parent.is_dir():
        p.error(f'--json {path}: its folder does not exist; create it first')
    from ..data.outputs import OutputError, check_file

    try:
        check_file(path, option='--json')
    except OutputError as e:
        p.error(str(e))
