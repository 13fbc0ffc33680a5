"""Constrained decoding: output that must match a JSON schema, a regex, a choice list or a tool-call format.

The grammar engine is xgrammar (the one vLLM and SGLang use; it runs on CPU). A `Constraint` names what the output
must match; `Grammars` compiles it for one tokenizer (the Qwen2 byte-level vocabulary, every id of the model's
151,936 logits rows); a `GrammarProcessor` follows one sequence: before each token it sets the logits of every token
the grammar does not allow next to -inf, and after the choice it rolls its matcher forward with the chosen token.
Special tokens are never allowed inside the output; the stop tokens only where the grammar may end. The model knows
nothing of any of this: the engine and the pipeline call a processor's `__call__` and `accept` around their token
choice (`LogitsProcessor`).

Two paths apply the mask: xgrammar's CPU kernel (`apply_token_bitmask_inplace`) and a plain-PyTorch unpacking of
the same bitmask (`apply_bitmask_reference`); tests compare them.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol

import torch


class GrammarError(ValueError):
    """A constraint the grammar engine cannot compile (the message says why)."""


class VocabSource(Protocol):
    """What the grammar engine reads of a tokenizer (`processing.Tokenizer` is one)."""

    @property
    def special_ids(self) -> frozenset[int]: ...

    def vocab(self) -> dict[str, int]: ...  # byte-level token strings (tokenizer.json's form) -> ids


class LogitsProcessor(Protocol):
    """Changes one sequence's logits before its token is chosen, and learns which token was chosen."""

    def __call__(self, logits: torch.Tensor) -> torch.Tensor: ...  # (1, V) float32 -> (1, V)

    def accept(self, token: int) -> None: ...


@dataclass(frozen=True)
class Constraint:
    """What the output must match. kind: "json" (spec: a JSON schema as text, or None for any JSON object),
    "regex" (spec: the pattern), "choice" (spec: a JSON list of strings), "grammar" (spec: xgrammar EBNF),
    "structural_tag" (spec: an xgrammar structural tag as JSON text; tool calls are built this way)."""

    kind: str
    spec: str | None = None

    @classmethod
    def json_schema(cls, schema: dict | bool | None) -> Constraint:
        return cls("json", None if schema is None else json.dumps(schema, sort_keys=True))

    @classmethod
    def choice(cls, choices: list[str]) -> Constraint:
        if not choices or not all(isinstance(c, str) for c in choices):
            raise GrammarError("a choice constraint needs a non-empty list of strings")
        return cls("choice", json.dumps(list(choices)))

    @classmethod
    def from_response_format(cls, response_format: Any) -> Constraint | None:
        """OpenAI's `response_format`: {"type": "text"} -> None, {"type": "json_object"}, {"type": "json_schema",
        "json_schema": {"name", "schema", "strict"}} (a schema alone: `Constraint.json_schema`)."""
        if response_format is None:
            return None
        if not isinstance(response_format, dict):
            raise GrammarError("response_format must be an object")
        kind = response_format.get("type")
        if kind == "text":
            return None
        if kind == "json_object":
            return cls.json_schema(None)
        if kind == "json_schema":
            spec = response_format.get("json_schema")
            if not isinstance(spec, dict) or "schema" not in spec and "json_schema" not in spec:
                raise GrammarError("response_format json_schema needs a 'json_schema' object with a 'schema'")
            return cls.json_schema(spec.get("schema", spec.get("json_schema")))
        raise GrammarError(f"response_format type {kind!r} is not supported (text, json_object, json_schema)")


def _ebnf_literal(text: str) -> str:
    """A string literal of xgrammar's EBNF: JSON's escapes (\\", \\\\, \\n, \\uXXXX) are also EBNF's."""
    return json.dumps(text, ensure_ascii=True)


