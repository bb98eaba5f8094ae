"""Metrics against independent computations: sacrebleu / nltk BLEU, hand counts, numpy FID, hand-counted F1."""
import logging
import math
import sys
import warnings

import numpy as np
import pytest
import torch
from nltk.tokenize import wordpunct_tokenize
from nltk.translate.bleu_score import corpus_bleu
from sacrebleu.metrics import BLEU
from scipy import linalg

from libs import metrics
from libs.errors import UserError

HYPS = ['I am so sorry to hear that, what happened?', 'That sounds wonderful! Did you enjoy it?',
        "Oh no, I'd be scared too.", 'Congratulations, you must be proud of your son.']
REFS = ['I am sorry to hear that. What happened to you?', 'Wow that sounds great! Did you have fun?',
        'That is scary. I would be afraid too.', 'That is great news, you must be so proud of him.']


def test_tokenize_is_lowercased_wordpunct():
    for text in HYPS + REFS:
        assert metrics.tokenize(text) == wordpunct_tokenize(text.lower())


@pytest.mark.parametrize('max_n', [1, 2, 3, 4])
def test_bleu_matches_sacrebleu_and_nltk_on_same_tokens(max_n):
    ours = metrics.corpus_bleu_n(HYPS, REFS, max_n=max_n)
    hyp_tok, ref_tok = [metrics.tokenize(h) for h in HYPS], [metrics.tokenize(r) for r in REFS]
    for n in range(1, max_n + 1):
        # Both references implement the same corpus formula; given our tokens they differ only by float rounding.
        sb = BLEU(tokenize='none', smooth_method='none', max_ngram_order=n, lowercase=False)
        expected = sb.corpus_score([' '.join(t) for t in hyp_tok], [[' '.join(t) for t in ref_tok]]).score
        assert ours[f'bleu{n}'] == pytest.approx(expected, abs=1e-9)
        nl = 100 * corpus_bleu([[r] for r in ref_tok], hyp_tok, weights=(1 / n,) * n)
        assert ours[f'bleu{n}'] == pytest.approx(nl, abs=1e-9)
    assert 0 < ours[f'bleu{max_n}'] < 100


def test_bleu_brevity_penalty_and_zero_precision_by_hand():
    scores = metrics.corpus_bleu_n(['the cat'], ['The cat sat'])
    bp = math.exp(1 - 3 / 2)  # hypothesis 2 tokens, reference 3: every 1- and 2-gram matches
    assert scores['bleu1'] == pytest.approx(100 * bp) and scores['bleu2'] == pytest.approx(100 * bp)
    assert scores['bleu3'] == 0.0 and scores['bleu4'] == 0.0  # no 3-grams in the hypothesis: p3 = 0 / 0 -> 0
    assert metrics.corpus_bleu_n(['a b c d'], ['a b c d'])['bleu4'] == pytest.approx(100.0)
    with pytest.raises(ValueError):
        metrics.corpus_bleu_n(['a'], [])


def test_sacrebleu_score_equals_ours_where_tokenisers_agree():
    # Lower-case text with no apostrophes or digits: 13a splits punctuation exactly as `tokenize` does, and with all
    # four precisions non-zero sacrebleu's exp smoothing is inactive, so the two BLEU-4 must coincide.
    hyps = ['i am so sorry to hear that , what happened ?', 'that sounds wonderful ! did you have fun ?']
    refs = ['i am sorry to hear that . what happened to you ?', 'wow that sounds great ! did you have fun ?']
    out = metrics.sacrebleu_score(hyps, refs)
    assert out['score'] == pytest.approx(metrics.corpus_bleu_n(hyps, refs)['bleu4'], abs=1e-9)
    assert 'nrefs:1' in out['signature'] and 'tok:13a' in out['signature']


def test_distinct_n_by_hand():
    texts = ['I am happy.', 'i am sad']  # tokens: [i, am, happy, .] and [i, am, sad]
    assert metrics.distinct_n(texts, 1) == pytest.approx(100 * 5 / 7)  # {i, am, happy, ., sad} of 7
    assert metrics.distinct_n(texts, 2) == pytest.approx(100 * 4 / 5)  # (i, am) twice; no (., i) across texts
    assert metrics.distinct_n(['hi'], 2) == 0.0


def _sklearn_macro_f1(pred, gold, ignore_index=-1):
    """Independent per-class precision / recall / F1 with sklearn's zero_division=0, over present labels."""
    keep = [i for i, g in enumerate(gold) if g != ignore_index]
    p, g = [pred[i] for i in keep], [gold[i] for i in keep]
    f1s = []
    for c in sorted(set(p) | set(g)):
        tp = sum(a == c and b == c for a, b in zip(p, g))
        prec = tp / p.count(c) if p.count(c) else 0.0
        rec = tp / g.count(c) if g.count(c) else 0.0
        f1s.append(2 * prec * rec / (prec + rec) if prec + rec else 0.0)
    return sum(f1s) / len(f1s)


