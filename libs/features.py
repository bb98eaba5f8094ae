"""The feature cache: pre-encoded AvaMERG training pairs in safetensors shards, read lazily.

Layout of a cache folder::

    manifest.json               counts, per-pair tensor shapes/dtypes, shard list, encoders, resolution, config
    shard-00000.json            per-pair metadata (ids, stems, raw texts, emotion word), one entry per pair
    shard-00000.safetensors     the pairs' tensors stacked along a leading pair dimension

A shard's ``.json`` is written before its ``.safetensors`` (both atomically), so a shard is finished iff its
safetensors file exists; an interrupted extraction resumes from ``finished_shards``. ``FeatureDataset`` memory-maps
the shards it touches (a small LRU of open files) and checks each one against the manifest on first use.
``ShuffledStream`` turns the cache into an endless, deterministic sample stream: position p of the stream is a pure
function of (seed, p), so training resumes from a stored position and every process of a distributed run reads a
disjoint slice of the same stream.
"""
import bisect
import collections
import hashlib
import json
import logging
import os
from typing import Dict, List, Optional, Sequence

import torch
from safetensors import SafetensorError, safe_open

from libs.errors import UserError
from libs.io import atomic_save_safetensors, atomic_write_json

logger = logging.getLogger(__name__)

FORMAT = 'empathdiffuser-features'
VERSION = 2  # 2: per-pair metadata carries the split (pair identity is split/conversation/turn)
MANIFEST = 'manifest.json'
TENSOR_DTYPES = {
    'speaker_moments': torch.float32,    # (2C, h, w) VAE posterior mean and log-variance of the speaker face
    'response_moments': torch.float32,   # (2C, h, w) same for the listener's response face
    'speaker_clip_img': torch.float32,   # (1, Dc) CLIP image embedding
    'response_clip_img': torch.float32,  # (1, Dc)
    'speaker_text': torch.float16,       # (T, Dtxt) CLIP text last hidden state (fp16 halves the largest tensors)
    'response_text': torch.float16,      # (T, Dtxt)
    'label': torch.int64,                # () 32-way EmpatheticDialogues emotion, -1 unknown
    'coarse_label': torch.int64,         # () 7-way AvaMERG class, -1 unknown
}
META_KEYS = ('split', 'conversation_id', 'turn_id', 'speaker_stem', 'response_stem', 'speaker_text_raw',
             'response_text_raw', 'emotion')
REEXTRACT = ('rerun extract_features.py for this split (--split=train, val or test; it skips the shards that are '
             'finished)')
SPLIT_NAMES = ('train', 'val', 'test')  # what extract_features.py --split takes


def reextract_command(root: str, split: str = None, overwrite: bool = False) -> str:
    """The command that rebuilds the cache folder ``root`` (its split from the manifest, else the folder's name)."""
    if split is None and os.path.basename(os.path.normpath(root)) in SPLIT_NAMES:
        split = os.path.basename(os.path.normpath(root))
    return (f'`python extract_features.py --config=<the config that extracted it> --split={split or "<its split>"}'
            f'{" --overwrite" if overwrite else ""}`')


def damaged_file(path: str, err: Exception, remove: str, root: str, split: str = None) -> UserError:
    """The one-line error for a cut or overwritten cache file: what, and the commands that rebuild it."""
    return UserError(f'{path} is damaged ({type(err).__name__}: {err}); delete {remove} and rerun '
                     f'{reextract_command(root, split)}, which re-encodes missing shards and rewrites the manifest')


def shard_name(index: int) -> str:
    """File stem of shard ``index``."""
    return f'shard-{index:05d}'


def _dtype_name(dtype: torch.dtype) -> str:
    """'float32' for torch.float32."""
    return str(dtype).removeprefix('torch.')


def pair_id(split: str, conversation_id: str, turn_id: str) -> str:
    """How messages name a pair: 'split/conversation_id/turn_id'."""
    return f'{split}/{conversation_id}/{turn_id}'


def nonfinite_rows(tensors: Dict[str, torch.Tensor]) -> torch.Tensor:
    """(N,) whether row i of any floating-point tensor (N, ...) holds a NaN or an infinity."""
    bad = [~torch.isfinite(t.flatten(1)).all(1) for t in tensors.values() if t.is_floating_point()]
    return torch.stack(bad).any(0)


