"""Tiny random components for a CPU run of every mode in seconds (make them: scripts/make_tiny_models.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import tiny  # noqa: E402


def get_config():
    return tiny('models/tiny')
