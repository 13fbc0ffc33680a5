"""Continuous batching over the stateless model: requests join and leave between decode steps.

Shaped like nano-vllm's `LLMEngine.step` (schedule -> run -> postprocess) and vLLM's scheduler, for one process:
- a bounded waiting queue (full -> `QueueFull`, which a server turns into 429 + Retry-After);
- a fixed pool of KV slots sized from an explicit byte budget; a request is admitted when a slot is free;
- each step spends a bounded time on prompt work, then does one decode step for every running request. Prompt
  work comes in units: a piece of a vision encode (`Qwen2VL.encode_vision_pieces`, about `vision_piece_flops`
  of work, so a 16k-token image is thousands of pieces while a small one is a single piece) or one prefill chunk
  of at most `prefill_chunk` tokens. Units run while the step has spent less than its budget, by default the
  median of the last decode steps' durations (at least MIN_PROMPT_BUDGET_S), so prompt work and decoding share
  the machine about equally while both have work; `prompt_budget_s` fixes it instead (0: one unit per step). A
  unit that would overrun the budget (judged by the last vision piece, or the last prefill chunk's time per
  token) waits for the next step, where it runs first. The request that had
  the step's prompt work then goes to the back of the line, so a small request admitted behind a huge image
  still gets its first token soon. An abort stops a request's work after the unit in progress;
- vision outputs are cached by content hash across requests (LRU, byte budget), and a freed slot keeps its
  prompt's keys/values: a new request whose prompt starts with the same whole prefill chunks continues from
  there (multi-turn chats, shared system prompts). Reused chunks are bit-identical to recomputed ones, because
  chunk boundaries are fixed multiples of `prefill_chunk` from the start of the prompt.
Every request's tokens are what it would get alone: its prefill and vision run by themselves (an encode in pieces
is bit-identical to the one-shot encode), decode rows use per-row attention (`SlotAttend`) and linear layers whose
per-row result does not depend on the batch (`qwen2vl.kernels`). The token choice is a per-request callable, as in
`generate.decode`; a request's `processors` (constrained decoding: `generate.structured`) change its logits before
that choice and are told the chosen token after it, so each request carries its own grammar state.
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from typing import cast

import torch

from ..generate.decode import Prompt
from ..generate.vision import VisionCache, common_prefix, prefix_key, vision_items
from ..model import Qwen2VL
from ..model.adapters import adapters_for_rows
from ..parallel.commands import share
from .slots import SlotAttend, SlotPool, slot_bytes

STEP_WINDOW_S = 60.0  # stats()["longest_step_s"] looks this far back
MIN_PROMPT_BUDGET_S = 0.05  # prompt work per step when nothing decodes, or decoding is faster than this


class QueueFull(RuntimeError):
    """The waiting queue is at its limit; try again later."""


class EngineBroken(RuntimeError):
    """The engine cannot go on (tensor-parallel ranks out of step): the server must stop."""


@dataclass(frozen=True)
class Request:
    """What the caller asks of the engine; never changed by it."""

    request_id: str
    prompt: Prompt  # batch of one
    choose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits (1, V), seen (1, S)) -> (1,)
    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # return the chosen token's logprob and this many alternatives
    processors: tuple = ()  # LogitsProcessor objects (generate.structured), with this request's own state
    adapter: int = -1  # which of the model's side-by-side LoRA adapters answers (qwen2vl.lora.load_adapters); -1: none


@dataclass(eq=False)
class SequenceState:
    """The engine's running state for one request, from its admission to its end (engine thread only)."""

    request: Request
    processors: tuple = ()  # the request's processors while it runs; dropped when it ends
    reused: int = 0  # prompt tokens whose keys/values came from the prefix cache
    slot: int = -1
    prefilled: int = 0  # prompt tokens whose keys/values are in the slot
    generated: list[int] = field(default_factory=list)
    embeds: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    next_position: int = 0
    vision_pending: list = field(default_factory=list)  # (kind, pixels, grid, cache key) per item not yet encoded
    encoding: tuple | None = None  # (kind, cache key, generator): the item being encoded, a piece per next()
    prefix_key: list = field(default_factory=list)  # generate.vision.prefix_key of the prompt
    features: dict = field(default_factory=dict)

    @property
    def request_id(self) -> str:
        return self.request.request_id

    @property
    def ids(self) -> torch.Tensor:
        return self.request.prompt.input_ids[0]


