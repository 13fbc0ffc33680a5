"""`QuantLinear`: a weight-only 4- or 8-bit linear layer in the one layout every quantized format is repacked to.

Storage contract (what a fast kernel may rely on; N = out_features, K = in_features, G = group size,
n_groups = ceil(K / G)):

- `qweight` uint8. 4 bits: (N, ceil(K/2)), byte j of row n holds stored column 2j in its low nibble and 2j+1 in
  its high nibble (a padding nibble of 0 when K is odd). 8 bits: (N, K), one byte per value. Values are unsigned,
  0 .. 2^bits - 1.
- `scales` float16 (N, n_groups); `zeros` int16 (N, n_groups), values 0 .. 2^bits (2^bits only where a GPTQ v1
  file stores an all-ones zero field, which AutoGPTQ reads as field + 1).
- Stored column j belongs to group j // G (the last group may be shorter).
- `perm` int64 (K,) or absent: stored column j is input feature perm[j] (GPTQ act-order, `desc_act: true`,
  repacked at load so that groups are contiguous). A kernel computes y = x[..., perm] @ W_stored.T.
- `bias` (N,) in the model's dtype, or absent.

The reference weight is float16: W_stored[n, j] = float16(q - z) * s[n, j // G], the subtraction exact in integers
and the product rounded once to float16, as AutoAWQ's `dequantize_gemm` and AutoGPTQ's `QuantLinear.forward`
compute it. `forward` is the plain-PyTorch path: dequantize, cast to the activations' dtype, one matrix product.

On CUDA, 4-bit layers with bfloat16 activations instead run torch's fused dequantize-matmul (`_weight_int4pack_mm`,
"tinygemm") on a copy repacked at first use: it computes W = (q - 8) * s + m with m = (8 - z) * s, both in bfloat16,
so it is as close to the float16 reference as bfloat16 allows, not exact. On CPU, a few rows of float32 activations
(a decode step) go through `qwen2vl.kernels.Q4Product` (AVX2 or AVX-512) for 4-bit layers whose K and group size
are multiples of 32: it streams the packed weight once and multiplies exactly the float16 reference weights, in
float32. Many rows (a prompt, vision) multiply the dequantized weight, formed in one kernel pass on CPU
(`weight_as`); where the model computes its products in bf16 (`matmul = "bf16"`, set by qwen2vl.cpu), x and that
weight are rounded to bf16 for torch's bf16 GEMM, as the bf16 checkpoints' layers do, and a decode step's rows take
the faster kernel product on x rounded to int16 (weight (q - z) * s unrounded) or as bf16 pairs. Everything else
takes the plain path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .. import kernels
from .formats import LayerStorage, unpack_nibbles

_UNBOUND = object()  # QuantLinear._cpu_product: nothing bound yet (None: bound, no kernel fits)


class QuantLinear(nn.Module):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int,
        bias: bool,
        permuted: bool = False,
        bias_dtype: torch.dtype = torch.float16,
    ) -> None:
        super().__init__()
        if bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, not {bits}")
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = in_features if group_size == -1 else group_size
        n_groups = -(-in_features // self.group_size)
        cols = (in_features + 1) // 2 if bits == 4 else in_features
        self.register_buffer("qweight", torch.empty(out_features, cols, dtype=torch.uint8))
        self.register_buffer("scales", torch.empty(out_features, n_groups, dtype=torch.float16))
        self.register_buffer("zeros", torch.empty(out_features, n_groups, dtype=torch.int16))
        self.register_buffer("perm", torch.empty(in_features, dtype=torch.int64) if permuted else None)
        self.register_buffer("bias", torch.empty(out_features, dtype=bias_dtype) if bias else None)
        # how products compute on CPU: "float32" (exact), or "bf16" where the model computes its products in bf16
        # (qwen2vl.cpu sets it, as WeightOnlyLinear.matmul): many rows then multiply x and the weight rounded to bf16
        # in torch's bf16 GEMM, and a decode step's few rows run the 4-bit product on x rounded to int16 (integer dot
        # products) or as bf16 pairs, where the kernels have them (`_cpu_product`)
        self.matmul = "float32"

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, "
            f"group_size={self.group_size}, act_order={self.perm is not None}, bias={self.bias is not None}"
        )

    @staticmethod
    def state_from(storage: LayerStorage) -> dict[str, torch.Tensor]:
        """The buffers (without bias) for `load_state_dict`, from a reader's LayerStorage."""
        state = {"qweight": storage.qweight, "scales": storage.scales, "zeros": storage.zeros}
        if storage.perm is not None:
            state["perm"] = storage.perm
        return state

    def unpacked(self) -> torch.Tensor:
        """q as uint8 (N, K), stored column order."""
        return unpack_nibbles(self.qweight, self.in_features) if self.bits == 4 else self.qweight

    def dequantize_stored(self) -> torch.Tensor:
        """float16 (N, K) weight in stored column order (see the module docstring)."""
        k, g = self.in_features, self.group_size
        z = self.zeros.repeat_interleave(g, dim=1)[:, :k]
        s = self.scales.repeat_interleave(g, dim=1)[:, :k]
        return (self.unpacked().to(torch.int16) - z).to(torch.float16) * s

    def dequantize(self) -> torch.Tensor:
        """float16 (N, K): the weight as `nn.Linear.weight`, input features in their own order."""
        w = self.dequantize_stored()
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm] = w
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # a decode step's few rows first, with as little Python as possible (~200 calls a token): the 4-bit CPU kernel,
        # bias included
        if x.dtype == torch.float32 and x.device.type == "cpu" and x.numel() <= kernels.MAX_ROWS * self.in_features:
            product = self._cpu_product()
            if product is not None:
                rows = x.reshape(-1, self.in_features)
                if self.perm is not None:
                    rows = rows.index_select(-1, self.perm)
                return product(rows).view(*x.shape[:-1], self.out_features)
        if self.perm is not None:
            x = x.index_select(-1, self.perm)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if x.device.type == "cuda" and self._fused_cuda_fits(x):
            y = self._fused_cuda(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
            return y if bias is None else y + bias
        if self.matmul == "bf16" and x.dtype == torch.float32 and x.device.type == "cpu":  # many rows, bf16 products
            y = F.linear(x.to(torch.bfloat16), self.weight_as(torch.bfloat16)).float()
            return y if self.bias is None else y.add_(self.bias.float())
        return F.linear(x, self.weight_as(x.dtype), bias)

    def weight_as(self, dtype: torch.dtype) -> torch.Tensor:
        """`dequantize_stored().to(dtype)`, the weight a many-row product multiplies: on CPU one pass of the kernels
        for 4 bits to float32 (exact) or bf16 (`kernels.dequantize_q4_rows`, tested equal), else PyTorch."""
        if self.bits == 4 and self.qweight.device.type == "cpu":
            w = kernels.dequantize_q4_rows(
                self.qweight, self.scales, self.zeros, self.group_size, self.in_features, dtype
            )
            if w is not None:
                return w
        return self.dequantize_stored().to(dtype)

    # -- CPU: qwen2vl.kernels' 4-bit product, which multiplies exactly the float16 weights above, in float32 --

    def _cpu_product(self) -> kernels.Q4Product | None:
        bound = self.__dict__.get("_q4cpu", _UNBOUND)
        if bound is not _UNBOUND:
            return bound
        fits = (
            self.bits == 4
            and kernels.available()
            and self.qweight.device.type == "cpu"
            and kernels.Q4Product.supports(self.in_features, self.group_size)
        )
        bias = None if self.bias is None else self.bias.float().contiguous()
        k, g, relaxed = self.in_features, self.group_size, fits and self.matmul == "bf16"
        if relaxed and kernels.int16_q4_inputs() and kernels.Q4Product.int16_fits(k, g):
            inputs = "int16"  # integer dot products: the fastest, with x 16-bit
        elif relaxed and kernels.native_bf16_inputs() and kernels.Q4Product.pairs_fit(k, g):
            inputs = "bf16"
        else:
            inputs = "float32"
        product = (
            kernels.Q4Product(self.qweight, self.scales, self.zeros, self.group_size, bias, inputs=inputs)
            if fits
            else None
        )
        self.__dict__["_q4cpu"] = product
        return product

    # -- CUDA: torch's int4 kernel --

    def _fused_cuda_fits(self, x: torch.Tensor) -> bool:
        k, g = self.in_features, self.group_size
        return (
            self.bits == 4
            and x.dtype == torch.bfloat16
            and g in (32, 64, 128, 256)
            and k % g == 0
            and k % 32 == 0
            and self.out_features % 8 == 0
        )

    def _fused_cuda(self, rows: torch.Tensor) -> torch.Tensor:
        packed = self.__dict__.get("_int4pack")
        if packed is None or packed[0].device != rows.device:
            # the kernel's byte order is the other way round: even column in the high nibble
            swapped = (self.qweight << 4) | (self.qweight >> 4)
            tiles = next(t for t in (8, 4, 2) if self.in_features % (16 * t) == 0)
            packed = (
                torch.ops.aten._convert_weight_to_int4pack(swapped.contiguous(), tiles),
                int4pack_scales_and_zeros(self.scales, self.zeros, torch.bfloat16),
            )
            self.__dict__["_int4pack"] = packed
        return torch.ops.aten._weight_int4pack_mm(rows.contiguous(), packed[0], self.group_size, packed[1])

    def __setattr__(self, name, value) -> None:
        super().__setattr__(name, value)
        if name == "matmul":  # the bound CPU product depends on it
            self.__dict__.pop("_q4cpu", None)

    def _apply(self, fn, *args, **kwargs):  # .to() and friends: the repacked copy follows the buffers again
        self.__dict__.pop("_int4pack", None)
        self.__dict__.pop("_q4cpu", None)
        return super()._apply(fn, *args, **kwargs)


def int4pack_scales_and_zeros(scales: torch.Tensor, zeros: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n_groups, N, 2) [s, (8 - z) * s] for torch's int4 kernels, which compute W = (q - 8) * s + m."""
    s = scales.float()
    return torch.stack((s, (8 - zeros.float()) * s), dim=-1).transpose(0, 1).contiguous().to(dtype)
