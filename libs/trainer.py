"""Helpers of train_empath.py: the objective, model/optimizer construction, EMA, checkpoints and validation.

Every random draw of a training pair (latent sampling noise, timesteps, speaker dropout, diffusion noise) comes from
a generator seeded by (run seed, stream position of the pair). A pair therefore sees the same randomness however
the global batch is split over processes and accumulation steps, which makes multi-process runs agree with a
single process and makes resuming exact.
"""
import dataclasses
import hashlib
import json
import logging
import os
import random
import re
import shutil
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                     get_optimizer_state_dict, set_model_state_dict,
                                                     set_optimizer_state_dict)

from libs import lora
from libs.avamerg import COARSE_7, EMOTIONS_32, FINE_TO_COARSE
from libs.config_check import flatten
from libs.diffusion import modality_losses
from libs.distributed import full_tensor
from libs.errors import UserError
from libs.features import TENSOR_DTYPES, derive_seed, nonfinite_rows, pair_id
from libs.hub import NNET_EXPORT
from libs.io import atomic_write_json, load_error
from libs.uvit import NETS, build_nnet, checkpoint_config, load_nnet_weights

logger = logging.getLogger(__name__)

CKPT = re.compile(r'^(\d+)\.ckpt$')
CKPT_FILES = ('nnet.safetensors', 'nnet_ema.safetensors', 'training_state.pt', 'config.json')
DIVERGED_EXIT_CODE = 3  # train_empath.py's exit status when the non-finite guard stops a run (UserError: 2)
LOSS_TERMS = ('img', 'clip', 'text', 'emotion')
LOGVAR_RANGE = (-30., 20.)  # LDM's posterior clamps log-variance to this range before sampling


class TrainingDiverged(UserError):
    """Raised after too many consecutive non-finite steps (libs.cli exits with DIVERGED_EXIT_CODE)."""
    exit_code = DIVERGED_EXIT_CODE


# ----------------------------------------------------------------------------------------------------------------
# Objective (docs/design.md §2)
# ----------------------------------------------------------------------------------------------------------------

def sample_latent(moments: torch.Tensor, scale_factor: float, noise: torch.Tensor) -> torch.Tensor:
    """VAE posterior sample from moments (B, 2C, h, w): scale · (mean + exp(½·clamp(logvar, −30, 20)) · noise).

    The same maths as ``FrozenAutoencoderKL.sample`` (tested equal), without importing the VAE network's stack.
    """
    mean, logvar = moments.chunk(2, dim=1)
    return scale_factor * (mean + torch.exp(0.5 * logvar.clamp(*LOGVAR_RANGE)) * noise)


DROPS = ('face', 'text', 'both')  # train.p_drop_<name>: what the speaker dropout removes from a pair


def speaker_dropout(train_config) -> Dict[str, float]:
    """The speaker-dropout probabilities of the train config: {'face': p, 'text': p, 'both': p}."""
    drop = {k: float(train_config[f'p_drop_{k}']) for k in DROPS}
    if min(drop.values()) < 0 or sum(drop.values()) > 1:
        raise UserError(f'train.p_drop_face/text/both = {drop}: each must be >= 0 and together at most 1')
    return drop


NO_DROPOUT = dict.fromkeys(DROPS, 0.)


def draw_randomness(positions: Sequence[int], seed, domain: str, config, N: int, drop: Dict[str, float]) -> dict:
    """Every random quantity of a batch, each pair's drawn from its own (domain, seed, position) generator.

    Per pair: the VAE posterior noise of both faces; for each role (response, and speaker for the unconditional
    UniDiffuser objective) the timesteps and diffusion noise; the noise that replaces a dropped speaker modality;
    and one uniform number u that picks the speaker dropout: both if u < p_both, else the face only if
    u < p_both + p_face, else the text only if u < p_both + p_face + p_text.
    """
    z, clip, text = tuple(config.z_shape), (1, config.clip_img_dim), (config.num_text_tokens, config.text_dim)
    gaussians = (('speaker_latent', z), ('response_latent', z), ('eps_img', z), ('eps_clip', clip),
                 ('eps_text', text), ('absent_img', z), ('absent_clip', clip), ('absent_text', text),
                 ('speaker_eps_img', z), ('speaker_eps_clip', clip), ('speaker_eps_text', text))
    draws = []
    for p in positions:
        g = torch.Generator().manual_seed(derive_seed(domain, seed, int(p)))
        t = torch.randint(1, N + 1, (4,), generator=g)
        u = float(torch.rand((), generator=g))
        both, face = u < drop['both'], drop['both'] <= u < drop['both'] + drop['face']
        text_only = drop['both'] + drop['face'] <= u < drop['both'] + drop['face'] + drop['text']
        draws.append(dict(t_img=t[0], t_text=t[1], speaker_t_img=t[2], speaker_t_text=t[3],
                          keep_img=torch.tensor(not (both or face)), keep_text=torch.tensor(not (both or text_only)),
                          **{name: torch.randn(shape, generator=g) for name, shape in gaussians}))
    return {k: torch.stack([d[k] for d in draws]) for k in draws[0]}


