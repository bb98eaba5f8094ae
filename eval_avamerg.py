"""Evaluate EmpathDiffuser on an AvaMERG split: every speaker turn -> an `empath` response (face + utterance) and a
predicted emotion, scored with FID, BLEU (sacreBLEU and sentence-averaged), Dist-1/2 and emotion accuracy / macro-F1
(DESIGN §5), for one sampling setting or a sweep over guidance scales and step counts.

    python eval_avamerg.py --config=configs/avamerg_empath.py --nnet_path=workdir/avamerg_empath/nnet_ema.safetensors \
        --features=features/avamerg_512/test --output_path=out/eval
    python eval_avamerg.py --config=... --scales=1,3,5,7 --steps=10,20,50 --output_path=out/sweep
    accelerate launch --multi_gpu --num_processes 8 eval_avamerg.py --config=...   # same numbers, split 8 ways

Pair p draws all its noise from a generator seeded by (config.seed, p's pair_id = split/conversation/turn), whatever
its position, the --limit, the sweep setting or the process, and the batches are a fixed grid over the pairs dealt
round-robin to the processes, so responses do not depend on the number of processes. A process saves a batch's faces,
then appends its records to pairs.rank<r>.jsonl (fsynced); a rerun merges these into pairs.jsonl and generates only the
missing pairs. Also written: faces/<split>_<conversation_id>_<turn_id>.png, metrics.json, report.md,
confusion_{32,7}.png, grid.png (speaker | generated | reference) and settings.json (the resume guard). A sweep writes
one such folder per setting (scale<s>_steps<n>/, each generated and scored exactly as a single-setting run with
--config.sample.scale=<s> --config.sample.sample_steps=<n>, and resumable by itself) and beside them sweep.json,
sweep.md (the table), sweep.png and sweep_nfe.png (the metrics against the scale and against NFE).

Pairs without a gold response or label (a test split released without them) are generated like the others; a metric
that needs gold is computed over the pairs that have it (the report says how many), or reported as not computable.

The output folder is locked while an evaluation runs in it; a network whose speaker segment is untrained (e.g. an
official UniDiffuser checkpoint) is refused unless ``--allow_untrained_condition`` is given.
"""
import dataclasses
import glob
import io
import itertools
import json
import logging
import math
import os
import re
import time

import numpy as np
import torch
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from libs import avamerg, cli, config_check, figures, logs, memory, metrics, modes, precision, runlock
from libs.avamerg import COARSE_7, EMOTIONS_32, coarse_index, label_index
from libs.errors import UserError
from libs.features import FeatureDataset, derive_seed
from libs.io import atomic_write_bytes, atomic_write_json, read_rgb, writing

logger = logging.getLogger(__name__)

RECORDS, SETTINGS, PART = 'pairs.jsonl', 'settings.json', 'pairs.rank{}.jsonl'
SWEEP = 'sweep'  # sweep.json, sweep.md, sweep.png and sweep_nfe.png beside the setting folders
GRID_ROWS = 8  # pairs shown in grid.png
TIMING = ('seconds',)  # the record fields that are measurements of this machine, not results
# The columns of the sweep table: (key in a sweep row, heading); SWEEP_FIGURE: the panels of the figures.
SWEEP_COLUMNS = (('fid', 'FID'), ('bleu1', 'BLEU-1'), ('bleu2', 'BLEU-2'), ('bleu3', 'BLEU-3'), ('bleu4', 'BLEU-4'),
                 ('sentence_bleu1', 'sent. BLEU-1'), ('sentence_bleu2', 'sent. BLEU-2'),
                 ('sentence_bleu3', 'sent. BLEU-3'), ('sentence_bleu4', 'sent. BLEU-4'), ('dist1', 'Dist-1'),
                 ('dist2', 'Dist-2'), ('fine_acc', 'emotion acc. 32'), ('coarse_acc', 'emotion acc. 7'),
                 ('seconds_per_pair', 's / pair'))
# The emotion head reads the speaker path only, so its numbers do not change over a sweep: they stay in the table.
SWEEP_FIGURE = ('fid', 'bleu4', 'sentence_bleu4', 'dist1', 'dist2', 'seconds_per_pair')
BLEU_NOTE = ('BLEU-n: sacreBLEU corpus BLEU with max_ngram_order=n on the raw strings (BLEU-4 is the standard '
             'sacreBLEU score); sentence BLEU-n: the mean over pairs of nltk sentence_bleu (weights 1/n, method1 '
             'smoothing) on lower-cased nltk word tokens, the averaged BLEU of empathetic-dialogue papers')
NFE_NOTE = ('NFE: U-ViT forward passes per response (counted); each pass evaluates all guidance branches of the '
            'batch in one batched forward')


def pair_identity(split, conversation_id, turn_id):
    """'{split}/{conversation_id}/{turn_id}' of a feature cache's pair, the identity libs.avamerg.Pair.pair_id is."""
    return f'{split}/{conversation_id}/{turn_id}'


def location(ref):
    """A weights reference as settings record it: an hf:// reference as written, a local path made absolute."""
    from libs.hub import HF_PREFIX
    return ref if ref.startswith(HF_PREFIX) else os.path.abspath(ref)


