"""All diffusion maths in one place: the SD noise schedule, noising, the loss, guidance and the samplers.

Two views of one schedule. Training uses the discrete DDPM schedule (``Schedule``): t ∈ {1..N}, t = 0 is clean data.
Sampling uses DPM-Solver's continuous-time view of it (``NoiseScheduleVP``): t_continuous ∈ [1/N, 1] with
t_discrete = N * t_continuous, and log α(t) interpolated piecewise-linearly through the discrete values, exactly as
the official DPM-Solver(++) code that UniDiffuser samples with (thu-ml/unidiffuser ``dpm_solver_pp.py``).

Samplers share one signature, ``sampler(model_fn, x, schedule, steps, t_start=None, t_end=None, ...)``, with
``model_fn(x, t_continuous) -> eps`` and ``t_continuous`` a (B,) tensor. They use the data-prediction (DPM-Solver++)
form: x0 = (x - σ_t ε) / α_t.
"""
import numpy as np
import torch

from libs.errors import UserError

SKIP_TYPES = ('time_uniform', 'logSNR')


def stable_diffusion_betas(n_timestep=1000, linear_start=0.00085, linear_end=0.012) -> np.ndarray:
    """Stable Diffusion's 'scaled linear' betas, linear in sqrt(beta); float64, shape (n_timestep,)."""
    return np.linspace(linear_start ** 0.5, linear_end ** 0.5, n_timestep, dtype=np.float64) ** 2


def _working_dtype(x: torch.Tensor) -> torch.dtype:
    """At least float32: half-precision inputs are promoted, float64 stays float64."""
    return torch.promote_types(x.dtype, torch.float32)


def _per_sample(c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) coefficient to broadcast over the trailing dims of x."""
    return c.reshape(-1, *([1] * (x.dim() - 1)))


# ----------------------------------------------------------------------------------------------------------------
# Training: discrete schedule, noising, loss, guidance
# ----------------------------------------------------------------------------------------------------------------

class Schedule:
    """Discrete DDPM schedule; ``alphas_cumprod[0] = 1`` so t = 0 is clean data and training draws t ∈ {1..N}."""

    def __init__(self, betas):
        betas = np.asarray(betas, dtype=np.float64)
        self.N = len(betas)
        # float64 so the product of 1000 factors does not drift; coefficients are cast to the data dtype on use.
        self.alphas_cumprod = torch.from_numpy(np.cumprod(1. - np.append(0., betas)))

    def sample_t(self, batch, generator=None, device='cpu') -> torch.Tensor:
        """Uniform integer timesteps in {1..N}, shape (batch,); a generator must live on ``device``."""
        return torch.randint(1, self.N + 1, (batch,), generator=generator, device=device)

    def add_noise(self, x0, t, noise=None):
        """(noise, x_t) with x_t = sqrt(ᾱ_t) x0 + sqrt(1 - ᾱ_t) noise; t is (B,) ints, x0 any (B, ...) shape."""
        if noise is None:
            noise = torch.randn_like(x0)
        ac = _per_sample(self.alphas_cumprod.to(x0.device)[t.to(x0.device).long()], x0)
        return noise, ac.sqrt().to(x0.dtype) * x0 + (1. - ac).sqrt().to(x0.dtype) * noise


def mse_per_sample(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Squared error averaged over all non-batch dims, (B, ...) -> (B,), computed in at least float32."""
    dtype = _working_dtype(pred)
    return (pred.to(dtype) - target.to(dtype)).pow(2).flatten(1).mean(1)


LOSS_WEIGHTINGS = ('per_modality', 'concat')


def modality_losses(eps, targets, weighting: str) -> dict:
    """Per-sample MSE of each modality's ε-prediction (B,) and their combination 'loss' (train.loss_weighting).

    'per_modality': MSE(ε_img) + MSE(ε_clip) + MSE(ε_text), each a mean over its own elements; 'concat':
    UniDiffuser's single MSE over the concatenated modalities (every element weighs the same, so the latent
    dominates).
    """
    losses = {k: mse_per_sample(e, t) for k, e, t in zip(('img', 'clip', 'text'), eps, targets)}
    if weighting == 'per_modality':
        losses['loss'] = losses['img'] + losses['clip'] + losses['text']
    elif weighting == 'concat':
        sizes = [t[0].numel() for t in targets]
        losses['loss'] = sum(losses[k] * n for k, n in zip(('img', 'clip', 'text'), sizes)) / sum(sizes)
    else:
        raise UserError(f'train.loss_weighting={weighting!r}; choose one of {LOSS_WEIGHTINGS}')
    return losses


