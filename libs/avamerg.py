"""AvaMERG: labels, JSON validation, splits, media stems and their lookup, one pair per turn, and a face reader.

Splits of ``AvaMERG(root, split, val_fraction=0.02)``:

- ``'train'``: the conversations of ``train.json`` outside the held-out validation set;
- ``'val'``: the held-out conversations of ``train.json``, those for which ``is_validation(conversation_id,
  val_fraction)`` (a stable hash of the id) holds; ``val_fraction=0`` leaves 'val' empty and 'train' the whole file;
- ``'test'``: ``test/test.json`` (or ``test.json`` at the root, ANNOTATION_FILES).

Every ``Pair`` carries its split, and ``pair.pair_id`` (``'{split}/{conversation_id}/{turn_id}'``) is its identity
everywhere: test conversation ids restart at 00001, so ids alone repeat across splits. A pair_id repeated within a
split (a conversation listed twice) keeps its first pair; the others are skipped as ``duplicate_pair_id``.

Gold: every turn of train.json needs a ``response`` and a ``chain_of_empathy.speaker_emotion`` (training cannot use
turns without them). Test turns may lack either, or have them null or blank, as the public test.json may: then
``pair.response_text`` is None (``pair.has_gold_response`` False), and/or ``pair.emotion`` is None with ``label``
and ``coarse_label`` -1 (``pair.has_gold_label`` False). An emotion word outside the vocabulary is gold all the
same (``has_gold_label`` True, label -1, counted in ``unknown_emotions``); label-based metrics use ``label >= 0``.
``gold_path=`` joins a separate gold file (the challenge's labelled test file) by (conversation_id, turn_id): it
has the AvaMERG schema, of which only ``conversation_id``, ``turns[].turn_id``, the gold fields and, when present,
the history (to check that both files mean the same turn) are read. ``reader.gold`` reports the join.

Media are named by stem (``media_stem``): frames ``<stem>.png`` or ``.jpg``, videos ``<stem>.mp4``. The folders of
a split are searched in this order: ``frames_cache`` (if given), the configured ``media_dirs`` (both relative to
the root unless absolute), then MEDIA_DIRS[split], which covers the layouts the release is used in (frames of
AvaMERG_frame in ``image_v5_0/``; videos in ``video_v5_0/`` or a per-modality ``train_video/video_v5_0/``; test
media in ``test/test_video/``, with or without a nested ``video_v5_0/``, or in ``test/video_v5_0/``; one root folder
for every split last). A frame anywhere wins over a video; among frames, and among videos, the first folder wins.
With only a video, its middle frame is extracted and cached as PNG (atomically) in ``frames_cache``, or else in
``image_v5_0/`` beside the video folder (``cache_folder``), which is searched too. When none of a split's media is
in any folder, one UserError names every folder tried; a single missing file is a counted skip
(``missing_frame``/``missing_video``), and ``load_face`` of a missing stem says where it looked.
"""
import collections
import dataclasses
import io
import json
import logging
import os
import re
from typing import Optional

from PIL import Image, UnidentifiedImageError

from libs.errors import UserError
from libs.video_frames import VideoError, middle_frame

logger = logging.getLogger(__name__)
# libs.io and libs.features import torch, which reading the data does not need: the data scripts start in a tenth of
# the time without it. They are imported where they are used.

# The 32 EmpatheticDialogues emotions, alphabetical; a label is an index into this tuple.
EMOTIONS_32 = (
    'afraid', 'angry', 'annoyed', 'anticipating', 'anxious', 'apprehensive', 'ashamed', 'caring', 'confident',
    'content', 'devastated', 'disappointed', 'disgusted', 'embarrassed', 'excited', 'faithful', 'furious',
    'grateful', 'guilty', 'hopeful', 'impressed', 'jealous', 'joyful', 'lonely', 'nostalgic', 'prepared', 'proud',
    'sad', 'sentimental', 'surprised', 'terrified', 'trusting')
