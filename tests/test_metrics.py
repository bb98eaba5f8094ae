"""Metrics against independent computations: BLEU by hand and via nltk / sacreBLEU, hand counts, numpy FID,
hand-counted F1."""
import logging
import math
import sys
import warnings

import numpy as np
import pytest
import sacrebleu
import torch
from nltk.tokenize import word_tokenize
from nltk.translate.bleu_score import SmoothingFunction, corpus_bleu, sentence_bleu
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from scipy import linalg

from libs import metrics
from libs.errors import UserError

HYPS = ['I am so sorry to hear that, what happened?', 'That sounds wonderful! Did you enjoy it?',
        "Oh no, I'd be scared too.", 'Congratulations, you must be proud of your son.']
REFS = ['I am sorry to hear that. What happened to you?', 'Wow that sounds great! Did you have fun?',
        'That is scary. I would be afraid too.', 'That is great news, you must be so proud of him.']


def test_tokenize_is_lowercased_nltk_word_tokenize():
    # One sentence each: word_tokenize without its sentence splitter (preserve_line, no data file needed) is the
    # reference; sentence splitting only matters where a sentence ends inside the text.
    for text in ['I am so sorry to hear that, what happened?', "Oh no, I'd be scared too.", 'Wow!! "Great" news...',
                 "You can't be serious (really)?"]:
        assert metrics.tokenize(text) == word_tokenize(text.lower(), preserve_line=True)
    assert metrics.tokenize('I am sorry. What happened to you?!') == \
        ['i', 'am', 'sorry', '.', 'what', 'happened', 'to', 'you', '?', '!']
    # Control characters (a random tiny decoder emits them) are spaces, never tokens; nothing crashes on them.
    assert metrics.tokenize('hi\x01\x02 there\x7f\u0085ok\u200b') == ['hi', 'there', 'ok']
    assert metrics.tokenize('\x00\x1f') == [] and metrics.tokenize('') == []


def test_corpus_bleu_n_is_sacrebleu_of_each_order():
    bleu4 = sacrebleu.corpus_bleu(HYPS, [REFS]).score  # sacreBLEU's standard entry point
    ours = metrics.corpus_bleu_n(HYPS, REFS)
    assert ours['bleu4'] == pytest.approx(bleu4, abs=1e-9) == metrics.sacrebleu_score(HYPS, REFS)['score']
    # Every precision of every order is non-zero here, so exp smoothing is inactive and BLEU-n is nltk's corpus
    # BLEU with weights 1/n on sacreBLEU's 13a tokens (case kept).
    tokens = [Tokenizer13a()(t).split() for t in HYPS], [[Tokenizer13a()(t).split()] for t in REFS]
    for n in range(1, 5):
        assert ours[f'bleu{n}'] == pytest.approx(100 * corpus_bleu(tokens[1], tokens[0], weights=(1 / n,) * n),
                                                 abs=1e-9)
    assert 0 < ours['bleu4'] < ours['bleu3'] < ours['bleu2'] < ours['bleu1'] < 100
    assert metrics.corpus_bleu_n(HYPS, REFS, max_n=2) == {k: ours[k] for k in ('bleu1', 'bleu2')}
    signature = metrics.sacrebleu_score(HYPS, REFS)['signature']
    assert 'nrefs:1' in signature and 'tok:13a' in signature and 'smooth:exp' in signature


def test_corpus_bleu_brevity_penalty_and_smoothing_by_hand():
    scores = metrics.corpus_bleu_n(['the cat'], ['the cat sat'])
    bp = math.exp(1 - 3 / 2)  # hypothesis 2 tokens, reference 3: every 1- and 2-gram matches
    assert scores['bleu1'] == pytest.approx(100 * bp) and scores['bleu2'] == pytest.approx(100 * bp)
    assert scores['bleu3'] == 0.0 and scores['bleu4'] == 0.0  # no 3-gram in the hypothesis at all
    # One 4-gram, unmatched: exp smoothing counts it as 1 / (2 * 1); the lower orders are 3/4, 2/3, 1/2.
    expected = 100 * math.exp((math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2) + math.log(1 / 2)) / 4)
    assert metrics.corpus_bleu_n(['a b c x'], ['a b c d'])['bleu4'] == pytest.approx(expected)
    assert metrics.corpus_bleu_n(['The cat'], ['the cat'])['bleu1'] == pytest.approx(50.0)  # mixed case
    assert metrics.corpus_bleu_n(['a b c d'], ['a b c d'])['bleu4'] == pytest.approx(100.0)
    for bad in (([], []), (['a'], [])):
        with pytest.raises(ValueError):
            metrics.corpus_bleu_n(*bad)


