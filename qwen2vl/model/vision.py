"""The Qwen2-VL vision tower: patch embedding, 2-D rotary ViT blocks, 2x2 patch merger.

Matches transformers `Qwen2VisionTransformerPretrainedModel` (4.45-5.x). Input rows are pixel patches in
merge-window order, (N, C*T*P*P); output is one row per 2x2 window, (N/4, text hidden size). Attention is
restricted to each temporal patch of each image or video (the reference's cu_seqlens segments).
"""

from __future__ import annotations

from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..config import VisionConfig
from .layers import VisionMLP, apply_rope
from .rope import vision_cos_sin


class VisionAttention(nn.Module):
    # a backend's attention over one segment, with kernels.attention_bf16's signature (q, k, v, out) -> done, and
    # rotary, with kernels.rope_bf16's (qkv, cos, sin) -> (q, k) or None: a backend may set them on an instance
    # (qwen2vl.cpu, under bf16 products); where they decline, PyTorch runs
    fused_attention = None
    fused_rope = None

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.head_dim = cfg.head_dim
        self.qkv = nn.Linear(cfg.embed_dim, 3 * cfg.embed_dim)  # rows: [q; k; v], each head-major
        self.proj = nn.Linear(cfg.embed_dim, cfg.embed_dim)

    def qkv_rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor):
        """Rows of x -> q, k, v, each (rows, heads, hd), with q and k rotated."""
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3, self.num_heads, self.head_dim)
        if self.fused_rope is not None and qkv.dtype == x.dtype and (qk := self.fused_rope(qkv, cos, sin)):
            return (*qk, qkv[:, 2])
        q, k, v = qkv.unbind(1)  # each (N, heads, hd)
        # rotary in float32 whatever the weight dtype, then back (`apply_rotary_pos_emb_vision` upcasts q, k)
        cos, sin = cos[:, None, :], sin[:, None, :]
        q = apply_rope(q.float(), cos, sin).to(x.dtype)
        k = apply_rope(k.float(), cos, sin).to(x.dtype)
        return q, k, v

    def attend(
        self, q, k, v, out, start: int, count: int, length: int, segs=slice(None), heads=slice(None), rows=slice(None)
    ) -> None:
        """Attention within `count` segments of `length` rows from row `start`, written into out (N, heads, hd);
        only segments `segs`, heads `heads` and query rows `rows` of each segment (every query row attends over its
        whole segment, so any split gives the same rows)."""
        end = start + count * length
        if self.fused_attention is not None and all(
            self.fused_attention(q[s : s + length][rows, heads], k[s : s + length, heads], v[s : s + length, heads],
                       out[s : s + length][rows, heads])
            for s in range(start, end, length)[segs]
        ):  # fmt: skip
            return  # (it declines for every segment or for none: they share shapes and dtypes)
        # (count*length, heads, hd) -> (count, heads, length, hd)
        qs, ks, vs = (
            t[start:end].view(count, length, self.num_heads, self.head_dim).transpose(1, 2)[segs, heads]
            for t in (q, k, v)
        )
        o = F.scaled_dot_product_attention(qs[:, :, rows], ks, vs)
        out[start:end].view(count, length, self.num_heads, self.head_dim)[segs, rows, heads] = o.transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, segments: list[tuple[int, int]]):
        q, k, v = self.qkv_rope(x, cos, sin)
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        start = 0
        for count, length in segments:  # `count` equal segments of `length` tokens each
            self.attend(q, k, v, out, start, count, length)
            start += count * length
        return self.proj(out.view(x.shape[0], -1))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = VisionMLP(cfg.embed_dim, cfg.mlp_dim, cfg.hidden_act)
        # dtype of the attention and MLP activations; None: the residual stream's. A transform may set bf16 while
        # the residual stream and the norms stay float32 (qwen2vl.cpu, where the CPU multiplies bf16 natively).
        self.inner_dtype: torch.dtype | None = None

    def inner(self, h: torch.Tensor) -> torch.Tensor:
        """A normalised residual row block, in the dtype the attention and MLP compute in."""
        return h if self.inner_dtype is None else h.to(self.inner_dtype)

    def forward(self, x, cos, sin, segments):
        x = x + self.attn(self.inner(self.norm1(x)), cos, sin, segments)
        return x + self.mlp(self.inner(self.norm2(x)))


