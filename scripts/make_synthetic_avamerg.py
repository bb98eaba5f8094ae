"""Write a small synthetic AvaMERG (train.json, test/test.json, faces and optional clips) for tests and demos.

    python scripts/make_synthetic_avamerg.py --out /tmp/avamerg --seed 0 --dialogues 300 --test_dialogues 50
    python scripts/make_synthetic_avamerg.py --out /tmp/avamerg_release --dialogues 20 --test_dialogues 5 \
        --layout per_modality --videos --no_frames --test_gold separate

Layouts (libs/synthetic.py LAYOUTS): flat (media beside each JSON), release (test media in test/test_video),
per_modality (train_video/video_v5_0, test/test_video/video_v5_0), frames_release (frames only, one image_v5_0/).
"""
import argparse
import logging
import os
import sys

# Run as a file, Python puts scripts/ (not the repository root) on the path; libs/ lives in the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from libs import cli  # noqa: E402
from libs.synthetic import LAYOUTS, TEST_GOLD, TEST_IDS, make_dataset  # noqa: E402

MAX_DIALOGUES = 99_999  # conversation IDs are 5-digit strings


def main(argv=None):
    """Parse the command line, write the dataset and return the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', required=True, help='folder to write into (created if needed)')
    parser.add_argument('--seed', type=int, default=0, help='same seed, same bytes')
    parser.add_argument('--dialogues', type=int, required=True, help='train dialogues')
    parser.add_argument('--test_dialogues', type=int, default=0, help='test dialogues (written under test/)')
    parser.add_argument('--videos', action='store_true',
                        help='also write <stem>.mp4 clips (video_v5_0/ in the flat layout)')
    parser.add_argument('--no_frames', action='store_true', help='skip the <stem>.png frames (videos only)')
    parser.add_argument('--size', type=int, default=256, help='face size in pixels (even, >= 32)')
    parser.add_argument('--layout', choices=tuple(LAYOUTS), default='flat', help='where the media folders go')
    parser.add_argument('--test_gold', choices=TEST_GOLD, default='inline',
                        help='test.json with its gold, without it, or without it plus test/test_gold.json')
    parser.add_argument('--test_ids', choices=TEST_IDS, default='restart',
                        help='test conversation IDs 00001, 00002, ... or the first train IDs again')
    args = parser.parse_args(argv)
    for name in ('dialogues', 'test_dialogues'):
        if not 0 <= getattr(args, name) <= MAX_DIALOGUES:
            parser.error(f'--{name} must be between 0 and {MAX_DIALOGUES}, got {getattr(args, name)}')
    # yuv420p video needs even sides; below 32 px the faces lose their features.
    if args.size < 32 or args.size % 2:
        parser.error(f'--size must be an even number >= 32, got {args.size}')
    if args.no_frames and not args.videos:
        parser.error('--no_frames without --videos would write no faces at all')
    if args.layout == 'frames_release' and args.videos:
        parser.error('--layout frames_release holds frames only; drop --videos')
    if args.test_ids == 'train' and args.test_dialogues > args.dialogues:
        parser.error('--test_ids train needs --test_dialogues <= --dialogues')
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s')
    try:
        splits = make_dataset(args.out, args.seed, args.dialogues, args.test_dialogues,
                              frames=not args.no_frames, videos=args.videos, size=args.size, layout=args.layout,
                              test_gold=args.test_gold, test_ids=args.test_ids)
    except OSError as exc:
        logging.error('cannot write the dataset under %s (%s); pick a writable --out', args.out, exc)
        return 2
    except ValueError as exc:  # a stem two splits would share in one folder
        logging.error('%s', exc)
        return 2
    for split, dialogues in splits.items():
        logging.info('%s: %d dialogues, %d turns', split, len(dialogues), sum(len(d['turns']) for d in dialogues))
    return 0


if __name__ == '__main__':
    sys.exit(cli.call(main))
