"""sample_multi.py end to end on tiny components: every mode writes its outputs; bad input exits 2 cleanly."""
import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

import sample_multi
from common import tiny
from libs import modes
from libs.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_MODES = {'t2i', 'joint', 'i', 'i2t2i', 'empath', 'empath_i'}
TEXT_FILES = {'joint': 'prompts.txt', 'i2t': 'i2t.txt', 't': 't.txt', 't2i2t': 't2i2t.txt', 'empath': 'empath.txt',
              'empath_t': 'empath_t.txt'}


@pytest.fixture(scope='module')
def face(tmp_path_factory):
    path = str(tmp_path_factory.mktemp('img') / 'face.png')
    Image.new('RGB', (48, 40), (200, 120, 90)).save(path)
    return path


def config_for(root, mode):
    return tiny(root, condition=mode in modes.EMPATH_MODES)


@pytest.mark.parametrize('mode', list(modes.MODES))
def test_every_mode_writes_outputs(mode, tiny_models, face, tmp_path):
    record = sample_multi.sample(config_for(tiny_models, mode), mode, 'a photo of a cat', face, n_samples=2,
                                 nrow=2, output_path=str(tmp_path))
    folder = tmp_path / mode
    files = set(os.listdir(folder))
    if mode in IMAGE_MODES:
        assert {'0.png', '1.png', 'grid.png'} <= files
        assert Image.open(folder / 'grid.png').size == (2 * 32, 32)
    else:
        assert not any(f.endswith('.png') for f in files)
    if mode in TEXT_FILES:
        lines = (folder / TEXT_FILES[mode]).read_text().rstrip('\n').split('\n')
        assert len(lines) == 2
    saved = json.loads((folder / 'samples.json').read_text())
    assert saved['mode'] == mode and saved['seed'] == record['seed'] and saved['n_samples'] == 2
    assert saved['settings']['sample_steps'] == 4 and saved['seconds_per_sample'] > 0
    if mode in modes.EMPATH_MODES:
        top3 = saved['outputs']['emotions'][0]
        assert len(top3) == 3 and top3[0][1] >= top3[1][1] >= top3[2][1]
    assert not [f for f in os.listdir(tmp_path) if f.startswith('.')]  # no temp folder left behind


def test_same_seed_same_outputs(tiny_models, face, tmp_path):
    cfg = config_for(tiny_models, 'joint')
    a = sample_multi.sample(cfg, 'joint', None, None, 2, 2, str(tmp_path / 'a'))
    b = sample_multi.sample(cfg, 'joint', None, None, 2, 2, str(tmp_path / 'b'))
    assert a['outputs'] == b['outputs']
    assert (tmp_path / 'a/joint/0.png').read_bytes() == (tmp_path / 'b/joint/0.png').read_bytes()


@pytest.mark.parametrize('speaker', [dict(prompt='i lost my job'), dict(img=True), dict()])
def test_empath_input_combinations(speaker, tiny_models, face, tmp_path):
    record = sample_multi.sample(config_for(tiny_models, 'empath'), 'empath', speaker.get('prompt'),
                                 face if speaker.get('img') else None, 1, 1, str(tmp_path))
    assert record['outputs']['texts'] and record['outputs']['emotions']


def test_long_prompt_is_truncated_with_warning(tiny_models, tmp_path, caplog):
    with caplog.at_level('WARNING'):
        sample_multi.sample(config_for(tiny_models, 't2i'), 't2i', 'cat ' * 200, None, 1, 1, str(tmp_path))
    assert 'truncat' in caplog.text.lower()


@pytest.mark.parametrize('kwargs,match', [
    (dict(mode='img2txt'), 'unknown mode'),
    (dict(mode='t2i', n_samples=0), 'n_samples'),
    (dict(mode='i2t', img=None), 'needs --img'),
    (dict(mode='t2i', prompt=None), 'needs --prompt'),
    (dict(mode='i2t', img='/nonexistent.png'), 'no such file'),
])
def test_bad_flags(kwargs, match, tiny_models, tmp_path):
    args = dict(mode='t2i', prompt='a cat', img=None, n_samples=1, nrow=1, output_path=str(tmp_path))
    args.update(kwargs)
    with pytest.raises(UserError, match=match):
        sample_multi.sample(config_for(tiny_models, 't2i'), **args)
    assert not os.path.exists(tmp_path / args['mode'])


def test_unreadable_image(tiny_models, tmp_path):
    bad = tmp_path / 'bad.png'
    bad.write_bytes(b'not a png')
    with pytest.raises(UserError, match='not a readable image'):
        sample_multi.sample(config_for(tiny_models, 'i2t'), 'i2t', None, str(bad), 1, 1, str(tmp_path / 'out'))


def test_mismatched_checkpoint_names_keys_and_keeps_old_outputs(tiny_models, tmp_path):
    cfg = config_for(tiny_models, 't2i')
    sample_multi.sample(cfg, 't2i', 'a cat', None, 1, 1, str(tmp_path))
    before = (tmp_path / 't2i' / '0.png').read_bytes()
    sd = torch.load(cfg.nnet_path, weights_only=True)
    sd['text_embed.weight'] = torch.zeros(3, 3)
    torch.save(sd, tmp_path / 'bad.pth')
    with pytest.raises(UserError, match='text_embed.weight'):
        sample_multi.sample(cfg, 't2i', 'a cat', None, 1, 1, str(tmp_path), nnet_path=str(tmp_path / 'bad.pth'))
    assert (tmp_path / 't2i' / '0.png').read_bytes() == before


def test_missing_tokenizer_files(tiny_models, tmp_path):
    cfg = config_for(tiny_models, 't2i')
    cfg.caption_decoder.tokenizer = str(tmp_path / 'no_tokenizer')
    with pytest.raises(UserError, match='tokenizer'):
        sample_multi.sample(cfg, 't2i', 'a cat', None, 1, 1, str(tmp_path))


def run_cli(*args, cwd=ROOT):
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    return subprocess.run([sys.executable, 'sample_multi.py', *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)


def test_cli_exit_codes(tiny_models, tmp_path):
    bad = run_cli('--mode=nope', f'--output_path={tmp_path}')
    assert bad.returncode == 2 and 'unknown mode' in bad.stderr and 'empath' in bad.stderr
    missing = run_cli('--mode=t2i', '--prompt=x', f'--output_path={tmp_path}', '--config=configs/sample_tiny.py',
                      f'--config.nnet_path={tmp_path}/missing.pth')
    assert missing.returncode == 2 and 'missing.pth' in missing.stderr and 'train_empath.py' in missing.stderr
    ok = run_cli('--mode=t', f'--output_path={tmp_path}', '--config=configs/sample_tiny.py',
                 f'--config.nnet_path={tiny_models}/uvit_v1.pth', *[
                     f'--config.{k}={tiny_models}/{v}' for k, v in (
                         ('clip_text.name_or_path', 'clip_text'), ('clip_img.name_or_path', 'clip_img'),
                         ('caption_decoder.tokenizer', 'gpt2_tokenizer'),
                         ('caption_decoder.pretrained_path', 'caption_decoder.pth'),
                         ('autoencoder.pretrained_path', 'autoencoder_kl.pth'))])
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert (tmp_path / 't' / 't.txt').exists()
