"""What one request may make the server do, checked from cheap facts before any expensive work.

Three layers, cheapest first:
1. `Limits.apply` on the parsed request (no I/O): item counts, frame-list lengths, explicit frame counts and
   sizes, and each item's pixel fields clamped to the server's bounds: a client may lower `max_pixels`, never
   raise the work beyond `--max-pixels` / `--max-video-pixels` (an item without fields is sized as if it carried
   `max_pixels` = the server's bound, so within the bound the reference's numbers are unchanged).
2. The processor's plan (image headers, video container headers, no decoding) against a `Budget`: prompt tokens
   within the context left after `max_tokens`, and pixels decoded before resizing within `--max-source-pixels`.
3. Only then decoding, resizing and the engine.
"""

from __future__ import annotations

from dataclasses import dataclass


class LimitExceeded(ValueError):
    """A request asks for more than the server's limits allow (the server answers 400 with this message)."""

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Limits:
    max_media_items: int = 16  # images + videos in one request
    max_pixels: int = 1280 * 28 * 28  # one image after resizing (1280 tokens; the official README's CPU advice)
    max_video_pixels: int = 768 * 28 * 28  # one video frame after resizing (qwen-vl-utils' own ceiling)
    max_video_frames: int = 768  # frames of one video (qwen-vl-utils' FPS_MAX_FRAMES)
    max_source_pixels: int = 400_000_000  # decoded before resizing, all items of a request (~1.2 GB as RGB)

    def apply(self, messages: list[dict]) -> list[dict]:
        """Messages with every media item's fields within the limits; counts over them raise `LimitExceeded`."""
        items = [p for m in messages if isinstance(m["content"], list) for p in m["content"] if p["type"] != "text"]
        if len(items) > self.max_media_items:
            raise LimitExceeded(
                f"the request has {len(items)} images and videos; this server takes at most {self.max_media_items}",
                "too_many_media_items",
            )
        out = []
        for m in messages:
            if isinstance(m["content"], list):
                m = {**m, "content": [self._item(p) if p["type"] != "text" else p for p in m["content"]]}
            out.append(m)
        return out

    def _item(self, item: dict) -> dict:
        kind = item["type"]
        bound = self.max_pixels if kind == "image" else self.max_video_pixels
        item = dict(item)
        if "resized_height" in item and "resized_width" in item:
            if item["resized_height"] * item["resized_width"] > bound:
                raise LimitExceeded(
                    f"{kind} resized_height x resized_width = "
                    f"{item['resized_height'] * item['resized_width']} pixels, over this server's "
                    f"limit of {bound}"
                )
        item["max_pixels"] = min(item.get("max_pixels", bound), bound)
        if "min_pixels" in item:
            item["min_pixels"] = min(item["min_pixels"], bound)
        if kind == "video":
            frames = item["video"]
            if isinstance(frames, list) and len(frames) > self.max_video_frames:
                raise LimitExceeded(
                    f"a video of {len(frames)} frames; this server takes at most {self.max_video_frames}"
                )
            if item.get("nframes", 0) > self.max_video_frames:
                raise LimitExceeded(f"nframes {item['nframes']} is over this server's limit of {self.max_video_frames}")
            # an absent max_frames means min(768, frames in the video) to qwen-vl-utils; the smaller bound gives
            # the same count within the limit
            item["max_frames"] = min(item.get("max_frames", self.max_video_frames), self.max_video_frames)
            if "min_frames" in item:
                item["min_frames"] = min(item["min_frames"], self.max_video_frames)
        return item