@dataclass(frozen=True)
class Output:
    request_id: str
    token: int | None  # None when the request ended without a new token (aborted, or refused)
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    error: str | None = None
    cached_tokens: int = 0  # with a request's first token: prompt tokens served from the prefix cache


class Engine:
    def __init__(
        self,
        model: Qwen2VL,
        max_num_seqs: int = 8,
        max_model_len: int = 4096,
        kv_cache_bytes: int | None = None,
        prefill_chunk: int = 256,
        max_waiting: int = 256,
        vision_cache_bytes: int = 256 * 2**20,
        prompt_budget_s: float | None = None,
        vision_piece_flops: float | None = None,
        lead: bool = False,
    ) -> None:
        self.model = model
        cfg = model.config.text
        per_slot = slot_bytes(cfg, max_model_len, model.dtype)
        slots = max_num_seqs if kv_cache_bytes is None else min(max_num_seqs, kv_cache_bytes // per_slot)
        self.pool = SlotPool(cfg, slots, max_model_len, model.dtype, model.device)
        self.lead = lead  # rank 0 of a tensor-parallel model: every decoder call is handed to the others first
        # ... and every vision encode, when the vision tower is split over the ranks too
        self.lead_vision = lead and getattr(model.visual, "split_over_ranks", False)
        self._encodes = 0  # vision encodes handed to the other ranks so far (their handles)
        if lead:
            share(("pool", slots, max_model_len))
        self.max_model_len, self.prefill_chunk, self.max_waiting = max_model_len, prefill_chunk, max_waiting
        self.waiting: deque[SequenceState] = deque()
        self.prefilling: list[SequenceState] = []
        self.running: list[SequenceState] = []
        self.free_slots = list(range(slots))
        self.slot_tokens: dict[int, list[int]] = {}  # prompt tokens whose KV a free slot still holds
        self.vision_cache = VisionCache(vision_cache_bytes)
        self._inbox: deque = deque()
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self.generated_tokens = 0
        self.prefix_tokens_reused = 0
        self.prompt_budget_s = prompt_budget_s  # None: as long as a decode step, at least MIN_PROMPT_BUDGET_S
        # ~50 ms on 2 AVX-512 cores; on an accelerator a piece may hold far more work (not measured here)
        self.vision_piece_flops = vision_piece_flops or (4e9 if model.device.type == "cpu" else 4e11)
        self.vision_pieces = 0
        self._piece_s = self._token_s = 0.0  # the last vision piece's duration; the last prefill chunk's per token
        self._decode_s: deque[float] = deque(maxlen=8)  # the last decode steps' durations
        self._abort_pending = False
        # health: (end time, duration) of recent steps; the start time of the step in progress
        self._steps: deque[tuple[float, float]] = deque()
        self._step_started: float | None = None
        self._last_step_end: float | None = None

    # -- thread-safe entry points (called from the server's event loop) ----------------------------------------
    def add(self, request: Request) -> None:
        length = request.prompt.input_ids.shape[1]
        if length + 1 > self.max_model_len:
            raise ValueError(f"the prompt has {length} tokens; this server's context is {self.max_model_len}")
        with self._lock:
            if len(self.waiting) + len(self._inbox) >= self.max_waiting:
                raise QueueFull(f"{self.max_waiting} requests are already waiting")
            self._inbox.append(("add", SequenceState(request)))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        with self._lock:
            self._inbox.append(("abort", request_id))
            self._abort_pending = True
        self._wake.set()

    def stats(self) -> dict:
        """Counters and gauges. For a health check (seconds, from the monotonic clock):
        - step_running_s: how long the step now in progress has run (0.0 between steps). A step is about its
          prompt budget plus one decode step, or one prefill chunk plus one decode step if that is longer
          (prefill chunks are not split), so a value well beyond that means the loop is stuck;
        - since_last_step_s: since the last step ended (None before the first), which also grows while idle,
          so read it together with has_work();
        - longest_step_s: the longest step that ended in the last STEP_WINDOW_S seconds (0.0 if none): the worst
          gap between tokens that running requests have seen lately, apart from their own decode step.
        """
        used = sum(r.prefilled + len(r.generated) for r in self.running + self.prefilling)
        now = time.monotonic()
        with self._lock:
            recent = [d for end, d in self._steps if end >= now - STEP_WINDOW_S]
            started, last_end = self._step_started, self._last_step_end
        return {
            "waiting": len(self.waiting),
            "running": len(self.running),
            "prefilling": len(self.prefilling),
            "kv_slots": self.pool.slots,
            "kv_slots_used": self.pool.slots - len(self.free_slots),
            "kv_tokens_used": used,
            "kv_tokens_capacity": self.pool.slots * self.max_model_len,
            "generated_tokens": self.generated_tokens,
            "prefix_tokens_reused": self.prefix_tokens_reused,
            "vision_cache_hits": self.vision_cache.hits,
            "vision_cache_misses": self.vision_cache.misses,
            "vision_pieces": self.vision_pieces,
            "step_running_s": 0.0 if started is None else now - started,
            "since_last_step_s": None if last_end is None else now - last_end,
            "longest_step_s": max(recent, default=0.0),
        }

    def fail_all(self, error: str) -> list[Output]:
        """End every request (after an internal failure), freeing all slots; the engine stays usable."""
        outputs = []
        for queue in (self.waiting, self.prefilling, self.running):
            for seq in list(queue):
                outputs.append(Output(seq.request_id, None, finish_reason="error", error=error))
                if seq.slot >= 0:
                    self._release(seq, keep=False)
        self.waiting.clear()
        self.prefilling, self.running = [], []
        self.slot_tokens.clear()
        return outputs

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.running or self._inbox)

    def wait_for_work(self, timeout: float) -> None:
        self._wake.wait(timeout)
        self._wake.clear()

    # -- one step ----------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[Output]:
        start = time.monotonic()
        with self._lock:
            self._step_started = start
        outputs = self._drain_inbox()
        self._admit()
        outputs += self._prompt_units(start)
        if self.running:
            t = time.monotonic()
            outputs += self._decode()
            self._decode_s.append(time.monotonic() - t)
        end = time.monotonic()
        with self._lock:
            self._steps.append((end, end - start))
            while self._steps[0][0] < end - STEP_WINDOW_S:
                self._steps.popleft()
            self._step_started, self._last_step_end = None, end
        return outputs

    def _prompt_units(self, start: float) -> list[Output]:
        """Prompt work until the step's budget is spent (at least one unit), the worked request then last in line."""
        budget = self.prompt_budget_s
        if budget is None:  # a median, so that one decode step slowed by something else does not double a budget
            decode = statistics.median(self._decode_s) if self.running and self._decode_s else 0.0
            budget = max(MIN_PROMPT_BUDGET_S, decode)
        outputs, worked = [], None
        while self.prefilling:
            seq = self.prefilling[0]
            tokens = 0 if seq.encoding or seq.vision_pending else self._chunk_end(seq) - seq.prefilled
            estimate = self._token_s * tokens if tokens else self._piece_s
            if worked is not None and time.monotonic() - start + estimate > budget:
                break
            t = time.monotonic()
            outputs += self._prompt_unit(seq)
            if tokens:
                self._token_s = (time.monotonic() - t) / tokens
            else:
                self._piece_s = time.monotonic() - t
            worked = seq
            if self._abort_pending:  # a client left: free its slot now, and do no more of its work
                outputs += self._drain_inbox()
        if len(self.prefilling) > 1 and self.prefilling[0] is worked:
            self.prefilling.append(self.prefilling.pop(0))
        return outputs

    def _prompt_unit(self, seq: SequenceState) -> list[Output]:
        """One unit of seq's prompt work; its first token when that ends the prompt."""
        try:
            first = self._prompt_work(seq)
        except EngineBroken:
            raise
        except Exception as e:  # one bad request must not take the others down
            self.prefilling.remove(seq)
            self._release(seq, keep=False)
            return [Output(seq.request_id, None, finish_reason="error", error=str(e))]
        if first is None:
            return []
        self.prefilling.remove(seq)
        if first.finish_reason is None:
            self.running.append(seq)
        else:
            self._release(seq)
        return [first]

    def _drain_inbox(self) -> list[Output]:
        outputs = []
        with self._lock:
            items, self._inbox, self._abort_pending = list(self._inbox), deque(), False
        for kind, item in items:
            if kind == "add":
                self.waiting.append(item)
                continue
            for queue in (self.waiting, self.prefilling, self.running):
                for seq in list(queue):
                    if seq.request_id == item:
                        queue.remove(seq)
                        if seq.slot >= 0:
                            self._release(seq, keep=False)
                        outputs.append(Output(seq.request_id, None, finish_reason="abort"))
        return outputs

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            seq = self.waiting.popleft()
            items = vision_items(seq.request.prompt)
            seq.vision_pending = [(kind, pixels, grid, VisionCache.key(pixels, grid)) for kind, pixels, grid in items]
            seq.prefix_key = prefix_key(
                seq.request.prompt, [(k, g, key) for k, _, g, key in seq.vision_pending], self.model.config
            )
            if seq.request.adapter >= 0:  # keys/values computed under one adapter serve only that adapter
                seq.prefix_key = [(seq.request.adapter, k) for k in seq.prefix_key]
            seq.slot, seq.prefilled = self._pick_slot(seq.prefix_key)
            seq.reused = seq.prefilled
            seq.processors = seq.request.processors
            self.prefix_tokens_reused += seq.prefilled
            self.prefilling.append(seq)

    def _pick_slot(self, ids: list) -> tuple[int, int]:
        """A free slot, preferring the one holding the longest run of whole prefill chunks of this prompt."""
        best, best_len = self.free_slots[0], 0
        for slot in self.free_slots:
            # the last prompt token is always run, for its logits
            common = min(common_prefix(self.slot_tokens.get(slot, []), ids), len(ids) - 1)
            whole = common // self.prefill_chunk * self.prefill_chunk
            if whole > best_len:
                best, best_len = slot, whole
        self.free_slots.remove(best)
        self.slot_tokens.pop(best, None)
        return best, best_len

    def _release(self, seq: SequenceState, keep: bool = True) -> None:
        if seq.encoding is not None and len(seq.encoding) > 3 and self.lead_vision:  # and the other ranks' share
            share(("vision_drop", seq.encoding[3]))
        seq.encoding = None  # drops a half-done vision encode and its intermediate tensors
        seq.processors = ()  # and the grammar state: a finished or aborted request's matcher goes with it
        if keep:
            self.slot_tokens[seq.slot] = seq.prefix_key[: seq.prefilled]
        self.free_slots.append(seq.slot)
        seq.slot = -1

    def _prompt_work(self, seq: SequenceState) -> Output | None:
        model = self.model
        if seq.encoding is None and seq.vision_pending:
            kind, pixels, grid, key = seq.vision_pending.pop(0)
            feats = self.vision_cache.get(key)
            if feats is not None:
                seq.features.setdefault(kind, []).append(feats)
                return None
            seq.encoding = (kind, key, model.encode_vision_pieces(pixels, grid, self.vision_piece_flops))
            if self.lead_vision:  # the other ranks hold shares of the vision tower: they encode alongside
                self._encodes += 1
                seq.encoding += (self._encodes,)
                share(("vision", self._encodes, pixels.cpu(), grid.cpu(), self.vision_piece_flops))
        if seq.encoding is not None:  # one piece of the encode
            kind, key, pieces, *handle = seq.encoding
            self.vision_pieces += 1
            if handle:
                share(("vision_next", *handle))
            try:
                next(pieces)
                return None
            except StopIteration as done:
                feats = done.value
            except Exception as e:
                if handle:  # the other ranks ran this piece: see _decoder
                    raise self._out_of_step("a vision piece", e) from e
                raise
            seq.encoding = None
            self.vision_cache.put(key, feats)
            seq.features.setdefault(kind, []).append(feats)
            return None
        if seq.embeds is None:
            p = seq.request.prompt
            image = p.image_features if p.image_features is not None else _cat(seq.features.get("image"))
            video = p.video_features if p.video_features is not None else _cat(seq.features.get("video"))
            seq.embeds = model.embed(p.input_ids, image, video)
            seq.positions, deltas = model.positions(p.input_ids, p.attention_mask, p.image_grid_thw, p.video_grid_thw)
            seq.next_position = p.input_ids.shape[1] + int(deltas[0])
            seq.features = {}
        assert seq.positions is not None  # set with embeds, above
        length, end = seq.embeds.shape[1], self._chunk_end(seq)
        hidden = self._decoder(
            (
                "prefill",
                seq.embeds[:, seq.prefilled : end],
                seq.positions[:, :, seq.prefilled : end],
                seq.slot,
                seq.prefilled,
                (seq.request.adapter,),
            )
        )
        seq.prefilled = end
        if end < length:
            return None
        seq.embeds = seq.positions = None
        return self._emit(seq, model.logits(hidden[:, -1]).float())

    def _decoder(self, command: tuple) -> torch.Tensor:
        """Run one decoder command (see run_decoder) here, after handing it to the other ranks when leading them."""
        if not self.lead:
            return run_decoder(self.model, self.pool, command)
        share(tuple(c.clone().cpu() if isinstance(c, torch.Tensor) else c for c in command))
        try:
            return run_decoder(self.model, self.pool, command)
        except Exception as e:  # the other ranks ran it: they now wait in a collective this rank will not join
            raise self._out_of_step("a decoder step", e) from e

    def _out_of_step(self, what: str, e: Exception) -> EngineBroken:
        """Rank 0 failed in work the other ranks ran: nothing more is handed to them (they wait in a collective
        that will time out, or are stopped with this process)."""
        self.lead = self.lead_vision = False
        return EngineBroken(f"rank 0 failed in {what} the other ranks ran ({e}); the ranks are out of step")

    def close(self) -> None:
        """Release the other ranks (they return from follow()); a single-process engine has nothing to release."""
        if self.lead:
            self.lead = False
            share(("stop",))

    def _chunk_end(self, seq: SequenceState) -> int:
        """Where seq's next prefill chunk ends: chunk boundaries are fixed multiples of prefill_chunk."""
        return min(seq.ids.shape[0], (seq.prefilled // self.prefill_chunk + 1) * self.prefill_chunk)

    def _decode(self) -> list[Output]:
        model = self.model
        seqs = self.running
        hidden = self._decoder(
            (
                "decode",
                [r.generated[-1] for r in seqs],
                [r.next_position + len(r.generated) - 1 for r in seqs],
                [r.slot for r in seqs],
                [r.prefilled + len(r.generated) - 1 for r in seqs],
                tuple(r.request.adapter for r in seqs),
            )
        )
        logits = model.logits(hidden[:, -1]).float()
        outputs, still = [], []
        for i, seq in enumerate(seqs):
            out = self._emit(seq, logits[i : i + 1])
            outputs.append(out)
            if out.finish_reason is None:
                still.append(seq)
            else:
                self._release(seq)
        self.running = still
        return outputs

    def _emit(self, seq: SequenceState, logits: torch.Tensor) -> Output:
        seen = torch.cat(
            [
                seq.request.prompt.input_ids.to(logits.device),
                torch.tensor([seq.generated], dtype=torch.long, device=logits.device),
            ],
            dim=1,
        )
        scores = logits
        for processor in seq.processors:
            scores = processor(scores)
        token = int(seq.request.choose(scores, seen)[0])
        for processor in seq.processors:
            processor.accept(token)
        seq.generated.append(token)
        self.generated_tokens += 1
        logprob, top = None, cast(tuple[tuple[int, float], ...], ())
        if seq.request.logprobs is not None:
            lp = torch.log_softmax(logits[0], dim=-1)
            logprob = float(lp[token])
            if seq.request.logprobs:
                values, ids = lp.topk(seq.request.logprobs)
                top = tuple(zip(ids.tolist(), values.tolist()))
        reason = None
        if token in seq.request.stop_token_ids:
            reason = "stop"
        elif (
            len(seq.generated) >= seq.request.max_new_tokens or seq.prefilled + len(seq.generated) >= self.max_model_len
        ):
            reason = "length"
        return Output(
            seq.request_id, token, logprob, top, reason, cached_tokens=seq.reused if len(seq.generated) == 1 else 0
        )


def run_decoder(model: Qwen2VL, pool: SlotPool, command: tuple) -> torch.Tensor:
    """The decoder's work for one engine command, the same on every rank (each with its own pool of its heads):
    - ("prefill", embeds (1, n, hidden), positions (3, 1, n), slot, start, adapters): n prompt positions into
      a slot;
    - ("decode", tokens, positions, slots, lengths, adapters): one token per running request, row b at position
      lengths[b] of slot slots[b] (SlotAttend).
    `adapters`: each row's LoRA adapter (-1: none). Returns the last layer's hidden states (the logits are rank
    0's to compute)."""
    kind, *args, adapters = command
    with adapters_for_rows(adapters):
        if kind == "prefill":
            embeds, positions, slot, start = args
            return model.model(embeds.to(model.device), positions.to(model.device), None, pool.view(slot), start)
        tokens, positions, slots, lengths = args
        ids = torch.tensor(tokens, device=model.device).view(-1, 1)
        pos = torch.tensor(positions, device=model.device).view(1, -1, 1).expand(3, -1, -1)
        embeds = model.model.embed_tokens(ids).to(model.dtype)
        return model.model(embeds, pos, attend=SlotAttend(pool, slots, lengths, model.model.decode_attention))


@torch.inference_mode()
def follow(model: Qwen2VL) -> None:
    """Ranks other than 0 under a tensor-parallel engine: build the same slot pool as rank 0's engine, then run
    every decoder command it hands over (and, with a split vision tower, every piece of its vision encodes),
    until it says stop (Engine.close)."""
    pool = None
    encodes: dict[int, Generator] = {}  # rank 0's vision encodes in progress, by handle (a split vision tower)
    while True:
        command = share()
        kind = command[0]
        if kind == "stop":
            return
        if kind == "pool":
            pool = SlotPool(model.config.text, command[1], command[2], model.dtype, model.device)
        elif kind == "vision":
            handle, pixels, grid, flops = command[1:]
            encodes[handle] = model.encode_vision_pieces(pixels.to(model.device), grid, flops)
        elif kind == "vision_next":
            try:
                next(encodes[command[1]])
            except StopIteration:
                del encodes[command[1]]
        elif kind == "vision_drop":
            encodes.pop(command[1], None)
        else:
            assert pool is not None, "a decoder command before the pool"
            run_decoder(model, pool, command)


def _cat(parts: list | None) -> torch.Tensor | None:
    return None if not parts else torch.cat(parts)
