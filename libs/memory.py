"""Memory: encoder work in chunks, the planned peak memory of every stage, and the preflight that checks it.

``chunked`` runs a batched function in pieces whose size does not depend on the data batch (the encoders call it with
``config.encoders``). The planner traces each network on fake tensors (torch's FakeTensorMode: exact shapes, dtypes
and kernel choices, no data, no memory) and counts the most bytes its tensors hold at once (``LivePeak``); a stage's
plan adds the weights it keeps loaded. ``preflight`` compares a plan with the free memory of a CUDA device before a
script's first heavy step and refuses with one line naming the setting to lower and a value that fits. A CPU run
never refuses. Allocator fragmentation and the CUDA context are not in a plan (``CUDA_OVERHEAD`` stands for them).
"""
import functools
import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from libs.errors import UserError


def chunked(fn, chunk, *tensors):
    """``fn(*tensors)`` computed over the leading dimension in pieces of at most ``chunk`` rows, concatenated.

    Rows must be independent (per-sample networks): then the result is that of one call, whatever ``chunk`` is.
    """
    n = len(tensors[0])
    if not chunk or n <= chunk:
        return fn(*tensors)
    return torch.cat([fn(*(t[s:s + chunk] for t in tensors)) for s in range(0, n, chunk)])


GiB = 2 ** 30
# The caching allocator rounds blocks up and fragments; a plan must fit the free memory with this factor to spare.
ALLOCATOR_HEADROOM = 1.1
# Hidden sizes of the full-size CLIP encoders (OpenAI ViT-L/14 text, ViT-B/32 image), for planning without their
# files; a local model folder's own config.json is read instead.
CLIP_TEXT_FULL = dict(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                      num_attention_heads=12, max_position_embeddings=77, projection_dim=768)
CLIP_IMG_FULL = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                     image_size=224, patch_size=32, projection_dim=512)
DTYPES = {'fp32': None, 'bf16': torch.bfloat16, 'fp16': torch.float16}