def test_accuracy_macro_f1_and_confusion_with_ignored_labels():
    pred, gold = [0, 0, 1, 3, 2], [0, 1, 1, -1, 2]
    assert metrics.accuracy(pred, gold) == pytest.approx(3 / 4)
    # Classes 0 and 1 each get F1 = 2/3, class 2 gets 1; class 3 is only predicted on an ignored sample.
    assert metrics.macro_f1(pred, gold, num_classes=5) == pytest.approx((2 / 3 + 2 / 3 + 1) / 3)
    cm = metrics.confusion_matrix(pred, gold, num_classes=4)
    expected = torch.zeros(4, 4, dtype=torch.int64)
    expected[0, 0], expected[1, 0], expected[1, 1], expected[2, 2] = 1, 1, 1, 1
    assert torch.equal(cm, expected)
    assert math.isnan(metrics.accuracy([1], [-1]))
    with pytest.raises(ValueError):
        metrics.confusion_matrix([4], [0], num_classes=4)


def test_macro_f1_matches_sklearn_semantics_on_random_labels():
    gen = torch.Generator().manual_seed(0)
    gold = torch.randint(0, 6, (300,), generator=gen)  # classes 6..9 never occur in gold
    pred = torch.where(torch.rand(300, generator=gen) < 0.4, gold, torch.randint(0, 8, (300,), generator=gen))
    gold[torch.rand(300, generator=gen) < 0.2] = -1
    expected = _sklearn_macro_f1(pred.tolist(), gold.tolist())
    assert metrics.macro_f1(pred, gold, num_classes=10) == pytest.approx(expected, abs=1e-12)


def test_confusion_matrix_matches_hand_counts_on_random_labels():
    gen = torch.Generator().manual_seed(1)
    gold = torch.randint(0, 7, (500,), generator=gen)  # class 7 never occurs in gold, only in pred
    pred = torch.where(torch.rand(500, generator=gen) < 0.5, gold, torch.randint(0, 8, (500,), generator=gen))
    gold[torch.rand(500, generator=gen) < 0.1] = -1
    counts = torch.zeros(8, 8, dtype=torch.int64)
    for p, g in zip(pred.tolist(), gold.tolist()):
        if g != -1:
            counts[g, p] += 1
    cm = metrics.confusion_matrix(pred, gold, num_classes=8)
    assert cm.dtype == torch.int64 and torch.equal(cm, counts)
    assert int(cm.sum()) == int((gold != -1).sum()) and cm[7].sum() == 0 and cm[:, 7].sum() > 0


def test_label_checks_and_empty_input():
    with pytest.raises(ValueError, match='pred labels'):
        metrics.macro_f1([0, 5], [0, 1], num_classes=5)
    with pytest.raises(ValueError, match='gold labels'):
        metrics.confusion_matrix([0, 1], [0, -2], num_classes=5)  # only -1 means "no label"
    with pytest.raises(ValueError, match='gold has 3'):
        metrics.confusion_matrix([0, 1], [0, 1, 1], num_classes=5)
    assert math.isnan(metrics.macro_f1([2, 3], [-1, -1], num_classes=5))  # nothing labelled
    assert torch.equal(metrics.confusion_matrix([], [], num_classes=3), torch.zeros(3, 3, dtype=torch.int64))
    # A prediction on an ignored sample counts nowhere, even if its class appears nowhere else.
    assert metrics.macro_f1([1, 4], [1, -1], num_classes=5) == 1.0


def test_emotion_report_maps_fine_to_coarse():
    fine_to_coarse = [0, 0, 1, 2]  # four fine classes into three coarse ones
    pred, gold = [1, 2, 3, 0, 2], [0, 2, 2, 1, -1]
    rep = metrics.emotion_report(pred, gold, fine_to_coarse)
    assert rep['n'] == 4 and rep['fine_acc'] == pytest.approx(1 / 4)
    assert rep['fine_macro_f1'] == pytest.approx(_sklearn_macro_f1(pred, gold))
    # Coarse: pred [0, 1, 2, 0] vs gold [0, 1, 1, 0] -> 3 of 4 right.
    assert rep['coarse_acc'] == pytest.approx(3 / 4)
    assert rep['coarse_macro_f1'] == pytest.approx(_sklearn_macro_f1([0, 1, 2, 0], [0, 1, 1, 0]))


def _reference_fid(x, y):
    """FID from np.cov and eigenvalues: tr sqrt(S1 S2) = sum sqrt(eig(S1 S2)), eigenvalues real and >= 0."""
    mu1, mu2, s1, s2 = x.mean(0), y.mean(0), np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    eig = np.linalg.eigvals(s1 @ s2)
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(eig.real.clip(0)).sum())


def test_frechet_distance_against_independent_computation():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 8))
    y = rng.normal(size=(300, 8)) @ rng.normal(size=(8, 8)) * 0.5 + 1.0
    stats = lambda f: (f.mean(0), np.cov(f, rowvar=False))  # noqa: E731
    assert metrics.frechet_distance(*stats(x), *stats(y)) == pytest.approx(_reference_fid(x, y), rel=1e-9)
    assert metrics.fid_from_features(torch.from_numpy(x), y) == pytest.approx(_reference_fid(x, y), rel=1e-9)
    assert abs(metrics.fid_from_features(x, x)) < 1e-8
    shift = rng.normal(size=8)
    assert metrics.fid_from_features(x, x + shift) == pytest.approx((shift ** 2).sum(), rel=1e-8)


