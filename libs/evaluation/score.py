"""Scoring: every metric of a run folder, computed from its records and faces by libs.metrics (conventions in
docs/metrics.md): FID on Inception-v3 pool features kept per pair, BLEU in two conventions, Dist-n, emotion accuracy
and macro-F1, and the face expression read by an independent pre-trained classifier (libs.face_expression)."""
import glob
import math
import os

import numpy as np
import torch

from libs import metrics
from libs.avamerg import EMOTIONS_32, coarse_index
from libs.errors import UserError
from libs.io import atomic_save_safetensors, read_rgb

FID_FEATURES, FID_PART = 'fid_features.safetensors', 'fid_features.rank{}.safetensors'
ROLES = ('generated', 'gold', 'speaker')  # whose face the expression classifier reads
NO_CLASSIFIER = 'none'  # config.eval.expression_classifier: the metric is off
DEFAULT_CLASSIFIER = 'default'  # ... libs.face_expression's own classifier; any other value is a path


def uint8_batch(images):
    """PIL images -> (N, 3, H, W) uint8, the input of the FID Inception network."""
    return torch.stack([torch.from_numpy(np.array(im.convert('RGB'))).permute(2, 0, 1) for im in images])


@torch.no_grad()
def write_fid_features(inception, source, out, records, batches, device, rank):
    """Inception pool features of the generated and of the reference faces of this process's pairs, saved per pair
    (fid_features.rank<r>.safetensors), so that FID can be bootstrapped over pairs and compared between runs."""
    indices, gen, ref = [], [], []
    for batch in batches:
        generated = [read_rgb(os.path.join(out, records[i]['face'])) for i in batch]
        gen.append(inception(uint8_batch(generated).to(device)).double().cpu())
        ref.append(inception(uint8_batch([source.face(i, 'response') for i in batch]).to(device)).double().cpu())
        indices += batch
    dim = metrics.INCEPTION_POOL_DIM
    atomic_save_safetensors(dict(index=torch.tensor(indices, dtype=torch.int64),
                                 generated=torch.cat(gen) if gen else torch.zeros(0, dim, dtype=torch.float64),
                                 reference=torch.cat(ref) if ref else torch.zeros(0, dim, dtype=torch.float64)),
                            os.path.join(out, FID_PART.format(rank)))


def remove_fid_parts(out):
    """Delete per-process feature files a stopped run left (a rerun with fewer processes would merge them)."""
    for path in glob.glob(os.path.join(out, FID_PART.format('*'))):
        os.remove(path)


def merge_fid_features(out):
    """Merge the per-process feature files into fid_features.safetensors (rows in pair order); returns its tensors."""
    from safetensors.torch import load_file
    parts = [load_file(p) for p in sorted(glob.glob(os.path.join(out, FID_PART.format('*'))))]
    index = torch.cat([p['index'] for p in parts])
    order = index.argsort()
    merged = {k: torch.cat([p[k] for p in parts])[order] for k in ('index', 'generated', 'reference')}
    atomic_save_safetensors(merged, os.path.join(out, FID_FEATURES))
    remove_fid_parts(out)
    return merged


def read_fid_features(out):
    """The run folder's per-pair Inception features {'index', 'generated', 'reference'}, or None if FID was skipped."""
    from safetensors.torch import load_file
    path = os.path.join(out, FID_FEATURES)
    return load_file(path) if os.path.isfile(path) else None


def fid(features):
    """FID of the generated against the reference faces from the per-pair features (metrics.frechet_distance)."""
    stats = []
    for key in ('generated', 'reference'):
        s = metrics.FeatureStats(features[key].shape[1])
        s.update(features[key])
        stats.append(s.mean_cov())
    return metrics.frechet_distance(*stats[0], *stats[1])


# ---------------------------------------------------------------- face expression ------------------------------------
def load_expression_classifier(setting, device):
    """The independent face-expression classifier named by config.eval.expression_classifier, or None if 'none'."""
    if setting == NO_CLASSIFIER:
        return None
    try:
        from libs import face_expression
    except ImportError as err:
        raise UserError(f'the face-expression metric needs libs/face_expression.py ({err}); update the code, or set '
                        f'--config.eval.expression_classifier={NO_CLASSIFIER} to skip it') from None
    return face_expression.load_expression_classifier(None if setting == DEFAULT_CLASSIFIER else setting,
                                                      device=device)


