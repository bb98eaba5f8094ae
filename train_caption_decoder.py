"""Fine-tune UniDiffuser's GPT-2 prefix caption decoder on AvaMERG utterances from the feature cache.

    python train_caption_decoder.py --config=configs/avamerg_empath.py [--features=features/avamerg_512/train]
    accelerate launch --config_file configs/accelerate/ddp.yaml train_caption_decoder.py --config=...

The official decoder was trained on image captions, not dialogue: this trains it on the cache's utterances and
scores the held-out round trip before and after (libs/caption_decoder_training.py). Writes
``<workdir>/<name>/caption_decoder.pth`` (official layout) and ``caption_decoder_report.json``; point
``config.caption_decoder.pretrained_path`` at the file to use it. Exit code 2 on bad input.
"""
from absl import app, flags
from ml_collections import config_flags

from libs import cli, logs

FLAGS = flags.FLAGS


def define_flags():
    """The command line (defined only when run as a script, so importing this module defines no flags)."""
    config_flags.DEFINE_config_file('config', None, 'Training config, e.g. configs/avamerg_empath.py.',
                                    lock_config=False)
    flags.DEFINE_string('features', None, 'Feature cache folder to read (default: the config\'s).')
    logs.define_flags()


def main(argv):
    """Command-line entry (through libs.cli: bad input exits with code 2)."""
    del argv
    if FLAGS.config is None:
        raise app.UsageError('pass --config=configs/avamerg_empath.py (or another training config)')
    logs.setup(FLAGS.verbose)
    from libs.caption_decoder_training import train  # torch and transformers load after the flags are parsed
    train(FLAGS.config, FLAGS.features)


if __name__ == '__main__':
    define_flags()
    cli.run(main, flags_parser=logs.parse_flags)
