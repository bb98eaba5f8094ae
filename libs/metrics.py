"""Evaluation metrics for AvaMERG: BLEU (sacreBLEU and the papers' sentence BLEU), Dist-n (corpus and per response),
emotion accuracy / macro-F1 / confusion matrix (scikit-learn's, with unlabelled samples skipped), and FID.

Two BLEU conventions, because results are compared against both:

- ``corpus_bleu_n`` / ``sacrebleu_score``: sacreBLEU's corpus BLEU on the raw strings (its 13a tokeniser, mixed
  case, exp smoothing); BLEU-n is sacreBLEU with ``max_ngram_order=n``, so BLEU-4 is sacreBLEU's standard score,
  whose signature ``sacrebleu_score`` returns.
- ``sentence_bleu_n``: the mean over pairs of nltk's ``sentence_bleu`` (uniform weights 1/n, ``method1``
  smoothing) on ``tokenize``'s lower-cased nltk word tokens, the averaged BLEU-1..4 of empathetic-dialogue papers.
  CEM's and CASE's public code computes no BLEU at all (their evaluate.py has Dist-1/2 only; the lower-cased nltk
  tokens are their preprocessing), and papers differ in the smoothing, which they seldom state.

Two Dist-n conventions, because the papers differ (both x100 on ``tokenize``'s tokens):

- ``distinct_n``: corpus Dist-n, the distinct n-grams of all responses over all their n-grams (Li et al., 2016;
  CEM's and CASE's evaluate.py, the AvaMERG paper's Dist-1/2). It falls as the corpus grows.
- ``distinct_n_per_response``: the mean over responses of each response's distinct / all n-grams (E3RG's Dist,
  reported as a fraction, 0.990 = 99.0 here). Near 100 for any response that does not repeat itself, it measures
  repetition inside a response, not diversity across responses.
"""
import functools
import logging
import os
import unicodedata
import warnings
from collections import Counter

import numpy as np
import torch
from scipy import linalg

from libs.errors import UserError

logger = logging.getLogger(__name__)

INCEPTION_POOL_DIM = 2048  # the standard FID feature: Inception-v3's final average pool
INCEPTION_TORCHSCRIPT = 'inception-2015-12-05.pt'  # NVlabs / clean-fid TorchScript export of the TF FID network
FID_EPS = 1e-6  # diagonal offset used by the reference FID code when sigma1 @ sigma2 is singular


# ---------------------------------------------------------------- text ----------------------------------------------
@functools.lru_cache(maxsize=None)
def _nltk_tokenizers():
    """nltk's sentence splitter (Punkt with its default parameters) and word_tokenize's word tokenizer."""
    from nltk.tokenize import NLTKWordTokenizer, PunktSentenceTokenizer
    return PunktSentenceTokenizer(), NLTKWordTokenizer()


def tokenize(text):
    """Lower-cased nltk word tokens of `text`: ``nltk.word_tokenize(text.lower())`` without its punkt data file.

    CEM and CASE lower-case and ``nltk.word_tokenize`` their texts. word_tokenize splits sentences with the trained
    English Punkt model (the punkt_tab data file, which cannot be assumed offline), then tokenizes each sentence
    with NLTKWordTokenizer; here sentences are split by Punkt with its default parameters instead. Both break at
    '.', '?' and '!' before a space; they differ only where the trained model knows an abbreviation ("dr. smith"
    stays one sentence there, so its "dr." is one token where this gives "dr" "."). Control and other non-printing
    characters (which a random or barely trained caption decoder emits) are treated as spaces: nltk would keep
    runs of them as tokens, inflating Dist-n with n-grams nobody can read.
    """
    text = ''.join(' ' if unicodedata.category(c)[0] == 'C' else c for c in text.lower())
    sentences, words = _nltk_tokenizers()
    return [token for sentence in sentences.tokenize(text) for token in words.tokenize(sentence)]


def _check_pairs(hypotheses, references):
    """Raise ValueError unless there are as many references as hypotheses, and at least one of each."""
    if len(hypotheses) != len(references):
        raise ValueError(f'{len(hypotheses)} hypotheses but {len(references)} references')
    if not hypotheses:
        raise ValueError('BLEU of an empty corpus')


