"""train_empath.py on tiny CPU components and synthetic features: the objective, learning, exact resume after
SIGKILL (also during a save), two-process agreement, the non-finite guard and self-contained checkpoints."""
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import train_empath
from configs.avamerg_tiny import get_config
from libs import cli, trainer
from libs.avamerg import EMOTIONS_32, coarse_index
from libs.diffusion import Schedule, stable_diffusion_betas
from libs.errors import UserError
from libs.features import make_manifest, tensor_spec, write_manifest, write_shard
from libs.uvit import build_nnet, is_condition_key

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = (0, 1, 22, 27)   # afraid, angry, joyful, sad: four coarse classes too; chance accuracy is 1/4
# One intra-op thread everywhere: CPU results are then bit-reproducible across processes, and the tests do not
# oversubscribe a small machine.
ENV = dict(os.environ, OMP_NUM_THREADS='1', PYTHONPATH=ROOT)


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def write_features(folder, config, n_pairs, per_shard, g, split='train'):
    """Synthetic pairs whose speaker features (face latent, CLIP embedding, text) and response depend on the label."""
    C, h, w = config.z_shape
    T, D, Dc = config.num_text_tokens, config.clip_text_dim, config.clip_img_dim
    proto = {k: torch.randn(len(CLASSES), *shape, generator=torch.Generator().manual_seed(i))
             for i, (k, shape) in enumerate(dict(sz=(C, h, w), sclip=(1, Dc), stext=(T, D), rz=(C, h, w),
                                                  rclip=(1, Dc), rtext=(T, D)).items())}
    noise = lambda scale, *shape: scale * torch.randn(*shape, generator=g)
    moments = lambda mean: torch.cat([mean, torch.full_like(mean, -20.)])   # near-deterministic posterior
    records = []
    for i in range(n_pairs):
        c, label = i % len(CLASSES), CLASSES[i % len(CLASSES)]
        records.append(dict(
            speaker_moments=moments(proto['sz'][c] + noise(.5, C, h, w)), speaker_clip_img=2 * proto['sclip'][c]
            + noise(.5, 1, Dc), speaker_text=proto['stext'][c] + noise(.5, T, D),
            response_moments=moments(proto['rz'][c] + noise(.1, C, h, w)),
            response_clip_img=proto['rclip'][c] + noise(.1, 1, Dc), response_text=proto['rtext'][c] + noise(.1, T, D),
            label=label, coarse_label=coarse_index(label), split=split, conversation_id=f'{i:05d}', turn_id='0',
            speaker_stem=f'dia{i:05d}utt0_1', response_stem=f'dia{i:05d}utt1_2', speaker_text_raw=f'speaker {i}',
            response_text_raw=f'response {i}', emotion=EMOTIONS_32[label]))
    entries = [write_shard(folder, k, records[s:s + per_shard]) for k, s in enumerate(range(0, n_pairs, per_shard))]
    write_manifest(folder, make_manifest(entries, tensor_spec(records[0]), resolution=2 * h, split=split))


@pytest.fixture(scope='module')
def tiny_root(tmp_path_factory):
    """Tiny official-layout weights (U-ViT v1, caption decoder + tokenizer, VAE) and train/test feature caches."""
    from libs.autoencoder import FrozenAutoencoderKL, ldm_state_dict_from_diffusers
    from libs.caption_decoder import (CaptionDecoder, build_tiny_gpt2_tokenizer, load_gpt2_tokenizer,
                                      save_official_layout)
    root = str(tmp_path_factory.mktemp('tiny'))
    config = get_config(root)
    torch.manual_seed(0)
    torch.save(build_nnet(dict(config.nnet, name='uvit_multi_post_ln_v1')).state_dict(), f'{root}/uvit_v1.pth')
    texts = ['I am so sorry to hear that.', 'That is wonderful news!', 'Tell me more about it.'] * 5
    tokenizer = load_gpt2_tokenizer(build_tiny_gpt2_tokenizer(texts, f'{root}/gpt2_tokenizer', vocab_size=300))
    save_official_layout(CaptionDecoder(config.caption_decoder, tokenizer), f'{root}/caption_decoder.pth')
    vae = FrozenAutoencoderKL(config.autoencoder)
    torch.save(ldm_state_dict_from_diffusers(vae.vae.state_dict()), f'{root}/autoencoder_kl.pth')
    g = torch.Generator().manual_seed(1)
    write_features(config.data.train, config, 128, 16, g)
    write_features(config.data.val, config, 32, 16, g, split='val')
    return root


