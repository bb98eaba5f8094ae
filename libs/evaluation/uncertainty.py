"""Bootstrap intervals over pairs, and the paired comparison of two runs on the same pairs.

A resample draws n pairs with replacement (a multinomial count w_i per pair, from one seeded generator) and every
metric is recomputed on it exactly as on the full set: corpus BLEU from the summed sacreBLEU n-gram statistics of the
drawn pairs, Dist-n from their n-grams, accuracy and macro-F1 on their labels weighted by w, FID from the drawn pairs'
Inception features. The interval is the 2.5th..97.5th percentile of the resampled values.

FID and corpus Dist-n are statistics of a set, not means over pairs, and a resample that repeats pairs is a less
diverse set: its FID is higher and its Dist lower than the full set's. Their intervals are therefore the percentile
interval shifted by the bootstrap's estimate of that bias (the mean of the resampled values minus the full-set
value): the spread of the statistic over resampled pair sets, placed around the full-set value.

``paired`` draws the same resamples for two runs on the same pairs and reports the difference b - a with its interval:
the noise of which pairs happen to be in the test set cancels, so it is much tighter than two separate intervals.
"""

import numpy as np
import torch

from libs import metrics
from libs.avamerg import EMOTIONS_32, coarse_index
from libs.errors import UserError

MAX_N = 4  # BLEU-1..4
DIST_N = (1, 2)
SET_STATISTICS = ('fid', 'dist1', 'dist2')  # metrics of a set, not means over pairs (see above)


def ngram_incidence(texts, n):
    """(pairs x distinct n-grams) sparse 0/1 matrix of which response has which n-gram, and each response's count."""
    from scipy import sparse
    vocab, rows, cols, counts = {}, [], [], []
    for i, text in enumerate(texts):
        grams = metrics.ngrams(metrics.tokenize(text), n)
        counts.append(sum(grams.values()))
        for g in grams:
            rows.append(i)
            cols.append(vocab.setdefault(g, len(vocab)))
    matrix = sparse.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(texts), max(len(vocab), 1)))
    return matrix, np.asarray(counts, dtype=np.float64)


