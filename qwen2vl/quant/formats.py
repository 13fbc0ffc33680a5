"""The AWQ and GPTQ on-disk formats: which configs we accept, and how one layer's tensors become `QuantLinear` storage.

Readers follow the reference dequantizers: AutoAWQ 0.2.x `awq/utils/packing_utils.py` (`unpack_awq`,
`reverse_awq_order`, `dequantize_gemm`) for AWQ `version: gemm`, and AutoGPTQ 0.7.x
`qlinear_cuda.QuantLinear.forward` (its PyTorch path) for GPTQ v1. Each layer is repacked once, at load, into the
one layout `QuantLinear` documents; the packed int32 tensors are dropped as soon as the layer is repacked.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import torch

from ..config import ConfigError

# nibble p of an AWQ int32 holds logical column 8c + AWQ_ORDER[p]; logical column j sits in nibble AWQ_REVERSE[j]
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)
AWQ_REVERSE = (0, 4, 1, 5, 2, 6, 3, 7)

# quantization_config keys that describe how the quantizer ran, or which GPU kernel to pick: they do not change
# what the tensors on disk mean. Every other key must be understood below, or the config is refused.
_AWQ_INERT = {
    "quant_method",
    "bits",
    "group_size",
    "zero_point",
    "version",
    "backend",
    "do_fuse",
    "fuse_max_seq_len",
    "modules_to_fuse",
    "modules_to_not_convert",
    "exllama_config",
}
_GPTQ_INERT = {
    "quant_method",
    "bits",
    "group_size",
    "desc_act",
    "sym",
    "checkpoint_format",
    "damp_percent",
    "true_sequential",
    "static_groups",
    "model_name_or_path",
    "model_file_base_name",
    "is_marlin_format",
    "tokenizer",
    "dataset",
    "meta",
    "backend",
    "use_cuda_fp16",
    "model_seqlen",
    "block_name_to_quantize",
    "module_name_preceding_first_block",
    "batch_size",
    "pad_token_id",
    "use_exllama",
    "max_input_length",
    "exllama_config",
    "cache_block_outputs",
    "modules_in_block_to_quantize",
    "quantizer",
    "damp_auto_increment",
    "lm_head",
    "mse",
}


if sys.byteorder != "little":  # the readers take int32 fields byte by byte (see _fields)
    raise ImportError("qwen2vl.quant reads AWQ/GPTQ tensors on little-endian machines only")


class QuantizationError(ConfigError):
    """A quantized checkpoint in a format, or with an option, this package does not read."""


@dataclass(frozen=True, slots=True)
class QuantScheme:
    """What config.json's `quantization_config` says, reduced to what the readers need."""

    method: str  # "awq" (AutoAWQ GEMM packing) or "gptq" (AutoGPTQ v1 packing)
    bits: int  # 4 (awq, gptq) or 8 (gptq)
    group_size: int  # -1: one group spanning all input features

    def groups(self, in_features: int) -> tuple[int, int]:
        """(group size, number of groups) for a layer with `in_features` inputs."""
        g = in_features if self.group_size == -1 else self.group_size
        return g, math.ceil(in_features / g)


