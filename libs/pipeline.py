"""From a config to loaded components, and between raw inputs/outputs and the network's three spaces.

``sample_multi.py``, ``eval_avamerg.py`` and the training loop's periodic samples all go through ``generate``:
encode the inputs, run one entry of ``libs.modes.MODES``, decode the outputs.
"""
import functools
import logging
import resource
from dataclasses import dataclass
from typing import List, Optional

import torch
from PIL import Image

from libs import modes, precision
from libs.diffusion import NoiseScheduleVP, get_sampler, stable_diffusion_betas
from libs.errors import UserError
from libs.uvit import NETS, UViT, build_nnet, checkpoint_config, load_nnet_weights

logger = logging.getLogger(__name__)


@dataclass
class Components:
    """The loaded networks; encoders that a run does not need stay None."""
    config: object
    device: torch.device
    nnet: UViT
    autoencoder: Optional[torch.nn.Module] = None
    clip_text: Optional[object] = None
    clip_img: Optional[object] = None
    caption_decoder: Optional[torch.nn.Module] = None
    nnet_path: str = ''                     # the U-ViT's reference (libs.hub.nnet_ref)
    nnet_config: Optional[dict] = None      # the nnet config it was built from, and where that came from
    nnet_where: str = 'config.nnet'

    @property
    def resolution(self) -> int:
        """Pixel resolution of the images the latents decode to (latent size x the VAE's downsampling)."""
        return self.config.z_shape[-1] * 2 ** (len(self.config.autoencoder.block_out_channels) - 1)


def needed_parts(need_images=True, need_text=True):
    """The pretrained components (libs.hub.PARTS) that ``load_components`` loads."""
    return ('nnet', 'caption_decoder') + (('clip_text',) if need_text else ()) + \
        (('autoencoder', 'clip_img') if need_images else ())


def nnet_source(config, nnet_path=None, fetched=True):
    """(nnet config, where it is from) of the U-ViT ``load_components`` builds.

    A train_empath.py export rebuilds its own network (the config it was trained with, in its metadata), whatever
    config.nnet says. Before the files are fetched (``fetched=False``) a .safetensors file not on this machine yet may
    be such an export: (None, its reference) then.
    """
    from libs import hub
    ref = hub.nnet_ref(config, nnet_path)
    local = hub.local_path(ref) if fetched else hub.cached_path(ref)
    if local is None and ref.endswith('.safetensors'):
        return None, ref
    exported = checkpoint_config(local) if local else None
    return (exported['nnet'], f'the nnet config stored in {ref}') if exported else (config.nnet, 'config.nnet')


def check_speaker_segment(what: str, nnet_config, where: str, config) -> None:
    """Refuse to answer a speaker (``what``: 'mode empath', ...) with a UniDiffuser U-ViT, which has no speaker
    segment, naming the config to use instead. Unknown names pass: building the network lists the valid ones."""
    name = nnet_config.get('name')
    if name not in NETS or NETS[name].get('condition'):
        return
    tiny = config.get('local_weights')  # the tiny components of scripts/make_tiny_models.py
    if tiny:
        folder = '' if tiny['folder'] == 'models/tiny' else f':{tiny["folder"]}'
        instead = f'for the tiny components use --config=configs/sample_tiny_empath.py{folder}'
    else:
        instead = ('use an EmpathDiffuser checkpoint with its config, e.g. --config=configs/avamerg_empath.py '
                   '--nnet_path=workdir/avamerg_empath/nnet_ema.safetensors (written by train_empath.py)')
    raise UserError(f'{what} needs an EmpathDiffuser network (nnet.name=uvit_empath), but {where} has '
                    f'name={name!r}: a UniDiffuser U-ViT without a speaker segment; {instead}. '
                    'The other modes run on it')


def check_speaker_network(what: str, config, nnet_path=None, fetched=True) -> None:
    """``check_speaker_segment`` of the U-ViT ``load_components`` builds (before fetching: when that is known)."""
    nnet_config, where = nnet_source(config, nnet_path, fetched)
    if nnet_config is not None:
        check_speaker_segment(what, nnet_config, where, config)


