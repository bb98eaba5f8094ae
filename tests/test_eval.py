"""eval_avamerg.py on tiny components and a synthetic AvaMERG test split: artefacts, metrics recomputed from the
written records, features vs raw data, resuming, two processes vs one, and the FID / exit-code paths."""
import collections
import importlib.util
import json
import os
import shutil
import socket
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
import torch
from nltk.tokenize import wordpunct_tokenize
from nltk.translate.bleu_score import corpus_bleu
from PIL import Image

import eval_avamerg
from libs import metrics
from libs.autoencoder import center_crop_resize
from libs.avamerg import AvaMERG
from libs.errors import UserError
from libs.synthetic import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(ROOT, 'configs', 'extract_tiny.py')
ENV = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=ROOT)
BATCH = 2
K = 3  # informative dimensions of the stand-in Inception (mean R, G, B); the other 2045 are exactly zero
_frechet_distance = metrics.frechet_distance


class StandInInception(torch.nn.Module):
    """TorchScript stand-in with the NVlabs FID network's signature: per-image mean colour, zero-padded to 2048."""

    def __init__(self):
        super().__init__()
        self.dim = metrics.INCEPTION_POOL_DIM

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        rgb = x.float().mean((2, 3)) / 255
        return torch.cat([rgb, rgb.new_zeros(x.shape[0], self.dim - rgb.shape[1])], 1)


def block_frechet_distance(mu1, sigma1, mu2, sigma2):
    """metrics.frechet_distance on the K informative dimensions (a 2048-d sqrtm takes minutes on this CPU)."""
    for x in (mu1[K:], mu2[K:], sigma1[K:], sigma1[:, K:], sigma2[K:], sigma2[:, K:]):
        assert not np.any(x), 'the zero features of the stand-in must have exactly zero statistics'
    return _frechet_distance(mu1[:K], sigma1[:K, :K], mu2[:K], sigma2[:K, :K])


def tiny_config(models, data):
    """configs/extract_tiny.py (the tiny EmpathDiffuser config plus config.data.root) for `models` and `data`."""
    spec = importlib.util.spec_from_file_location('extract_tiny', CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(models)
    config.data.root = data
    return config


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """A synthetic AvaMERG whose test split has a handful of pairs."""
    root = str(tmp_path_factory.mktemp('avamerg'))
    make_dataset(root, seed=11, dialogues=1, test_dialogues=2, size=64)
    assert 4 <= len(AvaMERG(root, 'test')) <= 6
    return root


@pytest.fixture(scope='module')
def inception(tmp_path_factory):
    """Path of the TorchScript stand-in, saved under the file name load_inception looks for in the torch.hub cache."""
    folder = tmp_path_factory.mktemp('torch_home') / 'hub' / 'checkpoints'
    folder.mkdir(parents=True)
    path = folder / metrics.INCEPTION_TORCHSCRIPT
    torch.jit.script(StandInInception()).save(str(path))
    return str(path)


def run(models, data, inception, out, **kwargs):
    """evaluate() in this process with the stand-in Inception (through config.eval) and the block FID."""
    config = tiny_config(models, data)
    config.eval = ml_collections.ConfigDict(dict(inception_path=inception))
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, 'frechet_distance', block_frechet_distance)
        return eval_avamerg.evaluate(config, output_path=str(out), batch_size=BATCH, **kwargs)


def read_jsonl(path):
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope='module')
def baseline(tiny_models, data, inception, tmp_path_factory):
    """One full evaluation from the raw data: (output folder, metrics.json dict, records)."""
    out = tmp_path_factory.mktemp('eval') / 'baseline'
    summary = run(tiny_models, data, inception, out)
    return out, summary, read_jsonl(out / 'pairs.jsonl')


