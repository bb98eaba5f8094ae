"""A blind A/B human-rating kit for two evaluation runs on the same pairs (docs/metrics.md, "Human rating").

`make_sheet` writes one self-contained HTML page (faces inlined as data URIs, no network) that shows, per pair, the
speaker turn (face and utterance) and the two responses side by side, left/right drawn per pair from a recorded seed,
and asks one question: which response is more empathetic and fitting (A, B or tie). The page saves the ratings as a
JSON download. The answer key (which side is which run) is written to a separate JSON beside the sheet and never
into the page. `score` reads ratings back through the key into run A's win rate with its exact 95% interval.
"""
import base64
import hashlib
import html
import io
import json
import os
import random

from libs.errors import UserError
from libs.io import atomic_write_bytes, atomic_write_json, read_rgb

RECORDS, SETTINGS = 'pairs.jsonl', 'settings.json'  # what eval_avamerg.py writes into a run folder
CHOICES = ('left', 'tie', 'right')
CONFIDENCE = 0.95
KEY_FORMAT = 'empath-rating-key/1'
RATINGS_FORMAT = 'empath-ratings/1'


# ---------------------------------------------------------------- reading runs --------------------------------------
def read_run(folder):
    """{pair_id: record} of an evaluation run folder's pairs.jsonl (a torn last line of a killed run is an error)."""
    path = os.path.join(folder, RECORDS)
    if not os.path.isfile(path):
        raise UserError(f'{folder}: no {RECORDS}; give the output folder of a finished eval_avamerg.py run')
    records = {}
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                raise UserError(f'{path}:{number}: not a JSON line; rerun the evaluation to finish and merge it') \
                    from None
            records[record['pair_id']] = record
    if not records:
        raise UserError(f'{path} holds no pairs')
    return records


def run_source(folder):
    """The data root a run read its speaker turns from (settings.json's `source`), or None."""
    path = os.path.join(folder, SETTINGS)
    if not os.path.isfile(path):
        return None
    with open(path, encoding='utf-8') as f:
        return json.load(f).get('source')


class SpeakerFaces:
    """Speaker faces by (split, stem) from the AvaMERG folder, centre-cropped to a square as the evaluation crops
    them (libs.autoencoder.center_crop_resize; PIL's ImageOps.fit here, which spares the page diffusers' import)."""

    def __init__(self, root):
        self.root, self.readers = root, {}

    def __call__(self, split, stem, resolution):
        from PIL import Image, ImageOps

        from libs import avamerg
        if split not in self.readers:
            self.readers[split] = avamerg.AvaMERG(self.root, split)
        return ImageOps.fit(self.readers[split].load_face(stem), (resolution, resolution), Image.LANCZOS)


def _data_uri(image):
    """A PIL image as a PNG data URI."""
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')


# ---------------------------------------------------------------- the sheet -----------------------------------------
def key_path(sheet_path):
    """Where the answer key of a sheet lives: beside it, '<sheet stem>_key.json'."""
    return os.path.splitext(sheet_path)[0] + '_key.json'


def common_pairs(run_a, run_b, records_a, records_b):
    """The pair ids of run A (in its order), after checking that run B holds the same pairs and speaker turns."""
    only_a, only_b = sorted(set(records_a) - set(records_b)), sorted(set(records_b) - set(records_a))
    if only_a or only_b:
        raise UserError(f'{run_a} and {run_b} are not on the same pairs ({len(only_a)} only in A, e.g. '
                        f'{(only_a or only_b)[0]!r}; {len(only_b)} only in B): evaluate both on one split and --limit')
    for pid, a in records_a.items():
        if a['speaker_text'] != records_b[pid]['speaker_text'] or a['speaker_stem'] != records_b[pid]['speaker_stem']:
            raise UserError(f'pair {pid} has another speaker turn in {run_b} than in {run_a}: the runs read '
                            'different data')
    return sorted(records_a, key=lambda pid: records_a[pid]['index'])


