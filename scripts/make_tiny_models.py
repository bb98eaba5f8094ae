"""Write tiny random components in the official layouts (models/tiny by default) for a first CPU run.

    python scripts/make_tiny_models.py                     # models/tiny: UniDiffuser-v1 and EmpathDiffuser U-ViTs
    python sample_multi.py --config=configs/sample_tiny.py --mode=joint
    python sample_multi.py --config=configs/sample_tiny_empath.py --mode=empath --prompt="I lost my job today."

The weights are random: images come out as noise and texts as gibberish. They show that every stage runs, not what
a trained model does.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'configs'))

from absl import flags  # noqa: E402

from libs import cli  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_string('out', 'models/tiny', 'output folder')
flags.DEFINE_integer('seed', 0, 'seed of the random weights')


def main(argv):
    del argv
    os.makedirs(FLAGS.out, exist_ok=True)  # an unwritable --out fails now, before torch is imported
    from common import tiny
    from libs.io import writing
    from libs.tiny_models import make_tiny_models
    with writing(FLAGS.out):  # torch.save reports a full disk without an errno
        # The EmpathDiffuser U-ViT (configs/sample_tiny_empath.py) shares every other component with the v1 one.
        paths = make_tiny_models(tiny(FLAGS.out), seed=FLAGS.seed, empath_config=tiny(FLAGS.out, condition=True))
    print('\n'.join(f'{k}: {v}' for k, v in paths.items()))


if __name__ == '__main__':
    cli.run(main)
