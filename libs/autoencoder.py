"""Stable Diffusion KL-f8 VAE with UniDiffuser's semantics, loaded from the official LDM-layout checkpoint.

The network is diffusers' `AutoencoderKL`; `FrozenAutoencoderKL` adds the official `encode_moments` /
`sample` / `decode` contract (latent = scale_factor * posterior sample). Image helpers reproduce the official
preprocessing (square centre crop, Lanczos resize, [-1, 1]) with PIL and numpy only.
"""
import logging
import re

import ml_collections
import numpy as np
import torch
from diffusers import AutoencoderKL
from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
from PIL import Image

from libs import hub
from libs.errors import UserError
from libs.io import describe_mismatch, read_state_dict
from libs.memory import chunked

logger = logging.getLogger(__name__)

VAE_CONFIG_KEYS = ('in_channels', 'out_channels', 'latent_channels', 'block_out_channels', 'layers_per_block',
                   'norm_num_groups', 'scale_factor')
# Bounds the official posterior puts on log-variance before sampling (LDM's DiagonalGaussianDistribution).
LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0
WHERE_TO_GET = (f'the official file is {hub.HF_PREFIX}{hub.UNIDIFFUSER_V1}/autoencoder_kl.pth (fetched into the '
                'Hugging Face cache when given as the path), or run '
                f'`{hub.download_command(hub.UNIDIFFUSER_V1, ["autoencoder_kl.pth"], local_dir="models")}` '
                'for models/autoencoder_kl.pth')


def sd_vae_config():
    """The full-size Stable Diffusion KL-f8 VAE that UniDiffuser uses (83.7M parameters)."""
    return ml_collections.ConfigDict(dict(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(128, 256, 512, 512),
        layers_per_block=2, norm_num_groups=32, scale_factor=0.18215))


def _diffusers_kwargs(vae_config):
    """Turn a project VAE config into `AutoencoderKL` constructor arguments."""
    cfg = dict(vae_config)
    missing = [k for k in VAE_CONFIG_KEYS if k not in cfg]
    if missing:
        raise UserError(f'VAE config lacks {missing}; start from libs.autoencoder.sd_vae_config()')
    n_levels = len(cfg['block_out_channels'])
    return dict(in_channels=cfg['in_channels'], out_channels=cfg['out_channels'],
                latent_channels=cfg['latent_channels'], block_out_channels=tuple(cfg['block_out_channels']),
                layers_per_block=cfg['layers_per_block'], norm_num_groups=cfg['norm_num_groups'],
                down_block_types=('DownEncoderBlock2D',) * n_levels, up_block_types=('UpDecoderBlock2D',) * n_levels,
                scaling_factor=cfg['scale_factor'])


class FrozenAutoencoderKL(torch.nn.Module):
    """Frozen KL VAE: images in [-1, 1] <-> scaled latents, exactly as UniDiffuser's `FrozenAutoencoderKL`."""

    def __init__(self, vae_config, encode_chunk=None, decode_chunk=None):
        super().__init__()
        self.vae = AutoencoderKL(**_diffusers_kwargs(vae_config))
        self.scale_factor = float(vae_config['scale_factor'])
        # Images per encoder / decoder call (config.encoders; None: the whole batch). The activations of one 512²
        # image take about 0.63 GiB in the encoder and 0.75 GiB in the decoder (fp32), so a batch runs in chunks.
        self.encode_chunk, self.decode_chunk = encode_chunk, decode_chunk
        self.eval()
        self.requires_grad_(False)

    def encode_moments(self, x):
        """(B, 3, H, W) in [-1, 1] -> posterior moments (B, 2 * latent_channels, H / f, W / f): mean, logvar."""
        return chunked(lambda x: self.vae.quant_conv(self.vae.encoder(x)), self.encode_chunk, x)

    def sample(self, moments, generator=None):
        """Moments -> scaled latent `scale_factor * (mean + std * noise)`, log-variance clamped as in LDM."""
        mean, logvar = torch.chunk(moments, 2, dim=1)
        std = torch.exp(0.5 * torch.clamp(logvar, LOGVAR_MIN, LOGVAR_MAX))
        noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
        return self.scale_factor * (mean + std * noise)

    def encode(self, x, generator=None):
        """(B, 3, H, W) in [-1, 1] -> one sampled, scaled latent (B, latent_channels, H / f, W / f)."""
        return self.sample(self.encode_moments(x), generator)

    def decode(self, z):
        """Scaled latent (B, latent_channels, h, w) -> image (B, 3, f * h, f * w), nominally in [-1, 1]."""
        # Multiply by the reciprocal, as the official code does, so results agree bit for bit.
        return chunked(lambda z: self.vae.decoder(self.vae.post_quant_conv((1.0 / self.scale_factor) * z)),
                       self.decode_chunk, z)


