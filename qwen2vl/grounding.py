"""Grounding output: `<|object_ref_start|>label<|object_ref_end|><|box_start|>(x1,y1),(x2,y2)<|box_end|>` (and
`<|quad_start|>...<|quad_end|>` four-point polygons) parsed into data and mapped to the original image's pixels.

Qwen2-VL writes coordinates normalised to [0, 1000) of the image width and height (spec 9; unlike Qwen2.5-VL,
which uses absolute pixels of the resized image). Malformed boxes are skipped, not fatal.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image, ImageDraw

_ITEM = re.compile(
    r"(?:<\|object_ref_start\|>(?P<ref>.*?)<\|object_ref_end\|>)?\s*"
    r"(?:<\|box_start\|>(?P<box>.*?)<\|box_end\|>|<\|quad_start\|>(?P<quad>.*?)<\|quad_end\|>)", re.S)
_POINT = re.compile(r"\(\s*(-?\d+(?:\.\d+)?)\s*,\s*(-?\d+(?:\.\d+)?)\s*\)")


@dataclass(frozen=True)
class Box:
    label: str | None
    points: tuple[tuple[float, float], ...]  # normalised 0-1000: 2 corners (box) or 4 (quad)
    pixels: tuple[tuple[float, float], ...]  # the same points in pixels of the original image

    @property
    def is_quad(self) -> bool:
        return len(self.points) == 4


def parse_boxes(text: str, image_size: tuple[int, int]) -> list[Box]:
    """Every box/quad in `text` (decoded with special tokens kept); image_size = (width, height) of the original."""
    width, height = image_size
    boxes, label = [], None
    for m in _ITEM.finditer(text):
        if m.group("ref") is not None:
            label = m.group("ref").strip()
        body = m.group("box") if m.group("box") is not None else m.group("quad")
        pts = tuple((float(x), float(y)) for x, y in _POINT.findall(body))
        if len(pts) != (2 if m.group("box") is not None else 4):
            continue
        px = tuple((min(max(x, 0.0), 1000.0) / 1000 * width, min(max(y, 0.0), 1000.0) / 1000 * height) for x, y in pts)
        boxes.append(Box(label, pts, px))
    return boxes


COLOURS = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45"]


def draw_boxes(image: Image.Image, boxes: list[Box], path=None) -> Image.Image:
    """A copy of `image` with each box (or quad) outlined and labelled; saved to `path` when given."""
    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    width = max(2, round(min(out.size) / 200))
    for i, box in enumerate(boxes):
        colour = COLOURS[i % len(COLOURS)]
        if box.is_quad:
            draw.polygon(box.pixels, outline=colour, width=width)
        else:
            (x1, y1), (x2, y2) = box.pixels
            draw.rectangle((min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)), outline=colour, width=width)
        if box.label:
            x, y = box.pixels[0]
            left, top, right, bottom = draw.textbbox((x, y), box.label)
            draw.rectangle((left - 1, top - 1, right + 1, bottom + 1), fill=colour)
            draw.text((x, y), box.label, fill="white")
    if path is not None:
        out.save(path)
    return out