class PatchMerger(nn.Module):
    """LayerNorm, then each 2x2 window's 4 consecutive rows concatenated -> Linear -> exact GELU -> Linear."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.merge_dim = cfg.merge_dim
        self.ln_q = nn.LayerNorm(cfg.embed_dim, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.merge_dim, cfg.merge_dim), nn.GELU(), nn.Linear(cfg.merge_dim, cfg.hidden_size)
        )

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
        grid_thw = self._check(pixel_values, grid_thw)
        x = self.patch_embed(pixel_values)
        cos, sin = vision_cos_sin(grid_thw, cfg.head_dim, cfg.rope_theta, cfg.spatial_merge_size, x.device)
        segments = [(t, h * w) for t, h, w in grid_thw.tolist()]
        for block in self.blocks:
            x = block(x, cos, sin, segments)
        return self.merger(x)

    def encode_pieces(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor, piece_flops: float):
        """`forward` as a generator that pauses after each piece of about `piece_flops` of work; returns the features.

        The engine advances it a piece at a time between decode steps, so one huge image cannot hold the other
        requests back; the generator's frame is the whole intermediate state (the module keeps none), and dropping
        it stops the work. The split depends on the shapes and `piece_flops` only, never on timing, and the result
        is bit-identical to `forward`:
        - whole blocks while a block fits in a piece (a small image is one piece: exactly forward's calls);
        - a larger block in row ranges that start at multiples of ROW_ALIGN for the products and norms, and in
          (segments, heads, query rows) ranges for attention, each query row still attending over its segment;
        - but each activation (quick_gelu, the merger's GELU) over the whole tensor in one call, as in forward:
          torch splits an elementwise op between threads by element count and computes the tail of each thread's
          share without SIMD, with other rounding (sigmoid differs by an ulp), so row ranges would change bits.
          That call is the largest unit: ~0.9 s for a 16k-token image on the 2B shapes on 2 CPU cores, most of it
          page faults of the new 1.3 GB tensor (0.25 s for a 2,025-token image).
        """
        cfg = self.cfg
        grid_thw = self._check(pixel_values, grid_thw)
        n, e, md = pixel_values.shape[0], cfg.embed_dim, cfg.merge_dim
        segments = [(t, h * w) for t, h, w in grid_thw.tolist()]
        attention = sum(count * cfg.num_heads * 4 * length * length * cfg.head_dim for count, length in segments)
        block_flops = n * (8 * e * e + 4 * e * cfg.mlp_dim) + attention  # qkv, proj, fc1, fc2; QK^T and PV
        pace = _Pace(piece_flops)

        x = torch.cat((yield from pace.rows(n, 2 * cfg.patch_dim * e, lambda r: self.patch_embed(pixel_values[r]))))
        cos, sin = vision_cos_sin(grid_thw, cfg.head_dim, cfg.rope_theta, cfg.spatial_merge_size, x.device)
        if block_flops > piece_flops:  # q, k, v, attention output, MLP hidden: reused block after block
            first = self.blocks[0]
            assert isinstance(first, VisionBlock)
            inner = first.inner_dtype or x.dtype
            # the block's own head count and MLP width (a tensor-parallel rank holds a share of them)
            buffers = [x.new_empty(n, first.attn.num_heads, cfg.head_dim, dtype=inner) for _ in range(4)]
            buffers.append(x.new_empty(n, first.mlp.fc1.weight.shape[0], dtype=inner))
        for block in self.blocks:
            if block_flops <= piece_flops:
                if pace.due(block_flops):
                    yield
                x = block(x, cos, sin, segments)
            else:
                yield from _block_in_ranges(cast(VisionBlock, block), x, cos, sin, segments, pace, *buffers)

        merger, merge = self.merger, cfg.spatial_merge_size**2
        hidden = x.new_empty(n // merge, md)

        def merge_fc1(r):
            hidden[r] = merger.mlp[0](merger.ln_q(x[r.start * merge : r.stop * merge]).view(-1, md))

        yield from pace.rows(n // merge, 2 * md * md, merge_fc1)
        if pace.due(hidden.numel() * ELEMENTWISE_FLOPS):
            yield
        act = merger.mlp[1](hidden)  # the whole tensor in one call, as in forward (see above)
        parts = yield from pace.rows(n // merge, 2 * md * cfg.hidden_size, lambda r: merger.mlp[2](act[r]))
        return torch.cat(parts)

    def _check(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        grid_thw = grid_thw.cpu()
        expected = int(grid_thw.prod(-1).sum())
        if pixel_values.ndim != 2 or pixel_values.shape != (expected, cfg.patch_dim):
            raise ValueError(
                f"pixel values have shape {tuple(pixel_values.shape)}, but the grids {grid_thw.tolist()} need "
                f"({expected}, {cfg.patch_dim})"
            )
        return grid_thw


ROW_ALIGN = 256
"""Row ranges of a split step start at multiples of this and none is shorter (a short tail joins the range before
it). Float32 matrix products (MKL) then give every row the bits it gets in the whole product, at any thread count
(measured, and checked by tests/test_engine.py with torch.equal over whole encodes); and no range falls to the CPU
kernels' few-row path (`kernels.MAX_ROWS`), which rounds differently."""
ELEMENTWISE_FLOPS = 100  # what one element of an activation costs, counted like matrix-product flops (CPU)


class _Pace:
    """Counts the work of a piece in flops and says when the next unit of work must start a new piece."""

    def __init__(self, budget: float) -> None:
        self.budget, self.spent = budget, 0.0

    def due(self, flops: float) -> bool:
        """Account for `flops` about to run; True: pause first (this piece is full)."""
        full = self.spent > 0 and self.spent + flops > self.budget
        self.spent = flops if full else self.spent + flops
        return full

    def rows(self, n: int, flops_per_row: float, fn):
        """Generator: fn(row slice) over rows 0..n, all at once if they fit in a piece, else in ranges of about a
        piece each; pauses when a piece is full; returns the list of fn's results."""
        size = n if n * flops_per_row <= self.budget else _range_size(self.budget, flops_per_row)
        results = []
        for rows in _row_ranges(n, size):
            if self.due((rows.stop - rows.start) * flops_per_row):
                yield
            results.append(fn(rows))
        return results


def _range_size(budget: float, flops_per_row: float) -> int:
    """Rows per range for about `budget` of work: a multiple of ROW_ALIGN, at least one."""
    return max(1, int(budget // (flops_per_row * ROW_ALIGN))) * ROW_ALIGN


def _row_ranges(n: int, size: int):
    """Slices of `size` rows covering 0..n; a tail shorter than ROW_ALIGN joins the slice before it."""
    start = 0
    while start < n:
        stop = n if n - (start + size) < ROW_ALIGN else start + size
        yield slice(start, stop)
        start = stop


def _block_in_ranges(block: VisionBlock, x, cos, sin, segments, pace: _Pace, q, k, v, out, hidden):
    """Generator: `x = block(x, cos, sin, segments)` in place, in row ranges and attention ranges of about a piece
    each (VisionTransformer.encode_pieces). q, k, v, out (N, heads, hd) and hidden (N, mlp) are scratch."""
    attn, mlp = block.attn, block.mlp
    n, e = x.shape
    heads, hd = q.shape[1:]

    def qkv(r):
        q[r], k[r], v[r] = attn.qkv_rope(block.inner(block.norm1(x[r])), cos[r], sin[r])

    yield from pace.rows(n, 6 * e * e, qkv)
    start = 0
    for count, length in segments:
        per_head = 4 * length * length * hd  # QK^T and PV, one head of one segment
        for segs, hs, rows, work in _attention_ranges(count, length, heads, per_head, pace.budget):
            if pace.due(work):
                yield
            attn.attend(q, k, v, out, start, count, length, segs, hs, rows)
        start += count * length

    def fc1(r):  # x += attention; hidden = fc1(norm2(x))
        x[r] = x[r] + attn.proj(out[r].flatten(1))
        hidden[r] = mlp.fc1(block.inner(block.norm2(x[r])))

    yield from pace.rows(n, 2 * e * e + 2 * e * hidden.shape[1], fc1)
    if pace.due(hidden.numel() * ELEMENTWISE_FLOPS):
        yield
    act = mlp.act(hidden)  # the whole tensor in one call, as in forward (see encode_pieces)

    def fc2(r):
        x[r] = x[r] + mlp.fc2(act[r])

    yield from pace.rows(n, 2 * e * hidden.shape[1], fc2)


def _attention_ranges(count: int, length: int, heads: int, per_head: float, budget: float):
    """(segments, heads, query rows, flops) ranges covering `count` segments of `length` rows, each within
    `budget` where possible: all at once, else groups of segments, else groups of heads of one segment, else
    query-row ranges of one head (one head over a 65k-patch image is ~1.4 TFLOP). Query ranges follow ROW_ALIGN
    too: the attention kernel's rows, like a matrix product's, keep their bits only at aligned starts."""
    every = slice(None)
    if count * heads * per_head <= budget:
        yield every, every, every, count * heads * per_head
    elif heads * per_head <= budget:
        step = int(budget // (heads * per_head))
        for s in range(0, count, step):
            yield slice(s, s + step), every, every, min(step, count - s) * heads * per_head
    elif per_head <= budget:
        step = int(budget // per_head)
        for s in range(count):
            for h in range(0, heads, step):
                yield slice(s, s + 1), slice(h, h + step), every, min(step, heads - h) * per_head
    else:
        per_row = per_head / length
        for s in range(count):
            for h in range(heads):
                for rows in _row_ranges(length, _range_size(budget, per_row)):
                    yield slice(s, s + 1), slice(h, h + 1), rows, (rows.stop - rows.start) * per_row
