"""extract_features.py on a synthetic AvaMERG with tiny encoders: content, multi-process, resume, refusals, skips."""
import importlib.util
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from extract_features import extract
from libs.autoencoder import FrozenAutoencoderKL, center_crop_resize, ldm_state_dict_from_diffusers, load_autoencoder, \
    to_tensor_m11
from libs.avamerg import AvaMERG
from libs.clip_encoders import CLIPImageEncoder, CLIPTextEncoder, build_tiny_clip_text, build_tiny_clip_vision
from libs.errors import UserError
from libs.features import MANIFEST, FeatureDataset, read_manifest
from libs.synthetic import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG_FILE = os.path.join(ROOT, 'configs', 'extract_tiny.py')
FACE_SIZE = 64  # synthetic faces; the tiny config crops them to its own resolution
ENV = dict(os.environ, HF_HUB_OFFLINE='1', PYTHONPATH=ROOT)


def tiny_config(models, **data):
    """configs/extract_tiny.py for the tiny encoders in `models`, with config.data overrides."""
    spec = importlib.util.spec_from_file_location('extract_tiny', CONFIG_FILE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config(models)
    config.data.update(data)
    return config


def build_models(models, vision_seed=0):
    """Write a tiny VAE (LDM layout) and tiny CLIP text/vision models sized by the tiny config into `models`."""
    config = tiny_config(models)
    resolution = config.z_shape[-1] * 2 ** (len(config.autoencoder.block_out_channels) - 1)
    with torch.random.fork_rng():
        torch.manual_seed(0)
        vae = FrozenAutoencoderKL(config.autoencoder)
    os.makedirs(models, exist_ok=True)
    torch.save(ldm_state_dict_from_diffusers(vae.vae.state_dict()), config.autoencoder.pretrained_path)
    build_tiny_clip_text(config.clip_text.name_or_path, hidden_size=config.clip_text_dim,
                         max_length=config.num_text_tokens)
    build_tiny_clip_vision(config.clip_img.name_or_path, image_size=resolution, projection_dim=config.clip_img_dim,
                           seed=vision_seed)
    return config


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """(models folder, dataset folder): tiny encoders and a synthetic AvaMERG with several shards of pairs."""
    base = tmp_path_factory.mktemp('extract')
    models, data = str(base / 'models'), str(base / 'avamerg')
    build_models(models)
    make_dataset(data, seed=5, dialogues=6, size=FACE_SIZE)
    return models, data


@pytest.fixture(scope='module')
def baseline(tiny, tmp_path_factory):
    """Features of the whole train split, extracted in this process."""
    models, data = tiny
    out = str(tmp_path_factory.mktemp('baseline') / 'train')
    extract(tiny_config(models, root=data, train=out))
    return out


def files(out):
    """{name: bytes} of a feature folder's shards."""
    return {p.name: p.read_bytes() for p in sorted(pathlib.Path(out).glob('shard-*'))}


def manifest_without_config(out):
    """The manifest minus the resolved config (whose output path differs between runs)."""
    manifest = read_manifest(out)
    del manifest['config']
    return manifest


def num_shards(models, data):
    """(pairs, shards) of the train split under the tiny config."""
    pairs = len(AvaMERG(data, 'train'))
    return pairs, -(-pairs // tiny_config(models).data.shard_size)


def cli(models, data, out, *extra, launcher=(sys.executable,), env=None):
    """Run extract_features.py in a subprocess (through `launcher`); returns the CompletedProcess."""
    args = [*launcher, os.path.join(ROOT, 'extract_features.py'), f'--config={CONFIG_FILE}:{models}',
            f'--config.data.root={data}', f'--config.data.train={out}', *extra]
    return subprocess.run(args, cwd=ROOT, env={**ENV, **(env or {})}, capture_output=True, text=True, timeout=300)


def test_features_decode_to_their_pairs(tiny, baseline):
    models, data = tiny
    config = tiny_config(models)
    reader = AvaMERG(data, 'train')
    manifest, features = read_manifest(baseline), FeatureDataset(baseline)
    shard_size = config.data.shard_size
    assert manifest['num_pairs'] == len(features) == len(reader.pairs) > 2 * shard_size
    assert [s['pairs'] for s in manifest['shards']] == [min(shard_size, len(reader) - k)
                                                         for k in range(0, len(reader), shard_size)]
    z_channels, h, w = config.z_shape
    resolution = h * 2 ** (len(config.autoencoder.block_out_channels) - 1)
    expected = {'speaker_moments': ([2 * z_channels, h, w], 'float32'),
                'speaker_clip_img': ([1, config.clip_img_dim], 'float32'),
                'speaker_text': ([config.num_text_tokens, config.clip_text_dim], 'float16'), 'label': ([], 'int64')}
    for key, (shape, dtype) in expected.items():
        assert manifest['tensors'][key] == {'shape': shape, 'dtype': dtype}
    assert manifest['resolution'] == resolution and manifest['speaker_text'] == 'last'
    assert manifest['encoders']['clip_img'] == config.clip_img.name_or_path
    assert len(set(manifest['weights_sha256'].values())) == 3
    with open(os.path.join(baseline, 'summary.json')) as f:
        assert json.load(f) == reader.summary()

    vae = load_autoencoder(config.autoencoder.pretrained_path, config.autoencoder)
    text = CLIPTextEncoder(config.clip_text.name_or_path, local_files_only=True)
    image = CLIPImageEncoder(config.clip_img.name_or_path, local_files_only=True)
    for i, (pair, speaker, response) in enumerate(reader):
        item = features[i]
        assert (item['conversation_id'], item['turn_id'], item['speaker_stem'], item['response_stem']) == \
               (pair.conversation_id, pair.turn_id, pair.speaker_stem, pair.response_stem)
        assert (item['speaker_text_raw'], item['response_text_raw'], item['emotion']) == \
               (pair.speaker_text, pair.response_text, pair.emotion)
        assert (item['label'].item(), item['coarse_label'].item()) == (pair.label, pair.coarse_label)
        for role, face, prompt in (('speaker', speaker, pair.speaker_text), ('response', response, pair.response_text)):
            crop = center_crop_resize(face, resolution)
            torch.testing.assert_close(item[f'{role}_moments'], vae.encode_moments(to_tensor_m11(crop)[None])[0],
                                       rtol=1e-5, atol=1e-5)
            assert torch.equal(item[f'{role}_text'], text.encode([prompt])[0].half())
            # Batch size changes the float summation order of the encoders slightly, hence the tolerances.
            torch.testing.assert_close(item[f'{role}_clip_img'], image.encode([crop])[0], rtol=1e-5, atol=1e-5)


def test_two_processes_match_one(tiny, baseline, tmp_path):
    models, data = tiny
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        port = s.getsockname()[1]
    launcher = (os.path.join(os.path.dirname(sys.executable), 'accelerate'), 'launch', '--multi_gpu',
                '--num_processes', '2', '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
                '--main_process_port', str(port))
    # CPU float sums depend on the thread count, which accelerate would otherwise set to cores / processes.
    env = dict(ACCELERATE_USE_CPU='true', OMP_NUM_THREADS=str(torch.get_num_threads()))
    run = cli(models, data, str(tmp_path / 'train'), launcher=launcher, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    # Process r encoded shards r, r + 2, ...
    pairs, shards = num_shards(models, data)
    for rank in (0, 1):
        assert (f'process {rank}/2: {pairs} pairs in {shards} shards; 0 finished, {len(range(rank, shards, 2))} to '
                'encode here') in run.stderr
    assert files(str(tmp_path / 'train')) == files(baseline)
    assert manifest_without_config(str(tmp_path / 'train')) == manifest_without_config(baseline)


# Runs extraction but SIGKILLs the process halfway through writing the second shard's tensors.
KILL_DURING_SECOND_SHARD = '''
import os, signal
import libs.features
from absl import app
real_save, calls = libs.features.atomic_save_safetensors, []
def save_then_die(tensors, path, metadata=None):
    calls.append(path)
    if len(calls) == 2:
        with open(os.path.join(os.path.dirname(path), '.tmp-' + os.path.basename(path) + 'x'), 'wb') as f:
            f.write(b'half a shard')
        os.kill(os.getpid(), signal.SIGKILL)
    real_save(tensors, path, metadata)
libs.features.atomic_save_safetensors = save_then_die
import extract_features
extract_features.define_flags()
app.run(extract_features.main)
'''


def test_killed_run_resumes_to_identical_shards(tiny, baseline, tmp_path, caplog):
    models, data = tiny
    out = str(tmp_path / 'train')
    killed = cli(models, data, out, launcher=(sys.executable, '-c', KILL_DURING_SECOND_SHARD))
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert sorted(n for n in os.listdir(out) if not n.startswith('.lock')) == [
        '.tmp-shard-00001.safetensorsx', 'extraction.json', 'shard-00000.json', 'shard-00000.safetensors',
        'shard-00001.json']
    first = os.stat(os.path.join(out, 'shard-00000.safetensors'))
    with caplog.at_level('INFO'):
        extract(tiny_config(models, root=data, train=out))
    shards = num_shards(models, data)[1]
    assert f'{shards} shards; 1 finished, {shards - 1} to encode here' in caplog.text
    assert os.stat(os.path.join(out, 'shard-00000.safetensors')).st_mtime_ns == first.st_mtime_ns  # not redone
    assert not [n for n in os.listdir(out) if n.startswith('.tmp-')]
    assert files(out) == files(baseline)
    assert manifest_without_config(out) == manifest_without_config(baseline)


# Runs extraction and sends itself SIGTERM, a real signal, while the second shard's first batch is encoded.
SIGTERM_DURING_SECOND_SHARD = '''
import os, signal
import libs.extraction
from absl import app
real_encode, calls = libs.extraction.encode_batch, []
def encode_then_signal(*args):
    calls.append(1)
    if len(calls) == 3:  # batches of 3 pairs, shards of 4: the third batch is the second shard's first
        os.kill(os.getpid(), signal.SIGTERM)
    return real_encode(*args)
libs.extraction.encode_batch = encode_then_signal
import extract_features
extract_features.define_flags()
from libs import cli, logs
cli.run(extract_features.main, flags_parser=logs.parse_flags)
'''


def test_sigterm_stops_between_batches_and_the_rerun_completes_identically(tiny, baseline, tmp_path):
    models, data = tiny
    out = str(tmp_path / 'train')
    stopped = cli(models, data, out, launcher=(sys.executable, '-c', SIGTERM_DURING_SECOND_SHARD))
    shards = num_shards(models, data)[1]
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    line = stopped.stderr.strip().splitlines()[-1]
    assert line.startswith("stopped: SIGTERM after 7 pairs") and f'1 of {shards} shards finished and kept' in line
    assert 'rerun the same command to continue' in line and 'Traceback' not in stopped.stderr
    assert sorted(n for n in os.listdir(out) if n.startswith('shard-')) == ['shard-00000.json',
                                                                          'shard-00000.safetensors']
    resumed = cli(models, data, out)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert files(out) == files(baseline)
    assert manifest_without_config(out) == manifest_without_config(baseline)


def test_changed_settings_are_refused_unless_overwrite(tiny, baseline, tmp_path):
    models, data = tiny
    out = str(tmp_path / 'train')
    shutil.copytree(baseline, out)
    before = files(out)
    run = cli(models, data, out, '--config.data.shard_size=5')
    assert run.returncode == 2, run.stderr[-3000:]
    assert 'shard_size: 4 in the folder, 5 now' in run.stderr and '--overwrite' in run.stderr
    assert 'Traceback' not in run.stderr

    # Other encoder weights at the same path are noticed too.
    other = str(tmp_path / 'models')
    shutil.copytree(models, other)
    shutil.rmtree(os.path.join(other, 'clip_img'))
    build_models(other, vision_seed=1)
    with pytest.raises(UserError, match=r'weights_sha256\.clip_img: .* in the folder'):
        extract(tiny_config(other, root=data, train=out))
    with pytest.raises(UserError, match=r'pairs_sha256'):
        extract(tiny_config(models, root=data, train=out), limit=3)
    assert files(out) == before

    extract(tiny_config(models, root=data, train=out, speaker_text='history'), overwrite=True)
    text = CLIPTextEncoder(os.path.join(models, 'clip_text'), local_files_only=True)
    reader = AvaMERG(data, 'train', speaker_text='history', history_tokens=text.max_length,
                     count_tokens=text.count_tokens)
    features = FeatureDataset(out)
    assert read_manifest(out)['speaker_text'] == 'history'
    assert [features[i]['speaker_text_raw'] for i in range(len(features))] == [p.speaker_text for p in reader.pairs]
    # With a 16-token context the history is cut to the tail of the speaker's utterance; 'last' keeps all of it.
    assert [p.speaker_text for p in reader.pairs] != [p.speaker_text for p in AvaMERG(data, 'train').pairs]


def test_limit_encodes_a_prefix(tiny, baseline, tmp_path):
    models, data = tiny
    out = str(tmp_path / 'train')
    extract(tiny_config(models, root=data, train=out), limit=5)
    manifest = read_manifest(out)
    assert manifest['num_pairs'] == 5 and manifest['limit'] == 5
    assert files(out)['shard-00000.safetensors'] == files(baseline)['shard-00000.safetensors']


def test_broken_media_are_counted_skips(tiny, tmp_path):
    models, data = tiny
    root = str(tmp_path / 'avamerg')
    shutil.copytree(data, root)
    pairs = AvaMERG(root, 'train').pairs
    frames = os.path.join(root, 'image_v5_0')
    with open(os.path.join(frames, pairs[0].speaker_stem + '.png'), 'wb') as f:
        f.write(b'\x89PNG\r\n\x1a\n not really a png')
    # With a video folder present, a missing frame is looked up as a clip, which is missing too.
    os.makedirs(os.path.join(root, 'video_v5_0'))
    os.remove(os.path.join(frames, pairs[2].response_stem + '.png'))
    out = str(tmp_path / 'train')
    extract(tiny_config(models, root=root, train=out))
    with open(os.path.join(out, 'summary.json')) as f:
        summary = json.load(f)
    assert summary['skipped'] == {'missing_video': 1, 'unreadable_frame': 1}
    features = FeatureDataset(out)
    kept = [features[i]['conversation_id'] + '/' + features[i]['turn_id'] for i in range(len(features))]
    assert kept == [p.conversation_id + '/' + p.turn_id for k, p in enumerate(pairs) if k not in (0, 2)]


def test_malformed_json_names_file_dialogue_and_field(tiny, tmp_path):
    models, data = tiny
    root = str(tmp_path / 'avamerg')
    shutil.copytree(data, root)
    path = os.path.join(root, 'train.json')
    with open(path) as f:
        dialogues = json.load(f)
    del dialogues[1]['turns'][0]['response']
    with open(path, 'w') as f:
        json.dump(dialogues, f)
    out = str(tmp_path / 'train')
    with pytest.raises(UserError, match=rf"train\.json: dialogue {dialogues[1]['conversation_id']} .*'response'"):
        extract(tiny_config(models, root=root, train=out))
    assert not os.path.exists(os.path.join(out, MANIFEST))


def test_val_split_is_held_out_of_train_json_and_precision_is_recorded(tiny, tmp_path):
    models, data = tiny
    ids = {}
    for split in ('train', 'val'):
        config = tiny_config(models, root=data, val_fraction=0.8, **{split: str(tmp_path / split)})
        manifest = read_manifest(extract(config, split))
        assert manifest['split'] == split and manifest["val_fraction"] == 0.8
        assert manifest['vae_precision'] == manifest['clip_precision'] == 'float32'  # as sampling encodes
        assert manifest['caption_decoder'] == config.caption_decoder.pretrained_path
        cache = FeatureDataset(str(tmp_path / split))
        ids[split] = {cache[i]['conversation_id'] for i in range(len(cache))}
        assert {cache[i]['split'] for i in range(len(cache))} == {split}
    with open(os.path.join(data, 'train.json')) as f:
        everything = {d['conversation_id'] for d in json.load(f)}
    assert ids['train'] and ids['val'] and not ids['train'] & ids['val']
    assert ids['train'] | ids['val'] <= everything
    with pytest.raises(UserError, match='split'):
        extract(tiny_config(models, root=data), 'dev')
    with pytest.raises(UserError, match='val_fraction=1e-09 holds out none'):
        extract(tiny_config(models, root=data, val_fraction=1e-9, val=str(tmp_path / 'none')), 'val')


def test_goldless_test_split_extracts_with_empty_gold(tiny, tmp_path):
    models, _ = tiny
    data = str(tmp_path / 'avamerg')
    make_dataset(data, seed=5, dialogues=2, test_dialogues=2, size=FACE_SIZE, test_gold='none')
    config = tiny_config(models, root=data, test=str(tmp_path / 'test'))
    cache = FeatureDataset(extract(config, 'test'))
    assert len(cache) > 0
    metas = [cache[i] for i in range(len(cache))]
    assert all(m['response_text_raw'] is None and m['emotion'] is None and m['label'] == -1 for m in metas)
    assert all(m['split'] == 'test' and torch.isfinite(m['speaker_text'].float()).all() for m in metas)