def load_components(config, device, nnet_path=None, need_images=True, need_text=True,
                    speaker_for: Optional[str] = None) -> Components:
    """Build every network from the config and load its weights (each loader fails loudly on missing files).

    ``speaker_for`` says what will answer a speaker ('mode empath', ...): a network without a speaker segment is
    then refused before anything is fetched or built.
    """
    from libs import hub
    if speaker_for:
        check_speaker_network(speaker_for, config, nnet_path, fetched=False)
    hub.preflight(config, needed_parts(need_images, need_text), nnet_path)  # all missing files, before any import
    from libs.autoencoder import load_autoencoder
    from libs.caption_decoder import load_caption_decoder
    from libs.clip_encoders import CLIPImageEncoder, CLIPTextEncoder

    nnet_path = hub.nnet_ref(config, nnet_path)
    nnet_config, where = nnet_source(config, nnet_path)
    if speaker_for:
        check_speaker_segment(speaker_for, nnet_config, where, config)
    nnet = build_nnet(nnet_config, where)
    load_nnet_weights(nnet, nnet_path, logger)
    comp = Components(config, device, nnet.to(device).eval().requires_grad_(False), nnet_path=nnet_path,
                      nnet_config=nnet_config, nnet_where=where)
    if config.nnet.compile:
        compile_nnet(comp.nnet)
    cd, chunks = config.caption_decoder, config.encoders
    comp.caption_decoder = load_caption_decoder(cd.pretrained_path, cd.tokenizer, cd.local_files_only, config=cd,
                                                device=device)
    if need_text:
        comp.clip_text = CLIPTextEncoder(config.clip_text.name_or_path, config.clip_text.local_files_only,
                                         device=device, chunk=chunks.clip_chunk)
        if comp.clip_text.max_length != config.num_text_tokens:
            raise UserError(f'the text encoder {config.clip_text.name_or_path} has {comp.clip_text.max_length} '
                            f'positions but config.num_text_tokens={config.num_text_tokens}')
    if need_images:
        comp.autoencoder = load_autoencoder(config.autoencoder.pretrained_path, config.autoencoder, device=device,
                                            encode_chunk=chunks.vae_encode_chunk, decode_chunk=chunks.vae_decode_chunk)
        comp.clip_img = CLIPImageEncoder(config.clip_img.name_or_path, config.clip_img.local_files_only,
                                         device=device, chunk=chunks.clip_chunk)
    return comp


def compile_nnet(nnet: UViT) -> UViT:
    """``torch.compile`` the U-ViT's forward in place (``config.nnet.compile``); the first call of each shape compiles.

    Only the per-step forward is compiled; ``encode_condition`` runs once per sample and stays eager.
    """
    nnet.compile()
    return nnet


def make_context(comp: Components, generator: torch.Generator) -> modes.Context:
    """The sampling context of ``libs.modes`` from the config's ``sample`` section (precision resolved and logged)."""
    config = comp.config
    betas = stable_diffusion_betas()
    prec = precision.resolve(config.sample.precision, comp.device)
    precision.log_precision(prec)
    ctx = modes.Context(
        nnet=comp.nnet,
        sampler=functools.partial(get_sampler(config.sample.sampler), skip_type=config.sample.skip_type),
        schedule=NoiseScheduleVP(betas), N=len(betas),
        steps=config.sample.sample_steps, scale=config.sample.scale, z_shape=tuple(config.z_shape),
        clip_img_dim=config.clip_img_dim, text_shape=(config.num_text_tokens, config.text_dim),
        data_type=config.data_type if comp.nnet.use_data_type else None, t2i_cfg_mode=config.sample.t2i_cfg_mode,
        generator=generator, device=comp.device, autocast_dtype=prec.dtype,
        speaker_guidance=config.sample.speaker_guidance, scale_text=config.sample.scale_text,
        scale_face=config.sample.scale_face)
    if ctx.t2i_cfg_mode not in ('true_uncond', 'empty_token'):
        raise UserError(f'config.sample.t2i_cfg_mode={ctx.t2i_cfg_mode!r}: use true_uncond or empty_token')
    if ctx.speaker_guidance not in modes.SPEAKER_GUIDANCE:
        raise UserError(f'config.sample.speaker_guidance={ctx.speaker_guidance!r}: use one of '
                        f'{", ".join(modes.SPEAKER_GUIDANCE)}')
    if ctx.t2i_cfg_mode == 'empty_token' and comp.clip_text is not None:
        ctx.empty_text = encode_prompts(comp, [''])
    return ctx


