"""On a lent GPU, offline: full-size throughput and memory of every stage, into BENCHMARKS.md (libs/gpu_check.py).

    python scripts/gpu_check.py                                   # make gpu-check: writes BENCHMARKS.md's GPU table
    python scripts/gpu_check.py --device=cpu --size=tiny --out=/tmp/gc --benchmarks=/tmp/table.md   # the logic, on CPU

Random full-size weights (the rehearsal's components, written into --out): timings and memory, not quality. It stops
starting new measurements after --budget_s and lists what it skipped.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from libs import cli, rehearsal  # noqa: E402  (rehearsal imports the standard library only)

FLAGS = flags.FLAGS
flags.DEFINE_string('out', 'out/gpu_check', 'working folder (components, data, features, runs, logs)')
flags.DEFINE_enum('device', 'cuda', ['cuda', 'cpu'], 'cuda: the lent GPU; cpu: test this script (with --size=tiny)')
flags.DEFINE_enum('size', 'full', list(rehearsal.SIZES), 'full: the real component sizes; tiny: test components')
flags.DEFINE_string('benchmarks', 'BENCHMARKS.md', 'file whose gpu-check markers receive the table ("" = print only)')
flags.DEFINE_float('budget_s', None, 'start no measurement after this many seconds (default: 480 at full size)')


def main(argv):
    del argv
    import logging
    import time
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(message)s')
    from libs import gpu_check
    from libs.errors import UserError
    settings = gpu_check.Settings() if FLAGS.size == 'full' else gpu_check.Settings.tiny()
    if FLAGS.budget_s is not None:
        settings.budget_s = FLAGS.budget_s
    if FLAGS.benchmarks and not os.path.isfile(FLAGS.benchmarks):
        raise UserError(f'--benchmarks={FLAGS.benchmarks}: no such file; pass BENCHMARKS.md, or "" to only print')
    cuda = FLAGS.device == 'cuda'
    if cuda and not cuda_visible():
        raise UserError('--device=cuda but no GPU is visible (nvidia-smi lists none); on a CPU, test the script '
                        'with --device=cpu --size=tiny')
    start = time.monotonic()
    rows = gpu_check.check(os.path.abspath(FLAGS.out), settings, cuda)
    # The device name last: the measurements fork, and CUDA must not be initialised in this process before that.
    body = gpu_check.table(rows, gpu_check.device_name(cuda), time.monotonic() - start,
                           settings.size)
    print(body)
    if FLAGS.benchmarks:
        gpu_check.write_between_markers(FLAGS.benchmarks, body)
        print(f'-> {FLAGS.benchmarks}')


def cuda_visible() -> bool:
    """Whether nvidia-smi lists a GPU (asked without initialising CUDA in this process)."""
    import subprocess
    try:
        return subprocess.run(['nvidia-smi', '-L'], capture_output=True, text=True).stdout.startswith('GPU')
    except OSError:
        return False


if __name__ == '__main__':
    cli.run(main)
