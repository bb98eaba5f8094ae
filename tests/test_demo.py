"""The newcomer's demo: ``scripts/demo.py --quick`` end to end, its learning against controls, the pre-trained
starting point, the report, the reuse of finished stages; and the demo's building blocks on toy inputs."""
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import ml_collections
import pytest
import torch

from libs.demo.stages import MARKER, Stage, derangement, run_stages, shuffle_speakers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_TIMEOUT_S = 1800  # the quick schedule took 13.5 minutes on two idle AVX2 cores (2026-12-07)

# How far the fine-tuned network must beat the same network answering shuffled speaker turns. A network that ignores
# the speaker gives the same responses to both (the per-pair noise is the same), so its margin is 0 up to the
# instruments' noise. Measured on the quick schedule, seeds 0-2 (2026-12-01): margins (mean +- sd) 0.87 +- 0.01
# (7-way emotion) and 0.37 +- 0.06 (32-way). The response is not asserted: beating the shuffled control alone is not
# learning (see below), and on 2026-12-07 a quick run's utterance stood at 0.33 against a majority class of 0.37
# (shuffled 0.25) and its face at 0.32 against 0.37. BLEU-4 and the face are within the noise on this schedule too.
# The report shows all of them; the full schedule's report (assets/demo/metrics.json, README) separates them.
MARGINS = dict(emotion_coarse_acc=0.5, emotion_fine_acc=0.2)
# How far the fine-tuned network must beat always answering the majority class. The shuffled control sits below
# chance (a network answering the wrong speaker picks the wrong reaction), so beating it alone is not learning.
# The quick schedule learns the speaker's emotion well above chance; its response utterance and face stay near or
# below the majority class (issue 22: utterance 0.380 vs 0.367, face 0.253 vs 0.369; 2026-12-07: 0.33 and 0.32 vs
# 0.37), so the test does not claim them.
ABOVE_MAJORITY = dict(emotion_coarse_acc=0.3, emotion_fine_acc=0.1)


def run_demo(out):
    """Run the quick demo into `out`; returns its console output."""
    env = dict(os.environ, HF_HUB_OFFLINE='1')
    done = subprocess.run([sys.executable, os.path.join('scripts', 'demo.py'), '--out', str(out), '--quick'], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=DEMO_TIMEOUT_S)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done.stdout + done.stderr


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    """(output folder, metrics.json, console output) of one quick demo run."""
    out = tmp_path_factory.mktemp('demo')
    log = run_demo(out)
    with open(out / 'metrics.json', encoding='utf-8') as f:
        return out, json.load(f), log


def test_instruments_read_the_synthetic_ground_truth(demo):
    # The classifier (trained on drawn faces only) and the reply-template reader must read the prescribed reaction
    # on the references, or the learning numbers below would measure the instruments.
    instruments = demo[1]['instruments']
    assert instruments['heldout_rendered_acc'] >= 0.9 and instruments['reference_faces'] >= 0.9, instruments
    assert instruments['reference_texts'] == 1., instruments


@pytest.mark.parametrize('key', sorted(MARGINS))
def test_learning_beats_the_shuffled_speaker_control(demo, key):
    row = demo[1]['learning'][key]
    assert row['trained'] - row['shuffled'] >= MARGINS[key], row


@pytest.mark.parametrize('key', sorted(ABOVE_MAJORITY))
def test_learning_beats_the_majority_class(demo, key):
    row = demo[1]['learning'][key]
    assert row['trained'] - row['majority'] >= ABOVE_MAJORITY[key], row


def test_controls_are_at_chance(demo):
    # The shuffled speaker shares the coarse emotion of the true one on about 1/7 of the pairs; the pre-trained
    # network's emotion head is untrained.
    learning = demo[1]['learning']
    coarse = learning['emotion_coarse_acc']
    assert coarse['shuffled'] <= coarse['majority'] + 0.15 and coarse['pretrained'] <= coarse['majority'] + 0.15, coarse
    for key in ('text_agreement', 'face_agreement'):
        assert learning[key]['pretrained'] <= learning[key]['majority'] + 0.15, learning[key]


