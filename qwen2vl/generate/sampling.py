"""Choosing the next token: the logits processors of transformers 4.57 `generate`, in its order.

`SamplingParams.from_generation_config` reads a checkpoint's generation_config.json as `generate` does
(do_sample, temperature, top_k, top_p, repetition_penalty, eos_token_id); the official Qwen2-VL files sample
with top_k=1, i.e. greedily, with repetition penalty 1.05 where present (spec 8.1). `chooser(params)` returns the
callable the decode loop takes: repetition penalty (`RepetitionPenaltyLogitsProcessor`: every id seen so far,
prompt and padding included) -> temperature -> top-k -> top-p (`TopPLogitsWarper`, min_tokens_to_keep=1) ->
argmax, or a draw from a seeded `torch.Generator`. temperature=0 means greedy.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = (151645, 151643)

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_generation_config(cls, config: dict | None = None, **overrides) -> "SamplingParams":
        """The checkpoint's defaults, then the caller's keywords (transformers names; temperature=0: greedy).

        Giving temperature, top_p or top_k without do_sample turns sampling on, as users expect."""
        c = config or {}
        eos = c.get("eos_token_id", (151645, 151643))
        values = {
            "do_sample": bool(c.get("do_sample", False)),
            "temperature": float(c.get("temperature") if c.get("temperature") is not None else 1.0),
            "top_k": int(c.get("top_k") if c.get("top_k") is not None else 50),
            "top_p": float(c.get("top_p") if c.get("top_p") is not None else 1.0),
            "repetition_penalty": float(c.get("repetition_penalty") or 1.0),
            "stop_token_ids": tuple(eos) if isinstance(eos, (list, tuple)) else (int(eos),),
        }
        if c.get("max_new_tokens"):
            values["max_new_tokens"] = int(c["max_new_tokens"])
        given = {k: v for k, v in overrides.items() if v is not None}
        if "do_sample" not in given and any(k in given for k in ("temperature", "top_p", "top_k")):
            given["do_sample"] = given.get("temperature", 1.0) != 0
        if "stop" in given and isinstance(given["stop"], str):
            given["stop"] = (given["stop"],)
        if "stop" in given:
            given["stop"] = tuple(given["stop"])
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown sampling parameters: {sorted(unknown)}")
        return cls(**{**values, **given})

    def with_(self, **changes) -> "SamplingParams":
        return replace(self, **changes)


def process_logits(logits: torch.Tensor, seen: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """(B, V) float32 logits -> processed scores, exactly as transformers' processor list for these params."""
    scores = logits
    if p.repetition_penalty != 1.0:
        picked = scores.gather(1, seen)
        picked = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        scores = scores.scatter(1, seen, picked)
    if p.greedy:
        return scores
    if p.temperature != 1.0:
        scores = scores / p.temperature
    if p.top_k:
        k = min(max(p.top_k, 1), scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - p.top_p)
        drop[..., -1:] = False  # keep at least one token
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return scores


def chooser(p: SamplingParams, device: str | torch.device = "cpu") -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The token-choice callable for generate_steps / the engine, with its own seeded generator."""
    gen = None
    if not p.greedy:
        gen = torch.Generator(device=device)
        gen.manual_seed(p.seed if p.seed is not None else int(torch.randint(0, 2**62, (1,))))

    def choose(logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        scores = process_logits(logits, seen, p)
        if p.greedy:
            return scores.argmax(-1)
        probs = scores.softmax(dim=-1)
        return torch.multinomial(probs, 1, generator=gen).squeeze(1)

    return choose
