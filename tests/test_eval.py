"""eval_avamerg.py on tiny components and a synthetic AvaMERG test split: artefacts, metrics recomputed from the
written records, features vs raw data, resuming, sweeps vs single runs, gold-less pairs, two processes vs one, and the
FID / exit-code paths."""
import collections
import importlib.util
import json
import logging
import os
import shutil
import socket
import stat
import subprocess
import sys

import numpy as np
import pytest
import sacrebleu
import torch
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from PIL import Image

import eval_avamerg
from libs import evaluation, metrics, modes
from libs.evaluation import generate, report, run as run_module, score
from libs.autoencoder import center_crop_resize
from libs.avamerg import AvaMERG
from libs.errors import UserError
from libs.synthetic import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(ROOT, 'configs', 'extract_tiny.py')
ENV = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=ROOT)
BATCH = 2
K = 3  # informative dimensions of the stand-in Inception (mean R, G, B); the other 2045 are exactly zero
SWEEP_PAIRS = 4
LOGITS = 1008  # the NVlabs Inception's output without return_features
_frechet_distance = metrics.frechet_distance


class StandInInception(torch.nn.Module):
    """TorchScript stand-in with the NVlabs FID network's signature: per-image mean colour, zero-padded to 2048."""

    def __init__(self):
        super().__init__()
        self.dim, self.logits = metrics.INCEPTION_POOL_DIM, LOGITS

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        rgb = x.float().mean((2, 3)) / 255
        features = torch.cat([rgb, rgb.new_zeros(x.shape[0], self.dim - rgb.shape[1])], 1)
        # Like the NVlabs network: the 1008 class logits unless the pool features are asked for.
        return features if return_features else features[:, :self.logits]


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
    config.eval.expression_classifier = score.NO_CLASSIFIER  # tests/test_eval_expression.py injects a stand-in
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


def run(models, data, inception, out, sample=None, sweep=None, **kwargs):
    """evaluate() (or evaluate_sweep(config, *sweep)) in this process with the stand-in Inception (through
    config.eval) and the block FID; `sample` overrides config.sample."""
    config = tiny_config(models, data)
    config.eval.inception_path = inception
    config.sample.update(sample or {})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(metrics, 'frechet_distance', block_frechet_distance)
        if sweep is not None:
            return evaluation.evaluate_sweep(config, *sweep, output_path=str(out), batch_size=BATCH, **kwargs)
        return evaluation.evaluate(config, output_path=str(out), batch_size=BATCH, **kwargs)


def read_jsonl(path):
    with open(path, encoding='utf-8') as f:
        return [json.loads(line) for line in f]


def results(records):
    """The records without their timings (the only fields that differ between equal runs)."""
    return [{k: v for k, v in r.items() if k not in generate.TIMING} for r in records]


def current_umask():
    mask = os.umask(0)
    os.umask(mask)
    return mask


def strip_gold(dialogues, keep):
    """The dialogues without the gold response and chain_of_empathy in every turn for which keep(dialogue, turn) is
    False."""
    gold = ('response', 'chain_of_empathy')
    return [dict(d, turns=[t if keep(d, t) else {k: v for k, v in t.items() if k not in gold} for t in d['turns']])
            for d in dialogues]


def shard_metadata(folder):
    """{path: per-pair metadata list} of a feature cache's shards."""
    return {p: json.loads(p.read_text()) for p in sorted(folder.glob('shard-*.json'))}


@pytest.fixture(scope='module')
def baseline(tiny_models, data, inception, tmp_path_factory):
    """One full evaluation from the raw data: (output folder, metrics.json dict, records)."""
    out = tmp_path_factory.mktemp('eval') / 'baseline'
    summary = run(tiny_models, data, inception, out)
    return out, summary, read_jsonl(out / 'pairs.jsonl')


