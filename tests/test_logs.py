"""Quiet command-line output (libs/logs.py): no library loading bars or per-prompt warnings, rounded emotions."""
import os
import re
import subprocess
import sys

from libs import logs
from sample_multi import emotion_lines

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_bare_v_means_verbose():
    assert logs.bare_v_as_verbose(['prog', '-v', '--mode=t']) == ['prog', '--verbose', '--mode=t']
    assert logs.bare_v_as_verbose(['prog', '--mode=t', '-v']) == ['prog', '--mode=t', '--verbose']
    assert logs.bare_v_as_verbose(['prog', '-v', '1']) == ['prog', '-v', '1']  # absl's -v <level> is kept
    assert logs.bare_v_as_verbose(['prog', '--', '-v']) == ['prog', '--', '-v']


def test_emotion_lines():
    same = [[('sad', 0.41234), ('lonely', 0.2), ('anxious', 0.1)]] * 2
    assert emotion_lines(same) == ['speaker emotion: sad 0.41, lonely 0.20, anxious 0.10']
    assert emotion_lines([same[0], [('joyful', 0.9)]])[1] == 'speaker emotion, sample 1: joyful 0.90'
    assert emotion_lines(None) == []


def test_sample_multi_is_quiet_and_prints_emotions(tiny_models, tmp_path):
    long_prompt = 'I lost my job today and ' * 20  # far over the tiny CLIP context
    args = [f'--config.{k}={tiny_models}/{v}' for k, v in (
        ('clip_text.name_or_path', 'clip_text'), ('clip_img.name_or_path', 'clip_img'),
        ('caption_decoder.tokenizer', 'gpt2_tokenizer'), ('caption_decoder.pretrained_path', 'caption_decoder.pth'),
        ('autoencoder.pretrained_path', 'autoencoder_kl.pth'), ('nnet_path', 'uvit_empath.pth'))]
    run = subprocess.run([sys.executable, 'sample_multi.py', '--config=configs/sample_tiny.py', '--mode=empath',
                          '--config.nnet.name=uvit_empath', f'--prompt={long_prompt}', '--n_samples=2',
                          f'--output_path={tmp_path}', *args], cwd=ROOT, capture_output=True, text=True,
                         timeout=300, env=dict(os.environ, HF_HUB_OFFLINE='1'))
    assert run.returncode == 0, run.stderr[-2000:]
    assert 'Loading weights' not in run.stderr  # transformers' bars are off unless -v
    stderr = run.stderr.splitlines()
    assert all(re.match(r'\d\d:\d\d:\d\d \S+ (INFO|WARNING): ', line) for line in stderr), stderr
    assert sum('truncated to' in line for line in stderr) == 1
    emotions = [line for line in run.stdout.splitlines() if line.startswith('speaker emotion')]
    assert emotions and all(re.fullmatch(r'speaker emotion(, sample \d)?: (\w+ \d\.\d\d(, )?){3}', line)
                            for line in emotions), run.stdout
