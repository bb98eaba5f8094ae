"""The baselines (libs/evaluation/baselines.py) on a tiny synthetic split, each scoring what it must by construction:
the copy of the speaker is the speaker, retrieval from a training split that holds the test pairs finds them, the
shuffled-speaker control answers another conversation's whole speaker turn (what the demo's shuffled feature cache
gives), and no_guidance is the network at scale 0."""
import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from libs import evaluation
from libs.autoencoder import center_crop_resize
from libs.avamerg import AvaMERG, label_index
from libs.errors import UserError
from libs.evaluation import baselines, generate, score
from libs.synthetic import make_dataset
from test_eval import BATCH, features, read_jsonl, results, tiny_config  # noqa: F401 (features: over this data)

pytestmark = pytest.mark.slow  # each module evaluates a tiny network several times
NAMES = ('copy_speaker', 'retrieval', 'shuffled_speaker', 'no_guidance')
SIZE = 32  # the tiny config's resolution


@pytest.fixture(scope='module')
def data(tmp_path_factory):
    """A synthetic AvaMERG whose test pairs come from three conversations (the shuffle needs no majority)."""
    root = str(tmp_path_factory.mktemp('avamerg'))
    make_dataset(root, seed=12, dialogues=1, test_dialogues=3, size=64)
    return root


@pytest.fixture(scope='module')
def mirror(data, tmp_path_factory):
    """The synthetic data with train.json replaced by the test dialogues (and their frames): every test pair is also
    a training pair, so retrieval must find it."""
    root = tmp_path_factory.mktemp('mirror')
    shutil.copytree(f'{data}/test', root / 'test')
    shutil.copytree(f'{data}/test/image_v5_0', root / 'image_v5_0')
    shutil.copy(f'{data}/test/test.json', root / 'train.json')
    return str(root)


@pytest.fixture(scope='module')
def evaluated(tiny_models, mirror, features, tmp_path_factory):
    """The model and every baseline on the test features: (config, output folder, summary)."""
    from extract_features import extract
    config = tiny_config(tiny_models, mirror)
    config.data.update(train=str(tmp_path_factory.mktemp('features') / 'train'), val_fraction=0.0, num_workers=0)
    extract(config, 'train')
    out = tmp_path_factory.mktemp('eval') / 'run'
    summary = evaluation.evaluate(config, features=features, skip_fid=True, batch_size=BATCH, output_path=str(out),
                                  baselines=list(NAMES))
    return config, out, summary


def folder(out, name):
    return out / 'baselines' / name


def pixels(image):
    return np.asarray(image.convert('RGB'))


def test_copy_speaker_is_the_speaker(evaluated, mirror):
    _, out, summary = evaluated
    records = read_jsonl(folder(out, 'copy_speaker') / 'pairs.jsonl')
    reader = AvaMERG(mirror, 'test')
    assert len(records) == len(reader) == summary['samples']
    for r, pair in zip(records, reader.pairs):
        assert r['generated'] == pair.speaker_text and r['pred_label'] is None
        speaker = center_crop_resize(reader.load_face(pair.speaker_stem), SIZE)
        assert np.array_equal(pixels(Image.open(folder(out, 'copy_speaker') / r['face'])), pixels(speaker))
    # Scored against the speaker's own utterances, the copy is perfect in both BLEU conventions.
    own = score.score([dict(r, reference=r['speaker_text']) for r in records])
    assert own['bleu4'] == pytest.approx(100) and own['sentence_bleu']['bleu4'] == pytest.approx(100)
    m = json.loads((folder(out, 'copy_speaker') / 'metrics.json').read_text())
    assert m['baseline'] == 'copy_speaker' and m['metrics']['emotion']['n'] == 0
    assert m['not_computed']['emotion'] == 'this response source predicts no emotion'
    assert m['metrics']['bleu4'] == pytest.approx(score.score(records)['bleu4'])


def test_retrieval_finds_the_training_copy_of_each_pair(evaluated, features, mirror):
    """The training split holds every test pair, so each pair's nearest training utterance has exactly its CLIP text
    states (the tiny CLIP truncates to a few tokens, so several utterances may share them: any of those is nearest);
    the response, face and emotion are that training pair's."""
    from libs.features import FeatureDataset
    config, out, _ = evaluated
    records = read_jsonl(folder(out, 'retrieval') / 'pairs.jsonl')
    test, train = FeatureDataset(features), FeatureDataset(config.data.train)
    index = {f'train/{train[j]["conversation_id"]}/{train[j]["turn_id"]}': j for j in range(len(train))}
    reader = AvaMERG(mirror, 'train')
    unique = 0
    for i, r in enumerate(records):
        j = index[r['retrieved']]
        assert torch.equal(train[j]['speaker_text'], test[i]['speaker_text'])
        m = train[j]
        assert r['generated'] == m['response_text_raw'] and r['pred_label'] == label_index(m['emotion'])
        gold = center_crop_resize(reader.load_face(m['response_stem']), SIZE)
        assert np.array_equal(pixels(Image.open(folder(out, 'retrieval') / r['face'])), pixels(gold))
        ties = sum(torch.equal(train[k]['speaker_text'], test[i]['speaker_text']) for k in range(len(train)))
        if ties == 1:  # a distinct utterance retrieves its own copy
            unique += 1
            assert r['retrieved'] == f'train/{r["conversation_id"]}/{r["turn_id"]}' and r['generated'] == r['reference']
    assert unique > 0
    m = json.loads((folder(out, 'retrieval') / 'metrics.json').read_text())['metrics']
    assert m['bleu4'] == pytest.approx(score.score(records)['bleu4'])
    if unique == len(records):
        assert m['bleu4'] == pytest.approx(100) and m['emotion']['fine_acc'] == 1.0