@pytest.fixture(scope='module')
def sweep(tiny_models, data, inception, tmp_path_factory):
    """A 2 scales x 2 step counts sweep on the first SWEEP_PAIRS pairs: (output folder, rows)."""
    out = tmp_path_factory.mktemp('eval') / 'sweep'
    return out, run(tiny_models, data, inception, out, sweep=([7, 2], [4, 2]), limit=SWEEP_PAIRS)


@pytest.fixture(scope='module')
def features(tiny_models, data, tmp_path_factory):
    """The test split's feature cache (extract_features.py)."""
    from extract_features import extract
    config = tiny_config(tiny_models, data)
    config.data.update(test=str(tmp_path_factory.mktemp('features') / 'test'), num_workers=0)
    extract(config, 'test')
    return config.data.test


def test_pair_noise_does_not_depend_on_the_batch():
    base = modes.Context(nnet=None, sampler=None, schedule=None, N=1000, steps=1, scale=1., z_shape=(1,),
                                      clip_img_dim=1, text_shape=(1, 1))
    gens = lambda seeds: tuple(torch.Generator().manual_seed(s) for s in seeds)  # noqa: E731
    pair = generate.PairContext(**vars(base), generators=gens([7, 8]))
    both = torch.cat([pair.randn(2, 3, 4), pair.randn(2, 5)[:, None].expand(2, 3, 5)], 2)
    for row, seed in enumerate([7, 8]):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(both[row], torch.cat([torch.randn(3, 4, generator=g),
                                                 torch.randn(5, generator=g)[None].expand(3, 5)], 1))
    with pytest.raises(ValueError):
        pair.randn(3, 4)


@pytest.mark.filterwarnings('ignore::UserWarning')
def test_score_against_independent_counts():
    records = [dict(generated='I am so sorry, what happened?', reference='I am sorry to hear that, what happened?',
                    gold_emotion='anxious', pred_label=4, gold_label=4),       # anxious -> anxious (sad -> sad)
               dict(generated='That is great news!', reference='That is wonderful news, congratulations!',
                    gold_emotion='disappointed', pred_label=27, gold_label=11),  # sad vs disappointed, both 'sad'
               dict(generated='Oh no, that is scary.', reference='That sounds scary, I am here for you.',
                    gold_emotion='tired', pred_label=0, gold_label=-1),        # a word outside the 32: ignored
               dict(generated='Tell me more about it.', reference=None,        # no gold at all: Dist-n only
                    gold_emotion=None, pred_label=3, gold_label=-1)]
    s = score.score(records)
    gold = records[:3]
    hyps, refs = [r['generated'] for r in gold], [r['reference'] for r in gold]
    assert s['bleu_pairs'] == 3 and s['bleu4'] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert {f'bleu{n}': s[f'bleu{n}'] for n in range(1, 5)} == metrics.corpus_bleu_n(hyps, refs)  # gold pairs only
    # Sentence BLEU: every text is one sentence, so str.split after spacing the punctuation gives nltk's tokens.
    def words(text):
        for mark in ',?!.':
            text = text.replace(mark, f' {mark}')
        return text.lower().split()

    for n in range(1, 5):
        expected = np.mean([sentence_bleu([words(r)], words(h), weights=(1 / n,) * n,
                                          smoothing_function=SmoothingFunction().method1) for h, r in zip(hyps, refs)])
        assert s['sentence_bleu'][f'bleu{n}'] == pytest.approx(100 * expected)
    tokens = [words(r['generated']) for r in records]
    grams = collections.Counter(g for h in tokens for g in zip(h, h[1:]))
    assert s['dist2'] == pytest.approx(100 * len(grams) / sum(grams.values()))
    e = s['emotion']
    assert e['n'] == 2 and e['fine_acc'] == 0.5 and e['coarse_acc'] == 1.0
    assert e['fine_macro_f1'] == pytest.approx((1 + 0 + 0) / 3)  # classes 4 (F1 1), 11 and 27 (F1 0)
    assert score.gold_counts(records) == dict(pairs=4, response=3, emotion_word=3, label=2)

    none = score.score([dict(r, reference=None, gold_emotion=None, gold_label=-1) for r in records])
    assert none['bleu_pairs'] == 0 and none['sacrebleu'] is None and none['sentence_bleu'] is None
    assert all(none[f'bleu{n}'] is None for n in range(1, 5)) and none['dist2'] == s['dist2']
    assert none['emotion'] == dict(n=0, fine_acc=None, fine_macro_f1=None, coarse_acc=None, coarse_macro_f1=None)
    reasons = score.not_computed(score.gold_counts(records[2:3]), 'no weights', None)
    assert reasons == dict(fid='no weights', emotion='no pair has a gold emotion label among the 32 (1 have emotion '
                                                      'words outside them)')


