"""The demo's report: metrics.json, one self-contained report.html (figures by libs.figures, embedded as PNG) and the
closing summary printed on the terminal.

Every number comes from a stage marker (``<out>/<stage>/stage_done``) or from files the stages wrote; nothing is
typed in. A trained number is bold only where it beats every control in its row. What this machine measured (wall
and CPU seconds, load, date) goes into timings.json and timings.html, so that a rerun with the same seed rewrites
metrics.json and report.html byte for byte (docs/demo_determinism.md).
"""
import base64
import html
import io
import json
import math
import os
import platform
import time
from typing import Dict, Sequence

from libs.demo.measure import CONTROLS, LEARNING, learning_numbers, read_jsonl
from libs.io import atomic_write_bytes, atomic_write_json, read_rgb

EXAMPLES = 10  # held-out pairs shown side by side
RESPONSE_GRID = 'responses.png'  # the response grid of the README (assets/demo_responses.png)
# The grid: held-out pairs, faces enlarged (with crisp pixels) and texts wrapped to a column width.
GRID = dict(pairs=5, face=96, text_width=300, font_size=13, pad=8)
COLUMNS = dict(trained='fine-tuned (EMA)', shuffled='speaker turns shuffled', pretrained='pre-trained (step 0)',
               online='online network', majority='majority class', uniform='uniform chance')


# ----------------------------------------------------------------------------------------------------------------
# The numbers (metrics.json)
# ----------------------------------------------------------------------------------------------------------------

def evaluations(markers: dict) -> Dict[str, dict]:
    """{'trained': ..., 'shuffled': ..., 'pretrained': ..., 'online': ...}: metrics and instrument readings."""
    sweep = markers['eval']['summary']
    default = next(r for r in sweep['rows'] if r['setting'] == sweep['default'])
    result = {'trained': dict(metrics=default['metrics'], reads=default['reads'])}
    for name in CONTROLS:
        s = markers[name]['summary']
        result[name] = dict(metrics=s['metrics'], reads=s['reads'])
    return result


def machine() -> dict:
    """What the timings were measured on."""
    return dict(cpu=platform.processor() or platform.machine(), cores=os.cpu_count(), python=platform.python_version(),
                date=time.strftime('%Y-%m-%d'))


# Sweep-row fields that measure this machine, not the network: timings.json holds them.
SWEEP_TIMINGS = ('seconds_per_pair',)


def timings(markers: dict) -> dict:
    """Everything timings.json holds: the machine, each stage's wall and CPU seconds and load, the sweep's speed."""
    stages = {name: dict(wall_s=m['seconds'], cpu_s=m.get('cpu_seconds'), load=m.get('load'), threads=m.get('threads'))
              for name, m in markers.items()}
    sweep = [dict(setting=r['setting'], **{k: r[k] for k in SWEEP_TIMINGS if k in r})
             for r in markers['eval']['summary']['rows']]
    return dict(machine=machine(), stages=stages, sweep=sweep,
                total=dict(wall_s=round(sum(s['wall_s'] for s in stages.values()), 1),
                           cpu_s=round(sum(s['cpu_s'] or 0 for s in stages.values()), 1)))


def summarize(out: str, config, markers: dict, schedule: str) -> dict:
    """Everything metrics.json holds: learning against controls, the starting point, sweep, t2i / i2t."""
    from libs.demo.measure import response_expressions
    sweep, pre = markers['eval']['summary'], markers['pretrain']['summary']['export']
    classifier, modes = markers['classifier']['summary'], markers['modes']['summary']
    return dict(
        schedule=schedule, seed=config.seed, threads=config.demo.threads,
        evaluation=dict(pairs=markers['shuffled']['summary']['settings']['samples'], setting=sweep['default'],
                        guidance_scale=config.sample.scale, sample_steps=config.sample.sample_steps,
                        speaker_guidance=config.sample.speaker_guidance),
        learning=learning_numbers(evaluations(markers), sweep['majority'], response_expressions()),
        # Paths relative to the output folder: the same run into another folder writes the same file.
        start=dict(init=markers['init']['summary']['difference'], after=markers['train']['summary']['difference'],
                   pretrained=dict(pre, path=os.path.relpath(pre['path'], out))),
        sweep=[{k: v for k, v in r.items() if k not in ('metrics', 'reads', *SWEEP_TIMINGS)} for r in sweep['rows']],
        modes={name: {k: v for k, v in modes[name].items() if k != 'examples'} for name in ('pretrained', 'finetuned')},
        instruments=dict(classes=classifier['classes'], heldout_rendered_acc=classifier['heldout_rendered_acc'],
                         reference_faces=classifier['reference_faces'],
                         codec_reconstructions=classifier['codec_reconstructions'],
                         reference_texts=classifier['reference_texts']),
        fid=dict(computed=False, why=FID_NOTE),
        baselines={k: markers['baselines']['summary'][k] for k in ('rows', 'bootstrap', 'expression_classifier')},
        caption_decoder={k: markers['caption_decoder']['summary'][k] for k in ('bleu_before', 'bleu_after')},
        codec={k: v for k, v in markers['codec']['summary'].items() if k != 'curve'})