# The AvaMERG baseline's multimodal classes, in its index order.
COARSE_7 = ('happy', 'surprised', 'angry', 'fear', 'sad', 'disgusted', 'contempt')
_COARSE_MEMBERS = {
    'happy': ('excited', 'proud', 'grateful', 'hopeful', 'confident', 'anticipating', 'joyful', 'prepared',
              'content', 'caring', 'trusting', 'faithful'),
    'sad': ('sad', 'lonely', 'guilty', 'anxious', 'nostalgic', 'disappointed', 'embarrassed', 'sentimental',
            'ashamed'),
    'angry': ('angry', 'annoyed', 'furious'),
    'surprised': ('surprised', 'impressed', 'devastated'),
    'fear': ('afraid', 'terrified', 'apprehensive'),
    'disgusted': ('disgusted',),
    'contempt': ('jealous',),
}
FINE_TO_COARSE = {fine: coarse for coarse, fines in _COARSE_MEMBERS.items() for fine in fines}
# Free-form words seen (or expected) in later turns, mapped to the closest of the 32. frustrated->sad and
# overwhelmed/stressed->anxious follow the AvaMERG baseline; the rest are plain synonyms. Words such as "tired"
# or "bored" have no counterpart in either label set and stay unknown (-1).
FREE_FORM_TO_FINE = {
    'frustrated': 'sad', 'upset': 'sad', 'unhappy': 'sad', 'depressed': 'sad', 'heartbroken': 'devastated',
    'overwhelmed': 'anxious', 'stressed': 'anxious', 'worried': 'anxious', 'nervous': 'anxious',
    'concerned': 'anxious', 'scared': 'afraid', 'frightened': 'afraid', 'fearful': 'afraid', 'happy': 'joyful',
    'glad': 'joyful', 'thankful': 'grateful', 'eager': 'anticipating', 'optimistic': 'hopeful',
    'relieved': 'content', 'irritated': 'annoyed', 'mad': 'angry', 'enraged': 'furious', 'shocked': 'surprised',
    'amazed': 'impressed', 'regretful': 'guilty', 'envious': 'jealous', 'isolated': 'lonely',
}
_FINE_INDEX = {word: i for i, word in enumerate(EMOTIONS_32)}
_STEM = re.compile(r'dia(\d+)utt(\d+)_(\d+)')
# Marks utterance boundaries when the speaker text is the whole dialogue history.
HISTORY_SEPARATOR = ' | '
SPEAKER_TEXT_MODES = ('last', 'history')
SPLITS = ('train', 'val', 'test')
DEFAULT_VAL_FRACTION = 0.02
# Where a split's dialogue file is looked for, relative to the root, in order.
ANNOTATION_FILES = {'train': ('train.json',), 'val': ('train.json',), 'test': ('test/test.json', 'test.json')}
FRAMES_DIR = 'image_v5_0'
FRAME_SUFFIXES, VIDEO_SUFFIX = ('.png', '.jpg'), '.mp4'
FRAMES, VIDEOS = 'frames', 'videos'
# The media folders of each split, relative to the root, in search order, with the kind of file they hold. The
# frame cache of every video folder listed (cache_folder) is listed too, so that extracted frames are found again.
MEDIA_DIRS = {
    'train': (('image_v5_0', FRAMES),                  # AvaMERG_frame; the frame cache of video_v5_0
              ('train_image/image_v5_0', FRAMES),      # per-modality archives
              ('train_video/image_v5_0', FRAMES),      # the frame cache of train_video/video_v5_0
              ('video_v5_0', VIDEOS),
              ('train_video/video_v5_0', VIDEOS)),
    'test': (('test/image_v5_0', FRAMES),              # the frame cache of test/test_video and test/video_v5_0
             ('test/test_image', FRAMES),
             ('test/test_image/image_v5_0', FRAMES),
             ('test/test_video/image_v5_0', FRAMES),   # the frame cache of test/test_video/video_v5_0
             ('test/test_video', VIDEOS),
             ('test/test_video/video_v5_0', VIDEOS),
             ('test/video_v5_0', VIDEOS),
             # One folder for every split (stems of different splits can then collide, a flaw of such a layout).
             ('image_v5_0', FRAMES),
             ('video_v5_0', VIDEOS)),
}
MEDIA_DIRS['val'] = MEDIA_DIRS['train']
MISSING_EXAMPLES = 10  # missing stems (and unknown emotion words) named in logs and summaries
GOLD_BESIDE_TEST = 'test_gold.json'  # where a release without gold in test.json may put it (data.test_gold)
GOLD_HINT = ('; every turn of train.json needs a gold response and chain_of_empathy.speaker_emotion (only the test '
             'split may lack them)')


