"""Sampling with the official UniDiffuser-v1 weights at 512x512 (the official defaults: 50 NFE, scale 7)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import unidiffuser  # noqa: E402


def get_config():
    return unidiffuser('v1')
