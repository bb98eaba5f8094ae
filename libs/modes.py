"""Sampling modes: a table of small functions sharing one signature ``mode(ctx, inputs) -> outputs``.

Every mode works in the network's own spaces: ``z`` (B, C, h, w) VAE latents, ``clip_img`` (B, 1, Dc) CLIP image
embeddings and ``text`` (B, T, Dt) reduced CLIP text. Encoding inputs and decoding outputs happen outside (see
``libs/pipeline.py``), so the table holds only the diffusion logic. A modality the network should ignore is fed
as Gaussian noise at t = N (UniDiffuser's ``true_uncond``); the guidance passes of one step run as one batched
forward. Primitive modes draw one noise sample each; composite modes (i2t2i, t2i2t) chain primitive ones.

The speaker path does not change between steps: the caller encodes the speaker turns of every guidance row of a step
in one call (``speaker_branches`` says which, ``libs.pipeline.speaker_inputs`` builds it), and every step of the
solver reuses that one cache (docs/sampling_internals.md).
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from libs import precision
from libs.diffusion import cfg, cfg_two_scale
from libs.errors import UserError
from libs.uvit import ConditionCache


@dataclass
class Context:
    """Everything a mode needs: the network, the solver and the shapes of the three modalities."""
    nnet: torch.nn.Module
    sampler: Callable                       # libs.diffusion sampler: (model_fn, x, schedule, steps) -> x
    schedule: object                        # libs.diffusion.NoiseScheduleVP
    N: int                                  # number of discrete training timesteps
    steps: int
    scale: float                            # guidance scale s of eps + s * (eps - eps_uncond)
    z_shape: Tuple[int, int, int]
    clip_img_dim: int
    text_shape: Tuple[int, int]             # (tokens, reduced text dim)
    data_type: Optional[int] = 1            # None for v0 networks
    t2i_cfg_mode: str = 'true_uncond'
    empty_text: Optional[torch.Tensor] = None   # (1, T, Dt) reduced empty prompt, for t2i_cfg_mode='empty_token'
    generator: Optional[torch.Generator] = None
    device: torch.device = field(default_factory=lambda: torch.device('cpu'))
    autocast_dtype: Optional[torch.dtype] = None  # e.g. torch.bfloat16 on GPUs; None = full precision
    speaker_guidance: str = 'no_speaker'    # empath modes: one of SPEAKER_GUIDANCE
    scale_text: float = 7.                  # two_scale: guidance towards the speaker's utterance
    scale_face: float = 7.                  # two_scale: guidance towards the speaker's face, given the utterance

    def randn(self, *shape) -> torch.Tensor:
        """Gaussian noise from the run's generator, so one seed fixes every sample."""
        return torch.randn(*shape, generator=self.generator, device=self.device)


# ----------------------------------------------------------------------------------------------------------------
# Flat <-> structured (the solver works on one flat vector per sample)
# ----------------------------------------------------------------------------------------------------------------

def combine(*parts: torch.Tensor) -> torch.Tensor:
    """(B, ...) tensors -> (B, sum of sizes), in the given order."""
    return torch.cat([p.reshape(p.shape[0], -1) for p in parts], dim=1)


def split(x: torch.Tensor, shapes: Sequence[Tuple[int, ...]]) -> Tuple[torch.Tensor, ...]:
    """(B, D) -> tensors of the given per-sample shapes (inverse of ``combine``)."""
    sizes = [int(torch.Size(s).numel()) for s in shapes]
    return tuple(p.reshape(x.shape[0], *s) for p, s in zip(x.split(sizes, dim=1), shapes))


def image_shapes(ctx):
    """Per-sample shapes of the image modalities (latent, CLIP image embedding)."""
    return [tuple(ctx.z_shape), (1, ctx.clip_img_dim)]


# ----------------------------------------------------------------------------------------------------------------
# Network calls
# ----------------------------------------------------------------------------------------------------------------

def call_nnet(ctx, z, clip_img, text, t_img, t_text, speaker=None):
    """One batched forward; ``speaker`` is a ``ConditionCache`` for conditional networks. Returns float32 outputs."""
    B = z.shape[0]
    data_type = None if ctx.data_type is None else torch.full((B,), ctx.data_type, device=ctx.device,
                                                                dtype=torch.long)
    with precision.autocast(ctx.device, ctx.autocast_dtype):
        out = ctx.nnet(z, clip_img, text, t_img, t_text, data_type, cond_cache=speaker)
    return tuple(o.float() for o in out[:3])


def full(ctx, B, value):
    """A (B,) timestep tensor filled with value."""
    return torch.full((B,), float(value), device=ctx.device)


