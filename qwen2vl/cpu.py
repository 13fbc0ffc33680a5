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

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .model import Qwen2VL


class WeightOnlyLinear(nn.Module):
    """y = x @ W.T + b with W kept as bf16 or int8 (+ per-row scale) and everything else float32."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.bias = None if bias is None else nn.Parameter(bias.float(), requires_grad=False)
        self.scale = None if scale is None else nn.Parameter(scale, requires_grad=False)
        self.fast = kernels.available() and weight.shape[1] % 8 == 0

    @classmethod
    def quantize(cls, weight: torch.Tensor, bias: torch.Tensor | None, storage: str) -> "WeightOnlyLinear":
        if storage == "bf16":
            return cls(weight.to(torch.bfloat16).contiguous(), bias)
        if storage == "int8":
            q, scale = quantize_int8(weight)
            return cls(q, bias, scale)
        raise ValueError(f"storage must be 'bf16' or 'int8', not {storage!r}")

    def dequantized(self) -> torch.Tensor:
        w = self.weight.float()
        return w if self.scale is None else w * self.scale[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        if self.fast and rows.shape[0] <= kernels.MAX_ROWS and x.dtype == torch.float32:
            if self.scale is None:
                y = kernels.gemm_bf16(rows, self.weight, self.bias)
            else:
                y = kernels.gemm_int8(rows, self.weight, self.scale, self.bias)
            return y.view(*x.shape[:-1], -1)
        return F.linear(x, self.dequantized().to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: W ~ q * scale[:, None], q in [-127, 127]."""
    w = weight.float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def use_cpu_kernels(model: Qwen2VL, storage: str = "bf16", vision_storage: str | None = None) -> Qwen2VL:
    """Rewrite `model` in place for fast CPU inference; returns it.

    storage: "bf16" or "int8" for the language model's linear layers (and the output projection);
    vision_storage: the same for the vision tower (default: bf16 even when the decoder is int8, because the
    vision tower is compute-bound and int8 buys it nothing but drift).
    """
    vision_storage = vision_storage or "bf16"
    for parent_name, parent in list(model.named_modules()):
        for child_name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                full = f"{parent_name}.{child_name}".lstrip(".")
                kind = vision_storage if full.startswith("visual.") else storage
                setattr(parent, child_name, WeightOnlyLinear.quantize(child.weight.data, child.bias, kind))
    if model.lm_head is None:  # tied: a bf16 output projection shares the embedding's storage
        embed = model.model.embed_tokens.weight.data
        model.lm_head = (WeightOnlyLinear(embed.to(torch.bfloat16), None) if storage == "bf16"
                         else WeightOnlyLinear.quantize(embed, None, storage))
    for module in model.modules():  # norms, the patch embedding, everything small: float32
        if isinstance(module, (nn.LayerNorm, nn.Conv3d)) or module.__class__.__name__ == "RMSNorm":
            module.float()
    model.compute_dtype = torch.float32
    return model
