"""Bad input and hostile conditions give one clean error line and lose nothing: every case goes through the entry
points' real error path (libs.cli), asserting the exit code, that the message names the problem, that no traceback is
printed and that the files already written are unchanged. One tiny training run and one tiny dataset are shared."""
import argparse
import collections
import contextlib
import errno
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from absl import flags
from PIL import Image
from safetensors.torch import load_file, save_file

import eval_avamerg
import extract_features
import sample_multi
import train_empath
from common import tiny
from configs.extract_tiny import get_config as extraction_config
from libs import cli, config_check, evaluation, io, runlock, trainer, training_loop
from libs.errors import UserError
from libs.features import finished_shards
from libs.synthetic import make_dataset
# The tiny components and feature caches of the training tests, and their one-thread setting (fixtures).
from test_train import ENV, ROOT, free_port, one_thread, tiny_config, tiny_root, write_features  # noqa: F401

USER = 2
DiskUsage = collections.namedtuple('DiskUsage', 'total used free')


# ----------------------------------------------------------------------------------------------------------------
# Helpers: run an entry point in this process, snapshot folders
# ----------------------------------------------------------------------------------------------------------------

def run_main(module, argv, capsys):
    """``cli.run(module.main, argv)`` with the script's flags defined for this call only: (exit code, stderr)."""
    before = set(flags.FLAGS)
    module.define_flags()
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.run(module.main, [f'{module.__name__}.py', *argv])
    finally:
        flags.FLAGS.unparse_flags()
        for name in set(flags.FLAGS) - before:  # sample_multi.py, train_empath.py, ... all define --config
            delattr(flags.FLAGS, name)
    return exit_info.value.code, capsys.readouterr().err


def run_call(fn, capsys, *args, **kwargs):
    """``cli.call`` of fn: (exit code, stderr)."""
    code = cli.call(lambda: fn(*args, **kwargs))
    return code, capsys.readouterr().err


def assert_user_error(code, err, *words, exit_code=USER):
    """Exit code 2 (or the given one), one error line naming every word, no traceback."""
    lines = [line for line in err.splitlines() if line.startswith('error')]
    assert code == exit_code, err[-3000:]
    assert len(lines) == 1 and 'Traceback' not in err, err[-3000:]
    for word in words:
        assert word in lines[0], (word, lines[0])


LOGS = ('log.txt',)  # appended to by every attempt; compared as "only grew"
LOCK_FILES = (runlock.LOCK,)  # the empty lock file stays once a run has locked the folder


def snapshot(folder):
    """{relative path: (sha256, mtime_ns)} of every file under folder; logs as their bytes."""
    out = {}
    for base, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(base, name)
            rel = os.path.relpath(path, folder)
            if name in LOCK_FILES:
                continue
            with open(path, 'rb') as f:
                data = f.read()
            out[rel] = data if name in LOGS else (hashlib.sha256(data).hexdigest(), os.stat(path).st_mtime_ns)
    return out


def assert_unchanged(before, after):
    """Every file of `before` is unchanged in `after` (logs may only have grown); nothing was added but logs."""
    for rel, value in before.items():
        assert rel in after, f'{rel} was removed'
        if isinstance(value, bytes):
            assert after[rel].startswith(value), f'{rel} lost lines'
        else:
            assert after[rel] == value, f'{rel} changed'
    assert set(after) <= set(before) | set(LOGS), set(after) - set(before)


# ----------------------------------------------------------------------------------------------------------------
# One tiny training run (4 steps, checkpoints 2 and 4), copied for each resume case
# ----------------------------------------------------------------------------------------------------------------

RUN = dict(n_steps=4, ckpt_every=2, val_every=2, log_every=1, keep_last=5, val_pairs=8, sample_every=0)


def run_config(root, workdir, **train):
    config = tiny_config(root, workdir, **{**RUN, **train})
    config.optimizer.warmup_steps = 0  # the logged lr is then the base lr
    return config


@pytest.fixture(scope='module')
def base_run(tiny_root, tmp_path_factory):
    """The workdir of a finished 4-step run."""
    workdir = tmp_path_factory.mktemp('base')
    train_empath.train(run_config(tiny_root, workdir))
    return workdir


@pytest.fixture
def run_copy(base_run, tmp_path):
    """A copy of the 4-step run's workdir and its run folder."""
    workdir = tmp_path / 'work'
    shutil.copytree(base_run, workdir)
    return workdir, workdir / 'avamerg_tiny'


def read_metrics(run):
    with open(run / 'metrics.jsonl') as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------------------------------------
