import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
for path in (ROOT, os.path.join(ROOT, 'configs')):
    if path not in sys.path:
        sys.path.insert(0, path)


@pytest.fixture(scope='session')
def tiny_models(tmp_path_factory):
    """Tiny random components in the official layouts, written once per test session; returns their folder."""
    from common import tiny
    from libs.tiny_models import make_tiny_models, randomize_
    from libs.uvit import build_nnet
    import torch
    root = str(tmp_path_factory.mktemp('tiny_models'))
    make_tiny_models(tiny(root), seed=0)
    empath = tiny(root, condition=True)
    torch.save(randomize_(build_nnet(empath.nnet), 4).state_dict(), empath.nnet_path)
    return root
