"""KL-f8 VAE: official key layout, exact LDM <-> diffusers round trip, official maths, loud checkpoint errors."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import save_file

from libs.autoencoder import (FrozenAutoencoderKL, center_crop_resize, ldm_state_dict_from_diffusers,
                              load_autoencoder, sd_vae_config, to_pil, to_tensor_m11)
from libs.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REFERENCE = os.path.join(ROOT, 'tests', 'fixtures', 'autoencoder_kl.keys.json')  # see tests/fixtures/README.md
# Four levels like SD (so the spatial factor is 8), few channels; a non-default scale proves it is read.
TINY = dict(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 8, 16, 16),
            layers_per_block=1, norm_num_groups=4, scale_factor=0.25)
GN_EPS = 1e-6  # LDM's GroupNorm epsilon


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
    """A tiny VAE with every parameter perturbed, and its weights saved in the LDM layout (.pth)."""
    torch.manual_seed(0)
    model = FrozenAutoencoderKL(TINY)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))  # distinct values everywhere, so a swapped key cannot go unseen
    path = str(tmp_path_factory.mktemp('vae') / 'autoencoder_kl.pth')
    torch.save(ldm_state_dict_from_diffusers(model.vae.state_dict()), path)
    return model, path


def _gn(x, sd, p):
    """GroupNorm with LDM weights."""
    return F.group_norm(x, TINY['norm_num_groups'], sd[p + '.weight'], sd[p + '.bias'], eps=GN_EPS)


def _conv(x, sd, p, **kw):
    """Convolution with LDM weights."""
    return F.conv2d(x, sd[p + '.weight'], sd[p + '.bias'], **kw)


def _resnet(x, sd, p):
    """LDM ResnetBlock without time embedding."""
    h = _conv(F.silu(_gn(x, sd, p + '.norm1')), sd, p + '.conv1', padding=1)
    h = _conv(F.silu(_gn(h, sd, p + '.norm2')), sd, p + '.conv2', padding=1)
    return (_conv(x, sd, p + '.nin_shortcut') if p + '.nin_shortcut.weight' in sd else x) + h


def _attn(x, sd, p):
    """LDM single-head spatial self-attention with 1x1-conv projections."""
    b, c, height, width = x.shape
    h = _gn(x, sd, p + '.norm')
    q, k, v = (_conv(h, sd, f'{p}.{name}').flatten(2) for name in 'qkv')  # (b, c, n)
    weights = torch.softmax(q.transpose(1, 2) @ k * c ** -0.5, dim=-1)  # (b, n_query, n_key)
    return x + _conv((v @ weights.transpose(1, 2)).view(b, c, height, width), sd, p + '.proj_out')


def _mid(h, sd, p):
    """LDM middle block."""
    return _resnet(_attn(_resnet(h, sd, p + '.block_1'), sd, p + '.attn_1'), sd, p + '.block_2')


def _ldm_moments(sd, x):
    """Independent LDM encoder + quant_conv on the official layout."""
    levels, blocks = len(TINY['block_out_channels']), TINY['layers_per_block']
    h = _conv(x, sd, 'encoder.conv_in', padding=1)
    for i in range(levels):
        for j in range(blocks):
            h = _resnet(h, sd, f'encoder.down.{i}.block.{j}')
        if i != levels - 1:
            h = _conv(F.pad(h, (0, 1, 0, 1)), sd, f'encoder.down.{i}.downsample.conv', stride=2)
    h = _mid(h, sd, 'encoder.mid')
    return _conv(_conv(F.silu(_gn(h, sd, 'encoder.norm_out')), sd, 'encoder.conv_out', padding=1), sd, 'quant_conv')


def _ldm_decode(sd, z):
    """Independent LDM post_quant_conv + decoder on the official layout."""
    levels, blocks = len(TINY['block_out_channels']), TINY['layers_per_block']
    h = _conv(_conv(z / TINY['scale_factor'], sd, 'post_quant_conv'), sd, 'decoder.conv_in', padding=1)
    h = _mid(h, sd, 'decoder.mid')
    for i in reversed(range(levels)):
        for j in range(blocks + 1):
            h = _resnet(h, sd, f'decoder.up.{i}.block.{j}')
        if i != 0:
            h = _conv(F.interpolate(h, scale_factor=2.0, mode='nearest'), sd, f'decoder.up.{i}.upsample.conv',
                      padding=1)
    return _conv(F.silu(_gn(h, sd, 'decoder.norm_out')), sd, 'decoder.conv_out', padding=1)


@pytest.mark.reference
def test_full_size_layout_equals_official_checkpoint():
    with torch.device('meta'):
        model = FrozenAutoencoderKL(sd_vae_config())
    layout = {k: list(v.shape) for k, v in ldm_state_dict_from_diffusers(model.vae.state_dict()).items()}
    with open(REFERENCE) as f:
        assert layout == json.load(f)
    assert model.scale_factor == 0.18215


def test_round_trip_is_bit_exact_and_decodes_identically(tiny, tmp_path):
    model, path = tiny
    ldm = torch.load(path, weights_only=True)
    save_file(ldm, str(tmp_path / 'autoencoder_kl.safetensors'))
    z = torch.randn(2, TINY['latent_channels'], 3, 2)
    for file in (path, str(tmp_path / 'autoencoder_kl.safetensors')):
        loaded = load_autoencoder(file, TINY)
        for key, value in model.vae.state_dict().items():
            assert torch.equal(loaded.vae.state_dict()[key], value), key
        assert torch.equal(loaded.decode(z), model.decode(z))
    # diffusers' own single-file loader reads our LDM file to the same weights (an independent check of the layout).
    model.vae.save_config(str(tmp_path))
    reference = AutoencoderKL.from_single_file(path, config=str(tmp_path))
    for key, value in model.vae.state_dict().items():
        assert torch.equal(reference.state_dict()[key], value), key


def test_matches_independent_ldm_implementation(tiny):
    model, path = tiny
    loaded, ldm = load_autoencoder(path, TINY), torch.load(path, weights_only=True)
    x = torch.rand(2, 3, 24, 16) * 2 - 1
    moments = loaded.encode_moments(x)
    assert moments.shape == (2, 2 * TINY['latent_channels'], 3, 2)
    torch.testing.assert_close(moments, _ldm_moments(ldm, x), rtol=1e-4, atol=1e-5)
    z = torch.randn(2, TINY['latent_channels'], 3, 2)
    decoded = loaded.decode(z)
    assert decoded.shape == (2, 3, 24, 16)
    torch.testing.assert_close(decoded, _ldm_decode(ldm, z), rtol=1e-4, atol=1e-5)
    assert not any(p.requires_grad for p in loaded.parameters()) and not loaded.training


def test_sample_clamps_logvar_and_scales():
    model = FrozenAutoencoderKL(TINY)
    mean = torch.randn(2, 4, 3, 2)
    logvar = torch.tensor([-100.0, -1.0, 3.0, 50.0]).view(1, 4, 1, 1).expand(2, 4, 3, 2)
    moments = torch.cat([mean, logvar], dim=1)
    z = model.sample(moments, generator=torch.Generator().manual_seed(7))
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    clamped = torch.tensor([-30.0, -1.0, 3.0, 20.0]).view(1, 4, 1, 1)
    torch.testing.assert_close(z, 0.25 * (mean + torch.exp(0.5 * clamped) * noise), rtol=1e-6, atol=0)
    # Without a generator the global RNG is used, as randn_like in the official code.
    torch.manual_seed(3)
    z_global = model.sample(moments)
    torch.manual_seed(3)
    assert torch.equal(z_global, model.sample(moments, generator=torch.Generator().manual_seed(3)))


def test_encode_samples_the_moments(tiny):
    model, _ = tiny
    x = torch.rand(1, 3, 16, 16) * 2 - 1
    z = model.encode(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(z, model.sample(model.encode_moments(x), generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize('corruption, named', [
    ('drop', 'decoder.mid.attn_1.q.weight'),
    ('reshape', 'encoder.conv_in.weight'),
    ('extra', 'loss.logvar'),
])
def test_corrupted_checkpoint_names_the_key(tiny, tmp_path, corruption, named):
    ldm = torch.load(tiny[1], weights_only=True)
    if corruption == 'drop':
        del ldm[named]
    elif corruption == 'reshape':
        ldm[named] = ldm[named][:, :, :2]
    else:
        ldm[named] = torch.zeros(())
    torch.save(ldm, str(tmp_path / 'bad.pth'))
    with pytest.raises(UserError, match=named.replace('.', r'\.')):
        load_autoencoder(str(tmp_path / 'bad.pth'), TINY)


def test_missing_file_says_where_to_get_it(tmp_path):
    with pytest.raises(UserError, match='thu-ml/unidiffuser-v1'):
        load_autoencoder(str(tmp_path / 'autoencoder_kl.pth'), TINY)


def test_image_helpers_match_official_preprocessing():
    rng = np.random.RandomState(0)
    pixels = rng.randint(0, 256, (20, 37, 3), dtype=np.uint8)  # (H, W): a wide image with an odd margin
    cropped = center_crop_resize(Image.fromarray(pixels), 16)
    # Official: crop rows/cols [(n - side) // 2, (n + side) // 2), then a Lanczos resize.
    square = pixels[:, (37 - 20) // 2:(37 + 20) // 2]
    expected = np.asarray(Image.fromarray(np.ascontiguousarray(square)).resize((16, 16), Image.LANCZOS))
    np.testing.assert_array_equal(np.asarray(cropped), expected)
    x = to_tensor_m11(cropped)
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32
    np.testing.assert_array_equal(x.permute(1, 2, 0).numpy(), (expected / 127.5 - 1.0).astype(np.float32))
    np.testing.assert_array_equal(np.asarray(to_pil(x)), expected)  # the uint8 round trip is lossless


def test_to_pil_clamps_and_rounds_like_save_image():
    levels = torch.tensor([-3.0, -1.0, 10.4, 10.6, 254.6, 255.0, 400.0])  # target 0..255 levels, some outside
    decoded = (2 * levels / 255 - 1).view(1, 1, 1, -1).expand(2, 3, 1, -1)
    images = to_pil(decoded)
    assert len(images) == 2
    assert np.asarray(images[1])[0, :, 0].tolist() == [0, 0, 10, 11, 255, 255, 255]
