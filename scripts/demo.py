"""The EmpathDiffuser workflow on a synthetic AvaMERG, on a laptop CPU: ``make demo`` -> out/demo/report.html.

    python scripts/demo.py --out out/demo            # full schedule (at most 15 minutes on two cores)
    python scripts/demo.py --out /tmp/demo --quick   # shortened schedule (at most 6 minutes; the test suite)
    python scripts/demo.py --readme_table assets/demo/metrics.json                 # its README table
    python scripts/demo.py --readme_table assets/demo/metrics.json --write_readme  # ... into README.md

As the real workflow: components -> features -> a UniDiffuser (pre-trained here, on the synthetic faces and
utterances, and saved as an official uvit_v1.pth) -> the EmpathDiffuser fine-tune of configs/avamerg_empath.py ->
evaluation, against controls. The stages are the table STAGES below; each writes its own folder under --out and is
skipped on a rerun once done with the same settings (configs/demo.py; a changed setting rebuilds that stage and the
ones after it). The project's tools run in this process (one start-up instead of a dozen); the console shows the
command line that does the same by hand.
"""
import dataclasses
import functools
import importlib.util
import json
import logging
import os
import shlex
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run as a file, Python puts scripts/ (not the repository root) on the path

from absl import flags  # noqa: E402

from libs import cli  # noqa: E402
from libs.errors import UserError  # noqa: E402

logger = logging.getLogger('demo')
FLAGS = flags.FLAGS
README = os.path.join(ROOT, 'README.md')


def define_flags():
    """The command line (defined only when run as a script, so importing this module defines no flags)."""
    flags.DEFINE_string('out', 'out/demo', 'output folder (a rerun reuses its finished stages)')
    flags.DEFINE_bool('quick', False, 'shortened schedule (the test suite\'s)')
    flags.DEFINE_integer('seed', 0, 'seed of everything, for the run-to-run spread')
    flags.DEFINE_string('readme_table', None, 'print the README\'s results table rendered from this metrics.json of '
                        'a demo run, instead of running the demo')
    flags.DEFINE_bool('write_readme', False, 'with --readme_table: write the table into --readme, between its '
                      '<!-- demo-table:start --> and <!-- demo-table:end --> lines')
    flags.DEFINE_string('readme', README, 'the README --write_readme writes into')


