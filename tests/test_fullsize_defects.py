"""Defects of the full-size path (issue 21), each tested on tiny networks so that the test fails on the code before
its fix; then one full-size empath solver step and one full-size training step on fake tensors (shapes only).
"""
import gc
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch._subclasses.fake_tensor import FakeTensorMode

from configs.avamerg_empath import get_config as empath_full_config
from configs.common import tiny
from configs.avamerg_tiny import get_config as tiny_train_config
from libs import modes, pipeline, trainer
from libs.diffusion import NoiseScheduleVP, Schedule, dpm_solver_pp_fast, stable_diffusion_betas
from libs.uvit import build_nnet


# ----------------------------------------------------------------------------------------------------------------
# The emotion loss skips pairs whose whole speaker was dropped
# ----------------------------------------------------------------------------------------------------------------

def tiny_batch(config, labels, g):
    """A random feature batch of len(labels) pairs with the config's shapes."""
    B, (C, h, w) = len(labels), config.z_shape
    T, Dc = config.num_text_tokens, config.clip_text_dim
    return dict(speaker_moments=torch.randn(B, 2 * C, h, w, generator=g),
                response_moments=torch.randn(B, 2 * C, h, w, generator=g),
                speaker_clip_img=torch.randn(B, 1, config.clip_img_dim, generator=g),
                response_clip_img=torch.randn(B, 1, config.clip_img_dim, generator=g),
                speaker_text=torch.randn(B, T, Dc, generator=g), response_text=torch.randn(B, T, Dc, generator=g),
                label=torch.tensor(labels))


def emotion_losses(keep_img, keep_text, labels):
    """(per-pair emotion CE, the emotion head's gradient of the batch's mean emotion loss, the logits)."""
    config = tiny_train_config('unused')
    torch.manual_seed(0)
    net = build_nnet(config.nnet)
    g = torch.Generator().manual_seed(1)
    batch = tiny_batch(config, labels, g)
    rand = trainer.draw_randomness(range(len(labels)), 0, 'train', config, 1000, trainer.NO_DROPOUT)
    rand.update(keep_img=torch.tensor(keep_img), keep_text=torch.tensor(keep_text))
    reducer = torch.nn.Linear(config.clip_text_dim, config.text_dim)
    losses, logits = trainer.training_losses(net, batch, rand, reducer, Schedule(stable_diffusion_betas()), config)
    losses['emotion'].mean().backward()
    grad = torch.cat([p.grad.flatten() for p in net.emotion_head.parameters()])
    return losses['emotion'], grad, logits.detach()


def test_no_emotion_loss_when_the_whole_speaker_is_dropped():
    ce, grad, _ = emotion_losses([False] * 3, [False] * 3, [4, 0, 17])
    assert torch.equal(ce, torch.zeros(3))
    assert torch.equal(grad, torch.zeros_like(grad))


def test_emotion_loss_is_the_cross_entropy_of_the_pairs_with_a_speaker():
    # pairs: whole turn, face only, utterance only, nothing (labelled), nothing (unknown label)
    keep_img, keep_text = [True, True, False, False, False], [True, False, True, False, False]
    labels = [3, 9, 21, 5, -1]
    ce, grad, logits = emotion_losses(keep_img, keep_text, labels)
    log_p = logits.float().log_softmax(-1)
    want = torch.tensor([-log_p[i, y].item() for i, y in enumerate(labels[:3])] + [0., 0.])
    torch.testing.assert_close(ce, want)
    assert grad.abs().sum() > 0


# ----------------------------------------------------------------------------------------------------------------
# Sampling: the guidance rows' speaker cache is built once per solver run; kept caches hold K and V alone; every
# branch shares one draw of the absent speaker's noise
# ----------------------------------------------------------------------------------------------------------------

TINY = dict(img_size=4, in_chans=4, patch_size=2, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, qkv_bias=False,
            mlp_time_embed=False, text_dim=6, num_text_tokens=5, clip_img_dim=8)
Z, DC, TEXT = (4, 4, 4), 8, (5, 6)


def tiny_empath(**kw):
    torch.manual_seed(0)
    return build_nnet(dict(TINY, name='uvit_empath', **kw))


def context(nnet, steps, **kw):
    betas = stable_diffusion_betas()
    return modes.Context(nnet=nnet, sampler=dpm_solver_pp_fast, schedule=NoiseScheduleVP(betas), N=len(betas),
                         steps=steps, scale=3., z_shape=Z, clip_img_dim=DC, text_shape=TEXT,
                         generator=torch.Generator().manual_seed(0), **kw)


