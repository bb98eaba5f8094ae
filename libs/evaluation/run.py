"""One evaluation: load once, generate (or resume) every setting and baseline, score, bootstrap, report; and the
paired comparison of two finished runs."""
import dataclasses
import itertools
import json
import logging
import math
import os
import time

import numpy as np
import torch
from tqdm import tqdm

from libs import config_check, memory, metrics, precision, runlock
from libs.errors import UserError
from libs.evaluation import baselines as baseline_registry
from libs.evaluation import generate, report, score, uncertainty
from libs.io import atomic_write_json

logger = logging.getLogger(__name__)


def location(ref):
    """A weights reference as settings record it: an hf:// reference as written, a local path made absolute."""
    from libs.hub import HF_PREFIX
    return ref if ref.startswith(HF_PREFIX) else os.path.abspath(ref)


def single(values):
    """The one value of a collection of equal values, or all of them sorted if they differ."""
    values = sorted(set(values))
    return values[0] if len(values) == 1 else values


def bootstrap_settings(config):
    """How the intervals are drawn (config.eval): resamples, FID's resamples, seed and confidence level."""
    e = config.eval
    return dict(resamples=e.bootstrap_resamples, fid_resamples=min(e.fid_bootstrap_resamples, e.bootstrap_resamples),
                seed=e.bootstrap_seed, confidence=e.confidence, unit='pairs')


def intervals(stats, b):
    """{metric: [lo, hi]} of a run's pair statistics under bootstrap settings b."""
    return uncertainty.bootstrap(stats, b['resamples'], b['seed'], b['confidence'], b['fid_resamples'])


@dataclasses.dataclass
class Evaluation:
    """What every setting of a run shares: the processes, the networks, the speaker turns, the FID network, the
    expression classifier and the retrieval index."""
    acc: object
    comp: object
    source: object
    pairs: list
    inception: object
    inception_path: str
    nnet_path: str
    split: str
    batch_size: int
    expression: object = None
    retrieval: object = None


def prepare(config, output_path, nnet_path=None, split='test', features=None, limit=None, skip_fid=False,
            batch_size=8, allow_untrained_condition=False, baselines=()):
    """Lock output_path, load the networks and the split's speaker turns once for every setting (FID's network unless
    skip_fid); called inside a ``@runlock.scope`` function, which holds the lock until it returns."""
    from accelerate import Accelerator

    from libs import hub, pipeline
    config_check.check(config, 'model', 'sample')
    # A UniDiffuser network is refused first: the config of one need not have an eval section.
    what = f'evaluating {hub.nnet_ref(config, nnet_path)}'
    pipeline.check_speaker_network(what, config, nnet_path, fetched=False)  # before anything is fetched
    config_check.check(config, 'eval')
    if batch_size < 1 or (limit is not None and limit < 1):
        raise UserError(f'--batch_size={batch_size} and --limit={limit} must be at least 1')
    chosen = baseline_registry.get(list(baselines))
    if features:  # a cache of another split is refused before anything is loaded
        generate.check_feature_split(features, split)
    if any(b.name == 'retrieval' for b in chosen):
        baseline_registry.train_cache(config)
    hub.preflight(config, pipeline.needed_parts(need_text=features is None), nnet_path)
    acc = Accelerator()
    # CUDA: refuse what would not fit, planned with the network nnet_path rebuilds
    memory.check_evaluation(config, acc.device, batch_size, raw=features is None, nnet_path=nnet_path)
    inception_path = config.eval.inception_path or None
    # Before loading anything: FID needs the standard Inception network, or an explicit --skip_fid.
    inception = None if skip_fid else metrics.load_inception(inception_path).to(acc.device)
    expression = score.load_expression_classifier(config.eval.expression_classifier, acc.device)
    runlock.take(output_path, 'evaluation')
    comp = pipeline.load_components(config, acc.device, nnet_path, need_text=features is None, speaker_for=what)
    nnet_path = comp.nnet_path
    pipeline.check_condition_trained(comp.nnet, what, allow_untrained_condition)
    source = (generate.FeatureSource(comp, config, split, features) if features else
              generate.RawSource(comp, config, split))
    if source.reader is None:
        if inception is not None:
            where = (f'config.data.root={source.missing_root} does not exist' if source.missing_root else
                     'config.data.root is not set')
            raise UserError(f'FID compares the generated faces with the reference frames, and there are none ({where})'
                            ': set config.data.root to the AvaMERG folder, or pass --skip_fid')
        logger.info('no AvaMERG frames: grid.png shows the VAE reconstructions of the cached faces')
    pairs = source.pairs[:limit]
    if not pairs:
        raise UserError(f'{source.root}: the {split} split has no pairs')
    ev = Evaluation(acc, comp, source, pairs, inception, inception_path, nnet_path, split, batch_size, expression)
    if any(b.name == 'retrieval' for b in chosen):
        ev.retrieval = baseline_registry.TrainResponses(ev, config)
    return ev


