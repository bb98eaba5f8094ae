"""Sampling with the official UniDiffuser-v0 weights (no data-type token)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import unidiffuser  # noqa: E402


def get_config():
    return unidiffuser('v0')
