"""Shared helpers for processor tests: a tokenizer-only checkpoint directory and the reference pipeline."""

from __future__ import annotations

import numpy as np
from PIL import Image


def oracle(directory, conversations, add_generation_prompt=True):
    """qwen-vl-utils' process_vision_info + transformers' processor, as the official README does."""
    from qwen_vl_utils import process_vision_info
    from transformers import AutoProcessor

    hp = AutoProcessor.from_pretrained(directory)
    hp.tokenizer.padding_side = "left"
    if conversations and isinstance(conversations[0], dict):
        conversations = [conversations]
    texts = [hp.apply_chat_template(c, tokenize=False, add_generation_prompt=add_generation_prompt)
             for c in conversations]
    images, videos = process_vision_info(conversations)
    return hp(text=texts, images=images, videos=videos, return_tensors="pt", padding=True)


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
