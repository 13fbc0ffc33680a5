"""The launch post's promise end to end (slow: `pytest -m slow tests/test_long_video_slow.py`, ~30 min on 2 cores):
a 21-minute 640x360 video, the 2B-shaped random bf16 checkpoint, `qwen2vl run` with its default --fit, to the first
token. Prints the time and the peak memory of the command; docs/benchmarks.md records them per machine.

QWEN2VL_2B_DIR names a directory to keep the 2B-shaped checkpoint in between runs (it is 4.4 GB)."""

from __future__ import annotations

import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from qwen2vl.testing.video import write_test_video

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_twenty_one_minutes_to_the_first_token(tmp_path):
    import torch

    from qwen2vl.testing.checkpoint import SHAPES_2B_TEXT, SHAPES_2B_VISION, make_config, write_checkpoint

    model = Path(os.environ.get("QWEN2VL_2B_DIR", tmp_path / "2b"))
    if not (model / "config.json").exists():
        write_checkpoint(model, make_config(SHAPES_2B_TEXT, SHAPES_2B_VISION), dtype=torch.bfloat16, tokenizer=True)
    video = write_test_video(tmp_path / "talk.mp4", 21 * 60)
    started = time.perf_counter()
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "qwen2vl",
            "run",
            "--model",
            str(model),
            "--video",
            str(video),
            "--prompt",
            "Summarise the video.",
            "--max-new-tokens",
            "1",
            "--verbose",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    seconds = time.perf_counter() - started
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    assert out.returncode == 0, out.stderr[-3000:]
    assert "qwen2vl: fitted video" in out.stderr
    report = [line for line in out.stderr.splitlines() if "fitted" in line or "|" in line or "tokens" in line]
    print(f"\n21-minute video, 2B shapes, to the first token: {seconds:.0f} s, peak RSS {peak / 2**30:.2f} GiB")
    print("\n".join(report[-6:]))
