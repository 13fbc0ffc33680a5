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
of the checkpoint's values keep a request greedy. OpenAI's presence_penalty, frequency_penalty and logit_bias
({token id: bias}) are sampling keywords too.

`chat` and `stream` take `response_format` as the OpenAI API does ({"type": "json_object"}, {"type": "json_schema",
"json_schema": {"schema": ...}}) or a `Constraint` (`generate.structured`: a JSON schema, regex, choice, grammar):
the output then matches it, enforced token by token while decoding.

On CPU with `progress` on, each image or video says before its encode what it costs (tokens, and a time estimated
from this machine's measured rate, `qwen2vl.cost`), and a long encode shows a bar over the vision blocks.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .cost import item_cost
from .generate.decode import Prompt, generate_steps
from .generate.sampling import SamplingParams, chooser
from .generate.stopping import StopMatcher
from .generate.structured import Constraint, grammars_for, with_processors
from .generate.vision import VisionCache, common_prefix, prefix_key, vision_items
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
        run = self.prompt_tokens - self.reused_tokens
        lines = [
            f"load {self.load_s:.2f}s | preprocess {self.preprocess_s:.2f}s | "
            f"vision encode {self.vision_s:.2f}s | prefill {self.prefill_s:.2f}s ({run} of {self.prompt_tokens} "
            f"prompt tokens run) | decode {self.new_tokens} tokens in {self.decode_s:.2f}s = {rate:.1f} tok/s"
        ]
        for kind, tokens in self.item_tokens:
            lines.append(f"  {kind}: {tokens} tokens")
        return "\n".join(lines)


# top_p at most this keeps only the likeliest token unless its probability is below top_p: greedy in practice
NEARLY_GREEDY_TOP_P = 0.01
VISION_CACHE_BYTES = 2**30  # vision features a pipeline keeps for its chat sessions (least recently used go first)


class Pipeline:
    bar_after_s = 10.0  # vision encodes estimated to take longer show a progress bar (with `progress` on)

    def __init__(
        self, model: Qwen2VL, processor: Processor, generation_config: dict | None = None, progress: bool = False
    ) -> None:
        self.model, self.processor = model, processor
        self.generation_config = generation_config or {}
        self.progress = progress
        self.last_timings = Timings()
        self.vision_cache = VisionCache(VISION_CACHE_BYTES)  # features by content hash, for chat sessions

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
        return self.processor(
            conversations, budget=self.budget(params) if fit else None, fit=fit, progress=self.progress
        )

    def constraint_processors(self, response_format) -> tuple:
        """The logits processors that hold one output to `response_format` (a Constraint or an OpenAI
        response_format object); () for None. An uncompilable one raises GrammarError."""
        if response_format is None:
            return ()
        c = (
            response_format
            if isinstance(response_format, Constraint)
            else Constraint.from_response_format(response_format)
        )
        if c is None:
            return ()
        stops = tuple(self.params().stop_token_ids)
        grammars = grammars_for(self.processor.tokenizer, self.model.config.text.vocab_size, stops)
        return (grammars.processor(c),)

    def _timed_steps(
        self,
        conversations,
        params: SamplingParams,
        cache=None,
        reuse=0,
        batch=None,
        fit: bool = False,
        processors: tuple = (),
    ):
        """`generate_steps` over the prepared conversations (or `batch`), recording `last_timings` as it goes."""
        t0 = time.perf_counter()
        batch = batch if batch is not None else self.prepare(conversations, params, fit)
        timings = Timings(preprocess_s=time.perf_counter() - t0, prompt_tokens=int(batch["attention_mask"].sum()))
        for kind in ("image", "video"):
            grid = batch.get(f"{kind}_grid_thw")
            if grid is not None:
                merge = self.model.config.vision.spatial_merge_size**2
                timings.item_tokens += [(kind, int(g.prod()) // merge) for g in grid]
        t0 = time.perf_counter()
        prompt = self._with_cached_vision(Prompt.from_batch(batch))
        timings.vision_s = time.perf_counter() - t0
        timings.reused_tokens = reuse
        self.last_timings = timings
        choose = with_processors(chooser(params, self.model.device), processors)
        steps = generate_steps(
            self.model,
            prompt,
            choose,
            params.max_new_tokens,
            params.stop_token_ids,
            self.processor.pad_id,
            cache=cache,
            reuse=reuse,
        )
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
        parts: dict[str, list[torch.Tensor]] = {}
        for kind, pixels, grid in vision_items(prompt):
            key = VisionCache.key(pixels, grid)
            features = self.vision_cache.get(key)
            if features is None:
                features = self._encode(pixels, grid[0], f"{kind} {len(parts.get(kind, []))}")
                self.vision_cache.put(key, features)
            parts.setdefault(kind, []).append(features)
        fields = {f"{kind}_features": torch.cat(p) for kind, p in parts.items()}
        return Prompt(**{**prompt.__dict__, **fields})

    def _encode(self, pixels: torch.Tensor, grid: torch.Tensor, what: str) -> torch.Tensor:
        if not (self.progress and self.model.device.type == "cpu"):
            return self.model.encode_vision(pixels, grid[None])
        cost = item_cost(self.model.config, tuple(grid.tolist()), self.model.device, self.model.dtype)
        print(
            f"{what}: {cost.describe()} on this CPU (estimated at the {cost.rate / 1e9:.3g} GFLOP/s of a matrix "
            f"product timed here{'; a lower max_pixels costs less' if cost.seconds > 60 else ''})",
            file=sys.stderr,
            flush=True,
        )
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

    def stream(
        self, conversation, skip_special_tokens: bool = True, fit: bool = False, response_format=None, **sampling
    ) -> Iterator[str]:
        """Text pieces of the answer as they are decoded (never half a character; stop strings cut). `fit`: see
        `prepare`; `response_format`: see the module's docstring."""
        params = self.params(**sampling)
        processors = self.constraint_processors(response_format)  # a bad schema fails before any model work
        steps = self._timed_steps([conversation], params, fit=fit, processors=processors)
        yield from self._stream_steps(steps, params, skip_special_tokens)

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

    def generate(
        self, conversations: list, fit: bool = False, skip_special_tokens: bool = True, **sampling
    ) -> list[str]:
        """Answers for a batch of conversations (left-padded, decoded together; each equals its own run).
        `skip_special_tokens=False` keeps the grounding markers (`parse_boxes` reads them)."""
        params = self.params(**sampling)
        ids: list[list[int]] = [[] for _ in conversations]
        for step in self._timed_steps(conversations, params, fit=fit):
            for row, token in enumerate(step.tokens.tolist()):
                if not ids[row] or ids[row][-1] not in params.stop_token_ids:
                    ids[row].append(token)
        texts = []
        for row in ids:
            row = [t for t in row if t not in params.stop_token_ids]
            stop = StopMatcher(params.stop)  # the whole answer at once: cut before the earliest stop string
            text = self.processor.tokenizer.decode(row, skip_special_tokens=skip_special_tokens)
            texts.append(stop.feed(text) + stop.flush())
        return texts

    def ground(self, conversation, **sampling) -> tuple[str, list[Box]]:
        """The answer with grounding markers kept, and its boxes in pixels of the last image of the conversation."""
        text = "".join(self.stream(conversation, skip_special_tokens=False, **sampling))
        image = self.last_image(conversation)
        return text, ([] if image is None else parse_boxes(text, image.size))

    def last_image(self, conversation) -> Image.Image | None:
        """The conversation's last image, loaded under the processor's media policy; None when it has none."""
        images = [
            p
            for m in conversation
            if isinstance(m.get("content"), list)
            for p in m["content"]
            if isinstance(p, dict) and (p.get("type") in ("image", "image_url") or "image" in p)
        ]
        if not images:
            return None
        from .processing.chat import normalize_part

        return load_image(normalize_part(images[-1], "image")["image"], self.processor.policy)


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
        self.cached_ids: list = []  # prefix_key of what the cache holds (history incl. answers)
        self._reply: Reply | None = None

    def send(self, content, fit: bool = False, response_format=None, **sampling) -> Reply:
        if self._reply is not None:
            _ = self._reply.text  # finish the previous answer, so the history alternates user, assistant
        self.messages.append({"role": "user", "content": content})
        try:
            params = self.pipe.params(**sampling)
            processors = self.pipe.constraint_processors(response_format)
            batch = self.pipe.prepare(self.messages, params, fit)
        except BaseException:
            self.messages.pop()
            raise
        prompt = Prompt.from_batch(batch)
        ids = prefix_key(
            prompt,
            [(kind, grid, VisionCache.key(pixels, grid)) for kind, pixels, grid in vision_items(prompt)],
            self.pipe.model.config,
        )
        if self.cache is None or len(ids) + params.max_new_tokens > self.cache.max_len:
            self.cache = KVCache(
                self.pipe.model.config.text,
                1,
                max(self.max_len, len(ids) + params.max_new_tokens),
                self.pipe.model.dtype,
                self.pipe.model.device,
            )
            self.cached_ids = []
        reuse = common_prefix(self.cached_ids, ids[:-1])
        self._reply = Reply(self._answer(batch, ids, params, reuse, processors))
        return self._reply

    def _answer(
        self, batch: dict, ids: list, params: SamplingParams, reuse: int, processors: tuple = ()
    ) -> Iterator[str]:
        messages, answer_ids = self.messages, []

        def steps():
            for step in self.pipe._timed_steps(
                None, params, cache=self.cache, reuse=reuse, batch=batch, processors=processors
            ):
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
            raise ValueError(
                f"device {str(device)!r}: this torch ({torch.__version__}) is a build without CUDA; "
                "install a CUDA build of torch (pytorch.org), or use cpu"
            )
        if not torch.cuda.is_available():
            raise ValueError(
                f"device {str(device)!r}: torch sees no CUDA GPU here (no driver, or "
                "CUDA_VISIBLE_DEVICES hides them); use cpu"
            )
        if d.index is not None and d.index >= torch.cuda.device_count():
            raise ValueError(
                f"device {str(device)!r}: there are only {torch.cuda.device_count()} CUDA GPUs "
                f"(cuda:0 to cuda:{torch.cuda.device_count() - 1})"
            )
    elif d.type == "mps":
        if not torch.backends.mps.is_available():
            raise ValueError(
                f"device {str(device)!r}: this torch cannot use Apple's MPS here (it needs macOS on "
                "Apple silicon and a torch built with MPS); use cpu"
            )
    elif d.type != "cpu":
        raise ValueError(f"device {str(device)!r} is not supported: use cpu, cuda or cuda:N")
    return d


def load(
    path_or_id: str,
    dtype: torch.dtype | None = None,
    device: str = "cpu",
    quantize: str | None = None,
    progress: bool = True,
    cpu_matmul: str = "auto",
    adapter: str | None = None,
    tensor_parallel_size: int = 1,
    shard_vision: bool = False,
    adapters: list[str] | None = None,
    mmap: bool = True,
    **processor_overrides,
) -> Pipeline:
    """Model, processor and generation defaults from a checkpoint directory or hub id. With `progress`: bars for
    the download and the weights, and on CPU each item's cost said before its vision encode. `adapter`: a LoRA
    adapter directory (PEFT's format) applied on top of the weights; `adapters`: several beside them, each call
    choosing one (qwen2vl.lora.adapters_for_rows; the server's --lora-modules). `mmap`: as `load_model`'s.

    `tensor_parallel_size` N > 1: this process is one rank of an initialised torch.distributed process group of N
    (torchrun, or `qwen2vl run --tensor-parallel-size N`), and loads its share of the decoder (qwen2vl.parallel);
    every rank then calls the same methods with the same arguments. `shard_vision`: split the vision tower's
    heads and MLP over the ranks too (by default each rank holds all of it)."""
    t0 = time.perf_counter()
    check_device(device)
    directory = resolve_model_path(path_or_id)
    options = dict(
        dtype=dtype,
        device=device,
        quantize=quantize,
        progress=progress,
        cpu_matmul=cpu_matmul,
        adapters=adapters,
        mmap=mmap,
    )
    if tensor_parallel_size > 1:
        from .parallel import load_rank_model, require_group

        require_group(tensor_parallel_size)
        model = load_rank_model(directory, **options, adapter=adapter, shard_vision=shard_vision)
    else:
        if shard_vision:
            raise ValueError(
                "shard_vision splits the vision tower over tensor-parallel ranks: it needs tensor_parallel_size > 1"
            )
        model = load_model(directory, **options, adapter=adapter)
    processor = Processor.from_pretrained(directory, **processor_overrides)
    gen_path = Path(directory) / "generation_config.json"
    gen = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    pipe = Pipeline(model, processor, gen, progress=progress)
    pipe.last_timings.load_s = time.perf_counter() - t0
    pipe.load_s = pipe.last_timings.load_s
    return pipe
