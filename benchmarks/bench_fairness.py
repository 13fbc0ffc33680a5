"""Fairness under one large image: how long running streams wait between tokens while it is encoded and prefilled.

    python benchmarks/bench_fairness.py [--shapes 2b|small] [--dir DIR] [--model DIR] [--image-tokens 2025]
                                        [--streams 3] [--prefill-chunk 256] [--prompt-budget S] [--one-piece] [--check]

Builds (once) a random bf16 checkpoint, the real Qwen2-VL-2B shapes or `small` (below; a 16k-token image on the 2B
vision tower takes hours on a small CPU), or takes one with --model. Starts `--streams` text requests, lets them
decode, then submits one request whose picture is a synthetic PIL image sized so that it plans to exactly
`--image-tokens` tokens, with max_tokens 1. Drives `Engine.step` as the server does and prints, for the running
streams, the worst and median gap between consecutive tokens before the image, while it is encoded, and while it is
prefilled; the image request's time to its (only) token; how many vision pieces ran and the engine's longest step.
`--one-piece` encodes each image as one unit of work, as the engine did before encodes were split; `--check`
compares the features the engine computed in pieces with a one-shot `encode_vision` (torch.equal; one more encode).
"""

from __future__ import annotations

import argparse
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

VS, VE, IMG = 151652, 151653, 151655

# `small`: the 2B's vision head size (80) and patch layout, a narrower tower of 2 blocks and a 4-layer decoder
SMALL_TEXT = {
    "vocab_size": 151936,
    "hidden_size": 512,
    "intermediate_size": 1408,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 2,
    "tie_word_embeddings": True,
    "rope_scaling": {"type": "mrope", "mrope_section": [8, 12, 12]},
}
SMALL_VISION = {
    "depth": 2,
    "embed_dim": 320,
    "num_heads": 4,
    "mlp_ratio": 4,
    "hidden_size": 512,
    "in_chans": 3,
    "spatial_patch_size": 14,
}


def cpu_description() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
        name = next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, subprocess.CalledProcessError, StopIteration):
        name = "unknown CPU"
    flags = next((line for line in open("/proc/cpuinfo") if line.startswith("flags")), "").split()
    return (
        f"{name}, {torch.get_num_threads()} torch threads, avx512_bf16 "
        f"{'present' if 'avx512_bf16' in flags else 'absent'}"
    )


