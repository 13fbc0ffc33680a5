"""The Qwen2-VL vision tower: patch embedding, 2-D rotary ViT blocks, 2x2 patch merger (spec 6).

Matches transformers `Qwen2VisionTransformerPretrainedModel` (4.45-5.x). Input rows are pixel patches in
merge-window order, (N, C*T*P*P); output is one row per 2x2 window, (N/4, text hidden size). Attention is
restricted to each temporal patch of each image or video (the reference's cu_seqlens segments).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .layers import VisionMLP, apply_rope
from .rope import vision_cos_sin


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)  # rows: [q; k; v], each head-major
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[tuple[int, int]]):
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # each (N, heads, hd)
        # rotary in float32 whatever the weight dtype (spec 10.9), then back
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = apply_rope(q.float(), cos, sin).to(x.dtype)
        k = apply_rope(k.float(), cos, sin).to(x.dtype)
        out = torch.empty_like(q)
        start = 0
        for count, length in segments:  # `count` equal segments of `length` tokens each
            end = start + count * length
            # (count*length, heads, hd) -> (count, heads, length, hd)
            qs, ks, vs = (t[start:end].view(count, length, self.num_heads, self.head_dim).transpose(1, 2)
                          for t in (q, k, v))
            o = F.scaled_dot_product_attention(qs, ks, vs)
            out[start:end] = o.transpose(1, 2).reshape(end - start, self.num_heads, self.head_dim)
            start = end
        return self.proj(out.view(n, -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg.embed_dim, cfg.mlp_dim, cfg.hidden_act)

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.norm1(x), cos, sin, segments)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """LayerNorm, then each 2x2 window's 4 consecutive rows concatenated -> Linear -> exact GELU -> Linear."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.merge_dim = cfg.merge_dim
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(nn.Linear(cfg.merge_dim, cfg.merge_dim), nn.GELU(),
                                 nn.Linear(cfg.merge_dim, cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.merge_dim))


class PatchEmbed(nn.Module):
    """Conv3d with kernel == stride == (T, P, P), no bias: one output row per pixel_values row.

    The same product as a Linear over the flattened (c, t, y, x) row, but the convolution kernel sums in the
    reference's order, which keeps float32 logits bit-identical to transformers' sdpa path.
    """

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.embed_dim, self.kernel, stride=self.kernel, bias=False)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x = pixel_values.to(self.proj.weight.dtype).view(-1, self.proj.in_channels, *self.kernel)
        return self.proj(x).view(x.shape[0], -1)


class VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        """pixel_values (N, C*T*P*P), grid_thw (items, 3) -> features (N / merge^2, hidden_size)."""
        cfg = self.cfg
        grid_thw = grid_thw.cpu()
        expected = int(grid_thw.prod(-1).sum())
        if pixel_values.ndim != 2 or pixel_values.shape != (expected, cfg.patch_dim):
            raise ValueError(
                f"pixel values have shape {tuple(pixel_values.shape)}, but the grids {grid_thw.tolist()} need "
                f"({expected}, {cfg.patch_dim})"
            )
        x = self.patch_embed(pixel_values)
        cos, sin = vision_cos_sin(grid_thw, cfg.head_dim, cfg.rope_theta, cfg.spatial_merge_size, x.device)
        segments = [(t, h * w) for t, h, w in grid_thw.tolist()]
        for block in self.blocks:
            x = block(x, cos, sin, segments)
        return self.merger(x)
