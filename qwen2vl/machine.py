"""What this CPU can do, and which path each kind of CPU work takes on it: decided once, at load.

Many-row matrix products (the vision tower, prefill) have two paths on CPU: widen the compact weight to float32 and
call torch's float32 GEMM (exact; the fast choice where bf16 matrix units are missing, e.g. an AVX2-only Zen 3,
where torch's bf16 GEMM is emulated at ~20 GFLOP/s), or torch's native bf16 GEMM (oneDNN, which uses AVX-512 BF16 and
AMX on x86 and BF16 instructions on ARM, 2-3x float32's rate there). The choice comes from the CPU's flags plus a
short timing of both paths on the model's own largest shape, cached per CPU, torch version and shape so that a
second load does not time again. `choose()` returns it with the reason, which `--verbose` and the benchmarks print.
The decode step's few-row products always go through `qwen2vl.kernels` where it built (its variant is named here
too), else torch.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MATMUL_PATHS = ("float32", "bf16")  # how many-row products compute (see module docstring)
_TIMING_ROWS = 256  # rows of the timed product: one prefill chunk, a few hundred vision patches
_MARGIN = 1.1  # bf16 must win by this factor: its drift is only worth a clear gain
_MIN_WEIGHTS = 1 << 22  # below this many weights in the largest matrix, products are too small to time or to matter


@dataclass(frozen=True)
class CpuFacts:
    model: str  # as /proc/cpuinfo names it
    arch: str  # platform.machine()
    flags: frozenset[str]

    @property
    def native_bf16(self) -> bool:
        """bf16 matrix instructions: AVX-512 BF16 or AMX on x86, the BF16 extension on ARM."""
        return bool({"avx512_bf16", "amx_bf16", "bf16"} & self.flags)

    def summary(self) -> str:
        shown = sorted(f for f in self.flags if f.startswith(("avx", "amx", "fma", "f16c", "asimd", "sve", "bf16")))
        return f"{self.model} ({self.arch}; {' '.join(shown) or 'no SIMD flags read'})"


@lru_cache(maxsize=1)
def cpu_facts() -> CpuFacts:
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())  # the first processor's lines
    except OSError:
        pass
    model = fields.get("model name") or fields.get("Hardware") or platform.processor() or "unknown CPU"
    if "cpu family" in fields:  # virtual machines often name only the brand ("AMD EPYC"): the family tells the kind
        model += f" (family {fields['cpu family']}, model {fields.get('model', '?')})"
    flags = fields.get("flags") or fields.get("Features") or ""  # x86 calls them flags, ARM Features
    return CpuFacts(model, platform.machine(), frozenset(flags.split()))


@dataclass(frozen=True)
class CpuChoice:
    """The path of each kind of CPU work, and why."""

    matmul: str  # one of MATMUL_PATHS
    matmul_reason: str
    gemv: str  # the decode kernels' variant ("avx2", ...) or "torch"
    # the vision tower's attention under bf16 products: "avx512_bf16" (kernels.attention_bf16) or "torch" (sdpa)
    vision_attention: str = "torch"

    def describe(self) -> str:
        return (
            f"CPU {cpu_facts().summary()}, torch {torch.__version__}: many-row products in {self.matmul} "
            f"({self.matmul_reason}); few-row products through {self.gemv}; vision attention through "
            f"{self.vision_attention}"
        )


def _cache_file() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "qwen2vl" / "cpu-choice.json"


def _key(facts: CpuFacts, shape: tuple[int, int], threads: int) -> str:
    text = json.dumps([facts.model, sorted(facts.flags), torch.__version__, list(shape), threads])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def time_matmul_paths(shape: tuple[int, int], rows: int = _TIMING_ROWS, repeats: int = 3) -> dict[str, float]:
    """Best-of-`repeats` seconds of one (rows, K) x (N, K)^T product for a bf16 weight of `shape` = (N, K), by
    each path as `qwen2vl.cpu` runs it (float32: widen the weight, then float32 GEMM; bf16: native bf16 GEMM)."""
    n, k = shape
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    x = torch.randn(rows, k, generator=gen)
    paths = {"float32": lambda: F.linear(x, w.float()), "bf16": lambda: F.linear(x.to(torch.bfloat16), w).float()}
    best = {}
    for name, run in paths.items():
        run()  # first call: oneDNN builds its kernel
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            run()
            times.append(time.perf_counter() - t0)
        best[name] = min(times)
    return best


def _remembered(what: str, shape: tuple[int, int], decide) -> tuple[str, str]:
    """(choice, reason) for decision `what` on `shape`: from this machine's cache, else `decide()` (a timing),
    written to the cache. Keyed by CPU model and flags, torch version, shape and thread count."""
    facts = cpu_facts()
    cache, key = _cache_file(), what + ":" + _key(facts, shape, torch.get_num_threads())
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        entry = known[key]
        return entry["choice"], entry["reason"] + " (timed earlier on this machine)"
    choice, reason = decide()
    known[key] = {"choice": choice, "reason": reason}
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, cache)  # atomic: concurrent loads never read half a file
    except OSError as e:
        log.info("qwen2vl: could not cache the CPU choice in %s (%s)", cache, e)
    return choice, reason


def _decide_matmul(shape: tuple[int, int]) -> tuple[str, str]:
    if not cpu_facts().native_bf16:
        return "float32", "no bf16 matrix instructions (AVX-512 BF16, AMX, ARM BF16): torch's bf16 GEMM is emulated"

    def timed() -> tuple[str, str]:
        t = time_matmul_paths(shape)
        flops = 2 * _TIMING_ROWS * shape[0] * shape[1]
        rates = f"bf16 {flops / t['bf16'] / 1e9:.0f} vs float32 {flops / t['float32'] / 1e9:.0f} GFLOP/s"
        matmul = "bf16" if t["bf16"] * _MARGIN < t["float32"] else "float32"
        return matmul, f"timed on a {_TIMING_ROWS}x{shape[1]}x{shape[0]} product: {rates}"

    return _remembered("matmul", shape, timed)


def time_kernel_variants(
    shape: tuple[int, int], variants: list[str], repeats: int = 5, inputs: str = "float32"
) -> dict[str, float]:
    """Best-of-`repeats` seconds of a decode step's worth of few-row products on a bf16 weight of `shape`: one row
    and four rows (batch 1 and 4), by each kernel variant, on inputs as the model will give them (`inputs`: see
    kernels.WeightOnlyMatmul)."""
    from . import kernels

    n, k = shape
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(n, k, generator=gen).to(torch.bfloat16)
    xs = [torch.randn(rows, k, generator=gen) for rows in (1, 4)]
    best = {}
    for name in variants:
        product = kernels.WeightOnlyMatmul(w, variant=name, inputs=inputs)
        for x in xs:
            product(x)  # first call: page the weight in
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            for x in xs:
                product(x)
            times.append(time.perf_counter() - t0)
        best[name] = min(times)
    return best


def _decide_gemv(shape: tuple[int, int], inputs: str) -> str:
    """The decode kernels' variant: forced (kernels.use, QWEN2VL_KERNELS), the only one this CPU runs, or the faster
    of those it runs on the model's largest decode product with the model's kind of inputs (float32, or bf16 under
    bf16 products: AVX-512 BF16 changes the answer), timed once and cached; "torch" where none builds."""
    from . import kernels

    if not kernels.available():
        return "torch"
    supported = [v for v in kernels.supported() if kernels.builds(v)]
    if kernels.forced() or len(supported) < 2:
        return f"C kernels ({kernels.variant()}: {'forced' if kernels.forced() else 'the only one this CPU runs'})"

    def timed() -> tuple[str, str]:
        t = time_kernel_variants(shape, supported, inputs=inputs)
        fastest = min(t, key=t.get)
        rates = ", ".join(f"{name} {shape[0] * shape[1] * 2 * 2 / t[name] / 1e9:.0f} GB/s" for name in supported)
        return fastest, f"timed on {shape[0]}x{shape[1]} at batch 1 and 4, {inputs} inputs: {rates}"

    name, reason = _remembered("gemv" if inputs == "float32" else f"gemv-{inputs}", shape, timed)
    kernels.prefer(name)
    return f"C kernels ({name}: {reason})"


def choose(
    shapes: list[tuple[int, int]], matmul: str = "auto", decode_shapes: list[tuple[int, int]] | None = None
) -> CpuChoice:
    """The paths for a model whose many-row products have weight shapes `shapes` (N, K) and whose decode step's
    products have `decode_shapes` (default: the same). `matmul` forces the many-row path ("float32": exact float32
    arithmetic; "bf16") instead of deciding ("auto")."""
    largest = max(shapes, key=lambda s: s[0] * s[1])
    if matmul == "auto":
        if largest[0] * largest[1] < _MIN_WEIGHTS:
            matmul, reason = "float32", f"largest matrix {largest[0]}x{largest[1]} is too small for bf16 to pay"
        else:
            matmul, reason = _decide_matmul(largest)
    elif matmul in MATMUL_PATHS:
        reason = "asked for"
    else:
        raise ValueError(f"cpu matmul must be 'auto' or one of {MATMUL_PATHS}, not {matmul!r}")
    # under bf16 products the decode step's products take bf16-rounded inputs too (qwen2vl.cpu)
    gemv = _decide_gemv(max(decode_shapes or shapes, key=lambda s: s[0] * s[1]), matmul)
    from . import kernels

    # the vision tower's bf16 attention: the kernel wherever it runs, from the flags alone (on the 2B's shapes on
    # Zen 5, 3.1-3.4x torch's flash attention: benchmarks/bench_vision_ops.py)
    attention = "avx512_bf16" if matmul == "bf16" and kernels.bf16_attention_runs() else "torch"
    return CpuChoice(matmul, reason, gemv, attention)


def as_dict(choice: CpuChoice) -> dict:
    return {**asdict(choice), "cpu": cpu_facts().summary(), "torch": torch.__version__}