def face_name(pair_id):
    """The file name of a pair's generated face: its pair_id with anything but word characters, '.' and '-' as '_'."""
    return re.sub(r'[^\w.-]', '_', pair_id) + '.png'


@dataclasses.dataclass
class PairContext(modes.Context):
    """A sampling context whose noise row b comes from pair b's own generator, whatever batch the pair is in."""
    generators: tuple = ()

    def randn(self, *shape):
        """Gaussian noise of shape (B, ...) whose row b is drawn from generators[b]."""
        if shape[0] != len(self.generators):
            raise ValueError(f'noise for {shape[0]} rows but {len(self.generators)} pair generators')
        # Drawn on the CPU, so a pair's noise is also the same on every device.
        return torch.stack([torch.randn(shape[1:], generator=g) for g in self.generators]).to(self.device)


def frame(reader, stem, resolution):
    """An AvaMERG face centre-cropped and resized as the generated faces are (the official preprocessing)."""
    from libs.autoencoder import center_crop_resize
    return center_crop_resize(reader.load_face(stem), resolution)


class RawSource:
    """Speaker turns encoded from the AvaMERG frames and texts under config.data.root."""

    def __init__(self, comp, config, split):
        if not config.data.get('root'):
            raise UserError('config.data.root is not set: point it at the AvaMERG folder (--config.data.root=...) '
                            'or pass --features with an extracted feature cache')
        self.comp, self.root = comp, config.data.root
        self.reader = avamerg.from_config(config.data, split, history_tokens=comp.clip_text.max_length,
                                          count_tokens=comp.clip_text.count_tokens)
        # reference / gold_emotion None: no gold response / label (gold_label is -1 then, and for unknown words).
        self.pairs = [dict(pair_id=p.pair_id, split=p.split,
                           conversation_id=p.conversation_id, turn_id=p.turn_id, speaker_stem=p.speaker_stem,
                           response_stem=p.response_stem, speaker_text=p.speaker_text, reference=p.response_text,
                           gold_emotion=p.emotion, gold_label=p.label) for p in self.reader.pairs]

    @torch.no_grad()
    def speaker(self, indices):
        """VAE moments (B, 2C, h, w) on the CPU, CLIP image embeddings (B, 1, Dc), reduced texts (B, T, Dt)."""
        from libs.autoencoder import to_tensor_m11
        from libs.pipeline import encode_prompts
        crops = [self.face(i, 'speaker') for i in indices]
        pixels = torch.stack([to_tensor_m11(c) for c in crops]).to(self.comp.device)
        moments = self.comp.autoencoder.encode_moments(pixels).float().cpu()
        clip_img = self.comp.clip_img.encode(crops).to(self.comp.device).float()
        return moments, clip_img, encode_prompts(self.comp, [self.pairs[i]['speaker_text'] for i in indices])

    def face(self, i, role):
        """The 'speaker' or reference 'response' face of pair i, centre-cropped to the generated resolution."""
        return frame(self.reader, self.pairs[i][f'{role}_stem'], self.comp.resolution)


class FeatureSource:
    """Speaker turns from a feature cache (extract_features.py); faces from the frames when config.data.root is set."""

    def __init__(self, comp, config, split, folder):
        self.comp, self.root, self.data = comp, folder, FeatureDataset(folder)
        made_for = self.data.manifest.get('split')
        if made_for not in (None, split):
            raise UserError(f'{folder} holds features of the {made_for} split, not of --split={split}')
        self.pairs = []
        for shard in self.data.shards:  # the per-shard metadata, without reading any tensor
            with open(os.path.join(folder, shard['name'] + '.json'), encoding='utf-8') as f:
                # A pair without gold has response_text_raw / emotion None there.
                self.pairs += [dict(pair_id=pair_identity(m['split'], m['conversation_id'], m['turn_id']),
                                    split=m['split'], conversation_id=m['conversation_id'], turn_id=m['turn_id'],
                                    speaker_stem=m['speaker_stem'], response_stem=m['response_stem'],
                                    speaker_text=m['speaker_text_raw'], reference=m['response_text_raw'],
                                    gold_emotion=m['emotion'],
                                    gold_label=-1 if m['emotion'] is None else label_index(m['emotion']))
                               for m in json.load(f)]
        root = config.data.get('root')
        self.reader = avamerg.from_config(config.data, split) if root and os.path.isdir(root) else None
        self.missing_root = root if root and self.reader is None else None

    @torch.no_grad()
    def speaker(self, indices):
        """Like RawSource.speaker, from the cached moments, CLIP embeddings and CLIP text states."""
        items = [self.data[i] for i in indices]
        stack = lambda key: torch.stack([item[key] for item in items]).float()  # noqa: E731
        text = self.comp.caption_decoder.encode_prefix(stack('speaker_text').to(self.comp.device))
        return stack('speaker_moments'), stack('speaker_clip_img').to(self.comp.device), text

    def face(self, i, role):
        """The face of pair i from the frames, or else the VAE reconstruction of its cached moments."""
        if self.reader is not None:
            return frame(self.reader, self.pairs[i][f'{role}_stem'], self.comp.resolution)
        # No frames: show what the model saw, the VAE reconstruction of the posterior mean.
        from libs.pipeline import decode_images
        mean = self.data[i][f'{role}_moments'][None].float().to(self.comp.device).chunk(2, dim=1)[0]
        return decode_images(self.comp, self.comp.autoencoder.scale_factor * mean)[0]