def test_pair_noise_does_not_depend_on_the_batch():
    base = eval_avamerg.modes.Context(nnet=None, sampler=None, schedule=None, N=1000, steps=1, scale=1., z_shape=(1,),
                                      clip_img_dim=1, text_shape=(1, 1))
    gens = lambda seeds: tuple(torch.Generator().manual_seed(s) for s in seeds)  # noqa: E731
    pair = eval_avamerg.PairContext(**vars(base), generators=gens([7, 8]))
    both = torch.cat([pair.randn(2, 3, 4), pair.randn(2, 5)[:, None].expand(2, 3, 5)], 2)
    for row, seed in enumerate([7, 8]):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(both[row], torch.cat([torch.randn(3, 4, generator=g),
                                                 torch.randn(5, generator=g)[None].expand(3, 5)], 1))
    with pytest.raises(ValueError):
        pair.randn(3, 4)


@pytest.mark.filterwarnings('ignore::UserWarning')
def test_score_against_independent_counts():
    records = [dict(generated='I am so sorry, what happened?', reference='I am sorry to hear that. What happened?',
                    pred_label=4, gold_label=4),       # anxious -> anxious (sad -> sad)
               dict(generated='That is great news!', reference='That is wonderful news, congratulations!',
                    pred_label=27, gold_label=11),     # sad vs disappointed: wrong, but both coarse 'sad'
               dict(generated='Oh no, that is scary.', reference='That sounds scary, I am here for you.',
                    pred_label=0, gold_label=-1)]      # unknown gold: ignored
    s = eval_avamerg.score(records)
    hyps = [wordpunct_tokenize(r['generated'].lower()) for r in records]
    refs = [[wordpunct_tokenize(r['reference'].lower())] for r in records]
    for n in range(1, 5):
        assert s[f'bleu{n}'] == pytest.approx(100 * corpus_bleu(refs, hyps, weights=(1 / n,) * n), abs=1e-9)
    grams = collections.Counter(g for h in hyps for g in zip(h, h[1:]))
    assert s['dist2'] == pytest.approx(100 * len(grams) / sum(grams.values()))
    e = s['emotion']
    assert e['n'] == 2 and e['fine_acc'] == 0.5 and e['coarse_acc'] == 1.0
    assert e['fine_macro_f1'] == pytest.approx((1 + 0 + 0) / 3)  # classes 4 (F1 1), 11 and 27 (F1 0)


