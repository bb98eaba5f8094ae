"""Sampling modes on a tiny random U-ViT: every mode runs, guidance batching is exact, seeds reproduce."""
import pytest
import torch

from libs import modes
from libs.diffusion import NoiseScheduleVP, cfg, dpm_solver_pp_fast, stable_diffusion_betas
from libs.errors import UserError
from libs.uvit import build_nnet

TINY = dict(img_size=4, in_chans=4, patch_size=2, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, qkv_bias=False,
            mlp_time_embed=False, text_dim=6, num_text_tokens=5, clip_img_dim=8)


def make_ctx(name='uvit_multi_post_ln_v1', seed=0, scale=3., steps=3, **kw):
    torch.manual_seed(0)
    nnet = build_nnet(dict(TINY, name=name)).eval()
    with torch.no_grad():  # gates open (a fresh model's are zero), so that the speaker matters
        for name_, p in nnet.named_parameters():
            if name_.endswith('cond_gate'):
                p.normal_()
    betas = stable_diffusion_betas()
    return modes.Context(nnet=nnet, sampler=dpm_solver_pp_fast, schedule=NoiseScheduleVP(betas), N=len(betas),
                         steps=steps, scale=scale, z_shape=(4, 4, 4), clip_img_dim=8, text_shape=(5, 6),
                         data_type=None if name == 'uvit_multi_post_ln' else 1,
                         generator=torch.Generator().manual_seed(seed), **kw)


def encode_rows(nnet, ctx, mode, turns):
    """The one speaker cache of a step's rows: the turns of ``speaker_branches`` stacked, encoded in one call."""
    branches = modes.speaker_branches(ctx, mode)
    with torch.no_grad():
        return nnet.encode_condition({k: torch.cat([turns[b][k] for b in branches]) for k in turns['speaker']})


def inputs_for(ctx, mode, n=2, **turns):
    """Random inputs of a mode; on a conditional network the speaker cache of its rows (``turns`` adds branches).

    A UniDiffuser mode on a fine-tuned network sees no speaker turn: the speaker is absent in every pass.
    """
    g = torch.Generator().manual_seed(99)
    inputs = dict(n=n, text=torch.randn(n, 5, 6, generator=g), z=torch.randn(n, 4, 4, 4, generator=g),
                  clip_img=torch.randn(n, 1, 8, generator=g))
    if ctx.nnet.condition:
        cond = dict(img=torch.randn(n, 4, 4, 4, generator=g), clip_img=torch.randn(n, 1, 8, generator=g),
                    text=torch.randn(n, 5, 6, generator=g), t_img=torch.zeros(n), t_text=torch.zeros(n))
        absent = {k: torch.randn(v.shape, generator=g) for k, v in cond.items()}
        absent.update(t_img=torch.full((n,), 1000.), t_text=torch.full((n,), 1000.))
        turns = dict(speaker=cond if mode in modes.EMPATH_MODES else absent, speaker_absent=absent, **turns)
        inputs['speaker'] = encode_rows(ctx.nnet, ctx, mode, turns)
    return inputs


EXPECTED = {'t2i': {'z', 'clip_img'}, 'i': {'z', 'clip_img'}, 'i2t': {'text'}, 't': {'text'},
            'joint': {'z', 'clip_img', 'text'}, 'i2t2i': {'z', 'clip_img', 'text'},
            't2i2t': {'z', 'clip_img', 'text'}, 'empath': {'z', 'clip_img', 'text', 'emotion'},
            'empath_t': {'text', 'emotion'}, 'empath_i': {'z', 'clip_img', 'emotion'}}
SHAPES = {'z': (2, 4, 4, 4), 'clip_img': (2, 1, 8), 'text': (2, 5, 6), 'emotion': (2, 32)}


@pytest.mark.parametrize('mode', [m for m in modes.MODES if m not in modes.EMPATH_MODES])
@pytest.mark.parametrize('name', ['uvit_multi_post_ln', 'uvit_multi_post_ln_v1', 'uvit_empath'])
def test_unidiffuser_modes(mode, name):
    ctx = make_ctx(name)
    out = modes.get_mode(mode)(ctx, inputs_for(ctx, mode))
    assert set(out) == EXPECTED[mode]
    for k, v in out.items():
        assert v.shape == SHAPES[k] and torch.isfinite(v).all()


@pytest.mark.parametrize('mode', modes.EMPATH_MODES)
def test_empath_modes(mode):
    ctx = make_ctx('uvit_empath')
    out = modes.get_mode(mode)(ctx, inputs_for(ctx, mode))
    assert set(out) == EXPECTED[mode]
    for k, v in out.items():
        assert v.shape == SHAPES[k] and torch.isfinite(v).all()
    torch.testing.assert_close(out['emotion'].sum(1), torch.ones(2))


@pytest.mark.parametrize('mode', ['t2i', 'joint', 'empath'])
def test_same_seed_same_output_and_other_seed_differs(mode):
    name = 'uvit_empath' if mode == 'empath' else 'uvit_multi_post_ln_v1'
    a = modes.get_mode(mode)(make_ctx(name, seed=1), inputs_for(make_ctx(name), mode))
    b = modes.get_mode(mode)(make_ctx(name, seed=1), inputs_for(make_ctx(name), mode))
    c = modes.get_mode(mode)(make_ctx(name, seed=2), inputs_for(make_ctx(name), mode))
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.allclose(a['z'], c['z'])


