"""Tiny random UniDiffuser-v1 components for a CPU run of the seven UniDiffuser modes in seconds.

Make them with ``python scripts/make_tiny_models.py`` (``--out DIR`` and ``--config=configs/sample_tiny.py:DIR`` for
another folder). The empath modes need the EmpathDiffuser network: ``configs/sample_tiny_empath.py``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import tiny  # noqa: E402


def get_config(root='models/tiny'):
    return tiny(root)