def test_raw_eval_writes_every_artefact_and_scores_it(baseline, data, inception):
    out, summary, records = baseline
    reader = AvaMERG(data, 'test')
    n = len(reader)
    assert [r['index'] for r in records] == list(range(n))
    for r, pair in zip(records, reader.pairs):
        assert (r['pair_id'], r['split'], r['conversation_id'], r['turn_id'], r['speaker_text'], r['reference'],
                r['gold_label']) == (pair.pair_id, 'test', pair.conversation_id, pair.turn_id, pair.speaker_text,
                                     pair.response_text, pair.label)
        assert r['pred_emotion'] == r['top3'][0][0] and r['top3'][0][1] >= r['top3'][1][1] >= r['top3'][2][1]
        # The split is part of the name: test and train conversation ids may be equal.
        assert r['face'] == f'faces/test_{pair.conversation_id}_{pair.turn_id}.png'
        assert r['nfe'] == 4 and r['branches'] == 2 and r['seconds'] > 0  # 4 steps, cond + no-speaker in one forward
    assert sorted(os.listdir(out / 'faces')) == sorted(os.path.basename(r['face']) for r in records)
    assert not list(out.glob('pairs.rank*.jsonl'))
    saved = json.loads((out / 'metrics.json').read_text())
    assert saved == json.loads(json.dumps(summary))
    models = os.path.dirname(saved['checkpoint'])
    for key, value in dict(split='test', samples=n, sample_steps=4, speaker_guidance='no_speaker', guidance_scale=7.0,
                           scale_text=None, scale_face=None, sampler='dpm_solver_fast', seed=1234, precision='fp32',
                           autocast='fp32', caption_decoder=os.path.join(models, 'caption_decoder.pth'), nfe=4,
                           guidance_branches=2,
                           fid_computed=True, gold=dict(pairs=n, response=n, emotion_word=n, label=n),
                           not_computed=dict(expression='config.eval.expression_classifier=none')).items():
        assert saved[key] == value, key
    settings = json.loads((out / 'settings.json').read_text())
    assert settings == {k: saved[k] for k in settings} and {'autocast', 'caption_decoder', 'seed'} <= set(settings)
    assert saved['checkpoint'].endswith('uvit_empath.pth') and saved['run']['generated'] == n
    assert saved['seconds_per_pair'] == pytest.approx(np.mean([r['seconds'] for r in records]), abs=1e-4)
    report = (out / 'report.md').read_text()
    for text in (saved['checkpoint'], f'- samples: {n} pairs', 'no_speaker, scale 7', '4 steps, NFE 4',
                 'autocast: fp32', saved['caption_decoder'], 'sacreBLEU corpus BLEU', 'sentence-averaged',
                 saved['metrics']['sacrebleu']['signature']):
        assert text in report, text
    for name in ('confusion_32.png', 'confusion_7.png'):
        assert Image.open(out / name).format == 'PNG'
    size = 32  # the tiny config's resolution
    assert Image.open(out / 'grid.png').size == (3 * size, n * size)
    # Readable by others as any file this process creates (atomic writes used to be 0600).
    mode = 0o666 & ~current_umask()
    for path in ('report.md', 'metrics.json', 'settings.json', 'pairs.jsonl', 'grid.png', records[0]['face']):
        assert stat.S_IMODE((out / path).stat().st_mode) == mode, path

    # Metrics recomputed from the written records and images.
    m = saved['metrics']
    hyps, refs = [r['generated'] for r in records], [r['reference'] for r in records]
    assert m['bleu4'] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score) and m['bleu_pairs'] == n
    unigrams = collections.Counter(t for r in records for t in metrics.tokenize(r['generated']))
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

    write_batch = generate.write_batch

    def write_then_die(*args):
        write_batch(*args)
        raise Interrupted

    with pytest.MonkeyPatch.context() as mp, pytest.raises(Interrupted):
        mp.setattr(generate, 'write_batch', write_then_die)
        run(tiny_models, data, inception, tmp_path)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / 'faces').iterdir()}
    assert len(stamps) == 2 * BATCH
    with open(tmp_path / 'pairs.rank0.jsonl', 'a') as f:
        f.write('{"index": %d, "pair_id": "test/0' % (2 * BATCH))  # a line torn by the kill
    resumed = run(tiny_models, data, inception, tmp_path)
    assert resumed['run']['generated'] == n - 2 * BATCH and resumed['run']['resumed'] == 2 * BATCH
    assert all((tmp_path / 'faces' / name).stat().st_mtime_ns == t for name, t in stamps.items())
    assert results(read_jsonl(tmp_path / 'pairs.jsonl')) == results(records)
    assert resumed['metrics'] == summary['metrics']
    for r in records:
        assert (tmp_path / r['face']).read_bytes() == (out / r['face']).read_bytes()


