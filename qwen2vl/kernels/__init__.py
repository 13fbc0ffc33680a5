"""CPU kernels for the decode step, compiled on first use, each with a plain-PyTorch reference path.

`WeightOnlyMatmul` (and the one-shot `gemm_bf16` / `gemm_int8`) computes Y = X @ W.T (+ bias) in float32 for a few
rows of X while streaming W once from memory as bf16 or int8 (per-row scale); the int8 product rounds X to int16 per
group of `GROUP` inputs first (`quantize_rows_int16` is the exact PyTorch statement of that rounding); `Q4Product`
is the same for 4-bit group-quantized weights (`qwen2vl.quant`). `rms_norm` and `rope_` are the decoder's
normalisation and rotary in one call each. Beside the decode step: `quantize_int8_rows` / `row_absmax` and
`quantize_q4_rows` quantize weights at load (the same bits as `qwen2vl.cpu.quantize_int8` and
`qwen2vl.quant.rtn.quantize_rtn`), and `dequantize_q4_rows` forms a 4-bit layer's weight for a many-row product (as
`QuantLinear.dequantize_stored`); `attention_bf16` and `rope_bf16` are the vision tower's attention and rotary over
bf16 rows under bf16 products (AVX-512 BF16 only; torch's scaled_dot_product_attention and apply_rope are their
PyTorch path). They come in one build per instruction set (`VARIANTS`: `gemv_avx512.c` where the CPU has AVX-512
F/BW, `gemv_avx2.c` where it has AVX2 and FMA, each with `decode_ops.c`; shipped in the wheel as package data),
compiled with the system C compiler into a per-user cache the first time they are needed; the best variant the CPU
supports (or the one qwen2vl.machine timed fastest) is used unless `use()` or QWEN2VL_KERNELS says otherwise. Where
there is no AVX2/FMA, no compiler, no sources, or the build or load fails, `available()` is False (one log line says
why) and callers use the reference path (`torch` ops), which the tests compare every variant against. Nothing here
is imported by the model files: `qwen2vl/cpu.py` applies these as an optional transform.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_HERE = Path(__file__).parent
_COMMON = ["-O3", "-mfma", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC"]  # no implicit FMAs: the small ops
# round like their PyTorch forms; the products use explicit FMA intrinsics


@dataclass(frozen=True)
class Variant:
    """One build of the kernels: the products' source, the CPU flags it needs, the compiler flags it takes."""

    name: str
    source: str
    cpu_flags: frozenset[str]
    cc_flags: tuple[str, ...]
    int16_q4_flags: frozenset[str] = frozenset()  # what gemm_q4_i16in (4-bit x int16 inputs) needs beyond cpu_flags


VARIANTS = (  # best first
    Variant(
        "avx512",
        "gemv_avx512.c",
        frozenset({"avx512f", "avx512bw", "avx2", "fma"}),
        ("-mavx512f", "-mavx512bw", "-mavx2"),
        frozenset({"avx512_vnni"}),  # compiled for VNNI on that function only
    ),
    Variant("avx2", "gemv_avx2.c", frozenset({"avx2", "fma", "f16c"}), ("-mavx2", "-mf16c")),
)
MAX_ROWS = 64  # beyond a few dozen rows the product is compute-bound and torch's float32 GEMM wins
ROWS_AT_ONCE = (
    2048  # load-time quantizers work this many rows at a time (a block's pages then go back; PyTorch widens it)
)
GROUP = 128  # the integer products: inputs sharing one scale of the rounded x (GROUP and XMAX in gemv_common.h)
XMAX = 32512  # the rounded x's largest value (127 * 256: the 4-bit product splits it into two signed bytes)


@cache  # read once: the decode step asks ~100 times (each norm and rotary call picks the variant)
def _cpu_flags() -> frozenset[str]:
    try:
        return frozenset(next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split())
    except (OSError, StopIteration):
        return frozenset()


def supported() -> list[str]:
    """The variants this CPU can run, best first (empty: no AVX2/FMA, or not x86-64 Linux)."""
    return list(_supported())


@cache  # the decode step asks ~100 times per token (through variant())
def _supported() -> tuple[str, ...]:
    flags = _cpu_flags()
    return tuple(v.name for v in VARIANTS if v.cpu_flags <= flags)


_forced: list[str | None] = [None]
_preferred: list[str | None] = [None]


