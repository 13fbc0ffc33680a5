"""A prompt's images and videos as separate items, a cache of their vision features keyed by content, and the
picture-aware token key that decides how much of a prompt's keys/values can be reused. Shared by the pipeline
(chat turns that show the same picture again) and the engine (requests that share pictures or a prefix)."""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import torch

from ..config import Qwen2VLConfig
from .decode import Prompt, require_grid


def vision_items(prompt: Prompt) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(kind, pixel rows, grid (1, 3)) for each image, then each video, whose features the prompt does not carry."""
    items = []
    for kind, pixels, grids, features in (
        ("image", prompt.pixel_values, prompt.image_grid_thw, prompt.image_features),
        ("video", prompt.pixel_values_videos, prompt.video_grid_thw, prompt.video_features),
    ):
        if features is not None or pixels is None:
            continue
        start = 0
        for grid in require_grid(grids, kind):
            n = int(grid.prod())
            items.append((kind, pixels[start : start + n], grid[None]))
            start += n
    return items


class VisionCache:
    """LRU of vision features keyed by a hash of the pixels and grid, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.used = max_bytes, 0
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()
        self.hits = self.misses = 0

    @staticmethod
    def key(pixels: torch.Tensor, grid: torch.Tensor) -> str:
        h = hashlib.blake2b(digest_size=16)
        h.update(pixels.contiguous().view(torch.uint8).numpy().tobytes())
        h.update(str(grid.tolist()).encode())
        return h.hexdigest()

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.items:
            self.items.move_to_end(key)
            self.hits += 1
            return self.items[key]
        self.misses += 1
        return None

    def put(self, key: str, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes:
            return
        self.items[key] = value
        self.used += size
        while self.used > self.max_bytes:
            _, old = self.items.popitem(last=False)
            self.used -= old.numel() * old.element_size()

    def clear(self) -> None:
        self.items.clear()
        self.used = 0


def prefix_key(prompt: Prompt, items: list[tuple[str, torch.Tensor, str]], config: Qwen2VLConfig) -> list:
    """The prompt's token ids (row 0), each image/video placeholder replaced by (content hash, index): two prompts
    share a prefix only if their pictures are the same too. `items`: (kind, grid (1, 3), VisionCache.key) in order
    for the pictures given as pixels; features given instead count as one item per kind."""
    merge = config.vision.spatial_merge_size**2
    pads: dict[int, list[tuple[str, int]]] = {config.image_token_id: [], config.video_token_id: []}
    for kind, grid, key in items:  # per placeholder token: [(key, tokens), ...] in order
        token = config.image_token_id if kind == "image" else config.video_token_id
        pads[token].append((key, int(grid.prod()) // merge))
    for token, feats in (
        (config.image_token_id, prompt.image_features),
        (config.video_token_id, prompt.video_features),
    ):
        if feats is not None:  # precomputed features: one key covering all of them
            pads[token] = [(VisionCache.key(feats, torch.tensor(feats.shape)), feats.shape[0])]
    out: list = []
    item, used = dict.fromkeys(pads, 0), dict.fromkeys(pads, 0)
    for t in prompt.input_ids[0].tolist():
        if t in pads and item[t] < len(pads[t]):
            key, count = pads[t][item[t]]
            out.append((key, used[t]))
            used[t] += 1
            if used[t] == count:
                item[t], used[t] = item[t] + 1, 0
        else:
            out.append(t)
    return out


def common_prefix(a: Sequence, b: Sequence) -> int:
    """How many leading entries a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n
