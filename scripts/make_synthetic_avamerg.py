"""Write a small synthetic AvaMERG (train.json, test/test.json, faces and optional clips) for tests and demos.

    python scripts/make_synthetic_avamerg.py --out /tmp/avamerg --seed 0 --dialogues 300 --test_dialogues 50
"""
import argparse
import logging
import os
import sys

# Run as a file, Python puts scripts/ (not the repository root) on the path; libs/ lives in the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from libs import cli  # noqa: E402
from libs.synthetic import make_dataset  # noqa: E402

MAX_DIALOGUES = 99_999  # conversation IDs are 5-digit strings


def main(argv=None):
    """Parse the command line, write the dataset and return the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', required=True, help='folder to write into (created if needed)')
    parser.add_argument('--seed', type=int, default=0, help='same seed, same bytes')
    parser.add_argument('--dialogues', type=int, required=True, help='train dialogues')
    parser.add_argument('--test_dialogues', type=int, default=0, help='test dialogues (written under test/)')
    parser.add_argument('--videos', action='store_true', help='also write video_v5_0/<stem>.mp4 clips')
    parser.add_argument('--no_frames', action='store_true', help='skip image_v5_0/<stem>.png (videos only)')
    parser.add_argument('--size', type=int, default=256, help='face size in pixels (even, >= 32)')
    args = parser.parse_args(argv)
    for name in ('dialogues', 'test_dialogues'):
        if not 0 <= getattr(args, name) <= MAX_DIALOGUES:
            parser.error(f'--{name} must be between 0 and {MAX_DIALOGUES}, got {getattr(args, name)}')
    # yuv420p video needs even sides; below 32 px the faces lose their features.
    if args.size < 32 or args.size % 2:
        parser.error(f'--size must be an even number >= 32, got {args.size}')
    if args.no_frames and not args.videos:
        parser.error('--no_frames without --videos would write no faces at all')
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
    try:
        splits = make_dataset(args.out, args.seed, args.dialogues, args.test_dialogues,
                              frames=not args.no_frames, videos=args.videos, size=args.size)
    except OSError as exc:
        logging.error('cannot write the dataset under %s (%s); pick a writable --out', args.out, exc)
        return 2
    for split, dialogues in splits.items():
        logging.info('%s: %d dialogues, %d turns', split, len(dialogues), sum(len(d['turns']) for d in dialogues))
    return 0


if __name__ == '__main__':
    sys.exit(cli.call(main))