def use(name: str | None) -> None:
    """Run the kernels of variant `name` ("avx512", "avx2"), "off" for the PyTorch path, or None for the best this
    CPU supports (the default; the environment variable QWEN2VL_KERNELS sets the same). Applies to weights bound
    after the call; tests use it to run every variant against the PyTorch path."""
    if name not in (None, "off", *(v.name for v in VARIANTS)):
        raise ValueError(f"unknown kernel variant {name!r}; choose from {[v.name for v in VARIANTS]}, 'off' or None")
    _forced[0] = name


def forced() -> str | None:
    """The variant forced by use() or QWEN2VL_KERNELS ("off" included), or None."""
    return _forced[0] or os.environ.get("QWEN2VL_KERNELS") or None


def prefer(name: str | None) -> None:
    """Make `name` the default variant (qwen2vl.machine calls this with the one it timed fastest on this CPU)."""
    _preferred[0] = name


def variant() -> str | None:
    """The variant in use: the forced one, else the preferred one, else the best supported; None: PyTorch path."""
    name = forced()
    if name == "off":
        return None
    if name is not None and name not in _supported():
        log.warning("qwen2vl kernels: variant %r is not supported by this CPU; using the PyTorch path", name)
        return None
    if name is None and _preferred[0] in _supported():
        name = _preferred[0]
    return name or next(iter(_supported()), None)


_variant_in_use = variant  # for functions whose `variant` parameter hides it


def builds(name: str) -> bool:
    """Whether variant `name` compiles and loads here."""
    return _build(name) is not None


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "qwen2vl" / "kernels"


def _library() -> ctypes.CDLL | None:
    name = variant()
    return None if name is None else _build(name)


@cache
def _build(name: str) -> ctypes.CDLL | None:
    """Variant `name` compiled and loaded, or None (with one log line saying why) wherever it cannot be: no
    compiler, missing sources, a failed build, an unwritable cache, a library that does not load."""
    try:
        return _build_and_load(next(v for v in VARIANTS if v.name == name))
    except (OSError, subprocess.SubprocessError, AttributeError) as e:  # AttributeError: a symbol is missing
        log.warning(
            "qwen2vl kernels: %s unavailable (%s: %s); using the slower PyTorch path", name, type(e).__name__, e
        )
        return None


def _sources(spec: Variant) -> tuple[Path, Path]:
    return _HERE / spec.source, _HERE / "decode_ops.c"


def _built_path(spec: Variant) -> Path:
    """Where the library built from these sources and flags lives (raises OSError where a source is missing)."""
    flags = [*_COMMON, *spec.cc_flags]
    files = (*_sources(spec), _HERE / "gemv_common.h")
    digest = hashlib.sha256(" ".join(flags).encode() + b"".join(f.read_bytes() for f in files)).hexdigest()
    return _cache_dir() / f"qwen2vl-kernels-{spec.name}-{digest[:16]}.so"


