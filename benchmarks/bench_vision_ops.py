"""The vision tower's bf16 attention and rotary, our kernels against PyTorch, in one process, runs interleaved.

    python benchmarks/bench_vision_ops.py [--rounds 5]

On the Qwen2-VL-2B vision shapes (16 heads of 80, embed 1280) and bf16 rows as the tower holds them under bf16
products: `kernels.attention_bf16` against `F.scaled_dot_product_attention` (torch's CPU flash attention, which
transformers' sdpa path and our PyTorch path run) for one segment of 1,024 patches (a 448x448 image) and of 3,552
(a 1024x683 photo, grid 48x74), and `kernels.rope_bf16` against `apply_rope` on the upcast q and k (the tower's
PyTorch rotary) for 1,024 rows. The order alternates every round; medians over rounds, with GFLOP/s for attention
(4 x N^2 x 1280 per segment). Needs a CPU with AVX-512 BF16 (where the kernels run); elsewhere it says so and stops.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
import torch.nn.functional as F
from timing import median_time

from qwen2vl import kernels
from qwen2vl.model.layers import apply_rope

HEADS, HEAD_DIM = 16, 80


def attention_pair(n: int, g: torch.Generator) -> dict:
    q, k, v = (torch.randn(n, HEADS, HEAD_DIM, generator=g).bfloat16() for _ in range(3))
    out = torch.empty_like(q)
    rows = [t.transpose(0, 1) for t in (q, k, v)]  # (heads, N, D), the layout sdpa takes
    return {
        "kernel": lambda: kernels.attention_bf16(q, k, v, out),
        "torch": lambda: F.scaled_dot_product_attention(*rows),
    }


def rope_pair(n: int, g: torch.Generator) -> dict:
    qkv = torch.randn(n, 3, HEADS, HEAD_DIM, generator=g).bfloat16()
    angles = torch.randn(n, HEAD_DIM // 2, generator=g).repeat(1, 2)
    cos, sin = angles.cos(), angles.sin()

    def plain():
        return [apply_rope(qkv[:, i].float(), cos[:, None], sin[:, None]).bfloat16() for i in (0, 1)]

    return {"kernel": lambda: kernels.rope_bf16(qkv, cos, sin), "torch": plain}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    args = ap.parse_args()
    if not kernels.bf16_attention_runs():
        print("this CPU (or build) does not run the bf16 vision kernels (they need AVX-512 BF16): nothing to compare")
        return 0
    from qwen2vl import machine

    print(f"CPU: {machine.cpu_facts().summary()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    g = torch.Generator().manual_seed(0)
    cases = {
        "attention, 1024 patches": (attention_pair(1024, g), 4 * 1024**2 * HEADS * HEAD_DIM),
        "attention, 3552 patches": (attention_pair(3552, g), 4 * 3552**2 * HEADS * HEAD_DIM),
        "rotary, 1024 rows": (rope_pair(1024, g), 0),
    }
    times: dict[tuple[str, str], list[float]] = {}
    for r in range(args.rounds):
        for name, (pair, _) in cases.items():
            for side in ("kernel", "torch") if r % 2 == 0 else ("torch", "kernel"):
                times.setdefault((name, side), []).append(median_time(pair[side], 3, warmup=True))
    print(f"median of {args.rounds} rounds (each the median of 3 calls)")
    for name, (_, flops) in cases.items():
        ours, theirs = (statistics.median(times[name, s]) for s in ("kernel", "torch"))
        rates = f"  ({flops / ours / 1e9:.0f} against {flops / theirs / 1e9:.0f} GFLOP/s)" if flops else ""
        print(f"{name:<26} kernel {ours * 1e3:8.2f} ms   torch {theirs * 1e3:8.2f} ms   {theirs / ours:5.2f}x{rates}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
