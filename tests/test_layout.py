"""The package's layout (#22): folders by role, no import circle (deferred imports inside functions included)."""
from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import runpy
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / 'diffbackbone'

# What the top level may hold. A new module goes into the folder of its role; grow this set only for a new role.
TOP_LEVEL = {
    '__init__', '__main__', 'cli', 'cli_args',  # the package, `python -m diffbackbone`, the parser and its types
    'hub', 'prompts', 'errors',  # shared services: Hub downloads and caches, prompt embeddings, error types
    'correspondence', 'depth', 'torchvision',  # public task modules (README paths)
    'models', 'data', 'commands', 'bench', 'train', 'evals', 'mmseg',  # folders by role
}


def _modules(root: Path = PACKAGE) -> dict[str, Path]:
    """Dotted name -> file of every module of the package (a package's name maps to its __init__.py)."""
    out = {}
    for path in root.rglob('*.py'):
        parts = list(path.relative_to(root.parent).with_suffix('').parts)
        if parts[-1] == '__init__':
            parts.pop()
        out['.'.join(parts)] = path
    return out


def _imports(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The package modules `name` imports anywhere in its file (module level or inside functions)."""
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split('.')[:len(package.split('.')) - node.level + 1]
                source = '.'.join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ''
            # `from X import y`: the submodule X.y where there is one, else X itself
            targets = [f'{source}.{a.name}' if f'{source}.{a.name}' in modules else source for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in modules:  # `import a.b.c` of a package module: its nearest module
                target = target.rpartition('.')[0]
            if target and target != name:
                found.add(target)
    return found


def import_graph(root: Path = PACKAGE) -> dict[str, set[str]]:
    modules = _modules(root)
    return {name: _imports(name, path, modules) for name, path in modules.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import circle of `graph` as [a, b, ..., a], or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str]:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        state[node] = 2
        path.pop()
        return []

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return []


def test_no_import_circle():
    graph = import_graph()
    assert len(graph) > 30 and 'diffbackbone.models._base' in graph['diffbackbone.models.flux']
    cycle = find_cycle(graph)
    assert not cycle, 'import circle: ' + ' -> '.join(cycle)


def test_cycle_finder_finds_a_deferred_circle(tmp_path):
    """The check sees circles made by imports inside functions, as the old cli <-> bench one was."""
    pkg = tmp_path / 'pkg'
    (pkg / 'sub').mkdir(parents=True)
    (pkg / '__init__.py').write_text('')
    (pkg / 'sub' / '__init__.py').write_text('')
    (pkg / 'a.py').write_text('def f():\n    from .sub.b import g\n')
    (pkg / 'sub' / 'b.py').write_text('from .. import c\n')
    (pkg / 'c.py').write_text('def h():\n    from pkg import a\n')
    assert find_cycle(import_graph(pkg)) == ['pkg.a', 'pkg.sub.b', 'pkg.c', 'pkg.a']
    (pkg / 'c.py').write_text('import os\n')
    assert find_cycle(import_graph(pkg)) == []


def test_nothing_below_the_cli_imports_it():
    graph = import_graph()
    users = sorted(n for n, deps in graph.items() if 'diffbackbone.cli' in deps)
    assert users == ['diffbackbone.__main__'], users


def test_top_level_holds_only_the_roles():
    names = {p.stem for p in PACKAGE.glob('*.py')} | {p.parent.name for p in PACKAGE.glob('*/__init__.py')}
    assert names == TOP_LEVEL, f'unexpected: {sorted(names - TOP_LEVEL)}, missing: {sorted(TOP_LEVEL - names)}'


def _subparsers(parser) -> dict:
    """Every (sub)command's parser by its command line words: {'features': ..., 'eval spair': ...}."""
    out = {}
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                out[name] = sub
                out.update({f'{name} {k}': v for k, v in _subparsers(sub).items()})
    return out


def test_every_command_is_a_module_with_add_parser_and_run():
    """cli.py only assembles: each command is a module of cli.COMMANDS with `add_parser(subparsers)` and `run(args)`,
    and each subcommand's handler is its module's `run` (eval's: commands/eval.py's, which runs evals.HANDLERS)."""
    from diffbackbone import cli

    modules = {f'diffbackbone.{m}': importlib.import_module(f'diffbackbone.{m}') for m in cli.COMMANDS}
    for module in modules.values():
        assert callable(module.add_parser) and callable(module.run), module.__name__
    parsers = _subparsers(cli.build_parser())
    assert {'features', 'depth', 'taps', 'inspect', 'export', 'clean-train', 'match', 'bench', 'eval spair',
            'eval hpatches', 'eval davis', 'eval pixel'} <= set(parsers)
    for name, parser in parsers.items():
        func = parser.get_default('func')
        if name == 'eval':  # a group: its subcommands have the handlers
            continue
        assert func.__name__ == 'run' and func.__module__ in modules, (name, func)
    from diffbackbone.commands.eval import HANDLERS

    assert set(HANDLERS) == {'spair', 'hpatches', 'davis', 'pixel'}
    for module, handler in HANDLERS.values():
        assert callable(getattr(importlib.import_module(module), handler)), (module, handler)


def test_help_imports_no_handler_library(run_python):
    """Building the parser (`--help`) imports the command modules but none of the libraries their handlers run."""
    res = run_python("""
        import sys
        from diffbackbone import cli
        cli.build_parser()
        heavy = ['diffbackbone.data.extract', 'diffbackbone.depth', 'diffbackbone.correspondence',
                 'diffbackbone.evals.spair', 'diffbackbone.evals.pixel', 'diffbackbone.evals.davis',
                 'diffbackbone.evals.hpatches', 'diffbackbone.bench.speed', 'diffbackbone.data.pipeline']
        print([m for m in heavy if m in sys.modules])
    """)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == '[]'


def test_no_long_function_in_cli():
    """cli.py assembles and dispatches; its functions stay short (the old build_parser had 211 lines)."""
    tree = ast.parse((PACKAGE / 'cli.py').read_text())
    lengths = {n.name: n.end_lineno - n.lineno + 1 for n in ast.walk(tree)
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))}
    assert lengths and max(lengths.values()) <= 80, lengths


