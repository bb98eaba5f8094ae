"""A plain SDPA transformer of the U-ViT's shape: the reference ``scripts/benchmark.py --profile`` times it against.

It has the U-ViT's blocks, long skips and per-head gate over cached speaker keys, and nothing else (no embeddings),
so the time the U-ViT spends beyond it is what its own layers cost.
"""
import torch


class PlainBlock(torch.nn.Module):
    """The textbook post-LN SDPA block of the U-ViT's width, optionally with its long-skip fusion and, over cached
    keys, a second SDPA call through a per-head map (the U-ViT's gate, libs.uvit.Attention)."""

    def __init__(self, dim, heads, mlp_ratio, skip):
        super().__init__()
        nn = torch.nn
        self.heads, self.qkv, self.proj = heads, nn.Linear(dim, 3 * dim, bias=False), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, int(dim * mlp_ratio)), nn.GELU(), nn.Linear(int(dim * mlp_ratio), dim))
        self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.skip = nn.Sequential(nn.Linear(2 * dim, dim), nn.LayerNorm(dim)) if skip else None
        self.gate = nn.Parameter(0.02 * torch.randn(heads, dim // heads, dim // heads))

    def forward(self, x, skip=None, cond_kv=None):
        B, L, D = x.shape
        if self.skip is not None:
            x = self.skip(torch.cat([x, skip], -1))
        q, k, v = self.qkv(x).view(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        if cond_kv is not None:
            a = a + torch.nn.functional.scaled_dot_product_attention(q, *cond_kv) @ self.gate.to(a.dtype)
        x = self.norm2(x + self.proj(a.transpose(1, 2).reshape(B, L, D)))
        return self.norm3(x + self.mlp(x))


class PlainTransformer(torch.nn.Module):
    """A plain SDPA transformer with the U-ViT's blocks and long skips, fed ready-made tokens (no embedding)."""

    def __init__(self, nnet):
        super().__init__()
        d, h = nnet.embed_dim, nnet.mid_block.attn.num_heads
        r = nnet.mid_block.mlp.fc1.out_features / d
        n = len(nnet.in_blocks)
        self.blocks = torch.nn.ModuleList([PlainBlock(d, h, r, skip=i > n) for i in range(2 * n + 1)])
        self.norm, self.n = torch.nn.LayerNorm(d), n

    def forward(self, x, cond_kvs=None):
        skips = []
        for i, blk in enumerate(self.blocks):
            x = blk(x, skips.pop() if i > self.n else None, None if cond_kvs is None else cond_kvs[i])
            if i < self.n:
                skips.append(x)
        return self.norm(x)
