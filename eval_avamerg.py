"""Evaluate EmpathDiffuser on an AvaMERG split: every speaker turn -> an `empath` response (face + utterance) and a
predicted emotion, scored with FID, corpus BLEU-1..4 / sacreBLEU, Dist-1/2 and emotion accuracy / macro-F1 (DESIGN §5).

    python eval_avamerg.py --config=configs/avamerg_empath.py --nnet_path=workdir/avamerg_empath/nnet_ema.safetensors \
        --features=features/avamerg_512/test --output_path=out/eval
    accelerate launch --multi_gpu --num_processes 8 eval_avamerg.py --config=...   # same numbers, split 8 ways

Pair i draws all its noise from a generator seeded by (config.seed, i) and the batches are a fixed grid over the pairs
dealt round-robin to the processes, so responses do not depend on the number of processes. A process saves a batch's
faces, then appends its records to pairs.rank<r>.jsonl (fsynced); a rerun merges these into pairs.jsonl and generates
only the missing pairs. Also written: faces/<conversation_id>_<turn_id>.png, metrics.json, report.md,
confusion_{32,7}.png, grid.png (speaker | generated | reference) and settings.json (the resume guard). The output
folder is locked while an evaluation runs in it; a network whose speaker segment is untrained (e.g. an official
UniDiffuser checkpoint) is refused unless ``--allow_untrained_condition`` is given.
"""
import dataclasses
import glob
import io
import json
import logging
import math
import os
import time

import numpy as np
import torch
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from libs import cli, config_check, metrics, modes, runlock
from libs.avamerg import COARSE_7, EMOTIONS_32, AvaMERG, coarse_index, label_index
from libs.errors import UserError
from libs.features import FeatureDataset, derive_seed
from libs.io import atomic_write_bytes, atomic_write_json, read_rgb, writing

logger = logging.getLogger(__name__)