def corpus_bleu_n(hypotheses, references, max_n=4):
    """sacreBLEU corpus BLEU-1..max_n in [0, 100] of the raw strings, one reference per hypothesis.

    BLEU-n is sacreBLEU's BLEU with ``max_ngram_order=n`` (13a tokeniser, mixed case, exp smoothing): the brevity
    penalty times the geometric mean of the corpus n-gram precisions p_1..p_n. BLEU-4 is sacreBLEU's standard score.
    """
    from sacrebleu.metrics import BLEU
    _check_pairs(hypotheses, references)
    hyps, refs = list(hypotheses), [list(references)]
    return {f'bleu{n}': BLEU(max_ngram_order=n).corpus_score(hyps, refs).score for n in range(1, max_n + 1)}


def sacrebleu_score(hypotheses, references):
    """sacreBLEU's standard corpus BLEU (13a tokeniser, mixed case, exp smoothing) and its signature string."""
    from sacrebleu.metrics import BLEU
    _check_pairs(hypotheses, references)
    bleu = BLEU()
    score = bleu.corpus_score(list(hypotheses), [list(references)])
    return {'score': score.score, 'signature': str(bleu.get_signature())}


def sentence_bleu_n(hypotheses, references, max_n=4):
    """Sentence BLEU-1..max_n in [0, 100] averaged over the pairs, on `tokenize`'s tokens (the papers' BLEU).

    Per pair nltk's ``sentence_bleu([reference], hypothesis)`` with weights (1/n, ..., 1/n) and
    ``SmoothingFunction().method1`` (a zero n-gram count becomes 0.1, so one missing 4-gram does not zero a short
    reply); an empty hypothesis scores 0. The mean is over pairs, so short replies weigh as much as long ones.
    """
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
    _check_pairs(hypotheses, references)
    weights = [(1 / n,) * n for n in range(1, max_n + 1)]
    smoothing = SmoothingFunction().method1
    total = np.zeros(max_n)
    for hyp, ref in zip(hypotheses, references):
        total += sentence_bleu([tokenize(ref)], tokenize(hyp), weights=weights, smoothing_function=smoothing)
    return {f'bleu{n}': 100.0 * float(total[n - 1]) / len(hypotheses) for n in range(1, max_n + 1)}


def ngrams(tokens, n):
    """Counter of the n-grams (tuples) of one token list."""
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def distinct_n(texts, n):
    """Corpus Dist-n (Li et al., 2016): distinct n-grams / all n-grams of the corpus, x100, on `tokenize`'s tokens.

    Counted over the whole corpus as CEM's and CASE's evaluate.py count it (n-grams never cross sentence
    boundaries); 0 if the corpus has no n-gram.
    """
    grams = Counter()
    for text in texts:
        grams.update(ngrams(tokenize(text), n))
    total = sum(grams.values())
    return 100.0 * len(grams) / total if total else 0.0


def distinct_n_per_response(texts, n):
    """Mean per-response Dist-n: the mean over responses of distinct n-grams / all n-grams, x100, `tokenize`'s tokens.

    A response shorter than n tokens has no n-gram and scores 0 (it is not left out, so very short replies cannot
    raise the mean); 0 for an empty corpus.
    """
    scores = []
    for text in texts:
        grams = ngrams(tokenize(text), n)
        total = sum(grams.values())
        scores.append(100.0 * len(grams) / total if total else 0.0)
    return float(np.mean(scores)) if scores else 0.0


# ---------------------------------------------------------------- emotion -------------------------------------------
def _labelled(pred, gold, num_classes, ignore_index):
    """Flat int64 numpy (pred, gold) of the samples whose gold label is not ignore_index, range-checked unless
    num_classes is None."""
    pred, gold = (np.asarray(torch.as_tensor(x).long().flatten().cpu()) for x in (pred, gold))
    if pred.shape != gold.shape:
        raise ValueError(f'pred has {pred.size} labels but gold has {gold.size}')
    keep = gold != ignore_index
    pred, gold = pred[keep], gold[keep]
    # sklearn would silently drop labels outside `labels=`; a label out of range is a bug upstream, so say so.
    for name, x in (('pred', pred), ('gold', gold)):
        if num_classes is not None and x.size and (x.min() < 0 or x.max() >= num_classes):
            raise ValueError(f'{name} labels must lie in [0, {num_classes}) (or be {ignore_index} in gold)')
    return pred, gold


def confusion_matrix(pred, gold, num_classes, ignore_index=-1):
    """(num_classes, num_classes) int64 counts, rows = gold, columns = predicted; gold == ignore_index is skipped."""
    from sklearn.metrics import confusion_matrix as sk_confusion_matrix
    pred, gold = _labelled(pred, gold, num_classes, ignore_index)
    if not gold.size:  # sklearn refuses empty input; no labelled sample is an all-zero matrix
        return torch.zeros(num_classes, num_classes, dtype=torch.int64)
    return torch.from_numpy(sk_confusion_matrix(gold, pred, labels=np.arange(num_classes)).astype(np.int64))