def tiny_config(root, workdir, **train):
    """The tiny training config with a workdir and train-section overrides."""
    config = get_config(root)
    config.workdir = str(workdir)
    config.train.update(train)
    return config


def overrides(config_train):
    """Command-line flags setting train-section keys."""
    return [f'--config.train.{k}={v}' for k, v in config_train.items()]


def read_metrics(run_dir):
    """metrics.jsonl as a list of dicts."""
    with open(os.path.join(run_dir, 'metrics.jsonl')) as f:
        return [json.loads(line) for line in f]


def free_port():
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------------------------------------------
# The objective, checked against an independent restatement
# ----------------------------------------------------------------------------------------------------------------

def test_sample_latent_is_the_official_posterior_sample():
    from libs.autoencoder import FrozenAutoencoderKL
    config = get_config('unused')
    vae = FrozenAutoencoderKL(config.autoencoder)
    moments = torch.randn(2, 8, 4, 4) * torch.tensor([1.] * 4 + [20.] * 4).view(1, 8, 1, 1)  # clamping matters
    expected = vae.sample(moments, generator=torch.Generator().manual_seed(5))
    noise = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(trainer.sample_latent(moments, 0.18215, noise), expected)


HALF = dict(face=0.2, text=0.2, both=0.1)


def test_randomness_is_keyed_by_stream_position():
    config = get_config('unused')
    a = trainer.draw_randomness([5, 9, 12], 1, 'train', config, 1000, HALF)
    b = trainer.draw_randomness([9], 1, 'train', config, 1000, HALF)
    assert all(torch.equal(a[k][1:2], b[k]) for k in a)               # independent of the batch it sits in
    c = trainer.draw_randomness([9], 2, 'train', config, 1000, HALF)
    assert not torch.equal(b['eps_img'], c['eps_img'])                # but not of the seed
    many = trainer.draw_randomness(range(400), 0, 'train', config, 1000, HALF)
    assert many['t_img'].min() >= 1 and many['t_text'].max() <= 1000
    assert not torch.equal(many['t_img'], many['speaker_t_img'])
    assert trainer.draw_randomness(range(20), 0, 'val', config, 1000, trainer.NO_DROPOUT)['keep_text'].all()


def test_speaker_dropout_shares_match_the_configured_probabilities():
    config = get_config('unused')
    drop = trainer.speaker_dropout(config.train)
    assert drop == dict(face=0.05, text=0.05, both=0.10)  # docs/design.md §2 defaults
    n = 5000
    rand = trainer.draw_randomness(range(n), 0, 'train', config, 1000, drop)
    ki, kt = rand['keep_img'], rand['keep_text']
    shares = dict(face=(~ki & kt).float().mean(), text=(ki & ~kt).float().mean(), both=(~ki & ~kt).float().mean())
    for k, p in drop.items():
        assert abs(shares[k] - p) < 4 * (p * (1 - p) / n) ** 0.5, (k, shares[k])
    assert (ki & kt).float().mean() == pytest.approx(0.8, abs=0.025)
    for bad in (dict(p_drop_face=-0.1), dict(p_drop_both=0.95)):
        with pytest.raises(UserError, match='p_drop'):
            trainer.speaker_dropout(dict(config.train, **bad))


@pytest.mark.parametrize('face,text,both', [(0.3, 0.1, 0.05), (0.05, 0.25, 0.15)])
def test_unequal_dropout_shares_go_to_the_modality_they_name(face, text, both):
    """Face-only, text-only and whole-speaker dropout each at its own rate (the defaults' equal shares would not
    notice two of them swapped)."""
    config = get_config('unused')
    config.train.update(p_drop_face=face, p_drop_text=text, p_drop_both=both)
    drop, n = trainer.speaker_dropout(config.train), 4000
    rand = trainer.draw_randomness(range(n), 0, 'train', config, 1000, drop)
    ki, kt = rand['keep_img'], rand['keep_text']
    shares = dict(face=(~ki & kt).float().mean(), text=(ki & ~kt).float().mean(), both=(~ki & ~kt).float().mean())
    for k, p in dict(face=face, text=text, both=both).items():
        assert abs(shares[k] - p) < 4 * (p * (1 - p) / n) ** 0.5, (k, float(shares[k]), p)