RECORDS, SETTINGS, PART = 'pairs.jsonl', 'settings.json', 'pairs.rank{}.jsonl'
GRID_ROWS = 8  # pairs shown in grid.png
REPORT_KEYS = ('checkpoint', 'split', 'source', 'samples', 'sample_steps', 'guidance_scale', 'sampler', 'seed',
               'fid_computed')


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
        self.reader = AvaMERG(config.data.root, split, speaker_text=config.data.get('speaker_text', 'last'),
                              history_tokens=comp.clip_text.max_length, count_tokens=comp.clip_text.count_tokens)
        self.pairs = [dict(conversation_id=p.conversation_id, turn_id=p.turn_id, speaker_stem=p.speaker_stem,
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
                self.pairs += [dict(conversation_id=m['conversation_id'], turn_id=m['turn_id'],
                                    speaker_stem=m['speaker_stem'], response_stem=m['response_stem'],
                                    speaker_text=m['speaker_text_raw'], reference=m['response_text_raw'],
                                    gold_emotion=m['emotion'], gold_label=label_index(m['emotion']))
                               for m in json.load(f)]
        root = config.data.get('root')
        self.reader = AvaMERG(root, split) if root and os.path.isdir(root) else None
        if root and self.reader is None:
            logger.warning('config.data.root=%s does not exist: no reference frames (FID needs them)', root)

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
def generate_batch(comp, base, source, indices, seed):
    """Faces, utterances and emotion probabilities (B, 32) for pairs `indices`; pair i's noise depends on (seed, i)."""
    from libs import pipeline
    gens = tuple(torch.Generator().manual_seed(derive_seed('eval', seed, i)) for i in indices)
    ctx = PairContext(**{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}, generators=gens)
    moments, clip_img, text = source.speaker(indices)
    # A posterior sample of the speaker latent, as in training, drawn first from each pair's generator.
    z = torch.cat([comp.autoencoder.sample(m[None], generator=g) for m, g in zip(moments, gens)]).to(comp.device)
    out = modes.get_mode('empath')(ctx, pipeline.speaker_inputs(comp, ctx, len(indices), z, clip_img, text))
    return pipeline.decode_images(comp, out['z']), pipeline.decode_texts(comp, out['text']), out['emotion'].cpu()


def write_batch(out, rank, pairs, indices, images, texts, probs):
    """Save the faces, then append the pairs' records to this process's JSONL (flushed and fsynced)."""
    from libs.pipeline import top_emotions
    lines = []
    for i, image, text, p, top3 in zip(indices, images, texts, probs, top_emotions(probs, list(EMOTIONS_32))):
        face = f'faces/{pairs[i]["conversation_id"]}_{pairs[i]["turn_id"]}.png'
        png = io.BytesIO()
        image.save(png, format='PNG')
        atomic_write_bytes(os.path.join(out, face), png.getvalue())
        pred = int(p.argmax())
        lines.append(json.dumps(dict(index=i, **pairs[i], generated=text, face=face, pred_label=pred,
                                     pred_emotion=EMOTIONS_32[pred], top3=top3), ensure_ascii=False) + '\n')
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
    changed += [f'pair {i} is {r["conversation_id"]}/{r["turn_id"]} there, {pairs[i]["conversation_id"]}/'
                f'{pairs[i]["turn_id"]} now' for i, r in sorted(records.items())
                if i < len(pairs) and (r['conversation_id'], r['turn_id']) != (pairs[i]['conversation_id'],
                                                                               pairs[i]['turn_id'])][:3]
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


def score(records):
    """Corpus BLEU-1..4, sacreBLEU, Dist-1/2 and emotion accuracy / macro-F1 (32- and 7-way) of the records."""
    hyps, refs = [r['generated'] for r in records], [r['reference'] for r in records]
    table = [coarse_index(i) for i in range(len(EMOTIONS_32))]
    emotion = metrics.emotion_report([r['pred_label'] for r in records], [r['gold_label'] for r in records], table)
    return dict(**metrics.corpus_bleu_n(hyps, refs), sacrebleu=metrics.sacrebleu_score(hyps, refs),
                dist1=metrics.distinct_n(hyps, 1), dist2=metrics.distinct_n(hyps, 2), emotion=emotion)


def write_figures(out, source, records):
    """The 32- and 7-way confusion matrices (gold label -1 left out) and grid.png of the first pairs."""
    pred, gold = [r['pred_label'] for r in records], [r['gold_label'] for r in records]
    for labels, p, g in ((EMOTIONS_32, pred, gold), (COARSE_7, [coarse_index(x) for x in pred],
                                                     [coarse_index(x) for x in gold])):
        metrics.plot_confusion_png(metrics.confusion_matrix(p, g, len(labels)), list(labels),
                                   os.path.join(out, f'confusion_{len(labels)}.png'))
    from libs.pipeline import make_grid
    faces = [face for r in records[:GRID_ROWS] for face in (
        source.face(r['index'], 'speaker'), read_rgb(os.path.join(out, r['face'])), source.face(r['index'], 'response'))]
    make_grid(faces, nrow=3).save(os.path.join(out, 'grid.png'))


def write_report(out, summary):
    """metrics.json and report.md, both stating the checkpoint, sampling settings, sample count and FID status."""
    atomic_write_json(os.path.join(out, 'metrics.json'), summary)
    m, e = summary['metrics'], summary['metrics']['emotion']
    lines = ['# EmpathDiffuser on AvaMERG', '', *[f'- {k}: {summary[k]}' for k in REPORT_KEYS], '',
             f'- FID: {m["fid"]} ({summary["fid_note"]})', *[f'- BLEU-{n}: {m[f"bleu{n}"]:.4g}' for n in range(1, 5)],
             f'- sacreBLEU: {m["sacrebleu"]["score"]:.4g} (`{m["sacrebleu"]["signature"]}`)',
             f'- Dist-1 / Dist-2: {m["dist1"]:.4g} / {m["dist2"]:.4g}',
             f'- emotion ({e["n"]} labelled pairs): 32-way accuracy {e["fine_acc"]}, macro-F1 {e["fine_macro_f1"]}; '
             f'7-way accuracy {e["coarse_acc"]}, macro-F1 {e["coarse_macro_f1"]}']
    atomic_write_bytes(os.path.join(out, 'report.md'), ('\n'.join(lines) + '\n').encode('utf-8'))


# ---------------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------------

@runlock.scope
def evaluate(config, nnet_path=None, split='test', features=None, limit=None, skip_fid=False, output_path='out/eval',
             batch_size=16, allow_untrained_condition=False):
    """Generate the split's missing responses, then score every pair; returns metrics.json's dict (None off-main)."""
    from accelerate import Accelerator
    from libs import pipeline
    config_check.check(config, 'model', 'sample')
    if batch_size < 1 or (limit is not None and limit < 1):
        raise UserError(f'--batch_size={batch_size} and --limit={limit} must be at least 1')
    acc, started = Accelerator(), time.time()
    nnet_path = nnet_path or config.nnet_path
    inception_path = config.get('eval', {}).get('inception_path') or None
    # Before loading anything: FID needs the standard Inception network, or an explicit --skip_fid.
    inception = None if skip_fid else metrics.load_inception(inception_path).to(acc.device)
    runlock.take(output_path, 'evaluation')
    comp = pipeline.load_components(config, acc.device, nnet_path, need_text=features is None)
    pipeline.check_condition_trained(comp.nnet, f'evaluating {nnet_path}', allow_untrained_condition)
    source = FeatureSource(comp, config, split, features) if features else RawSource(comp, config, split)
    if inception is not None and source.reader is None:
        raise UserError('FID compares the generated faces with the reference frames, and there are none: set '
                        'config.data.root to the AvaMERG folder, or pass --skip_fid')
    pairs = source.pairs[:limit]
    if not pairs:
        raise UserError(f'{source.root}: the {split} split has no pairs')
    settings = dict(checkpoint=os.path.abspath(nnet_path), split=split, source=os.path.abspath(source.root),
                    sample_steps=config.sample.sample_steps, guidance_scale=float(config.sample.scale),
                    sampler=config.sample.sampler, skip_type=config.sample.skip_type, seed=config.seed)
    out = output_path
    os.makedirs(os.path.join(out, 'faces'), exist_ok=True)
    check_resumable(out, settings, read_records(out), pairs)
    acc.wait_for_everyone()
    if acc.is_main_process:
        atomic_write_json(os.path.join(out, SETTINGS), settings)
        merge_records(out, read_records(out))  # also drops torn lines before anyone appends again
    acc.wait_for_everyone()

    done = read_records(out)
    batches = [list(range(s, min(s + batch_size, len(pairs)))) for s in range(0, len(pairs), batch_size)]
    mine = batches[acc.process_index::acc.num_processes]
    base, generated = pipeline.make_context(comp, None), 0
    bar = tqdm(total=sum(len(b) for b in mine), initial=sum(i in done for b in mine for i in b), unit='pair',
               desc='eval', dynamic_ncols=True, disable=not acc.is_main_process)
    for indices in mine:
        todo = [i for i in indices if i not in done]
        if todo:  # a partly finished batch is completed as a smaller one (floating-point results may differ slightly)
            write_batch(out, acc.process_index, pairs, todo, *generate_batch(comp, base, source, todo, config.seed))
            generated += len(todo)
            bar.update(len(todo))
    bar.close()
    acc.wait_for_everyone()

    records = read_records(out)
    if inception is not None:
        gen, ref = fid_stats(inception, source, out, records, mine, acc.device)
        gen.gather(acc)
        ref.gather(acc)
    generated = int(acc.gather(torch.tensor([generated], device=acc.device)).sum())
    if not acc.is_main_process:
        return None
    merge_records(out, records)
    selected = [records[i] for i in range(len(pairs))]
    fid, note = None, '--skip_fid given: FID was not computed'
    if inception is not None:
        fid = metrics.frechet_distance(*gen.mean_cov(), *ref.mean_cov())
        note = f'{len(pairs)} generated vs reference faces, Inception-v3 ({inception_path or "torch.hub cache"})'
        if len(pairs) <= metrics.INCEPTION_POOL_DIM:  # a rank-deficient covariance: FID is biased and unstable
            note += f'; unreliable with fewer samples than its {metrics.INCEPTION_POOL_DIM} feature dimensions'
    summary = dict(settings, samples=len(pairs), fid_computed=fid is not None, fid_note=note,
                   metrics=finite(dict(fid=fid, **score(selected))),
                   run=dict(processes=acc.num_processes, generated=generated, resumed=len(pairs) - generated,
                            batch_size=batch_size, seconds=round(time.time() - started, 1), device=str(acc.device)))
    write_figures(out, source, selected)
    write_report(out, summary)
    return summary


def define_flags():
    """Define the command-line flags (on demand, so importing this module defines none)."""
    config_flags.DEFINE_config_file('config', None, 'EmpathDiffuser config (e.g. configs/avamerg_empath.py)',
                                    lock_config=False)
    flags.DEFINE_string('nnet_path', None, 'U-ViT weights (.pth or .safetensors); default: config.nnet_path')
    flags.DEFINE_enum('split', 'test', ['train', 'test'], 'AvaMERG split to evaluate')
    flags.DEFINE_string('features', None, 'feature cache of the split (extract_features.py); default: encode the '
                        'raw frames and texts under config.data.root')
    flags.DEFINE_integer('limit', None, 'evaluate only the first N pairs', lower_bound=1)
    flags.DEFINE_bool('skip_fid', False, 'do not compute FID (needed when no Inception-v3 weights are available)')
    flags.DEFINE_string('output_path', 'out/eval', 'output folder (a rerun resumes in it)')
    flags.DEFINE_integer('batch_size', 16, 'pairs per sampling batch and process', lower_bound=1)
    flags.DEFINE_bool('allow_untrained_condition', False, 'evaluate even though the network\'s speaker segment is '
                      'untrained (e.g. to score an untrained baseline: the speaker has no effect, emotions are random)')


def main(argv):
    """Command-line entry point: bad input exits with code 2 and a message instead of a traceback."""
    del argv
    args = flags.FLAGS
    if args.config is None:
        raise app.UsageError('--config is required, e.g. --config=configs/avamerg_empath.py')
    summary = evaluate(args.config, args.nnet_path, args.split, args.features, args.limit, args.skip_fid,
                       args.output_path, args.batch_size, args.allow_untrained_condition)
    if summary is not None:
        m = summary['metrics']
        print(f'{summary["samples"]} pairs ({summary["run"]["generated"]} generated now): FID {m["fid"]}, '
              f'BLEU-4 {m["bleu4"]:.2f}, Dist-2 {m["dist2"]:.2f}, emotion accuracy {m["emotion"]["fine_acc"]} '
              f'-> {args.output_path}')


if __name__ == '__main__':
    define_flags()
    cli.run(main)