FID_NOTE = ('FID was not computed: it is defined with one particular Inception-v3 network (the TorchScript file '
            'inception-2015-12-05.pt), which is not on this machine, and the demo downloads nothing. With that file '
            'in the torch hub cache or at config.eval.inception_path, eval_avamerg.py computes FID; on a few hundred '
            '32-pixel faces it would not say much anyway.')


# ----------------------------------------------------------------------------------------------------------------
# HTML pieces
# ----------------------------------------------------------------------------------------------------------------

STYLE = ('body{font-family:sans-serif;max-width:1200px;margin:2em auto;color:#222;line-height:1.4}'
         'table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;'
         'font-size:13px}th{background:#f3f3f3}.good{color:#1a7f37;font-weight:bold}.note{color:#555;font-size:13px}'
         'code{background:#f3f3f3;padding:1px 3px}pre{background:#f6f6f6;padding:8px;font-size:12px;'
         'white-space:pre-wrap;overflow-wrap:anywhere}img{max-width:100%}img.pixel{image-rendering:pixelated}td.num{text-align:right}')


def png_tag(data: bytes, width: int = None, title: str = '', pixelated: bool = False) -> str:
    """PNG bytes as an <img> with a base64 data URL."""
    src = base64.b64encode(data).decode('ascii')
    size = f' width="{width}"' if width else ''
    kind = ' class="pixel"' if pixelated else ''
    return f'<img src="data:image/png;base64,{src}"{size}{kind} title="{html.escape(title)}" alt="{html.escape(title)}">'


def image_tag(image, scale: int = 3, title: str = '') -> str:
    """A PIL image shown `scale` times larger with crisp pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format='PNG')
    return png_tag(buffer.getvalue(), image.width * scale, title, pixelated=True)


def file_tag(path: str, width: int = None, title: str = '') -> str:
    """A PNG file embedded as it is."""
    with open(path, 'rb') as f:
        return png_tag(f.read(), width, title)


def figure_tag(fig, title: str = '') -> str:
    """A matplotlib figure (libs.figures) embedded as PNG."""
    from libs.figures import to_png
    return png_tag(to_png(fig), title=title)


def table(header: Sequence[str], rows: Sequence[Sequence], numeric_from: int = None) -> str:
    """An HTML table; cells are inserted as given (escape text first); columns >= numeric_from align right."""
    head = ''.join(f'<th>{h}</th>' for h in header)
    cell = lambda j, c: f'<td class="num">{c}</td>' if numeric_from is not None and j >= numeric_from else \
        f'<td>{c}</td>'  # noqa: E731
    body = ''.join('<tr>' + ''.join(cell(j, c) for j, c in enumerate(row)) + '</tr>' for row in rows)
    return f'<table><tr>{head}</tr>{body}</table>'


def fmt(value, digits: int = 3) -> str:
    """A number for a table cell: 0 as 0, shares (up to 1) with `digits` decimals, larger scores (BLEU) with one."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return '&ndash;'
    if not isinstance(value, float):
        return str(value)
    if value == 0:
        return '0'
    if abs(value) > 1:
        return f'{value:.1f}'
    return f'{value:.{digits}f}' if abs(value) >= 10 ** -digits else f'{value:.1e}'


