"""Peak resident memory while loading a random checkpoint with the real Qwen2-VL-2B shapes: us and transformers.

    python benchmarks/load_memory.py [--dir /tmp/qwen2vl-2b-random] [--dtype bfloat16]
    python benchmarks/load_memory.py --quantized gptq4 [--dtype float32]   # AWQ / GPTQ formats, ours only
    python benchmarks/load_memory.py --quantize int4   # the bf16 checkpoint quantized at load, ours only

Each load runs in a fresh subprocess; the figure is (peak RSS - RSS before loading) / size of the weights in the
target dtype. Writes the checkpoint (bf16, 4.4 GB, tied embeddings, original key names) on first use; with
--quantized, a checkpoint of random packed bits in that format (decoder linears quantized, the rest float16).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import textwrap
import time
from pathlib import Path

PROBE = textwrap.dedent("""
    import json, sys, time, torch
    def status(field):
        for line in open("/proc/self/status"):
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    which, path, dtype = sys.argv[1], sys.argv[2], getattr(torch, sys.argv[3])
    quantize = None if sys.argv[4] == "none" else sys.argv[4]
    if which == "qwen2vl":
        import qwen2vl
        load = lambda: qwen2vl.load_model(path, dtype=dtype, progress=False, quantize=quantize)
    else:
        import transformers
        load = lambda: transformers.Qwen2VLForConditionalGeneration.from_pretrained(path, dtype=dtype)
    base = status("VmRSS:")
    t0 = time.perf_counter()
    model = load()
    seconds = time.perf_counter() - t0
    # tied tensors appear twice in transformers' state_dict: count each storage once
    size = sum({t.data_ptr(): t.numel() * t.element_size() for t in model.state_dict().values()}.values())
    print(json.dumps({"peak_over_base": status("VmHWM:") - base, "resident": status("VmRSS:") - base,
                      "weights": size, "seconds": seconds}))
""")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/qwen2vl-2b-random")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--skip-reference", action="store_true")
    ap.add_argument(
        "--quantized",
        choices=["awq", "gptq4", "gptq8"],
        help="measure a quantized checkpoint of this format (ours only: transformers needs GPU kernels)",
    )
    ap.add_argument("--quantize", choices=["int8", "int4"], help="ours only: quantize the bf16 checkpoint at load")
    args = ap.parse_args()
    path = Path(args.dir)
    if args.quantize:
        args.skip_reference = True
    if args.quantized:
        from qwen2vl.testing.checkpoint import SHAPES_2B_TEXT, SHAPES_2B_VISION, make_config
        from qwen2vl.testing.quantized import awq_config, gptq_config, write_random_packed

        args.skip_reference = True
        path = Path(f"{args.dir}-{args.quantized}")
        if not (path / "config.json").exists():
            qcfg = awq_config() if args.quantized == "awq" else gptq_config(bits=int(args.quantized[-1]))
            t0 = time.perf_counter()
            write_random_packed(path, make_config(SHAPES_2B_TEXT, SHAPES_2B_VISION), qcfg)
            print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    elif not (path / "config.json").exists():
        import torch

        from qwen2vl.testing.checkpoint import SHAPES_2B_TEXT, SHAPES_2B_VISION, make_config, write_checkpoint

        t0 = time.perf_counter()
        write_checkpoint(path, make_config(SHAPES_2B_TEXT, SHAPES_2B_VISION), dtype=torch.bfloat16, tokenizer=False)
        print(f"wrote {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    print(
        f"{'loader':<14}{'dtype':<10}{'quantize':<10}{'weights GB':>11}{'peak-base GB':>14}{'ratio':>8}"
        f"{'resident GB':>13}{'seconds':>9}"
    )
    for which in ["qwen2vl"] + ([] if args.skip_reference else ["transformers"]):
        out = subprocess.run(
            [sys.executable, "-c", PROBE, which, str(path), args.dtype, args.quantize or "none"],
            capture_output=True,
            text=True,
            check=True,
        )
        m = json.loads(out.stdout.strip().splitlines()[-1])
        print(
            f"{which:<14}{args.dtype:<10}{args.quantize or '-':<10}{m['weights'] / 1e9:>11.2f}"
            f"{m['peak_over_base'] / 1e9:>14.2f}{m['peak_over_base'] / m['weights']:>8.2f}"
            f"{m['resident'] / 1e9:>13.2f}{m['seconds']:>9.1f}"
        )


if __name__ == "__main__":
    main()
