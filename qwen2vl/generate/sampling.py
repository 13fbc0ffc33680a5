"""Choosing the next token: the logits processors of transformers 4.57 `generate`, in its order.

Matches `GenerationMixin._get_logits_processor` + `_sample` (transformers/generation/utils.py) for the settings a
Qwen2-VL generation_config.json uses: repetition penalty (`RepetitionPenaltyLogitsProcessor`: every id in the
sequence so far, prompt and left padding included) -> temperature -> top-k -> top-p (`TopPLogitsWarper`,
min_tokens_to_keep=1, ascending-sort cumulative rule), then argmax (greedy) or one `torch.multinomial` draw from
the softmax. The warpers run only when sampling. The official generation_config.json files sample with top_k=1: the draw
always lands on a maximal processed score, i.e. greedy, but the processors are kept so ties behave as in HF.
Ours, not HF's: temperature 0 means greedy (HF raises), and `seed` gives a private `torch.Generator`.
OpenAI's `logit_bias`, `presence_penalty` and `frequency_penalty` run first, in that order (off by default), as
the OpenAI API reference defines them: bias[j] is added to logit j; then with c[j] the number of times token j was
generated so far (the prompt does not count), logit[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields, replace
from typing import Any

import torch

# <|im_end|>, <|endoftext|>: the eos_token_id list of the official generation_config.json
DEFAULT_STOP_TOKEN_IDS = (151645, 151643)

# transformers' GenerationConfig defaults for keys a generation_config.json leaves out
_HF_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_k": 50, "top_p": 1.0, "repetition_penalty": 1.0}
# an explicit null in the file means "processor off" to transformers; these are our "off" values
_OFF = {"do_sample": False, "temperature": 1.0, "top_k": 0, "top_p": 1.0, "repetition_penalty": 1.0}


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    do_sample: bool = False
    temperature: float = 1.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0  # 1: off
    repetition_penalty: float = 1.0  # 1: off
    seed: int | None = None  # None: draw from torch's global generator, as transformers does
    stop: tuple[str, ...] = ()  # stop strings (generate/stopping.py)
    stop_token_ids: tuple[int, ...] = DEFAULT_STOP_TOKEN_IDS
    presence_penalty: float = 0.0  # OpenAI's; 0: off
    frequency_penalty: float = 0.0  # OpenAI's; 0: off
    logit_bias: tuple[tuple[int, float], ...] = ()  # OpenAI's (token id, bias added to its logit) pairs

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)
        if not all(isinstance(s, str) for s in stop):
            raise TypeError(f"stop must be a list of strings, got {self.stop!r}")
        object.__setattr__(self, "stop", stop)
        ids = (self.stop_token_ids,) if isinstance(self.stop_token_ids, int) else tuple(self.stop_token_ids)
        if not all(isinstance(i, int) and i >= 0 for i in ids):
            raise TypeError(f"stop_token_ids must be non-negative integers, got {self.stop_token_ids!r}")
        object.__setattr__(self, "stop_token_ids", ids)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 means greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an integer >= 0 (0 means off), got {self.top_k!r}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0 (1 means off), got {self.repetition_penalty}")
        bias = tuple(sorted(dict(self.logit_bias).items())) if isinstance(self.logit_bias, dict) else self.logit_bias
        bias = tuple((int(i), float(b)) for i, b in bias)
        if any(i < 0 for i, _ in bias):
            raise ValueError(f"logit_bias token ids must be >= 0, got {self.logit_bias!r}")
        object.__setattr__(self, "logit_bias", bias)

    @property
    def greedy(self) -> bool:
        """Argmax after the repetition penalty; the warpers and the draw are skipped."""
        return not self.do_sample or self.temperature == 0

    @classmethod
    def from_generation_config(cls, config: dict[str, Any] | None = None, **overrides: Any) -> SamplingParams:
        """A checkpoint's generation_config.json read as transformers' `GenerationConfig`, then the caller's keywords.

        Keys the file leaves out take transformers' defaults (greedy, top_k 50); a key set to null turns its
        processor off; eos_token_id may be an int or a list. Keywords that are None are ignored (unset CLI flags).
        Ours, not HF's: giving temperature, top_p or top_k without do_sample turns sampling on (off for
        temperature 0), and max_length (a total length) is not read, only max_new_tokens."""
        c = config or {}
        values: dict[str, Any] = {}
        for key, default in _HF_DEFAULTS.items():
            value = c.get(key, default)
            values[key] = _OFF[key] if value is None else type(default)(value)
        eos = c.get("eos_token_id")
        if eos is not None:
            values["stop_token_ids"] = (eos,) if isinstance(eos, int) else tuple(int(i) for i in eos)
        if c.get("max_new_tokens") is not None:
            values["max_new_tokens"] = int(c["max_new_tokens"])
        given = {k: v for k, v in overrides.items() if v is not None}
        unknown = set(given) - {f.name for f in fields(cls)}
        if unknown:
            raise TypeError(f"unknown sampling parameters: {sorted(unknown)}; known: {[f.name for f in fields(cls)]}")
        if "do_sample" not in given and any(k in given for k in ("temperature", "top_p", "top_k")):
            given["do_sample"] = given.get("temperature", 1.0) != 0
        return cls(**{**values, **given})

    def with_(self, **changes: Any) -> SamplingParams:
        return replace(self, **changes)


def openai_penalties(logits: torch.Tensor, generated: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """logit_bias, then presence and frequency penalties over the (B, G) generated ids (OpenAI's definitions)."""
    scores = logits
    if p.logit_bias:
        ids = torch.tensor([i for i, _ in p.logit_bias], device=scores.device)
        bias = torch.tensor([b for _, b in p.logit_bias], dtype=scores.dtype, device=scores.device)
        scores = scores.index_add(1, ids, bias.expand(scores.shape[0], -1))
    if (p.presence_penalty or p.frequency_penalty) and generated.shape[1]:
        counts = torch.zeros_like(scores).scatter_add_(1, generated, torch.ones_like(generated, dtype=scores.dtype))
        scores = scores - counts * p.frequency_penalty - (counts > 0).to(scores.dtype) * p.presence_penalty
    return scores


def process_logits(
    logits: torch.Tensor, seen: torch.Tensor, p: SamplingParams, prompt_len: int | None = None
) -> torch.Tensor:
    """(B, V) float32 logits and the (B, S) ids so far -> the scores transformers' processor list gives.
    `prompt_len`: where the generated ids start in `seen` (only OpenAI's penalties need it; None: nothing was
    generated)."""
    if logits.dim() != 2 or seen.dim() != 2 or seen.shape[0] != logits.shape[0]:
        raise ValueError(
            f"expected logits (B, V) and seen ids (B, S), got {tuple(logits.shape)} and {tuple(seen.shape)}"
        )
    scores = logits
    if p.logit_bias or p.presence_penalty or p.frequency_penalty:
        scores = openai_penalties(scores, seen[:, seen.shape[1] if prompt_len is None else prompt_len :], p)
    if p.repetition_penalty != 1.0:
        # duplicates in `seen` scatter the same value twice, so each id is penalised once
        picked = scores.gather(1, seen)
        picked = torch.where(picked < 0, picked * p.repetition_penalty, picked / p.repetition_penalty)
        scores = scores.scatter(1, seen, picked)
    if p.greedy:
        return scores
    if p.temperature != 1.0:
        scores = scores / p.temperature
    if p.top_k:
        k = min(p.top_k, scores.shape[-1])
        kth = torch.topk(scores, k)[0][..., -1, None]
        scores = scores.masked_fill(scores < kth, -float("inf"))  # ties with the k-th score are kept
    if p.top_p < 1.0:
        sorted_scores, order = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative <= (1 - p.top_p)
        drop[..., -1:] = False  # min_tokens_to_keep = 1: the largest score always stays
        scores = scores.masked_fill(drop.scatter(1, order, drop), -float("inf"))
    return scores


def new_generator(p: SamplingParams, device: str | torch.device = "cpu") -> torch.Generator | None:
    """A generator seeded from p.seed; None (torch's global one) when greedy or unseeded."""
    if p.greedy or p.seed is None:
        return None
    return torch.Generator(device=device).manual_seed(p.seed)


def sample(scores: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """Processed (B, V) scores -> (B,) token ids: argmax when greedy, else one draw per row from the softmax."""
    if p.greedy:
        return scores.argmax(-1)
    return torch.multinomial(scores.softmax(dim=-1), 1, generator=generator).squeeze(1)


Chooser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def chooser(p: SamplingParams, device: str | torch.device = "cpu") -> Chooser:
    """The callable the decode loop takes: choose(logits (B, V), seen (B, S)) -> (B,), with its own generator.
    It serves one generation: `seen` at its first call is the prompt (OpenAI's penalties count what follows)."""
    generator = new_generator(p, device)
    prompt_len: list[int] = []

    def choose(logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        if not prompt_len:
            prompt_len.append(seen.shape[1])
        return sample(process_logits(logits, seen, p, prompt_len[0]), p, generator)

    return choose
