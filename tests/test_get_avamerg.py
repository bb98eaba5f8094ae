"""scripts/get_avamerg.py against fake Hub repositories in the hub cache layout, offline, through huggingface_hub."""
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest

from libs.avamerg import AvaMERG
from libs.synthetic import make_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, 'scripts', 'get_avamerg.py')
RELEASE, FRAMES = 'ZhangHanXD/AvaMERG', 'SIChoi/AvaMERG_frame'
EVERYTHING = "hf download ZhangHanXD/AvaMERG --repo-type dataset --exclude '*audio*' --exclude '*.wav'"


def hub_repo(cache, repo, files, listed=()):
    """Write a dataset repository into the hub cache as huggingface_hub does: blobs, snapshot symlinks, refs/main.

    `listed`: further paths that the cached tree listing names although the snapshot lacks them (an interrupted
    download).
    """
    storage = os.path.join(cache, 'datasets--' + repo.replace('/', '--'))
    commit = hashlib.sha1(repo.encode()).hexdigest()
    os.makedirs(os.path.join(storage, 'refs'), exist_ok=True)
    with open(os.path.join(storage, 'refs', 'main'), 'w') as f:
        f.write(commit)
    for path, data in files.items():
        blob = os.path.join(storage, 'blobs', hashlib.sha256(data).hexdigest())
        os.makedirs(os.path.dirname(blob), exist_ok=True)
        with open(blob, 'wb') as f:
            f.write(data)
        link = os.path.join(storage, 'snapshots', commit, *path.split('/'))
        os.makedirs(os.path.dirname(link), exist_ok=True)
        os.symlink(os.path.relpath(blob, os.path.dirname(link)), link)
    if listed:
        tree = {p: {'size': len(files.get(p, b'')), 'blob_id': hashlib.sha1(p.encode()).hexdigest()}
                for p in list(files) + list(listed)}
        os.makedirs(os.path.join(storage, 'trees'), exist_ok=True)
        with open(os.path.join(storage, 'trees', commit + '.json'), 'w') as f:
            json.dump({'format_version': 1, 'files': tree}, f)


def zip_of(members):
    """Bytes of a zip archive holding {name: bytes}."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, 'w') as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buffer.getvalue()


def tar_gz_of(members):
    """Bytes of a .tar.gz archive holding {name: bytes}."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode='w:gz') as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def folder_files(folder, prefix='', suffix=''):
    """{prefix + name: bytes} of the files in a folder that end with suffix."""
    return {prefix + n: open(os.path.join(folder, n), 'rb').read() for n in sorted(os.listdir(folder))
            if n.endswith(suffix)}


@pytest.fixture(scope='module')
def source(tmp_path_factory):
    """A tiny synthetic AvaMERG with videos (per-modality folders) and the same dialogues with frames."""
    root = tmp_path_factory.mktemp('source')
    videos, frames = str(root / 'videos'), str(root / 'frames')
    make_dataset(videos, seed=2, dialogues=2, test_dialogues=1, size=32, frames=False, videos=True,
                 layout='per_modality')
    make_dataset(frames, seed=2, dialogues=2, test_dialogues=1, size=32)
    read = lambda name: open(os.path.join(videos, name), 'rb').read()  # noqa: E731
    release = {
        'train.json': read('train.json'), 'test/test.json': read('test/test.json'),
        # train_video.zip holds video_v5_0/ (unpacked into train_video/); the test archive holds test_video/ itself.
        'train_video.zip': zip_of(folder_files(os.path.join(videos, 'train_video', 'video_v5_0'), 'video_v5_0/')),
        'test/test_video.tar.gz': tar_gz_of(folder_files(os.path.join(videos, 'test', 'test_video', 'video_v5_0'),
                                                         'test_video/')),
        'train_audio.zip': zip_of({'audio_v5_0/x.wav': b'not fetched'}),
    }
    return {'videos': videos, 'frames': frames, 'release': release}


def run(cache, out, *flags):
    """The script, offline, on a hub cache: (exit code, stdout, stderr)."""
    env = {**os.environ, 'HF_HUB_CACHE': str(cache), 'HF_HOME': os.path.join(str(cache), 'home'),
           'HF_HUB_OFFLINE': '1'}
    done = subprocess.run([sys.executable, SCRIPT, '--out', str(out), *flags], capture_output=True, text=True,
                          env=env, cwd=ROOT)
    return done.returncode, done.stdout, done.stderr


def pairs(reader):
    """The comparable content of a reader's pairs."""
    return [(p.pair_id, p.speaker_stem, p.response_stem, p.speaker_text, p.response_text, p.emotion)
            for p in reader.pairs]


def expected_counts(root, split):
    """Dialogues, turns and media stems of a split, counted from its JSON."""
    with open(os.path.join(root, 'train.json' if split == 'train' else 'test/test.json')) as f:
        dialogues = json.load(f)
    turns = sum(len(d['turns']) for d in dialogues)
    return len(dialogues), turns, 2 * turns


