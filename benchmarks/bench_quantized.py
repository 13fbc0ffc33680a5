"""Decode speed of our bf16 and int8 models side by side, in one process, runs interleaved.

    python benchmarks/bench_quantized.py [--dir /tmp/qwen2vl-2b-random] [--repeats 5] [--new-tokens 16]

Loads the same checkpoint twice (bf16 weights, and `quantize="int8"`), then alternates decode runs of the two at
batch 1 and 4 with a read-bandwidth probe around each run, because this machine's memory bandwidth drifts within
minutes and only interleaved runs give a fair ratio. Prints tokens/s (median), the int8/bf16 ratio, and each
model's fraction of its decode bound (weight bytes per token / bandwidth measured around the run). Peak memory of
each variant: `bench_model.py --only qwen2vl [--quantize int8]`.
"""

from __future__ import annotations

import argparse
import statistics
import sys

import torch
from bench_model import Bandwidth, Ours, decode_bytes, decode_run, text_prompt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/qwen2vl-2b-random")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=16)
    args = ap.parse_args()
    bandwidth = Bandwidth(torch.device("cpu"))
    sides = {"bf16": Ours(args.dir, torch.bfloat16), "int8": Ours(args.dir, torch.bfloat16, quantize="int8")}
    nbytes = {name: decode_bytes(side.model) for name, side in sides.items()}
    rates = {(name, b): [] for name in sides for b in (1, 4)}
    fractions = {name: [] for name in sides}
    for side in sides.values():
        side.decode_times(text_prompt(1, 32), 3)  # warm-up
    for _ in range(args.repeats):
        for b in (1, 4):
            for name, side in sides.items():
                rate, fraction, _ = decode_run(side, b, args.new_tokens, bandwidth, nbytes[name])
                rates[name, b].append(rate)
                if b == 1:
                    fractions[name].append(fraction)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} interleaved runs")
    print(f"{'':<28}{'bf16':>10}{'int8':>10}{'ratio':>10}")
    for b in (1, 4):
        bf, i8 = (statistics.median(rates[n, b]) for n in sides)
        ratios = [i / f for i, f in zip(rates["int8", b], rates["bf16", b])]
        print(f"{f'decode batch {b} (tok/s)':<28}{bf:>10.2f}{i8:>10.2f}{statistics.median(ratios):>9.2f}x")
    print(f"{'weights read per token (GB)':<28}" + "".join(f"{nbytes[n] / 1e9:>10.2f}" for n in sides))
    print(f"{'batch 1: fraction of bound':<28}" + "".join(f"{statistics.median(fractions[n]):>10.0%}" for n in sides))


if __name__ == "__main__":
    sys.exit(main())