# ---------------------------------------------------------------------------------------------------------------------
# Generation, records and resuming
# ---------------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def generate_batch(comp, base, source, pairs, indices, seed):
    """Faces, utterances, emotion probabilities (B, 32) and the batch size of every U-ViT forward, for pairs `indices`.

    Pair i's noise comes from a generator seeded by (seed, pair_id), so it does not depend on the batch either.
    """
    from libs import pipeline
    gens = tuple(torch.Generator().manual_seed(derive_seed('eval', seed, pairs[i]['pair_id'])) for i in indices)
    ctx = PairContext(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, generators=gens)
    moments, clip_img, text = source.speaker(indices)
    # A posterior sample of the speaker latent, as in training, drawn first from each pair's generator.
    z = torch.cat([comp.autoencoder.sample(m[None], generator=g) for m, g in zip(moments, gens)]).to(comp.device)
    inputs = pipeline.speaker_inputs(comp, ctx, len(indices), z, clip_img, text)
    # Counted, not derived from the sampler: the number of forwards is the NFE, their batch / B the guidance branches.
    passes = []
    hook = comp.nnet.register_forward_pre_hook(lambda module, args: passes.append(args[0].shape[0]))
    try:
        out = modes.get_mode('empath')(ctx, inputs)
    finally:
        hook.remove()
    return (pipeline.decode_images(comp, out['z']), pipeline.decode_texts(comp, out['text']), out['emotion'].cpu(),
            passes)


def write_batch(out, rank, pairs, indices, images, texts, probs, passes, seconds):
    """Save the faces, then append the pairs' records to this process's JSONL (flushed and fsynced)."""
    from libs.pipeline import top_emotions
    lines = []
    nfe, branches = len(passes), max(passes) // len(indices)
    for i, image, text, p, top3 in zip(indices, images, texts, probs, top_emotions(probs, list(EMOTIONS_32))):
        face = f'faces/{face_name(pairs[i]["pair_id"])}'
        png = io.BytesIO()
        image.save(png, format='PNG')
        atomic_write_bytes(os.path.join(out, face), png.getvalue())
        pred = int(p.argmax())
        lines.append(json.dumps(dict(index=i, **pairs[i], generated=text, face=face, pred_label=pred,
                                     pred_emotion=EMOTIONS_32[pred], top3=top3, nfe=nfe, branches=branches,
                                     seconds=round(seconds / len(indices), 4)), ensure_ascii=False) + '\n')
    part = os.path.join(out, PART.format(rank))
    with writing(part), open(part, 'a', encoding='utf-8') as f:
        f.write(''.join(lines))
        f.flush()
        os.fsync(f.fileno())


def read_records(out):
    """Finished pairs by index from pairs.jsonl and the per-process files; a torn line (killed mid-write) is skipped."""
    records = {}
    for path in [os.path.join(out, RECORDS)] + sorted(glob.glob(os.path.join(out, PART.format('*')))):
        if os.path.isfile(path):
            with open(path, encoding='utf-8') as f:
                for line in f:
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        logger.warning('%s: skipping a torn line (an interrupted write)', path)
                        continue
                    records[record['index']] = record
    return records


def merge_records(out, records):
    """Rewrite pairs.jsonl atomically from `records` (sorted by index) and remove the per-process files."""
    text = ''.join(json.dumps(records[i], ensure_ascii=False) + '\n' for i in sorted(records))
    atomic_write_bytes(os.path.join(out, RECORDS), text.encode('utf-8'))
    for path in glob.glob(os.path.join(out, PART.format('*'))):
        os.remove(path)


def check_resumable(out, settings, records, pairs):
    """Refuse an output folder whose settings or pairs differ from this run's (resuming would mix them)."""
    path, old = os.path.join(out, SETTINGS), settings
    if os.path.isfile(path):
        with open(path, encoding='utf-8') as f:
            old = json.load(f)
    changed = [f'{k}: {old.get(k)!r} there, {settings.get(k)!r} now' for k in sorted({*old, *settings})
               if old.get(k) != settings.get(k)]
    changed += [f'pair {i} is {r.get("pair_id")} there, {pairs[i]["pair_id"]} now' for i, r in sorted(records.items())
                if i < len(pairs) and r.get('pair_id') != pairs[i]['pair_id']][:3]
    if changed:
        raise UserError(f'{out} holds an evaluation made with other settings or data ({"; ".join(changed)}); '
                        'choose another --output_path or delete that folder')


# ---------------------------------------------------------------------------------------------------------------------
# Metrics and reports
# ---------------------------------------------------------------------------------------------------------------------

def uint8_batch(images):
    """PIL images -> (N, 3, H, W) uint8, the input of the FID Inception network."""
    return torch.stack([torch.from_numpy(np.array(im.convert('RGB'))).permute(2, 0, 1) for im in images])


