"""Sampling precision: CPU feature detection, the per-device rule of 'auto', the log and records that state it, and
how far bf16 samples land from fp32 ones."""
import json
import logging

import pytest
import torch

import sample_multi
from common import tiny
from libs import modes, pipeline, precision
from libs.errors import UserError

X86_BF16 = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9R14
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni
processor\t: 1
flags\t\t: fpu vme sse sse2 avx avx2 avx512f avx512bw avx512_bf16 avx512_vnni
"""
X86_AVX2 = 'processor\t: 0\nflags\t\t: fpu sse sse2 avx avx2 fma\n'
ARM_BF16 = 'processor\t: 0\nBogoMIPS\t: 2100.00\nFeatures\t: fp asimd evtstrm aes sha2 crc32 i8mm bf16 sve\n'
ARM_PLAIN = 'processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\n'
# bf16 vs fp32 samples of the tiny random U-ViT (weights of std 0.2), 4 steps: max |a - b| / max |a| over a sample's
# outputs was 0.0065-0.0123 over 5 seeds of empath, t2i and joint on an AVX512-BF16 CPU (BENCHMARKS.md has the other
# sizes); the bound leaves room for other CPUs' bf16 kernels.
BF16_REL_TOL = 0.03


@pytest.mark.parametrize('text, expected', [(X86_BF16, True), (X86_AVX2, False), (ARM_BF16, True),
                                            (ARM_PLAIN, False), ('', False)],
                         ids=['x86-bf16', 'x86-avx2', 'arm-bf16', 'arm', 'empty'])
def test_cpuinfo_parsing_finds_native_bf16(text, expected):
    features = precision.parse_cpuinfo(text)
    assert bool(features & precision.BF16_MATRIX_FEATURES) is expected
    if text:
        assert 'fp' in features or 'sse' in features  # the whole first flags line was read


def test_macos_reads_sysctl(monkeypatch):
    monkeypatch.setattr(precision.sys, 'platform', 'darwin')
    monkeypatch.setattr(precision, '_sysctl', lambda name: '1' if name == 'hw.optional.arm.FEAT_BF16' else '')
    assert precision.cpu_features() == {'bf16'}
    monkeypatch.setattr(precision, '_sysctl', lambda name: '0')
    assert precision.cpu_features() == frozenset()


def test_native_bf16_needs_onednn(monkeypatch):
    monkeypatch.setattr(precision, 'cpu_features', lambda: precision.parse_cpuinfo(X86_BF16))
    assert precision.cpu_bf16_features() == {'avx512_bf16'}
    monkeypatch.setattr(torch.backends.mkldnn, 'is_available', lambda: False)
    assert precision.cpu_bf16_features() == frozenset()


@pytest.mark.parametrize('cpuinfo, expected', [(X86_BF16, torch.bfloat16), (ARM_BF16, torch.bfloat16),
                                               (X86_AVX2, None), (ARM_PLAIN, None)],
                         ids=['x86-bf16', 'arm-bf16', 'x86-avx2', 'arm'])
def test_auto_on_cpu_follows_the_cpu(monkeypatch, cpuinfo, expected):
    monkeypatch.setattr(precision, 'cpu_features', lambda: precision.parse_cpuinfo(cpuinfo))
    resolved = precision.resolve('auto', torch.device('cpu'))
    assert resolved.dtype == expected and resolved.name == precision.name_of(expected)
    assert ('has native bf16' in resolved.reason) is (expected is not None)


@pytest.mark.parametrize('native, expected', [(True, torch.bfloat16), (False, None)])
def test_auto_on_cuda_follows_native_bf16(monkeypatch, native, expected):
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: native or including_emulation)
    monkeypatch.setattr(precision, 'cpu_features', lambda: pytest.fail('a GPU run must not look at the CPU'))
    assert precision.resolve('auto', torch.device('cuda')).dtype == expected


def test_explicit_precisions(monkeypatch, caplog):
    monkeypatch.setattr(precision, 'cpu_features', lambda: precision.parse_cpuinfo(X86_AVX2))
    cpu = torch.device('cpu')
    assert precision.resolve('fp32', cpu).dtype is None
    with caplog.at_level(logging.WARNING, logger='libs.precision'):
        assert precision.resolve('bf16', cpu).dtype == torch.bfloat16
    assert 'emulated' in caplog.text  # forced bf16 without native units is allowed, and called slow
    assert precision.resolve('fp16', cpu).dtype == torch.float16
    assert precision.resolve('auto', torch.device('mps')).dtype is None
    with pytest.raises(UserError, match='auto, fp32, bf16, fp16'):
        precision.resolve('bfloat16', cpu)
    caplog.clear()
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: including_emulation)
    with caplog.at_level(logging.WARNING, logger='libs.precision'):
        assert precision.resolve('bf16', torch.device('cuda')).dtype == torch.bfloat16  # emulated: allowed, slow
    assert 'emulated' in caplog.text
    monkeypatch.setattr(torch.cuda, 'is_bf16_supported', lambda including_emulation=True: False)
    monkeypatch.setattr(torch.cuda, 'get_device_name', lambda *a: 'Tesla K80')
    with pytest.raises(UserError, match='K80 has no bf16'):
        precision.resolve('bf16', torch.device('cuda'))


def test_autocast_context():
    w, x = torch.randn(8, 8), torch.randn(2, 8)
    with precision.autocast('cpu', torch.bfloat16):
        assert (x @ w).dtype == torch.bfloat16
    with torch.autocast('cpu', dtype=torch.bfloat16), precision.autocast('cpu', None):
        assert (x @ w).dtype == torch.float32  # fp32 holds even inside an outer autocast


# ----------------------------------------------------------------------------------------------------------------
# Through the pipeline
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def empath_components(tiny_models):
    return pipeline.load_components(tiny(tiny_models, condition=True), torch.device('cpu'))


def sample_with(comp, mode, name, seed=0):
    """Outputs of one mode for 2 samples at a precision, from fixed speaker/text inputs and a fixed seed."""
    comp.config.sample.precision = name
    ctx = pipeline.make_context(comp, torch.Generator().manual_seed(seed))
    g = torch.Generator().manual_seed(5)
    z, clip_img = torch.randn(1, *ctx.z_shape, generator=g), torch.randn(1, 1, ctx.clip_img_dim, generator=g)
    text = torch.randn(1, *ctx.text_shape, generator=g)
    inputs = dict(n=2, text=text.expand(2, -1, -1), **pipeline.speaker_inputs(comp, ctx, 2, z, clip_img, text, mode))
    return ctx, modes.get_mode(mode)(ctx, inputs)


@pytest.mark.parametrize('mode', ['empath', 't2i'])
def test_bf16_samples_are_close_to_fp32(empath_components, mode):
    ctx32, fp32 = sample_with(empath_components, mode, 'fp32')
    ctx16, bf16 = sample_with(empath_components, mode, 'bf16')
    assert ctx32.autocast_dtype is None and ctx16.autocast_dtype == torch.bfloat16
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in bf16.values())  # the solver stays fp32
    diff = precision.max_relative_difference(fp32, bf16)
    assert 0 < diff < BF16_REL_TOL  # bf16 really ran, and lands near the fp32 sample


def test_make_context_logs_a_reduced_precision(empath_components, caplog):
    with caplog.at_level(logging.INFO, logger='libs.precision'):
        sample_with(empath_components, 'empath_t', 'bf16')
    assert 'sampling in bf16 autocast' in caplog.text and 'config.sample.precision=fp32' in caplog.text
    empath_components.config.sample.precision = 'fp16x'
    with pytest.raises(UserError, match='fp16x'):
        pipeline.make_context(empath_components, None)


@pytest.mark.parametrize('name', ['bf16', 'fp32'])
def test_samples_json_records_the_precision_that_ran(tiny_models, tmp_path, name):
    config = tiny(tiny_models)
    config.sample.precision = name
    record = sample_multi.sample(config, 'i', None, None, n_samples=1, nrow=1, output_path=str(tmp_path))
    saved = json.loads((tmp_path / 'i' / 'samples.json').read_text())
    assert saved['precision'] == record['precision'] == name and saved['settings']['precision'] == name