def html_page(title: str, sections: Sequence[tuple]) -> str:
    """A complete HTML document from (heading, html body) sections."""
    body = ''.join(f'<h2>{html.escape(h)}</h2>{b}' for h, b in sections)
    return (f'<!DOCTYPE html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f'<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>{body}</body></html>')


# ----------------------------------------------------------------------------------------------------------------
# Sections
# ----------------------------------------------------------------------------------------------------------------

def learning_section(summary: dict, out: str) -> str:
    """Trained vs controls vs chance, the instrument notes and the 7-way confusion matrix."""
    numbers, columns = summary['learning'], ('trained', *CONTROLS, 'majority', 'uniform')
    rows = []
    for key, label, _ in LEARNING:
        row = numbers[key]
        better = all(row['trained'] > row[c] for c in CONTROLS if row.get(c) is not None)
        cells = [f'<b>{fmt(row["trained"])}</b>' if better else fmt(row['trained'])]
        cells += [fmt(row.get(c)) for c in columns[1:]]
        rows.append((html.escape(label), *cells))
    ins, ev = summary['instruments'], summary['evaluation']
    notes = [
        f'{ev["pairs"]} held-out test pairs, {ev["sample_steps"]} DPM-Solver++ steps, guidance {ev["guidance_scale"]:g} '
        f'over the speaker turn ({ev["speaker_guidance"]}), seed {summary["seed"]}; one run (the spread over seeds '
        'is in the README). <b>Bold</b>: better than every control in its row.',
        '<b>Controls.</b> <i>Speaker turns shuffled</i>: the same fine-tuned network, every pair answered from the '
        'speaker turn of a pair in another conversation (same response noise): a network that ignores the speaker '
        'scores as well there as on the true turns. <i>Pre-trained (step 0)</i>: the fine-tune\'s starting point, the '
        'pre-trained UniDiffuser with zero gates (it ignores the speaker by construction) and an untrained emotion '
        'head. <i>Online network</i>: the un-averaged weights of the checkpoint whose EMA is exported.',
        '<b>Instruments.</b> The response face is read by an expression classifier trained only on drawn faces '
        f'({", ".join(ins["classes"])}); it reads the prescribed expression on {fmt(ins["reference_faces"])} of the '
        f'reference faces and on {fmt(ins["codec_reconstructions"])} of their codec reconstructions. The '
        'reconstructions show how much of the expression the tiny codec keeps when it encodes a drawn face; they are '
        'not a ceiling for generated faces, whose latents the U-ViT produces directly and which can decode to a '
        'clearer expression than a re-encoded drawing. The response utterance is read by naming the reaction whose '
        f'reply templates it is closest to; on the reference utterances that reads the prescribed one '
        f'{fmt(ins["reference_texts"])} of the time. Dist-n counts distinct words: templated replies are few, so a '
        'network that learned them scores lower there than one that produces word salad.',
        FID_NOTE,
    ]
    confusion = file_tag(os.path.join(out, 'eval', summary['evaluation']['setting'], 'confusion_7.png'), 420,
                         'speaker emotion, 7-way confusion of the fine-tuned network')
    return (table(('metric (held-out pairs)', *(COLUMNS[c] for c in columns)), rows, numeric_from=1)
            + ''.join(f'<p class="note">{n}</p>' for n in notes) + confusion)


def start_section(summary: dict) -> str:
    """The fine-tune's first step reproduces the pre-trained network; training then moves it."""
    start = summary['start']
    rows = [(label, fmt(d['speaker_max'], 3), fmt(d['no_speaker_max'], 3), d['pairs'])
            for label, d in (('fine-tune at step 0 (as train_empath.py builds it)', start['init']),
                             ('fine-tuned network (exported EMA)', start['after']))]
    pre = start['pretrained']
    return ('<p>The pre-trained U-ViT is saved as an official <code>uvit_v1.pth</code> (a plain torch state dict of '
            f'{pre["keys"]} tensors, {pre["params"]:,} parameters) and read back strictly into '
            f'<code>{pre["loads_strictly_into"]}</code> by <code>libs.uvit.load_nnet_weights</code>. The fine-tune '
            'loads it into EmpathDiffuser; its new parameters (speaker positions and segment, the per-head gate '
            'maps at zero, [EMO] token, emotion head) start from scratch. max |&Delta;&epsilon;| between the EmpathDiffuser and the '
            'pre-trained network on the same noisy responses of held-out (val) pairs:</p>'
            + table(('network', 'with the pairs\' real speaker turns', 'with no speaker', 'val pairs'), rows,
                    numeric_from=1)
            + '<p class="note">0 means bit-identical outputs: the fine-tune starts exactly from the pre-trained '
              'network, whatever the speaker. After fine-tuning the outputs differ, with the speaker and without '
              'it.</p>')


SWEEP_METRICS = ('coarse_acc', 'text_agreement', 'bleu4', 'face_agreement')
SWEEP_LABELS = dict(coarse_acc='emotion, 7-way', fine_acc='emotion, 32-way', text_agreement='utterance follows reaction',
                    face_agreement='face shows expression', bleu4='BLEU-4', bleu2='BLEU-2', dist2='Dist-2',
                    scale='guidance scale', steps='steps')


def sweep_section(summary: dict) -> str:
    """Every metric over guidance scales x step counts, as a figure and a table."""
    from libs.figures import sweep
    rows = summary['sweep']
    fig = sweep(rows, SWEEP_METRICS, x='scale', group='steps', labels=SWEEP_LABELS, ncols=4)
    keys = ('scale', 'steps', *SWEEP_METRICS, 'fine_acc', 'dist2')
    cells = [[fmt(r[k]) for k in keys] for r in rows]
    return (figure_tag(fig, 'sweep') + table([SWEEP_LABELS[k] for k in keys], cells, numeric_from=0)
            + '<p class="note">The emotion comes from the speaker path alone (computed once, before sampling), so '
              'it does not change with the guidance or the steps. Scale 0 is the conditional prediction without '
              'guidance.</p>')


def curves_section(markers: dict) -> str:
    """Training curves of every trained part, online vs EMA on validation."""
    from libs.figures import curve_panels
    pre, fine = markers['pretrain']['summary']['curve'], markers['train']['summary']['curve']
    train = lambda curve, k: [(r['step'], r.get(k)) for r in curve if 'loss' in r]  # noqa: E731
    val = lambda curve, k: [(r['step'], r.get(k)) for r in curve if f'val/ema/loss' in r]  # noqa: E731
    panels = [
        dict(series={k: train(pre, f'loss_{k}') for k in ('img', 'clip', 'text')}, log_y=True, ylabel='MSE',
             title='pre-training (joint objective): ε losses'),
        dict(series={k: train(fine, f'loss_{k}') for k in ('img', 'clip', 'text')}, log_y=True, ylabel='MSE',
             title='fine-tuning: ε losses'),
        dict(series={'online': val(fine, 'val/nnet/loss'), 'EMA': val(fine, 'val/ema/loss')}, ylabel='loss',
             title='fine-tuning: validation loss'),
        dict(series={'online 7-way': val(fine, 'val/nnet/emotion_coarse_acc'),
                     'EMA 7-way': val(fine, 'val/ema/emotion_coarse_acc'),
                     'online 32-way': val(fine, 'val/nnet/emotion_fine_acc'),
                     'EMA 32-way': val(fine, 'val/ema/emotion_fine_acc')}, ylabel='accuracy',
             title='fine-tuning: validation emotion accuracy'),
        dict(series={'online': val(pre, 'val/nnet/loss'), 'EMA': val(pre, 'val/ema/loss')}, ylabel='loss',
             title='pre-training: validation loss'),
        dict(series={'L1 per pixel': [(r['step'], r['l1']) for r in markers['codec']['summary']['curve']]},
             log_y=True, ylabel='L1', title='codec reconstruction'),
        dict(series={'LM loss': [(r['step'], r['loss']) for r in markers['caption_decoder']['summary']['loss_curve']]},
             ylabel='cross-entropy', title='caption decoder'),
        dict(series={'CE': [(r['step'], r['loss']) for r in markers['classifier']['summary']['curve']]},
             log_y=True, ylabel='cross-entropy', title='expression classifier (instrument)'),
    ]
    selected = markers['train']['summary']['selected']
    return (figure_tag(curve_panels(panels, ncols=4), 'training curves')
            + f'<p class="note">Exported: the EMA network of step {selected["step"]} ({selected["selected_by"]}). '
              'The EMA warms up as min(0.9999, (1 + s) / (10 + s)), so over a short run it averages about the last '
              'tenth of the steps.</p>')


def modes_section(summary: dict, markers: dict, out: str) -> str:
    """t2i and i2t of the pre-trained and the fine-tuned network (no speaker), numbers and a few examples."""
    m = summary['modes']
    chance = 1 / len(summary['instruments']['classes'])
    rows = [(label, *(fmt(m[n][k]) for n in ('pretrained', 'finetuned')), fmt(c))
            for label, k, c in (('t2i: face shows the reaction of its utterance', 't2i_agreement', chance),
                                ('i2t: utterance follows the reaction of its face', 'i2t_agreement', chance),
                                ('i2t: BLEU-4 against the face\'s own utterance', 'i2t_bleu4', None))]
    from libs.avamerg import AvaMERG
    examples = markers['modes']['summary']
    reader = AvaMERG(os.path.join(out, 'data'), 'test')
    cells = []
    for i in range(min(6, len(examples['pretrained']['examples']))):
        row = [html.escape(examples['pretrained']['examples'][i]['utterance'])]
        for name in ('pretrained', 'finetuned'):
            e = examples[name]['examples'][i]
            row.append(image_tag(read_rgb(os.path.join(out, 'modes', name, e['face'])), 3) + '<br>reads as '
                       + mark(e['face_reads'], e['prescribed']))
        row.append(image_tag(reader.load_face(examples['pretrained']['examples'][i]['face_stem']).resize((96, 96)), 1))
        for name in ('pretrained', 'finetuned'):
            e = examples[name]['examples'][i]
            row.append(html.escape(e['caption']) + '<br>reads as ' + mark(e['caption_reads'], e['prescribed']))
        cells.append(row)
    n = m['pretrained']
    return (f'<p>UniDiffuser\'s own modes on {n["samples"]} held-out listener utterances (t2i) and faces (i2t), '
            f'{n["steps"]} steps, guidance {n["scale"]:g}; the fine-tuned network runs them with no speaker, as '
            '<code>sample_multi.py --mode=t2i</code> does with an EmpathDiffuser checkpoint.</p>'
            + table(('', 'pre-trained', 'fine-tuned, no speaker', 'uniform chance'), rows, numeric_from=1)
            + table(('utterance (t2i input)', 't2i, pre-trained', 't2i, fine-tuned', 'face (i2t input)',
                     'i2t, pre-trained', 'i2t, fine-tuned'), cells) + LEGEND)


LEGEND = ('<p class="note"><span class="good">green</span>: the instrument reads the reaction the synthetic rule '
          'prescribes (for the speaker\'s emotion, or for the t2i utterance / i2t face); black: another one.</p>')


def mark(read: str, wanted: str) -> str:
    """An instrument reading, green when it is the prescribed one."""
    return f'<span class="good">{html.escape(read)}</span>' if read == wanted else html.escape(read)


def examples_section(config, markers: dict, out: str) -> str:
    """Speaker | fine-tuned | shuffled control | pre-trained | reference for the first held-out pairs."""
    from libs.avamerg import AvaMERG
    from libs.demo.measure import prescribed
    default = markers['eval']['summary']['default']
    folders = dict(trained=os.path.join(out, 'eval', default), shuffled=os.path.join(out, 'shuffled', 'eval'),
                   pretrained=os.path.join(out, 'pretrained'))
    records = {k: {r['index']: r for r in read_jsonl(os.path.join(f, 'pairs.jsonl'))} for k, f in folders.items()}
    reads = dict(trained=next(r for r in markers['eval']['summary']['rows'] if r['setting'] == default)['reads'],
                 shuffled=markers['shuffled']['summary']['reads'], pretrained=markers['pretrained']['summary']['reads'])
    reader = AvaMERG(config.data.root, 'test')
    face = lambda stem: image_tag(reader.load_face(stem).resize((96, 96)), 1)  # noqa: E731
    rows = []
    for i in sorted(records['trained'])[:EXAMPLES]:
        r = records['trained'][i]
        wanted = prescribed(r['gold_emotion'])
        cells = [f'{face(r["speaker_stem"])}<br>{html.escape(r["speaker_text"])}']
        for name in ('trained', 'shuffled', 'pretrained'):
            g, k = records[name][i], str(i)
            top = ', '.join(f'{e} {p:.2f}' for e, p in g['top3'][:2])
            answered = (f'<br><i>answering:</i> {html.escape(g["speaker_text"])}' if name == 'shuffled' else '')
            cells.append(f'{image_tag(read_rgb(os.path.join(folders[name], g["face"])), 3)}<br>'
                         f'{html.escape(g["generated"])}<br><i>utterance reads as</i> '
                         f'{mark(reads[name]["text_reads"][k], wanted)}, <i>face as</i> '
                         f'{mark(reads[name]["face_reads"][k], wanted)}<br><i>emotion:</i> {html.escape(top)}'
                         + answered)
        cells.append(f'{face(r["response_stem"])}<br>{html.escape(r["reference"])}<br><i>gold emotion:</i> '
                     f'{html.escape(r["gold_emotion"])}<br><i>prescribed reaction:</i> {wanted}')
        rows.append(cells)
    return (table(('speaker turn', COLUMNS['trained'], COLUMNS['shuffled'], COLUMNS['pretrained'], 'reference'), rows)
            + LEGEND)


def grid_records(markers: dict, out: str) -> list:
    """The fine-tuned network's answers to the first held-out pairs at the config's own setting (pairs.jsonl)."""
    default = markers['eval']['summary']['default']
    records = read_jsonl(os.path.join(out, 'eval', default, 'pairs.jsonl'))
    return [dict(r, face_path=os.path.join(out, 'eval', default, r['face']))
            for r in sorted(records, key=lambda r: r['index'])[:GRID['pairs']]]


def write_response_grid(config, markers: dict, out: str, path: str) -> None:
    """A PNG of held-out speaker turns (face, utterance) and the fine-tuned network's responses (face, utterance,
    the speaker emotion it read), one pair per row, with the gold emotion: what the model does, in one picture."""
    import textwrap

    from PIL import Image, ImageDraw, ImageFont

    from libs.avamerg import AvaMERG
    reader, g = AvaMERG(config.data.root, 'test'), GRID
    font = ImageFont.load_default(size=g['font_size'])  # Pillow's own font: the same glyphs on every machine
    chars = int(g['text_width'] / (0.55 * g['font_size']))  # about the average glyph width of the font
    columns = ('speaker face', 'speaker utterance', 'response face', 'response utterance (speaker emotion read)')
    widths = (g['face'], g['text_width'], g['face'], g['text_width'])
    row_h, head_h = g['face'] + 2 * g['pad'], g['font_size'] + 2 * g['pad']
    records = grid_records(markers, out)
    grid = Image.new('RGB', (sum(widths) + g['pad'] * (len(widths) + 1), head_h + row_h * len(records)), 'white')
    draw = ImageDraw.Draw(grid)
    xs = [g['pad'] + sum(widths[:i]) + g['pad'] * i for i in range(len(widths))]
    for x, label in zip(xs, columns):
        draw.text((x, g['pad']), label, fill=(90, 90, 90), font=font)
    for k, r in enumerate(records):
        y = head_h + k * row_h + g['pad']
        top = r['top3'][0]
        texts = (f'{r["speaker_text"]}\n(gold emotion: {r["gold_emotion"]})',
                 f'{r["generated"]}\n({top[0]} {top[1]:.2f})')
        for x, face in ((xs[0], reader.load_face(r['speaker_stem'])), (xs[2], read_rgb(r['face_path']))):
            grid.paste(face.resize((g['face'], g['face']), Image.NEAREST), (x, y))
        for x, text in zip((xs[1], xs[3]), texts):
            lines = [w for part in text.split('\n') for w in textwrap.wrap(part, chars)]
            draw.multiline_text((x, y), '\n'.join(lines), fill='black', font=font, spacing=3)
    buffer = io.BytesIO()
    grid.save(buffer, format='PNG', optimize=True)
    atomic_write_bytes(path, buffer.getvalue())


def baselines_section(markers: dict, out: str) -> str:
    """The fine-tuned network beside the evaluation's baselines, each number with its bootstrap interval, and what the
    independent (real-face) expression classifier reads on these drawn faces."""
    import collections

    from libs.evaluation.report import METRICS, bootstrap_note, fmt_interval
    b = markers['baselines']['summary']
    rows = b['rows']
    cell = lambda r, k: (f'{fmt(r["metrics"][k])}<br><span class="note">{fmt_interval(r["intervals"].get(k))}</span>'
                         if k in r['metrics'] else '&ndash;')  # noqa: E731
    body = table(('metric', *(html.escape(r['name']) for r in rows)),
                 [(title, *(cell(r, k) for r in rows)) for k, title in METRICS if any(k in r['metrics'] for r in rows)],
                 numeric_from=1)
    what = ''.join(f'<li><b>{html.escape(r["name"])}</b>: {html.escape(r["what"])}</li>' for r in rows)
    note = (f'<ul>{what}</ul><p class="note">{b["pairs"]} held-out pairs; {html.escape(bootstrap_note(b["bootstrap"]))}. '
            'The shuffled-speaker control is its own stage above.</p>')
    name = b['expression_classifier']
    if name:
        records = read_jsonl(os.path.join(out, 'baselines', 'pairs.jsonl'))
        reads = collections.Counter(r['expression']['gold'] for r in records)
        note += (f'<p class="note">The face-expression rows come from <code>{html.escape(name)}</code>, a classifier '
                 'trained on photographs of real faces, not on anything drawn here. On these 32-pixel drawings it '
                 'reads the gold listener faces as ' + ', '.join(f'{k} {v}' for k, v in reads.most_common())
                 + '. It can tell a drawn face that looks like another only as far as its real-face features respond '
                 'to the drawing (mouth and brow shapes); it cannot say whether the prescribed reaction is shown, '
                 'which the demo\'s own classifier (trained on the drawings) measures in the learning table.</p>')
    return body + note


def codec_section(out: str) -> str:
    """Held-out faces and their codec reconstructions, labelled."""
    rows = [(label, image_tag(read_rgb(os.path.join(out, 'codec', f'{name}.png')), 3, label))
            for name, label in (('originals', 'held-out test faces (32 px, shown 3x)'),
                                ('reconstructions', 'decode(encode(face)) through the tiny codec'))]
    return table(('', 'faces'), rows)


def count_params(path: str) -> int:
    """Number of parameters in a .safetensors or weights-only torch checkpoint."""
    import torch
    if path.endswith('.safetensors'):
        from safetensors import safe_open
        with safe_open(path, 'pt') as f:
            return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    return sum(v.numel() for v in torch.load(path, map_location='cpu', weights_only=True).values())


def components_rows(config, markers) -> list:
    """(part, what the demo uses, what the real model uses) rows, with sizes read from the written files."""
    def hf(folder):
        with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
            return json.load(f), count_params(os.path.join(folder, 'model.safetensors'))
    (text, n_text), (vision, n_vision) = hf(config.clip_text.name_or_path), hf(config.clip_img.name_or_path)
    cd, codec, caption = config.caption_decoder, markers['codec']['summary'], markers['caption_decoder']['summary']
    vae, nnet, train = config.autoencoder, config.nnet, config.train
    pre = markers['pretrain']['summary']['export']
    return [
        ('CLIP text encoder', f'transformers CLIPTextModel, {text["num_hidden_layers"]} layers of width '
         f'{text["hidden_size"]}, {text["max_position_embeddings"]} tokens, {n_text:,} parameters, <b>random weights'
         f'</b>; its BPE tokenizer ({text["vocab_size"]} tokens) was learned on the synthetic corpus',
         'OpenAI CLIP ViT-L/14 text encoder (123M parameters, 77 tokens, width 768)'),
        ('CLIP image encoder', f'transformers CLIPVisionModelWithProjection, {vision["num_hidden_layers"]} layers, '
         f'{vision["image_size"]}px input, {vision["projection_dim"]}-d embedding, {n_vision:,} parameters, '
         '<b>random weights</b>', 'OpenAI CLIP ViT-B/32 (88M parameters, 224px, 512-d)'),
        ('caption decoder', f'GPT-2 prefix decoder, {cd.gpt2.n_layer} layers of width {cd.gpt2.n_embd}, '
         f'{count_params(cd.pretrained_path):,} parameters, byte-level BPE learned on the corpus; random '
         f'initialisation fine-tuned here on {caption["train_utterances"]} utterances (held-out round-trip '
         f'BLEU-4 {caption["bleu_before"]["bleu4"]:.1f} &rarr; {caption["bleu_after"]["bleu4"]:.1f}); '
         'encode_prefix stays random (rescaled to unit feature std) and frozen',
         'GPT-2 base (124M) trained by UniDiffuser on image captions'),
        ('VAE', f'diffusers AutoencoderKL, channels {tuple(vae.block_out_channels)} '
         f'({2 ** (len(vae.block_out_channels) - 1)}x downsampling), '
         f'{vae.latent_channels} latent channels, {codec["params"]:,} parameters, trained here for '
         f'{config.demo.codec.steps} steps on {codec["faces"]} synthetic faces (held-out PSNR '
         f'{codec["heldout_psnr"]:.1f} dB); saved in the LDM layout and read by the real loader',
         'Stable Diffusion KL-f8 (84M parameters, 8x downsampling, 4 channels)'),
        ('UniDiffuser U-ViT', f'uvit_multi_post_ln_v1, depth {nnet.depth}, width {nnet.embed_dim}, '
         f'{pre["params"]:,} parameters, <b>pre-trained here</b> for {config.pretrain.n_steps} steps of '
         f'{train.batch_size} pairs (both roles\' face and utterance: UniDiffuser\'s joint objective), saved as '
         'an official uvit_v1.pth', 'UniDiffuser-v1 (952M parameters, depth 30, width 1536)'),
        ('EmpathDiffuser', f'the same U-ViT with the speaker segment, gates, [EMO] and emotion head '
         f'({count_params(markers["train"]["summary"]["nnet"]):,} parameters), <b>fine-tuned</b> from it for '
         f'{train.n_steps} steps of {train.batch_size} pairs with configs/avamerg_empath.py\'s recipe',
         'UniDiffuser-v1 fine-tuned on AvaMERG (20000 steps of 64 pairs)'),
        ('expression classifier', f'a 3-stage CNN trained on {config.demo.classifier.faces} faces drawn by '
         'libs.synthetic.render_face (accuracy on sharp held-out drawings '
         f'{markers["classifier"]["summary"]["heldout_rendered_acc"]:.3f}); a measuring instrument, not part of the '
         'model', 'none (AvaMERG has no expression labels)'),
    ]


def timings_section(times: dict) -> str:
    """Wall and CPU time of every stage and the load it ran under (timings.html)."""
    rows = [(name, fmt(s['wall_s'], 1), fmt(s['cpu_s'], 1),
             '&ndash;' if not s['load'] else f'{s["load"][0]:.1f} &rarr; {s["load"][1]:.1f}')
            for name, s in times['stages'].items()]
    rows.append(('<b>total</b>', fmt(times['total']['wall_s'], 1), fmt(times['total']['cpu_s'], 1), ''))
    mc = times['machine']
    return (table(('stage', 'wall s', 'CPU s', 'load average (start &rarr; end)'), rows, numeric_from=1)
            + f'<p class="note">{mc["cores"]} cores ({html.escape(mc["cpu"])}), Python {mc["python"]}, {mc["date"]}. '
              'CPU seconds count every thread of the process; on a machine shared with other jobs (load above the '
              'number of cores) the wall time is inflated and the CPU time is the better guide.</p>')


def commands_section(markers: dict) -> str:
    """The command lines that do what the stages did, by hand; the timings are one link away."""
    commands = [c for m in markers.values() for c in (m.get('summary') or {}).get('commands', [])]
    return ('<pre>' + html.escape('\n'.join(commands)) + '</pre><p class="note">How long each stage took on this '
            'machine: <a href="timings.html">timings.html</a> (kept apart, so that a rerun with the same seed '
            'rewrites this page byte for byte).</p>')


def write_report(out: str, config, markers: dict, schedule: str):
    """Write <out>/metrics.json, the self-contained <out>/report.html, the response grid and the timings apart;
    returns (metrics, timings)."""
    summary, times = summarize(out, config, markers, schedule), timings(markers)
    atomic_write_json(os.path.join(out, 'metrics.json'), summary)
    atomic_write_json(os.path.join(out, 'timings.json'), times)
    atomic_write_bytes(os.path.join(out, 'timings.html'), html_page(
        'EmpathDiffuser demo: timings', [('Stages', timings_section(times))]).encode('utf-8'))
    write_response_grid(config, markers, out, os.path.join(out, RESPONSE_GRID))
    sections = [
        ('What this is', '<p>The EmpathDiffuser workflow on a <b>synthetic</b> AvaMERG: a speaker face and utterance '
         'in, a listener face and utterance out, plus the speaker\'s emotion. In the synthetic data the speaker\'s '
         'face and words follow the speaker\'s emotion, and the listener reacts with a prescribed expression and a '
         'templated reply (libs/synthetic.py), so learning can be measured exactly. The listener is one avatar (ID '
         f'{", ".join(map(str, config.demo.listeners))}), as an empathetic agent would be; speakers are drawn from all '
         'avatars. As in the real workflow, a UniDiffuser is trained first (here: pre-trained on the synthetic faces '
         'and utterances, no speaker) and saved in the official layout, then fine-tuned into EmpathDiffuser with '
         'configs/avamerg_empath.py\'s recipe. Every component is small and local (list below): the numbers show '
         f'that the pipeline learns, not how good the real model is. Schedule: <b>{schedule}</b>, seed '
         f'{config.seed}.</p>'),
        ('Learning: the fine-tuned network against controls', learning_section(summary, out)),
        ('The fine-tune starts from the pre-trained network', start_section(summary)),
        ('Guidance scale x steps', sweep_section(summary)),
        ('Baselines and intervals (eval_avamerg.py --baselines)', baselines_section(markers, out)),
        ('UniDiffuser\'s t2i and i2t before and after fine-tuning', modes_section(summary, markers, out)),
        ('Examples (held-out pairs)', examples_section(config, markers, out)),
        ('Training curves (online vs EMA)', curves_section(markers)),
        ('Codec: held-out faces and their reconstructions', codec_section(out)),
        ('The small components (not the real ones)', table(('part', 'in this demo', 'in the real model'),
                                                            components_rows(config, markers))),
        ('The same by hand', commands_section(markers)),
    ]
    page = html_page('EmpathDiffuser demo on synthetic AvaMERG', sections)
    atomic_write_bytes(os.path.join(out, 'report.html'), page.encode('utf-8'))
    return summary, times


# ----------------------------------------------------------------------------------------------------------------
# The closing summary on the terminal
# ----------------------------------------------------------------------------------------------------------------

def minutes(seconds: float) -> str:
    """'5 min 40 s'."""
    whole = int(round(seconds))
    return f'{whole // 60} min {whole % 60} s'


def terminal_summary(summary: dict, times: dict, report_path: str) -> str:
    """A few readable lines: what was learned against the controls, the starting point, where the report is."""
    numbers, ev = summary['learning'], summary['evaluation']
    lines = [f'EmpathDiffuser demo ({summary["schedule"]} schedule, seed {summary["seed"]}): {ev["pairs"]} held-out '
             f'pairs, guidance {ev["guidance_scale"]:g}, {ev["sample_steps"]} steps', '',
             f'  {"":52}{"fine-tuned":>11}{"shuffled":>10}{"step 0":>9}{"chance":>9}']
    for key, label, _ in LEARNING:
        if key.startswith('dist'):
            continue
        row = numbers[key]
        chance = fmt(row.get('majority')) if row.get('majority') is not None else ''
        lines.append(f'  {label:52}{fmt(row["trained"]):>11}{fmt(row["shuffled"]):>10}{fmt(row["pretrained"]):>9}'
                     f'{chance:>9}')
    start, m = summary['start'], summary['modes']
    lines += ['', f'  fine-tune at step 0 vs the pre-trained UniDiffuser: max |Δε| {fmt(start["init"]["speaker_max"])} '
                  f'with speaker turns, {fmt(start["init"]["no_speaker_max"])} without',
              f'  t2i faces / i2t utterances showing the right reaction: pre-trained '
              f'{fmt(m["pretrained"]["t2i_agreement"])} / {fmt(m["pretrained"]["i2t_agreement"])}, fine-tuned '
              f'{fmt(m["finetuned"]["t2i_agreement"])} / {fmt(m["finetuned"]["i2t_agreement"])}',
              f'  time: {minutes(times["total"]["wall_s"])} ({minutes(times["total"]["cpu_s"])} of CPU)',
              f'  report: {report_path}']
    return '\n'.join(lines)
