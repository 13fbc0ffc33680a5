"""Videos: how many frames, which ones, at what first size, decoded with PyAV reading only what is kept.

Matches qwen-vl-utils 0.0.14 `smart_nframes`, `fetch_video` (frame indices `linspace(start, end, n).round()`,
`video_start`/`video_end` as its torchcodec reader, the per-frame pixel budget of `sizing.frame_size`) and its
resize (`torchvision.transforms.functional.resize(BICUBIC, antialias=True)` on uint8 tensors = float32
interpolation, clamp, round). The processor's own resize (step 2) follows in `Processor.video`.
Deliberate difference: a list of frames is resized once, by the video rule; qwen-vl-utils 0.0.14 `fetch_video`
first resizes every frame to multiples of 56 by the image rule and then again (a double resize).
Frames become RGB as torchcodec 0.17 converts them (`RgbConverter`): the same bytes, not PyAV's own conversion.
"""

from __future__ import annotations

import io
import itertools
import math
from dataclasses import dataclass, replace
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError
from .image import to_rgb
from .media import Fetched, MediaPolicy, load_image, open_image, read_bytes
from .sizing import FRAME_FACTOR, frame_size

FPS, FPS_MIN_FRAMES, FPS_MAX_FRAMES = 2.0, 4, 768


@dataclass(frozen=True)
class VideoPlan:
    total_frames: int
    fps: float
    height: int
    width: int
    indices: list[int]
    resized: tuple[int, int]

    frame_pixels: tuple[int, ...] = ()  # per source frame of a frame list; empty for a video file

    @property
    def source_pixels(self) -> int:
        """Pixels decoded before resizing: every kept frame at its source size."""
        if self.frame_pixels:
            return sum(self.frame_pixels[i] for i in self.indices)
        return len(self.indices) * self.height * self.width

    @property
    def timestamps(self) -> list[float]:
        return [i / self.fps for i in self.indices] if self.fps else []


