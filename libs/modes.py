"""Sampling modes: a table of small functions sharing one signature ``mode(ctx, inputs) -> outputs``.

Every mode works in the network's own spaces: ``z`` (B, C, h, w) VAE latents, ``clip_img`` (B, 1, Dc) CLIP image
embeddings and ``text`` (B, T, Dt) reduced CLIP text. Encoding inputs and decoding outputs happen outside (see
``libs/pipeline.py``), so the table holds only the diffusion logic. A modality the network should ignore is fed
as Gaussian noise at t = N (UniDiffuser's ``true_uncond``); the guidance passes of one step run as one batched
forward. Primitive modes draw one noise sample each; composite modes (i2t2i, t2i2t) chain primitive ones.

The speaker path does not change between steps: a mode concatenates the speaker caches of its guidance rows once,
before the solver, and every step reuses that batched cache (``speaker_rows``; docs/sampling_internals.md).
"""
from dataclasses import dataclass, field
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from libs import precision
from libs.diffusion import cfg, cfg_two_scale
from libs.errors import UserError
from libs.uvit import ConditionCache, cat_conditions


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


def speaker_rows(caches: Sequence[Optional[ConditionCache]]) -> Optional[ConditionCache]:
    """One speaker cache for the rows of a batched forward, one cache per guidance pass (None: no speaker segment).

    Called once per solver run, before the first step: concatenating the keys/values of every block at each step
    would copy the whole cache (hundreds of MB per sample at full size) NFE times for nothing.
    """
    if caches[0] is None:
        return None
    return caches[0] if len(caches) == 1 else cat_conditions(list(caches))


def guidance_passes(ctx) -> int:
    """How many passes a guided step of a UniDiffuser mode batches: conditional and unconditional, or one at s = 0."""
    return 1 if ctx.scale == 0 else 2


def guided(ctx, cond_inputs, uncond_inputs, pick, speaker=None):
    """ε_cond + s·(ε_cond − ε_uncond) with both passes in one forward; ``pick`` selects outputs to sample.

    ``speaker`` is the batched cache of the step's rows (``speaker_rows`` of ``guidance_passes`` caches).
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
    speaker = speaker_rows([inputs.get('speaker')] * guidance_passes(ctx))

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
    speaker = speaker_rows([inputs.get('speaker')] * guidance_passes(ctx))

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
    # Three passes (joint, text only, image only) when guided, else the joint one alone.
    speaker = speaker_rows([inputs.get('speaker')] * (1 if ctx.scale == 0 else 3))

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
    speaker, N = inputs.get('speaker'), ctx.N

    def eps(x, t):
        z, clip_img = split(x, image_shapes(ctx))
        o = call_nnet(ctx, z, clip_img, ctx.randn(z.shape[0], *ctx.text_shape), t, full(ctx, z.shape[0], N), speaker)
        return combine(o[0], o[1])

    z, clip_img = run_solver(ctx, eps, image_shapes(ctx), inputs['n'])
    return dict(z=z, clip_img=clip_img)


def mode_t(ctx, inputs):
    """Text only: the image is marginalised (noise at t = N); no guidance."""
    speaker, N = inputs.get('speaker'), ctx.N

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
    """Names of the speaker inputs of the passes one empath step batches, in row order (one pass if unguided)."""
    if ctx.speaker_guidance == 'no_speaker':
        return ('speaker',) if ctx.scale == 0 else ('speaker', 'speaker_absent')
    if ctx.scale_text == 0 and ctx.scale_face == 0:
        return ('speaker',)
    return 'speaker', 'speaker_text', 'speaker_absent'


def speaker_guided(ctx, response, pick, speaker):
    """The response's ε guided over the speaker turn as ``ctx.speaker_guidance`` says, all passes in one forward.

    ``speaker`` is ``speaker_rows`` of the inputs named by ``speaker_passes``. 'no_speaker':
    ε(· | speaker) + s·(ε(· | speaker) − ε(· | no speaker)). 'two_scale': ``cfg_two_scale`` of the passes with the
    whole speaker turn, with its utterance alone (``inputs['speaker_text']``) and with no speaker. A speaker input
    the user left out is absent in every pass, so both rules reduce to guidance over what was given.
    """
    passes = len(speaker_passes(ctx))
    eps = pick(call_nnet(ctx, **{k: torch.cat([v] * passes) for k, v in response.items()}, speaker=speaker))
    if passes == 1:
        return eps
    B = next(iter(response.values())).shape[0]
    if ctx.speaker_guidance == 'no_speaker':
        return cfg(eps[:B], eps[B:], ctx.scale)
    return cfg_two_scale(eps[:B], eps[B:2 * B], eps[2 * B:], ctx.scale_text, ctx.scale_face)


def empath_rows(ctx, inputs) -> ConditionCache:
    """The batched speaker cache of every empath step, built once per solver run."""
    return speaker_rows([inputs[name] for name in speaker_passes(ctx)])


def emotion_of(inputs):
    """The speaker's emotion distribution (B, classes), read off the cached speaker path."""
    return inputs['speaker'].emotion_logits.float().softmax(-1)


