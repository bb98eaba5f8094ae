"""Preemption of a real training process: SIGTERM, then SIGUSR1 to its whole process group (DataLoader workers
included, as SLURM signals every process of a job) between checkpoints; each stop finishes the step, writes its
checkpoint, prints one ``stopped:`` line and exits 75, and the twice-resumed run ends bit-identical to an
uninterrupted one (weights, EMA, optimizer state and metrics)."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from libs import preemption, trainer, training_loop
from test_train import ENV, ROOT, one_thread, overrides, read_metrics, tiny_config, tiny_root  # noqa: F401

# grad_accum 2 (the data position must advance by the global batch), unequal speaker-dropout shares and network
# dropout (the global RNG must be restored), checkpoints only at the end: every stop lands between checkpoints.
TRAIN = dict(n_steps=24, log_every=4, val_every=12, ckpt_every=1000, keep_last=5, batch_size=8, grad_accum=2,
             p_drop_face=0.3, p_drop_text=0.1, p_drop_both=0.05)
NNET = dict(drop_rate=0.1)


def logged_steps(run):
    """Steps of the training log lines written so far (a line being appended is not counted yet)."""
    path, steps = os.path.join(run, 'metrics.jsonl'), []
    if os.path.isfile(path):
        for line in open(path).read().splitlines(keepends=True):
            if line.endswith('\n') and 'loss' in json.loads(line):
                steps.append(json.loads(line)['step'])
    return steps


@contextlib.contextmanager
def reaped(proc, group_file=None):
    """Kill the process's group (and the group whose id it wrote into ``group_file``) if the test ends while it
    runs: no orphan keeps a core busy."""
    try:
        yield proc
    finally:
        if proc.poll() is None:
            groups = [proc.pid] + ([int(group_file.read_text())] if group_file and group_file.is_file() else [])
            for group in groups:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(group, signal.SIGKILL)
            proc.wait()


def signal_after_next_log(proc, run, after_step, signum, group):
    """Send ``signum`` to the process (or its process group) once metrics.jsonl logs a step past ``after_step``."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if any(step > after_step for step in logged_steps(run)):
            (os.killpg if group else os.kill)(proc.pid, signum)
            return
        time.sleep(0.02)
    pytest.fail(f'no metrics past step {after_step} before the run ended: {proc.communicate()[1][-3000:]}')