def test_complete_release_is_arranged_for_the_reader(source, tmp_path):
    cache, out = tmp_path / 'cache', tmp_path / 'avamerg'
    hub_repo(str(cache), RELEASE, source['release'])
    code, stdout, stderr = run(cache, out)
    assert code == 0, stdout + stderr
    assert f'complete: {out}' in stdout
    check = json.loads((out / 'check.json').read_text())
    for split in ('train', 'test'):
        dialogues, turns, media = expected_counts(source['videos'], split)
        r = check[split]
        assert (r['dialogues'], r['turns'], r['media_needed'], r['media_found'], r['videos_found'],
                r['frames_found'], r['missing']) == (dialogues, turns, media, media, media, 0, [])
        line = f'{dialogues} dialogues, {turns} turns ({turns} with a gold response); media {media} of {media}'
        assert line in stdout
    # Annotations are links into the cache; archives are unpacked where the reader looks; audio is left alone.
    assert os.path.islink(out / 'train.json') and '/blobs/' in os.path.realpath(out / 'train.json')
    assert sorted(os.listdir(out / 'train_video' / 'video_v5_0')) == sorted(
        os.listdir(os.path.join(source['videos'], 'train_video', 'video_v5_0')))
    assert os.path.isdir(out / 'test' / 'test_video') and not os.path.exists(out / 'train_audio')
    for split in ('train', 'test'):
        assert pairs(AvaMERG(str(out), split)) == pairs(AvaMERG(source['videos'], split))
    # A rerun finds everything in place and unpacks nothing again.
    clip = out / 'train_video' / 'video_v5_0' / sorted(os.listdir(out / 'train_video' / 'video_v5_0'))[0]
    before = os.stat(clip)
    code, stdout, _ = run(cache, out)
    assert code == 0 and os.stat(clip).st_ino == before.st_ino and os.stat(clip).st_mtime_ns == before.st_mtime_ns


def test_missing_media_are_listed_by_stem(source, tmp_path):
    clips = folder_files(os.path.join(source['videos'], 'train_video', 'video_v5_0'), 'video_v5_0/')
    gone = sorted(clips)[:2]
    release = {**source['release'], 'train_video.zip': zip_of({k: v for k, v in clips.items() if k not in gone})}
    cache, out = tmp_path / 'cache', tmp_path / 'avamerg'
    hub_repo(str(cache), RELEASE, release)
    code, stdout, _ = run(cache, out)
    stems = [os.path.basename(g)[:-len('.mp4')] for g in gone]
    assert code == 2
    check = json.loads((out / 'check.json').read_text())
    assert sorted(check['train']['missing']) == stems and check['test']['missing'] == []
    assert f"2 missing: {', '.join(check['train']['missing'])}" in stdout
    assert EVERYTHING in stdout and 'offline (HF_HUB_OFFLINE)' in stdout


def test_offline_without_train_json_says_what_to_download(source, tmp_path):
    cache, out = tmp_path / 'cache', tmp_path / 'avamerg'
    hub_repo(str(cache), RELEASE, {k: v for k, v in source['release'].items() if k != 'train.json'})
    code, stdout, _ = run(cache, out)
    assert code == 2
    assert f'train: no dialogue file under {out}' in stdout
    assert 'hf download ZhangHanXD/AvaMERG train.json --repo-type dataset' in stdout
    assert f'python scripts/get_avamerg.py --out {out} again' in stdout


def test_interrupted_download_names_the_missing_files(source, tmp_path):
    cache, out = tmp_path / 'cache', tmp_path / 'avamerg'
    hub_repo(str(cache), RELEASE, {k: v for k, v in source['release'].items() if k != 'train_video.zip'},
             listed=['train_video.zip'])
    code, stdout, _ = run(cache, out)
    assert code == 2 and 'is incomplete' in stdout
    assert 'hf download ZhangHanXD/AvaMERG train_video.zip --repo-type dataset' in stdout
    # What is cached is arranged all the same: the test split is complete.
    assert json.loads((out / 'check.json').read_text())['test']['missing'] == []


def test_nothing_cached(tmp_path):
    code, stdout, _ = run(tmp_path / 'cache', tmp_path / 'avamerg')
    assert code == 2 and EVERYTHING in stdout


def test_frames_release_in_an_unknown_folder_is_linked(source, tmp_path):
    cache, out = tmp_path / 'cache', tmp_path / 'avamerg'
    hub_repo(str(cache), RELEASE, {k: v for k, v in source['release'].items() if k.startswith('t')})
    frames = folder_files(os.path.join(source['frames'], 'image_v5_0'), 'frames/train/', '.png')
    hub_repo(str(cache), FRAMES, {'AvaMERG_frame.zip': zip_of(frames)})
    code, stdout, stderr = run(cache, out, '--frames')
    assert code == 0, stdout + stderr
    assert f"train: linked {out / 'image_v5_0'} -> {out / 'AvaMERG_frame' / 'frames' / 'train'}" in stdout
    assert not os.path.exists(out / 'train_video')   # --frames fetches no train videos
    data, reference = AvaMERG(str(out), 'train', val_fraction=0), AvaMERG(source['frames'], 'train', val_fraction=0)
    assert pairs(data) == pairs(reference) and not data.skipped
    stem = data.pairs[0].response_stem
    assert np.array_equal(np.asarray(data.load_face(stem)), np.asarray(reference.load_face(stem)))


def test_unsafe_or_broken_archives_are_refused(source, tmp_path):
    cache, out = tmp_path / 'cache', tmp_path / 'avamerg'
    hub_repo(str(cache), RELEASE, {'train.json': source['release']['train.json'],
                                   'extra.zip': zip_of({'ok.txt': b'1', '../evil.txt': b'2'})})
    code, _, stderr = run(cache, out)
    assert code == 2 and "member '../evil.txt'" in stderr and 'outside the archive folder' in stderr
    assert not os.path.exists(tmp_path / 'evil.txt') and not os.path.exists(out / 'extra')
    hub_repo(str(tmp_path / 'cache2'), RELEASE, {'train.json': source['release']['train.json'],
                                                 'extra.zip': b'not a zip archive'})
    code, _, stderr = run(tmp_path / 'cache2', tmp_path / 'avamerg2')
    assert code == 2 and 'extra.zip' in stderr and 'not a readable archive' in stderr
