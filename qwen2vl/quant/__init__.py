"""Weight-only quantized checkpoints (AWQ, GPTQ): the formats' readers and the layer they load into.

The model code knows nothing of this package: `qwen2vl.weights` asks `quantized_layers` which of the model's
linear layers a checkpoint stores quantized, reads each one's tensors (`formats.read_layer`) and puts a
`QuantLinear` in its place.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import re

from torch import nn

from .formats import (
    QuantizationError,
    QuantScheme,
    layer_tensors,
    packed_slices,
    parse_quantization_config,
    read_layer,
)
from .linear import QuantLinear

# the only layers the official releases quantize: the decoder's attention and MLP projections
QUANTIZABLE = re.compile(r"model\.layers\.\d+\.(self_attn\.[qkvo]_proj|mlp\.(gate|up|down)_proj)")

__all__ = [
    "QUANTIZABLE",
    "QuantLinear",
    "QuantScheme",
    "QuantizationError",
    "layer_tensors",
    "packed_slices",
    "parse_quantization_config",
    "quantized_layers",
    "read_layer",
    "release_freed_memory",
]


def _libc_malloc_trim():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc: nothing to do
        return None


_MALLOC_TRIM = _libc_malloc_trim()


def release_freed_memory() -> None:
    """Give freed heap pages back to the system (glibc `malloc_trim`). Repacking a layer frees a few temporaries
    the size of its packed tensors; glibc keeps such blocks in its heap once its mmap threshold has grown, and the
    layers allocated after them fragment the heap, so without this the peak grows with the number of layers."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def quantized_layers(model: nn.Module, names: list[str]) -> dict[str, nn.Linear]:
    """Layer name -> the model's (meta) nn.Linear, for every layer the checkpoint stores as `<layer>.qweight`."""
    layers = {}
    for name in names:
        if not name.endswith(".qweight"):
            continue
        prefix = name[: -len(".qweight")]
        if not QUANTIZABLE.fullmatch(prefix):
            raise QuantizationError(
                f"{name}: this layer is quantized in the checkpoint, but only the decoder's "
                "q/k/v/o and gate/up/down projections may be"
            )
        layers[prefix] = model.get_submodule(prefix)
    return layers