def parse_quantization_config(q: Any) -> QuantScheme:
    """`quantization_config` -> QuantScheme, refusing by name every format and option we do not read."""
    if not isinstance(q, dict):
        raise QuantizationError(f"quantization_config must be an object, not {type(q).__name__}")
    method = str(q.get("quant_method", "")).lower()
    if method == "awq":
        known = _AWQ_INERT
        version = str(q.get("version", "gemm")).lower()
        if version != "gemm":
            raise QuantizationError(f"AWQ version {version!r} is not supported (only 'gemm', AutoAWQ's GEMM packing)")
        backend = str(q.get("backend", "autoawq")).lower()
        if backend != "autoawq":
            raise QuantizationError(f"AWQ backend {backend!r} is not supported (only 'autoawq' packing)")
        if q.get("zero_point", True) is not True:
            raise QuantizationError("AWQ zero_point=false is not supported (the official releases use zero points)")
        bits_ok = (4,)
    elif method == "gptq":
        known = _GPTQ_INERT
        fmt = str(q.get("checkpoint_format", "gptq")).lower()
        if fmt != "gptq":
            raise QuantizationError(f"GPTQ checkpoint_format {fmt!r} is not supported (only 'gptq', AutoGPTQ v1)")
        if q.get("is_marlin_format"):
            raise QuantizationError("GPTQ is_marlin_format=true (Marlin-repacked weights) is not supported")
        bits_ok = (4, 8)
    elif method in ("exl2", "exllamav2"):
        raise QuantizationError("EXL2 checkpoints are not supported (AWQ 'gemm' and GPTQ v1 4/8-bit are)")
    else:
        raise QuantizationError(f"quant_method {q.get('quant_method')!r} is not supported (AWQ and GPTQ are)")
    unknown = sorted(set(q) - known)
    if unknown:
        raise QuantizationError(
            f"{method.upper()} quantization_config has settings this package does not know: {unknown}"
        )
    bits = q.get("bits")
    if bits not in bits_ok:
        raise QuantizationError(f"{method.upper()} bits={bits!r} is not supported (supported: {list(bits_ok)})")
    group_size = q.get("group_size", 128)
    if not isinstance(group_size, int) or not (group_size == -1 or group_size > 0):
        raise QuantizationError(f"{method.upper()} group_size={group_size!r} must be a positive integer or -1")
    return QuantScheme(method, bits, group_size)


@dataclass(slots=True)
class LayerStorage:
    """One layer in QuantLinear's layout (see qwen2vl/quant/linear.py)."""

    qweight: torch.Tensor  # uint8 (N, ceil(K/2)) for 4 bits, (N, K) for 8
    scales: torch.Tensor  # float16 (N, n_groups)
    zeros: torch.Tensor  # int16 (N, n_groups)
    perm: torch.Tensor | None  # int64 (K,) or None


def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> uint8 (N, ceil(K/2)): low nibble = even column, high nibble = odd column."""
    q = q.to(torch.uint8)
    if q.shape[1] % 2:
        q = torch.nn.functional.pad(q, (0, 1))
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()


def unpack_nibbles(p: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of pack_nibbles: uint8 (N, ceil(K/2)) -> uint8 (N, K)."""
    return torch.stack((p & 15, p >> 4), dim=-1).view(p.shape[0], -1)[:, :k]