def test_refuses_a_folder_with_other_settings(baseline, tiny_models, data, inception, tmp_path):
    shutil.copytree(baseline[0], tmp_path / 'copy')
    config = tiny_config(tiny_models, data)
    config.seed = 99
    with pytest.raises(UserError, match='seed: 1234 there, 99 now'):
        evaluation.evaluate(config, output_path=str(tmp_path / 'copy'), skip_fid=True)
    config = tiny_config(tiny_models, data)
    config.sample.sample_steps = 3
    with pytest.raises(UserError, match='sample_steps: 4 there, 3 now'):
        evaluation.evaluate(config, output_path=str(tmp_path / 'copy'), skip_fid=True)
    config = tiny_config(tiny_models, data)
    decoder = tmp_path / 'caption_decoder.pth'
    shutil.copy(config.caption_decoder.pretrained_path, decoder)
    config.caption_decoder.pretrained_path = str(decoder)
    with pytest.raises(UserError, match='caption_decoder: .* there, .*caption_decoder.pth. now'):
        evaluation.evaluate(config, output_path=str(tmp_path / 'copy'), skip_fid=True)
    settings = json.loads((tmp_path / 'copy' / 'settings.json').read_text())
    pairs = [{'pair_id': r['pair_id']} for r in baseline[2]]
    generate.check_resumable(str(tmp_path / 'copy'), settings, {}, pairs)  # the same settings resume
    with pytest.raises(UserError, match="autocast: 'fp32' there, 'bf16' now"):  # e.g. the same folder on a GPU
        generate.check_resumable(str(tmp_path / 'copy'), dict(settings, autocast='bf16'), {}, pairs)
    with pytest.raises(UserError, match='pair 0 is test/.* there, train/x/0 now'):
        generate.check_resumable(str(tmp_path / 'copy'), settings, {0: baseline[2][0]}, [{'pair_id': 'train/x/0'}])


