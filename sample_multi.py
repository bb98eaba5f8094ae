"""Sample UniDiffuser / EmpathDiffuser in any mode.

    python sample_multi.py --mode=t2i --prompt="an elephant under the sea" --n_samples=4
    python sample_multi.py --mode=empath --img=speaker.png --prompt="I lost my job today." \\
        --config=configs/avamerg_empath.py --nnet_path=workdir/run/nnet_ema.safetensors

Outputs go to ``<output_path>/<mode>/``: ``<i>.png`` and ``grid.png`` for images, ``<mode>.txt`` (``prompts.txt``
in joint mode) for texts, and ``samples.json`` with the inputs, settings, the precision that ran, seed, outputs, time
and memory. The folder is assembled aside and moved into place only when complete, so a failed run never leaves half
an output. The empath modes refuse a network whose speaker segment is untrained (e.g. an official UniDiffuser
checkpoint) unless ``--allow_untrained_condition`` is given.
"""
import json
import os
import shutil
import tempfile
import time

from absl import flags
from ml_collections import config_flags

from libs import cli, logs
from libs.errors import UserError

FLAGS = flags.FLAGS
# The modes of libs.modes.MODES, named here because that module imports torch, which --help must not wait for
# (tests/test_help.py checks the two lists agree).
MODE_NAMES = ('t2i', 'i2t', 'joint', 'i', 't', 'i2t2i', 't2i2t', 'empath', 'empath_t', 'empath_i')


def define_flags():
    """The command line (defined only when run as a script, so importing this module defines no flags)."""
    config_flags.DEFINE_config_file('config', 'configs/sample_unidiffuser_v1.py', 'Sampling configuration.',
                                    lock_config=False)
    flags.DEFINE_string('mode', None, 'one of: ' + ', '.join(MODE_NAMES))
    flags.DEFINE_string('prompt', None, 'the prompt (t2i, t2i2t) or the speaker utterance (empath modes)')
    flags.DEFINE_string('img', None, 'the image (i2t, i2t2i) or the speaker face (empath modes)')
    flags.DEFINE_integer('n_samples', 1, 'number of samples')
    flags.DEFINE_integer('nrow', 4, 'images per row of grid.png')
    flags.DEFINE_string('output_path', 'out', 'output folder; results go to <output_path>/<mode>/')
    flags.DEFINE_string('nnet_path', None, 'U-ViT weights (.pth or .safetensors, or a train_empath.py '
                        'ckpts/<step>.ckpt folder); default: config.nnet_path')
    flags.DEFINE_bool('allow_untrained_condition', False, 'run an empath mode even though the network\'s speaker '
                      'segment is untrained (the speaker then has no effect and the emotions are random)')
    flags.mark_flag_as_required('mode')
    logs.define_flags()


def check_flags(mode, prompt, img, n_samples):
    """Validate the command line before anything is loaded."""
    from libs import modes
    modes.get_mode(mode)
    if n_samples < 1:
        raise UserError(f'--n_samples must be at least 1, got {n_samples}')
    needs = modes.MODE_INPUTS[mode]
    if 'prompt' in needs and not prompt:
        raise UserError(f'mode {mode} needs --prompt')
    if 'img' in needs and not img:
        raise UserError(f'mode {mode} needs --img')
    if 'speaker' in needs and not (img or prompt):
        pass  # an empty speaker turn is allowed: the model then answers nobody in particular
    if img and ('img' in needs or 'speaker' in needs):
        return load_image(img)
    return None


def load_image(path):
    """Open an RGB image, turning any failure into a clear message."""
    from PIL import Image

    from libs.io import not_a_file
    if not os.path.isfile(path):
        raise UserError(f'--img {path}: {not_a_file(path)}')
    try:
        with Image.open(path) as im:
            return im.convert('RGB')
    except Exception as e:
        raise UserError(f'--img {path}: not a readable image ({type(e).__name__}: {e})') from e