def write_shard(root: str, index: int, records: Sequence[dict]) -> dict:
    """Write one shard from per-pair records (TENSOR_DTYPES and META_KEYS entries); returns its manifest entry.

    A shard holding a non-finite feature is refused: training would skip (or stop at) every step that draws it.
    """
    if not records:
        raise ValueError('a shard needs at least one record')
    missing = [k for k in (*TENSOR_DTYPES, *META_KEYS) if k not in records[0]]
    if missing:
        raise ValueError(f'records lack {missing}')
    tensors = {k: torch.stack([torch.as_tensor(r[k]) for r in records]).to(dtype) for k, dtype in TENSOR_DTYPES.items()}
    meta = [{k: r[k] for k in META_KEYS} for r in records]
    name = shard_name(index)
    bad = [pair_id(m['split'], m['conversation_id'], m['turn_id']) for m, b in zip(meta, nonfinite_rows(tensors)) if b]
    if bad:
        raise UserError(f'{len(bad)} pair(s) of shard {name} in {root} have non-finite (NaN/Inf) features, so the '
                        f'shard is not written: {", ".join(bad[:5])}{" ..." if len(bad) > 5 else ""}. Check those '
                        'faces and texts and the encoders\' weights')
    # Metadata first: the safetensors file, written last, is what marks the shard as finished.
    atomic_write_json(os.path.join(root, name + '.json'), meta)
    atomic_save_safetensors(tensors, os.path.join(root, name + '.safetensors'))
    return {'name': name, 'pairs': len(records)}


def finished_shards(root: str) -> List[int]:
    """Indices of the shards whose safetensors file exists (i.e. fully written)."""
    if not os.path.isdir(root):
        return []
    names = (f[len('shard-'):-len('.safetensors')] for f in os.listdir(root)
             if f.startswith('shard-') and f.endswith('.safetensors'))
    return sorted(int(n) for n in names if n.isdigit())


def tensor_spec(record: dict) -> Dict[str, dict]:
    """Per-pair shape and dtype of every tensor, as the manifest records them."""
    return {k: {'shape': list(torch.as_tensor(record[k]).shape), 'dtype': _dtype_name(dtype)}
            for k, dtype in TENSOR_DTYPES.items()}


def make_manifest(shards: Sequence[dict], tensors: Dict[str, dict], **info) -> dict:
    """A manifest from the entries ``write_shard`` returned, ``tensor_spec`` of one record and free-form info
    (encoders, resolution, config, ...)."""
    return {'format': FORMAT, 'version': VERSION, 'num_pairs': sum(s['pairs'] for s in shards),
            'tensors': dict(tensors), 'shards': list(shards), **info}


def write_manifest(root: str, manifest: dict) -> None:
    """Check a manifest for consistency and write it atomically."""
    for key in ('num_pairs', 'tensors', 'shards'):
        if key not in manifest:
            raise ValueError(f'manifest lacks {key!r}; build it with make_manifest()')
    if sum(s['pairs'] for s in manifest['shards']) != manifest['num_pairs']:
        raise ValueError('manifest num_pairs differs from the sum of its shards\' pairs')
    if set(manifest['tensors']) != set(TENSOR_DTYPES):
        raise ValueError(f'manifest tensors must be exactly {sorted(TENSOR_DTYPES)}')
    atomic_write_json(os.path.join(root, MANIFEST), {'format': FORMAT, 'version': VERSION, **manifest})


