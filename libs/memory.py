"""Memory: encoder work in chunks, the planned peak memory of every stage, and the preflight that checks it.

``chunked`` runs a batched function in pieces whose size does not depend on the data batch (the encoders call it with
``config.encoders``). The planner traces each network on fake tensors (torch's FakeTensorMode: exact shapes, dtypes
and kernel choices, no data, no memory) and counts the most bytes its tensors hold at once (``LivePeak``); a stage's
plan adds the weights it keeps loaded. ``preflight`` compares a plan with the free memory of a CUDA device before a
script's first heavy step and refuses with one line naming the setting to lower and a value that fits. A CPU run
never refuses. Allocator fragmentation and the CUDA context are not in a plan (``CUDA_OVERHEAD`` stands for them).
"""
import functools
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


def chunked(fn, chunk, *tensors):
    """``fn(*tensors)`` computed over the leading dimension in pieces of at most ``chunk`` rows, concatenated.

    Rows must be independent (per-sample networks): then the result is that of one call, whatever ``chunk`` is.
    """
    n = len(tensors[0])
    if not chunk or n <= chunk:
        return fn(*tensors)
    return torch.cat([fn(*(t[s:s + chunk] for t in tensors)) for s in range(0, n, chunk)])
