"""Every sampling mode against a plainly written reference: one sequential network call per guidance pass.

``libs.modes`` batches the guidance passes of a step into one forward and reuses cached speaker keys/values. The
reference here does neither, the way the official ``sample_multi_v1.py`` computes: each pass is its own
``nnet(...)`` call with its inputs and times written out (t_continuous · N for the modality being sampled, 0 for a
clean input, N for a marginalised one fed as Gaussian noise), the guidance formula is spelled out, and a speaker
turn is passed as ``cond=<dict>``, the uncached path. Both are integrated with the project's DPM-Solver++ 'fast'
(checked against the official sampler's output in test_diffusion.py). A swapped pass, a wrong time, branch or
speaker cache changes the samples far beyond the float tolerance these comparisons use.

Random draws. The reference makes the same draws as ``libs.modes`` from a generator seeded like ``ctx.generator``,
in the same order:
  1. the initial noise of the sampled modalities, in the order z (latent), clip_img, text (those sampled only);
  2. at every model call, before any network pass, the noise of the inputs its passes marginalise:
     t2i (true_uncond): text · i2t: z, clip_img · joint: z, clip_img (text-only pass), then text (image-only pass)
     · i: text · t: z, clip_img · empath_t: z, clip_img · empath_i: text · empath and t2i (empty_token): nothing.
     At scale 0, joint draws nothing; t2i and i2t still draw their unconditional noise and discard it, which cannot
     change their own samples but shifts the draws of a following stage, so scale 0 is checked on primitive modes.
  3. a composite mode (i2t2i, t2i2t) makes the draws of its first mode, then those of its second.
"""
import functools

import pytest
import torch

from libs import modes, pipeline
from libs.diffusion import NoiseScheduleVP, dpm_solver_pp_fast, stable_diffusion_betas
from libs.uvit import ConditionCache, build_nnet

TINY = dict(img_size=4, in_chans=4, patch_size=2, embed_dim=32, depth=2, num_heads=2, mlp_ratio=2, qkv_bias=False,
            mlp_time_embed=False, text_dim=6, num_text_tokens=5, clip_img_dim=8)
Z, DC, TEXT = (4, 4, 4), 8, (5, 6)       # per-sample shapes: latent, CLIP image dim, (tokens, text dim)
B, STEPS, SEED = 2, 4, 3                 # 4 steps: one third-order and one first-order DPM-Solver step
BETAS = stable_diffusion_betas()
N = len(BETAS)
NETS = ('uvit_multi_post_ln', 'uvit_multi_post_ln_v1', 'uvit_empath')
SPEAKERS = ('face+utterance', 'face', 'utterance', 'none')
# Batched and sequential forwards differ by float32 rounding only: measured up to 3.5e-7 of a sample's largest
# value (4 solver steps, guidance 3); a wrong pass, time or cache moves samples by 1e-3 of it and more.
REL_TOL = 1e-5
TOL = dict(atol=1e-5, rtol=1e-5)  # for single network outputs (caches, emotions): no solver amplification


@functools.lru_cache(maxsize=None)
def tiny_nnet(name):
    """A tiny random U-ViT; every weight (the conditional one's gates too) drawn at std 0.2, so each input matters."""
    nnet = build_nnet(dict(TINY, name=name)).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    for p in nnet.parameters():
        p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return nnet


def context(name, scale=3., **kw):
    return modes.Context(nnet=tiny_nnet(name), sampler=dpm_solver_pp_fast, schedule=NoiseScheduleVP(BETAS), N=N,
                         steps=STEPS, scale=scale, z_shape=Z, clip_img_dim=DC, text_shape=TEXT,
                         data_type=None if name == 'uvit_multi_post_ln' else 1,
                         generator=torch.Generator().manual_seed(SEED), **kw)


def user_inputs():
    """The mode inputs a user gives: a prompt's text features, an image's latent and CLIP embedding (B samples)."""
    g = torch.Generator().manual_seed(11)
    return dict(text=torch.randn(B, *TEXT, generator=g), z=torch.randn(B, *Z, generator=g),
                clip_img=torch.randn(B, 1, DC, generator=g))


