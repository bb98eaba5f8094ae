"""U-ViT joint noise predictor: UniDiffuser v0, v1 and the conditional EmpathDiffuser, one class.

Layout follows the official post-LN U-ViT (thu-ml/unidiffuser ``uvit_multi_post_ln{,_v1}``) key for key, so the
official checkpoints load strictly. EmpathDiffuser adds a clean *condition segment* (the speaker turn) that reuses
the embedding layers, an [EMO] token read by an emotion head, and gated prefix attention (docs/design.md §2):

    condition tokens and [EMO]:  attn(q_c, K_c, V_c)                              (the speaker path)
    response tokens:             attn(q, K_resp, V_resp) + g_l · attn(q, K_c, V_c)

where the gate g_l of each block is a zero-initialised linear map per head (D/H x D/H) on that head's speaker
attention: LLaMA-Adapter's zero-init attention and Flamingo's gated cross-attention, with ControlNet's zero-init
linear layer in place of their scalar (why: see ``Attention``). A model freshly built from an official checkpoint therefore computes exactly what UniDiffuser
computes, for any speaker turn, and the fine-tune starts from the pretrained network. The speaker path depends on
the speaker turn alone, so ``encode_condition`` runs it once and every sampling step reuses its keys/values (prefix
caching); both attention calls are unmasked, so SDPA can take its flash kernel.
"""
import json
import math
import os
from typing import List, NamedTuple, Optional, Tuple

import einops
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from libs.errors import UserError


# ----------------------------------------------------------------------------------------------------------------
# Embedders and helpers
# ----------------------------------------------------------------------------------------------------------------

def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim), cosines first as officially."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def unpatchify(x: torch.Tensor, in_chans: int, h: int, w: int) -> torch.Tensor:
    """(B, h*w, p*p*C) -> (B, C, h*p, w*p), the official patch ordering (p1 p2 C)."""
    p = int(round((x.shape[2] // in_chans) ** 0.5))
    return einops.rearrange(x, 'B (h w) (p1 p2 C) -> B C (h p1) (w p2)', h=h, w=w, p1=p, p2=p)


def interpolate_pos_embed(pos: torch.Tensor, old_hw: Tuple[int, int], new_hw: Tuple[int, int]) -> torch.Tensor:
    """Bilinearly resize patch positional embeddings (1, h*w, D) to a new grid, as the official code does."""
    pos = einops.rearrange(pos, 'B (H W) C -> B C H W', H=old_hw[0], W=old_hw[1])
    pos = F.interpolate(pos, new_hw, mode='bilinear')
    return einops.rearrange(pos, 'B C H W -> B (H W) C')


class PatchEmbed(nn.Module):
    """Non-overlapping patches of the latent image to tokens."""

    def __init__(self, patch_size: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x):  # (B, C, H, W) -> (B, H*W/p^2, D)
        if x.shape[2] % self.patch_size or x.shape[3] % self.patch_size:
            raise ValueError(f'latent size {tuple(x.shape[2:])} is not divisible by the patch size {self.patch_size}')
        return self.proj(x).flatten(2).transpose(1, 2)


class Mlp(nn.Module):
    """Two-layer GELU MLP (the timm Mlp key layout: fc1, fc2)."""

    def __init__(self, dim: int, hidden: int, drop: float = 0.):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x):
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


# ----------------------------------------------------------------------------------------------------------------
# Blocks
# ----------------------------------------------------------------------------------------------------------------

KV = Tuple[torch.Tensor, torch.Tensor]


class Attention(nn.Module):
    """Multi-head self-attention through SDPA in the autocast dtype, optionally gated over cached speaker keys.

    The official code upcasts q/k/v to fp32 to dodge fp16 overflow; we train and sample in bf16 (fp32 range), where
    that upcast would only rule out the flash kernel. ``gated`` adds ``cond_gate`` (H, D/H, D/H): per head, a
    zero-initialised linear map applied to the response tokens' attention over the condition segment.

    Why a map and not one scalar per head: at zero, a scalar gate's gradient is the projection of the loss gradient
    onto the pretrained value direction of the speaker attention, and the queries, keys and values of that
    attention get no gradient until the gate moves; if the pretrained direction is not the useful one, the gate
    hovers around zero. A zero-initialised map gets a gradient in every entry and can pick any direction of the
    head's value space from the first step. Measured on the demo (800 fine-tuning steps): scalar gates stayed below
    0.06 in magnitude, even at a 10x higher learning rate, and the response followed the speaker no better than a
    shuffled speaker (0.28 vs 0.26); the per-head map: 0.39 vs 0.17. It costs D^2/H parameters per block (3M for
    UniDiffuser-v1) and one small matmul.
    """

    def __init__(self, dim, num_heads, qkv_bias=False, qk_scale=None, attn_drop=0., proj_drop=0., gated=False):
        super().__init__()
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        head_dim = dim // num_heads
        self.cond_gate = nn.Parameter(torch.zeros(num_heads, head_dim, head_dim)) if gated else None

    def _sdpa(self, q, k, v):
        return F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.,
                                              scale=self.scale)

    def forward(self, x: torch.Tensor, cond_kv: Optional[KV] = None,
                keep_kv: bool = False) -> Tuple[torch.Tensor, Optional[KV]]:
        # x: (B, L, D); cond_kv: (B, H, Lc, D/H) each -> out (B, L, D), own (k, v) if keep_kv else None
        q, k, v = einops.rearrange(self.qkv(x), 'B L (K H D) -> K B H L D', K=3, H=self.num_heads).unbind(0)
        out = self._sdpa(q, k, v)                                                   # (B, H, L, D/H)
        if cond_kv is not None:
            speaker = self._sdpa(q, *cond_kv)                                       # (B, H, L, D/H)
            out = out + torch.einsum('bhld,hde->bhle', speaker, self.cond_gate.to(out.dtype))
        out = self.proj_drop(self.proj(einops.rearrange(out, 'B H L D -> B L (H D)')))
        return out, ((k, v) if keep_kv else None)


class Block(nn.Module):
    """Post-LN transformer block; blocks of the second half fuse a long skip connection first."""

    def __init__(self, dim, num_heads, mlp_ratio=4., qkv_bias=False, qk_scale=None, drop=0., attn_drop=0.,
                 skip=False, gated=False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim) if skip else None
        self.norm2 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias, qk_scale, attn_drop, drop, gated)
        self.norm3 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop)
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x, skip=None, cond_kv=None, keep_kv=False):  # (B, L, D) -> (B, L, D), own (k, v) or None
        if self.skip_linear is not None:
            x = self.norm1(self.skip_linear(torch.cat([x, skip], dim=-1)))
        attn, kv = self.attn(x, cond_kv, keep_kv)
        x = self.norm2(x + attn)
        return self.norm3(x + self.mlp(x)), kv


