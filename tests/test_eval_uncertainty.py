"""Bootstrap intervals and the paired comparison (libs/evaluation/uncertainty.py) on synthetic records: the
resampled metrics equal libs.metrics on the full set, intervals cover the full-set value and shrink with more pairs,
a run compared with itself differs by exactly zero, and the weighted FID is metrics.frechet_distance."""
import random

import numpy as np
import pytest
import torch

from libs import metrics
from libs.evaluation import report, score, uncertainty

WORDS = ('i', 'am', 'so', 'sorry', 'that', 'sounds', 'hard', 'great', 'news', 'what', 'happened', 'tell', 'me', 'more',
         'you', 'must', 'be', 'proud', 'oh', 'no', '.', '!', '?')
RESAMPLES, SEED, CONFIDENCE = 300, 0, 0.95


def make_records(n, seed, accuracy=0.6):
    """n records with random utterances, references sharing some words, and labels right `accuracy` of the time."""
    rng = random.Random(seed)
    records = []
    for i in range(n):
        reference = ' '.join(rng.choice(WORDS) for _ in range(rng.randint(4, 10)))
        generated = ' '.join(w if rng.random() < .5 else rng.choice(WORDS) for w in reference.split()[:-1])
        gold = rng.randrange(32)
        pred = gold if rng.random() < accuracy else rng.randrange(32)
        records.append(dict(generated=generated, reference=reference, gold_label=gold if i % 7 else -1,
                            gold_emotion='x', pred_label=pred,
                            expression=dict(generated=rng.choice('ab'), gold=rng.choice('ab'),
                                            speaker=rng.choice('ab'))))
    return records


def test_full_set_values_equal_the_metrics():
    records = make_records(60, seed=1)
    values = uncertainty.PairStatistics(records).values(np.ones(len(records)))
    expected = report.flat(score.finite(dict(fid=None, **score.score(records))))
    assert values.keys() == expected.keys()
    for k, v in expected.items():
        assert values[k] == pytest.approx(v, abs=1e-9), k


def test_weighted_fid_is_the_frechet_distance():
    g = torch.Generator().manual_seed(0)
    for n, d in ((50, 6), (5, 8)):  # more pairs than features (through QR), and fewer (a singular covariance)
        gen, ref = torch.randn(n, d, generator=g, dtype=torch.float64), torch.randn(n, d, generator=g,
                                                                                    dtype=torch.float64) + .3
        expected = metrics.fid_from_features(gen, ref)
        assert uncertainty.weighted_fid(gen, ref, torch.ones(n)) == pytest.approx(expected, rel=1e-6, abs=1e-5)
        # Integer weights are repeated pairs.
        w = torch.randint(0, 3, (n,), generator=g)
        w[:2] = 1
        repeat = lambda x: x.repeat_interleave(w, 0)  # noqa: E731
        assert uncertainty.weighted_fid(gen, ref, w) == pytest.approx(
            metrics.fid_from_features(repeat(gen), repeat(ref)), rel=1e-6, abs=1e-5)


def width(interval):
    return interval[1] - interval[0]


def test_intervals_cover_the_full_set_value_and_shrink_with_more_pairs():
    small, large = make_records(40, seed=2), make_records(640, seed=3)
    full = {}
    widths = []
    for records in (small, large):
        stats = uncertainty.PairStatistics(records)
        full = stats.values(np.ones(len(records)))
        intervals = uncertainty.bootstrap(stats, RESAMPLES, SEED, CONFIDENCE, 0)
        assert intervals.keys() == full.keys()
        for k, (lo, hi) in intervals.items():
            assert lo <= full[k] <= hi, (k, lo, full[k], hi)
        widths.append(intervals)
    for k in full:
        if k.startswith('dist') and not k.endswith('per_response'):
            continue  # corpus Dist-n is not a mean: it falls as the corpus grows, so its spread is not comparable
        if width(widths[0][k]) == 0:
            continue  # every small-set pair has the same value (e.g. per-response Dist-2 = 100): nothing to shrink
        assert width(widths[1][k]) < width(widths[0][k]) / 2, k  # 16x the pairs: about a quarter of the width


def test_bootstrap_is_seeded():
    stats = uncertainty.PairStatistics(make_records(30, seed=4))
    assert uncertainty.bootstrap(stats, 50, 7, CONFIDENCE, 0) == uncertainty.bootstrap(stats, 50, 7, CONFIDENCE, 0)
    assert uncertainty.bootstrap(stats, 50, 7, CONFIDENCE, 0) != uncertainty.bootstrap(stats, 50, 8, CONFIDENCE, 0)


def test_fid_interval_over_resampled_pair_sets():
    g = torch.Generator().manual_seed(1)
    features = dict(generated=torch.randn(40, 4, generator=g, dtype=torch.float64),
                    reference=torch.randn(40, 4, generator=g, dtype=torch.float64) + .5)
    stats = uncertainty.PairStatistics(make_records(40, seed=5), features)
    counts = uncertainty.resample_counts(40, 20, SEED)
    lo, hi = uncertainty.bootstrap(stats, 20, SEED, CONFIDENCE, 20)['fid']
    resampled = [metrics.fid_from_features(features['generated'].repeat_interleave(torch.as_tensor(w), 0),
                                           features['reference'].repeat_interleave(torch.as_tensor(w), 0))
                 for w in counts]
    # FID is a set statistic: the percentile interval, shifted by the bootstrap bias, around the full-set value.
    bias = np.mean(resampled) - metrics.fid_from_features(features['generated'], features['reference'])
    assert np.mean(resampled) > metrics.fid_from_features(features['generated'], features['reference'])
    assert (lo, hi) == pytest.approx(tuple(np.percentile(resampled, [2.5, 97.5]) - bias), rel=1e-6)


def test_a_run_compared_with_itself_differs_by_zero():
    records = make_records(50, seed=6)
    stats = uncertainty.PairStatistics(records)
    result = uncertainty.paired(stats, stats, 100, SEED, CONFIDENCE, 0)
    assert result and all(r['difference'] == 0 and r['interval'] == [0, 0] for r in result.values())
    # A better run on the same pairs: its accuracy difference and interval are positive.
    better = [dict(r, pred_label=r['gold_label'] if r['gold_label'] >= 0 else r['pred_label']) for r in records]
    result = uncertainty.paired(stats, uncertainty.PairStatistics(better), 100, SEED, CONFIDENCE, 0)
    assert result['fine_acc']['difference'] > 0 and result['fine_acc']['interval'][0] > 0
    assert result['bleu4']['difference'] == 0
