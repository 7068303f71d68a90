"""The package's layout (#22): folders by role, no import circle (deferred imports inside functions included)."""
from __future__ import annotations

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


def test_subcommand_handlers_resolve():
    """The CLI imports each handler by name only when it runs: every name must exist."""
    from diffbackbone import cli

    parser = cli.build_parser()
    commands = [a for a in parser._actions if a.dest == 'command'][0].choices
    targets = []
    for sub in commands.values():
        nested = [a for a in sub._actions if getattr(a, 'choices', None) and a.dest == 'eval']
        for p in [sub] + (list(nested[0].choices.values()) if nested else []):
            func = p.get_default('func')
            if getattr(func, 'target', None):
                targets.append(func.target)
    assert len(targets) >= 6
    for module, handler in targets:
        assert callable(getattr(importlib.import_module(f'diffbackbone.{module}'), handler)), (module, handler)


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
                                    'diffbackbone.bench.store', 'diffbackbone.bench.train_step'])
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
