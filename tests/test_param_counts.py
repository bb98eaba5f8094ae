"""Parameter counts of the full-size networks, built on the meta device from the shipped configs (no memory).

The figures are the ones README.md and BENCHMARKS.md print, to their printed precision: UniDiffuser-v1 952.5M;
EmpathDiffuser 959.7M, of which 7.16M new (speaker positions 1.70M, gate maps 3.05M, emotion head 2.41M); LoRA at
the default rank 32 trains 31.5M parameters of 984.0M.
"""
import json
import os

import pytest
import torch

from configs.avamerg_empath import get_config as empath_config
from configs.sample_unidiffuser_v1 import get_config as unidiffuser_v1_config
from libs.uvit import GATE_KEY, build_nnet, is_condition_key

OFFICIAL_V1_KEYS = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures', 'uvit_v1.keys.json')

# Each new parameter's group; positions include the segment embedding, the head its [EMO] token.
GROUPS = {'pos_embed_cond': 'positions', 'segment_embed': 'positions', 'emo_token': 'emotion head',
          'emotion_head': 'emotion head'}


def millions(n, digits):
    return round(n / 1e6, digits)


def meta_nnet(config):
    with torch.device('meta'):
        return build_nnet(config.nnet)


def count(model, keep=lambda name: True):
    return sum(p.numel() for n, p in model.named_parameters() if keep(n))


def new_groups(model):
    """Parameter count of each group of EmpathDiffuser additions."""
    out = {}
    for name, p in model.named_parameters():
        if is_condition_key(name):
            group = 'gate maps' if name.endswith(GATE_KEY) else GROUPS[name.split('.')[0]]
            out[group] = out.get(group, 0) + p.numel()
    return out


@pytest.fixture(scope='module')
def nets():
    return meta_nnet(empath_config()), meta_nnet(unidiffuser_v1_config())


def test_unidiffuser_v1_count(nets):
    _, v1 = nets
    assert millions(count(v1), 1) == 952.5


def test_empath_count_and_breakdown(nets):
    empath, v1 = nets
    assert millions(count(empath), 1) == 959.7
    new = count(empath, is_condition_key)
    assert new == count(empath) - count(v1)  # the additions are exactly what v1 lacks
    assert millions(new, 2) == 7.16
    groups = new_groups(empath)
    assert {k: millions(v, 2) for k, v in groups.items()} == {'positions': 1.70, 'gate maps': 3.05,
                                                             'emotion head': 2.41}
    assert sum(groups.values()) == new


@pytest.mark.reference
def test_official_v1_keys_are_a_subset(nets):
    empath, v1 = nets
    with open(OFFICIAL_V1_KEYS) as f:
        official = {k: tuple(v) for k, v in json.load(f).items()}
    for model in (empath, v1):
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        assert official.items() <= shapes.items()
    assert set(v1.state_dict()) == set(official)


def test_lora_default_rank_count():
    from libs import trainer
    config = empath_config()
    config.train.lora.enabled = True
    config.train.init_from = ''  # counts only: no pretrained weights to read
    with torch.device('meta'):
        model = trainer.build_model(config)
    assert config.train.lora.rank == 32
    assert millions(count(model), 1) == 984.0
    assert millions(sum(p.numel() for p in model.parameters() if p.requires_grad), 1) == 31.5
