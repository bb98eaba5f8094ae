"""The planned peak memory of every stage at full size, as a markdown table (libs/memory.py; no GPU needed).

    python scripts/memory_plan.py                          # configs/avamerg_empath.py, printed
    python scripts/memory_plan.py --out=out/memory_plan.md # also written to a file

Each network runs on fake tensors (exact shapes, no memory): extraction, training (full / LoRA, gradient
checkpointing on and off), sampling per mode, evaluation and the web app, in fp32 and bf16, with the cards (24, 40,
80 GB) each fits. A few minutes on a CPU.
"""
import os
import sys

from absl import app, flags
from ml_collections import config_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT]

from libs import cli  # noqa: E402

FLAGS = flags.FLAGS


def define_flags():
    """Define the command-line flags (on demand, so importing this module defines none)."""
    config_flags.DEFINE_config_file('config', os.path.join(ROOT, 'configs', 'avamerg_empath.py'),
                                    'training config whose defaults are planned', lock_config=False)
    flags.DEFINE_string('out', None, 'also write the table to this markdown file')


def main(argv):
    """Plan every stage and print the table."""
    del argv
    import logging
    import platform

    import torch

    from libs import memory
    from libs.io import atomic_write_bytes
    logging.getLogger('libs').setLevel(logging.WARNING)  # the networks' build notes are not results
    rows = memory.plan_rows(FLAGS.config, progress=lambda row: print(f'  {row[0]}: {row[1]}', file=sys.stderr,
                                                                     flush=True))
    note = (f'Fake-tensor plan, not a GPU measurement: torch {torch.__version__}, '
            f'{platform.processor() or platform.machine()} CPU. GiB; a card fits a plan when plan x '
            f'{memory.ALLOCATOR_HEADROOM} <= its memory.\n\n')
    table = note + memory.plan_table(rows)
    print(table)
    if FLAGS.out:
        atomic_write_bytes(FLAGS.out, table.encode('utf-8'))


if __name__ == '__main__':
    define_flags()
    cli.run(main)