@torch.no_grad()
def fid_stats(inception, source, out, records, batches, device):
    """Inception statistics of the generated and of the reference faces of the given batches of pair indices."""
    gen, ref = (metrics.FeatureStats(metrics.INCEPTION_POOL_DIM, device) for _ in range(2))
    for indices in batches:
        generated = [read_rgb(os.path.join(out, records[i]['face'])) for i in indices]
        gen.update(inception(uint8_batch(generated).to(device)))
        ref.update(inception(uint8_batch([source.face(i, 'response') for i in indices]).to(device)))
    return gen, ref


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


def score(records):
    """BLEU (both conventions) over the pairs with a gold response, Dist-1/2 over every generated utterance, and
    emotion accuracy / macro-F1 (32- and 7-way) over the pairs labelled with one of the 32 emotions; None where no
    pair has the gold a metric needs."""
    hyps = [r['generated'] for r in records]
    out = dict(dist1=metrics.distinct_n(hyps, 1), dist2=metrics.distinct_n(hyps, 2))
    gold = [r for r in records if r['reference'] is not None]
    out['bleu_pairs'] = len(gold)
    if gold:
        hyps, refs = [r['generated'] for r in gold], [r['reference'] for r in gold]
        out.update(metrics.corpus_bleu_n(hyps, refs), sacrebleu=metrics.sacrebleu_score(hyps, refs),
                   sentence_bleu=metrics.sentence_bleu_n(hyps, refs))
    else:
        out.update({f'bleu{n}': None for n in range(1, 5)}, sacrebleu=None, sentence_bleu=None)
    table = [coarse_index(i) for i in range(len(EMOTIONS_32))]
    emotion = metrics.emotion_report([r['pred_label'] for r in records], [r['gold_label'] for r in records], table)
    if emotion['n'] == 0:  # every rate would be 0 / 0
        emotion = dict(emotion, **{k: None for k in emotion if k != 'n'})
    out['emotion'] = emotion
    return out


def not_computed(gold, fid_note, fid):
    """{metric: why it was not computed} for FID, BLEU and the emotion metrics."""
    reasons = {} if fid is not None else {'fid': fid_note}
    if gold['response'] == 0:
        reasons['bleu'] = 'no pair has a gold response'
    if gold['label'] == 0:
        reasons['emotion'] = 'no pair has a gold emotion label among the 32' + (
            f' ({gold["emotion_word"]} have emotion words outside them)' if gold['emotion_word'] else '')
    return reasons


def write_figures(out, source, records):
    """The 32- and 7-way confusion matrices (of the labelled pairs, if any) and grid.png of the first pairs."""
    pred, gold = [r['pred_label'] for r in records], [r['gold_label'] for r in records]
    if any(g >= 0 for g in gold):
        for labels, p, g in ((EMOTIONS_32, pred, gold), (COARSE_7, [coarse_index(x) for x in pred],
                                                         [coarse_index(x) for x in gold])):
            matrix = metrics.confusion_matrix(p, g, len(labels))
            title = f'speaker emotion, {len(labels)}-way ({int(matrix.sum())} labelled pairs)'
            path = os.path.join(out, f'confusion_{len(labels)}.png')
            figures.to_png(figures.confusion(matrix, list(labels), title), path)
    from libs.pipeline import make_grid
    faces = [face for r in records[:GRID_ROWS] for face in (
        source.face(r['index'], 'speaker'), read_rgb(os.path.join(out, r['face'])), source.face(r['index'], 'response'))]
    make_grid(faces, nrow=3).save(os.path.join(out, 'grid.png'))


def fmt(value, digits=4):
    """A number for reports: `digits` significant digits; None (not computed) as 'n/a'."""
    if value is None:
        return 'n/a'
    return str(value) if isinstance(value, int) else f'{value:.{digits}g}'


def guidance_text(summary):
    """The guidance rule and its scale(s), as the report states them."""
    if summary['speaker_guidance'] == 'two_scale':
        return f'two_scale, scale_text {fmt(summary["scale_text"])}, scale_face {fmt(summary["scale_face"])}'
    return f'{summary["speaker_guidance"]}, scale {fmt(summary["guidance_scale"])}'


