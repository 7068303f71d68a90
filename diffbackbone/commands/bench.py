"""`diffbackbone bench ...`: our extractor timed against a plain-diffusers reference (`diffbackbone.bench.speed`, whose
own parser reads every option)."""
from __future__ import annotations

import argparse

__all__ = ['add_parser', 'run']


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add `bench` to `diffbackbone`'s subcommands: every argument after it goes to the benchmark (`args.rest`)."""
    p = subparsers.add_parser('bench', help='time our extractor against a plain-diffusers reference (same weights)',
                              add_help=False)
    p.set_defaults(func=run, rest=[])
    return p


def run(args: argparse.Namespace) -> int:
    """Handler of `diffbackbone bench`."""
    from ..bench.speed import main as bench_main

    bench_main(args.rest)
    return 0
