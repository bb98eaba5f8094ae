"""The rehearsal (libs/rehearsal.py, scripts/rehearse.py): its measuring machinery, its full-size pieces that are
cheap to check, the whole chain at tiny size (default run) and at full size (``pytest -m fullsize``)."""
import json
import os
import signal
import subprocess
import sys

import pytest

from libs import rehearsal

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_run_command_measures_the_child_alone(tmp_path):
    """Peak RSS and CPU time are the child's own (os.wait4), not its parent's.

    Linux keeps a forked child's peak RSS across exec, so a child forked from a large process (this test process,
    GBs after the suite) starts from that size: the measuring parent here is a small process, as scripts/rehearse.py is.
    """
    log = str(tmp_path / 'logs' / 'child.log')
    measure = ('import sys; sys.path.insert(0, sys.argv[1]); from libs import rehearsal; '
               'print(rehearsal.run_command(["-c", "x = bytearray(400 * 2 ** 20); x[::4096] = b\'1\' * '
               'len(x[::4096]); print(\'done\')"], sys.argv[2]).peak_rss_gb)')
    done = subprocess.run([sys.executable, '-c', measure, ROOT, log], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    peak = float(done.stdout.split()[-1])
    assert 0.39 < peak < 1.0, peak
    usage = rehearsal.run_command(['-c', 'sum(range(3 * 10 ** 7)); print("done")'], log)  # a measurable time
    assert usage.cpu_s >= 0 and usage.wall_s > 0
    assert 'done' in open(log).read()


def test_run_command_failure_names_the_command_and_its_log(tmp_path):
    log = str(tmp_path / 'fail.log')
    with pytest.raises(rehearsal.StageFailed, match=r'exited 3; its output: .*fail\.log'):
        rehearsal.run_command(['-c', 'import sys; sys.exit(3)'], log)


def test_run_command_kills_when_polled_true(tmp_path):
    """The kill-and-resume path: once poll() holds, on_poll kills the child, and the kill is an expected end."""
    usage = rehearsal.run_command(['-c', 'import time; time.sleep(120)'], str(tmp_path / 'k.log'),
                                  poll=lambda: True, on_poll=lambda pid: os.kill(pid, signal.SIGKILL),
                                  expect=(-signal.SIGKILL,))
    assert usage.wall_s < 60


def test_overrides_change_only_paths_steps_and_batches(tmp_path):
    """The full-size config with the overrides passes the project's config check for every script."""
    from libs import config_check
    r = rehearsal.Rehearsal(str(tmp_path))
    config = rehearsal.load_config(r)
    config_check.check(config, 'model', 'extract', 'sample', 'train')
    assert config.nnet.depth == 30 and config.z_shape == (4, 64, 64) and config.nnet.use_checkpoint
    changed = {k.split('.')[-1] for k in rehearsal.overrides(r)}
    kinds = ('path', 'root', 'name_or_path', 'tokenizer', 'init_from', 'workdir', 'train', 'val', 'test',
             'batch_size', 'val_pairs', 'n_steps', 'log_every', 'val_every', 'ckpt_every', 'sample_every',
             'sample_steps')
    assert changed <= {k for k in changed if k.endswith(kinds)}, changed


def test_clip_tokenizer_has_the_real_vocabulary_shape(tmp_path):
    """49408 tokens, <|startoftext|> 49406 and <|endoftext|> 49407 (OpenAI's ids), 77 positions, loadable."""
    from libs.clip_encoders import CLIPTokenizer
    rehearsal.clip_bpe_files(str(tmp_path), rehearsal.CLIP_TEXT['vocab_size'], 77)
    tok = CLIPTokenizer.from_pretrained(str(tmp_path))
    assert len(tok) == 49408 and tok.bos_token_id == 49406 and tok.eos_token_id == 49407
    ids = tok('I lost my job today.', padding='max_length', max_length=77).input_ids
    assert len(ids) == 77 and ids[0] == 49406 and max(ids) < 49408


def test_write_uvit_builds_on_meta_and_fills_in_place(tmp_path):
    """The cheap writer gives the U-ViT's own key layout with finite, non-constant weights."""
    import torch

    from common import tiny
    from libs.uvit import build_nnet
    config = tiny(str(tmp_path)).nnet
    path = str(tmp_path / 'uvit.pth')
    params = rehearsal.write_uvit(config, path, seed=0)
    state = torch.load(path, weights_only=True)
    expected = build_nnet(config).state_dict()
    assert {k: v.shape for k, v in state.items()} == {k: v.shape for k, v in expected.items()}
    assert params == sum(v.numel() for v in expected.values())
    assert all(torch.isfinite(v).all() for v in state.values())
    assert state['pos_embed'].std() > 0


def test_check_layout_refuses_a_different_layout():
    import torch
    with pytest.raises(AssertionError, match='autoencoder_kl'):
        rehearsal.check_layout({'encoder.conv_in.weight': torch.zeros(1)}, 'autoencoder_kl')


def read_table(out):
    with open(os.path.join(out, rehearsal.TABLE), encoding='utf-8') as f:
        return f.read()


def run_rehearse(out, *flags):
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    return subprocess.run([sys.executable, 'scripts/rehearse.py', f'--out={out}', *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True)


@pytest.mark.slow
def test_tiny_rehearsal_runs_every_stage(tmp_path):
    """Every stage with tiny components (one sampling mode): the LoRA run is killed after step 1 and resumes, the
    app serves its page, and the table has a measured row per process; a rerun skips the finished stages, and
    --rerun runs them again from nothing."""
    out = str(tmp_path / 'r')
    done = run_rehearse(out, '--size=tiny', '--modes=empath')
    assert done.returncode == 0, done.stderr[-3000:]
    table = read_table(out)
    for stage in rehearsal.STAGES:
        assert f'| {stage} |' in table, table
    assert 'killed (SIGKILL) after step 1' in table and 'resumed from step 1' in table
    with open(os.path.join(out, 'workdir', 'lora', 'log.txt'), encoding='utf-8') as f:
        assert 'resumed from step 1' in f.read()
    record = json.load(open(os.path.join(out, 'stages', 'lora.json')))
    assert all(row['peak_rss_gb'] > 0.1 and row['cpu_s'] > 0 for row in record['rows'])
    assert os.path.isfile(os.path.join(out, 'samples', 'empath', 'samples.json'))
    assert os.path.isfile(os.path.join(out, 'eval', 'metrics.json'))
    again = run_rehearse(out, '--size=tiny', '--modes=empath')
    assert again.returncode == 0 and read_table(out) == table
    # --rerun starts each stage from nothing: the LoRA run is killed after step 1 again (an old step-2 checkpoint
    # would make it resume from 2), extraction does not meet its old manifest, eval not its old folder.
    stale = os.path.join(out, 'eval', 'stale.txt')
    open(stale, 'w').close()
    rerun = run_rehearse(out, '--size=tiny', '--modes=empath', '--rerun', '--stages=extract,lora,eval')
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    with open(os.path.join(out, 'workdir', 'lora', 'log.txt'), encoding='utf-8') as f:
        assert f.read().count('resumed from step 1') == 1
    assert not os.path.exists(stale) and os.path.isfile(os.path.join(out, 'eval', 'metrics.json'))
    assert read_table(out) != table


def test_unknown_stage_is_one_line_and_exit_2(tmp_path):
    done = run_rehearse(str(tmp_path), '--stages=components,bogus')
    assert done.returncode == 2 and 'bogus' in done.stderr and 'Traceback' not in done.stderr


@pytest.mark.fullsize
def test_full_size_rehearsal(tmp_path):
    """The whole rehearsal at full size (about an hour on 2 cores, under 24 GB): every stage runs."""
    out = os.environ.get('REHEARSE_OUT') or str(tmp_path / 'full')
    done = run_rehearse(out)
    assert done.returncode == 0, done.stderr[-3000:]
    table = read_table(out)
    for stage in rehearsal.STAGES:
        assert f'| {stage} |' in table, table
