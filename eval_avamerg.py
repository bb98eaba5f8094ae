"""Evaluate EmpathDiffuser on an AvaMERG split: every speaker turn -> an `empath` response (face + utterance) and a
predicted emotion, scored with FID, BLEU (sacreBLEU and sentence-averaged), Dist-1/2, emotion accuracy / macro-F1 and
the face expression read by an independent classifier, each with a 95% bootstrap interval over pairs (docs/design.md §5), for
one sampling setting or a sweep over guidance scales and step counts, beside baselines scored by the same code.

    python eval_avamerg.py --config=configs/avamerg_empath.py --nnet_path=workdir/avamerg_empath/nnet_ema.safetensors \
        --features=features/avamerg_512/test --output_path=out/eval
    python eval_avamerg.py --config=... --baselines=copy_speaker,retrieval,shuffled_speaker,no_guidance
    python eval_avamerg.py --config=... --scales=1,3,5,7 --steps=10,20,50 --output_path=out/sweep
    python eval_avamerg.py --compare=out/eval_a,out/eval_b --output_path=out/a_vs_b   # paired bootstrap, B - A
    accelerate launch --multi_gpu --num_processes 8 eval_avamerg.py --config=...   # same numbers, split 8 ways

The run folder (pairs.jsonl, faces/, fid_features.safetensors, metrics.json, report.md, figures, settings.json,
baselines/<name>/) and the resume, preemption and bootstrap rules are described in docs/evaluation.md; the code is
libs/evaluation/. A rerun in the same --output_path generates only the missing pairs; SIGTERM / SIGUSR1 stop between
batches with the finished pairs kept (exit 75). The output folder is locked while an evaluation runs in it; a network
whose speaker segment is untrained (e.g. an official UniDiffuser checkpoint) is refused unless
``--allow_untrained_condition`` is given.
"""
from absl import flags
from ml_collections import config_flags

from libs import cli, logs
from libs.errors import UserError

def define_flags():
    """Define the command-line flags (on demand, so importing this module defines none)."""
    config_flags.DEFINE_config_file('config', None, 'EmpathDiffuser config (e.g. configs/avamerg_empath.py)',
                                    lock_config=False)
    flags.DEFINE_string('nnet_path', None, 'U-ViT weights (.pth or .safetensors, or a train_empath.py '
                        'ckpts/<step>.ckpt folder); default: config.nnet_path')
    flags.DEFINE_enum('split', 'test', ['train', 'val', 'test'], 'AvaMERG split to evaluate')
    flags.DEFINE_string('features', None, 'feature cache of the split (extract_features.py); default: encode the '
                        'raw frames and texts under config.data.root')
    flags.DEFINE_integer('limit', None, 'evaluate only the first N pairs', lower_bound=1)
    flags.DEFINE_bool('skip_fid', False, 'do not compute FID (needed when no Inception-v3 weights are available)')
    flags.DEFINE_string('output_path', 'out/eval', 'output folder (a rerun resumes in it)')
    flags.DEFINE_integer('batch_size', 8, 'pairs per sampling batch and process (8 fits a 24 GB GPU in bf16: '
                         'docs/memory.md)', lower_bound=1)
    flags.DEFINE_list('scales', None, 'sweep these guidance scales (config.sample.scale), e.g. 1,3,5,7: one folder '
                      'per setting under --output_path, plus sweep.md / .json / .png / _nfe.png')
    flags.DEFINE_list('steps', None, 'sweep these step counts (config.sample.sample_steps), e.g. 10,20,50; with '
                      '--scales every combination')
    flags.DEFINE_bool('allow_untrained_condition', False, 'evaluate even though the network\'s speaker segment is '
                      'untrained (e.g. to score an untrained baseline: the speaker has no effect, emotions are random)')
    flags.DEFINE_list('baselines', None, 'also evaluate these baselines on the same pairs, each into '
                      '--output_path/baselines/<name>/, with baselines.md beside the report: copy_speaker, retrieval, '
                      'shuffled_speaker, no_guidance; default: config.eval.baselines')
    flags.DEFINE_list('compare', None, 'RUN_A,RUN_B: the paired bootstrap of two finished evaluations on the same '
                      'pairs (B - A and its interval per metric) into --output_path/compare.md and compare.json; '
                      'nothing is generated')
    logs.define_flags()


def parse_list(values, kind, name):
    """--scales / --steps strings -> numbers (None stays None); a bad value is a UserError naming the flag."""
    if values is None:
        return None
    try:
        return [kind(v) for v in values]
    except ValueError:
        raise UserError(f'--{name}={",".join(values)}: expected {kind.__name__} values separated by commas') from None


def main(argv):
    """Command-line entry point: bad input exits with code 2 and a message instead of a traceback."""
    del argv
    args = flags.FLAGS
    logs.setup(args.verbose)
    if args.compare is not None:
        if len(args.compare) != 2:
            raise UserError(f'--compare={",".join(args.compare)}: give two evaluation folders, RUN_A,RUN_B')
        from libs.evaluation import compare_runs, report
        compare_runs(*args.compare, args.output_path, args.config)
        print(f'-> {report.COMPARE}.md in {args.output_path}')
        return
    if args.config is None:
        raise UserError('--config is required, e.g. --config=configs/avamerg_empath.py')
    from libs.evaluation import evaluate, evaluate_sweep, report
    common = dict(nnet_path=args.nnet_path, split=args.split, features=args.features, limit=args.limit,
                  skip_fid=args.skip_fid, output_path=args.output_path, batch_size=args.batch_size,
                  allow_untrained_condition=args.allow_untrained_condition)
    scales, steps = parse_list(args.scales, float, 'scales'), parse_list(args.steps, int, 'steps')
    if scales or steps:
        if args.baselines:
            raise UserError('--baselines runs beside a single setting; evaluate them without --scales / --steps')
        rows = evaluate_sweep(args.config, scales, steps, **common)
        if rows is not None:
            print(f'{report.sweep_table(rows)}\n-> {args.output_path}/{report.SWEEP}.md')
        return
    summary = evaluate(args.config, baselines=args.baselines, **common)
    if summary is not None:
        m, fmt = summary['metrics'], report.fmt
        print(f'{summary["samples"]} pairs ({summary["run"]["generated"]} generated now, NFE {summary["nfe"]}, '
              f'{summary["seconds_per_pair"]:.3g} s/pair): FID {fmt(m["fid"], 4)}, BLEU-4 {fmt(m["bleu4"], 3)}, '
              f'sentence BLEU-4 {fmt((m["sentence_bleu"] or {}).get("bleu4"), 3)}, Dist-2 {fmt(m["dist2"], 3)}, '
              f'emotion accuracy {fmt(m["emotion"]["fine_acc"], 3)} -> {args.output_path}/report.md'
              + (f' (baselines: {report.BASELINES}.md)' if 'baselines' in summary else ''))


if __name__ == '__main__':
    define_flags()
    cli.run(main, flags_parser=logs.parse_flags)
