"""Write a small synthetic AvaMERG (train.json, test/test.json, faces and optional clips) for tests and demos.

    python scripts/make_synthetic_avamerg.py --out /tmp/avamerg --seed 0 --dialogues 300 --test_dialogues 50
    python scripts/make_synthetic_avamerg.py --out /tmp/avamerg_release --dialogues 20 --test_dialogues 5 \
        --layout per_modality --videos --no_frames --test_gold separate

Layouts (libs/synthetic.py LAYOUTS): flat (media beside each JSON), release (test media in test/test_video),
per_modality (train_video/video_v5_0, test/test_video/video_v5_0), frames_release (frames only, one image_v5_0/).
"""
import logging
import os
import sys

# Run as a file, Python puts scripts/ (not the repository root) on the path; libs/ lives in the root.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import flags  # noqa: E402

from libs import cli  # noqa: E402
from libs.errors import UserError  # noqa: E402

FLAGS = flags.FLAGS
MAX_DIALOGUES = 99_999  # conversation IDs are 5-digit strings


def define_flags():
    """The command line (defined only when run as a script)."""
    from libs.synthetic import LAYOUTS, TEST_GOLD, TEST_IDS
    flags.DEFINE_string('out', None, 'folder to write into (created if needed)', required=True)
    flags.DEFINE_integer('seed', 0, 'same seed, same bytes')
    flags.DEFINE_integer('dialogues', None, 'train dialogues', required=True)
    flags.DEFINE_integer('test_dialogues', 0, 'test dialogues (written under test/)')
    flags.DEFINE_bool('videos', False, 'also write <stem>.mp4 clips (video_v5_0/ in the flat layout)')
    flags.DEFINE_bool('no_frames', False, 'skip the <stem>.png frames (videos only)')
    flags.DEFINE_integer('size', 256, 'face size in pixels (even, >= 32)')
    flags.DEFINE_enum('layout', 'flat', tuple(LAYOUTS), 'where the media folders go')
    flags.DEFINE_enum('test_gold', 'inline', TEST_GOLD, 'test.json with its gold, without it, or without it plus '
                      'test/test_gold.json')
    flags.DEFINE_enum('test_ids', 'restart', TEST_IDS, 'test conversation IDs 00001, 00002, ... or the first train '
                      'IDs again')


def check_flags():
    """Refuse combinations that would write a dataset no reader can use, before anything is written."""
    for name in ('dialogues', 'test_dialogues'):
        if not 0 <= FLAGS[name].value <= MAX_DIALOGUES:
            raise UserError(f'--{name} must be between 0 and {MAX_DIALOGUES}, got {FLAGS[name].value}')
    # yuv420p video needs even sides; below 32 px the faces lose their features.
    if FLAGS.size < 32 or FLAGS.size % 2:
        raise UserError(f'--size must be an even number >= 32, got {FLAGS.size}')
    if FLAGS.no_frames and not FLAGS.videos:
        raise UserError('--no_frames without --videos would write no faces at all')
    if FLAGS.layout == 'frames_release' and FLAGS.videos:
        raise UserError('--layout frames_release holds frames only; drop --videos')
    if FLAGS.test_ids == 'train' and FLAGS.test_dialogues > FLAGS.dialogues:
        raise UserError('--test_ids train needs --test_dialogues <= --dialogues')


def main(argv):
    """Write the dataset."""
    del argv
    check_flags()
    from libs.synthetic import make_dataset
    logging.basicConfig(level=logging.INFO, format='%(levelname)s %(message)s', force=True)
    try:
        splits = make_dataset(FLAGS.out, FLAGS.seed, FLAGS.dialogues, FLAGS.test_dialogues,
                              frames=not FLAGS.no_frames, videos=FLAGS.videos, size=FLAGS.size, layout=FLAGS.layout,
                              test_gold=FLAGS.test_gold, test_ids=FLAGS.test_ids)
    except ValueError as exc:  # a stem two splits would share in one folder
        raise UserError(str(exc)) from exc
    for split, dialogues in splits.items():
        logging.info('%s: %d dialogues, %d turns', split, len(dialogues), sum(len(d['turns']) for d in dialogues))


if __name__ == '__main__':
    define_flags()
    cli.run(main)
