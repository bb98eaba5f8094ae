"""Fine-tune UniDiffuser-v1 into EmpathDiffuser on cached AvaMERG features (DESIGN §2).

    accelerate launch --config_file configs/accelerate/ddp.yaml train_empath.py --config=configs/avamerg_empath.py
    python train_empath.py --config=configs/avamerg_tiny.py --config.train.n_steps=50        # one process, CPU

The run folder ``<workdir>/<name>`` holds config.json/.yaml, log.txt, metrics.jsonl, tracker logs, samples/,
ckpts/<step>.ckpt/ (nnet and nnet_ema safetensors carrying the resolved config, so ``libs.trainer.load_exported_nnet``
rebuilds a model from the file alone; optimizer, scheduler, RNG states and data position) and ``nnet_ema.safetensors``,
the EMA network of the best checkpoint by validation loss (``nnet_ema.json`` says which), updated at every checkpoint:
the file sample_multi.py, eval_avamerg.py and app.py take. A restarted run continues from its newest complete
checkpoint. Training reads the train cache and validates on the val cache (conversations held out of train.json);
it never reads the test split. With an unconditional ``nnet.name`` (uvit_multi_post_ln_v1) it trains UniDiffuser's
joint objective on the (face, utterance) pairs of speakers and listeners, e.g. to pre-train a small UniDiffuser.
With ``train.lora.enabled`` (libs/lora.py) checkpoints hold only the trained tensors and the export is merged.
The run folder is locked while the run lasts (libs/runlock.py): a second run on it is refused. A resume that would
change a setting the run cannot change (``trainer.FIXED_SETTINGS``: network, objective, data, seed, batch) is refused
naming it; other changes (learning rate, n_steps, intervals) are applied and logged. Exit codes: 2 bad input
(UserError), 3 stopped by the non-finite guard.
"""
import contextlib
import functools
import json
import logging
import os
import time

import torch
from absl import app, flags
from ml_collections import config_flags
from tqdm import tqdm

from libs import cli, config_check, distributed, features, hub, logs, lora, memory, runlock, trainer
from libs.diffusion import Schedule, stable_diffusion_betas
from libs.errors import UserError
from libs.features import FeatureDataset, RankSampler, ShuffledStream, StreamDataset, micro_batch_size
from libs.io import atomic_write_bytes, writing
from libs.uvit import NETS

logger = logging.getLogger('train_empath')
FLAGS = flags.FLAGS


def define_flags() -> None:
    """The command line (defined only when run as a script, so importing this module defines no flags)."""
    config_flags.DEFINE_config_file('config', None, 'Training config file, e.g. configs/avamerg_empath.py.',
                                    lock_config=False)
    flags.DEFINE_bool('dry_run', False, 'Check the config, data and weights, build everything, then exit.')
    logs.define_flags()


def setup_logging(run_dir: str, is_main: bool) -> None:
    """INFO logs (main process only) to stderr and <run>/log.txt; other processes log warnings."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, 'train_empath', False)]:
        root.removeHandler(handler)
    root.setLevel(logging.INFO if is_main else logging.WARNING)
    handlers = [] if root.handlers else [logging.StreamHandler()]  # absl's app.run installs its own
    if is_main:
        os.makedirs(run_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(run_dir, 'log.txt')))
    for handler in handlers:
        handler.train_empath = True
        handler.setFormatter(logging.Formatter('%(asctime)s %(name)s %(levelname)s: %(message)s'))
        root.addHandler(handler)


def check_features(manifest: dict, config, root: str) -> None:
    """The cached tensors must have the shapes this config's networks expect."""
    z = config.z_shape
    per_role = dict(moments=[2 * z[0], *z[1:]], clip_img=[1, config.clip_img_dim],
                    text=[config.num_text_tokens, config.clip_text_dim])
    for role in ('speaker', 'response'):
        for key, shape in per_role.items():
            found = manifest['tensors'][f'{role}_{key}']['shape']
            if list(found) != shape:
                raise UserError(f'features in {root} have {role}_{key} of shape {found}, config expects {shape} '
                                f'(z_shape={tuple(z)}); extract features with this config or pick the config they '
                                'were extracted with')