class LivePeak(TorchDispatchMode):
    """The most bytes that tensors created while active occupy at the same time (each storage once, counted until
    it is freed): activations, autograd's temporaries, gradients, optimizer states and the step's temporaries.

    Works on fake tensors too (a storage's lifetime is followed by a weak reference, as torch's own MemTracker does;
    MemTracker itself cannot track frozen parameters, which LoRA has).
    """

    def __init__(self):
        super().__init__()
        self.live, self.peak, self.storages = 0, 0, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # Outputs on an input's storage (in-place ops, views) allocate nothing. _cdata: a storage's identity.
        inputs = {t.untyped_storage()._cdata for t in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                key = storage._cdata
                if key not in self.storages and key not in inputs:
                    n = storage.nbytes()
                    self.storages[key] = weakref.ref(storage, functools.partial(self._freed, key, n))
                    self.live += n
                    self.peak = max(self.peak, self.live)
        return out

    def _freed(self, key, n, _):
        self.live -= n
        self.storages.pop(key, None)


def fake_mode():
    """Fake tensors on the CPU device: real shapes, dtypes and kernel choices, no data and no memory."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    return FakeTensorMode(allow_non_fake_inputs=True)


def autocast(dtype):
    """CPU autocast to ``dtype`` (None: fp32), which traces the op-level casts CUDA autocast makes."""
    return torch.autocast('cpu', dtype=dtype or torch.float32, enabled=dtype is not None)


def param_bytes(module) -> int:
    """Bytes of a module's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in (*module.parameters(), *module.buffers()))


def traced_peak(build, inputs, run) -> int:
    """Most bytes alive at once while ``run(module, *inputs())`` runs on fake tensors, beyond the inputs themselves;
    ``build()`` makes the module on meta."""
    with torch.device('meta'):  # initialisers read values, which fake tensors do not have
        module = build()
    with fake_mode(), torch.no_grad():
        module, args = module.to_empty(device='cpu'), inputs()
        with LivePeak() as live:
            run(module, *args)
    return live.peak


# ----------------------------------------------------------------------------------------------------------------
# Components: the bytes of their weights, and of their activations for n items
# ----------------------------------------------------------------------------------------------------------------

def _key(section) -> str:
    """A hashable key of a config section (plans are cached per configuration)."""
    import json
    return json.dumps(section.to_dict() if hasattr(section, 'to_dict') else section, sort_keys=True, default=str)


def _clip_config(section, full, cls):
    """The transformers config of a CLIP encoder: a local folder's own, else the full-size OpenAI one."""
    import os
    path = section['name_or_path']
    return cls.from_pretrained(path) if os.path.isdir(path) else cls(**full)


@functools.lru_cache(maxsize=None)
def _vae(key, resolution, n, decode):
    import json

    from libs.autoencoder import FrozenAutoencoderKL
    vae_config = json.loads(key)
    f = 2 ** (len(vae_config['block_out_channels']) - 1)

    channels, side = (vae_config['latent_channels'], resolution // f) if decode else (vae_config['in_channels'],
                                                                                       resolution)
    run = (lambda vae, x: vae.decode(x)) if decode else (lambda vae, x: vae.encode_moments(x))
    peak = traced_peak(lambda: FrozenAutoencoderKL(vae_config), lambda: (torch.randn(n, channels, side, side),),
                       run) if n else 0
    with torch.device('meta'):
        return param_bytes(FrozenAutoencoderKL(vae_config)), peak


def vae(config, n: int, decode=False):
    """(weight bytes, activation bytes) of the VAE encoding (or decoding) n images at once, in fp32 as it always
    runs."""
    resolution = config.z_shape[-1] * 2 ** (len(config.autoencoder.block_out_channels) - 1)
    return _vae(_key(config.autoencoder), resolution, n, decode)


@functools.lru_cache(maxsize=None)
def _clip(kind, key, n, dtype_name):
    import json

    from transformers import CLIPTextConfig, CLIPTextModel, CLIPVisionConfig, CLIPVisionModelWithProjection
    section, dtype = json.loads(key), DTYPES[dtype_name]
    if kind == 'text':
        cfg = _clip_config(section, CLIP_TEXT_FULL, CLIPTextConfig)
        build = lambda: CLIPTextModel(cfg)  # noqa: E731
        inputs = lambda: (torch.zeros(n, cfg.max_position_embeddings, dtype=torch.long),)  # noqa: E731
        run = lambda m, ids: m(input_ids=ids)  # noqa: E731
    else:
        cfg = _clip_config(section, CLIP_IMG_FULL, CLIPVisionConfig)
        build = lambda: CLIPVisionModelWithProjection(cfg)  # noqa: E731
        inputs = lambda: (torch.randn(n, 3, cfg.image_size, cfg.image_size),)  # noqa: E731
        run = lambda m, pixels: m(pixel_values=pixels)  # noqa: E731

    def traced(model, x):
        with autocast(dtype):
            run(model, x)
    peak = traced_peak(build, inputs, traced) if n else 0
    with torch.device('meta'):
        return param_bytes(build()), peak


def clip_text(config, n: int, precision='fp32'):
    """(weight bytes, activation bytes) of the CLIP text encoder on n prompts."""
    return _clip('text', _key(config.clip_text), n, precision)


def clip_img(config, n: int, precision='fp32'):
    """(weight bytes, activation bytes) of the CLIP image encoder on n preprocessed images."""
    return _clip('img', _key(config.clip_img), n, precision)


@functools.lru_cache(maxsize=None)
def _caption(key, text_tokens, n, beam_size, max_length):
    import json

    from libs.caption_decoder import CaptionDecoder, load_gpt2_tokenizer
    section = json.loads(key)
    gpt2 = section['gpt2']
    # A tiny decoder's vocabulary is its tokenizer's (vocab_size <= 0), read from the local folder.
    tokenizer = None if gpt2['vocab_size'] > 0 else load_gpt2_tokenizer(section['tokenizer'], local_files_only=True)
    with torch.device('meta'):
        decoder = CaptionDecoder(section, tokenizer)
    rows, length, vocab = n * beam_size, text_tokens + max_length, decoder.gpt.config.vocab_size
    cache = 2 * gpt2['n_layer'] * rows * length * gpt2['n_embd'] * 4
    return param_bytes(decoder), 2 * cache + 4 * rows * vocab * 4


def caption_decoder(config, n: int, beam_size=5, max_length=67):
    """(weight bytes, activation bytes) of the caption decoder's beam search over n rows, counted by hand (the search
    branches on values, which fake tensors do not have): the beams' fp32 key/value cache at its longest, twice (a
    reorder copies it), and four (rows x beams, vocabulary) fp32 score tensors (logits, log-probabilities, their sum
    with the beam scores, the top-k input)."""
    return _caption(_key(config.caption_decoder), config.num_text_tokens, n, beam_size, max_length) if n else \
        (_caption(_key(config.caption_decoder), config.num_text_tokens, 1, beam_size, max_length)[0], 0)


# ----------------------------------------------------------------------------------------------------------------
# The U-ViT: sampling (one mode end to end) and training (one step)
# ----------------------------------------------------------------------------------------------------------------

def _nnet_config(config):
    """config.nnet with the knobs that do not change sampling memory left out of the cache key."""
    return {k: v for k, v in config.nnet.to_dict().items() if k != 'compile'}


@functools.lru_cache(maxsize=None)
def _sampling(key, mode, n, dtype_name):
    import json

    import ml_collections

    from libs import modes, pipeline
    from libs.diffusion import NoiseScheduleVP, get_sampler, stable_diffusion_betas
    from libs.uvit import build_nnet
    config = ml_collections.ConfigDict(json.loads(key))
    with torch.device('meta'):
        nnet = build_nnet(config.nnet, 'config.nnet').eval().requires_grad_(False)
    weights = param_bytes(nnet)
    if not n:
        return weights, 0
    betas = stable_diffusion_betas()
    text_shape = (config.num_text_tokens, config.text_dim)
    with fake_mode(), torch.no_grad():
        nnet = nnet.to_empty(device='cpu')
        comp = pipeline.Components(config, torch.device('cpu'), nnet)
        # One solver step: every step holds the same tensors, and the speaker caches live through all of them.
        ctx = modes.Context(
            nnet=nnet, sampler=functools.partial(get_sampler(config.sample.sampler), skip_type=config.sample.skip_type),
            schedule=NoiseScheduleVP(betas), N=len(betas), steps=1, scale=config.sample.scale,
            z_shape=tuple(config.z_shape), clip_img_dim=config.clip_img_dim, text_shape=text_shape,
            data_type=config.data_type if nnet.use_data_type else None, t2i_cfg_mode=config.sample.t2i_cfg_mode,
            empty_text=torch.randn(1, *text_shape), autocast_dtype=DTYPES[dtype_name],
            speaker_guidance=config.sample.speaker_guidance, scale_text=config.sample.scale_text,
            scale_face=config.sample.scale_face)
        z, clip = torch.randn(1, *config.z_shape), torch.randn(1, 1, config.clip_img_dim)
        text = torch.randn(1, *text_shape)
        with LivePeak() as live:
            modes.get_mode(mode)(ctx, pipeline.mode_inputs(comp, ctx, mode, n, z, clip, text))
    return weights, live.peak


def sampling(config, mode: str, n: int, precision='bf16'):
    """(weight bytes, activation bytes) of the U-ViT sampling ``mode`` for n samples at once (speaker caches, solver
    state and one guided forward; the inputs already encoded)."""
    section = {k: config[k].to_dict() if hasattr(config[k], 'to_dict') else config[k]
               for k in ('z_shape', 'clip_img_dim', 'num_text_tokens', 'text_dim', 'data_type', 'sample')}
    section['nnet'] = _nnet_config(config)
    return _sampling(_key(section), mode, n, precision)


def training_config(config, method: str, use_checkpoint: bool, lora_rank=None):
    """A copy of a training config with random initialisation and the method (full / lora) applied."""
    config = config.copy_and_resolve_references()
    config.nnet.use_checkpoint = use_checkpoint
    config.train.init_from = ''
    config.train.lora.enabled = method == 'lora'
    if lora_rank:
        config.train.lora.rank = config.train.lora.alpha = lora_rank
    return config


def random_batch(config, B: int, device) -> dict:
    """Random cached features of one batch (the tensors training_losses reads)."""
    C, h, w = config.z_shape
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g)  # noqa: E731
    batch = dict(speaker_moments=rand(B, 2 * C, h, w), response_moments=rand(B, 2 * C, h, w),
                 speaker_clip_img=rand(B, 1, config.clip_img_dim), response_clip_img=rand(B, 1, config.clip_img_dim),
                 speaker_text=rand(B, config.num_text_tokens, config.clip_text_dim).half(),
                 response_text=rand(B, config.num_text_tokens, config.clip_text_dim).half(),
                 label=torch.randint(0, config.nnet.num_emotions, (B,), generator=g))
    return {k: v.to(device) for k, v in batch.items()}