def _normalise(word):
    """Lower-case a label word and collapse its whitespace."""
    return ' '.join(word.lower().split())


def label_index(word, unknown=None):
    """Index of an emotion word in EMOTIONS_32 (free-form synonyms mapped first), or -1; -1 words go to `unknown`."""
    word = _normalise(word)
    fine = word if word in _FINE_INDEX else FREE_FORM_TO_FINE.get(word)
    if fine is None:
        if unknown is not None:
            unknown[word] += 1
        return -1
    return _FINE_INDEX[fine]


def coarse_index(label):
    """Index in COARSE_7 of a 32-way label; -1 stays -1."""
    return -1 if label < 0 else COARSE_7.index(FINE_TO_COARSE[EMOTIONS_32[label]])


def is_validation(conversation_id, val_fraction):
    """Whether a conversation of train.json is held out as 'val': a stable hash of its id below val_fraction."""
    from libs.features import derive_seed   # the feature cache builds on the reader: no module-level cycle
    return derive_seed('validation', 'train', conversation_id) / 2 ** 64 < val_fraction


@dataclasses.dataclass
class Pair:
    """One pair: the speaker's turn k (utterance 2k) and the listener's reply (utterance 2k+1), gold where known."""
    split: str
    conversation_id: str
    turn_id: str
    speaker_id: int
    listener_id: int
    speaker_stem: str
    response_stem: str
    speaker_text: str
    response_text: Optional[str]   # None: no gold response
    history: list
    emotion: Optional[str]         # the gold speaker_emotion word; None: no gold label
    label: int                     # index in EMOTIONS_32; -1 without gold or for a word outside the vocabulary
    coarse_label: int              # index in COARSE_7, -1 likewise
    speaker_profile: dict
    listener_profile: dict
    topic: str

    @property
    def pair_id(self):
        """'{split}/{conversation_id}/{turn_id}': the pair's identity (conversation ids repeat across splits)."""
        return f'{self.split}/{self.conversation_id}/{self.turn_id}'

    @property
    def has_gold_response(self):
        """Whether the turn has a gold response."""
        return self.response_text is not None

    @property
    def has_gold_label(self):
        """Whether the turn has a gold speaker_emotion word (label is -1 all the same for a word outside the 32)."""
        return self.emotion is not None


def media_stem(conversation_id, index, avatar_id):
    """File stem of utterance `index`: dia{cid}utt{index}_{ID}."""
    return f'dia{conversation_id}utt{index}_{avatar_id}'


def parse_stem(stem):
    """(conversation_id, index, avatar_id) of a media stem; any number of digits per field."""
    match = _STEM.fullmatch(stem)
    if match is None:
        raise UserError(f'{stem!r} is not an AvaMERG media stem; expected dia<conversation_id>utt<index>_<ID>')
    return match.group(1), int(match.group(2)), int(match.group(3))


def _require(obj, key, kind, where):
    """obj[key] if it exists and has type `kind` (bools are not ints), else UserError naming `where`."""
    if not isinstance(obj, dict) or key not in obj:
        raise UserError(f"{where}: missing field '{key}'")
    value = obj[key]
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise UserError(f"{where}: field '{key}' must be {kind.__name__}, got {type(value).__name__}")
    return value


def _gold_text(value):
    """A gold string field's value, or None when it is absent, null or blank."""
    return value if isinstance(value, str) and value.strip() else None


def _check_gold_field(obj, key, where, required):
    """Check an optional gold string field: absent, null or blank is no gold (an error when `required`)."""
    value = obj.get(key)
    if value is not None and not isinstance(value, str):
        raise UserError(f"{where}: field '{key}' must be str, got {type(value).__name__}")
    if required and _gold_text(value) is None:
        state = 'missing field' if key not in obj else 'null field' if value is None else 'empty field'
        raise UserError(f"{where}: {state} '{key}'{GOLD_HINT}")


