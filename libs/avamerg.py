"""AvaMERG: label vocabulary, JSON validation, media stems, one pair per turn, and a frame-resolving reader."""
import collections
import dataclasses
import json
import logging
import os
import re
import tempfile

from PIL import Image, UnidentifiedImageError

from libs.errors import UserError
from libs.video_frames import VideoError, middle_frame

logger = logging.getLogger(__name__)

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
SPLIT_FILES = {'train': ('train.json',), 'val': ('train.json',), 'test': ('test', 'test.json')}


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


@dataclasses.dataclass
class Pair:
    """One training pair: the speaker's turn k (utterance 2k) and the listener's reply (utterance 2k+1)."""
    conversation_id: str
    turn_id: str
    speaker_id: int
    listener_id: int
    speaker_stem: str
    response_stem: str
    speaker_text: str
    response_text: str
    history: list
    emotion: str
    label: int
    coarse_label: int
    speaker_profile: dict
    listener_profile: dict
    topic: str
    split: str = 'train'

    @property
    def pair_id(self) -> str:
        """The pair's identity across splits (conversation ids repeat between train and test)."""
        return f'{self.split}/{self.conversation_id}/{self.turn_id}'


def is_validation(conversation_id: str, val_fraction: float) -> bool:
    """Whether a conversation of train.json is held out as the 'val' split (a stable hash of its id)."""
    from libs.features import derive_seed
    return derive_seed('validation', 'train', conversation_id) / 2 ** 64 < val_fraction


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


def _check_dialogue(dialogue, json_path, position):
    """Validate the fields of one dialogue that the reader uses; raise UserError naming the first bad one."""
    where = f'{json_path}: dialogue #{position}'
    cid = _require(dialogue, 'conversation_id', str, where)
    if not cid.isdigit():
        raise UserError(f"{where}: field 'conversation_id' must be digits (e.g. '01118'), got {cid!r}")
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
        at = f'{where} turn {k}'
        _require(turn, 'turn_id', str, at)
        _require(turn, 'response', str, at)
        _require(_require(turn, 'chain_of_empathy', dict, at), 'speaker_emotion', str, f'{at} chain_of_empathy')
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


def read_dialogues(json_path):
    """Load and validate an AvaMERG dialogue file (a JSON list of dialogues)."""
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
    for i, dialogue in enumerate(dialogues):
        _check_dialogue(dialogue, json_path, i)
    return dialogues


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


def iter_pairs(dialogues, speaker_text='last', history_tokens=None, count_tokens=None, unknown=None):
    """Yield one Pair per turn of validated dialogues; unknown emotion words are counted into `unknown`."""
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
            emotion = turn['chain_of_empathy']['speaker_emotion']
            label = label_index(emotion, unknown)
            # The speaker's utterance is the last history entry (index 2k); the reply is the next index.
            index = len(history) - 1
            yield Pair(conversation_id=cid, turn_id=turn['turn_id'], speaker_id=speaker_id, listener_id=listener_id,
                       speaker_stem=media_stem(cid, index, speaker_id),
                       response_stem=media_stem(cid, index + 1, listener_id),
                       speaker_text=text, response_text=turn['response'], history=history, emotion=emotion,
                       label=label, coarse_label=coarse_index(label),
                       speaker_profile=dialogue['speaker_profile'], listener_profile=dialogue['listener_profile'],
                       topic=dialogue['topic'])


def atomic_write(path, write):
    """Call write(file_object) on a temporary file beside `path`, then rename it into place."""
    fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