def speaker_dicts(given):
    """The speaker turns of the guidance passes, as plain dicts: the given turn, no speaker, the utterance alone.

    A given modality is clean (t = 0); an absent one is Gaussian noise at t = N (face = latent + CLIP embedding).
    """
    g = torch.Generator().manual_seed(12)
    face = dict(img=torch.randn(B, *Z, generator=g), clip_img=torch.randn(B, 1, DC, generator=g))
    utterance = torch.randn(B, *TEXT, generator=g)

    def turn(with_face, with_utterance):
        noise = dict(img=torch.randn(B, *Z, generator=g), clip_img=torch.randn(B, 1, DC, generator=g),
                     text=torch.randn(B, *TEXT, generator=g))
        out = dict(noise, t_img=torch.full((B,), float(N)), t_text=torch.full((B,), float(N)))
        if with_face:
            out.update(face, t_img=torch.zeros(B))
        if with_utterance:
            out.update(text=utterance, t_text=torch.zeros(B))
        return out
    has_face, has_utterance = given in ('face+utterance', 'face'), given in ('face+utterance', 'utterance')
    return dict(speaker=turn(has_face, has_utterance), speaker_absent=turn(False, False),
                speaker_text=turn(False, has_utterance))


def stacked(turns, branches):
    """The speaker turns of the given branches, stacked branch by branch into one batch."""
    return {k: torch.cat([turns[b][k] for b in branches]) for k in turns[branches[0]]}


def cached(nnet, turns, ctx, mode='empath'):
    """The mode inputs libs.modes takes: the turns of a step's rows (``speaker_branches``) encoded in one cache."""
    return dict(speaker=nnet.encode_condition(stacked(turns, modes.speaker_branches(ctx, mode))))


# ----------------------------------------------------------------------------------------------------------------
# The reference: plain sequential passes
# ----------------------------------------------------------------------------------------------------------------

