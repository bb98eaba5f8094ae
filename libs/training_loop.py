"""The training loop of train_empath.py: fine-tune UniDiffuser-v1 into EmpathDiffuser on cached features.

``train(config)`` reads top-down as commented blocks; the objective, checkpoints and validation are in libs/trainer.py.
The run folder ``<workdir>/<name>`` holds config.json/.yaml, log.txt, metrics.jsonl, tracker logs, samples/,
ckpts/<step>.ckpt/ and ``nnet_ema.safetensors`` (the EMA network of the best checkpoint by validation loss). A
restarted run continues from its newest checkpoint that loads. SIGTERM or SIGUSR1 (SLURM preemption, the time limit,
``scancel``) stops the run after the current optimizer step with a checkpoint of that step: libs.cli prints one
``stopped: ...`` line and exits 75, which scripts/slurm_train.sh answers with a requeue (docs/training_reliability.md).
"""
import contextlib
import functools
import json
import logging
import math
import os
import signal
import time

import torch
from tqdm import tqdm

from libs import config_check, distributed, hub, lora, memory, preemption, runlock, trainer
from libs.diffusion import Schedule, stable_diffusion_betas
from libs.errors import UserError
from libs.features import (FeatureDataset, RankSampler, ShuffledStream, StreamDataset, check_finite,
                           check_training_caches, derive_seed, micro_batch_size, reextract_command)
from libs.io import atomic_write_bytes, writing
from libs.uvit import NETS

logger = logging.getLogger('train_empath')
LOG_KEYS = ('loss', *(f'loss_{k}' for k in trainer.LOSS_TERMS), 'grad_norm')  # a row of the log window


# ----------------------------------------------------------------------------------------------------------------
# The run folder: logging and metrics.jsonl
# ----------------------------------------------------------------------------------------------------------------

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


def flat_hparams(config) -> dict:
    """The config flattened to scalar values, as trackers want hyperparameters."""
    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from walk(v, f'{prefix}{k}/')
            else:
                yield f'{prefix}{k}', v if isinstance(v, (int, float, str, bool)) else str(v)
    return dict(walk(config.to_dict(), ''))


def json_safe(value):
    """A metric value JSON can hold: a non-finite float becomes None (null), never a bare NaN token."""
    return value if not isinstance(value, float) or math.isfinite(value) else None


def append_metrics(path: str, record: dict) -> None:
    """Append one JSON line to metrics.jsonl (strict JSON: non-finite numbers are written as null)."""
    line = json.dumps({k: json_safe(v) for k, v in record.items()}, allow_nan=False)
    with writing(path), open(path, 'a', encoding='utf-8') as f:
        f.write(line + '\n')


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


# ----------------------------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------------------------

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


def load_features(config):
    """(training cache, validation cache or None, the fixed validation pair indices) after checking both caches."""
    train_set = FeatureDataset(config.data.train, config.data.max_open_shards)
    check_features(train_set.manifest, config, config.data.train)
    check_labels(train_set, config, config.data.train, required=True)
    if not config.data.val:
        check_training_caches(config, train_set.manifest)
        return train_set, None, []
    val_set = FeatureDataset(config.data.val, config.data.max_open_shards)
    check_features(val_set.manifest, config, config.data.val)
    check_labels(val_set, config, config.data.val, required=False)
    if val_set.manifest.get('split') == 'test':
        raise UserError(f'config.data.val={config.data.val} holds features of the test split; checkpoints are '
                        'selected on conversations held out of train.json: extract them with '
                        '`extract_features.py --split=val` and point config.data.val at that folder')
    check_training_caches(config, train_set.manifest, val_set.manifest)
    val_indices = ShuffledStream(val_set.shard_sizes, config.seed, len(val_set.shards)).permutation(0)
    val_indices = val_indices[:config.train.val_pairs].tolist()
    # Validation runs without the training step's non-finite guard: a NaN there would pass for a loss.
    check_finite(val_set, val_indices, 'config.data.val')
    return train_set, val_set, val_indices


