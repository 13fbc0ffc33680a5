"""Images: resize rules, RGB conversion, resizing, normalisation and patch layout.

`smart_resize` matches qwen-vl-utils 0.0.14 (`vision_process.smart_resize`, `max(factor, round(...))`) and, with
`variant="transformers"`, transformers 4.57/5.x (`image_processing_qwen2_vl.smart_resize`). `to_rgb` matches
qwen-vl-utils `to_rgb` (RGBA composited on white; every other mode through PIL's convert). `resize_image` is PIL's
bicubic, as qwen-vl-utils' `image.resize`; `resize_tensor` is the transformers processors' torchvision resize.
`array_to_image` reads arrays and tensors as transformers' `to_pil_image`. `normalize_rows_` is the transformers
fused rescale+normalise, `patchify` the processors' (N, C*T*P*P) merge-window layout.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .errors import InputError

MAX_RATIO = 200
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)


def smart_resize(
    height: int,
    width: int,
    factor: int = 28,
    min_pixels: int = 4 * 28 * 28,
    max_pixels: int = 16384 * 28 * 28,
    variant: str = "qwen-vl-utils",
) -> tuple[int, int]:
    """(h, w), multiples of `factor`, close to the input aspect ratio, with h*w within [min_pixels, max_pixels].

    Only the qwen-vl-utils variant refuses max_pixels < min_pixels (it asserts); transformers' resizes anyway."""
    if max_pixels < min_pixels and variant == "qwen-vl-utils":
        raise InputError(f"max_pixels ({max_pixels}) must be at least min_pixels ({min_pixels})")
    if min(height, width) <= 0:
        raise InputError(f"image size {width}x{height} is empty")
    ratio = max(height, width) / min(height, width)
    if ratio > MAX_RATIO:
        raise InputError(f"aspect ratio {ratio:.1f} of a {width}x{height} image exceeds the limit of {MAX_RATIO}")
    h = round(height / factor) * factor  # Python round: half to even, as both references
    w = round(width / factor) * factor
    if variant == "qwen-vl-utils":
        h, w = max(factor, h), max(factor, w)
    if h * w > max_pixels:
        beta = math.sqrt(height * width / max_pixels)
        h = math.floor(height / beta / factor) * factor
        w = math.floor(width / beta / factor) * factor
        if variant == "transformers":
            h, w = max(factor, h), max(factor, w)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGBA":
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image, mask=image.split()[3])
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grey: PIL's convert clips; scale to 8 bits
        arr = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or arr.max() > 255 else 255.0
        return Image.fromarray(np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)).convert("RGB")
    return image.convert("RGB")


def resize_image(image: Image.Image, height: int, width: int) -> Image.Image:
    """qwen-vl-utils' `image.resize((w, h))`: PIL's bicubic (its default for RGB), a copy when the size matches."""
    return image.resize((width, height), Image.BICUBIC)


def resize_tensor(pixels: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(..., C, H, W) -> (..., C, height, width) as the transformers processors resize on CPU
    (`torchvision.transforms.v2.functional.resize`, BICUBIC, antialias): uint8 by torch's native uint8 kernel,
    float32 in float without clamping or rounding; the input itself when the size already matches."""
    if tuple(pixels.shape[-2:]) == (height, width):
        return pixels
    flat = pixels.reshape(-1, *pixels.shape[-3:])
    out = F.interpolate(flat, size=(height, width), mode="bicubic", align_corners=False, antialias=True)
    return out.reshape(*pixels.shape[:-2], height, width)


def array_to_image(array, what: str = "image") -> Image.Image:
    """A numpy array or torch tensor as an image, read as transformers' `to_pil_image` reads it.

    (H, W), or (C, H, W) / (H, W, C) with C = 1 or 3, the channel axis first when it could be either
    (`infer_channel_dimension_format`); 4 channels last are RGBA. Values: uint8 as they are; other dtypes holding
    whole numbers within 0..255 as they are; other floats within [0, 1] scaled by 255 and truncated to uint8.
    """
    if isinstance(array, torch.Tensor):
        array = array.detach().cpu()
        array = (array.float() if array.dtype == torch.bfloat16 else array).numpy()
    arr = np.asarray(array)
    if arr.ndim == 3 and arr.shape[0] in (1, 3):
        arr = arr.transpose(1, 2, 0)
    elif not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] in (1, 3, 4))):
        raise InputError(
            f"array of shape {tuple(arr.shape)} is not (H, W), (C, H, W) or (H, W, C) with C = 1 or 3 (or 4, last)",
            what,
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.dtype != np.uint8:
        if not (np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)):
            raise InputError(f"array dtype {arr.dtype}; expected uint8, or floats in [0, 1]", what)
        low, high = arr.min(), arr.max()
        if np.allclose(arr, arr.astype(np.int64)) and 0 <= low and high <= 255:
            arr = arr.astype(np.uint8)  # whole numbers: already 0..255
        elif 0 <= low and high <= 1:
            arr = (arr.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
        else:
            raise InputError(f"array values span [{low}, {high}]; expected [0, 1] floats or 0..255 whole numbers", what)
    return Image.fromarray(np.ascontiguousarray(arr))


def normalize_rows_(rows: torch.Tensor, temporal: int = 2, patch: int = 14) -> torch.Tensor:
    """transformers' fused rescale+normalise, (x - 255 mean) / (255 std) in float32, in place on float32 rows
    (N, 3*T*P*P) of 0..255 values laid out by `patchify` (channel = column // (T*P*P)): the same two roundings per
    value as normalising the frames first, with no second float32 copy of the pixels."""
    if rows.dtype != torch.float32:
        raise TypeError(f"normalize_rows_ works in place on float32 rows, got {rows.dtype}")
    per = temporal * patch * patch
    mean = (torch.tensor(IMAGE_MEAN, dtype=torch.float32) * 255).repeat_interleave(per)
    std = (torch.tensor(IMAGE_STD, dtype=torch.float32) * 255).repeat_interleave(per)
    return rows.sub_(mean).div_(std)


def patchify(
    frames: torch.Tensor, patch: int = 14, merge: int = 2, temporal: int = 2, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, list[int]]:
    """Frames (T, 3, H, W), T a multiple of `temporal` -> rows (T/2 * H/14 * W/14, 3*2*14*14) of `dtype`, grid.

    Rows come in 2x2 merge windows, windows in raster order, temporal patches outermost; a row is (c, t, y, x).
    The layout change and the conversion to `dtype` are one copy (uint8 frames stay uint8 until here).
    """
    t, c, h, w = frames.shape
    gt, gh, gw = t // temporal, h // patch, w // patch
    x = frames.reshape(gt, temporal, c, gh // merge, merge, patch, gw // merge, merge, patch)
    # (gt, tt, c, bh, mh, py, bw, mw, px) -> (gt, bh, bw, mh, mw, c, tt, py, px)
    x = x.permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
    rows = torch.empty(x.shape, dtype=dtype)
    rows.copy_(x)
    return rows.view(gt * gh * gw, c * temporal * patch * patch), [gt, gh, gw]


def image_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image -> uint8 (3, H, W)."""
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1)


def image_to_patches(pixels: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """(3, h, w) of 0..255 values, h and w multiples of 28 -> (rows, [1, h/14, w/14]); the frame is repeated in time."""
    rows, grid = patchify(pixels[None].expand(2, -1, -1, -1))
    return normalize_rows_(rows), grid