def write_report(out, summary):
    """metrics.json and report.md, both stating the checkpoint, sampling settings, sample count and what was scored."""
    atomic_write_json(os.path.join(out, 'metrics.json'), summary)
    m, e, g = summary['metrics'], summary['metrics']['emotion'], summary['gold']
    sent = m['sentence_bleu'] or {}
    bleu = ' / '.join(fmt(m[f'bleu{n}']) for n in range(1, 5))
    lines = [
        '# EmpathDiffuser on AvaMERG', '',
        f'- checkpoint: {summary["checkpoint"]}',
        f'- split: {summary["split"]} ({summary["source"]})',
        f'- samples: {summary["samples"]} pairs; {g["response"]} with a gold response, {g["label"]} with a gold '
        'label among the 32 emotions',
        f'- guidance: {guidance_text(summary)}',
        f'- sampler: {summary["sampler"]} ({summary["skip_type"]}), {summary["sample_steps"]} steps, NFE '
        f'{summary["nfe"]} with {summary["guidance_branches"]} guidance branches per forward ({NFE_NOTE})',
        f'- seconds per pair: {fmt(summary["seconds_per_pair"])} (generation: speaker encoding, sampling and decoding, '
        f'batches of {summary["run"]["batch_size"]} on {summary["run"]["device"]})',
        f'- seed: {summary["seed"]}; autocast: {summary["autocast"]}'
        + (f' (config.sample.precision={summary["precision"]})' if summary['precision'] else '')
        + f'; caption decoder: {summary["caption_decoder"]}',
        '', '## Metrics', '',
        f'- FID: {fmt(m["fid"])} ({summary["fid_note"]})',
        f'- BLEU-1 / 2 / 3 / 4, sacreBLEU corpus BLEU (BLEU-n with max_ngram_order=n; `'
        f'{(m["sacrebleu"] or {}).get("signature", "n/a")}`), {m["bleu_pairs"]} pairs: {bleu}',
        f'- BLEU-1 / 2 / 3 / 4, sentence-averaged (nltk sentence_bleu, weights 1/n, method1 smoothing, lower-cased '
        f'nltk word tokens; the convention of empathetic-dialogue papers), {m["bleu_pairs"]} pairs: '
        + ' / '.join(fmt(sent.get(f'bleu{n}')) for n in range(1, 5)),
        f'- Dist-1 / Dist-2 (distinct n-grams of all {summary["samples"]} generated utterances x100, nltk word '
        f'tokens; the AvaMERG paper\'s text metric): {fmt(m["dist1"])} / {fmt(m["dist2"])}',
        f'- emotion ({e["n"]} labelled pairs): 32-way accuracy {fmt(e["fine_acc"])}, macro-F1 '
        f'{fmt(e["fine_macro_f1"])}; 7-way accuracy {fmt(e["coarse_acc"])}, macro-F1 {fmt(e["coarse_macro_f1"])}']
    lines += [f'- not computed: {k}: {why}' for k, why in summary['not_computed'].items() if k != 'fid']
    atomic_write_bytes(os.path.join(out, 'report.md'), ('\n'.join(lines) + '\n').encode('utf-8'))


def single(values):
    """The one value of a collection of equal values, or all of them sorted if they differ."""
    values = sorted(set(values))
    return values[0] if len(values) == 1 else values


# ---------------------------------------------------------------------------------------------------------------------
# One setting, a sweep of settings
# ---------------------------------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Evaluation:
    """What every setting of a run shares: the processes, the networks, the speaker turns and the FID network."""
    acc: object
    comp: object
    source: object
    pairs: list
    inception: object
    inception_path: str
    nnet_path: str
    split: str
    batch_size: int


def prepare(config, output_path, nnet_path=None, split='test', features=None, limit=None, skip_fid=False,
            batch_size=8, allow_untrained_condition=False):
    """Lock output_path, load the networks and the split's speaker turns once for every setting (FID's network unless
    skip_fid); called inside a ``@runlock.scope`` function, which holds the lock until it returns."""
    from accelerate import Accelerator
    from libs import hub, pipeline
    config_check.check(config, 'model', 'sample')
    if batch_size < 1 or (limit is not None and limit < 1):
        raise UserError(f'--batch_size={batch_size} and --limit={limit} must be at least 1')
    what = f'evaluating {hub.nnet_ref(config, nnet_path)}'
    pipeline.check_speaker_network(what, config, nnet_path, fetched=False)  # before anything is fetched
    hub.preflight(config, pipeline.needed_parts(need_text=features is None), nnet_path)
    acc = Accelerator()
    memory.check_evaluation(config, acc.device, batch_size, raw=features is None)  # CUDA: refuse what would not fit
    inception_path = config.get('eval', {}).get('inception_path') or None
    # Before loading anything: FID needs the standard Inception network, or an explicit --skip_fid.
    inception = None if skip_fid else metrics.load_inception(inception_path).to(acc.device)
    runlock.take(output_path, 'evaluation')
    comp = pipeline.load_components(config, acc.device, nnet_path, need_text=features is None, speaker_for=what)
    nnet_path = comp.nnet_path
    pipeline.check_condition_trained(comp.nnet, what, allow_untrained_condition)
    source = FeatureSource(comp, config, split, features) if features else RawSource(comp, config, split)
    if source.reader is None:
        if inception is not None:
            where = (f'config.data.root={source.missing_root} does not exist' if source.missing_root else
                     'config.data.root is not set')
            raise UserError(f'FID compares the generated faces with the reference frames, and there are none ({where})'
                            ': set config.data.root to the AvaMERG folder, or pass --skip_fid')
        logger.info('no AvaMERG frames: grid.png shows the VAE reconstructions of the cached faces')
    pairs = source.pairs[:limit]
    if not pairs:
        raise UserError(f'{source.root}: the {split} split has no pairs')
    return Evaluation(acc, comp, source, pairs, inception, inception_path, nnet_path, split, batch_size)


