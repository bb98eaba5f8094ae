"""Reports: a run's report.md / metrics.json and figures, the sweep table, the baselines table and the paired
comparison of two runs, all from the same flat metric names."""
import os

from libs import figures, metrics
from libs.avamerg import COARSE_7, EMOTIONS_32, coarse_index
from libs.io import atomic_write_bytes, atomic_write_json, read_rgb

GRID_ROWS = 8  # pairs shown in grid.png
SWEEP = 'sweep'  # sweep.json, sweep.md, sweep.png and sweep_nfe.png beside the setting folders
BASELINES = 'baselines'  # baselines.json and baselines.md beside the model's report; baselines/<name>/ run folders
COMPARE = 'compare'  # compare.json and compare.md of eval_avamerg.py --compare
# The columns of the sweep table: (key in a sweep row, heading); SWEEP_FIGURE: the panels of the figures.
SWEEP_COLUMNS = (('fid', 'FID'), ('bleu1', 'BLEU-1'), ('bleu2', 'BLEU-2'), ('bleu3', 'BLEU-3'), ('bleu4', 'BLEU-4'),
                 ('sentence_bleu1', 'sent. BLEU-1'), ('sentence_bleu2', 'sent. BLEU-2'),
                 ('sentence_bleu3', 'sent. BLEU-3'), ('sentence_bleu4', 'sent. BLEU-4'), ('dist1', 'Dist-1'),
                 ('dist2', 'Dist-2'), ('fine_acc', 'emotion acc. 32'), ('coarse_acc', 'emotion acc. 7'),
                 ('seconds_per_pair', 's / pair'))
# The emotion head reads the speaker path only, so its numbers do not change over a sweep: they stay in the table.
SWEEP_FIGURE = ('fid', 'bleu4', 'sentence_bleu4', 'dist1', 'dist2', 'seconds_per_pair')
# Every flat metric name of a run, with its heading in the interval, baseline and comparison tables.
METRICS = (('fid', 'FID'), *((f'bleu{n}', f'BLEU-{n} (sacreBLEU corpus)') for n in range(1, 5)),
           *((f'sentence_bleu{n}', f'BLEU-{n} (sentence-averaged)') for n in range(1, 5)),
           ('dist1', 'Dist-1 (corpus)'), ('dist2', 'Dist-2 (corpus)'),
           ('dist1_per_response', 'Dist-1 (mean per response)'), ('dist2_per_response', 'Dist-2 (mean per response)'),
           ('fine_acc', 'emotion accuracy, 32-way'), ('fine_macro_f1', 'emotion macro-F1, 32-way'),
           ('coarse_acc', 'emotion accuracy, 7-way'), ('coarse_macro_f1', 'emotion macro-F1, 7-way'),
           ('expression_generated_vs_gold', 'face expression: generated = gold response'),
           ('expression_generated_vs_speaker', 'face expression: generated = speaker'),
           ('expression_gold_vs_speaker', 'face expression: gold response = speaker'))
BLEU_NOTE = ('BLEU-n: sacreBLEU corpus BLEU with max_ngram_order=n on the raw strings (BLEU-4 is the standard '
             'sacreBLEU score); sentence BLEU-n: the mean over pairs of nltk sentence_bleu (weights 1/n, method1 '
             'smoothing) on lower-cased nltk word tokens, the averaged BLEU of empathetic-dialogue papers')
NFE_NOTE = ('NFE: U-ViT forward passes per response (counted); each pass evaluates all guidance branches of the '
            'batch in one batched forward')
METRICS_DOC = 'docs/metrics.md'


def fmt(value, digits=4):
    """A number for reports: `digits` significant digits; None (not computed) as 'n/a'."""
    if value is None:
        return 'n/a'
    return str(value) if isinstance(value, int) else f'{value:.{digits}g}'


def fmt_interval(interval):
    """'[lo, hi]' of an interval, or '' if there is none."""
    return '' if not interval else f'[{fmt(interval[0])}, {fmt(interval[1])}]'


def flat(m):
    """A run's metrics dict -> {flat metric name: value} (the names of METRICS), leaving out what is None."""
    out = dict(fid=m['fid'], **{f'bleu{n}': m[f'bleu{n}'] for n in range(1, 5)},
               **{f'sentence_bleu{n}': (m['sentence_bleu'] or {}).get(f'bleu{n}') for n in range(1, 5)},
               **{k: m.get(k) for k in ('dist1', 'dist2', 'dist1_per_response', 'dist2_per_response')},
               **{k: m['emotion'][k] for k in ('fine_acc', 'fine_macro_f1', 'coarse_acc', 'coarse_macro_f1')},
               **{f'expression_{k}': v for k, v in (m.get('expression') or {}).items() if k != 'n'})
    return {k: v for k, v in out.items() if v is not None}