def test_library_never_imports_the_commands():
    """Handlers sit on top: evals/, bench/ and every other library module import library code, never
    diffbackbone.commands (only cli.py and the command modules themselves do)."""
    graph = import_graph()
    users = sorted(n for n, deps in graph.items() if any(d.startswith('diffbackbone.commands') for d in deps)
                   and n != 'diffbackbone.cli' and not n.startswith('diffbackbone.commands'))
    assert users == [], users
    assert 'diffbackbone.data.extract' in graph['diffbackbone.evals.pixel']  # the check sees deferred imports


@pytest.mark.parametrize('path', [
    'diffbackbone.FeatureStore', 'diffbackbone.torchvision.fpn_backbone', 'diffbackbone.prompts.use_prompts',
    'diffbackbone.depth.DepthProbe', 'diffbackbone.correspondence.match_points', 'diffbackbone.models.fast.optimize',
    'diffbackbone.train.clean_train', 'diffbackbone.bench.speed.run',
])
def test_public_paths(path):
    """The public paths the README and docs/ show (`diffbackbone.mmseg` needs mmcv: tests/test_mmseg*.py import it)."""
    module, _, attr = path.rpartition('.')
    assert getattr(importlib.import_module(module), attr) is not None


@pytest.mark.parametrize('module', ['diffbackbone', 'diffbackbone.bench', 'diffbackbone.bench.cost',
                                    'diffbackbone.bench.store_speed', 'diffbackbone.bench.store',
                                    'diffbackbone.bench.train_step'])
def test_python_dash_m_commands(module, monkeypatch, capsys):
    """`python -m MODULE --help` of every command the README and docs/ show (run in-process, as runpy does for -m)."""
    monkeypatch.setattr(sys, 'argv', [module, '--help'])
    is_package = importlib.util.find_spec(module).submodule_search_locations is not None
    monkeypatch.delitem(sys.modules, module + '.__main__' if is_package else module, raising=False)  # as -m: fresh
    with pytest.raises(SystemExit) as info:
        runpy.run_module(module, run_name='__main__', alter_sys=False)
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith('usage: ') and ('python -m ' + module if module != 'diffbackbone' else 'diffbackbone') in out