class Grammars:
    """Compiles constraints for one tokenizer; compiled grammars are cached (xgrammar's own cache)."""

    def __init__(self, tokenizer: VocabSource, vocab_size: int, stop_token_ids: tuple[int, ...]) -> None:
        try:
            import xgrammar as xgr
        except ImportError:
            raise GrammarError(
                "constrained output needs the xgrammar package, which is not installed: pip install "
                "'qwen2vl[structured]'"
            ) from None

        self.xgr = xgr
        vocab = tokenizer.vocab()
        encoded = [""] * (max(vocab.values()) + 1)
        for token, i in vocab.items():
            # special tokens as empty strings: xgrammar then never allows them inside the output (the detokenizer
            # would drop them, so the text could miss what the grammar counted); stop tokens are allowed by id
            encoded[i] = "" if i in tokenizer.special_ids else token
        self.vocab_size = vocab_size
        self.info = xgr.TokenizerInfo(
            encoded,
            xgr.VocabType.BYTE_LEVEL,
            vocab_size=vocab_size,
            stop_token_ids=list(stop_token_ids),
            add_prefix_space=False,
        )
        self.compiler = xgr.GrammarCompiler(self.info, max_threads=1)

    def compile(self, c: Constraint):
        """A compiled grammar, or GrammarError saying why the constraint cannot be compiled."""
        try:
            if c.kind == "json":
                if c.spec is None:
                    return self.compiler.compile_builtin_json_grammar()
                # compact separators: random or weak models otherwise can spend every token on whitespace
                return self.compiler.compile_json_schema(c.spec, any_whitespace=False, strict_mode=True)
            if c.kind == "regex":
                return self.compiler.compile_regex(c.spec)
            if c.kind == "choice":
                choices = json.loads(c.spec)
                return self.compiler.compile_grammar("root ::= " + " | ".join(_ebnf_literal(s) for s in choices))
            if c.kind == "grammar":
                return self.compiler.compile_grammar(c.spec)
            if c.kind == "structural_tag":
                return self.compiler.compile_structural_tag(c.spec)
        except (RuntimeError, ValueError, TypeError) as e:
            raise GrammarError(f"cannot compile the {c.kind} constraint: {_first_line(e)}") from None
        raise GrammarError(f"unknown constraint kind {c.kind!r}")

    def processor(self, c: Constraint) -> GrammarProcessor:
        return GrammarProcessor(self, self.compile(c))


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return re.sub(r"^\[[\d:]+\] \S+: ", "", text)  # xgrammar prefixes "[time] file.cc:line: "


@lru_cache(maxsize=4)
def grammars_for(tokenizer: VocabSource, vocab_size: int, stop_token_ids: tuple[int, ...]) -> Grammars:
    """One Grammars per tokenizer (building the vocabulary table takes a quarter of a second)."""
    return Grammars(tokenizer, vocab_size, stop_token_ids)


def apply_bitmask_reference(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """The plain-PyTorch path: bit j of 32-bit word w allows token 32 * w + j; every other token gets -inf."""
    bits = (bitmask.unsqueeze(-1) >> torch.arange(32, dtype=bitmask.dtype)) & 1  # (B, W) -> (B, W, 32)
    allowed = bits.flatten(1)[:, : logits.shape[-1]].bool()
    return logits.masked_fill(~allowed, -float("inf"))


class GrammarProcessor:
    """One sequence's grammar state: masks its logits, then advances with the chosen token."""

    def __init__(self, grammars: Grammars, compiled, fast: bool = True) -> None:
        xgr = grammars.xgr
        self.xgr, self.fast = xgr, fast
        self.matcher = xgr.GrammarMatcher(compiled)
        self.bitmask = xgr.allocate_token_bitmask(1, grammars.vocab_size)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.shape[0] != 1:
            raise ValueError(f"a GrammarProcessor follows one sequence; got {logits.shape[0]} rows")
        self.matcher.fill_next_token_bitmask(self.bitmask)
        if not self.fast or logits.device.type != "cpu" or logits.dtype != torch.float32:
            return apply_bitmask_reference(logits, self.bitmask.to(logits.device))
        logits = logits.clone()  # the caller's logits stay as they were (logprobs are reported from them)
        self.xgr.apply_token_bitmask_inplace(logits, self.bitmask)
        return logits

    def accept(self, token: int) -> None:
        if self.matcher.is_terminated():
            return
        if not self.matcher.accept_token(int(token)):
            raise RuntimeError(f"token {token} breaks the output's grammar (the mask allowed it: a bug)")

    @property
    def terminated(self) -> bool:
        return self.matcher.is_terminated()


def with_processors(choose, processors):
    """A chooser (logits (1, V), seen (1, S)) -> (1,) that runs the processors before the choice and tells them the
    chosen token after it: how the one-sequence loop of `generate.decode` uses what the engine calls per request."""
    if not processors:
        return choose

    def constrained(logits: torch.Tensor, seen: torch.Tensor) -> torch.Tensor:
        for p in processors:
            logits = p(logits)
        token = choose(logits, seen)
        for p in processors:
            p.accept(int(token[0]))
        return token

    return constrained
