"""scripts/gpu_check.py's logic on a CPU at tiny size (no GPU is lent to the test suite), writing into a temp table."""
import os
import subprocess
import sys

import pytest

from libs import gpu_check
from libs.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BEFORE, AFTER = '# Benchmarks\n\nearlier text\n', '\nlater text\n'


def table_file(tmp_path, inside='| old | table |'):
    path = tmp_path / 'BENCHMARKS.md'
    path.write_text(f'{BEFORE}{gpu_check.MARKERS[0]}\n{inside}\n{gpu_check.MARKERS[1]}{AFTER}')
    return path


def test_write_between_markers_replaces_only_the_block(tmp_path):
    path = table_file(tmp_path)
    gpu_check.write_between_markers(str(path), '| new |')
    assert path.read_text() == f'{BEFORE}{gpu_check.MARKERS[0]}\n| new |\n{gpu_check.MARKERS[1]}{AFTER}'


def test_write_between_markers_without_markers_is_a_user_error(tmp_path):
    path = tmp_path / 'B.md'
    path.write_text('no markers here\n')
    with pytest.raises(UserError, match='gpu-check:begin'):
        gpu_check.write_between_markers(str(path), '| new |')
    assert path.read_text() == 'no markers here\n'


def test_benchmarks_carries_the_markers():
    """`make gpu-check` writes into BENCHMARKS.md: the block must be there."""
    with open(os.path.join(ROOT, 'BENCHMARKS.md'), encoding='utf-8') as f:
        text = f.read()
    assert text.index(gpu_check.MARKERS[0]) < text.index(gpu_check.MARKERS[1])


def run_check(tmp_path, *flags):
    return subprocess.run([sys.executable, 'scripts/gpu_check.py', '--device=cpu', '--size=tiny',
                           f'--out={tmp_path / "gc"}', *flags], cwd=ROOT, capture_output=True, text=True,
                          env=dict(os.environ, HF_HUB_OFFLINE='1'))


def test_no_gpu_is_one_line_and_exit_2(tmp_path):
    done = subprocess.run([sys.executable, 'scripts/gpu_check.py', '--device=cuda', f'--out={tmp_path}'], cwd=ROOT,
                          capture_output=True, text=True, env=dict(os.environ, PATH='/nonexistent'))
    assert done.returncode == 2 and '--device=cpu --size=tiny' in done.stderr and 'Traceback' not in done.stderr


@pytest.mark.slow
def test_tiny_check_fills_every_row(tmp_path):
    """Every figure measured (extraction, both trainings, every mode, captions, evaluation) into the temp table."""
    from libs.modes import MODES
    path = table_file(tmp_path)
    done = run_check(tmp_path, f'--benchmarks={path}')
    assert done.returncode == 0, done.stderr[-3000:]
    text = path.read_text()
    assert text.startswith(BEFORE) and text.endswith(AFTER) and '| old | table |' not in text
    block = text[text.index(gpu_check.MARKERS[0]):]
    for figure in ('pairs/s', 'LoRA', 'full fine-tune', 'ms/sample', 's/pair', *(f'sampling, {m},' for m in MODES)):
        assert figure in block, (figure, block)
    assert 'skipped' not in block and 'nan' not in block
    # A zero budget measures nothing after the components and says so, row by row.
    done = run_check(tmp_path, '--benchmarks=', '--budget_s=0')
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count('| skipped |') == 5, done.stdout