def run_settings(ev, config, ctx):
    """What settings.json records and a resumed run must share: weights, data, sampling, seed, precision, decoder."""
    guidance = dict(speaker_guidance=ctx.speaker_guidance, guidance_scale=None, scale_text=None, scale_face=None)
    if ctx.speaker_guidance == 'two_scale':
        guidance.update(scale_text=float(ctx.scale_text), scale_face=float(ctx.scale_face))
    else:
        guidance.update(guidance_scale=float(ctx.scale))
    return dict(checkpoint=location(ev.nnet_path), split=ev.split, source=os.path.abspath(ev.source.root),
                caption_decoder=location(config.caption_decoder.pretrained_path), **guidance,
                sample_steps=int(ctx.steps), sampler=config.sample.sampler, skip_type=config.sample.skip_type,
                seed=config.seed, precision=config.sample.precision,  # the setting ('auto', ...)
                autocast=precision.name_of(ctx.autocast_dtype))  # what ran


def evaluate_setting(ev, config, out):
    """Generate the missing responses of one sampling setting (config.sample) into `out`, then score every pair.

    Returns metrics.json's dict on the main process, None on the others.
    """
    from libs import pipeline
    acc, pairs, started = ev.acc, ev.pairs, time.time()
    comp = dataclasses.replace(ev.comp, config=config)  # the same networks, sampled with this setting's config
    base = pipeline.make_context(comp, None)
    settings = run_settings(ev, config, base)
    os.makedirs(os.path.join(out, 'faces'), exist_ok=True)
    check_resumable(out, settings, read_records(out), pairs)
    acc.wait_for_everyone()
    if acc.is_main_process:
        atomic_write_json(os.path.join(out, SETTINGS), settings)
        merge_records(out, read_records(out))  # also drops torn lines before anyone appends again
    acc.wait_for_everyone()

    done = read_records(out)
    batches = [list(range(s, min(s + ev.batch_size, len(pairs)))) for s in range(0, len(pairs), ev.batch_size)]
    mine = batches[acc.process_index::acc.num_processes]
    generated = 0
    bar = tqdm(total=sum(len(b) for b in mine), initial=sum(i in done for b in mine for i in b), unit='pair',
               desc=f'eval {os.path.basename(os.path.normpath(out))}', dynamic_ncols=True,
               disable=not acc.is_main_process)
    for indices in mine:
        todo = [i for i in indices if i not in done]
        if todo:  # a partly finished batch is completed as a smaller one (floating-point results may differ slightly)
            tic = time.perf_counter()
            result = generate_batch(comp, base, ev.source, pairs, todo, config.seed)
            write_batch(out, acc.process_index, pairs, todo, *result, time.perf_counter() - tic)
            generated += len(todo)
            bar.update(len(todo))
    bar.close()
    acc.wait_for_everyone()

    records = read_records(out)
    if ev.inception is not None:
        gen, ref = fid_stats(ev.inception, ev.source, out, records, mine, acc.device)
        gen.gather(acc)
        ref.gather(acc)
    generated = int(acc.gather(torch.tensor([generated], device=acc.device)).sum())
    if not acc.is_main_process:
        return None
    merge_records(out, records)
    selected = [records[i] for i in range(len(pairs))]
    fid, note = None, '--skip_fid given: FID was not computed'
    if ev.inception is not None:
        fid = metrics.frechet_distance(*gen.mean_cov(), *ref.mean_cov())
        note = f'{len(pairs)} generated vs reference faces, Inception-v3 ({ev.inception_path or "torch.hub cache"})'
        if len(pairs) <= metrics.INCEPTION_POOL_DIM:  # a rank-deficient covariance: FID is biased and unstable
            note += f'; unreliable with fewer samples than its {metrics.INCEPTION_POOL_DIM} feature dimensions'
    gold = gold_counts(selected)
    summary = dict(settings, samples=len(pairs), nfe=single(r['nfe'] for r in selected),
                   guidance_branches=single(r['branches'] for r in selected),
                   seconds_per_pair=round(float(np.mean([r['seconds'] for r in selected])), 4), gold=gold,
                   fid_computed=fid is not None, fid_note=note, not_computed=not_computed(gold, note, fid),
                   metrics=finite(dict(fid=fid, **score(selected))),
                   run=dict(processes=acc.num_processes, generated=generated, resumed=len(pairs) - generated,
                            batch_size=ev.batch_size, seconds=round(time.time() - started, 1), device=str(acc.device)))
    write_figures(out, ev.source, selected)
    write_report(out, summary)
    return summary


@runlock.scope
def evaluate(config, nnet_path=None, split='test', features=None, limit=None, skip_fid=False, output_path='out/eval',
             batch_size=8, allow_untrained_condition=False):
    """Evaluate the sampling setting of config.sample into output_path; returns metrics.json's dict (None off-main)."""
    ev = prepare(config, output_path, nnet_path, split, features, limit, skip_fid, batch_size,
                 allow_untrained_condition)
    return evaluate_setting(ev, config, output_path)


