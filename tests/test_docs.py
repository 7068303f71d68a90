"""The README is a front page and docs/ holds the rest (#26): every link resolves, every command shown parses with the
real parser, every Python block compiles and its diffbackbone imports import, and the model tables are complete.

Nothing here runs a model: commands are parsed, not run (parsing opens no file), so placeholders such as IMAGE paths
are fine."""
from __future__ import annotations

import argparse
import ast
import importlib
import re
import runpy
import shlex
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / 'README.md'
DOCS = sorted((ROOT / 'docs').glob('*.md'))
PAGES = [README] + DOCS

FENCE = re.compile(r'^(\s*)(`{3,}|~{3,})\s*([\w+-]*)')
LINK = re.compile(r'(?<!!)\[[^\]]*\]\(([^)\s]+)(?:\s+"[^"]*")?\)')
SHELL_ENDS = {'|', '||', '&&', ';', '>', '>>', '<', '2>', '&'}


def _name(path: Path) -> str:
    return str(path.relative_to(ROOT))


def fenced_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, first line number, text) of every fenced code block of a Markdown file."""
    blocks, lang, start, lines, fence = [], None, 0, [], None
    for number, line in enumerate(path.read_text().splitlines(), 1):
        match = FENCE.match(line)
        if fence is None and match:
            fence, lang, start, lines = match.group(2), match.group(3).lower(), number + 1, []
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            blocks.append((lang, start, '\n'.join(lines)))
            fence = None
        elif fence is not None:
            lines.append(line)
    assert fence is None, f'{_name(path)}: a code block opened at line {start - 1} is never closed'
    return blocks


def prose(path: Path) -> str:
    """The file without its fenced code blocks (where links and headings live)."""
    out, fence = [], None
    for line in path.read_text().splitlines():
        match = FENCE.match(line)
        if fence is None and match:
            fence = match.group(2)
        elif fence is not None and line.strip().startswith(fence[0] * len(fence)) and not line.strip().strip(fence[0]):
            fence = None
        elif fence is None:
            out.append(line)
    return '\n'.join(out)


def anchors(path: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, -1, -2 for repeats."""
    found, seen = set(), {}
    for line in prose(path).splitlines():
        match = re.match(r'^#{1,6}\s+(.*?)\s*#*\s*$', line)
        if not match:
            continue
        slug = re.sub(r'[^\w\- ]', '', match.group(1).lower().replace('`', '')).replace(' ', '-')
        count = seen.get(slug, 0)
        seen[slug] = count + 1
        found.add(slug if count == 0 else f'{slug}-{count}')
    return found


def shell_commands(path: Path) -> list[tuple[int, str]]:
    """(line number, command) of every shell line of a fenced block: continuations joined, `$ ` prompts dropped."""
    out = []
    for lang, start, text in fenced_blocks(path):
        if lang not in ('', 'bash', 'sh', 'shell', 'console', 'text'):
            continue
        pending, first = '', None
        for offset, line in enumerate(text.splitlines()):
            if first is None:
                first = start + offset
            pending += line
            if line.endswith('\\'):
                pending = pending[:-1] + ' '
                continue
            command = pending.strip()
            command = command[2:] if command.startswith('$ ') else command
            if command:
                out.append((first, command))
            pending, first = '', None
    return out


def diffbackbone_argv(command: str) -> tuple[str, list[str]] | None:
    """('diffbackbone' or the module run by `python -m`, its arguments) of a command line, or None for other lines.

    Takes the diffbackbone part of `torchrun ... -m diffbackbone ...`, `python -m diffbackbone...` and
    `.venv/bin/diffbackbone ...`, up to the first shell operator; a `#` starts a comment.
    """
    try:
        tokens = shlex.split(command, comments=True)
    except ValueError:
        return None
    for i, token in enumerate(tokens):
        if token in SHELL_ENDS:
            tokens = tokens[:i]
            break
    if not tokens:
        return None
    program = tokens[0].rsplit('/', 1)[-1]
    if program == 'diffbackbone':
        return 'diffbackbone', tokens[1:]
    if program in ('python', 'python3', 'torchrun') and '-m' in tokens:
        i = tokens.index('-m')
        if i + 1 < len(tokens) and (tokens[i + 1] == 'diffbackbone' or tokens[i + 1].startswith('diffbackbone.')):
            return tokens[i + 1], tokens[i + 2:]
    return None


