"""Feature extraction (extract_features.py): every AvaMERG pair of a split encoded once into the sharded feature cache
that training reads (libs/features.py).

Per pair and for both the speaker and the response: VAE posterior moments of the centre-cropped face at the
config's resolution, the CLIP image embedding of that crop, the CLIP text hidden states (stored fp16), labels and
raw texts. Every encoder runs in fp32, as in sampling and evaluation (the features are what both see), in chunks of
``config.encoders`` whatever ``data.batch_size`` is. Shards are written atomically; a rerun skips finished shards,
and a folder holding features made with other settings is refused unless ``overwrite``. The output folder is locked
while extraction runs, a shard with a non-finite feature is refused, naming its pairs, and SIGTERM / SIGUSR1 stop it
between batches with its finished shards kept (libs.preemption).
"""
import hashlib
import json
import logging
import multiprocessing
import os
import time

import torch
from accelerate import Accelerator
from safetensors import safe_open
from tqdm import tqdm

from libs import config_check, hub, memory, preemption, runlock
from libs.autoencoder import center_crop_resize, load_autoencoder, to_tensor_m11
from libs import avamerg
from libs.clip_encoders import CLIPImageEncoder, CLIPTextEncoder
from libs.errors import UserError
from libs.features import (MANIFEST, TENSOR_DTYPES, finished_shards, make_manifest, shard_name, tensor_spec,
                           write_manifest, write_shard)
from libs.io import atomic_write_json

logger = logging.getLogger(__name__)

# config.data key naming each split's output folder (the training configs read the same keys): 'val' is the part
# of train.json held out for checkpoint selection (config.data.val_fraction of the conversations), 'test' the test set.
SPLITS = ('train', 'val', 'test')
DATA_KEYS = ('root', 'speaker_text', 'val_fraction', 'shard_size', 'batch_size', 'num_workers')
STAMP, SUMMARY = 'extraction.json', 'summary.json'
# The precision every encoder runs in, recorded in the manifest and checked where features are read
# (libs.features.check_precision): sampling and evaluation encode the speaker in fp32 too (docs/design.md §5).
PRECISION = 'float32'


class FacePairs(torch.utils.data.Dataset):
    """Pair i -> (i, VAE inputs (2, 3, R, R) in [-1, 1], CLIP inputs (2, 3, S, S)) of its speaker and response."""

    def __init__(self, reader, resolution, clip_preprocess):
        self.reader, self.resolution, self.clip_preprocess = reader, resolution, clip_preprocess

    def __getitem__(self, i):
        _, speaker, response = self.reader[i]
        crops = [center_crop_resize(face, self.resolution) for face in (speaker, response)]
        # CLIP sees the same crop as the VAE, as in UniDiffuser's sampling scripts.
        return i, torch.stack([to_tensor_m11(crop) for crop in crops]), self.clip_preprocess(crops)


