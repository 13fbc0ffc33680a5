"""The float32 path's many-row product over a bf16 weight, three ways, interleaved in one process:

    python benchmarks/bench_widen_blocks.py [--rows 3552] [--repeats 5]

whole (the weight widened at once: the fastest, and the memory cost the blocks avoid), blocks as `WeightOnlyLinear`
splits them now (`qwen2vl.cpu._block_rows`: equal, a multiple of 64 rows) and as it split them before (as many rows as
fit WIDEN_AT_ONCE weights, the last block short). Shapes: the 2B's vision MLP and qkv, 3,552 rows (a 1024x683 photo).
Prints the median seconds of each and the ratios to the whole product.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from qwen2vl.cpu import WIDEN_AT_ONCE, WeightOnlyLinear

SHAPES = {"vision fc1": (5120, 1280), "vision fc2": (1280, 5120), "vision qkv": (3840, 1280)}


def ragged(layer: WeightOnlyLinear, x: torch.Tensor) -> torch.Tensor:
    """The split before: WIDEN_AT_ONCE // k rows a block."""
    n, k = layer.weight.shape
    step = max(1, WIDEN_AT_ONCE // k)
    out = x.new_empty(x.shape[0], n)
    for start in range(0, n, step):
        rows = slice(start, min(start + step, n))
        out[:, rows] = F.linear(x, layer.dequantized(rows), layer.bias[rows])
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=3552)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {args.rows} rows, median of {args.repeats}")
    for name, (n, k) in SHAPES.items():
        layer = WeightOnlyLinear(torch.randn(n, k).to(torch.bfloat16), torch.randn(n))
        med = measure(layer, torch.randn(args.rows, k), args.repeats)
        print(f"{name} {n}x{k}: " + ", ".join(f"{w} {s:.3f} s ({s / med['whole']:.2f}x whole)" for w, s in med.items()))


def measure(layer: WeightOnlyLinear, x: torch.Tensor, repeats: int) -> dict[str, float]:
    ways = {
        "whole": lambda: F.linear(x, layer.dequantized(), layer.bias),
        "blocks now": lambda: layer._many_rows(x, torch.float32, layer.bias),
        "blocks before": lambda: ragged(layer, x),
    }
    times: dict[str, list[float]] = {w: [] for w in ways}
    for fn in ways.values():
        fn()  # warm-up
    for _ in range(repeats):  # interleaved: a drift of the machine meets every way alike
        for way, fn in ways.items():
            t0 = time.perf_counter()
            fn()
            times[way].append(time.perf_counter() - t0)
    return {w: sorted(t)[len(t) // 2] for w, t in times.items()}


if __name__ == "__main__":
    main()
