"""Tiny EmpathDiffuser training on CPU in seconds (components from scripts/make_tiny_models.py)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from avamerg_empath import empath  # noqa: E402
from common import tiny  # noqa: E402


def get_config(root='models/tiny'):
    config = empath(tiny(root, condition=True), features=f'{root}/features')
    config.name = 'avamerg_tiny'
    config.log_with = ''
    config.train.update(init_from=f'{root}/uvit_v1.pth', n_steps=200, batch_size=8, ema_rate=0.99, log_every=10,
                        val_every=50, val_pairs=32, ckpt_every=50, keep_last=2, sample_every=0, sample_n=2)
    config.optimizer.update(lr=1e-3, warmup_steps=10)
    config.data.update(num_workers=0, max_open_shards=2)
    config.caption_decoder_train.update(heldout_fraction=0.25, eval_utterances=32, max_tokens=16, n_steps=300,
                                        batch_size=16, lr=3e-3, warmup_steps=20, log_every=25, num_workers=0)
    return config