@functools.lru_cache(maxsize=None)
def _training(key, B, dtype_name):
    import json

    import ml_collections

    from libs import trainer
    from libs.diffusion import Schedule, stable_diffusion_betas
    config = ml_collections.ConfigDict(json.loads(key))
    with torch.device('meta'):  # initialisers read values, which fake tensors do not have
        nnet = trainer.build_model(config).train()
    schedule, batch = Schedule(stable_diffusion_betas()), random_batch(config, B, torch.device('cpu'))
    rand = trainer.draw_randomness(range(B), 0, 'train', config, schedule.N, trainer.speaker_dropout(config.train))
    with fake_mode():
        nnet = nnet.to_empty(device='cpu')
        reducer = torch.nn.Linear(config.clip_text_dim, config.text_dim).requires_grad_(False)
        with LivePeak() as live:
            with autocast(DTYPES[dtype_name]):
                losses, _ = trainer.training_losses(nnet, batch, rand, reducer, schedule, config)
            losses['loss'].mean().backward()
    params = sum(p.numel() for p in nnet.parameters())
    trained = sum(p.numel() for p in nnet.parameters() if p.requires_grad)
    # fp32 master weights (also under autocast), two fp32 AdamW moments and an fp32 EMA of the trained parameters.
    # The optimizer step holds the gradients and, in torch's foreach AdamW (the GPU default), up to one more fp32
    # copy of the trained parameters; forward and backward hold what LivePeak saw (gradients included).
    weights, optimizer, ema = 4 * params, 8 * trained, 4 * trained
    return dict(batch=B, params=params, trained=trained, weights=weights, ema=ema, optimizer=optimizer,
                step=live.peak, accounted=weights + ema + optimizer + max(live.peak, 8 * trained))


