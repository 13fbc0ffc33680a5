"""How well the demo model sees: fresh pictures drawn here, independently of the training code's drawer
(`qwen2vl/train/demo.py`), from the task's written description, then the three questions asked through the
public API (`qwen2vl.load(...).generate`, greedy).

    python benchmarks/demo_accuracy.py --model DIR --pictures 100 --seed 1234   # DIR: written by train_demo

Scores: shapes (the answer to "What shapes are in this picture?" names exactly the picture's colour+kind pairs),
counts (the number in digits is right), boxes (for every shape, "Where is the <colour> <shape>?" gives a box
whose IoU with the shape's bounding box is at least 0.5).

This drawer rasterises with numpy half-planes and distances (not PIL's ImageDraw), takes real-valued sizes and
positions, draws triangles equilateral, and places shapes at least 2 pixels apart.
"""

from __future__ import annotations

import argparse
import math
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from qwen2vl.train.demo import iou  # scoring only: the pictures are drawn here, independently

COLOURS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 70, 220), "yellow": (230, 200, 40)}
KINDS = ("circle", "square", "triangle")
_BOX = re.compile(r"<\|box_start\|>\((\d+),(\d+)\),\((\d+),(\d+)\)<\|box_end\|>")


@dataclass
class Drawn:
    colour: str
    kind: str
    box: tuple[float, float, float, float]  # pixels, x1 y1 x2 y2


def picture(rng: np.random.Generator) -> tuple[Image.Image, list[Drawn]]:
    width = height = int(rng.integers(224, 449))  # a square canvas
    pairs = [(c, k) for c in COLOURS for k in KINDS]
    chosen = [pairs[i] for i in rng.choice(len(pairs), size=int(rng.integers(1, 4)), replace=False)]
    canvas = np.full((height, width, 3), 255, np.uint8)
    ys, xs = np.mgrid[0:height, 0:width] + 0.5
    shapes: list[Drawn] = []
    for colour, kind in chosen:
        for _ in range(500):
            side = float(rng.uniform(40, 120))
            tall = side * math.sqrt(3) / 2 if kind == "triangle" else side
            x1, y1 = float(rng.uniform(0, width - side)), float(rng.uniform(0, height - tall))
            box = (x1, y1, x1 + side, y1 + tall)
            if all(
                box[2] + 2 <= s.box[0] or s.box[2] + 2 <= box[0] or box[3] + 2 <= s.box[1] or s.box[3] + 2 <= box[1]
                for s in shapes
            ):
                break
        else:
            continue
        if kind == "circle":
            r = side / 2
            mask = (xs - x1 - r) ** 2 + (ys - y1 - r) ** 2 <= r * r
        elif kind == "square":
            mask = (xs >= x1) & (xs <= x1 + side) & (ys >= y1) & (ys <= y1 + side)
        else:  # apex up: below both slanted edges and above the base
            cx, bottom = x1 + side / 2, y1 + tall
            slope = tall / (side / 2)
            mask = (ys <= bottom) & (ys >= y1 + slope * np.abs(xs - cx))
        canvas[mask] = COLOURS[colour]
        shapes.append(Drawn(colour, kind, box))
    return Image.fromarray(canvas), shapes


def pairs_named(answer: str) -> list[tuple[str, str]]:
    words = re.findall(r"[a-z]+", answer.lower())
    return [(c, k.rstrip("s")) for c, k in zip(words, words[1:]) if c in COLOURS and k.rstrip("s") in KINDS]


def ask(pipe, path: str, question: str) -> list:
    return [{"role": "user", "content": [{"type": "image", "image": path}, {"type": "text", "text": question}]}]


def score(pipe, pictures: int, seed: int, batch: int = 8, log=None) -> dict:
    rng = np.random.default_rng(seed)
    shapes_ok = counts_ok = boxes_ok = boxes = 0
    with tempfile.TemporaryDirectory() as tmp:
        items = []
        for i in range(pictures):
            image, drawn = picture(rng)
            path = str(Path(tmp) / f"{i}.png")
            image.save(path)
            items.append((path, image.size, drawn))
        jobs = []  # (conversation, check)
        for path, size, drawn in items:
            jobs.append((ask(pipe, path, "What shapes are in this picture?"), ("shapes", drawn, size)))
            jobs.append((ask(pipe, path, "How many shapes are there?"), ("count", drawn, size)))
            for d in drawn:
                jobs.append((ask(pipe, path, f"Where is the {d.colour} {d.kind}?"), ("box", d, size)))
        answers = []
        for start in range(0, len(jobs), batch):
            chunk = jobs[start : start + batch]
            answers += pipe.generate([c for c, _ in chunk], max_new_tokens=40, skip_special_tokens=False)
        for (conv, (what, truth, size)), answer in zip(jobs, answers):
            if what == "shapes":
                ok = sorted(pairs_named(answer)) == sorted((d.colour, d.kind) for d in truth)
                shapes_ok += ok
            elif what == "count":
                ok = answer.strip().removesuffix("<|im_end|>").strip() == str(len(truth))
                counts_ok += ok
            else:
                m = _BOX.search(answer)
                w, h = size
                got = None if m is None else [int(v) for v in m.groups()]
                box = (
                    None
                    if got is None
                    else (got[0] * w / 1000, got[1] * h / 1000, got[2] * w / 1000, got[3] * h / 1000)
                )
                ok = box is not None and iou(box, truth.box) >= 0.5
                boxes_ok += ok
                boxes += 1
            if log is not None and not ok:
                print(f"miss [{what}] {conv[0]['content'][1]['text']!r} -> {answer!r}", file=log)
    return {
        "pictures": pictures,
        "shapes": shapes_ok / pictures,
        "counts": counts_ok / pictures,
        "boxes": boxes_ok / max(1, boxes),
        "box_questions": boxes,
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--pictures", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--misses", action="store_true", help="print each wrong answer")
    args = ap.parse_args(argv)
    import qwen2vl

    pipe = qwen2vl.load(args.model, progress=False)
    t0 = time.perf_counter()
    result = score(pipe, args.pictures, args.seed, log=sys.stdout if args.misses else None)
    print(
        f"{result['pictures']} pictures: shapes {result['shapes']:.0%}, counts {result['counts']:.0%}, "
        f"boxes IoU>=0.5 {result['boxes']:.0%} of {result['box_questions']} ({time.perf_counter() - t0:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