def _check_conversation_id(dialogue, where):
    """The dialogue's conversation_id, which must be a string of digits."""
    cid = _require(dialogue, 'conversation_id', str, where)
    if not cid.isdigit():
        raise UserError(f"{where}: field 'conversation_id' must be digits (e.g. '01118'), got {cid!r}")
    return cid


def _check_turn(turn, at, require_gold, require_history=True):
    """Validate one turn: ids and history always, the gold fields as `require_gold` says."""
    _require(turn, 'turn_id', str, at)
    _check_gold_field(turn, 'response', at, require_gold)
    if require_gold or turn.get('chain_of_empathy') is not None:
        chain = _require(turn, 'chain_of_empathy', dict, at)
        _check_gold_field(chain, 'speaker_emotion', f'{at} chain_of_empathy', require_gold)
    if not require_history and 'dialogue_history' not in turn:
        return
    history = _require(turn, 'dialogue_history', list, at)
    for i, entry in enumerate(history):
        if _require(entry, 'index', int, f'{at} dialogue_history[{i}]') != i:
            raise UserError(f"{at} dialogue_history[{i}]: field 'index' is {entry['index']}, expected {i}")
        _require(entry, 'role', str, f'{at} dialogue_history[{i}]')
        _require(entry, 'utterance', str, f'{at} dialogue_history[{i}]')
    # The history ends with the speaker's utterance, so it has an odd length 2k+1.
    if len(history) % 2 != 1:
        raise UserError(f"{at}: field 'dialogue_history' has {len(history)} entries; it must end with the "
                        "speaker's utterance (an odd count)")


def _check_dialogue(dialogue, json_path, position, require_gold):
    """Validate the fields of one dialogue that the reader uses; raise UserError naming the first bad one."""
    cid = _check_conversation_id(dialogue, f'{json_path}: dialogue #{position}')
    where = f'{json_path}: dialogue {cid} (#{position})'
    for role in ('speaker_profile', 'listener_profile'):
        profile = _require(dialogue, role, dict, where)
        _require(profile, 'ID', int, f'{where} {role}')
        for key in ('age', 'gender', 'timbre'):
            _require(profile, key, str, f'{where} {role}')
    _require(dialogue, 'topic', str, where)
    turns = _require(dialogue, 'turns', list, where)
    if not turns:
        raise UserError(f"{where}: field 'turns' is empty")
    for k, turn in enumerate(turns):
        _check_turn(turn, f'{where} turn {k}', require_gold)


def _load_list(json_path):
    """The JSON list in `json_path`, with a UserError for a missing, broken or non-list file."""
    try:
        with open(json_path, encoding='utf-8') as f:
            dialogues = json.load(f)
    except FileNotFoundError:
        raise UserError(f'{json_path}: no such file; point the reader at the folder holding train.json and '
                        'test/test.json') from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f'{json_path}: not valid JSON ({exc}); re-download or regenerate the file') from None
    if not isinstance(dialogues, list):
        raise UserError(f'{json_path}: expected a JSON list of dialogues, got {type(dialogues).__name__}')
    return dialogues


def read_dialogues(json_path, require_gold=True):
    """Load and validate an AvaMERG dialogue file (a JSON list of dialogues); gold fields optional unless required."""
    dialogues = _load_list(json_path)
    for i, dialogue in enumerate(dialogues):
        _check_dialogue(dialogue, json_path, i, require_gold)
    return dialogues


def read_gold(gold_path):
    """{(conversation_id, turn_id): turn} of a gold file in the AvaMERG schema (ids, gold fields, optional history)."""
    gold = {}
    for position, dialogue in enumerate(_load_list(gold_path)):
        cid = _check_conversation_id(dialogue, f'{gold_path}: dialogue #{position}')
        where = f'{gold_path}: dialogue {cid} (#{position})'
        for k, turn in enumerate(_require(dialogue, 'turns', list, where)):
            _check_turn(turn, f'{where} turn {k}', require_gold=False, require_history=False)
            key = (cid, turn['turn_id'])
            if key in gold:
                raise UserError(f'{where}: conversation {cid} turn {key[1]} appears twice in the gold file; keep one')
            gold[key] = turn
    return gold


