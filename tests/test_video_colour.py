"""Video frames decoded to the same RGB bytes as the reference's decoder (torchcodec 0.17, through which qwen-vl-utils
0.0.14 reads files): sharp-edged clips in the pixel formats, colour tags, sizes and codecs the world uses, compared
byte for byte before any resize, then through both resizes against qwen-vl-utils + transformers."""

from __future__ import annotations

import av
import numpy as np
import pytest
import torch

from processing_fixtures import oracle
from qwen2vl.processing.image import IMAGE_STD
from qwen2vl.processing.media import MediaPolicy
from qwen2vl.processing.video import _open, decode_frames, probe
from qwen2vl.testing.video import encode_video, sharp_frames

GREY_LEVEL = 1.0 / (255 * min(IMAGE_STD))
TWO_GREY_LEVELS = 2 * GREY_LEVEL + 1e-5  # 0.030

BT709, LIMITED, FULL = 1, 1, 2
# (width, height), codec, container, pixel format, colorspace tag, range tag. Widths that are multiples of 32 take
# torchcodec's swscale path, the others its filter-graph path.
CLIPS = {
    "yuv420p": ((96, 64), "libx264", "mp4", "yuv420p", None, None),
    "yuv420p-bt709-filtergraph": ((70, 46), "libx264", "mp4", "yuv420p", BT709, LIMITED),
    "yuvj420p-full": ((64, 48), "libx264", "mp4", "yuvj420p", None, None),
    "yuv420p-full-tag": ((86, 48), "libx264", "mp4", "yuv420p", BT709, FULL),
    "yuv444p-odd": ((33, 27), "libx264", "mp4", "yuv444p", None, None),
    "yuv422p-odd": ((37, 21), "ffv1", "mkv", "yuv422p", BT709, None),
    "yuv420p-odd-height": ((64, 29), "ffv1", "mkv", "yuv420p", None, None),
    "yuv420p-rawvideo-odd": ((63, 47), "rawvideo", "nut", "yuv420p", None, None),
    "yuv420p10le": ((128, 96), "libx264", "mp4", "yuv420p10le", None, None),
    "yuv420p10le-bt709": ((120, 90), "libx264", "mkv", "yuv420p10le", BT709, LIMITED),
    "yuv420p10le-full": ((96, 64), "libx264", "mp4", "yuv420p10le", BT709, FULL),
    "yuv422p10le": ((70, 48), "libx264", "mkv", "yuv422p10le", 9, None),
    "yuv444p10le": ((64, 40), "libx264", "mp4", "yuv444p10le", None, None),
    "gray": ((64, 48), "ffv1", "mkv", "gray", None, None),
    "vp9": ((64, 48), "libvpx-vp9", "webm", "yuv420p", None, None),
}


def make_clip(directory, name, frames=4, seed=0):
    (w, h), codec, suffix, pix_fmt, colorspace, color_range = CLIPS[name]
    if codec not in av.codecs_available:
        pytest.fail(f"PyAV lacks the {codec} encoder needed to build this test's clip")
    return encode_video(
        directory / f"{name}.{suffix}",
        sharp_frames((w, h), frames, seed),
        (w, h),
        fps=4,
        codec=codec,
        gop=None,
        pix_fmt=pix_fmt,
        colorspace=colorspace,
        color_range=color_range,
    )


def ours(path) -> torch.Tensor:
    """Every frame at its source size: RGB as decoded, with no resize."""
    with _open(str(path), MediaPolicy(), "v") as container:
        total, _, height, width = probe(container, "v")
        return decode_frames(container, list(range(total)), "v", (height, width))


def reference(path) -> torch.Tensor:
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(str(path))
    return decoder.get_frames_at(list(range(decoder.metadata.num_frames))).data


