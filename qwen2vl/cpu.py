"""Fast CPU execution: weights stored in bf16 (or int8), arithmetic in float32.

On CPUs without bf16 matrix units (AVX2-only machines such as our CI's AMD EPYC), torch's bf16 matrix products
run at ~20 GFLOP/s against ~170 for float32, and its bf16 matrix-vector product reads weights well below memory
bandwidth. `use_cpu_kernels(model)` keeps each weight matrix in its compact storage dtype and computes in float32:
a few rows at a time (decoding) through the weight-streaming kernels of `qwen2vl.kernels`, many rows (vision,
prefill) by widening the weight to float32 and calling torch's float32 GEMM. Activations, norms, rotary tables
and the KV cache are float32, so results are at least as precise as the bf16 reference; int8 (symmetric, one
scale per output row) is lower precision and its drift is measured in tests and docs.
This is an optional transform applied after loading; the model files know nothing of it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels, machine
from .model import Qwen2VL
from .model.layers import RMSNorm, apply_rope
from .model.text import Attention
from .quant.linear import QuantLinear
from .weights import release_pages

WIDEN_AT_ONCE = 1 << 22  # weights widened at a time for a many-row product (16 MB as float32)


class WeightOnlyLinear(nn.Module):
    """y = x @ W.T + b with W kept as bf16 or int8 (+ per-row scale) and everything else float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.scale = None if scale is None else nn.Parameter(scale, requires_grad=False)
        self._product: kernels.WeightOnlyMatmul | None = None  # bound on first use, dropped when the parameters change
        self.matmul = "float32"  # many-row products: "float32" (widen W) or "bf16" (native); see qwen2vl.machine

    def __setattr__(self, name, value) -> None:
        super().__setattr__(name, value)
        if name in ("weight", "bias", "scale", "matmul"):
            self.__dict__["_product"] = None

    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), ... may move or convert the parameters
        self.__dict__["_product"] = None
        return super()._apply(fn, *args, **kwargs)

    def _bind(self) -> kernels.WeightOnlyMatmul | None:
        w, scale, bias = (None if t is None else t.data for t in (self.weight, self.scale, self.bias))
        if (
            kernels.available()
            and w.shape[1] % 8 == 0
            and w.dtype == (torch.bfloat16 if scale is None else torch.int8)
            and all(t is None or t.dtype == torch.float32 for t in (scale, bias))
        ):
            # under bf16 products, the few-row products take bf16-rounded inputs too (one precision per model)
            inputs = "bf16" if self.matmul == "bf16" and scale is None else "float32"
            self._product = kernels.WeightOnlyMatmul(w, scale, bias, inputs=inputs)
        return self._product

    @classmethod
    def quantize(
        cls,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        storage: str,
        reduce_rows: Callable[[torch.Tensor], None] | None = None,
        release: bool = False,
    ) -> WeightOnlyLinear:
        """`weight` in `storage` ("bf16" or "int8"; see quantize_int8 for `reduce_rows` and `release`)."""
        if storage == "bf16":
            stored = weight.to(torch.bfloat16).contiguous()
            if release and stored.data_ptr() != weight.data_ptr():  # converted: a mapped weight's pages go back
                release_pages(weight)
            return cls(stored, bias)
        if storage == "int8":
            q, scale = quantize_int8(weight, reduce_rows, release)
            return cls(q, bias, scale)
        raise ValueError(f"storage must be 'bf16' or 'int8', not {storage!r}")

    def dequantized(self, rows: slice = slice(None)) -> torch.Tensor:
        """W (or its rows `rows`) as float32."""
        w = self.weight[rows].float()
        return w if self.scale is None else w * self.scale[rows, None]

    def _many_rows(self, x: torch.Tensor, dtype: torch.dtype, bias: torch.Tensor | None) -> torch.Tensor:
        """F.linear(x, W, bias) with x, W and bias in `dtype` (x and bias already in it). A weight not stored in
        `dtype` is widened a block of ~4M weights at a time, each block's product (with its part of the bias, fused
        as before) written into the output: a prefill never holds a whole widened matrix (int8 made float32 and bf16
        copies of each: ~140 MB for an MLP projection of the 2B)."""
        if self.scale is None and self.weight.dtype == dtype:
            return F.linear(x, self.weight, bias)
        n, k = self.weight.shape
        step = _block_rows(n, k)
        if step >= n:
            return F.linear(x, self.dequantized().to(dtype), bias)
        out = x.new_empty(*x.shape[:-1], n)
        for start in range(0, n, step):
            rows = slice(start, min(start + step, n))
            out[..., rows] = F.linear(x, self.dequantized(rows).to(dtype), None if bias is None else bias[rows])
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if rows.shape[0] <= kernels.MAX_ROWS and x.dtype == torch.float32:
            kernel = self._product or self._bind()
            if kernel is not None:
                return kernel(rows).view(*x.shape[:-1], -1)
        if x.dtype == torch.bfloat16:  # bf16 activations (vision blocks under bf16 products): bf16 out, bias fused
            return self._many_rows(x, torch.bfloat16, None if self.bias is None else self.bias.to(torch.bfloat16))
        if self.matmul == "bf16" and x.dtype == torch.float32:  # native bf16 GEMM, float32 activations around it
            y = self._many_rows(x.to(torch.bfloat16), torch.bfloat16, None).float()
            return y if self.bias is None else y.add_(self.bias)
        return self._many_rows(x, x.dtype, None if self.bias is None else self.bias.to(x.dtype))


