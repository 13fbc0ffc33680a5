"""OpenAI chat-completions request parsing and response shapes (the subset vLLM's server also takes).

A request body becomes (conversation, sampling parameters, options); anything malformed becomes an
`ApiError` with the HTTP status and the OpenAI error object (`{"error": {"message", "type", "param", "code"}}`).
Per-item extension fields (min_pixels, max_pixels, resized_height, resized_width, fps, nframes) may sit on the
content part or inside its image_url / video_url object; a video may also be a list of frame URLs.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from ..generate.sampling import SamplingParams

ITEM_FIELDS = ("min_pixels", "max_pixels", "resized_height", "resized_width", "fps", "nframes", "min_frames",
               "max_frames", "total_pixels", "video_start", "video_end")


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict]
    params: SamplingParams
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int


def _number(body: dict, key: str, kind, lo=None, hi=None):
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and int(value) != value):
        raise ApiError(400, f"'{key}' must be a{'n integer' if kind is int else ' number'}, got {value!r}", param=key)
    value = kind(value)
    if (lo is not None and value < lo) or (hi is not None and value > hi):
        raise ApiError(400, f"'{key}' must be between {lo} and {hi}, got {value}", param=key)
    return value


def _part(part, where: str) -> dict:
    if isinstance(part, str):
        return {"type": "text", "text": part}
    if not isinstance(part, dict):
        raise ApiError(400, f"{where}: a content part must be an object", param="messages")
    kind = part.get("type")
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise ApiError(400, f"{where}: text part without a string 'text'", param="messages")
        return {"type": "text", "text": part["text"]}
    if kind in ("image_url", "video_url"):
        inner = part.get(kind)
        url = inner.get("url") if isinstance(inner, dict) else inner
        media = "image" if kind == "image_url" else "video"
        if not (isinstance(url, str) or (media == "video" and isinstance(url, list)
                                         and all(isinstance(u, str) for u in url))):
            raise ApiError(400, f"{where}: {kind} needs a 'url' string" + (" or a list of frame URLs"
                                                                          if media == "video" else ""), param="messages")
        out = {"type": media, media: url}
        for source in (part, inner if isinstance(inner, dict) else {}):
            for key in ITEM_FIELDS:
                if key in source:
                    out[key] = source[key]
        return out
    raise ApiError(400, f"{where}: unsupported content part type {kind!r} (text, image_url, video_url)",
                   param="messages")


def parse_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ApiError(400, f"messages[{i}] needs a role of system, user or assistant", param="messages")
        content = m.get("content")
        if isinstance(content, list):
            content = [_part(p, f"messages[{i}]") for p in content]
        elif content is None:
            content = ""
        elif not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or an array of parts", param="messages")
        out.append({"role": m["role"], "content": content})
    return out


def parse_request(body, generation_config: dict) -> ChatRequest:
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str):
        raise ApiError(400, "'model' is required", param="model")
    messages = parse_messages(body.get("messages"))
    max_tokens = _number(body, "max_completion_tokens", int, 1) or _number(body, "max_tokens", int, 1)
    stop = body.get("stop")
    if stop is not None and not (isinstance(stop, str) or (isinstance(stop, list) and len(stop) <= 16
                                                           and all(isinstance(s, str) for s in stop))):
        raise ApiError(400, "'stop' must be a string or an array of at most 16 strings", param="stop")
    n = _number(body, "n", int, 1, 8) or 1
    top_logprobs = _number(body, "top_logprobs", int, 0, 20) or 0
    top_k = _number(body, "top_k", int, -1)
    top_k = 0 if top_k == -1 else top_k  # vLLM's spelling of "off"
    try:
        params = SamplingParams.from_generation_config(
            generation_config, max_new_tokens=max_tokens or 512, temperature=_number(body, "temperature", float, 0, 2),
            top_p=_number(body, "top_p", float, 0, 1), top_k=top_k,
            repetition_penalty=_number(body, "repetition_penalty", float, 0), seed=_number(body, "seed", int),
            stop=(stop,) if isinstance(stop, str) else tuple(stop or ()))
    except ValueError as e:
        raise ApiError(400, str(e)) from None
    stream_options = body.get("stream_options") or {}
    return ChatRequest(model, messages, params, n, bool(body.get("stream", False)),
                       bool(stream_options.get("include_usage", False)), bool(body.get("logprobs", False)),
                       top_logprobs)


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())