def cfg(eps_cond, eps_uncond, scale):
    """Classifier-free guidance in UniDiffuser's convention: ε = ε_cond + s · (ε_cond − ε_uncond).

    s = 0 is unguided; diffusers' ``guidance_scale`` g = s + 1. Tuples (the joint model's three outputs) are
    guided element-wise.
    """
    if isinstance(eps_cond, (tuple, list)):
        return tuple(cfg(c, u, scale) for c, u in zip(eps_cond, eps_uncond))
    return eps_cond + scale * (eps_cond - eps_uncond)


def cfg_two_scale(eps_full, eps_text, eps_none, scale_text, scale_face):
    """Two-scale guidance over the speaker turn: ε = ε_tf + s_t · (ε_t − ε_∅) + s_f · (ε_tf − ε_t).

    ε_tf is conditioned on the whole speaker turn, ε_t on its utterance alone, ε_∅ on no speaker. This is
    InstructPix2Pix's ε_∅ + S_t · (ε_t − ε_∅) + S_f · (ε_tf − ε_t) written in UniDiffuser's convention (S = s + 1,
    so s = 0 is unguided); s_t = s_f = s gives ``cfg(ε_tf, ε_∅, s)``. Tuples are guided element-wise.
    """
    if isinstance(eps_full, (tuple, list)):
        return tuple(cfg_two_scale(f, t, n, scale_text, scale_face) for f, t, n in zip(eps_full, eps_text, eps_none))
    return eps_full + scale_text * (eps_text - eps_none) + scale_face * (eps_full - eps_text)


# ----------------------------------------------------------------------------------------------------------------
# Sampling: continuous-time view of the discrete schedule
# ----------------------------------------------------------------------------------------------------------------

def interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation through knots (xp increasing, fp), extended linearly beyond both ends."""
    # Segment j covers [xp[j-1], xp[j]]; clamping j to the outer segments gives the linear extrapolation.
    j = torch.searchsorted(xp, x.contiguous()).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp[j - 1], xp[j], fp[j - 1], fp[j]
    return y0 + (x - x0) * (y1 - y0) / (x1 - x0)


class NoiseScheduleVP:
    """DPM-Solver's 'discrete' VP schedule: log α(n/N) = ½ Σ_{i≤n} log(1 − β_i), linear in between; T = 1.

    All methods take and return tensors of solver times; results have the dtype and device of the input. The knot
    tables are built in ``dtype``: float32 (default) rounds them as the official code does, which the sampler's
    output depends on at the 1e-6 relative level; float64 gives the exact maths.
    """

    def __init__(self, betas, dtype=torch.float32):
        betas = torch.as_tensor(np.asarray(betas)).to(dtype)
        self.N = len(betas)
        self.T = 1.
        self.t_array = torch.linspace(1. / self.N, 1., self.N, dtype=dtype)
        self.log_alpha_array = 0.5 * torch.log(1. - betas).cumsum(0)

    def marginal_log_mean_coeff(self, t):
        """log α_t."""
        return interp(t, self.t_array.to(t), self.log_alpha_array.to(t))

    def marginal_alpha(self, t):
        """α_t."""
        return self.marginal_log_mean_coeff(t).exp()

    def marginal_std(self, t):
        """σ_t = sqrt(1 − α_t²)."""
        return torch.sqrt(1. - torch.exp(2. * self.marginal_log_mean_coeff(t)))

    def marginal_lambda(self, t):
        """Half log-SNR λ_t = log α_t − log σ_t."""
        log_alpha = self.marginal_log_mean_coeff(t)
        return log_alpha - 0.5 * torch.log(1. - torch.exp(2. * log_alpha))

    def inverse_lambda(self, lamb):
        """The solver time t with λ_t = lamb (log α = −½ log(1 + e^{−2λ}), then interpolate back to t)."""
        log_alpha = -0.5 * torch.logaddexp(torch.zeros_like(lamb), -2. * lamb)
        return interp(log_alpha, self.log_alpha_array.flip(0).to(lamb), self.t_array.flip(0).to(lamb))


def fast_orders(steps: int, order: int = 3) -> list:
    """Orders of DPM-Solver-fast's single steps; they sum to ``steps`` (one model call per unit of order)."""
    if order == 3:
        k = steps // 3 + 1
        return [3] * (k - 2) + [2, 1] if steps % 3 == 0 else [3] * (k - 1) + [steps % 3]
    if order == 2:
        return [2] * (steps // 2) + [1] * (steps % 2)
    raise UserError(f'DPM-Solver-fast supports order 2 or 3, got {order}; set the sampler order to 2 or 3.')


def solver_times(schedule, t_start, t_end, n, skip_type, like):
    """n + 1 solver times from t_start down to t_end, uniform in t ('time_uniform') or in λ ('logSNR')."""
    kw = dict(dtype=like.dtype, device=like.device)
    if skip_type == 'time_uniform':
        return torch.linspace(t_start, t_end, n + 1, **kw)
    if skip_type == 'logSNR':
        lam = schedule.marginal_lambda(torch.tensor([t_start, t_end], **kw))
        return schedule.inverse_lambda(torch.linspace(lam[0].item(), lam[1].item(), n + 1, **kw))
    raise UserError(f'unknown skip_type {skip_type!r}; choose one of {list(SKIP_TYPES)}.')


def _data_prediction(model_fn, schedule):
    """Wrap an ε-model as x0(x, t) = (x − σ_t ε) / α_t for a (1,) solver time t, ε cast to the state's dtype."""
    def x0_fn(x, t):
        eps = model_fn(x, t.repeat(x.shape[0])).to(x.dtype)
        return (x - schedule.marginal_std(t) * eps) / schedule.marginal_alpha(t)
    return x0_fn


def _setup(model_fn, x, schedule, steps, t_start, t_end, skip_type):
    """Shared sampler preamble: validated steps, a ≥float32 state, the steps + 1 grid times and the x0 wrapper."""
    if not isinstance(steps, int) or steps < 1:
        raise UserError(f'sampling steps must be a positive integer, got {steps!r}; set sample.sample_steps.')
    x = x.to(_working_dtype(x))  # a bf16/fp16 model output must not drag the ODE state down with it
    t_start = schedule.T if t_start is None else t_start
    t_end = 1. / schedule.N if t_end is None else t_end  # the official eps = 1/N, i.e. discrete t = 1
    return x, solver_times(schedule, t_start, t_end, steps, skip_type, x), _data_prediction(model_fn, schedule)


# DPM-Solver++ updates from s to t ((1,) solver times, h = λ_t − λ_s) in data-prediction form with the official
# solver_type='dpm_solver' coefficients; x0_s is the data prediction at (x, s), r1 < r2 place the single-step
# intermediate points at λ_s + r·h. Bracketing follows the official code so float32 rounding matches it.

def _update_1(ns, x0_fn, x, s, t, x0_s):
    """DPM-Solver++(1), i.e. DDIM: x_t = σ_t/σ_s x − α_t (e^{−h} − 1) x0_s."""
    h = ns.marginal_lambda(t) - ns.marginal_lambda(s)
    return ns.marginal_std(t) / ns.marginal_std(s) * x - (ns.marginal_alpha(t) * (torch.exp(-h) - 1.)) * x0_s


def _update_2(ns, x0_fn, x, s, t, x0_s, r1):
    """Single-step DPM-Solver++(2): one extra model call at λ_s + r1·h."""
    lam_s = ns.marginal_lambda(s)
    h = ns.marginal_lambda(t) - lam_s
    s1 = ns.inverse_lambda(lam_s + r1 * h)
    sigma_s, phi_1 = ns.marginal_std(s), torch.expm1(-h)
    x_s1 = ns.marginal_std(s1) / sigma_s * x - ns.marginal_alpha(s1) * torch.expm1(-r1 * h) * x0_s
    x0_s1 = x0_fn(x_s1, s1)
    alpha_t = ns.marginal_alpha(t)
    return (ns.marginal_std(t) / sigma_s * x - alpha_t * phi_1 * x0_s
            - (0.5 / r1) * (alpha_t * phi_1) * (x0_s1 - x0_s))


def _update_3(ns, x0_fn, x, s, t, x0_s, r1, r2):
    """Single-step DPM-Solver++(3): two extra model calls at λ_s + r1·h and λ_s + r2·h."""
    lam_s = ns.marginal_lambda(s)
    h = ns.marginal_lambda(t) - lam_s
    s1, s2 = ns.inverse_lambda(lam_s + r1 * h), ns.inverse_lambda(lam_s + r2 * h)
    sigma_s, alpha_s2 = ns.marginal_std(s), ns.marginal_alpha(s2)
    phi_22 = torch.expm1(-r2 * h) / (r2 * h) + 1.
    phi_2 = torch.expm1(-h) / h + 1.
    x_s1 = ns.marginal_std(s1) / sigma_s * x - ns.marginal_alpha(s1) * torch.expm1(-r1 * h) * x0_s
    x0_s1 = x0_fn(x_s1, s1)
    x_s2 = (ns.marginal_std(s2) / sigma_s * x - alpha_s2 * torch.expm1(-r2 * h) * x0_s
            + (r2 / r1) * (alpha_s2 * phi_22) * (x0_s1 - x0_s))
    x0_s2 = x0_fn(x_s2, s2)
    alpha_t = ns.marginal_alpha(t)
    return (ns.marginal_std(t) / sigma_s * x - alpha_t * torch.expm1(-h) * x0_s
            + (1. / r2) * (alpha_t * phi_2) * (x0_s2 - x0_s))


def _multistep_2(ns, x, t_prev, s, t, x0_prev, x0_s):
    """Multistep DPM-Solver++(2M): the x0 slope comes from the previous grid time t_prev, no extra model call."""
    lam_s = ns.marginal_lambda(s)
    h = ns.marginal_lambda(t) - lam_s
    r0 = (lam_s - ns.marginal_lambda(t_prev)) / h
    alpha_phi = ns.marginal_alpha(t) * (torch.exp(-h) - 1.)
    return ns.marginal_std(t) / ns.marginal_std(s) * x - alpha_phi * x0_s - 0.5 * alpha_phi * ((x0_s - x0_prev) / r0)


_SINGLESTEP_UPDATES = {1: _update_1, 2: _update_2, 3: _update_3}


@torch.no_grad()
def dpm_solver_pp_fast(model_fn, x, schedule, steps, t_start=None, t_end=None, order=3,
                       skip_type='time_uniform', denoise_to_zero=False):
    """The official UniDiffuser sampler, DPM-Solver++ 'fast': single steps of orders 3/2/1, exactly ``steps`` NFE.

    Reproduces ``DPM_Solver(model_fn, ns, predict_x0=True).sample(x, steps=steps, eps=1/N, T=1)``: its defaults are
    method='fast', order=3 and skip_type='time_uniform' (not logSNR). There are ``steps`` + 1 grid times; an
    order-k step spans k grid intervals and calls the model at its first k grid times, r1, r2 being the
    λ-fractions of the inner ones. ``denoise_to_zero`` adds one final x0 prediction (one more NFE).
    """
    x, ts, x0_fn = _setup(model_fn, x, schedule, steps, t_start, t_end, skip_type)
    lam = schedule.marginal_lambda(ts)
    i = 0
    for k in fast_orders(steps, order):
        s, t = ts[i:i + 1], ts[i + k:i + k + 1]
        rs = [(lam[i + j] - lam[i]) / (lam[i + k] - lam[i]) for j in range(1, k)]
        x = _SINGLESTEP_UPDATES[k](schedule, x0_fn, x, s, t, x0_fn(x, s), *rs)
        i += k
    return x0_fn(x, ts[-1:]) if denoise_to_zero else x


@torch.no_grad()
def dpm_solver_pp_2m(model_fn, x, schedule, steps, t_start=None, t_end=None,
                     skip_type='time_uniform', denoise_to_zero=False):
    """Multistep DPM-Solver++(2M) on ``steps`` + 1 grid times, exactly ``steps`` NFE (an option, not official).

    The first step is first-order (no history yet); below 10 steps the last one is too (LuChengTHU/dpm-solver's
    ``lower_order_final``), which stabilises very short runs.
    """
    x, ts, x0_fn = _setup(model_fn, x, schedule, steps, t_start, t_end, skip_type)
    x0_prev, x0_s = None, x0_fn(x, ts[:1])
    for i in range(1, steps + 1):
        s, t = ts[i - 1:i], ts[i:i + 1]
        if i == 1 or (steps < 10 and i == steps):
            x = _update_1(schedule, x0_fn, x, s, t, x0_s)
        else:
            x = _multistep_2(schedule, x, ts[i - 2:i - 1], s, t, x0_prev, x0_s)
        if i < steps:  # the model is not needed after the last update
            x0_prev, x0_s = x0_s, x0_fn(x, t)
    return x0_fn(x, ts[-1:]) if denoise_to_zero else x


SAMPLERS = {'dpm_solver_fast': dpm_solver_pp_fast, 'dpm_solver_2m': dpm_solver_pp_2m}


def get_sampler(name):
    """The sampler registered under ``name``."""
    if name not in SAMPLERS:
        raise UserError(f'unknown sampler {name!r}; choose one of {sorted(SAMPLERS)} (config key sample.sampler).')
    return SAMPLERS[name]