def training(config, micro_batch: int, precision='bf16') -> dict:
    """The accounting of one training step of ``micro_batch`` pairs per process on fake tensors: parameters, trained
    parameters, bytes of weights, EMA, AdamW states, forward + backward ('step') and their sum ('accounted').

    The optimizer step is not traced (it reads values); allocator overhead and the CUDA context are not included.
    """
    return _training(_key(config), micro_batch, precision)


# ----------------------------------------------------------------------------------------------------------------
# Stages: the planned peak of each script, in bytes
# ----------------------------------------------------------------------------------------------------------------

def _peak(weights, phases) -> int:
    """Weights held throughout plus the largest of the phases that follow one another."""
    return sum(weights) + max(phases)


def extraction(config) -> int:
    """extract_features.py: the VAE and both CLIP encoders, one data batch of 2 x data.batch_size faces on the device
    (VAE and CLIP inputs), encoded in chunks of config.encoders, all in fp32 (whatever the config's precision)."""
    faces, chunks = 2 * config.data.batch_size, config.encoders
    (w_vae, a_vae), (w_txt, a_txt), (w_img, a_img) = (
        vae(config, min(faces, chunks.vae_encode_chunk)), clip_text(config, min(faces, chunks.clip_chunk)),
        clip_img(config, min(faces, chunks.clip_chunk)))
    resolution = config.z_shape[-1] * 2 ** (len(config.autoencoder.block_out_channels) - 1)
    from transformers import CLIPVisionConfig
    size = _clip_config(config.clip_img, CLIP_IMG_FULL, CLIPVisionConfig).image_size
    inputs = 4 * faces * 3 * (resolution ** 2 + size ** 2)
    return _peak((w_vae, w_txt, w_img, inputs), (a_vae, a_txt, a_img))


