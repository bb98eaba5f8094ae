"""A synthetic AvaMERG in the release's layouts (LAYOUTS): procedural faces whose expressions follow the emotions.

Ground truth the demo can learn and check: the speaker's face shows the coarse class of the speaker emotion
(SPEAKER_EXPRESSION), the listener's face shows the empathetic reaction RESPONSE_EXPRESSION[coarse], and the
response text is drawn from templates of that reaction, so both response modalities are predictable from the turn.
"""
import collections
import json
import os
import random

from PIL import Image, ImageDraw
from tqdm import tqdm

from libs.avamerg import COARSE_7, EMOTIONS_32, FINE_TO_COARSE, FREE_FORM_TO_FINE, media_stem
from libs.video_frames import write_clip

# Empathetic reaction to each coarse speaker class: share joy; show interest in surprise and in contempt (let
# them explain); soothe anger and disgust; comfort fear and sadness ("caring" is a soft, concerned smile).
RESPONSE_EXPRESSION = {'happy': 'happy', 'surprised': 'attentive', 'angry': 'calm', 'fear': 'caring',
                       'sad': 'caring', 'disgusted': 'calm', 'contempt': 'attentive'}
EXPRESSIONS = COARSE_7 + ('caring', 'calm', 'attentive')
# Later-turn words in neither label set (the reader counts them as unknown); each still has a face.
UNKNOWN_WORDS = {'tired': 'sad', 'weary': 'sad', 'bored': 'contempt', 'confused': 'surprised'}
SPEAKER_EXPRESSION = {**FINE_TO_COARSE, **{w: FINE_TO_COARSE[f] for w, f in FREE_FORM_TO_FINE.items()},
                      **UNKNOWN_WORDS}
AGES, GENDERS, TIMBRES = ('child', 'young', 'middle-aged', 'elderly'), ('male', 'female'), ('high', 'mid', 'low')
TOPICS = ('Relationships', 'Education', 'Hobbies & Interests', 'Work & Career', 'Personal Growth', 'Sports',
          'Food & Cooking', 'Health & Wellness', 'Social Issues', 'Life Events', 'Family', 'Technology',
          'Entertainment', 'Travel & Adventure')
# Where each layout puts the frames and videos of each split, relative to the output folder; the JSON files are
# always train.json and test/test.json. 'flat': the media folders beside each JSON; 'release': the test media in
# test/test_image and test/test_video (as users unpack the release); 'per_modality': per-modality archives unpacked
# in place (train_video/video_v5_0, test/test_video/video_v5_0); 'frames_release': frames only, every split in
# one image_v5_0/ (how the AvaMERG_frame uploader's code reads them).
LAYOUTS = {
    'flat': {'train': {'frames': 'image_v5_0', 'videos': 'video_v5_0'},
             'test': {'frames': 'test/image_v5_0', 'videos': 'test/video_v5_0'}},
    'release': {'train': {'frames': 'image_v5_0', 'videos': 'video_v5_0'},
                'test': {'frames': 'test/test_image', 'videos': 'test/test_video'}},
    'per_modality': {'train': {'frames': 'train_image/image_v5_0', 'videos': 'train_video/video_v5_0'},
                     'test': {'frames': 'test/test_image/image_v5_0', 'videos': 'test/test_video/video_v5_0'}},
    'frames_release': {'train': {'frames': 'image_v5_0', 'videos': None},
                       'test': {'frames': 'image_v5_0', 'videos': None}},
}
TEST_GOLD, TEST_IDS = ('inline', 'none', 'separate'), ('restart', 'train')
GOLD_FILE = 'test/test_gold.json'  # the separate gold of test_gold='separate'
MAX_AVATAR_ID, MAX_TURNS, FPS, CLIP_FRAMES = 99, 3, 25, (8, 12)
P_SAME_EMOTION, P_UNKNOWN_WORD, P_FREE_FORM = 0.5, 0.08, 0.3   # later turns only