def _fields(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (R, C) -> uint8 (R, C * 32/bits): each int32's fields in order (field j = bits j*b .. j*b+b-1).
    On a little-endian machine byte j of an int32 holds bits 8j..8j+7, so the bytes are the 8-bit fields and
    their nibbles, low first, the 4-bit fields."""
    b = packed.contiguous().view(torch.uint8)
    return b if bits == 8 else unpack_nibbles(b, 2 * b.shape[1])


def _gptq_qweight(qw: torch.Tensor, bits: int) -> torch.Tensor:
    """GPTQ qweight int32 (K/pf, N), packed along K -> our qweight (N, K/2 or K): row r's bytes, low nibble first,
    are inputs pf*r, pf*r+1, ..., which is our byte order already; only rows and columns swap."""
    return qw.t().contiguous().view(torch.uint8)  # (N, K/pf) int32 -> its bytes (N, 4K/pf)


def _expect(name: str, t: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    if t is None:
        raise QuantizationError(f"{name} is missing")
    if tuple(t.shape) != shape or t.dtype != dtype:
        raise QuantizationError(
            f"{name} has shape {tuple(t.shape)} and dtype {t.dtype}; the config needs {shape} {dtype}"
        )
    return t


def layer_tensors(prefix: str, scheme: QuantScheme, k: int, n: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Checkpoint suffix -> (shape, dtype) of one quantized linear with K inputs and N outputs (g_idx: GPTQ only,
    optional). Raises when the layer's sizes cannot be packed by the format."""
    g, ng = scheme.groups(k)
    if scheme.method == "awq":
        if k % g or n % 8:
            raise QuantizationError(
                f"{prefix}: AWQ needs in_features ({k}) divisible by group_size ({g}) and "
                f"out_features ({n}) divisible by 8"
            )
        return {
            "qweight": ((k, n // 8), torch.int32),
            "qzeros": ((ng, n // 8), torch.int32),
            "scales": ((ng, n), torch.float16),
        }
    pf = 32 // scheme.bits
    if k % pf or n % pf:
        raise QuantizationError(
            f"{prefix}: GPTQ {scheme.bits}-bit needs in_features ({k}) and out_features ({n}) divisible by {pf}"
        )
    return {
        "qweight": ((k // pf, n), torch.int32),
        "qzeros": ((ng, n // pf), torch.int32),
        "scales": ((ng, n), torch.float16),
        "g_idx": ((k,), torch.int32),
    }


def read_awq(prefix: str, t: dict[str, torch.Tensor], scheme: QuantScheme, k: int, n: int) -> LayerStorage:
    """AutoAWQ GEMM: qweight int32 [K, N/8] and qzeros int32 [K/G, N/8] packed along N in AWQ_ORDER, scales
    float16 [K/G, N]; zeros as stored (`dequantize_gemm`)."""
    layout = layer_tensors(prefix, scheme, k, n)
    qw, qz, s = (_expect(f"{prefix}.{name}", t.get(name), *layout[name]) for name in ("qweight", "qzeros", "scales"))

    def logical(packed: torch.Tensor) -> torch.Tensor:  # (R, N/8) int32 -> (R, N) in logical column order
        b = _awq_sequential_bytes(packed)
        return unpack_nibbles(b, 2 * b.shape[1])

    q = _pairs_along_k(_awq_sequential_bytes(qw)) if k % 2 == 0 else pack_nibbles(logical(qw).t())
    return LayerStorage(q, s.t().contiguous(), logical(qz).t().to(torch.int16).contiguous(), None)


def _awq_sequential_bytes(packed: torch.Tensor) -> torch.Tensor:
    """AWQ int32 (R, C) -> uint8 (R, 4C) whose byte i holds columns 2i (low nibble) and 2i+1 (high).

    Nibble p of a word holds column AWQ_ORDER[p]; with the word's bytes b0..b3 (low nibble first) that puts
    columns 0, 2 in b0, 4, 6 in b1, 1, 3 in b2 and 5, 7 in b3."""
    b = packed.contiguous().view(torch.uint8).view(*packed.shape, 4)
    b0, b1, b2, b3 = b.unbind(-1)
    out = torch.empty_like(b)
    out[..., 0] = (b0 & 15) | (b2 << 4)  # columns 0, 1
    out[..., 1] = (b0 >> 4) | (b2 & 0xF0)  # 2, 3
    out[..., 2] = (b1 & 15) | (b3 << 4)  # 4, 5
    out[..., 3] = (b1 >> 4) | (b3 & 0xF0)  # 6, 7
    return out.view(packed.shape[0], -1)


def _pairs_along_k(b: torch.Tensor) -> torch.Tensor:
    """uint8 (K, N/2) with nibbles along N (byte i = columns 2i low, 2i+1 high), K even -> our qweight (N, K/2),
    nibbles along K: from rows 2m (E) and 2m+1 (O), column 2i's byte is E_i's low nibble | O_i's low nibble << 4,
    column 2i+1's is E_i's high nibble | O_i's high nibble."""
    even, odd = b[0::2], b[1::2]
    low = (even & 15) | (odd << 4)  # (K/2, N/2)
    high = (even >> 4) | (odd & 0xF0)
    return torch.stack((low.t(), high.t()), dim=1).reshape(b.shape[1] * 2, b.shape[0] // 2)


def read_gptq(prefix: str, t: dict[str, torch.Tensor], scheme: QuantScheme, k: int, n: int) -> LayerStorage:
    """AutoGPTQ v1: qweight int32 [K/pf, N] packed along K, qzeros int32 [n_groups, N/pf] packed along N and
    stored minus one (read back as field + 1, as `qlinear_cuda` does), scales float16 [n_groups, N], g_idx [K]."""
    bits = scheme.bits
    g, ng = scheme.groups(k)
    layout = layer_tensors(prefix, scheme, k, n)
    qw, qz, s = (_expect(f"{prefix}.{name}", t.get(name), *layout[name]) for name in ("qweight", "qzeros", "scales"))
    trivial = torch.arange(k, dtype=torch.int64) // g
    g_idx = t.get("g_idx")
    if g_idx is None:
        g_idx = trivial
    else:
        g_idx = _expect(f"{prefix}.g_idx", g_idx, (k,), torch.int32).long()
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= ng:
            raise QuantizationError(f"{prefix}.g_idx holds groups outside 0..{ng - 1}")
    q = _gptq_qweight(qw, bits)  # our layout, input order
    zeros = (_fields(qz, bits).to(torch.int16) + 1).t().contiguous()  # v1: stored minus one
    perm = None
    if not torch.equal(g_idx, trivial):
        # act-order: put each group's inputs side by side (stable, so a group keeps its inputs' order)
        perm = torch.sort(g_idx, stable=True).indices
        if not torch.equal(g_idx[perm], trivial):
            raise QuantizationError(
                f"{prefix}.g_idx gives groups of unequal sizes; only g_idx that assign "
                f"group_size ({g}) inputs to each group are supported"
            )
        q = pack_nibbles(unpack_nibbles(q, k)[:, perm]) if bits == 4 else q[:, perm].contiguous()
    return LayerStorage(q, s.t().contiguous(), zeros, perm)


def read_layer(prefix: str, tensors: dict[str, torch.Tensor], scheme: QuantScheme, k: int, n: int) -> LayerStorage:
    """One quantized linear's checkpoint tensors (suffix -> tensor) -> its storage."""
    reader = read_awq if scheme.method == "awq" else read_gptq
    return reader(prefix, tensors, scheme, k, n)


def packed_slices(prefix: str, scheme: QuantScheme, k: int, n: int, part) -> tuple[dict[str, Any], int]:
    """A tensor-parallel rank's share of one quantized layer of K inputs and N outputs: the slice of each
    checkpoint tensor (suffix -> weights.TensorSlice) that holds `part` of the logical weight (N, K) (dim 0: output
    rows n0..n1, a column-parallel layer; dim 1: inputs k0..k1, a row-parallel one), and the first group of the
    share (a row-parallel GPTQ share's g_idx counts from there). The packed dimension is cut between whole int32
    words, the grouped one between whole groups; a share that would cut inside either is refused, naming the sizes,
    as vLLM refuses it."""
    from ..weights import TensorSlice

    g, ng = scheme.groups(k)
    layout = layer_tensors(prefix, scheme, k, n)
    pf = 32 // scheme.bits  # fields per int32 word
    a, b = part.start, part.stop

    def cut(suffix: str, dim: int, per: int = 1) -> TensorSlice:  # indices a..b of the logical dim, `per` a word
        return TensorSlice(dim, a // per, -(-b // per), layout[suffix][0][dim])

    if part.dim == 0:  # output rows: packed along N in AWQ's qweight and both formats' qzeros
        words = 8 if scheme.method == "awq" else pf
        if a % words or b % words:
            raise QuantizationError(
                f"{prefix}: a tensor-parallel share of output rows {a}..{b} of {n} cuts {scheme.method.upper()}'s "
                f"packed words of {words} rows; this tensor_parallel_size does not split this checkpoint"
            )
        slices = {"scales": cut("scales", 1), "qzeros": cut("qzeros", 1, words)}
        slices["qweight"] = cut("qweight", 1, words if scheme.method == "awq" else 1)
        slices["bias"] = TensorSlice(0, a, b, n)
        return slices, 0
    if a % g or (b % g and b != k) or (scheme.method == "gptq" and (a % pf or b % pf)):
        raise QuantizationError(
            f"{prefix}: a tensor-parallel share of inputs {a}..{b} of {k} does not start and end at a group "
            f"boundary (group_size {scheme.group_size}); this tensor_parallel_size does not split this checkpoint"
        )
    groups = TensorSlice(0, a // g, -(-b // g), ng)
    slices = {"scales": groups, "qzeros": groups}
    if scheme.method == "awq":
        slices["qweight"] = cut("qweight", 0)
    else:
        slices["qweight"] = cut("qweight", 0, pf)
        slices["g_idx"] = cut("g_idx", 0)
    return slices, a // g
