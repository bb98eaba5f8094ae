"""U-ViT: official layouts load strictly, the official forward is reproduced, prefix attention is exact."""
import json
import os

import pytest
import torch
import torch.nn.functional as F

from libs.errors import UserError
from libs.uvit import NETS, UViT, build_nnet, load_nnet_weights

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'fixtures')  # see fixtures/README.md

FULL_V1 = dict(img_size=64, in_chans=4, patch_size=2, embed_dim=1536, depth=30, num_heads=24, mlp_ratio=4,
               qkv_bias=False, pos_drop_rate=0., drop_rate=0., attn_drop_rate=0., mlp_time_embed=False, text_dim=64,
               num_text_tokens=77, clip_img_dim=512, use_checkpoint=True)
TINY = dict(img_size=8, in_chans=4, patch_size=2, embed_dim=32, depth=4, num_heads=4, mlp_ratio=2, qkv_bias=False,
            mlp_time_embed=False, text_dim=8, num_text_tokens=5, clip_img_dim=16)


def key_shapes(name):
    with open(os.path.join(FIXTURES, f'{name}.keys.json')) as f:
        return {k: tuple(v) for k, v in json.load(f).items()}


@pytest.mark.reference
@pytest.mark.parametrize('net,ref', [('uvit_multi_post_ln_v1', 'uvit_v1'), ('uvit_multi_post_ln', 'uvit_v0')])
def test_official_layout_full_size_meta(net, ref):
    with torch.device('meta'):
        model = build_nnet(dict(FULL_V1, name=net))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == key_shapes(ref)
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(952.5e6, rel=2e-3)


@pytest.mark.reference
def test_empath_model_is_official_plus_condition_keys():
    with torch.device('meta'):
        model = build_nnet(dict(FULL_V1, name='uvit_empath'))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    official = key_shapes('uvit_v1')
    assert all(shapes[k] == s for k, s in official.items())
    new = sorted(set(shapes) - set(official))
    assert new[:3] == ['emo_token', 'emotion_head.0.bias', 'emotion_head.0.weight']
    assert shapes['pos_embed_cond'] == official['pos_embed'] and 'segment_embed' in new


def fixture():
    from safetensors import safe_open
    with safe_open(os.path.join(FIXTURES, 'uvit_v1_tiny.safetensors'), 'pt') as f:
        config = json.loads(f.metadata()['config'])
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    pick = lambda prefix: {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
    return config, pick('param.'), pick('input.'), pick('output.')


@pytest.mark.reference
def test_reproduces_official_v1_forward_fixture():
    config, params, inputs, outputs = fixture()
    model = build_nnet(dict(config, name='uvit_multi_post_ln_v1')).eval()
    model.load_state_dict(params, strict=True)
    with torch.no_grad():
        out = model(inputs['img'], inputs['clip_img'], inputs['text'], inputs['t_img'], inputs['t_text'],
                    inputs['data_type'])
    for got, name in zip(out, ('img', 'clip_img', 'text')):
        torch.testing.assert_close(got, outputs[name], atol=1e-5, rtol=1e-5)


def bilinear_resize(grid, out_hw):
    """(1, C, H, W) -> (1, C, h, w): bilinear with half-pixel centres and edge clamping, written out.

    This is what the official ``interpolate_pos_emb`` gets from ``F.interpolate(mode='bilinear')`` (align_corners
    left at its default, False): output pixel i samples the input at (i + 0.5) · in / out − 0.5, clamped at 0.
    """
    def taps(n_in, n_out):
        src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * n_in / n_out - 0.5).clamp(min=0)
        lo = src.floor().long().clamp(max=n_in - 1)
        return lo, (lo + 1).clamp(max=n_in - 1), (src - lo).float()
    (y0, y1, wy), (x0, x1, wx) = taps(grid.shape[2], out_hw[0]), taps(grid.shape[3], out_hw[1])
    rows = grid[:, :, y0] * (1 - wy)[:, None] + grid[:, :, y1] * wy[:, None]      # (1, C, h, W)
    return rows[:, :, :, x0] * (1 - wx) + rows[:, :, :, x1] * wx                  # (1, C, h, w)


