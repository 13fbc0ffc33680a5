"""Grounding output: `<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>`
and `<|quad_start|>(x1,y1),...,(x4,y4)<|quad_end|>` four-point polygons, parsed and mapped to the original image.

Qwen2-VL writes corners normalised to [0, 1000) of the image width and height, whatever the resized resolution
(unlike Qwen2.5-VL's absolute pixels): x_px = x/1000*W, y_px = y/1000*H. Decode with special tokens kept. A box
takes the label of the ref just before it, or of the box before it when only spaces, commas or "and" separate
them (several boxes for one phrase, as Qwen-VL's own drawing code reads them). Malformed boxes are skipped.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

_NUM = r"\s*(-?\d+(?:\.\d+)?)\s*"
_POINT = re.compile(rf"\({_NUM},{_NUM}\)")
_ITEM = re.compile(
    r"<\|object_ref_start\|>(?P<ref>[^<]*)<\|object_ref_end\|>"
    r"|<\|box_start\|>(?P<box>[^<]*)<\|box_end\|>"
    r"|<\|quad_start\|>(?P<quad>[^<]*)<\|quad_end\|>"
)
_CONTINUES = re.compile(r"[\s,;，、]*(?:and[\s,;]*)?", re.I)  # what may separate a ref's boxes

Point = tuple[float, float]


@dataclass(frozen=True)
class Box:
    label: str | None  # the referring phrase, None for a box without one
    points: tuple[Point, ...]  # as written, normalised to 0-1000: 2 corners (box) or 4 (quad)
    pixels: tuple[Point, ...]  # the same points in pixels of the original image, clamped into it

    @property
    def is_quad(self) -> bool:
        return len(self.points) == 4


def _points(body: str, count: int) -> tuple[Point, ...] | None:
    """`(x,y),(x,y)...` with exactly `count` points and nothing else, or None."""
    found = list(_POINT.finditer(body))
    if len(found) != count or _POINT.sub("", body).strip(" \t\n,"):
        return None
    return tuple((float(m.group(1)), float(m.group(2))) for m in found)


def parse_boxes(text: str, image_size: tuple[int, int]) -> list[Box]:
    """Every box and quad in `text`, in order; image_size = (width, height) of the original image."""
    width, height = image_size
    if width <= 0 or height <= 0:
        raise ValueError(f"image_size must be a positive (width, height), got {image_size}")
    boxes: list[Box] = []
    label, end = None, 0
    for m in _ITEM.finditer(text):
        if label is not None and not _CONTINUES.fullmatch(text, end, m.start()):
            label = None  # other text came between the phrase (or its last box) and this item
        end = m.end()
        if m.group("ref") is not None:
            label = m.group("ref").strip() or None
            continue
        quad = m.group("quad") is not None
        points = _points(m.group("quad") if quad else m.group("box"), 4 if quad else 2)
        if points is None:
            continue
        pixels = tuple(
            (min(max(x * width / 1000, 0.0), width), min(max(y * height / 1000, 0.0), height)) for x, y in points
        )
        boxes.append(Box(label, points, pixels))
    return boxes


COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#9a6324"]


def draw_boxes(image: Image.Image, boxes: list[Box], path: str | Path | None = None) -> Image.Image:
    """A copy of `image` with each box (or quad) outlined in its own colour and labelled; saved to `path` if given."""
    out = image.convert("RGB")  # always a new image
    draw = ImageDraw.Draw(out)
    line = max(2, round(min(out.size) / 200))
    for i, box in enumerate(boxes):
        colour = COLOURS[i % len(COLOURS)]
        if box.is_quad:
            draw.line([*box.pixels, box.pixels[0]], fill=colour, width=line, joint="curve")
        else:
            (x1, y1), (x2, y2) = box.pixels
            draw.rectangle((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)), outline=colour, width=line)
        if box.label:
            x, y = min(p[0] for p in box.pixels), min(p[1] for p in box.pixels)
            text_height = draw.textbbox((0, 0), box.label)[3]
            if y >= text_height + 2:  # above the box when there is room, else just inside it
                y -= text_height + 2
            left, top, right, bottom = draw.textbbox((x, y), box.label)
            draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
            draw.text((x, y), box.label, fill="white")
    if path is not None:
        out.save(path)
    return out