def read_manifest(root: str) -> dict:
    """Read and sanity-check ``root/manifest.json``."""
    path = os.path.join(root, MANIFEST)
    if not os.path.isfile(path):
        raise UserError(f'no feature cache at {root} ({MANIFEST} is missing): {REEXTRACT}, '
                        'or point config.data at the folder it wrote')
    try:
        with open(path, encoding='utf-8') as f:
            manifest = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:  # cut or overwritten: the cache cannot be trusted
        raise damaged_file(path, err, 'it', root) from err
    if not isinstance(manifest, dict):
        raise damaged_file(path, TypeError(f'a JSON {type(manifest).__name__}, not a manifest'), 'it', root)
    if manifest.get('format') != FORMAT or manifest.get('version') != VERSION:
        raise UserError(f'{path} is not a version-{VERSION} {FORMAT} manifest; {REEXTRACT}')
    if set(manifest['tensors']) != set(TENSOR_DTYPES):
        raise UserError(f'{path} lists tensors {sorted(manifest["tensors"])}, expected {sorted(TENSOR_DTYPES)}; '
                        f'{REEXTRACT}')
    if sum(s['pairs'] for s in manifest['shards']) != manifest['num_pairs']:
        raise UserError(f'{path}: num_pairs={manifest["num_pairs"]} but the shards hold '
                        f'{sum(s["pairs"] for s in manifest["shards"])} pairs; {REEXTRACT}')
    return manifest


# The precision the encoders of a cache ran in: fp32, as sampling and evaluation encode the speaker (docs/design.md §5).
ENCODER_PRECISION = 'float32'


def check_precision(manifest: dict, root: str) -> None:
    """Refuse features whose encoders did not run in fp32 (e.g. CLIP under bf16 autocast, as extraction once did on
    GPUs): training would learn from features that differ from the ones sampling computes."""
    used = {'VAE': manifest.get('vae_precision', ENCODER_PRECISION),
            'CLIP': manifest.get('clip_precision', manifest.get('clip_autocast', ENCODER_PRECISION))}
    other = {name: p for name, p in used.items() if p != ENCODER_PRECISION}
    if other:
        raise UserError(f'feature cache {root} was encoded with {", ".join(f"{n} in {p}" for n, p in other.items())}; '
                        f'sampling and evaluation encode in {ENCODER_PRECISION}, so {REEXTRACT} with --overwrite')


def check_training_caches(config, train_manifest: dict, val_manifest: Optional[dict] = None) -> None:
    """The caches training reads must be the splits their keys name, cut with this config's val_fraction.

    config.data.train must hold the train split (never val or test), config.data.val the val split; both record the
    val_fraction that separated them, which must still be config.data.val_fraction, or validation conversations
    would be trained on (or missing from both).
    """
    for key, manifest in (('train', train_manifest), ('val', val_manifest)):
        if manifest is None:
            continue
        root, split = config.data[key], manifest.get('split')
        if split not in (None, key):
            raise UserError(f'config.data.{key}={root} holds features of the {split} split; training reads the {key} '
                            f'split: extract it with `extract_features.py --split={key}` and point config.data.{key} '
                            'at that folder')
        made_with = manifest.get('val_fraction')
        if made_with is not None and made_with != config.data.val_fraction:
            raise UserError(f'config.data.val_fraction={config.data.val_fraction} but {root} was extracted with '
                            f'val_fraction={made_with}, so train and val would not be the same conversations: pass '
                            f'--config.data.val_fraction={made_with}, or extract train and val again with the new '
                            'value (extract_features.py --overwrite)')


