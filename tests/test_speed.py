"""Speed options on tiny components: the torch.compile path (config.nnet.compile) computes what eager does, and
scripts/benchmark.py runs its full-size plan (every mode, batch 1 and 4, two precisions, caption decoding) end to
end."""
import os
import re
import subprocess
import sys

import torch

from common import tiny
from libs import modes, pipeline
from test_precision import BF16_REL_TOL

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sample(comp, mode, seed=0):
    ctx = pipeline.make_context(comp, torch.Generator().manual_seed(seed))
    inputs = dict(n=2, **pipeline.speaker_inputs(comp, ctx, 2, text=torch.randn(1, *ctx.text_shape,
                                                                                   generator=torch.Generator())))
    return modes.get_mode(mode)(ctx, inputs)


def test_compiled_unet_equals_eager(tiny_models):
    config = tiny(tiny_models, condition=True)
    eager = pipeline.load_components(config, torch.device('cpu'), need_images=False, need_text=False)
    config.nnet.compile = True
    compiled = pipeline.load_components(config, torch.device('cpu'), need_images=False, need_text=False)
    assert compiled.nnet._compiled_call_impl is not None and eager.nnet._compiled_call_impl is None
    a, b = sample(eager, 'empath_t'), sample(compiled, 'empath_t')
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)


def test_benchmark_runs_every_mode_end_to_end():
    out = subprocess.run([sys.executable, os.path.join(ROOT, 'scripts', 'benchmark.py'), '--size=tiny',
                          '--modes=all', '--precisions=fp32,bf16', '--batches=1,4', '--steps=2', '--repeats=1'],
                         capture_output=True, text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE='1'))
    assert out.returncode == 0, out.stderr[-3000:]
    rows = {(m.group(1), int(m.group(2))): m.group(0)
            for m in re.finditer(r'^\| (\w+) \| (\d) \| [\d.]+ \(fp32\) \| [\d.]+ \(bf16\) \|.*$', out.stdout, re.M)}
    assert set(rows) == {(mode, B) for mode in modes.MODES for B in (1, 4)}
    for row in rows.values():
        diff = float(row.rstrip(' |').rsplit('|', 1)[1])  # the last column: bf16's max relative difference
        assert 0 < diff < BF16_REL_TOL
    assert re.search(r'^\| batch 4 \| [\d.]+ \|$', out.stdout, re.M)  # caption decoding
    assert 'native bf16' in out.stdout and 'load average' in out.stdout
    gaps = [line for line in out.stdout.splitlines() if line.startswith('- unmeasured on a GPU')]
    assert len(gaps) == 2 * len(modes.MODES) + 2  # a CPU run measures none of the full-size GPU figures