def all_commands() -> list[tuple[str, str, list[str]]]:
    found = []
    for path in PAGES:
        for line, command in shell_commands(path):
            parsed = diffbackbone_argv(command)
            if parsed:
                found.append((f'{_name(path)}:{line}', parsed[0], parsed[1]))
    return found


COMMANDS = all_commands()


def python_blocks() -> list[tuple[str, str]]:
    return [(f'{_name(path)}:{start}', text) for path in PAGES for lang, start, text in fenced_blocks(path)
            if lang in ('python', 'py')]


PYTHON_BLOCKS = python_blocks()


def test_readme_is_a_front_page():
    lines = README.read_text().splitlines()
    assert len(lines) <= 300, f'README.md has {len(lines)} lines: move details into docs/'
    assert len(DOCS) >= 4, [p.name for p in DOCS]
    for page in DOCS:
        assert f'docs/{page.name}' in README.read_text(), f'README.md does not link docs/{page.name}'


def test_readme_keeps_the_ci_test_command():
    """`.ci/run` calls this exact command; the README shows it verbatim."""
    command = '.venv/bin/python -m pytest -q -n 2'
    assert command in (ROOT / '.ci' / 'run').read_text()
    assert any(c == command or c.startswith(command + ' ') for _, c in shell_commands(README))


@pytest.mark.parametrize('path', PAGES, ids=_name)
def test_relative_links_resolve(path):
    bad = []
    for target in LINK.findall(prose(path)):
        if re.match(r'^[a-z][a-z0-9+.-]*:', target):  # https:, mailto:, ...
            continue
        file, _, anchor = target.partition('#')
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            bad.append(f'{target} (no file {dest.relative_to(ROOT) if dest.is_relative_to(ROOT) else dest})')
        elif anchor and dest.suffix == '.md' and anchor not in anchors(dest):
            bad.append(f'{target} (no heading #{anchor} in {_name(dest)})')
    assert not bad, f'{_name(path)}: broken links: {bad}'


def test_anchor_slugs_follow_github():
    """The slug rule the link check uses, on headings of these pages."""
    assert 'depth-cleandifts-probe' in anchors(ROOT / 'docs' / 'tasks.md')
    assert 'fused-with-dinov2-a-tale-of-two-features' in anchors(ROOT / 'docs' / 'models.md')


def test_commands_are_found():
    """The extraction sees the README's and the docs' commands (a broken extractor must not pass vacuously)."""
    programs = {program for _, program, _ in COMMANDS}
    subcommands = {argv[0] for _, program, argv in COMMANDS if program == 'diffbackbone' and argv}
    assert {'diffbackbone', 'diffbackbone.bench'} <= programs, programs
    assert {'features', 'match', 'depth', 'inspect', 'eval', 'taps', 'clean-train', 'export', 'bench'} <= subcommands
    assert diffbackbone_argv('torchrun --nproc-per-node 8 -m diffbackbone features d/ --out f/  # c') == (
        'diffbackbone', ['features', 'd/', '--out', 'f/'])
    assert diffbackbone_argv('.venv/bin/diffbackbone taps sd21 | head') == ('diffbackbone', ['taps', 'sd21'])
    assert diffbackbone_argv('bash tools/install.sh --mmseg') is None


class _Parsed(Exception):
    """Raised in place of running a command once its parser has accepted the arguments."""


