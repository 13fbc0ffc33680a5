"""Conversations -> model inputs, as qwen-vl-utils' `process_vision_info` + transformers' `Qwen2VLProcessor`.

Every item is resized twice, as the reference does (`sizing`): first by qwen-vl-utils' rules (its own defaults or
the item's `min_pixels`/`max_pixels`/`resized_*`; for videos the frames and the per-frame budget), then by the
transformers processor's bounds from the checkpoint (a no-op for sizes within them). Pixels are normalised and laid
out in merge-window rows, and each `<|image_pad|>` / `<|video_pad|>` in the rendered template is expanded to
t*h*w/4 copies before tokenising. Batches are left-padded with <|endoftext|>. The returned mapping has the
transformers keys and layouts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .chat import normalize_messages, render
from .errors import InputError
from .image import image_tensor, image_to_patches, normalize_rows_, patchify, resize_image, resize_tensor, to_rgb
from .media import Fetched, MediaPolicy, describe, fetch, load_image, open_image, read_bytes
from .sizing import MERGE_SIZE, VIDEO_MIN_PIXELS, ProcessorBounds, image_sizes, processor_size, tokens
from .tokenizer import Tokenizer
from .video import VideoPlan, load_video, plan_video, replan_video

IMAGE_PAD, VIDEO_PAD, PAD = "<|image_pad|>", "<|video_pad|>", "<|endoftext|>"
FIT_FIELDS = ("total_pixels", "fps", "nframes")  # what `Processor._fit` may set on a video item


@dataclass(frozen=True)
class ItemPlan:
    kind: str
    source: str
    source_size: tuple[int, int]  # (width, height)
    resized_size: tuple[int, int]  # (width, height)
    tokens: int
    frame_indices: list[int] = field(default_factory=list)
    timestamps: list[float] = field(default_factory=list)
    source_pixels: int = 0  # pixels decoded before resizing (every kept frame of a video)
    fitted: dict = field(default_factory=dict)  # sampling fields `fit` chose for this item (total_pixels, fps)


@dataclass(frozen=True)
class Plan:
    items: list[ItemPlan]
    prompt_tokens: int
    context: int

    @property
    def source_pixels(self) -> int:
        return sum(item.source_pixels for item in self.items)


@dataclass(frozen=True)
class Budget:
    """What preparing one conversation may cost, checked against its plan before any picture is decoded."""

    prompt_tokens: int | None = None  # None: the model's context
    source_pixels: int | None = None  # pixels decoded before resizing, all items together; None: no limit


class OverBudget(InputError):
    """A conversation's plan exceeds its budget; raised before decoding, with the numbers."""

    def __init__(
        self,
        message: str,
        item: str | None = None,
        tokens: int = 0,
        limit: int = 0,
        at_least: bool = False,
        resource: str = "tokens",
    ) -> None:
        super().__init__(message, item)
        self.tokens, self.limit, self.at_least = tokens, limit, at_least  # at_least: tokens is a lower bound
        self.resource = resource  # "tokens" (the context) or "pixels" (source pixels); tokens/limit count it