def test_features_give_the_same_speaker_turns(baseline, tiny_models, data, inception, features, tmp_path, caplog):
    config = tiny_config(tiny_models, data)
    config.data.root = ''  # no frames: FID has no reference, the grid shows VAE reconstructions
    config.eval.inception_path = inception
    with pytest.raises(UserError, match='reference frames.*config.data.root is not set'):
        evaluation.evaluate(config, features=features, output_path=str(tmp_path / 'x'), batch_size=BATCH)
    config.data.root = str(tmp_path / 'nowhere')
    with pytest.raises(UserError, match='nowhere does not exist'):
        evaluation.evaluate(config, features=features, output_path=str(tmp_path / 'x'), batch_size=BATCH)
    with caplog.at_level(logging.INFO):
        summary = evaluation.evaluate(config, features=features, skip_fid=True, output_path=str(tmp_path / 'out'),
                                        batch_size=BATCH)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING and 'FID' in r.getMessage()]
    assert summary['fid_computed'] is False and summary['metrics']['fid'] is None
    assert '--skip_fid' in summary['fid_note'] and '--skip_fid' in (tmp_path / 'out' / 'report.md').read_text()
    records, raw = read_jsonl(tmp_path / 'out' / 'pairs.jsonl'), baseline[2]
    assert len(records) == len(raw) and summary['source'] == os.path.abspath(features)
    keys = ('pair_id', 'split', 'conversation_id', 'turn_id', 'speaker_text', 'reference', 'gold_label', 'face')
    for r, b in zip(records, raw):
        assert {k: r[k] for k in keys} == {k: b[k] for k in keys}
        # Same speaker latent noise and moments; only the fp16-stored text differs, so the emotions nearly agree.
        assert [name for name, _ in r['top3']] == [name for name, _ in b['top3']]
        np.testing.assert_allclose([p for _, p in r['top3']], [p for _, p in b['top3']], atol=2e-3)
    assert Image.open(tmp_path / 'out' / 'grid.png').size == (3 * 32, len(records) * 32)


def test_sweep_rows_equal_single_runs(sweep, baseline, tiny_models, data, inception, tmp_path):
    out, rows = sweep
    assert [(r['setting'], r['scale'], r['steps'], r['nfe']) for r in rows] == [
        ('scale7_steps4', 7.0, 4, 4), ('scale7_steps2', 7.0, 2, 2), ('scale2_steps4', 2.0, 4, 4),
        ('scale2_steps2', 2.0, 2, 2)]
    for r in rows:
        m = json.loads((out / r['setting'] / 'metrics.json').read_text())
        assert (m['guidance_scale'], m['sample_steps'], m['samples']) == (r['scale'], r['steps'], SWEEP_PAIRS)
        assert r == report.sweep_row(r['setting'], m) and r['seconds_per_pair'] > 0
    # The default setting is the baseline's: a pair's noise depends on its pair_id only, not on --limit or the sweep.
    assert results(read_jsonl(out / 'scale7_steps4' / 'pairs.jsonl')) == results(baseline[2][:SWEEP_PAIRS])
    for r in baseline[2][:SWEEP_PAIRS]:
        assert (out / 'scale7_steps4' / r['face']).read_bytes() == (baseline[0] / r['face']).read_bytes()
    # The last setting of the sweep, run alone, gives the same records and numbers.
    alone = run(tiny_models, data, inception, tmp_path / 'alone', sample=dict(scale=2.0, sample_steps=2),
                limit=SWEEP_PAIRS)
    assert results(read_jsonl(tmp_path / 'alone' / 'pairs.jsonl')) == results(
        read_jsonl(out / 'scale2_steps2' / 'pairs.jsonl'))
    assert alone['metrics'] == json.loads((out / 'scale2_steps2' / 'metrics.json').read_text())['metrics']
    assert alone['metrics'] != json.loads((out / 'scale2_steps4' / 'metrics.json').read_text())['metrics']
    # The table, its JSON and the figure.
    table = (out / 'sweep.md').read_text()
    assert sum(line.startswith('| scale') for line in table.splitlines()) == 4 and 'NFE' in table
    assert '| scale2_steps2 | 2 | 2 | 2 |' in table
    assert json.loads((out / 'sweep.json').read_text())['rows'] == json.loads(json.dumps(rows))
    assert Image.open(out / 'sweep.png').format == Image.open(out / 'sweep_nfe.png').format == 'PNG'
    # A setting's folder resumes as a single run with that setting: nothing is generated again.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(generate, 'generate_batch', None)
        again = run(tiny_models, data, inception, out / 'scale2_steps2', sample=dict(scale=2.0, sample_steps=2),
                    limit=SWEEP_PAIRS)
    assert again['metrics'] == alone['metrics'] and again['run']['resumed'] == SWEEP_PAIRS