def run_settings(ev, config, ctx, baseline=None):
    """What settings.json records and a resumed run must share: weights, data, sampling, seed, precision, decoder,
    and for a baseline its name."""
    guidance = dict(speaker_guidance=ctx.speaker_guidance, guidance_scale=None, scale_text=None, scale_face=None)
    if ctx.speaker_guidance == 'two_scale':
        guidance.update(scale_text=float(ctx.scale_text), scale_face=float(ctx.scale_face))
    else:
        guidance.update(guidance_scale=float(ctx.scale))
    settings = dict(checkpoint=location(ev.nnet_path), split=ev.split, source=os.path.abspath(ev.source.root),
                    caption_decoder=location(config.caption_decoder.pretrained_path), **guidance,
                    sample_steps=int(ctx.steps), sampler=config.sample.sampler, skip_type=config.sample.skip_type,
                    seed=config.seed, precision=config.sample.precision,  # the setting ('auto', ...)
                    autocast=precision.name_of(ctx.autocast_dtype))  # what ran
    return settings if baseline is None else dict(settings, baseline=baseline.name)


def evaluate_setting(ev, config, out, baseline=None):
    """Generate the missing responses of one sampling setting (config.sample) or baseline into `out`, then score
    every pair with bootstrap intervals. Returns metrics.json's dict on the main process, None on the others."""
    from libs import pipeline
    acc, started = ev.acc, time.time()
    comp = dataclasses.replace(ev.comp, config=config)  # the same networks, sampled with this setting's config
    base = pipeline.make_context(comp, None)
    source = ev.source if baseline is None else baseline.source(ev, config)
    pairs = source.pairs[:len(ev.pairs)]
    settings = run_settings(ev, config, base, baseline)
    os.makedirs(os.path.join(out, generate.FACES), exist_ok=True)
    generate.check_resumable(out, settings, generate.read_records(out), pairs)
    acc.wait_for_everyone()
    if acc.is_main_process:
        generate.remove_stale_temps(out)
        score.remove_fid_parts(out)
        atomic_write_json(os.path.join(out, generate.SETTINGS), settings)
        generate.merge_records(out, generate.read_records(out))  # drops torn lines before anyone appends again
    acc.wait_for_everyone()

    done = generate.read_records(out)
    batches = [list(range(s, min(s + ev.batch_size, len(pairs)))) for s in range(0, len(pairs), ev.batch_size)]
    mine = batches[acc.process_index::acc.num_processes]
    bar = tqdm(total=sum(len(b) for b in mine), initial=sum(i in done for b in mine for i in b), unit='pair',
               desc=f'eval {os.path.basename(os.path.normpath(out))}', dynamic_ncols=True,
               disable=not acc.is_main_process)
    if baseline is not None and baseline.respond is not None:
        def make_batch(todo):
            baseline.respond(ev, source, out, acc.process_index, todo)
    else:
        def make_batch(todo):
            tic = time.perf_counter()
            result = generate.generate_batch(comp, base, source, pairs, todo, config.seed)
            generate.write_batch(out, acc.process_index, pairs, todo, *result, time.perf_counter() - tic)
    generated = generate.generate_missing(out, mine, done, make_batch, bar.update)
    bar.close()
    acc.wait_for_everyone()

    records = generate.read_records(out)
    if ev.inception is not None:
        score.write_fid_features(ev.inception, source, out, records, mine, acc.device, acc.process_index)
    generated = int(acc.gather(torch.tensor([generated], device=acc.device)).sum())
    acc.wait_for_everyone()  # every process's feature file is written
    if not acc.is_main_process:
        return None
    return summarize(ev, config, out, source, records, settings, baseline, generated, started)