class Reference:
    """The sampling modes written out pass by pass; ``speaker`` is the turn every pass of a UniDiffuser mode sees."""

    def __init__(self, name, scale=3., t2i_cfg_mode='true_uncond', empty_text=None, speaker=None,
                 speaker_guidance='no_speaker', scale_text=3., scale_face=3.):
        self.nnet, self.scale, self.speaker = tiny_nnet(name), scale, speaker
        self.data_type = None if name == 'uvit_multi_post_ln' else 1
        self.t2i_cfg_mode, self.empty_text = t2i_cfg_mode, empty_text
        self.speaker_guidance, self.scale_text, self.scale_face = speaker_guidance, scale_text, scale_face
        self.g = torch.Generator().manual_seed(SEED)
        self.schedule = NoiseScheduleVP(BETAS)

    def randn(self, *shape):
        return torch.randn(*shape, generator=self.g)

    def net(self, z, clip_img, text, t_img, t_text, cond=None):
        """One forward pass. t_img / t_text: a (B,) tensor or a number for all samples."""
        t_img, t_text = (t if torch.is_tensor(t) else torch.full((B,), float(t)) for t in (t_img, t_text))
        dt = None if self.data_type is None else torch.full((B,), self.data_type, dtype=torch.long)
        return self.nnet(z, clip_img, text, t_img, t_text, dt, cond=cond if cond is not None else self.speaker)

    def guide(self, cond, uncond):
        return cond + self.scale * (cond - uncond)

    def solve(self, eps, *init_shapes):
        """Draw the initial noise (in the given order), flatten it and integrate eps(parts, t_discrete)."""
        parts = [self.randn(B, *s) for s in init_shapes]
        sizes = [p[0].numel() for p in parts]

        def model_fn(x, t_continuous):
            pieces = [p.reshape(B, *s) for p, s in zip(x.split(sizes, dim=1), init_shapes)]
            out = eps(*pieces, t_continuous * N)                    # the network sees t in [0, N]
            return torch.cat([o.reshape(B, -1) for o in out], dim=1)
        x = dpm_solver_pp_fast(model_fn, torch.cat([p.reshape(B, -1) for p in parts], dim=1), self.schedule, STEPS)
        return [p.reshape(B, *s) for p, s in zip(x.split(sizes, dim=1), init_shapes)]

    # -- UniDiffuser modes ----------------------------------------------------------------------------------------

    def t2i(self, text):
        def eps(z, clip_img, t):
            c = self.net(z, clip_img, text, t_img=t, t_text=0)
            if self.scale == 0:
                return c[0], c[1]
            if self.t2i_cfg_mode == 'empty_token':
                u = self.net(z, clip_img, self.empty_text.expand(B, -1, -1), t_img=t, t_text=0)
            else:
                u = self.net(z, clip_img, self.randn(B, *TEXT), t_img=t, t_text=N)
            return self.guide(c[0], u[0]), self.guide(c[1], u[1])
        z, clip_img = self.solve(eps, Z, (1, DC))
        return dict(z=z, clip_img=clip_img)

    def i2t(self, z, clip_img):
        def eps(text, t):
            c = self.net(z, clip_img, text, t_img=0, t_text=t)
            if self.scale == 0:
                return c[2],
            u = self.net(self.randn(B, *Z), self.randn(B, 1, DC), text, t_img=N, t_text=t)
            return self.guide(c[2], u[2]),
        text, = self.solve(eps, TEXT)
        return dict(text=text)

    def joint(self):
        def eps(z, clip_img, text, t):
            c = self.net(z, clip_img, text, t_img=t, t_text=t)
            if self.scale == 0:
                return c[:3]
            text_only = self.net(self.randn(B, *Z), self.randn(B, 1, DC), text, t_img=N, t_text=t)
            img_only = self.net(z, clip_img, self.randn(B, *TEXT), t_img=t, t_text=N)
            return (self.guide(c[0], img_only[0]), self.guide(c[1], img_only[1]), self.guide(c[2], text_only[2]))
        z, clip_img, text = self.solve(eps, Z, (1, DC), TEXT)
        return dict(z=z, clip_img=clip_img, text=text)

    def i(self):
        def eps(z, clip_img, t):
            o = self.net(z, clip_img, self.randn(B, *TEXT), t_img=t, t_text=N)
            return o[0], o[1]
        z, clip_img = self.solve(eps, Z, (1, DC))
        return dict(z=z, clip_img=clip_img)

    def t(self):
        def eps(text, t):
            return self.net(self.randn(B, *Z), self.randn(B, 1, DC), text, t_img=N, t_text=t)[2],
        text, = self.solve(eps, TEXT)
        return dict(text=text)

    def i2t2i(self, z, clip_img):
        text = self.i2t(z, clip_img)['text']
        return dict(self.t2i(text), text=text)

    def t2i2t(self, text):
        image = self.t2i(text)
        return dict(image, **self.i2t(image['z'], image['clip_img']))

    # -- EmpathDiffuser modes: every pass has its own speaker turn ------------------------------------------------

    def speaker_passes(self, turns, response):
        """ε of the response under each guidance pass, combined by the guidance rule (outputs: a tuple of 3)."""
        e_full = self.net(**response, cond=turns['speaker'])
        e_none = self.net(**response, cond=turns['speaker_absent'])
        self.emotion = e_full[3].softmax(-1)
        if self.speaker_guidance == 'no_speaker':
            return tuple(self.guide(f, n) for f, n in zip(e_full[:3], e_none[:3]))
        e_text = self.net(**response, cond=turns['speaker_text'])
        st, sf = self.scale_text, self.scale_face
        return tuple(f + st * (tx - n) + sf * (f - tx) for f, tx, n in zip(e_full[:3], e_text[:3], e_none[:3]))

    def empath(self, turns):
        unguided = (self.scale == 0 if self.speaker_guidance == 'no_speaker'
                    else self.scale_text == self.scale_face == 0)

        def eps(z, clip_img, text, t):
            if unguided:  # one pass, with the given speaker turn
                return self.net(z, clip_img, text, t_img=t, t_text=t, cond=turns['speaker'])[:3]
            return self.speaker_passes(turns, dict(z=z, clip_img=clip_img, text=text, t_img=t, t_text=t))
        z, clip_img, text = self.solve(eps, Z, (1, DC), TEXT)
        return dict(z=z, clip_img=clip_img, text=text, emotion=self.emotion_of(turns))

    def empath_t(self, turns):
        def eps(text, t):
            response = dict(z=self.randn(B, *Z), clip_img=self.randn(B, 1, DC), text=text, t_img=N, t_text=t)
            return self.speaker_passes(turns, response)[2],
        text, = self.solve(eps, TEXT)
        return dict(text=text, emotion=self.emotion_of(turns))

    def empath_i(self, turns):
        def eps(z, clip_img, t):
            response = dict(z=z, clip_img=clip_img, text=self.randn(B, *TEXT), t_img=t, t_text=N)
            return self.speaker_passes(turns, response)[:2]
        z, clip_img = self.solve(eps, Z, (1, DC))
        return dict(z=z, clip_img=clip_img, emotion=self.emotion_of(turns))

    def emotion_of(self, turns):
        """The speaker's emotion distribution: softmax of the head's logits, whatever the response input is."""
        probe = dict(z=torch.zeros(B, *Z), clip_img=torch.zeros(B, 1, DC), text=torch.zeros(B, *TEXT), t_img=N,
                     t_text=N)
        return self.net(**probe, cond=turns['speaker'])[3].softmax(-1)


