"""3-stream M-RoPE position ids for token sequences with images and videos, for the prompt and each decode step.

Reference semantics: transformers 4.45-4.57 `Qwen2VLModel.get_rope_index`, the rule the model was trained with.
Text runs count up on all three streams; a vision item with grid (t, h, w) patches becomes T=t, Hm=h/m, Wm=w/m
tokens positioned at S + (t_idx, row, col); the next text starts at max(so far) + 1, so after a video with more
temporal patches than spatial ones it starts at S + T (transformers 5.x `get_rope_index` advances by max(Hm, Wm)
only and differs there). Pure functions:
the model keeps no rope deltas between calls.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch


class PlaceholderMismatch(ValueError):
    """The placeholder tokens in input_ids do not agree with the image/video grids given."""


def _vision_block(start: int, t: int, hm: int, wm: int) -> torch.Tensor:
    """Positions (3, t*hm*wm) of one vision item starting at `start`, in (t, row, col) order."""
    tt = torch.arange(t).view(t, 1, 1).expand(t, hm, wm)
    hh = torch.arange(hm).view(1, hm, 1).expand(t, hm, wm)
    ww = torch.arange(wm).view(1, 1, wm).expand(t, hm, wm)
    return torch.stack([tt.flatten(), hh.flatten(), ww.flatten()]) + start


def mrope_positions(
    token_ids: list[int] | torch.Tensor,
    grids: dict[int, Iterator[Any]],
    *,
    image_token_id: int,
    video_token_id: int,
    merge: int = 2,
) -> tuple[torch.Tensor, int]:
    """Positions (3, n) for one unpadded row, and delta = max position + 1 - n.

    `grids` maps image_token_id / video_token_id to an iterator of (t, h, w) patch grids; items are consumed
    in order, so one pair of iterators can be shared by all rows of a batch (as the reference does).
    """
    ids = token_ids.tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    n = len(ids)
    pieces: list[torch.Tensor] = []
    next_pos = 0  # (max position so far) + 1
    i = 0
    while i < n:
        j = i
        while j < n and ids[j] != image_token_id and ids[j] != video_token_id:
            j += 1
        if j > i:  # a text run
            pieces.append(torch.arange(next_pos, next_pos + j - i).expand(3, -1))
            next_pos += j - i
        if j == n:
            break
        kind = ids[j]
        name = "image" if kind == image_token_id else "video"
        try:
            t, h, w = (int(v) for v in next(grids[kind]))
        except StopIteration:
            raise PlaceholderMismatch(
                f"input_ids have more {name} placeholder runs than {name}_grid_thw rows"
            ) from None
        count = t * (h // merge) * (w // merge)
        run = ids[j : j + count]
        if len(run) < count or any(tok != kind for tok in run):
            got = next((k for k, tok in enumerate(run) if tok != kind), len(run))
            raise PlaceholderMismatch(
                f"{name} with grid (t={t}, h={h}, w={w}) needs {count} consecutive {name} tokens at index {j}, "
                f"found {got}"
            )
        pieces.append(_vision_block(next_pos, t, h // merge, w // merge))
        next_pos += max(t, h // merge, w // merge)
        i = j + count
    positions = torch.cat(pieces, dim=1) if pieces else torch.zeros(3, 0, dtype=torch.long)
    return positions, next_pos - n


def batch_mrope_positions(
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    image_grid_thw: torch.Tensor | None,
    video_grid_thw: torch.Tensor | None,
    *,
    image_token_id: int,
    video_token_id: int,
    merge: int = 2,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions (3, B, L) for a (left- or right-) padded batch, and deltas (B,) against the padded length L.

    Decoding the k-th new token (k = 0, 1, ...) of row b uses position L + k + deltas[b] on all three streams,
    i.e. (max prompt position of the row) + 1 + k. Padding slots get position 1, as in the reference.
    """
    batch, length = input_ids.shape
    mask = torch.ones_like(input_ids, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    grids = {
        image_token_id: iter([] if image_grid_thw is None else image_grid_thw.tolist()),
        video_token_id: iter([] if video_grid_thw is None else video_grid_thw.tolist()),
    }
    positions = torch.ones(3, batch, length, dtype=torch.long)
    deltas = torch.zeros(batch, dtype=torch.long)
    for b in range(batch):
        row_mask = mask[b].cpu()
        pos, delta = mrope_positions(
            input_ids[b].cpu()[row_mask],
            grids,
            image_token_id=image_token_id,
            video_token_id=video_token_id,
            merge=merge,
        )
        positions[:, b, row_mask] = pos
        deltas[b] = delta + int(row_mask.sum()) - length
    for kind, it in grids.items():
        if next(it, None) is not None:
            name = "image" if kind == image_token_id else "video"
            raise PlaceholderMismatch(f"{name}_grid_thw has more rows than {name} placeholder runs in input_ids")
    return positions.to(input_ids.device), deltas.to(input_ids.device)


def decode_positions(cache_len: int, num_new: int, deltas: torch.Tensor) -> torch.Tensor:
    """Positions (3, B, num_new) for tokens written at cache slots cache_len .. cache_len + num_new - 1."""
    steps = torch.arange(cache_len, cache_len + num_new, device=deltas.device)
    return (steps[None, :] + deltas[:, None]).unsqueeze(0).expand(3, -1, -1)