def summarize(ev, config, out, source, records, settings, baseline, generated, started):
    """Score the finished records of a run folder (main process): metrics, intervals, report and figures."""
    n = len(ev.pairs)
    features = score.merge_fid_features(out) if ev.inception is not None else None
    if ev.expression is not None:
        reads = score.read_expressions(ev.expression, source, out, {i: records[i] for i in range(n)}, ev.batch_size)
        for i, read in reads.items():
            records[i]['expression'] = read
    generate.merge_records(out, records)
    selected = [records[i] for i in range(n)]
    fid, note = None, '--skip_fid given: FID was not computed'
    if features is not None:
        fid = score.fid(features)
        note = f'{n} generated vs reference faces, Inception-v3 ({ev.inception_path or "torch.hub cache"})'
        if n <= metrics.INCEPTION_POOL_DIM:  # a rank-deficient covariance: FID is biased and unstable
            note += f'; unreliable with fewer samples than its {metrics.INCEPTION_POOL_DIM} feature dimensions'
    gold = score.gold_counts(selected)
    b = bootstrap_settings(config)
    expression_note = None if ev.expression is not None else \
        f'config.eval.expression_classifier={score.NO_CLASSIFIER}'
    summary = dict(settings, samples=n, nfe=single(r['nfe'] for r in selected),
                   guidance_branches=single(r['branches'] for r in selected),
                   seconds_per_pair=round(float(np.mean([r['seconds'] for r in selected])), 4), gold=gold,
                   fid_computed=fid is not None, fid_note=note,
                   not_computed=score.not_computed(gold, note, fid, selected, expression_note),
                   metrics=score.finite(dict(fid=fid, **score.score(selected))),
                   expression_classifier=None if ev.expression is None else ev.expression.name,
                   bootstrap=b, intervals=intervals(uncertainty.PairStatistics(selected, features, ev.acc.device), b),
                   run=dict(processes=ev.acc.num_processes, generated=generated, resumed=n - generated,
                            batch_size=ev.batch_size, seconds=round(time.time() - started, 1),
                            device=str(ev.acc.device)))
    if baseline is not None:
        summary.update(baseline=baseline.name, baseline_what=baseline.what)
    report.write_figures(out, source, selected)
    report.write_report(out, summary)
    return summary


@runlock.scope
def evaluate(config, nnet_path=None, split='test', features=None, limit=None, skip_fid=False, output_path='out/eval',
             batch_size=8, allow_untrained_condition=False, baselines=None):
    """Evaluate the sampling setting of config.sample into output_path, and each baseline (default:
    config.eval.baselines) into output_path/baselines/<name>/ with baselines.md / .json beside the report.

    Returns metrics.json's dict (with the baselines table's rows under 'baselines' if any ran); None off-main.
    """
    config_check.check(config, 'eval')
    names = list(config.eval.baselines if baselines is None else baselines)
    ev = prepare(config, output_path, nnet_path, split, features, limit, skip_fid, batch_size,
                 allow_untrained_condition, names)
    summary = evaluate_setting(ev, config, output_path)
    done = []
    for b in baseline_registry.get(names):
        done.append(evaluate_setting(ev, b.config(config), os.path.join(output_path, report.BASELINES, b.name), b))
    if summary is None or not names:
        return summary
    return dict(summary, baselines=report.write_baselines(output_path, summary, done))


def sweep_configs(config, scales=None, steps=None):
    """[(folder name, config)] of every (guidance scale, step count) of a sweep, scales outermost.

    A setting's config is `config` with sample.scale and sample.sample_steps replaced, so that it is evaluated exactly
    as a single run with those two flags would be. Missing lists keep the config's value.
    """
    rule = config.sample.speaker_guidance
    if scales and rule != 'no_speaker':
        raise UserError(f'--scales sweeps config.sample.scale, which speaker_guidance={rule!r} does not use; sweep '
                        '--config.sample.scale_text / scale_face in separate runs (--steps works with any rule)')
    if any(not math.isfinite(s) or s < 0 for s in scales or ()) or any(n < 1 for n in steps or ()):
        raise UserError(f'--scales={scales} must be finite and at least 0, --steps={steps} at least 1')
    settings = []
    for scale, n in itertools.product(scales or [config.sample.scale], steps or [config.sample.sample_steps]):
        setting = config.copy_and_resolve_references()
        setting.sample.scale, setting.sample.sample_steps = float(scale), int(n)
        settings.append((f'scale{scale:g}_steps{n}' if rule == 'no_speaker' else f'steps{n}', setting))
    names = [name for name, _ in settings]
    if len(set(names)) < len(names):
        raise UserError(f'--scales={scales} --steps={steps} repeat a setting; list each value once')
    return settings