class Processor:
    def __init__(
        self,
        tokenizer: Tokenizer,
        chat_template: str,
        bounds: ProcessorBounds | None = None,
        policy: MediaPolicy | None = None,
        max_context: int = 32768,
        video_defaults: dict | None = None,
    ) -> None:
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.bounds = bounds or ProcessorBounds()
        self.policy = policy or MediaPolicy()
        self.max_context = max_context
        self.video_defaults = dict(video_defaults or {})
        self.pad_id = tokenizer.token_id(PAD)
        self.image_pad_id, self.video_pad_id = tokenizer.token_id(IMAGE_PAD), tokenizer.token_id(VIDEO_PAD)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        size: dict | None = None,
        overrides_reach_videos: bool = False,
        **overrides,
    ) -> Processor:
        """Read tokenizer.json, the chat template, preprocessor_config.json (and video_preprocessor_config.json)
        from a checkpoint directory or hub id.

        `min_pixels`, `max_pixels` and `size` are `AutoProcessor.from_pretrained`'s keywords and act as there: they
        bound the processor's resize (step 2), for images only unless `overrides_reach_videos`. Other keywords
        override policy, max_context, video_defaults and chat_template.
        """
        path = Path(path)
        if not path.is_dir():
            from ..hub import resolve_model_path

            path = resolve_model_path(str(path))
        pre_path, video_path = path / "preprocessor_config.json", path / "video_preprocessor_config.json"
        # without preprocessor_config.json (which transformers cannot load), the official checkpoints' bounds
        pre = _read_json(pre_path) if pre_path.exists() else {"min_pixels": 3136, "max_pixels": 12845056}
        video_pre = _read_json(video_path) if video_path.exists() else None
        tok_cfg = _read_json(path / "tokenizer_config.json", required=False)
        template = overrides.pop("chat_template", None)
        if template is None and (path / "chat_template.json").exists():
            template = _read_json(path / "chat_template.json")["chat_template"]
        if template is None and (path / "chat_template.jinja").exists():
            template = (path / "chat_template.jinja").read_text()
        template = template or tok_cfg.get("chat_template")
        if not template:
            raise InputError(f"{path}: no chat template (chat_template.json, chat_template.jinja or tokenizer_config)")
        if not (path / "tokenizer.json").exists():
            raise InputError(f"{path}: no tokenizer.json")
        config = _read_json(path / "config.json", required=False)
        bounds = ProcessorBounds.from_configs(pre, video_pre, min_pixels, max_pixels, size, overrides_reach_videos)
        kwargs = {
            "bounds": bounds,
            "max_context": config.get(
                "max_position_embeddings",
                (config.get("text_config") or {}).get(
                    "max_position_embeddings", tok_cfg.get("model_max_length", 32768)
                ),
            ),
        }
        kwargs.update({k: v for k, v in overrides.items() if v is not None})
        return cls(Tokenizer(path / "tokenizer.json"), template, **kwargs)

    # -- text ----------------------------------------------------------------------------------------------------
    def apply_chat_template(self, conversation, add_generation_prompt: bool = True, add_vision_id: bool = False) -> str:
        return render(
            self.chat_template, normalize_messages(conversation), add_generation_prompt, add_vision_id=add_vision_id
        )

    # -- media ---------------------------------------------------------------------------------------------------
    def vision_items(self, messages: list[dict]) -> list[dict]:
        return [
            p
            for m in messages
            if isinstance(m["content"], list)
            for p in m["content"]
            if p["type"] in ("image", "video")
        ]

    def image(self, item: dict, what: str) -> tuple[torch.Tensor, list[int]]:
        image = to_rgb(load_image(item["image"], self.policy, what))
        first, final = image_sizes(item, image.height, image.width, self.bounds.image)
        pixels = image_tensor(resize_image(image, *first))  # qwen-vl-utils fetch_image: PIL bicubic
        return image_to_patches(resize_tensor(pixels, *final))  # Qwen2VLImageProcessorFast: torch uint8 bicubic

    def video(self, item: dict, what: str, progress: bool = False) -> tuple[torch.Tensor, list[int]]:
        frames, plan = load_video({**self.video_defaults, **item}, self.policy, what, progress)  # uint8, first size
        # Qwen2VLVideoProcessor gets qwen-vl-utils' frames as float 0..255 and resizes them in float
        final = processor_size(*plan.resized, self.bounds.video)
        if final != plan.resized:
            frames = resize_tensor(frames.float(), *final)
        rows, grid = patchify(frames)
        del frames  # the uint8 clip: gone before the pixels are normalised
        return normalize_rows_(rows), grid

    # -- the whole batch -----------------------------------------------------------------------------------------
    def __call__(
        self,
        conversations,
        add_generation_prompt: bool = True,
        add_vision_id: bool = False,
        budget: Budget | None = None,
        fit: bool = False,
        progress: bool = False,
    ) -> dict:
        """Each conversation is planned from cheap facts (image headers, video containers' headers) and checked
        against `budget` and the model's context before any picture is decoded: a prompt that cannot fit costs
        milliseconds. URL and data: sources are fetched once, so the plan and the decode see the same bytes.
        With `fit`, videos that do not fit are sampled smaller, then sparser, until they do (`_fit`); a prompt
        that fits is the reference's, unchanged. `progress` shows a bar on stderr while a video is decoded."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        texts, pixels, grids = [], {"image": [], "video": []}, {"image": [], "video": []}
        for c, conv in enumerate(conversations):
            messages = self._fetch(normalize_messages(conv))
            text = render(self.chat_template, messages, add_generation_prompt, add_vision_id=add_vision_id)
            budget, what = budget or Budget(), f"conversation {c}"
            self._check_tokens(self.tokenizer.min_tokens(text), budget, what, at_least=True)  # before tokenising
            if fit:
                messages, plan = self._fit(messages, text, self._token_limit(budget), what)
            else:
                plan = self._plan(messages, text)
            self._check(plan, budget, what)
            counts = {"image": 0, "video": 0}
            for item in self.vision_items(messages):
                kind = item["type"]
                what = f"conversation {c}, {kind} {counts[kind]} ({describe(item[kind])})"
                rows, grid = self.image(item, what) if kind == "image" else self.video(item, what, progress)
                pixels[kind].append(rows)
                grids[kind].append(grid)
                counts[kind] += 1
            texts.append(text)
        ids = self._expand_and_tokenize(texts, grids)
        length = max(map(len, ids))
        batch = {
            "input_ids": torch.tensor([[self.pad_id] * (length - len(r)) + r for r in ids], dtype=torch.long),
            "attention_mask": torch.tensor([[0] * (length - len(r)) + [1] * len(r) for r in ids], dtype=torch.long),
        }
        if pixels["image"]:
            batch["pixel_values"] = _cat(pixels["image"])
            batch["image_grid_thw"] = torch.tensor(grids["image"], dtype=torch.long)
        if pixels["video"]:
            batch["pixel_values_videos"] = _cat(pixels["video"])
            batch["video_grid_thw"] = torch.tensor(grids["video"], dtype=torch.long)
        return batch

    def _expand_and_tokenize(self, texts: list[str], grids: dict) -> list[list[int]]:
        queues = {IMAGE_PAD: iter(grids["image"]), VIDEO_PAD: iter(grids["video"])}
        out = []
        for c, text in enumerate(texts):
            pieces, rest = [], text
            while True:
                cut = [(rest.find(pad), pad) for pad in queues if rest.find(pad) >= 0]
                if not cut:
                    pieces.append(rest)
                    break
                at, pad = min(cut)
                grid = next(queues[pad], None)
                if grid is None:
                    raise InputError(
                        f"the prompt has more {pad} placeholders than {pad[2:7]} items", f"conversation {c}"
                    )
                pieces.append(rest[:at] + pad * (grid[0] * grid[1] * grid[2] // MERGE_SIZE**2))
                rest = rest[at + len(pad) :]
            ids = self.tokenizer.encode("".join(pieces))
            if len(ids) > self.max_context:
                raise InputError(
                    f"the prompt has {len(ids)} tokens, more than the model's context of {self.max_context}",
                    f"conversation {c}",
                )
            out.append(ids)
        for pad, q in queues.items():
            if next(q, None) is not None:
                raise InputError(f"more {pad[2:7]} items than {pad} placeholders in the chat template's output")
        return out

    # -- planning ------------------------------------------------------------------------------------------------
    def plan(
        self, conversation, add_generation_prompt: bool = True, budget: Budget | None = None, fit: bool = False
    ) -> Plan:
        """Sizes, token counts and frame choices of every item and the whole prompt, decoding no picture; with
        `fit`, after fitting the videos to `budget` (see `__call__`), each item's `fitted` naming what changed."""
        messages = self._fetch(normalize_messages(conversation))
        text = render(self.chat_template, messages, add_generation_prompt)
        if fit:
            return self._fit(messages, text, self._token_limit(budget or Budget()), "conversation")[1]
        return self._plan(messages, text)

    def _fetch(self, messages: list[dict]) -> list[dict]:
        """URL and data: sources (and frame lists of them) replaced by their bytes, fetched once under the policy."""
        out = []
        for m in messages:
            if isinstance(m["content"], list):
                parts = []
                for p in m["content"]:
                    if p["type"] in ("image", "video"):
                        source = p[p["type"]]
                        p = {**p, p["type"]: fetch(source, self.policy, f"{p['type']} ({describe(source)})")}
                    parts.append(p)
                m = {**m, "content": parts}
            out.append(m)
        return out

    def _token_limit(self, budget: Budget) -> int:
        return min(self.max_context, budget.prompt_tokens or self.max_context)

    def _check_tokens(self, tokens: int, budget: Budget, what: str, at_least: bool = False) -> None:
        limit = self._token_limit(budget)
        if tokens > limit:
            allowed = (
                f"the model's context of {limit}"
                if limit == self.max_context
                else f"the {limit} this request allows (the model's context is {self.max_context})"
            )
            raise OverBudget(
                f"the prompt has {'at least ' if at_least else ''}{tokens} tokens, more than {allowed}",
                what,
                tokens,
                limit,
                at_least,
            )

    def _check(self, plan: Plan, budget: Budget, what: str) -> None:
        self._check_tokens(plan.prompt_tokens, budget, what)
        if budget.source_pixels is not None and plan.source_pixels > budget.source_pixels:
            raise OverBudget(
                f"its images and video frames hold {plan.source_pixels} pixels before resizing, more "
                f"than the {budget.source_pixels} allowed",
                what,
                plan.source_pixels,
                budget.source_pixels,
                resource="pixels",
            )

    def _plan(self, messages: list[dict], text: str, facts: dict | None = None) -> Plan:
        """The plan of a rendered conversation; `facts` (item index -> VideoPlan) receives what each video's
        header said, so that `_fit` can try other sampling fields without reading it again."""
        items, extra = [], 0
        for i, item in enumerate(self.vision_items(messages)):
            kind, what = item["type"], f"{item['type']} {i} ({describe(item[item['type']])})"
            if kind == "image":
                image = _lazy_image(item["image"], self.policy, what)
                _, (h, w) = image_sizes(item, image.height, image.width, self.bounds.image)
                count = tokens(1, h, w)
                items.append(
                    ItemPlan(
                        "image",
                        describe(item["image"]),
                        image.size,
                        (w, h),
                        count,
                        source_pixels=image.width * image.height,
                    )
                )
            else:
                refit = facts is not None and i in facts
                if refit:  # already probed: arithmetic only
                    vp = replan_video({**self.video_defaults, **item}, facts[i], what)
                else:
                    vp = plan_video({**self.video_defaults, **item}, self.policy, what)
                    if facts is not None:
                        facts[i] = vp
                h, w = processor_size(*vp.resized, self.bounds.video)
                count = self._video_tokens(vp)
                fitted = {k: item[k] for k in FIT_FIELDS if k in item} if refit else {}
                items.append(
                    ItemPlan(
                        "video",
                        describe(item["video"]),
                        (vp.width, vp.height),
                        (w, h),
                        count,
                        vp.indices,
                        [round(t, 3) for t in vp.timestamps],
                        vp.source_pixels,
                        fitted,
                    )
                )
            extra += count - 1
        total = len(self.tokenizer.encode(text)) + extra
        return Plan(items, total, self.max_context)

    def _video_tokens(self, vp: VideoPlan) -> int:
        return tokens((len(vp.indices) + 1) // 2, *processor_size(*vp.resized, self.bounds.video))

    def _fit(self, messages: list[dict], text: str, limit: int, what: str) -> tuple[list[dict], Plan]:
        """Messages whose videos sample fewer pixels, then fewer frames, so that the prompt takes at most `limit`
        tokens: the reference's own knobs, in qwen-vl-utils' terms. First every video's `total_pixels` (the pixel
        budget spread over its frames) is lowered by one common factor; when the frames are at their smallest
        (`min_pixels` * 1.05) and it still does not fit, the frame rate (`fps`, or `nframes` where the item gave
        it) is lowered by one common factor. Each factor is the largest that fits, found by bisection over the
        plan's arithmetic; videos are read once. A conversation that fits is returned unchanged."""
        facts: dict[int, VideoPlan] = {}
        plan = self._plan(messages, text, facts)
        if plan.prompt_tokens <= limit or not facts:
            return messages, plan
        items = self.vision_items(messages)
        base = {i: self._video_tokens(facts[i]) for i in facts}
        room = limit - (plan.prompt_tokens - sum(base.values()))
        full = {i: facts[i].resized[0] * facts[i].resized[1] * len(facts[i].indices) / 2 for i in facts}

        def fields(i: int, pixel_scale: float, rate_scale: float) -> dict:
            vp = facts[i]
            out = {"total_pixels": max(1, int(full[i] * pixel_scale))}
            if rate_scale < 1 and not vp.frame_pixels:
                if "nframes" in items[i]:
                    out["nframes"] = max(2, int(len(vp.indices) * rate_scale))
                else:  # the rate that gave today's frames, scaled: smart_nframes' n = frames / video_fps * fps
                    span = (vp.indices[-1] - vp.indices[0] + 1) / vp.fps
                    out["fps"] = len(vp.indices) / span * rate_scale
            return out

        def cost(pixel_scale: float, rate_scale: float) -> int:
            total = 0
            for i in facts:
                ele = {**self.video_defaults, **items[i], **fields(i, pixel_scale, rate_scale)}
                try:
                    total += self._video_tokens(replan_video(ele, facts[i], what))
                except InputError:  # too few frames left to sample
                    return room + 1
            return total

        def largest(fits, lo: float = 0.0, hi: float = 1.0) -> float | None:
            if not fits(lo):
                return None
            for _ in range(40):
                mid = (lo + hi) / 2
                lo, hi = (mid, hi) if fits(mid) else (lo, mid)
            return lo

        pixel = largest(lambda s: cost(s, 1.0) <= room)
        rate = 1.0 if pixel is not None else largest(lambda r: cost(0.0, r) <= room, lo=1e-6)
        if pixel is None and rate is None:
            raise OverBudget(
                f"the prompt has {plan.prompt_tokens} tokens; even at their fewest frames and smallest "
                f"size its videos leave more than the {limit} allowed",
                what,
                plan.prompt_tokens,
                limit,
            )
        if pixel is None:  # frames at their smallest: name the budget that gives exactly that, not a token 1
            pixel = 0.0
            for i in facts:
                ele = {**self.video_defaults, **items[i], **fields(i, 0.0, rate)}
                frames = len(replan_video(ele, facts[i], what).indices)
                full[i] = int(ele.get("min_pixels", VIDEO_MIN_PIXELS) * 1.05) * frames // 2  # frames is even
            pixel = 1.0
        fitted, k = [], 0
        for m in messages:
            if isinstance(m["content"], list):
                parts = []
                for p in m["content"]:
                    if p["type"] in ("image", "video"):
                        if k in facts:
                            p = {**p, **fields(k, pixel, rate)}
                        k += 1
                    parts.append(p)
                m = {**m, "content": parts}
            fitted.append(m)
        return fitted, self._plan(fitted, text, facts)

    def with_policy(self, policy: MediaPolicy) -> Processor:
        clone = Processor.__new__(Processor)
        clone.__dict__.update(self.__dict__)
        clone.policy = policy
        return clone


def _cat(rows: list[torch.Tensor]) -> torch.Tensor:
    return rows[0] if len(rows) == 1 else torch.cat(rows)  # one long video: no second copy of its pixels


def _lazy_image(source, policy: MediaPolicy, what: str) -> Image.Image:
    """The image's header only (size and mode), where the source allows it."""
    if isinstance(source, (str, Path, Fetched)):
        return open_image(read_bytes(source, policy, what), policy, what)
    return load_image(source, policy, what)


def _read_json(path: Path, required: bool = True) -> dict:
    if not path.exists():
        if required:
            raise InputError(f"{path} is missing")
        return {}
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path}: not valid JSON ({e})") from None


__all__ = ["Budget", "ItemPlan", "OverBudget", "Plan", "Processor"]
