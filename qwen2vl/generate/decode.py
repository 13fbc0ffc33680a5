"""Prefill, then decode one token at a time with a caller-owned KV cache: the one loop every surface uses.

Matches transformers 4.57 `GenerationMixin._sample` for `Qwen2VLForConditionalGeneration`: the prompt (vision features
written at their placeholders) fills the cache, each step feeds the chosen token back at position (max prompt position
of its row) + 1 + k (4.x: the cache length plus `get_rope_index`'s `rope_deltas`), finished rows keep receiving the
pad token, and the last position's logits are taken in float32 before the logits processors. The token choice itself
(greedy, sampling, penalties) is a callable, so this file knows nothing of sampling parameters.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from ..model import KVCache, Qwen2VL, decode_positions

# choose(logits (B, V) float32, token ids so far (B, S)) -> next tokens (B,)
Chooser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Prompt:
    """One (possibly left-padded) batch of prompts, as the processor returns it, plus optional cached vision."""

    input_ids: torch.Tensor  # (B, L)
    attention_mask: torch.Tensor  # (B, L)
    pixel_values: torch.Tensor | None = None
    image_grid_thw: torch.Tensor | None = None
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None
    image_features: torch.Tensor | None = None  # precomputed vision outputs replace the pixels when given
    video_features: torch.Tensor | None = None

    @classmethod
    def from_batch(cls, batch, **extra) -> Prompt:
        keys = (
            "input_ids",
            "attention_mask",
            "pixel_values",
            "image_grid_thw",
            "pixel_values_videos",
            "video_grid_thw",
        )
        fields = {k: batch[k] for k in keys if k in batch and batch[k] is not None}
        fields.setdefault("attention_mask", torch.ones_like(fields["input_ids"]))
        return cls(**fields, **extra)


@dataclass(frozen=True)
class Step:
    tokens: torch.Tensor  # (B,) the token chosen for each row at this step (pad for rows already finished)
    finished: torch.Tensor  # (B,) True where the row has produced a stop token at or before this step


def require_grid(grid_thw: torch.Tensor | None, kind: str) -> torch.Tensor:
    """The grid that must come with `kind` pixels."""
    if grid_thw is None:
        raise ValueError(f"the prompt has {kind} pixels but no {kind}_grid_thw")
    return grid_thw


def encode_vision(model: Qwen2VL, prompt: Prompt) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    image = prompt.image_features
    if image is None and prompt.pixel_values is not None:
        image = model.encode_vision(prompt.pixel_values, require_grid(prompt.image_grid_thw, "image"))
    video = prompt.video_features
    if video is None and prompt.pixel_values_videos is not None:
        video = model.encode_vision(prompt.pixel_values_videos, require_grid(prompt.video_grid_thw, "video"))
    return image, video


@torch.inference_mode()
def generate_steps(
    model: Qwen2VL,
    prompt: Prompt,
    choose: Chooser,
    max_new_tokens: int,
    stop_token_ids: tuple[int, ...] = (),
    pad_token_id: int = 151643,
    cache: KVCache | None = None,
    reuse: int = 0,
) -> Iterator[Step]:
    """Yield one Step per generated token until every row stopped or max_new_tokens were produced.

    `cache` (optional) must hold at least L + max_new_tokens slots; with `reuse` = r > 0 its first r slots already
    hold this prompt's first r tokens (a multi-turn chat whose history is unchanged), and only the rest is run.
    """
    device = model.device
    ids = prompt.input_ids.to(device)
    mask = prompt.attention_mask.to(device)
    batch, length = ids.shape
    if cache is None:
        cache = KVCache(model.config.text, batch, length + max_new_tokens, model.dtype, device)
    elif cache.max_len < length + max_new_tokens:
        raise ValueError(
            f"the KV cache holds {cache.max_len} positions; the prompt ({length}) plus "
            f"max_new_tokens ({max_new_tokens}) needs {length + max_new_tokens}"
        )
    if not 0 <= reuse < length:
        raise ValueError(f"reuse={reuse} must be below the prompt length {length}")

    image, video = encode_vision(model, prompt)
    embeds = model.embed(ids, image, video)
    positions, deltas = model.positions(ids, mask, prompt.image_grid_thw, prompt.video_grid_thw)
    positions = positions.to(device)
    full_mask = torch.cat([mask, mask.new_ones(batch, max_new_tokens)], dim=1)
    hidden = model.model(embeds[:, reuse:], positions[:, :, reuse:], full_mask[:, :length], cache, reuse)
    logits = model.logits(hidden[:, -1]).float()

    seen = ids
    stops = torch.tensor(stop_token_ids or (-1,), device=device)
    finished = torch.zeros(batch, dtype=torch.bool, device=device)
    for k in range(max_new_tokens):
        tokens = choose(logits, seen)
        tokens = torch.where(finished, torch.full_like(tokens, pad_token_id), tokens)
        finished = finished | torch.isin(tokens, stops)
        yield Step(tokens, finished)
        if bool(finished.all()) or k + 1 == max_new_tokens:
            return
        seen = torch.cat([seen, tokens[:, None]], dim=1)
        start = length + k
        step_pos = decode_positions(start, 1, deltas)
        embeds = model.model.embed_tokens(tokens[:, None]).to(model.dtype)  # as model.embed: compute dtype
        hidden = model.model(embeds, step_pos, full_mask[:, : start + 1], cache, start)
        logits = model.logits(hidden[:, -1]).float()


def greedy(logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
    return logits.argmax(-1)
