"""Training data: JSONL conversations -> token ids with assistant-only labels -> right-padded batches.

Each line of the file is {"messages": [...]} in the message format the API takes (qwen2vl/processing/chat.py):
text, image and video parts, images and videos as paths (relative to the JSONL file's folder, or absolute) with
their per-item pixel fields (min_pixels, max_pixels, resized_height, fps, nframes, ...). The conversation is
rendered with the checkpoint's chat template (no generation prompt) and prepared by our Processor, exactly as for
inference.

Labels follow the Qwen team's fine-tuning code (qwen-vl-finetune `preprocess_qwen_visual`, and LLaMA-Factory's
qwen2_vl template likewise): -100 everywhere except each assistant turn's tokens after `<|im_start|>assistant\\n`,
up to and including its `<|im_end|>` and the newline after it. Batches are right-padded with <|endoftext|>
(attention mask 0, label -100), so no supervised token is predicted from a padding slot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..processing import Processor
from ..processing.chat import normalize_messages
from ..processing.errors import InputError

IGNORE = -100  # the label of a token that is not trained on (torch cross_entropy's ignore_index)


@dataclass(frozen=True)
class Example:
    """One conversation, prepared: token ids, labels, and its pixel rows (None when it has no such item)."""

    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,), IGNORE outside the assistant turns
    pixel_values: torch.Tensor | None = None  # (patches, 1176)
    image_grid_thw: torch.Tensor | None = None  # (images, 3)
    pixel_values_videos: torch.Tensor | None = None
    video_grid_thw: torch.Tensor | None = None

    @property
    def trained_tokens(self) -> int:
        return int((self.labels != IGNORE).sum())


def read_jsonl(path: str | Path) -> list[list[dict]]:
    """Conversations from a JSONL file; relative image/video paths are taken from the file's folder."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: no such data file")
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path.name} line {n}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"not valid JSON ({e})", where) from None
        if not isinstance(row, dict) or "messages" not in row:
            raise InputError("each line must be an object with a 'messages' list", where)
        extra = sorted(set(row) - {"messages"})
        if extra:
            raise InputError(f"unsupported fields {extra} (only 'messages' is read)", where)
        out.append(_resolve_paths(row["messages"], path.parent, where))
    if not out:
        raise InputError(f"{path}: no conversations")
    return out


def _resolve_paths(messages, base: Path, where: str) -> list[dict]:
    try:
        messages = normalize_messages(messages)
    except InputError as e:
        raise InputError(str(e), where) from None
    for m in messages:
        if isinstance(m["content"], list):
            for part in m["content"]:
                kind = part["type"]
                if (
                    kind in ("image", "video")
                    and isinstance(part[kind], str)
                    and "://" not in part[kind]
                    and not part[kind].startswith("data:")
                    and not Path(part[kind]).is_absolute()
                ):
                    part[kind] = str(base / part[kind])
    return messages


def assistant_labels(ids: list[int], im_start: int, assistant: list[int], im_end: int) -> list[int]:
    """Labels for a rendered conversation: each `<|im_start|>assistant` turn's tokens from the second token after
    `assistant` (past the newline token, which absorbs newlines the answer starts with, as in the Qwen team's
    code), through its `<|im_end|>` and the one token after it (the newline); IGNORE elsewhere."""
    labels = [IGNORE] * len(ids)
    head = [im_start, *assistant]
    i = 0
    while i < len(ids):
        if ids[i : i + len(head)] == head:
            start = i + len(head) + 1
            end = start
            while end < len(ids) and ids[end] != im_end:
                end += 1
            stop = min(end + 2, len(ids))  # <|im_end|> and the newline after it
            labels[start:stop] = ids[start:stop]
            i = stop
        else:
            i += 1
    return labels


def check(processor: Processor, messages: list[dict], where: str = "conversation") -> None:
    """What `encode` would refuse, found from cheap facts (image and video headers, the token count) before any
    training starts: the roles, the media files, and the prompt against the model's context."""
    messages = normalize_messages(messages)
    if messages[-1]["role"] != "assistant":
        raise InputError("the last message must be the assistant's answer (role 'assistant')", where)
    try:
        processor.plan(messages, add_generation_prompt=False)
    except InputError as e:
        raise InputError(f"{where}: {e}") from None


def encode(processor: Processor, messages: list[dict], where: str = "conversation") -> Example:
    """One conversation -> Example; it must end with an assistant turn (the answer to learn)."""
    messages = normalize_messages(messages)
    if messages[-1]["role"] != "assistant":
        raise InputError("the last message must be the assistant's answer (role 'assistant')", where)
    batch = processor([messages], add_generation_prompt=False)
    ids = batch["input_ids"][0].tolist()
    tok = processor.tokenizer
    labels = assistant_labels(ids, tok.token_id("<|im_start|>"), tok.encode("assistant"), tok.token_id("<|im_end|>"))
    if all(label == IGNORE for label in labels):
        raise InputError("no assistant tokens to train on (the chat template shows no assistant turn)", where)
    return Example(
        torch.tensor(ids),
        torch.tensor(labels),
        batch.get("pixel_values"),
        batch.get("image_grid_thw"),
        batch.get("pixel_values_videos"),
        batch.get("video_grid_thw"),
    )


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded batch in the model's input names, with `labels`."""
    length = max(len(e.input_ids) for e in examples)
    batch = {
        "input_ids": torch.full((len(examples), length), pad_id, dtype=torch.long),
        "attention_mask": torch.zeros(len(examples), length, dtype=torch.long),
        "labels": torch.full((len(examples), length), IGNORE, dtype=torch.long),
    }
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        batch["input_ids"][row, :n] = e.input_ids
        batch["attention_mask"][row, :n] = 1
        batch["labels"][row, :n] = e.labels
    for pixels, grid in (("pixel_values", "image_grid_thw"), ("pixel_values_videos", "video_grid_thw")):
        items = [e for e in examples if getattr(e, pixels) is not None]
        if items:
            batch[pixels] = torch.cat([getattr(e, pixels) for e in items])
            batch[grid] = torch.cat([getattr(e, grid) for e in items])
    return batch