def ignore_stop_signals(worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGUSR1 to the training process (SLURM signals every process of a job)."""
    del worker_id
    for signum in preemption.SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


def make_loader(train_set, config, state: dict, micro_batch: int, accelerator):
    """This process's endless iterator of micro-batches, starting at the run's data position."""
    tc = config.train
    stream = ShuffledStream(train_set.shard_sizes, config.seed, config.data.shuffle_window)
    loader = torch.utils.data.DataLoader(
        StreamDataset(train_set, stream), batch_size=micro_batch, num_workers=config.data.num_workers,
        sampler=RankSampler(state['data_position'], tc.batch_size, tc.grad_accum, accelerator.process_index,
                            accelerator.num_processes),
        pin_memory=accelerator.device.type == 'cuda', persistent_workers=config.data.num_workers > 0,
        worker_init_fn=ignore_stop_signals,
        # The loader draws its workers' base seed when iterated: from its own generator, not the global RNG that
        # network dropout uses and checkpoints restore (a resumed run would otherwise draw it twice).
        generator=torch.Generator().manual_seed(derive_seed('loader', config.seed)))
    return iter(loader)


# ----------------------------------------------------------------------------------------------------------------
# Model and resume
# ----------------------------------------------------------------------------------------------------------------

def build_networks(config, accelerator):
    """(nnet, EMA, optimizer, scheduler): the U-ViT initialised identically on every process, sharded or wrapped."""
    torch.manual_seed(config.seed)  # every process initialises the new parameters identically
    nnet = trainer.build_model(config)
    ema = trainer.make_ema(nnet).to(accelerator.device)
    distributed.shard_model(nnet, accelerator)  # FSDP2 where the launch asks for FSDP and accelerate cannot (CPU)
    optimizer = trainer.make_optimizer(nnet, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, functools.partial(trainer.warmup, warmup_steps=config.optimizer.warmup_steps))
    nnet, optimizer = distributed.prepare(accelerator, nnet, optimizer)
    return nnet, ema, optimizer, scheduler


def resume_or_start(run_dir, config, accelerator, nets, train_set) -> dict:
    """The training state of the newest checkpoint that loads (networks restored), or that of step 0."""
    if accelerator.is_main_process:
        trainer.remove_partial_checkpoints(run_dir)
    accelerator.wait_for_everyone()
    digest, base = trainer.features_digest(train_set.manifest), lora.base_digest(config)
    state = dict(step=0, data_position=0, nonfinite_total=0, nonfinite_run=0, best_step=-1,
                 best_val_loss=float('inf'), train_features=digest, base_sha256=base, log_window=torch.zeros(0))
    resumed = trainer.resume(run_dir, config, accelerator, *nets, digest) if config.train.resume else None
    if resumed:
        lora.check_same_base(resumed.get('base_sha256'), base, config.train.init_from, run_dir)
        state.update(resumed)
        logger.info('resumed from step %d (data position %d)', state['step'], state['data_position'])
        if state['step'] >= config.train.n_steps:
            logger.info('the run is at step %d, train.n_steps=%d: nothing to train', state['step'],
                        config.train.n_steps)
    return state


# ----------------------------------------------------------------------------------------------------------------
# One optimizer step
# ----------------------------------------------------------------------------------------------------------------

def accumulate_gradients(nnet, batches, accelerator, encode_text, schedule, config, drop):
    """Backward the global-batch mean over grad_accum micro-batches; returns (mean loss terms, guard records)."""
    tc, device = config.train, accelerator.device
    totals = torch.zeros(1 + len(trainer.LOSS_TERMS), device=device)
    guard = []  # per micro-batch: pair ids, per-pair losses, finite features (inspected only if the step fails)
    for m in range(tc.grad_accum):
        batch = trainer.to_device(next(batches), device)
        rand = trainer.to_device(trainer.draw_randomness(batch['position'].tolist(), config.seed, 'train', config,
                                                         schedule.N, drop), device)
        last = m == tc.grad_accum - 1
        with contextlib.nullcontext() if last else accelerator.no_sync(nnet):  # DDP syncs on the last one only
            losses, _ = trainer.training_losses(nnet, batch, rand, encode_text, schedule, config)
            accelerator.backward(losses['loss'].mean() / tc.grad_accum)
        guard.append(trainer.guard_record(batch, losses['loss']))
        totals += torch.stack([losses[k].detach().mean() for k in ('loss', *trainer.LOSS_TERMS)]) / tc.grad_accum
    return accelerator.reduce(totals, 'mean'), guard


def agree(accelerator, guard, stop: preemption.StopFlag):
    """(pairs with non-finite features, processes that got a stop signal), summed over processes in one
    all-reduce: every process sees the same numbers at the same step, so all of them stop at the same step."""
    votes = torch.stack([trainer.nonfinite_feature_count(guard).to(accelerator.device).long(),
                         torch.tensor(int(stop.requested), device=accelerator.device)])
    bad, stopping = accelerator.reduce(votes, 'sum').tolist()
    return bad, stopping


def apply_update(nnet, ema, optimizer, accelerator, totals, guard, state: dict, run_dir: str, tc):
    """Clip and take the optimizer step and the EMA update, or skip a non-finite step (every process agrees: the
    loss was reduced); returns the log row (None when skipped). Too many non-finite steps in a row stop the run."""
    grad_norm = distributed.full_tensor(accelerator.clip_grad_norm_(nnet.parameters(), tc.grad_clip or float('inf')))
    step = state['step']
    if torch.isfinite(totals).all() and torch.isfinite(grad_norm):
        optimizer.step()
        trainer.update_ema(ema, accelerator.unwrap_model(nnet), trainer.ema_decay(step, tc.ema_rate))
        state['nonfinite_run'] = 0
        return torch.cat([totals, grad_norm.reshape(1).float()]).detach().cpu()
    state['nonfinite_run'] += 1
    state['nonfinite_total'] += 1
    pairs = ', '.join(trainer.nonfinite_pairs(guard, accelerator)[1][:5]) or 'none (the gradient overflowed)'
    logger.warning('step %d: non-finite loss or gradient, update skipped (%d in a row); pairs with a non-finite '
                   'loss: %s', step, state['nonfinite_run'], pairs)
    if state['nonfinite_run'] >= tc.max_nonfinite:
        last = trainer.checkpoints(run_dir)
        raise trainer.TrainingDiverged(
            f'{state["nonfinite_run"]} consecutive non-finite steps (up to step {step}; pairs with a non-finite loss: '
            f'{pairs}); the newest good checkpoint is {last[-1] if last else "none"}. Lower optimizer.lr, or raise '
            'train.max_nonfinite to tolerate more.')
    return None


def log_row(state: dict, lr: float, seconds: float, log_every: int) -> dict:
    """The metrics.jsonl record of a log step: the mean of the finite steps since the last log (then emptied)."""
    record = dict(step=state['step'], lr=lr, nonfinite_total=state['nonfinite_total'],
                  sec_per_step=seconds / log_every)
    if len(state['log_window']):
        record.update(zip(LOG_KEYS, state['log_window'].mean(0).tolist()))
    state['log_window'] = torch.zeros(0)
    return record


def validate(nets: dict, val_set, val_indices, micro_batch: int, accelerator, encode_text, schedule, config,
             metrics_path: str, step: int) -> float:
    """Validation metrics of the nets, logged and tracked; returns the EMA network's loss (checkpoint selection)."""
    metrics = trainer.evaluate(nets, val_set, val_indices, micro_batch, accelerator, encode_text, schedule, config)
    if accelerator.is_main_process:
        append_metrics(metrics_path, dict(step=step, **{f'val/{k}': v for k, v in metrics.items()}))
        logger.info('step %d validation: %s', step, ', '.join(f'{k} {v:.4f}' for k, v in metrics.items()))
    accelerator.log({f'val/{k}': v for k, v in metrics.items()}, step=step)
    return metrics['ema/loss']


def checkpoint(run_dir: str, accelerator, nets, state: dict, config, val_loss) -> str:
    """Write ckpts/<step>.ckpt (every process takes part), prune old ones and re-export the best EMA; returns its
    path."""
    nnet, ema, optimizer, scheduler = nets
    step = state['step']
    if val_loss is not None and val_loss < state['best_val_loss']:
        state.update(best_step=step, best_val_loss=val_loss)
    with writing(os.path.join(run_dir, 'ckpts')):  # torch.save reports a full disk without an errno
        path = trainer.save_checkpoint(run_dir, step, accelerator, nnet, ema, optimizer, scheduler, state, config)
    if accelerator.is_main_process:
        trainer.prune_checkpoints(run_dir, config.train.keep_last, state['best_step'])
        write = functools.partial(lora.write_merged, ema) if lora.enabled(config) else trainer.link_or_copy
        state['export'] = trainer.export_ema(run_dir, state, step, write)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The loop
# ----------------------------------------------------------------------------------------------------------------

def start_run(config):
    """(Accelerator, run folder): the folder locked for this run (libs/runlock.py) and logged into."""
    from accelerate import Accelerator
    run_dir = os.path.join(config.workdir, config.name)
    mixed_precision = config.mixed_precision if torch.cuda.is_available() else 'no'  # bf16 autocast only pays on GPUs
    if config.log_with == 'wandb':
        os.environ.setdefault('WANDB_MODE', 'offline')  # never require a login; WANDB_MODE=online opts in
    accelerator = Accelerator(mixed_precision=mixed_precision, log_with=config.log_with or None, project_dir=run_dir)
    runlock.take(run_dir, 'training run')
    setup_logging(run_dir, accelerator.is_main_process)
    logger.info('%d process(es) on %s, mixed precision %s, run folder %s', accelerator.num_processes,
                accelerator.device, mixed_precision, run_dir)
    return accelerator, run_dir


def damaged_features(guard, accelerator, config) -> UserError:
    """The error that stops training at a step that read non-finite features, naming the pairs (all processes)."""
    bad = trainer.nonfinite_pairs(guard, accelerator)[0]
    return UserError(f'non-finite (NaN/Inf) features in {len(bad)} training pair(s) of {config.data.train}: '
                     f'{", ".join(bad[:5])}; re-extract the cache with '
                     f'{reextract_command(config.data.train, "train", overwrite=True)}, which refuses such shards')


def stopped(stop: preemption.StopFlag, step: int, path: str) -> preemption.Preempted:
    """Log the stop in one line; the exception that ends the run with exit status 75 (libs.cli)."""
    cause = stop.signal_name or 'a signal to another process'
    logger.warning('%s: stopped after step %d, checkpoint %s written', cause, step, path)
    return preemption.Preempted(f'{cause} during step {step}: checkpoint {path} written; run the same command again '
                                'to resume from it (scripts/slurm_train.sh requeues the job)')


@runlock.scope
def train(config, dry_run: bool = False) -> dict:
    """Run (or resume) a training run; returns the final training state."""

    # Check the config and that the pretrained parts are there, before anything heavy is built.
    config_check.check(config, 'model', 'sample', 'train')
    tc = config.train
    hub.preflight(config, ('init_from', 'caption_decoder', 'autoencoder' if tc.sample_every > 0 else None))

    # Accelerator, run folder (locked: one run at a time), logging.
    accelerator, run_dir = start_run(config)
    is_main, device = accelerator.is_main_process, accelerator.device
    metrics_path = os.path.join(run_dir, 'metrics.jsonl')
    if tc.resume:
        trainer.check_resumable(run_dir, config)

    # Data: the training cache as an endless shuffled stream, each process reading its slice of every batch.
    train_set, val_set, val_indices = load_features(config)
    micro_batch = micro_batch_size(tc.batch_size, tc.grad_accum, accelerator.num_processes)
    drop = trainer.speaker_dropout(tc)

    # Model, EMA, optimizer; the frozen caption decoder maps CLIP text to the U-ViT's text space.
    nnet, ema, optimizer, scheduler = build_networks(config, accelerator)
    caption_decoder = trainer.load_text_reducer(config, device)
    encode_text = caption_decoder.encode_prefix
    schedule = Schedule(stable_diffusion_betas())
    sampling = trainer.load_sampling(config, caption_decoder, device)
    logger.info('U-ViT: %.2fM parameters, %d pairs of training features', sum(p.numel() for p in ema.parameters())
                / 1e6, len(train_set))

    # Resume from the newest checkpoint that loads, or start the run folder.
    state = resume_or_start(run_dir, config, accelerator, (nnet, ema, optimizer, scheduler), train_set)
    if is_main:
        truncate_metrics(metrics_path, state['step'])
        atomic_write_bytes(os.path.join(run_dir, 'config.json'), config.to_json(indent=2).encode('utf-8'))
        atomic_write_bytes(os.path.join(run_dir, 'config.yaml'), config.to_yaml().encode('utf-8'))
    if dry_run:
        logger.info('dry run: everything builds; micro-batch %d per process', micro_batch)
        return state
    accelerator.init_trackers(config.name, config=flat_hparams(config))
    batches = make_loader(train_set, config, state, micro_batch, accelerator)

    memory.check_training(config, device, accelerator.num_processes)  # CUDA: the planned step must fit (libs/memory.py)
    nnet.train()
    progress = tqdm(total=tc.n_steps, initial=state['step'], disable=not is_main, desc='train', dynamic_ncols=True)
    tic = time.perf_counter()
    with preemption.stop_on_signals() as stop:
        while state['step'] < tc.n_steps:
            # Gradients of the global batch; one all-reduce tells every process of damaged features and of a stop
            # signal any process received (so all of them stop after the same step).
            totals, guard = accumulate_gradients(nnet, batches, accelerator, encode_text, schedule, config, drop)
            bad_features, stopping = agree(accelerator, guard, stop)
            if bad_features:
                raise damaged_features(guard, accelerator, config)

            # Optimizer step and EMA update, skipped (and counted) when the loss or the gradient is not finite.
            row = apply_update(nnet, ema, optimizer, accelerator, totals, guard, state, run_dir, tc)
            if row is not None:
                state['log_window'] = torch.cat([state['log_window'].reshape(-1, len(LOG_KEYS)), row[None]])
            optimizer.zero_grad(set_to_none=True)
            scheduler.step()
            state.update(step=state['step'] + 1, data_position=state['data_position'] + tc.batch_size)
            step = state['step']
            progress.update(1)

            # Log the mean over the finite steps since the last log.
            if step % tc.log_every == 0 or step == tc.n_steps:
                record = log_row(state, scheduler.get_last_lr()[0], time.perf_counter() - tic, tc.log_every)
                if is_main:
                    append_metrics(metrics_path, record)
                    progress.set_postfix(loss=f'{record.get("loss", float("nan")):.4f}')
                accelerator.log({f'train/{k}': v for k, v in record.items() if k != 'step'}, step=step)
                tic = time.perf_counter()

            # Validate the online and EMA networks on fixed pairs with fixed noise.
            val_loss = None
            if val_set is not None and tc.val_every > 0 and step % tc.val_every == 0:
                val_loss = validate({'nnet': accelerator.unwrap_model(nnet), 'ema': ema}, val_set, val_indices,
                                    micro_batch, accelerator, encode_text, schedule, config, metrics_path, step)

            # Samples for fixed validation speaker turns (main process, EMA network); not while stopping.
            if sampling is not None and val_set is not None and step % tc.sample_every == 0 and not stopping:
                if is_main:
                    fixed = torch.utils.data.default_collate([val_set[i] for i in val_indices[:tc.sample_n]])
                    trainer.write_samples(sampling, ema, trainer.to_device(fixed, device),
                                          os.path.join(run_dir, 'samples', f'{step:07d}'), config.seed)
                accelerator.wait_for_everyone()

            # Checkpoint (keep the newest K plus the best by EMA validation loss), also when a signal asks to stop.
            if step % tc.ckpt_every == 0 or step == tc.n_steps or stopping:
                path = checkpoint(run_dir, accelerator, (nnet, ema, optimizer, scheduler), state, config, val_loss)

            # Stop on SIGTERM/SIGUSR1 with this step's checkpoint written (libs.cli exits 75: requeue).
            if stopping and step < tc.n_steps:
                accelerator.wait_for_everyone()  # no process exits while the main one still exports
                progress.close()
                raise stopped(stop, step, path)
    progress.close()
    accelerator.end_training()
    if is_main and 'export' in state:
        logger.info('trained network: %s (EMA of step %d, %s)', os.path.join(run_dir, trainer.EXPORT),
                    state['export']['step'], state['export']['selected_by'])
    return state