def _block_rows(n: int, k: int) -> int:
    """Rows of an (n, k) weight widened at once: about WIDEN_AT_ONCE weights, in equal blocks of a multiple of 64 rows.
    Equal, round blocks matter: MKL's float32 GEMM on a ragged split (fc2 of the 2B's vision tower as 819 + 461 output
    columns, fc1 as 3276 + 1844) ran 1.3-1.6x slower than on the whole matrix, these blocks 0.96-1.05x
    (benchmarks/bench_widen_blocks.py)."""
    step = max(1, WIDEN_AT_ONCE // k)
    if step >= n:
        return n
    blocks = -(-n // step)
    size = -(-n // blocks)
    return size if size <= 64 else -(-size // 64) * 64


class FastRMSNorm(RMSNorm):
    """RMSNorm in one kernel call for float32 activations (the decode step has 57 of them)."""

    @classmethod
    def replacing(cls, norm: RMSNorm) -> FastRMSNorm:
        """A FastRMSNorm holding `norm`'s own weight parameter (shared, not copied)."""
        fast = cls(norm.weight.shape[0], norm.eps)
        fast.weight = norm.weight
        return fast

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = kernels.rms_norm(x, self.weight, self.eps)
        return super().forward(x) if y is None else y


def fast_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """apply_rope in place, in one kernel call, when the layout allows it (a fresh projection's output)."""
    y = kernels.rope_(x, cos, sin)
    return apply_rope(x, cos, sin) if y is None else y


def quantize_int8(
    weight: torch.Tensor, reduce_rows: Callable[[torch.Tensor], None] | None = None, release: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: W ~ q * scale[:, None], q in [-127, 127].
    `reduce_rows`: when the rows' inputs are split across tensor-parallel ranks, takes each row's largest |w|
    over all ranks in place (an all-reduce), so that every rank scales its part as one process would.
    A block of rows at a time: one kernel pass each where the kernels run (`kernels.quantize_int8_rows`, the same
    bits), else PyTorch. `release`: `weight` is fresh from a mapped checkpoint (see use_cpu_kernels): each block's
    pages are handed back once read, so the matrix is never resident whole."""
    blocks = weight.split(kernels.ROWS_AT_ONCE)
    amax_blocks: list[torch.Tensor | None] = [None] * len(blocks)
    if reduce_rows is not None:  # every rank's largest |w| per row first, then the same scale on every rank
        amax = torch.cat([_row_absmax(b, release) for b in blocks])
        reduce_rows(amax)
        amax_blocks = list(amax.split(kernels.ROWS_AT_ONCE))
    q, scale = torch.empty(weight.shape, dtype=torch.int8), torch.empty(weight.shape[0], dtype=torch.float32)
    outputs = zip(q.split(kernels.ROWS_AT_ONCE), scale.split(kernels.ROWS_AT_ONCE))
    for b, a, (q_rows, scale_rows) in zip(blocks, amax_blocks, outputs):
        if not kernels.quantize_int8_rows(b, q_rows, scale_rows, a):
            a = _row_absmax(b, False) if a is None else a
            scale_rows.copy_(a.clamp(min=1e-12) / 127.0)
            q_rows.copy_(torch.round(b.float() / scale_rows[:, None]).clamp_(-127, 127))
        if release:
            release_pages(b)
    return q, scale


def _row_absmax(rows: torch.Tensor, release: bool) -> torch.Tensor:
    amax = kernels.row_absmax(rows)
    amax = rows.float().abs().amax(dim=1) if amax is None else amax
    if release:
        release_pages(rows)
    return amax


def use_cpu_kernels(
    model: Qwen2VL,
    storage: str = "bf16",
    vision_storage: str | None = None,
    matmul: str = "auto",
    release: bool = False,
) -> Qwen2VL:
    """Rewrite `model` in place for fast CPU inference; returns it.

    storage: "bf16" or "int8" for the language model's linear layers (and the output projection);
    vision_storage: the same for the vision tower (default: bf16 even when the decoder is int8, because the
    vision tower is compute-bound and int8 buys it nothing but drift);
    matmul: how many-row products (vision, prefill) compute: "auto" (this CPU's faster path, `qwen2vl.machine`),
    "float32" (exact float32 arithmetic) or "bf16" (native bf16 GEMM). The choice is `model.cpu_choice`.
    release: the weights are fresh from a mapped checkpoint, never written (`load_model` says so): the pages of each
    weight converted here are handed back (`weights.release_pages`), a block of rows at a time where it is
    quantized, so that no matrix (the tied embedding above all) is ever resident whole.
    """
    vision_storage = vision_storage or "bf16"
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{parent_name}.{child_name}".lstrip(".")
                kind = vision_storage if full.startswith("visual.") else storage
                # a row-parallel shard (qwen2vl.parallel) carries how to reduce its rows' ranges over the ranks
                reduce = getattr(child, "reduce_rows", None)
                fast = WeightOnlyLinear.quantize(child.weight.data, child.bias, kind, reduce, release)
                fast._forward_hooks.update(child._forward_hooks)  # hooks stay with the layer (an all-reduce)
                setattr(parent, child_name, fast)
    if model.lm_head is None:  # tied: a bf16 output projection shares the embedding's storage
        embed = model.model.embed_tokens.weight.data
        # int8: quantized a block at a time, the pages going back (release), so a lookup later faults in only the
        # embedding rows it reads
        model.lm_head = (
            WeightOnlyLinear(embed.to(torch.bfloat16), None)
            if storage == "bf16"
            else WeightOnlyLinear.quantize(embed, None, storage, release=release)
        )
    for module in model.modules():  # norms, the patch embedding, everything small: float32
        if isinstance(module, (nn.LayerNorm, nn.Conv3d, RMSNorm)):
            module.float()
    if kernels.available():  # the decode step's small operations, one kernel call each: same weights
        for parent in list(model.modules()):
            for child_name, child in list(parent.named_children()):
                if type(child) is RMSNorm:
                    setattr(parent, child_name, FastRMSNorm.replacing(child))
            if isinstance(parent, Attention):
                parent.rope = fast_rope
        model.model.decode_attention = kernels.decode_attention
    linears = [m for m in model.modules() if isinstance(m, WeightOnlyLinear)]
    many_rows = [m for m in linears if m is not model.lm_head]  # the output projection sees one row per sequence
    # the decode kernels take K % 8 == 0 (others fall back, see _bind): time only those (a tensor-parallel shard
    # of a tiny model may have K = 100)
    decoder = [m for m in model.model.modules() if isinstance(m, WeightOnlyLinear) and m.weight.shape[1] % 8 == 0]
    model.cpu_choice = machine.choose(
        sorted({tuple(m.weight.shape) for m in many_rows}), matmul, sorted({tuple(m.weight.shape) for m in decoder})
    )
    for m in linears:
        m.matmul = model.cpu_choice.matmul
    for module in model.modules():  # 4-bit layers (AWQ, GPTQ, --quantize int4): their products likewise
        if isinstance(module, QuantLinear):
            module.matmul = model.cpu_choice.matmul
    inner = torch.bfloat16 if model.cpu_choice.matmul == "bf16" else None  # bf16 products: bf16 activations
    fused = model.cpu_choice.vision_attention == "avx512_bf16"  # its attention and rotary over bf16 rows
    for block in model.visual.blocks:  # in the vision blocks' attention and MLP, and in the decoder's MLP over
        block.inner_dtype = inner  # a prompt (decode steps stay float32, through the kernels)
        block.attn.fused_attention = kernels.attention_bf16 if fused else None
        block.attn.fused_rope = kernels.rope_bf16 if fused else None
    for layer in model.model.layers:
        layer.prompt_mlp_dtype = inner
    model.compute_dtype = torch.float32
    return model