def test_ema_warmup():
    assert trainer.ema_decay(0, 0.9999) == pytest.approx(0.1)
    assert trainer.ema_decay(10, 0.9999) == pytest.approx(11 / 20)
    assert trainer.ema_decay(10 ** 6, 0.9999) == 0.9999 and trainer.ema_decay(100, 0.5) == 0.5
    # After 20k steps of a 0.9999 EMA, the initial weights' share is the product of the rates: negligible with
    # warm-up, e^-2 without.
    share = lambda decay: math.prod(decay(s) for s in range(20000))
    assert share(lambda s: trainer.ema_decay(s, 0.9999)) < 1e-6
    assert share(lambda s: 0.9999) == pytest.approx(math.exp(-2), rel=1e-3)


class RecordingNet(torch.nn.Module):
    """Stands in for the U-ViT: records its inputs and returns fixed predictions."""

    def forward(self, img, clip_img, text, t_img, t_text, data_type, cond):
        self.inputs = dict(img=img, clip_img=clip_img, text=text, t_img=t_img, t_text=t_text, data_type=data_type,
                           cond=cond)
        B = img.shape[0]
        g = torch.Generator().manual_seed(0)
        self.outputs = (torch.randn(img.shape, generator=g), torch.randn(clip_img.shape, generator=g),
                        torch.randn(text.shape, generator=g), torch.randn(B, 32, generator=g))
        return self.outputs


def test_training_losses_match_the_objective():
    config = get_config('unused')
    config.train.emotion_weight = 0.3
    B, (C, h, w), N = 6, config.z_shape, 1000
    g = torch.Generator().manual_seed(3)
    batch = dict(speaker_moments=torch.randn(B, 2 * C, h, w, generator=g),
                 response_moments=torch.randn(B, 2 * C, h, w, generator=g),
                 speaker_clip_img=torch.randn(B, 1, config.clip_img_dim, generator=g),
                 response_clip_img=torch.randn(B, 1, config.clip_img_dim, generator=g),
                 speaker_text=torch.randn(B, config.num_text_tokens, config.clip_text_dim, generator=g).half(),
                 response_text=torch.randn(B, config.num_text_tokens, config.clip_text_dim, generator=g).half(),
                 label=torch.tensor([0, 5, -1, 31, 7, -1]))
    rand = trainer.draw_randomness(range(B), 0, 'train', config, N, HALF)
    assert 0 < rand['keep_img'].sum() < B and 0 < rand['keep_text'].sum() < B
    reducer = torch.nn.Linear(config.clip_text_dim, config.text_dim)
    net = RecordingNet()
    losses, logits = trainer.training_losses(net, batch, rand, reducer, Schedule(stable_diffusion_betas()), config)

    # Independent restatement: SD betas -> ᾱ in float64, posterior samples, noising, MSEs, CE with unknowns as 0.
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, N) ** 2
    abar = torch.tensor(np.concatenate([[1.], np.cumprod(1 - betas)]))
    latent = lambda m, e: 0.18215 * (m[:, :C] + torch.exp(0.5 * m[:, C:].clamp(-30, 20)) * e)
    noised = lambda x, t, e: (abar[t].sqrt().view(-1, *[1] * (x.dim() - 1)).float() * x
                              + (1 - abar[t]).sqrt().view(-1, *[1] * (x.dim() - 1)).float() * e)
    ki, kt = rand['keep_img'], rand['keep_text']
    sel = lambda k, x, y: torch.stack([xi if ki_ else yi for ki_, xi, yi in zip(k, x, y)])
    text_speaker, text_response = reducer(batch['speaker_text'].float()), reducer(batch['response_text'].float())
    cond = net.inputs['cond']
    torch.testing.assert_close(cond['img'], sel(ki, latent(batch['speaker_moments'], rand['speaker_latent']),
                                                rand['absent_img']))
    torch.testing.assert_close(cond['clip_img'], sel(ki, batch['speaker_clip_img'], rand['absent_clip']))
    torch.testing.assert_close(cond['text'], sel(kt, text_speaker, rand['absent_text']))
    assert cond['t_img'].tolist() == [0 if k else N for k in ki] and cond['t_text'].tolist() == [0 if k else N
                                                                                                    for k in kt]
    z = latent(batch['response_moments'], rand['response_latent'])
    torch.testing.assert_close(net.inputs['img'], noised(z, rand['t_img'], rand['eps_img']))
    torch.testing.assert_close(net.inputs['clip_img'], noised(batch['response_clip_img'], rand['t_img'],
                                                              rand['eps_clip']))
    torch.testing.assert_close(net.inputs['text'], noised(text_response, rand['t_text'], rand['eps_text']))
    assert net.inputs['data_type'].tolist() == [config.data_type] * B
    out = net.outputs
    mse = lambda a, b: ((a - b) ** 2).flatten(1).mean(1)
    log_p = torch.log_softmax(out[3], -1)
    ce = torch.stack([-log_p[i, y] if y >= 0 else torch.tensor(0.) for i, y in enumerate(batch['label'].tolist())])
    expected = (mse(out[0], rand['eps_img']) + mse(out[1], rand['eps_clip']) + mse(out[2], rand['eps_text'])
                + 0.3 * ce)
    torch.testing.assert_close(losses['loss'], expected)
    assert losses['emotion'][2] == 0 and torch.equal(logits, out[3])


