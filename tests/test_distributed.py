"""train_empath.py under ``accelerate launch`` with the project's accelerate configs, 2 CPU processes over gloo:
FSDP (configs/accelerate/fsdp.yaml; parameters sharded as DTensors by torch's fully_shard) and DDP
(configs/accelerate/ddp.yaml). Each trains, checkpoints, resumes bit for bit, exports the ordinary
nnet_ema.safetensors, and follows the single-process run within float tolerance. Then scripts/slurm_train.sh on
two simulated nodes (stand-ins for srun, scontrol and rsync; one CPU process per node).

One launch per backend keeps the test short: its two processes train an 8-step run, then a 4-step run that a second
``train_empath.train`` call resumes to 8 steps from its checkpoint (every state comes from the checkpoint files;
tests/test_train.py resumes in fresh processes after SIGKILL).
"""
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
from libs.uvit import build_nnet, is_condition_key
from test_lora import assert_same_run
from test_train import ENV, ROOT, free_port, one_thread, read_metrics, tiny_config, tiny_root  # noqa: F401 (fixtures)

COMMON = dict(n_steps=8, log_every=1, val_every=4, ckpt_every=4, keep_last=2, batch_size=8)

# Runs inside each launched process: the straight and the resumed runs, then a record of the parameters the
# training loop held (after train_empath's sharding) for the test to inspect.
RUNNER = '''
import json, sys
import torch
from torch.distributed.tensor import DTensor
import train_empath
from configs.avamerg_tiny import get_config
from libs import distributed

root, out, common, nnet = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
models, prepare = [], distributed.prepare
def spy(accelerator, model, optimizer):
    models.append(model)
    return prepare(accelerator, model, optimizer)
distributed.prepare = spy
# end_training destroys the process group; the three runs of this process share it.
from accelerate.state import PartialState
PartialState.destroy_process_group = lambda self, group=None: None

def config(workdir, **train):
    c = get_config(root)
    c.workdir = f'{out}/{workdir}'
    c.train.update(dict(common, **train))
    c.nnet.update(nnet)
    return c

train_empath.train(config('straight'))
train_empath.train(config('resumed', n_steps=common['n_steps'] // 2))
train_empath.train(config('resumed'))
record = {n: dict(dtensor=isinstance(p, DTensor), placements=str(getattr(p, 'placements', '')), full=p.numel(),
                  local=(p.to_local() if isinstance(p, DTensor) else p).numel(),
                  sum=float((p.to_local() if isinstance(p, DTensor) else p).double().sum()))
          for n, p in models[-1].named_parameters()}
with open(f'{out}/params-{torch.distributed.get_rank()}.json', 'w') as f:
    json.dump(record, f)
'''


@pytest.fixture(scope='module')
def one_process(tiny_root, tmp_path_factory):
    """The single-process run the launched ones are compared with."""
    config = tiny_config(tiny_root, tmp_path_factory.mktemp('one'), **COMMON)
    train_empath.train(config)
    return os.path.join(config.workdir, config.name)


def launch(accelerate_config, tiny_root, out, nnet=None):
    """``accelerate launch --config_file <accelerate_config> --num_processes 2`` of RUNNER on CPU processes."""
    runner = out / 'runner.py'
    runner.write_text(RUNNER)
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--config_file', accelerate_config,
           '--num_processes', '2', '--main_process_port', str(free_port()), str(runner), tiny_root, str(out),
           json.dumps(COMMON), json.dumps(nnet or {})]
    done = subprocess.run(cmd, cwd=ROOT, env=dict(ENV, ACCELERATE_USE_CPU='true'), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-5000:]
    return [json.load(open(out / f'params-{r}.json')) for r in range(2)]


def losses(run):
    """Training losses by step."""
    return [m['loss'] for m in read_metrics(run) if 'loss' in m]


def assert_follows_and_resumes(one, out):
    """The straight run follows the one-process run; the resumed run equals the straight one bit for bit."""
    straight, resumed = (os.path.join(out, w, 'avamerg_tiny') for w in ('straight', 'resumed'))
    assert '2 process(es)' in open(os.path.join(straight, 'log.txt')).read()
    half = COMMON['n_steps'] // 2
    assert f'resumed from step {half}' in open(os.path.join(resumed, 'log.txt')).read()
    # The same pairs and per-pair noise make up every global batch: only the float summation order differs.
    assert len(losses(straight)) == COMMON['n_steps'] and np.allclose(losses(straight), losses(one), rtol=1e-5, atol=0)
    val = lambda run: [m for m in read_metrics(run) if 'val/ema/loss' in m]
    assert np.allclose([m['val/ema/loss'] for m in val(straight)], [m['val/ema/loss'] for m in val(one)], rtol=1e-5)

    assert_same_run(straight, resumed, COMMON['n_steps'])

    # The export: the ordinary U-ViT, rebuilt from the file alone, close to the one-process run's.
    exported, reference = (load_file(os.path.join(r, trainer.EXPORT)) for r in (resumed, one))
    nnet, config = trainer.load_exported_nnet(os.path.join(resumed, trainer.EXPORT))
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in build_nnet(config['nnet'])
                                                         .state_dict().items()}
    assert all(torch.allclose(exported[k], reference[k], rtol=1e-4, atol=1e-6) for k in reference)
    return resumed