# Face geometry: (mouth curve, mouth opening, mouth width, mouth skew, brow tilt, brow raise, brow asymmetry,
# eye opening, face tint and its strength, cheek blush, tear, nose wrinkle), lengths as fractions of the image
# size. Tilt > 0 pulls the inner brow ends down (anger); < 0 lifts them (sadness, fear). The listener's four
# expressions each have their own complexion tint too: the mouth and brows span a pixel or two at the demo's 32x32,
# and a cue that covers the face is what survives a tiny codec and a few minutes of CPU training.
STYLE_FIELDS = ('curve', 'open', 'width', 'skew', 'tilt', 'lift', 'asym', 'eye', 'tint', 'alpha', 'blush', 'tear',
                'wrinkle')
Style = collections.namedtuple('Style', STYLE_FIELDS)
STYLES = {
    'happy': Style(.07, 0, .18, 0, 0, .015, 0, 1.0, (255, 200, 60), .35, True, False, False),
    'surprised': Style(0, .09, .07, 0, 0, .05, 0, 1.6, None, 0, False, False, False),
    'angry': Style(-.03, 0, .14, 0, .05, -.02, 0, .8, (220, 40, 30), .3, False, False, False),
    'fear': Style(-.015, .045, .17, 0, -.035, .045, 0, 1.5, (120, 150, 255), .25, False, False, False),
    'sad': Style(-.06, 0, .14, 0, -.045, 0, 0, .55, (90, 110, 200), .15, False, True, False),
    'disgusted': Style(-.02, .015, .15, .03, .02, -.01, 0, .55, (90, 170, 60), .3, False, False, True),
    'contempt': Style(0, 0, .13, .05, 0, 0, .05, .7, None, 0, False, False, False),
    'caring': Style(.03, 0, .12, 0, -.025, .015, 0, .85, (255, 110, 170), .35, True, False, False),
    'calm': Style(0, 0, .11, 0, 0, 0, 0, .5, (110, 170, 255), .35, False, False, False),
    'attentive': Style(.015, .025, .10, 0, 0, .035, 0, 1.2, (120, 220, 120), .35, False, False, False),
}
SKIN = ((255, 224, 196), (241, 194, 125), (224, 172, 105), (198, 134, 66), (141, 85, 36), (92, 58, 32))
HAIR = ((20, 20, 20), (90, 56, 37), (180, 130, 70), (230, 200, 120), (160, 50, 30), (200, 200, 200))
EYES = ((60, 40, 20), (40, 90, 160), (60, 120, 60), (90, 70, 50))