def guidance_text(summary):
    """The guidance rule and its scale(s), as the report states them."""
    if summary['speaker_guidance'] == 'two_scale':
        return f'two_scale, scale_text {fmt(summary["scale_text"])}, scale_face {fmt(summary["scale_face"])}'
    return f'{summary["speaker_guidance"]}, scale {fmt(summary["guidance_scale"])}'


def bootstrap_note(b):
    """One sentence saying how the intervals were made."""
    return (f'{round(100 * b["confidence"])}% percentile bootstrap intervals over pairs ({b["resamples"]} resamples, '
            f'seed {b["seed"]}); FID (over {b["fid_resamples"]} resampled pair sets) and corpus Dist-n are set '
            'statistics that a resample repeating pairs biases, so their intervals are shifted by the bootstrap\'s '
            'bias estimate')


def write_figures(out, source, records):
    """The 32- and 7-way confusion matrices (of the labelled pairs with a prediction) and grid.png of the first
    pairs (speaker | response | reference)."""
    predicted = [r for r in records if r['pred_label'] is not None]
    pred, gold = [r['pred_label'] for r in predicted], [r['gold_label'] for r in predicted]
    if any(g >= 0 for g in gold):
        for labels, p, g in ((EMOTIONS_32, pred, gold), (COARSE_7, [coarse_index(x) for x in pred],
                                                         [coarse_index(x) for x in gold])):
            matrix = metrics.confusion_matrix(p, g, len(labels))
            title = f'speaker emotion, {len(labels)}-way ({int(matrix.sum())} labelled pairs)'
            path = os.path.join(out, f'confusion_{len(labels)}.png')
            figures.to_png(figures.confusion(matrix, list(labels), title), path)
    from libs.pipeline import make_grid
    faces = [face for r in records[:GRID_ROWS] for face in (
        source.face(r['index'], 'speaker'), read_rgb(os.path.join(out, r['face'])), source.face(r['index'], 'response'))]
    make_grid(faces, nrow=3).save(os.path.join(out, 'grid.png'))


def interval_table(values, intervals, names=METRICS):
    """Markdown rows: metric | value | 95% interval, for the metrics that have a value."""
    lines = ['| metric | value | interval |', '|---|---|---|']
    lines += [f'| {title} | {fmt(values[k])} | {fmt_interval(intervals.get(k))} |' for k, title in names if k in values]
    return lines


def write_report(out, summary):
    """metrics.json and report.md, both stating the checkpoint, sampling settings, sample count, what was scored and
    every metric's bootstrap interval."""
    atomic_write_json(os.path.join(out, 'metrics.json'), summary)
    m, e, g = summary['metrics'], summary['metrics']['emotion'], summary['gold']
    sent = m['sentence_bleu'] or {}
    bleu = ' / '.join(fmt(m[f'bleu{n}']) for n in range(1, 5))
    x = m.get('expression')
    title = '# EmpathDiffuser on AvaMERG' + (f': baseline {summary["baseline"]}' if summary.get('baseline') else '')
    lines = [
        title, '',
        *([f'- responses: {summary["baseline_what"]}'] if summary.get('baseline') else []),
        f'- checkpoint: {summary["checkpoint"]}',
        f'- split: {summary["split"]} ({summary["source"]})',
        f'- samples: {summary["samples"]} pairs; {g["response"]} with a gold response, {g["label"]} with a gold '
        'label among the 32 emotions',
        f'- guidance: {guidance_text(summary)}',
        f'- sampler: {summary["sampler"]} ({summary["skip_type"]}), {summary["sample_steps"]} steps, NFE '
        f'{summary["nfe"]} with {summary["guidance_branches"]} guidance branches per forward ({NFE_NOTE})',
        f'- seconds per pair: {fmt(summary["seconds_per_pair"])} (generation: speaker encoding, sampling and decoding, '
        f'batches of {summary["run"]["batch_size"]} on {summary["run"]["device"]})',
        f'- seed: {summary["seed"]}; autocast: {summary["autocast"]}'
        + (f' (config.sample.precision={summary["precision"]})' if summary['precision'] else '')
        + f'; caption decoder: {summary["caption_decoder"]}',
        '', '## Metrics', '', f'Conventions: {METRICS_DOC}.', '',
        f'- FID: {fmt(m["fid"])} ({summary["fid_note"]})',
        f'- BLEU-1 / 2 / 3 / 4, sacreBLEU corpus BLEU (BLEU-n with max_ngram_order=n; `'
        f'{(m["sacrebleu"] or {}).get("signature", "n/a")}`), {m["bleu_pairs"]} pairs: {bleu}',
        f'- BLEU-1 / 2 / 3 / 4, sentence-averaged (nltk sentence_bleu, weights 1/n, method1 smoothing, lower-cased '
        f'nltk word tokens; the convention of empathetic-dialogue papers), {m["bleu_pairs"]} pairs: '
        + ' / '.join(fmt(sent.get(f'bleu{n}')) for n in range(1, 5)),
        f'- Dist-1 / Dist-2 (distinct n-grams of all {summary["samples"]} generated utterances x100, nltk word '
        f'tokens; the AvaMERG paper\'s text metric): {fmt(m["dist1"])} / {fmt(m["dist2"])}',
        *([f'- Dist-1 / Dist-2, mean per response: {fmt(m["dist1_per_response"])} / {fmt(m["dist2_per_response"])}']
          if 'dist1_per_response' in m else []),
        f'- emotion ({e["n"]} labelled pairs): 32-way accuracy {fmt(e["fine_acc"])}, macro-F1 '
        f'{fmt(e["fine_macro_f1"])}; 7-way accuracy {fmt(e["coarse_acc"])}, macro-F1 {fmt(e["coarse_macro_f1"])}']
    if x:
        lines.append(f'- face expression read by {summary["expression_classifier"]} ({x["n"]} pairs): the generated '
                     f'face shows the gold response face\'s expression in {fmt(x["generated_vs_gold"])} of pairs, the '
                     f'speaker\'s in {fmt(x["generated_vs_speaker"])}; the gold listener mirrors the speaker in '
                     f'{fmt(x["gold_vs_speaker"])}')
    lines += [f'- not computed: {k}: {why}' for k, why in summary['not_computed'].items() if k != 'fid']
    lines += ['', '## Intervals', '', bootstrap_note(summary['bootstrap']) + '.', '',
              *interval_table(flat(m), summary['intervals'])]
    atomic_write_bytes(os.path.join(out, 'report.md'), ('\n'.join(lines) + '\n').encode('utf-8'))


