"""Feature cache: shard/manifest round trips, lazy reading, deterministic cross-shard shuffling, validation errors."""
import json
import os
import pickle

import pytest
import torch

from libs.errors import UserError
from libs.features import (MANIFEST, META_KEYS, TENSOR_DTYPES, FeatureDataset, RankSampler, ShuffledStream,
                           StreamDataset, check_training_caches, finished_shards, make_manifest, rank_positions, read_manifest, tensor_spec,
                           write_manifest, write_shard)

SHAPES = dict(moments=(8, 4, 4), clip=(1, 6), text=(5, 7))


def random_record(i, g):
    """One pair with random tensors and metadata derived from its index."""
    return dict(speaker_moments=torch.randn(SHAPES['moments'], generator=g),
                response_moments=torch.randn(SHAPES['moments'], generator=g),
                speaker_clip_img=torch.randn(SHAPES['clip'], generator=g),
                response_clip_img=torch.randn(SHAPES['clip'], generator=g),
                speaker_text=torch.randn(SHAPES['text'], generator=g),
                response_text=torch.randn(SHAPES['text'], generator=g),
                label=i % 32 - 1, coarse_label=i % 7, split='train',
                conversation_id=f'{i // 3:05d}', turn_id=str(i % 3), speaker_stem=f'dia{i // 3:05d}utt{2 * (i % 3)}_1',
                response_stem=f'dia{i // 3:05d}utt{2 * (i % 3) + 1}_2', speaker_text_raw=f'speaker {i}',
                response_text_raw=f'response {i} — ok', emotion='anxious')


def write_cache(root, sizes, seed=0):
    """A cache with shards of the given sizes; returns all records in order."""
    g = torch.Generator().manual_seed(seed)
    records, entries = [], []
    for k, n in enumerate(sizes):
        shard = [random_record(len(records) + j, g) for j in range(n)]
        entries.append(write_shard(root, k, shard))
        records += shard
    write_manifest(root, make_manifest(entries, tensor_spec(records[0]), resolution=32, encoders={'vae': 'tiny'}))
    return records


def test_round_trip_dtypes_and_metadata(tmp_path):
    records = write_cache(str(tmp_path), [4, 3, 5])
    data = FeatureDataset(str(tmp_path))
    assert len(data) == 12 and data.shard_sizes == [4, 3, 5]
    for i in (0, 3, 4, 6, 7, 11):
        item, rec = data[i], records[i]
        for key, dtype in TENSOR_DTYPES.items():
            assert item[key].dtype == dtype
            assert torch.equal(item[key], torch.as_tensor(rec[key]).to(dtype)), (i, key)
        assert {k: item[k] for k in META_KEYS} == {k: rec[k] for k in META_KEYS}
    manifest = read_manifest(str(tmp_path))
    assert manifest['num_pairs'] == 12 and manifest['resolution'] == 32
    assert manifest['tensors']['speaker_text'] == {'shape': [5, 7], 'dtype': 'float16'}
    assert finished_shards(str(tmp_path)) == [0, 1, 2]


def test_reads_lazily_with_bounded_lru(tmp_path):
    write_cache(str(tmp_path), [2, 2, 2, 2])
    data = FeatureDataset(str(tmp_path), max_open=2)
    assert data.open_shards == []
    data[5]
    assert data.open_shards == [2]
    data[0], data[3], data[7]
    assert data.open_shards == [1, 3]          # shard 0 was least recently used
    clone = pickle.loads(pickle.dumps(data))  # what a DataLoader worker receives: no open handles
    assert clone.open_shards == [] and torch.equal(clone[6]['label'], data[6]['label'])


def test_shard_is_finished_only_when_its_safetensors_exists(tmp_path):
    write_cache(str(tmp_path), [2, 2])
    os.remove(tmp_path / 'shard-00001.safetensors')   # as if killed between the .json and the .safetensors
    assert finished_shards(str(tmp_path)) == [0]
    with pytest.raises(UserError, match='shard-00001.safetensors.*extract_features.py'):
        FeatureDataset(str(tmp_path))