def plain_pyav(path) -> torch.Tensor:
    with av.open(str(path)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("name", list(CLIPS))
def test_decoded_rgb_equals_torchcodec(name, tmp_path):
    path = make_clip(tmp_path, name, seed=len(name))
    got, want = ours(path), reference(path)
    assert got.shape == want.shape
    assert torch.equal(got, want), f"{name}: {(got.int() - want.int()).abs().max().item()} grey levels apart"


@pytest.mark.parametrize("name", ["yuv420p10le", "yuv420p-odd-height", "yuv422p-odd"])
def test_pyav_plain_conversion_differs_on_these(name, tmp_path):
    """Why the converter exists: PyAV's own `to_ndarray` sites chroma elsewhere and interpolates bilinearly, which
    shows at sharp colour edges by far more than a grey level on these formats."""
    path = make_clip(tmp_path, name)
    assert (plain_pyav(path).int() - reference(path).int()).abs().max() > 5


@pytest.mark.parametrize(
    "name, fields",
    [
        ("yuv420p10le", {"min_pixels": 3136, "max_pixels": 8000}),
        ("yuv420p-odd-height", {}),
        ("yuv420p-full-tag", {"resized_height": 56, "resized_width": 84}),
        ("yuv422p10le", {"nframes": 4}),
    ],
)
def test_processor_pixels_within_two_grey_levels_of_the_reference(name, fields, repo, proc, tmp_path, parity_report):
    path = make_clip(tmp_path, name, frames=8, seed=3)
    conv = [
        {
            "role": "user",
            "content": [{"type": "video", "video": str(path), **fields}, {"type": "text", "text": "What changes?"}],
        }
    ]
    got, want = proc(conv), oracle(repo, conv)
    assert torch.equal(got["input_ids"], want["input_ids"])
    assert torch.equal(got["video_grid_thw"], want["video_grid_thw"])
    diff = (got["pixel_values_videos"] - want["pixel_values_videos"]).abs().max().item()
    parity_report(f"sharp-edged {name} video pixels vs reference", diff, TWO_GREY_LEVELS)
    assert diff <= TWO_GREY_LEVELS, f"{diff} exceeds two grey levels"


def size_changing_clip(directory) -> str:
    """An H.264 stream whose second half has another picture size (as a camera switching resolution), in mkv."""
    from fractions import Fraction

    raw = directory / "two.h264"
    with open(raw, "wb") as f:
        for size in ((64, 48), (96, 80)):
            part = directory / "part.h264"
            with av.open(str(part), "w", format="h264") as out:
                stream = out.add_stream("libx264", rate=4)
                stream.width, stream.height, stream.pix_fmt = *size, "yuv420p"
                for img in sharp_frames(size, 4, seed=size[0]):
                    for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                        out.mux(packet)
                for packet in stream.encode():
                    out.mux(packet)
            f.write(part.read_bytes())
    path = directory / "two_sizes.mkv"
    with av.open(str(raw)) as source, av.open(str(path), "w") as out:
        stream = out.add_stream_from_template(source.streams.video[0])
        for n, packet in enumerate(p for p in source.demux(source.streams.video[0]) if p.size):
            packet.stream, packet.pts, packet.dts, packet.time_base = stream, n, n, Fraction(1, 4)
            out.mux(packet)
    return path


def test_a_size_change_midway_is_scaled_to_the_first_size(tmp_path):
    """torchcodec's batch read (qwen-vl-utils' `get_frames_at`) refuses such a stream; we keep every frame, the
    later ones scaled to the first size, the earlier ones torchcodec's bytes."""
    path = size_changing_clip(tmp_path)
    got = ours(path)
    assert got.shape == (8, 3, 48, 64)
    from torchcodec.decoders import VideoDecoder

    decoder = VideoDecoder(str(path))
    assert torch.equal(got[:4], decoder.get_frames_at([0, 1, 2, 3]).data)
    with pytest.raises(RuntimeError):
        decoder.get_frames_at(list(range(8)))
    assert all(not torch.equal(got[k], got[k - 1]) for k in range(4, 8))
