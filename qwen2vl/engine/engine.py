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

import hashlib
import statistics
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..generate.decode import Prompt
from ..model import Qwen2VL
from .slots import SlotAttend, SlotPool, slot_bytes


STEP_WINDOW_S = 60.0  # stats()["longest_step_s"] looks this far back
MIN_PROMPT_BUDGET_S = 0.05  # prompt work per step when nothing decodes, or decoding is faster than this


class QueueFull(RuntimeError):
    """The waiting queue is at its limit; try again later."""


@dataclass
class Request:
    request_id: str
    prompt: Prompt  # batch of one
    choose: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (logits (1, V), seen (1, S)) -> (1,)
    max_new_tokens: int
    stop_token_ids: tuple[int, ...] = ()
    logprobs: int | None = None  # return the chosen token's logprob and this many alternatives
    processors: tuple = ()  # LogitsProcessor objects (generate.structured), this request's own state
    # filled in by the engine
    reused: int = 0  # prompt tokens whose keys/values came from the prefix cache
    slot: int = -1
    done: int = 0  # prompt tokens whose keys/values are in the slot
    generated: list[int] = field(default_factory=list)
    embeds: torch.Tensor | None = None
    positions: torch.Tensor | None = None
    next_position: int = 0
    vision_pending: list = field(default_factory=list)  # (kind, pixels, grid, cache key) per item not yet encoded
    encoding: tuple | None = None  # (kind, cache key, generator): the item being encoded, a piece per next()
    identity: list = field(default_factory=list)
    features: dict = field(default_factory=dict)
    arrived: float = field(default_factory=time.monotonic)

    @property
    def ids(self) -> torch.Tensor:
        return self.prompt.input_ids[0]


@dataclass(frozen=True)
class Output:
    request_id: str
    token: int | None  # None when the request ended without a new token (aborted, or refused)
    logprob: float | None = None
    top_logprobs: tuple[tuple[int, float], ...] = ()
    finish_reason: str | None = None  # "stop", "length", "abort", "error"
    error: str | None = None
    cached_tokens: int = 0  # with a request's first token: prompt tokens served from the prefix cache