def test_finetune_starts_from_the_official_layout_pretrained_network(demo):
    out, metrics, _ = demo
    start = metrics['start']
    # The fine-tune's step-0 network computes exactly the pre-trained outputs, with real speaker turns and without.
    assert start['init']['speaker_max'] == 0 and start['init']['no_speaker_max'] == 0, start['init']
    assert start['after']['speaker_max'] > 1e-3, start['after']
    # uvit_v1.pth is a plain state dict that a freshly built UniDiffuser-v1 network takes with strict loading.
    from libs.uvit import build_nnet
    with open(out / 'pretrain' / 'pretrain' / 'config.json', encoding='utf-8') as f:
        nnet_config = json.load(f)['nnet']
    assert nnet_config['name'] == 'uvit_multi_post_ln_v1'
    state_dict = torch.load(out / 'models' / 'uvit_v1.pth', map_location='cpu', weights_only=True)
    build_nnet(nnet_config).load_state_dict(state_dict, strict=True)


def test_unidiffuser_modes_run_on_the_finetuned_network(demo):
    # The fine-tuned network runs UniDiffuser's t2i and i2t with no speaker, as sample_multi.py does, and does not do
    # them worse than the pre-trained network beyond the run-to-run spread (seeds 0-2: fine-tuned - pre-trained between
    # -0.10 and +0.15). The quick schedule pre-trains too briefly to learn either (seeds 0-2: t2i 0.17-0.33, i2t 0.27,
    # chance 0.25); the full schedule's before/after numbers are in the README (t2i 0.43 -> 0.52).
    modes = demo[1]['modes']
    for name in ('pretrained', 'finetuned'):
        assert modes[name]['samples'] == 48 and modes[name]['i2t_bleu4'] > 0, modes
    for key in ('t2i_agreement', 'i2t_agreement'):
        assert modes['finetuned'][key] >= modes['pretrained'][key] - 0.2, modes


def test_report_is_self_contained_and_readable_by_others(demo):
    out, metrics, log = demo
    with open(out / 'report.html', encoding='utf-8') as f:
        page = f.read()
    sources = re.findall(r'src="([^"]*)"', page)
    assert sources and all(s.startswith('data:image/png;base64,') for s in sources)
    assert '<svg' not in page  # every figure is a matplotlib PNG
    for text in ('against controls', 'speaker turns shuffled', 'starts from the pre-trained network',
                 'Guidance scale x steps', 't2i and i2t', 'online', 'random weights', 'FID was not computed'):
        assert text in page, text
    for name in ('report.html', 'metrics.json', 'eval/' + metrics['evaluation']['setting'] + '/metrics.json'):
        assert stat.S_IMODE(os.stat(out / name).st_mode) & 0o044 == 0o044, name
    assert f'report: {out / "report.html"}' in log and 'fine-tuned' in log


def test_response_grid_is_a_small_png(demo):
    # The picture of what the model does (the README's assets/demo_responses.png is one of these).
    from PIL import Image
    path = demo[0] / 'responses.png'
    assert path.stat().st_size < 300_000
    with Image.open(path) as image:
        assert image.format == 'PNG' and image.width > 600 and image.height > 300


def test_rerun_gives_the_same_report_bytes(demo):
    # Determinism: an evaluation stage rerun with the same seed rewrites metrics.json and report.html byte for byte
    # (the timings go to timings.json). The training stages are not rerun here: that would double the test's time.
    out = demo[0]
    first = {name: (out / name).read_bytes() for name in ('metrics.json', 'report.html', 'responses.png')}
    timings = json.loads((out / 'timings.json').read_text())
    shutil.rmtree(out / 'online')
    log = run_demo(out)
    assert log.count('done earlier') == len(timings['stages']) - 1, log[-3000:]
    assert {name: (out / name).read_bytes() for name in first} == first


def test_rerun_reuses_every_stage(demo):
    out = demo[0]
    stages = json.loads((out / 'timings.json').read_text())['stages']
    markers = {name: (out / name / MARKER).read_text() for name in stages}
    log = run_demo(out)
    assert log.count('done earlier') == len(markers), log[-3000:]
    assert {name: (out / name / MARKER).read_text() for name in markers} == markers


# ----------------------------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------------------------

