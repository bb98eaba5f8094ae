"""train_empath.py checkpoints: the exported EMA is the running average of the trained weights, and a run resumed
with another number of processes continues exactly where it stopped."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import train_empath
from libs import trainer
from test_train import ENV, ROOT, free_port, one_thread, overrides, read_metrics, tiny_config, tiny_root  # noqa: F401


def written_out_ema_rate(step, rate):
    """The EMA rate at 0-based optimizer step ``step``: warm-up (1 + step) / (10 + step), capped at ``rate``."""
    return min(rate, (1 + step) / (10 + step))


def test_exported_ema_is_the_running_average_of_the_trained_weights(tiny_root, tmp_path, monkeypatch):
    """Recompute the EMA in float64 from the weights after every optimizer step and compare it with the in-memory
    EMA, every checkpoint's nnet_ema.safetensors and the run's exported nnet_ema.safetensors (the best step's)."""
    initial, weights, rates, modules = {}, [], [], []
    real = trainer.update_ema

    def recording(ema, model, rate):
        if not initial:
            initial.update({n: p.detach().double().clone() for n, p in ema.named_parameters()})
        real(ema, model, rate)
        weights.append({n: p.detach().double().clone() for n, p in model.named_parameters()})
        rates.append(rate)
        modules.append(ema)
    monkeypatch.setattr(trainer, 'update_ema', recording)
    config = tiny_config(tiny_root, tmp_path, n_steps=12, ckpt_every=4, val_every=4, keep_last=3, log_every=4,
                         ema_rate=0.5)   # warm-up (1 + s)/(10 + s) up to step 8, then capped at 0.5
    config.optimizer.lr = 3e-3
    state = train_empath.train(config)
    run = os.path.join(config.workdir, config.name)
    assert len(weights) == 12 and all(m is modules[0] for m in modules)
    assert rates == [written_out_ema_rate(s, 0.5) for s in range(12)]

    ema = {n: v.clone() for n, v in initial.items()}
    by_step = {}
    for step, (w, rate) in enumerate(zip(weights, rates), start=1):
        ema = {n: rate * e + (1 - rate) * w[n] for n, e in ema.items()}
        by_step[step] = ema
    in_memory = dict(modules[0].named_parameters())
    for name, value in by_step[12].items():
        torch.testing.assert_close(in_memory[name].double(), value, atol=1e-6, rtol=1e-6)
    moved = max((by_step[12][n] - initial[n]).abs().max().item() for n in initial)
    assert moved > 1e-3  # the EMA really left its starting point: the comparison is not with the initial weights
    for step in trainer.checkpoints(run):
        folder = os.path.join(run, 'ckpts', f'{step}.ckpt')
        saved_ema, saved = (load_file(os.path.join(folder, f)) for f in ('nnet_ema.safetensors', 'nnet.safetensors'))
        for name, value in by_step[step].items():
            torch.testing.assert_close(saved_ema[name].double(), value, atol=1e-6, rtol=1e-6)
            assert torch.equal(saved[name].double(), weights[step - 1][name])
        differ = max((saved_ema[n].double() - weights[step - 1][n]).abs().max().item() for n in initial)
        assert differ > 1e-4  # the EMA file is not the online weights
    assert trainer.checkpoints(run) == [4, 8, 12]
    with open(os.path.join(run, trainer.EXPORT_INFO)) as f:
        info = json.load(f)
    assert info['step'] == state['best_step'] and info['checkpoint'] == os.path.join('ckpts', f'{info["step"]}.ckpt')
    val = {m['step']: m['val/ema/loss'] for m in read_metrics(run) if 'val/ema/loss' in m}
    assert info['step'] == min(val, key=val.get) and info['val_ema_loss'] == val[info['step']]
    exported = load_file(os.path.join(run, trainer.EXPORT))
    assert exported.keys() == in_memory.keys()
    for name, value in by_step[info['step']].items():
        torch.testing.assert_close(exported[name].double(), value, atol=1e-6, rtol=1e-6)


COMMON = dict(log_every=1, val_every=4, ckpt_every=4, keep_last=5, batch_size=8)


@pytest.fixture(scope='module')
def uninterrupted(tiny_root, tmp_path_factory):
    """One process, 8 steps without a stop: the run every resumed run must reproduce."""
    config = tiny_config(tiny_root, tmp_path_factory.mktemp('uninterrupted'), n_steps=8, **COMMON)
    train_empath.train(config)
    return os.path.join(config.workdir, config.name)


def train_two_processes(tiny_root, workdir, **train):
    """train_empath.py under accelerate with 2 CPU processes (DDP over gloo)."""
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', str(free_port()), 'train_empath.py', f'--config=configs/avamerg_tiny.py:{tiny_root}',
           f'--config.workdir={workdir}', *overrides(dict(COMMON, **train))]
    done = subprocess.run(cmd, cwd=ROOT, env=dict(ENV, ACCELERATE_USE_CPU='true'), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]


def assert_continues(ref_run, run, written_by, resumed_by):
    """The resumed run logged the resume and the process-count change, and reproduces the uninterrupted run."""
    log = open(os.path.join(run, 'log.txt')).read()
    assert 'resumed from step 4 (data position 32)' in log
    assert f'written by {written_by} processes, this run has {resumed_by}' in log
    assert trainer.checkpoints(run) == [4, 8]
    ref, resumed = read_metrics(ref_run), read_metrics(run)
    for key in ('loss', 'loss_img', 'loss_clip', 'loss_text', 'loss_emotion', 'val/ema/loss', 'val/nnet/loss'):
        (steps_a, a), (steps_b, b) = (zip(*[(m['step'], m[key]) for m in ms if key in m]) for ms in (ref, resumed))
        assert steps_a == steps_b and len(steps_a) in (2, 8), key
        # Only the float summation order differs between 1 and 2 processes (measured: relative 1e-7).
        assert np.allclose(a, b, rtol=1e-5, atol=0), (key, a, b)
    for name in ('nnet.safetensors', 'nnet_ema.safetensors'):
        a, b = (load_file(os.path.join(r, 'ckpts', '8.ckpt', name)) for r in (ref_run, run))
        for key, value in a.items():
            torch.testing.assert_close(b[key], value, atol=1e-5, rtol=1e-4, msg=lambda m: f'{name} {key}: {m}')


def test_two_process_checkpoint_resumed_by_one_process(tiny_root, uninterrupted, tmp_path):
    """The global RNG states are not restored across process counts (a warning says so); the data position and
    the per-pair randomness, keyed by stream position, carry the run."""
    train_two_processes(tiny_root, tmp_path, n_steps=4)
    train_empath.train(tiny_config(tiny_root, tmp_path, n_steps=8, **COMMON))
    assert_continues(uninterrupted, os.path.join(tmp_path, 'avamerg_tiny'), written_by=2, resumed_by=1)


def test_one_process_checkpoint_resumed_by_two_processes(tiny_root, uninterrupted, tmp_path):
    train_empath.train(tiny_config(tiny_root, tmp_path, n_steps=4, **COMMON))
    train_two_processes(tiny_root, tmp_path, n_steps=8)
    assert_continues(uninterrupted, os.path.join(tmp_path, 'avamerg_tiny'), written_by=1, resumed_by=2)