def run_reference(ref, mode, inputs, turns=None):
    if mode in ('t2i', 't2i2t'):
        return getattr(ref, mode)(inputs['text'])
    if mode in ('i2t', 'i2t2i'):
        return getattr(ref, mode)(inputs['z'], inputs['clip_img'])
    if mode in modes.EMPATH_MODES:
        return getattr(ref, mode)(turns)
    return getattr(ref, mode)()


def scaled_error(got, want):
    """Largest deviation relative to the largest reference value."""
    return ((got - want).abs().max() / want.abs().max()).item()


def assert_same(got, want):
    assert set(got) == set(want)
    for k in want:
        assert got[k].shape == want[k].shape, k
        err = scaled_error(got[k], want[k])
        assert err <= REL_TOL, f'{k}: off by {err:.2e} of its largest value'


# ----------------------------------------------------------------------------------------------------------------
# The seven UniDiffuser modes on v0, v1 and the conditional network with the speaker absent
# ----------------------------------------------------------------------------------------------------------------

UNIDIFFUSER_MODES = [m for m in modes.MODES if m not in modes.EMPATH_MODES]


@pytest.mark.parametrize('mode', UNIDIFFUSER_MODES)
@pytest.mark.parametrize('name', NETS)
@torch.no_grad()
def test_unidiffuser_mode_matches_sequential_reference(mode, name):
    inputs, ctx = dict(user_inputs(), n=B), context(name)
    speaker = None
    if name == 'uvit_empath':  # a fine-tuned network without a speaker turn: the speaker is absent in every pass
        speaker = speaker_dicts('none')['speaker']
        inputs.update(cached(tiny_nnet(name), dict(speaker=speaker), ctx, mode))
    got = modes.get_mode(mode)(ctx, inputs)
    assert_same(got, run_reference(Reference(name, speaker=speaker), mode, inputs))


@pytest.mark.parametrize('mode', ['t2i', 't2i2t'])
@pytest.mark.parametrize('name', NETS)
@torch.no_grad()
def test_t2i_empty_token_guidance_matches_reference(mode, name):
    empty = torch.randn(1, *TEXT, generator=torch.Generator().manual_seed(13))
    inputs, ctx = dict(user_inputs(), n=B), context(name, t2i_cfg_mode='empty_token', empty_text=empty)
    speaker = None
    if name == 'uvit_empath':
        speaker = speaker_dicts('none')['speaker']
        inputs.update(cached(tiny_nnet(name), dict(speaker=speaker), ctx, mode))
    got = modes.get_mode(mode)(ctx, inputs)
    want = run_reference(Reference(name, t2i_cfg_mode='empty_token', empty_text=empty, speaker=speaker), mode, inputs)
    assert_same(got, want)


@pytest.mark.parametrize('mode', ['t2i', 'i2t', 'joint'])
@torch.no_grad()
def test_unguided_modes_match_reference(mode):
    inputs = dict(user_inputs(), n=B)
    got = modes.get_mode(mode)(context('uvit_multi_post_ln_v1', scale=0.), inputs)
    assert_same(got, run_reference(Reference('uvit_multi_post_ln_v1', scale=0.), mode, inputs))


