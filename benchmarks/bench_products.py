"""The decode step's weight products alone, in one process, runs interleaved: GB/s of weights streamed by each
kernel product on the real Qwen2-VL-2B decoder shapes, bf16 and 4-bit weights, float32 rows against bf16 pairs.

    python benchmarks/bench_products.py [--rounds 5] [--layers 28]

For each of the decoder's four product shapes (q/o 1536x1536, k/v 256x1536, gate/up 8960x1536, down 1536x8960,
N x K) it builds `--layers` random matrices (so that a pass streams from memory, not cache, as a decode step does),
binds the kernel products the model binds (`kernels.WeightOnlyMatmul` for bf16, `kernels.Q4Product` for
`--quantize int4`'s layout), and times one pass over all of them at batch 1 and 4 with x in float32 ("float32"
inputs, the exact products) and, where this CPU has AVX-512 BF16, rounded to bf16 ("bf16" pairs, the products under
bf16 compute); 4-bit weights also against x rounded to int16 ("int16", integer dot products), where the kernels have
them. GB/s = bytes of weights (and 4-bit scales and zeros) read per pass / median time. The order of the
variants alternates every round; medians over rounds.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from timing import median_time

from qwen2vl import kernels
from qwen2vl.quant.rtn import quantize_rtn

SHAPES = {"q/o": (1536, 1536), "k/v": (256, 1536), "gate/up": (8960, 1536), "down": (1536, 8960)}


def products(storage: str, inputs: str, n: int, k: int, layers: int, seed: int) -> tuple[list, int]:
    """`layers` bound products of one shape -> (products, bytes of weights they read per pass)."""
    g = torch.Generator().manual_seed(seed)
    out, size = [], 0
    for _ in range(layers):
        w = (torch.randn(n, k, generator=g) * 0.02).to(torch.bfloat16)
        if storage == "bf16":
            out.append(kernels.WeightOnlyMatmul(w, inputs=inputs))
            size += w.numel() * 2
        else:
            st = quantize_rtn(w)
            out.append(kernels.Q4Product(st.qweight, st.scales, st.zeros, 128, inputs=inputs))
            size += sum(t.numel() * t.element_size() for t in (st.qweight, st.scales, st.zeros))
    return out, size


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--layers", type=int, default=28)
    args = ap.parse_args()
    if not kernels.available():
        raise SystemExit("the qwen2vl kernels are not available on this machine (kernels.available() is False)")
    inputs = ["float32"] + (["bf16"] if kernels.native_bf16_inputs() else [])
    inputs4 = inputs + (["int16"] if kernels.int16_q4_inputs() else [])
    print(f"kernel variant {kernels.variant()}; inputs compared: {inputs4}; {torch.get_num_threads()} threads")
    cases = {
        (storage, mode, shape): products(storage, mode, n, k, args.layers, seed=i)
        for i, shape in enumerate(SHAPES)
        for storage in ("bf16", "int4")
        for mode in (inputs if storage == "bf16" else inputs4)
        for n, k in [SHAPES[shape]]
    }
    rates: dict[tuple, list[float]] = {(*key, m): [] for key in cases for m in (1, 4)}
    for r in range(args.rounds):
        keys = list(cases) if r % 2 == 0 else list(cases)[::-1]
        for key in keys:
            prods, size = cases[key]
            k = SHAPES[key[2]][1]
            for m in (1, 4):
                x = torch.randn(m, k)
                seconds = median_time(lambda x=x, prods=prods: [p(x) for p in prods], 3, warmup=True)
                rates[(*key, m)].append(size / seconds / 1e9)
    print(f"{'weights':<8}{'inputs':<9}{'shape':<9}{'batch 1 GB/s':>14}{'batch 4 GB/s':>14}")
    for storage, mode, shape in cases:
        b1, b4 = (statistics.median(rates[storage, mode, shape, m]) for m in (1, 4))
        print(f"{storage:<8}{mode:<9}{shape:<9}{b1:>14.1f}{b4:>14.1f}")


if __name__ == "__main__":
    main()