def _where(keep: torch.Tensor, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """Per-sample choice between x and other by a (B,) mask."""
    return torch.where(keep.view(-1, *[1] * (x.dim() - 1)), x, other)


RAND_KEYS = ('t_img', 't_text', 'eps_img', 'eps_clip', 'eps_text')  # one role's draws (prefix '' or 'speaker_')


def noise_prediction(nnet, schedule, x0, t_img, t_text, eps_img, eps_clip, eps_text, data_type, **cond):
    """Noise clean (latent, CLIP embedding, text) — latent and CLIP share t_img — and predict the noise."""
    noisy = [schedule.add_noise(x, t, e)[1] for x, t, e in zip(x0, (t_img, t_img, t_text),
                                                                (eps_img, eps_clip, eps_text))]
    return nnet(*noisy, t_img, t_text, data_type, **cond)


IGNORE_LABEL = -1  # the feature caches' label of an unknown emotion; the emotion CE skips it


def training_losses(nnet, batch: dict, rand: dict, encode_text, schedule, config):
    """Per-pair losses (B,) of the training objective, and the emotion logits (None for an unconditional net).

    Conditional (EmpathDiffuser, docs/design.md §2): the speaker turn is clean (t = 0); its face (latent + CLIP embedding)
    and its text are replaced by Gaussian noise at t = N when dropped. The response face (latent and CLIP share
    t_img) and text (t_text) are noised independently. loss = diffusion loss + λ·CE(emotion); the CE of an
    unlabelled pair, or of a pair whose whole speaker was dropped (nothing to classify), counts as 0, so every pair
    weighs the same and the loss is a plain per-pair mean under any batch split. Unconditional (UniDiffuser's joint
    objective, used to pre-train): the speaker's and the response's (face, utterance) are two independent image-text
    samples; a pair's loss is the mean of their two losses.
    """
    N, scale, weighting = schedule.N, config.autoencoder.scale_factor, config.train.loss_weighting
    z_speaker = sample_latent(batch['speaker_moments'], scale, rand['speaker_latent'])
    z = sample_latent(batch['response_moments'], scale, rand['response_latent'])
    with torch.no_grad():  # the caption decoder's encode_prefix is frozen
        text_speaker = encode_text(batch['speaker_text'].float())
        text = encode_text(batch['response_text'].float())
    net_kind = NETS[config.nnet.name]  # from the config: nnet may be wrapped (DDP, FSDP)
    data_type = torch.full_like(rand['t_img'], config.data_type) if net_kind['use_data_type'] else None
    response = (z, batch['response_clip_img'], text)
    if not net_kind.get('condition', False):
        roles = []
        for prefix, x0 in (('', response), ('speaker_', (z_speaker, batch['speaker_clip_img'], text_speaker))):
            draws = [rand[prefix + k] for k in RAND_KEYS]
            roles.append(modality_losses(noise_prediction(nnet, schedule, x0, *draws, data_type), draws[2:],
                                         weighting))
        losses = {k: (roles[0][k] + roles[1][k]) / 2 for k in roles[0]}
        losses['emotion'] = torch.zeros_like(losses['loss'])
        return losses, None
    keep_img, keep_text = rand['keep_img'], rand['keep_text']
    absent = torch.full_like(rand['t_img'], N)
    cond = dict(img=_where(keep_img, z_speaker, rand['absent_img']),
                clip_img=_where(keep_img, batch['speaker_clip_img'], rand['absent_clip']),
                text=_where(keep_text, text_speaker, rand['absent_text']),
                t_img=torch.where(keep_img, 0, absent), t_text=torch.where(keep_text, 0, absent))
    draws = [rand[k] for k in RAND_KEYS]
    *eps, logits = noise_prediction(nnet, schedule, response, *draws, data_type, cond=cond)
    losses = modality_losses(eps, draws[2:], weighting)
    # A pair whose whole speaker was dropped has nothing to classify: its label is ignored like an unknown one.
    labels = torch.where(keep_img | keep_text, batch['label'], IGNORE_LABEL)
    losses['emotion'] = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE_LABEL, reduction='none')
    losses['loss'] = losses['loss'] + config.train.emotion_weight * losses['emotion']
    return losses, logits


# ----------------------------------------------------------------------------------------------------------------
# The objective's inputs for measurements outside training (validation, libs/demo/measure.py)
# ----------------------------------------------------------------------------------------------------------------

def validation_randomness(positions: Sequence[int], config, N: int) -> dict:
    """The fixed randomness of held-out pairs: their own ('val') stream of ``draw_randomness``, no speaker dropout."""
    return draw_randomness(positions, config.seed, 'val', config, N, NO_DROPOUT)


