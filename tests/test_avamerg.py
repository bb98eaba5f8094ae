"""AvaMERG reader, labels, middle-frame extraction and the synthetic generator, checked against the JSON itself."""
import collections
import hashlib
import json
import logging
import os
import random
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from libs import avamerg
from libs.avamerg import (COARSE_7, EMOTIONS_32, FINE_TO_COARSE, FREE_FORM_TO_FINE, MEDIA_DIRS, AvaMERG, cache_folder,
                          coarse_index, is_validation, iter_pairs, label_index, media_stem, parse_stem, read_dialogues,
                          truncate_left)
from libs.errors import UserError
from libs.synthetic import (EXPRESSIONS, GOLD_FILE, LAYOUTS, RESPONSE_EXPRESSION, RESPONSES, UNKNOWN_WORDS,
                            expression_of, make_dataset, render_face)
from libs.video_frames import VideoError, middle_frame, write_clip

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZE = 64  # small faces keep the tests fast; the layout does not depend on the size


@pytest.fixture(scope='module')
def synthetic(tmp_path_factory):
    """A small synthetic dataset with frames for both splits."""
    root = str(tmp_path_factory.mktemp('syn'))
    return root, make_dataset(root, seed=3, dialogues=12, test_dialogues=4, size=SIZE)


def _expected_label(word):
    """Reference label, computed from the tables directly rather than through label_index."""
    word = word.strip().lower()
    fine = word if word in EMOTIONS_32 else FREE_FORM_TO_FINE.get(word)
    return -1 if fine is None else EMOTIONS_32.index(fine)


def _dialogue(cid, emotions, speaker_id=7, listener_id=8):
    """A hand-built dialogue with one turn per emotion word, in the AvaMERG schema."""
    profile = {'age': 'young', 'gender': 'female', 'timbre': 'mid'}
    utterances = [' '.join(['utterance', str(i)] + ['word'] * i) for i in range(2 * len(emotions))]
    turns = [{'turn_id': str(k), 'context': utterances[0],
              'dialogue_history': [{'index': i, 'role': ('speaker', 'listener')[i % 2], 'utterance': utterances[i]}
                                   for i in range(2 * k + 1)],
              'response': utterances[2 * k + 1],
              'chain_of_empathy': {'speaker_emotion': e, 'event_scenario': '', 'emotion_cause': '',
                                   'goal_to_response': ''}} for k, e in enumerate(emotions)]
    return {'conversation_id': cid, 'speaker_profile': {**profile, 'ID': speaker_id},
            'listener_profile': {**profile, 'ID': listener_id}, 'topic': 'Family', 'turns': turns}


def _write(root, dialogues, frames=True):
    """Write train.json and (optionally) a tiny PNG for every utterance of hand-built dialogues."""
    os.makedirs(os.path.join(root, 'image_v5_0'), exist_ok=True)
    with open(os.path.join(root, 'train.json'), 'w') as f:
        json.dump(dialogues, f)
    for d in dialogues if frames else ():
        for i in range(2 * len(d['turns'])):
            avatar = d[('speaker_profile', 'listener_profile')[i % 2]]['ID']
            Image.new('RGB', (8, 8), (i, 0, 0)).save(os.path.join(root, 'image_v5_0',
                                                                  f"dia{d['conversation_id']}utt{i}_{avatar}.png"))


def test_label_tables():
    assert list(EMOTIONS_32) == sorted(EMOTIONS_32) and len(set(EMOTIONS_32)) == 32
    assert COARSE_7 == ('happy', 'surprised', 'angry', 'fear', 'sad', 'disgusted', 'contempt')
    assert sorted(FINE_TO_COARSE) == list(EMOTIONS_32)
    sizes = collections.Counter(FINE_TO_COARSE.values())
    assert sizes == {'happy': 12, 'sad': 9, 'angry': 3, 'surprised': 3, 'fear': 3, 'disgusted': 1, 'contempt': 1}
    assert set(FREE_FORM_TO_FINE.values()) <= set(EMOTIONS_32) and not set(FREE_FORM_TO_FINE) & set(EMOTIONS_32)
    assert not set(UNKNOWN_WORDS) & (set(FREE_FORM_TO_FINE) | set(EMOTIONS_32))
    unknown = collections.Counter()
    assert label_index(' Anxious ', unknown) == 4
    assert label_index('FRUSTRATED', unknown) == EMOTIONS_32.index('sad') == 27
    assert label_index('overwhelmed', unknown) == label_index('stressed') == 4
    assert label_index('Tired', unknown) == -1 and label_index('tired', unknown) == -1
    assert unknown == {'tired': 2}
    assert coarse_index(label_index('jealous')) == 6 and coarse_index(label_index('devastated')) == 1
    assert coarse_index(-1) == -1