# Flags and config files: one line, exit 2 (absl alone exits 1 with a 40-line traceback for config errors)
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('argv,words', [
    (['--config.train.n_stepz=5'], ['--config.train.n_stepz', 'no key train.n_stepz',
                                    'did you mean --config.train.n_steps']),
    (['--config.train.n_steps=abc'], ['--config.train.n_steps=abc', 'invalid literal']),
    (['--no_such_flag=1'], ['no_such_flag']),
])
def test_flag_errors_are_one_line(argv, words, tiny_root, tmp_path, capsys):
    code, err = run_main(train_empath, [f'--config=configs/avamerg_tiny.py:{tiny_root}', f'--config.workdir={tmp_path}',
                                        *argv], capsys)
    assert_user_error(code, err, *words)
    assert os.listdir(tmp_path) == []


def test_missing_or_raising_config_file(tmp_path, capsys):
    code, err = run_main(train_empath, [f'--config={tmp_path}/nope.py'], capsys)
    assert_user_error(code, err, 'no such config file', 'nope.py')
    bad = tmp_path / 'raising.py'
    bad.write_text('def get_config():\n    return {}["missing"]\n')
    code, err = run_main(sample_multi, ['--mode=t2i', f'--config={bad}', '--config.seed=1'], capsys)
    assert_user_error(code, err, 'raised KeyError', 'raising.py:2')
    code, err = run_main(sample_multi, [], capsys)   # a required flag missing
    assert_user_error(code, err, '--mode must have a value')


@pytest.mark.parametrize('key,value,wanted', [
    ('optimizer.lr', 'nan', 'finite number > 0'), ('optimizer.lr', '-1', 'finite number > 0'),
    ('train.batch_size', '0', 'integer >= 1'), ('train.ckpt_every', '0', 'integer >= 1'),
    ('train.log_every', '0', 'integer >= 1'), ('train.ema_rate', '2.0', '< 1'), ('train.n_steps', '-5', '>= 1'),
    ('train.p_drop_both', '0.95', 'at most 1'), ('train.batch_size', '9', 'not divisible by train.grad_accum'),
    ('seed', '-1', 'seed=-1 (must be a whole number from 0 to 9223372036854775807)'),
])
def test_bad_config_values_are_refused_before_anything_is_built(key, value, wanted, tiny_root, tmp_path, capsys):
    extra = ['--config.train.grad_accum=2'] if 'divisible' in wanted else []
    code, err = run_main(train_empath, [f'--config=configs/avamerg_tiny.py:{tiny_root}', f'--config.workdir={tmp_path}',
                                        f'--config.{key}={value}', *extra], capsys)
    assert_user_error(code, err, key.split('.')[-1], wanted)
    assert os.listdir(tmp_path) == []  # not even the run folder


@pytest.mark.parametrize('seed', [-1, 0, 7, 2 ** 63])
def test_one_seed_rule_for_configs_and_the_web_app(seed, tiny_root):
    import app
    config = tiny_config(tiny_root, 'unused')
    config.seed = seed
    refused_by_config = any(p.startswith('seed=') for p in config_check.problems(config, 'model'))
    try:
        app.request_config(config, 4, float(seed))
        refused_by_app = False
    except UserError as err:
        refused_by_app = True
        assert str(err) == f'the seed must be a whole number from 0 to {2 ** 63 - 1}, got {float(seed):g}'
    assert refused_by_config == refused_by_app == (seed < 0 or seed >= 2 ** 63)


def test_sampling_config_is_checked(tiny_models, tmp_path, capsys):
    config = tiny(tiny_models)
    config.sample.sample_steps = 0
    code, err = run_call(sample_multi.sample, capsys, config, 't', None, None, 1, 1, str(tmp_path / 'out'))
    assert_user_error(code, err, 'sample.sample_steps=0')
    assert not (tmp_path / 'out').exists()


# ----------------------------------------------------------------------------------------------------------------
# Resume: honest about settings, tolerant of torn metrics, falls back over broken checkpoints
# ----------------------------------------------------------------------------------------------------------------

def test_resume_applies_and_logs_a_new_learning_rate(tiny_root, run_copy):
    workdir, run = run_copy
    config = run_config(tiny_root, workdir, n_steps=6)
    config.optimizer.lr = 5e-4
    train_empath.train(config)
    logs = {m['step']: m['lr'] for m in read_metrics(run) if 'lr' in m}
    assert logs[4] == pytest.approx(1e-3) and logs[6] == pytest.approx(5e-4)
    state = torch.load(run / 'ckpts' / '6.ckpt' / 'training_state.pt', weights_only=True)
    assert {g['initial_lr'] for g in state['optimizer']['param_groups']} == {5e-4, 5e-4 * config.optimizer
                                                                              .condition_lr_scale}
    assert json.loads((run / 'config.json').read_text())['optimizer']['lr'] == 5e-4
    log = (run / 'log.txt').read_text()
    assert 'resuming with changed settings (applied): ' in log and 'optimizer.lr: 0.001 -> 0.0005' in log
    assert 'train.n_steps: 4 -> 6' in log