def test_sweep_settings_and_two_scale(tiny_models, data, tmp_path):
    config = tiny_config(tiny_models, data)
    names = [name for name, _ in run_module.sweep_configs(config, [1, 0.5], [10])]
    assert names == ['scale1_steps10', 'scale0.5_steps10']
    for scales, steps, match in (([1, 1], None, 'repeat'), ([-1], None, 'at least 0'), (None, [0], 'at least 1')):
        with pytest.raises(UserError, match=match):
            run_module.sweep_configs(config, scales, steps)
    with pytest.raises(UserError, match='expected int'):
        eval_avamerg.parse_list(['10', 'x'], int, 'steps')
    config.sample.speaker_guidance = 'two_scale'
    config.sample.update(scale_text=3.0, scale_face=1.5)
    with pytest.raises(UserError, match='--scales sweeps config.sample.scale'):
        run_module.sweep_configs(config, [1, 3], None)
    rows = evaluation.evaluate_sweep(config, steps=[2], skip_fid=True, limit=BATCH, batch_size=BATCH,
                                       output_path=str(tmp_path))
    assert [(r['setting'], r['scale'], r['nfe']) for r in rows] == [('steps2', '3/1.5', 2)]
    m = json.loads((tmp_path / 'steps2' / 'metrics.json').read_text())
    assert (m['speaker_guidance'], m['guidance_scale'], m['scale_text'], m['scale_face']) == ('two_scale', None, 3, 1.5)
    assert m['guidance_branches'] == 3  # speaker, utterance only, no speaker: one forward
    assert 'two_scale, scale_text 3, scale_face 1.5' in (tmp_path / 'steps2' / 'report.md').read_text()


def test_features_without_gold(tiny_models, data, features, tmp_path):
    shutil.copytree(features, tmp_path / 'features')
    shards = shard_metadata(tmp_path / 'features')
    for i, (path, meta) in enumerate(shards.items()):  # the first shard keeps its gold, the others lose it
        if i:
            path.write_text(json.dumps([dict(m, response_text_raw=None, emotion=None) for m in meta]))
    config = tiny_config(tiny_models, data)
    config.data.root = ''
    summary = evaluation.evaluate(config, features=str(tmp_path / 'features'), skip_fid=True, batch_size=BATCH,
                                    output_path=str(tmp_path / 'partial'))
    records = read_jsonl(tmp_path / 'partial' / 'pairs.jsonl')
    gold = [r for r in records if r['reference'] is not None]
    first = next(iter(shards.values()))
    assert len(gold) == len(first) < len(records) and summary['metrics']['bleu_pairs'] == len(gold)
    assert all(r['gold_emotion'] is None and r['gold_label'] == -1 for r in records if r['reference'] is None)
    assert summary['metrics']['bleu4'] == pytest.approx(
        sacrebleu.corpus_bleu([r['generated'] for r in gold], [[r['reference'] for r in gold]]).score)
    assert summary['metrics']['emotion']['n'] == sum(r['gold_label'] >= 0 for r in gold)
    report = (tmp_path / 'partial' / 'report.md').read_text()
    assert f'{len(gold)} with a gold response' in report and f'{len(gold)} pairs:' in report

    for path, meta in shards.items():  # no gold anywhere: generated, but nothing that needs gold is scored
        path.write_text(json.dumps([dict(m, response_text_raw=None, emotion=None) for m in meta]))
    summary = evaluation.evaluate(config, features=str(tmp_path / 'features'), skip_fid=True, batch_size=BATCH,
                                    output_path=str(tmp_path / 'none'))
    m = summary['metrics']
    assert summary['samples'] == len(records) and m['bleu4'] is None and m['sentence_bleu'] is None
    assert m['emotion']['fine_acc'] is None and m['dist1'] is not None
    assert set(summary['not_computed']) == {'fid', 'bleu', 'emotion', 'expression'}
    report = (tmp_path / 'none' / 'report.md').read_text()
    assert 'not computed: bleu: no pair has a gold response' in report and 'BLEU-1 / 2 / 3 / 4' in report
    assert not (tmp_path / 'none' / 'confusion_32.png').exists()