def accuracy(pred, gold, ignore_index=-1):
    """Fraction in [0, 1] of labelled samples (gold != ignore_index) predicted correctly; nan if none is labelled."""
    from sklearn.metrics import accuracy_score
    pred, gold = _labelled(pred, gold, None, ignore_index)
    return float(accuracy_score(gold, pred)) if gold.size else float('nan')


def macro_f1(pred, gold, num_classes, ignore_index=-1):
    """Macro-F1 in [0, 1] over the classes present in gold or pred of the labelled samples; nan if none is labelled.

    sklearn's `f1_score(gold, pred, average='macro', labels=present, zero_division=0)`: a class that is never
    predicted (or never true) gets F1 = 0 and still counts; classes absent from both are left out rather than counted
    as 0 or 1, so the score does not depend on how many unused classes the label set has.
    """
    from sklearn.metrics import f1_score
    pred, gold = _labelled(pred, gold, num_classes, ignore_index)
    if not gold.size:
        return float('nan')
    present = np.union1d(gold, pred)
    return float(f1_score(gold, pred, labels=present, average='macro', zero_division=0))


def emotion_report(pred, gold, fine_to_coarse, ignore_index=-1):
    """Accuracy and macro-F1 on the fine labels and on the coarse labels given by the table `fine_to_coarse`."""
    pred, gold = torch.as_tensor(pred).long().flatten(), torch.as_tensor(gold).long().flatten()
    table = torch.as_tensor(fine_to_coarse, dtype=torch.long)
    num_fine, num_coarse = len(table), int(table.max()) + 1
    keep = gold != ignore_index
    coarse_pred, coarse_gold = table[pred[keep]], table[gold[keep]]
    return {
        'n': int(keep.sum()),
        'fine_acc': accuracy(pred, gold, ignore_index),
        'fine_macro_f1': macro_f1(pred, gold, num_fine, ignore_index),
        'coarse_acc': accuracy(coarse_pred, coarse_gold),
        'coarse_macro_f1': macro_f1(coarse_pred, coarse_gold, num_coarse),
    }


# ---------------------------------------------------------------- FID -----------------------------------------------
def frechet_distance(mu1, sigma1, mu2, sigma2, eps=FID_EPS):
    """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) in float64, as the reference FID code computes it.

    If sqrtm reports the product singular (or returns non-finite values), both covariances get `eps` on the
    diagonal; the real part of the square root is kept and a large imaginary part is an error.
    """
    mu1, mu2 = (np.asarray(torch.as_tensor(m).cpu(), dtype=np.float64) for m in (mu1, mu2))
    sigma1, sigma2 = (np.asarray(torch.as_tensor(s).cpu(), dtype=np.float64) for s in (sigma1, sigma2))
    diff = mu1 - mu2
    with warnings.catch_warnings():
        warnings.simplefilter('error', linalg.LinAlgWarning)
        try:
            covmean = linalg.sqrtm(sigma1 @ sigma2)
            singular = not np.isfinite(covmean).all()
        except linalg.LinAlgWarning:
            singular = True
    if singular:
        logger.warning('FID: sigma1 @ sigma2 is singular; adding %g to the diagonals (use more samples)', eps)
        offset = np.eye(len(sigma1)) * eps
        covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):  # the reference code's tolerance
            raise ValueError(f'FID: sqrtm has an imaginary component of {np.abs(covmean.imag).max():g}')
        covmean = covmean.real
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