def speaker_condition(batch: dict, rand: dict, encode_text, config, N: int, present: bool) -> dict:
    """The speaker segment as training feeds it: the clean turn at t = 0, or (``present=False``) the whole speaker
    absent, Gaussian noise at t = N (docs/design.md §2)."""
    if not present:
        return dict(img=rand['absent_img'], clip_img=rand['absent_clip'], text=rand['absent_text'],
                    t_img=torch.full_like(rand['t_img'], N), t_text=torch.full_like(rand['t_img'], N))
    return dict(img=sample_latent(batch['speaker_moments'], config.autoencoder.scale_factor, rand['speaker_latent']),
                clip_img=batch['speaker_clip_img'], text=encode_text(batch['speaker_text'].float()),
                t_img=torch.zeros_like(rand['t_img']), t_text=torch.zeros_like(rand['t_img']))


def response_prediction(nnet, schedule, batch: dict, rand: dict, encode_text, config, cond: dict = None):
    """The network's outputs for the pairs' noisy responses as the objective draws them (a posterior sample of the
    face latent, independent timesteps for face and text); ``cond`` is a ``speaker_condition`` or None."""
    response = (sample_latent(batch['response_moments'], config.autoencoder.scale_factor, rand['response_latent']),
                batch['response_clip_img'], encode_text(batch['response_text'].float()))
    data_type = torch.full_like(rand['t_img'], config.data_type) if NETS[config.nnet.name]['use_data_type'] else None
    return noise_prediction(nnet, schedule, response, *(rand[k] for k in RAND_KEYS), data_type,
                            **({} if cond is None else dict(cond=cond)))


FEATURE_KEYS = tuple(k for k, dtype in TENSOR_DTYPES.items() if dtype.is_floating_point)


def guard_record(batch: dict, loss: torch.Tensor) -> tuple:
    """(pair ids, per-pair loss, per-pair finite features) of a micro-batch, kept for the non-finite guard."""
    ids = [pair_id(*p) for p in zip(batch['split'], batch['conversation_id'], batch['turn_id'])]
    return ids, loss.detach(), ~nonfinite_rows({k: batch[k] for k in FEATURE_KEYS})


def nonfinite_feature_count(records: Sequence[tuple]) -> torch.Tensor:
    """How many pairs of a step's guard records have a non-finite feature, as a tensor (no device sync)."""
    return sum((~finite).sum() for _, _, finite in records)


def nonfinite_pairs(records: Sequence[tuple], accelerator) -> Tuple[List[str], List[str]]:
    """(pairs with non-finite features, other pairs with a non-finite loss) of a step's guard records, all processes."""
    features, losses = [], []
    for ids, loss, finite in records:
        for pair, loss_ok, features_ok in zip(ids, torch.isfinite(loss).tolist(), finite.tolist()):
            if not features_ok:
                features.append(pair)
            elif not loss_ok:
                losses.append(pair)
    if accelerator.num_processes > 1:
        from accelerate.utils import gather_object
        features, losses = gather_object(features), gather_object(losses)
    return features, losses


def to_device(batch: dict, device) -> dict:
    """Move the tensors of a collated batch to ``device`` (metadata lists stay)."""
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------------------------
# Model, text reducer, optimizer, EMA
# ----------------------------------------------------------------------------------------------------------------

def build_model(config) -> torch.nn.Module:
    """The conditional U-ViT, initialised from ``train.init_from`` (new condition keys are logged) or from scratch;
    with ``train.lora.enabled``, frozen and given LoRA adapters (libs.lora)."""
    nnet = build_nnet(config.nnet)
    if config.train.init_from:
        load_nnet_weights(nnet, config.train.init_from, logger)
        logger.info('initialised the U-ViT from %s', config.train.init_from)
    else:
        logger.info('training the U-ViT from scratch (train.init_from is empty)')
    if lora.enabled(config):
        lora.apply_lora(nnet, config.train.lora)
    return nnet


def load_text_reducer(config, device):
    """The configured caption decoder (frozen); its ``encode_prefix`` maps CLIP text states to the U-ViT's text."""
    from libs.caption_decoder import load_caption_decoder
    cd = config.caption_decoder
    decoder = load_caption_decoder(cd.pretrained_path, cd.tokenizer, cd.local_files_only, config=cd, device=device)
    return decoder.requires_grad_(False)


def make_optimizer(nnet, config):
    """AdamW (8-bit with ``optimizer.eight_bit``) over the trained parameters: no weight decay on
    ``no_weight_decay()``; the new (condition) parameters at condition_lr_scale × lr, LoRA's adapters at
    train.lora.lr."""
    opt, skip = config.optimizer, nnet.no_weight_decay()
    pretrained_lr = config.train.lora.lr if lora.enabled(config) else opt.lr  # LoRA trains adapters, not weights
    new = set(nnet.condition_parameters()) if getattr(nnet, 'condition', False) else set()
    named = [(n, p) for n, p in nnet.named_parameters() if p.requires_grad]
    groups = []
    for is_new in (False, True):
        lr = opt.lr * opt.condition_lr_scale if is_new else pretrained_lr
        for decays in (True, False):
            params = [p for n, p in named if (n in new) == is_new and (n not in skip) == decays]
            if params:
                groups.append(dict(params=params, lr=lr, weight_decay=opt.weight_decay if decays else 0.))
    return lora.adamw_class(opt.eight_bit)(groups, lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps)