def state_dict_sha256(module, extra=b''):
    """sha256 over a module's state dict (names, shapes, dtypes, bytes) plus `extra`, independent of file format."""
    digest = hashlib.sha256(extra)
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(f'{name}:{tuple(tensor.shape)}:{tensor.dtype}'.encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def check_config(config, split):
    """Raise UserError unless config.data has what extraction needs; returns the output folder."""
    if split not in SPLITS:
        raise UserError(f'--split={split!r}; choose one of {SPLITS}')
    missing = [k for k in (*DATA_KEYS, split) if k not in config.data]
    if missing:
        raise UserError(f'config.data lacks {missing}: add them to the config file, e.g. root="data/AvaMERG", '
                        'speaker_text="last", val_fraction=0.02, shard_size=1024, batch_size=64, num_workers=8, '
                        f'{split}="features/avamerg_512/{split}" (configs/avamerg_empath.py)')
    config_check.check(config, 'model', 'extract')
    return config.data[split]


def load_encoders(config, device):
    """VAE and CLIP encoders checked against the config's shapes, and their weight hashes (computed on the CPU)."""
    chunks = config.encoders
    vae = load_autoencoder(config.autoencoder.pretrained_path, config.autoencoder, encode_chunk=chunks.vae_encode_chunk)
    text = CLIPTextEncoder(config.clip_text.name_or_path, config.clip_text.local_files_only, chunk=chunks.clip_chunk)
    image = CLIPImageEncoder(config.clip_img.name_or_path, config.clip_img.local_files_only, chunk=chunks.clip_chunk)
    found = {'autoencoder.latent_channels': (config.autoencoder.latent_channels, 'z_shape[0]', config.z_shape[0]),
             'clip_text hidden size': (text.model.config.hidden_size, 'clip_text_dim', config.clip_text_dim),
             'clip_text positions': (text.max_length, 'num_text_tokens', config.num_text_tokens),
             'clip_img projection': (image.model.config.projection_dim, 'clip_img_dim', config.clip_img_dim)}
    for what, (value, key, expected) in found.items():
        if value != expected:
            raise UserError(f'{what} is {value} but config.{key}={expected}: the encoders do not match the config')
    vocab = json.dumps(sorted(text.tokenizer.get_vocab().items())).encode()
    hashes = {'autoencoder': state_dict_sha256(vae), 'clip_text': state_dict_sha256(text.model, vocab),
              'clip_img': state_dict_sha256(image.model)}
    return (vae.to(device), text.to(device), image.to(device)), hashes


def pairs_sha256(pairs):
    """sha256 of the ordered pair identities and texts, so a changed dataset or --limit is noticed."""
    rows = [(p.conversation_id, p.turn_id, p.speaker_stem, p.response_stem, p.speaker_text, p.response_text,
             p.emotion) for p in pairs]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def check_folder(out, settings, overwrite):
    """Raise UserError if `out` holds features made with other settings and --overwrite is not given."""
    stamp = os.path.join(out, STAMP)
    old = None
    if os.path.isfile(stamp):
        with open(stamp, encoding='utf-8') as f:
            old = json.load(f)
    if overwrite or old == settings or (old is None and not finished_shards(out)
                                        and not os.path.exists(os.path.join(out, MANIFEST))):
        return
    if old is None:
        raise UserError(f'{out} holds feature shards without {STAMP}, so their settings are unknown; rerun with '
                        '--overwrite to replace them, or choose another output folder')
    before, now = config_check.flatten(old), config_check.flatten(settings)
    changed = [f'{k}: {before.get(k)!r} in the folder, {now.get(k)!r} now' for k in sorted({*before, *now})
               if before.get(k) != now.get(k)]
    raise UserError(f'{out} holds features extracted with other settings ({"; ".join(changed)}); mixing them would '
                    'corrupt the cache. Rerun with --overwrite to replace them, or choose another output folder')


def prepare_folder(out, settings, overwrite):
    """Delete old features when overwriting and temp files of killed runs, then stamp the settings."""
    os.makedirs(out, exist_ok=True)
    for name in os.listdir(out):
        old = overwrite and (name.startswith('shard-') or name in (MANIFEST, SUMMARY, STAMP))
        # atomic writes go through '.tmp-<name>' files; a killed run can leave them behind.
        if old or name.startswith('.tmp-'):
            os.remove(os.path.join(out, name))
    atomic_write_json(os.path.join(out, STAMP), settings)


def shard_batches(shards, num_pairs, shard_size, batch_size):
    """Batches of pair indices covering the given shards in order; a batch never spans two shards."""
    return [list(range(start, min(start + batch_size, end)))
            for k in shards for end in [min((k + 1) * shard_size, num_pairs)]
            for start in range(k * shard_size, end, batch_size)]


@torch.no_grad()
def encode_batch(encoders, pixels, clip_pixels, texts):
    """(B, 2, ...) VAE and CLIP inputs and 2B texts -> moments, CLIP embeddings, text states, each (B, 2, ...).

    Every encoder runs in float32 (``PRECISION``), as evaluation and sampling do: the latents are what training
    denoises and the CLIP features what it conditions on, so bf16 features would differ from the fp32 ones the
    sampler's speaker turns come from.
    """
    vae, text_encoder, image_encoder = encoders
    device, batch = text_encoder.device, len(pixels)
    moments = vae.encode_moments(pixels.flatten(0, 1).to(device, non_blocking=True))
    # The loader workers already ran CLIPImageEncoder.preprocess; this is the rest of CLIPImageEncoder.encode.
    clip = image_encoder.embed(clip_pixels.flatten(0, 1).to(device, non_blocking=True))
    hidden = text_encoder.encode(texts)
    return [x.float().cpu().unflatten(0, (batch, 2)) for x in (moments, clip, hidden)]


def make_record(pair, moments, clip, text):
    """One pair's tensors (index 0 speaker, 1 response) and metadata in the layout of libs.features.write_shard."""
    return dict(speaker_moments=moments[0], response_moments=moments[1], speaker_clip_img=clip[0],
                response_clip_img=clip[1], speaker_text=text[0], response_text=text[1], label=pair.label,
                coarse_label=pair.coarse_label, split=pair.split, conversation_id=pair.conversation_id,
                turn_id=pair.turn_id,
                speaker_stem=pair.speaker_stem, response_stem=pair.response_stem, speaker_text_raw=pair.speaker_text,
                response_text_raw=pair.response_text, emotion=pair.emotion)


def finish(out, reader, num_pairs, shard_size, settings, info):
    """Write manifest.json and summary.json if every shard exists (the last process to finish does it)."""
    num_shards = -(-num_pairs // shard_size)
    if not set(range(num_shards)) <= set(finished_shards(out)):
        return False
    with safe_open(os.path.join(out, shard_name(0) + '.safetensors'), 'pt') as f:
        spec = tensor_spec({key: f.get_slice(key)[0:1][0] for key in TENSOR_DTYPES})
    shards = [{'name': shard_name(k), 'pairs': min(shard_size, num_pairs - k * shard_size)} for k in range(num_shards)]
    write_manifest(out, make_manifest(shards, spec, **settings, **info))
    reader.save_summary(os.path.join(out, SUMMARY))
    return True


@runlock.scope
def extract(config, split='train', overwrite=False, limit=None):
    """Encode the split's pairs into the feature folder of config.data; returns that folder."""
    out, state = check_config(config, split), Accelerator()
    hub.preflight(config, ('autoencoder', 'clip_text', 'clip_img'))
    runlock.take(out, 'feature extraction')
    memory.check_extraction(config, state.device)
    encoders, hashes = load_encoders(config, state.device)
    resolution = config.z_shape[-1] * 2 ** (len(config.autoencoder.block_out_channels) - 1)
    text_encoder = encoders[1]
    # Every process reads the split itself: no process waits on another (video frames are cached atomically).
    reader = avamerg.from_config(config.data, split, history_tokens=text_encoder.max_length,
                                 count_tokens=text_encoder.count_tokens)
    pairs = reader.pairs[:limit]
    if not pairs:
        if split == 'val' and not reader.skipped:
            raise UserError(f'{reader.json_path}: config.data.val_fraction={config.data.val_fraction} holds out none '
                            'of its conversations for validation; raise it (e.g. --config.data.val_fraction=0.1) or '
                            'use a larger train.json')
        raise UserError(f'{reader.json_path}: no usable pairs (skipped: {dict(reader.skipped)})')
    shard_size, batch_size = config.data.shard_size, config.data.batch_size
    settings = dict(split=split, resolution=resolution, speaker_text=config.data.speaker_text, shard_size=shard_size,
                    text_tokens=text_encoder.max_length, vae_precision=PRECISION, clip_precision=PRECISION,
                    pairs_sha256=pairs_sha256(pairs), weights_sha256=hashes)
    if split != 'test':
        settings['val_fraction'] = config.data.val_fraction
    # The caption decoder does not enter the features (they hold CLIP states), but training reduces them with it:
    # recorded so that a run can say which decoder its text space came from.
    info = dict(encoders={'autoencoder': config.autoencoder.pretrained_path,
                          'clip_text': config.clip_text.name_or_path, 'clip_img': config.clip_img.name_or_path},
                caption_decoder=config.caption_decoder.pretrained_path, limit=limit, config=config.to_dict())
    check_folder(out, settings, overwrite)
    if state.is_main_process:
        prepare_folder(out, settings, overwrite)
    state.wait_for_everyone()

    num_shards, done = -(-len(pairs) // shard_size), set(finished_shards(out))
    mine = [k for k in range(state.process_index, num_shards, state.num_processes) if k not in done]
    logger.info('process %d/%d: %d pairs in %d shards; %d finished, %d to encode here', state.process_index,
                state.num_processes, len(pairs), num_shards, len(done), len(mine))
    workers = config.data.num_workers
    loader = torch.utils.data.DataLoader(
        FacePairs(reader, resolution, encoders[2].preprocess), num_workers=workers,
        batch_sampler=shard_batches(mine, len(pairs), shard_size, batch_size), pin_memory=state.device.type == 'cuda',
        # Forked workers share the image encoder's preprocessing without pickling its weights.
        multiprocessing_context='fork' if workers and 'fork' in multiprocessing.get_all_start_methods() else None)
    records, count, written, start = [], 0, [], time.time()
    with preemption.stop_on_signals() as stop, \
            tqdm(total=sum(len(b) for b in loader.batch_sampler), unit='pair', disable=not state.is_main_process) as bar:
        for index, pixels, clip_pixels in loader:
            batch = [pairs[i] for i in index.tolist()]
            # A test split without gold responses encodes '' in their place (evaluation never reads it).
            texts = [t for p in batch for t in (p.speaker_text, p.response_text or '')]
            moments, clip, text = encode_batch(encoders, pixels, clip_pixels, texts)
            records += [make_record(p, moments[b], clip[b], text[b]) for b, p in enumerate(batch)]
            shard = index[0].item() // shard_size
            if index[-1].item() + 1 == min((shard + 1) * shard_size, len(pairs)):
                write_shard(out, shard, records)
                records, written = [], written + [shard]
            bar.update(len(batch))
            count += len(batch)
            if stop.requested:
                finished = len(set(finished_shards(out)))
                raise preemption.Preempted(
                    f'{stop.signal_name} after {count} pairs: feature extraction of {out} stopped between batches '
                    f'with {finished} of {num_shards} shards finished and kept (this run wrote {len(written)}; the '
                    'pairs of an unfinished shard are encoded again); rerun the same command to continue')
    elapsed = time.time() - start
    logger.info('process %d: encoded %d pairs in %.1f s (%.2f pairs/s)', state.process_index, count, elapsed,
                count / max(elapsed, 1e-9))
    if finish(out, reader, len(pairs), shard_size, settings, info):
        logger.info('feature cache complete: %s (%d pairs)', out, len(pairs))
    return out