def check_labels(dataset, config, root: str, required: bool) -> None:
    """Log how many pairs have a known emotion label; with none the emotion head cannot learn (refused if required)."""
    labels = dataset.labels()
    known = int((labels >= 0).sum())
    logger.info('%s: %d of %d pairs have a known emotion label', root, known, len(labels))
    if known or not NETS[config.nnet.name].get('condition', False) or config.train.emotion_weight == 0:
        return
    problem = f'none of the {len(labels)} pairs in {root} has a known emotion label (all are -1)'
    if not required:
        logger.warning('%s: its emotion metrics will be empty', problem)
        return
    raise UserError(f'{problem}, so the emotion head cannot learn: check the dataset\'s '
                    'chain_of_empathy.speaker_emotion values and re-extract, or set --config.train.emotion_weight=0 '
                    'to train without the emotion loss')


def flat_hparams(config) -> dict:
    """The config flattened to scalar values, as trackers want hyperparameters."""
    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, f'{prefix}{k}/')
            else:
                yield f'{prefix}{k}', v if isinstance(v, (int, float, str, bool)) else str(v)
    return dict(walk(config.to_dict(), ''))


def append_metrics(path: str, record: dict) -> None:
    """Append one JSON line to metrics.jsonl."""
    with writing(path), open(path, 'a', encoding='utf-8') as f:
        f.write(json.dumps(record) + '\n')


def read_metrics_lines(path: str) -> list:
    """(record, line) of every line of metrics.jsonl; a torn line (a crash or full disk mid-append) is skipped."""
    rows = []
    with open(path, encoding='utf-8') as f:
        for number, line in enumerate(f, 1):
            try:
                rows.append((json.loads(line), line if line.endswith('\n') else line + '\n'))
            except json.JSONDecodeError:
                logger.warning('%s:%d: skipping a torn line (an interrupted write)', path, number)
    return rows


def truncate_metrics(path: str, step: int) -> None:
    """Drop metric lines logged after ``step`` by a run that died before its next checkpoint (an atomic rewrite)."""
    if os.path.isfile(path):
        lines = [line for record, line in read_metrics_lines(path) if record.get('step', 0) <= step]
        atomic_write_bytes(path, ''.join(lines).encode('utf-8'))


