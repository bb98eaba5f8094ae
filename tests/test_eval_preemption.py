"""Evaluation under preemption and the guards that must act before anything loads: a real SIGTERM to a real tiny
evaluation stops it between batches with its finished pairs kept (exit 75), the resumed run removes the temp files a
killed write left and equals an uninterrupted run; val features given as the test split are refused before any
component loads; the FID network is asked for its pool features."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from libs import evaluation, hub, metrics, pipeline
from libs.errors import UserError
from libs.evaluation import generate
from libs.preemption import PREEMPTED_EXIT
from test_eval import (BATCH, CONFIG_FILE, ENV, ROOT, StandInInception, data, features, inception,  # noqa: F401
                       read_jsonl, results, tiny_config)

PAUSE = 1.0  # seconds each batch of the signalled process lingers after writing, so the signal lands mid-run


@pytest.fixture(scope='module')
def uninterrupted(tiny_models, data, tmp_path_factory):
    """One evaluation from the raw data, without FID: (output folder, records)."""
    out = tmp_path_factory.mktemp('eval') / 'whole'
    evaluation.evaluate(tiny_config(tiny_models, data), skip_fid=True, batch_size=BATCH, output_path=str(out))
    return out, read_jsonl(out / 'pairs.jsonl')


@pytest.mark.slow
def test_sigterm_stops_between_batches_and_the_resume_equals_an_uninterrupted_run(uninterrupted, tiny_models, data,
                                                                                   tmp_path):
    whole, records = uninterrupted
    out = tmp_path / 'out'
    script = tmp_path / 'slow_eval.py'
    script.write_text(f'import sys, time\nsys.path[:0] = [{ROOT!r}]\nfrom libs.evaluation import generate\n'
                      'write = generate.write_batch\n'
                      f'def slow(*args):\n    write(*args)\n    time.sleep({PAUSE})\n'
                      'generate.write_batch = slow\n'
                      'import eval_avamerg\nfrom libs import cli, logs\n'
                      'eval_avamerg.define_flags()\ncli.run(eval_avamerg.main, flags_parser=logs.parse_flags)\n')
    process = subprocess.Popen([sys.executable, str(script), f'--config={CONFIG_FILE}:{tiny_models}',
                                f'--config.data.root={data}', '--config.eval.expression_classifier=none', '--skip_fid',
                                f'--batch_size={BATCH}', f'--output_path={out}'],
                               cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    part = out / generate.PART.format(0)
    deadline = time.time() + 240
    while not (part.exists() and part.read_text().count('\n') >= BATCH) and process.poll() is None:
        assert time.time() < deadline, 'the evaluation wrote no batch in time'
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == PREEMPTED_EXIT, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith('stopped: SIGTERM after') and 'run the same command again' in last and \
        'Traceback' not in stderr
    kept = read_jsonl(part)
    assert BATCH <= len(kept) < len(records) and not (out / 'metrics.json').exists()
    # A write killed before its rename leaves a temp file beside the faces (and the reports).
    for stale in (out / 'faces' / '.tmp-test_x_0.png.0123456789ab', out / '.tmp-metrics.json.0123456789ab'):
        stale.write_bytes(b'half a file')

    summary = evaluation.evaluate(tiny_config(tiny_models, data), skip_fid=True, batch_size=BATCH,
                                  output_path=str(out))
    assert summary['run']['resumed'] == len(kept) and summary['run']['generated'] == len(records) - len(kept)
    assert results(read_jsonl(out / 'pairs.jsonl')) == results(records)
    assert summary['metrics'] == json.loads((whole / 'metrics.json').read_text())['metrics']
    assert sorted(os.listdir(out / 'faces')) == sorted(os.listdir(whole / 'faces'))
    assert not [p for p in out.rglob('.tmp-*')]
    for r in records:
        assert (out / r['face']).read_bytes() == (whole / r['face']).read_bytes()


def test_validation_features_as_the_test_split_are_refused_before_loading(tiny_models, data, features, tmp_path,
                                                                           monkeypatch):
    shutil.copytree(features, tmp_path / 'val')
    manifest = json.loads((tmp_path / 'val' / 'manifest.json').read_text())
    (tmp_path / 'val' / 'manifest.json').write_text(json.dumps(dict(manifest, split='val')))

    def must_not_load(*args, **kwargs):
        raise AssertionError('a component was loaded before the split was checked')

    monkeypatch.setattr(pipeline, 'load_components', must_not_load)
    monkeypatch.setattr(hub, 'preflight', must_not_load)
    with pytest.raises(UserError, match='features of the val split, not of --split=test'):
        evaluation.evaluate(tiny_config(tiny_models, data), features=str(tmp_path / 'val'), skip_fid=True,
                            output_path=str(tmp_path / 'out'))
    assert not (tmp_path / 'out').exists()


def test_the_fid_network_is_asked_for_pool_features(inception):
    images = torch.randint(0, 256, (3, 3, 8, 8), dtype=torch.uint8)
    assert StandInInception()(images).shape == (3, 1008)  # the stand-in answers logits unless asked for features
    net = metrics.load_inception(inception)
    feats = net(images)
    assert feats.shape == (3, metrics.INCEPTION_POOL_DIM)
    np.testing.assert_allclose(feats[:, :3], images.float().mean((2, 3)) / 255, rtol=1e-6)