def load_config(out: str, quick: bool, seed: int = 0, pretrain: bool = False):
    """configs/demo.py for this output folder, schedule and seed, and the --config flag that gives the tools the same."""
    arg = ','.join([out] + ['quick'] * quick + ['pretrain'] * pretrain + [f'seed={seed}'] * (seed != 0))
    spec = importlib.util.spec_from_file_location('demo_config', os.path.join(ROOT, 'configs', 'demo.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(arg), f'--config=configs/demo.py:{arg}'


@dataclasses.dataclass
class Run:
    """What every stage may read besides its own config: the output folder, both configs and their --config flags."""
    out: str
    configs: dict   # 'finetune' / 'pretrain' -> config
    flags: dict     # 'finetune' / 'pretrain' -> the --config flag that gives a tool that config

    def folder(self, stage: str) -> str:
        """The folder of a stage."""
        return os.path.join(self.out, stage)


def command(*args) -> str:
    """Log the command line that does what the demo is about to do in-process; returns it for the report."""
    line = shlex.join(['python', *args])
    logger.info('$ %s', line)
    return line


def resolution(config) -> int:
    """Face size in pixels: the latent size times the codec's downsampling."""
    return config.z_shape[-1] * 2 ** (len(config.autoencoder.block_out_channels) - 1)


def run_dir(config) -> str:
    """train_empath.py's run folder."""
    return os.path.join(config.workdir, config.name)


def test_pairs(config, n: int):
    """Metadata of the first n pairs of the test feature cache (ids, stems, raw texts, emotion)."""
    from libs.features import FeatureDataset
    data = FeatureDataset(config.data.test)
    keys = ('conversation_id', 'turn_id', 'speaker_stem', 'response_stem', 'response_text_raw', 'emotion')
    return [{k: data[i][k] for k in keys} for i in range(min(n, len(data)))]


# ----------------------------------------------------------------------------------------------------------------
# Stages: each takes (its config, the Run, its folder) and returns a summary for its stage_done marker
# ----------------------------------------------------------------------------------------------------------------

def make_data(config, run, folder):
    """A synthetic AvaMERG in the real layout, faces drawn at the demo's resolution."""
    from libs.synthetic import make_dataset
    splits = make_dataset(folder, config.seed, config.demo.dialogues, config.demo.test_dialogues,
                          size=resolution(config), listeners=tuple(config.demo.listeners))
    return {name: dict(dialogues=len(d), turns=sum(len(x['turns']) for x in d)) for name, d in splits.items()}


def make_components(config, run, folder):
    """Random CLIP text/vision encoders and caption decoder; their tokenizers are learned on the training corpus."""
    from libs.demo import stages
    with open(os.path.join(config.data.root, 'train.json'), encoding='utf-8') as f:
        dialogues = json.load(f)
    # The last turn's history holds every earlier utterance of the dialogue; its response is the last one.
    corpus = [u['utterance'] for d in dialogues for u in d['turns'][-1]['dialogue_history']]
    corpus += [d['turns'][-1]['response'] for d in dialogues]
    return stages.build_components(config, corpus, config.seed, config.demo.initial_caption_decoder,
                                   resolution(config))


def train_codec(config, run, folder):
    """Train the tiny AutoencoderKL on training faces, save it in the LDM layout, check it through the real loader."""
    import random

    import torch

    from libs.autoencoder import ldm_state_dict_from_diffusers, load_autoencoder, to_pil
    from libs.demo import stages
    cfg, size = config.demo.codec, resolution(config)
    paths = stages.face_paths(config.data.root, 'train')
    faces = stages.load_faces(random.Random(config.seed).sample(paths, min(cfg.faces, len(paths))), size)
    codec, curve = stages.train_codec(config.autoencoder, faces, cfg.steps, cfg.batch_size, cfg.lr, cfg.kl_weight,
                                      config.seed)
    correction = stages.normalise_latent_scale(codec, faces)
    torch.save(ldm_state_dict_from_diffusers(codec.vae.state_dict()), config.autoencoder.pretrained_path)
    codec = load_autoencoder(config.autoencoder.pretrained_path, config.autoencoder)
    heldout = stages.load_faces(stages.face_paths(config.data.root, 'test')[:256], size)
    with torch.no_grad():
        mean = codec.encode_moments(heldout).chunk(2, dim=1)[0] * codec.scale_factor
        reconstructed = codec.decode(mean).clamp(-1, 1)
    mse = (reconstructed - heldout).pow(2).mean().item() / 4  # pixels in [-1, 1]: a quarter of the [0, 1] MSE
    shown = 12
    for name, images in (('originals', heldout[:shown]), ('reconstructions', reconstructed[:shown])):
        to_pil(torch.cat(list(images), dim=2)).save(os.path.join(folder, f'{name}.png'))
    return dict(curve=curve, scale_correction=correction, heldout_mse=mse,
                heldout_psnr=10 * torch.log10(torch.tensor(1 / mse)).item(), latent_std=mean.std().item(),
                params=sum(p.numel() for p in codec.parameters()), faces=len(faces))


def extract(config, run, folder):
    """Feature caches of every split (extract_features.py)."""
    import extract_features
    commands, counts = [], {}
    for split in extract_features.SPLITS:
        commands.append(command('extract_features.py', run.flags['finetune'], f'--split={split}'))
        extract_features.extract(config, split)
        with open(os.path.join(config.data[split], 'manifest.json'), encoding='utf-8') as f:
            counts[split] = json.load(f)['num_pairs']
    return dict(commands=commands, pairs=counts)


def train_caption_decoder(config, run, folder):
    """Fine-tune the random caption decoder on the corpus (train_caption_decoder.py); report its round trip."""
    from libs import caption_decoder_training
    initial = config.copy_and_resolve_references()
    initial.workdir, initial.caption_decoder.pretrained_path = folder, config.demo.initial_caption_decoder
    line = command('train_caption_decoder.py', run.flags['finetune'], f'--config.workdir={folder}',
                   f'--config.caption_decoder.pretrained_path={config.demo.initial_caption_decoder}')
    report = caption_decoder_training.train(initial)
    return dict(commands=[line], **{k: report[k] for k in ('bleu_before', 'bleu_after', 'loss_curve', 'samples',
                                                               'train_utterances', 'heldout_utterances')})


def train_classifier(config, run, folder):
    """Train the expression classifier on drawn faces; check both instruments on the reference faces and texts."""
    from safetensors.torch import save_file

    from libs.demo import measure
    net, classes, curve, heldout = measure.train_expression_classifier(config.demo.classifier, resolution(config),
                                                                      config.seed)
    save_file(net.state_dict(), os.path.join(folder, 'expression_classifier.safetensors'))
    pairs = test_pairs(config, config.demo.eval.pairs)
    texts = measure.agreement([measure.reaction_of(p['response_text_raw']) for p in pairs],
                              [measure.prescribed(p['emotion']) for p in pairs])
    return dict(classes=classes, curve=curve, heldout_rendered_acc=heldout, pairs=len(pairs), reference_texts=texts,
                **measure.reference_agreement(net, classes, config, pairs, resolution(config)))


def train_run(config, flag):
    """train_empath.py on config; returns its command line, its metrics.jsonl records and the export's record."""
    import train_empath

    from libs import trainer
    from libs.demo import measure
    line = command('train_empath.py', flag)
    train_empath.train(config)
    with open(os.path.join(run_dir(config), trainer.EXPORT_INFO), encoding='utf-8') as f:
        selected = json.load(f)
    return line, measure.read_jsonl(os.path.join(run_dir(config), 'metrics.jsonl')), selected


def difference_from_pretrained(config, run, nnet_path: str) -> dict:
    """max |Δε| of an exported EmpathDiffuser network against the pre-trained UniDiffuser, on val pairs."""
    import torch

    from libs import trainer
    from libs.demo import measure
    from libs.uvit import build_nnet, load_nnet_weights
    empath, _ = trainer.load_exported_nnet(nnet_path)
    pretrained = build_nnet(run.configs['pretrain'].nnet)
    load_nnet_weights(pretrained, config.train.init_from)
    with torch.random.fork_rng():
        return measure.output_difference(empath, pretrained, config, config.data.val, config.train.val_pairs)


def pretrain(config, run, folder):
    """Pre-train a small UniDiffuser (train_empath.py, joint objective) and save it as an official uvit_v1.pth."""
    from libs import trainer
    from libs.demo import stages
    line, curve, selected = train_run(config, run.flags['pretrain'])
    export = stages.export_official(os.path.join(run_dir(config), trainer.EXPORT), config.pretrain.export,
                                    config.nnet)
    logger.info('pre-trained UniDiffuser: %s (%d keys, loads strictly into %s)', export['path'], export['keys'],
                export['loads_strictly_into'])
    return dict(commands=[line], curve=curve, selected=selected, export=export)


def check_init(config, run, folder):
    """The fine-tune's initial network (as train_empath.py builds it) against the pre-trained one, on val pairs."""
    from libs.demo import stages
    nnet = os.path.join(folder, 'nnet_init.safetensors')
    stages.export_initial_nnet(config, nnet)
    difference = difference_from_pretrained(config, run, nnet)
    logger.info('fine-tune at step 0 vs the pre-trained network: max |Δε| %.3g with real speaker turns, %.3g with '
                'none (%d val pairs)', difference['speaker_max'], difference['no_speaker_max'], difference['pairs'])
    return dict(difference=difference, nnet=nnet)


def finetune(config, run, folder):
    """Fine-tune the pre-trained UniDiffuser into EmpathDiffuser (train_empath.py, avamerg_empath's recipe)."""
    line, curve, selected = train_run(config, run.flags['finetune'])
    nnet = trained_nnet(config)
    # How far training moved the network from UniDiffuser: with the speaker, and with no speaker at all.
    return dict(commands=[line], curve=curve, selected=selected, nnet=nnet,
                difference=difference_from_pretrained(config, run, nnet))


def eval_command(config, run, nnet, features, folder, *extra):
    """The eval_avamerg.py command line of one demo evaluation."""
    return command('eval_avamerg.py', run.flags['finetune'], f'--nnet_path={nnet}', f'--features={features}',
                   f'--output_path={folder}', f'--limit={config.demo.eval.pairs}',
                   f'--batch_size={config.demo.eval.batch_size}', '--skip_fid', *extra)


def classifier(run):
    """The expression classifier of the classifier stage and its classes."""
    from libs.demo import measure
    classes = measure.response_expressions()
    path = os.path.join(run.folder('classifier'), 'expression_classifier.safetensors')
    return measure.load_classifier(path, len(classes)), classes


def read_outputs(config, run, folder):
    """Both instruments' reading of an evaluation folder."""
    from libs.demo import measure
    return measure.read_evaluation(*classifier(run), folder, resolution(config))


def evaluate(config, run, folder, nnet, features, untrained=False):
    """eval_avamerg.py at the config's sampling setting, then both instruments on its outputs; `untrained` evaluates
    a network whose speaker path has not been trained yet (the fine-tune's starting point)."""
    from libs import evaluation
    line = eval_command(config, run, nnet, features, folder, *(['--allow_untrained_condition'] if untrained else []))
    summary = evaluation.evaluate(config, nnet, 'test', features, config.demo.eval.pairs, True, folder,
                                    config.demo.eval.batch_size, allow_untrained_condition=untrained)
    return dict(commands=[line], metrics=summary['metrics'], reads=read_outputs(config, run, folder),
                settings={k: summary[k] for k in ('checkpoint', 'samples', 'sample_steps', 'guidance_scale', 'seed')})


def trained_nnet(config, online=False) -> str:
    """The fine-tune's exported EMA network, or the online network of the same checkpoint."""
    from libs import trainer
    if not online:
        return os.path.join(run_dir(config), trainer.EXPORT)
    with open(os.path.join(run_dir(config), trainer.EXPORT_INFO), encoding='utf-8') as f:
        return os.path.join(run_dir(config), json.load(f)['checkpoint'], 'nnet.safetensors')


def sweep(config, run, folder):
    """The fine-tuned network over guidance scales x step counts (eval_avamerg.py --scales --steps), both instruments
    on every setting; the config's own setting is one of them, the one the learning table reports."""
    from libs import evaluation
    from libs.demo import measure
    cfg, nnet, ev = config.demo.sweep, trained_nnet(config), config.demo.eval
    line = eval_command(config, run, nnet, config.data.test, folder,
                        f'--scales={",".join(f"{s:g}" for s in cfg.scales)}',
                        f'--steps={",".join(map(str, cfg.steps))}')
    rows = evaluation.evaluate_sweep(config, list(cfg.scales), list(cfg.steps), nnet, 'test', config.data.test,
                                       ev.pairs, True, folder, ev.batch_size)
    default = f'scale{config.sample.scale:g}_steps{config.sample.sample_steps}'
    if default not in [r['setting'] for r in rows]:
        raise ValueError(f'the sweep {cfg.to_dict()} must contain the config\'s own setting ({default})')
    for r in rows:
        with open(os.path.join(folder, r['setting'], 'metrics.json'), encoding='utf-8') as f:
            r['metrics'] = json.load(f)['metrics']
        r['reads'] = read_outputs(config, run, os.path.join(folder, r['setting']))
        r.update(face_agreement=r['reads']['face_agreement'], text_agreement=r['reads']['text_agreement'])
    records = measure.read_jsonl(os.path.join(folder, default, 'pairs.jsonl'))
    return dict(commands=[line], rows=rows, default=default, majority=measure.majority_rates(records))


def shuffled(config, run, folder):
    """The control: the fine-tuned network answering every test pair's speaker turn from another conversation."""
    from libs.demo import stages
    features = os.path.join(folder, 'features')
    control = stages.shuffle_speakers(config.data.test, features, config.seed)
    return dict(evaluate(config, run, os.path.join(folder, 'eval'), trained_nnet(config), features), control=control)


def pretrained(config, run, folder):
    """The control: the fine-tune's starting point (the pre-trained UniDiffuser, zero gates, an untrained head)."""
    return evaluate(config, run, folder, os.path.join(run.folder('init'), 'nnet_init.safetensors'), config.data.test,
                    untrained=True)


def online(config, run, folder):
    """The online (not averaged) network of the exported checkpoint, against its EMA."""
    return evaluate(config, run, folder, trained_nnet(config, online=True), config.data.test)


def baselines(config, run, folder):
    """The evaluation's baselines on the same held-out pairs (the speaker copied, the nearest training response in
    CLIP text space, the fine-tuned network without speaker guidance), every number with its bootstrap interval."""
    from libs import evaluation
    names, ev, nnet = ('copy_speaker', 'retrieval', 'no_guidance'), config.demo.eval, trained_nnet(config)
    line = eval_command(config, run, nnet, config.data.test, folder, f'--baselines={",".join(names)}')
    summary = evaluation.evaluate(config, nnet, 'test', config.data.test, ev.pairs, True, folder, ev.batch_size,
                                  baselines=list(names))
    return dict(commands=[line], rows=summary['baselines'], bootstrap=summary['bootstrap'], pairs=summary['samples'],
                expression_classifier=summary['expression_classifier'])


def modes(config, run, folder):
    """UniDiffuser's t2i and i2t with the pre-trained network and with the fine-tuned one (no speaker)."""
    from libs.demo import measure
    net, classes = classifier(run)
    pairs = test_pairs(config, config.demo.modes.samples)
    result, commands, pre = {}, [], run.configs['pretrain']
    for name, role, cfg, nnet in (('pretrained', 'pretrain', pre, pre.pretrain.export),
                                  ('finetuned', 'finetune', config, trained_nnet(config))):
        commands.append(command('sample_multi.py', run.flags[role], f'--nnet_path={nnet}', '--mode=t2i',
                                f'--prompt={pairs[0]["response_text_raw"]}'))
        result[name] = measure.unidiffuser_modes(cfg, nnet, pairs, net, classes, os.path.join(folder, name))
        logger.info('%s: t2i faces show their utterance\'s reaction %.2f, i2t utterances their face\'s %.2f', name,
                    result[name]['t2i_agreement'], result[name]['i2t_agreement'])
    return dict(result, commands=commands)


# What the face size (resolution()) is computed from: the stages that draw or encode faces at that size read them.
SIZE_KEYS = ('z_shape', 'autoencoder.block_out_channels')
# What every computing stage's bits depend on besides its own settings (the thread count: the order of float sums).
RUN_KEYS = ('seed', 'demo.threads')
EVAL_KEYS = (*RUN_KEYS, 'sample', 'eval', 'demo.eval')
STAGES = (
    # name, function, config it reads ('pretrain' or 'finetune'), config keys, stages whose outputs it reads, what
    ('data', make_data, 'finetune', ('seed', 'demo.dialogues', 'demo.test_dialogues', 'demo.listeners', *SIZE_KEYS),
     (), 'writing a synthetic AvaMERG'),
    ('models', make_components, 'finetune', (*RUN_KEYS, 'clip_text', 'clip_img', 'clip_text_dim', 'clip_img_dim',
                                             'num_text_tokens', 'caption_decoder', 'demo.initial_caption_decoder',
                                             'demo.tokenizers', *SIZE_KEYS),
     ('data',), 'building tiny random encoders and caption decoder, tokenizers learned on the corpus'),
    ('codec', train_codec, 'finetune', (*RUN_KEYS, 'autoencoder', 'demo.codec'), ('models',),
     'training the tiny AutoencoderKL'),
    ('features', extract, 'finetune', ('data', 'demo.threads'), ('codec',),
     'encoding every pair with the VAE and CLIP encoders'),
    ('caption_decoder', train_caption_decoder, 'finetune', ('caption_decoder_train', 'demo.threads'), ('features',),
     'fine-tuning the caption decoder'),
    ('classifier', train_classifier, 'finetune', (*RUN_KEYS, 'demo.classifier', 'demo.eval.pairs'), ('features',),
     'training the expression classifier (a measuring instrument)'),
    ('pretrain', pretrain, 'pretrain', (*RUN_KEYS, 'nnet', 'train', 'optimizer', 'data', 'pretrain'),
     ('caption_decoder',), 'pre-training a small UniDiffuser (joint image-text objective, no speaker)'),
    ('init', check_init, 'finetune', (*RUN_KEYS, 'nnet', 'train.init_from', 'train.val_pairs', 'data.val'),
     ('pretrain',),
     'checking that the fine-tune starts from the pre-trained network'),
    ('train', finetune, 'finetune', (*RUN_KEYS, 'nnet', 'train', 'optimizer', 'data'), ('init',),
     'fine-tuning it into EmpathDiffuser (configs/avamerg_empath.py recipe)'),
    ('eval', sweep, 'finetune', (*EVAL_KEYS, 'demo.sweep'), ('train', 'classifier'),
     'responding to held-out speaker turns over guidance scales and step counts'),
    ('shuffled', shuffled, 'finetune', EVAL_KEYS, ('train', 'classifier'),
     'control: the same network answering shuffled speaker turns'),
    ('pretrained', pretrained, 'finetune', EVAL_KEYS, ('init', 'classifier'),
     'control: the fine-tune\'s starting point, the pre-trained network'),
    ('online', online, 'finetune', EVAL_KEYS, ('train', 'classifier'), 'the online network against its EMA'),
    ('baselines', baselines, 'finetune', EVAL_KEYS, ('train',),
     'baselines scored by the same code: the speaker copied, retrieval, no speaker guidance'),
    ('modes', modes, 'finetune', (*RUN_KEYS, 'sample', 'demo.modes'), ('train', 'classifier'),
     'UniDiffuser\'s t2i and i2t before and after fine-tuning'),
)


def run_demo(out: str, quick: bool, seed: int) -> dict:
    """Run the stages into `out`, write the report; returns the metrics."""
    from libs.demo import report, stages
    out = os.path.abspath(out)
    run = Run(out, {}, {})
    for role in ('finetune', 'pretrain'):
        run.configs[role], run.flags[role] = load_config(out, quick, seed, pretrain=role == 'pretrain')
    stages.make_reproducible(run.configs['finetune'].demo.threads)
    table = [stages.Stage(name, functools.partial(fn, run.configs[role], run), keys, deps, what, run.configs[role])
             for name, fn, role, keys, deps, what in STAGES]
    markers = stages.run_stages(table, run.configs['finetune'], out)
    summary, times = report.write_report(out, run.configs['finetune'], markers, 'quick' if quick else 'full')
    print(report.terminal_summary(summary, times, os.path.join(out, 'report.html')))
    return summary


def main(argv):
    """Run the demo, or render (and write) the README's table of a finished run."""
    del argv
    logging.basicConfig(level=logging.INFO, format='%(asctime)s %(name)s: %(message)s', force=True)
    if FLAGS.readme_table is None:
        if FLAGS.write_readme:
            raise UserError('--write_readme needs --readme_table=METRICS_JSON (the report to render)')
        run_demo(FLAGS.out, FLAGS.quick, FLAGS.seed)
        return
    from libs.demo import readme
    table = readme.render_table(readme.read_metrics(FLAGS.readme_table), FLAGS.readme_table)
    if FLAGS.write_readme:
        readme.write_block(FLAGS.readme, table)
        print(f'wrote the table of {FLAGS.readme_table} into {FLAGS.readme}')
    else:
        print(table)


if __name__ == '__main__':
    # Idle OpenMP threads sleep instead of spinning: on a busy machine spinning threads make torch 5-10x slower.
    # Set before torch loads (here and in the tools the demo starts, which inherit the environment).
    os.environ.setdefault('OMP_WAIT_POLICY', 'PASSIVE')
    os.environ.setdefault('HF_HUB_OFFLINE', '1')
    define_flags()
    cli.run(main)