def sweep_configs(config, scales=None, steps=None):
    """[(folder name, config)] of every (guidance scale, step count) of a sweep, scales outermost.

    A setting's config is `config` with sample.scale and sample.sample_steps replaced, so that it is evaluated exactly
    as a single run with those two flags would be. Missing lists keep the config's value.
    """
    rule = config.sample.speaker_guidance
    if scales and rule != 'no_speaker':
        raise UserError(f'--scales sweeps config.sample.scale, which speaker_guidance={rule!r} does not use; sweep '
                        '--config.sample.scale_text / scale_face in separate runs (--steps works with any rule)')
    if any(not math.isfinite(s) or s < 0 for s in scales or ()) or any(n < 1 for n in steps or ()):
        raise UserError(f'--scales={scales} must be finite and at least 0, --steps={steps} at least 1')
    settings = []
    for scale, n in itertools.product(scales or [config.sample.scale], steps or [config.sample.sample_steps]):
        setting = config.copy_and_resolve_references()
        setting.sample.scale, setting.sample.sample_steps = float(scale), int(n)
        settings.append((f'scale{scale:g}_steps{n}' if rule == 'no_speaker' else f'steps{n}', setting))
    names = [name for name, _ in settings]
    if len(set(names)) < len(names):
        raise UserError(f'--scales={scales} --steps={steps} repeat a setting; list each value once')
    return settings


def sweep_row(name, summary):
    """One row of the sweep table: the setting, its NFE and speed, and its metrics (None where not computed)."""
    m, e = summary['metrics'], summary['metrics']['emotion']
    scale = summary['guidance_scale']
    if scale is None:  # two_scale: its two scales, fixed over the sweep
        scale = f'{summary["scale_text"]:g}/{summary["scale_face"]:g}'
    return dict(setting=name, scale=scale, steps=summary['sample_steps'], nfe=summary['nfe'],
                seconds_per_pair=summary['seconds_per_pair'], fid=m['fid'],
                **{f'bleu{n}': m[f'bleu{n}'] for n in range(1, 5)},
                **{f'sentence_bleu{n}': (m['sentence_bleu'] or {}).get(f'bleu{n}') for n in range(1, 5)},
                dist1=m['dist1'], dist2=m['dist2'], **{k: e[k] for k in ('fine_acc', 'fine_macro_f1', 'coarse_acc',
                                                                         'coarse_macro_f1')})