def speaker_cache(ctx, mode, inputs, B=None) -> Optional[ConditionCache]:
    """``inputs['speaker']``: the one speaker cache of every row a step of ``mode`` batches (None: no speaker segment).

    Its rows are the turns of ``speaker_branches(ctx, mode)``, B rows each (None: as many as the cache holds), stacked
    in that order. Built once per sample, before the solver, it is the only copy of the speaker's keys/values.
    """
    cache = inputs.get('speaker')
    if cache is None:
        return None
    branches, rows = speaker_branches(ctx, mode), cache.emotion_logits.shape[0]
    if rows == 0 or rows % len(branches) or (B is not None and rows != len(branches) * B):
        each = 'the same number of' if B is None else B
        raise ValueError(f'mode {mode}: the speaker cache has {rows} rows, but a step batches the passes '
                         f'{" + ".join(branches)} with {each} rows each; build it with libs.pipeline.speaker_inputs '
                         'for this mode and context')
    return cache


def guided(ctx, cond_inputs, uncond_inputs, pick, speaker=None):
    """ε_cond + s·(ε_cond − ε_uncond) with both passes in one forward; ``pick`` selects outputs to sample.

    ``speaker`` is the cache of the step's rows (``speaker_cache``).
    """
    if ctx.scale == 0:
        return pick(call_nnet(ctx, **cond_inputs, speaker=speaker))
    B = next(iter(cond_inputs.values())).shape[0]
    both = call_nnet(ctx, **{k: torch.cat([cond_inputs[k], uncond_inputs[k]]) for k in cond_inputs},
                     speaker=speaker)
    eps = pick(both)
    return cfg(eps[:B], eps[B:], ctx.scale)


def run_solver(ctx, eps_fn, shapes, B):
    """Integrate B samples from fresh Gaussian noise of the given per-sample shapes; returns them structured."""
    x = combine(*[ctx.randn(B, *s) for s in shapes])
    model_fn = lambda x, t_cont: eps_fn(x, t_cont * ctx.N)  # the network sees t in [0, N]
    with torch.no_grad():
        x = ctx.sampler(model_fn, x, ctx.schedule, ctx.steps)
    return split(x, shapes)


# ----------------------------------------------------------------------------------------------------------------
# Primitive modes
# ----------------------------------------------------------------------------------------------------------------

def mode_t2i(ctx, inputs):
    """Text -> image: guidance against the text marginal (true_uncond) or the empty prompt (empty_token)."""
    text = inputs['text']
    B, N = text.shape[0], ctx.N
    speaker = speaker_cache(ctx, 't2i', inputs, B)

    def eps(x, t):
        z, clip_img = split(x, image_shapes(ctx))
        cond = dict(z=z, clip_img=clip_img, text=text, t_img=t, t_text=full(ctx, B, 0))
        if ctx.t2i_cfg_mode == 'empty_token':
            uncond = dict(cond, text=ctx.empty_text.expand(B, -1, -1).to(text))
        else:
            uncond = dict(cond, text=ctx.randn(*text.shape), t_text=full(ctx, B, N))
        return guided(ctx, cond, uncond, lambda o: combine(o[0], o[1]), speaker)

    z, clip_img = run_solver(ctx, eps, image_shapes(ctx), B)
    return dict(z=z, clip_img=clip_img)


def mode_i2t(ctx, inputs):
    """Image -> text: guidance against the image marginal."""
    z, clip_img = inputs['z'], inputs['clip_img']
    B, N = z.shape[0], ctx.N
    speaker = speaker_cache(ctx, 'i2t', inputs, B)

    def eps(x, t):
        (text,) = split(x, [ctx.text_shape])
        cond = dict(z=z, clip_img=clip_img, text=text, t_img=full(ctx, B, 0), t_text=t)
        uncond = dict(cond, z=ctx.randn(*z.shape), clip_img=ctx.randn(*clip_img.shape), t_img=full(ctx, B, N))
        return guided(ctx, cond, uncond, lambda o: combine(o[2]), speaker)

    (text,) = run_solver(ctx, eps, [ctx.text_shape], B)
    return dict(text=text)


def mode_joint(ctx, inputs):
    """Image and text together; guidance against both single-modality marginals (three passes, one forward)."""
    shapes = image_shapes(ctx) + [ctx.text_shape]
    N = ctx.N
    speaker = speaker_cache(ctx, 'joint', inputs, inputs['n'])  # passes: joint, text only, image only (guided)

    def eps(x, t):
        z, clip_img, text = split(x, shapes)
        B = z.shape[0]
        joint = dict(z=z, clip_img=clip_img, text=text, t_img=t, t_text=t)
        if ctx.scale == 0:
            return combine(*call_nnet(ctx, **joint, speaker=speaker))
        text_only = dict(joint, z=ctx.randn(*z.shape), clip_img=ctx.randn(*clip_img.shape), t_img=full(ctx, B, N))
        img_only = dict(joint, text=ctx.randn(*text.shape), t_text=full(ctx, B, N))
        o = call_nnet(ctx, **{k: torch.cat([joint[k], text_only[k], img_only[k]]) for k in joint}, speaker=speaker)
        cond = combine(o[0][:B], o[1][:B], o[2][:B])
        uncond = combine(o[0][2 * B:], o[1][2 * B:], o[2][B:2 * B])
        return cfg(cond, uncond, ctx.scale)

    z, clip_img, text = run_solver(ctx, eps, shapes, inputs['n'])
    return dict(z=z, clip_img=clip_img, text=text)


