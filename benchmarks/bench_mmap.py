"""Decode speed of the same checkpoint loaded memory-mapped (the default) and read into memory (`mmap=False`), in
one process, runs interleaved: whether weights that are views of the page cache decode as fast as anonymous ones.

    python benchmarks/bench_mmap.py [--dir /tmp/qwen2vl-2b-random] [--rounds 3] [--new-tokens 16]

Both models hold the bf16 weights (2 x 4.4 GB for the 2B shapes; the mapped one shares the page cache). Each round
runs batch 1 and batch 4 on both sides, in reverse order every other round, each decode run bracketed by the read
bandwidth probe of bench_model.py; prints every run and the medians.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from bench_model import Bandwidth, Ours, decode_bytes, decode_run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/qwen2vl-2b-random")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    bandwidth = Bandwidth(torch.device("cpu"))
    sides = {"mapped": Ours(args.dir, torch.bfloat16), "read": Ours(args.dir, torch.bfloat16, mmap=False)}
    weight_bytes = decode_bytes(sides["mapped"].model)
    rates: dict[tuple[str, int], list[float]] = {(name, b): [] for name in sides for b in (1, 4)}
    for r in range(args.rounds):
        for name in list(sides) if r % 2 == 0 else list(sides)[::-1]:
            for batch in (1, 4):
                rate, fraction, bw = decode_run(sides[name], batch, args.new_tokens, bandwidth, weight_bytes)
                rates[name, batch].append(rate)
                print(
                    f"round {r + 1}: {name:<7} batch {batch}: {rate:6.2f} tok/s, {fraction:.0%} of the bound "
                    f"at {bw:.1f} GB/s"
                )
    for (name, batch), values in rates.items():
        print(f"{name:<7} batch {batch}: median {statistics.median(values):.2f} tok/s over {len(values)} runs")


if __name__ == "__main__":
    main()