def test_shuffled_speaker_equals_the_demo_shuffled_cache(evaluated, features, tmp_path):
    """Every speaker input moves, the CLIP image embedding included: the baseline equals the network evaluated on a
    cache whose speaker tensors were all shuffled (libs.demo.stages.shuffle_speakers, same permutation), and a
    control that left one speaker input in place would not."""
    from libs.demo import stages
    config, out, _ = evaluated
    records = read_jsonl(folder(out, 'shuffled_speaker') / 'pairs.jsonl')
    own = {r['pair_id']: r for r in read_jsonl(out / 'pairs.jsonl')}
    for r in records:
        assert r['speaker_of'] != r['pair_id'] and r['speaker_of'].split('/')[1] != r['conversation_id']
        assert r['speaker_text'] == own[r['speaker_of']]['speaker_text']
    stages.shuffle_speakers(features, str(tmp_path / 'shuffled'), config.seed)
    evaluation.evaluate(config, features=str(tmp_path / 'shuffled'), skip_fid=True, batch_size=BATCH,
                        output_path=str(tmp_path / 'eval'), baselines=[])
    control = read_jsonl(tmp_path / 'eval' / 'pairs.jsonl')
    keys = ('pair_id', 'speaker_text', 'generated', 'pred_label', 'top3')
    assert [{k: r[k] for k in keys} for r in records] == [{k: r[k] for k in keys} for r in control]
    for r in records:
        assert (folder(out, 'shuffled_speaker') / r['face']).read_bytes() == (tmp_path / 'eval' / r['face']).read_bytes()
    # The answers differ from the model's own: the speaker turn matters to this network (its random caption decoder
    # may say the same thing either way; the emotion head reads the speaker path).
    assert [r['top3'] for r in records] != [own[r['pair_id']]['top3'] for r in records]


def test_shuffled_source_moves_every_speaker_input():
    class Source:
        root = reader = None
        pairs = [dict(pair_id=f'test/{i}/0', conversation_id=str(i), speaker_stem=f's{i}', speaker_text=f't{i}')
                 for i in range(3)]

        def speaker(self, indices):
            return tuple(np.array(indices) + offset for offset in (0, 100, 200))  # moments, CLIP image, text

        def speaker_text_states(self, indices):
            return np.array(indices) + 300

        def face(self, i, role):
            return (role, i)

    order = [2, 0, 1]
    shuffled = baselines.ShuffledSource(Source(), order)
    for got, want in zip(shuffled.speaker([0, 1]), Source().speaker([2, 0])):
        assert np.array_equal(got, want)
    assert np.array_equal(shuffled.speaker_text_states([1]), [300])
    assert shuffled.face(0, 'speaker') == ('speaker', 2) and shuffled.face(0, 'response') == ('response', 0)
    assert [p['speaker_text'] for p in shuffled.pairs] == ['t2', 't0', 't1']
    with pytest.raises(UserError, match='one conversation holds 2 of them'):
        baselines.derangement(['a', 'a', 'b'], seed=0)


def test_no_guidance_is_scale_zero(evaluated, features, tmp_path):
    config, out, _ = evaluated
    m = json.loads((folder(out, 'no_guidance') / 'metrics.json').read_text())
    assert (m['guidance_scale'], m['baseline']) == (0.0, 'no_guidance')
    zero = config.copy_and_resolve_references()
    zero.sample.scale = 0.0
    evaluation.evaluate(zero, features=features, skip_fid=True, batch_size=BATCH, output_path=str(tmp_path),
                        baselines=[])
    assert results(read_jsonl(folder(out, 'no_guidance') / 'pairs.jsonl')) == results(read_jsonl(tmp_path /
                                                                                               'pairs.jsonl'))


def test_baselines_table(evaluated):
    _, out, summary = evaluated
    table = json.loads((out / 'baselines.json').read_text())
    assert [r['name'] for r in table['rows']] == ['model', *NAMES] == [r['name'] for r in summary['baselines']]
    for row in table['rows'][1:]:
        m = json.loads((out / row['folder'] / 'metrics.json').read_text())
        assert row['metrics']['dist1'] == m['metrics']['dist1'] and row['intervals'] == m['intervals']
        lo, hi = row['intervals']['dist1']
        assert lo <= row['metrics']['dist1'] <= hi
    text = (out / 'baselines.md').read_text()
    assert all(f'| {n}' in text or f' {n} |' in text for n in NAMES) and 'Dist-1 (corpus)' in text


def test_unknown_or_repeated_baseline():
    with pytest.raises(UserError, match='unknown baseline.*copy_speaker, retrieval'):
        baselines.get(['copy', 'retrieval'])
    with pytest.raises(UserError, match='repeats'):
        baselines.get(['retrieval', 'retrieval'])


def test_retrieval_needs_a_train_cache(tiny_models, data, features, tmp_path):
    config = tiny_config(tiny_models, data)
    config.data.train = str(tmp_path / 'nowhere')
    with pytest.raises(UserError, match='retrieval baseline.*config.data.train'):
        evaluation.evaluate(config, features=features, skip_fid=True, batch_size=BATCH, output_path=str(tmp_path),
                            baselines=['retrieval'])
    assert generate.RECORDS not in [p.name for p in tmp_path.iterdir()]