# ---------------------------------------------------------------- baselines ------------------------------------------
def write_baselines(out, model, baselines):
    """baselines.json and baselines.md: the model's row beside every baseline's, each value with its interval."""
    rows = [dict(name='model', what=f'EmpathDiffuser ({guidance_text(model)}, {model["sample_steps"]} steps)',
                 folder='.', metrics=flat(model['metrics']), intervals=model['intervals'])]
    rows += [dict(name=s['baseline'], what=s['baseline_what'], folder=f'{BASELINES}/{s["baseline"]}',
                  metrics=flat(s['metrics']), intervals=s['intervals']) for s in baselines]
    atomic_write_json(os.path.join(out, f'{BASELINES}.json'), dict(pairs=model['samples'], rows=rows,
                                                                   bootstrap=model['bootstrap']))
    names = [(k, title) for k, title in METRICS if any(k in r['metrics'] for r in rows)]
    cell = lambda r, k: f'{fmt(r["metrics"][k])} {fmt_interval(r["intervals"].get(k))}' if k in r['metrics'] \
        else 'n/a'  # noqa: E731
    lines = ['# EmpathDiffuser and its baselines on the same pairs', '',
             f'- {model["samples"]} pairs of {model["split"]} ({model["source"]}); checkpoint {model["checkpoint"]}',
             f'- {bootstrap_note(model["bootstrap"])}', f'- metric conventions: {METRICS_DOC}',
             *[f'- {r["name"]}: {r["what"]} ({r["folder"]}/)' for r in rows], '',
             '| metric | ' + ' | '.join(r['name'] for r in rows) + ' |', '|---|' + '---|' * len(rows),
             *[f'| {title} | ' + ' | '.join(cell(r, k) for r in rows) + ' |' for k, title in names]]
    atomic_write_bytes(os.path.join(out, f'{BASELINES}.md'), ('\n'.join(lines) + '\n').encode('utf-8'))
    return rows


# ---------------------------------------------------------------- paired comparison ----------------------------------
def write_compare(out, run_a, run_b, pairs, result, bootstrap):
    """compare.json and compare.md: each metric of run A and run B on the same pairs, B - A and its interval."""
    atomic_write_json(os.path.join(out, f'{COMPARE}.json'), dict(a=run_a, b=run_b, pairs=pairs, bootstrap=bootstrap,
                                                                metrics=result))
    lines = ['# Paired comparison of two evaluations on the same pairs', '', f'- A: {run_a}', f'- B: {run_b}',
             f'- {pairs} pairs; B - A with its {bootstrap_note(bootstrap)} (the same resampled pairs for both runs)',
             '- an interval that excludes 0 is a difference these pairs resolve', '',
             '| metric | A | B | B - A | interval |', '|---|---|---|---|---|']
    lines += [f'| {title} | {fmt(r["a"])} | {fmt(r["b"])} | {fmt(r["difference"])} | {fmt_interval(r["interval"])} |'
              for k, title in METRICS for r in [result.get(k)] if r is not None]
    atomic_write_bytes(os.path.join(out, f'{COMPARE}.md'), ('\n'.join(lines) + '\n').encode('utf-8'))


