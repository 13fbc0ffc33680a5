"""CPU kernels for weight-only matrix products, compiled on first use, with a plain-PyTorch reference path.

`gemm_bf16` / `gemm_int8` compute Y = X @ W.T (+ bias) in float32 for a few rows of X (decode steps) while
streaming W once from memory as bf16 or int8 (per-row scale). They are built from `gemv_avx2.c` with the system C
compiler into a per-user cache the first time they are needed; where there is no compiler, no AVX2/FMA, or the
build fails, `available()` is False and callers use the reference path (`torch` ops), which the tests compare
against. Nothing here is imported by the model files: `qwen2vl/runtime.py` applies these as an optional transform.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger(__name__)
_SOURCE = Path(__file__).with_name("gemv_avx2.c")
MAX_ROWS = 64  # beyond a few dozen rows the product is compute-bound and torch's float32 GEMM wins


def _cpu_has_avx2_fma() -> bool:
    try:
        flags = next(line for line in open("/proc/cpuinfo") if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return {"avx2", "fma"} <= set(flags)


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(root) / "qwen2vl" / "kernels"


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    if not _cpu_has_avx2_fma():
        log.info("qwen2vl kernels: CPU lacks AVX2/FMA; using the PyTorch path")
        return None
    compiler = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    source = _SOURCE.read_bytes()
    target = _cache_dir() / f"gemv_avx2-{hashlib.sha256(source).hexdigest()[:16]}.so"
    if not target.exists():
        if compiler is None:
            log.warning("qwen2vl kernels: no C compiler found; decoding uses the slower PyTorch path")
            return None
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
            out = Path(tmp) / target.name
            cmd = [compiler, "-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC", str(_SOURCE), "-o", str(out)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode != 0:
                log.warning("qwen2vl kernels: build failed, using the PyTorch path:\n%s", res.stderr[-2000:])
                return None
            os.replace(out, target)  # atomic: concurrent first uses do not see half a file
    lib = ctypes.CDLL(str(target))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.gemm_bf16.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.gemm_i8.argtypes = [ptr, ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    return lib


def available() -> bool:
    return _library() is not None


def _check(w: torch.Tensor, x: torch.Tensor, wdtype: torch.dtype) -> None:
    if w.dtype != wdtype or not w.is_contiguous() or w.device.type != "cpu":
        raise ValueError(f"weight must be a contiguous CPU {wdtype} matrix, got {w.dtype} {tuple(w.shape)}")
    if x.dtype != torch.float32 or x.shape[-1] != w.shape[1] or x.shape[0] > MAX_ROWS or w.shape[1] % 8:
        raise ValueError(f"x must be float32 (<= {MAX_ROWS}, {w.shape[1]}) with K % 8 == 0, got {tuple(x.shape)}")


def _ptr(t: torch.Tensor | None):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def gemm_bf16(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) float32, w (N, K) bfloat16, bias (N,) float32 -> (M, N) float32."""
    _check(w, x, torch.bfloat16)
    x = x.contiguous()
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    _library().gemm_bf16(_ptr(w), _ptr(bias), _ptr(x), _ptr(y), w.shape[0], w.shape[1], x.shape[0],
                         torch.get_num_threads())
    return y


def gemm_int8(x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x (M, K) float32, w (N, K) int8, scale (N,) float32 -> (M, N) float32 = x @ (w * scale[:, None]).T + bias."""
    _check(w, x, torch.int8)
    x = x.contiguous()
    y = torch.empty(x.shape[0], w.shape[0], dtype=torch.float32)
    _library().gemm_i8(_ptr(w), _ptr(scale), _ptr(bias), _ptr(x), _ptr(y), w.shape[0], w.shape[1], x.shape[0],
                       torch.get_num_threads())
    return y
