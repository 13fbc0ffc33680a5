"""Synthetic test videos written with PyAV, for tests and benchmarks: every frame differs (scrolling colour bars,
a moving square, the frame number as a binary stripe), so the chosen frames can be told apart."""

from __future__ import annotations

from collections.abc import Iterable
from fractions import Fraction
from pathlib import Path

import numpy as np


def encode_video(
    path: str | Path,
    frames: Iterable[np.ndarray],
    size: tuple[int, int],
    fps: int,
    codec: str = "libx264",
    gop: int | None = 250,
    vfr: bool = False,
    pix_fmt: str = "yuv420p",
    colorspace: int | None = None,
    color_range: int | None = None,
) -> Path:
    """RGB frames (H, W, 3) uint8 of `size` (width, height) written as a `pix_fmt` clip at `fps`. `codec` falls back
    from libx264 to MPEG-4 Part 2 where PyAV lacks it; `gop` None keeps the codec's own; `vfr` gives irregular frame
    times (a variable frame rate); `colorspace` and `color_range` (AVColorSpace, AVColorRange numbers) tag the
    stream, as cameras and encoders do (1: BT.709; range 1: limited, 2: full)."""
    import av

    path = Path(path)
    if codec == "libx264" and codec not in av.codecs_available:
        codec = "mpeg4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = size[0], size[1], pix_fmt
        if colorspace is not None:
            stream.codec_context.colorspace = colorspace
        if color_range is not None:
            stream.codec_context.color_range = color_range
        if gop is not None:
            stream.gop_size = gop
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        if vfr:
            stream.codec_context.time_base = Fraction(1, 1000)
        t = 0
        for n, img in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            if vfr:
                frame.pts, frame.time_base = t, Fraction(1, 1000)
                t += 50 if n % 3 else 150  # irregular gaps
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def write_test_video(
    path: str | Path,
    seconds: float,
    size: tuple[int, int] = (640, 360),
    fps: int = 24,
    codec: str = "libx264",
    gop: int = 250,
    vfr: bool = False,
) -> Path:
    """A `seconds`-long clip of `size` (width, height) at `fps`: scrolling bars, a moving square, a frame-number
    stripe (see `encode_video` for the other arguments)."""
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    bars = np.stack([(x * 7) % 256, (x * 3 + y) % 256, (y * 5) % 256], axis=-1).astype(np.uint8)
    side, stripe = min(40, width // 3, height // 3), min(8, width // 16)

    def frame(n: int) -> np.ndarray:
        img = np.roll(bars, n * 2, axis=1)
        sx, sy = (n * 3) % max(1, width - side), (n * 2) % max(1, height - side)
        img[sy : sy + side, sx : sx + side] = 255
        for b in range(min(16, width // max(1, stripe))):
            img[height - max(1, height // 12) :, b * stripe : (b + 1) * stripe] = 255 * ((n >> b) & 1)
        return img

    return encode_video(path, (frame(n) for n in range(round(seconds * fps))), size, fps, codec, gop, vfr)


def sharp_frames(size: tuple[int, int], count: int, seed: int = 0) -> list[np.ndarray]:
    """`count` RGB frames of `size` (width, height) with sharp colour edges: stripes, checkerboards and random
    blocks in random colours, one pixel wide in places. Where decoders' colour conversions differ (chroma siting,
    interpolation) such edges show it, by tens of grey levels; smooth gradients hide it."""
    rng = np.random.default_rng(seed)
    width, height = size
    y, x = np.mgrid[0:height, 0:width]
    frames = []
    for n in range(count):
        a, b = rng.integers(0, 256, (2, 3))
        blocks = np.kron(rng.integers(0, 2, (height // 4 + 1, width // 4 + 1)), np.ones((4, 4), int))
        pattern = [(x // (1 + n % 3)) % 2, (y // (1 + n % 2)) % 2, (x // 3 + y // 3 + n) % 2, blocks[:height, :width]]
        mask = pattern[n % 4].astype(bool)[..., None]
        img = np.where(mask, a, b).astype(np.uint8)
        img[rng.integers(0, height), :] = rng.integers(0, 256, 3)  # a one-pixel line of a third colour
        frames.append(img)
    return frames
