"""Encode every AvaMERG training pair once into the sharded feature cache that training reads (libs/features.py).

Per pair and for both the speaker and the response: VAE posterior moments of the centre-cropped face at the
config's resolution, the CLIP image embedding of that crop, the CLIP text hidden states (stored fp16), labels and
raw texts. Shards are written atomically; a rerun skips finished shards, and a folder holding features made with
other settings is refused unless ``--overwrite``. The output folder is locked while extraction runs, and a shard with
a non-finite feature is refused, naming its pairs.

    python extract_features.py --config=configs/avamerg_empath.py --split=train   # then --split=val, --split=test
    accelerate launch --multi_gpu --num_processes 8 extract_features.py --config=... # process r: shards r, r+P, ...
"""
import hashlib
import json
import logging
import multiprocessing
import os
import time

import torch
from absl import app, flags
from accelerate import Accelerator
from ml_collections import config_flags
from safetensors import safe_open
from tqdm import tqdm

from libs import cli, config_check, hub, logs, runlock
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
AUTOCAST_DTYPES = {'bf16': torch.bfloat16, 'fp16': torch.float16}


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
    vae = load_autoencoder(config.autoencoder.pretrained_path, config.autoencoder)
    text = CLIPTextEncoder(config.clip_text.name_or_path, config.clip_text.local_files_only)
    image = CLIPImageEncoder(config.clip_img.name_or_path, config.clip_img.local_files_only)
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
def encode_batch(encoders, pixels, clip_pixels, texts, autocast_dtype):
    """(B, 2, ...) VAE and CLIP inputs and 2B texts -> moments, CLIP embeddings, text states, each (B, 2, ...).

    The VAE always encodes in float32, as evaluation and sampling do (its latents are what training denoises, and
    bf16 moments would differ from the fp32 ones the sampler's speaker turns come from); the CLIP encoders run under
    the configured autocast.
    """
    vae, text_encoder, image_encoder = encoders
    device, batch = text_encoder.device, len(pixels)
    moments = vae.encode_moments(pixels.flatten(0, 1).to(device, non_blocking=True))
    with torch.autocast(device.type, dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        # The loader workers already ran CLIPImageEncoder.preprocess; this is the rest of CLIPImageEncoder.encode.
        clip = image_encoder.model(pixel_values=clip_pixels.flatten(0, 1).to(device, non_blocking=True)).image_embeds
        hidden = text_encoder.encode(texts)
    return [x.float().cpu().unflatten(0, (batch, 2)) for x in (moments, clip[:, None, :], hidden)]


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
    autocast_dtype = AUTOCAST_DTYPES.get(config.mixed_precision) if state.device.type == 'cuda' else None
    shard_size, batch_size = config.data.shard_size, config.data.batch_size
    settings = dict(split=split, resolution=resolution, speaker_text=config.data.speaker_text, shard_size=shard_size,
                    text_tokens=text_encoder.max_length, vae_precision='float32',
                    clip_autocast=str(autocast_dtype or torch.float32).removeprefix('torch.'),
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
    records, count, start = [], 0, time.time()
    with tqdm(total=sum(len(b) for b in loader.batch_sampler), unit='pair', disable=not state.is_main_process) as bar:
        for index, pixels, clip_pixels in loader:
            batch = [pairs[i] for i in index.tolist()]
            # A test split without gold responses encodes '' in their place (evaluation never reads it).
            texts = [t for p in batch for t in (p.speaker_text, p.response_text or '')]
            moments, clip, text = encode_batch(encoders, pixels, clip_pixels, texts, autocast_dtype)
            records += [make_record(p, moments[b], clip[b], text[b]) for b, p in enumerate(batch)]
            shard = index[0].item() // shard_size
            if index[-1].item() + 1 == min((shard + 1) * shard_size, len(pairs)):
                write_shard(out, shard, records)
                records = []
            bar.update(len(batch))
            count += len(batch)
    elapsed = time.time() - start
    logger.info('process %d: encoded %d pairs in %.1f s (%.2f pairs/s)', state.process_index, count, elapsed,
                count / max(elapsed, 1e-9))
    if finish(out, reader, len(pairs), shard_size, settings, info):
        logger.info('feature cache complete: %s (%d pairs)', out, len(pairs))
    return out


def define_flags():
    """Define the command-line flags (on demand, so importing this module, e.g. in tests, defines none)."""
    config_flags.DEFINE_config_file('config', None, 'config file (see configs/extract_tiny.py)', lock_config=False)
    flags.DEFINE_enum('split', 'train', list(SPLITS), 'AvaMERG split to encode: train (train.json minus the '
                      'held-out conversations), val (those), test (test/test.json)')
    flags.DEFINE_bool('overwrite', False, 'delete features made with other settings in the output folder and restart')
    flags.DEFINE_integer('limit', None, 'encode only the first N pairs (smoke tests)', lower_bound=1)
    logs.define_flags()


def main(argv):
    """Command-line entry point: bad input exits with code 2 and a message instead of a traceback."""
    del argv
    args = flags.FLAGS
    if args.config is None:
        raise app.UsageError('--config is required, e.g. --config=configs/avamerg_empath.py')
    logs.setup(args.verbose)
    extract(args.config, args.split, args.overwrite, args.limit)


if __name__ == '__main__':
    define_flags()
    cli.run(main, flags_parser=logs.parse_flags)