class Recorder:
    """Wrap the network: record every call's inputs so a test can replay them one pass at a time."""

    def __init__(self, nnet):
        self.nnet, self.calls, self.condition = nnet, [], nnet.condition

    def __call__(self, *args, **kw):
        self.calls.append((args, kw))
        return self.nnet(*args, **kw)


def test_joint_guidance_batched_equals_official_sequential_passes():
    """One batched forward of the three joint passes equals the official three sequential calls."""
    ctx = make_ctx(steps=1)
    rec = Recorder(ctx.nnet)
    ctx.nnet = rec
    x = torch.randn(2, 4 * 16 + 8 + 30)
    t = torch.full((2,), 500.)
    captured = {}

    def sampler(model_fn, x0, schedule, steps):
        captured['eps'] = model_fn(x, t / ctx.N)
        return x0

    ctx.sampler = sampler
    modes.mode_joint(ctx, dict(n=2))
    (z3, c3, txt3, ti3, tt3, dt3), kw = rec.calls[0]
    assert z3.shape[0] == 6 and len(rec.calls) == 1
    with torch.no_grad():
        outs = [rec.nnet(z3[i:i + 2], c3[i:i + 2], txt3[i:i + 2], ti3[i:i + 2], tt3[i:i + 2], dt3[i:i + 2])
                for i in (0, 2, 4)]
    joint, text_only, img_only = outs
    assert torch.equal(ti3[2:4], torch.full((2,), 1000.)) and torch.equal(tt3[4:6], torch.full((2,), 1000.))
    cond = modes.combine(*joint)
    uncond = modes.combine(img_only[0], img_only[1], text_only[2])
    torch.testing.assert_close(captured['eps'], cfg(cond, uncond, ctx.scale), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('cfg_mode', ['true_uncond', 'empty_token'])
def test_t2i_guidance_modes(cfg_mode):
    ctx = make_ctx(t2i_cfg_mode=cfg_mode, empty_text=torch.zeros(1, 5, 6))
    rec = Recorder(ctx.nnet)
    ctx.nnet = rec
    modes.mode_t2i(ctx, inputs_for(ctx, 't2i'))
    (_, _, text, _, t_text, _), _ = rec.calls[0]
    if cfg_mode == 'empty_token':
        assert torch.equal(text[2:], torch.zeros(2, 5, 6)) and torch.equal(t_text[2:], torch.zeros(2))
    else:
        assert torch.equal(t_text[2:], torch.full((2,), 1000.))
    assert len(rec.calls) == ctx.steps


def test_scale_zero_runs_one_pass_per_step():
    ctx = make_ctx(scale=0.)
    rec = Recorder(ctx.nnet)
    ctx.nnet = rec
    modes.mode_joint(ctx, dict(n=2))
    assert len(rec.calls) == ctx.steps and all(c[0][0].shape[0] == 2 for c in rec.calls)


@pytest.mark.parametrize('mode', modes.EMPATH_MODES)
def test_two_scale_guidance_passes_and_equal_scales_reduce_to_no_speaker(mode):
    """two_scale batches (whole turn, utterance only, no speaker); s_t = s_f = s is the no_speaker guidance."""
    g = torch.Generator().manual_seed(7)
    text_only = dict(img=torch.randn(2, 4, 4, 4, generator=g), clip_img=torch.randn(2, 1, 8, generator=g),
                     text=torch.randn(2, 5, 6, generator=g), t_img=torch.full((2,), 1000.), t_text=torch.zeros(2))
    ctx = make_ctx('uvit_empath', speaker_guidance='two_scale', scale_text=3., scale_face=3.)
    inputs = inputs_for(ctx, mode, speaker_text=text_only)
    no_speaker = make_ctx('uvit_empath', scale=3.)
    rec = Recorder(ctx.nnet)
    ctx.nnet = rec
    two = modes.get_mode(mode)(ctx, inputs)
    one = modes.get_mode(mode)(no_speaker, inputs_for(no_speaker, mode))
    assert all(args[0].shape[0] == 6 for args, _ in rec.calls)
    assert modes.speaker_branches(ctx, mode) == ('speaker', 'speaker_text', 'speaker_absent')
    assert all(kw['cond_cache'] is inputs['speaker'] for _, kw in rec.calls)  # the one cache of the 3 passes
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=1e-5, rtol=1e-5)
    other = modes.get_mode(mode)(make_ctx('uvit_empath', speaker_guidance='two_scale', scale_text=1., scale_face=5.),
                                 inputs)
    assert not torch.allclose(other['clip_img' if 'clip_img' in other else 'text'],
                              one['clip_img' if 'clip_img' in one else 'text'])


def test_unknown_mode_lists_valid_ones():
    with pytest.raises(UserError, match='t2i, i2t, joint'):
        modes.get_mode('img2txt')
