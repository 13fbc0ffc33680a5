"""What a second chat turn costs with the session's KV reuse and vision cache, against re-running the history.

    python benchmarks/bench_chat.py [--dir /tmp/qwen2vl-2b-random]

Turn 1 sends a 448x448 image and a question; turn 2 a follow-up. For turn 2 the session runs only the new
tokens (the history's keys/values and the image's features are kept); the comparison is the same conversation
run fresh by a new pipeline call (vision encode + whole-prompt prefill), which is what a stateless chat loop does.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", default="/tmp/qwen2vl-2b-random")
    ap.add_argument("--new-tokens", type=int, default=8)
    args = ap.parse_args()
    from PIL import Image

    import qwen2vl
    from qwen2vl.pipeline import ChatSession
    from qwen2vl.testing.tokenizer_files import write_preprocessor_config, write_tokenizer_files

    path = Path(args.dir)
    if not (path / "tokenizer.json").exists():
        write_tokenizer_files(path)
        write_preprocessor_config(path)
    image = path.parent / "bench_chat_448.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (448, 448, 3), dtype=np.uint8)).save(image)
    pipe = qwen2vl.load(str(path), progress=False)
    session = ChatSession(pipe)
    first = [{"type": "image", "image": str(image)}, {"type": "text", "text": "What do you see in this picture?"}]
    t0 = time.perf_counter()
    "".join(session.send(first, max_new_tokens=args.new_tokens, temperature=0))
    turn1 = time.perf_counter() - t0
    t1 = pipe.last_timings
    t0 = time.perf_counter()
    "".join(session.send("And what colours dominate?", max_new_tokens=args.new_tokens, temperature=0))
    turn2 = time.perf_counter() - t0
    t2 = pipe.last_timings
    history = session.messages[:-1]
    pipe._vision.clear()  # a stateless loop encodes the image again
    t0 = time.perf_counter()
    pipe.chat(history, max_new_tokens=args.new_tokens, temperature=0)
    fresh = time.perf_counter() - t0
    t3 = pipe.last_timings
    print(
        f"turn 1 (image + question): {turn1:.2f} s; vision {t1.vision_s:.2f} s, prefill {t1.prefill_s:.2f} s "
        f"of {t1.prompt_tokens} tokens"
    )
    print(
        f"turn 2 with the session:   {turn2:.2f} s; vision {t2.vision_s:.2f} s, prefill {t2.prefill_s:.2f} s, "
        f"{t2.prompt_tokens - t2.reused_tokens} of {t2.prompt_tokens} prompt tokens run"
    )
    print(
        f"turn 2 run fresh:          {fresh:.2f} s; vision {t3.vision_s:.2f} s, prefill {t3.prefill_s:.2f} s of "
        f"{t3.prompt_tokens} tokens  ->  the session is {fresh / turn2:.1f}x faster for this turn"
    )


if __name__ == "__main__":
    main()