def sweep_table(rows):
    """The sweep as a Markdown table (one row per setting, named by its folder)."""
    columns = (('setting', 'folder'), ('scale', 'scale'), ('steps', 'steps'), ('nfe', 'NFE')) + SWEEP_COLUMNS
    lines = ['| ' + ' | '.join(title for _, title in columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(r[k] if isinstance(r[k], str) else fmt(r[k]) for k, _ in columns) + ' |'
              for r in rows]
    return '\n'.join(lines)


def write_sweep(out, rows, summaries):
    """sweep.json (rows and shared settings), sweep.md (the table), sweep.png and sweep_nfe.png (the metrics against
    the guidance scale and against NFE)."""
    first = summaries[0]
    shared = {k: first[k] for k in ('checkpoint', 'split', 'source', 'samples', 'gold', 'speaker_guidance', 'sampler',
                                    'skip_type', 'seed', 'precision', 'autocast', 'caption_decoder', 'not_computed')}
    atomic_write_json(os.path.join(out, f'{SWEEP}.json'), dict(shared, notes=[BLEU_NOTE, NFE_NOTE], rows=rows))
    g = shared['gold']
    lines = ['# EmpathDiffuser on AvaMERG: guidance scale and steps sweep', '',
             f'- checkpoint: {first["checkpoint"]}', f'- split: {first["split"]} ({first["source"]})',
             f'- samples: {first["samples"]} pairs per setting; {g["response"]} with a gold response, {g["label"]} '
             'with a gold label among the 32 emotions',
             f'- guidance: {first["speaker_guidance"]}; sampler: {first["sampler"]} ({first["skip_type"]})',
             f'- seed: {first["seed"]}; autocast: {first["autocast"]}'
             + (f' (config.sample.precision={first["precision"]})' if first['precision'] else '')
             + f'; caption decoder: {first["caption_decoder"]}',
             *[f'- not computed: {k}: {why}' for k, why in first['not_computed'].items()],
             f'- {BLEU_NOTE}', f'- {NFE_NOTE}; s / pair: seconds of generation per pair (batches of '
             f'{first["run"]["batch_size"]} on {first["run"]["device"]})', '',
             sweep_table(rows), '', 'Each setting\'s folder holds its pairs, report.md, metrics.json and figures.']
    atomic_write_bytes(os.path.join(out, f'{SWEEP}.md'), ('\n'.join(lines) + '\n').encode('utf-8'))
    labels = dict(SWEEP_COLUMNS, scale='guidance scale', nfe='NFE')
    # Against the scale (a line per step count) and against NFE (a line per scale), where each has several values.
    plots = [(x, group, name) for x, group, name in (('scale', 'steps', SWEEP), ('nfe', 'scale', f'{SWEEP}_nfe'))
             if len({r[x] for r in rows}) > 1] or [('scale', 'steps', SWEEP)]
    for x, group, name in plots:
        figures.to_png(figures.sweep(rows, SWEEP_FIGURE, x=x, group=group, labels=labels),
                       os.path.join(out, f'{name}.png'))


@runlock.scope
def evaluate_sweep(config, scales=None, steps=None, nnet_path=None, split='test', features=None, limit=None,
                   skip_fid=False, output_path='out/eval', batch_size=8, allow_untrained_condition=False):
    """Evaluate every (scale, steps) setting into output_path/<setting>/, then write the sweep table and figure.

    Every setting is evaluated exactly as `evaluate` with that config.sample.scale and sample_steps (same pairs, same
    per-pair noise, resumable by itself). Returns the table's rows on the main process, None on the others.
    """
    settings = sweep_configs(config, scales, steps)  # checked before anything is loaded
    ev = prepare(config, output_path, nnet_path, split, features, limit, skip_fid, batch_size,
                 allow_untrained_condition)
    summaries = [evaluate_setting(ev, setting, os.path.join(output_path, name)) for name, setting in settings]
    if not ev.acc.is_main_process:
        return None
    rows = [sweep_row(name, summary) for (name, _), summary in zip(settings, summaries)]
    write_sweep(output_path, rows, summaries)
    return rows


def define_flags():
    """Define the command-line flags (on demand, so importing this module defines none)."""
    config_flags.DEFINE_config_file('config', None, 'EmpathDiffuser config (e.g. configs/avamerg_empath.py)',
                                    lock_config=False)
    flags.DEFINE_string('nnet_path', None, 'U-ViT weights (.pth or .safetensors, or a train_empath.py '
                        'ckpts/<step>.ckpt folder); default: config.nnet_path')
    flags.DEFINE_enum('split', 'test', ['train', 'val', 'test'], 'AvaMERG split to evaluate')
    flags.DEFINE_string('features', None, 'feature cache of the split (extract_features.py); default: encode the '
                        'raw frames and texts under config.data.root')
    flags.DEFINE_integer('limit', None, 'evaluate only the first N pairs', lower_bound=1)
    flags.DEFINE_bool('skip_fid', False, 'do not compute FID (needed when no Inception-v3 weights are available)')
    flags.DEFINE_string('output_path', 'out/eval', 'output folder (a rerun resumes in it)')
    flags.DEFINE_integer('batch_size', 8, 'pairs per sampling batch and process (8 fits a 24 GB GPU in bf16: '
                         'docs/memory.md)', lower_bound=1)
    flags.DEFINE_list('scales', None, 'sweep these guidance scales (config.sample.scale), e.g. 1,3,5,7: one folder '
                      'per setting under --output_path, plus sweep.md / .json / .png / _nfe.png')
    flags.DEFINE_list('steps', None, 'sweep these step counts (config.sample.sample_steps), e.g. 10,20,50; with '
                      '--scales every combination')
    flags.DEFINE_bool('allow_untrained_condition', False, 'evaluate even though the network\'s speaker segment is '
                      'untrained (e.g. to score an untrained baseline: the speaker has no effect, emotions are random)')
    logs.define_flags()


def parse_list(values, kind, name):
    """--scales / --steps strings -> numbers (None stays None); a bad value is a UserError naming the flag."""
    if values is None:
        return None
    try:
        return [kind(v) for v in values]
    except ValueError:
        raise UserError(f'--{name}={",".join(values)}: expected {kind.__name__} values separated by commas') from None


def main(argv):
    """Command-line entry point: bad input exits with code 2 and a message instead of a traceback."""
    del argv
    args = flags.FLAGS
    if args.config is None:
        raise app.UsageError('--config is required, e.g. --config=configs/avamerg_empath.py')
    logs.setup(args.verbose)
    common = dict(nnet_path=args.nnet_path, split=args.split, features=args.features, limit=args.limit,
                  skip_fid=args.skip_fid, output_path=args.output_path, batch_size=args.batch_size,
                  allow_untrained_condition=args.allow_untrained_condition)
    scales, steps = parse_list(args.scales, float, 'scales'), parse_list(args.steps, int, 'steps')
    if scales or steps:
        rows = evaluate_sweep(args.config, scales, steps, **common)
        summary = None
    else:
        rows, summary = None, evaluate(args.config, **common)
    if rows is not None:
        print(f'{sweep_table(rows)}\n-> {os.path.join(args.output_path, SWEEP)}.md')
    if summary is not None:
        m = summary['metrics']
        print(f'{summary["samples"]} pairs ({summary["run"]["generated"]} generated now, NFE {summary["nfe"]}, '
              f'{summary["seconds_per_pair"]:.3g} s/pair): FID {fmt(m["fid"], 4)}, BLEU-4 {fmt(m["bleu4"], 3)}, '
              f'sentence BLEU-4 {fmt((m["sentence_bleu"] or {}).get("bleu4"), 3)}, Dist-2 {fmt(m["dist2"], 3)}, '
              f'emotion accuracy {fmt(m["emotion"]["fine_acc"], 3)} -> {args.output_path}')


if __name__ == '__main__':
    define_flags()
    cli.run(main, flags_parser=logs.parse_flags)