def merge_gold(dialogues, gold, gold_path):
    """Copy the gold response and emotion of each (conversation_id, turn_id) of `gold` into `dialogues` (in place).

    A gold turn whose history ends with another speaker utterance is not joined (it is another dialogue, e.g. of
    another split) but reported. Returns the report: gold turns, turns joined, the gold turns (as 'cid/turn') that
    matched no turn, and those that conflicted.
    """
    joined, matched, conflicts = 0, set(), []
    for dialogue in dialogues:
        for turn in dialogue['turns']:
            key = (dialogue['conversation_id'], turn['turn_id'])
            source = gold.get(key)
            if source is None:
                continue
            matched.add(key)
            theirs = source.get('dialogue_history')
            if theirs and theirs[-1]['utterance'] != turn['dialogue_history'][-1]['utterance']:
                conflicts.append('/'.join(key))
                continue
            response = _gold_text(source.get('response'))
            emotion = _gold_text((source.get('chain_of_empathy') or {}).get('speaker_emotion'))
            if response is not None:
                turn['response'] = response
            if emotion is not None:
                if not isinstance(turn.get('chain_of_empathy'), dict):
                    turn['chain_of_empathy'] = {}
                turn['chain_of_empathy']['speaker_emotion'] = emotion
            joined += response is not None or emotion is not None
    if gold and len(conflicts) == len(matched):
        detail = (f'the {len(conflicts)} turns it shares with the split have other speaker utterances (first: '
                  f'{conflicts[0]})' if conflicts else f'none of its {len(gold)} turns has a conversation_id and '
                  'turn_id of the split')
        raise UserError(f'{gold_path}: not the gold of this split: {detail}; pass the gold file of this split')
    unmatched = sorted('/'.join(key) for key in gold if key not in matched)
    if unmatched or conflicts:
        logger.warning('%s: %d gold turns match no turn (first: %s), %d conflict (first: %s)', gold_path,
                       len(unmatched), unmatched[:MISSING_EXAMPLES], len(conflicts), conflicts[:MISSING_EXAMPLES])
    return {'path': gold_path, 'gold_turns': len(gold), 'joined_turns': joined, 'unmatched': unmatched,
            'conflicts': conflicts}


def _whitespace_tokens(text):
    """Number of whitespace-separated words, the default token counter."""
    return len(text.split())


def truncate_left(utterances, max_tokens, count_tokens=_whitespace_tokens):
    """Join utterances, dropping the oldest (whole utterances, then leading words) until it fits max_tokens."""
    for start in range(len(utterances)):
        text = HISTORY_SEPARATOR.join(utterances[start:])
        if count_tokens(text) <= max_tokens:
            return text
    # Even the newest utterance alone is too long: binary-search the fewest leading words to drop.
    words = utterances[-1].split()
    lo, hi = 0, len(words)
    while lo < hi:
        mid = (lo + hi) // 2
        if count_tokens(' '.join(words[mid:])) <= max_tokens:
            hi = mid
        else:
            lo = mid + 1
    return ' '.join(words[lo:])


