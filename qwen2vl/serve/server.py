"""`qwen2vl serve`: an OpenAI-compatible HTTP server over the continuous-batching engine.

Endpoints: POST /v1/chat/completions and POST /v1/completions (JSON or server-sent events), GET /v1/models,
GET /health, GET /metrics (Prometheus text, with latency histograms); CORS for --allowed-origins. The engine steps
in one background thread; requests are prepared (limits applied, media planned from headers, then fetched and
decoded under the server's media policy, tokenised) in a worker pool, submitted to the engine, and fed their tokens
through an asyncio queue. Streaming and non-streaming responses come from one generator of per-choice deltas. Every
error, 404/405 and the unforeseen included, is the OpenAI error object; a bad request never reaches the engine's
batch; a client that goes away, streaming or not, is aborted within one engine step and frees its slot; slow
clients are cut off by header and body read deadlines.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from fastapi import FastAPI
from fastapi import Request as HttpRequest
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from ..engine.engine import Engine, EngineBroken, Output, QueueFull, Request
from ..generate.decode import Prompt
from ..generate.sampling import chooser
from ..generate.stopping import StopMatcher
from ..generate.structured import GrammarError, GrammarProcessor, Grammars, grammars_for
from ..pipeline import Pipeline
from ..processing import IncrementalDetokenizer, InputError, MediaPolicy
from ..processing.processor import Budget, OverBudget
from ..processing.tools import ToolCall, ToolCallParser, render_tools
from .config import ServerConfig
from .limits import LimitExceeded, Limits
from .metrics import Latency
from .protocol import ApiError, ChatRequest, completion_id, now, parse_completion_request, parse_request, read_json
from .web import add_web_routes

if TYPE_CHECKING:
    import uvicorn

log = logging.getLogger("qwen2vl.serve")


@dataclass(frozen=True)
class Prepared:
    """A request made ready for the engine (in a worker thread): its tensors and its token accounting."""

    batch: dict[str, torch.Tensor]  # the processor's output: input_ids, attention_mask, pixels and grids
    prompt_tokens: int
    max_new: int  # max_tokens, capped by the room the context leaves
    image_tokens: int
    video_tokens: int
    grammar: object | None = None  # the compiled constraint (generate.structured), when the request has one
    started: float = 0.0  # arrival, on the monotonic clock (latency histograms)


@dataclass
class ChoiceState:
    """How one of a request's n choices turns engine tokens into text (event loop only)."""

    index: int
    detokenizer: IncrementalDetokenizer
    stop: StopMatcher
    tools: ToolCallParser | None = None  # with tools: <tool_call> blocks leave the text as parsed calls


@dataclass
class Submission:
    """A request's choices queued in the engine: their outputs arrive on `queue`."""

    queue: asyncio.Queue
    states: dict[str, ChoiceState]  # engine request id -> its choice

    @property
    def ids(self) -> list[str]:
        return list(self.states)


class EngineLoop:
    """Runs engine.step() in a thread and routes each Output to the asyncio queue of its request.

    The routes and the token-rate window are shared by the engine thread (which delivers and records) and the
    event loop (which adds and drops routes, and reads the rate); one lock guards both."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._routes: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._window: deque[tuple[float, int]] = deque()  # (time, tokens produced by one step), oldest first
        self._window_tokens = 0  # the sum of the window's counts, kept as it changes
        self._lock = threading.Lock()
        self.stopped = False
        self.broken = ""  # why the engine cannot go on, when it cannot
        self.on_broken: Callable[[], None] = lambda: None  # main() sets it to stop the HTTP server
        self.thread = threading.Thread(target=self._run, name="qwen2vl-engine", daemon=True)

    def route(self, request_id: str, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue) -> None:
        """Deliver `request_id`'s outputs to `queue`, on `loop`."""
        with self._lock:
            self._routes[request_id] = (loop, queue)

    def unroute(self, request_id: str) -> None:
        with self._lock:
            self._routes.pop(request_id, None)

    def routed(self) -> int:
        """Requests with a route (for tests and metrics)."""
        with self._lock:
            return len(self._routes)

    def deliver(self, outputs: list[Output]) -> None:
        """Record the tokens of one step and hand each output to its request's queue (engine thread)."""
        produced = sum(o.token is not None for o in outputs)
        with self._lock:
            if produced:
                self._window.append((time.monotonic(), produced))
                self._window_tokens += produced
            targets = [(self._routes.get(out.request_id), out) for out in outputs]
        for route, out in targets:
            if route is not None:
                route[0].call_soon_threadsafe(route[1].put_nowait, out)

    def start(self) -> None:
        self.thread.start()

    def _run(self) -> None:
        while not self.stopped:
            if not self.engine.has_work():
                self.engine.wait_for_work(0.05)
                continue
            try:
                outputs = self.engine.step()
            except EngineBroken as e:  # tensor-parallel ranks out of step: fail what was in flight, then stop
                log.error("qwen2vl: %s; stopping the server", e)
                self.deliver(self.engine.fail_all(f"the server is stopping: {e}"))
                self.stopped, self.broken = True, str(e)
                self.on_broken()
                return
            except Exception:  # a bug must not kill the server: fail what was in flight, keep serving
                log.exception("engine step failed")
                outputs = self.engine.fail_all("internal error in the engine")
            self.deliver(outputs)

    def tokens_per_second(self, window: float = 10.0) -> float:
        cutoff = time.monotonic() - window
        with self._lock:
            while self._window and self._window[0][0] < cutoff:  # expire from the old end: O(1) per step
                self._window_tokens -= self._window.popleft()[1]
            return self._window_tokens / window