class FeatureStats:
    """Streaming float64 mean / covariance of feature vectors; sums only, so shards merge exactly."""

    def __init__(self, dim, device='cpu'):
        self.n = torch.zeros((), dtype=torch.int64, device=device)
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = torch.zeros(dim, dim, dtype=torch.float64, device=device)

    def update(self, feats):
        """Add a (N, dim) batch of features."""
        x = torch.as_tensor(feats).to(self.sum.device, torch.float64).flatten(1)
        self.n += x.shape[0]
        self.sum += x.sum(0)
        self.outer += x.T @ x

    def merge(self, other):
        """Add another shard's sums into this one (in place) and return self."""
        self.n += other.n.to(self.n.device)
        self.sum += other.sum.to(self.sum.device)
        self.outer += other.outer.to(self.outer.device)
        return self

    def state_dict(self):
        """The sufficient statistics as tensors (for saving or cross-process gathering)."""
        return {'n': self.n, 'sum': self.sum, 'outer': self.outer}

    def gather(self, accelerator):
        """Sum the statistics of all processes (every process gets the total) with `accelerator.gather`."""
        # Gather-then-sum in rank order gives every process the same, order-fixed total.
        for name, value in self.state_dict().items():
            setattr(self, name, accelerator.gather(value.unsqueeze(0)).sum(0))
        return self

    def mean_cov(self):
        """Mean (dim,) and unbiased covariance (dim, dim) as float64 numpy arrays, like np.cov(rowvar=False)."""
        n = int(self.n)
        if n < 2:
            raise ValueError(f'FID needs at least 2 feature vectors, got {n}')
        mu = self.sum / n
        cov = (self.outer - n * torch.outer(mu, mu)) / (n - 1)
        return mu.cpu().numpy(), cov.cpu().numpy()


def fid_from_features(feats_a, feats_b):
    """FID between two (N, D) feature sets."""
    stats = []
    for feats in (feats_a, feats_b):
        s = FeatureStats(torch.as_tensor(feats).shape[1])
        s.update(feats)
        stats.append(s.mean_cov())
    return frechet_distance(*stats[0], *stats[1])


class InceptionFeatures(torch.nn.Module):
    """uint8 images (N, 3, H, W) -> (N, 2048) Inception-v3 pool features; the wrapped net resizes to 299 itself."""

    def __init__(self, net, returns_tuple):
        super().__init__()
        self.net, self.returns_tuple = net.eval(), returns_tuple

    @torch.no_grad()
    def forward(self, images):
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f'expected uint8 images (N, 3, H, W), got {images.dtype} {tuple(images.shape)}')
        # torch-fidelity returns one tensor per requested layer; the NVlabs TorchScript takes `return_features`.
        feats = self.net(images)[0] if self.returns_tuple else self.net(images, return_features=True)
        if feats.shape != (images.shape[0], INCEPTION_POOL_DIM):
            raise UserError(f'the Inception network returned {tuple(feats.shape)}, not (N, {INCEPTION_POOL_DIM}) '
                            'pool features: it is not the standard FID network')
        return feats


def load_inception(path=None):
    """The standard FID Inception-v3 as `InceptionFeatures`: a TorchScript file or torch-fidelity; never a substitute.

    Tried in order: a TorchScript file at `path`, or if no path is given at
    `$TORCH_HOME/hub/checkpoints/inception-2015-12-05.pt` (torch.hub's cache, default ~/.cache/torch); then
    torch-fidelity's `FeatureExtractorInceptionV3` (if it imports), with the state dict at `path` if given, else its
    own weights from (or downloaded into) the same cache.
    """
    tried = []
    cached = os.path.join(torch.hub.get_dir(), 'checkpoints', INCEPTION_TORCHSCRIPT)
    file = path or cached
    if not os.path.isfile(file):
        tried.append(f'{file} (no such file)')
    else:
        try:
            net = torch.jit.load(file, map_location='cpu')
        except RuntimeError as e:  # not a TorchScript archive: maybe torch-fidelity's state dict, tried below
            tried.append(f'{file} (not TorchScript: {str(e).splitlines()[0]})')
        else:
            logger.info('FID: Inception-v3 TorchScript from %s', file)
            return InceptionFeatures(net, returns_tuple=False)
    try:
        # Importing torch-fidelity also imports torchvision, which raises RuntimeError when its CUDA ops don't load.
        from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3
    except (ImportError, RuntimeError) as e:
        tried.append(f'torch-fidelity ({type(e).__name__}: {e})')
    else:
        try:
            net = FeatureExtractorInceptionV3('inception-v3-compat', ['2048'], feature_extractor_weights_path=path)
            logger.info('FID: Inception-v3 from torch-fidelity (weights %s)', path or 'torch.hub cache')
            return InceptionFeatures(net, returns_tuple=True)
        except (OSError, RuntimeError) as e:  # URLError (offline) is an OSError; a bad state dict a RuntimeError
            tried.append(f'torch-fidelity ({type(e).__name__}: {e})')
    raise UserError('no FID Inception-v3 network found. Tried:\n  ' + '\n  '.join(tried) + '\nPlace the TorchScript '
                    f'{INCEPTION_TORCHSCRIPT} (as distributed by NVlabs / clean-fid) at {cached} or pass its path, '
                    'install the optional GPU extra (torch-fidelity) with its weights cached, or run with --skip_fid.')