def speaker_turn(n, g, t_img=0., t_text=0.):
    return dict(img=torch.randn(n, *Z, generator=g), clip_img=torch.randn(n, 1, DC, generator=g),
                text=torch.randn(n, *TEXT, generator=g), t_img=torch.full((n,), t_img),
                t_text=torch.full((n,), t_text))


class CountingNet:
    """Wraps the U-ViT: records the speaker cache object every forward receives."""

    def __init__(self, nnet):
        self.nnet, self.condition, self.caches = nnet, nnet.condition, []

    def __call__(self, *args, cond_cache=None):
        self.caches.append(cond_cache)
        return self.nnet(*args, cond_cache=cond_cache)


def branch_turns(n, g):
    """Speaker turns of the three guidance branches: the whole turn, its utterance alone, no speaker."""
    return dict(speaker=speaker_turn(n, g), speaker_text=speaker_turn(n, g, 1000., 0.),
                speaker_absent=speaker_turn(n, g, 1000., 1000.))


@pytest.mark.parametrize('mode,rule', [('empath', 'no_speaker'), ('empath_i', 'two_scale'), ('t2i', 'no_speaker'),
                                       ('joint', 'no_speaker'), ('i2t2i', 'no_speaker')])
@pytest.mark.parametrize('steps', [2, 5])
@torch.no_grad()
def test_every_step_reads_the_one_cache_of_the_guidance_rows(mode, rule, steps):
    nnet = tiny_empath().eval()
    g = torch.Generator().manual_seed(1)
    net = CountingNet(nnet)
    ctx = context(net, steps, speaker_guidance=rule)
    turns = branch_turns(2, g)
    branches = modes.speaker_branches(ctx, mode)
    rows = {'empath': 2, 'empath_i': 3, 't2i': 2, 'joint': 3, 'i2t2i': 2}[mode]
    assert len(branches) == rows
    speaker = nnet.encode_condition({k: torch.cat([turns[b][k] for b in branches]) for k in turns['speaker']})
    inputs = dict(n=2, text=torch.randn(2, *TEXT, generator=g), z=torch.randn(2, *Z, generator=g),
                  clip_img=torch.randn(2, 1, DC, generator=g), speaker=speaker)
    modes.get_mode(mode)(ctx, inputs)
    runs = 2 if mode == 'i2t2i' else 1  # a composite mode runs two solvers, on the same rows
    assert len(net.caches) == runs * steps
    assert all(c is speaker for c in net.caches)  # no step, and no solver run, copies the cache
    with pytest.raises(ValueError, match='the speaker cache has 5 rows'):  # a cache of other rows is refused
        modes.get_mode(mode)(ctx, dict(inputs, speaker=nnet.encode_condition(speaker_turn(5, g))))


def live_kv_bytes(shape):
    """Bytes of the distinct storages behind every live tensor shaped like a speaker key or value (rows, *shape)."""
    storages = {}
    for obj in gc.get_objects():
        if type(obj) is torch.Tensor and obj.dim() == 4 and tuple(obj.shape[1:]) == shape:
            storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return sum(storages.values())


class LiveKV:
    """Wraps the U-ViT: at the solver's first forward, the bytes of speaker keys/values alive in the process, and
    what one cache of the rows it receives takes."""

    def __init__(self, nnet):
        self.nnet, self.condition, self.seen = nnet, nnet.condition, None

    def __call__(self, *args, cond_cache=None):
        if self.seen is None:
            k = cond_cache.kv[0][0]
            per_row = len(cond_cache.kv) * 2 * k[0].numel() * k.element_size()
            self.seen = live_kv_bytes(tuple(k.shape[1:])), per_row, k.shape[0]
        return self.nnet(*args, cond_cache=cond_cache)


@pytest.mark.parametrize('mode,rule', [('empath', 'two_scale'), ('empath_t', 'no_speaker'), ('joint', 'no_speaker'),
                                       ('i2t2i', 'no_speaker')])
