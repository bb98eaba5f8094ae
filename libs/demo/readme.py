"""The README's demo results table, rendered from a demo run's metrics.json (``scripts/demo.py --readme_table``).

The table in README.md lies between two marker lines and is only ever written by ``write_block``, so the numbers
a reader sees are those of the committed report (assets/demo/) and a test checks that they still are.
"""
import json
import os
import re
from typing import Optional, Sequence

from libs.errors import UserError
from libs.io import atomic_write_bytes

START, END = '<!-- demo-table:start -->', '<!-- demo-table:end -->'
COLUMNS = ('held-out pairs', 'fine-tuned (EMA)', 'speaker turns shuffled', 'pre-trained (step 0)', 'chance (majority)')
# (label, metrics.json 'learning' key): the network against its controls and the majority class.
LEARNING_ROWS = (
    ('speaker emotion, 7 classes', 'emotion_coarse_acc'),
    ('speaker emotion, 32 classes', 'emotion_fine_acc'),
    ('response utterance follows the prescribed reaction', 'text_agreement'),
    ('response BLEU-4 (sacreBLEU)', 'bleu4'),
    ('response face shows the prescribed expression', 'face_agreement'),
)
# (label, metrics.json 'modes' key): UniDiffuser's own modes, with no speaker, before and after the fine-tune.
MODE_ROWS = (
    ('t2i face shows its utterance\'s reaction (no speaker)', 't2i_agreement'),
    ('i2t utterance follows its face\'s reaction (no speaker)', 'i2t_agreement'),
)


def read_metrics(path: str) -> dict:
    """A demo run's metrics.json, or a UserError saying how to get one."""
    if not os.path.isfile(path):
        raise UserError(f'--readme_table={path}: no such file; a demo run writes <out>/metrics.json '
                        '(python scripts/demo.py --out out/demo), and assets/demo/ holds the committed one')
    with open(path, encoding='utf-8') as f:
        metrics = json.load(f)
    if 'learning' not in metrics or 'modes' not in metrics:
        raise UserError(f'--readme_table={path} is not the metrics.json of a demo run (no learning or modes)')
    return metrics


def cell(value: Optional[float]) -> str:
    """Shares with two decimals, scores above 1 (BLEU) with one; an empty cell for no value."""
    if value is None:
        return ''
    return f'{value:.1f}' if abs(value) > 1 else f'{value:.2f}'


def row(cells: Sequence[str]) -> str:
    """One markdown table row."""
    return '| ' + ' | '.join(cells) + ' |'


def render_table(metrics: dict, source: str) -> str:
    """The README block of the metrics.json at `source`: what was run, the table, and what synthetic data can and
    cannot show."""
    ev, learning, modes = metrics['evaluation'], metrics['learning'], metrics['modes']
    lines = [f'{metrics["schedule"].capitalize()} schedule, seed {metrics["seed"]}, one run; {ev["pairs"]} held-out '
             f'test pairs, {ev["sample_steps"]} DPM-Solver++ steps, speaker guidance {ev["guidance_scale"]:g} '
             f'(`python scripts/demo.py --readme_table={source}` renders this table):', '',
             row(COLUMNS), row(['---'] * len(COLUMNS))]
    for label, key in LEARNING_ROWS:
        r = learning[key]
        lines.append(row([label, *(cell(r.get(c)) for c in ('trained', 'shuffled', 'pretrained', 'majority'))]))
    uniform = cell(1 / len(metrics['instruments']['classes']))
    for label, key in MODE_ROWS:
        lines.append(row([label, cell(modes['finetuned'][key]), '', cell(modes['pretrained'][key]),
                          f'{uniform} (uniform)']))
    lines += ['', 'The faces and words of the synthetic speakers show their emotion by rule (libs/synthetic.py), so '
              'these numbers show that the pipeline learns what it is given, not how well a model reads real faces '
              'or answers real people: nothing here was trained at full size or evaluated on AvaMERG.']
    return '\n'.join(lines)


def with_block(text: str, table: str, where: str = 'README.md') -> str:
    """`text` with the lines between the START and END markers replaced by `table`."""
    pattern = re.compile(rf'(^{re.escape(START)}[ \t]*\n)(.*?)(^{re.escape(END)}[ \t]*$)', re.S | re.M)
    found = pattern.findall(text)
    if len(found) != 1:
        raise UserError(f'{where} must hold one {START} line and one {END} line after it (found {len(found)} such '
                        'blocks); put them where the demo table goes')
    return pattern.sub(lambda m: m[1] + table + '\n' + m[3], text)


def block(text: str) -> Optional[str]:
    """The table between the markers of `text`, or None when it has none."""
    match = re.search(rf'^{re.escape(START)}[ \t]*\n(.*?)\n?^{re.escape(END)}', text, re.S | re.M)
    return match[1] if match else None


def write_block(path: str, table: str) -> None:
    """Replace the block of the file at `path` (README.md) with `table`."""
    with open(path, encoding='utf-8') as f:
        text = f.read()
    atomic_write_bytes(path, with_block(text, table, path).encode('utf-8'))
