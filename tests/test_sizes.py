"""One size rule for every command, before any model loads (issue #30 item 7)."""
from __future__ import annotations

import pytest
from PIL import Image

from diffbackbone import cli


@pytest.fixture
def files(tmp_path):
    Image.new('RGB', (64, 64)).save(tmp_path / 'a.png')
    (tmp_path / 'data').mkdir()
    return tmp_path


CASES = [
    ('inspect {t}/a.png --out {t}/o.png --size 100000', '--size 100000: one batch of 1 input image'),
    ('inspect {t}/a.png --out {t}/o.png --tile 100000', '--tile 100000: one batch'),
    ('inspect {t}/a.png --out {t}/o.png --size 8', '--size 8: test_dift takes images of at least 64 x 64 px'),
    ('eval hpatches --data {t}/data --size 100000', '--size 100000: one batch'),
    ('eval davis --data {t}/data --short-side 1', '--short-side 1: test_dift takes images of at least 64'),
    ('eval davis --data {t}/data --short-side 100000', '--short-side 100000: one batch'),
    ('eval pixel --data {t}/data --store {t}/s --label-size 100000', '--label-size 100000: one batch'),
    ('eval spair --data {t}/data --size 16', '--size 16: test_dift takes images of at least 64'),
    ('match {t}/a.png {t}/a.png --points 5,5 --size 100000', '--size 100000: one batch of 2'),
]


@pytest.mark.parametrize('argv,message', CASES, ids=[c[0].split(' --')[0].replace(' {t}/', ' ') for c in CASES])
def test_sizes_are_refused_before_any_model_loads(argv, message, files, capsys, monkeypatch):
    import diffbackbone.data.extract as extract
    import diffbackbone.evals.common as common

    def no_model(*a, **k):
        raise AssertionError('a model was built before the size check')

    monkeypatch.setattr(extract, 'load_extractor', no_model)
    monkeypatch.setattr(common, 'model_builder', no_model)
    args = argv.format(t=files).split() + ['--model', 'test_dift', '--random-weights']
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: ') and message in err[0], err