def make_sheet(run_a, run_b, out, seed=0, max_pairs=None, data_root=None):
    """Write the blind rating sheet `out` (HTML) and its answer key beside it; returns the key's dict."""
    records_a, records_b = read_run(run_a), read_run(run_b)
    pair_ids = common_pairs(run_a, run_b, records_a, records_b)
    root = data_root or run_source(run_a)
    if not root or not os.path.isdir(root):
        raise UserError(f'the speaker faces come from the AvaMERG folder the runs read ({root or "not recorded"} '
                        'is not a folder): pass --data_root')
    rng = random.Random(seed)
    # A random subset in a random order: raters tire, and a fixed order would tie fatigue to the data's order.
    pair_ids = rng.sample(pair_ids, min(max_pairs or len(pair_ids), len(pair_ids)))
    speaker_faces = SpeakerFaces(root)
    sheet_id = hashlib.sha256(json.dumps([seed, pair_ids, os.path.abspath(run_a), os.path.abspath(run_b)])
                              .encode()).hexdigest()[:16]
    key = dict(format=KEY_FORMAT, sheet_id=sheet_id, seed=seed, run_a=os.path.abspath(run_a),
               run_b=os.path.abspath(run_b), sheet=os.path.abspath(out), pairs={})
    items = []
    for pid in pair_ids:
        a, b = records_a[pid], records_b[pid]
        faces = {run: read_rgb(os.path.join(folder, rec['face']))
                 for run, folder, rec in (('A', run_a, a), ('B', run_b, b))}
        size = max(faces['A'].size[0], faces['B'].size[0])
        # One display size for both sides, so an image size cannot tell the runs apart.
        faces = {run: face.resize((size, size)) for run, face in faces.items()}
        texts = {'A': a['generated'], 'B': b['generated']}
        left = rng.choice('AB')
        right = 'B' if left == 'A' else 'A'
        layout = f'{rng.getrandbits(64):016x}'  # an opaque token of this pair's left/right mapping
        key['pairs'][pid] = dict(left=left, layout=layout)
        speaker = speaker_faces(a['split'], a['speaker_stem'], size)
        items.append(dict(pair_id=pid, layout=layout, speaker_face=_data_uri(speaker), speaker_text=a['speaker_text'],
                          left_face=_data_uri(faces[left]), left_text=texts[left],
                          right_face=_data_uri(faces[right]), right_text=texts[right]))
    atomic_write_bytes(out, render(sheet_id, items).encode('utf-8'))
    atomic_write_json(key_path(out), key)
    return key


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 1.5rem auto; padding: 0 1rem; color: #222; }
.pair { border: 1px solid #ccc; border-radius: 8px; padding: 1rem; margin: 1.2rem 0; }
.pair h2 { font-size: 1rem; margin: 0 0 .6rem; color: #555; }
.turn, .responses { display: flex; gap: 1rem; align-items: flex-start; }
.responses { margin-top: 1rem; }
.side { flex: 1; border: 1px solid #ddd; border-radius: 6px; padding: .6rem; margin: 0; }
.side figcaption { font-weight: bold; margin-bottom: .4rem; }
img { width: 12rem; height: 12rem; object-fit: cover; border-radius: 4px; background: #eee; }
.utterance { font-size: 1.05rem; margin: .4rem 0; }
fieldset { border: none; margin: .8rem 0 0; padding: 0; display: flex; gap: 1.5rem; }
.bar { position: sticky; bottom: 0; background: #fff; border-top: 1px solid #ccc; padding: .6rem 0; }
button { font-size: 1rem; padding: .4rem 1rem; }
"""

SCRIPT = """
const sheet = JSON.parse(document.getElementById('sheet').textContent);
const pairs = Array.from(document.querySelectorAll('section.pair'));
function collect() {
  const ratings = {};
  for (const p of pairs) {
    const c = p.querySelector('input:checked');
    if (c) ratings[p.dataset.pair] = {choice: c.value, layout: p.dataset.layout};
  }
  return {format: sheet.format, sheet_id: sheet.sheet_id, rater: document.getElementById('rater').value.trim(),
          saved_at: new Date().toISOString(), ratings: ratings};
}
// Answers and rater survive closing or reloading the page (kept in this browser under the sheet's id).
const store = 'empath-ratings-' + sheet.sheet_id;
function progress() {
  const state = collect();
  document.getElementById('progress').textContent =
    Object.keys(state.ratings).length + ' of ' + pairs.length + ' rated';
  try { localStorage.setItem(store, JSON.stringify(state)); } catch (e) { /* storage off: nothing to keep */ }
}
function restore() {
  let state = null;
  try { state = JSON.parse(localStorage.getItem(store)); } catch (e) { return; }
  if (!state) return;
  document.getElementById('rater').value = state.rater || '';
  for (const p of pairs) {
    const r = state.ratings[p.dataset.pair];
    const input = r && r.layout === p.dataset.layout && p.querySelector('input[value="' + r.choice + '"]');
    if (input) input.checked = true;
  }
}
document.addEventListener('change', progress);
document.getElementById('rater').addEventListener('input', progress);
document.getElementById('save').addEventListener('click', () => {
  const blob = new Blob([JSON.stringify(collect(), null, 1)], {type: 'application/json'});
  const link = document.createElement('a');
  link.href = URL.createObjectURL(blob);
  link.download = 'ratings-' + sheet.sheet_id + '.json';
  document.body.appendChild(link);
  link.click();
  link.remove();
});
restore();
progress();
"""


def render(sheet_id, items):
    """The sheet's HTML: one section per pair, the save bar, the page's data and script, all inline."""
    e = html.escape
    sections = []
    for n, item in enumerate(items, 1):
        name = f'choice-{n}'
        options = ''.join(f'<label><input type="radio" name="{name}" value="{value}"> {label}</label>'
                          for value, label in (('left', 'A is better'), ('tie', 'Tie'), ('right', 'B is better')))
        sections.append(f"""
<section class="pair" data-pair="{e(item['pair_id'])}" data-layout="{item['layout']}">
 <h2>Pair {n} of {len(items)}</h2>
 <div class="turn"><img alt="speaker face" src="{item['speaker_face']}">
  <div><b>Speaker</b><p class="utterance">{e(item['speaker_text'])}</p></div></div>
 <div class="responses">
  <figure class="side"><figcaption>Response A</figcaption><img alt="response A face" src="{item['left_face']}">
   <p class="utterance">{e(item['left_text'])}</p></figure>
  <figure class="side"><figcaption>Response B</figcaption><img alt="response B face" src="{item['right_face']}">
   <p class="utterance">{e(item['right_text'])}</p></figure>
 </div>
 <fieldset><legend>Which response (face and words) is more empathetic and fitting for this speaker?</legend>
  {options}</fieldset>
</section>""")
    data = json.dumps(dict(format=RATINGS_FORMAT, sheet_id=sheet_id)).replace('</', '<\\/')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>Rating sheet {sheet_id}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>
<body>
<h1>Which response is more empathetic and fitting?</h1>
<p>Each pair shows a speaker (face and words) and two listener responses, A and B, in random order. Read the
speaker, look at both responses, and choose the one whose face and words answer the speaker with more empathy and
fit the situation better; choose Tie if neither is better. Leave a pair unanswered if you cannot judge it. When you
are done, press <b>Save ratings</b> and send the downloaded JSON file back.</p>
<p><label>Your name or code: <input id="rater" autocomplete="off"></label></p>
{''.join(sections)}
<div class="bar"><button id="save" type="button">Save ratings</button> <span id="progress"></span></div>
<script type="application/json" id="sheet">{data}</script>
<script>{SCRIPT}</script>
</body></html>
"""


# ---------------------------------------------------------------- scoring -------------------------------------------
def _read_json(path, what):
    """A JSON file, or a UserError naming it."""
    try:
        with open(path, encoding='utf-8') as f:
            return json.load(f)
    except OSError as e:
        raise UserError(f'{what} {path}: {e.strerror}') from None
    except json.JSONDecodeError as e:
        raise UserError(f'{what} {path} is not JSON ({e})') from None


def score(ratings_paths, key_file):
    """Run A's win rate over run B from one or more ratings files, with its exact (Clopper-Pearson) 95% interval.

    Every judgement counts once (several raters of one pair count several times; the interval treats them as
    independent). The win rate is over decisive judgements, A / (A + B); ties are counted and stated beside it.
    """
    from scipy.stats import binomtest
    key = _read_json(key_file, 'answer key')
    if key.get('format') != KEY_FORMAT:
        raise UserError(f'{key_file} is not a rating-sheet answer key (format {key.get("format")!r})')
    wins, raters = {'A': 0, 'B': 0, 'tie': 0}, []
    for path in ratings_paths:
        ratings = _read_json(path, 'ratings')
        if not isinstance(ratings, dict) or not isinstance(ratings.get('ratings'), dict):
            raise UserError(f'{path} is not a ratings file saved by a rating sheet (no "ratings" object)')
        if ratings.get('sheet_id') != key['sheet_id']:
            raise UserError(f'{path} rates sheet {ratings.get("sheet_id")!r}, but {key_file} is the key of sheet '
                            f'{key["sheet_id"]!r}: give the key saved beside that sheet')
        raters.append(dict(file=os.path.abspath(path), rater=ratings.get('rater', ''),
                           judgements=len(ratings['ratings'])))
        for pid, rating in ratings['ratings'].items():
            truth = key['pairs'].get(pid)
            if truth is None or not isinstance(rating, dict) or rating.get('layout') != truth['layout']:
                raise UserError(f'{path}: pair {pid!r} is not on the sheet of {key_file} as rated; the ratings file '
                                'was edited or comes from another sheet')
            if rating.get('choice') not in CHOICES:
                raise UserError(f'{path}: pair {pid!r} has choice {rating.get("choice")!r}; expected one of {CHOICES}')
            choice = rating['choice']
            wins['tie' if choice == 'tie' else truth['left'] if choice == 'left' else
                 'B' if truth['left'] == 'A' else 'A'] += 1
    decisive = wins['A'] + wins['B']
    result = dict(run_a=key['run_a'], run_b=key['run_b'], sheet_id=key['sheet_id'], pairs_on_sheet=len(key['pairs']),
                  raters=raters, judgements=decisive + wins['tie'], wins_a=wins['A'], wins_b=wins['B'],
                  ties=wins['tie'], win_rate_a=None, ci95=None, p_value=None,
                  convention=f'win rate of A = A / (A + B) over decisive judgements, ties excluded and counted; '
                             f'{CONFIDENCE:.0%} Clopper-Pearson interval and two-sided binomial test against 0.5 '
                             '(scipy.stats.binomtest); judgements treated as independent')
    if decisive:
        test = binomtest(wins['A'], decisive, 0.5)
        ci = test.proportion_ci(confidence_level=CONFIDENCE, method='exact')
        result.update(win_rate_a=wins['A'] / decisive, ci95=[float(ci.low), float(ci.high)],
                      p_value=float(test.pvalue))
    return result


def score_markdown(result):
    """The score as a short markdown block."""
    lines = [f'A = {result["run_a"]}', f'B = {result["run_b"]}', '',
             f'{result["judgements"]} judgements by {len(result["raters"])} rating file(s) on '
             f'{result["pairs_on_sheet"]} pairs: A better {result["wins_a"]}, B better {result["wins_b"]}, '
             f'tie {result["ties"]}.']
    if result['win_rate_a'] is None:
        lines.append('No decisive judgement: the win rate is not defined.')
    else:
        low, high = result['ci95']
        lines.append(f'Win rate of A over B (ties excluded): {result["win_rate_a"]:.3f} '
                     f'[{low:.3f}, {high:.3f}] ({CONFIDENCE:.0%} Clopper-Pearson), p = {result["p_value"]:.3g} '
                     '(two-sided binomial test against 0.5).')
    return '\n'.join(lines)