def _build_and_load(spec: Variant) -> ctypes.CDLL:
    sources, flags, target = _sources(spec), [*_COMMON, *spec.cc_flags], _built_path(spec)
    if not target.exists():
        compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
        if compiler is None:
            raise OSError("no C compiler found (set CC)")
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            cmd = [compiler, *flags, *map(str, sources), "-o", str(out), "-lm"]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                raise OSError(f"the build failed: {res.stderr.strip()[-2000:]}")
            os.replace(out, target)  # atomic: concurrent first uses do not see half a file
    lib = ctypes.CDLL(str(target))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    for fn in (lib.gemm_bf16, lib.gemm_i8):  # (w, scale, bias, x, y, n, k, m, threads) -> 0, or -1 out of memory
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
        fn.restype = ctypes.c_int
    # (qweight, scales, zeros, bias, x, y, n, k, m, group, threads) -> 0, -1 out of memory, -2 unsupported shape
    lib.gemm_q4.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
    lib.gemm_q4.restype = ctypes.c_int
    for q4 in (getattr(lib, "gemm_q4_bf16in", None), lib.gemm_q4_i16in):  # same arguments; bf16in as gemm_bf16_bf16in
        if q4 is not None:
            q4.argtypes, q4.restype = lib.gemm_q4.argtypes, ctypes.c_int
    bf16_inputs = getattr(lib, "gemm_bf16_bf16in", None)  # AVX-512 build only; runs where the CPU has AVX-512 BF16
    if bf16_inputs is not None:
        bf16_inputs.argtypes, bf16_inputs.restype = lib.gemm_bf16.argtypes, ctypes.c_int
    attention = getattr(lib, "attention_bf16", None)  # likewise
    if attention is not None:  # (q, k, v, out, nq, nk, heads, d, q/k/v/out row strides, scale, threads)
        attention.argtypes = [ptr] * 4 + [i64] * 8 + [ctypes.c_float, ctypes.c_int]
        attention.restype = ctypes.c_int  # 0, or -1 out of memory
        # (qkv, row stride, cos, sin, q_out, k_out, rows, heads, dim, threads)
        lib.rope_bf16.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
        lib.rope_bf16.restype = None
    c_int = ctypes.c_int
    # (w, bf16, q, scale, n, k, amax_only, given_amax, threads) / (w, bf16, packed, scales, zeros, n, k, group, threads)
    lib.quantize_int8_rows.argtypes = [ptr, c_int, ptr, ptr, i64, i64, c_int, c_int, c_int]
    lib.quantize_q4_rows.argtypes = [ptr, c_int, ptr, ptr, ptr, i64, i64, i64, c_int]
    lib.quantize_int8_rows.restype = lib.quantize_q4_rows.restype = c_int  # 0, or -1 out of memory
    # (packed, scales, zeros, out, out_bf16, n, k, group, threads)
    lib.dequantize_q4_rows.argtypes = [ptr, ptr, ptr, ptr, c_int, i64, i64, i64, c_int]
    lib.dequantize_q4_rows.restype = None
    # (q, k_new, v_new, ck, cv, out, batch, heads, kv_heads, dim, max_len, pos, rows, mask, mask_stride, scale,
    # threads)
    lib.decode_attention.argtypes = [ptr] * 6 + [i64] * 5 + [ptr] * 3 + [i64, ctypes.c_float, ctypes.c_int]
    lib.decode_attention.restype = ctypes.c_int  # 0, or -1 out of memory
    lib.rms_norm.argtypes = [ptr, ptr, ptr, i64, i64, ctypes.c_float]
    lib.rope.argtypes = [ptr, ptr, ptr, i64, i64, i64]
    for fn in (lib.rms_norm, lib.rope):
        fn.restype = None
    return lib


def available() -> bool:
    return _library() is not None


_threads = torch.get_num_threads


INPUTS = ("float32", "bf16")  # what a bf16 weight is multiplied with: x as given, or x rounded to bf16
Q4_INPUTS = (*INPUTS, "int16")  # what a 4-bit weight may be multiplied with (see Q4Product)


def native_bf16_inputs(variant: str | None = None) -> bool:
    """Whether bf16-input products (`inputs="bf16"`) run as pairs of bf16 in one instruction (AVX-512 BF16, in the
    avx512 build) rather than as the float32 kernel on x rounded to bf16 first: same maths, fewer bytes and
    instructions per weight."""
    lib = _build(variant) if variant else _library()
    return lib is not None and hasattr(lib, "gemm_bf16_bf16in") and "avx512_bf16" in _cpu_flags()


def int16_q4_inputs(variant: str | None = None) -> bool:
    """Whether `Q4Product(..., inputs="int16")` runs here: the 4-bit product on x rounded to int16 (integer dot
    products of nibbles and bytes: vpdpbusd on AVX-512 VNNI, vpmaddubsw on AVX2)."""
    name = variant or _variant_in_use()
    spec = next((v for v in VARIANTS if v.name == name), None)
    return spec is not None and _build(name) is not None and spec.int16_q4_flags <= _cpu_flags()