def iter_pairs(dialogues, split, speaker_text='last', history_tokens=None, count_tokens=None, unknown=None):
    """Yield one Pair of `split` per turn of validated dialogues; unknown emotion words are counted into `unknown`."""
    if split not in SPLITS:
        raise UserError(f'split={split!r}; choose one of {SPLITS}')
    if speaker_text not in SPEAKER_TEXT_MODES:
        raise UserError(f'speaker_text={speaker_text!r}; choose one of {SPEAKER_TEXT_MODES}')
    count_tokens = count_tokens or _whitespace_tokens
    for dialogue in dialogues:
        cid = dialogue['conversation_id']
        speaker_id, listener_id = dialogue['speaker_profile']['ID'], dialogue['listener_profile']['ID']
        for turn in dialogue['turns']:
            history = [entry['utterance'] for entry in turn['dialogue_history']]
            if speaker_text == 'last':
                text = history[-1]
            elif history_tokens is None:
                text = HISTORY_SEPARATOR.join(history)
            else:
                text = truncate_left(history, history_tokens, count_tokens)
            emotion = _gold_text((turn.get('chain_of_empathy') or {}).get('speaker_emotion'))
            label = -1 if emotion is None else label_index(emotion, unknown)
            # The speaker's utterance is the last history entry (index 2k); the reply is the next index.
            index = len(history) - 1
            yield Pair(split=split, conversation_id=cid, turn_id=turn['turn_id'], speaker_id=speaker_id,
                       listener_id=listener_id, speaker_stem=media_stem(cid, index, speaker_id),
                       response_stem=media_stem(cid, index + 1, listener_id), speaker_text=text,
                       response_text=_gold_text(turn.get('response')), history=history, emotion=emotion,
                       label=label, coarse_label=coarse_index(label), speaker_profile=dialogue['speaker_profile'],
                       listener_profile=dialogue['listener_profile'], topic=dialogue['topic'])


def annotation_path(root, split):
    """The dialogue file of `split` under root (the first of ANNOTATION_FILES[split] that exists)."""
    if split not in SPLITS:
        raise UserError(f'split={split!r}; choose one of {SPLITS}')
    tried = [os.path.join(root, name) for name in ANNOTATION_FILES[split]]
    for path in tried:
        if os.path.isfile(path):
            return path
    raise UserError(f'{split}: no dialogue file, tried {", ".join(tried)}; put train.json and test/test.json '
                    f'there (python scripts/get_avamerg.py --out {root} fetches them)')


def split_dialogues(dialogues, split, val_fraction):
    """The dialogues of train.json that belong to 'train' or to 'val' (is_validation); other splits unchanged."""
    if split == 'test':
        return dialogues
    return [d for d in dialogues if is_validation(d['conversation_id'], val_fraction) == (split == 'val')]


def cache_folder(video_folder):
    """Where the middle frames of a video folder's clips are cached: image_v5_0/ beside it."""
    return os.path.join(os.path.dirname(os.path.normpath(video_folder)), FRAMES_DIR)


class MediaIndex:
    """The frames and videos of one split by stem, from one listing of each of its folders (search order above)."""

    def __init__(self, root, split, media_dirs=(), frames_cache=None):
        if split not in SPLITS:
            raise UserError(f'split={split!r}; choose one of {SPLITS}')
        if isinstance(media_dirs, str):
            media_dirs = (media_dirs,)
        frames_cache = os.path.normpath(os.path.join(root, frames_cache)) if frames_cache else None
        configured = [(os.path.join(root, d), None) for d in media_dirs]   # kind None: frames or videos
        folders = [(frames_cache, FRAMES)] if frames_cache else []
        folders += configured + [(os.path.join(root, d), kind) for d, kind in MEDIA_DIRS[split]]
        folders += [(cache_folder(d), FRAMES) for d, _ in configured]
        self.frames_cache, self.folders, self.contents = frames_cache, [], {}
        self.frames, self.videos = {}, {}
        has_video_folder = False
        for folder, kind in folders:
            folder = os.path.normpath(folder)
            if folder in self.contents:
                continue
            self.folders.append(folder)
            self.contents[folder] = self._index(folder)
            has_video_folder |= kind == VIDEOS and self.contents[folder] is not None
        # What a missing face counts as: a video when the split has any video folder, else a frame.
        self.missing_reason = 'missing_video' if has_video_folder or self.videos else 'missing_frame'

    def _index(self, folder):
        """Add the frames and videos of `folder` (first folder wins); their counts, or None for no such folder."""
        try:
            entries = list(os.scandir(folder))
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as exc:
            raise UserError(f'cannot list the media folder {folder} ({exc}); make it readable') from exc
        counts = {FRAMES: 0, VIDEOS: 0}
        for entry in entries:
            stem, suffix = os.path.splitext(entry.name)
            kind = FRAMES if suffix in FRAME_SUFFIXES else VIDEOS if suffix == VIDEO_SUFFIX else None
            if kind is not None:
                (self.frames if kind == FRAMES else self.videos).setdefault(stem, entry.path)
                counts[kind] += 1
        return counts

    def has(self, stem):
        """Whether a frame or a video of `stem` exists."""
        return stem in self.frames or stem in self.videos

    def cache_path(self, stem):
        """Where the middle frame of `stem`'s video is cached."""
        return os.path.join(self.frames_cache or cache_folder(os.path.dirname(self.videos[stem])), stem + '.png')

    def describe(self):
        """The folders tried, one per line, each absent or with its frame and video counts."""
        return '\n'.join(f'  {folder} ' + ('(absent)' if counts is None else
                                           f'({counts[FRAMES]} frames, {counts[VIDEOS]} videos)')
                         for folder, counts in self.contents.items())

    def require_any(self, stems, what):
        """UserError naming every folder tried when none of `stems` (media of `what`) is found."""
        if stems and not any(self.has(stem) for stem in stems):
            raise UserError(f'{what}: none of its {len(stems)} media files (e.g. {stems[0]}.png or .mp4) is in any '
                            f'folder tried:\n{self.describe()}\nUnpack the frames or videos into one of them (python '
                            'scripts/get_avamerg.py does), or name their folder in media_dirs')