class AvaMERG:
    """The pairs of one split whose speaker and response faces exist and decode, with skip statistics."""

    def __init__(self, root, split='train', frames_dir='image_v5_0', video_dir='video_v5_0', speaker_text='last',
                 history_tokens=None, count_tokens=None, val_fraction=0.02):
        if split not in SPLIT_FILES:
            raise UserError(f'split={split!r}; choose one of {tuple(SPLIT_FILES)}')
        self.root, self.split = root, split
        self.json_path = os.path.join(root, *SPLIT_FILES[split])
        # Test media sit under test/ in the release; fall back to the root for flat layouts.
        bases = [os.path.join(root, 'test'), root] if split == 'test' else [root]
        found_frames = [os.path.join(b, frames_dir) for b in bases if os.path.isdir(os.path.join(b, frames_dir))]
        found_videos = [os.path.join(b, video_dir) for b in bases if os.path.isdir(os.path.join(b, video_dir))]
        if not found_frames and not found_videos:
            raise UserError(f"{split}: no '{frames_dir}' or '{video_dir}' folder under {bases}; unpack the frames "
                            'or videos there, or pass frames_dir / video_dir')
        self.video_root = found_videos[0] if found_videos else None
        # Frames extracted from videos are cached beside the video folder when no frame folder exists yet.
        self.frame_root = found_frames[0] if found_frames else os.path.join(os.path.dirname(self.video_root),
                                                                            frames_dir)
        self.unknown_emotions = collections.Counter()
        self.skipped = collections.Counter()
        self.pairs = []
        dialogues = read_dialogues(self.json_path)
        if split != 'test':  # train.json is split into train and the held-out val conversations
            dialogues = [d for d in dialogues if is_validation(d['conversation_id'], val_fraction) == (split == 'val')]
        for pair in iter_pairs(dialogues, speaker_text, history_tokens, count_tokens, self.unknown_emotions):
            pair.split = split
            reason = self._check_face(pair.speaker_stem) or self._check_face(pair.response_stem)
            if reason:
                self.skipped[reason] += 1
            else:
                self.pairs.append(pair)
        logger.info('AvaMERG %s: %d pairs, skipped %s', split, len(self.pairs), dict(self.skipped))

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        pair = self.pairs[i]
        return pair, self.load_face(pair.speaker_stem), self.load_face(pair.response_stem)

    def _frame_path(self, stem):
        """Path of the PNG frame of `stem`, extracting and caching the video's middle frame when it is absent."""
        png = os.path.join(self.frame_root, stem + '.png')
        if os.path.isfile(png) or self.video_root is None:
            return png
        image = middle_frame(os.path.join(self.video_root, stem + '.mp4'))
        try:
            os.makedirs(self.frame_root, exist_ok=True)
            atomic_write(png, lambda f: image.save(f, format='PNG'))
        except OSError as exc:
            raise UserError(f'cannot cache the extracted frame {png} ({exc}); make {self.frame_root} writable or '
                            'extract the frames beforehand') from exc
        return png

    def _check_face(self, stem):
        """Skip reason for a face that cannot be found or decoded, or None when it is usable."""
        if not os.path.isfile(os.path.join(self.frame_root, stem + '.png')):
            if self.video_root is None:
                return 'missing_frame'
            if not os.path.isfile(os.path.join(self.video_root, stem + '.mp4')):
                return 'missing_video'
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
        with Image.open(self._frame_path(stem)) as image:
            return image.convert('RGB')

    def summary(self):
        """Counts of kept pairs, skips by reason, labels (32- and 7-way) and unknown emotion words."""
        fine = collections.Counter(p.label for p in self.pairs)
        coarse = collections.Counter(p.coarse_label for p in self.pairs)
        return {'split': self.split, 'json': self.json_path, 'pairs': len(self.pairs),
                'skipped': dict(sorted(self.skipped.items())),
                'labels_32': {name: fine[i] for i, name in enumerate(EMOTIONS_32)},
                'labels_7': {name: coarse[i] for i, name in enumerate(COARSE_7)},
                'unknown_label': fine[-1], 'unknown_emotions': dict(self.unknown_emotions.most_common())}

    def save_summary(self, path):
        """Write summary() as JSON, atomically."""
        text = json.dumps(self.summary(), indent=2)
        atomic_write(path, lambda f: f.write(text.encode('utf-8')))
