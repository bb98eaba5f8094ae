"""The face-expression metric with a stand-in classifier (libs.face_expression's API), the intervals of a real run,
and eval_avamerg.py --compare: a run against itself differs by zero, two runs on different pairs are refused in one
line."""
import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from libs import evaluation, face_expression
from libs.autoencoder import center_crop_resize
from libs.avamerg import AvaMERG
from libs.errors import UserError
from libs.evaluation import report
from test_eval import BATCH, ENV, ROOT, data, features, read_jsonl, tiny_config  # noqa: F401 (fixtures)

pytestmark = pytest.mark.slow  # each module evaluates a tiny network several times
SIZE = 32  # the tiny config's resolution


class Brightness:
    """A stand-in with libs.face_expression's classifier API: 'light' if the face's mean grey level is above the
    threshold, else 'dark'."""
    name, labels = 'stand-in-brightness', ('dark', 'light')

    def __init__(self, threshold):
        self.threshold = threshold

    def __call__(self, images):
        grey = torch.tensor([np.asarray(im.convert('L'), dtype=np.float64).mean() / 255 for im in images])
        light = (grey > self.threshold).double()
        return torch.stack([1 - light, light], 1)


def grey(image):
    return np.asarray(image.convert('L'), dtype=np.float64).mean() / 255


@pytest.fixture(scope='module')
def expression_run(tiny_models, data, features, tmp_path_factory):
    """The model and the copy-speaker baseline with the stand-in classifier: (output folder, summary, threshold)."""
    config = tiny_config(tiny_models, data)
    reader = AvaMERG(data, 'test')
    # The median grey level of the gold faces, so that both labels occur.
    threshold = float(np.median([grey(center_crop_resize(reader.load_face(p.response_stem), SIZE))
                                 for p in reader.pairs]))
    with pytest.MonkeyPatch.context() as mp:
        calls = []
        mp.setattr(face_expression, 'load_expression_classifier',
                   lambda path=None, device='cpu': calls.append(path) or Brightness(threshold))
        config.eval.expression_classifier = 'default'
        out = tmp_path_factory.mktemp('eval') / 'expression'
        summary = evaluation.evaluate(config, features=features, skip_fid=True, batch_size=BATCH,
                                      output_path=str(out), baselines=['copy_speaker'])
    assert calls == [None]  # 'default': the module's own classifier
    return out, summary, threshold


def test_expression_per_pair_and_agreement(expression_run, data):
    out, summary, threshold = expression_run
    records = read_jsonl(out / 'pairs.jsonl')
    from PIL import Image
    for r in records:
        assert r['expression']['generated'] == ('light' if grey(Image.open(out / r['face'])) > threshold else 'dark')
    x = summary['metrics']['expression']
    rate = lambda a, b: np.mean([r['expression'][a] == r['expression'][b] for r in records])  # noqa: E731
    assert x == dict(n=len(records), generated_vs_gold=rate('generated', 'gold'),
                     generated_vs_speaker=rate('generated', 'speaker'), gold_vs_speaker=rate('gold', 'speaker'))
    assert {r['expression']['gold'] for r in records} == {'dark', 'light'}
    assert summary['expression_classifier'] == 'stand-in-brightness' and 'expression' not in summary['not_computed']
    report = (out / 'report.md').read_text()
    assert 'face expression read by stand-in-brightness' in report
    assert 'face expression: generated = gold response' in report
    # The copy of the speaker shows the speaker's expression, by construction.
    copy = json.loads((out / 'baselines' / 'copy_speaker' / 'metrics.json').read_text())
    assert copy['metrics']['expression']['generated_vs_speaker'] == 1.0
    assert copy['metrics']['expression']['gold_vs_speaker'] == x['gold_vs_speaker']


def test_every_metric_has_an_interval_around_it(expression_run):
    out, summary, _ = expression_run
    values = report.flat(summary['metrics'])
    assert set(summary['intervals']) == set(values) and 'expression_generated_vs_gold' in values
    for k, (lo, hi) in summary['intervals'].items():
        # A mean over pairs lies inside its percentile interval; a ratio (corpus BLEU, macro-F1) on 8 pairs need not.
        assert lo <= hi and (lo <= values[k] <= hi or not k.endswith(('acc', '_vs_gold', '_vs_speaker'))), k
    assert summary['bootstrap'] == dict(resamples=1000, fid_resamples=200, seed=0, confidence=0.95, unit='pairs')
    assert '## Intervals' in (out / 'report.md').read_text()


def compare(*args):
    return subprocess.run([sys.executable, 'eval_avamerg.py', *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True, timeout=300)


def test_compare_a_run_with_itself_gives_zero(expression_run, tmp_path):
    out, _, _ = expression_run
    result = compare(f'--compare={out},{out}', f'--output_path={tmp_path}')
    assert result.returncode == 0, result.stderr[-3000:]
    saved = json.loads((tmp_path / 'compare.json').read_text())
    assert saved['pairs'] == len(read_jsonl(out / 'pairs.jsonl')) and saved['metrics']
    for name, r in saved['metrics'].items():
        assert r['difference'] == 0 and r['interval'] == [0, 0], name
    assert '| BLEU-4 (sacreBLEU corpus) |' in (tmp_path / 'compare.md').read_text()
    # The model against the copy of the speaker, on the same pairs: the copy mirrors the speaker's expression.
    copy = evaluation.compare_runs(str(out), str(out / 'baselines' / 'copy_speaker'), str(tmp_path / 'b'))
    r = copy['expression_generated_vs_speaker']
    assert r['b'] == 1.0 and r['difference'] == pytest.approx(1.0 - r['a'])


def test_compare_refuses_runs_on_different_pairs(expression_run, tiny_models, data, tmp_path):
    out, _, _ = expression_run
    fewer = tmp_path / 'fewer'
    evaluation.evaluate(tiny_config(tiny_models, data), skip_fid=True, batch_size=BATCH, output_path=str(fewer),
                        limit=BATCH)
    result = compare(f'--compare={out},{fewer}', f'--output_path={tmp_path / "cmp"}')
    assert result.returncode == 2 and 'Traceback' not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and 'answered different pairs' in lines[0]
    with pytest.raises(UserError, match='not a finished evaluation'):
        evaluation.compare_runs(str(out), str(tmp_path / 'nothing'), str(tmp_path / 'cmp'))


def test_demo_report_shows_the_baselines_with_intervals(expression_run, tmp_path):
    """libs/demo/report.py's section from a real evaluation with baselines (the demo's 'baselines' stage output)."""
    from libs.demo.report import baselines_section
    out, summary, _ = expression_run
    shutil.copytree(out, tmp_path / 'baselines')
    markers = dict(baselines=dict(summary=dict(rows=summary['baselines'], bootstrap=summary['bootstrap'],
                                               pairs=summary['samples'],
                                               expression_classifier=summary['expression_classifier'])))
    section = baselines_section(markers, str(tmp_path))
    lo, hi = summary['intervals']['expression_generated_vs_gold']
    assert '<th>copy_speaker</th>' in section and 'stand-in-brightness' in section
    assert f'[{report.fmt(lo)}, {report.fmt(hi)}]' in section and 'reads the gold listener faces as' in section
