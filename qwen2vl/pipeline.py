"""The Python API: load a checkpoint, then chat, stream, generate in batches, and ground, with a chat session
that reuses an unchanged prefix's keys/values and encodes each image once.

    pipe = qwen2vl.load("Qwen/Qwen2-VL-2B-Instruct")
    pipe.chat([{"role": "user", "content": [{"type": "image", "image": "cat.jpg"},
                                            {"type": "text", "text": "What is this?"}]}])

Sampling keywords use transformers' names (max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
plus stop); defaults come from the checkpoint's generation_config.json, as in `generate`, and a keyword replaces
only its own value. The official files keep top_k=1 and top_p=0.001, so `temperature=0.7` alone still decodes
greedily, as in transformers; to sample, also lift them (`top_k=0` turns top-k off, `top_p=1.0` top-p):
`pipe.stream(conversation, temperature=0.7, top_p=0.9, top_k=0, seed=1)`. `Pipeline.greedy_reasons` says which
of the checkpoint's values keep a request greedy.

On CPU with `progress` on, each image or video says before its encode what it costs (tokens, and a time estimated
from this machine's measured rate, `qwen2vl.cost`), and a long encode shows a bar over the vision blocks.
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .cost import item_cost
from .generate.decode import Prompt, generate_steps
from .generate.sampling import SamplingParams, chooser
from .generate.stopping import StopMatcher
from .grounding import Box, parse_boxes
from .hub import resolve_model_path
from .model import KVCache, Qwen2VL
from .processing import IncrementalDetokenizer, Processor
from .processing.media import load_image
from .processing.processor import Budget
from .weights import load_model


@dataclass
class Timings:
    load_s: float = 0.0
    preprocess_s: float = 0.0
    vision_s: float = 0.0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    prompt_tokens: int = 0
    reused_tokens: int = 0
    new_tokens: int = 0
    item_tokens: list = field(default_factory=list)

    def report(self) -> str:
        rate = self.new_tokens / self.decode_s if self.decode_s else 0.0
        lines = [f"load {self.load_s:.2f}s | preprocess {self.preprocess_s:.2f}s | vision encode {self.vision_s:.2f}s | "
                 f"prefill {self.prefill_s:.2f}s ({self.prompt_tokens - self.reused_tokens} of {self.prompt_tokens} "
                 f"prompt tokens run) | decode {self.new_tokens} tokens in {self.decode_s:.2f}s = {rate:.1f} tok/s"]
        for kind, tokens in self.item_tokens:
            lines.append(f"  {kind}: {tokens} tokens")
        return "\n".join(lines)


# top_p at most this keeps only the likeliest token unless its probability is below top_p: greedy in practice
NEARLY_GREEDY_TOP_P = 0.01


class Pipeline:
    bar_after_s = 10.0  # vision encodes estimated to take longer show a progress bar (with `progress` on)

    def __init__(self, model: Qwen2VL, processor: Processor, generation_config: dict | None = None,
                 progress: bool = False) -> None:
        self.model, self.processor = model, processor
        self.generation_config = generation_config or {}
        self.progress = progress
        self.last_timings = Timings()
        self._vision: dict[str, torch.Tensor] = {}  # content hash -> features (chat sessions)

    # -- parameters --------------------------------------------------------------------------------------------
    def params(self, **sampling) -> SamplingParams:
        return SamplingParams.from_generation_config(self.generation_config, **sampling)

    def greedy_reasons(self, **sampling) -> list[str]:
        """The generation_config values that keep a request greedy although its keywords ask to sample (give a
        temperature above 0, top_p, top_k or seed): top_k=1 (one candidate per step) and a top_p of at most 0.01
        (only the likeliest token, in practice), each unless the keywords set it. Empty when the request samples."""
        given = {k for k, v in sampling.items() if v is not None}
        p = self.params(**sampling)
        if p.greedy or not given & {"temperature", "top_p", "top_k", "seed"}:
            return []
        reasons = []
        if p.top_k == 1 and "top_k" not in given:
            reasons.append("top_k=1")
        if p.top_p <= NEARLY_GREEDY_TOP_P and "top_p" not in given:
            reasons.append(f"top_p={p.top_p:g}")
        return reasons

    # -- one or many conversations -------------------------------------------------------------------------------
    def budget(self, params: SamplingParams) -> Budget:
        """The prompt's share of the context when the answer may take params.max_new_tokens."""
        return Budget(prompt_tokens=max(1, self.processor.max_context - params.max_new_tokens))

    def prepare(self, conversations, params: SamplingParams, fit: bool = False) -> dict:
        """The model inputs of `conversations`; with `fit`, videos that would leave no room for the answer are
        sampled smaller, then sparser, until they do (`Processor._fit`). Off by default: the reference's numbers."""
        return self.processor(conversations, budget=self.budget(params) if fit else None, fit=fit,
                              progress=self.progress)

    def _steps(self, conversations, params: SamplingParams, cache=None, reuse=0, batch=None, fit: bool = False):
        t0 = time.perf_counter()
        batch = batch if batch is not None else self.prepare(conversations, params, fit)
        timings = Timings(preprocess_s=time.perf_counter() - t0, prompt_tokens=int(batch["attention_mask"].sum()))
        for kind in ("image", "video"):
            grid = batch.get(f"{kind}_grid_thw")
            if grid is not None:
                timings.item_tokens += [(kind, int(g.prod()) // 4) for g in grid]
        t0 = time.perf_counter()
        prompt = self._with_cached_vision(Prompt.from_batch(batch))
        timings.vision_s = time.perf_counter() - t0
        timings.reused_tokens = reuse
        self.last_timings = timings
        steps = generate_steps(self.model, prompt, chooser(params, self.model.device), params.max_new_tokens,
                               params.stop_token_ids, self.processor.pad_id, cache=cache, reuse=reuse)
        t0 = time.perf_counter()
        for i, step in enumerate(steps):
            if i == 0:
                timings.prefill_s = time.perf_counter() - t0
                t0 = time.perf_counter()
            timings.new_tokens += 1
            yield step
            timings.decode_s = time.perf_counter() - t0

    def _with_cached_vision(self, prompt: Prompt) -> Prompt:
        """Encode each image/video once per pipeline (keyed by its pixels), so chat turns do not re-encode."""
        fields = {}
        for kind, pix, grid in (("image", prompt.pixel_values, prompt.image_grid_thw),
                                ("video", prompt.pixel_values_videos, prompt.video_grid_thw)):
            if pix is None:
                continue
            parts, start = [], 0
            for g in grid:
                n = int(g.prod())
                item = pix[start:start + n]
                key = hashlib.blake2b(item.numpy().tobytes() + str(g.tolist()).encode(), digest_size=16).hexdigest()
                if key not in self._vision:
                    self._vision[key] = self._encode(item, g, f"{kind} {len(parts)}")
                parts.append(self._vision[key])
                start += n
            fields[f"{kind}_features"] = torch.cat(parts)
        return Prompt(**{**prompt.__dict__, **fields})

    def _encode(self, pixels: torch.Tensor, grid: torch.Tensor, what: str) -> torch.Tensor:
        if not (self.progress and self.model.device.type == "cpu"):
            return self.model.encode_vision(pixels, grid[None])
        cost = item_cost(self.model.config, tuple(grid.tolist()), self.model.device, self.model.dtype)
        print(f"{what}: {cost.describe()} on this CPU (estimated at the {cost.rate / 1e9:.3g} GFLOP/s of a matrix "
              f"product timed here{'; a lower max_pixels costs less' if cost.seconds > 60 else ''})",
              file=sys.stderr, flush=True)
        with self._block_bar(what) if cost.seconds >= self.bar_after_s else nullcontext():
            return self.model.encode_vision(pixels, grid[None])

    @contextmanager
    def _block_bar(self, what: str):
        """A bar that advances as each vision block finishes (forward hooks; the model is not changed)."""
        from tqdm.auto import tqdm

        blocks = self.model.visual.blocks
        bar = tqdm(total=len(blocks), desc=f"encoding {what}", unit="block", file=sys.stderr, leave=False)

        def advance(*_) -> None:  # a forward hook that returned a value would replace the block's output
            bar.update()

        hooks = [block.register_forward_hook(advance) for block in blocks]
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            bar.close()

    def stream(self, conversation, skip_special_tokens: bool = True, fit: bool = False,
               **sampling) -> Iterator[str]:
        """Text pieces of the answer as they are decoded (never half a character; stop strings cut). `fit`: see
        `prepare`."""
        params = self.params(**sampling)
        yield from self._stream_steps(self._steps([conversation], params, fit=fit), params, skip_special_tokens)

    def _stream_steps(self, steps, params: SamplingParams, skip_special_tokens: bool) -> Iterator[str]:
        detok = IncrementalDetokenizer(self.processor.tokenizer, skip_special_tokens)
        stop = StopMatcher(params.stop)
        for step in steps:
            token = int(step.tokens[0])
            if token in params.stop_token_ids:
                break
            piece = stop.feed(detok.push(token))
            if piece:
                yield piece
            if stop.stopped:
                return
        tail = stop.feed(detok.flush()) + stop.flush()
        if tail:
            yield tail

    def chat(self, conversation, **sampling) -> str:
        return "".join(self.stream(conversation, **sampling))

    def generate(self, conversations: list, fit: bool = False, **sampling) -> list[str]:
        """Answers for a batch of conversations (left-padded, decoded together; each equals its own run)."""
        params = self.params(**sampling)
        ids: list[list[int]] = [[] for _ in conversations]
        for step in self._steps(conversations, params, fit=fit):
            for row, token in enumerate(step.tokens.tolist()):
                if not ids[row] or ids[row][-1] not in params.stop_token_ids:
                    ids[row].append(token)
        texts = []
        for row in ids:
            row = [t for t in row if t not in params.stop_token_ids]
            text = self.processor.tokenizer.decode(row, skip_special_tokens=True)
            cut = min((text.find(s) for s in params.stop if text.find(s) >= 0), default=-1)
            texts.append(text if cut < 0 else text[:cut])
        return texts

    def ground(self, conversation, **sampling) -> tuple[str, list[Box]]:
        """The answer with grounding markers kept, and its boxes in pixels of the last image of the conversation."""
        text = "".join(self.stream(conversation, skip_special_tokens=False, **sampling))
        images = [p for m in conversation if isinstance(m.get("content"), list) for p in m["content"]
                  if isinstance(p, dict) and (p.get("type") in ("image", "image_url") or "image" in p)]
        if not images:
            return text, []
        from .processing.chat import normalize_part

        source = normalize_part(images[-1], "image")["image"]
        size = load_image(source, self.processor.policy).size
        return text, parse_boxes(text, size)


class Reply:
    """The answer to one `ChatSession.send`: iterate it for text pieces as they are decoded, or read `.text`
    (waits for the whole answer). The answer joins the session's history when it is complete."""

    def __init__(self, pieces: Iterator[str]) -> None:
        self._pieces, self._parts = pieces, []

    def __iter__(self) -> Iterator[str]:
        for piece in self._pieces:
            self._parts.append(piece)
            yield piece

    @property
    def text(self) -> str:
        for _ in self:
            pass
        return "".join(self._parts)

    def __str__(self) -> str:
        return self.text


class ChatSession:
    """A multi-turn conversation that keeps its KV cache: an unchanged history is not run again.

    `send` records the user's turn at once (a bad image or video raises there, and the turn is withdrawn) and
    returns a `Reply`; the answer is decoded as the reply is read, and at the latest when the next turn is sent."""

    def __init__(self, pipe: Pipeline, max_len: int = 8192, system: str | None = None) -> None:
        self.pipe, self.max_len, self.system = pipe, max_len, system
        self.reset()

    def reset(self) -> None:
        """Forget the conversation (the system prompt stays)."""
        self.messages: list[dict] = [{"role": "system", "content": self.system}] if self.system else []
        self.cache: KVCache | None = None
        self.cached_ids: list[int] = []  # tokens whose keys/values the cache holds (history incl. answers)
        self._reply: Reply | None = None

    def send(self, content, fit: bool = False, **sampling) -> Reply:
        if self._reply is not None:
            _ = self._reply.text  # finish the previous answer, so the history alternates user, assistant
        self.messages.append({"role": "user", "content": content})
        try:
            params = self.pipe.params(**sampling)
            batch = self.pipe.prepare(self.messages, params, fit)
        except BaseException:
            self.messages.pop()
            raise
        ids = batch["input_ids"][0].tolist()
        if self.cache is None or len(ids) + params.max_new_tokens > self.cache.max_len:
            self.cache = KVCache(self.pipe.model.config.text, 1, max(self.max_len, len(ids) + params.max_new_tokens),
                                 self.pipe.model.dtype, self.pipe.model.device)
            self.cached_ids = []
        reuse = 0
        for a, b in zip(self.cached_ids, ids[:-1]):
            if a != b:
                break
            reuse += 1
        self._reply = Reply(self._answer(batch, ids, params, reuse))
        return self._reply

    def _answer(self, batch: dict, ids: list[int], params: SamplingParams, reuse: int) -> Iterator[str]:
        messages, answer_ids = self.messages, []

        def steps():
            for step in self.pipe._steps(None, params, cache=self.cache, reuse=reuse, batch=batch):
                answer_ids.append(int(step.tokens[0]))
                yield step

        pieces = []
        for piece in self.pipe._stream_steps(steps(), params, True):
            pieces.append(piece)
            yield piece
        if messages is not self.messages:  # reset while this answer was unread
            return
        # the cache now holds the prompt and the answer tokens that were fed back (all but the last)
        self.cached_ids = ids + answer_ids[:-1]
        self.messages.append({"role": "assistant", "content": "".join(pieces)})
        self._reply = None


def check_device(device: str | torch.device) -> torch.device:
    """`device` as a torch.device, or a ValueError that says why this torch cannot use it and what to pass instead."""
    try:
        d = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {str(device)!r}: use cpu, cuda or cuda:N") from None
    if d.type == "cuda":
        if torch.version.cuda is None and torch.version.hip is None:
            raise ValueError(f"device {str(device)!r}: this torch ({torch.__version__}) is a build without CUDA; "
                             "install a CUDA build of torch (pytorch.org), or use cpu")
        if not torch.cuda.is_available():
            raise ValueError(f"device {str(device)!r}: torch sees no CUDA GPU here (no driver, or "
                             "CUDA_VISIBLE_DEVICES hides them); use cpu")
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(f"device {str(device)!r}: there are only {torch.cuda.device_count()} CUDA GPUs "
                             f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})")
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(f"device {str(device)!r}: this torch cannot use Apple's MPS here (it needs macOS on "
                             "Apple silicon and a torch built with MPS); use cpu")
    elif d.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported: use cpu, cuda or cuda:N")
    return d


def load(path_or_id: str, dtype: torch.dtype | None = None, device: str = "cpu", quantize: str | None = None,
         progress: bool = True, cpu_matmul: str = "auto", tensor_parallel_size: int = 1,
         **processor_overrides) -> Pipeline:
    """Model, processor and generation defaults from a checkpoint directory or hub id. With `progress`: bars for
    the download and the weights, and on CPU each item's cost said before its vision encode.

    `tensor_parallel_size` N > 1: this process is one rank of an initialised torch.distributed process group of N
    (torchrun, or `qwen2vl run --tensor-parallel-size N`), and loads its share of the decoder (qwen2vl.parallel);
    every rank then calls the same methods with the same arguments."""
    t0 = time.perf_counter()
    check_device(device)
    directory = resolve_model_path(path_or_id)
    if tensor_parallel_size > 1:
        from .parallel import load_rank_model, require_group

        require_group(tensor_parallel_size)
        model = load_rank_model(directory, dtype=dtype, device=device, quantize=quantize, progress=progress,
                                cpu_matmul=cpu_matmul)
    else:
        model = load_model(directory, dtype=dtype, device=device, quantize=quantize, progress=progress,
                           cpu_matmul=cpu_matmul)
    processor = Processor.from_pretrained(directory, **processor_overrides)
    gen_path = Path(directory) / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    pipe = Pipeline(model, processor, gen, progress=progress)
    pipe.last_timings.load_s = time.perf_counter() - t0
    pipe.load_s = pipe.last_timings.load_s
    return pipe
