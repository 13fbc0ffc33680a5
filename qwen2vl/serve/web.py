"""The chat page `qwen2vl serve` shows at `/`: plain HTML, JS and CSS shipped in the package (`serve/web/`; no build
step, no CDN, works offline), and the two JSON endpoints it calls besides /v1/chat/completions:

- POST /v1/plan takes a chat-completions body and answers, before anything is decoded or generated, each image's
  and video's size after resizing and its token cost, and the prompt's total, from the same plan and limits the
  chat endpoint checks (`Processor.plan`);
- POST /v1/boxes takes `{"text", "width", "height"}` and answers the grounding boxes in the text, in pixels of that
  image, by `grounding.parse_boxes`: the page draws what the library would, from one rule.
"""

from __future__ import annotations

import asyncio
from importlib.resources import files

from fastapi import Request as HttpRequest
from fastapi.responses import Response

from ..grounding import parse_boxes
from ..processing import InputError
from ..processing.processor import Budget, OverBudget
from ..processing.tools import render_tools
from .limits import LimitExceeded
from .protocol import ApiError, ChatRequest, read_json

# the page loads nothing from elsewhere; attachments are data: URLs (shown as images and videos, sent as JSON)
CSP = "default-src 'self'; img-src 'self' data: blob:; media-src 'self' data: blob:; object-src 'none'; base-uri 'none'"
PAGES = {
    "index.html": "text/html; charset=utf-8",
    "app.js": "text/javascript; charset=utf-8",
    "style.css": "text/css; charset=utf-8",
}


def page(name: str) -> Response:
    if name not in PAGES:
        raise ApiError(404, f"no route /ui/{name}", "not_found_error")
    body = (files(__package__) / "web" / name).read_bytes()
    return Response(body, media_type=PAGES[name], headers={"Cache-Control": "no-cache", "Content-Security-Policy": CSP})


def add_web_routes(app, server) -> None:
    @app.get("/")
    async def index():
        return page("index.html")

    @app.get("/ui/{name}")
    async def static(name: str):
        return page(name)

    @app.post("/v1/plan")
    async def plan(request: HttpRequest):
        server._auth(request)
        req = await server._parse(request)
        return await asyncio.get_running_loop().run_in_executor(server.pool, plan_request, server, req)

    @app.post("/v1/boxes")
    async def boxes(request: HttpRequest):
        server._auth(request)
        body = read_json(await server._read_body(request))
        if not isinstance(body, dict) or not isinstance(body.get("text"), str):
            raise ApiError(400, "'text' must be a string", param="text")
        for key in ("width", "height"):
            value = body.get(key)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value <= 2**20:
                raise ApiError(400, f"'{key}' must be a positive integer (pixels of the image)", param=key)
        found = parse_boxes(body["text"], (body["width"], body["height"]))
        return {"boxes": [{"label": b.label, "points": b.points, "pixels": b.pixels} for b in found]}


def plan_request(server, req: ChatRequest) -> dict:
    """The plan of a chat request as the chat endpoint would make it (limits, fit), decoding no picture."""
    context = server.engine.max_model_len
    completion = req.params.max_new_tokens if req.max_tokens_given else 1
    budget = Budget(max(1, context - completion), server.limits.max_source_pixels)
    try:
        messages = server.limits.apply(render_tools(req.messages, req.tools))
        p = server.processor.plan(messages, budget=budget, fit=req.fit)
    except LimitExceeded as e:
        raise ApiError(400, str(e), param="messages", code=e.code) from None
    except (OverBudget, InputError) as e:
        raise ApiError(400, str(e), param="messages") from None
    items = [
        {
            "kind": i.kind,
            "source_size": i.source_size,
            "resized_size": i.resized_size,
            "tokens": i.tokens,
            "frames": len(i.frame_indices),
            "fitted": i.fitted,
        }
        for i in p.items
    ]
    return {
        "items": items,
        "prompt_tokens": p.prompt_tokens,
        "context": context,
        "fits": p.prompt_tokens + completion <= context,
    }
