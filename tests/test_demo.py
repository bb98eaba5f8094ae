"""The newcomer's demo learns: ``scripts/demo.py --quick`` end to end, its learning numbers against the untrained
network and chance, the report, the reuse of finished stages, and the stage bookkeeping on toy stages."""
import json
import os
import re
import subprocess
import sys

import ml_collections
import pytest

from libs.demo import MARKER, Stage, run_stages

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TIMEOUT_S = 1500  # the quick schedule took 8 minutes on two idle cores


def run_demo(out):
    """Run the quick demo into `out`; returns its console output."""
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    done = subprocess.run([sys.executable, os.path.join('scripts', 'demo.py'), '--out', str(out), '--quick'], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """(output folder, metrics.json) of one quick demo run."""
    out = tmp_path_factory.mktemp('demo')
    run_demo(out)
    with open(out / 'metrics.json', encoding='utf-8') as f:
        return out, json.load(f)


def test_emotion_accuracy_well_above_chance(demo):
    # The speaker's words and face determine the coarse class exactly (libs/synthetic.py), so 7-way accuracy can
    # reach 1; the fine emotion is drawn uniformly within its coarse class, which caps 32-way accuracy near 0.45.
    # Always answering the most frequent class (the majority baseline, 0.1-0.3 here) is the chance to beat.
    numbers = demo[1]['learning']
    coarse, fine = numbers['emotion_coarse_acc'], numbers['emotion_fine_acc']
    assert coarse['trained'] >= max(0.8, coarse['majority'] + 0.4), coarse
    assert fine['trained'] >= max(0.25, fine['majority'] + 0.1, 5 * fine['uniform']), fine
    assert coarse['untrained'] <= coarse['majority'] + 0.1, coarse  # the untrained head is no better than chance


def test_response_bleu_far_above_untrained(demo):
    # Replies are drawn from 9 templates per empathetic reaction. The untrained network's latents decode to word
    # salad that shares frequent words with the references but hardly any 4-gram (BLEU-4 about 1); a trained one
    # decodes to whole templates (quick schedule: BLEU-4 11.5 vs 2.2, BLEU-2 15.9 vs 5.4; the full one reaches 29).
    numbers = demo[1]['learning']
    assert numbers['bleu4']['trained'] >= max(4., 3 * numbers['bleu4']['untrained']), numbers['bleu4']
    assert numbers['bleu2']['trained'] >= 2 * numbers['bleu2']['untrained'], numbers['bleu2']


def test_response_faces_show_the_prescribed_expression(demo):
    # The listener's face follows RESPONSE_EXPRESSION of the speaker's coarse class (4 expressions, 1/4 chance);
    # the expression classifier, trained only on drawn faces, reads it on the generated faces. The instrument
    # must be reliable on drawn faces; the codec reconstructions it reads are the ceiling for generated ones.
    numbers, classifier = demo[1]['learning']['expression_agreement'], demo[1]['expression_classifier']
    assert classifier['heldout_rendered_acc'] >= 0.9 and classifier['reference_faces'] >= 0.9, classifier
    assert classifier['codec_reconstructions'] >= 0.6, classifier
    # Quick schedule: 0.47 (untrained 0.29, always the most frequent expression 0.37); the full one reaches 0.60.
    assert numbers['trained'] >= max(1.5 * numbers['uniform'], numbers['untrained'] + 0.05, numbers['majority']), \
        numbers


def test_report_is_self_contained(demo):
    out, metrics = demo
    with open(out / 'report.html', encoding='utf-8') as f:
        page = f.read()
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith('data:image/png;base64,') for s in sources)
    for text in ('Learning', 'Examples', 'The small components', '<svg', 'random weights', 'trained from scratch'):
        assert text in page
    assert ('FID not computed' in page) != metrics['fid']['computed']


def test_rerun_reuses_every_stage(demo):
    out, metrics = demo
    markers = {name: (out / name / MARKER).read_text() for name in metrics['stage_seconds']}
    log = run_demo(out)
    assert log.count('done earlier') == len(markers), log[-3000:]
    assert {name: (out / name / MARKER).read_text() for name in markers} == markers


def test_unit_text_scale(tiny_models):
    # The demo rescales the random encode_prefix so that the U-ViT's text features have unit std on the corpus
    # (libs.demo.unit_text_scale); only the scale of the map changes, not its direction.
    import torch

    from common import tiny
    from libs.caption_decoder import load_caption_decoder
    from libs.clip_encoders import CLIPTextEncoder
    from libs.demo import unit_text_scale
    config = tiny(tiny_models)
    cd = config.caption_decoder
    decoder = load_caption_decoder(cd.pretrained_path, cd.tokenizer, True, config=cd)
    clip_text = CLIPTextEncoder(config.clip_text.name_or_path, local_files_only=True)
    corpus = ['I got the job I applied for!', 'My old dog passed away.', 'Tell me more about what happened.',
              'That is wonderful news, I am so happy for you!', 'Ugh, the bus smelled like rotten eggs.']
    weight = decoder.encode_prefix.weight.detach().clone()
    c = unit_text_scale(decoder, clip_text, corpus, batch_size=2)
    with torch.no_grad():
        features = decoder.encode_prefix(clip_text.encode(corpus).float())
    assert abs(features.std().item() - 1) < 1e-4 and c > 0
    assert torch.allclose(decoder.encode_prefix.weight, c * weight)


def toy_stages(calls):
    """Three toy stages a -> b -> c; c also reads a; each records that it ran."""
    def stage(name):
        def run(folder):
            calls.append(name)
            with open(os.path.join(folder, 'out.txt'), 'w') as f:
                f.write(name)
            return {'ran': name}
        return run
    return [Stage('a', stage('a'), keys=('x',)), Stage('b', stage('b'), keys=('y.z',), deps=('a',)),
            Stage('c', stage('c'), deps=('b', 'a'))]


def test_changed_setting_reruns_its_stage_and_later_ones(tmp_path):
    config = ml_collections.ConfigDict(dict(x=1, y=dict(z=2, unused=3)))
    calls = []
    run_stages(toy_stages(calls), config, str(tmp_path))
    assert calls == ['a', 'b', 'c']
    calls.clear()
    config.y.unused = 4  # read by no stage
    run_stages(toy_stages(calls), config, str(tmp_path))
    assert calls == []
    config.y.z = 5
    markers = run_stages(toy_stages(calls), config, str(tmp_path))
    assert calls == ['b', 'c'] and markers['b']['summary'] == {'ran': 'b'}
    calls.clear()
    config.x = 0
    run_stages(toy_stages(calls), config, str(tmp_path))
    assert calls == ['a', 'b', 'c']


def test_unfinished_stage_is_rebuilt_from_scratch(tmp_path):
    config = ml_collections.ConfigDict(dict(x=1, y=dict(z=2)))
    calls = []
    run_stages(toy_stages(calls), config, str(tmp_path))
    os.remove(tmp_path / 'b' / MARKER)  # as if the run had died inside stage b
    (tmp_path / 'b' / 'leftover.txt').write_text('partial')
    calls.clear()
    run_stages(toy_stages(calls), config, str(tmp_path))
    assert calls == ['b', 'c']  # c read b's outputs, which were rebuilt
    assert not (tmp_path / 'b' / 'leftover.txt').exists()