# ----------------------------------------------------------------------------------------------------------------
# Inputs -> network spaces
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def encode_prompts(comp: Components, prompts: List[str]) -> torch.Tensor:
    """Prompts -> (B, T, Dt): CLIP text hidden states reduced by the caption decoder's ``encode_prefix``."""
    hidden = comp.clip_text.encode(prompts).to(comp.device)
    return comp.caption_decoder.encode_prefix(hidden.float())


@torch.no_grad()
def encode_images(comp: Components, images: List[Image.Image], generator=None):
    """Images -> VAE latents (B, C, h, w) sampled from the posterior and CLIP embeddings (B, 1, Dc)."""
    from libs.autoencoder import center_crop_resize, to_tensor_m11
    crops = [center_crop_resize(im, comp.resolution) for im in images]
    pixels = torch.stack([to_tensor_m11(c) for c in crops]).to(comp.device)
    z = comp.autoencoder.sample(comp.autoencoder.encode_moments(pixels), generator=generator)
    return z, comp.clip_img.encode(crops).to(comp.device).float()


def absent_speaker(ctx, B) -> dict:
    """A speaker turn with every modality absent: Gaussian noise at t = N, drawn from the context's generator."""
    N = ctx.N
    return dict(img=ctx.randn(B, *ctx.z_shape), clip_img=ctx.randn(B, 1, ctx.clip_img_dim),
                text=ctx.randn(B, *ctx.text_shape), t_img=modes.full(ctx, B, N), t_text=modes.full(ctx, B, N))


def speaker_inputs(comp, ctx, B, z=None, clip_img=None, text=None, mode='empath') -> dict:
    """The speaker input of ``mode`` for B samples: one cache of every guidance row, from one ``encode_condition``.

    The rows are the turns of ``modes.speaker_branches(ctx, mode)`` stacked branch by branch, B rows each: the given
    face (z, clip_img) and/or utterance (text), its utterance alone, or nothing. Encoding them together means the
    keys/values of a row exist once, in the cache the mode reads, and no per-branch cache is kept beside it. One draw
    of the absent modalities' noise (from the context's generator, so a seed fixes it) stands for them in every
    branch: a branch differs from another only by what the speaker gave (docs/sampling_internals.md).
    """
    absent = absent_speaker(ctx, B)
    given = {}
    if z is not None:
        given['face'] = dict(img=z.expand(B, -1, -1, -1), clip_img=clip_img.expand(B, -1, -1),
                             t_img=modes.full(ctx, B, 0))
    if text is not None:
        given['utterance'] = dict(text=text.expand(B, -1, -1), t_text=modes.full(ctx, B, 0))
    turns = []
    for branch in modes.speaker_branches(ctx, mode):
        turn = dict(absent)
        for part in modes.SPEAKER_BRANCHES[branch]:
            turn.update(given.get(part, {}))
        turns.append(turn)
    cond = {k: torch.cat([turn[k] for turn in turns]) for k in absent}
    with torch.no_grad(), precision.autocast(ctx.device, ctx.autocast_dtype):
        return dict(speaker=comp.nnet.encode_condition(cond))


# ----------------------------------------------------------------------------------------------------------------
# Network spaces -> outputs
# ----------------------------------------------------------------------------------------------------------------

@torch.no_grad()
def decode_images(comp: Components, z: torch.Tensor) -> List[Image.Image]:
    """Latents -> PIL images."""
    from libs.autoencoder import to_pil
    return to_pil(comp.autoencoder.decode(z))


@torch.no_grad()
def decode_texts(comp: Components, text: torch.Tensor, beam_size: int = 5) -> List[str]:
    """Reduced text features -> strings through the caption decoder's batched beam search."""
    return comp.caption_decoder.generate_captions(text.float(), beam_size=beam_size,
                                                  chunk=comp.config.encoders.caption_chunk)