def test_frechet_distance_singular_product(monkeypatch, caplog):
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(5, 16)), rng.normal(size=(6, 16))  # fewer samples than dims: rank-deficient covariances
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', linalg.LinAlgWarning)
        assert metrics.fid_from_features(x, y) == pytest.approx(_reference_fid(x, y), rel=1e-6)
    # Whether scipy flags a given singular product varies, so flag the first call ourselves: the retry must add
    # FID_EPS to both diagonals.
    sqrtm, seen = linalg.sqrtm, []

    def flagging_sqrtm(a):
        seen.append(a)
        if len(seen) == 1:
            warnings.warn('singular', linalg.LinAlgWarning)
        return sqrtm(a)

    monkeypatch.setattr(linalg, 'sqrtm', flagging_sqrtm)
    s1, s2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    with caplog.at_level(logging.WARNING, logger='libs.metrics'), warnings.catch_warnings():
        warnings.simplefilter('ignore', linalg.LinAlgWarning)
        fid = metrics.frechet_distance(x.mean(0), s1, y.mean(0), s2)
    offset = np.eye(16) * metrics.FID_EPS
    assert len(seen) == 2 and np.array_equal(seen[1], (s1 + offset) @ (s2 + offset)) and 'singular' in caplog.text
    # As in the reference code, only the square-root term sees the offset, not the traces.
    root_trace = np.sqrt(np.linalg.eigvals(seen[1]).real.clip(0)).sum()
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * root_trace
    assert fid == pytest.approx(expected, rel=1e-6)


class _TwoProcessGather:
    """Stands in for accelerate: `gather` stacks this process's tensor with the other process's."""

    def __init__(self, other):
        self.other = other.state_dict()

    def gather(self, value):
        key = {t.shape: k for k, t in self.other.items()}[value.shape[1:]]
        return torch.cat([value, self.other[key].unsqueeze(0)])


def test_feature_stats_merge_and_gather_equal_one_pass():
    feats = torch.randn(101, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64) * 3 + 2
    whole = metrics.FeatureStats(6)
    whole.update(feats[:40])
    whole.update(feats[40:])
    mu, cov = whole.mean_cov()
    np.testing.assert_allclose(mu, feats.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(cov, np.cov(feats.numpy(), rowvar=False), rtol=1e-10)
    a, b = metrics.FeatureStats(6), metrics.FeatureStats(6)
    a.update(feats[:57])
    b.update(feats[57:])
    for combined in (metrics.FeatureStats(6).merge(a).merge(b), a.gather(_TwoProcessGather(b))):
        assert int(combined.n) == 101
        np.testing.assert_allclose(combined.mean_cov()[0], mu, rtol=1e-13)
        np.testing.assert_allclose(combined.mean_cov()[1], cov, rtol=1e-11)
    with pytest.raises(ValueError):
        metrics.FeatureStats(6).mean_cov()


class _TinyInception(torch.nn.Module):
    """A TorchScript-able stand-in with the NVlabs FID network's call signature."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Conv2d(3, dim, 1)

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        return self.proj(x.float() / 255).mean((2, 3))


@pytest.fixture
def no_fidelity(monkeypatch, tmp_path):
    """An empty torch.hub cache and an unimportable torch-fidelity (so nothing is downloaded)."""
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    monkeypatch.setitem(sys.modules, 'torch_fidelity', None)


def test_load_inception_without_weights_raises_user_error(no_fidelity, tmp_path):
    with pytest.raises(UserError, match='skip_fid') as err:
        metrics.load_inception()
    assert metrics.INCEPTION_TORCHSCRIPT in str(err.value) and 'torch-fidelity' in str(err.value)
    torch.save({'w': torch.zeros(1)}, tmp_path / 'state_dict.pth')
    with pytest.raises(UserError, match='not TorchScript'):
        metrics.load_inception(str(tmp_path / 'state_dict.pth'))


def test_load_inception_torchscript_from_path_and_cache(no_fidelity, tmp_path):
    net = torch.jit.script(_TinyInception(metrics.INCEPTION_POOL_DIM))
    images = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    cache = tmp_path / 'torch_home' / 'hub' / 'checkpoints'
    cache.mkdir(parents=True)
    net.save(str(cache / metrics.INCEPTION_TORCHSCRIPT))
    for loaded in (metrics.load_inception(str(cache / metrics.INCEPTION_TORCHSCRIPT)), metrics.load_inception()):
        torch.testing.assert_close(loaded(images), net(images, return_features=True), rtol=0, atol=0)
    with pytest.raises(ValueError):
        loaded(images.float())
    wrong = tmp_path / 'wrong.pt'
    torch.jit.script(_TinyInception(7)).save(str(wrong))
    with pytest.raises(UserError, match='not the standard FID network'):
        metrics.load_inception(str(wrong))(images)