def write_outputs(folder, mode, result, nrow, record):
    """Write images, grid, texts and samples.json into folder."""
    from libs import pipeline
    os.makedirs(folder, exist_ok=True)
    images = result.get('images', [])
    for i, im in enumerate(images):
        im.save(os.path.join(folder, f'{i}.png'))
    if images:
        pipeline.make_grid(images, nrow).save(os.path.join(folder, 'grid.png'))
    if 'texts' in result:
        name = 'prompts.txt' if mode == 'joint' else f'{mode}.txt'
        with open(os.path.join(folder, name), 'w') as f:
            f.write('\n'.join(result['texts']) + '\n')
    record['outputs'] = dict(images=[f'{i}.png' for i in range(len(images))], texts=result.get('texts'),
                             emotions=result.get('emotions'))
    with open(os.path.join(folder, 'samples.json'), 'w') as f:
        json.dump(record, f, indent=2)


def sample(config, mode, prompt, img, n_samples, nrow, output_path, nnet_path=None, allow_untrained_condition=False):
    """Load the components, generate, and publish <output_path>/<mode>/ atomically. Returns the record."""
    import torch

    from libs import config_check, memory, modes, pipeline, precision
    from libs.io import atomic_replace_dir, writing
    config_check.check(config, 'model', 'sample')
    image = check_flags(mode, prompt, img, n_samples)
    with writing(output_path):  # before anything is loaded: an unwritable output path fails now
        os.makedirs(output_path, exist_ok=True)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    needs = modes.MODE_INPUTS[mode]
    # CUDA: refuse before loading what would not fit, planned with the network nnet_path rebuilds
    memory.check_sampling(config, device, (mode,), n_samples, nnet_path)
    comp = pipeline.load_components(config, device, nnet_path,
                                    speaker_for=f'mode {mode}' if mode in modes.EMPATH_MODES else None)
    generator = torch.Generator(device).manual_seed(config.seed)
    ctx = pipeline.make_context(comp, generator)
    if device.type == 'cuda':
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    result = pipeline.generate(comp, ctx, mode, n_samples, prompt=prompt if {'prompt', 'speaker'} & set(needs)
                               else None, image=image, allow_untrained_condition=allow_untrained_condition)
    seconds = time.perf_counter() - start
    used = dict(prompt=prompt if {'prompt', 'speaker'} & set(needs) else None,
                img=img if {'img', 'speaker'} & set(needs) else None)
    record = dict(mode=mode, inputs=used, n_samples=n_samples, seed=config.seed,
                  nnet_path=comp.nnet_path, settings=config.sample.to_dict(),
                  precision=precision.name_of(ctx.autocast_dtype),  # what ran (settings.precision may say 'auto')
                  seconds_per_sample=round(seconds / n_samples, 3),
                  peak_memory_gb=round(pipeline.peak_memory_gb(device), 3),
                  device=str(device))
    with writing(os.path.join(output_path, mode)):
        tmp = tempfile.mkdtemp(dir=output_path, prefix=f'.{mode}-')
        try:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes it private; the published folder gets the usual permissions
            write_outputs(tmp, mode, result, nrow, record)
            atomic_replace_dir(tmp, os.path.join(output_path, mode))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)  # a failed write (e.g. a full disk) leaves nothing behind
            raise
    return record


def emotion_lines(emotions):
    """Terminal lines for the predicted speaker emotions (top-3, rounded); one line when every sample agrees."""
    tops = [', '.join(f'{label} {p:.2f}' for label, p in top) for top in emotions or ()]
    if len(set(tops)) == 1:
        return [f'speaker emotion: {tops[0]}']
    return [f'speaker emotion, sample {i}: {top}' for i, top in enumerate(tops)]


def main(argv):
    del argv
    logs.setup(FLAGS.verbose)
    record = sample(FLAGS.config, FLAGS.mode, FLAGS.prompt, FLAGS.img, FLAGS.n_samples, FLAGS.nrow, FLAGS.output_path,
                    FLAGS.nnet_path, FLAGS.allow_untrained_condition)
    print(f'{record["mode"]}: {record["n_samples"]} samples, {record["seconds_per_sample"]:.2f} s/sample '
          f'({record["precision"]}), '
          f'peak memory {record["peak_memory_gb"]:.2f} GB -> {os.path.join(FLAGS.output_path, FLAGS.mode)}')
    for line in emotion_lines(record['outputs']['emotions']):
        print(line)


if __name__ == '__main__':
    define_flags()
    cli.run(main, flags_parser=logs.parse_flags)
