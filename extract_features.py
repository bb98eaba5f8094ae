"""Encode every AvaMERG training pair once into the sharded feature cache that training reads (libs/extraction.py).

    python extract_features.py --config=configs/avamerg_empath.py --split=train   # then --split=val, --split=test
    accelerate launch --multi_gpu --num_processes 8 extract_features.py --config=... # process r: shards r, r+P, ...

A rerun skips finished shards, so SIGTERM / SIGUSR1 (exit 75) or a crash loses at most the shard being encoded.
"""
from absl import app, flags
from ml_collections import config_flags

from libs import cli, logs

# The splits, also libs.extraction.SPLITS (kept here so --help answers without importing torch).
SPLITS = ('train', 'val', 'test')


def define_flags():
    """Define the command-line flags (on demand, so importing this module, e.g. in tests, defines none)."""
    config_flags.DEFINE_config_file('config', None, 'config file (see configs/extract_tiny.py)', lock_config=False)
    flags.DEFINE_enum('split', 'train', list(SPLITS), 'AvaMERG split to encode: train (train.json minus the '
                      'held-out conversations), val (those), test (test/test.json)')
    flags.DEFINE_bool('overwrite', False, 'delete features made with other settings in the output folder and restart')
    flags.DEFINE_integer('limit', None, 'encode only the first N pairs (smoke tests)', lower_bound=1)
    logs.define_flags()


def main(argv):
    """Command-line entry point: bad input exits with code 2 and a message instead of a traceback."""
    del argv
    args = flags.FLAGS
    if args.config is None:
        raise app.UsageError('--config is required, e.g. --config=configs/avamerg_empath.py')
    logs.setup(args.verbose)
    from libs.extraction import extract  # torch and the encoders load after the flags are parsed
    extract(args.config, args.split, args.overwrite, args.limit)


def __getattr__(name):
    """``extract_features.extract`` and the rest of libs.extraction, imported when first asked for."""
    from libs import extraction
    return getattr(extraction, name)


if __name__ == '__main__':
    define_flags()
    cli.run(main, flags_parser=logs.parse_flags)