def test_stems_parse_with_any_number_of_digits():
    assert media_stem('00001', 12, 7) == 'dia00001utt12_7'
    assert parse_stem('dia00001utt12_7') == ('00001', 12, 7)
    assert parse_stem('dia65020utt1_45') == ('65020', 1, 45)
    for bad in ('dia6502utt1', 'dia65020utt1_45.png', 'x65020utt1_45'):
        with pytest.raises(UserError, match='media stem'):
            parse_stem(bad)


def test_reader_matches_json(synthetic):
    root, splits = synthetic
    for split, folder in (('train', root), ('test', os.path.join(root, 'test'))):
        data = AvaMERG(root, split, val_fraction=0)
        with open(os.path.join(folder, f'{split}.json')) as f:
            raw = json.load(f)
        assert {os.path.dirname(data.media.frames[p.speaker_stem]) for p in data.pairs} == {
            os.path.join(folder, 'image_v5_0')}
        assert len(data) == sum(len(d['turns']) for d in raw) and not data.skipped
        expected = []
        for d in raw:
            sid, lid = d['speaker_profile']['ID'], d['listener_profile']['ID']
            for k, turn in enumerate(d['turns']):
                history = turn['dialogue_history']
                assert [h['index'] for h in history] == list(range(2 * k + 1))
                if k + 1 < len(d['turns']):  # the reply reappears in the next turn's history
                    assert d['turns'][k + 1]['dialogue_history'][2 * k + 1]['utterance'] == turn['response']
                word = turn['chain_of_empathy']['speaker_emotion']
                expected.append((f"dia{d['conversation_id']}utt{2 * k}_{sid}",
                                 f"dia{d['conversation_id']}utt{2 * k + 1}_{lid}", history[2 * k]['utterance'],
                                 turn['response'], word, _expected_label(word)))
        got = [(p.speaker_stem, p.response_stem, p.speaker_text, p.response_text, p.emotion, p.label)
               for p in data.pairs]
        assert got == expected
        for pair in data.pairs:
            if pair.label >= 0:
                assert COARSE_7[pair.coarse_label] == FINE_TO_COARSE[EMOTIONS_32[pair.label]]
            # The response text is predictable from the emotion: it comes from that reaction's templates.
            assert any(pair.response_text.startswith(t) for t in RESPONSES[expression_of(pair.emotion, 'response')])
            face = data.load_face(pair.response_stem)
            assert face.mode == 'RGB' and face.size == (SIZE, SIZE)


def test_summary_counts_and_atomic_save(synthetic, tmp_path):
    root, splits = synthetic
    data = AvaMERG(root, 'train', val_fraction=0)
    words = [t['chain_of_empathy']['speaker_emotion'] for d in splits['train'] for t in d['turns']]
    summary = data.summary()
    assert summary['pairs'] == len(words)
    assert summary['labels_32'] == {e: sum(_expected_label(w) == i for w in words) for i, e in enumerate(EMOTIONS_32)}
    assert sum(summary['labels_7'].values()) + summary['unknown_label'] == len(words)
    assert summary['unknown_emotions'] == dict(collections.Counter(w for w in words if _expected_label(w) < 0))
    data.save_summary(str(tmp_path / 'summary.json'))
    assert json.loads((tmp_path / 'summary.json').read_text()) == summary
    assert os.listdir(tmp_path) == ['summary.json']  # no temporary file left behind