class WeightOnlyMatmul:
    """Y = X @ W.T (+ bias) for W stored as bf16, or as int8 with a float32 scale per row; X (M <= MAX_ROWS, K)
    float32. The matrix is validated once here, so a call costs one ctypes call (decoding makes ~200 per token).

    inputs="bf16" (bf16 weights only): X is rounded to bf16 (nearest even, as torch's .to(torch.bfloat16)) and
    multiplied in float32: Y = X.to(bf16).float() @ W.float().T, up to summation order. The model uses it where its
    products compute in bf16 (`qwen2vl.machine`); on a CPU with AVX-512 BF16 it is the faster product."""

    def __init__(
        self,
        w: torch.Tensor,
        scale: torch.Tensor | None = None,
        bias: torch.Tensor | None = None,
        variant: str | None = None,
        inputs: str = "float32",
    ) -> None:
        lib = _loaded(variant)
        if w.dim() != 2 or w.shape[1] % 8:
            raise ValueError(f"weight must be a matrix with K % 8 == 0, got {tuple(w.shape)}")
        if inputs not in INPUTS or (inputs == "bf16" and scale is not None):
            raise ValueError(f"inputs must be one of {INPUTS} ('bf16' for bf16 weights only), not {inputs!r}")
        n = w.shape[0]
        _check(
            ("weight", w, torch.bfloat16 if scale is None else torch.int8, tuple(w.shape)),
            ("scale", scale, torch.float32, (n,)),
            ("bias", bias, torch.float32, (n,)),
        )
        self.n, self.k = w.shape
        self.tensors = (w, scale, bias)  # kept alive: the kernel reads them through raw pointers
        self._fn = lib.gemm_bf16 if scale is None else lib.gemm_i8
        self._round = inputs == "bf16"  # round x in torch before the float32 kernel
        if self._round and native_bf16_inputs(variant):
            self._fn, self._round = lib.gemm_bf16_bf16in, False
        # which product runs: "bf16", "bf16 pairs" (AVX-512 BF16), "bf16 on rounded x" (the float32 kernel), "int8"
        self.kind = "int8" if scale is not None else "bf16 on rounded x" if self._round else "bf16"
        if self._fn is getattr(lib, "gemm_bf16_bf16in", None):
            self.kind = "bf16 pairs"
        self._head = tuple(None if t is None else t.data_ptr() for t in self.tensors)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self._round and x.dtype == torch.float32:
            x = x.to(torch.bfloat16).float()
        return _call(self._fn, self._head, (), x, self.n, self.k)