def image_of(tokens: int, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """pixel_values and grid of a synthetic photo-like PIL image that plans to exactly `tokens` image tokens."""
    from qwen2vl.processing.image import image_to_patches, smart_resize

    a = max(d for d in range(1, math.isqrt(tokens) + 1) if tokens % d == 0)  # tokens = a * b, as square as can be
    height, width = 28 * a, 28 * (tokens // a)
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    arr = np.stack([(x * 255 // width), (y * 255 // height), rng.integers(0, 256, (height, width))], -1)
    image = Image.fromarray(arr.astype(np.uint8), "RGB")
    assert smart_resize(height, width, max_pixels=max(16384, tokens) * 28 * 28) == (height, width)
    rows, grid = image_to_patches(image)
    assert grid[1] * grid[2] // 4 == tokens, grid
    return rows, grid


def image_prompt(pixels: torch.Tensor, grid: list[int]):
    from qwen2vl.generate.decode import Prompt

    ids = [151644, 872, 198, VS] + [IMG] * (grid[0] * grid[1] * grid[2] // 4) + [VE, 3555, 374, 419, 30]
    input_ids = torch.tensor([ids])
    return Prompt.from_batch(
        {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixels,
            "image_grid_thw": torch.tensor([grid]),
        }
    )


def text_prompt(length: int, seed: int):
    from qwen2vl.generate.decode import Prompt

    ids = torch.randint(0, 151643, (1, length), generator=torch.Generator().manual_seed(seed))
    return Prompt.from_batch({"input_ids": ids, "attention_mask": torch.ones_like(ids)})


def summary(gaps: list[float]) -> str:
    if not gaps:
        return "no tokens"
    p99 = sorted(gaps)[int(0.99 * (len(gaps) - 1))]
    return (
        f"worst {max(gaps):7.3f} s   99th percentile {p99:6.3f} s   median {statistics.median(gaps):6.3f} s   "
        f"({len(gaps)} gaps)"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", choices=["2b", "small"], default="2b")
    ap.add_argument("--dir", help="where to build the random checkpoint (default /tmp/qwen2vl-<shapes>-random)")
    ap.add_argument("--model", help="an existing checkpoint directory instead")
    ap.add_argument("--image-tokens", type=int, default=2025)
    ap.add_argument("--streams", type=int, default=3)
    ap.add_argument("--prefill-chunk", type=int, default=256)
    ap.add_argument("--prompt-budget", type=float, help="Engine prompt_budget_s (default: the engine's)")
    ap.add_argument("--one-piece", action="store_true", help="encode each image as a single unit of work")
    ap.add_argument("--check", action="store_true", help="compare the features with a one-shot encode_vision")
    args = ap.parse_args()

    import qwen2vl
    from qwen2vl.engine.engine import Engine, Request
    from qwen2vl.generate.decode import greedy

    path = Path(args.model or args.dir or f"/tmp/qwen2vl-{args.shapes}-random")
    if not args.model and not (path / "config.json").exists():
        from qwen2vl.testing.checkpoint import SHAPES_2B_TEXT, SHAPES_2B_VISION, make_config, write_checkpoint

        text, vision = (SHAPES_2B_TEXT, SHAPES_2B_VISION) if args.shapes == "2b" else (SMALL_TEXT, SMALL_VISION)
        write_checkpoint(path, make_config(text, vision), dtype=torch.bfloat16, tokenizer=False)
    model = qwen2vl.load_model(path, progress=False)
    pixels, grid = image_of(args.image_tokens)
    big = image_prompt(pixels, grid)
    max_len = big.input_ids.shape[1] + 4096  # room for the streams to keep decoding throughout
    engine = Engine(
        model,
        max_num_seqs=args.streams + 1,
        max_model_len=max_len,
        prefill_chunk=args.prefill_chunk,
        prompt_budget_s=args.prompt_budget,
        vision_piece_flops=math.inf if args.one_piece else None,
    )
    vc = model.config.vision
    print(f"{cpu_description()}; torch {torch.__version__}")
    print(
        f"checkpoint {path} ({'random ' + args.shapes + ' shapes' if not args.model else 'given'}): vision "
        f"{vc.depth} blocks x {vc.embed_dim} wide, decoder {model.config.text.num_hidden_layers} layers x "
        f"{model.config.text.hidden_size}; image {grid[2] * 14}x{grid[1] * 14} px -> grid {grid}, "
        f"{args.image_tokens} tokens; prefill chunk {args.prefill_chunk}; vision pieces "
        f"{'one per image' if args.one_piece else f'{engine.vision_piece_flops:.0e} flops'}"
    )

    last: dict[str, float] = {}
    gaps: dict[str, list[float]] = {"before the image": [], "vision encode": [], "prefill": []}
    steps: list[tuple[float, str, int]] = []  # (duration, phase, vision pieces in it) of each step
    loads = [os.getloadavg()[0]]  # 1-minute load average, every 10 s: other processes inflate every figure
    sampled = time.monotonic()

    def drive(phase: str) -> list:
        nonlocal sampled
        t0, pieces = time.monotonic(), engine.vision_pieces
        outs = engine.step()
        now = time.monotonic()
        steps.append((now - t0, phase, engine.vision_pieces - pieces))
        if now - sampled > 10:
            loads.append(os.getloadavg()[0])
            sampled = now
        for out in outs:
            if out.token is None or out.request_id == "big":
                continue
            if out.request_id in last and phase in gaps:
                gaps[phase].append(now - last[out.request_id])
            last[out.request_id] = now
        return outs

    for i in range(args.streams):
        engine.add(Request(f"s{i}", text_prompt(16, seed=i), greedy, max_len - 17))
    for _ in range(8):  # every stream prefilled and a few tokens decoded
        drive("warm-up")
    for _ in range(8):
        drive("before the image")

    submitted = time.monotonic()
    engine.add(Request("big", big, greedy, 1))
    first = None
    while first is None:
        req = next((r for r in [*engine.prefilling, *engine.waiting] if r.request_id == "big"), None)
        # not admitted yet (None: still in the inbox), or encoding
        vision = req is None or req.slot < 0 or req.encoding is not None or bool(req.vision_pending)
        outs = drive("vision encode" if vision else "prefill")
        first = next((o for o in outs if o.request_id == "big"), None)
    total = time.monotonic() - submitted
    if first.token is None:
        sys.exit(f"the image request failed: {first.error}")
    stats = engine.stats()
    for i in range(args.streams):
        engine.abort(f"s{i}")
    engine.step()

    for phase, values in gaps.items():
        print(f"gap between tokens of the running streams, {phase:<17} {summary(values)}")
    print(
        f"image request: submitted -> its token {total:.1f} s; {stats['vision_pieces']} vision pieces; longest "
        f"engine step in the last minute {stats['longest_step_s']:.3f} s"
    )
    for phase in ("vision encode", "prefill"):
        longest = sorted((s for s in steps if s[1] == phase), reverse=True)[:3]
        print(f"longest steps, {phase}: " + ", ".join(f"{d:.3f} s ({n} pieces)" for d, _, n in longest))
    print(
        f"1-minute load average during the run: min {min(loads):.2f}, median {statistics.median(loads):.2f}, max "
        f"{max(loads):.2f} ({os.cpu_count()} CPUs; above the torch threads, other processes took CPU time)"
    )
    if args.check:
        key = next(iter(engine.vision_cache.items))
        with torch.inference_mode():
            t = time.monotonic()
            whole = model.encode_vision(pixels, torch.tensor([grid]))
            alone = time.monotonic() - t
        same = torch.equal(engine.vision_cache.items[key], whole)
        print(
            f"features in pieces torch.equal to a one-shot encode_vision: {same} (one-shot encode alone {alone:.1f} s)"
        )


if __name__ == "__main__":
    sys.exit(main())