class ConditionCache(NamedTuple):
    """The speaker path of a prefix-attention model: keys/values of every block and the emotion logits."""
    kv: List[KV]                      # one (k, v) per block, in execution order, each (B, H, Lc, D/H)
    emotion_logits: torch.Tensor      # (B, num_emotions)


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------

class UViT(nn.Module):
    """Joint noise predictor over (VAE latent, CLIP image embedding, reduced CLIP text) — see the module docstring.

    The first keyword arguments are the official ``nnet`` config keys. ``use_data_type`` adds v1's data-type token;
    ``condition`` adds the EmpathDiffuser speaker segment, [EMO] token and emotion head.
    """

    def __init__(self, img_size, in_chans, patch_size, embed_dim=768, depth=12, num_heads=12, mlp_ratio=4.,
                 qkv_bias=False, qk_scale=None, pos_drop_rate=0., drop_rate=0., attn_drop_rate=0.,
                 mlp_time_embed=False, use_checkpoint=False, text_dim=None, num_text_tokens=None, clip_img_dim=None,
                 use_data_type=True, num_data_types=2, condition=False, num_emotions=32, emotion_hidden=None):
        super().__init__()
        self.in_chans, self.patch_size, self.embed_dim = in_chans, patch_size, embed_dim
        self.img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
        self.grid = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid[0] * self.grid[1]
        self.num_text_tokens, self.use_checkpoint = num_text_tokens, use_checkpoint
        self.use_data_type, self.condition = use_data_type, condition

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.time_img_embed = self._time_mlp(embed_dim) if mlp_time_embed else nn.Identity()
        self.time_text_embed = self._time_mlp(embed_dim) if mlp_time_embed else nn.Identity()
        self.text_embed, self.text_out = nn.Linear(text_dim, embed_dim), nn.Linear(embed_dim, text_dim)
        self.clip_img_embed, self.clip_img_out = nn.Linear(clip_img_dim, embed_dim), nn.Linear(embed_dim, clip_img_dim)
        # [t_img, t_text, text..., clip_img, patches...]; v1 inserts its data-type token after the two timesteps.
        self.num_tokens = 1 + 1 + num_text_tokens + 1 + self.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_tokens, embed_dim))
        self.pos_drop = nn.Dropout(pos_drop_rate)
        block = dict(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale,
                     drop=drop_rate, attn_drop=attn_drop_rate, gated=condition)
        self.in_blocks = nn.ModuleList([Block(**block) for _ in range(depth // 2)])
        self.mid_block = Block(**block)
        self.out_blocks = nn.ModuleList([Block(**block, skip=True) for _ in range(depth // 2)])
        self.norm = nn.LayerNorm(embed_dim)
        self.decoder_pred = nn.Linear(embed_dim, patch_size ** 2 * in_chans)
        nn.init.trunc_normal_(self.pos_embed, std=.02)
        self.apply(self._init_weights)
        if use_data_type:  # created after apply(), as officially: default nn.Embedding init, zero position
            self.token_embedding = nn.Embedding(num_data_types, embed_dim)
            self.pos_embed_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if condition:
            # The speaker segment has the v0 token layout, so its positions start as a copy of pos_embed (see
            # init_condition_from_pretrained) and the segment embedding at zero: the speaker path starts as the
            # pretrained network run on the speaker turn. The gates (cond_gate, zero) start the response from the
            # pretrained behaviour.
            self.pos_embed_cond = nn.Parameter(self.pos_embed.detach().clone())
            self.segment_embed = nn.Parameter(torch.zeros(1, 1, embed_dim))
            self.emo_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
            nn.init.trunc_normal_(self.emo_token, std=.02)
            hidden = emotion_hidden or embed_dim
            self.emotion_head = nn.Sequential(nn.LayerNorm(embed_dim), nn.Linear(embed_dim, hidden), nn.GELU(),
                                              nn.Linear(hidden, num_emotions))
            self.emotion_head.apply(self._init_weights)

    @staticmethod
    def _time_mlp(dim):
        return nn.Sequential(nn.Linear(dim, 4 * dim), nn.SiLU(), nn.Linear(4 * dim, dim))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def no_weight_decay(self):
        """Parameter names excluded from weight decay (embeddings and gates: decay would pull them to zero)."""
        names = {'pos_embed', 'pos_embed_token', 'pos_embed_cond', 'segment_embed', 'emo_token'}
        return {n for n, _ in self.named_parameters() if n in names or n.endswith('.cond_gate')}

    def condition_parameters(self):
        """Names of the parameters that UniDiffuser does not have (the speaker segment, gates, [EMO], head)."""
        return [n for n, _ in self.named_parameters() if is_condition_key(n)]

    def condition_is_trained(self) -> bool:
        """Whether the speaker can influence the response: some gate moved away from its zero initialisation."""
        gates = [b.attn.cond_gate for b, _ in self._blocks() if b.attn.cond_gate is not None]
        return bool(gates) and any(bool(g.detach().ne(0).any()) for g in gates)

    # -- token assembly ------------------------------------------------------------------------------------------

    def _positions(self, pos_embed, grid_hw, num_text, with_data_type):
        """Split positions at the patches, interpolating them for a non-default latent size; insert v1's token."""
        head, patches = pos_embed[:, :2 + num_text + 1], pos_embed[:, 2 + num_text + 1:]
        if tuple(grid_hw) != self.grid:
            patches = interpolate_pos_embed(patches, self.grid, grid_hw)
        parts = [head[:, :2], self.pos_embed_token, head[:, 2:]] if with_data_type else [head]
        return torch.cat(parts + [patches], dim=1)

    def _embed(self, img, clip_img, text, t_img, t_text, data_type=None, pos_embed=None):
        """Modalities -> token sequence (B, L, D): [t_img, t_text, (data_type), text, clip_img, patches]."""
        grid_hw = (img.shape[2] // self.patch_size, img.shape[3] // self.patch_size)
        tokens = [self.time_img_embed(timestep_embedding(t_img, self.embed_dim))[:, None],
                  self.time_text_embed(timestep_embedding(t_text, self.embed_dim))[:, None]]
        if data_type is not None:
            tokens.append(self.token_embedding(data_type)[:, None])
        tokens += [self.text_embed(text), self.clip_img_embed(clip_img), self.patch_embed(img)]
        x = torch.cat(tokens, dim=1)
        pos = self._positions(self.pos_embed if pos_embed is None else pos_embed, grid_hw, text.shape[1],
                              data_type is not None)
        return self.pos_drop(x + pos)

    def _embed_condition(self, cond):
        """Speaker turn dict (img, clip_img, text, t_img, t_text) -> (B, Lc + 1, D), [EMO] last."""
        c = self._embed(cond['img'], cond['clip_img'], cond['text'], cond['t_img'], cond['t_text'],
                        pos_embed=self.pos_embed_cond) + self.segment_embed
        return torch.cat([c, self.emo_token.expand(c.shape[0], -1, -1).to(c.dtype)], dim=1)

    def _blocks(self):
        """Blocks in execution order, each with whether it consumes a skip."""
        return [(b, False) for b in self.in_blocks] + [(self.mid_block, False)] + [(b, True) for b in self.out_blocks]

    def _run(self, x, cond_kvs=None, keep_kv=False):
        """Run the U-shaped stack; returns the final hidden states and, if ``keep_kv``, every block's own (k, v)."""
        skips, kvs = [], []
        n_in = len(self.in_blocks)
        checkpointing = self.use_checkpoint and self.training and torch.is_grad_enabled()
        # A block's (k, v) are views of its fused qkv output. Where nothing else keeps that output (no autograd
        # graph while sampling, or a checkpointed block) they would pin the queries too: keep K and V alone. Under
        # a plain autograd graph the attention keeps the fused output for its backward, so a copy would only add.
        compact = keep_kv and (checkpointing or not torch.is_grad_enabled())
        for i, (blk, takes_skip) in enumerate(self._blocks()):
            skip = skips.pop() if takes_skip else None
            cond_kv = None if cond_kvs is None else cond_kvs[i]
            if checkpointing:
                x, kv = torch.utils.checkpoint.checkpoint(blk, x, skip, cond_kv, keep_kv, use_reentrant=False)
            else:
                x, kv = blk(x, skip, cond_kv, keep_kv)
            if i < n_in:
                skips.append(x)
            if keep_kv:
                kvs.append(tuple(t.clone(memory_format=torch.contiguous_format) for t in kv) if compact else kv)
        return self.norm(x), kvs

    # -- public API ----------------------------------------------------------------------------------------------

    def encode_condition(self, cond: dict) -> ConditionCache:
        """The speaker path: computed once per sample, its keys/values reused at every sampling step."""
        if not self.condition:
            raise ValueError('encode_condition needs a conditional model (nnet.name=uvit_empath)')
        c, kvs = self._run(self._embed_condition(cond), keep_kv=True)
        return ConditionCache(kvs, self.emotion_head(c[:, -1]))

    def forward(self, img, clip_img, text, t_img, t_text, data_type=None, cond=None, cond_cache=None):
        """Predict the noise of every response modality.

        img (B, C, H, W), clip_img (B, 1, Dc), text (B, T, Dt), t_img / t_text (B,) in [0, N], data_type (B,) long
        (v1 only). ``cond`` is the speaker turn as a dict of the same five inputs (t = 0 clean, t = N absent);
        ``cond_cache`` is its precomputed ``encode_condition``. Returns (ε_img, ε_clip_img, ε_text), plus the
        emotion logits (B, num_emotions) as a fourth element when a condition is given.
        """
        if self.use_data_type != (data_type is not None):
            raise ValueError(f'data_type must be {"given" if self.use_data_type else "None"} for this model')
        if (cond is not None or cond_cache is not None) and not self.condition:
            raise ValueError('this U-ViT has no condition segment (nnet.condition=False)')
        B, _, H, W = img.shape
        if cond is not None:
            cond_cache = self.encode_condition(cond)
        x = self._embed(img, clip_img, text, t_img, t_text, data_type)          # (B, L, D)
        x, _ = self._run(x, None if cond_cache is None else cond_cache.kv)       # (B, L, D)
        n_pre = 3 if data_type is not None else 2
        n_img = x.shape[1] - n_pre - text.shape[1] - 1
        _, text_out, clip_out, img_out = x.split((n_pre, text.shape[1], 1, n_img), dim=1)
        img_out = unpatchify(self.decoder_pred(img_out), self.in_chans, H // self.patch_size, W // self.patch_size)
        out = (img_out, self.clip_img_out(clip_out), self.text_out(text_out))
        return out if cond_cache is None else out + (cond_cache.emotion_logits,)


# ----------------------------------------------------------------------------------------------------------------
# Presets and registry
# ----------------------------------------------------------------------------------------------------------------

NETS = {
    'uvit_multi_post_ln': dict(use_data_type=False),                   # UniDiffuser-v0
    'uvit_multi_post_ln_v1': dict(use_data_type=True),                 # UniDiffuser-v1
    'uvit_empath': dict(use_data_type=True, condition=True),           # EmpathDiffuser
}


def build_nnet(nnet_config, where: str = 'config.nnet') -> UViT:
    """Build a U-ViT from an ``nnet`` config (official keys plus ``name``); unknown names list the valid ones.

    ``where`` names the config for messages (e.g. the export whose metadata it comes from).
    """
    kwargs = dict(nnet_config)
    name = kwargs.pop('name', None)
    kwargs.pop('compile', None)  # how the network runs, not what it is: libs.pipeline.compile_nnet applies it
    if name not in NETS:
        raise UserError(f'{where}: unknown nnet.name {name!r}; valid names: {", ".join(sorted(NETS))}')
    try:
        return UViT(**{**NETS[name], **kwargs})
    except TypeError as err:  # a key missing from, or unknown to, the nnet config
        raise UserError(f'{where} does not describe a U-ViT: {err}') from err


def init_condition_from_pretrained(model: UViT) -> None:
    """Start the speaker positions as a copy of the (just loaded) pretrained response positions."""
    with torch.no_grad():
        model.pos_embed_cond.copy_(model.pos_embed)


CONDITION_KEYS = ('pos_embed_cond', 'segment_embed', 'emo_token', 'emotion_head.')  # prefixes of new keys
GATE_KEY = '.attn.cond_gate'


def is_condition_key(name: str) -> bool:
    """Whether a state-dict key belongs to the EmpathDiffuser additions (absent from official checkpoints)."""
    return name.startswith(CONDITION_KEYS) or name.endswith(GATE_KEY)


def checkpoint_config(path: str) -> Optional[dict]:
    """The resolved config a train_empath.py export carries in its metadata (None for other files)."""
    from libs.io import weights_format
    if not os.path.isfile(path) or weights_format(path) != 'safetensors':
        return None
    from safetensors import safe_open
    try:
        with safe_open(path, 'pt') as f:
            config = json.loads((f.metadata() or {})['config'])
    except Exception:  # no config in its metadata, or a broken file (read_state_dict then says what is wrong)
        return None
    return config if isinstance(config, dict) and isinstance(config.get('nnet'), dict) else None


def load_nnet_weights(model: UViT, path: str, log=None) -> List[str]:
    """Load official or fine-tuned weights strictly; returns the keys that were newly initialised.

    An official UniDiffuser checkpoint lacks exactly the condition-segment parameters of an EmpathDiffuser model:
    those (and only those) keep their initialisation, the speaker positions start as a copy of the pretrained
    ones, and the list is logged. Anything else missing, unexpected or of another shape is an error.
    """
    from libs.hub import NNET_EXPECTED
    from libs.io import describe_mismatch, read_state_dict
    sd = read_state_dict(path, 'U-ViT checkpoint', NNET_EXPECTED)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    new = [k for k in expected if k not in sd and is_condition_key(k)]
    if new and any(k in sd for k in expected if is_condition_key(k)):
        new = []  # a fine-tuned checkpoint must carry the whole condition segment
    problems = describe_mismatch({k: s for k, s in expected.items() if k not in new},
                                 {k: v.shape for k, v in sd.items()})
    if problems and any('.lora_' in k for k in sd):
        from libs.lora import checkpoint_hint
        raise UserError(checkpoint_hint(path))
    if problems and not any(k in expected for k in sd):  # another model's weights (a VAE, CLIP...): no key list
        raise UserError(f'{path} is not a U-ViT checkpoint: none of its {len(sd)} tensors (e.g. '
                        f'{", ".join(list(sd)[:3])}) is a U-ViT parameter. {NNET_EXPECTED}')
    if problems:
        unexpected = [k for k in sd if k not in expected]
        hint = 'Check config.nnet (name, embed_dim, depth, text_dim, ...) against the checkpoint.'
        if unexpected and all(map(is_condition_key, unexpected)) and not model.condition:
            hint = ('It is an EmpathDiffuser network (it has a speaker segment): load it with nnet.name=uvit_empath, '
                    'e.g. its training config, or configs/sample_tiny_empath.py for the tiny one.')
        raise UserError(f'U-ViT checkpoint {path} does not fit the configured model ({problems}). {hint}')
    model.load_state_dict(sd, strict=False)
    if new:
        init_condition_from_pretrained(model)
        if log is not None:
            log.info('initialised %d new parameters not in %s: %s', len(new), path, summarize_keys(new))
    return new


def summarize_keys(keys: List[str]) -> str:
    """Keys for a log line, the per-block gates folded into one entry."""
    gates = [k for k in keys if k.endswith(GATE_KEY)]
    rest = [k for k in keys if not k.endswith(GATE_KEY)]
    return ', '.join(rest + ([f'*{GATE_KEY} ({len(gates)} blocks)'] if gates else []))

