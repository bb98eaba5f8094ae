"""Sampling precision: which autocast dtype a run uses (``config.sample.precision``) and the context that applies it.

``auto`` picks bf16 where the hardware multiplies bf16 matrices natively: CUDA GPUs that support bf16, and CPUs whose
instruction set has bf16 matrix/dot-product instructions (x86 AVX512-BF16 or AMX-BF16, Arm BF16), read from the CPU
itself. Everywhere else it is fp32: without those instructions bf16 is emulated and slower than fp32. The solver and
every encoder stay in fp32 whatever the setting; only the U-ViT forward runs under autocast.
"""
import logging
import subprocess
import sys
from typing import FrozenSet, NamedTuple, Optional

import torch

from libs.errors import UserError

logger = logging.getLogger(__name__)

PRECISIONS = ('auto', 'fp32', 'bf16', 'fp16')
DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}
# CPU feature names (as Linux's /proc/cpuinfo spells them) of native bf16 matrix arithmetic: AMX tiles and AVX512
# dot products on x86, BFMMLA/BFDOT on Arm. macOS's sysctl FEAT_BF16 is reported as 'bf16'.
BF16_MATRIX_FEATURES = frozenset({'amx_bf16', 'avx512_bf16', 'bf16'})


class Precision(NamedTuple):
    """A resolved precision: its name, the autocast dtype (None = fp32, autocast off) and why it was chosen."""
    name: str
    dtype: Optional[torch.dtype]
    reason: str

    @property
    def reduced(self) -> bool:
        return self.dtype is not None


# ----------------------------------------------------------------------------------------------------------------
# What the CPU can do
# ----------------------------------------------------------------------------------------------------------------

def parse_cpuinfo(text: str) -> FrozenSet[str]:
    """Feature names of the first CPU in a Linux /proc/cpuinfo ('flags' on x86, 'Features' on Arm)."""
    for line in text.splitlines():
        key, _, value = line.partition(':')
        if key.strip().lower() in ('flags', 'features'):
            return frozenset(value.lower().split())
    return frozenset()


def _sysctl(name: str) -> str:
    """One macOS sysctl value, '' when it does not exist."""
    try:
        return subprocess.run(['sysctl', '-n', name], capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ''


def cpu_features() -> FrozenSet[str]:
    """The bf16-related instruction-set features this CPU reports (Linux /proc/cpuinfo, macOS sysctl, else torch)."""
    if sys.platform.startswith('linux'):
        try:
            with open('/proc/cpuinfo', encoding='utf-8', errors='replace') as f:
                return parse_cpuinfo(f.read())
        except OSError:
            return frozenset()
    if sys.platform == 'darwin':
        return frozenset({'bf16'}) if _sysctl('hw.optional.arm.FEAT_BF16') == '1' else frozenset()
    # Elsewhere (Windows) torch's own cpuinfo probe is what there is; it only knows x86.
    probe = getattr(torch.cpu, '_is_avx512_bf16_supported', None)
    return frozenset({'avx512_bf16'}) if probe is not None and probe() else frozenset()


def cpu_bf16_features() -> FrozenSet[str]:
    """The native bf16 matrix features of this CPU that torch can use (bf16 matmuls go through oneDNN); may be empty."""
    if not torch.backends.mkldnn.is_available():
        return frozenset()
    return cpu_features() & BF16_MATRIX_FEATURES


# ----------------------------------------------------------------------------------------------------------------
# Resolution and the autocast context
# ----------------------------------------------------------------------------------------------------------------

def resolve(name: str, device: torch.device) -> Precision:
    """``config.sample.precision`` on ``device`` -> the precision that runs; a wrong name or an impossible one fails."""
    device = torch.device(device)
    if name not in PRECISIONS:
        raise UserError(f'config.sample.precision={name!r}: use one of {", ".join(PRECISIONS)}')
    # Native = compute capability 8 and up; older GPUs can emulate bf16, slower than fp32.
    cuda_native = device.type == 'cuda' and torch.cuda.is_bf16_supported(including_emulation=False)
    if name == 'auto':
        if cuda_native:
            return Precision('bf16', torch.bfloat16, 'auto: this GPU has native bf16')
        if device.type == 'cpu':
            features = ', '.join(sorted(cpu_bf16_features()))
            if features:
                return Precision('bf16', torch.bfloat16, f'auto: this CPU has native bf16 ({features})')
            return Precision('fp32', None, 'auto: this CPU has no native bf16 matrix instructions')
        return Precision('fp32', None, f'auto: reduced precision is only chosen on CUDA GPUs and CPUs, not '
                                       f'{device.type}')
    if name == 'bf16' and device.type == 'cuda' and not cuda_native:
        if not torch.cuda.is_bf16_supported(including_emulation=True):
            raise UserError(f'config.sample.precision=bf16, but {torch.cuda.get_device_name(device)} has no bf16 '
                            'support; use fp16 or fp32')
        logger.warning('config.sample.precision=bf16 on a GPU without native bf16: it is emulated and usually slower '
                       'than fp32')
    if name == 'bf16' and device.type == 'cpu' and not cpu_bf16_features():
        logger.warning('config.sample.precision=bf16 on a CPU without native bf16 matrix instructions: it is emulated '
                       'and usually slower than fp32')
    if name == 'fp16':
        # The official code upcasts attention to fp32 because fp16 can overflow there; this project does not.
        logger.warning('config.sample.precision=fp16: the attention logits can overflow in fp16; bf16 is safer')
    return Precision(name, DTYPES[name], f'config.sample.precision={name}')


def autocast(device: torch.device, dtype: Optional[torch.dtype]) -> torch.autocast:
    """The autocast context of a resolved dtype; None runs in fp32 even inside an outer autocast (e.g. training's)."""
    return torch.autocast(torch.device(device).type, dtype=dtype or torch.float32, enabled=dtype is not None)


def name_of(dtype: Optional[torch.dtype]) -> str:
    """'fp32', 'bf16' or 'fp16' for an autocast dtype (None = fp32), as runs record it."""
    return next(name for name, d in DTYPES.items() if d == dtype)


def log_precision(precision: Precision, what: str = 'sampling') -> None:
    """Say in the log which precision runs and why (reduced precision: how to turn it off)."""
    if precision.reduced:
        logger.info('%s in %s autocast (%s); outputs differ slightly from fp32 (config.sample.precision=fp32 turns '
                    'it off)', what, precision.name, precision.reason)
    else:
        logger.info('%s in fp32 (%s)', what, precision.reason)


def max_relative_difference(reference: dict, other: dict) -> float:
    """How far a reduced-precision sample is from the fp32 one: max over outputs of max |a - b| / max |a|."""
    return max(((reference[k] - other[k]).abs().max() / reference[k].abs().max()).item() for k in reference)