@runlock.scope
def train(config, dry_run: bool = False) -> dict:
    """Run (or resume) a training run; returns the final training state."""
    from accelerate import Accelerator
    config_check.check(config, 'model', 'sample', 'train')
    tc = config.train
    hub.preflight(config, ('init_from', 'caption_decoder', 'autoencoder' if tc.sample_every > 0 else None))

    # Accelerator, run folder, logging -----------------------------------------------------------------------------
    run_dir = os.path.join(config.workdir, config.name)
    mixed_precision = config.mixed_precision if torch.cuda.is_available() else 'no'  # bf16 autocast only pays on GPUs
    if config.log_with == 'wandb':
        os.environ.setdefault('WANDB_MODE', 'offline')  # never require a login; WANDB_MODE=online opts in
    accelerator = Accelerator(mixed_precision=mixed_precision, log_with=config.log_with or None, project_dir=run_dir)
    is_main, device, world = accelerator.is_main_process, accelerator.device, accelerator.num_processes
    runlock.take(run_dir, 'training run')
    setup_logging(run_dir, is_main)
    metrics_path = os.path.join(run_dir, 'metrics.jsonl')
    logger.info('%d process(es) on %s, mixed precision %s, run folder %s', world, device, mixed_precision, run_dir)
    if tc.resume:
        trainer.check_resumable(run_dir, config)

    # Data: endless shuffled stream of training pairs; each process reads its slice of every batch ------------------
    train_set = FeatureDataset(config.data.train, config.data.max_open_shards)
    check_features(train_set.manifest, config, config.data.train)
    check_labels(train_set, config, config.data.train, required=True)
    val_set = FeatureDataset(config.data.val, config.data.max_open_shards) if config.data.val else None
    if val_set is not None:
        check_features(val_set.manifest, config, config.data.val)
        check_labels(val_set, config, config.data.val, required=False)
        if val_set.manifest.get('split') == 'test':
            raise UserError(f'config.data.val={config.data.val} holds features of the test split; checkpoints are '
                            'selected on conversations held out of train.json: extract them with '
                            '`extract_features.py --split=val` and point config.data.val at that folder')
        val_indices = ShuffledStream(val_set.shard_sizes, config.seed, len(val_set.shards)).permutation(0)
        val_indices = val_indices[:tc.val_pairs].tolist()
    features.check_training_caches(config, train_set.manifest, val_set.manifest if val_set is not None else None)
    micro_batch = micro_batch_size(tc.batch_size, tc.grad_accum, world)
    drop = trainer.speaker_dropout(tc)

    # Model, EMA, optimizer, frozen text reducer --------------------------------------------------------------------
    torch.manual_seed(config.seed)  # every process initialises the new parameters identically
    nnet = trainer.build_model(config)
    ema = trainer.make_ema(nnet).to(device)
    distributed.shard_model(nnet, accelerator)  # FSDP2 where the launch asks for FSDP and accelerate cannot (CPU)
    optimizer = trainer.make_optimizer(nnet, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(trainer.warmup, warmup_steps=config.optimizer.warmup_steps))
    nnet, optimizer = distributed.prepare(accelerator, nnet, optimizer)
    caption_decoder = trainer.load_text_reducer(config, device)
    encode_text = caption_decoder.encode_prefix
    schedule = Schedule(stable_diffusion_betas())
    sampling = trainer.load_sampling(config, caption_decoder, device)
    logger.info('U-ViT: %.2fM parameters, %d pairs of training features', sum(p.numel() for p in ema.parameters())
                / 1e6, len(train_set))

    # Resume from the newest complete checkpoint, or start the run folder ------------------------------------------
    if is_main:
        trainer.remove_partial_checkpoints(run_dir)
    accelerator.wait_for_everyone()
    digest = trainer.features_digest(train_set.manifest)
    base = lora.base_digest(config)  # LoRA checkpoints hold no frozen weights: they resume on the same init_from
    state = dict(step=0, data_position=0, nonfinite_total=0, best_step=-1, best_val_loss=float('inf'),
                 train_features=digest, base_sha256=base)
    resumed = trainer.resume(run_dir, config, accelerator, nnet, ema, optimizer, scheduler, digest) if tc.resume \
        else None
    if resumed:
        lora.check_same_base(resumed.get('base_sha256'), base, config.train.init_from, run_dir)
        state = resumed
        logger.info('resumed from step %d (data position %d)', state['step'], state['data_position'])
        if state['step'] >= tc.n_steps:
            logger.info('the run is at step %d, train.n_steps=%d: nothing to train', state['step'], tc.n_steps)
    if is_main:
        truncate_metrics(metrics_path, state['step'])
        atomic_write_bytes(os.path.join(run_dir, 'config.json'), config.to_json(indent=2).encode('utf-8'))
        atomic_write_bytes(os.path.join(run_dir, 'config.yaml'), config.to_yaml().encode('utf-8'))
    if dry_run:
        logger.info('dry run: everything builds; micro-batch %d per process', micro_batch)
        return state
    accelerator.init_trackers(config.name, config=flat_hparams(config))
    stream = ShuffledStream(train_set.shard_sizes, config.seed, config.data.shuffle_window)
    loader = torch.utils.data.DataLoader(
        StreamDataset(train_set, stream), batch_size=micro_batch, num_workers=config.data.num_workers,
        sampler=RankSampler(state['data_position'], tc.batch_size, tc.grad_accum, accelerator.process_index, world),
        pin_memory=device.type == 'cuda', persistent_workers=config.data.num_workers > 0)
    batches = iter(loader)

    # Training loop --------------------------------------------------------------------------------------------------
    memory.check_training(config, device, world)  # CUDA: the planned step must fit the free memory (libs/memory.py)
    nnet.train()
    step, nonfinite_run, window = state['step'], 0, []
    progress = tqdm(total=tc.n_steps, initial=step, disable=not is_main, desc='train', dynamic_ncols=True)
    tic = time.perf_counter()
    while step < tc.n_steps:
        # Accumulate gradients of the global-batch mean over micro-batches (DDP syncs only on the last one).
        totals = torch.zeros(1 + len(trainer.LOSS_TERMS), device=device)
        guard = []  # per micro-batch: pair ids, per-pair losses, finite features (inspected only if the step fails)
        for m in range(tc.grad_accum):
            batch = trainer.to_device(next(batches), device)
            rand = trainer.to_device(trainer.draw_randomness(batch['position'].tolist(), config.seed, 'train', config,
                                                             schedule.N, drop), device)
            last = m == tc.grad_accum - 1
            with contextlib.nullcontext() if last else accelerator.no_sync(nnet):
                losses, _ = trainer.training_losses(nnet, batch, rand, encode_text, schedule, config)
                accelerator.backward(losses['loss'].mean() / tc.grad_accum)
            guard.append(trainer.guard_record(batch, losses['loss']))
            totals += torch.stack([losses[k].detach().mean() for k in ('loss', *trainer.LOSS_TERMS)]) / tc.grad_accum
        totals = accelerator.reduce(totals, 'mean')
        if accelerator.reduce(trainer.nonfinite_feature_count(guard), 'sum') > 0:  # a damaged cache: stop, naming it
            bad = trainer.nonfinite_pairs(guard, accelerator)[0]
            raise UserError(f'non-finite (NaN/Inf) features in {len(bad)} training pair(s) of {config.data.train}: '
                            f'{", ".join(bad[:5])}; re-extract the cache (extract_features.py --overwrite), which '
                            'refuses such shards')

        # Non-finite guard: skip the update (every process agrees, the loss is reduced), stop after K in a row.
        grad_norm = distributed.full_tensor(accelerator.clip_grad_norm_(nnet.parameters(),
                                                                        tc.grad_clip or float('inf')))
        if torch.isfinite(totals).all() and torch.isfinite(grad_norm):
            optimizer.step()
            trainer.update_ema(ema, accelerator.unwrap_model(nnet), trainer.ema_decay(step, tc.ema_rate))
            nonfinite_run = 0
            window.append(torch.cat([totals, grad_norm.reshape(1).float()]))
        else:
            nonfinite_run += 1
            state['nonfinite_total'] += 1
            pairs = ', '.join(trainer.nonfinite_pairs(guard, accelerator)[1][:5]) or 'none (the gradient overflowed)'
            logger.warning('step %d: non-finite loss or gradient, update skipped (%d in a row); pairs with a '
                           'non-finite loss: %s', step, nonfinite_run, pairs)
            if nonfinite_run >= tc.max_nonfinite:
                last = trainer.checkpoints(run_dir)
                raise trainer.TrainingDiverged(
                    f'{nonfinite_run} consecutive non-finite steps (up to step {step}; pairs with a non-finite loss: '
                    f'{pairs}); the newest good checkpoint is {last[-1] if last else "none"}. Lower optimizer.lr, '
                    'or raise train.max_nonfinite to tolerate more.')
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        step += 1
        state.update(step=step, data_position=state['data_position'] + tc.batch_size)
        progress.update(1)

        # Log the mean over the finite steps since the last log.
        if step % tc.log_every == 0 or step == tc.n_steps:
            record = dict(step=step, lr=scheduler.get_last_lr()[0], nonfinite_total=state['nonfinite_total'],
                          sec_per_step=(time.perf_counter() - tic) / tc.log_every)
            if window:
                mean = torch.stack(window).mean(0).tolist()
                record.update(zip(('loss', *(f'loss_{k}' for k in trainer.LOSS_TERMS), 'grad_norm'), mean))
            if is_main:
                append_metrics(metrics_path, record)
                progress.set_postfix(loss=f'{record.get("loss", float("nan")):.4f}')
            accelerator.log({f'train/{k}': v for k, v in record.items() if k != 'step'}, step=step)
            window, tic = [], time.perf_counter()

        # Validate the online and EMA networks on fixed pairs with fixed noise.
        val_loss = None
        if val_set is not None and tc.val_every > 0 and step % tc.val_every == 0:
            metrics = trainer.evaluate({'nnet': accelerator.unwrap_model(nnet), 'ema': ema}, val_set, val_indices,
                                       micro_batch, accelerator, encode_text, schedule, config)
            val_loss = metrics['ema/loss']
            if is_main:
                append_metrics(metrics_path, dict(step=step, **{f'val/{k}': v for k, v in metrics.items()}))
                logger.info('step %d validation: %s', step, ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()))
            accelerator.log({f'val/{k}': v for k, v in metrics.items()}, step=step)

        # Samples for fixed validation speaker turns (main process, EMA network).
        if sampling is not None and val_set is not None and step % tc.sample_every == 0:
            if is_main:
                fixed = torch.utils.data.default_collate([val_set[i] for i in val_indices[:tc.sample_n]])
                trainer.write_samples(sampling, ema, trainer.to_device(fixed, device),
                                      os.path.join(run_dir, 'samples', f'{step:07d}'), config.seed)
            accelerator.wait_for_everyone()

        # Checkpoint (keep the newest K plus the best by EMA validation loss).
        if step % tc.ckpt_every == 0 or step == tc.n_steps:
            if val_loss is not None and val_loss < state['best_val_loss']:
                state.update(best_step=step, best_val_loss=val_loss)
            with writing(os.path.join(run_dir, 'ckpts')):  # torch.save reports a full disk without an errno
                trainer.save_checkpoint(run_dir, step, accelerator, nnet, ema, optimizer, scheduler, state, config)
            if is_main:
                trainer.prune_checkpoints(run_dir, tc.keep_last, state['best_step'])
                write = functools.partial(lora.write_merged, ema) if lora.enabled(config) else trainer.link_or_copy
                state['export'] = trainer.export_ema(run_dir, state, step, write)
    progress.close()
    accelerator.end_training()
    if is_main and 'export' in state:
        logger.info('trained network: %s (EMA of step %d, %s)', os.path.join(run_dir, trainer.EXPORT),
                    state['export']['step'], state['export']['selected_by'])
    return state


def main(argv):
    """Command-line entry (through libs.cli: bad input exits with 2, the non-finite guard with 3)."""
    del argv
    if FLAGS.config is None:
        raise app.UsageError('pass --config=configs/avamerg_empath.py (or another training config)')
    logs.setup(FLAGS.verbose)
    state = train(FLAGS.config, FLAGS.dry_run)
    if 'export' in state:
        exported = os.path.join(FLAGS.config.workdir, FLAGS.config.name, trainer.EXPORT)
        print(f'Sample from it:\n  python sample_multi.py --config={config_flags.get_config_filename(FLAGS["config"])} '
              f'--nnet_path={exported} --mode=empath --img=assets/speaker_sad.png --prompt="I lost my job today."')


if __name__ == '__main__':
    define_flags()
    cli.run(main, flags_parser=logs.parse_flags)