def test_raw_eval_writes_every_artefact_and_scores_it(baseline, data, inception):
    out, summary, records = baseline
    reader = AvaMERG(data, 'test')
    n = len(reader)
    assert [r['index'] for r in records] == list(range(n))
    for r, pair in zip(records, reader.pairs):
        assert (r['conversation_id'], r['turn_id'], r['speaker_text'], r['reference'], r['gold_label']) == \
               (pair.conversation_id, pair.turn_id, pair.speaker_text, pair.response_text, pair.label)
        assert r['pred_emotion'] == r['top3'][0][0] and r['top3'][0][1] >= r['top3'][1][1] >= r['top3'][2][1]
        assert r['face'] == f'faces/{pair.conversation_id}_{pair.turn_id}.png'
    assert sorted(os.listdir(out / 'faces')) == sorted(os.path.basename(r['face']) for r in records)
    assert not list(out.glob('pairs.rank*.jsonl'))
    saved = json.loads((out / 'metrics.json').read_text())
    assert saved == json.loads(json.dumps(summary))
    for key, value in dict(split='test', samples=n, sample_steps=4, guidance_scale=7.0, seed=1234, precision='fp32',
                           fid_computed=True).items():
        assert saved[key] == value
    assert saved['checkpoint'].endswith('uvit_empath.pth') and saved['run']['generated'] == n
    report = (out / 'report.md').read_text()
    assert saved['checkpoint'] in report and f'- samples: {n}' in report and '- guidance_scale: 7.0' in report
    assert '- precision: fp32' in report and json.loads((out / 'settings.json').read_text())['precision'] == 'fp32'
    for name in ('confusion_32.png', 'confusion_7.png'):
        assert Image.open(out / name).format == 'PNG'
    size = 32  # the tiny config's resolution
    assert Image.open(out / 'grid.png').size == (3 * size, n * size)

    # Metrics recomputed from the written records and images.
    m = saved['metrics']
    # nltk keeps runs of control characters (which a random tiny decoder emits) as tokens; Python's \s skips them.
    tokens = [[t for t in wordpunct_tokenize(r['generated'].lower()) if t.isprintable()] for r in records]
    unigrams = collections.Counter(t for ts in tokens for t in ts)
    assert m['dist1'] == pytest.approx(100 * len(unigrams) / sum(unigrams.values()))
    labelled = [r for r in records if r['gold_label'] >= 0]
    assert m['emotion']['n'] == len(labelled)
    assert m['emotion']['fine_acc'] == pytest.approx(np.mean([r['pred_label'] == r['gold_label'] for r in labelled]))
    mean_rgb = lambda im: np.asarray(im.convert('RGB'), dtype=np.float64).mean((0, 1)) / 255  # noqa: E731
    gen = np.stack([mean_rgb(Image.open(out / r['face'])) for r in records])
    ref = np.stack([mean_rgb(center_crop_resize(reader.load_face(p.response_stem), size)) for p in reader.pairs])
    s1, s2 = np.cov(gen, rowvar=False), np.cov(ref, rowvar=False)
    root_trace = np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)).sum()
    fid = ((gen.mean(0) - ref.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * root_trace
    assert m['fid'] == pytest.approx(fid, rel=1e-6) and m['fid'] > 0


def test_resume_after_limit_and_interruption(baseline, tiny_models, data, inception, tmp_path):
    out, summary, records = baseline
    n = len(records)
    first = run(tiny_models, data, inception, tmp_path, limit=BATCH)
    assert first['samples'] == BATCH and first['run']['generated'] == BATCH

    class Interrupted(Exception):
        pass

    write_batch = eval_avamerg.write_batch

    def write_then_die(*args):
        write_batch(*args)
        raise Interrupted

    with pytest.MonkeyPatch.context() as mp, pytest.raises(Interrupted):
        mp.setattr(eval_avamerg, 'write_batch', write_then_die)
        run(tiny_models, data, inception, tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'faces').iterdir()}
    assert len(stamps) == 2 * BATCH
    with open(tmp_path / 'pairs.rank0.jsonl', 'a') as f:
        f.write('{"index": %d, "conversation_id": "0' % (2 * BATCH))  # a line torn by the kill
    resumed = run(tiny_models, data, inception, tmp_path)
    assert resumed['run']['generated'] == n - 2 * BATCH and resumed['run']['resumed'] == 2 * BATCH
    assert all((tmp_path / 'faces' / name).stat().st_mtime_ns == t for name, t in stamps.items())
    assert read_jsonl(tmp_path / 'pairs.jsonl') == records
    assert resumed['metrics'] == summary['metrics']
    for r in records:
        assert (tmp_path / r['face']).read_bytes() == (out / r['face']).read_bytes()


def test_refuses_a_folder_with_other_settings(baseline, tiny_models, data, inception, tmp_path):
    shutil.copytree(baseline[0], tmp_path / 'copy')
    config = tiny_config(tiny_models, data)
    config.seed = 99
    with pytest.raises(UserError, match='seed: 1234 there, 99 now'):
        eval_avamerg.evaluate(config, output_path=str(tmp_path / 'copy'), skip_fid=True)


def test_features_give_the_same_speaker_turns(baseline, tiny_models, data, inception, tmp_path):
    from extract_features import extract
    config = tiny_config(tiny_models, data)
    config.data.update(test=str(tmp_path / 'features'), num_workers=0)
    extract(config, 'test')
    config.data.root = ''  # no frames: FID has no reference, the grid shows VAE reconstructions
    config.eval = ml_collections.ConfigDict(dict(inception_path=inception))
    with pytest.raises(UserError, match='reference frames'):
        eval_avamerg.evaluate(config, features=config.data.test, output_path=str(tmp_path / 'x'), batch_size=BATCH)
    summary = eval_avamerg.evaluate(config, features=config.data.test, skip_fid=True, output_path=str(tmp_path / 'out'),
                                    batch_size=BATCH)
    assert summary['fid_computed'] is False and summary['metrics']['fid'] is None
    assert '--skip_fid' in summary['fid_note'] and '--skip_fid' in (tmp_path / 'out' / 'report.md').read_text()
    records, raw = read_jsonl(tmp_path / 'out' / 'pairs.jsonl'), baseline[2]
    assert len(records) == len(raw) and summary['source'] == os.path.abspath(config.data.test)
    for r, b in zip(records, raw):
        assert {k: r[k] for k in ('conversation_id', 'turn_id', 'speaker_text', 'reference', 'gold_label')} == \
               {k: b[k] for k in ('conversation_id', 'turn_id', 'speaker_text', 'reference', 'gold_label')}
        # Same speaker latent noise and moments; only the fp16-stored text differs, so the emotions nearly agree.
        assert [name for name, _ in r['top3']] == [name for name, _ in b['top3']]
        np.testing.assert_allclose([p for _, p in r['top3']], [p for _, p in b['top3']], atol=2e-3)
    assert Image.open(tmp_path / 'out' / 'grid.png').size == (3 * 32, len(records) * 32)


def test_two_processes_equal_one(baseline, tiny_models, data, inception, tmp_path):
    out, summary, records = baseline
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    # The stand-in block FID must replace the 2048-d one in the launched processes too.
    script = tmp_path / 'run_eval.py'
    script.write_text(f'import sys\nsys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, "tests")!r}]\n'
                      'import test_eval, eval_avamerg\nfrom absl import app\nfrom libs import metrics\n'
                      'metrics.frechet_distance = test_eval.block_frechet_distance\n'
                      'eval_avamerg.define_flags()\napp.run(eval_avamerg.main)\n')
    accelerate = os.path.join(os.path.dirname(sys.executable), 'accelerate')
    # CPU float sums depend on the thread count, which accelerate would otherwise set to cores / processes.
    env = dict(ENV, ACCELERATE_USE_CPU='true', OMP_NUM_THREADS=str(torch.get_num_threads()),
               TORCH_HOME=os.path.dirname(os.path.dirname(os.path.dirname(inception))))
    result = subprocess.run([accelerate, 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
                             '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(port),
                             str(script), f'--config={CONFIG_FILE}:{tiny_models}', f'--config.data.root={data}',
                             f'--batch_size={BATCH}', f'--output_path={tmp_path / "out"}'],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    two = json.loads((tmp_path / 'out' / 'metrics.json').read_text())
    assert two['run']['processes'] == 2 and two['run']['generated'] == len(records)
    assert read_jsonl(tmp_path / 'out' / 'pairs.jsonl') == records
    for r in records:
        assert (tmp_path / 'out' / r['face']).read_bytes() == (out / r['face']).read_bytes()
    # Gathered float64 sums in another order: FID agrees to rounding, everything else exactly.
    assert two['metrics'].pop('fid') == pytest.approx(summary['metrics']['fid'], rel=1e-9)
    assert two['metrics'] == {k: v for k, v in summary['metrics'].items() if k != 'fid'}


def test_cli_without_inception_exits_2(tiny_models, data, tmp_path):
    env = dict(ENV, TORCH_HOME=str(tmp_path / 'empty_torch_home'))
    result = subprocess.run([sys.executable, 'eval_avamerg.py', f'--config={CONFIG_FILE}:{tiny_models}',
                             f'--config.data.root={data}', f'--output_path={tmp_path / "out"}'],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert metrics.INCEPTION_TORCHSCRIPT in result.stderr and '--skip_fid' in result.stderr
    assert 'Traceback' not in result.stderr and not (tmp_path / 'out').exists()
