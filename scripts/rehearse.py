"""Rehearse every stage at full size on a CPU with random weights (libs/rehearsal.py); ``make rehearse``.

    python scripts/rehearse.py                                   # all stages into out/rehearse (about an hour)
    python scripts/rehearse.py --stages=sample,eval,app          # some stages again, reusing components and features
    python scripts/rehearse.py --size=tiny --out=/tmp/rehearse   # the same stages with tiny components (seconds)

Writes <out>/rehearsal.md: wall time, CPU time and peak RSS of every process it ran. Finished stages are skipped on a
rerun (--rerun runs them again). Random weights show that shapes, memory, resume and the scripts work; not quality.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from libs import cli, rehearsal  # noqa: E402  (rehearsal imports the standard library only)

FLAGS = flags.FLAGS
flags.DEFINE_string('out', 'out/rehearse', 'output folder (a rerun reuses its finished stages)')
flags.DEFINE_enum('size', 'full', list(rehearsal.SIZES),
                  'full: the real component sizes; tiny: the test-suite components')
flags.DEFINE_list('stages', list(rehearsal.STAGES), 'stages to run, in this order: ' + ','.join(rehearsal.STAGES))
flags.DEFINE_list('modes', [], 'sampling modes of the sample stage (default: every mode, empath ones included)')
flags.DEFINE_enum('network', 'lora', list(rehearsal.NETWORKS), 'export that sample, eval and app load: the LoRA run '
                  "(full depth) or the full fine-tuning step (--full_depth; quicker)")
flags.DEFINE_bool('rerun', False, 'run the named stages even when they finished before')
flags.DEFINE_integer('full_depth', rehearsal.FULL_FINETUNE_DEPTH, 'U-ViT depth of the one full fine-tuning step '
                     '(full depth needs ~20 B per parameter, more than a 24 GB machine has)', lower_bound=2)


def main(argv):
    del argv
    import logging
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
    plan = rehearsal.Rehearsal(os.path.abspath(FLAGS.out), FLAGS.size, FLAGS.full_depth, tuple(FLAGS.modes),
                               FLAGS.network)
    table = rehearsal.run(plan, FLAGS.stages, FLAGS.rerun)
    with open(table, encoding='utf-8') as f:
        print(f.read())
    print(f'-> {table}')


if __name__ == '__main__':
    cli.run(main)