# ----------------------------------------------------------------------------------------------------------------
# Initialisation and optimizer
# ----------------------------------------------------------------------------------------------------------------

def test_init_from_official_layout_loads_every_official_key(tiny_root, caplog):
    config = get_config(tiny_root)
    official = torch.load(config.train.init_from, weights_only=True)
    with caplog.at_level(logging.INFO):
        nnet = trainer.build_model(config)
    state = nnet.state_dict()
    assert all(torch.equal(state[k], v) for k, v in official.items())
    new = sorted(set(state) - set(official))
    assert new and all(is_condition_key(k) for k in new)
    assert torch.equal(state['pos_embed_cond'], official['pos_embed'])
    gates = [k for k in new if k.endswith('cond_gate')]
    assert len(gates) == config.nnet.depth + 1 and all(torch.count_nonzero(state[k]) == 0 for k in gates)
    assert any(f'initialised {len(new)} new parameters' in r.message and f'({len(gates)} blocks)' in r.message
               and all(k in r.message for k in new if k not in gates) for r in caplog.records)
    groups = trainer.make_optimizer(nnet, config).param_groups
    names = {id(p): n for n, p in nnet.named_parameters()}
    opt = config.optimizer
    for group in groups:
        group_names = {names[id(p)] for p in group['params']}
        is_new = {is_condition_key(n) for n in group_names}
        decays = {n not in nnet.no_weight_decay() for n in group_names}
        assert len(is_new) == 1 and len(decays) == 1  # groups do not mix
        assert group['lr'] == opt.lr * (opt.condition_lr_scale if is_new.pop() else 1.)
        assert group['weight_decay'] == (opt.weight_decay if decays.pop() else 0.)
    assert sum(len(g['params']) for g in groups) == len(list(nnet.parameters()))
    assert [trainer.warmup(s, 4) for s in (0, 1, 3, 10)] == [0.25, 0.5, 1., 1.]


# ----------------------------------------------------------------------------------------------------------------
# Learning, samples, checkpoints
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def learned_run(tiny_root, tmp_path_factory):
    """250 steps; emotion weight 1 and lr 3e-3 let the tiny model learn the labels within the test's budget."""
    config = tiny_config(tiny_root, tmp_path_factory.mktemp('work'), n_steps=250, emotion_weight=1., val_every=125,
                         ckpt_every=125, keep_last=1, sample_every=250, log_every=25)
    config.optimizer.update(lr=3e-3, condition_lr_scale=1.)
    tic = time.perf_counter()
    state = train_empath.train(config)
    return config, state, time.perf_counter() - tic