def _parse_only(monkeypatch):
    original = argparse.ArgumentParser.parse_args

    def parse_args(self, args=None, namespace=None):
        original(self, args, namespace)
        raise _Parsed

    monkeypatch.setattr(argparse.ArgumentParser, 'parse_args', parse_args)


@pytest.mark.parametrize('where,program,argv', COMMANDS, ids=[c[0] for c in COMMANDS])
def test_command_parses(where, program, argv, monkeypatch, capsys):
    """Each command line shown parses with the real parser (a parser error exits; that fails here)."""
    if program == 'diffbackbone':
        from diffbackbone.cli import build_parser

        try:
            args, rest = build_parser().parse_known_args(argv)
        except SystemExit as e:
            pytest.fail(f'{where}: diffbackbone {shlex.join(argv)}: {capsys.readouterr().err.strip()} ({e.code})')
        if args.command != 'bench':
            assert not rest, f'{where}: unrecognized arguments {rest}'
            return
        program, argv = 'diffbackbone.bench', rest  # `diffbackbone bench ...` hands the rest to the bench's parser
    try:
        importlib.import_module(program)
    except ImportError as e:  # diffbackbone.mmseg needs mmcv, installed by `tools/install.sh --mmseg`
        pytest.skip(f'{program} does not import here: {e}')
    _parse_only(monkeypatch)
    monkeypatch.setattr(sys, 'argv', [program] + argv)
    is_package = importlib.util.find_spec(program).submodule_search_locations is not None
    monkeypatch.delitem(sys.modules, program + '.__main__' if is_package else program, raising=False)
    try:
        runpy.run_module(program, run_name='__main__', alter_sys=False)
    except _Parsed:
        return
    except SystemExit as e:
        pytest.fail(f'{where}: python -m {program} {shlex.join(argv)}: {capsys.readouterr().err.strip()} ({e.code})')
    pytest.fail(f'{where}: python -m {program} ran without parsing its arguments')


@pytest.mark.parametrize('where,code', PYTHON_BLOCKS, ids=[b[0] for b in PYTHON_BLOCKS])
def test_python_block(where, code):
    """Every Python block compiles; its `import diffbackbone...` / `from diffbackbone... import X` lines import."""
    tree = ast.parse(compile(code, where, 'exec', ast.PyCF_ONLY_AST))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split('.')[0] == 'diffbackbone':
                    importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or '').split('.')[0] == 'diffbackbone':
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):
                    importlib.import_module(f'{node.module}.{alias.name}')  # a submodule; fails when there is none


def test_python_blocks_are_found():
    assert any('from diffbackbone' in code for _, code in PYTHON_BLOCKS)
    assert len({where.split(':')[0] for where, _ in PYTHON_BLOCKS}) >= 4


def _registered_models() -> set[str]:
    import timm

    import diffbackbone  # noqa: F401  (registers the models)

    return {name for name in timm.list_models()
            if timm.models.model_entrypoint(name).__module__.startswith('diffbackbone.')}


@pytest.mark.parametrize('page', ['README.md', 'docs/models.md'])
def test_model_table_names_every_model(page):
    names = _registered_models()
    assert len(names) >= 30 and 'cleandift_sd21' in names and 'flux' in names
    text = (ROOT / page).read_text()
    missing = sorted(name for name in names if f'`{name}`' not in text)
    assert not missing, f'{page} does not list these registered models: {missing}'


@pytest.mark.parametrize('path', PAGES, ids=_name)
def test_repository_files_in_commands_exist(path):
    """Files of this repository that a command names (configs, tools, the sample image) exist."""
    missing = []
    for line, command in shell_commands(path):
        try:
            tokens = shlex.split(command, comments=True)
        except ValueError:
            continue
        missing += [f'{line}: {t}' for t in tokens
                    if t.startswith(('configs_mmseg/', 'tools/', 'diffbackbone/assets/')) and not (ROOT / t).exists()]
    assert not missing, f'{_name(path)}: {missing}'
