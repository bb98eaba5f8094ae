"""The whole EmpathDiffuser pipeline on a synthetic AvaMERG, on a laptop CPU: ``make demo`` -> out/demo/report.html.

    python scripts/demo.py --out out/demo            # full schedule (14 minutes on two cores)
    python scripts/demo.py --out /tmp/demo --quick   # shortened schedule (8 minutes; the test suite)

Stages, each in its own folder under --out and skipped on a rerun once done with the same settings (configs/demo.py;
a changed setting rebuilds that stage and those after it): synthetic data -> tiny components (tokenizers trained on
the synthetic corpus) -> codec training -> features (extract_features.py) -> caption decoder
(train_caption_decoder.py) -> EmpathDiffuser training (train_empath.py) -> evaluation on held-out pairs
(eval_avamerg.py) -> the same evaluation of the untrained network -> expression classifier -> report.html and
metrics.json. The project's tools run in this process (one start-up instead of six); the console shows the
command line that does the same by hand.
"""
import argparse
import functools
import importlib.util
import json
import logging
import os
import random
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a file, Python puts scripts/ (not the repository root) on the path

logger = logging.getLogger('demo')


def load_config(out: str, quick: bool):
    """configs/demo.py for this output folder and schedule, and the --config flag that gives the tools the same."""
    arg = f'{out},quick' if quick else out
    spec = importlib.util.spec_from_file_location('demo_config', os.path.join(ROOT, 'configs', 'demo.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg), f'--config=configs/demo.py:{arg}'


def command(*args) -> str:
    """Log the command line that does what the demo is about to do in-process; returns it for the report."""
    line = shlex.join(['python', *args])
    logger.info('$ %s', line)
    return line


def final_nnet(config) -> str:
    """The EMA network of train_empath.py's last checkpoint."""
    return os.path.join(config.workdir, config.name, 'ckpts', f'{config.train.n_steps}.ckpt', 'nnet_ema.safetensors')


def resolution(config) -> int:
    """Face size in pixels: the latent size times the codec's downsampling."""
    return config.z_shape[-1] * 2 ** (len(config.autoencoder.block_out_channels) - 1)


# ----------------------------------------------------------------------------------------------------------------
# Stages: each takes (config, --config flag, its folder) and returns a summary for its stage_done marker
# ----------------------------------------------------------------------------------------------------------------

def make_data(config, flag, folder):
    """A synthetic AvaMERG in the real layout, faces drawn at the demo's resolution."""
    from libs.synthetic import make_dataset
    splits = make_dataset(folder, config.seed, config.demo.dialogues, config.demo.test_dialogues,
                          size=resolution(config), listeners=tuple(config.demo.listeners))
    return {name: dict(dialogues=len(d), turns=sum(len(x['turns']) for x in d)) for name, d in splits.items()}


def make_components(config, flag, folder):
    """Random CLIP text/vision encoders and caption decoder; their tokenizers are learned on the training corpus."""
    from libs import demo
    with open(os.path.join(config.data.root, 'train.json'), encoding='utf-8') as f:
        dialogues = json.load(f)
    # The last turn's history holds every earlier utterance of the dialogue; its response is the last one.
    corpus = [u['utterance'] for d in dialogues for u in d['turns'][-1]['dialogue_history']]
    corpus += [d['turns'][-1]['response'] for d in dialogues]
    return demo.build_components(config, corpus, config.seed, config.demo.initial_caption_decoder, resolution(config))


def train_codec(config, flag, folder):
    """Train the tiny AutoencoderKL on training faces, save it in the LDM layout, check it through the real loader."""
    import torch

    from libs import demo
    from libs.autoencoder import ldm_state_dict_from_diffusers, load_autoencoder, to_pil
    cfg, size = config.demo.codec, resolution(config)
    paths = demo.face_paths(config.data.root, 'train')
    faces = demo.load_faces(random.Random(config.seed).sample(paths, min(cfg.faces, len(paths))), size)
    codec, curve = demo.train_codec(config.autoencoder, faces, cfg.steps, cfg.batch_size, cfg.lr, cfg.kl_weight,
                                    config.seed)
    correction = demo.normalise_latent_scale(codec, faces)
    torch.save(ldm_state_dict_from_diffusers(codec.vae.state_dict()), config.autoencoder.pretrained_path)
    codec = load_autoencoder(config.autoencoder.pretrained_path, config.autoencoder)
    heldout = demo.load_faces(demo.face_paths(config.data.root, 'test')[:256], size)
    with torch.no_grad():
        mean = codec.encode_moments(heldout).chunk(2, dim=1)[0] * codec.scale_factor
        reconstructed = codec.decode(mean).clamp(-1, 1)
    mse = (reconstructed - heldout).pow(2).mean().item() / 4  # pixels in [-1, 1]: a quarter of the [0, 1] MSE
    shown = 12
    for name, images in (('originals', heldout[:shown]), ('reconstructions', reconstructed[:shown])):
        strip = to_pil(torch.cat(list(images), dim=2))
        strip.save(os.path.join(folder, f'{name}.png'))
    return dict(curve=curve, scale_correction=correction, heldout_mse=mse,
                heldout_psnr=10 * torch.log10(torch.tensor(1 / mse)).item(), latent_std=mean.std().item(),
                params=sum(p.numel() for p in codec.parameters()), faces=len(faces))


def extract(config, flag, folder):
    """Feature caches of both splits (extract_features.py)."""
    import extract_features
    commands = []
    for split in extract_features.SPLITS:
        commands.append(command('extract_features.py', flag, f'--split={split}'))
        extract_features.extract(config, split)
    counts = {}
    for key in extract_features.SPLITS:
        with open(os.path.join(config.data[key], 'manifest.json'), encoding='utf-8') as f:
            counts[key] = json.load(f)['num_pairs']
    return dict(commands=commands, pairs=counts)


def train_caption_decoder(config, flag, folder):
    """Fine-tune the random caption decoder on the corpus (train_caption_decoder.py); report its round trip."""
    import train_caption_decoder
    initial = config.copy_and_resolve_references()
    initial.workdir, initial.caption_decoder.pretrained_path = folder, config.demo.initial_caption_decoder
    line = command('train_caption_decoder.py', flag, f'--config.workdir={folder}',
                   f'--config.caption_decoder.pretrained_path={config.demo.initial_caption_decoder}')
    report = train_caption_decoder.train(initial)
    return dict(commands=[line], **{k: report[k] for k in ('bleu_before', 'bleu_after', 'loss_curve', 'samples',
                                                               'train_utterances', 'heldout_utterances')})


def train_empath(config, flag, folder):
    """Train EmpathDiffuser (train_empath.py); returns where its final EMA network is."""
    import train_empath
    line = command('train_empath.py', flag)
    train_empath.train(config)
    with open(os.path.join(folder, config.name, 'metrics.jsonl'), encoding='utf-8') as f:
        curve = [json.loads(line) for line in f]
    return dict(commands=[line], nnet=final_nnet(config), curve=curve)


def evaluate(config, flag, folder, nnet_path, untrained=False):
    """eval_avamerg.py on the first held-out pairs; FID only if the standard Inception-v3 weights are here."""
    from libs import demo, metrics
    from libs.errors import UserError
    try:
        metrics.load_inception(config.eval.inception_path or None)
        fid_note = None
    except UserError as err:
        fid_note = str(err)
        logger.info('FID skipped: no Inception-v3 weights on this machine (see the report for where to put them)')
    import eval_avamerg
    cfg = config.demo.eval
    line = command('eval_avamerg.py', flag, f'--nnet_path={nnet_path}', f'--features={config.data.test}',
                   f'--output_path={folder}', f'--limit={cfg.pairs}', f'--batch_size={cfg.batch_size}',
                   *(['--skip_fid'] if fid_note else []), *(['--allow_untrained_condition'] if untrained else []))
    summary = eval_avamerg.evaluate(config, nnet_path, 'test', config.data.test, cfg.pairs, fid_note is not None,
                                    folder, cfg.batch_size, allow_untrained_condition=untrained)
    majority = demo.majority_rates(demo.read_jsonl(os.path.join(folder, 'pairs.jsonl')))
    return dict(commands=[line], metrics=summary['metrics'], majority=majority, fid_skipped_because=fid_note,
                settings={k: summary[k] for k in ('checkpoint', 'samples', 'sample_steps', 'guidance_scale', 'seed')})


def evaluate_trained(config, flag, folder):
    """The trained network's responses to held-out speaker turns."""
    return evaluate(config, flag, folder, final_nnet(config))


def evaluate_untrained(config, flag, folder):
    """The same evaluation of the network's initial weights: what training is compared with."""
    from libs import demo
    nnet = os.path.join(folder, 'nnet_init.safetensors')
    demo.export_initial_nnet(config, nnet)
    return evaluate(config, flag, folder, nnet, untrained=True)


def classify_expressions(config, flag, folder):
    """Train the expression classifier on rendered faces and read the generated response faces with it."""
    from safetensors.torch import save_file

    from libs import demo
    out, size = os.path.dirname(folder), resolution(config)
    net, classes, curve, heldout = demo.train_expression_classifier(config.demo.classifier, size, config.seed)
    save_file(net.state_dict(), os.path.join(folder, 'expression_classifier.safetensors'))
    result = dict(classes=classes, curve=curve, heldout_rendered_acc=heldout,
                  **demo.reference_agreement(net, classes, config, os.path.join(out, 'eval'), size))
    for name in ('eval', 'baseline'):
        result[name] = demo.expression_agreement(net, classes, os.path.join(out, name), size)
    logger.info('expression read as prescribed: trained %.3f, untrained %.3f, chance %.3f; reference faces %.3f, '
                'their codec reconstructions %.3f', result['eval']['agreement'], result['baseline']['agreement'],
                1 / len(classes), result['reference_faces'], result['codec_reconstructions'])
    return result


# What the face size (resolution()) is computed from: the stages that draw or encode faces at that size read them.
SIZE_KEYS = ('z_shape', 'autoencoder.block_out_channels')
STAGES = (
    # name, function, config keys it reads, stages whose outputs it reads, what it does
    ('data', make_data, ('seed', 'demo.dialogues', 'demo.test_dialogues', 'demo.listeners', *SIZE_KEYS), (),
     'writing a synthetic AvaMERG'),
    ('models', make_components, ('seed', 'clip_text', 'clip_img', 'clip_text_dim', 'clip_img_dim', 'num_text_tokens',
                                 'caption_decoder', 'demo.initial_caption_decoder', 'demo.tokenizers', *SIZE_KEYS),
     ('data',),
     'building tiny random encoders and caption decoder, tokenizers learned on the corpus'),
    ('codec', train_codec, ('seed', 'autoencoder', 'demo.codec'), ('models',), 'training the tiny AutoencoderKL'),
    ('features', extract, ('data',), ('codec',), 'encoding every pair with the VAE and CLIP encoders'),
    ('caption_decoder', train_caption_decoder, ('caption_decoder_train',), ('features',),
     'fine-tuning the caption decoder'),
    ('train', train_empath, ('seed', 'nnet', 'train', 'optimizer', 'data'), ('caption_decoder',),
     'training EmpathDiffuser'),
    ('eval', evaluate_trained, ('seed', 'sample', 'eval', 'demo.eval'), ('train',),
     'responding to held-out speaker turns'),
    ('baseline', evaluate_untrained, ('seed', 'nnet', 'train.init_from', 'sample', 'eval', 'demo.eval'),
     ('caption_decoder',), 'the same evaluation with the untrained network'),
    ('expression', classify_expressions, ('seed', 'demo.classifier'), ('eval', 'baseline'),
     'reading the generated faces with an expression classifier'),
)


def main(argv=None):
    """Parse the command line, run the stages, write the report; returns the exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--out', default='out/demo', help='output folder (a rerun reuses its finished stages)')
    parser.add_argument('--quick', action='store_true', help='shortened schedule (about 8 minutes; the test suite)')
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s')
    from libs import demo
    from libs.errors import UserError
    out = os.path.abspath(args.out)
    config, flag = load_config(out, args.quick)
    stages = [demo.Stage(name, functools.partial(fn, config, flag), keys, deps, what)
              for name, fn, keys, deps, what in STAGES]
    try:
        markers = demo.run_stages(stages, config, out)
    except UserError as err:
        logger.error('%s', err)
        return 2
    summary = demo.write_report(out, config, markers, 'quick' if args.quick else 'full')
    logger.info('report: %s', os.path.join(out, 'report.html'))
    logger.info('learning: %s', json.dumps(summary['learning']))
    return 0


if __name__ == '__main__':
    # Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads make torch 5-10x slower.
    # Set before torch loads (here and in the tools the demo starts, which inherit the environment).
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    from libs import cli
    sys.exit(cli.call(main))
