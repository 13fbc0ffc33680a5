"""Synthetic test videos (H.264 or MPEG-4 through PyAV): a moving pattern and a frame counter in the pixels, so
that every frame differs and the chosen frames can be recognised; used by tests and benchmarks."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_test_video(path: str | Path, seconds: float, size: tuple[int, int] = (640, 360), fps: int = 24,
                     codec: str = "libx264", gop: int = 250) -> Path:
    """A `seconds`-long video of `size` (width, height) at `fps`, like ffmpeg's testsrc: colour bars that scroll,
    a square that moves, and the frame number written as a binary stripe along the bottom."""
    import av

    width, height = size
    path = Path(path)
    x = np.arange(width)[None, :]
    y = np.arange(height)[:, None]
    bars = np.stack(np.broadcast_arrays((x * 7) % 256, (x * 3 + y) % 256, (y * 5 + 0 * x) % 256), axis=-1)
    bars = bars.astype(np.uint8)
    with av.open(str(path), "w") as out:
        stream = out.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.gop_size = gop
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "tune": "zerolatency"}
        for n in range(int(seconds * fps)):
            img = np.roll(bars, n * 2, axis=1).copy()
            s = (n * 3) % max(1, width - 40), (n * 2) % max(1, height - 40)
            img[s[1]:s[1] + 40, s[0]:s[0] + 40] = (255, 255, 255)
            bits = [(n >> b) & 1 for b in range(16)]
            for b, bit in enumerate(bits):
                img[height - 8:, b * 8:(b + 1) * 8] = 255 * bit
            frame = av.VideoFrame.from_ndarray(img, format="rgb24")
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path