def test_shuffled_speaker_cache(tmp_path):
    from libs.features import FeatureDataset
    from test_features import write_cache
    records = write_cache(str(tmp_path / 'source'), [4, 5])
    shuffle_speakers(str(tmp_path / 'source'), str(tmp_path / 'shuffled'), seed=0)
    data = FeatureDataset(str(tmp_path / 'shuffled'))
    assert [s['pairs'] for s in data.shards] == [4, 5]
    speakers = []
    for i, record in enumerate(records):
        item = data[i]
        # The response side and the pair's identity stay; the speaker turn comes from another conversation.
        for key in ('response_moments', 'response_text', 'label', 'conversation_id', 'turn_id', 'response_text_raw'):
            assert torch.equal(item[key], torch.as_tensor(record[key]).to(item[key].dtype)) if torch.is_tensor(
                item[key]) else item[key] == record[key], key
        source = next(j for j, r in enumerate(records) if r['speaker_text_raw'] == item['speaker_text_raw'])
        assert records[source]['conversation_id'] != record['conversation_id']
        assert torch.equal(item['speaker_moments'], records[source]['speaker_moments'])
        speakers.append(source)
    assert sorted(speakers) == list(range(len(records)))  # every speaker turn is used once


def test_derangement_is_seeded_and_leaves_no_pair_in_its_conversation():
    conversations = [f'{i // 3}' for i in range(30)]
    p = derangement(conversations, seed=1)
    assert sorted(p) == list(range(30)) and p == derangement(conversations, seed=1) != derangement(conversations, 2)
    assert all(conversations[p[i]] != conversations[i] for i in range(30))


def test_unit_text_scale(tiny_models):
    # The demo rescales the random encode_prefix so that the U-ViT's text features have unit std on the corpus
    # (libs.demo.stages.unit_text_scale); only the scale of the map changes, not its direction.
    from common import tiny
    from libs.caption_decoder import load_caption_decoder
    from libs.clip_encoders import CLIPTextEncoder
    from libs.demo.stages import unit_text_scale
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


def test_reaction_reader():
    from libs.demo.measure import reaction_of, reply_templates
    for reaction, replies in reply_templates().items():
        assert all(reaction_of(r) == reaction for r in replies)
    assert reaction_of('congratulations, you really deserve it') == 'happy'  # lower case, no closing
    assert reaction_of('I am listening, what happened next? Go') == 'attentive'


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
    markers = run_stages(toy_stages(calls), config, str(tmp_path))
    assert calls == ['a', 'b', 'c']
    assert all(m['cpu_seconds'] >= 0 and len(m['load']) == 2 for m in markers.values())
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


def test_stage_reads_its_own_config(tmp_path):
    # The pre-training stage reads the pre-training config: a change in another config does not rebuild it.
    own, other = (ml_collections.ConfigDict(dict(x=1)) for _ in range(2))
    calls = []
    stages = lambda: [Stage('p', lambda folder: calls.append('p') or {}, keys=('x',), config=own)]  # noqa: E731
    run_stages(stages(), other, str(tmp_path))
    other.x = 2
    run_stages(stages(), other, str(tmp_path))
    assert calls == ['p']
    own.x = 3
    run_stages(stages(), other, str(tmp_path))
    assert calls == ['p', 'p']


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


# ----------------------------------------------------------------------------------------------------------------
# The README's results table
# ----------------------------------------------------------------------------------------------------------------

COMMITTED_REPORT = 'assets/demo/metrics.json'  # the report the README's table is rendered from


def toy_metrics():
    """The parts of a demo metrics.json the README table reads."""
    row = lambda t: dict(trained=t, shuffled=0.1, pretrained=0.12, online=t, majority=0.23, uniform=0.14)  # noqa: E731
    return dict(schedule='full', seed=0, evaluation=dict(pairs=160, sample_steps=20, guidance_scale=6.),
                learning={k: row(v) for k, v in (('emotion_coarse_acc', 0.99), ('emotion_fine_acc', 0.5),
                                                  ('text_agreement', 0.6), ('bleu4', 18.94),
                                                  ('face_agreement', 0.48))},
                modes=dict(pretrained=dict(t2i_agreement=0.43, i2t_agreement=0.15),
                           finetuned=dict(t2i_agreement=0.52, i2t_agreement=0.43)),
                instruments=dict(classes=['a', 'b', 'c', 'd']))


def test_readme_table_renders_every_number_and_says_what_it_cannot_show():
    from libs.demo.readme import render_table
    table = render_table(toy_metrics(), 'x/metrics.json')
    lines = table.splitlines()
    assert lines[0].startswith('Full schedule, seed 0') and '--readme_table=x/metrics.json' in lines[0]
    assert '| speaker emotion, 7 classes | 0.99 | 0.10 | 0.12 | 0.23 |' in lines
    assert '| response BLEU-4 (sacreBLEU) | 18.9 | 0.10 | 0.12 | 0.23 |' in lines
    assert '| t2i face shows its utterance\'s reaction (no speaker) | 0.52 |  | 0.43 | 0.25 (uniform) |' in lines
    assert 'not how well a model reads real faces' in table