def stopped_run(args, run, after_step, signum, group=False):
    """Start training, signal it mid-run; returns (the step it stopped after, its stderr)."""
    proc = subprocess.Popen([sys.executable, 'train_empath.py', *args], cwd=ROOT, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    with reaped(proc):
        signal_after_next_log(proc, run, after_step, signum, group)
        _, stderr = proc.communicate(timeout=300)
    name = signal.Signals(signum).name
    assert proc.returncode == preemption.PREEMPTED_EXIT, stderr[-3000:]
    assert 'Traceback' not in stderr
    stopped = [line for line in stderr.splitlines() if line.startswith('stopped:')]
    assert len(stopped) == 1 and stderr.rstrip().endswith(stopped[0]), stderr[-3000:]
    step = int(stopped[0].split(' during step ')[1].split(':')[0])
    path = os.path.join(run, 'ckpts', f'{step}.ckpt')
    assert stopped[0] == (f'stopped: {name} during step {step}: checkpoint {path} written; run the same command '
                          'again to resume from it (scripts/slurm_train.sh requeues the job)')
    assert trainer.checkpoints(run)[-1] == step and step % TRAIN['log_every']  # between logs, not at one
    assert f'{name}: stopped after step {step}, checkpoint {path} written' in open(os.path.join(run, 'log.txt')).read()
    return step, stderr


@pytest.mark.slow
def test_sigterm_then_sigusr1_and_resume_is_bit_identical(tiny_root, tmp_path):
    reference = tiny_config(tiny_root, tmp_path / 'reference', **TRAIN)
    reference.nnet.update(NNET)
    training_loop.train(reference)
    ref_run = os.path.join(reference.workdir, reference.name)

    run = os.path.join(tmp_path, 'preempted', reference.name)
    args = [f'--config=configs/avamerg_tiny.py:{tiny_root}', f'--config.workdir={tmp_path / "preempted"}',
            *overrides(TRAIN), *[f'--config.nnet.{k}={v}' for k, v in NNET.items()]]
    # 1. SIGTERM to the training process after the step-4 log line.
    first, _ = stopped_run(args, run, 0, signal.SIGTERM)
    # 2. Resume with a DataLoader worker; SIGUSR1 to the whole process group (the worker ignores it).
    second, _ = stopped_run([*args, '--config.data.num_workers=1'], run, first, signal.SIGUSR1, group=True)
    assert first < second < TRAIN['n_steps']
    log = open(os.path.join(run, 'log.txt')).read()
    assert f'resumed from step {first} (data position {first * TRAIN["batch_size"]})' in log
    # 3. Resume and finish (in this process: the same code path without another start-up).
    resumed = tiny_config(tiny_root, tmp_path / 'preempted', **TRAIN)
    resumed.nnet.update(NNET)
    assert training_loop.train(resumed)['step'] == TRAIN['n_steps']

    final = f'{TRAIN["n_steps"]}.ckpt'
    for name in ('nnet.safetensors', 'nnet_ema.safetensors'):
        a, b = (load_file(os.path.join(r, 'ckpts', final, name)) for r in (ref_run, run))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    opt_a, opt_b = (torch.load(os.path.join(r, 'ckpts', final, 'training_state.pt'), weights_only=True)
                    ['optimizer']['state'] for r in (ref_run, run))
    assert all(torch.equal(opt_a[k][s], opt_b[k][s]) for k in opt_a for s in opt_a[k])
    # The log window of the interrupted intervals travelled in the checkpoints: every logged mean is the same.
    strip = lambda ms: [{k: v for k, v in m.items() if k != 'sec_per_step'} for m in ms]
    assert strip(read_metrics(run)) == strip(read_metrics(ref_run))


def workers(launcher_pid):
    """{rank: pid} of the training processes a launcher started (read from /proc)."""
    found, todo = {}, [launcher_pid]
    while todo:
        pid = todo.pop()
        try:
            with open(f'/proc/{pid}/task/{pid}/children') as f:
                children = [int(c) for c in f.read().split()]
            with open(f'/proc/{pid}/environ', 'rb') as f:
                env = dict(item.split(b'=', 1) for item in f.read().split(b'\0') if b'=' in item)
        except OSError:
            continue
        if b'RANK' in env and pid != launcher_pid and b'train_empath' in open(f'/proc/{pid}/cmdline', 'rb').read():
            found[int(env[b'RANK'])] = pid
        todo += children
    return found


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith('linux'), reason='reads /proc')
def test_a_signal_to_one_process_stops_every_process_after_the_same_step(tiny_root, tmp_path):
    """DDP over gloo, 2 processes: only rank 1 gets SIGUSR1; the per-step all-reduce carries its vote, both stop
    after the same step, and the checkpoint holds both processes' RNG states."""
    from test_train import free_port
    run = tmp_path / 'avamerg_tiny'
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', str(free_port()), 'train_empath.py', f'--config=configs/avamerg_tiny.py:{tiny_root}',
           f'--config.workdir={tmp_path}', *overrides(dict(n_steps=400, log_every=2, val_every=0, ckpt_every=1000))]
    launcher = subprocess.Popen(cmd, cwd=ROOT, env=dict(ENV, ACCELERATE_USE_CPU='true'), text=True,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    with reaped(launcher):
        deadline = time.monotonic() + 300
        while not logged_steps(str(run)):
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.communicate()[1][-3000:]
            time.sleep(0.05)
        ranks = workers(launcher.pid)
        assert sorted(ranks) == [0, 1]
        os.kill(ranks[1], signal.SIGUSR1)
        _, stderr = launcher.communicate(timeout=300)
    stopped = sorted(line.split('stopped: ', 1)[1] for line in stderr.splitlines() if 'stopped: ' in line)
    assert len(stopped) == 2, stderr[-3000:]
    step = trainer.checkpoints(str(run))[-1]
    path = os.path.join(run, 'ckpts', f'{step}.ckpt')
    assert 0 < step < 400 and sorted(os.listdir(path)) == sorted([*trainer.CKPT_FILES, 'rng-0.pt', 'rng-1.pt'])
    tail = (f'during step {step}: checkpoint {path} written; run the same command again to resume from it '
            '(scripts/slurm_train.sh requeues the job)')
    assert stopped == [f'SIGUSR1 {tail}', f'a signal to another process {tail}']
    assert 'Traceback' not in stderr.split('stopped: ')[0]   # nothing went wrong before the stop