def peak_memory_gb(device: torch.device) -> float:
    """Peak accelerator memory, or the process's peak resident memory on a CPU, in GiB."""
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def make_grid(images: List[Image.Image], nrow: int) -> Image.Image:
    """Tile equally sized images row by row."""
    w, h = images[0].size
    cols = max(1, min(nrow, len(images)))
    rows = (len(images) + cols - 1) // cols
    grid = Image.new('RGB', (cols * w, rows * h))
    for i, im in enumerate(images):
        grid.paste(im, ((i % cols) * w, (i // cols) * h))
    return grid


def top_emotions(probs: torch.Tensor, names: List[str], k: int = 3):
    """(B, classes) probabilities -> per sample the top-k [(label, probability)]."""
    values, idx = probs.topk(min(k, probs.shape[1]), dim=1)
    return [[(names[i], round(float(v), 4)) for v, i in zip(vs, ids)] for vs, ids in zip(values, idx)]


def check_condition_trained(nnet: UViT, what: str, allow_untrained: bool = False) -> None:
    """Refuse to answer a speaker with a network whose speaker segment is untrained, unless allowed (one without a
    speaker segment at all is refused earlier, by ``check_speaker_segment``).

    An official UniDiffuser checkpoint loaded into EmpathDiffuser (or a network never fine-tuned) has zero gates: the
    speaker has no effect and the emotion head is random, so its 'responses' and emotions would mean nothing.
    """
    if not nnet.condition_is_trained() and not allow_untrained:
        raise UserError(f'{what}: the network\'s speaker segment is untrained (every gate is zero, e.g. an official '
                        'UniDiffuser checkpoint or a network before fine-tuning), so the speaker has no effect and the '
                        'emotions are random. Use a network trained by train_empath.py, or pass '
                        '--allow_untrained_condition to run it anyway')


def generate(comp: Components, ctx: modes.Context, mode: str, n_samples: int, prompt=None, image=None,
             allow_untrained_condition: bool = False):
    """Run one sampling mode end to end: raw inputs -> decoded images, texts and emotions.

    The inputs are encoded once; the samples run in chunks of at most ``config.sample.batch_samples`` (each U-ViT
    call then holds that many rows per guidance branch), drawing their noise one chunk after the other.
    """
    fn = modes.get_mode(mode)
    if mode in modes.EMPATH_MODES:
        check_speaker_segment(f'mode {mode}', comp.nnet_config, comp.nnet_where, comp.config)
        check_condition_trained(comp.nnet, f'mode {mode}', allow_untrained_condition)
    z = clip_img = text = None
    if image is not None:
        z, clip_img = encode_images(comp, [image], generator=ctx.generator)
    if prompt is not None:
        text = encode_prompts(comp, [prompt])
    chunk = comp.config.sample.batch_samples
    outs = [fn(ctx, mode_inputs(comp, ctx, mode, min(chunk, n_samples - s), z, clip_img, text))
            for s in range(0, n_samples, chunk)]
    out = {key: torch.cat([o[key] for o in outs]) for key in outs[0]}
    result = {}
    if 'z' in out and mode not in ('i2t', 't2i2t'):
        result['images'] = decode_images(comp, out['z'])
    if 'text' in out and mode not in ('t2i', 'i2t2i'):
        result['texts'] = decode_texts(comp, out['text'])
    if 'emotion' in out:
        from libs.avamerg import EMOTIONS_32
        result['emotions'] = top_emotions(out['emotion'], list(EMOTIONS_32))
    return result


def mode_inputs(comp: Components, ctx: modes.Context, mode: str, B: int, z=None, clip_img=None, text=None) -> dict:
    """The inputs of ``mode`` for B samples from an encoded face (z, clip_img) and/or utterance (text), each of one."""
    if mode in modes.EMPATH_MODES:
        return dict(n=B, **speaker_inputs(comp, ctx, B, z, clip_img, text))
    inputs = dict(n=B)
    if comp.nnet.condition:  # a fine-tuned network without a speaker turn is a plain UniDiffuser
        inputs.update(speaker_inputs(comp, ctx, B, mode=mode))
    if text is not None:
        inputs['text'] = text.expand(B, -1, -1)
    if z is not None:
        inputs.update(z=z.expand(B, -1, -1, -1), clip_img=clip_img.expand(B, -1, -1))
    return inputs