def test_write_readme_replaces_only_the_marked_block(tmp_path):
    from libs.demo.readme import END, START
    metrics = tmp_path / 'metrics.json'
    metrics.write_text(json.dumps(toy_metrics()))
    readme = tmp_path / 'README.md'
    readme.write_text(f'# Title\n\nbefore\n{START}\nold table\n{END}\nafter\n')
    command = [sys.executable, os.path.join('scripts', 'demo.py'), f'--readme_table={metrics}', '--write_readme',
               f'--readme={readme}']
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    text = readme.read_text()
    shown = subprocess.run(command[:3], cwd=ROOT, capture_output=True, text=True).stdout
    assert text == f'# Title\n\nbefore\n{START}\n{shown.rstrip()}\n{END}\nafter\n'
    readme.write_text('# no markers\n')
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith(f'error: {readme} must hold one {START} line'), done.stderr
    assert readme.read_text() == '# no markers\n'


def test_readme_table_is_rendered_from_the_committed_report():
    from libs.demo.readme import block, read_metrics, render_table
    with open(os.path.join(ROOT, 'README.md'), encoding='utf-8') as f:
        table = block(f.read())
    if table is None:
        pytest.skip('README.md has no <!-- demo-table:start --> / <!-- demo-table:end --> block yet (the README '
                    'rewrite adds it; then `python scripts/demo.py --readme_table=assets/demo/metrics.json '
                    '--write_readme` fills it)')
    expected = render_table(read_metrics(os.path.join(ROOT, COMMITTED_REPORT)), COMMITTED_REPORT)
    assert table == expected, ('the README table is not the committed report\'s: run python scripts/demo.py '
                               f'--readme_table={COMMITTED_REPORT} --write_readme')


def test_response_grid_shows_each_pair_with_its_answer(tmp_path):
    # One row per held-out pair: speaker face and utterance, the generated face and utterance (libs.demo.report).
    import random

    from PIL import Image

    from libs.avamerg import AvaMERG
    from libs.demo.report import GRID, write_response_grid
    from libs.synthetic import make_dataset, render_face
    make_dataset(str(tmp_path / 'data'), 0, 2, 4, size=32, listeners=(7,))
    pairs = AvaMERG(str(tmp_path / 'data'), 'test').pairs[:3]
    folder = tmp_path / 'eval' / 'scale6_steps20'
    folder.mkdir(parents=True)
    records = []
    for i, p in enumerate(pairs):
        render_face(7, 'happy', 32, random.Random(i)).save(folder / f'{i}.png')
        records.append(dict(index=i, speaker_stem=p.speaker_stem, speaker_text=p.speaker_text, face=f'{i}.png',
                            generated='That is wonderful news!', top3=[['joyful', 0.9], ['proud', 0.05]],
                            gold_emotion=p.emotion))
    (folder / 'pairs.jsonl').write_text(''.join(json.dumps(r) + '\n' for r in reversed(records)))
    config = ml_collections.ConfigDict(dict(data=dict(root=str(tmp_path / 'data'))))
    markers = {'eval': {'summary': {'default': 'scale6_steps20'}}}
    write_response_grid(config, markers, str(tmp_path), str(tmp_path / 'grid.png'))
    first = (tmp_path / 'grid.png').read_bytes()
    with Image.open(tmp_path / 'grid.png') as grid:
        rows = (grid.height - GRID['font_size'] - 2 * GRID['pad']) / (GRID['face'] + 2 * GRID['pad'])
        assert rows == 3 and grid.width > 2 * GRID['text_width']
        # The generated face sits, enlarged, in the third column of the first row.
        x = 3 * GRID['pad'] + GRID['face'] + GRID['text_width']
        y = GRID['font_size'] + 3 * GRID['pad']
        shown = grid.crop((x, y, x + GRID['face'], y + GRID['face'])).convert('RGB')
    with Image.open(folder / '0.png') as face:
        assert shown.tobytes() == face.convert('RGB').resize((GRID['face'],) * 2, Image.NEAREST).tobytes()
    write_response_grid(config, markers, str(tmp_path), str(tmp_path / 'grid.png'))
    assert (tmp_path / 'grid.png').read_bytes() == first