def test_indices_from_ten_and_unknown_words(tmp_path):
    emotions = ['anxious', 'Frustrated ', 'tired', 'bananas', 'tired', 'jealous']  # 6 turns: indices 0..11
    _write(str(tmp_path), [_dialogue('12345', emotions)])
    data = AvaMERG(str(tmp_path), val_fraction=0)
    last = data.pairs[-1]
    assert (last.speaker_stem, last.response_stem) == ('dia12345utt10_7', 'dia12345utt11_8')
    assert parse_stem(last.speaker_stem) == ('12345', 10, 7) and parse_stem(last.response_stem)[1] == 11
    assert last.speaker_text.startswith('utterance 10 ') and last.response_text.startswith('utterance 11 ')
    assert [p.label for p in data.pairs] == [4, 27, -1, -1, -1, 21]
    assert data.summary()['unknown_emotions'] == {'tired': 2, 'bananas': 1}


def test_history_truncated_from_the_left():
    dialogue = _dialogue('00042', ['sad', 'sad', 'sad'])  # utterance i has i + 2 words
    history = [h['utterance'] for h in dialogue['turns'][2]['dialogue_history']]
    pairs = list(iter_pairs([dialogue], 'train', speaker_text='history'))
    assert pairs[2].speaker_text == ' | '.join(history) and pairs[2].history == history
    # Utterances 3 and 4 take 5 + 1 (separator) + 6 = 12 words; adding utterance 2 would take 17.
    for budget, kept in ((16, 3), (12, 3), (11, 4)):
        pairs = list(iter_pairs([dialogue], 'train', speaker_text='history', history_tokens=budget))
        assert pairs[2].speaker_text == ' | '.join(history[kept:]), budget
    assert pairs[0].speaker_text == history[0]
    # Newest utterance alone too long: its leading words go, its end stays.
    assert truncate_left(history, 3) == 'word word word'
    # A custom counter is honoured (characters here).
    assert truncate_left(['abc', 'defgh'], 8, len) == 'defgh' and truncate_left(['abc', 'de'], 8, len) == 'abc | de'
    with pytest.raises(UserError, match='speaker_text'):
        list(iter_pairs([dialogue], 'train', speaker_text='all'))


@pytest.mark.parametrize('corrupt, message', [
    (lambda ds: ds[1]['turns'][0].pop('response'), r"dialogue 00002 \(#1\) turn 0: missing field 'response'"),
    (lambda ds: ds[0]['speaker_profile'].update(ID='7'),
     r"dialogue 00001 \(#0\) speaker_profile: field 'ID' must be int"),
    (lambda ds: ds[1].pop('conversation_id'), r"dialogue #1: missing field 'conversation_id'"),
    (lambda ds: ds[0]['turns'][1]['chain_of_empathy'].pop('speaker_emotion'), r"turn 1 chain_of_empathy: missing"),
    (lambda ds: ds[0]['turns'][1]['dialogue_history'].pop(), r"turn 1: field 'dialogue_history' has 2 entries"),
])
def test_malformed_dialogue_names_file_dialogue_and_field(tmp_path, corrupt, message):
    dialogues = [_dialogue('00001', ['sad', 'sad']), _dialogue('00002', ['sad'])]
    corrupt(dialogues)
    path = tmp_path / 'train.json'
    path.write_text(json.dumps(dialogues))
    with pytest.raises(UserError, match=message) as info:
        read_dialogues(str(path))
    assert str(path) in str(info.value)


def test_broken_json_and_missing_files(tmp_path):
    path = tmp_path / 'train.json'
    path.write_text('[{"conversation_id": "00001",')
    with pytest.raises(UserError, match='not valid JSON'):
        read_dialogues(str(path))
    path.write_text('{"conversation_id": "00001"}')
    with pytest.raises(UserError, match='expected a JSON list'):
        read_dialogues(str(path))
    with pytest.raises(UserError, match='no such file'):
        read_dialogues(str(tmp_path / 'absent.json'))
    with pytest.raises(UserError, match=r'no dialogue file, tried .*test\.json, .*test\.json'):
        AvaMERG(str(tmp_path), 'test')
    with pytest.raises(UserError, match='split'):
        AvaMERG(str(tmp_path), split='valid')