def test_raw_test_split_without_gold(tiny_models, tmp_path):
    root = tmp_path / 'avamerg'
    # Test conversations reuse the train ids: the pair identity (and so the noise and the face files) has the split.
    make_dataset(str(root), seed=11, dialogues=2, test_dialogues=2, size=64, test_ids='train')
    test_json = root / 'test' / 'test.json'
    dialogues = json.loads(test_json.read_text())
    first = dialogues[0]['conversation_id']
    test_json.write_text(json.dumps(strip_gold(dialogues, lambda d, t: d['conversation_id'] == first)))
    summary = evaluation.evaluate(tiny_config(tiny_models, str(root)), skip_fid=True, batch_size=BATCH,
                                    output_path=str(tmp_path / 'out'))
    records = read_jsonl(tmp_path / 'out' / 'pairs.jsonl')
    train_ids = {d['conversation_id'] for d in json.loads((root / 'train.json').read_text())}
    assert {r['conversation_id'] for r in records} <= train_ids
    assert all(r['pair_id'].startswith('test/') and r['face'].startswith('faces/test_') for r in records)
    with_gold = [r for r in records if r['conversation_id'] == first]
    assert 0 < len(with_gold) < len(records) == summary['samples']
    assert all(r['reference'] is None and r['gold_label'] == -1 for r in records if r['conversation_id'] != first)
    assert summary['gold']['response'] == summary['metrics']['bleu_pairs'] == len(with_gold)
    assert summary['metrics']['emotion']['n'] == sum(r['gold_label'] >= 0 for r in with_gold)


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
    # Through the sweep flags: the one setting's folder must equal the single-process, single-setting baseline.
    result = subprocess.run([accelerate, 'launch', '--multi_gpu', '--num_processes', '2', '--num_machines', '1',
                             '--mixed_precision', 'no', '--dynamo_backend', 'no', '--main_process_port', str(port),
                             str(script), f'--config={CONFIG_FILE}:{tiny_models}', f'--config.data.root={data}',
                             '--config.eval.expression_classifier=none',
                             f'--batch_size={BATCH}', f'--output_path={tmp_path / "out"}', '--scales=7', '--steps=4'],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    folder = tmp_path / 'out' / 'scale7_steps4'
    two = json.loads((folder / 'metrics.json').read_text())
    assert two['run']['processes'] == 2 and two['run']['generated'] == len(records)
    assert results(read_jsonl(folder / 'pairs.jsonl')) == results(records)
    for r in records:
        assert (folder / r['face']).read_bytes() == (out / r['face']).read_bytes()
    # Gathered float64 sums in another order: FID agrees to rounding, everything else exactly.
    assert two['metrics'].pop('fid') == pytest.approx(summary['metrics']['fid'], rel=1e-9)
    assert two['metrics'] == {k: v for k, v in summary['metrics'].items() if k != 'fid'}
    # The printed table has rounded numbers.
    row = next(line for line in result.stdout.splitlines() if line.startswith('| scale7_steps4 |'))
    assert f'| {report.fmt(two["metrics"]["dist1"])} |' in row and len(row) < 300


def test_cli_without_inception_exits_2(tiny_models, data, tmp_path):
    env = dict(ENV, TORCH_HOME=str(tmp_path / 'empty_torch_home'))
    result = subprocess.run([sys.executable, 'eval_avamerg.py', f'--config={CONFIG_FILE}:{tiny_models}',
                             f'--config.data.root={data}', f'--output_path={tmp_path / "out"}'],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert metrics.INCEPTION_TORCHSCRIPT in result.stderr and '--skip_fid' in result.stderr
    assert 'Traceback' not in result.stderr and not (tmp_path / 'out').exists()
