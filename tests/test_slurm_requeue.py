"""scripts/slurm_train.sh on a stand-in SLURM: the job step's processes get SIGUSR1 (as --signal=USR1@120 sends it)
and the batch script SIGTERM; training stops with a checkpoint, the launcher's failure status is read as a stop, the
script waits for srun and requeues the job; the requeued job resumes and finishes without another requeue.

The stand-ins: ``srun`` starts the step in its own process group (SLURM's steps are apart from the batch script),
``scontrol`` records requeues, and the launcher behaves like torchrun: it runs the worker and reports any failure of
it as status 1."""
import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest

from libs import trainer
from test_preemption_training import reaped
from test_train import ENV, ROOT, tiny_root  # noqa: F401 (fixture)

SRUN = '''#!/bin/bash
while [[ $1 == --* ]]; do shift; done
export SLURM_NODEID=0
setsid "$@" &
echo $! > "$SLURM_SUBMIT_DIR/step.pid"
wait $!
'''
SCONTROL = '''#!/bin/bash
case $1 in
    show) echo localhost ;;
    requeue) echo "requeue $2" >> "$SLURM_SUBMIT_DIR/scontrol.log" ;;
esac
'''
LAUNCHER = '''#!{python}
import subprocess, sys
args = sys.argv[sys.argv.index('train_empath.py'):]
sys.exit(0 if subprocess.call([sys.executable, *args]) == 0 else 1)
'''


def write_tool(folder, name, text):
    path = folder / name
    path.write_text(text)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)
    return str(path)


@pytest.mark.slow
def test_usr1_to_the_step_stops_training_and_the_script_requeues(tiny_root, tmp_path):
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    write_tool(bin_dir, 'srun', SRUN)
    write_tool(bin_dir, 'scontrol', SCONTROL)
    launcher = write_tool(bin_dir, 'accelerate', LAUNCHER.format(python=sys.executable))
    env = dict(ENV, PATH=f'{bin_dir}:{os.environ["PATH"]}', SLURM_JOB_ID='4242', SLURM_JOB_NODELIST='node1',
               SLURM_NNODES='1', SLURM_GPUS_ON_NODE='1', SLURM_SUBMIT_DIR=str(tmp_path), ACCELERATE=launcher)
    run = tmp_path / 'work' / 'avamerg_tiny'
    args = ['bash', 'scripts/slurm_train.sh', f'--config=configs/avamerg_tiny.py:{tiny_root}',
            f'--config.workdir={tmp_path / "work"}', '--config.train.n_steps=400', '--config.train.log_every=2',
            '--config.train.ckpt_every=1000', '--config.train.val_every=0']
    job = subprocess.Popen(args, cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                           start_new_session=True)
    with reaped(job, tmp_path / 'step.pid'):
        deadline = time.monotonic() + 300
        while not (run / 'metrics.jsonl').is_file() or not (run / 'metrics.jsonl').read_text().endswith('\n'):
            assert job.poll() is None and time.monotonic() < deadline, job.communicate()[1][-3000:]
            time.sleep(0.05)
        os.killpg(int((tmp_path / 'step.pid').read_text()), signal.SIGUSR1)   # wrapper, launcher (ignores it), training
        os.kill(job.pid, signal.SIGTERM)   # the batch script: it must keep waiting for srun
        _, stderr = job.communicate(timeout=300)
    assert job.returncode == 75, stderr[-3000:]
    assert (tmp_path / 'scontrol.log').read_text() == 'requeue 4242\n'
    assert 'stopped: SIGUSR1 during step' in stderr and 'Traceback' not in stderr
    assert 'node 0: SIGUSR1, the launcher ended with 1: stopped with a checkpoint' in stderr
    assert 'job 4242 stopped by SIGTERM with a checkpoint (srun status 75): requeue' in stderr
    stopped_at = trainer.checkpoints(str(run))
    assert len(stopped_at) == 1 and 0 < stopped_at[0] < 400
    assert not (tmp_path / '.slurm-4242.stopped').exists()

    # The requeued job: resumes from that checkpoint and finishes; no second requeue.
    finish = args[:-4] + ['--config.train.n_steps=' + str(stopped_at[0] + 2), *args[-3:]]
    done = subprocess.run(finish, cwd=ROOT, env=dict(env, SLURM_RESTART_COUNT='1'), capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f'resumed from step {stopped_at[0]}' in (run / 'log.txt').read_text()
    assert (tmp_path / 'scontrol.log').read_text() == 'requeue 4242\n'
    assert json.loads((run / trainer.EXPORT_INFO).read_text())['step'] == stopped_at[0] + 2