def test_bad_frames_are_counted_skips(synthetic, tmp_path):
    root = str(tmp_path / 'copy')
    shutil.copytree(synthetic[0], root)
    pairs = AvaMERG(root).pairs
    frames = os.path.join(root, 'image_v5_0')
    with open(os.path.join(frames, pairs[0].speaker_stem + '.png'), 'wb') as f:
        f.write(b'not a png')
    with open(os.path.join(frames, pairs[1].response_stem + '.png'), 'r+b') as f:
        f.truncate(os.path.getsize(f.name) // 2)
    os.remove(os.path.join(frames, pairs[2].response_stem + '.png'))
    data = AvaMERG(root)
    assert dict(data.skipped) == {'unreadable_frame': 2, 'missing_frame': 1}
    assert data.pairs == pairs[3:]


def test_middle_frame_of_clips(tmp_path):
    # Frame i is a flat grey of level 20 i, so the decoded level says which frame came back.
    for n in (1, 2, 3, 10, 11):
        path = str(tmp_path / f'clip{n}.mp4')
        write_clip(path, [np.full((32, 32, 3), 20 * i, np.uint8) for i in range(n)], fps=25)
        level = np.asarray(middle_frame(path), dtype=float).mean()
        assert abs(level - 20 * (n // 2)) < 3, (n, level)
    (tmp_path / 'bad.mp4').write_bytes(b'\x00' * 100)
    with pytest.raises(VideoError, match='cannot decode'):
        middle_frame(str(tmp_path / 'bad.mp4'))
    with pytest.raises(VideoError, match='no such video'):
        middle_frame(str(tmp_path / 'absent.mp4'))


def test_videos_only_dataset_extracts_and_caches_middle_frames(tmp_path, monkeypatch):
    videos, both = str(tmp_path / 'videos'), str(tmp_path / 'both')
    make_dataset(videos, seed=5, dialogues=2, frames=False, videos=True, size=SIZE)
    make_dataset(both, seed=5, dialogues=2, frames=True, videos=False, size=SIZE)
    data = AvaMERG(videos)
    assert not os.path.isdir(os.path.join(both, 'video_v5_0')) and len(data) == len(AvaMERG(both))
    for pair in data.pairs:
        for stem in (pair.speaker_stem, pair.response_stem):
            cached = os.path.join(videos, 'image_v5_0', stem + '.png')
            assert os.path.isfile(cached)
            drawn = np.asarray(Image.open(os.path.join(both, 'image_v5_0', stem + '.png')), dtype=float)
            # At this size the clip nods by one pixel per frame: its neighbours are the face moved up or down.
            up, down = drawn.copy(), drawn.copy()
            up[:-1], down[1:] = drawn[1:], drawn[:-1]
            up[-1], down[0] = drawn[0, 0], drawn[0, 0]
            decoded = np.asarray(data.load_face(stem), dtype=float)
            error = np.abs(decoded - drawn).mean()
            assert error < 5 and error < 0.6 * min(np.abs(decoded - up).mean(), np.abs(decoded - down).mean())
    # Cached frames are reused: decoding again would fail the run.
    monkeypatch.setattr(avamerg, 'middle_frame', lambda path: pytest.fail(f'decoded {path} again'))
    assert AvaMERG(videos).pairs == data.pairs
    # A missing and a corrupt clip (with no cached frame) are counted skips.
    for stem in (data.pairs[0].speaker_stem, data.pairs[1].response_stem):
        os.remove(os.path.join(videos, 'image_v5_0', stem + '.png'))
    os.remove(os.path.join(videos, 'video_v5_0', data.pairs[0].speaker_stem + '.mp4'))
    (tmp_path / 'videos' / 'video_v5_0' / (data.pairs[1].response_stem + '.mp4')).write_bytes(b'junk')
    monkeypatch.undo()
    assert dict(AvaMERG(videos).skipped) == {'missing_video': 1, 'unreadable_video': 1}


def test_generator_is_deterministic(tmp_path):
    for name, seed in (('a', 9), ('b', 9), ('c', 10)):
        make_dataset(str(tmp_path / name), seed=seed, dialogues=3, test_dialogues=1, videos=True, size=SIZE)
    trees = {name: {os.path.relpath(os.path.join(d, f), tmp_path / name): open(os.path.join(d, f), 'rb').read()
                    for d, _, fs in os.walk(tmp_path / name) for f in fs} for name in 'ab'}
    assert trees['a'] == trees['b']
    assert 0 < sum(f.endswith('.mp4') for f in trees['a']) == sum(f.endswith('.png') for f in trees['a'])
    assert (tmp_path / 'a' / 'train.json').read_bytes() != (tmp_path / 'c' / 'train.json').read_bytes()


def test_faces_follow_identity_and_expression():
    assert set(RESPONSE_EXPRESSION) == set(COARSE_7) and set(RESPONSE_EXPRESSION.values()) <= set(EXPRESSIONS)
    assert expression_of('Frustrated') == 'sad' and expression_of('sad', 'response') == 'caring'
    assert expression_of('furious', 'response') == 'calm' and expression_of('tired') == 'sad'
    faces = {e: np.asarray(render_face(11, e, SIZE, random.Random(0)), dtype=int) for e in EXPRESSIONS}
    for a in EXPRESSIONS:
        for b in EXPRESSIONS:
            assert a == b or np.abs(faces[a] - faces[b]).sum() > 0, (a, b)
    assert np.array_equal(faces['sad'], np.asarray(render_face(11, 'sad', SIZE, random.Random(0)), dtype=int))
    other = np.asarray(render_face(12, 'sad', SIZE, random.Random(0)), dtype=int)
    assert np.abs(other - faces['sad']).sum() > 0


def test_listener_pool(tmp_path):
    # The demo's listener is one avatar; speakers and, without a pool, listeners vary over all avatars.
    pooled = make_dataset(str(tmp_path / 'a'), seed=2, dialogues=8, frames=False, listeners=(7,))['train']
    assert {d['listener_profile']['ID'] for d in pooled} == {7}
    assert len({d['speaker_profile']['ID'] for d in pooled}) > 1
    free = make_dataset(str(tmp_path / 'b'), seed=2, dialogues=8, frames=False)['train']
    assert len({d['listener_profile']['ID'] for d in free}) > 1


def test_cli(tmp_path):
    script = os.path.join(ROOT, 'scripts', 'make_synthetic_avamerg.py')
    ok = subprocess.run([sys.executable, script, '--out', str(tmp_path / 'd'), '--seed', '1', '--dialogues', '2',
                         '--test_dialogues', '1', '--size', str(SIZE), '--layout', 'release', '--test_gold',
                         'separate'], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    gold_path = str(tmp_path / 'd' / GOLD_FILE)
    test_turns = read_dialogues(gold_path)[0]['turns']
    bare, joined = AvaMERG(str(tmp_path / 'd'), 'test'), AvaMERG(str(tmp_path / 'd'), 'test', gold_path=gold_path)
    assert len(bare) == len(joined) == len(test_turns) and not any(p.has_gold_response for p in bare.pairs)
    assert [p.response_text for p in joined.pairs] == [t['response'] for t in test_turns]
    assert os.path.isdir(tmp_path / 'd' / 'test' / 'test_image')
    bad = subprocess.run([sys.executable, script, '--out', str(tmp_path / 'e'), '--dialogues', '2', '--size', '31'],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and '--size must be an even number' in bad.stderr
    assert not (tmp_path / 'e').exists()


LAYOUT_CASES = [(layout, kind) for layout in LAYOUTS for kind in ('frames', 'videos')
                if LAYOUTS[layout]['train'][kind]]
TINY = 32  # the layout tests need faces, not detail


def _pairs(reader):
    """Everything a pair holds, as a comparable tuple per pair."""
    return [(p.pair_id, p.speaker_stem, p.response_stem, p.speaker_text, p.response_text, p.emotion, p.label)
            for p in reader.pairs]


@pytest.fixture(scope='module')
def layouts(tmp_path_factory):
    """The same synthetic dataset (seed 4) written in every layout, as frames and as videos."""
    root = tmp_path_factory.mktemp('layouts')
    for layout, kind in LAYOUT_CASES:
        make_dataset(str(root / f'{layout}-{kind}'), seed=4, dialogues=2, test_dialogues=1, size=TINY,
                     layout=layout, frames=kind == 'frames', videos=kind == 'videos')
    return root


@pytest.mark.parametrize('layout, kind', LAYOUT_CASES)
def test_every_layout_reads_to_the_same_pairs(layouts, layout, kind):
    reference, root = str(layouts / 'flat-frames'), str(layouts / f'{layout}-{kind}')
    for split in ('train', 'test'):
        expected, data = AvaMERG(reference, split, val_fraction=0), AvaMERG(root, split, val_fraction=0)
        assert _pairs(data) == _pairs(expected) and len(data) > 0 and not data.skipped
        folder = os.path.join(root, LAYOUTS[layout][split][kind])
        for pair in data.pairs:
            face = np.asarray(data.load_face(pair.response_stem), dtype=float)
            drawn = np.asarray(expected.load_face(pair.response_stem), dtype=float)
            if kind == 'frames':
                assert data.media.frames[pair.response_stem] == os.path.join(folder, pair.response_stem + '.png')
                assert np.array_equal(face, drawn)
            else:
                # The middle frame went into the documented cache folder, which the reader searches.
                assert data.media.frames[pair.response_stem] == os.path.join(cache_folder(folder),
                                                                             pair.response_stem + '.png')
                assert os.path.relpath(cache_folder(folder), root) in [d for d, _ in MEDIA_DIRS[split]]
                assert np.abs(face - drawn).mean() < 8


def test_layout_mismatch_is_one_error_naming_every_folder(synthetic, tmp_path):
    root = str(tmp_path / 'moved')
    shutil.copytree(synthetic[0], root)
    os.rename(os.path.join(root, 'image_v5_0'), os.path.join(root, 'faces'))
    with pytest.raises(UserError) as info:
        AvaMERG(root, 'train')
    message = str(info.value)
    assert 'none of its' in message and 'media_dirs' in message
    for folder, _ in MEDIA_DIRS['train']:
        assert os.path.join(root, folder) in message
    assert f"{os.path.join(root, 'image_v5_0')} (absent)" in message
    # A configured folder is searched first; a stem found nowhere says where the reader looked.
    data = AvaMERG(root, 'train', val_fraction=0, media_dirs=['faces'])
    assert len(data) == len(AvaMERG(synthetic[0], 'train', val_fraction=0)) and not data.skipped
    assert data.media.folders[0] == os.path.join(root, 'faces')
    with pytest.raises(UserError, match=r'no frame or video of dia99999utt0_1 .*looked in:\n.*faces \(\d+ frames'):
        data.load_face('dia99999utt0_1')
    # One missing file among many is a counted skip, named in the summary.
    gone = data.pairs[0].speaker_stem
    os.remove(os.path.join(root, 'faces', gone + '.png'))
    data = AvaMERG(root, 'train', val_fraction=0, media_dirs=['faces'])
    assert dict(data.skipped) == {'missing_frame': 1}
    assert data.summary()['media']['missing'] == 1 and data.summary()['media']['missing_examples'] == [gone]


def test_equal_ids_across_splits_stay_apart(tmp_path):
    splits = make_dataset(str(tmp_path), seed=6, dialogues=3, test_dialogues=2, size=TINY, test_ids='train')
    assert [d['conversation_id'] for d in splits['test']] == [d['conversation_id'] for d in splits['train']][:2]
    train, test = AvaMERG(str(tmp_path), 'train', val_fraction=0), AvaMERG(str(tmp_path), 'test')
    shared = {p.conversation_id for p in train.pairs} & {p.conversation_id for p in test.pairs}
    assert len(shared) == 2
    assert not {p.pair_id for p in train.pairs} & {p.pair_id for p in test.pairs}
    assert {p.pair_id.split('/')[0] for p in test.pairs} == {'test'}
    assert all(p.pair_id == f'train/{p.conversation_id}/{p.turn_id}' for p in train.pairs)
    # Each split reads its own faces for the shared ids.
    test_frames = os.path.join(str(tmp_path), 'test', '')
    assert all(test.media.frames[p.speaker_stem].startswith(test_frames) for p in test.pairs)


def test_validation_split_is_stable_disjoint_and_covers_train(tmp_path):
    make_dataset(str(tmp_path), seed=8, dialogues=24, size=TINY)
    whole = AvaMERG(str(tmp_path), 'train', val_fraction=0)
    train, val = AvaMERG(str(tmp_path), 'train', val_fraction=0.25), AvaMERG(str(tmp_path), 'val', val_fraction=0.25)
    # The documented rule, computed independently: the first 8 bytes of sha256 of the key tuple's repr.
    def held_out(cid):
        digest = hashlib.sha256(repr(('validation', 'train', cid)).encode()).digest()
        return int.from_bytes(digest[:8], 'little') / 2 ** 64 < 0.25

    cids = {p.conversation_id for p in whole.pairs}
    assert {p.conversation_id for p in val.pairs} == {c for c in cids if held_out(c)} != set()
    assert {p.conversation_id for p in train.pairs} == {c for c in cids if not held_out(c)} != set()
    assert all(is_validation(c, 0.25) == held_out(c) for c in cids)
    key = lambda p: (p.conversation_id, p.turn_id, p.speaker_text)  # noqa: E731
    assert sorted(map(key, train.pairs + val.pairs)) == sorted(map(key, whole.pairs))
    assert {p.split for p in val.pairs} == {'val'} and {p.split for p in train.pairs} == {'train'}
    assert _pairs(AvaMERG(str(tmp_path), 'val', val_fraction=0.25)) == _pairs(val)   # stable
    assert len(AvaMERG(str(tmp_path), 'val', val_fraction=0)) == 0
    assert val.json_path == whole.json_path == os.path.join(str(tmp_path), 'train.json')
    for bad in (1, -0.1, '0.1'):
        with pytest.raises(UserError, match='val_fraction'):
            AvaMERG(str(tmp_path), 'train', val_fraction=bad)


def test_goldless_test_split_and_a_separate_gold_file(tmp_path):
    inline, separate = str(tmp_path / 'inline'), str(tmp_path / 'separate')
    make_dataset(inline, seed=7, dialogues=1, test_dialogues=3, size=TINY)
    splits = make_dataset(separate, seed=7, dialogues=1, test_dialogues=3, size=TINY, test_gold='separate')
    turns = read_dialogues(os.path.join(separate, 'test', 'test.json'), require_gold=False)[0]['turns']
    assert not any('response' in t or 'chain_of_empathy' in t for t in turns)
    with pytest.raises(UserError, match="missing field 'response'.*only the test split may lack"):
        read_dialogues(os.path.join(separate, 'test', 'test.json'))
    expected = AvaMERG(inline, 'test')
    bare = AvaMERG(separate, 'test')
    assert len(bare) == len(expected) > 0 and bare.gold is None
    for pair in bare.pairs:
        assert pair.response_text is None and pair.emotion is None and (pair.label, pair.coarse_label) == (-1, -1)
        assert not pair.has_gold_response and not pair.has_gold_label
    summary = bare.summary()
    assert summary['pairs_with_gold_response'] == summary['pairs_with_gold_label'] == summary['unknown_label'] == 0
    # The separate gold file, joined by (conversation_id, turn_id), restores exactly the inline pairs.
    gold_path = os.path.join(separate, GOLD_FILE)
    joined = AvaMERG(separate, 'test', gold_path=gold_path)
    assert _pairs(joined) == _pairs(expected) and all(p.has_gold_response and p.has_gold_label for p in joined.pairs)
    n_turns = sum(len(d['turns']) for d in splits['test'])
    assert joined.gold == {'path': gold_path, 'gold_turns': n_turns, 'joined_turns': n_turns, 'unmatched': [],
                           'conflicts': []}
    assert joined.summary()['gold_file'] == joined.gold and joined.unknown_emotions == expected.unknown_emotions
    # A gold turn of no test conversation is reported; one whose speaker said something else is not joined.
    gold = json.loads(open(gold_path).read())
    gold.append({**gold[0], 'conversation_id': '77777'})
    gold[1]['turns'][0]['dialogue_history'][-1]['utterance'] = 'another dialogue'
    edited = str(tmp_path / 'gold.json')
    with open(edited, 'w') as f:
        json.dump(gold, f)
    partial = AvaMERG(separate, 'test', gold_path=edited)
    assert partial.gold['unmatched'] == sorted(f"77777/{t['turn_id']}" for t in gold[0]['turns'])
    assert partial.gold['conflicts'] == [f"{gold[1]['conversation_id']}/0"]
    assert sum(not p.has_gold_response for p in partial.pairs) == 1
    # The gold of another split matches nothing: one clear error. Gold belongs to the test split only.
    with pytest.raises(UserError, match='not the gold of this split'):
        AvaMERG(separate, 'test', gold_path=os.path.join(separate, 'train.json'))
    with pytest.raises(UserError, match='gold_path is for the test split'):
        AvaMERG(separate, 'train', gold_path=gold_path)


@pytest.mark.parametrize('edit, ok', [
    (lambda t: t.update(response=None, chain_of_empathy={'event_scenario': ''}), True),
    (lambda t: t.update(response='  ', chain_of_empathy=None), True),
    (lambda t: t.update(response=5), False),
    (lambda t: t.update(chain_of_empathy='sad'), False),
    (lambda t: t['chain_of_empathy'].update(speaker_emotion=['sad']), False),
    (lambda t: t.pop('turn_id'), False),
])
def test_goldless_turns_still_validate_their_structure(tmp_path, edit, ok):
    dialogue = _dialogue('00001', ['sad', 'joyful'])
    edit(dialogue['turns'][1])
    path = tmp_path / 'test.json'
    path.write_text(json.dumps([dialogue]))
    if ok:
        pairs = list(iter_pairs(read_dialogues(str(path), require_gold=False), 'test'))
        assert [(p.has_gold_response, p.has_gold_label) for p in pairs] == [(True, True), (False, False)]
        assert pairs[1].label == pairs[1].coarse_label == -1
    else:
        with pytest.raises(UserError, match=r'dialogue 00001 \(#0\) turn 1'):
            read_dialogues(str(path), require_gold=False)


def test_repeated_pair_ids_are_skipped(tmp_path):
    _write(str(tmp_path), [_dialogue('00005', ['sad']), _dialogue('00006', ['sad']), _dialogue('00005', ['sad'])])
    data = AvaMERG(str(tmp_path), val_fraction=0)
    assert [p.pair_id for p in data.pairs] == ['train/00005/0', 'train/00006/0']
    assert dict(data.skipped) == {'duplicate_pair_id': 1}


def test_unknown_emotion_words_are_one_warning_saying_how_many_and_which(tmp_path, caplog):
    _write(str(tmp_path), [_dialogue('12345', ['anxious', 'tired', 'bananas', 'Tired', 'jealous'])])
    with caplog.at_level(logging.WARNING, logger='libs.avamerg'):
        AvaMERG(str(tmp_path), val_fraction=0)
    warnings = [r.getMessage() for r in caplog.records if 'emotion word' in r.getMessage()]
    assert warnings == ["AvaMERG train: 3 turns have an emotion word outside the 32 EmpatheticDialogues classes and "
                        "its synonyms, so no emotion label (-1, no emotion loss): 'tired' (2), 'bananas' (1)"]


def test_gold_file_beside_a_goldless_test_json_is_pointed_out(tmp_path, caplog):
    root = str(tmp_path / 'separate')
    make_dataset(root, seed=7, dialogues=1, test_dialogues=2, size=TINY, test_gold='separate')
    gold_path = os.path.join(root, GOLD_FILE)
    hint = lambda: [r.getMessage() for r in caplog.records if 'test_gold' in r.getMessage()]
    with caplog.at_level(logging.WARNING, logger='libs.avamerg'):
        AvaMERG(root, 'test')
    assert hint() == [f'AvaMERG test: {os.path.join(root, "test", "test.json")} has no gold responses or emotions, '
                      f'but {gold_path} beside it may: pass --config.data.test_gold={gold_path} to join it (metrics '
                      'that need gold are not computed without it)']
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger='libs.avamerg'):
        AvaMERG(root, 'test', gold_path=gold_path)   # joined: nothing to point out
    assert hint() == []


def test_media_folders_are_searched_first_to_last(tmp_path):
    """A stem in several folders is read from the first folder of the search order (configured folders first)."""
    root = str(tmp_path)
    _write(root, [_dialogue('12345', ['anxious'])])   # image_v5_0: red faces
    later, configured = (os.path.join(root, *d.split('/')) for d in ('train_image/image_v5_0', 'faces'))
    for folder, colour in ((later, (0, 200, 0)), (configured, (0, 0, 200))):
        os.makedirs(folder)
        for stem in ('dia12345utt0_7', 'dia12345utt1_8'):
            Image.new('RGB', (8, 8), colour).save(os.path.join(folder, stem + '.png'))
    assert [d for d, _ in MEDIA_DIRS['train']].index('image_v5_0') < [d for d, _ in MEDIA_DIRS['train']].index(
        'train_image/image_v5_0')
    data = AvaMERG(root, val_fraction=0)
    assert data.load_face('dia12345utt1_8').getpixel((0, 0)) == (1, 0, 0)   # image_v5_0 (index 1), not the later one
    data = AvaMERG(root, val_fraction=0, media_dirs=['faces'])
    assert data.load_face('dia12345utt1_8').getpixel((0, 0)) == (0, 0, 200)