def mode_empath(ctx, inputs):
    """Speaker turn -> response face and utterance (jointly), plus the speaker's emotion."""
    shapes = image_shapes(ctx) + [ctx.text_shape]
    speaker = empath_rows(ctx, inputs)

    def eps(x, t):
        z, clip_img, text = split(x, shapes)
        response = dict(z=z, clip_img=clip_img, text=text, t_img=t, t_text=t)
        return speaker_guided(ctx, response, lambda o: combine(*o), speaker)

    z, clip_img, text = run_solver(ctx, eps, shapes, inputs['speaker'].emotion_logits.shape[0])
    return dict(z=z, clip_img=clip_img, text=text, emotion=emotion_of(inputs))


def mode_empath_t(ctx, inputs):
    """Speaker turn -> response utterance only (the response face is marginalised)."""
    B, N = inputs['speaker'].emotion_logits.shape[0], ctx.N
    speaker = empath_rows(ctx, inputs)

    def eps(x, t):
        (text,) = split(x, [ctx.text_shape])
        response = dict(z=ctx.randn(B, *ctx.z_shape), clip_img=ctx.randn(B, 1, ctx.clip_img_dim), text=text,
                        t_img=full(ctx, B, N), t_text=t)
        return speaker_guided(ctx, response, lambda o: combine(o[2]), speaker)

    (text,) = run_solver(ctx, eps, [ctx.text_shape], B)
    return dict(text=text, emotion=emotion_of(inputs))


def mode_empath_i(ctx, inputs):
    """Speaker turn -> response face only (the response utterance is marginalised)."""
    B, N = inputs['speaker'].emotion_logits.shape[0], ctx.N
    speaker = empath_rows(ctx, inputs)

    def eps(x, t):
        z, clip_img = split(x, image_shapes(ctx))
        response = dict(z=z, clip_img=clip_img, text=ctx.randn(B, *ctx.text_shape), t_img=t, t_text=full(ctx, B, N))
        return speaker_guided(ctx, response, lambda o: combine(o[0], o[1]), speaker)

    z, clip_img = run_solver(ctx, eps, image_shapes(ctx), B)
    return dict(z=z, clip_img=clip_img, emotion=emotion_of(inputs))


MODES: Dict[str, Callable] = {
    't2i': mode_t2i, 'i2t': mode_i2t, 'joint': mode_joint, 'i': mode_i, 't': mode_t,
    'i2t2i': mode_i2t2i, 't2i2t': mode_t2i2t,
    'empath': mode_empath, 'empath_t': mode_empath_t, 'empath_i': mode_empath_i,
}
# Which raw inputs each mode reads, and what it returns (used to validate flags and to decode outputs).
MODE_INPUTS = {'t2i': ('prompt',), 'i2t': ('img',), 'joint': (), 'i': (), 't': (), 'i2t2i': ('img',),
               't2i2t': ('prompt',), 'empath': ('speaker',), 'empath_t': ('speaker',), 'empath_i': ('speaker',)}
EMPATH_MODES = ('empath', 'empath_t', 'empath_i')
# Guidance of the empath modes (config.sample.speaker_guidance) -> the speaker caches it needs besides 'speaker'.
SPEAKER_GUIDANCE = {'no_speaker': ('speaker_absent',), 'two_scale': ('speaker_absent', 'speaker_text')}


def get_mode(name: str) -> Callable:
    """Look a mode up by name; an unknown name lists the valid ones."""
    if name not in MODES:
        raise UserError(f'unknown mode {name!r}; valid modes: {", ".join(MODES)}')
    return MODES[name]