PERSONS = ('my sister', 'my boss', 'my neighbour', 'my best friend', 'my dad', 'a coworker', 'my roommate')
EVENTS = {
    'happy': ('I got the job I applied for', '{person} threw me a surprise party', 'I passed my driving test',
              'we are finally moving into our new home', 'I finished my first marathon'),
    'surprised': ('{person} showed up at my door after ten years', 'I won a raffle I forgot I entered',
                  'our whole team was replaced overnight', 'the test I dreaded was cancelled'),
    'angry': ('{person} took credit for my work', 'someone dented my car and drove off',
              'the landlord raised the rent again', '{person} read my private messages'),
    'fear': ('I heard someone walking around the house last night', 'I have a big surgery next week',
             'the company is laying people off', 'I got lost hiking after dark'),
    'sad': ('my old dog passed away', '{person} moved to another country', 'I failed the exam I studied for',
            'I have been eating dinner alone every night'),
    'disgusted': ('I found mould all over the bread I was eating', 'the restaurant kitchen was filthy',
                  '{person} never washes the dishes', 'the bus smelled like rotten eggs'),
    'contempt': ('{person} bought the car I wanted just to show off', '{person} got promoted instead of me',
                 'my rival keeps bragging about the award', '{person} always gets the attention'),
}
SPEAKER_TEMPLATES = {
    'happy': ('Guess what, {event}! I am so happy.', 'I cannot stop smiling: {event}.', 'Best day ever, {event}.'),
    'surprised': ('You will not believe it, {event}!', 'Wow, {event}. I did not see that coming.',
                  'I am still in shock: {event}.'),
    'angry': ('I am furious, {event}.', 'It makes my blood boil that {event}.', 'Honestly, {event} and I am mad.'),
    'fear': ('I am really scared because {event}.', 'I cannot sleep, {event}.', 'It terrifies me that {event}.'),
    'sad': ('I feel so down, {event}.', 'It hurts that {event}.', 'I have been crying since {event}.'),
    'disgusted': ('Ugh, {event}. So gross.', 'I feel sick, {event}.', 'It was revolting: {event}.'),
    'contempt': ('Whatever, {event}. Typical.', 'Of course {event}, they think they are better.',
                 'I cannot stand it, {event}.'),
}
RESPONSES = {
    'happy': ('That is wonderful news, I am so happy for you!', 'Congratulations, you really deserve it!',
              'How exciting, let us celebrate!'),
    'caring': ('I am so sorry you are going through this.', 'That sounds really hard, I am here for you.',
               'Please be gentle with yourself right now.'),
    'calm': ('I understand why you feel that way, let us take a breath.',
             'That is frustrating, but we can sort it out.',
             'Let us step back and think about what to do calmly.'),
    'attentive': ('Really? Tell me more about what happened.', 'Wow, how did that make you feel?',
                  'I am listening, what happened next?'),
}
CLOSINGS = {'happy': ('You earned it.', 'Enjoy every moment.', ''), 'caring': ('You are not alone.', 'I care.', ''),
            'calm': ('We will handle it together.', 'It will be okay.', ''),
            'attentive': ('I want to understand.', 'Go on.', '')}
GOALS = {'happy': 'share the joy', 'caring': 'comfort and support', 'calm': 'help them calm down',
         'attentive': 'show interest and invite them to say more'}


def expression_of(emotion_word, role='speaker'):
    """Face expression of a speaker emotion word for the speaker, or for the listener's response ('response')."""
    coarse = SPEAKER_EXPRESSION[' '.join(emotion_word.lower().split())]
    return coarse if role == 'speaker' else RESPONSE_EXPRESSION[coarse]


def _mix(colour, tint, alpha):
    """Blend an RGB colour towards a tint."""
    return tuple(round(c * (1 - alpha) + t * alpha) for c, t in zip(colour, tint))


def _curve(x0, x1, y0, y1, sag, n=16):
    """Points of a quadratic arc from (x0, y0) to (x1, y1) whose middle sits `sag` below the chord."""
    return [(x0 + (x1 - x0) * t, y0 + (y1 - y0) * t + 4 * sag * t * (1 - t)) for t in (i / n for i in range(n + 1))]