def warmup(step: int, warmup_steps: int) -> float:
    """Linear warm-up factor of the learning rate: (step + 1) / warmup_steps, then 1."""
    return min(1., (step + 1) / warmup_steps) if warmup_steps > 0 else 1.


def ema_decay(step: int, rate: float) -> float:
    """EMA rate with warm-up at optimizer step ``step`` (0-based): min(rate, (1 + step) / (10 + step)).

    Without warm-up a 0.9999 EMA would still hold e^{-2} = 13.5% of the initial weights after 20k steps; with it the
    average covers about the last tenth of training early on and converges to ``rate`` (diffusers' EMAModel rule).
    """
    return min(rate, (1. + step) / (10. + step))


def make_ema(model: torch.nn.Module) -> torch.nn.Module:
    """The EMA network: a copy of the trained parameters; frozen ones (LoRA's base weights) are shared, not copied."""
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    return lora.copy_sharing(model, trained).eval().requires_grad_(False)


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, rate: float) -> None:
    """ema ← rate · ema + (1 − rate) · model for the trained parameters; buffers are copied."""
    for e, p in zip(ema.parameters(), model.parameters()):
        if p.requires_grad:
            e.lerp_(full_tensor(p).to(e.dtype), 1. - rate)
    for e, b in zip(ema.buffers(), model.buffers()):
        e.copy_(full_tensor(b))


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints: <run>/ckpts/<step>.ckpt/ written in a temp folder and renamed, so a listed folder is complete
# ----------------------------------------------------------------------------------------------------------------

def rng_state() -> dict:
    """RNG states of torch (CPU and CUDA), numpy and python, as tensors and plain containers."""
    kind, key, pos, has_gauss, gauss = np.random.get_state()
    return {'torch': torch.get_rng_state(),
            'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            'numpy': {'kind': kind, 'key': torch.from_numpy(key.astype(np.int64)), 'pos': int(pos),
                      'has_gauss': int(has_gauss), 'gauss': float(gauss)},
            'python': random.getstate()}


