"""How large each image and video frame becomes: the reference's two resizes, in one place.

Step 1 is qwen-vl-utils 0.0.14 (`fetch_image`, `fetch_video`): its own default bounds, or the item's `min_pixels`,
`max_pixels`, `resized_height`/`resized_width` (and, for videos, the per-frame budget from `total_pixels`). The
checkpoint plays no part in it. Step 2 is transformers 4.57's processor (`Qwen2VLImageProcessorFast._preprocess`,
`Qwen2VLVideoProcessor._preprocess`): `smart_resize` of the step-1 size with the processor's own bounds, a no-op
when the step-1 size lies within them. `ProcessorBounds.from_configs` works out those bounds from the checkpoint's
files and `from_pretrained` keywords exactly as transformers does, including that `min_pixels`/`max_pixels`
keywords reach the image processor only. Processing, `Processor.plan` and the server's accounting all size here.
"""

from __future__ import annotations

from dataclasses import dataclass

from .errors import InputError
from .image import smart_resize

PATCH_SIZE, MERGE_SIZE = 14, 2  # preprocessor_config.json patch_size, merge_size (every Qwen2-VL checkpoint)
FACTOR = PATCH_SIZE * MERGE_SIZE  # 28: sides are multiples of one merged token
FRAME_FACTOR = 2  # temporal patch
# qwen-vl-utils fetch_image defaults: IMAGE_MIN_TOKEN_NUM, IMAGE_MAX_TOKEN_NUM tokens of 28x28
IMAGE_MIN_PIXELS, IMAGE_MAX_PIXELS = 4 * 28 * 28, 16384 * 28 * 28
# qwen-vl-utils fetch_video defaults: VIDEO_MIN_TOKEN_NUM, VIDEO_MAX_TOKEN_NUM per frame; MODEL_SEQ_LEN * 28 * 28 * 0.9
VIDEO_MIN_PIXELS, VIDEO_MAX_PIXELS = 128 * 28 * 28, 768 * 28 * 28
VIDEO_TOTAL_PIXELS = int(128000 * 28 * 28 * 0.9)


@dataclass(frozen=True)
class Bounds:
    min_pixels: int
    max_pixels: int


# class-level `size` of Qwen2VLImageProcessorFast and Qwen2VLVideoProcessor, used when the files give no bounds
IMAGE_PROCESSOR_DEFAULT = Bounds(56 * 56, 28 * 28 * 1280)
VIDEO_PROCESSOR_DEFAULT = Bounds(128 * 28 * 28, 28 * 28 * 768)


@dataclass(frozen=True)
class ProcessorBounds:
    """The bounds of step 2: the transformers image processor's and video processor's."""

    image: Bounds = Bounds(3136, 12845056)  # the official checkpoints' preprocessor_config.json
    video: Bounds = Bounds(3136, 12845056)

    @classmethod
    def from_configs(
        cls,
        image_config: dict,
        video_config: dict | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        size: dict | None = None,
        overrides_reach_videos: bool = False,
    ) -> ProcessorBounds:
        """As `AutoProcessor.from_pretrained(path, min_pixels=..., max_pixels=..., size=...)` leaves them.

        `image_config` is preprocessor_config.json; `video_config` is video_preprocessor_config.json when the
        checkpoint has one (transformers falls back to preprocessor_config.json otherwise). The keywords reach both
        processors, but the video processor resizes by its `size` alone, so `min_pixels`/`max_pixels` keywords
        leave videos at the file's bounds; `overrides_reach_videos=True` applies them to videos too.
        """
        video_config = image_config if video_config is None else video_config
        lo, hi = _loaded_size(image_config, IMAGE_PROCESSOR_DEFAULT, size)
        # Qwen2VLImageProcessorFast._further_process_kwargs: min_pixels and max_pixels attributes, when both are
        # set (from the file or a keyword), replace `size`
        attr_lo = min_pixels if min_pixels is not None else image_config.get("min_pixels")
        attr_hi = max_pixels if max_pixels is not None else image_config.get("max_pixels")
        image = Bounds(attr_lo, attr_hi) if attr_lo is not None and attr_hi is not None else Bounds(lo, hi)
        vlo, vhi = _loaded_size(video_config, VIDEO_PROCESSOR_DEFAULT, size)
        if overrides_reach_videos:
            vlo = min_pixels if min_pixels is not None else vlo
            vhi = max_pixels if max_pixels is not None else vhi
        return cls(image, Bounds(vlo, vhi))