def test_sentence_bleu_n_by_hand():
    # Pair 1: 'the cat sat' against a 6-token reference; its 1-3-grams all match, it has no 4-gram (0 of 0 counts
    # as 0 of 1, smoothed to 0.1). Pair 2: an empty reply scores 0. Case and punctuation go through `tokenize`.
    scores = metrics.sentence_bleu_n(['The cat sat', ''], ['the cat sat on the mat.', 'anything'])
    bp = math.exp(1 - 7 / 3)  # the reference has 7 tokens with its '.'
    for n in range(1, 4):
        assert scores[f'bleu{n}'] == pytest.approx(100 * bp / 2)
    assert scores['bleu4'] == pytest.approx(100 * bp * 0.1 ** (1 / 4) / 2)
    # Matches nltk's own averaging over the same tokens, with every weight set.
    smooth = SmoothingFunction().method1
    for n in range(1, 5):
        expected = np.mean([sentence_bleu([metrics.tokenize(r)], metrics.tokenize(h), weights=(1 / n,) * n,
                                          smoothing_function=smooth) for h, r in zip(HYPS, REFS)])
        assert metrics.sentence_bleu_n(HYPS, REFS)[f'bleu{n}'] == pytest.approx(100 * expected, abs=1e-9)
    with pytest.raises(ValueError):
        metrics.sentence_bleu_n(['a'], ['a', 'b'])


def test_distinct_n_by_hand():
    texts = ['I am happy.', 'i am sad']  # tokens: [i, am, happy, .] and [i, am, sad]
    assert metrics.distinct_n(texts, 1) == pytest.approx(100 * 5 / 7)  # {i, am, happy, ., sad} of 7
    assert metrics.distinct_n(texts, 2) == pytest.approx(100 * 4 / 5)  # (i, am) twice; no (., i) across texts
    assert metrics.distinct_n(['hi'], 2) == 0.0


def test_distinct_n_per_response_by_hand():
    texts = ['I am happy.', 'i am sad', 'no no no']  # [i, am, happy, .], [i, am, sad], [no, no, no]
    assert metrics.distinct_n_per_response(texts, 1) == pytest.approx(100 * (4 / 4 + 3 / 3 + 1 / 3) / 3)
    assert metrics.distinct_n_per_response(texts, 2) == pytest.approx(100 * (3 / 3 + 2 / 2 + 1 / 2) / 3)
    # A response with no n-gram scores 0 and still counts; the corpus convention differs on the same texts.
    assert metrics.distinct_n_per_response(['hi', 'i am sad'], 2) == pytest.approx(50.0)
    assert metrics.distinct_n(texts, 1) == pytest.approx(100 * 6 / 10)  # {i, am, happy, ., sad, no} of 10
    assert metrics.distinct_n_per_response([], 1) == 0.0


def test_emotion_numbers_equal_the_hand_written_code_before_sklearn():
    """accuracy moved to sklearn's accuracy_score; these are the numbers the hand-written code (main @9fff430) gave."""
    from libs.avamerg import COARSE_7, EMOTIONS_32, FINE_TO_COARSE
    gen = torch.Generator().manual_seed(23)
    gold = torch.randint(0, 32, (300,), generator=gen)
    gold[torch.rand(300, generator=gen) < 0.1] = -1
    pred = torch.where(torch.rand(300, generator=gen) < 0.4, gold.clamp(min=0),
                       torch.randint(0, 32, (300,), generator=gen))
    table = [COARSE_7.index(FINE_TO_COARSE[e]) for e in EMOTIONS_32]
    assert metrics.emotion_report(pred, gold, table) == {
        'n': 263, 'fine_acc': 0.4144486692015209, 'fine_macro_f1': 0.3852764612296514,
        'coarse_acc': 0.5285171102661597, 'coarse_macro_f1': 0.43379445006347456}
    cm = metrics.confusion_matrix(pred, gold, 32)
    assert int(cm.sum()) == 263 and int(cm.trace()) == 109 == round(0.4144486692015209 * 263)


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