def mode_i(ctx, inputs):
    """Image only: the text is marginalised (noise at t = N); no guidance."""
    speaker, N = speaker_cache(ctx, 'i', inputs, inputs['n']), ctx.N

    def eps(x, t):
        z, clip_img = split(x, image_shapes(ctx))
        o = call_nnet(ctx, z, clip_img, ctx.randn(z.shape[0], *ctx.text_shape), t, full(ctx, z.shape[0], N), speaker)
        return combine(o[0], o[1])

    z, clip_img = run_solver(ctx, eps, image_shapes(ctx), inputs['n'])
    return dict(z=z, clip_img=clip_img)


def mode_t(ctx, inputs):
    """Text only: the image is marginalised (noise at t = N); no guidance."""
    speaker, N = speaker_cache(ctx, 't', inputs, inputs['n']), ctx.N

    def eps(x, t):
        (text,) = split(x, [ctx.text_shape])
        B = text.shape[0]
        o = call_nnet(ctx, ctx.randn(B, *ctx.z_shape), ctx.randn(B, 1, ctx.clip_img_dim), text,
                      full(ctx, B, N), t, speaker)
        return combine(o[2])

    (text,) = run_solver(ctx, eps, [ctx.text_shape], inputs['n'])
    return dict(text=text)


# ----------------------------------------------------------------------------------------------------------------
# Composite modes
# ----------------------------------------------------------------------------------------------------------------

def mode_i2t2i(ctx, inputs):
    """Image variation: image -> text -> image."""
    text = mode_i2t(ctx, inputs)['text']
    return dict(mode_t2i(ctx, dict(inputs, text=text)), text=text)


def mode_t2i2t(ctx, inputs):
    """Text variation: text -> image -> text."""
    image = mode_t2i(ctx, inputs)
    return dict(mode_i2t(ctx, dict(inputs, **image)), **image)


# ----------------------------------------------------------------------------------------------------------------
# EmpathDiffuser response modes: the speaker turn is a clean condition, guidance is over the speaker
# ----------------------------------------------------------------------------------------------------------------

def speaker_passes(ctx) -> Tuple[str, ...]:
    """Names of the speaker branches of the passes one empath step batches, in row order (one pass if unguided)."""
    if ctx.speaker_guidance == 'no_speaker':
        return ('speaker',) if ctx.scale == 0 else ('speaker', 'speaker_absent')
    if ctx.scale_text == 0 and ctx.scale_face == 0:
        return ('speaker',)
    return 'speaker', 'speaker_text', 'speaker_absent'


def speaker_branches(ctx, mode) -> Tuple[str, ...]:
    """The speaker branch (a key of ``SPEAKER_BRANCHES``) of each group of rows one step of ``mode`` batches.

    An empath step's passes see the speaker turn, its utterance alone or no speaker (``speaker_passes``); every pass
    of a UniDiffuser mode sees the one turn given, the absent speaker when a fine-tuned network samples as
    UniDiffuser. A composite mode's two solvers batch the same passes, so they share the cache.
    """
    if mode in EMPATH_MODES:
        return speaker_passes(ctx)
    return ('speaker',) * (1 if ctx.scale == 0 else UNIDIFFUSER_PASSES[mode])


def speaker_guided(ctx, response, pick, speaker):
    """The response's ε guided over the speaker turn as ``ctx.speaker_guidance`` says, all passes in one forward.

    ``speaker`` is the cache of the passes named by ``speaker_passes``, stacked. 'no_speaker':
    ε(· | speaker) + s·(ε(· | speaker) − ε(· | no speaker)). 'two_scale': ``cfg_two_scale`` of the passes with the
    whole speaker turn, with its utterance alone and with no speaker. A speaker input the user left out is absent in
    every pass, so both rules reduce to guidance over what was given.
    """
    passes = len(speaker_passes(ctx))
    eps = pick(call_nnet(ctx, **{k: torch.cat([v] * passes) for k, v in response.items()}, speaker=speaker))
    if passes == 1:
        return eps
    B = next(iter(response.values())).shape[0]
    if ctx.speaker_guidance == 'no_speaker':
        return cfg(eps[:B], eps[B:], ctx.scale)
    return cfg_two_scale(eps[:B], eps[B:2 * B], eps[2 * B:], ctx.scale_text, ctx.scale_face)


