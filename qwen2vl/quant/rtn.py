"""`--quantize int4`: group-wise 4-bit round-to-nearest of a loaded bf16 model's decoder, into `QuantLinear`.

The same layout, formula and kernels as the AWQ / GPTQ checkpoints: per output row and group of `group` inputs,
an asymmetric range [min, max] -> s = float16((max - min) / 15), z = round(-min / s) in 0..15,
q = clamp(round(w / s) + z, 0, 15), and the weight used is float16((q - z) * s), as AutoAWQ's `dequantize_gemm`
defines it. No calibration (AWQ's and GPTQ's own quantizers need data and hours; a checkpoint they produced loads
directly). Only the decoder's attention and MLP projections are quantized, as in the official releases; the
vision tower, the embedding and the output projection keep their storage.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import kernels
from ..weights import release_pages
from .formats import LayerStorage, pack_nibbles
from .linear import QuantLinear

GROUP = 128  # the official releases' group size


def quantize_rtn(weight: torch.Tensor, group: int = GROUP) -> LayerStorage:
    """(N, K) float weight -> 4-bit storage in QuantLinear's layout (stored order = input order, no permutation).
    One kernel pass where the kernels run (`kernels.quantize_q4_rows`, the same bits); else PyTorch, a block of
    rows at a time."""
    fast = kernels.quantize_q4_rows(weight, group)
    if fast is not None:
        return LayerStorage(qweight=fast[0], scales=fast[1], zeros=fast[2], perm=None)
    parts = [_quantize_rows(rows, group) for rows in weight.split(kernels.ROWS_AT_ONCE)]
    return LayerStorage(*(torch.cat(t) for t in zip(*parts)), perm=None)


def _quantize_rows(weight: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, k = weight.shape
    groups = -(-k // group)
    w = torch.nn.functional.pad(weight.float(), (0, groups * group - k)).view(n, groups, group)
    if k % group:  # the padding of a short last group must not widen its range
        w[:, -1, k % group :] = w[:, -1, :1]
    lo, hi = w.amin(-1).clamp(max=0), w.amax(-1).clamp(min=0)  # the range includes 0, so 0 stays exact-ish
    # at least float16's smallest step: an all-zero group gets s = 2^-24, z = 0, q = 0 (not 0 / 0)
    scales = ((hi - lo) / 15).to(torch.float16).clamp(min=2**-24)
    s = scales.float()
    zeros = torch.round(-lo / s).clamp_(0, 15)
    q = (torch.round(w / s[..., None]) + zeros[..., None]).clamp_(0, 15).to(torch.uint8).view(n, -1)[:, :k]
    return pack_nibbles(q), scales.contiguous(), zeros.to(torch.int16).contiguous()


def check_share_groups(slices: dict, group: int = GROUP) -> None:
    """Under tensor parallelism: every rank's share of a row-parallel layer's inputs must be whole groups, so
    that each rank quantizes exactly the groups one process would (the same weights, split)."""
    for name, part in slices.items():
        if part.dim == 1 and (part.start % group or (part.stop % group and part.stop != part.full)):
            raise ValueError(
                f"quantize='int4' under tensor parallelism quantizes groups of {group} inputs, but this rank's share "
                f"of {name} is inputs {part.start}..{part.stop} of {part.full}; choose a tensor_parallel_size that "
                f"splits {part.full} into multiples of {group}, or --quantize int8"
            )


def quantize_decoder_int4(model: nn.Module, group: int = GROUP, release: bool = False) -> nn.Module:
    """Replace the decoder's q/k/v/o and gate/up/down `nn.Linear` layers of a loaded model by 4-bit `QuantLinear`
    (in place, one layer at a time, so the peak is the model plus one layer); returns the model. `release`: the
    weights are fresh from a mapped checkpoint (`load_model`): each one's pages are handed back once quantized."""
    from . import QUANTIZABLE

    for name, module in list(model.named_modules()):
        if not (isinstance(module, nn.Linear) and QUANTIZABLE.fullmatch(name)):
            continue
        storage = quantize_rtn(module.weight.data, group)
        if release:
            release_pages(module.weight.data)
        bias = module.bias
        layer = QuantLinear(
            module.in_features, module.out_features, 4, group, bias=bias is not None, bias_dtype=torch.float32
        )
        state = QuantLinear.state_from(storage)
        if bias is not None:
            state["bias"] = bias.data.float()
        layer.load_state_dict(state, strict=True, assign=True)
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
    return model
