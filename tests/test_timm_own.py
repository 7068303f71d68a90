"""timm's own per-model tests, run on every tiny model diffbackbone registers (issue #30.10); they replace our
re-implementation of the same checks.

`timm_test_models.py` is timm's `tests/test_models.py`, vendored unmodified (see its notice). Its tests are
parametrised over `timm.list_models(...)` when it is imported; imported here after `import diffbackbone`, those lists
hold our models too, and each test below runs on the tiny models (`test_*`) that timm's own parametrisation picks:
forward, backward, default cfgs (timm's non-standard variant for the names it classes as transformers, such as
`test_vit*`) and features_only. The two `forward_intermediates` tests pick models by module (timm's own modules); our
models all implement `forward_intermediates` and the 'getter' features, so they run on every tiny model.
"""
import importlib.util
import warnings
from pathlib import Path

import pytest
import timm
import torch
from timm.models import model_entrypoint

import diffbackbone  # noqa: F401  (registers the models before timm's tests list them)

TIMM_VERSION = '1.0.31'  # the version `timm_test_models.py` comes from
BY_MODULE = ('test_model_forward_intermediates_features', 'test_model_forward_intermediates')
TESTS = ('test_model_forward', 'test_model_backward', 'test_model_default_cfgs', 'test_model_default_cfgs_non_std',
         'test_model_forward_features', *BY_MODULE)
TINY = sorted(n for n in timm.list_models('test_*') if model_entrypoint(n).__module__.startswith('diffbackbone.'))


def _load_timm_tests():
    path = Path(__file__).with_name('timm_test_models.py')
    spec = importlib.util.spec_from_file_location('timm_test_models', path)
    module = importlib.util.module_from_spec(spec)
    profiling = torch._C._jit_set_profiling_executor(True)  # the module sets TorchScript's executor: keep ours
    try:
        with warnings.catch_warnings():  # its CI markers (base, cfg, ...) are registered in timm's pyproject only
            warnings.simplefilter('ignore', pytest.PytestUnknownMarkWarning)
            spec.loader.exec_module(module)
    finally:
        torch._C._jit_set_profiling_executor(profiling)
    return module


timm_tests = _load_timm_tests()


def _params(test: str) -> list[str]:
    """Our tiny models among the `model_name` parameters of timm's test (all of them for the by-module tests), as
    timm names them there (the default-cfg tests take every pretrained tag: `test_cleandift.tiny`)."""
    if test in BY_MODULE:
        return TINY
    marks = getattr(getattr(timm_tests, test), 'pytestmark', [])
    names = next(m.args[1] for m in marks if m.name == 'parametrize' and m.args[0] == 'model_name')
    return [n for n in names if n.split('.')[0] in TINY]


CASES = [(test, name) for test in TESTS for name in _params(test)]


def test_timm_version_and_coverage():
    """The vendored file is the installed timm's; every tiny model gets forward, backward, one default-cfg test and
    the intermediates tests; features_only as timm picks it (not for names timm classes as transformers)."""
    assert timm.__version__ == TIMM_VERSION, f'update tests/timm_test_models.py to timm {timm.__version__}'
    assert len(TINY) == 12
    for name in TINY:
        ran = {test for test, n in CASES if n.split('.')[0] == name}
        assert {'test_model_forward', 'test_model_backward', *BY_MODULE} <= ran, name
        assert len(ran & {'test_model_default_cfgs', 'test_model_default_cfgs_non_std'}) == 1, name
        assert ('test_model_forward_features' in ran) == ('test_model_default_cfgs' in ran), name


@pytest.mark.parametrize('test, name', CASES, ids=[f'{t.removeprefix("test_model_")}-{n}' for t, n in CASES])
def test_timm(test, name):
    fn = getattr(timm_tests, test)
    if 'cfg_device' in fn.__code__.co_varnames[:fn.__code__.co_argcount]:
        cfg_device = 'meta' if timm_tests._HAS_DEVICE_CONTEXT else timm_tests.torch_device  # timm's fixture
        fn(name, 1, cfg_device)
    else:
        fn(name, 2 if test == 'test_model_backward' else 1)