@pytest.mark.parametrize('change,named', [
    (dict(batch_size=16), 'train.batch_size: 8 -> 16'),
    (dict(p_drop_face=0.2), 'train.p_drop_face: 0.05 -> 0.2'),
    (dict(nnet_depth=4), 'nnet.depth: 2 -> 4'),   # another network shape: no size-mismatch traceback
])
def test_resume_refuses_settings_that_cannot_change(change, named, tiny_root, run_copy, capsys):
    workdir, run = run_copy
    config = run_config(tiny_root, workdir, n_steps=6, **{k: v for k, v in change.items() if k != 'nnet_depth'})
    if 'nnet_depth' in change:
        config.nnet.depth = change['nnet_depth']
    before = snapshot(run)
    code, err = run_call(train_empath.train, capsys, config)
    assert_user_error(code, err, 'cannot resume', named, 'another config.name')
    assert_unchanged(before, snapshot(run))
    assert 'error: cannot resume' in (run / 'log.txt').read_text()  # the run's log has the reason too


def test_torn_metrics_line_is_skipped_on_resume(tiny_root, run_copy):
    workdir, run = run_copy
    with open(run / 'metrics.jsonl', 'a') as f:
        f.write('{"step": 5, "lo')   # a crash (or a full disk) in the middle of an append
    train_empath.train(run_config(tiny_root, workdir, n_steps=6))
    assert [m['step'] for m in read_metrics(run) if 'loss' in m] == [1, 2, 3, 4, 5, 6]
    assert 'skipping a torn line' in (run / 'log.txt').read_text()


def test_killed_metrics_rewrite_keeps_the_history(tiny_root, run_copy, monkeypatch):
    """truncate_metrics writes a temp file and renames it: dying before the rename loses nothing."""
    workdir, run = run_copy
    before = (run / 'metrics.jsonl').read_bytes()

    def die(fd):
        raise SystemExit('killed')   # stands in for SIGKILL between the write and the rename
    monkeypatch.setattr(os, 'fsync', die)
    with pytest.raises(SystemExit):
        training_loop.truncate_metrics(str(run / 'metrics.jsonl'), 2)
    assert (run / 'metrics.jsonl').read_bytes() == before and before.count(b'\n') == len(read_metrics(run)) > 4


def test_resume_falls_back_over_a_corrupt_checkpoint(tiny_root, run_copy, capsys):
    workdir, run = run_copy
    newest = run / 'ckpts' / '4.ckpt' / 'nnet_ema.safetensors'
    newest.write_bytes(newest.read_bytes()[:100])   # cut short, as by a failing disk
    state = train_empath.train(run_config(tiny_root, workdir, n_steps=6))
    log = (run / 'log.txt').read_text()
    assert 'skipping checkpoint' in log and '4.ckpt' in log and 'SafetensorError' in log
    assert 'resumed from step 2' in log and state['step'] == 6
    # Every checkpoint broken: refused, nothing trained from scratch over the run.
    for step in trainer.checkpoints(str(run)):
        (run / 'ckpts' / f'{step}.ckpt' / 'training_state.pt').write_bytes(b'')
    before = snapshot(run)
    code, err = run_call(train_empath.train, capsys, run_config(tiny_root, workdir, n_steps=8))
    assert_user_error(code, err, 'no checkpoint of', 'loads')
    assert_unchanged(before, snapshot(run))



class NotATensor:
    """A class a hostile or foreign checkpoint might pickle (torch.load(weights_only=True) refuses it)."""


def foreign_file(kind):
    """What a training_state.pt / rng-0.pt that training did not write may hold, and the words its warning names."""
    if kind == 'object':
        return {'step': 4, 'args': argparse.Namespace(lr=1e-4)}, 'argparse.Namespace'
    if kind == 'callable':
        return {'step': 4, 'hook': NotATensor}, 'NotATensor'
    if kind == 'list':
        return [torch.zeros(2)], 'a list'
    return {'torch': torch.zeros(2)}, 'missing'   # a dict of tensors of the wrong structure