# ---------------------------------------------------------------- sweep ----------------------------------------------
def sweep_row(name, summary):
    """One row of the sweep table: the setting, its NFE and speed, and its metrics (None where not computed)."""
    m, e = summary['metrics'], summary['metrics']['emotion']
    scale = summary['guidance_scale']
    if scale is None:  # two_scale: its two scales, fixed over the sweep
        scale = f'{summary["scale_text"]:g}/{summary["scale_face"]:g}'
    return dict(setting=name, scale=scale, steps=summary['sample_steps'], nfe=summary['nfe'],
                seconds_per_pair=summary['seconds_per_pair'], fid=m['fid'],
                **{f'bleu{n}': m[f'bleu{n}'] for n in range(1, 5)},
                **{f'sentence_bleu{n}': (m['sentence_bleu'] or {}).get(f'bleu{n}') for n in range(1, 5)},
                dist1=m['dist1'], dist2=m['dist2'], **{k: e[k] for k in ('fine_acc', 'fine_macro_f1', 'coarse_acc',
                                                                         'coarse_macro_f1')})


def sweep_table(rows):
    """The sweep as a Markdown table (one row per setting, named by its folder)."""
    columns = (('setting', 'folder'), ('scale', 'scale'), ('steps', 'steps'), ('nfe', 'NFE')) + SWEEP_COLUMNS
    lines = ['| ' + ' | '.join(title for _, title in columns) + ' |', '|' + '---|' * len(columns)]
    lines += ['| ' + ' | '.join(r[k] if isinstance(r[k], str) else fmt(r[k]) for k, _ in columns) + ' |'
              for r in rows]
    return '\n'.join(lines)


def write_sweep(out, rows, summaries):
    """sweep.json (rows and shared settings), sweep.md (the table), sweep.png and sweep_nfe.png (the metrics against
    the guidance scale and against NFE)."""
    first = summaries[0]
    shared = {k: first[k] for k in ('checkpoint', 'split', 'source', 'samples', 'gold', 'speaker_guidance', 'sampler',
                                    'skip_type', 'seed', 'precision', 'autocast', 'caption_decoder', 'not_computed')}
    atomic_write_json(os.path.join(out, f'{SWEEP}.json'), dict(shared, notes=[BLEU_NOTE, NFE_NOTE], rows=rows))
    g = shared['gold']
    lines = ['# EmpathDiffuser on AvaMERG: guidance scale and steps sweep', '',
             f'- checkpoint: {first["checkpoint"]}', f'- split: {first["split"]} ({first["source"]})',
             f'- samples: {first["samples"]} pairs per setting; {g["response"]} with a gold response, {g["label"]} '
             'with a gold label among the 32 emotions',
             f'- guidance: {first["speaker_guidance"]}; sampler: {first["sampler"]} ({first["skip_type"]})',
             f'- seed: {first["seed"]}; autocast: {first["autocast"]}'
             + (f' (config.sample.precision={first["precision"]})' if first['precision'] else '')
             + f'; caption decoder: {first["caption_decoder"]}',
             *[f'- not computed: {k}: {why}' for k, why in first['not_computed'].items()],
             f'- {BLEU_NOTE}', f'- {NFE_NOTE}; s / pair: seconds of generation per pair (batches of '
             f'{first["run"]["batch_size"]} on {first["run"]["device"]})', '',
             sweep_table(rows), '', 'Each setting\'s folder holds its pairs, report.md (with every metric\'s '
             'interval), metrics.json and figures.']
    atomic_write_bytes(os.path.join(out, f'{SWEEP}.md'), ('\n'.join(lines) + '\n').encode('utf-8'))
    labels = dict(SWEEP_COLUMNS, scale='guidance scale', nfe='NFE')
    # Against the scale (a line per step count) and against NFE (a line per scale), where each has several values.
    plots = [(x, group, name) for x, group, name in (('scale', 'steps', SWEEP), ('nfe', 'scale', f'{SWEEP}_nfe'))
             if len({r[x] for r in rows}) > 1] or [('scale', 'steps', SWEEP)]
    for x, group, name in plots:
        figures.to_png(figures.sweep(rows, SWEEP_FIGURE, x=x, group=group, labels=labels),
                       os.path.join(out, f'{name}.png'))