class Q4Product:
    """Y = X @ W.T (+ bias) for a 4-bit group-quantized W in `qwen2vl.quant.QuantLinear`'s layout: qweight uint8
    (N, K/2), two columns per byte (low nibble first); scales float16 and zeros int16 (N, K/G). The kernel multiplies
    exactly the reference weight float16((q - z) * s), in float32. X (M <= MAX_ROWS, K) float32; K and G multiples
    of 32 (`supports`).

    inputs="bf16" (where `native_bf16_inputs()` and `pairs_fit(K, G)`): X and the weight's float16 values both
    rounded to bf16, multiplied as bf16 pairs with float32 sums, Y = X.bf16 @ W.bf16.T up to summation order, as
    the model's bf16 products compute a 4-bit layer over a prompt.

    inputs="int16" (where `int16_q4_inputs()` and `int16_fits(K, G)`): X rounded to int16 as the int8 product rounds
    it (`quantize_rows_int16`: per GROUP inputs, |error| <= 1/65024 of their largest) times the unrounded weight
    (q - z) * s, in integer dot products exact in int32 per chunk of columns, float32 beyond: Y = X' @ W'.T up to
    summation order (`int16_reference` states it). The fastest of the three (no table lookup or conversion per
    weight) and, with x 16-bit, closer to the float32 product than bf16 pairs; the model uses it under bf16
    products."""

    def __init__(
        self,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        zeros: torch.Tensor,
        group: int,
        bias: torch.Tensor | None = None,
        variant: str | None = None,
        inputs: str = "float32",
    ) -> None:
        lib = _loaded(variant)
        n, k = qweight.shape[0], qweight.shape[1] * 2
        if not self.supports(k, group):
            raise ValueError(f"the 4-bit kernel needs K and the group size to be multiples of 32, got {k}, {group}")
        if inputs not in Q4_INPUTS or (
            (inputs == "bf16" and not (native_bf16_inputs(variant) and self.pairs_fit(k, group)))
            or (inputs == "int16" and not (int16_q4_inputs(variant) and self.int16_fits(k, group)))
        ):
            raise ValueError(
                f"inputs must be one of {Q4_INPUTS}; 'bf16' needs AVX-512 BF16 and K, group multiples of 64, 'int16' "
                f"VNNI (AVX-512 builds) and K, group multiples of {GROUP}, not {inputs!r} with {k}, {group}"
            )
        groups = -(-k // group)
        _check(
            ("qweight", qweight, torch.uint8, (n, k // 2)),
            ("scales", scales, torch.float16, (n, groups)),
            ("zeros", zeros, torch.int16, (n, groups)),
            ("bias", bias, torch.float32, (n,)),
        )
        self.n, self.k, self.group = n, k, group
        self.tensors = (qweight, scales, zeros, bias)  # kept alive: the kernel reads them through raw pointers
        self._head = tuple(None if t is None else t.data_ptr() for t in self.tensors)
        self._fn = {"float32": lib.gemm_q4, "bf16": getattr(lib, "gemm_q4_bf16in", None), "int16": lib.gemm_q4_i16in}[
            inputs
        ]
        self.kind = {"float32": "4-bit", "bf16": "4-bit bf16 pairs", "int16": "4-bit int16 inputs"}[inputs]

    @staticmethod
    def supports(k: int, group: int) -> bool:
        return k % 32 == 0 and group % 32 == 0

    @staticmethod
    def pairs_fit(k: int, group: int) -> bool:
        """Whether the bf16-pairs product takes this shape (64 columns per step, never across a group)."""
        return k % 64 == 0 and group % 64 == 0

    @staticmethod
    def int16_fits(k: int, group: int) -> bool:
        """Whether the int16-input product takes this shape (GROUP columns per step, never across a group)."""
        return k % GROUP == 0 and group % GROUP == 0

    @staticmethod
    def int16_reference(
        x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int
    ) -> torch.Tensor:
        """What inputs="int16" computes, in PyTorch (float64, without bias): X' @ W'.T, X' the rows as
        `quantize_rows_int16` rounds them, W' = (q - z) * s unrounded."""
        k = qweight.shape[1] * 2
        q = torch.stack((qweight & 15, qweight >> 4), dim=-1).view(qweight.shape[0], k)
        z, s = (t.repeat_interleave(group, dim=1)[:, :k].double() for t in (zeros, scales))
        xq, xs = quantize_rows_int16(x)
        return (xq.double() * xs.double()) @ ((q.double() - z) * s).T

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return _call(self._fn, self._head, (self.group,), x, self.n, self.k)


def _loaded(variant: str | None) -> ctypes.CDLL:
    """The library of `variant` (default: the one in use), or RuntimeError where it is not available."""
    lib = _build(variant) if variant else _library()
    if lib is None:
        raise RuntimeError("qwen2vl kernels are not available on this machine (see kernels.available())")
    return lib


def _check(*specs: tuple[str, torch.Tensor | None, torch.dtype, tuple[int, ...]]) -> None:
    """Each (name, tensor or None, dtype, shape): a contiguous CPU tensor of that dtype and shape, or ValueError."""
    for name, t, dtype, shape in specs:
        if t is not None and (
            t.dtype != dtype or tuple(t.shape) != shape or not t.is_contiguous() or t.device.type != "cpu"
        ):
            raise ValueError(
                f"{name} must be a contiguous CPU {dtype} tensor of {shape}, got {t.dtype} {tuple(t.shape)}"
            )


def _call(fn, head: tuple, extra: tuple, x: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """One product: fn(*head, x, y, n, k, m, *extra, threads) on x (M <= MAX_ROWS, K) float32 -> y (M, N)."""
    m = x.shape[0]
    if x.dim() != 2 or x.shape[1] != k or not 0 < m <= MAX_ROWS or x.dtype != torch.float32:
        raise ValueError(f"x must be float32 (1..{MAX_ROWS}, {k}), got {x.dtype} {tuple(x.shape)}")
    x = x.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    if fn(*head, x.data_ptr(), y.data_ptr(), n, k, m, *extra, _threads()) != 0:
        raise MemoryError("qwen2vl kernels: could not allocate the input scratch buffer")
    return y


def gemm_bf16(
    x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None, inputs: str = "float32"
) -> torch.Tensor:
    """x (M, K) float32, w (N, K) bfloat16, bias (N,) float32 -> (M, N) float32 (inputs: see WeightOnlyMatmul)."""
    return WeightOnlyMatmul(w, None, bias, inputs=inputs)(x)


def gemm_int8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) float32, w (N, K) int8, scale (N,) float32 -> (M, N) float32 = x' @ (w * scale[:, None]).T + bias,
    where x' is x rounded to int16 per group of GROUP inputs (see `quantize_rows_int16`)."""
    return WeightOnlyMatmul(w, scale, bias)(x)


def _contiguous_cpu_float32(*tensors: torch.Tensor) -> bool:
    return all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor | None:
    """weight * x / sqrt(mean(x^2) + eps) over the last dimension; None when x, weight are not contiguous CPU
    float32 (the caller then uses PyTorch)."""
    lib = _library()
    if lib is None or not _contiguous_cpu_float32(x, weight) or weight.shape != x.shape[-1:]:
        return None
    y = torch.empty_like(x)
    lib.rms_norm(x.data_ptr(), weight.data_ptr(), y.data_ptr(), x.numel() // x.shape[-1], x.shape[-1], eps)
    return y


def rope_(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x * cos + rotate_half(x) * sin written into x, for x (B, heads, L, D) laid out as (B, L, heads, D) (a
    projection's output viewed per head) and cos, sin (B, 1, L, D); None (x untouched) for any other layout."""
    if x.dim() != 4 or cos.shape != (x.shape[0], 1, x.shape[2], x.shape[3]) or sin.shape != cos.shape:
        return None
    rows_first = x.transpose(1, 2)
    lib = _library()
    if lib is None or not _contiguous_cpu_float32(rows_first, cos, sin):
        return None
    b, heads, n, d = x.shape
    lib.rope(rows_first.data_ptr(), cos.data_ptr(), sin.data_ptr(), b * n, heads, d)
    return x


def decode_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache_k: torch.Tensor,
    cache_v: torch.Tensor,
    positions: list[int],
    mask: torch.Tensor | None = None,
    rows: list[int] | None = None,
) -> torch.Tensor | None:
    """One decode step's attention in one call. Row b of k, v (B, KVH, 1, D) goes to slot positions[b] of cache row
    rows[b] (default: b) of cache_k/cache_v (rows, KVH, max_len, D); then, per row, F.scaled_dot_product_attention
    of q[b] (H, 1, D) over that cache row's slots 0..positions[b] (grouped-query; where `mask` (B, 1, 1, T) bool
    allows, T > every position). The result is (B, H, 1, D) laid out as (B, 1, H, D), as attention's caller
    reshapes it. None (nothing written) where the kernels or these layouts do not fit (q, k, v a projection's output
    viewed per head, float32, contiguous caches, D % 8 == 0): the caller then uses PyTorch."""
    lib = _library()
    if lib is None or q.dim() != 4 or q.shape[2] != 1 or k.dim() != 4 or k.shape[2] != 1:
        return None
    b, heads, _, d = q.shape
    slots, kvh, max_len = cache_k.shape[:3]
    row_list = list(range(b)) if rows is None else rows
    fresh = [t.transpose(1, 2) for t in (q, k, v)]  # (B, 1, heads, D): contiguous when fresh from a projection
    if (
        d % 8
        or heads % kvh
        or len(positions) != b
        or len(row_list) != b
        or not all(0 <= p < max_len for p in positions)
        or not all(0 <= r < slots for r in row_list)
        or len(set(row_list)) != b
        or cache_k.shape != (slots, kvh, max_len, d)
        or cache_v.shape != cache_k.shape
        or k.shape != (b, kvh, 1, d)
        or v.shape != k.shape
        or not _contiguous_cpu_float32(*fresh, cache_k, cache_v)
    ):
        return None
    keep = None
    if mask is not None:
        if (
            mask.dtype != torch.bool
            or mask.dim() != 4
            or mask.shape[:3] != (b, 1, 1)
            or mask.shape[3] <= max(positions)
        ):
            return None
        keep = mask.reshape(b, -1).contiguous()
    pos, at = torch.tensor(positions, dtype=torch.int64), torch.tensor(row_list, dtype=torch.int64)
    out = torch.empty(b, 1, heads, d)
    status = lib.decode_attention(
        *(t.data_ptr() for t in (*fresh, cache_k, cache_v, out)), b, heads, kvh, d, max_len, pos.data_ptr(),
        at.data_ptr(), None if keep is None else keep.data_ptr(), 0 if keep is None else keep.stride(0), d**-0.5,
        _threads(),
    )  # fmt: skip
    _ok(status)
    return out.transpose(1, 2)


def _attention_library(variant: str | None = None) -> ctypes.CDLL | None:
    """The avx512 build where it runs attention_bf16 here: a CPU with AVX-512 BF16, kernels not off and no other
    variant forced (the decode products' timed preference does not matter: the other variant has no attention)."""
    name = variant or forced() or "avx512"
    if name != "avx512" or name not in _supported() or "avx512_bf16" not in _cpu_flags():
        return None
    lib = _build(name)
    return lib if lib is not None and hasattr(lib, "attention_bf16") else None


def bf16_attention_runs(variant: str | None = None) -> bool:
    """Whether `attention_bf16` runs here (see _attention_library)."""
    return _attention_library(variant) is not None


def attention_bf16(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor) -> bool:
    """out = F.scaled_dot_product_attention over one segment, per head, for bf16 rows laid out as the vision
    tower holds them: q, out (queries, heads, D), k, v (keys, heads, D), each row's heads contiguous (any row
    stride). The arithmetic of torch's CPU flash attention on bf16 (float32 scores and exponentials, these rounded
    to bf16 for the product with v, float32 sums, one division), at the bf16 instruction's rate. Each (row, head)
    is computed alone: any split of the rows or heads gives the same bits. False (nothing written) where it does not
    run here or the layouts differ: the caller then uses PyTorch."""
    lib = _attention_library()
    if lib is None or q.dim() != 3:
        return False
    nq, heads, d = q.shape
    nk = k.shape[0]
    tensors = (q, k, v, out)
    if (
        nk == 0
        or k.shape != (nk, heads, d)
        or v.shape != k.shape
        or out.shape != q.shape
        or not all(t.dtype == torch.bfloat16 and t.device.type == "cpu" and not t.requires_grad for t in tensors)
        or not all(t.stride(2) == 1 and t.stride(1) == d for t in tensors)
    ):
        return False  # (no autograd through the kernel: training takes PyTorch's path)
    if nq:
        status = lib.attention_bf16(
            *(t.data_ptr() for t in tensors), nq, nk, heads, d, *(t.stride(0) for t in tensors), d**-0.5, _threads()
        )
        _ok(status)
    return True


def rope_bf16(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The vision tower's rotary on bf16 (`apply_rotary_pos_emb_vision`: q, k upcast to float32, x * cos +
    rotate_half(x) * sin, back to bf16) in one pass, the same bits: qkv (N, 3, heads, D) bf16, a projection's output
    viewed per head (any row stride); cos, sin (N, D) float32, contiguous. Returns new contiguous q, k (N, heads, D);
    None where it does not run here (as attention_bf16) or the layouts differ."""
    lib = _attention_library()
    if lib is None or qkv.dim() != 4:
        return None
    n, three, heads, d = qkv.shape
    if (
        three != 3
        or d % 2
        or qkv.dtype != torch.bfloat16
        or qkv.device.type != "cpu"
        or qkv.requires_grad  # no autograd through the kernel
        or qkv.stride()[1:] != (heads * d, d, 1)
        or cos.shape != (n, d)
        or sin.shape != cos.shape
        or not _contiguous_cpu_float32(cos, sin)
    ):
        return None
    q, k = (qkv.new_empty(n, heads, d) for _ in range(2))
    lib.rope_bf16(
        qkv.data_ptr(), qkv.stride(0), cos.data_ptr(), sin.data_ptr(), q.data_ptr(), k.data_ptr(), n, heads, d,
        _threads(),
    )  # fmt: skip
    return q, k


def quantize_rows_int16(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The integer products' rounding of their input (int8 weights; 4-bit weights with inputs="int16"), in PyTorch:
    x (M, K) float32 -> q (M, K) int16 values and the scale of every input, s (M, K), with x ~ q * s; one scale
    max|x| / XMAX per row and group of GROUP inputs (1 for an all-zero group, NaN for a group holding a NaN),
    q = round(x * (1 / s)) to nearest even."""
    m, k = x.shape
    groups = -(-k // GROUP)
    padded = torch.nn.functional.pad(x, (0, groups * GROUP - k)).view(m, groups, GROUP)
    amax = padded.abs().amax(-1, keepdim=True)
    s = torch.where(amax > 0, amax / float(XMAX), torch.ones_like(amax))
    s = torch.where(amax.isnan(), amax, s)  # a NaN input makes its group's scale NaN: the products are NaN too
    q = torch.round(padded * (1.0 / s)).clamp_(-XMAX, XMAX)
    return q.view(m, -1)[:, :k], s.expand(m, groups, GROUP).reshape(m, -1)[:, :k]


def _quantizable(w: torch.Tensor) -> ctypes.CDLL | None:
    """The library, where `w` is a matrix the quantizers read (contiguous CPU bf16 or float32); else None."""
    lib = _library()
    ok = w.dim() == 2 and w.dtype in (torch.bfloat16, torch.float32) and w.device.type == "cpu" and w.is_contiguous()
    return lib if ok else None


def row_absmax(w: torch.Tensor) -> torch.Tensor | None:
    """Each row's largest |w| (float32), one pass over w (bf16 or float32); None where the kernels or this w do
    not fit."""
    lib = _quantizable(w)
    if lib is None:
        return None
    amax = torch.empty(w.shape[0], dtype=torch.float32)
    _ok(
        lib.quantize_int8_rows(
            w.data_ptr(), int(w.dtype == torch.bfloat16), None, amax.data_ptr(), *w.shape, 1, 0, _threads()
        )
    )
    return amax


def quantize_int8_rows(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, amax: torch.Tensor | None = None) -> bool:
    """Rows of `qwen2vl.cpu.quantize_int8` in one pass over w (bf16 or float32, no float32 copy), the same bits,
    written into q (int8, w's shape) and scale (float32, one per row); `amax`: the rows' largest |w| to scale by
    (tensor parallelism's, reduced over the ranks) instead of w's own. False (nothing written) where the kernels or
    these tensors do not fit: the caller then uses PyTorch."""
    lib = _quantizable(w)
    if lib is None:
        return False
    n, k = w.shape
    try:
        _check(("q", q, torch.int8, (n, k)), ("scale", scale, torch.float32, (n,)), ("amax", amax, torch.float32, (n,)))
    except ValueError:
        return False
    if amax is not None:
        scale.copy_(amax)
    head = (w.data_ptr(), int(w.dtype == torch.bfloat16), q.data_ptr(), scale.data_ptr(), n, k)
    _ok(lib.quantize_int8_rows(*head, 0, int(amax is not None), _threads()))
    return True


def quantize_q4_rows(w: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`qwen2vl.quant.rtn.quantize_rtn` in one pass over w (bf16 or float32): (packed uint8 (N, ceil(K/2)), scales
    float16 (N, groups), zeros int16 (N, groups)), the same bits; None where the kernels or this w do not fit."""
    lib = _quantizable(w)
    if lib is None:
        return None
    n, k = w.shape
    groups = -(-k // group)
    packed = torch.empty(n, (k + 1) // 2, dtype=torch.uint8)
    scales, zeros = torch.empty(n, groups, dtype=torch.float16), torch.empty(n, groups, dtype=torch.int16)
    _ok(lib.quantize_q4_rows(
        w.data_ptr(), int(w.dtype == torch.bfloat16), packed.data_ptr(), scales.data_ptr(), zeros.data_ptr(),
        n, k, group, _threads(),
    ))  # fmt: skip
    return packed, scales, zeros


def dequantize_q4_rows(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group: int, k: int, dtype: torch.dtype
) -> torch.Tensor | None:
    """`QuantLinear.dequantize_stored().to(dtype)` in one pass (dtype float32, exact, or bfloat16): the weight a
    many-row product multiplies; None where the kernels or these tensors do not fit (the caller uses PyTorch)."""
    lib = _library()
    n, groups = qweight.shape[0], -(-k // group)
    if lib is None or dtype not in (torch.float32, torch.bfloat16):
        return None
    try:
        _check(
            ("qweight", qweight, torch.uint8, (n, (k + 1) // 2)),
            ("scales", scales, torch.float16, (n, groups)),
            ("zeros", zeros, torch.int16, (n, groups)),
        )
    except ValueError:
        return None
    out = torch.empty(n, k, dtype=dtype)
    lib.dequantize_q4_rows(
        qweight.data_ptr(), scales.data_ptr(), zeros.data_ptr(), out.data_ptr(), int(dtype == torch.bfloat16),
        n, k, group, _threads(),
    )  # fmt: skip
    return out


def _ok(status: int) -> None:
    if status != 0:
        raise MemoryError("qwen2vl kernels: could not allocate a row buffer")
