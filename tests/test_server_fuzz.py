"""Fuzzing the server: request bodies generated from the chat-completions schema, then mutated (types, ranges,
nesting, huge and non-finite numbers, odd unicode, media parts pointing at small hostile files), sent to the
server running in this process. Whatever arrives: never a 5xx, never a hang, memory within a stated bound, and a
normal request afterwards gets the same tokens as before."""

from __future__ import annotations

import base64
import io
import json

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from processing_fixtures import noise_image
from qwen2vl.serve.config import ServerConfig
from qwen2vl.serve.server import build_server, serve_in_thread
from test_server_hostile import RssPeak, png_declaring

KEY = "sk-fuzz"
MEMORY_BOUND = 600 * 2**20  # growth of this process's peak RSS over the whole run (the model itself is loaded)
REQUEST_TIMEOUT = 60  # seconds; a request that takes longer is a hang


def _data_uri(data: bytes, kind: str = "image/png") -> str:
    return f"data:{kind};base64," + base64.b64encode(data).decode()


def _png(w: int, h: int) -> bytes:
    buf = io.BytesIO()
    noise_image(w, h, seed=w * h).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    media = tmp_path_factory.mktemp("fuzz_media")
    (media / "ok.png").write_bytes(_png(40, 30))
    (media / "bomb.png").write_bytes(png_declaring(60000, 60000))
    (media / "text.png").write_text("not an image")
    (media / "empty.png").write_bytes(b"")
    srv = build_server(
        ServerConfig(
            model=str(tiny_ckpt),
            dtype="bfloat16",
            api_key=KEY,
            served_model_name="tiny",
            max_model_len=512,
            max_num_seqs=4,
            kv_cache_memory="512MiB",
            prefill_chunk=64,
            allowed_local_media_path=str(media),
            max_request_bytes=2**20,
            body_timeout=5,
        )
    )
    uv, srv.base = serve_in_thread(srv, header_timeout_s=5.0)
    srv.media = media
    yield srv
    uv.should_exit = True


def hostile_sources(media) -> list:
    good = _png(30, 20)
    return [
        _data_uri(good),
        _data_uri(good[:40]),
        _data_uri(png_declaring(60000, 60000)),
        _data_uri(b""),
        _data_uri(b"GIF89a" + b"\x00" * 10),
        _data_uri(b"\x00" * 64, "video/mp4"),
        "data:image/png,notbase64",
        "data:image/png;base64,@@@@",
        f"file://{media / 'ok.png'}",
        f"file://{media / 'bomb.png'}",
        f"file://{media / 'text.png'}",
        f"file://{media / 'empty.png'}",
        f"file://{media / 'missing.png'}",
        f"file://{media}",
        f"file://{media}/../../etc/passwd",
        "file:///etc/passwd",
        "/etc/passwd",
        "http://127.0.0.1:1/x.png",
        "http://[::1]:1/x.png",
        "ftp://example.com/x.png",
        "gopher://x",
        "",
        "file://" + "x" * 5000,
        f"file://{media}/a\u0000b.png",
        [_data_uri(good)] * 3,
        [],
        ["x"],
        [None],
    ]


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20),
    st.sampled_from(["", "\u0000", "\ud7ff\ufffd", "🙂" * 10, "-1", "1e400", "NaN", "true", "text", "image_url"]),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12,
)

ITEM_KEYS = [
    "min_pixels",
    "max_pixels",
    "total_pixels",
    "resized_height",
    "resized_width",
    "fps",
    "nframes",
    "min_frames",
    "max_frames",
    "video_start",
    "video_end",
    "detail",
]
TOP_KEYS = [
    "model",
    "messages",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "top_k",
    "repetition_penalty",
    "seed",
    "stop",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "response_format",
    "presence_penalty",
    "logit_bias",
    "user",
    "zzz_unknown",
    "frequency_penalty",
    "guided_json",
    "guided_regex",
    "guided_choice",
    "structured_outputs",
    "parallel_tool_calls",
]


@st.composite
def bodies(draw, sources):
    parts = []
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["text", "image_url", "video_url"]))
        if kind == "text":
            parts.append({"type": "text", "text": draw(st.text(max_size=30))})
            continue
        inner = {"url": draw(st.sampled_from(sources))}
        for key in draw(st.lists(st.sampled_from(ITEM_KEYS), max_size=3)):
            inner[key] = draw(st.one_of(json_leaf, st.integers(0, 10**9), st.floats(0, 1e9)))
        parts.append({"type": kind, kind: inner})
    role = draw(st.sampled_from(["user"] * 6 + ["system", "assistant", "developer", "tool", "robot", 3]))
    body = {"model": "tiny", "messages": [{"role": role, "content": parts or "Hi"}], "max_tokens": 2, "temperature": 0}
    # mutate, add or drop top-level fields (half the bodies keep the valid frame, so their media is reached)
    for key in draw(st.lists(st.sampled_from(TOP_KEYS), max_size=draw(st.sampled_from([0, 3])))):
        choice = draw(st.integers(0, 2))
        if choice == 0:
            body.pop(key, None)
        else:
            body[key] = draw(json_value)
    if body.get("stream") is True and not isinstance(body.get("max_tokens"), int):
        body["max_tokens"] = 2
    return body


def _normal(server) -> str:
    r = httpx.post(
        server.base + "/v1/chat/completions",
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
        json={
            "model": "tiny",
            "max_tokens": 6,
            "temperature": 0,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image_url", "image_url": {"url": _data_uri(_png(60, 40))}},
                        {"type": "text", "text": "What is this?"},
                    ],
                }
            ],
        },
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["message"]["content"]


def test_fuzzed_requests_never_5xx_hang_or_leak(server):
    before = _normal(server)
    seen: dict[int, int] = {}
    with RssPeak() as rss:

        @settings(
            max_examples=300, deadline=None, database=None, derandomize=True, suppress_health_check=list(HealthCheck)
        )
        @given(bodies(hostile_sources(server.media)), st.booleans())
        def one(body, raw_bytes):
            if isinstance(body.get("max_tokens"), int) and body["max_tokens"] > 64:
                body["max_tokens"] = 64  # keep the run short; large values are covered by the limit tests
            content = json.dumps(body) if not raw_bytes else json.dumps(body).encode("utf-8", "surrogatepass")
            r = httpx.post(
                server.base + "/v1/chat/completions",
                content=content,
                timeout=REQUEST_TIMEOUT,
                headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
            )
            seen[r.status_code] = seen.get(r.status_code, 0) + 1
            assert r.status_code < 500, (body, r.text[:300])
            if r.status_code != 200:
                err = r.json()["error"]
                assert err["message"] and "Traceback" not in err["message"]

        one()
    print(f"status codes: {dict(sorted(seen.items()))}; peak RSS growth {rss.grew / 2**20:.0f} MiB")
    assert seen.get(200, 0) >= 5 and seen.get(400, 0) >= 50  # the generator reaches both sides
    assert rss.grew < MEMORY_BOUND
    assert server.engine.stats()["kv_slots_used"] == 0
    assert _normal(server) == before