def _loaded_size(config: dict, default: Bounds, size_keyword: dict | None) -> tuple[int, int]:
    """(shortest_edge, longest_edge) of a processor's `size` after transformers loads it from `config`.

    `__init__` takes the file's `size` (or the class default) and writes the file's min_pixels/max_pixels over its
    edges. A `size` keyword replaces the file's `size` before `__init__` when the file has one (`from_dict`), and
    is set on the finished object, over everything, when it has none.
    """
    if size_keyword is not None and "size" not in config:
        return _edges(size_keyword, "the size keyword")
    size = size_keyword if size_keyword is not None else config.get("size")
    lo, hi = (
        (default.min_pixels, default.max_pixels)
        if size is None
        else (size.get("shortest_edge"), size.get("longest_edge"))
    )
    lo = config["min_pixels"] if config.get("min_pixels") is not None else lo
    hi = config["max_pixels"] if config.get("max_pixels") is not None else hi
    if lo is None or hi is None:
        raise InputError(
            f"the processor's size {size} needs shortest_edge and longest_edge (or min_pixels and max_pixels beside it)"
        )
    return lo, hi


def _edges(size: dict, what: str) -> tuple[int, int]:
    if size.get("shortest_edge") is None or size.get("longest_edge") is None:
        raise InputError(f"{what} {size} needs shortest_edge and longest_edge")
    return size["shortest_edge"], size["longest_edge"]


def processor_size(height: int, width: int, bounds: Bounds) -> tuple[int, int]:
    """Step 2: transformers' smart_resize of a step-1 (h, w) with the processor's bounds."""
    return smart_resize(height, width, FACTOR, bounds.min_pixels, bounds.max_pixels, variant="transformers")


def image_size(item: dict, height: int, width: int) -> tuple[int, int]:
    """Step 1 for an image (qwen-vl-utils fetch_image): exact `resized_*` or the item's bounds, else its defaults."""
    if "resized_height" in item and "resized_width" in item:
        return smart_resize(int(item["resized_height"]), int(item["resized_width"]), FACTOR)
    return smart_resize(
        height,
        width,
        FACTOR,
        int(item.get("min_pixels", IMAGE_MIN_PIXELS)),
        int(item.get("max_pixels", IMAGE_MAX_PIXELS)),
    )


def image_sizes(item: dict, height: int, width: int, bounds: Bounds) -> tuple[tuple[int, int], tuple[int, int]]:
    """An image's (h, w) after step 1 and after step 2."""
    first = image_size(item, height, width)
    return first, processor_size(*first, bounds)


def frame_size(ele: dict, nframes: int, height: int, width: int) -> tuple[int, int]:
    """Step 1 for a video's frames (qwen-vl-utils fetch_video): the per-frame budget from `total_pixels`, which a
    per-item `max_pixels` can only lower."""
    if "resized_height" in ele and "resized_width" in ele:
        return smart_resize(ele["resized_height"], ele["resized_width"], FACTOR)
    min_pixels = ele.get("min_pixels", VIDEO_MIN_PIXELS)
    total = ele.get("total_pixels", VIDEO_TOTAL_PIXELS)
    max_pixels = max(min(VIDEO_MAX_PIXELS, total / nframes * FRAME_FACTOR), int(min_pixels * 1.05))
    max_pixels = min(ele.get("max_pixels", max_pixels), max_pixels)
    return smart_resize(height, width, FACTOR, min_pixels, max_pixels)


def tokens(grid_t: int, height: int, width: int) -> int:
    """LLM tokens of a (grid_t, height, width) item: 2x2 patches of 14 merge into one."""
    return grid_t * (height // FACTOR) * (width // FACTOR)