@torch.no_grad()
def test_the_speaker_keys_values_exist_once_while_the_solver_runs(mode, rule):
    """The caller's pattern (eval, periodic samples, benchmark): encode the speaker inputs, run the mode on them.
    While the solver runs, the live speaker K/V are one cache of every guidance row, nothing more."""
    nnet = tiny_empath().eval()
    g = torch.Generator().manual_seed(6)
    face, utterance = dict(z=torch.randn(1, *Z, generator=g), clip_img=torch.randn(1, 1, DC, generator=g)), dict(
        text=torch.randn(1, *TEXT, generator=g))
    net = LiveKV(nnet)
    ctx = context(net, 2, speaker_guidance=rule)
    B = 3
    if mode in modes.EMPATH_MODES:
        inputs = pipeline.speaker_inputs(SimpleNamespace(nnet=nnet), ctx, B, **face, **utterance)
    else:
        inputs = dict(n=B, text=torch.randn(B, *TEXT, generator=g), z=face['z'].expand(B, -1, -1, -1),
                      clip_img=face['clip_img'].expand(B, -1, -1),
                      **pipeline.speaker_inputs(SimpleNamespace(nnet=nnet), ctx, B, mode=mode))
    modes.get_mode(mode)(ctx, inputs)
    live, per_row, rows = net.seen
    assert live == rows * per_row, f'{live / per_row:g} rows of speaker keys/values alive for {rows} guidance rows'
    assert rows == len(modes.speaker_branches(ctx, mode)) * B == {'empath': 9, 'empath_t': 6, 'joint': 9,
                                                                  'i2t2i': 6}[mode]


@pytest.fixture(scope='module')
def components(tiny_models):
    return pipeline.load_components(tiny(tiny_models, condition=True), torch.device('cpu'))


@pytest.mark.parametrize('mode,rule', [('empath', 'two_scale'), ('t2i', 'no_speaker')])
@torch.no_grad()
def test_generate_holds_one_speaker_cache(components, mode, rule):
    """Through libs.pipeline.generate (sample_multi.py, the app): the same, from a raw face and utterance."""
    comp = components
    comp.config.sample.speaker_guidance, comp.config.sample.sample_steps = rule, 2
    ctx = pipeline.make_context(comp, torch.Generator().manual_seed(0))
    net = LiveKV(comp.nnet)
    ctx.nnet = net
    image, prompt = Image.new('RGB', (40, 36), (200, 120, 90)), 'i lost my job today'
    pipeline.generate(comp, ctx, mode, 2, prompt=prompt, image=image if mode == 'empath' else None)
    live, per_row, rows = net.seen
    assert live == rows * per_row, f'{live / per_row:g} rows of speaker keys/values alive for {rows} guidance rows'
    assert rows == len(modes.speaker_branches(ctx, mode)) * 2 == {'empath': 6, 't2i': 4}[mode]


def kv_storage_bytes(cache):
    """(bytes of the distinct storages behind the cache's tensors, bytes of the K and V tensors themselves)."""
    storages = {}
    for kv in cache.kv:
        for t in kv:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values()), sum(t.numel() * t.element_size() for kv in cache.kv for t in kv)


def test_kept_speaker_cache_holds_keys_and_values_only():
    nnet = tiny_empath().eval()
    turn = speaker_turn(3, torch.Generator().manual_seed(2))
    with torch.no_grad():
        held, kv = kv_storage_bytes(nnet.encode_condition(turn))
    assert held == kv
    # Checkpointed training keeps the block outputs (the cache) but not the fused projection inside the block.
    nnet = tiny_empath(use_checkpoint=True).train()
    held, kv = kv_storage_bytes(nnet.encode_condition(turn))
    assert held == kv


def test_compact_cache_gives_the_same_response():
    nnet = tiny_empath().eval()
    g = torch.Generator().manual_seed(3)
    turn, x = speaker_turn(2, g), speaker_turn(2, g, 500., 20.)
    x['data_type'] = torch.ones(2, dtype=torch.long)
    with torch.no_grad():
        compact = nnet(**x, cond_cache=nnet.encode_condition(turn))
    views = nnet(**x, cond=turn)  # under autograd the cache stays views of the fused projection
    assert all(torch.equal(a, b) for a, b in zip(compact, views))


class RecordingEncoder:
    """Stands in for the conditional U-ViT in libs.pipeline: records the speaker turns it encodes (one batch each)."""
    condition = True

    def __init__(self):
        self.turns = []

    def encode_condition(self, cond):
        self.turns.append(cond)
        return cond