def test_loss_decreases_and_emotion_beats_chance(learned_run):
    config, state, seconds = learned_run
    metrics = read_metrics(os.path.join(config.workdir, config.name))
    train_logs = [m for m in metrics if 'loss' in m]
    assert [m['step'] for m in train_logs] == list(range(25, 251, 25)) and state['step'] == 250
    assert train_logs[-1]['loss'] < 0.6 * train_logs[0]['loss']
    for term in ('img', 'clip', 'text'):
        assert train_logs[-1][f'loss_{term}'] < train_logs[0][f'loss_{term}']
    val = [m for m in metrics if 'val/nnet/loss' in m]
    assert [m['step'] for m in val] == [125, 250] and val[1]['val/nnet/loss'] < val[0]['val/nnet/loss']
    assert val[1]['val/nnet/emotion_fine_acc'] >= 0.6 and val[1]['val/nnet/emotion_coarse_acc'] >= 0.6  # chance 1/4
    print(f'CPU time per step: {train_logs[-1]["sec_per_step"] * 1e3:.0f} ms (total {seconds:.1f} s)')


def test_checkpoint_alone_rebuilds_the_model_and_samples_were_written(learned_run):
    config, state, _ = learned_run
    run = os.path.join(config.workdir, config.name)
    assert trainer.checkpoints(run) == [250] and state['best_step'] == 250   # the newest is the best here
    path = os.path.join(run, 'ckpts', '250.ckpt', 'nnet_ema.safetensors')
    nnet, saved = trainer.load_exported_nnet(path)
    assert saved['nnet'] == config.nnet.to_dict() and saved['train']['n_steps'] == 250
    stored = load_file(path)
    assert nnet.state_dict().keys() == stored.keys()
    assert all(torch.equal(v, stored[k]) for k, v in nnet.state_dict().items())
    with open(os.path.join(run, 'samples', '0000250', 'samples.json')) as f:
        samples = json.load(f)
    assert len(samples) == config.train.sample_n and os.path.isfile(os.path.join(run, 'samples', '0000250', '000.png'))
    assert os.path.isfile(os.path.join(run, 'samples', '0000250', 'grid.png'))
    assert {'response', 'predicted_emotions', 'speaker_text', 'reference_response'} <= set(samples[0])
    # The run's export: the EMA network of the best checkpoint, with a note saying which.
    exported = load_file(os.path.join(run, trainer.EXPORT))
    assert exported.keys() == stored.keys() and all(torch.equal(exported[k], stored[k]) for k in stored)
    with open(os.path.join(run, trainer.EXPORT_INFO)) as f:
        info = json.load(f)
    assert info['step'] == 250 and info['selected_by'] == 'best validation EMA loss'


def test_unconditional_network_trains_the_joint_unidiffuser_objective(tiny_root, tmp_path):
    """nnet.name=uvit_multi_post_ln_v1: UniDiffuser pre-training on both roles' (face, utterance) pairs."""
    config = tiny_config(tiny_root, tmp_path, n_steps=60, val_every=30, ckpt_every=30, log_every=10, sample_every=30,
                         init_from='')
    config.nnet.name = 'uvit_multi_post_ln_v1'
    config.optimizer.lr = 3e-3
    state = train_empath.train(config)
    run = os.path.join(config.workdir, config.name)
    logs = [m for m in read_metrics(run) if 'loss' in m]
    assert logs[-1]['loss'] < 0.8 * logs[0]['loss'] and logs[-1]['loss_emotion'] == 0
    val = [m for m in read_metrics(run) if 'val/ema/loss' in m]
    assert len(val) == 2 and not any('emotion_fine_acc' in k for k in val[0])
    official = build_nnet(dict(config.nnet)).state_dict()
    exported = load_file(os.path.join(run, trainer.EXPORT))
    assert {k: v.shape for k, v in exported.items()} == {k: v.shape for k, v in official.items()}
    assert state['best_step'] in (30, 60) and not os.path.isdir(os.path.join(run, 'samples'))


