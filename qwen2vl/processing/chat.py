"""Chat messages -> prompt text, with the checkpoint's own Jinja template (`chat_template.json`).

Rendering matches transformers' `apply_chat_template` (4.57 `utils/chat_template_utils.py`): a sandboxed Jinja
environment with trim_blocks and lstrip_blocks, the loop-controls extension, `raise_exception`, `tojson` and
`strftime_now`. Messages may use qwen-vl-utils parts (`{"type": "image", "image": ...}`) or OpenAI parts
(`{"type": "image_url", "image_url": {"url": ...}}`, `video_url` likewise); both are normalised to the former,
which every Qwen2-VL template understands. Extra keys of a part (min_pixels, fps, ...) are kept.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from jinja2 import ext
from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .errors import InputError


def _raise(message: str):
    raise TemplateError(message)


@lru_cache(maxsize=8)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[ext.loopcontrols])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, separators=None, sort_keys=False: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii, separators=separators, sort_keys=sort_keys
    )
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def normalize_part(part, where: str) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise InputError(f"content part of type {type(part).__name__}; expected a dict", where)
    kind = part.get("type")
    if kind == "image_url" or (kind is None and "image_url" in part):
        url = part.get("image_url")
        url = url.get("url") if isinstance(url, dict) else url
        extra = part["image_url"] if isinstance(part.get("image_url"), dict) else {}
        rest = {k: v for k, v in {**part, **extra}.items() if k not in ("type", "image_url", "url", "detail")}
        return {"type": "image", "image": url, **rest}
    if kind == "video_url" or (kind is None and "video_url" in part):
        url = part.get("video_url")
        url = url.get("url") if isinstance(url, dict) else url
        extra = part["video_url"] if isinstance(part.get("video_url"), dict) else {}
        rest = {k: v for k, v in {**part, **extra}.items() if k not in ("type", "video_url", "url")}
        return {"type": "video", "video": url, **rest}
    if kind == "image" or "image" in part:
        return {**part, "type": "image"}
    if kind == "video" or "video" in part:
        return {**part, "type": "video"}
    if kind == "text" or "text" in part:
        return {**part, "type": "text"}
    raise InputError(
        f"unsupported content part type {kind!r} (expected text, image, image_url, video, video_url)", where
    )


def normalize_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise InputError("a conversation must be a non-empty list of messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m:
            raise InputError("each message needs a 'role' and 'content'", f"message {i}")
        content = m.get("content", "")
        if isinstance(content, list):
            content = [normalize_part(p, f"message {i}") for p in content]
        elif content is not None and not isinstance(content, str):
            raise InputError("content must be a string or a list of parts", f"message {i}")
        out.append({**m, "content": content if content is not None else ""})
    return out


def render(template: str, messages: list[dict], add_generation_prompt: bool = True, **kwargs) -> str:
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **kwargs)
    except TemplateError as e:
        raise InputError(f"the chat template refused this conversation: {e}") from None