def empath_speaker(ctx, mode, inputs) -> Tuple[ConditionCache, int]:
    """The speaker cache of an empath step's rows and the number of samples B (its rows over the passes)."""
    speaker = speaker_cache(ctx, mode, inputs)
    return speaker, speaker.emotion_logits.shape[0] // len(speaker_passes(ctx))


def emotion_of(speaker, B):
    """The speaker's emotion distribution (B, classes), read off the first pass's rows (the whole speaker turn)."""
    return speaker.emotion_logits[:B].float().softmax(-1)


def mode_empath(ctx, inputs):
    """Speaker turn -> response face and utterance (jointly), plus the speaker's emotion."""
    shapes = image_shapes(ctx) + [ctx.text_shape]
    speaker, B = empath_speaker(ctx, 'empath', inputs)

    def eps(x, t):
        z, clip_img, text = split(x, shapes)
        response = dict(z=z, clip_img=clip_img, text=text, t_img=t, t_text=t)
        return speaker_guided(ctx, response, lambda o: combine(*o), speaker)

    z, clip_img, text = run_solver(ctx, eps, shapes, B)
    return dict(z=z, clip_img=clip_img, text=text, emotion=emotion_of(speaker, B))


def mode_empath_t(ctx, inputs):
    """Speaker turn -> response utterance only (the response face is marginalised)."""
    (speaker, B), N = empath_speaker(ctx, 'empath_t', inputs), ctx.N

    def eps(x, t):
        (text,) = split(x, [ctx.text_shape])
        response = dict(z=ctx.randn(B, *ctx.z_shape), clip_img=ctx.randn(B, 1, ctx.clip_img_dim), text=text,
                        t_img=full(ctx, B, N), t_text=t)
        return speaker_guided(ctx, response, lambda o: combine(o[2]), speaker)

    (text,) = run_solver(ctx, eps, [ctx.text_shape], B)
    return dict(text=text, emotion=emotion_of(speaker, B))


def mode_empath_i(ctx, inputs):
    """Speaker turn -> response face only (the response utterance is marginalised)."""
    (speaker, B), N = empath_speaker(ctx, 'empath_i', inputs), ctx.N

    def eps(x, t):
        z, clip_img = split(x, image_shapes(ctx))
        response = dict(z=z, clip_img=clip_img, text=ctx.randn(B, *ctx.text_shape), t_img=t, t_text=full(ctx, B, N))
        return speaker_guided(ctx, response, lambda o: combine(o[0], o[1]), speaker)

    z, clip_img = run_solver(ctx, eps, image_shapes(ctx), B)
    return dict(z=z, clip_img=clip_img, emotion=emotion_of(speaker, B))


MODES: Dict[str, Callable] = {
    't2i': mode_t2i, 'i2t': mode_i2t, 'joint': mode_joint, 'i': mode_i, 't': mode_t,
    'i2t2i': mode_i2t2i, 't2i2t': mode_t2i2t,
    'empath': mode_empath, 'empath_t': mode_empath_t, 'empath_i': mode_empath_i,
}
# Which raw inputs each mode reads, and what it returns (used to validate flags and to decode outputs).
MODE_INPUTS = {'t2i': ('prompt',), 'i2t': ('img',), 'joint': (), 'i': (), 't': (), 'i2t2i': ('img',),
               't2i2t': ('prompt',), 'empath': ('speaker',), 'empath_t': ('speaker',), 'empath_i': ('speaker',)}
EMPATH_MODES = ('empath', 'empath_t', 'empath_i')
# Guidance of the empath modes (config.sample.speaker_guidance) -> the speaker branches it needs besides 'speaker'.
SPEAKER_GUIDANCE = {'no_speaker': ('speaker_absent',), 'two_scale': ('speaker_absent', 'speaker_text')}
# Speaker branch -> the parts of the given speaker turn its rows keep; the others are absent (noise at t = N).
SPEAKER_BRANCHES = {'speaker': ('face', 'utterance'), 'speaker_text': ('utterance',), 'speaker_absent': ()}
# Passes a guided step of each UniDiffuser mode batches: conditional and unconditional; joint's two marginals.
UNIDIFFUSER_PASSES = {'t2i': 2, 'i2t': 2, 'joint': 3, 'i': 1, 't': 1, 'i2t2i': 2, 't2i2t': 2}


def get_mode(name: str) -> Callable:
    """Look a mode up by name; an unknown name lists the valid ones."""
    if name not in MODES:
        raise UserError(f'unknown mode {name!r}; valid modes: {", ".join(MODES)}')
    return MODES[name]