def sampling_stage(config, modes, n: int, precision='bf16', chunk=None, need_text=True) -> int:
    """sample_multi.py / app.py: every component loaded; the inputs encoded (one face, one prompt), n samples run in
    chunks of ``chunk`` (config.sample.batch_samples) through the largest of ``modes``, then decoded in chunks."""
    chunk = chunk or config.sample.batch_samples
    rows, enc = min(n, chunk), config.encoders
    solve = max(sampling(config, mode, rows, precision)[1] for mode in modes)
    w_nnet = sampling(config, modes[0], 0, precision)[0]
    (w_vae, a_enc), (_, a_dec) = vae(config, 1), vae(config, min(n, enc.vae_decode_chunk), decode=True)
    (w_txt, a_txt), (w_img, a_img) = clip_text(config, 1 if need_text else 0), clip_img(config, 1)
    w_cap, a_cap = caption_decoder(config, min(n, enc.caption_chunk))
    return _peak((w_nnet, w_vae, w_txt if need_text else 0, w_img, w_cap), (a_enc, a_txt, a_img, solve, a_dec, a_cap))


def evaluation(config, batch_size: int, precision='bf16', raw=True) -> int:
    """eval_avamerg.py: ``batch_size`` pairs at once through mode empath (speaker turns encoded from the frames when
    ``raw``, else read from a feature cache), decoded in chunks; the FID network is not included."""
    enc = config.encoders
    faces = min(batch_size, enc.vae_encode_chunk)
    w_nnet, solve = sampling(config, 'empath', batch_size, precision)
    (w_vae, a_enc), (_, a_dec) = vae(config, faces if raw else 0), vae(config, min(batch_size, enc.vae_decode_chunk),
                                                                         decode=True)
    (w_txt, a_txt), (w_img, a_img) = (clip_text(config, min(batch_size, enc.clip_chunk)) if raw else (0, 0),
                                      clip_img(config, min(batch_size, enc.clip_chunk)))
    w_cap, a_cap = caption_decoder(config, min(batch_size, enc.caption_chunk))
    return _peak((w_nnet, w_vae, w_txt, w_img, w_cap), (a_enc, a_txt, a_img, solve, a_dec, a_cap))


def training_stage(config, micro_batch: int, precision='bf16') -> int:
    """train_empath.py: one training step of ``micro_batch`` pairs per process (libs.memory.training), with the
    config's method (full or LoRA) and gradient checkpointing."""
    planned = training_config(config, 'lora' if config.train.lora.enabled else 'full', config.nnet.use_checkpoint)
    return training(planned, micro_batch, precision)['accounted']


# ----------------------------------------------------------------------------------------------------------------
# Preflight: a plan against the free memory of a CUDA device
# ----------------------------------------------------------------------------------------------------------------

def budget(device):
    """Bytes this process can plan for on a CUDA device (its free memory plus what the process already holds, with
    ALLOCATOR_HEADROOM to spare); None on any other device, which is never refused."""
    device = torch.device(device)
    if device.type != 'cuda':
        return None
    free, _ = torch.cuda.mem_get_info(device)
    return int((free + torch.cuda.memory_allocated(device)) / ALLOCATOR_HEADROOM)


def preflight(device, what: str, plan, value: int, setting, otherwise: str = ''):
    """On CUDA, raise UserError unless ``plan(value)`` bytes fit the device; returns the planned bytes (None off CUDA).

    The error names ``setting(v)`` (e.g. '--config.sample.batch_samples=3') with the largest v below ``value`` whose
    plan fits (plans grow with v), or says ``otherwise`` when even v = 1 does not fit.
    """
    room = budget(device)
    if room is None:
        return None
    need = plan(value)
    if need <= room:
        return need
    fits, low, high = None, 1, value - 1
    while low <= high:  # the largest value that fits, by bisection (each plan is one trace)
        mid = (low + high) // 2
        if plan(mid) <= room:
            fits, low = mid, mid + 1
        else:
            high = mid - 1
    have = f'{what} plans {need / GiB:.2f} GiB on {device} but only {room / GiB:.2f} GiB can be used there'
    if fits is None:
        instead = otherwise or 'use a GPU with more memory'
        raise UserError(f'{have}, and even {setting(1)} plans {plan(1) / GiB:.2f} GiB; {instead} (docs/memory.md)')
    raise UserError(f'{have}: set {setting(fits)} (plans {plan(fits) / GiB:.2f} GiB; docs/memory.md)')


