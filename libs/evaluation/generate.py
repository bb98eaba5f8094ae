"""Generation and resume: the speaker turns of a split (raw frames or a feature cache), one `empath` response per pair,
and the run folder's records.

Pair p draws all its noise from a generator seeded by (config.seed, p's pair_id = split/conversation/turn), whatever
its position, the --limit, the sweep setting or the process, and the batches are a fixed grid over the pairs dealt
round-robin to the processes, so responses do not depend on the number of processes. A process saves a batch's
faces, then appends its records to pairs.rank<r>.jsonl (fsynced); a rerun merges these into pairs.jsonl and generates
only the missing pairs. SIGTERM / SIGUSR1 stop the loop between batches with every finished pair kept.
"""
import dataclasses
import glob
import io
import json
import logging
import os
import re

import torch

from libs import avamerg, modes, preemption
from libs.avamerg import EMOTIONS_32, label_index
from libs.errors import UserError
from libs.features import FeatureDataset, derive_seed, read_manifest
from libs.io import atomic_write_bytes, writing

logger = logging.getLogger(__name__)

RECORDS, SETTINGS, PART = 'pairs.jsonl', 'settings.json', 'pairs.rank{}.jsonl'
FACES = 'faces'
TEMP_PREFIX = '.tmp-'  # libs.io.atomic_write_bytes' temp files: a killed write leaves one behind
TIMING = ('seconds',)  # the record fields that are measurements of this machine, not results


def pair_identity(split, conversation_id, turn_id):
    """'{split}/{conversation_id}/{turn_id}' of a feature cache's pair, the identity libs.avamerg.Pair.pair_id is."""
    return f'{split}/{conversation_id}/{turn_id}'


def face_name(pair_id):
    """The file name of a pair's generated face: its pair_id with anything but word characters, '.' and '-' as '_'."""
    return re.sub(r'[^\w.-]', '_', pair_id) + '.png'


def check_feature_split(folder, split):
    """Refuse a feature cache extracted for another split (e.g. val features as --split=test); reads the manifest
    only, so it runs before any network is loaded."""
    made_for = read_manifest(folder).get('split')
    if made_for not in (None, split):
        raise UserError(f'{folder} holds features of the {made_for} split, not of --split={split}: pass the '
                        f'{split} split\'s cache (extract_features.py --split={split}) or --split={made_for}')


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

    @torch.no_grad()
    def speaker_text_states(self, indices):
        """CLIP text last hidden states (B, T, D) of the speaker utterances, as a feature cache stores them."""
        return self.comp.clip_text.encode([self.pairs[i]['speaker_text'] for i in indices]).float().cpu()

    def face(self, i, role):
        """The 'speaker' or reference 'response' face of pair i, centre-cropped to the generated resolution."""
        return frame(self.reader, self.pairs[i][f'{role}_stem'], self.comp.resolution)


class FeatureSource:
    """Speaker turns from a feature cache (extract_features.py); faces from the frames when config.data.root is set."""

    def __init__(self, comp, config, split, folder):
        check_feature_split(folder, split)
        self.comp, self.root, self.data = comp, folder, FeatureDataset(folder)
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

    def speaker_text_states(self, indices):
        """The cached CLIP text last hidden states (B, T, D) of the speaker utterances."""
        return torch.stack([self.data[i]['speaker_text'] for i in indices]).float()

    def face(self, i, role):
        """The face of pair i from the frames, or else the VAE reconstruction of its cached moments."""
        if self.reader is not None:
            return frame(self.reader, self.pairs[i][f'{role}_stem'], self.comp.resolution)
        # No frames: show what the model saw, the VAE reconstruction of the posterior mean.
        from libs.pipeline import decode_images
        mean = self.data[i][f'{role}_moments'][None].float().to(self.comp.device).chunk(2, dim=1)[0]
        return decode_images(self.comp, self.comp.autoencoder.scale_factor * mean)[0]


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


def save_face(out, pair_id, image):
    """Write a response face atomically under faces/; returns its path relative to the run folder."""
    face = f'{FACES}/{face_name(pair_id)}'
    png = io.BytesIO()
    image.save(png, format='PNG')
    atomic_write_bytes(os.path.join(out, face), png.getvalue())
    return face


def append_records(out, rank, lines):
    """Append JSON lines to this process's record file, flushed and fsynced (a kill loses at most a torn line)."""
    part = os.path.join(out, PART.format(rank))
    with writing(part), open(part, 'a', encoding='utf-8') as f:
        f.write(''.join(json.dumps(line, ensure_ascii=False) + '\n' for line in lines))
        f.flush()
        os.fsync(f.fileno())


def write_batch(out, rank, pairs, indices, images, texts, probs, passes, seconds):
    """Save the faces, then append the pairs' records to this process's JSONL (flushed and fsynced)."""
    from libs.pipeline import top_emotions
    lines = []
    nfe, branches = len(passes), max(passes) // len(indices)
    for i, image, text, p, top3 in zip(indices, images, texts, probs, top_emotions(probs, list(EMOTIONS_32))):
        face = save_face(out, pairs[i]['pair_id'], image)
        pred = int(p.argmax())
        lines.append(dict(index=i, **pairs[i], generated=text, face=face, pred_label=pred,
                          pred_emotion=EMOTIONS_32[pred], top3=top3, nfe=nfe, branches=branches,
                          seconds=round(seconds / len(indices), 4)))
    append_records(out, rank, lines)


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


def remove_stale_temps(out):
    """Delete the temp files of atomic writes a killed run left in the folder and in faces/; returns how many."""
    stale = glob.glob(os.path.join(out, TEMP_PREFIX + '*')) + glob.glob(os.path.join(out, FACES, TEMP_PREFIX + '*'))
    for path in stale:
        os.remove(path)
    if stale:
        logger.info('%s: removed %d temp files of an interrupted run', out, len(stale))
    return len(stale)


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


def generate_missing(out, batches, done, make_batch, progress):
    """Run make_batch(todo) for every batch's unfinished pairs; returns how many pairs it generated.

    A SIGTERM / SIGUSR1 (SLURM preemption, scancel) lets the current batch finish and be written, then raises
    ``preemption.Preempted``: the finished pairs stay in the folder and a rerun of the same command continues.
    """
    generated = 0
    with preemption.stop_on_signals() as stop:
        for indices in batches:
            if stop.requested:
                total = sum(len(b) for b in batches)
                finished = sum(i in done for b in batches for i in b) + generated
                raise preemption.Preempted(
                    f'{stop.signal_name} after {finished} of this process\'s {total} pairs: the finished pairs are '
                    f'kept in {out}; run the same command again to continue')
            todo = [i for i in indices if i not in done]
            if todo:  # a partly finished batch is completed as a smaller one (floats may differ slightly)
                make_batch(todo)
                generated += len(todo)
                progress(len(todo))
    return generated
