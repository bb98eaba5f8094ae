"""A blind A/B human rating of two evaluation runs on the same pairs (docs/metrics.md, "Human rating").

    python scripts/rating_sheet.py make RUN_A RUN_B --out sheet.html [--data_root data/avamerg] [--max_pairs 100]
    python scripts/rating_sheet.py score ratings.json [more_ratings.json ...] --key sheet_key.json [--out score.json]

`make` writes sheet.html (self-contained: open it in any browser, offline) and its answer key sheet_key.json beside
it; send raters the HTML only. Each rater presses "Save ratings" and returns the downloaded JSON. `score` reads the
ratings through the key into run A's win rate over run B (ties excluded and counted) with its 95% interval.
"""
import os
import sys

# Run as a file, Python puts scripts/ (not the repository root) on the path; libs/ lives in the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from absl import flags  # noqa: E402

from libs import cli  # noqa: E402
from libs.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
USAGE = 'usage: rating_sheet.py make RUN_A RUN_B --out sheet.html | score RATINGS.json... --key sheet_key.json'


def define_flags():
    flags.DEFINE_string('out', None, 'make: the sheet to write (.html; the key goes beside it as <stem>_key.json); '
                        'score: also write the result as JSON here')
    flags.DEFINE_integer('seed', 0, 'make: seed of the pair subset, pair order and left/right sides (in the key)')
    flags.DEFINE_integer('max_pairs', None, 'make: rate a random subset of this many pairs (default: all)')
    flags.DEFINE_string('data_root', None, 'make: the AvaMERG folder holding the speaker faces (default: the source '
                        'recorded in RUN_A/settings.json)')
    flags.DEFINE_string('key', None, 'score: the answer key written beside the sheet')


def main(argv):
    from libs import rating
    from libs.io import atomic_write_json
    command, args = (argv[1], argv[2:]) if len(argv) > 1 else (None, [])
    if command == 'make':
        if len(args) != 2 or not FLAGS.out:
            raise UserError(f'make takes two run folders and --out ({USAGE})')
        if FLAGS.max_pairs is not None and FLAGS.max_pairs < 1:
            raise UserError(f'--max_pairs={FLAGS.max_pairs} must be at least 1')
        key = rating.make_sheet(args[0], args[1], FLAGS.out, FLAGS.seed, FLAGS.max_pairs, FLAGS.data_root)
        print(f'wrote {FLAGS.out} ({len(key["pairs"])} pairs) and its answer key {rating.key_path(FLAGS.out)}; '
              'send raters the HTML only')
    elif command == 'score':
        if not args or not FLAGS.key:
            raise UserError(f'score takes one or more ratings files and --key ({USAGE})')
        result = rating.score(args, FLAGS.key)
        print(rating.score_markdown(result))
        if FLAGS.out:
            atomic_write_json(FLAGS.out, result)
    else:
        raise UserError(f'unknown command {command!r}; {USAGE}')


if __name__ == '__main__':
    define_flags()
    cli.run(main)
