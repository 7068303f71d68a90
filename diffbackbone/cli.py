"""Command line: `diffbackbone features IMAGE... --model cleandift_sd21 --out feats.safetensors`.

One module per subcommand under `diffbackbone/commands/` (`clean-train`: `diffbackbone/train/cli.py`); what each does is
in docs/tasks.md, how errors end (`error:` exit 2, `interrupted:` exit 130, else a traceback) in docs/reliability.md#errors."""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings
from typing import Optional, Sequence

__all__ = ['COMMANDS', 'main', 'build_parser']

# The command modules, in the order `--help` lists them; each has `add_parser(subparsers)` and `run(args) -> int`.
COMMANDS = ('commands.features', 'commands.depth', 'commands.taps', 'commands.inspect', 'commands.export',
            'train.cli', 'commands.train', 'commands.match', 'commands.eval', 'commands.bench',
            'commands.generate')


def build_parser() -> argparse.ArgumentParser:
    """The `diffbackbone` parser: every command module adds its subcommand."""
    parser = argparse.ArgumentParser(prog='diffbackbone', description='Diffusion-model features as vision backbones.')
    sub = parser.add_subparsers(dest='command', required=True)
    for name in COMMANDS:
        importlib.import_module(f'.{name}', __package__).add_parser(sub)
    return parser


def _parse(argv: Optional[Sequence[str]]) -> argparse.Namespace:
    """Parse `argv`; `bench` takes every unknown argument (`args.rest`), the other commands refuse them."""
    from .cli_args import check_prompt
    from .errors import InputError

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    if hasattr(args, 'rest'):
        args.rest = rest
    elif rest:
        parser.error(f'unrecognized arguments: {" ".join(rest)}')
    try:
        check_prompt(args)  # a usage error: argparse's message and exit 2, before anything loads
    except InputError as e:
        parser.error(str(e))
    return args


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    from .models.conditioning.text import PromptTruncatedWarning

    if issubclass(category, PromptTruncatedWarning):
        print('warning: ' + ' '.join(str(message).splitlines()), file=sys.stderr)
    else:
        sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run one command line; returns the exit status."""
    from .errors import DiffbackboneError

    args = _parse(argv)
    try:
        with warnings.catch_warnings():  # our warnings (a prompt cut to the text encoder's window) as one line each
            warnings.showwarning = _show_warning
            return args.func(args)
    except BrokenPipeError:  # output piped into `head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except KeyboardInterrupt:
        print('interrupted: stopped by Ctrl-C.', file=sys.stderr)
        return 130
    except DiffbackboneError as e:  # what a user can fix; any other exception is a bug and shows its traceback
        print('error: ' + ' '.join(str(e).splitlines()), file=sys.stderr)  # one line (Hub errors add their cause)
        return 2


if __name__ == '__main__':
    sys.exit(main())