# diffusers -> LDM key renames, applied in order (the inverse of diffusers' convert_ldm_vae_checkpoint).
_LDM_RENAMES = (
    (r'\.mid_block\.resnets\.(\d+)\.', lambda m: f'.mid.block_{int(m[1]) + 1}.'),
    (r'\.mid_block\.attentions\.0\.', '.mid.attn_1.'),
    (r'\.down_blocks\.(\d+)\.resnets\.', r'.down.\1.block.'),
    (r'\.down_blocks\.(\d+)\.downsamplers\.0\.', r'.down.\1.downsample.'),
    (r'\.attn_1\.group_norm\.', '.attn_1.norm.'),
    (r'\.attn_1\.to_([qkv])\.', r'.attn_1.\1.'),
    (r'\.attn_1\.to_out\.0\.', '.attn_1.proj_out.'),
    (r'\.conv_norm_out\.', '.norm_out.'),
    (r'\.conv_shortcut\.', '.nin_shortcut.'),
)
_UP_BLOCK = re.compile(r'^decoder\.up_blocks\.(\d+)\.(resnets|upsamplers\.0)\.')
_ATTN_LINEAR = re.compile(r'\.attn_1\.(q|k|v|proj_out)\.weight$')


def ldm_state_dict_from_diffusers(state_dict):
    """Rename a diffusers `AutoencoderKL` state dict to the LDM layout of the official autoencoder_kl.pth."""
    n_up = 1 + max(int(m[1]) for m in map(_UP_BLOCK.match, state_dict) if m)
    out = {}
    for key, value in state_dict.items():
        # LDM lists decoder levels from the highest resolution up; diffusers lists them in execution order.
        key = _UP_BLOCK.sub(lambda m: f'decoder.up.{n_up - 1 - int(m[1])}.'
                            f'{"block" if m[2] == "resnets" else "upsample"}.', key)
        for pattern, repl in _LDM_RENAMES:
            key = re.sub(pattern, repl, key)
        if _ATTN_LINEAR.search(key) and value.ndim == 2:
            value = value[:, :, None, None]  # LDM's attention projections are 1x1 convolutions
        out[key] = value
    return out


def load_autoencoder(path, vae_config, device='cpu', encode_chunk=None, decode_chunk=None):
    """Build the VAE from `vae_config` and load the LDM-layout checkpoint at `path` (or hf:// reference) strictly;
    it encodes and decodes in chunks of at most `encode_chunk` / `decode_chunk` images (None: the whole batch)."""
    path = hub.local_path(path, what='autoencoder weights')
    sd = read_state_dict(path, 'autoencoder weights', WHERE_TO_GET)
    model = FrozenAutoencoderKL(vae_config, encode_chunk, decode_chunk)
    expected = {k: v.shape for k, v in ldm_state_dict_from_diffusers(model.vae.state_dict()).items()}
    problems = describe_mismatch(expected, {k: v.shape for k, v in sd.items()})
    if problems:
        raise UserError(f'autoencoder checkpoint {path} does not match the configured VAE: {problems}. Use the '
                        f'official file with sd_vae_config(): {WHERE_TO_GET}.')
    model.vae.load_state_dict(convert_ldm_vae_checkpoint(sd, dict(model.vae.config)), strict=True)
    logger.info('loaded autoencoder from %s (scale factor %g)', path, model.scale_factor)
    return model.to(device)


def center_crop_resize(pil_image, resolution):
    """Official preprocessing: centre-crop to the largest square, then Lanczos-resize to resolution^2 (RGB)."""
    image = pil_image.convert('RGB')
    width, height = image.size
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    return image.crop((left, top, left + side, top + side)).resize((resolution, resolution), Image.LANCZOS)


def to_tensor_m11(pil_image):
    """PIL image -> float32 tensor (3, H, W) in [-1, 1], computed as pixel / 127.5 - 1 like the official code."""
    array = (np.asarray(pil_image.convert('RGB')) / 127.5 - 1.0).astype(np.float32)
    return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_pil(decoded):
    """Decoded image(s) in [-1, 1], (3, H, W) or (B, 3, H, W) -> PIL image or list of them (save_image rounding)."""
    pixels = (0.5 * (decoded.detach().float().cpu() + 1.0)).clamp(0.0, 1.0)
    pixels = (pixels * 255 + 0.5).clamp(0, 255).to(torch.uint8)
    if pixels.ndim == 3:
        return Image.fromarray(pixels.permute(1, 2, 0).numpy())
    return [Image.fromarray(p.permute(1, 2, 0).numpy()) for p in pixels]