@runlock.scope
def evaluate_sweep(config, scales=None, steps=None, nnet_path=None, split='test', features=None, limit=None,
                   skip_fid=False, output_path='out/eval', batch_size=8, allow_untrained_condition=False):
    """Evaluate every (scale, steps) setting into output_path/<setting>/, then write the sweep table and figure.

    Every setting is evaluated exactly as `evaluate` with that config.sample.scale and sample_steps (same pairs, same
    per-pair noise, resumable by itself). Returns the table's rows on the main process, None on the others.
    """
    settings = sweep_configs(config, scales, steps)  # checked before anything is loaded
    ev = prepare(config, output_path, nnet_path, split, features, limit, skip_fid, batch_size,
                 allow_untrained_condition)
    summaries = [evaluate_setting(ev, setting, os.path.join(output_path, name)) for name, setting in settings]
    if not ev.acc.is_main_process:
        return None
    rows = [report.sweep_row(name, summary) for (name, _), summary in zip(settings, summaries)]
    report.write_sweep(output_path, rows, summaries)
    return rows


# ---------------------------------------------------------------- paired comparison ----------------------------------
def read_run(folder):
    """(records in pair order, per-pair FID features or None, metrics.json) of a finished evaluation folder."""
    path = os.path.join(folder, 'metrics.json')
    if not os.path.isfile(path):
        raise UserError(f'{folder} is not a finished evaluation ({path} is missing): run eval_avamerg.py into it first')
    with open(path, encoding='utf-8') as f:
        summary = json.load(f)
    records = generate.read_records(folder)
    if sorted(records) != list(range(summary['samples'])):
        raise UserError(f'{folder}: {generate.RECORDS} holds {len(records)} pairs, metrics.json says '
                        f'{summary["samples"]}; rerun the evaluation there to finish it')
    return [records[i] for i in range(summary['samples'])], score.read_fid_features(folder), summary


@runlock.scope
def compare_runs(run_a, run_b, output_path, config=None):
    """The paired bootstrap of run B against run A on the same pairs: compare.md / compare.json in output_path.

    The resamples, seed and confidence come from config.eval if a config is given, else from run A's metrics.json.
    Returns {metric: {'a', 'b', 'difference', 'interval'}}.
    """
    (records_a, features_a, summary_a), (records_b, features_b, _) = read_run(run_a), read_run(run_b)
    ids_a, ids_b = [r['pair_id'] for r in records_a], [r['pair_id'] for r in records_b]
    if ids_a != ids_b:
        first = next((i for i, (x, y) in enumerate(zip(ids_a, ids_b)) if x != y), min(len(ids_a), len(ids_b)))
        raise UserError(f'{run_a} and {run_b} answered different pairs ({len(ids_a)} and {len(ids_b)} pairs; pair '
                        f'{first} is {ids_a[first] if first < len(ids_a) else "absent"} in A, '
                        f'{ids_b[first] if first < len(ids_b) else "absent"} in B): compare runs on the same split, '
                        'features and --limit')
    if config is not None:
        config_check.check(config, 'eval')
    b = bootstrap_settings(config) if config is not None else summary_a['bootstrap']
    if features_a is None or features_b is None:  # FID is compared only where both runs computed it
        features_a = features_b = None
    runlock.take(output_path, 'comparison')
    result = uncertainty.paired(uncertainty.PairStatistics(records_a, features_a),
                                uncertainty.PairStatistics(records_b, features_b), b['resamples'], b['seed'],
                                b['confidence'], b['fid_resamples'])
    report.write_compare(output_path, os.path.abspath(run_a), os.path.abspath(run_b), len(ids_a), result, b)
    return result