class FeatureDataset(torch.utils.data.Dataset):
    """Map-style dataset over a feature cache; item i -> dict of its tensors and metadata.

    Nothing is read at construction beyond the manifest and the existence of the shard files. A shard is opened
    (memory-mapped) when one of its pairs is first requested and validated against the manifest then; at most
    ``max_open`` shards stay open (least recently used are closed).
    """

    def __init__(self, root: str, max_open: int = 4):
        self.root, self.max_open = root, max_open
        self.manifest = read_manifest(root)
        check_precision(self.manifest, root)
        self.shards = self.manifest['shards']
        absent = [s['name'] for s in self.shards
                  if not os.path.isfile(os.path.join(root, s['name'] + '.safetensors'))]
        if absent:
            raise UserError(f'feature cache {root}: {len(absent)} shard(s) listed in {MANIFEST} are missing '
                            f'(first: {absent[0]}.safetensors); {REEXTRACT}')
        self.offsets = [0]
        for s in self.shards:
            self.offsets.append(self.offsets[-1] + s['pairs'])
        self._open = collections.OrderedDict()  # shard index -> (safe_open handle, metadata list)

    def __len__(self):
        return self.manifest['num_pairs']

    @property
    def shard_sizes(self) -> List[int]:
        """Pairs per shard, in shard order."""
        return [s['pairs'] for s in self.shards]

    @property
    def open_shards(self) -> List[int]:
        """Indices of the currently open shards (for tests and diagnostics)."""
        return list(self._open)

    def __getstate__(self):
        # Open file handles cannot cross into DataLoader worker processes; each worker opens its own.
        return {**self.__dict__, '_open': collections.OrderedDict()}

    def _shard(self, k: int):
        """Open handle and metadata of shard k, through the LRU."""
        if k in self._open:
            self._open.move_to_end(k)
            return self._open[k]
        entry = self.shards[k]
        path = os.path.join(self.root, entry['name'])
        split = self.manifest.get('split')
        try:
            handle = safe_open(path + '.safetensors', 'pt')
        except SafetensorError as err:  # 'incomplete metadata', 'invalid header length': a cut or overwritten file
            raise damaged_file(path + '.safetensors', err, 'it', self.root, split) from err
        self._check(handle, entry, path)
        try:
            with open(path + '.json', encoding='utf-8') as f:
                meta = json.load(f)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise damaged_file(path + '.json', err, f'it and {entry["name"]}.safetensors', self.root, split) from err
        if len(meta) != entry['pairs']:
            raise UserError(f'{path}.json has {len(meta)} entries, the manifest says {entry["pairs"]}; {REEXTRACT}')
        self._open[k] = (handle, meta)
        if len(self._open) > self.max_open:
            _, (old, _) = self._open.popitem(last=False)
            old.__exit__(None, None, None)
        return self._open[k]

    def _check(self, handle, entry, path):
        """Raise a UserError naming the shard if its tensors disagree with the manifest."""
        if set(handle.keys()) != set(TENSOR_DTYPES):
            raise UserError(f'{path}.safetensors holds {sorted(handle.keys())}, expected {sorted(TENSOR_DTYPES)}; '
                            f'{REEXTRACT}')
        for key, spec in self.manifest['tensors'].items():
            found = handle.get_slice(key).get_shape()
            expected = [entry['pairs'], *spec['shape']]
            if list(found) != expected:
                raise UserError(f'{path}.safetensors: {key} has shape {list(found)}, the manifest says {expected} '
                                f'({entry["pairs"]} pairs of {spec["shape"]}); {REEXTRACT}')

    def labels(self) -> torch.Tensor:
        """(num_pairs,) 32-way emotion labels of every pair (-1 unknown), read from each shard's label tensor."""
        return torch.cat([self._shard(k)[0].get_slice('label')[:] for k in range(len(self.shards))])

    def nonfinite_pairs(self, indices: Sequence[int]) -> List[str]:
        """Ids ('split/conversation/turn') of the pairs among ``indices`` with a NaN or infinite feature."""
        bad = []
        for i in indices:
            item = self[i]
            if nonfinite_rows({k: item[k][None] for k in TENSOR_DTYPES if item[k].is_floating_point()})[0]:
                bad.append(pair_id(item['split'], item['conversation_id'], item['turn_id']))
        return bad

    def locate(self, i: int):
        """(shard index, row) of pair i."""
        if not 0 <= i < len(self):
            raise IndexError(f'pair {i} is out of range for a cache of {len(self)} pairs')
        k = bisect.bisect_right(self.offsets, i) - 1
        return k, i - self.offsets[k]

    def __getitem__(self, i: int) -> dict:
        k, row = self.locate(i)
        handle, meta = self._shard(k)
        item = {key: handle.get_slice(key)[row:row + 1][0] for key in TENSOR_DTYPES}
        item.update(meta[row])
        return item


def check_finite(dataset: FeatureDataset, indices: Sequence[int], what: str) -> None:
    """Refuse a cache whose pairs ``indices`` hold NaN or infinite features (naming them and how to rebuild it)."""
    bad = dataset.nonfinite_pairs(indices)
    if bad:
        raise UserError(f'non-finite (NaN/Inf) features in {len(bad)} pair(s) of {what}={dataset.root}: '
                        f'{", ".join(bad[:5])}{" ..." if len(bad) > 5 else ""}; re-extract it with '
                        f'{reextract_command(dataset.root, dataset.manifest.get("split"), overwrite=True)}, which '
                        'refuses such shards')