@pytest.mark.parametrize('name', ['training_state.pt', 'rng-0.pt'])
@pytest.mark.parametrize('kind', ['object', 'callable', 'list', 'structure'])
def test_resume_skips_a_checkpoint_file_training_did_not_write(name, kind, tiny_root, run_copy):
    """Not a cut file but a foreign one: reported and skipped for the previous checkpoint, never a traceback."""
    workdir, run = run_copy
    content, named = foreign_file(kind)
    if name == 'rng-0.pt' and kind == 'structure':
        named = 'not the RNG state'
    elif name == 'rng-0.pt' and kind == 'list':
        named = 'not the RNG state training writes (a list)'
    torch.save(content, run / 'ckpts' / '4.ckpt' / name)
    state = train_empath.train(run_config(tiny_root, workdir, n_steps=6))
    log = (run / 'log.txt').read_text()
    warning = next(line for line in log.splitlines() if 'skipping checkpoint' in line)
    assert '4.ckpt' in warning and name in warning and named in warning, warning
    assert 'Weights only load failed' not in log   # torch's paragraph is summed up by the blocked object's name
    assert 'resumed from step 2' in log and state['step'] == 6


# ----------------------------------------------------------------------------------------------------------------
# Locks: one job per run / evaluation / feature folder
# ----------------------------------------------------------------------------------------------------------------

def test_second_run_on_a_run_folder_is_refused(tiny_root, run_copy, capsys):
    workdir, run = run_copy
    before = snapshot(run)
    with runlock.hold(str(run), 'training run'):   # another run holds the folder (an OS lock, as across processes)
        code, err = run_call(train_empath.train, capsys, run_config(tiny_root, workdir, n_steps=6))
    assert_user_error(code, err, f'{run} is in use by another training run', f'pid {os.getpid()}',
                      socket.gethostname())
    assert_unchanged(before, snapshot(run))


def test_stale_lock_of_a_dead_process_is_taken_over(tiny_root, run_copy, caplog):
    workdir, run = run_copy
    dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'], capture_output=True, text=True)
    holder = dict(pid=int(dead.stdout), host=socket.gethostname(), started='earlier', command='train_empath.py')
    (run / runlock.HOLDER).write_text(json.dumps(holder))   # its OS lock died with it
    assert train_empath.train(run_config(tiny_root, workdir, n_steps=5))['step'] == 5
    assert f'taking over the lock of pid {holder["pid"]}' in caplog.text
    assert not (run / runlock.HOLDER).exists()   # released at the end


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """A small synthetic AvaMERG (train and test splits) for extraction and evaluation."""
    root = str(tmp_path_factory.mktemp('avamerg'))
    make_dataset(root, seed=3, dialogues=3, test_dialogues=1, size=64)
    return root


def test_busy_evaluation_and_feature_folders_are_refused(tiny_models, data, tmp_path, capsys):
    config = extraction_config(tiny_models)
    config.data.update(root=data, train=str(tmp_path / 'features'))
    out = tmp_path / 'eval'
    for folder, job in ((out, lambda: evaluation.evaluate(config, skip_fid=True, output_path=str(out))),
                        (tmp_path / 'features', lambda: extract_features.extract(config))):
        with runlock.hold(str(folder), 'job'):
            code, err = run_call(job, capsys)
        assert_user_error(code, err, f'{folder} is in use by another', f'pid {os.getpid()}')
        assert os.listdir(folder) == [runlock.LOCK]


# ----------------------------------------------------------------------------------------------------------------
# Data: non-finite features are found and named; labels that are all unknown are refused
# ----------------------------------------------------------------------------------------------------------------

def rewrite_shards(folder, edit):
    """Rewrite every shard's tensors with edit(tensors) in place, past write_shard's checks (a damaged cache)."""
    for name in sorted(os.listdir(folder)):
        if name.endswith('.safetensors'):
            tensors = load_file(os.path.join(folder, name))
            edit(tensors)
            save_file(tensors, os.path.join(folder, name))


def cache(tiny_root, folder, edit):
    """A 16-pair training cache in `folder` made with the tiny config, edited by `edit`."""
    config = tiny_config(tiny_root, folder)
    write_features(str(folder), config, 16, 16, torch.Generator().manual_seed(0))
    rewrite_shards(folder, edit)
    return str(folder)


def test_nan_features_stop_training_naming_the_pair(tiny_root, tmp_path, capsys):
    features = cache(tiny_root, tmp_path / 'features', lambda t: t['speaker_moments'][3].fill_(float('nan')))
    config = run_config(tiny_root, tmp_path / 'work', n_steps=4, max_nonfinite=100)
    config.data.update(train=features, val='')
    code, err = run_call(train_empath.train, capsys, config)
    assert_user_error(code, err, 'non-finite (NaN/Inf) features', 'train/00003/0', 're-extract')



def train_argv(tiny_root, workdir, **data):
    """train_empath.py's command line for the tiny config with config.data overrides."""
    return [f'--config=configs/avamerg_tiny.py:{tiny_root}', f'--config.workdir={workdir}',
            *(f'--config.data.{k}={v}' for k, v in data.items())]


