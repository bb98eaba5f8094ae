"""Every entry point answers --help at once: exit 0, its flags listed, in under 2 s, before torch, transformers or
diffusers are imported (they are imported after the flags are parsed)."""
import glob
import json
import os
import resource
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Scripts other branches add; until they are merged these are skipped, with the reason.
EXPECTED = ('scripts/rehearse.py', 'scripts/gpu_check.py', 'scripts/memory_plan.py', 'scripts/rating_sheet.py')
HEAVY = ('torch', 'transformers', 'diffusers')
# CPU seconds of the child (user + system, from its resource usage): on a loaded CI core the wall time measures the
# other jobs, the CPU time what --help costs. 2 s on an idle core.
CPU_LIMIT_S = 2.
# Runs a script as `python SCRIPT --help` does (its folder first on sys.path, __name__ == '__main__'), then reports
# the exit status and which heavy modules were imported by then (absl exits right after printing the help).
PROBE = '''
import json, os, runpy, sys
script = sys.argv[1]
sys.argv = [script, '--help']
sys.path[0] = os.path.dirname(os.path.abspath(script))
code = None
try:
    runpy.run_path(script, run_name='__main__')
except SystemExit as exit_:
    code = exit_.code
sys.stdout.flush()
print(json.dumps(dict(exit=code, heavy=[m for m in {heavy} if m in sys.modules])), file=sys.stderr)
'''.format(heavy=HEAVY)


def entry_points():
    """Every Python script at the top level and in scripts/, and those other branches add (present or not)."""
    found = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, '*.py'))
                   + glob.glob(os.path.join(ROOT, 'scripts', '*.py')))
    return sorted(set(found) | set(EXPECTED))


def run_help(script):
    """(exit status, stdout, heavy modules imported, CPU seconds) of `python script --help` in a child."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run([sys.executable, '-c', PROBE, script], cwd=ROOT, capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, HF_HUB_OFFLINE='1'))
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert done.returncode == 0, done.stderr[-2000:]
    probe = json.loads(done.stderr.strip().splitlines()[-1])
    return probe['exit'], done.stdout, probe['heavy'], cpu


@pytest.mark.parametrize('script', entry_points())
def test_help_is_instant_and_light(script):
    if not os.path.isfile(os.path.join(ROOT, script)):
        pytest.skip(f'{script} is added by another branch and is not in this checkout yet')
    code, out, heavy, cpu = run_help(script)
    assert code in (0, None), f'{script} --help exited {code}'
    # absl's help lists the flags the script defines under its own name (not only absl's flags).
    assert f'\n{script}:\n  --' in out, out[-2000:]
    assert heavy == [], f'{script} imported {heavy} before printing its help'
    assert cpu < CPU_LIMIT_S, f'{script} --help took {cpu:.2f} s of CPU'


def test_help_lists_the_script_flags():
    # The help is the script's own, not only absl's: the demo's and the sampler's flags are listed.
    for script, flag in (('scripts/demo.py', '--quick'), ('sample_multi.py', '--mode'), ('app.py', '--port'),
                         ('train_caption_decoder.py', '--features'), ('scripts/benchmark_training.py', '--size')):
        assert flag in run_help(script)[1], script


def test_sample_multi_names_every_mode():
    # sample_multi.py names the modes in its --mode help without importing libs.modes (which imports torch).
    import sample_multi
    from libs import modes
    assert tuple(modes.MODES) == sample_multi.MODE_NAMES