# ----------------------------------------------------------------------------------------------------------------
# The empath modes: every speaker-input combination, both guidance rules
# ----------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize('rule', ['no_speaker', 'two_scale'])
@pytest.mark.parametrize('given', SPEAKERS)
@pytest.mark.parametrize('mode', modes.EMPATH_MODES)
@torch.no_grad()
def test_empath_mode_matches_sequential_uncached_reference(mode, given, rule):
    nnet, turns = tiny_nnet('uvit_empath'), speaker_dicts(given)
    scales = dict(speaker_guidance=rule, scale_text=2., scale_face=5.)  # unequal: two_scale is not no_speaker
    ctx = context('uvit_empath', **scales)
    inputs = cached(nnet, turns, ctx, mode)
    got = modes.get_mode(mode)(ctx, inputs)
    assert_same(got, run_reference(Reference('uvit_empath', **scales), mode, inputs, turns))


@pytest.mark.parametrize('rule', ['no_speaker', 'two_scale'])
@torch.no_grad()
def test_unguided_empath_matches_reference(rule):
    nnet, turns = tiny_nnet('uvit_empath'), speaker_dicts('face+utterance')
    scales = dict(scale=0., speaker_guidance=rule, scale_text=0., scale_face=0.)
    ctx = context('uvit_empath', **scales)
    got = modes.mode_empath(ctx, cached(nnet, turns, ctx))
    assert_same(got, Reference('uvit_empath', **scales).empath(turns))


@torch.no_grad()
def test_speaker_guidance_rules_differ():
    """The empath comparisons above are not vacuous: the speaker, and the guidance rule, change the samples."""
    nnet = tiny_nnet('uvit_empath')
    scales = dict(scale_text=2., scale_face=5.)
    two, one = context('uvit_empath', speaker_guidance='two_scale', **scales), context('uvit_empath', **scales)
    full = modes.mode_empath(two, cached(nnet, speaker_dicts('face+utterance'), two))
    text_only = modes.mode_empath(context('uvit_empath', speaker_guidance='two_scale', **scales),
                                  cached(nnet, speaker_dicts('utterance'), two))
    no_speaker = modes.mode_empath(one, cached(nnet, speaker_dicts('face+utterance'), one))
    for k in ('z', 'clip_img', 'text'):
        assert (full[k] - text_only[k]).abs().max() > 1e-2 and (full[k] - no_speaker[k]).abs().max() > 1e-2


# ----------------------------------------------------------------------------------------------------------------
# Speaker caches
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_one_cache_of_stacked_turns_is_the_per_turn_caches_stacked():
    """The guidance rows' cache, encoded in one call, is each turn's own cache row for row (float rounding apart)."""
    nnet = tiny_nnet('uvit_empath')
    parts = [speaker_dicts('face')['speaker'], speaker_dicts('utterance')['speaker_text'],
             {k: v[:1] for k, v in speaker_dicts('face+utterance')['speaker'].items()}]
    whole = nnet.encode_condition({k: torch.cat([p[k] for p in parts]) for k in parts[0]})
    caches = [nnet.encode_condition(p) for p in parts]
    assert isinstance(whole, ConditionCache) and len(whole.kv) == len(caches[0].kv) == TINY['depth'] + 1
    for i, (k, v) in enumerate(whole.kv):
        torch.testing.assert_close(k, torch.cat([c.kv[i][0] for c in caches]), **TOL)
        torch.testing.assert_close(v, torch.cat([c.kv[i][1] for c in caches]), **TOL)
    torch.testing.assert_close(whole.emotion_logits, torch.cat([c.emotion_logits for c in caches]), **TOL)
    # The response forward with the stacked cache is the per-turn forwards, stacked.
    g = torch.Generator().manual_seed(5)
    n = 5
    x = dict(img=torch.randn(n, *Z, generator=g), clip_img=torch.randn(n, 1, DC, generator=g),
             text=torch.randn(n, *TEXT, generator=g), t_img=torch.tensor([3., 500., 999., 0., 1000.]),
             t_text=torch.tensor([1000., 0., 17.5, 250., 4.]), data_type=torch.ones(n, dtype=torch.long))
    batched = nnet(**x, cond_cache=whole)
    rows = [slice(0, 2), slice(2, 4), slice(4, 5)]
    singles = [nnet(**{k: v[r] for k, v in x.items()}, cond=p) for r, p in zip(rows, parts)]
    for j in range(4):
        torch.testing.assert_close(batched[j], torch.cat([s[j] for s in singles]), **TOL)


