"""Tiny random EmpathDiffuser for a CPU run of every mode, the empath ones included, in seconds.

The same components as ``configs/sample_tiny.py`` with the conditional U-ViT (``uvit_empath.pth``, random weights
with open gates, so the speaker turn changes the response), all written by ``python scripts/make_tiny_models.py``.
A network trained from the tiny components is sampled with its training config, ``configs/avamerg_tiny.py``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import tiny  # noqa: E402


def get_config(root='models/tiny'):
    return tiny(root, condition=True)