class PairStatistics:
    """What every metric needs per pair, so that a resample (counts w over pairs) is scored without re-tokenising."""

    def __init__(self, records, fid_features=None, device='cpu'):
        from sacrebleu.metrics import BLEU
        self.n = len(records)
        texts = [r['generated'] for r in records]
        self.dist = {n: ngram_incidence(texts, n) for n in DIST_N}
        per_response = getattr(metrics, 'distinct_n_per_response', None)
        self.dist_per_response = None if per_response is None else {
            n: np.asarray([per_response([t], n) for t in texts], dtype=np.float64) for n in DIST_N}
        self.gold = np.asarray([r['reference'] is not None for r in records])
        gold = [r for r in records if r['reference'] is not None]
        self.bleu = [BLEU(max_ngram_order=n) for n in range(1, MAX_N + 1)]
        self.bleu_stats = np.zeros((self.n, 2 + 2 * MAX_N))
        self.sentence_bleu = np.zeros((self.n, MAX_N))
        if gold:
            hyps, refs = [r['generated'] for r in gold], [r['reference'] for r in gold]
            self.bleu_stats[self.gold] = np.asarray(self.bleu[-1]._extract_corpus_statistics(hyps, [refs]))
            self.sentence_bleu[self.gold] = [[metrics.sentence_bleu_n([h], [r])[f'bleu{n}']
                                              for n in range(1, MAX_N + 1)] for h, r in zip(hyps, refs)]
        pred = np.asarray([-1 if r['pred_label'] is None else r['pred_label'] for r in records])
        label = np.asarray([r['gold_label'] for r in records])
        self.labelled = (label >= 0) & (pred >= 0)
        table = np.asarray([coarse_index(i) for i in range(len(EMOTIONS_32))])
        self.fine = (pred.clip(0), label.clip(0))
        self.coarse = (table[pred.clip(0)], table[label.clip(0)])
        reads = [r.get('expression') for r in records]
        self.has_expression = np.asarray([x is not None for x in reads])
        self.expression = {f'expression_{a}_vs_{b}': np.asarray([x is not None and x[a] == x[b] for x in reads])
                           for a, b in (('generated', 'gold'), ('generated', 'speaker'), ('gold', 'speaker'))}
        # On the evaluation's device: each resample's FID is an SVD in min(pairs, 2048) dimensions.
        self.features = None if fid_features is None else tuple(fid_features[k].to(device, torch.float64)
                                                                for k in ('generated', 'reference'))

    def values(self, w, with_fid=True):
        """{metric: value} of the resample with pair counts w (all ones: the full set); None where not computable."""
        w = np.asarray(w, dtype=np.float64)
        out = {}
        for n in DIST_N:
            matrix, counts = self.dist[n]
            total = w @ counts
            out[f'dist{n}'] = 100.0 * int(((w > 0).astype(np.float64) @ matrix > 0).sum()) / total if total else 0.0
            if self.dist_per_response is not None:
                out[f'dist{n}_per_response'] = weighted_mean(self.dist_per_response[n], w)
        gold_w = w * self.gold
        if gold_w.sum():
            stats = gold_w @ self.bleu_stats
            for n, bleu in enumerate(self.bleu, 1):
                out[f'bleu{n}'] = bleu._compute_score_from_stats([*stats[:2], *stats[2:2 + n],
                                                                  *stats[2 + MAX_N:2 + MAX_N + n]]).score
                out[f'sentence_bleu{n}'] = weighted_mean(self.sentence_bleu[:, n - 1], gold_w)
        out.update(emotion_values(self.fine, self.coarse, w * self.labelled))
        expression_w = w * self.has_expression
        for name, agree in self.expression.items():
            out[name] = weighted_mean(agree, expression_w)
        if with_fid and self.features is not None:
            out['fid'] = weighted_fid(*self.features, torch.as_tensor(w))
        return {k: v for k, v in out.items() if v is not None}


def weighted_mean(values, w):
    """sum(w * values) / sum(w), or None if every weight is zero."""
    total = w.sum()
    return float(w @ values / total) if total else None


def emotion_values(fine, coarse, w):
    """Accuracy and macro-F1 (32- and 7-way) of the weighted labelled pairs, as libs.metrics.macro_f1 counts them."""
    keep = w > 0
    if not keep.any():
        return {}
    out = {}
    for name, (pred, gold) in (('fine', fine), ('coarse', coarse)):
        p, g, weight = pred[keep], gold[keep], w[keep]
        out[f'{name}_acc'] = float(weight @ (p == g) / weight.sum())
        out[f'{name}_macro_f1'] = weighted_macro_f1(p, g, weight)
    return out


def weighted_macro_f1(pred, gold, w):
    """sklearn's ``f1_score(gold, pred, labels=<classes present>, average='macro', sample_weight=w, zero_division=0)``
    from one weighted confusion matrix: sklearn's per-call validation costs ~40 ms, a thousand resamples a minute."""
    k = int(max(pred.max(), gold.max())) + 1
    confusion = np.bincount(gold * k + pred, weights=w, minlength=k * k).reshape(k, k)
    tp, predicted, actual = np.diag(confusion), confusion.sum(0), confusion.sum(1)
    present = (predicted + actual) > 0
    f1 = np.divide(2 * tp, predicted + actual, out=np.zeros(k), where=present)
    return float(f1[present].mean())


