"""The Qwen2 tokenizer through `tokenizers` (tokenizer.json), and streaming detokenisation.

Encoding matches transformers' `Qwen2TokenizerFast` as the Qwen2-VL processor calls it (no BOS, special tokens
recognised in text); decoding matches `batch_decode(skip_special_tokens=..., clean_up_tokenization_spaces=False)`.
`IncrementalDetokenizer` emits text only once it is complete: never half of a UTF-8 character split over tokens.
"""

from __future__ import annotations

from functools import cached_property
from pathlib import Path

from tokenizers import Tokenizer as _Tokenizer


class Tokenizer:
    def __init__(self, path: str | Path) -> None:
        self._tok = _Tokenizer.from_file(str(path))

    def vocab(self) -> dict[str, int]:
        """Every token's string in tokenizer.json's byte-level form (added tokens included) -> its id."""
        return self._tok.get_vocab(with_added_tokens=True)

    @cached_property
    def special_ids(self) -> frozenset[int]:
        """Ids of the special added tokens (<|im_start|>, <|vision_start|>, ...)."""
        return frozenset(i for i, t in self._tok.get_added_tokens_decoder().items() if t.special)

    def token_id(self, token: str) -> int:
        i = self._tok.token_to_id(token)
        if i is None:
            raise KeyError(f"{token!r} is not in the vocabulary")
        return i

    @cached_property
    def max_token_bytes(self) -> int:
        """No token stands for more UTF-8 bytes than this, so a text of n bytes has at least n / this tokens: a
        bound that refuses a text far over the context without tokenising it (megabytes take seconds and GBs)."""
        return max(len(t.encode()) for t in self._tok.get_vocab(with_added_tokens=True))

    def min_tokens(self, text: str) -> int:
        return -(-len(text.encode()) // self.max_token_bytes)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)


class IncrementalDetokenizer:
    """Feed token ids one at a time; get back the new text that is safe to show."""

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True) -> None:
        self.tok, self.skip = tokenizer, skip_special_tokens
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read] decode to text already emitted (kept as left context)
        self.read = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        before = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        now = self.tok.decode(self.ids[self.prefix :], self.skip)
        if len(now) > len(before) and not now.endswith("\ufffd"):
            self.prefix, self.read = self.read, len(self.ids)
            return now[len(before) :]
        return ""

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character at the very end is shown as U+FFFD)."""
        before = self.tok.decode(self.ids[self.prefix : self.read], self.skip)
        now = self.tok.decode(self.ids[self.prefix :], self.skip)
        self.prefix = self.read = len(self.ids)
        return now[len(before) :]