@torch.no_grad()
def read_expressions(classifier, source, out, records, batch_size):
    """{index: {'generated', 'gold', 'speaker'}}: the classifier's label for each pair's three faces."""
    reads = {}
    indices = sorted(records)
    for start in range(0, len(indices), batch_size):
        batch = indices[start:start + batch_size]
        faces = dict(generated=[read_rgb(os.path.join(out, records[i]['face'])) for i in batch],
                     gold=[source.face(i, 'response') for i in batch],
                     speaker=[source.face(i, 'speaker') for i in batch])
        labels = {role: [classifier.labels[k] for k in classifier(faces[role]).argmax(1).tolist()] for role in ROLES}
        for j, i in enumerate(batch):
            reads[i] = {role: labels[role][j] for role in ROLES}
    return reads


def expression_agreement(records):
    """How often the generated face's expression matches the gold response face's and the speaker face's, and how
    often the gold listener matches the speaker (whether real listeners mirror); None without expression reads."""
    reads = [r['expression'] for r in records if r.get('expression')]
    if not reads:
        return None
    rate = lambda a, b: sum(x[a] == x[b] for x in reads) / len(reads)  # noqa: E731
    return dict(n=len(reads), generated_vs_gold=rate('generated', 'gold'),
                generated_vs_speaker=rate('generated', 'speaker'), gold_vs_speaker=rate('gold', 'speaker'))


# ---------------------------------------------------------------- records -> metrics ---------------------------------
def finite(obj):
    """Replace NaN (e.g. accuracy with no labelled pair) by None, recursively, so metrics.json stays valid JSON."""
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    return None if isinstance(obj, float) and math.isnan(obj) else obj


def gold_counts(records):
    """How many of the records have a gold response, a gold emotion word, and a label among the 32."""
    return dict(pairs=len(records), response=sum(r['reference'] is not None for r in records),
                emotion_word=sum(r['gold_emotion'] is not None for r in records),
                label=sum(r['gold_label'] >= 0 for r in records))


def per_response_dist():
    """libs.metrics.distinct_n_per_response (the mean of each response's Dist-n), where the metrics code has it."""
    return getattr(metrics, 'distinct_n_per_response', None)


def score(records):
    """BLEU (both conventions) over the pairs with a gold response, Dist-1/2 over every generated utterance, emotion
    accuracy / macro-F1 (32- and 7-way) over the pairs labelled with one of the 32 emotions that have a prediction
    (a baseline without an emotion head predicts none), and the expression agreement rates; None where no pair has
    what a metric needs."""
    hyps = [r['generated'] for r in records]
    out = dict(dist1=metrics.distinct_n(hyps, 1), dist2=metrics.distinct_n(hyps, 2))
    per_response = per_response_dist()
    if per_response is not None:
        out.update(dist1_per_response=per_response(hyps, 1), dist2_per_response=per_response(hyps, 2))
    gold = [r for r in records if r['reference'] is not None]
    out['bleu_pairs'] = len(gold)
    if gold:
        hyps, refs = [r['generated'] for r in gold], [r['reference'] for r in gold]
        out.update(metrics.corpus_bleu_n(hyps, refs), sacrebleu=metrics.sacrebleu_score(hyps, refs),
                   sentence_bleu=metrics.sentence_bleu_n(hyps, refs))
    else:
        out.update({f'bleu{n}': None for n in range(1, 5)}, sacrebleu=None, sentence_bleu=None)
    table = [coarse_index(i) for i in range(len(EMOTIONS_32))]
    predicted = [r for r in records if r['pred_label'] is not None]
    emotion = metrics.emotion_report([r['pred_label'] for r in predicted], [r['gold_label'] for r in predicted], table)
    if emotion['n'] == 0:  # every rate would be 0 / 0
        emotion = dict(emotion, **{k: None for k in emotion if k != 'n'})
    out['emotion'] = emotion
    out['expression'] = expression_agreement(records)
    return out


def not_computed(gold, fid_note, fid_value, records=None, expression_note=None):
    """{metric: why it was not computed} for FID, BLEU, the emotion metrics and the expression metric."""
    reasons = {} if fid_value is not None else {'fid': fid_note}
    if gold['response'] == 0:
        reasons['bleu'] = 'no pair has a gold response'
    if records is not None and all(r['pred_label'] is None for r in records):
        reasons['emotion'] = 'this response source predicts no emotion'
    elif gold['label'] == 0:
        reasons['emotion'] = 'no pair has a gold emotion label among the 32' + (
            f' ({gold["emotion_word"]} have emotion words outside them)' if gold['emotion_word'] else '')
    if expression_note:
        reasons['expression'] = expression_note
    return reasons