class Server:
    def __init__(
        self,
        pipe: Pipeline,
        engine: Engine,
        model_name: str,
        api_key: str | None = None,
        policy: MediaPolicy | None = None,
        max_request_bytes: int = 64 * 2**20,
        workers: int = 4,
        limits: Limits | None = None,
        body_timeout_s: float = 30.0,
        stall_after_s: float = 60.0,
        allowed_origins: tuple[str, ...] = (),
        adapter_names: tuple[str, ...] = (),
    ) -> None:
        self.pipe, self.engine, self.model_name, self.api_key = pipe, engine, model_name, api_key
        # the names a request's `model` may give: the base model (no adapter), then the model's side-by-side LoRA
        # adapters in their load order (qwen2vl.lora.load_adapters)
        self.models = {model_name: -1, **{name: i for i, name in enumerate(adapter_names)}}
        if len(self.models) != 1 + len(adapter_names):
            raise ValueError(f"adapter names must differ from each other and from the model's ('{model_name}')")
        self.processor = pipe.processor.with_policy(
            policy or MediaPolicy(allow_private_addresses=False, allow_local=False)
        )
        self.max_request_bytes, self.body_timeout_s = max_request_bytes, body_timeout_s
        self.stall_after_s = stall_after_s
        self.limits = limits or Limits()
        self.allowed_origins = tuple(allowed_origins)
        self.loop = EngineLoop(engine)
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="qwen2vl-prepare")
        self.requests_total = {"ok": 0, "error": 0}
        self.preparing = 0  # requests between arrival and the engine (touched on the event loop only)
        self.latency = Latency()
        self.app = self._build_app()

    # -- app -------------------------------------------------------------------------------------------------
    def _build_app(self) -> FastAPI:
        from contextlib import asynccontextmanager

        @asynccontextmanager
        async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
            self.loop.start()
            yield
            self.loop.stopped = True

        app = FastAPI(title="qwen2vl", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

        def error(e: ApiError) -> JSONResponse:
            self.requests_total["error"] += 1
            return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

        @app.exception_handler(ApiError)
        async def _api_error(_: HttpRequest, e: ApiError) -> JSONResponse:
            return error(e)

        @app.exception_handler(StarletteHTTPException)
        async def _http_error(request: HttpRequest, e: StarletteHTTPException) -> JSONResponse:
            # unknown routes (404), wrong methods (405)
            what = {404: f"no route {request.url.path}", 405: f"{request.method} is not allowed on {request.url.path}"}
            kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
            return error(
                ApiError(e.status_code, what.get(e.status_code, str(e.detail)), kind, headers=dict(e.headers or {}))
            )

        @app.exception_handler(RequestValidationError)
        async def _validation(_: HttpRequest, e: RequestValidationError) -> JSONResponse:
            return error(ApiError(400, f"invalid request: {e.errors()[:1]}"))

        @app.exception_handler(ClientDisconnect)
        async def _gone(_: HttpRequest, e: ClientDisconnect) -> Response:
            # the client left while sending its body: nobody reads the answer
            return Response(status_code=499)

        @app.exception_handler(Exception)
        async def _unexpected(_: HttpRequest, e: Exception) -> JSONResponse:
            log.error("unexpected error", exc_info=e)  # the traceback stays in the log, once
            return error(ApiError(500, "internal server error", "server_error"))

        @app.get("/health")
        async def health() -> JSONResponse:
            if not self.loop.thread.is_alive():
                return JSONResponse({"status": "engine stopped"}, status_code=503)
            stalled = self.engine.stats()["step_running_s"]
            if stalled > self.stall_after_s:
                return JSONResponse({"status": f"engine step running for {stalled:.0f} s"}, status_code=503)
            return JSONResponse({"status": "ok"})

        @app.get("/v1/models")
        async def models(request: HttpRequest) -> dict:
            self._auth(request)
            return {
                "object": "list",
                "data": [
                    {
                        "id": name,
                        "object": "model",
                        "created": now(),
                        "owned_by": "qwen2vl",
                        "root": self.model_name,
                        "parent": None if adapter < 0 else self.model_name,  # an adapter's base, as vLLM says it
                        "max_model_len": self.engine.max_model_len,
                    }
                    for name, adapter in self.models.items()
                ],
            }

        @app.get("/metrics")
        async def metrics() -> PlainTextResponse:
            return PlainTextResponse(self._metrics(), media_type="text/plain; version=0.0.4")

        @app.post("/v1/chat/completions")
        async def chat(request: HttpRequest) -> Response:
            return await self._serve(request, parse_request)

        @app.post("/v1/completions")
        async def completions(request: HttpRequest) -> Response:
            return await self._serve(request, parse_completion_request)

        if self.allowed_origins:  # CORS: browsers on these origins may call the API (preflight answered here)
            app.add_middleware(
                CORSMiddleware,
                allow_origins=list(self.allowed_origins),
                allow_credentials=False,
                allow_methods=["GET", "POST", "OPTIONS"],
                allow_headers=["*"],
                max_age=600,
            )

        add_web_routes(app, self)  # the chat page at / and the two endpoints it uses
        return app

    async def _serve(self, request: HttpRequest, parse: Callable[[object, dict], ChatRequest]) -> Response:
        """One chat or text completion: parse, prepare in the pool, submit, then stream or answer whole."""
        self._auth(request)
        started = time.monotonic()
        # requests still being read or prepared are bounded like the engine's queue: each may hold a body of
        # up to --max-request-bytes and its decoded media, so a flood must not queue for the worker pool
        if self.preparing >= self.engine.max_waiting:
            raise ApiError(
                429,
                f"the server is busy ({self.preparing} requests are being prepared); retry shortly",
                "rate_limit_error",
                headers={"Retry-After": "1"},
            )
        self.preparing += 1
        try:
            req = await self._parse(request, parse)
            prepared = await asyncio.get_running_loop().run_in_executor(self.pool, self._prepare, req)
        finally:
            self.preparing -= 1
        prepared = replace(prepared, started=started)
        submission = self._submit(req, prepared)  # a full queue is a 429 before any byte is sent
        if req.stream:  # Starlette cancels the stream when the client goes away
            return StreamingResponse(self._sse(req, prepared, submission), media_type="text/event-stream")
        return await self._complete(request, req, prepared, submission)

    def _auth(self, request: HttpRequest) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {self.api_key}":
            raise ApiError(401, "invalid or missing API key", "authentication_error", code="invalid_api_key")

    async def _read_body(self, request: HttpRequest) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > self.max_request_bytes:
            raise ApiError(413, f"request body of {length} bytes exceeds the limit of {self.max_request_bytes}")
        chunks: list[bytes] = []  # joined once: appending to bytes would copy the body per chunk

        async def collect() -> None:
            size = 0
            async for chunk in request.stream():
                chunks.append(chunk)
                size += len(chunk)
                if size > self.max_request_bytes:
                    raise ApiError(413, f"request body exceeds the limit of {self.max_request_bytes} bytes")

        try:
            await asyncio.wait_for(collect(), self.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"the request body did not arrive within {self.body_timeout_s:g} s") from None
        return b"".join(chunks)

    async def _parse(
        self, request: HttpRequest, parse: Callable[[object, dict], ChatRequest] = parse_request
    ) -> ChatRequest:
        body = read_json(await self._read_body(request))
        req = parse(body, self.pipe.generation_config)
        if req.model not in self.models:
            served = ", ".join(f"'{name}'" for name in self.models)
            raise ApiError(
                404,
                f"the model '{req.model}' does not exist; this server serves {served}",
                param="model",
                code="model_not_found",
            )
        return req

    def _prepare(self, req: ChatRequest) -> Prepared:
        """Limits, plan, then fetch, decode, render and tokenise (in a worker thread). Input problems become 400s,
        and a request over a limit is refused from its plan, before any picture is decoded."""
        context = self.engine.max_model_len
        vocab = self.pipe.model.config.text.vocab_size
        bad = [i for i, _ in req.params.logit_bias if i >= vocab]
        if bad:
            raise ApiError(
                400, f"logit_bias names token {bad[0]}, outside this model's vocabulary of {vocab}", param="logit_bias"
            )
        compiled = None
        if req.constraint is not None:  # before any media work: a schema the engine cannot compile is a 400
            try:
                compiled = self._grammars().compile(req.constraint)
            except GrammarError as e:
                raise ApiError(400, str(e), param=req.constraint_param) from None
        completion = req.params.max_new_tokens if req.max_tokens_given else 1
        if completion >= context:
            raise ApiError(
                400,
                f"max_tokens is {completion}, but this model's maximum context length is {context} "
                f"tokens, prompt included",
                param="max_tokens",
                code="context_length_exceeded",
            )
        try:
            if req.prompt is not None:  # /v1/completions: the text as it is, no chat template
                batch = self._text_batch(req.prompt, context - completion)
            else:
                messages = self.limits.apply(render_tools(req.messages, req.tools))
                batch = self.processor(
                    messages, budget=Budget(context - completion, self.limits.max_source_pixels), fit=req.fit
                )
        except LimitExceeded as e:
            raise ApiError(400, str(e), param="messages", code=e.code) from None
        except OverBudget as e:
            if e.resource == "pixels":
                raise ApiError(400, str(e), param="messages") from None
            asked = f"{'at least ' if e.at_least else ''}{e.tokens} in the messages" + (
                f" + {completion} in the completion" if req.max_tokens_given else ""
            )
            raise ApiError(
                400,
                f"this model's maximum context length is {context} tokens; the request needs more ({asked})",
                param="messages",
                code="context_length_exceeded",
            ) from None
        except InputError as e:
            raise ApiError(400, str(e), param="messages") from None
        prompt_tokens = batch["input_ids"].shape[1]
        if prompt_tokens + completion > context:  # the plan counted the same tokens; this guards the rule's one home
            raise ApiError(
                400,
                f"this model's maximum context length is {context} tokens; the messages take {prompt_tokens} tokens",
                param="messages",
                code="context_length_exceeded",
            )
        room = context - prompt_tokens
        merge = self.pipe.model.config.vision.spatial_merge_size**2
        return Prepared(
            batch,
            prompt_tokens,
            min(req.params.max_new_tokens, room),
            _placeholders(batch, "image", merge),
            _placeholders(batch, "video", merge),
            compiled,
        )

    def _text_batch(self, text: str, room: int) -> dict[str, torch.Tensor]:
        tokenizer = self.processor.tokenizer
        least = tokenizer.min_tokens(text)
        if least > room:  # far over the context: refused without tokenising
            raise OverBudget("the prompt is over the context", tokens=least, limit=room, at_least=True)
        ids = tokenizer.encode(text)
        if not ids:
            raise ApiError(400, "the prompt is empty", param="prompt")
        if len(ids) > room:
            raise OverBudget("the prompt is over the context", tokens=len(ids), limit=room)
        input_ids = torch.tensor([ids])
        return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}

    def _grammars(self) -> Grammars:
        return grammars_for(
            self.processor.tokenizer, self.pipe.model.config.text.vocab_size, tuple(self.pipe.params().stop_token_ids)
        )

    # -- one request, n choices ----------------------------------------------------------------------------------
    def _submit(self, req: ChatRequest, prepared: Prepared) -> Submission:
        """Queue the request's n choices in the engine."""
        loop = asyncio.get_running_loop()
        base = completion_id()
        ids = [f"{base}-{i}" for i in range(req.n)]
        submission = Submission(asyncio.Queue(), {})
        prompt = Prompt.from_batch(prepared.batch)
        for i, rid in enumerate(ids):
            params = req.params if req.params.seed is None else req.params.with_(seed=req.params.seed + i)
            self.loop.route(rid, loop, submission.queue)
            detokenizer = IncrementalDetokenizer(self.processor.tokenizer, req.skip_special_tokens)
            submission.states[rid] = ChoiceState(
                i, detokenizer, StopMatcher(params.stop), ToolCallParser() if req.tools else None
            )
            processors = (
                () if prepared.grammar is None else (GrammarProcessor(self._grammars(), prepared.grammar),)
            )  # each choice has its own matcher
            try:
                self.engine.add(
                    Request(
                        rid,
                        prompt,
                        chooser(params),
                        prepared.max_new,
                        params.stop_token_ids,
                        req.top_logprobs if req.logprobs else None,
                        processors,
                        self.models[req.model],
                    )
                )
            except QueueFull as e:
                for r in ids:
                    self.engine.abort(r)
                    self.loop.unroute(r)
                raise ApiError(
                    429, f"the server is busy ({e}); retry shortly", "rate_limit_error", headers={"Retry-After": "1"}
                ) from None
        return submission

    async def _choices(
        self, req: ChatRequest, submission: Submission, started: float | None = None
    ) -> AsyncIterator[tuple[int, dict]]:
        """Yields (choice index, event) with event = {"text", "tool_calls", "logprobs", "finish_reason", "tokens",
        "cached"}. With tools, `<tool_call>` blocks leave the text and arrive as parsed calls; a choice that called
        a tool finishes with "tool_calls". Cancelling the consumer (the client went away) aborts every open choice
        in the engine. Latencies (first token, per output token, end to end) go to the histograms."""
        ids = submission.ids
        open_ids = set(ids)
        started = time.monotonic() if started is None else started
        first: dict[str, float] = {}
        counts = dict.fromkeys(ids, 0)
        try:
            while open_ids:
                out: Output = await submission.queue.get()
                if out.request_id not in open_ids:
                    continue
                state = submission.states[out.request_id]
                index, detok, stop = state.index, state.detokenizer, state.stop
                event: dict = {
                    "text": "",
                    "tool_calls": [],
                    "logprobs": None,
                    "finish_reason": out.finish_reason,
                    "tokens": 0,
                    "cached": out.cached_tokens,
                }
                if out.token is not None:
                    event["tokens"] = 1
                    counts[out.request_id] += 1
                    first.setdefault(out.request_id, time.monotonic())
                if out.token is not None and out.token not in req.params.stop_token_ids:
                    event["text"] = stop.feed(detok.push(out.token))
                    if req.logprobs:
                        event["logprobs"] = self._logprob_entry(out)
                    if stop.stopped:
                        event["finish_reason"] = "stop"
                        self.engine.abort(out.request_id)
                if event["finish_reason"] is not None:
                    if event["finish_reason"] != "stop" or not stop.stopped:
                        event["text"] += stop.feed(detok.flush()) + stop.flush()
                    if out.finish_reason == "error":
                        raise ApiError(500, out.error or "generation failed", "server_error")
                    open_ids.discard(out.request_id)
                    self.latency.observe(started, first.get(out.request_id), counts[out.request_id])
                if state.tools is not None:
                    event["text"], event["tool_calls"] = state.tools.feed(event["text"])
                    if event["finish_reason"] is not None:
                        event["text"] += state.tools.flush()
                        if state.tools.calls and event["finish_reason"] == "stop":
                            event["finish_reason"] = "tool_calls"
                yield index, event
        finally:
            for rid in ids:
                if rid in open_ids:
                    self.engine.abort(rid)  # client gone or error: free the slot now
                self.loop.unroute(rid)

    def _logprob_entry(self, out: Output) -> dict:
        tok = self.processor.tokenizer

        def entry(token: int, lp: float) -> dict:
            text = tok.decode([token], skip_special_tokens=False)
            return {"token": text, "logprob": lp, "bytes": list(text.encode())}

        return {**entry(out.token, out.logprob), "top_logprobs": [entry(t, lp) for t, lp in out.top_logprobs]}

    def _usage(self, prepared: Prepared, completion: int, cached: int = 0) -> dict:
        """`cached_tokens`: prompt tokens whose keys/values came from the prefix cache (the most of any choice)."""
        return {
            "prompt_tokens": prepared.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": prepared.prompt_tokens + completion,
            "prompt_tokens_details": {
                "cached_tokens": cached,
                "image_tokens": prepared.image_tokens,
                "video_tokens": prepared.video_tokens,
            },
        }

    async def _complete(
        self, http: HttpRequest, req: ChatRequest, prepared: Prepared, submission: Submission
    ) -> Response:
        """The whole answer, or nothing if the client goes away first: a task waits for the disconnect message
        while the choices are collected, and whichever ends first cancels the other."""
        answer = asyncio.ensure_future(self._answer(req, prepared, submission))
        gone = asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait({answer, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (answer, gone):
                if not task.done():
                    task.cancel()
        if not answer.done() or answer.cancelled():
            await asyncio.gather(answer, return_exceptions=True)  # let _choices' cleanup run
            return Response(status_code=499)
        return JSONResponse(answer.result())

    async def _answer(self, req: ChatRequest, prepared: Prepared, submission: Submission) -> dict:
        texts = [""] * req.n
        calls: list[list[ToolCall]] = [[] for _ in range(req.n)]
        reasons: list[str | None] = [None] * req.n
        logprobs: list[list] = [[] for _ in range(req.n)]
        completion = cached = 0
        async for index, ev in self._choices(req, submission, prepared.started):
            texts[index] += ev["text"]
            calls[index] += ev["tool_calls"]
            completion += ev["tokens"]
            cached = max(cached, ev["cached"])
            if ev["logprobs"]:
                logprobs[index].append(ev["logprobs"])
            if ev["finish_reason"]:
                reasons[index] = ev["finish_reason"]
        self.requests_total["ok"] += 1
        if req.prompt is not None:
            texts_only = [
                {"index": i, "text": texts[i], "logprobs": None, "finish_reason": reasons[i] or "stop"}
                for i in range(req.n)
            ]
            return {
                "id": "cmpl-" + completion_id()[9:],
                "object": "text_completion",
                "created": now(),
                "model": req.model,
                "choices": texts_only,
                "usage": self._usage(prepared, completion, cached),
            }
        choices = [
            {
                "index": i,
                "message": _message(texts[i], calls[i]),
                "logprobs": {"content": logprobs[i]} if req.logprobs else None,
                "finish_reason": reasons[i] or "stop",
            }
            for i in range(req.n)
        ]
        return {
            "id": completion_id(),
            "object": "chat.completion",
            "created": now(),
            "model": req.model,
            "choices": choices,
            "usage": self._usage(prepared, completion, cached),
        }

    async def _sse(self, req: ChatRequest, prepared: Prepared, submission: Submission) -> AsyncIterator[str]:
        cid, created = completion_id(), now()
        text_completion = req.prompt is not None
        if text_completion:
            cid = "cmpl-" + cid[9:]

        def chunk(choices: list[dict], usage: dict | None = None) -> str:
            body = {
                "id": cid,
                "object": "text_completion" if text_completion else "chat.completion.chunk",
                "created": created,
                "model": req.model,
                "choices": choices,
            }
            if usage is not None:
                body["usage"] = usage
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        if not text_completion:
            yield chunk(
                [
                    {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
                    for i in range(req.n)
                ]
            )
        completion = cached = 0
        called = [0] * req.n  # tool calls streamed so far, per choice (each call's delta index)
        try:
            async for index, ev in self._choices(req, submission, prepared.started):
                completion += ev["tokens"]
                cached = max(cached, ev["cached"])
                delta: dict = {"content": ev["text"]} if ev["text"] else {}
                if ev["tool_calls"]:  # each call whole, in one delta: id, name and all its arguments
                    delta["tool_calls"] = [c.openai(called[index] + k) for k, c in enumerate(ev["tool_calls"])]
                    called[index] += len(ev["tool_calls"])
                if text_completion and (ev["text"] or ev["finish_reason"]):
                    yield chunk(
                        [{"index": index, "text": ev["text"], "logprobs": None, "finish_reason": ev["finish_reason"]}]
                    )
                elif not text_completion and (delta or ev["finish_reason"] or ev["logprobs"]):
                    yield chunk(
                        [
                            {
                                "index": index,
                                "delta": delta,
                                "logprobs": {"content": [ev["logprobs"]]} if ev["logprobs"] else None,
                                "finish_reason": ev["finish_reason"],
                            }
                        ]
                    )
        except ApiError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        if req.include_usage:
            yield chunk([], self._usage(prepared, completion, cached))
        self.requests_total["ok"] += 1
        yield "data: [DONE]\n\n"

    def _metrics(self) -> str:
        s = self.engine.stats()
        lines = [
            ("qwen2vl_requests_waiting", "gauge", "Requests in the queue", s["waiting"]),
            ("qwen2vl_requests_running", "gauge", "Requests decoding", s["running"] + s["prefilling"]),
            ("qwen2vl_kv_slots_used", "gauge", "KV cache slots in use", s["kv_slots_used"]),
            (
                "qwen2vl_kv_cache_usage",
                "gauge",
                "Fraction of KV positions holding live tokens",
                s["kv_tokens_used"] / max(1, s["kv_tokens_capacity"]),
            ),
            (
                "qwen2vl_generation_tokens_per_second",
                "gauge",
                "Generated tokens per second, last 10 s",
                self.loop.tokens_per_second(),
            ),
            ("qwen2vl_generation_tokens_total", "counter", "Generated tokens", s["generated_tokens"]),
            (
                "qwen2vl_prefix_tokens_reused_total",
                "counter",
                "Prompt tokens served from cached KV",
                s["prefix_tokens_reused"],
            ),
            (
                "qwen2vl_vision_cache_hits_total",
                "counter",
                "Vision encodings served from the cache",
                s["vision_cache_hits"],
            ),
            (
                "qwen2vl_requests_prefilling",
                "gauge",
                "Requests in prompt work: vision encodes and prefill (the vision-encode queue)",
                s["prefilling"],
            ),
            (
                "qwen2vl_vision_pieces_total",
                "counter",
                "Pieces of vision encodes run (each a bounded unit of work)",
                s["vision_pieces"],
            ),
            (
                "qwen2vl_engine_longest_step_seconds",
                "gauge",
                "Longest engine step of the last minute: the worst gap between tokens of running requests",
                s["longest_step_s"],
            ),
            (
                "qwen2vl_engine_step_running_seconds",
                "gauge",
                "How long the step in progress has run",
                s["step_running_s"],
            ),
            ("qwen2vl_requests_ok_total", "counter", "Requests completed", self.requests_total["ok"]),
            ("qwen2vl_requests_error_total", "counter", "Requests refused or failed", self.requests_total["error"]),
        ]
        out = []
        for name, kind, doc, value in lines:
            out += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}", f"{name} {value}"]
        return "\n".join(out) + "\n" + self.latency.text()


def _placeholders(batch: dict[str, torch.Tensor], kind: str, merge: int) -> int:
    """The prompt's image or video tokens: t*h*w patches / `merge` (the spatial merge's square) per item."""
    grid = batch.get(f"{kind}_grid_thw")
    return 0 if grid is None else int(grid.prod(-1).sum()) // merge


def _message(text: str, calls: list[ToolCall]) -> dict:
    """The assistant message of a choice: content, and tool_calls when it called any (content None if only calls)."""
    if not calls:
        return {"role": "assistant", "content": text}
    return {"role": "assistant", "content": text.strip() or None, "tool_calls": [c.openai() for c in calls]}


async def _disconnected(http: HttpRequest) -> None:
    """Returns when the client closes its connection (the ASGI http.disconnect message)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


def parse_bytes(text: str, free: int) -> int:
    """'4GiB', '512MB', '1073741824' or a fraction of free memory such as '0.3'."""
    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?i?B)?\s*", text, re.I)
    if not m:
        raise ValueError(f"--kv-cache-memory {text!r}: expected bytes with a unit (4GiB) or a fraction (0.3)")
    value, unit = float(m.group(1)), (m.group(2) or "").upper()
    if not unit and value <= 1:
        return int(value * free)
    scale = {
        "": 1,
        "B": 1,
        "KB": 1e3,
        "MB": 1e6,
        "GB": 1e9,
        "TB": 1e12,
        "KIB": 2**10,
        "MIB": 2**20,
        "GIB": 2**30,
        "TIB": 2**40,
    }[unit]
    return int(value * scale)


def _free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 8 * 2**30


def http_protocol(header_timeout_s: float) -> type:
    """uvicorn's h11 protocol with a deadline for a request's headers: uvicorn times out idle keep-alive
    connections but not a client that sends its headers a byte at a time (slowloris)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class Protocol(H11Protocol):
        header_deadline = None

        def data_received(self, data: bytes) -> None:
            waiting = self.cycle is None or self.cycle.response_complete  # between requests: headers expected
            if waiting and self.header_deadline is None:
                self.header_deadline = self.loop.call_later(header_timeout_s, self._headers_too_slow)
            super().data_received(data)
            if self.header_deadline is not None and self.cycle is not None and not self.cycle.response_complete:
                self.header_deadline.cancel()  # the request's headers are complete
                self.header_deadline = None

        def _headers_too_slow(self) -> None:
            self.header_deadline = None
            if not self.transport.is_closing():
                self.send_400_response(f"request headers not received within {header_timeout_s:g} s")

        def connection_lost(self, exc: Exception | None) -> None:
            if self.header_deadline is not None:
                self.header_deadline.cancel()
                self.header_deadline = None
            super().connection_lost(exc)

    return Protocol


def uvicorn_config(
    app: FastAPI, host: str, port: int, header_timeout_s: float = 10.0, drain_s: float = 30.0
) -> uvicorn.Config:
    import uvicorn

    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level="warning",
        http=http_protocol(header_timeout_s),
        timeout_graceful_shutdown=int(drain_s),
        h11_max_incomplete_event_size=64 * 1024,
    )


def serve_in_thread(
    server: Server, host: str = "127.0.0.1", header_timeout_s: float = 10.0
) -> tuple[uvicorn.Server, str]:
    """Start uvicorn on a free port in a daemon thread (tests, benchmarks); returns (uvicorn server, base URL).
    Stop it with `uv.should_exit = True`."""
    import socket

    import uvicorn

    with socket.socket() as sock:
        sock.bind((host, 0))
        port = sock.getsockname()[1]
    uv = uvicorn.Server(uvicorn_config(server.app, host, port, header_timeout_s))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not uv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    return uv, f"http://{host}:{port}"


def _load(config: ServerConfig) -> Pipeline:
    from ..pipeline import load

    return load(
        config.model,
        dtype=None if config.dtype == "auto" else getattr(torch, config.dtype),
        device=config.device,
        quantize=config.quantize,
        cpu_matmul=config.cpu_matmul,
        mmap=config.mmap,
        adapter=config.adapter,
        tensor_parallel_size=config.tensor_parallel_size,
        shard_vision=config.shard_vision,
        adapters=[directory for _, directory in config.lora_modules] or None,
    )


def follow_server(config: ServerConfig) -> int:
    """A tensor-parallel rank other than 0: load its share, then run the decoder steps rank 0's engine hands over
    until the server stops (engine.follow)."""
    from ..engine.engine import follow

    follow(_load(config).model)
    return 0


def build_server(config: ServerConfig) -> Server:
    """The server on one process, or on rank 0 of config.tensor_parallel_size (the others run follow_server)."""
    pipe = _load(config)
    if getattr(pipe.model, "cpu_choice", None) is not None:
        log.info("qwen2vl: %s", pipe.model.cpu_choice.describe())
    kv = parse_bytes(str(config.kv_cache_memory), _free_memory(pipe.model.device))
    engine = Engine(
        pipe.model,
        max_num_seqs=config.max_num_seqs,
        max_model_len=config.max_model_len,
        kv_cache_bytes=kv,
        prefill_chunk=config.prefill_chunk,
        max_waiting=config.max_waiting,
        lead=config.tensor_parallel_size > 1,
    )
    local = config.allowed_local_media_path
    policy = MediaPolicy(
        allow_private_addresses=False,
        allowed_domains=config.allowed_media_domains or None,
        allow_local=local is not None,
        local_root=Path(local) if local else None,
    )
    return Server(
        pipe,
        engine,
        config.model_name,
        config.api_key,
        policy,
        config.max_request_bytes,
        limits=config.limits,
        body_timeout_s=config.body_timeout,
        allowed_origins=config.allowed_origins,
        adapter_names=tuple(name for name, _ in config.lora_modules),
    )


def main(config: ServerConfig) -> int:
    import uvicorn

    server = build_server(config)
    s = server.engine.stats()
    print(
        f"qwen2vl serving {server.model_name} on http://{config.host}:{config.port} ({s['kv_slots']} KV slots "
        f"of {server.engine.max_model_len} tokens)",
        flush=True,
    )
    uv = uvicorn.Server(uvicorn_config(server.app, config.host, config.port, config.header_timeout))
    server.loop.on_broken = lambda: setattr(uv, "should_exit", True)
    try:
        uv.run()
    finally:
        server.loop.stopped = True
        if server.loop.thread.is_alive():
            server.loop.thread.join()
        server.engine.close()
    if server.loop.broken:
        raise EngineBroken(server.loop.broken)
    return 0