def test_ema_export_replaces_the_old_file_atomically(tmp_path):
    """A new export is written beside the old one and renamed over it: a write that fails half-way leaves the old
    export whole, and a reader holding the old file keeps reading the old bytes."""
    run = tmp_path / 'run'
    for step, fill in ((2, 1.), (4, 2.)):
        os.makedirs(run / 'ckpts' / f'{step}.ckpt')
        save_file({'w': torch.full((256,), fill)}, str(run / 'ckpts' / f'{step}.ckpt' / trainer.EXPORT))
    state = dict(best_step=-1, best_val_loss=float('inf'))
    trainer.export_ema(str(run), state, 2)
    old = (run / trainer.EXPORT).read_bytes()
    reader = open(run / trainer.EXPORT, 'rb')

    def half_then_fail(source, dest):
        with open(source, 'rb') as f, open(dest, 'wb') as out:
            out.write(f.read()[:100])
        raise OSError(28, 'No space left on device', dest)
    with pytest.raises(OSError):
        trainer.export_ema(str(run), state, 4, write=half_then_fail)
    assert (run / trainer.EXPORT).read_bytes() == old and sorted(os.listdir(run)) == sorted(
        ['ckpts', trainer.EXPORT, trainer.EXPORT_INFO])
    assert json.loads((run / trainer.EXPORT_INFO).read_text())['step'] == 2
    trainer.export_ema(str(run), state, 4)
    assert torch.equal(load_file(str(run / trainer.EXPORT))['w'], torch.full((256,), 2.))
    assert reader.read() == old   # the old inode, untouched
    reader.close()


def test_prune_keeps_the_newest_and_the_best(tmp_path):
    for step in (10, 20, 30, 40, 50):
        os.makedirs(tmp_path / 'ckpts' / f'{step}.ckpt')
        for name in trainer.CKPT_FILES:
            (tmp_path / 'ckpts' / f'{step}.ckpt' / name).write_text('x')
    os.makedirs(tmp_path / 'ckpts' / '60.ckpt')            # incomplete: not a checkpoint
    trainer.prune_checkpoints(str(tmp_path), keep_last=2, best_step=20)
    assert trainer.checkpoints(str(tmp_path)) == [20, 40, 50]


# ----------------------------------------------------------------------------------------------------------------
# Exact resume after SIGKILL, including a kill in the middle of writing a checkpoint
# ----------------------------------------------------------------------------------------------------------------

KILL_DURING_SAVE = '''
import os, runpy, signal, sys
from libs import cli, trainer
export = trainer.export_nnet
def export_then_die(state_dict, path, config, step):
    export(state_dict, path, config, step)
    if step == {step}:   # the first file of the checkpoint is written, the rest is not
        os.kill(os.getpid(), signal.SIGKILL)
trainer.export_nnet = export_then_die
sys.argv = ['train_empath.py'] + sys.argv[1:]
runpy.run_path('train_empath.py', run_name='__main__')
'''
# SIGKILL in the middle of a training step (after its optimizer update, before its EMA update and logging): the
# kill lands at the same point of every run, however fast the machine is.
KILL_DURING_STEP = '''
import os, runpy, signal, sys
from libs import trainer
decay = trainer.ema_decay
def die_at_step(step, rate):
    if step + 1 == {step}:
        os.kill(os.getpid(), signal.SIGKILL)
    return decay(step, rate)
trainer.ema_decay = die_at_step
sys.argv = ['train_empath.py'] + sys.argv[1:]
runpy.run_path('train_empath.py', run_name='__main__')
'''


