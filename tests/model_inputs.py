"""Processor-shaped model inputs built by hand (placeholder runs, random pixel rows), for model-level tests."""

from __future__ import annotations

import torch

VS, VE, IMG, VID, PAD = 151652, 151653, 151655, 151656, 151643


def build(rows, seed=0):
    """rows: lists of parts, each an int (that many random text tokens) or ("image"|"video", (t, h, w)).

    Returns the processor-shaped batch, left-padded with 151643.
    """
    g = torch.Generator().manual_seed(seed)
    seqs, images, videos = [], [], []
    for parts in rows:
        ids: list[int] = []
        for part in parts:
            if isinstance(part, int):
                ids += torch.randint(0, 151643, (part,), generator=g).tolist()
            else:
                kind, (t, h, w) = part
                ids += [VS] + [IMG if kind == "image" else VID] * (t * h * w // 4) + [VE]
                (images if kind == "image" else videos).append((t, h, w))
        seqs.append(ids)
    length = max(map(len, seqs))
    batch = {
        "input_ids": torch.tensor([[PAD] * (length - len(s)) + s for s in seqs]),
        "attention_mask": torch.tensor([[0] * (length - len(s)) + [1] * len(s) for s in seqs]),
    }
    for key, grids in (("pixel_values", images), ("pixel_values_videos", videos)):
        if grids:
            n = sum(t * h * w for t, h, w in grids)
            batch[key] = torch.randn(n, 1176, generator=g)
            batch["image_grid_thw" if key == "pixel_values" else "video_grid_thw"] = torch.tensor(grids)
    return batch


CASES = {
    "text only": [[37]],
    "one image": [[5, ("image", (1, 8, 12)), 9]],
    "two images, different aspect ratios": [[3, ("image", (1, 4, 16)), 4, ("image", (1, 10, 6)), 7]],
    "video with T > spatial, then text": [[6, ("video", (8, 4, 4)), 11]],
    "image then video then image": [[2, ("image", (1, 6, 4)), 3, ("video", (3, 4, 6)), 1, ("image", (1, 4, 4)), 5]],
    "left-padded batch: text / image / video": [[40], [4, ("image", (1, 6, 8)), 6], [3, ("video", (6, 4, 4)), 8]],
}
