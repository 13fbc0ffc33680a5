"""Grounding output: parsing refs, boxes and quads; 0-1000 -> original pixels; drawing."""

from __future__ import annotations

import pytest
from PIL import Image

from qwen2vl.grounding import Box, draw_boxes, parse_boxes

REF = "<|object_ref_start|>{}<|object_ref_end|>"
BOX = "<|box_start|>{}<|box_end|>"
QUAD = "<|quad_start|>{}<|quad_end|>"


def labels_and_points(text: str) -> list[tuple[str | None, tuple]]:
    return [(b.label, b.points) for b in parse_boxes(text, (1000, 1000))]


def test_ref_then_box_and_several_per_text():
    text = (
        f"There is {REF.format('a cat')}{BOX.format('(100,200),(500,800)')} next to "
        f"{REF.format(' the dog ')}{BOX.format('(600,100),(900,400)')}."
    )
    assert labels_and_points(text) == [("a cat", ((100, 200), (500, 800))), ("the dog", ((600, 100), (900, 400)))]


def test_several_boxes_after_one_ref_share_its_label():
    text = (
        REF.format("cats")
        + BOX.format("(1,2),(3,4)")
        + BOX.format("(5,6),(7,8)")
        + ", "
        + BOX.format("(9,10),(11,12)")
        + " and "
        + BOX.format("(13,14),(15,16)")
    )
    assert [label for label, _ in labels_and_points(text)] == ["cats"] * 4


def test_a_box_without_a_ref_has_no_label():
    text = (
        BOX.format("(1,2),(3,4)")
        + REF.format("cat")
        + BOX.format("(5,6),(7,8)")
        + " while the table is at "
        + BOX.format("(10,20),(30,40)")
    )
    assert [label for label, _ in labels_and_points(text)] == [None, "cat", None]
    # a ref with no box of its own does not label a box after other text
    assert labels_and_points(REF.format("sky") + " is blue, see " + BOX.format("(0,0),(9,9)"))[0][0] is None
    assert labels_and_points(REF.format("") + BOX.format("(0,0),(9,9)"))[0][0] is None


def test_quads():
    text = REF.format("sign") + QUAD.format("(10,10),(90,10), (90,50),(10,50)") + BOX.format("(1,1),(2,2)")
    boxes = parse_boxes(text, (1000, 500))
    assert boxes[0].is_quad and boxes[0].label == "sign" and boxes[0].points[2] == (90, 50)
    assert boxes[0].pixels == ((10, 5), (90, 5), (90, 25), (10, 25))
    assert not boxes[1].is_quad and boxes[1].label == "sign"


@pytest.mark.parametrize(
    "bad",
    [
        BOX.format("(1,2)"),  # one corner
        BOX.format("(1,2),(3,4),(5,6)"),  # three
        QUAD.format("(1,2),(3,4)"),  # a quad needs four
        BOX.format("(a,b),(c,d)"),
        BOX.format("(1,2),(3,4) junk"),
        BOX.format("1,2,3,4"),
        "<|box_start|>(1,2),(3,4)",  # never closed
        "<|box_start|>(1,2),(3,4)<|quad_end|>",  # closed by the wrong marker
    ],
)
def test_malformed_boxes_are_skipped_not_fatal(bad):
    good = BOX.format("(5,6),(7,8)")
    assert labels_and_points(bad + good) == [(None, ((5, 6), (7, 8)))]
    assert labels_and_points(bad) == []


def test_an_unclosed_box_does_not_swallow_the_next_one():
    text = "<|box_start|>(1,2" + REF.format("dog") + BOX.format("(3,4),(5,6)")
    assert labels_and_points(text) == [("dog", ((3, 4), (5, 6)))]


def test_mapping_to_the_original_image_size_and_clamping():
    boxes = parse_boxes(
        BOX.format("(100,200),(500,800)") + BOX.format("(0,0),(1000,1000)") + BOX.format("(-20, 5),(1200,999.5)"),
        (640, 480),
    )
    assert boxes[0].pixels == ((64, 96), (320, 384))
    assert boxes[1].pixels == ((0, 0), (640, 480))
    assert boxes[2].points == ((-20, 5), (1200, 999.5)) and boxes[2].pixels == ((0, 2.4), (640, 479.76))
    corners = parse_boxes(BOX.format("(333,667),(1,999)"), (1001, 7))[0].pixels
    assert [c for p in corners for c in p] == pytest.approx(
        [333 / 1000 * 1001, 667 / 1000 * 7, 1 / 1000 * 1001, 999 / 1000 * 7], rel=1e-15
    )
    with pytest.raises(ValueError, match="image_size must be a positive"):
        parse_boxes("", (0, 10))


def test_draw_boxes_outlines_each_box_on_a_copy(tmp_path):
    image = Image.new("RGB", (320, 200), "white")
    text = (
        REF.format("left thing")
        + BOX.format("(100,250),(400,750)")
        + BOX.format("(600,0),(900,500)")
        + QUAD.format("(500,800),(900,800),(900,950),(500,950)")
    )
    boxes = parse_boxes(text, image.size)
    out = draw_boxes(image, boxes, tmp_path / "out.png")
    assert out.size == image.size and out is not image
    assert image.getcolors() == [(320 * 200, (255, 255, 255))]  # the input is untouched
    assert Image.open(tmp_path / "out.png").size == image.size
    white = (255, 255, 255)
    # box 1 spans x 32..128, y 50..150: its four edges are drawn, its inside and the outside are not
    edges = [(32, 100), (128, 100), (80, 150), (80, 50)]
    assert all(out.getpixel(p) != white for p in edges)
    assert out.getpixel((80, 100)) == white and out.getpixel((20, 180)) == white
    # the second box and the quad have their own colours
    colours = {out.getpixel((32, 100)), out.getpixel((288, 50)), out.getpixel((160, 175))}
    assert len(colours) == 3 and white not in colours
    # a label is drawn above the first box
    assert any(out.getpixel((x, y)) != white for x in range(32, 80) for y in range(35, 49))
    # RGBA / greyscale inputs come back as RGB of the same size; no boxes: an unchanged copy
    assert draw_boxes(Image.new("L", (10, 20)), [Box(None, ((0, 0), (500, 500)), ((0, 0), (5, 10)))]).size == (10, 20)
    assert draw_boxes(image, []).tobytes() == image.tobytes()
