"""EmpathDiffuser at 256x256 (AvaMERG's native frame size): 32x32 latents, a quarter of the image tokens.

The network keeps img_size=64 so the pretrained 32x32-patch-grid positions load unchanged; the U-ViT interpolates
them to the 16x16 grid of these latents.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from avamerg_empath import empath  # noqa: E402
from common import unidiffuser  # noqa: E402


def get_config():
    config = empath(unidiffuser('v1'), features='features/avamerg_256')
    config.name = 'avamerg_empath_256'
    config.z_shape = (4, 32, 32)
    return config