@pytest.mark.slow
def test_fsdp_two_processes_shard_resume_and_follow_one_process(one_process, tiny_root, tmp_path):
    # Gradient checkpointing on, as in the full-size configs: recomputation under FSDP2 changes no number.
    ranks = launch('configs/accelerate/fsdp.yaml', tiny_root, tmp_path, nnet=dict(use_checkpoint=True))
    assert ranks[0].keys() == ranks[1].keys() and ranks[0]
    for name, (r0, r1) in ((n, (ranks[0][n], ranks[1][n])) for n in ranks[0]):
        assert r0['dtensor'] and r1['dtensor'] and r0['placements'] == r1['placements'] == '(Shard(dim=0),)', name
        assert r0['local'] + r1['local'] == r0['full'], name              # disjoint shards that make up the whole
    whole = sum(r['full'] for r in ranks[0].values())
    assert all(0 < sum(r['local'] for r in rank.values()) < whole for rank in ranks)
    resumed = assert_follows_and_resumes(one_process, tmp_path)
    assert 'FSDP2 (torch fully_shard, gloo)' in open(os.path.join(resumed, 'log.txt')).read()
    # The checkpoint is the gathered shards of the parameters the processes trained.
    final = load_file(os.path.join(resumed, 'ckpts', f'{COMMON["n_steps"]}.ckpt', 'nnet.safetensors'))
    for name, r0 in ranks[0].items():
        assert np.isclose(r0['sum'] + ranks[1][name]['sum'], final[name].double().sum().item(), rtol=1e-9,
                          atol=1e-9), name


@pytest.mark.slow
def test_ddp_two_processes_resume_and_follow_one_process(one_process, tiny_root, tmp_path):
    ranks = launch('configs/accelerate/ddp.yaml', tiny_root, tmp_path)
    for r in ranks:                                                           # replicated, not sharded
        assert all(not p['dtensor'] and p['local'] == p['full'] for p in r.values())
    assert ranks[0] == ranks[1]                                               # identical replicas after training
    assert_follows_and_resumes(one_process, tmp_path)


# ----------------------------------------------------------------------------------------------------------------
# scripts/slurm_train.sh on two simulated nodes of one process each
# ----------------------------------------------------------------------------------------------------------------

FAKE_SLURM = {
    # srun: drop its options, run the command once per node, each with its own SLURM_NODEID, in parallel.
    'srun': '''#!/usr/bin/env bash
while [[ "$1" == --* ]]; do shift; done
pids=()
for ((node = 0; node < SLURM_NNODES; node++)); do SLURM_NODEID=$node "$@" & pids+=($!); done
for pid in "${pids[@]}"; do wait "$pid" || exit 1; done
''',
    'scontrol': '#!/usr/bin/env bash\necho 127.0.0.1\n',
    # rsync -a SRC... DEST/ as a plain recursive copy (rsync is not on every test machine). The simulated nodes share
    # one STAGE_DIR, so the copies take turns and the second finds the first's (as a real rsync would skip it).
    'rsync': '''#!/usr/bin/env bash
shift; dest="${@: -1}"
for src in "${@:1:$#-1}"; do
    ( flock 9; [[ -e "$dest/$(basename "$src")" ]] || cp -r "$src" "$dest" ) 9>"$dest/.rsync.lock"
done
''',
}


@pytest.mark.slow
def test_slurm_script_starts_one_launcher_per_node_that_meet(tiny_root, tmp_path):
    """Two simulated nodes meet and train LoRA together (so LoRA under DDP is covered too), following one process."""
    bin_dir = tmp_path / 'bin'
    bin_dir.mkdir()
    for name, text in FAKE_SLURM.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = dict(ENV, PATH=f'{bin_dir}:{os.environ["PATH"]}', ACCELERATE_USE_CPU='true', SLURM_JOB_ID='4242',
               SLURM_NNODES='2', SLURM_JOB_NODELIST='node[1-2]', GPUS_PER_NODE='1', MAIN_PORT=str(free_port()),
               ACCELERATE=os.path.join(os.path.dirname(sys.executable), 'accelerate'),
               FEATURES=os.path.join(tiny_root, 'features'), STAGE_DIR=str(tmp_path / 'local'))
    steps, lora = dict(COMMON, n_steps=4), dict(enabled=True, rank=4, alpha=8., lr=3e-3)
    flags = [f'--config.train.{k}={v}' for k, v in steps.items()] + [f'--config.train.lora.{k}={v}'
                                                                      for k, v in lora.items()]
    done = subprocess.run(['bash', 'scripts/slurm_train.sh', f'--config=configs/avamerg_tiny.py:{tiny_root}',
                           f'--config.workdir={tmp_path / "work"}', *flags], cwd=ROOT, env=env, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-5000:]
    assert '2 nodes x 1 processes, rendezvous 127.0.0.1' in done.stdout
    run = tmp_path / 'work' / 'avamerg_tiny'
    assert '2 process(es)' in open(run / 'log.txt').read()
    assert sorted(os.listdir(run / 'ckpts' / '4.ckpt')) == sorted([*trainer.CKPT_FILES, 'rng-0.pt', 'rng-1.pt'])
    config = json.load(open(run / 'config.json'))
    assert config['data']['train'] == str(tmp_path / 'local' / 'train')      # read from the node-local copy

    reference = tiny_config(tiny_root, tmp_path / 'one', **steps)
    reference.train.lora.update(lora)
    train_empath.train(reference)
    assert np.allclose(losses(run), losses(os.path.join(reference.workdir, reference.name)), rtol=1e-5, atol=0)
    stored = load_file(run / 'ckpts' / '4.ckpt' / 'nnet.safetensors')
    assert stored and all('.lora_' in k or is_condition_key(k) for k in stored)   # only what LoRA trains
    exported = load_file(run / trainer.EXPORT)
    assert exported.keys() == build_nnet(config['nnet']).state_dict().keys()    # merged, ordinary layout