def smart_nframes(ele: dict, total_frames: int, video_fps: float, what: str = "video") -> int:
    if "fps" in ele and "nframes" in ele:
        raise InputError("give either fps or nframes, not both", what)
    if "nframes" in ele:
        n = round(ele["nframes"] / FRAME_FACTOR) * FRAME_FACTOR
    else:
        fps = ele.get("fps", FPS)
        lo = math.ceil(ele.get("min_frames", FPS_MIN_FRAMES) / FRAME_FACTOR) * FRAME_FACTOR
        hi = math.floor(ele.get("max_frames", min(FPS_MAX_FRAMES, total_frames)) / FRAME_FACTOR) * FRAME_FACTOR
        n = total_frames / video_fps * fps
        n = min(min(max(n, lo), hi), total_frames)
        n = math.floor(n / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= n <= total_frames:
        raise InputError(
            f"{n} frames requested from a video of {total_frames} decodable frames; need 2..{total_frames}", what
        )
    return int(n)


def sample_indices(ele: dict, total_frames: int, video_fps: float, what: str = "video") -> list[int]:
    start, end = 0, total_frames - 1
    if ele.get("video_start") is not None:
        start = max(0, math.ceil(float(ele["video_start"]) * video_fps))
    if ele.get("video_end") is not None:
        end = min(math.floor(float(ele["video_end"]) * video_fps), total_frames - 1)
    if end < start:
        raise InputError(f"video_start/video_end select no frames (frames {start}..{end})", what)
    n = smart_nframes(ele, end - start + 1, video_fps, what)
    return torch.linspace(start, end, n).round().long().tolist()


def resize_frames(frames: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """uint8 (T, 3, H, W) -> uint8 (T, 3, height, width), bicubic with antialias, as qwen-vl-utils' torchvision v1
    `resize` on uint8 tensors: float32 interpolation, clamp, round (not torch's native uint8 kernel)."""
    if frames.shape[-2:] == (height, width):
        return frames
    out = F.interpolate(frames.float(), size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.clamp_(0, 255).round_().to(torch.uint8)


# Colour matrices by the frame's AVColorSpace, as libswscale's `sws_getCoefficients` picks its table; any other value
# (unspecified, reserved, YCgCo, ...) reads BT.601.
_MATRICES = {1: "bt709", 4: "fcc", 7: "smpte240m", 9: "bt2020", 10: "bt2020"}
_RANGE_MPEG, _RANGE_JPEG = 1, 2  # AVColorRange


class RgbConverter:
    """Decoded frames to RGB24 bytes as torchcodec 0.17 converts them, which is how qwen-vl-utils reads video.

    torchcodec (`CpuDeviceInterface`, `SwScale`, `create_sws_context`) converts at the source size with libswscale:
    sws_getContext without a scaler flag, so bicubic; the colour matrix of the frame's colorspace; the frame's colour
    range, else the pixel format's (full for yuvj*); chroma sited at the centre of its luma block, the legacy
    default. (Widths that are not a multiple of 32 go through a "copy" filter graph whose inserted scale filter makes
    the same choices.) PyAV's `to_ndarray` calls `sws_scale_frame`, which interpolates bilinearly and sites chroma
    where the frame says (left, for H.264 and HEVC): the same bytes for 8-bit 4:2:0 and 4:2:2 of even height, which
    libswscale converts without interpolating chroma, but up to ~60 grey levels apart at sharp colour edges of 10-bit
    video, 4:2:0 of odd height, and the other paths through the scaler. So a filter graph spells torchcodec's choices
    out. One graph per frame geometry and colour tags; frames of another size are scaled to `size` on the way."""

    def __init__(self) -> None:
        self._key, self._graph = None, None

    def __call__(self, frame, size: tuple[int, int]) -> np.ndarray:
        """`frame` (an av.VideoFrame) as uint8 (h, w, 3) of `size` (h, w)."""
        key = (frame.width, frame.height, frame.format.name, frame.colorspace, frame.color_range, size)
        if key != self._key:
            self._graph, self._key = _rgb_graph(frame, size), key
        self._graph.push(frame)
        return self._graph.pull().to_ndarray()


def _rgb_graph(frame, size: tuple[int, int]):
    import av

    fmt = frame.format
    options = [f"w={size[1]}", f"h={size[0]}", "flags=bicubic"]
    if len(fmt.components) >= 3 and not fmt.is_rgb:  # YUV: matrix, range and chroma siting as torchcodec's
        if frame.color_range in (_RANGE_MPEG, _RANGE_JPEG):
            full = frame.color_range == _RANGE_JPEG
        else:
            full = fmt.name.startswith("yuvj")
        options += [
            f"in_color_matrix={_MATRICES.get(frame.colorspace, 'bt601')}",
            f"in_range={'full' if full else 'limited'}",
        ]
        # sws_getContext's default siting (-513) is the centre: (128 << log2 subsampling) - 128 in 1/256 luma pixels
        plane = av.VideoFormat(fmt.name, 1024, 1024).components[1]  # a chroma plane of a 1024x1024 picture
        for axis, chroma in (("h", plane.width), ("v", plane.height)):
            if chroma < 1024:
                options.append(f"in_{axis}_chr_pos={(128 * 1024 // chroma) - 128}")
    graph = av.filter.Graph()
    source = graph.add_buffer(
        width=frame.width, height=frame.height, format=fmt, time_base=frame.time_base or Fraction(1, 1000)
    )
    nodes = [source, graph.add("scale", ":".join(options)), graph.add("format", "rgb24"), graph.add("buffersink")]
    for a, b in itertools.pairwise(nodes):
        a.link_to(b)
    graph.configure()
    return graph


def _open(source, policy: MediaPolicy, what: str):
    import av  # optional extra: pip install qwen2vl[video]

    data = read_bytes(source, policy, what)  # local files too: the checks and caps of every source apply
    try:
        # protocol_whitelist "none": the demuxer reads these bytes and may open nothing else. Playlist and list
        # formats (hls, concat) otherwise open the files and URLs they name, past local_root and the address checks.
        # metadata_errors: a tag that is not UTF-8 is not a reason to refuse the video.
        container = av.open(
            io.BytesIO(data), container_options={"protocol_whitelist": "none"}, metadata_errors="replace"
        )
    except Exception as e:  # FFmpeg reports hostile data under many exception types
        raise InputError(f"cannot open as a video ({e})", what) from None
    video = container.streams.video
    context = video[0].codec_context if video else None
    if context is not None and context.width * context.height > policy.max_image_pixels:  # the image bomb cap
        container.close()
        raise InputError(
            f"frames of {context.width}x{context.height} exceed the limit of {policy.max_image_pixels} pixels", what
        )
    return container


def probe(container, what: str) -> tuple[int, float, int, int]:
    """(frame count, frames per second, height, width) of the first video stream, without decoding pictures."""
    if not container.streams.video:
        raise InputError("no video stream", what)
    stream = container.streams.video[0]
    if stream.codec_context is None:
        raise InputError("no decoder for the video stream's codec", what)
    fps = float(stream.average_rate or stream.guessed_rate or 0)
    total = stream.frames
    if not total:  # containers without a frame count in the header: count packets
        try:
            total = sum(1 for p in container.demux(stream) if p.size)
            container.seek(0)
        except Exception as e:  # as in decode_frames: corrupt data raises many types
            raise InputError(f"unreadable video stream ({e})", what) from None
    if total < 2 or fps <= 0:
        raise InputError(f"{total} frames at {fps} fps: a video needs at least 2 decodable frames", what)
    height, width = stream.codec_context.height, stream.codec_context.width
    if not height or not width:
        raise InputError("the video stream declares no picture size", what)
    return int(total), fps, height, width


def decode_frames(
    container,
    indices: list[int],
    what: str,
    size: tuple[int, int],
    chunk_bytes: int = 32 * 2**20,
    progress: bool = False,
) -> torch.Tensor:
    """The frames at `indices` (repeats allowed), resized to `size` (h, w), as uint8 (T, 3, h, w).

    Decoding runs in order and converts to RGB only the wanted frames; those are resized a chunk at a time (about
    `chunk_bytes` of source pixels) straight into the output, so memory holds the clip at its final size plus one
    chunk, never the whole clip at source size. Chunking does not change a byte: `resize_frames` works per image
    (tests compare the two). One call per chunk rather than per frame: per call, the resize costs ~9x more.
    `progress`: a bar on stderr over the frames decoded, with the rate and the time left."""
    from tqdm import tqdm

    slots: dict[int, list[int]] = {}
    for slot, i in enumerate(indices):
        slots.setdefault(i, []).append(slot)
    out = torch.empty(len(indices), 3, *size, dtype=torch.uint8)
    out_np = out.numpy()
    chunk: torch.Tensor | None = None  # source frames waiting for their resize (allocated at the first frame)
    targets: list[list[int]] = []  # the output slots of each waiting frame
    filled, last, source_size = 0, max(indices), None
    to_rgb = RgbConverter()

    def flush() -> None:
        nonlocal filled
        if targets:
            resized = resize_frames(chunk[: len(targets)].permute(0, 3, 1, 2), *size).contiguous()
            for frame, slots_of_frame in zip(resized.numpy(), targets):
                out_np[slots_of_frame] = frame
            filled = targets[-1][-1] + 1
            targets.clear()

    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # frame- and slice-threaded decoding on every core
    bar = tqdm(
        total=last + 1, desc=f"decoding {what}", unit="frame", disable=not progress, leave=False, mininterval=0.5
    )
    try:
        for n, frame in enumerate(container.decode(stream)):
            bar.update()
            if n in slots:
                if source_size is None:
                    source_size = (frame.height, frame.width)
                    # frames as decoded (H, W, 3): seen as (N, 3, H, W) in channels-last strides, which the
                    # resize reads as they are (same bytes out; a planar copy per frame cost 5 ms)
                    chunk = torch.empty(
                        max(1, chunk_bytes // (3 * frame.height * frame.width)), *source_size, 3, dtype=torch.uint8
                    )
                # a stream that changes size midway is scaled to its first size on the way
                chunk.numpy()[len(targets)] = to_rgb(frame, source_size)  # numpy: a plain memcpy, no threads
                targets.append(slots[n])
                if len(targets) == len(chunk):
                    flush()
            if n >= last:
                break
    except Exception as e:  # av raises many types for corrupt data
        bar.close()
        flush()
        if filled < 2:
            raise InputError(f"undecodable video ({e})", what) from None
    bar.close()
    flush()
    if filled < 2:
        raise InputError(f"only {filled} decodable frames; a video needs at least 2", what)
    out[filled:] = out[filled - 1]  # the header promised more frames than the stream holds: repeat the last
    return out


def load_video(
    ele: dict, policy: MediaPolicy, what: str = "video", progress: bool = False
) -> tuple[torch.Tensor, VideoPlan]:
    """Resized uint8 frames (T, 3, h, w), T even, and the plan that produced them."""
    source = ele["video"]
    if isinstance(source, (list, tuple)):
        pictures = (to_rgb(load_image(f, policy, f"{what} frame {i}")) for i, f in enumerate(source))
        frames = [torch.from_numpy(np.asarray(picture).copy()).permute(2, 0, 1) for picture in pictures]
        return _from_frames(ele, frames, fps=float(ele.get("sample_fps", FPS)), what=what)
    if isinstance(source, np.ndarray):
        if source.ndim != 4 or source.shape[3] != 3 or source.dtype != np.uint8:
            raise InputError(f"array video must be uint8 (T, H, W, 3), got {source.dtype} {source.shape}", what)
        return _from_frames(
            ele,
            list(torch.from_numpy(source.copy()).permute(0, 3, 1, 2)),
            fps=float(ele.get("sample_fps", FPS)),
            what=what,
        )
    container = _open(source if isinstance(source, Fetched) else str(source), policy, what)
    with container:
        total, fps, height, width = probe(container, what)
        indices = sample_indices(ele, total, fps, what)
        h, w = frame_size(ele, len(indices), height, width)
        frames = decode_frames(container, indices, what, (h, w), progress=progress)
    return frames, VideoPlan(total, fps, height, width, indices, (h, w))


def plan_video(ele: dict, policy: MediaPolicy, what: str = "video") -> VideoPlan:
    """Sizes and frame choice without decoding any picture."""
    source = ele["video"]
    if isinstance(source, (list, tuple, np.ndarray)):
        if isinstance(source, np.ndarray):
            sizes = [(source.shape[2], source.shape[1])] * len(source)
        else:  # every frame's header, so that a large frame anywhere in the list is seen before decoding
            sizes = [_frame_header(f, policy, f"{what} frame {i}") for i, f in enumerate(source)]
        if not sizes:
            raise InputError("a video given as frames needs at least one frame", what)
        width, height = sizes[0]
        n = len(source) + len(source) % 2
        return VideoPlan(
            len(source),
            float(ele.get("sample_fps", FPS)),
            height,
            width,
            list(range(len(source))) + [len(source) - 1] * (len(source) % 2),
            frame_size(ele, n, height, width),
            tuple(w * h for w, h in sizes),
        )
    with _open(source if isinstance(source, Fetched) else str(source), policy, what) as container:
        total, fps, height, width = probe(container, what)
    indices = sample_indices(ele, total, fps, what)
    return VideoPlan(total, fps, height, width, indices, frame_size(ele, len(indices), height, width))


def replan_video(ele: dict, facts: VideoPlan, what: str = "video") -> VideoPlan:
    """`plan_video` for other sampling fields (fps, nframes, total_pixels, ...) of a video already probed: the same
    frame choice and sizes, from the facts in `facts` (frame count, rate, size), with no I/O."""
    if facts.frame_pixels:  # a frame list: every frame is used, only the size follows the fields
        n = len(facts.indices)
        return replace(facts, resized=frame_size(ele, n, facts.height, facts.width))
    indices = sample_indices(ele, facts.total_frames, facts.fps, what)
    return replace(facts, indices=indices, resized=frame_size(ele, len(indices), facts.height, facts.width))


def _frame_header(frame, policy: MediaPolicy, what: str) -> tuple[int, int]:
    if isinstance(frame, (str, Path, Fetched)):
        return open_image(read_bytes(frame, policy, what), policy, what).size
    return load_image(frame, policy, what).size


def _from_frames(ele: dict, frames: list[torch.Tensor], fps: float, what: str) -> tuple[torch.Tensor, VideoPlan]:
    if not frames:
        raise InputError("a video given as frames needs at least one frame", what)
    if len(frames) % FRAME_FACTOR:
        frames = frames + [frames[-1]]  # pad to an even count by repeating the last frame
    height, width = frames[0].shape[-2:]
    h, w = frame_size(ele, len(frames), height, width)
    resized = torch.stack([resize_frames(f[None], h, w)[0] for f in frames])
    plan = VideoPlan(len(frames), fps, height, width, list(range(len(frames))), (h, w))
    return resized, plan