# ----------------------------------------------------------------------------------------------------------------
# Deterministic shuffled stream and its per-process slices
# ----------------------------------------------------------------------------------------------------------------

def derive_seed(*parts) -> int:
    """A 64-bit seed from any tuple of ints/strings (stable across runs, processes and platforms)."""
    digest = hashlib.sha256(repr(tuple(parts)).encode()).digest()
    return int.from_bytes(digest[:8], 'little')


class ShuffledStream:
    """Endless sequence of pair indices: epoch e is a shuffle of every pair seeded by (seed, e).

    Shards are shuffled, grouped into windows of ``window`` shards, and pairs are shuffled within each window, so
    reading stays local to ``window`` shards at a time while every batch mixes pairs from several shards
    (``window >= number of shards`` gives a full global shuffle).
    """

    def __init__(self, shard_sizes: Sequence[int], seed: int, window: int):
        self.sizes, self.seed, self.window = list(shard_sizes), seed, max(1, window)
        self.num_pairs = sum(self.sizes)
        if self.num_pairs == 0:
            raise UserError('the feature cache holds no pairs')
        self.offsets = [0]
        for n in self.sizes:
            self.offsets.append(self.offsets[-1] + n)
        self._epoch, self._perm = None, None

    def permutation(self, epoch: int) -> torch.Tensor:
        """The (num_pairs,) order of pair indices in ``epoch``."""
        g = torch.Generator().manual_seed(derive_seed('stream', self.seed, epoch))
        shard_order = torch.randperm(len(self.sizes), generator=g).tolist()
        parts = []
        for w in range(0, len(shard_order), self.window):
            window = shard_order[w:w + self.window]
            pairs = torch.cat([torch.arange(self.offsets[k], self.offsets[k + 1]) for k in window])
            parts.append(pairs[torch.randperm(len(pairs), generator=g)])
        return torch.cat(parts)

    def index(self, position: int) -> int:
        """Pair index at stream position ``position`` (epochs follow each other without gaps)."""
        epoch, offset = divmod(position, self.num_pairs)
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, self.permutation(epoch)
        return int(self._perm[offset])


class StreamDataset(torch.utils.data.Dataset):
    """Indexed by stream position: item p is the pair at position p of the stream, plus its ``position``."""

    def __init__(self, features: FeatureDataset, stream: ShuffledStream):
        self.features, self.stream = features, stream

    def __len__(self):
        return self.stream.num_pairs

    def __getitem__(self, position: int) -> dict:
        return dict(self.features[self.stream.index(position)], position=position)


def rank_positions(start: int, step: int, global_batch: int, accum: int, rank: int, world: int) -> List[List[int]]:
    """Stream positions of one process's micro-batches for optimizer step ``step`` counted from position ``start``.

    Step s consumes positions [start + s·G, start + (s+1)·G); micro-batch m of it is split evenly over the
    processes, so the union over processes of each micro-batch is independent of the number of processes.
    """
    micro = global_batch // accum
    per_rank = micro_batch_size(global_batch, accum, world)
    base = start + step * global_batch
    return [list(range(base + m * micro + rank * per_rank, base + m * micro + (rank + 1) * per_rank))
            for m in range(accum)]


def micro_batch_size(global_batch: int, accum: int, world: int) -> int:
    """Pairs per process and accumulation step; the global batch must split evenly."""
    if global_batch % (accum * world):
        raise UserError(f'train.batch_size={global_batch} is not divisible by grad_accum × processes = '
                        f'{accum} × {world}; choose a batch size that is')
    return global_batch // (accum * world)


class RankSampler(torch.utils.data.Sampler):
    """Yields this process's stream positions, micro-batch after micro-batch, forever, from position ``start``."""

    def __init__(self, start: int, global_batch: int, accum: int, rank: int, world: int):
        micro_batch_size(global_batch, accum, world)
        self.args = (start, global_batch, accum, rank, world)

    def __iter__(self):
        start, global_batch, accum, rank, world = self.args
        step = 0
        while True:
            for micro in rank_positions(start, step, global_batch, accum, rank, world):
                yield from micro
            step += 1