def _with(config, **updates):
    """A copy of the config with dotted keys replaced."""
    config = config.copy_and_resolve_references()
    for path, value in updates.items():
        *parents, leaf = path.split('.')
        node = config
        for part in parents:
            node = node[part]
        node[leaf] = value
    return config


def check_extraction(config, device):
    """extract_features.py's preflight: the VAE chunk is the setting to lower."""
    plan = lambda v: extraction(_with(config, **{'encoders.vae_encode_chunk': v}))  # noqa: E731
    return preflight(device, 'feature extraction', plan, config.encoders.vae_encode_chunk,
                     lambda v: f'--config.encoders.vae_encode_chunk={v}',
                     'lower --config.data.batch_size (its faces are moved to the device at once)')


def sampling_precision(config, device) -> str:
    """The precision sampling runs in on ``device`` (config.sample.precision resolved)."""
    from libs import precision
    return precision.resolve(config.sample.precision, device).name


def usable_modes(config) -> tuple:
    """The sampling modes config.nnet can run: the empath ones only with a speaker segment."""
    from libs import modes
    from libs.uvit import NETS
    speaker = NETS.get(config.nnet.name, {}).get('condition', False)
    return tuple(m for m in modes.MODES if speaker or m not in modes.EMPATH_MODES)


def planned_network(config, nnet_path=None):
    """The config with the U-ViT that ``nnet_path`` will rebuild: a train_empath.py export carries its own nnet config,
    which ``pipeline.load_components`` uses whatever config.nnet says. config itself for other weights, and for an
    export not fetched yet (the preflight runs before any download)."""
    import ml_collections

    from libs import pipeline
    stored, _ = pipeline.nnet_source(config, nnet_path, fetched=False)
    if stored is None or stored is config.nnet:
        return config
    config = config.copy_and_resolve_references()
    config.nnet = ml_collections.ConfigDict(stored)
    return config


def check_sampling(config, device, modes, n_samples: int, nnet_path=None):
    """sample_multi.py's and app.py's preflight for ``n_samples`` of the largest of ``modes`` with the network of
    ``nnet_path``: the samples per U-ViT batch (config.sample.batch_samples) is the setting to lower."""
    config = planned_network(config, nnet_path)
    prec = sampling_precision(config, device)
    return preflight(device, f'sampling ({", ".join(modes)}, {prec})',
                     lambda v: sampling_stage(config, tuple(modes), n_samples, prec, chunk=v),
                     min(config.sample.batch_samples, n_samples), lambda v: f'--config.sample.batch_samples={v}',
                     'use --config.sample.precision=bf16' if prec == 'fp32' else '')


def check_evaluation(config, device, batch_size: int, raw: bool = True, nnet_path=None):
    """eval_avamerg.py's preflight with the network of ``nnet_path``: its --batch_size (pairs per sampling batch) is
    the setting to lower."""
    config = planned_network(config, nnet_path)
    prec = sampling_precision(config, device)
    return preflight(device, f'evaluation ({prec})', lambda v: evaluation(config, v, prec, raw), batch_size,
                     lambda v: f'--batch_size={v}', 'use --config.sample.precision=bf16' if prec == 'fp32' else '')


TRAINING_PRECISION = {'no': 'fp32', 'bf16': 'bf16', 'fp16': 'fp16'}