def render_face(avatar_id, expression, size=256, rng=None):
    """Draw avatar `avatar_id` (identity fixed by the ID) with an expression; `rng` jitters pose and background."""
    ident, rng, s = random.Random(avatar_id), rng or random.Random(0), STYLES[expression]
    skin, hair, eyes = ident.choice(SKIN), ident.choice(HAIR), ident.choice(EYES)
    half_w, half_h, hair_style = ident.uniform(.27, .34), ident.uniform(.33, .39), ident.randrange(3)
    shirt = tuple(ident.randrange(40, 220) for _ in range(3))
    back = tuple(min(255, c + rng.randrange(-12, 13)) for c in _mix(shirt, (235, 235, 235), .8))
    cx, cy = .5 + rng.uniform(-.02, .02), .47 + rng.uniform(-.02, .02)
    image = Image.new('RGB', (size, size), back)
    draw = ImageDraw.Draw(image)

    def box(x0, y0, x1, y1):
        """Pixel box of a rectangle given in image fractions."""
        return [round(x0 * size), round(y0 * size), round(x1 * size), round(y1 * size)]

    def line(points, fill, width):
        """Polyline given in image fractions."""
        draw.line([(x * size, y * size) for x, y in points], fill=fill, width=max(1, round(width * size)))

    draw.rectangle(box(cx - .08, cy + half_h - .05, cx + .08, 1), fill=skin)                        # neck
    draw.ellipse(box(cx - .42, cy + half_h + .02, cx + .42, 1.4), fill=shirt)                      # shoulders
    if hair_style == 1:                                                                             # long hair
        draw.rectangle(box(cx - half_w - .04, cy - .05, cx + half_w + .04, cy + half_h + .05), fill=hair)
    face = _mix(skin, s.tint, s.alpha) if s.tint else skin
    draw.ellipse(box(cx - half_w, cy - half_h, cx + half_w, cy + half_h), fill=face)
    # Hair cap: the upper half of an ellipse whose lower edge (the hairline) stays above the raised brows.
    crown, hairline = cy - half_h - .04, cy - (.24 if hair_style == 2 else .2)
    draw.chord(box(cx - half_w - .02, crown, cx + half_w + .02, 2 * hairline - crown), 180, 360, fill=hair)
    eye_y, eye_dx = cy - .06, half_w * .45
    for side in (-1, 1):
        ex = cx + side * eye_dx
        rx, ry = .05, .032 * s.eye
        draw.ellipse(box(ex - rx, eye_y - ry, ex + rx, eye_y + ry), fill=(255, 255, 255), outline=(40, 30, 30))
        r = min(.022, ry * .9)
        draw.ellipse(box(ex - r, eye_y - r, ex + r, eye_y + r), fill=eyes)
        draw.ellipse(box(ex - r / 2.5, eye_y - r / 2.5, ex + r / 2.5, eye_y + r / 2.5), fill=(10, 10, 10))
        # Brow: the inner end moves by +tilt, the outer by -tilt; `asym` lifts the left brow alone (contempt).
        by = eye_y - .075 - s.lift - (s.asym if side < 0 else 0)
        inner, outer = ex - side * .055, ex + side * .06
        line([(inner, by + s.tilt), (outer, by - s.tilt)], hair, .016)
        if s.blush:
            draw.ellipse(box(ex - .05, eye_y + .07, ex + .05, eye_y + .12), fill=_mix(face, (240, 90, 110), .45))
        if s.tear and side > 0:
            draw.ellipse(box(ex - .012, eye_y + .05, ex + .012, eye_y + .09), fill=(80, 150, 255))
    line(_curve(cx, cx + .02, cy - .02, cy + .07, 0), _mix(face, (0, 0, 0), .35), .008)          # nose
    if s.wrinkle:
        for dy in (-.05, -.035):
            line([(cx - .025, cy + dy), (cx + .025, cy + dy + .005)], _mix(face, (0, 0, 0), .4), .006)
    # Mouth: corners at mouth_y (the left one raised by `skew`), the middle `curve` lower (> 0 smiles).
    mouth_y, w = cy + .17, s.width / 2
    upper = _curve(cx - w, cx + w, mouth_y - s.skew, mouth_y, s.curve - s.open / 2)
    if s.open:
        lower = _curve(cx + w, cx - w, mouth_y, mouth_y - s.skew, s.curve + s.open / 2)
        draw.polygon([(x * size, y * size) for x, y in upper + lower], fill=(120, 20, 30), outline=(90, 10, 20))
    else:
        line(upper, (150, 40, 50), .014)
    return image


def _clip(face, n_frames, size):
    """n frames of a gentle nod whose middle frame (index n // 2) is `face` itself."""
    mid, step = n_frames // 2, max(1, size // 128)
    frames = []
    for i in range(n_frames):
        frame = Image.new('RGB', face.size, face.getpixel((0, 0)))
        frame.paste(face, (0, (i - mid) * step))
        frames.append(frame)
    return frames