def test_sigkill_and_resume_is_bit_identical(tiny_root, tmp_path):
    common = dict(n_steps=40, ckpt_every=10, val_every=10, log_every=5, keep_last=2)
    reference = tiny_config(tiny_root, tmp_path / 'reference', **common)
    train_empath.train(reference)
    ref_run = os.path.join(reference.workdir, reference.name)

    workdir = tmp_path / 'killed'
    args = [f'--config=configs/avamerg_tiny.py:{tiny_root}', f'--config.workdir={workdir}', *overrides(common)]
    run = os.path.join(workdir, reference.name)
    # 1. SIGKILL during step 17: checkpoint 10 is complete and the metrics of step 15 are logged after it.
    died = subprocess.run([sys.executable, '-c', KILL_DURING_STEP.format(step=17), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    assert trainer.checkpoints(run) == [10]
    assert [m['step'] for m in read_metrics(run) if 'loss' in m] == [5, 10, 15]
    # 2. Resume, and die while writing the step-30 checkpoint.
    died = subprocess.run([sys.executable, '-c', KILL_DURING_SAVE.format(step=30), *args], cwd=ROOT, env=ENV,
                          capture_output=True, text=True)
    assert died.returncode == -signal.SIGKILL, died.stderr[-3000:]
    assert sorted(os.listdir(os.path.join(run, 'ckpts', '.tmp-30.ckpt'))) == ['nnet.safetensors', 'rng-0.pt']
    assert trainer.checkpoints(run) == [10, 20]
    # 3. Resume from the newest complete checkpoint (20) and finish.
    done = subprocess.run([sys.executable, 'train_empath.py', *args], cwd=ROOT, env=ENV, capture_output=True,
                          text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert 'resumed from step 20' in open(os.path.join(run, 'log.txt')).read()
    assert not os.path.exists(os.path.join(run, 'ckpts', '.tmp-30.ckpt'))

    for name in ('nnet.safetensors', 'nnet_ema.safetensors'):
        a, b = (load_file(os.path.join(r, 'ckpts', '40.ckpt', name)) for r in (ref_run, run))
        assert all(torch.equal(a[k], b[k]) for k in a), name
    opt_a, opt_b = (torch.load(os.path.join(r, 'ckpts', '40.ckpt', 'training_state.pt'), weights_only=True)
                    ['optimizer']['state'] for r in (ref_run, run))
    assert all(torch.equal(opt_a[k][s], opt_b[k][s]) for k in opt_a for s in opt_a[k])
    strip = lambda ms: [{k: v for k, v in m.items() if k != 'sec_per_step'} for m in ms]
    assert strip(read_metrics(run)) == strip(read_metrics(ref_run))   # same losses, no duplicated lines


# ----------------------------------------------------------------------------------------------------------------
# Two processes (DDP over gloo) follow the single-process run
# ----------------------------------------------------------------------------------------------------------------

def test_two_processes_and_accumulation_agree_with_one(tiny_root, tmp_path):
    common = dict(n_steps=12, log_every=1, val_every=12, ckpt_every=12, batch_size=8)
    train_empath.train(tiny_config(tiny_root, tmp_path / 'one', grad_accum=1, **common))
    train_empath.train(tiny_config(tiny_root, tmp_path / 'accum', grad_accum=2, **common))
    cmd = [sys.executable, '-m', 'accelerate.commands.launch', '--multi_gpu', '--num_processes', '2',
           '--num_machines', '1', '--mixed_precision', 'no', '--dynamo_backend', 'no',
           '--main_process_port', str(free_port()), 'train_empath.py', f'--config=configs/avamerg_tiny.py:{tiny_root}',
           f'--config.workdir={tmp_path / "two"}', *overrides(dict(common, grad_accum=1))]
    done = subprocess.run(cmd, cwd=ROOT, env=dict(ENV, ACCELERATE_USE_CPU='true'), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    assert '2 process(es)' in open(tmp_path / 'two' / 'avamerg_tiny' / 'log.txt').read()
    one, accum, two = (read_metrics(tmp_path / w / 'avamerg_tiny') for w in ('one', 'accum', 'two'))
    losses = lambda ms: [m['loss'] for m in ms if 'loss' in m]
    # The same pairs and per-pair noise make up every global batch: only the float summation order differs
    # (measured: relative differences around 1e-7).
    for other in (accum, two):
        assert len(losses(other)) == 12 and np.allclose(losses(other), losses(one), rtol=1e-5, atol=0)
        assert np.isclose(other[-1]['val/ema/loss'], one[-1]['val/ema/loss'], rtol=1e-5)
        assert other[-1]['val/nnet/emotion_fine_acc'] == one[-1]['val/nnet/emotion_fine_acc']


def test_features_of_another_size_are_rejected(tiny_root, tmp_path):
    config = tiny_config(tiny_root, tmp_path)
    config.z_shape = (4, 8, 8)
    with pytest.raises(UserError, match=r'speaker_moments of shape \[8, 16, 16\], config expects \[8, 8, 8\]'):
        train_empath.train(config)


# ----------------------------------------------------------------------------------------------------------------
# Non-finite guard
# ----------------------------------------------------------------------------------------------------------------

def poison_from(monkeypatch, first_bad_step, last_bad_step=10 ** 9):
    """Make the training loss NaN on training steps first..last (1-based; validation passes stay finite)."""
    real, calls = trainer.training_losses, []

    def poisoned(nnet, *args, **kwargs):
        losses, logits = real(nnet, *args, **kwargs)
        if nnet.training:
            calls.append(1)
            if first_bad_step <= len(calls) <= last_bad_step:
                losses['loss'] = losses['loss'] * float('nan')
        return losses, logits
    monkeypatch.setattr(trainer, 'training_losses', poisoned)


def test_one_nonfinite_step_is_skipped_and_counted(tiny_root, tmp_path, monkeypatch):
    poison_from(monkeypatch, 3, 3)
    config = tiny_config(tiny_root, tmp_path, n_steps=6, log_every=1, val_every=0, ckpt_every=2, keep_last=5,
                         max_nonfinite=2)
    state = train_empath.train(config)
    run = os.path.join(config.workdir, config.name)
    assert state['step'] == 6 and state['nonfinite_total'] == 1
    metrics = read_metrics(run)
    assert 'loss' not in metrics[2] and metrics[2]['nonfinite_total'] == 1 and np.isfinite(metrics[3]['loss'])


def test_nonfinite_guard_stops_with_exit_code_and_skips_updates(tiny_root, tmp_path, monkeypatch):
    poison_from(monkeypatch, 3)
    argv = ['train_empath.py', f'--config=configs/avamerg_tiny.py:{tiny_root}', f'--config.workdir={tmp_path}',
            *overrides(dict(n_steps=20, log_every=1, val_every=0, ckpt_every=2, keep_last=5, max_nonfinite=3))]
    defined = set(train_empath.FLAGS)
    train_empath.define_flags()  # the script defines its flags only when run as a script
    try:
        with pytest.raises(SystemExit) as exit_info:
            cli.run(train_empath.main, argv)   # the script's error path: parse, run, exit code
    finally:
        train_empath.FLAGS.unparse_flags()
        for name in set(train_empath.FLAGS) - defined:
            delattr(train_empath.FLAGS, name)
    assert exit_info.value.code == trainer.DIVERGED_EXIT_CODE
    run = os.path.join(tmp_path, 'avamerg_tiny')
    assert '3 consecutive non-finite steps' in open(os.path.join(run, 'log.txt')).read()
    assert trainer.checkpoints(run) == [2, 4]   # steps 3 and 4 were skipped, step 5 stopped the run
    for name in ('nnet.safetensors', 'nnet_ema.safetensors'):
        a, b = (load_file(os.path.join(run, 'ckpts', f'{s}.ckpt', name)) for s in (2, 4))
        assert all(torch.equal(a[k], b[k]) for k in a), f'{name} changed during skipped steps'


HELP_IMPORTS = '''
import runpy, sys
sys.argv = ['train_empath.py', '--help']
try:
    runpy.run_path('train_empath.py', run_name='__main__')
except SystemExit as exit_:
    print(exit_.code, sorted(m for m in ('torch', 'transformers', 'diffusers', 'accelerate') if m in sys.modules))
'''


def test_help_exits_0_without_heavy_imports():
    """train_empath.py is flags + a call: --help imports none of torch, transformers, diffusers, accelerate."""
    done = subprocess.run([sys.executable, '-c', HELP_IMPORTS], cwd=ROOT, env=ENV, capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip().splitlines()[-1] == '0 []', done.stdout[-2000:] + done.stderr[-2000:]
    assert '--config' in done.stdout and '--[no]dry_run' in done.stdout