@pytest.mark.parametrize('given', ['face', 'utterance', 'none'])
@pytest.mark.parametrize('rule', ['no_speaker', 'two_scale'])
def test_every_branch_shares_one_draw_of_the_absent_noise(given, rule):
    g = torch.Generator().manual_seed(4)
    z, clip_img, text = torch.randn(1, *Z, generator=g), torch.randn(1, 1, DC, generator=g), torch.randn(1, *TEXT,
                                                                                                         generator=g)
    face = dict(z=z, clip_img=clip_img) if given == 'face' else {}
    utterance = dict(text=text) if given == 'utterance' else {}
    comp = SimpleNamespace(nnet=RecordingEncoder())
    ctx = context(None, 1, speaker_guidance=rule)
    speaker = pipeline.speaker_inputs(comp, ctx, 2, **face, **utterance)['speaker']
    (rows,) = comp.nnet.turns  # every guidance branch encoded in one call
    assert speaker is rows
    names = modes.speaker_branches(ctx, 'empath')
    assert names == (('speaker', 'speaker_text', 'speaker_absent') if rule == 'two_scale' else
                     ('speaker', 'speaker_absent'))
    branches = {name: {k: v[2 * i:2 * i + 2] for k, v in rows.items()} for i, name in enumerate(names)}
    absent = branches['speaker_absent']
    assert bool((absent['t_img'] == ctx.N).all()) and bool((absent['t_text'] == ctx.N).all())
    for name, turn in branches.items():
        for key, t in (('img', 't_img'), ('clip_img', 't_img'), ('text', 't_text')):
            if bool((turn[t] == ctx.N).all()):
                assert torch.equal(turn[key], absent[key]), f'{name}.{key}'


# ----------------------------------------------------------------------------------------------------------------
# Full size, shapes only: fake tensors run the real code paths and allocate nothing
# ----------------------------------------------------------------------------------------------------------------

def full_size_fake(build):
    """A full-size network built on the meta device (initialisers read values, fake tensors have none), then
    given fake storage; returns (network, the fake mode to run it under)."""
    with torch.device('meta'):
        nnet = build()
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    with mode:
        nnet = nnet.to_empty(device='cpu')
    return nnet, mode


def test_full_size_empath_solver_step_with_two_guidance_rows_runs_on_fake_tensors():
    full = empath_full_config()
    nnet, fake = full_size_fake(lambda: build_nnet(full.nnet).eval().requires_grad_(False))
    z_shape, text_shape = tuple(full.z_shape), (full.num_text_tokens, full.text_dim)
    with fake, torch.no_grad():
        turn = dict(img=torch.zeros(1, *z_shape), clip_img=torch.zeros(1, 1, full.clip_img_dim),
                    text=torch.zeros(1, *text_shape), t_img=torch.zeros(1), t_text=torch.zeros(1))
        absent = dict(turn, t_img=torch.full((1,), 1000.), t_text=torch.full((1,), 1000.))
        inputs = dict(n=1, speaker=nnet.encode_condition({k: torch.cat([turn[k], absent[k]]) for k in turn}))
        net = CountingNet(nnet)
        ctx = context(net, 1)
        ctx.z_shape, ctx.clip_img_dim, ctx.text_shape = z_shape, full.clip_img_dim, text_shape
        ctx.generator = None  # fake tensors draw no numbers
        out = modes.mode_empath(ctx, inputs)
    assert len(net.caches) == 1 and net.caches[0] is inputs['speaker']  # one step, speaker + no-speaker rows
    assert tuple(out['z'].shape) == (1, *z_shape) and tuple(out['text'].shape) == (1, *text_shape)
    assert tuple(out['emotion'].shape) == (1, full.nnet.num_emotions)
    patches = (full.nnet.img_size // full.nnet.patch_size) ** 2
    speaker_tokens = 2 + full.num_text_tokens + 1 + patches + 1  # timesteps, text, CLIP, patches, [EMO]
    assert inputs['speaker'].kv[0][0].shape == (2, full.nnet.num_heads, speaker_tokens,
                                                full.nnet.embed_dim // full.nnet.num_heads)


def test_full_size_training_forward_and_backward_run_on_fake_tensors():
    full = empath_full_config()
    assert full.nnet.use_checkpoint  # the shipped full-size default
    nnet, fake = full_size_fake(lambda: build_nnet(full.nnet).train())
    labels = [3, -1]
    batch = tiny_batch(full, labels, torch.Generator().manual_seed(5))
    rand = trainer.draw_randomness(range(len(labels)), 0, 'train', full, 1000, trainer.speaker_dropout(full.train))
    with fake:
        reducer = torch.nn.Linear(full.clip_text_dim, full.text_dim).requires_grad_(False)
        losses, logits = trainer.training_losses(nnet, batch, rand, reducer, Schedule(stable_diffusion_betas()), full)
        losses['loss'].mean().backward()
    assert tuple(losses['loss'].shape) == (2,) and tuple(logits.shape) == (2, full.nnet.num_emotions)
    assert all(p.grad is not None and p.grad.shape == p.shape for p in nnet.parameters())
