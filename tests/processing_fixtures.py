"""Shared helpers for processor tests: the reference pipeline and generated images and videos."""

from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image


def oracle(directory, conversations, add_generation_prompt=True, **overrides):
    """qwen-vl-utils' process_vision_info + transformers' processor, as the official README does:
    `AutoProcessor.from_pretrained(directory, **overrides)`. Tensor and array images, which qwen-vl-utils does not
    take, are handed to it as transformers' `to_pil_image` converts them."""
    from qwen_vl_utils import process_vision_info
    from transformers import AutoProcessor

    _fresh_processor_defaults()
    hp = AutoProcessor.from_pretrained(directory, **copy.deepcopy(overrides))  # it writes into a `size` keyword
    hp.tokenizer.padding_side = "left"
    if conversations and isinstance(conversations[0], dict):
        conversations = [conversations]
    conversations = [
        [{**m, "content": [_as_pil(p) for p in m["content"]]} if isinstance(m["content"], list) else m for m in c]
        for c in conversations
    ]
    texts = [
        hp.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt) for c in conversations
    ]
    images, videos = process_vision_info(conversations)
    return hp(text=texts, images=images, videos=videos, return_tensors="pt", padding=True)


def _as_pil(part):
    from transformers.image_transforms import to_pil_image

    if isinstance(part.get("image"), (np.ndarray, torch.Tensor)):
        return {**part, "image": to_pil_image(part["image"])}
    return part


def _fresh_processor_defaults():
    """The class-level `size` dicts as a fresh process has them: transformers 4.57's `__init__` of both processors
    writes a file's min_pixels/max_pixels into the class attribute itself, so one checkpoint loaded earlier would
    change the defaults of a later one whose file gives no bounds."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl_fast import Qwen2VLImageProcessorFast
    from transformers.models.qwen2_vl.video_processing_qwen2_vl import Qwen2VLVideoProcessor

    Qwen2VLImageProcessorFast.size = {"shortest_edge": 56 * 56, "longest_edge": 28 * 28 * 1280}
    Qwen2VLVideoProcessor.size = {"shortest_edge": 128 * 28 * 28, "longest_edge": 28 * 28 * 768}


def make_video(path, frames=30, fps=10, size=(128, 96), codec="mpeg4", vfr=False):
    """A clip whose frames differ (a moving gradient: smooth, so that decoders agree to a grey level)."""
    from qwen2vl.testing.video import encode_video

    w, h = size
    yy, xx = np.mgrid[0:h, 0:w]
    pictures = (
        np.stack([(xx * 2 + i * 9) % 256, (yy * 3 + i * 5) % 256, ((xx + yy) + i * 13) % 256], -1).astype(np.uint8)
        for i in range(frames)
    )
    return encode_video(path, pictures, size, fps, codec, gop=None, vfr=vfr)


def noise_image(width, height, mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    bands = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2, "CMYK": 4}
    if mode == "P":
        return noise_image(width, height, "RGB", seed).convert("P", palette=Image.ADAPTIVE, colors=60)
    arr = rng.integers(0, 256, (height, width, bands[mode]), dtype=np.uint8)
    # smooth gradients + noise, so resampling filters matter
    yy, xx = np.mgrid[0:height, 0:width]
    arr = ((arr.astype(np.int32) // 4 + ((xx * 3 + yy * 5) % 192)[..., None]) % 256).astype(np.uint8)
    if mode == "RGBA":
        arr[..., 3] = ((xx * 255) // max(1, width - 1)).astype(np.uint8)
    return Image.fromarray(arr[..., 0] if bands[mode] == 1 else arr, mode)