def check_training(config, device, num_processes: int = 1):
    """train_empath.py's preflight before the first step: the micro-batch per process (train.batch_size /
    (processes x train.grad_accum)) must fit; the setting is a larger train.grad_accum."""
    tc, prec = config.train, TRAINING_PRECISION[config.mixed_precision]
    micro = max(1, tc.batch_size // (num_processes * tc.grad_accum))

    def setting(m):
        accum = -(-tc.batch_size // (num_processes * m))
        # The global batch must split evenly over processes and accumulation steps (libs.features.micro_batch_size).
        while tc.batch_size % (accum * num_processes) and accum < tc.batch_size:
            accum += 1
        return f'--config.train.grad_accum={accum}'
    return preflight(device, f'training ({"LoRA" if tc.lora.enabled else "full"}, {prec})',
                     lambda m: training_stage(config, m, prec), micro, setting,
                     'turn on --config.nnet.use_checkpoint=True or --config.train.lora.enabled=True')


# ----------------------------------------------------------------------------------------------------------------
# The memory plan of every stage (scripts/memory_plan.py)
# ----------------------------------------------------------------------------------------------------------------

CARDS_GIB = (24, 40, 80)


def fits_on(planned: int) -> list:
    """For each card of CARDS_GIB, whether ``planned`` bytes with ALLOCATOR_HEADROOM fit its memory."""
    return [planned * ALLOCATOR_HEADROOM <= card * GiB for card in CARDS_GIB]


def plan_rows(config, eval_batches=(4, 8, 16), eval_default=8, train_batches=(1, 8), app_samples=4,
              progress=lambda row: None):
    """Rows (stage, settings, {precision: bytes}) of every stage at config defaults and at batch sizes users pick
    (``eval_default``: eval_avamerg.py's --batch_size, ``app_samples``: app.py's most samples)."""
    from libs import modes
    precisions, rows = ('fp32', 'bf16'), []

    def add(stage, settings, plan):
        rows.append((stage, settings, {p: plan(p) for p in precisions}))
        progress(rows[-1])

    enc = config.encoders
    add('extraction', f'data.batch_size={config.data.batch_size}, encoders.vae_encode_chunk={enc.vae_encode_chunk} '
        f'(default)', lambda p: extraction(config))
    whole = 2 * config.data.batch_size
    add('extraction', f'unchunked (vae_encode_chunk={whole}, clip_chunk={whole})',
        lambda p: extraction(_with(config, **{'encoders.vae_encode_chunk': whole, 'encoders.clip_chunk': whole})))
    for method in ('full', 'lora'):
        for ckpt in (True, False):
            planned = training_config(config, method, ckpt)
            for B in train_batches:
                add('training', f'{"LoRA" if method == "lora" else "full"}, micro-batch {B}, checkpointing '
                    f'{"on" if ckpt else "off"}', lambda p: training_stage(planned, B, p))
    n = config.sample.batch_samples
    for mode in modes.MODES:
        for count in sorted({1, n}):
            add(f'sampling {mode}', f'n_samples={count}' + (' (sample.batch_samples default)' if count == n else ''),
                lambda p: sampling_stage(config, (mode,), count, p))
    for B in eval_batches:
        add('evaluation', f'--batch_size={B}' + (' (default)' if B == eval_default else ''), lambda p: evaluation(config, B, p))
    add('app', f'every mode, up to {app_samples} samples', lambda p: sampling_stage(config, usable_modes(config),
                                                                                  app_samples, p))
    return rows


def plan_table(rows) -> str:
    """The rows of ``plan_rows`` as a markdown table (GiB), with the cards each precision fits."""
    head = ('| stage | settings | planned fp32 | planned bf16 | '
            + ' | '.join(f'{c} GB' for c in CARDS_GIB) + ' |\n|' + '---|' * (4 + len(CARDS_GIB)) + '\n')
    lines = []
    for stage, settings, planned in rows:
        cards = []
        for i in range(len(CARDS_GIB)):
            ok = [p for p in ('bf16', 'fp32') if fits_on(planned[p])[i]]
            cards.append(' + '.join(ok) if ok else 'no')
        lines.append(f'| {stage} | {settings} | {planned["fp32"] / GiB:.2f} | {planned["bf16"] / GiB:.2f} | '
                     + ' | '.join(cards) + ' |')
    return head + '\n'.join(lines) + '\n'