def _turn_emotion(rng, k, previous):
    """(written word, underlying fine emotion, coarse class) of turn k; later turns may repeat, use synonyms or
    words the reader does not know."""
    if k > 0 and rng.random() < P_UNKNOWN_WORD:
        word = rng.choice(sorted(UNKNOWN_WORDS))
        return word, previous, UNKNOWN_WORDS[word]
    if k > 0 and rng.random() < P_SAME_EMOTION:
        fine = previous
    else:
        # Classes are drawn uniformly, not by size, so that the 1-emotion classes are not vanishingly rare.
        coarse = rng.choice(COARSE_7)
        fine = rng.choice([f for f in EMOTIONS_32 if FINE_TO_COARSE[f] == coarse])
    synonyms = sorted(w for w, f in FREE_FORM_TO_FINE.items() if f == fine)
    word = rng.choice(synonyms) if k > 0 and synonyms and rng.random() < P_FREE_FORM else fine
    return word, fine, FINE_TO_COARSE[fine]


def make_dialogue(cid, rng, listeners=()):
    """One dialogue dict in the AvaMERG schema, plus (stem, avatar ID, expression) of each utterance's face.

    `listeners`: avatar IDs the listener is drawn from (default: any avatar, as in AvaMERG).
    """
    speaker_id, listener_id = rng.sample(range(1, MAX_AVATAR_ID + 1), 2)
    if listeners:
        listener_id = rng.choice(listeners)
    profiles = [{'age': rng.choice(AGES), 'gender': rng.choice(GENDERS), 'timbre': rng.choice(TIMBRES), 'ID': i}
                for i in (speaker_id, listener_id)]
    history, turns, faces, fine = [], [], [], None
    for k in range(rng.randint(2, MAX_TURNS)):
        word, fine, coarse = _turn_emotion(rng, k, fine)
        reaction = RESPONSE_EXPRESSION[coarse]
        event = rng.choice(EVENTS[coarse]).format(person=rng.choice(PERSONS))
        utterance = rng.choice(SPEAKER_TEMPLATES[coarse]).format(event=event)
        response = f'{rng.choice(RESPONSES[reaction])} {rng.choice(CLOSINGS[reaction])}'.strip()
        history.append({'index': 2 * k, 'role': 'speaker', 'utterance': utterance})
        turns.append({'turn_id': str(k), 'context': history[0]['utterance'], 'dialogue_history': list(history),
                      'response': response,
                      'chain_of_empathy': {'speaker_emotion': word, 'event_scenario': f'The speaker says {event}.',
                                           'emotion_cause': f'The speaker feels {word} because {event}.',
                                           'goal_to_response': GOALS[reaction]}})
        history.append({'index': 2 * k + 1, 'role': 'listener', 'utterance': response})
        faces += [(media_stem(cid, 2 * k, speaker_id), speaker_id, coarse),
                  (media_stem(cid, 2 * k + 1, listener_id), listener_id, reaction)]
    dialogue = {'conversation_id': cid, 'speaker_profile': profiles[0], 'listener_profile': profiles[1],
                'topic': rng.choice(TOPICS), 'turns': turns}
    return dialogue, faces


def _strip_gold(dialogue):
    """A copy of a dialogue without its gold: no response and no chain_of_empathy in any turn."""
    turns = [{k: v for k, v in turn.items() if k not in ('response', 'chain_of_empathy')} for turn in dialogue['turns']]
    return {**dialogue, 'turns': turns}