class VisionCache:
    """LRU of vision features keyed by a hash of the pixels and grid, bounded in bytes."""

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes, self.used, self.items = max_bytes, 0, OrderedDict()
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
    ) -> None:
        self.model = model
        cfg = model.config.text
        per_slot = slot_bytes(cfg, max_model_len, model.dtype)
        slots = max_num_seqs if kv_cache_bytes is None else min(max_num_seqs, kv_cache_bytes // per_slot)
        self.pool = SlotPool(cfg, slots, max_model_len, model.dtype, model.device)
        self.max_model_len, self.prefill_chunk, self.max_waiting = max_model_len, prefill_chunk, max_waiting
        self.waiting: deque[Request] = deque()
        self.prefilling: list[Request] = []
        self.running: list[Request] = []
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
            self._inbox.append(("add", request))
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
        used = sum(r.done + len(r.generated) for r in self.running + self.prefilling)
        now = time.monotonic()
        with self._lock:
            recent = [d for end, d in self._steps if end >= now - STEP_WINDOW_S]
            started, last_end = self._step_started, self._last_step_end
        return {"waiting": len(self.waiting), "running": len(self.running), "prefilling": len(self.prefilling),
                "kv_slots": self.pool.slots, "kv_slots_used": self.pool.slots - len(self.free_slots),
                "kv_tokens_used": used, "kv_tokens_capacity": self.pool.slots * self.max_model_len,
                "generated_tokens": self.generated_tokens, "prefix_tokens_reused": self.prefix_tokens_reused,
                "vision_cache_hits": self.vision_cache.hits, "vision_cache_misses": self.vision_cache.misses,
                "vision_pieces": self.vision_pieces,
                "step_running_s": 0.0 if started is None else now - started,
                "since_last_step_s": None if last_end is None else now - last_end,
                "longest_step_s": max(recent, default=0.0)}

    def fail_all(self, error: str) -> list[Output]:
        """End every request (after an internal failure), freeing all slots; the engine stays usable."""
        outputs = []
        for queue in (self.waiting, self.prefilling, self.running):
            for req in list(queue):
                outputs.append(Output(req.request_id, None, finish_reason="error", error=error))
                if req.slot >= 0:
                    self._release(req, keep=False)
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
            req = self.prefilling[0]
            tokens = 0 if req.encoding or req.vision_pending else self._chunk_end(req) - req.done
            estimate = self._token_s * tokens if tokens else self._piece_s
            if worked is not None and time.monotonic() - start + estimate > budget:
                break
            t = time.monotonic()
            outputs += self._prompt_unit(req)
            if tokens:
                self._token_s = (time.monotonic() - t) / tokens
            else:
                self._piece_s = time.monotonic() - t
            worked = req
            if self._abort_pending:  # a client left: free its slot now, and do no more of its work
                outputs += self._drain_inbox()
        if len(self.prefilling) > 1 and self.prefilling[0] is worked:
            self.prefilling.append(self.prefilling.pop(0))
        return outputs

    def _prompt_unit(self, req: Request) -> list[Output]:
        """One unit of req's prompt work; its first token when that ends the prompt."""
        try:
            first = self._prompt_work(req)
        except Exception as e:  # one bad request must not take the others down
            self.prefilling.remove(req)
            self._release(req, keep=False)
            return [Output(req.request_id, None, finish_reason="error", error=str(e))]
        if first is None:
            return []
        self.prefilling.remove(req)
        if first.finish_reason is None:
            self.running.append(req)
        else:
            self._release(req)
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
                for req in list(queue):
                    if req.request_id == item:
                        queue.remove(req)
                        if req.slot >= 0:
                            self._release(req, keep=False)
                        outputs.append(Output(req.request_id, None, finish_reason="abort"))
        return outputs

    def _admit(self) -> None:
        while self.waiting and self.free_slots:
            req = self.waiting.popleft()
            p = req.prompt
            items = []
            if p.image_features is None and p.pixel_values is not None:
                items += _split_items("image", p.pixel_values, p.image_grid_thw)
            if p.video_features is None and p.pixel_values_videos is not None:
                items += _split_items("video", p.pixel_values_videos, p.video_grid_thw)
            req.vision_pending = [(kind, pixels, grid, VisionCache.key(pixels, grid)) for kind, pixels, grid in items]
            req.identity = self._identity(req, req.vision_pending)
            req.slot, req.done = self._pick_slot(req.identity)
            req.reused = req.done
            self.prefix_tokens_reused += req.done
            self.prefilling.append(req)

    def _identity(self, req: Request, items: list) -> list:
        """The prompt's token ids, with each image/video placeholder replaced by (content hash, index): two
        prompts share a prefix only if their pictures are the same too."""
        p, cfg = req.prompt, self.model.config
        merge = cfg.vision.spatial_merge_size ** 2
        pads = {cfg.image_token_id: [], cfg.video_token_id: []}  # per kind: [(key, tokens), ...] in order
        for kind, _, grid, key in items:
            token = cfg.image_token_id if kind == "image" else cfg.video_token_id
            pads[token].append((key, int(grid.prod()) // merge))
        for token, feats in ((cfg.image_token_id, p.image_features), (cfg.video_token_id, p.video_features)):
            if feats is not None:  # precomputed features: one key covering all of them
                pads[token] = [(VisionCache.key(feats, torch.tensor(feats.shape)), feats.shape[0])]
        out, item, used = [], {t: 0 for t in pads}, {t: 0 for t in pads}
        for t in req.ids.tolist():
            if t in pads and item[t] < len(pads[t]):
                key, count = pads[t][item[t]]
                out.append((key, used[t]))
                used[t] += 1
                if used[t] == count:
                    item[t], used[t] = item[t] + 1, 0
            else:
                out.append(t)
        return out

    def _pick_slot(self, ids: list) -> tuple[int, int]:
        """A free slot, preferring the one holding the longest run of whole prefill chunks of this prompt."""
        best, best_len = self.free_slots[0], 0
        for slot in self.free_slots:
            held = self.slot_tokens.get(slot, [])
            common = 0
            for a, b in zip(held, ids):
                if a != b:
                    break
                common += 1
            common = min(common, len(ids) - 1)  # the last prompt token is always run, for its logits
            whole = common // self.prefill_chunk * self.prefill_chunk
            if whole > best_len:
                best, best_len = slot, whole
        self.free_slots.remove(best)
        self.slot_tokens.pop(best, None)
        return best, best_len

    def _release(self, req: Request, keep: bool = True) -> None:
        req.encoding = None  # drops a half-done vision encode and its intermediate tensors
        req.processors = ()  # and the grammar state: an aborted or finished request's matcher goes with it
        if keep:
            self.slot_tokens[req.slot] = req.identity[: req.done]
        self.free_slots.append(req.slot)
        req.slot = -1

    def _prompt_work(self, req: Request) -> Output | None:
        model = self.model
        if req.encoding is None and req.vision_pending:
            kind, pixels, grid, key = req.vision_pending.pop(0)
            feats = self.vision_cache.get(key)
            if feats is not None:
                req.features.setdefault(kind, []).append(feats)
                return None
            req.encoding = (kind, key, model.encode_vision_pieces(pixels, grid, self.vision_piece_flops))
        if req.encoding is not None:  # one piece of the encode
            kind, key, pieces = req.encoding
            self.vision_pieces += 1
            try:
                next(pieces)
                return None
            except StopIteration as done:
                feats = done.value
            req.encoding = None
            self.vision_cache.put(key, feats)
            req.features.setdefault(kind, []).append(feats)
            return None
        if req.embeds is None:
            p = req.prompt
            image = p.image_features if p.image_features is not None else _cat(req.features.get("image"))
            video = p.video_features if p.video_features is not None else _cat(req.features.get("video"))
            req.embeds = model.embed(p.input_ids, image, video)
            req.positions, deltas = model.positions(p.input_ids, p.attention_mask, p.image_grid_thw, p.video_grid_thw)
            req.next_position = p.input_ids.shape[1] + int(deltas[0])
            req.features = {}
        length, end = req.embeds.shape[1], self._chunk_end(req)
        hidden = model.model(req.embeds[:, req.done:end], req.positions[:, :, req.done:end].to(model.device),
                             None, self.pool.view(req.slot), req.done)
        req.done = end
        if end < length:
            return None
        req.embeds = req.positions = None
        return self._emit(req, model.logits(hidden[:, -1]).float())

    def _chunk_end(self, req: Request) -> int:
        """Where req's next prefill chunk ends: chunk boundaries are fixed multiples of prefill_chunk."""
        return min(req.ids.shape[0], (req.done // self.prefill_chunk + 1) * self.prefill_chunk)

    def _decode(self) -> list[Output]:
        model = self.model
        reqs = self.running
        tokens = torch.tensor([[r.generated[-1]] for r in reqs], device=model.device)
        lengths = [r.done + len(r.generated) - 1 for r in reqs]
        pos = torch.tensor([r.next_position + len(r.generated) - 1 for r in reqs], device=model.device)
        positions = pos.view(1, -1, 1).expand(3, -1, -1)
        attend = SlotAttend(self.pool, [r.slot for r in reqs], lengths)
        hidden = model.model(model.model.embed_tokens(tokens).to(model.dtype), positions, attend=attend)
        logits = model.logits(hidden[:, -1]).float()
        outputs, still = [], []
        for i, req in enumerate(reqs):
            out = self._emit(req, logits[i:i + 1])
            outputs.append(out)
            if out.finish_reason is None:
                still.append(req)
            else:
                self._release(req)
        self.running = still
        return outputs

    def _emit(self, req: Request, logits: torch.Tensor) -> Output:
        seen = torch.cat([req.prompt.input_ids.to(logits.device),
                          torch.tensor([req.generated], dtype=torch.long, device=logits.device)], dim=1)
        scores = logits
        for processor in req.processors:
            scores = processor(scores)
        token = int(req.choose(scores, seen)[0])
        for processor in req.processors:
            processor.accept(token)
        req.generated.append(token)
        self.generated_tokens += 1
        logprob, top = None, ()
        if req.logprobs is not None:
            lp = torch.log_softmax(logits[0], dim=-1)
            logprob = float(lp[token])
            if req.logprobs:
                values, ids = lp.topk(req.logprobs)
                top = tuple(zip(ids.tolist(), values.tolist()))
        reason = None
        if token in req.stop_token_ids:
            reason = "stop"
        elif len(req.generated) >= req.max_new_tokens or req.done + len(req.generated) >= self.max_model_len:
            reason = "length"
        return Output(req.request_id, token, logprob, top, reason,
                      cached_tokens=req.reused if len(req.generated) == 1 else 0)


def _split_items(kind: str, pixels: torch.Tensor, grids: torch.Tensor) -> list:
    items, start = [], 0
    for grid in grids:
        n = int(grid.prod())
        items.append((kind, pixels[start:start + n], grid[None]))
        start += n
    return items


def _cat(parts: list | None) -> torch.Tensor | None:
    return None if not parts else torch.cat(parts)