def set_rng_state(state: dict) -> None:
    """Restore ``rng_state()``."""
    torch.set_rng_state(state['torch'])
    if state['cuda'] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])
    n = state['numpy']
    np.random.set_state((n['kind'], n['key'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    random.setstate(state['python'])


def export_nnet(state_dict: Dict[str, torch.Tensor], path: str, config, step: int) -> None:
    """Write a full U-ViT state dict as safetensors with the resolved config in its metadata."""
    save_file({k: v.detach().contiguous().cpu() for k, v in state_dict.items()}, path,
              metadata={'config': config.to_json(), 'step': str(step)})


def load_exported_nnet(path: str):
    """Rebuild a U-ViT from an exported ``nnet*.safetensors`` alone; returns (model, config dict)."""
    config = checkpoint_config(path)
    if config is None:
        raise UserError(f'{path} is not a U-ViT exported by train_empath.py (no config in its metadata)')
    nnet = build_nnet(config['nnet'])
    load_nnet_weights(nnet, path)
    return nnet, config


def checkpoints(run_dir: str) -> List[int]:
    """Steps of the complete checkpoints of a run, ascending."""
    folder = os.path.join(run_dir, 'ckpts')
    if not os.path.isdir(folder):
        return []
    steps = [int(m[1]) for m in map(CKPT.match, os.listdir(folder)) if m]
    return sorted(s for s in steps if all(os.path.isfile(os.path.join(folder, f'{s}.ckpt', f)) for f in CKPT_FILES))


def remove_partial_checkpoints(run_dir: str) -> None:
    """Delete temp folders left by a save that was interrupted."""
    folder = os.path.join(run_dir, 'ckpts')
    for name in os.listdir(folder) if os.path.isdir(folder) else []:
        if name.startswith('.tmp-'):
            logger.info('removing the unfinished checkpoint %s', name)
            shutil.rmtree(os.path.join(folder, name), ignore_errors=True)


def trained_keys(model: torch.nn.Module) -> List[str]:
    """State-dict keys a checkpoint holds: all but the frozen parameters (LoRA's base weights)."""
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    return [k for k in model.state_dict() if k not in frozen]


def save_checkpoint(run_dir, step, accelerator, nnet, ema, optimizer, scheduler, state: dict, config) -> str:
    """Write ``ckpts/<step>.ckpt`` atomically; every process must call it (state dicts are gathered collectively).

    The network files hold what is trained: everything for a full fine-tune, the adapters and new parameters for LoRA.
    """
    folder = os.path.join(run_dir, 'ckpts')
    final, tmp = os.path.join(folder, f'{step}.ckpt'), os.path.join(folder, f'.tmp-{step}.ckpt')
    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    model_sd = get_model_state_dict(nnet, options=options)
    keys = trained_keys(accelerator.unwrap_model(nnet))
    optim_sd = get_optimizer_state_dict(nnet, getattr(optimizer, 'optimizer', optimizer), options=options)
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
    accelerator.wait_for_everyone()
    torch.save(rng_state(), os.path.join(tmp, f'rng-{accelerator.process_index}.pt'))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        export_nnet(model_sd, os.path.join(tmp, 'nnet.safetensors'), config, step)
        ema_sd = ema.state_dict()
        export_nnet({k: ema_sd[k] for k in keys}, os.path.join(tmp, 'nnet_ema.safetensors'), config, step)
        torch.save(dict(state, step=step, optimizer=optim_sd, scheduler=scheduler.state_dict(),
                        num_processes=accelerator.num_processes), os.path.join(tmp, 'training_state.pt'))
        with open(os.path.join(tmp, 'config.json'), 'w') as f:
            f.write(config.to_json(indent=2))
        for name in os.listdir(tmp):  # on disk before the rename publishes the folder
            with open(os.path.join(tmp, name), 'rb') as f:
                os.fsync(f.fileno())
        if os.path.exists(final):  # a re-run of the same step replaces the old folder
            shutil.rmtree(final)
        os.replace(tmp, final)
    accelerator.wait_for_everyone()
    return final


STATE_KEYS = ('step', 'data_position', 'optimizer', 'scheduler', 'num_processes')  # what save_checkpoint writes
RNG_KEYS = ('torch', 'cuda', 'numpy', 'python')


def read_training_state(path: str, process_index: int) -> Tuple[dict, Optional[dict]]:
    """(training_state.pt, this process's rng-<i>.pt or None) of a checkpoint folder, unpickling tensors and plain
    containers only; raises ValueError saying how a file differs from what ``save_checkpoint`` writes."""
    files = {}
    for name in ('training_state.pt', f'rng-{process_index}.pt'):
        if os.path.isfile(os.path.join(path, name)):
            try:
                files[name] = torch.load(os.path.join(path, name), map_location='cpu', weights_only=True)
            except Exception as err:  # a cut zip, a foreign pickle: whatever it is, it is not this checkpoint's
                raise ValueError(f'{name}: {load_error(err)}') from err
    state, rng = files.get('training_state.pt'), files.get(f'rng-{process_index}.pt')
    missing = [k for k in STATE_KEYS if k not in state] if isinstance(state, dict) else list(STATE_KEYS)
    if missing or not isinstance(state['optimizer'], dict) or not isinstance(state['scheduler'], dict):
        raise ValueError(f'training_state.pt is not a training state (a {type(state).__name__}; missing '
                         f'{missing or "nothing"}, optimizer and scheduler must be dicts)')
    if rng is not None and not (isinstance(rng, dict) and set(RNG_KEYS) <= set(rng) and
                                isinstance(rng['torch'], torch.Tensor) and isinstance(rng['numpy'], dict)):
        raise ValueError(f'rng-{process_index}.pt is not the RNG state training writes (a {type(rng).__name__})')
    return state, rng


def load_checkpoint(path, accelerator, nnet, ema, optimizer, scheduler, saved: tuple = None) -> dict:
    """Restore model, EMA, optimizer, scheduler and RNG states from a checkpoint folder; returns its state dict.

    ``saved`` is ``read_training_state``'s result when the caller has read it already.
    """
    state, rng = saved or read_training_state(path, accelerator.process_index)
    options = StateDictOptions(full_state_dict=True)
    model_sd = load_file(os.path.join(path, 'nnet.safetensors'))
    ema_sd = load_file(os.path.join(path, 'nnet_ema.safetensors'))  # copied onto the EMA's device by loading
    keys = set(trained_keys(accelerator.unwrap_model(nnet)))
    for name, sd in (('nnet', model_sd), ('nnet_ema', ema_sd)):  # set_model_state_dict would fill in gaps silently
        if set(sd) != keys:
            raise UserError(f'{path}/{name}.safetensors does not hold the trained parameters of this model (missing '
                            f'{sorted(keys - set(sd))[:3]}, unexpected {sorted(set(sd) - keys)[:3]}): it was written '
                            'with other nnet or train.lora settings; resume with those, or start a new run '
                            '(config.name)')
    set_model_state_dict(nnet, model_sd, options=options)
    ema.load_state_dict(ema_sd, strict=False)  # frozen (shared) parameters are not in the file
    optimizer = getattr(optimizer, 'optimizer', optimizer)  # accelerate's wrapper -> the torch optimizer
    set_optimizer_state_dict(nnet, optimizer, state.pop('optimizer'), options=options)
    scheduler.load_state_dict(state.pop('scheduler'))
    if state['num_processes'] == accelerator.num_processes and rng is not None:
        set_rng_state(rng)
    else:
        logger.warning('%s was written by %d processes, this run has %d: global RNG streams restart (the data '
                       'order and all per-pair randomness still continue exactly)', path, state['num_processes'],
                       accelerator.num_processes)
    return state


# ----------------------------------------------------------------------------------------------------------------
# Resuming honestly: the newest checkpoint that loads, the settings the run started with
# ----------------------------------------------------------------------------------------------------------------

# Settings a run keeps from its first step to its last: they fix the network, the objective and the data stream that
# a checkpoint's weights, optimizer state and stream position belong to, so a resume that changes one is refused.
# Every other key may change and is applied: optimizer.* (the restored optimizer and scheduler take the new values),
# train.n_steps, the log/val/ckpt/sample intervals, keep_last, grad_clip, max_nonfinite, data loading, trackers,
# mixed precision, the number of processes.
FIXED_SETTINGS = ('nnet', 'z_shape', 'clip_img_dim', 'clip_text_dim', 'text_dim', 'num_text_tokens', 'data_type',
                  'seed', 'autoencoder.scale_factor', 'caption_decoder.pretrained_path', 'data.train', 'data.val',
                  'data.shuffle_window', 'train.batch_size', 'train.grad_accum', 'train.p_drop_face',
                  'train.p_drop_text', 'train.p_drop_both', 'train.emotion_weight', 'train.loss_weighting',
                  'train.ema_rate', 'train.val_pairs', 'train.lora', 'optimizer.eight_bit')
# Activation checkpointing trades memory for time and changes nothing; LoRA's learning rate is a learning rate.
FREE_WITHIN_FIXED = ('nnet.use_checkpoint', 'train.lora.lr')


def features_digest(manifest: dict) -> str:
    """sha256 of a feature cache's manifest: the cache a run trains on, recorded in its checkpoints."""
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()


def is_fixed(key: str) -> bool:
    """Whether a flattened config key is one of FIXED_SETTINGS."""
    return key not in FREE_WITHIN_FIXED and any(key == k or key.startswith(k + '.') for k in FIXED_SETTINGS)


def changed_settings(before: dict, now: dict) -> Tuple[List[str], List[str]]:
    """('key: old -> new' of the changed fixed settings, the same of the other changed keys) between two configs."""
    before, now = flatten(before), flatten(now)
    changes = [(k, f'{k}: {before[k]!r} -> {now[k]!r}') for k in sorted(set(before) & set(now)) if before[k] != now[k]]
    return [c for k, c in changes if is_fixed(k)], [c for k, c in changes if not is_fixed(k)]


def checkpoint_problem(path: str, process_index: int) -> Tuple[Optional[str], Optional[tuple]]:
    """(why a checkpoint folder cannot be loaded, or None; ``read_training_state``'s result when it can). A cut,
    emptied or unreadable file, or a training_state.pt / rng-<i>.pt that is not what training wrote, is a problem."""
    from safetensors import safe_open
    try:
        with open(os.path.join(path, 'config.json'), encoding='utf-8') as f:
            if not isinstance(json.load(f), dict):
                return 'config.json is not a config', None
        for name in ('nnet.safetensors', 'nnet_ema.safetensors'):
            with safe_open(os.path.join(path, name), 'pt') as f:
                f.keys()
        return None, read_training_state(path, process_index)
    except Exception as err:  # whatever the damage, the checkpoint is skipped and the reason logged
        return f'{type(err).__name__}: {err}', None


def newest_loadable_checkpoint(run_dir: str, accelerator) -> Tuple[Optional[str], Optional[tuple]]:
    """(the newest complete checkpoint every process can read, its training state); each broken one is logged and
    skipped."""
    from accelerate.utils import gather_object
    steps = checkpoints(run_dir)
    for step in reversed(steps):
        path = os.path.join(run_dir, 'ckpts', f'{step}.ckpt')
        problem, saved = checkpoint_problem(path, accelerator.process_index)
        problems = [p for p in (gather_object([problem]) if accelerator.num_processes > 1 else [problem]) if p]
        if not problems:
            return path, saved
        logger.warning('skipping checkpoint %s, it does not load: %s', path, problems[0])
    if steps:
        raise UserError(f'no checkpoint of {run_dir} loads (see the warnings above): move {run_dir}/ckpts away to '
                        'start the run over, or choose another config.name')
    return None, None


def apply_free_settings(optimizer, scheduler, fresh_groups: List[dict]) -> None:
    """Give a restored optimizer and scheduler this run's hyperparameters (lr, betas, weight decay, ...)."""
    groups = getattr(optimizer, 'optimizer', optimizer).param_groups
    for group, fresh in zip(groups, fresh_groups):
        group.update(fresh)
    scheduler.base_lrs = [group['initial_lr'] for group in groups]
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas):
        group['lr'] = base * factor(scheduler.last_epoch)


def check_resumable(run_dir: str, config) -> None:
    """Refuse, before anything is built, to resume a run with changed FIXED_SETTINGS (naming them); log the others.

    Every checkpoint of a run has the same fixed settings: the newest one whose config.json reads is compared.
    """
    for step in reversed(checkpoints(run_dir)):
        try:
            with open(os.path.join(run_dir, 'ckpts', f'{step}.ckpt', 'config.json'), encoding='utf-8') as f:
                before = json.load(f)
        except (OSError, ValueError):
            continue
        fixed, free = changed_settings(before, json.loads(config.to_json()))
        if fixed:
            raise UserError(f'cannot resume {run_dir} (checkpoint {step}): settings that cannot change during a run '
                            f'differ ({"; ".join(fixed)}). Set them back, or start a new run with another config.name')
        if free:
            logger.info('resuming with changed settings (applied): %s', '; '.join(free))
        return


def resume(run_dir, config, accelerator, nnet, ema, optimizer, scheduler, digest: str) -> Optional[dict]:
    """Restore the newest checkpoint that loads and return its state (None without one).

    The optimizer and scheduler restored from the checkpoint take this run's hyperparameters (learning rate, betas,
    weight decay, warm-up); a change of the training features is refused (``check_resumable`` has compared the
    other settings).
    """
    path, saved = newest_loadable_checkpoint(run_dir, accelerator)
    if path is None:
        return None
    fresh = [{k: v for k, v in g.items() if k != 'params'} for g in getattr(optimizer, 'optimizer', optimizer)
             .param_groups]
    state = load_checkpoint(path, accelerator, nnet, ema, optimizer, scheduler, saved)
    if state.get('train_features', digest) != digest:
        raise UserError(f'cannot resume {run_dir}: the training features in {config.data.train} changed since '
                        f'{path} was written (re-extracted?). Restore them, or start a new run with another '
                        'config.name')
    state.setdefault('train_features', digest)  # checkpoints written before features were recorded
    apply_free_settings(optimizer, scheduler, fresh)
    return state


EXPORT, EXPORT_INFO = NNET_EXPORT, 'nnet_ema.json'


def link_or_copy(source: str, dest: str) -> None:
    """Hard-link ``source`` as ``dest`` (a full copy where links are unsupported)."""
    try:
        os.link(source, dest)
    except OSError:
        shutil.copyfile(source, dest)


def export_ema(run_dir: str, state: dict, newest_step: int, write=link_or_copy) -> dict:
    """Publish ``<run>/nnet_ema.safetensors``: the EMA network of the best checkpoint by validation loss (the newest
    when there is no validation), with ``nnet_ema.json`` saying which. Returns that description.

    ``write(checkpoint_file, tmp)`` makes the file: by default a hard link to the checkpoint's copy (pruning the
    checkpoint later does not remove it); LoRA runs merge the adapters (``libs.lora.write_merged``). It is put in
    place by an atomic rename, so readers never see half a file.
    """
    step = state['best_step'] if state['best_step'] > 0 else newest_step
    info = dict(step=step, selected_by='best validation EMA loss' if state['best_step'] > 0 else 'newest checkpoint',
                val_ema_loss=state['best_val_loss'] if state['best_step'] > 0 else None,
                checkpoint=os.path.join('ckpts', f'{step}.ckpt'))
    path, meta = os.path.join(run_dir, EXPORT), os.path.join(run_dir, EXPORT_INFO)
    if os.path.isfile(meta) and os.path.isfile(path):
        with open(meta, encoding='utf-8') as f:
            if json.load(f) == info:
                return info
    source, tmp = os.path.join(run_dir, info['checkpoint'], EXPORT), path + '.tmp'
    if os.path.exists(tmp):
        os.remove(tmp)
    try:
        write(source, tmp)
        os.replace(tmp, path)
    except BaseException:  # a full disk, a kill: the old export stays whole and no half file is left beside it
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    atomic_write_json(meta, info)
    return info


def prune_checkpoints(run_dir: str, keep_last: int, best_step: Optional[int]) -> None:
    """Delete all but the newest ``keep_last`` checkpoints and the best one."""
    steps = checkpoints(run_dir)
    keep = set(steps[-keep_last:] if keep_last > 0 else []) | {best_step}
    for s in steps:
        if s not in keep:
            shutil.rmtree(os.path.join(run_dir, 'ckpts', f'{s}.ckpt'))


# ----------------------------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------------------------

FINE_TO_COARSE_INDEX = [COARSE_7.index(FINE_TO_COARSE[e]) for e in EMOTIONS_32]


@torch.no_grad()
def evaluate(nets: dict, val_set, indices: Sequence[int], batch_size: int, accelerator, encode_text, schedule,
             config) -> dict:
    """Validation losses (and emotion metrics) of each net on fixed pairs with fixed noise and no speaker dropout.

    Pairs are dealt out to processes round-robin (padded to equal counts) and the per-pair results gathered, so
    the numbers do not depend on the number of processes.
    """
    from libs.metrics import emotion_report
    rank, world = accelerator.process_index, accelerator.num_processes
    mine = list(indices[rank::world])
    n_local = -(-len(indices) // world)
    valid = torch.tensor([1] * len(mine) + [0] * (n_local - len(mine)), dtype=torch.bool)
    mine += [indices[0]] * (n_local - len(mine))
    results = {name: {k: [] for k in ('loss', *LOSS_TERMS, 'pred')} for name in nets}
    labels = []
    for s in range(0, n_local, batch_size):
        chunk = mine[s:s + batch_size]
        batch = to_device(torch.utils.data.default_collate([val_set[i] for i in chunk]), accelerator.device)
        rand = to_device(validation_randomness(chunk, config, schedule.N), accelerator.device)
        labels.append(batch['label'])
        for name, net in nets.items():
            was_training = net.training
            net.eval()
            with accelerator.autocast():
                losses, logits = training_losses(net, batch, rand, encode_text, schedule, config)
            net.train(was_training)
            for k in ('loss', *LOSS_TERMS):
                results[name][k].append(losses[k].float())
            if logits is not None:
                results[name]['pred'].append(logits.argmax(-1))
    valid = accelerator.gather(valid.to(accelerator.device)).cpu()
    gold = accelerator.gather(torch.cat(labels)).cpu()[valid]
    metrics = {}
    for name, res in results.items():
        gathered = {k: accelerator.gather(torch.cat(v)).cpu()[valid] for k, v in res.items() if v}
        for k in ('loss', *LOSS_TERMS):
            metrics[f'{name}/{k}'] = gathered[k].mean().item()
        if 'pred' in gathered:
            report = emotion_report(gathered['pred'], gold, FINE_TO_COARSE_INDEX)
            metrics.update({f'{name}/emotion_{k}': v for k, v in report.items() if k != 'n'})
    return metrics


# ----------------------------------------------------------------------------------------------------------------
# Periodic samples through libs.pipeline (optional)
# ----------------------------------------------------------------------------------------------------------------

def load_sampling(config, caption_decoder, device):
    """Components for periodic samples, or None when sampling is off or libs.pipeline cannot be imported."""
    if config.train.sample_every <= 0:
        return None
    if not NETS[config.nnet.name].get('condition', False):
        logger.info('periodic samples skipped: they show empath responses, and %s has no speaker segment',
                    config.nnet.name)
        return None
    try:
        from libs import pipeline
    except ImportError as err:
        logger.info('periodic samples skipped: libs.pipeline is not importable (%s)', err)
        return None
    from libs.autoencoder import load_autoencoder
    # Decoded in the configured chunks, as sampling does: a full-size batch of samples decoded at once needs
    # 0.75 GiB per 512² face on top of training's memory.
    autoencoder = load_autoencoder(config.autoencoder.pretrained_path, config.autoencoder, device,
                                   decode_chunk=config.encoders.vae_decode_chunk)
    return pipeline.Components(config, device, nnet=None, autoencoder=autoencoder, caption_decoder=caption_decoder)


@torch.no_grad()
def write_samples(components, nnet, batch: dict, out_dir: str, seed: int) -> None:
    """'empath' samples for fixed speaker turns of the validation cache: PNG faces, grid.png, samples.json."""
    from libs import modes, pipeline
    comp = dataclasses.replace(components, nnet=nnet)
    device, config = comp.device, comp.config
    ctx = pipeline.make_context(comp, torch.Generator(device).manual_seed(seed))
    B = len(batch['label'])
    z = sample_latent(batch['speaker_moments'], config.autoencoder.scale_factor, ctx.randn(B, *config.z_shape))
    speaker = pipeline.speaker_inputs(comp, ctx, B, z, batch['speaker_clip_img'],
                                      comp.caption_decoder.encode_prefix(batch['speaker_text'].float()))
    out = modes.get_mode('empath')(ctx, speaker)
    images, texts = pipeline.decode_images(comp, out['z']), pipeline.decode_texts(comp, out['text'])
    emotions = pipeline.top_emotions(out['emotion'], list(EMOTIONS_32))
    os.makedirs(out_dir, exist_ok=True)
    records = []
    for i in range(B):
        images[i].save(os.path.join(out_dir, f'{i:03d}.png'))
        records.append(dict(speaker_stem=batch['speaker_stem'][i], speaker_text=batch['speaker_text_raw'][i],
                            reference_response=batch['response_text_raw'][i], response=texts[i],
                            emotion=batch['emotion'][i], predicted_emotions=emotions[i], image=f'{i:03d}.png'))
    with open(os.path.join(out_dir, 'samples.json'), 'w', encoding='utf-8') as f:
        json.dump(records, f, indent=2, ensure_ascii=False)
    pipeline.make_grid(images, nrow=len(images)).save(os.path.join(out_dir, 'grid.png'))