def weighted_fid(gen, ref, w):
    """FID between the generated and the reference features of a resample with pair counts w (float64).

    The same quantity as metrics.frechet_distance (without its singular-matrix offset): with A, B the centred
    features of the drawn pairs scaled by sqrt(w), Tr((S1 S2)^(1/2)) is the nuclear norm of A B^T / (n - 1),
    computed in min(pairs, features) dimensions (through QR when there are more pairs than features).
    """
    w = w.to(gen.device)
    keep = w > 0
    w, gen, ref = w[keep].double(), gen[keep], ref[keep]
    n = w.sum()
    mu_g, mu_r = w @ gen / n, w @ ref / n
    a, b = w.sqrt()[:, None] * (gen - mu_g), w.sqrt()[:, None] * (ref - mu_r)
    if a.shape[0] > a.shape[1]:
        a, b = torch.linalg.qr(a, mode='r')[1], torch.linalg.qr(b, mode='r')[1]
    cross = torch.linalg.svdvals(a @ b.T).sum()
    trace = (a.square().sum() + b.square().sum() - 2 * cross) / (n - 1)
    return float((mu_g - mu_r).square().sum() + trace)


def resample_counts(n, resamples, seed):
    """(resamples, n) multinomial pair counts of bootstrap resamples of n pairs, from one seeded generator."""
    rng = np.random.default_rng(seed)
    return rng.multinomial(n, np.full(n, 1 / n), size=resamples)


def percentile_interval(values, confidence, full=None):
    """The central `confidence` percentile interval of the resampled values, [lo, hi]; given the full-set value of
    a set statistic, shifted by the bootstrap's bias estimate mean(values) - full."""
    tail = 100 * (1 - confidence) / 2
    shift = 0.0 if full is None else float(np.mean(values)) - full
    return [float(np.percentile(values, tail)) - shift, float(np.percentile(values, 100 - tail)) - shift]


def interval_of(name, values, confidence, full):
    """percentile_interval of one metric, bias-shifted for the set statistics."""
    return percentile_interval(values, confidence, full if name in SET_STATISTICS else None)


def collect(per_resample):
    """[{metric: value}] -> {metric: [values]} over the metrics every resample has."""
    names = set.intersection(*(set(v) for v in per_resample)) if per_resample else set()
    return {k: [v[k] for v in per_resample] for k in sorted(names)}


def draw(stats_list, resamples, seed, fid_resamples):
    """[[{metric: value} per resample] per run]: every run scored on the same resampled pairs; FID on the first
    `fid_resamples` resamples only (each costs a feature-space SVD)."""
    counts = resample_counts(stats_list[0].n, resamples, seed)
    return [[dict(s.values(w, with_fid=k < fid_resamples)) for k, w in enumerate(counts)] for s in stats_list]


def bootstrap(stats, resamples, seed, confidence, fid_resamples):
    """{metric: [lo, hi]}: the bootstrap interval of every metric over resampled pairs."""
    runs = draw([stats], resamples, seed, fid_resamples)[0]
    draws = collect(runs)
    if fid_resamples:
        draws.update(collect(runs[:fid_resamples]))
    full = stats.values(np.ones(stats.n), with_fid=bool(fid_resamples))
    return {k: interval_of(k, v, confidence, full[k]) for k, v in draws.items()}


def paired(stats_a, stats_b, resamples, seed, confidence, fid_resamples):
    """{metric: {'a', 'b', 'difference', 'interval'}}: b - a on the full pair set and its paired bootstrap interval
    (the same resampled pairs for both runs)."""
    if stats_a.n != stats_b.n:
        raise UserError(f'the two runs have {stats_a.n} and {stats_b.n} pairs; compare runs on the same pairs')
    full = np.ones(stats_a.n)
    a, b = stats_a.values(full), stats_b.values(full)
    runs_a, runs_b = draw([stats_a, stats_b], resamples, seed, fid_resamples)
    diffs = [{m: vb[m] - va[m] for m in va.keys() & vb.keys()} for va, vb in zip(runs_a, runs_b)]
    draws = collect(diffs)
    if fid_resamples:
        draws.update(collect(diffs[:fid_resamples]))
    return {m: dict(a=a[m], b=b[m], difference=b[m] - a[m],
                    interval=interval_of(m, draws[m], confidence, b[m] - a[m]) if m in draws else None)
            for m in sorted(a.keys() & b.keys())}