def official_forward(params, cfg, img, clip_img, text, t_img, t_text, data_type=None, cond=None):
    """An independent restatement of the official post-LN U-ViT forward, written with plain tensor ops.

    With ``cond`` (a speaker-turn dict of the same five inputs) it is the EmpathDiffuser extension of docs/design.md §2,
    written out the same way: the speaker segment (positions pos_embed_cond + segment_embed, [EMO] appended) runs
    through the blocks on its own; each block's response attention adds cond_gate (a linear map per head) applied to a
    separate softmax attention over that block's speaker keys/values; the emotion head reads [EMO]'s final state.
    """
    D, H, p = cfg['embed_dim'], cfg['num_heads'], cfg['patch_size']
    lin = lambda x, name, bias=True: F.linear(x, params[name + '.weight'], params.get(name + '.bias'))
    ln = lambda x, name: F.layer_norm(x, (D,), params[name + '.weight'], params[name + '.bias'])
    attend = lambda q, k, v: ((q @ k.transpose(-1, -2)) * (D // H) ** -0.5).softmax(-1) @ v

    def temb(t):
        half = D // 2
        freqs = torch.exp(-torch.log(torch.tensor(10000.)) * torch.arange(half) / half)
        a = t[:, None].float() * freqs
        return torch.cat([a.cos(), a.sin()], -1)[:, None]

    def block(x, name, skip=None, cond_kv=None):
        if skip is not None:
            x = ln(lin(torch.cat([x, skip], -1), name + '.skip_linear'), name + '.norm1')
        B, L, _ = x.shape
        q, k, v = lin(x, name + '.attn.qkv').reshape(B, L, 3, H, D // H).permute(2, 0, 3, 1, 4)
        att = attend(q, k, v)
        if cond_kv is not None:
            att = att + attend(q, *cond_kv) @ params[name + '.attn.cond_gate'][None]    # (H, D/H, D/H) per head
        x = ln(x + lin(att.transpose(1, 2).reshape(B, L, D), name + '.attn.proj'), name + '.norm2')
        h = lin(F.gelu(lin(x, name + '.mlp.fc1')), name + '.mlp.fc2')
        return ln(x + h, name + '.norm3'), (k, v)

    def embed(img, clip_img, text, t_img, t_text, data_type, pos):
        patches = F.conv2d(img, params['patch_embed.proj.weight'], params['patch_embed.proj.bias'], stride=p)
        patches = patches.flatten(2).transpose(1, 2)
        toks = [temb(t_img), temb(t_text)]
        n_head = 2 + text.shape[1] + 1
        head, pos_patch = pos[:, :n_head], pos[:, n_head:]
        g0, (Hh, Ww) = cfg['img_size'] // p, img.shape[2:]
        if (Hh // p, Ww // p) != (g0, g0):
            grid = pos_patch.reshape(1, g0, g0, D).permute(0, 3, 1, 2)
            pos_patch = bilinear_resize(grid, (Hh // p, Ww // p)).permute(0, 2, 3, 1).reshape(1, -1, D)
        if data_type is not None:
            toks.append(params['token_embedding.weight'][data_type][:, None])
            head = torch.cat([head[:, :2], params['pos_embed_token'], head[:, 2:]], 1)
        toks += [lin(text, 'text_embed'), lin(clip_img, 'clip_img_embed'), patches]
        return torch.cat(toks, 1) + torch.cat([head, pos_patch], 1)

    def stack(x, cond_kvs=None):
        names = ([f'in_blocks.{i}' for i in range(cfg['depth'] // 2)] + ['mid_block']
                 + [f'out_blocks.{i}' for i in range(cfg['depth'] // 2)])
        skips, kvs = [], []
        for j, name in enumerate(names):
            skip = skips.pop() if name.startswith('out_') else None
            x, kv = block(x, name, skip, None if cond_kvs is None else cond_kvs[j])
            if name.startswith('in_'):
                skips.append(x)
            kvs.append(kv)
        return ln(x, 'norm'), kvs

    cond_kvs = emotion = None
    if cond is not None:
        c = embed(**cond, data_type=None, pos=params['pos_embed_cond']) + params['segment_embed']
        c = torch.cat([c, params['emo_token'].expand(c.shape[0], -1, -1)], 1)
        c, cond_kvs = stack(c)
        e = F.layer_norm(c[:, -1], (D,), params['emotion_head.0.weight'], params['emotion_head.0.bias'])
        emotion = lin(F.gelu(lin(e, 'emotion_head.1')), 'emotion_head.3')
    B, C, Hh, Ww = img.shape
    x, _ = stack(embed(img, clip_img, text, t_img, t_text, data_type, params['pos_embed']), cond_kvs)
    n_pre = 3 if data_type is not None else 2
    T = text.shape[1]
    img_out = lin(x[:, n_pre + T + 1:], 'decoder_pred')
    img_out = img_out.reshape(B, Hh // p, Ww // p, p, p, C).permute(0, 5, 1, 3, 2, 4).reshape(B, C, Hh, Ww)
    out = (img_out, lin(x[:, n_pre + T:n_pre + T + 1], 'clip_img_out'), lin(x[:, n_pre:n_pre + T], 'text_out'))
    return out if emotion is None else out + (emotion,)


def random_inputs(cfg, batch=3, latent=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    size = latent or cfg['img_size']
    h, w = (size, size) if isinstance(size, int) else size
    return dict(img=torch.randn(batch, cfg['in_chans'], h, w, generator=g),
                clip_img=torch.randn(batch, 1, cfg['clip_img_dim'], generator=g),
                text=torch.randn(batch, cfg['num_text_tokens'], cfg['text_dim'], generator=g),
                t_img=torch.tensor([0., 437.5, 1000.][:batch]), t_text=torch.tensor([1000., 12., 0.][:batch]))


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return model


@pytest.mark.parametrize('net', ['uvit_multi_post_ln', 'uvit_multi_post_ln_v1'])
@pytest.mark.parametrize('latent', [8, 4, 12, 10, (8, 12)])
def test_matches_independent_official_forward(net, latent, monkeypatch):
    """v0 and v1, at the default and at other latent sizes (positional-embedding interpolation, also to grids
    whose size is not a multiple of the default one and to a non-square grid)."""
    import libs.uvit
    model = randomize(build_nnet(dict(TINY, name=net))).eval()
    x = random_inputs(TINY, latent=latent)
    dt = torch.tensor([0, 1, 1]) if NETS[net]['use_data_type'] else None
    params = dict(model.state_dict())
    resized = []
    real = libs.uvit.interpolate_pos_embed
    monkeypatch.setattr(libs.uvit, 'interpolate_pos_embed', lambda *a: resized.append(a[1:]) or real(*a))
    with torch.no_grad():
        got = model(**x, data_type=dt)
        want = official_forward(params, TINY, **x, data_type=dt)
    grid = tuple(n // TINY['patch_size'] for n in x['img'].shape[2:])
    assert resized == ([] if latent == 8 else [((4, 4), grid)])  # the interpolation path is really taken
    for a, b in zip(got, want):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('new_hw', [(2, 2), (6, 6), (5, 5), (3, 7), (8, 4)])
def test_position_interpolation_is_the_official_bilinear(new_hw):
    """interpolate_pos_embed against the written-out bilinear rule; a corner-aligned resize differs."""
    from libs.uvit import interpolate_pos_embed
    pos = torch.randn(1, 4 * 4, 6, generator=torch.Generator().manual_seed(0))
    got = interpolate_pos_embed(pos, (4, 4), new_hw)
    want = bilinear_resize(pos.reshape(1, 4, 4, 6).permute(0, 3, 1, 2), new_hw).permute(0, 2, 3, 1).reshape(1, -1, 6)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    corners = F.interpolate(pos.reshape(1, 4, 4, 6).permute(0, 3, 1, 2), new_hw, mode='bilinear', align_corners=True)
    assert not torch.allclose(got, corners.permute(0, 2, 3, 1).reshape(1, -1, 6), atol=1e-3)


def speaker(cfg, batch=3, seed=1, latent=None):
    x = random_inputs(cfg, batch, latent=latent, seed=seed)
    x['t_img'] = torch.tensor([0., 1000., 0.][:batch])
    x['t_text'] = torch.tensor([0., 0., 1000.][:batch])
    return x


@pytest.mark.parametrize('latent', [8, 4, 12])
def test_gated_prefix_attention_matches_independent_reference_and_cache(latent):
    """The conditional forward equals the written-out gated reference (random, non-zero gates), cached or not, with
    the speaker's face at the response's latent size (its positions interpolated too)."""
    model = randomize(build_nnet(dict(TINY, name='uvit_empath'))).eval()
    x, cond, dt = random_inputs(TINY, latent=latent), speaker(TINY, latent=latent), torch.tensor([1, 1, 0])
    with torch.no_grad():
        uncached = model(**x, data_type=dt, cond=cond)
        cached = model(**x, data_type=dt, cond_cache=model.encode_condition(cond))
        want = official_forward(dict(model.state_dict()), TINY, **x, data_type=dt, cond=cond)
    assert len(uncached) == 4 and uncached[3].shape == (3, 32)
    assert model.in_blocks[0].attn.cond_gate.abs().min() > 0  # the gates really take part
    for a, b, c in zip(uncached, cached, want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
        torch.testing.assert_close(a, c, atol=1e-5, rtol=1e-5)


def test_condition_changes_response_and_emotion_depends_on_speaker_only():
    model = randomize(build_nnet(dict(TINY, name='uvit_empath'))).eval()
    x, dt = random_inputs(TINY), torch.tensor([1, 1, 1])
    with torch.no_grad():
        a = model(**x, data_type=dt, cond=speaker(TINY, seed=1))
        b = model(**x, data_type=dt, cond=speaker(TINY, seed=2))
        c = model(**random_inputs(TINY, seed=5), data_type=dt, cond=speaker(TINY, seed=1))
    assert not torch.allclose(a[0], b[0])
    torch.testing.assert_close(a[3], c[3])  # prefix attention: emotion ignores the noisy response


def test_response_forward_keeps_no_keys_and_values():
    """Keys/values are kept only when the speaker cache is built (the response forward does no extra work)."""
    model = randomize(build_nnet(dict(TINY, name='uvit_empath'))).eval()
    kept = []
    hook = lambda module, args, out: kept.append(out[1])
    handles = [b.attn.register_forward_hook(hook) for b in model.in_blocks]
    with torch.no_grad():
        cache = model.encode_condition(speaker(TINY))
        n_cache = len(kept)
        model(**random_inputs(TINY), data_type=torch.tensor([1, 1, 1]), cond_cache=cache)
    for h in handles:
        h.remove()
    assert n_cache == len(model.in_blocks) and all(kv is not None for kv in kept[:n_cache])
    assert len(cache.kv) == TINY['depth'] + 1
    assert kept[n_cache:] and all(kv is None for kv in kept[n_cache:])


def test_gradient_checkpointing_agrees():
    torch.manual_seed(0)
    grads = []
    for ckpt in (False, True):
        model = randomize(build_nnet(dict(TINY, name='uvit_empath', use_checkpoint=ckpt)))
        out = model(**random_inputs(TINY), data_type=torch.tensor([1, 0, 1]), cond=speaker(TINY))
        sum(o.square().mean() for o in out).backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_registry_lists_valid_names():
    with pytest.raises(UserError, match='uvit_empath'):
        build_nnet(dict(TINY, name='uvit_xl'))


def test_load_official_into_empath_model(tmp_path):
    official = randomize(build_nnet(dict(TINY, name='uvit_multi_post_ln_v1')))
    path = str(tmp_path / 'uvit_v1.pth')
    torch.save(official.state_dict(), path)
    model = build_nnet(dict(TINY, name='uvit_empath'))
    new = load_nnet_weights(model, path)
    assert sorted(new) == sorted(k for k in model.state_dict() if k not in official.state_dict())
    assert sorted(new) == sorted(model.condition_parameters())
    assert sum(k.endswith('.attn.cond_gate') for k in new) == TINY['depth'] + 1
    torch.testing.assert_close(model.pos_embed_cond, official.pos_embed)
    assert torch.count_nonzero(model.segment_embed) == 0 and not model.condition_is_trained()


@pytest.mark.parametrize('speaker_state', ['clean', 'absent', 'mixed'])
def test_fresh_empath_model_computes_the_official_outputs_for_any_speaker(tmp_path, speaker_state):
    """Zero gates: an EmpathDiffuser built from official weights is UniDiffuser, whatever the speaker turn is;
    after one optimizer step (the gates move) the speaker changes the response."""
    official = randomize(build_nnet(dict(TINY, name='uvit_multi_post_ln_v1'))).eval()
    torch.save(official.state_dict(), tmp_path / 'uvit_v1.pth')
    model = build_nnet(dict(TINY, name='uvit_empath'))
    load_nnet_weights(model, str(tmp_path / 'uvit_v1.pth'))
    model.eval()
    x, dt = random_inputs(TINY), torch.tensor([1, 0, 1])
    t = dict(clean=(0., 0.), absent=(1000., 1000.), mixed=(0., 1000.))[speaker_state]
    cond = dict(speaker(TINY), t_img=torch.full((3,), t[0]), t_text=torch.full((3,), t[1]))
    with torch.no_grad():
        want = official(**x, data_type=dt)
        got = model(**x, data_type=dt, cond=cond)
    for a, b in zip(got[:3], want):
        torch.testing.assert_close(a, b, atol=0, rtol=0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    sum(o.square().mean() for o in model(**x, data_type=dt, cond=cond)).backward()
    optimizer.step()
    model.eval()
    assert model.condition_is_trained()
    with torch.no_grad():
        a = model(**x, data_type=dt, cond=cond)
        b = model(**x, data_type=dt, cond=dict(cond, text=cond['text'] + 1, img=cond['img'] - 1))
    assert not torch.allclose(a[0], b[0])


def test_load_rejects_mismatched_checkpoints(tmp_path):
    model = build_nnet(dict(TINY, name='uvit_multi_post_ln_v1'))
    sd = model.state_dict()
    bad = dict(sd, extra=torch.zeros(1))
    bad['text_embed.weight'] = torch.zeros(3, 3)
    del bad['norm.bias']
    torch.save(bad, tmp_path / 'bad.pth')
    with pytest.raises(UserError) as e:
        load_nnet_weights(model, str(tmp_path / 'bad.pth'))
    msg = str(e.value)
    assert 'norm.bias' in msg and 'extra' in msg and 'text_embed.weight' in msg
    with pytest.raises(UserError, match='thu-ml/unidiffuser'):
        load_nnet_weights(model, str(tmp_path / 'missing.pth'))
    # A v0 checkpoint does not silently load into a v1 model.
    v0 = build_nnet(dict(TINY, name='uvit_multi_post_ln'))
    torch.save(v0.state_dict(), tmp_path / 'v0.pth')
    with pytest.raises(UserError, match='token_embedding'):
        load_nnet_weights(model, str(tmp_path / 'v0.pth'))