# ----------------------------------------------------------------------------------------------------------------
# Through the pipeline: the speaker inputs generate() builds
# ----------------------------------------------------------------------------------------------------------------

@pytest.fixture(scope='module')
def components(tiny_models):
    from common import tiny
    config = tiny(tiny_models, condition=True)
    comp = pipeline.load_components(config, torch.device('cpu'))
    assert comp.nnet.condition_is_trained()  # tiny_models writes random gates: the speaker matters
    return comp


def pipeline_reference_turns(comp, seed, given, rule, image, prompt):
    """The speaker turns generate() must build, drawn in this order from a generator seeded like the context's:
    the VAE posterior noise of the speaker face (if given), then once the noise of the latent, CLIP embedding and
    text, each (B, ...), that every turn (speaker, speaker_absent, speaker_text for two_scale) shares where its
    input is absent (a given input replaces it, clean at t = 0)."""
    config, g = comp.config, torch.Generator().manual_seed(seed)
    n = 3
    face = utterance = None
    if 'face' in given:
        z, clip_img = pipeline.encode_images(comp, [image], generator=g)
        face = dict(img=z.repeat(n, 1, 1, 1), clip_img=clip_img.repeat(n, 1, 1))
    if 'utterance' in given:
        utterance = pipeline.encode_prompts(comp, [prompt]).repeat(n, 1, 1)
    T, Dt = config.num_text_tokens, config.text_dim
    noise = dict(img=torch.randn(n, *config.z_shape, generator=g),
                 clip_img=torch.randn(n, 1, config.clip_img_dim, generator=g), text=torch.randn(n, T, Dt, generator=g))

    def turn(with_face, with_utterance):
        out = dict(noise, t_img=torch.full((n,), 1000.), t_text=torch.full((n,), 1000.))
        if with_face:
            out.update(face, t_img=torch.zeros(n))
        if with_utterance:
            out.update(text=utterance, t_text=torch.zeros(n))
        return out
    turns = dict(speaker=turn(face is not None, utterance is not None), speaker_absent=turn(False, False))
    if rule == 'two_scale':
        turns['speaker_text'] = turn(False, utterance is not None)
    return turns


@pytest.mark.parametrize('given,rule', [('face+utterance', 'two_scale'), ('face', 'no_speaker'),
                                        ('utterance', 'two_scale'), ('none', 'no_speaker')])
@torch.no_grad()
def test_generate_builds_the_reference_speaker_inputs(components, monkeypatch, given, rule):
    from PIL import Image
    comp = components
    comp.config.sample.speaker_guidance = rule
    image = Image.new('RGB', (40, 36), (200, 120, 90)) if 'face' in given else None
    prompt = 'i feel so happy today' if 'utterance' in given else None
    seen = {}
    real = modes.MODES['empath_t']

    def recording(ctx, inputs):
        seen.update(inputs)
        return real(ctx, inputs)
    monkeypatch.setitem(modes.MODES, 'empath_t', recording)
    ctx = pipeline.make_context(comp, torch.Generator().manual_seed(21))
    result = pipeline.generate(comp, ctx, 'empath_t', 3, prompt=prompt, image=image)
    assert len(result['texts']) == 3 and len(result['emotions']) == 3

    turns = pipeline_reference_turns(comp, 21, given, rule, image, prompt)
    assert set(seen) == {'n', 'speaker'}  # one cache of every guidance row, no per-branch cache beside it
    want = comp.nnet.encode_condition(stacked(turns, modes.speaker_passes(ctx)))
    torch.testing.assert_close(seen['speaker'].emotion_logits, want.emotion_logits, **TOL)
    for (k, v), (k2, v2) in zip(seen['speaker'].kv, want.kv):
        torch.testing.assert_close(k, k2, **TOL)
        torch.testing.assert_close(v, v2, **TOL)