def _write_json(path, obj):
    """Write a JSON document (indented) to path, creating its folder."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, 'w', encoding='utf-8') as f:
        json.dump(obj, f, indent=2)


def write_split(out, ids, seed, split, frames_dir, videos_dir, size=256, listeners=(), written=None):
    """Draw one split's dialogues and write their faces as frames_dir/<stem>.png and/or videos_dir/<stem>.mp4.

    Folders are relative to `out`; None writes no such files. `written` (a set of paths) catches a stem that two
    splits would write into one shared folder. Returns the dialogues (the caller writes the JSON).
    """
    folders = {kind: os.path.join(out, d) for kind, d in (('frames', frames_dir), ('videos', videos_dir)) if d}
    for folder in folders.values():
        os.makedirs(folder, exist_ok=True)
    written = set() if written is None else written
    dialogues = []
    for position, cid in enumerate(tqdm(ids, desc=f'synthetic {split}', unit='dialogue', dynamic_ncols=True)):
        # One generator per dialogue (seeded by a string, which Python hashes stably) keeps files reproducible.
        rng = random.Random(f'{seed}/{split}/{position}')
        dialogue, faces = make_dialogue(cid, rng, listeners)
        dialogues.append(dialogue)
        for stem, avatar_id, expression in faces:
            # Draw the clip length even without videos so that the faces do not depend on the flags.
            face, n_frames = render_face(avatar_id, expression, size, rng), rng.randint(*CLIP_FRAMES)
            paths = {kind: os.path.join(folder, stem + ('.png' if kind == 'frames' else '.mp4'))
                     for kind, folder in folders.items()}
            if written & set(paths.values()):
                raise ValueError(f'{split} stem {stem} is already written into a folder it shares with another '
                                 'split; use another layout or other conversation ids')
            written |= set(paths.values())
            if 'frames' in paths:
                # Fast deflate: these flat drawings compress well anyway and the generator stays quick.
                face.save(paths['frames'], compress_level=1)
            if 'videos' in paths:
                write_clip(paths['videos'], _clip(face, n_frames, size), FPS)
    return dialogues


def make_dataset(out, seed, dialogues, test_dialogues=0, frames=True, videos=False, size=256, listeners=(),
                 layout='flat', test_gold='inline', test_ids='restart'):
    """Write train.json and test/test.json with faces in one of LAYOUTS into `out`; returns the dialogues (with gold).

    `listeners` restricts the listener to these avatar IDs (the demo's one empathetic agent); speakers vary.
    `test_gold`: 'inline' (test.json has the gold), 'none' (test.json without responses and chain_of_empathy) or
    'separate' (that, plus the gold in GOLD_FILE). `test_ids`: 'restart' (00001, 00002, ... as in the release) or
    'train' (the first train IDs again, so that every test ID is also a train ID).
    """
    if layout not in LAYOUTS:
        raise ValueError(f'layout={layout!r}; choose one of {tuple(LAYOUTS)}')
    if test_gold not in TEST_GOLD:
        raise ValueError(f'test_gold={test_gold!r}; choose one of {TEST_GOLD}')
    if test_ids not in TEST_IDS:
        raise ValueError(f'test_ids={test_ids!r}; choose one of {TEST_IDS}')
    if videos and not all(d['videos'] for d in LAYOUTS[layout].values()):
        raise ValueError(f'layout {layout!r} holds frames only; pass videos=False')
    dirs = {split: (d['frames'] if frames else None, d['videos'] if videos else None)
            for split, d in LAYOUTS[layout].items()}
    # Train IDs are scattered 5-digit strings like the release's; test IDs count up from 00001 as in the release.
    train_ids = [f'{i:05d}' for i in random.Random(f'{seed}/ids').sample(range(1, 10 ** 5), dialogues)]
    if test_ids == 'train' and test_dialogues > dialogues:
        raise ValueError(f"test_ids='train' needs test_dialogues <= dialogues, got {test_dialogues} > {dialogues}")
    test_ids = train_ids[:test_dialogues] if test_ids == 'train' else [f'{i:05d}' for i in
                                                                         range(1, test_dialogues + 1)]
    written = set()
    splits = {split: write_split(out, ids, seed, split, *dirs[split], size, listeners, written)
              for split, ids in (('train', train_ids), ('test', test_ids))}
    _write_json(os.path.join(out, 'train.json'), splits['train'])
    test = splits['test'] if test_gold == 'inline' else [_strip_gold(d) for d in splits['test']]
    _write_json(os.path.join(out, 'test', 'test.json'), test)
    if test_gold == 'separate':
        _write_json(os.path.join(out, GOLD_FILE), splits['test'])
    return splits