@pytest.mark.parametrize('damage', ['truncated shard', 'corrupt manifest', 'manifest a list'])
def test_damaged_feature_cache_is_one_line_naming_the_file_and_the_command(damage, tiny_root, tmp_path, capsys):
    folder = tmp_path / 'train'
    cache(tiny_root, folder, lambda t: None)
    if damage == 'truncated shard':
        path = folder / 'shard-00000.safetensors'
        path.write_bytes(path.read_bytes()[:len(path.read_bytes()) // 2])   # a copy cut short
    else:
        path = folder / 'manifest.json'
        path.write_text('[1, 2]' if damage == 'manifest a list' else path.read_text()[:40])
    code, err = run_main(train_empath, train_argv(tiny_root, tmp_path / 'work', train=folder, val=''), capsys)
    assert_user_error(code, err, f'{path} is damaged', 'extract_features.py', '--split=train')
    assert not (tmp_path / 'work' / 'avamerg_tiny' / 'ckpts').exists()


def test_nonfinite_validation_features_are_refused(tiny_root, tmp_path, capsys):
    """A NaN in the validation cache would make every validation loss NaN and checkpoint selection meaningless."""
    config = tiny_config(tiny_root, tmp_path)
    val = tmp_path / 'val'
    write_features(str(val), config, 16, 16, torch.Generator().manual_seed(0), split='val')
    rewrite_shards(val, lambda t: t['response_text'][5].fill_(float('inf')))
    code, err = run_main(train_empath, train_argv(tiny_root, tmp_path / 'work', val=val), capsys)
    assert_user_error(code, err, 'non-finite (NaN/Inf) features in 1 pair(s) of config.data.val', 'val/00005/0',
                      '--split=val --overwrite')
    assert not (tmp_path / 'work' / 'avamerg_tiny' / 'metrics.jsonl').exists()


def test_metrics_are_strict_json_whatever_the_values(tmp_path):
    """A non-finite metric is written as null: json.loads in strict mode (and jq, pandas) read every line."""
    path = str(tmp_path / 'metrics.jsonl')
    training_loop.append_metrics(path, {'step': 3, 'val/ema/loss': float('nan'), 'grad_norm': float('inf'),
                                        'loss': 0.5})
    line = open(path).read()
    strict = json.loads(line, parse_constant=lambda name: pytest.fail(f'bare {name} token in {line!r}'))
    assert strict == {'step': 3, 'val/ema/loss': None, 'grad_norm': None, 'loss': 0.5}


def test_all_unknown_labels_are_refused(tiny_root, tmp_path, capsys):
    features = cache(tiny_root, tmp_path / 'features', lambda t: t['label'].fill_(-1))
    config = run_config(tiny_root, tmp_path / 'work')
    config.data.update(train=features, val='')
    code, err = run_call(train_empath.train, capsys, config)
    assert_user_error(code, err, 'none of the 16 pairs', 'known emotion label', 'emotion_weight=0')
    assert not os.path.exists(tmp_path / 'work' / 'avamerg_tiny' / 'ckpts')


def test_extraction_refuses_a_shard_with_nan_features(tiny_models, data, tmp_path, capsys, monkeypatch):
    config = extraction_config(tiny_models)
    config.data.update(root=data, train=str(tmp_path / 'features'), num_workers=0)
    from libs import extraction
    real = extraction.encode_batch

    def nan_in_second_shard(encoders, pixels, clip_pixels, texts):
        moments, clip, text = real(encoders, pixels, clip_pixels, texts)
        if nan_in_second_shard.calls == 2:   # batches of 3 pairs, shards of 4: the third batch starts shard 1
            clip[0, 1] = float('inf')
        nan_in_second_shard.calls += 1
        return moments, clip, text
    nan_in_second_shard.calls = 0
    monkeypatch.setattr(extraction, 'encode_batch', nan_in_second_shard)
    code, err = run_call(extract_features.extract, capsys, config)
    assert_user_error(code, err, 'non-finite (NaN/Inf) features', 'shard-00001', 'train/')
    assert finished_shards(config.data.train) == [0]


# ----------------------------------------------------------------------------------------------------------------
# OS errors: full disk, a file where a folder should be
# ----------------------------------------------------------------------------------------------------------------

def test_output_path_under_a_file(tiny_models, tiny_root, data, tmp_path, capsys):
    blocker = tmp_path / 'file'
    blocker.write_text('not a folder')
    code, err = run_call(sample_multi.sample, capsys, tiny(tiny_models), 't', None, None, 1, 1, str(blocker / 'out'))
    assert_user_error(code, err, str(blocker / 'out'), 'Not a directory')
    code, err = run_call(train_empath.train, capsys, run_config(tiny_root, blocker))
    assert_user_error(code, err, str(blocker), 'Not a directory')
    config = extraction_config(tiny_models)
    config.data.update(root=data, train=str(blocker / 'features'))
    code, err = run_call(extract_features.extract, capsys, config)
    assert_user_error(code, err, str(blocker / 'features'), 'part of that path is a file')
    assert blocker.read_text() == 'not a folder'


def test_read_only_output_folder(tiny_models, tmp_path, capsys, monkeypatch):
    """Tests run as root, where chmod does not stop a write: the file system's answer is simulated."""
    def read_only(path, *args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)
    monkeypatch.setattr(os, 'makedirs', read_only)
    code, err = run_call(sample_multi.sample, capsys, tiny(tiny_models), 't', None, None, 1, 1, str(tmp_path / 'out'))
    assert_user_error(code, err, str(tmp_path / 'out'), 'read-only', 'choose a writable location')


def test_full_disk_while_sampling_leaves_old_outputs_and_no_temp_folder(tiny_models, tmp_path, capsys,
                                                                         monkeypatch):
    out = tmp_path / 'out'
    sample_multi.sample(tiny(tiny_models), 'joint', None, None, 1, 1, str(out))
    before = snapshot(out)

    def full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(Image.Image, 'save', full)
    code, err = run_call(sample_multi.sample, capsys, tiny(tiny_models), 'joint', None, None, 1, 1, str(out))
    assert_user_error(code, err, str(out / 'joint'), 'No space left on device', 'free space')
    assert_unchanged(before, snapshot(out))
    assert sorted(os.listdir(out)) == ['joint']   # no .joint-* temp folder left


def test_full_disk_during_a_checkpoint(tiny_root, run_copy, capsys, monkeypatch):
    """torch.save reports a full disk as RuntimeError('... unexpected pos ...'): still one line naming the folder."""
    workdir, run = run_copy
    kept = {s: snapshot(run / 'ckpts' / f'{s}.ckpt') for s in (2, 4)}

    def full(obj, f, *args, **kwargs):
        raise RuntimeError('[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534')
    monkeypatch.setattr(torch, 'save', full)
    monkeypatch.setattr(io.shutil, 'disk_usage', lambda path: DiskUsage(total=10 ** 9, used=10 ** 9, free=0))
    code, err = run_call(train_empath.train, capsys, run_config(tiny_root, workdir, n_steps=6))
    assert_user_error(code, err, str(run / 'ckpts'), 'No space left on device')
    assert trainer.checkpoints(str(run)) == [2, 4]
    for step, files in kept.items():
        assert_unchanged(files, snapshot(run / 'ckpts' / f'{step}.ckpt'))


def test_full_disk_at_start_leaves_config_and_metrics_intact(tiny_root, run_copy, capsys, monkeypatch):
    workdir, run = run_copy
    before = snapshot(run)

    def full(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(os, 'fsync', full)
    code, err = run_call(train_empath.train, capsys, run_config(tiny_root, workdir, n_steps=6))
    assert_user_error(code, err, str(run), 'No space left on device')
    assert_unchanged(before, snapshot(run))
    assert json.loads((run / 'config.json').read_text())['train']['n_steps'] == 4


# ----------------------------------------------------------------------------------------------------------------
# A network without a trained speaker segment is refused by the empath modes and evaluation
# ----------------------------------------------------------------------------------------------------------------

def test_untrained_condition_is_refused_unless_allowed(tiny_models, tmp_path, capsys):
    config = tiny(tiny_models, condition=True)
    official = os.path.join(tiny_models, 'uvit_v1.pth')   # a UniDiffuser checkpoint: no condition segment
    out = tmp_path / 'out'
    code, err = run_call(sample_multi.sample, capsys, config, 'empath', 'I lost my job', None, 1, 1, str(out),
                         nnet_path=official)
    assert_user_error(code, err, 'speaker segment is untrained', '--allow_untrained_condition')
    assert os.listdir(out) == []
    record = sample_multi.sample(config, 'empath', 'I lost my job', None, 1, 1, str(out), nnet_path=official,
                                 allow_untrained_condition=True)
    assert record['outputs']['emotions']
    eval_config = extraction_config(tiny_models)
    code, err = run_call(evaluation.evaluate, capsys, eval_config, official, skip_fid=True,
                         output_path=str(tmp_path / 'eval'))
    assert_user_error(code, err, f'evaluating {official}', 'untrained', '--allow_untrained_condition')
    assert os.listdir(tmp_path / 'eval') == [runlock.LOCK]


# ----------------------------------------------------------------------------------------------------------------
# The U-ViT to sample with: an empath mode on a UniDiffuser network, a file or folder that is not a U-ViT
# ----------------------------------------------------------------------------------------------------------------

def forbid_loading(monkeypatch):
    """Make fetching components or building a network fail the test: a refusal must come before both."""
    def never(*args, **kwargs):
        raise AssertionError('a component was fetched or a network built before the refusal')
    monkeypatch.setattr('libs.hub.preflight', never)
    monkeypatch.setattr('libs.pipeline.build_nnet', never)


@pytest.mark.parametrize('mode', ['empath', 'empath_t', 'empath_i'])
def test_empath_modes_refuse_a_unidiffuser_config_before_loading(mode, tiny_models, tmp_path, capsys, monkeypatch):
    forbid_loading(monkeypatch)
    code, err = run_main(sample_multi, [f'--mode={mode}', f'--config=configs/sample_tiny.py:{tiny_models}',
                                        '--prompt=I lost my job', f'--output_path={tmp_path}'], capsys)
    assert_user_error(code, err, f'mode {mode} needs an EmpathDiffuser network', "name='uvit_multi_post_ln_v1'",
                      f'--config=configs/sample_tiny_empath.py:{tiny_models}')
    # The official config (default): refused before its gigabytes are fetched, pointing at a fine-tuned network.
    code, err = run_main(sample_multi, [f'--mode={mode}', '--prompt=I lost my job', f'--output_path={tmp_path}'],
                         capsys)
    assert_user_error(code, err, f'mode {mode}', "name='uvit_multi_post_ln_v1'", '--config=configs/avamerg_empath.py',
                      'nnet_ema.safetensors')
    assert os.listdir(tmp_path) == []


def test_network_is_judged_by_the_config_it_carries(tiny_models, base_run, tmp_path, capsys):
    """An export's own config decides (a UniDiffuser --config with a train_empath.py checkpoint folder runs the
    empath modes); an EmpathDiffuser network runs the UniDiffuser modes (no speaker); eval refuses a UniDiffuser."""
    folder = base_run / 'avamerg_tiny' / 'ckpts' / '4.ckpt'
    record = sample_multi.sample(tiny(tiny_models), 'empath_t', 'I lost my job', None, 1, 1, str(tmp_path / 'a'),
                                 nnet_path=str(folder))
    assert record['nnet_path'] == str(folder / 'nnet_ema.safetensors') and record['outputs']['emotions']
    code, err = run_main(sample_multi, ['--mode=t', f'--config=configs/sample_tiny_empath.py:{tiny_models}',
                                        f'--output_path={tmp_path / "b"}'], capsys)
    assert code == 0, err[-3000:]
    assert (tmp_path / 'b' / 't' / 't.txt').is_file()
    code, err = run_main(eval_avamerg, [f'--config=configs/sample_tiny.py:{tiny_models}', '--skip_fid',
                                        f'--output_path={tmp_path / "eval"}'], capsys)
    assert_user_error(code, err, f'evaluating {tiny_models}/uvit_v1.pth needs an EmpathDiffuser network',
                      'sample_tiny_empath.py')
    assert not (tmp_path / 'eval').exists()


def wrong_nnet_file(kind, folder, tiny_models):
    """A file or folder that is not a U-ViT checkpoint, and the words its error must name."""
    path = folder / kind
    if kind == 'other_model.safetensors':   # the tiny CLIP text encoder's weights
        shutil.copyfile(f'{tiny_models}/clip_text/model.safetensors', path)
        return path, ['is not a U-ViT checkpoint', 'none of its']
    if kind == 'config.json':
        path.write_text('{"nnet": {"name": "uvit_empath"}}')
        return path, ['it is a JSON file']
    if kind == 'empty.safetensors':
        path.write_bytes(b'')
        return path, ['the file is empty']
    if kind == 'objects.pth':   # a training script's checkpoint with its arguments: never unpickled
        torch.save({'model': {'w': torch.zeros(2)}, 'args': argparse.Namespace(lr=1e-4)}, path)
        return path, ['holds a pickled Python object (argparse.Namespace), which is never unpickled']
    if kind == 'bad_config.safetensors':   # an export-like file whose stored nnet config cannot build a U-ViT
        save_file({'w': torch.zeros(2)}, path, metadata={'config': json.dumps({'nnet': {'name': 'uvit_empath'}})})
        return path, ['the nnet config stored in', 'does not describe a U-ViT', 'img_size']
    if kind == 'uvit_empath.pth':   # an EmpathDiffuser network with a UniDiffuser config
        shutil.copyfile(f'{tiny_models}/uvit_empath.pth', path)
        return path, ['does not fit', 'It is an EmpathDiffuser network', 'nnet.name=uvit_empath']
    path.mkdir()   # a folder that is no checkpoint folder
    return path, ['is a folder without nnet_ema.safetensors']


@pytest.mark.parametrize('kind', ['other_model.safetensors', 'config.json', 'empty.safetensors', 'objects.pth',
                                  'bad_config.safetensors', 'uvit_empath.pth', 'folder'])
def test_nnet_path_that_is_not_a_network(kind, tiny_models, tmp_path, capsys):
    path, words = wrong_nnet_file(kind, tmp_path, tiny_models)
    out = tmp_path / 'out'
    code, err = run_main(sample_multi, ['--mode=t', f'--config=configs/sample_tiny.py:{tiny_models}',
                                        f'--nnet_path={path}', f'--output_path={out}'], capsys)
    expected = [] if kind in ('bad_config.safetensors', 'uvit_empath.pth') else ['uvit_v1.pth', 'ckpts/<step>.ckpt']
    assert_user_error(code, err, str(path), *words, *expected)
    assert os.listdir(out) == []


def test_eval_names_a_nnet_path_that_is_not_a_network(tiny_models, tmp_path, capsys):
    path, words = wrong_nnet_file('other_model.safetensors', tmp_path, tiny_models)
    code, err = run_main(eval_avamerg, [f'--config=configs/avamerg_tiny.py:{tiny_models}', f'--nnet_path={path}',
                                        '--skip_fid', f'--output_path={tmp_path / "eval"}'], capsys)
    assert_user_error(code, err, str(path), *words, 'nnet_ema.safetensors')


# ----------------------------------------------------------------------------------------------------------------
# Real processes: the exit code and stderr of a script, and workers that end with their launcher
# ----------------------------------------------------------------------------------------------------------------

def test_real_process_exits_2_with_one_line(tmp_path):
    blocker = tmp_path / 'file'
    blocker.write_text('x')
    done = subprocess.run([sys.executable, 'scripts/make_tiny_models.py', f'--out={blocker}/tiny'], cwd=ROOT, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert_user_error(done.returncode, done.stderr, f'{blocker}/tiny', 'Not a directory')


@pytest.mark.parametrize('script,flag', [('sample_multi.py', '--help'), ('eval_avamerg.py', '-h')])
def test_help_exits_0(script, flag):
    """absl exits 1 after printing the help that was asked for; the entry points exit 0."""
    done = subprocess.run([sys.executable, script, flag], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert '--nnet_path' in done.stdout and '--config' in done.stdout and 'error' not in done.stderr


def children(pid):
    """Pids of the processes whose parent is pid."""
    found = []
    for entry in os.listdir('/proc'):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f'/proc/{entry}/stat') as f:
                if int(f.read().rsplit(')', 1)[1].split()[1]) == pid:
                    found.append(int(entry))
    return found


def alive(pid):
    """Whether any thread of process pid still runs (the leader can be a zombie while other threads exit)."""
    states = []
    for task in os.listdir(f'/proc/{pid}/task') if os.path.isdir(f'/proc/{pid}/task') else []:
        with contextlib.suppress(OSError), open(f'/proc/{pid}/task/{task}/stat') as f:
            states.append(f.read().rsplit(')', 1)[1].split()[0])
    return any(state not in 'ZX' for state in states)


@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_workers_end_when_accelerate_launch_is_killed(tiny_root, tmp_path):
    """kill -9 of `accelerate launch` (2 CPU processes): its workers end too, and the run folder is free again."""
    run = tmp_path / 'avamerg_tiny'
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', str(free_port()), 'train_empath.py', f'--config=configs/avamerg_tiny.py:{tiny_root}',
           f'--config.workdir={tmp_path}', '--config.train.n_steps=1000000', '--config.train.val_every=0']
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=dict(ENV, ACCELERATE_USE_CPU='true'), stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
    workers = []
    try:
        deadline = time.time() + 240
        # Training has started (past cli.run, which arms the launcher-death signal) once log.txt says so.
        while not (run / 'log.txt').is_file() or '2 process(es)' not in (run / 'log.txt').read_text():
            assert time.time() < deadline and launcher.poll() is None, 'the run did not start'
            time.sleep(0.2)
        workers = children(launcher.pid)
        assert len(workers) == 2
        os.kill(launcher.pid, signal.SIGKILL)
        launcher.wait()
        deadline = time.time() + 30
        while any(map(alive, workers)) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(map(alive, workers)), 'workers outlived their launcher'
        with runlock.hold(str(run), 'rerun'):   # the dead run's lock is free
            pass
    finally:
        for pid in [launcher.pid, *workers]:   # whatever is left after a failure
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        launcher.wait()
