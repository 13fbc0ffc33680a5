"""A 21-minute video, prepared by qwen-vl-utils and by us: time and peak memory, each side in its own process.

    python benchmarks/bench_long_video.py [--video long.mp4] [--minutes 21]

Without --video, writes a 640x360 24 fps H.264 clip of --minutes (the launch post's "over 20 minutes"). Cases:
- reference: qwen-vl-utils 0.0.14 `fetch_video` (torchcodec reader) of the default plan: 768 frames at 2 fps,
  resized to the default per-frame budget, returned as float 0..255 (what the transformers processor then takes);
- ours, the same 768 frames: `Processor` up to the model's pixel rows (normalised float32, patch layout), with the
  context check lifted so that it does the same work;
- ours, fitted (`fit=True`) to a 32,768-token context with 512 tokens left for the answer.
Each case runs in a fresh Python process; peak memory is that process's peak RSS above its RSS just before the
call (sampled every 2 ms), time is the call's wall time. Prints the CPU model and flags, and the ratios.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

CASE = r"""
import json, os, sys, threading, time
rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
case, video, repo = sys.argv[1], sys.argv[2], sys.argv[3]
if case == "reference":
    from qwen_vl_utils.vision_process import fetch_video
    run = lambda: fetch_video({"type": "video", "video": video})
    shape = lambda out: list(out.shape)
else:
    from qwen2vl.processing import Processor
    from qwen2vl.processing.processor import Budget
    proc = Processor.from_pretrained(repo, max_context=32768 if case == "fitted" else 10**9)
    conv = [{"role": "user", "content": [{"type": "video", "video": video}, {"type": "text", "text": "Summarise."}]}]
    budget = Budget(32768 - 512) if case == "fitted" else None
    run = lambda: proc(conv, budget=budget, fit=case == "fitted")
    shape = lambda out: out["video_grid_thw"].tolist()
base, peak, running = rss(), [0], [True]
def sample():
    while running[0]:
        peak[0] = max(peak[0], rss()); time.sleep(0.002)
threading.Thread(target=sample, daemon=True).start()
t = time.perf_counter(); out = run(); seconds = time.perf_counter() - t
running[0] = False
print(json.dumps({"seconds": seconds, "peak_gib": (max(peak[0], rss()) - base) / 2**30, "shape": shape(out)}))
"""


def cpu() -> str:
    info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("Model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("Flags")), [])
    wanted = [f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in flags]
    cores = subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip()
    return f"{model} ({cores} cores; {' '.join(wanted)})"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--video")
    p.add_argument("--minutes", type=float, default=21)
    a = p.parse_args()
    from qwen2vl.testing.checkpoint import make_config, write_checkpoint
    from qwen2vl.testing.video import write_test_video

    tmp = Path(tempfile.mkdtemp())
    video = a.video or str(write_test_video(tmp / "long.mp4", a.minutes * 60))
    repo = write_checkpoint(tmp / "ckpt", make_config(), seed=0, tokenizer=True)
    print(f"CPU: {cpu()}")
    results = {}
    for case in ("reference", "ours", "fitted"):
        out = subprocess.run([sys.executable, "-c", CASE, case, video, str(repo)], capture_output=True, text=True)
        if out.returncode:
            raise SystemExit(f"{case} failed:\n{out.stderr[-2000:]}")
        results[case] = json.loads(out.stdout.strip().splitlines()[-1])
        r = results[case]
        print(f"{case:<10} {r['seconds']:7.1f} s   peak +{r['peak_gib']:.2f} GiB   {r['shape']}")
    ref, ours = results["reference"], results["ours"]
    print(
        f"same frames: {ref['seconds'] / ours['seconds']:.2f}x faster, {ref['peak_gib'] / ours['peak_gib']:.1f}x "
        f"less memory than the reference (which stops at float frames; ours goes on to the model's pixel rows)"
    )


if __name__ == "__main__":
    main()
