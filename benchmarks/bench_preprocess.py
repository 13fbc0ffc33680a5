"""Input preparation speed: qwen2vl's Processor against qwen-vl-utils + the transformers processor, one process.

    python benchmarks/bench_preprocess.py [--repeats 5]

Cases: a 1024x683 JPEG photo, and a 30-second 1280x720 clip at 30 fps (H.264 if PyAV has it, else MPEG-4 Part 2),
sampled at the default 2 fps. Each side turns the same conversation into model inputs (tokens, pixel rows,
grids); the reference side is `process_vision_info` (torchcodec video reader) then `AutoProcessor(...)`, as the
official README does it. Prints the median time of each and the ratio.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
from timing import median_time


def make_photo(path: Path) -> None:
    from PIL import Image

    yy, xx = np.mgrid[0:683, 0:1024]
    rng = np.random.default_rng(0)
    img = np.stack([(xx // 3) % 256, (yy // 2) % 256, (xx + yy) % 256], -1) + rng.integers(0, 40, (683, 1024, 3))
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(path, quality=90)


def make_clip(path: Path, seconds: int = 30, fps: int = 30) -> None:
    from qwen2vl.testing.video import write_test_video

    write_test_video(path, seconds, (1280, 720), fps, codec="libx264")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    from qwen_vl_utils import process_vision_info
    from transformers import AutoProcessor

    from qwen2vl.processing import Processor
    from qwen2vl.testing.tokenizer_files import write_preprocessor_config, write_tokenizer_files

    work = Path(tempfile.mkdtemp(prefix="qwen2vl-bench-"))
    write_tokenizer_files(work)
    write_preprocessor_config(work)
    make_photo(work / "photo.jpg")
    make_clip(work / "clip.mp4")
    ours = Processor.from_pretrained(work)
    ref = AutoProcessor.from_pretrained(work)

    def reference(conv):
        text = ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=True)
        images, videos = process_vision_info(conv)
        return ref(text=[text], images=images, videos=videos, return_tensors="pt")

    cases = {
        "photo 1024x683": [
            {
                "role": "user",
                "content": [{"type": "image", "image": str(work / "photo.jpg")}, {"type": "text", "text": "Describe."}],
            }
        ],
        "video 30 s 720p @ 2 fps": [
            {
                "role": "user",
                "content": [{"type": "video", "video": str(work / "clip.mp4")}, {"type": "text", "text": "Summarise."}],
            }
        ],
    }
    print(f"{'case':<26}{'qwen2vl (s)':>13}{'reference (s)':>15}{'ratio':>9}")
    for name, conv in cases.items():
        a, b = ours(conv), reference(conv)
        assert a["input_ids"].shape == b["input_ids"].shape, "the two sides must produce the same inputs"
        t_ours = median_time(lambda c=conv: ours(c), args.repeats, warmup=True)
        t_ref = median_time(lambda c=conv: reference(c), args.repeats, warmup=True)
        print(f"{name:<26}{t_ours:>13.3f}{t_ref:>15.3f}{t_ref / t_ours:>8.2f}x")


if __name__ == "__main__":
    main()