def from_config(data_config, split, **kwargs):
    """The reader of one split as a config's ``data`` section describes it (root, speaker_text, val_fraction, and
    the optional media_dirs, frames_cache and test_gold); ``kwargs`` adds the text-encoder arguments."""
    get = data_config.get
    return AvaMERG(data_config.root, split, speaker_text=get('speaker_text', 'last'),
                   val_fraction=get('val_fraction', DEFAULT_VAL_FRACTION), media_dirs=tuple(get('media_dirs', ())),
                   frames_cache=get('frames_cache') or None,
                   gold_path=(get('test_gold') or None) if split == 'test' else None, **kwargs)


class AvaMERG:
    """The pairs of one split whose speaker and response faces exist and decode, with skip and gold statistics."""

    def __init__(self, root, split='train', speaker_text='last', history_tokens=None, count_tokens=None,
                 val_fraction=DEFAULT_VAL_FRACTION, media_dirs=(), frames_cache=None, gold_path=None):
        if split not in SPLITS:
            raise UserError(f'split={split!r}; choose one of {SPLITS}')
        if not (isinstance(val_fraction, (int, float)) and 0 <= val_fraction < 1):
            raise UserError(f'val_fraction={val_fraction!r}; it must be a number in [0, 1)')
        if gold_path and split != 'test':
            raise UserError(f'gold_path is for the test split; the {split} split takes its gold from train.json')
        self.root, self.split, self.val_fraction = root, split, val_fraction
        self.json_path = annotation_path(root, split)
        dialogues = split_dialogues(read_dialogues(self.json_path, require_gold=split != 'test'), split, val_fraction)
        self.gold = merge_gold(dialogues, read_gold(gold_path), gold_path) if gold_path else None
        self.unknown_emotions = collections.Counter()
        candidates = list(iter_pairs(dialogues, split, speaker_text, history_tokens, count_tokens,
                                     self.unknown_emotions))
        if self.unknown_emotions:
            words = ', '.join(f'{word!r} ({n})' for word, n in self.unknown_emotions.most_common(MISSING_EXAMPLES))
            more = len(self.unknown_emotions) - MISSING_EXAMPLES
            logger.warning('AvaMERG %s: %d turns have an emotion word outside the 32 EmpatheticDialogues classes and '
                           'its synonyms, so no emotion label (-1, no emotion loss): %s%s', split,
                           sum(self.unknown_emotions.values()), words, f' and {more} more words' if more > 0 else '')
        if split == 'test' and not gold_path and not any(p.has_gold_response or p.has_gold_label for p in candidates):
            beside = os.path.join(os.path.dirname(self.json_path), GOLD_BESIDE_TEST)
            if os.path.isfile(beside):
                logger.warning('AvaMERG test: %s has no gold responses or emotions, but %s beside it may: pass '
                               '--config.data.test_gold=%s to join it (metrics that need gold are not computed '
                               'without it)', self.json_path, beside, beside)
        self.media = MediaIndex(root, split, media_dirs, frames_cache)
        self.media.require_any([s for p in candidates for s in (p.speaker_stem, p.response_stem)],
                               f'{split} split of {self.json_path}')
        self.skipped, self.missing, self.pairs, seen = collections.Counter(), [], [], set()
        for pair in candidates:
            if pair.pair_id in seen:
                self.skipped['duplicate_pair_id'] += 1
                continue
            seen.add(pair.pair_id)
            reason = self._check_face(pair.speaker_stem) or self._check_face(pair.response_stem)
            if reason:
                self.skipped[reason] += 1
            else:
                self.pairs.append(pair)
        if self.missing:
            logger.warning('AvaMERG %s: %d media files missing (first: %s); looked in:\n%s', split, len(self.missing),
                           ', '.join(self.missing[:MISSING_EXAMPLES]), self.media.describe())
        logger.info('AvaMERG %s: %d pairs, skipped %s', split, len(self.pairs), dict(self.skipped))

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        pair = self.pairs[i]
        return pair, self.load_face(pair.speaker_stem), self.load_face(pair.response_stem)

    def _frame_path(self, stem):
        """Path of the frame of `stem`, extracting and caching its video's middle frame when there is no frame."""
        frame = self.media.frames.get(stem)
        if frame is not None:
            return frame
        if stem not in self.media.videos:
            raise UserError(f'{self.split}: no frame or video of {stem} ({stem}.png, .jpg or .mp4); looked in:\n'
                            f'{self.media.describe()}')
        from libs.io import atomic_write_bytes
        image = middle_frame(self.media.videos[stem])
        png, buffer = self.media.cache_path(stem), io.BytesIO()
        image.save(buffer, format='PNG')
        try:
            atomic_write_bytes(png, buffer.getvalue())
        except OSError as exc:
            raise UserError(f'cannot cache the extracted frame {png} ({exc}); make {os.path.dirname(png)} writable, '
                            'pass frames_cache, or extract the frames beforehand') from exc
        self.media.frames[stem] = png
        return png

    def _check_face(self, stem):
        """Skip reason for a face that cannot be found or decoded, or None when it is usable."""
        if not self.media.has(stem):
            self.missing.append(stem)
            return self.media.missing_reason
        try:
            with Image.open(self._frame_path(stem)) as image:
                image.verify()
        except VideoError:
            return 'unreadable_video'
        except (UnidentifiedImageError, OSError, SyntaxError):
            # PIL reports corrupt or truncated PNG chunks as OSError or SyntaxError.
            return 'unreadable_frame'
        return None

    def load_face(self, stem):
        """The face of a media stem as an RGB image."""
        from libs.io import read_rgb
        return read_rgb(self._frame_path(stem))

    def summary(self):
        """Counts of kept pairs, gold, skips by reason, labels (32- and 7-way), unknown words, media and gold join."""
        gold = [p for p in self.pairs if p.has_gold_label]
        fine = collections.Counter(p.label for p in gold)
        coarse = collections.Counter(p.coarse_label for p in gold)
        return {'split': self.split, 'json': self.json_path,
                'val_fraction': None if self.split == 'test' else self.val_fraction, 'pairs': len(self.pairs),
                'pairs_with_gold_response': sum(p.has_gold_response for p in self.pairs),
                'pairs_with_gold_label': len(gold), 'skipped': dict(sorted(self.skipped.items())),
                'labels_32': {name: fine[i] for i, name in enumerate(EMOTIONS_32)},
                'labels_7': {name: coarse[i] for i, name in enumerate(COARSE_7)},
                'unknown_label': fine[-1], 'unknown_emotions': dict(self.unknown_emotions.most_common()),
                'media': {'folders': self.media.contents, 'missing': len(self.missing),
                          'missing_examples': self.missing[:MISSING_EXAMPLES]},
                'gold_file': self.gold}

    def save_summary(self, path):
        """Write summary() as JSON, atomically."""
        from libs.io import atomic_write_json
        atomic_write_json(path, self.summary())