def test_manifest_validation_errors(tmp_path):
    with pytest.raises(UserError, match='manifest.json is missing'):
        FeatureDataset(str(tmp_path))
    write_cache(str(tmp_path), [3, 2])
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    manifest['shards'][1]['pairs'] = 3   # count disagrees with the file
    manifest['num_pairs'] = 6
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    data = FeatureDataset(str(tmp_path))
    data[0]
    with pytest.raises(UserError, match=r'shard-00001\.safetensors: speaker_moments has shape \[2, 8, 4, 4\].*'
                                        r'\[3, 8, 4, 4\].*extract_features'):
        data[4]
    manifest['shards'][1]['pairs'], manifest['num_pairs'] = 2, 5
    manifest['tensors']['speaker_text']['shape'] = [77, 7]  # wrong per-pair shape
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match=r'shard-00000\.safetensors: speaker_text'):
        FeatureDataset(str(tmp_path))[0]
    manifest['num_pairs'] = 9
    (tmp_path / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(UserError, match='num_pairs=9 but the shards hold 5'):
        read_manifest(str(tmp_path))


def test_stream_shuffles_across_shards_deterministically():
    sizes = [5, 3, 6, 4, 2]
    stream = ShuffledStream(sizes, seed=7, window=2)
    epoch0 = [stream.index(p) for p in range(20)]
    assert sorted(epoch0) == list(range(20)) and epoch0 != list(range(20))
    assert epoch0 == [ShuffledStream(sizes, seed=7, window=2).index(p) for p in range(20)]
    assert epoch0 != [ShuffledStream(sizes, seed=8, window=2).index(p) for p in range(20)]
    epoch1 = [stream.index(p) for p in range(20, 40)]
    assert sorted(epoch1) == list(range(20)) and epoch1 != epoch0
    # Resuming at any position continues the same sequence, even from a fresh object.
    assert [ShuffledStream(sizes, seed=7, window=2).index(p) for p in range(13, 27)] == (epoch0 + epoch1)[13:27]
    # Windows of 2 shards: the epoch runs through the pairs of 2 shards at a time, interleaved.
    offsets = [0, 5, 8, 14, 18, 20]
    shard_of = lambda i: max(k for k in range(len(sizes)) if offsets[k] <= i)
    labels = [shard_of(i) for i in epoch0]
    order = list(dict.fromkeys(labels))
    n_first = sizes[order[0]] + sizes[order[1]]
    assert set(labels[:n_first]) == set(order[:2])
    assert sum(a != b for a, b in zip(labels, labels[1:n_first])) > 1   # not one shard after the other
    full = ShuffledStream(sizes, seed=7, window=len(sizes))
    assert len({shard_of(full.index(p)) for p in range(6)}) >= 3        # a global shuffle mixes more shards at once


def test_rank_slices_are_disjoint_and_cover_the_global_batch():
    single = rank_positions(100, 3, global_batch=8, accum=2, rank=0, world=1)
    ranks = [rank_positions(100, 3, global_batch=8, accum=2, rank=r, world=2) for r in range(2)]
    assert single == [[124, 125, 126, 127], [128, 129, 130, 131]]
    for m in range(2):
        assert sorted(ranks[0][m] + ranks[1][m]) == single[m] and not set(ranks[0][m]) & set(ranks[1][m])
    sampler = iter(RankSampler(start=100, global_batch=8, accum=2, rank=1, world=2))
    first = [next(sampler) for _ in range(8)]
    assert first == [102, 103, 106, 107, 110, 111, 114, 115]
    with pytest.raises(UserError, match='not divisible'):
        RankSampler(0, global_batch=6, accum=2, rank=0, world=2)


def test_stream_dataset_reads_the_pair_at_each_position(tmp_path):
    records = write_cache(str(tmp_path), [3, 3])
    data = FeatureDataset(str(tmp_path))
    stream = ShuffledStream(data.shard_sizes, seed=1, window=1)
    view = StreamDataset(data, stream)
    item = view[8]
    i = stream.index(8)
    assert item['position'] == 8 and item['speaker_text_raw'] == records[i]['speaker_text_raw']
    loader = torch.utils.data.DataLoader(view, batch_size=2, sampler=RankSampler(4, 4, 1, 0, 1))
    batch = next(iter(loader))
    assert batch['position'].tolist() == [4, 5] and batch['speaker_moments'].shape == (2, *SHAPES['moments'])


def cache_with(root, **info):
    """A one-shard cache whose manifest carries ``info`` (split, val_fraction, precisions, ...)."""
    g = torch.Generator().manual_seed(0)
    records = [random_record(i, g) for i in range(2)]
    write_manifest(root, make_manifest([write_shard(root, 0, records)], tensor_spec(records[0]), **info))
    return read_manifest(root)


def test_features_from_bf16_encoders_are_refused_where_read(tmp_path):
    cache_with(str(tmp_path / 'ok'), vae_precision='float32', clip_precision='float32')
    assert len(FeatureDataset(str(tmp_path / 'ok'))) == 2
    for key in ('clip_precision', 'clip_autocast'):  # clip_autocast: caches written before fp32 was the rule
        root = str(tmp_path / key)
        cache_with(root, vae_precision='float32', **{key: 'bfloat16'})
        with pytest.raises(UserError, match=r'encoded with CLIP in bfloat16; sampling and evaluation encode in '
                                            r'float32, so rerun extract_features\.py'):
            FeatureDataset(root)


def test_training_caches_must_be_their_splits_with_the_same_val_fraction(tmp_path):
    from common import d
    config = d(data=d(train=str(tmp_path / 'train'), val=str(tmp_path / 'val'), val_fraction=0.02))
    train = cache_with(config.data.train, split='train', val_fraction=0.02)
    val = cache_with(config.data.val, split='val', val_fraction=0.02)
    check_training_caches(config, train, val)
    check_training_caches(config, train)
    test = cache_with(str(tmp_path / 'test'), split='test')
    with pytest.raises(UserError, match=r'config\.data\.train=.*test.* holds features of the test split; .*'
                                        r'extract_features\.py --split=train'):
        check_training_caches(config, test, val)
    with pytest.raises(UserError, match=r'config\.data\.train=.* holds features of the val split'):
        check_training_caches(config, val, val)
    with pytest.raises(UserError, match=r'config\.data\.val=.* holds features of the train split'):
        check_training_caches(config, train, train)
    config.data.val_fraction = 0.05
    with pytest.raises(UserError, match=r'config\.data\.val_fraction=0\.05 but .*train was extracted with '
                                        r'val_fraction=0\.02.*--config\.data\.val_fraction=0\.02'):
        check_training_caches(config, train, val)
