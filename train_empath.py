"""Fine-tune UniDiffuser-v1 into EmpathDiffuser on cached AvaMERG features (docs/design.md §2).

    accelerate launch --config_file configs/accelerate/ddp.yaml train_empath.py --config=configs/avamerg_empath.py
    python train_empath.py --config=configs/avamerg_tiny.py --config.train.n_steps=50        # one process, CPU

The loop is ``libs.training_loop.train``. The run folder ``<workdir>/<name>`` holds config.json/.yaml, log.txt,
metrics.jsonl, tracker logs, samples/, ckpts/<step>.ckpt/ (nnet and nnet_ema safetensors carrying the resolved config,
so ``libs.trainer.load_exported_nnet`` rebuilds a model from the file alone; optimizer, scheduler, RNG states and data
position) and ``nnet_ema.safetensors``, the EMA network of the best checkpoint by validation loss (``nnet_ema.json``
says which), updated at every checkpoint: the file sample_multi.py, eval_avamerg.py and app.py take. A restarted run
continues from its newest checkpoint that loads. Training reads the train cache and validates on the val cache
(conversations held out of train.json); it never reads the test split. With an unconditional ``nnet.name``
(uvit_multi_post_ln_v1) it trains UniDiffuser's joint objective on the (face, utterance) pairs of speakers and
listeners, e.g. to pre-train a small UniDiffuser. With ``train.lora.enabled`` (libs/lora.py) checkpoints hold only the
trained tensors and the export is merged. The run folder is locked while the run lasts (libs/runlock.py). A resume
that would change a setting the run cannot change (``trainer.FIXED_SETTINGS``) is refused naming it; other changes
(learning rate, n_steps, intervals) are applied and logged. SIGTERM or SIGUSR1 stops the run after the current
optimizer step with a checkpoint of it (docs/training_reliability.md). Exit codes: 2 bad input (UserError), 3 stopped
by the non-finite guard, 75 stopped by a signal with a checkpoint written (run again to resume).
"""
import os

from absl import app, flags
from ml_collections import config_flags

from libs import cli, logs

FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a script, so importing this module defines no flags)."""
    config_flags.DEFINE_config_file('config', None, 'Training config file, e.g. configs/avamerg_empath.py.',
                                    lock_config=False)
    flags.DEFINE_bool('dry_run', False, 'Check the config, data and weights, build everything, then exit.')
    logs.define_flags()


def train(config, dry_run: bool = False) -> dict:
    """``libs.training_loop.train`` (imported on call: torch and the rest load after the flags are parsed)."""
    from libs import training_loop
    return training_loop.train(config, dry_run)


def main(argv):
    """Command-line entry (through libs.cli: bad input exits 2, the non-finite guard 3, a stop signal 75)."""
    del argv
    if FLAGS.config is None:
        raise app.UsageError('pass --config=configs/avamerg_empath.py (or another training config)')
    logs.setup(FLAGS.verbose)
    state = train(FLAGS.config, FLAGS.dry_run)
    if 'export' in state:
        from libs.hub import NNET_EXPORT
        exported = os.path.join(FLAGS.config.workdir, FLAGS.config.name, NNET_EXPORT)
        print(f'Sample from it:\n  python sample_multi.py --config={config_flags.get_config_filename(FLAGS["config"])} '
              f'--nnet_path={exported} --mode=empath --img=assets/speaker_sad.png --prompt="I lost my job today."')


if __name__ == '__main__':
    define_flags()
    cli.run(main, flags_parser=logs.parse_flags)
