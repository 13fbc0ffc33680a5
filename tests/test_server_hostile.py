"""The server against hostile clients: every limit checked from cheap facts before work, every bad field a 400,
disconnects and slow clients that hold nothing, errors that are always the OpenAI object.

Each case here failed before the hardening (a 500, gigabytes of work, or a slot held after the client left).
"""

from __future__ import annotations

import base64
import io
import json
import os
import socket
import struct
import threading
import time
import zlib

import httpx
import pytest

from processing_fixtures import noise_image
from qwen2vl.processing import media
from qwen2vl.serve.config import ServerConfig
from qwen2vl.serve.limits import Limits
from qwen2vl.serve.server import build_server, serve_in_thread

KEY = "sk-test"
CONTEXT = 1024


def png_uri(w: int, h: int, seed: int = 0) -> str:
    buf = io.BytesIO()
    noise_image(w, h, seed=seed).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def png_declaring(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height, with a tiny (wrong) body: costs nothing unless decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    media_dir = tmp_path_factory.mktemp("allowed")
    noise_image(64, 48, seed=3).save(media_dir / "ok.png")
    (media_dir / "bomb.png").write_bytes(png_declaring(50000, 50000))
    srv = build_server(
        ServerConfig(
            model=str(tiny_ckpt),
            dtype="bfloat16",
            api_key=KEY,
            served_model_name="tiny",
            max_model_len=CONTEXT,
            max_num_seqs=4,
            kv_cache_memory="1GiB",
            prefill_chunk=64,
            allowed_local_media_path=str(media_dir),
            max_request_bytes=4 * 2**20,
            body_timeout=1,
        )
    )
    uv, srv.base = serve_in_thread(srv, header_timeout_s=1.0)
    srv.media = media_dir
    yield srv
    uv.should_exit = True


def post(server, body, **kw) -> httpx.Response:
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.post(
        server.base + "/v1/chat/completions",
        content=content,
        timeout=kw.pop("timeout", 60),
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
        **kw,
    )


def request(content, **fields) -> dict:
    return {
        "model": "tiny",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": 2,
        "temperature": 0,
        **fields,
    }


def image_part(url, **fields) -> dict:
    return {"type": "image_url", "image_url": {"url": url, **fields}}


def error_of(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, (response.status_code, response.text[:500])
    err = response.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    assert "Traceback" not in err["message"] and "torch" not in err["message"]
    return err


class RssPeak:
    """Samples this process's resident memory every 2 ms while in use: the peak a request caused, even briefly."""

    def __enter__(self):
        self.base = self.peak = self._rss()
        self.running = True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()

    @property
    def grew(self) -> int:
        return self.peak - self.base


@pytest.fixture
def no_decoding(monkeypatch):
    """Counts every picture decoded (image pixels loaded, video frames decoded): refused requests must decode none."""
    calls = []
    decode, frames = media._decode, media.load_image

    def counting_decode(*a, **k):
        calls.append("image")
        return decode(*a, **k)

    def counting_load(*a, **k):
        calls.append("frame")
        return frames(*a, **k)

    monkeypatch.setattr(media, "_decode", counting_decode)
    monkeypatch.setattr(media, "load_image", counting_load)
    import qwen2vl.processing.processor as processor
    import qwen2vl.processing.video as video

    monkeypatch.setattr(processor, "load_image", counting_load)
    monkeypatch.setattr(video, "load_image", counting_load)
    return calls


# -- 1. cost is bounded before any work --------------------------------------------------------------------------
def test_refused_before_decoding_with_bounded_memory(server, no_decoding):
    one_pixel = png_uri(1, 1)
    hostile = [
        # eight 1x1 PNGs each asking to be upscaled to 12.8 MP (was 20 s and 3.8 GB)
        request([image_part(one_pixel, min_pixels=12845056) for _ in range(8)] + ["Describe."]),
        # a video of 1,000 1x1 frames (was +3.2 GB), and of 10,000
        request([{"type": "video_url", "video_url": {"url": [one_pixel] * 1000}}]),
        request([{"type": "video_url", "video_url": {"url": [one_pixel] * 10000}}]),
        # a four-frame video asking for 2e7 pixels per frame (was +2.5 GB)
        request([{"type": "video_url", "video_url": {"url": [one_pixel] * 4, "min_pixels": 2e7}}]),
        # more items than the server takes
        request([image_part(one_pixel) for _ in range(17)]),
        # an explicit size beyond the server's bound
        request([image_part(one_pixel, resized_height=4000, resized_width=4000)]),
    ]
    for body in hostile:
        with RssPeak() as rss:
            err = error_of(post(server, body), 400)
        assert rss.grew < 150 * 2**20, (err, rss.grew)
    assert no_decoding == []


def test_clamped_fields_give_the_servers_bound(server):
    """A client may lower the pixel bound, never raise it: min_pixels above --max-pixels is sized at the bound."""
    limits = Limits(max_pixels=200_000, max_video_pixels=100_000, max_video_frames=8)
    image, video = limits.apply(
        [
            {
                "role": "user",
                "content": [
                    {"type": "image", "image": "a.png", "min_pixels": 10**9},
                    {"type": "video", "video": "v.mp4", "min_pixels": 10**9, "max_pixels": 50_000, "min_frames": 100},
                    {"type": "text", "text": "?"},
                ],
            }
        ]
    )[0]["content"][:2]
    assert image == {"type": "image", "image": "a.png", "min_pixels": 200_000, "max_pixels": 200_000}
    assert video == {
        "type": "video",
        "video": "v.mp4",
        "min_pixels": 100_000,
        "max_pixels": 50_000,
        "min_frames": 8,
        "max_frames": 8,
    }
    # through the server: 10^9 pixels asked, planned at the bound (1280 tokens), refused for the 1024 context
    err = error_of(post(server, request([image_part(png_uri(28, 28), min_pixels=10**9)])), 400)
    tokens = int(err["message"].split("(")[1].split()[0])
    assert server.limits.max_pixels // 784 < tokens < server.limits.max_pixels // 784 + 100
    lowered = post(server, request([image_part(png_uri(400, 300), max_pixels=28 * 28 * 4)]))
    assert lowered.json()["usage"]["prompt_tokens_details"]["image_tokens"] == 6


def test_max_tokens_over_the_context_names_the_numbers(server):
    err = error_of(post(server, request("Hi", max_tokens=CONTEXT)), 400)
    assert str(CONTEXT) in err["message"] and err["code"] == "context_length_exceeded"
    err = error_of(post(server, request("word " * 600, max_tokens=600)), 400)
    assert str(CONTEXT) in err["message"] and "600 in the completion" in err["message"]
    assert post(server, request("word " * 600)).status_code == 200  # without max_tokens: capped to the room


# -- 4. bad fields are 400s, never 500s ----------------------------------------------------------------------------
BAD_BODIES = [
    request("Hi", seed=2**64),
    request("Hi", seed=-(2**63) - 1),
    request("Hi", stream_options="yes"),
    request("Hi", stream_options={"include_usage": "yes"}),
    request("Hi", stream="false"),
    request("Hi", logprobs="yes"),
    request("Hi", n=0),
    request("Hi", n=2.5),
    request("Hi", max_tokens="10"),
    request("Hi", max_tokens=True),
    request("Hi", temperature=[1]),
    request("Hi", top_p=0),
    request("Hi", stop=[1, 2]),
    request("Hi", stop=["x"] * 17),
    request("Hi", stop=["x" * 5000]),
    request("Hi", stop=[""]),
    request([image_part(png_uri(8, 8), max_pixels="abc")]),
    request([image_part(png_uri(8, 8), max_pixels=[1])]),
    request([image_part(png_uri(8, 8), min_pixels=-5)]),
    request([image_part(png_uri(8, 8), max_pixels=1.5)]),
    request([{"type": "video_url", "video_url": {"url": [png_uri(8, 8)] * 4, "nframes": "x"}}]),
    request([{"type": "video_url", "video_url": {"url": [png_uri(8, 8)] * 4, "video_start": "abc"}}]),
    request([{"type": "video_url", "video_url": {"url": [png_uri(8, 8)] * 4, "fps": 0}}]),
    request([{"type": "image_url", "image_url": {"url": 5}}]),
    request([{"type": "image_url"}]),
    request([{"type": "audio", "x": 1}]),
    request([7]),
    {"model": "tiny", "messages": []},
    {"model": 5, "messages": [{"role": "user", "content": "Hi"}]},
    {"messages": [{"role": "user", "content": "Hi"}]},
    {"model": "tiny", "messages": [{"role": "wizard", "content": "Hi"}]},
    {"model": "tiny", "messages": [{"role": "user", "content": 5}]},
    {"model": "tiny", "messages": "Hi"},
    [1, 2, 3],
    "just a string",
]


@pytest.mark.parametrize("body", BAD_BODIES, ids=range(len(BAD_BODIES)))
def test_bad_fields_are_400(server, body):
    error_of(post(server, body), 400)


def test_json_that_python_accepts_but_json_does_not(server):
    for text in (
        '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": NaN}',
        '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "temperature": Infinity}',
        '{"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "top_p": -Infinity}',
        "[" * 100000 + "]" * 100000,
        '{"a": ' * 100000 + "1" + "}" * 100000,
        b"\xff\xfe not utf-8",
    ):
        error_of(post(server, text), 400)


def test_megabytes_of_text_are_refused_without_tokenising(server, monkeypatch):
    from qwen2vl.processing.tokenizer import Tokenizer

    encoded = []
    monkeypatch.setattr(Tokenizer, "encode", lambda self, text: encoded.append(len(text)) or [])
    with RssPeak() as rss:
        err = error_of(post(server, request("hello world " * 300_000)), 400)  # 3.6 MB (60 MB took 36 s, 8 GB)
    assert err["code"] == "context_length_exceeded" and "at least" in err["message"]
    assert encoded == [] and rss.grew < 200 * 2**20


def test_tiny_temperature_is_greedy_not_an_overflow(server):
    greedy = post(server, request("Count.", max_tokens=4)).json()["choices"][0]["message"]["content"]
    tiny = post(server, request("Count.", max_tokens=4, temperature=1e-40))
    assert tiny.status_code == 200 and tiny.json()["choices"][0]["message"]["content"] == greedy
    assert post(server, request("Count.", max_tokens=2, temperature=1.0, seed=2**63 - 1, n=2)).status_code == 200


def test_hostile_media_files(server):
    bomb = png_declaring(50000, 50000)
    cases = [
        image_part(uri(bomb)),
        image_part(f"file://{server.media / 'bomb.png'}"),
        image_part(uri(png_declaring(9000, 9000))),  # under PIL's bomb limit, over the policy's pixel cap
        image_part(uri(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)),  # truncated
        image_part(uri(b"GIF89a" + b"\xff" * 20)),
        image_part(f"file://{server.media}/a\u0000b.png"),  # NUL byte in a path
        image_part("file://" + str(server.media / ("x" * 5000))),  # a name too long for the OS
        image_part(f"file://{server.media}"),  # a directory
        {"type": "video_url", "video_url": {"url": [uri(png_declaring(8, 8)), uri(bomb)]}},
        {"type": "video_url", "video_url": {"url": uri(b"\x00\x00\x00\x18ftypmp42" + b"\0" * 64)}},
    ]
    for part in cases:
        error_of(post(server, request([part, "What is this?"])), 400)
    assert post(server, request([image_part(f"file://{server.media / 'ok.png'}")])).status_code == 200


# -- 6. smaller things ---------------------------------------------------------------------------------------------
def test_routes_methods_and_auth_errors_are_openai_shaped(server):
    h = {"Authorization": f"Bearer {KEY}"}
    assert error_of(httpx.get(server.base + "/v1/nothing", headers=h), 404)["type"] == "not_found_error"
    error_of(httpx.get(server.base + "/v1/chat/completions", headers=h), 405)
    error_of(httpx.delete(server.base + "/v1/models", headers=h), 405)
    error_of(httpx.post(server.base + "/v1/chat/completions", content=b"{}"), 401)


def test_unsupported_fields_are_refused_by_name(server):
    for field, value in [
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
        ("min_p", 0.1),
        ("best_of", 2),
        ("use_beam_search", True),
        ("prompt_logprobs", 1),
        ("echo", True),
    ]:
        err = error_of(post(server, request("Hi", **{field: value})), 400)
        assert field in err["message"] and err["param"] == field
    # their no-op values, and unknown harmless fields, are accepted
    ok = post(
        server,
        request(
            "Hi",
            tools=[],
            tool_choice="none",
            response_format={"type": "text"},
            presence_penalty=0,
            frequency_penalty=0.0,
            logit_bias={},
            user="u1",
            metadata={"a": "b"},
            store=False,
        ),
    )
    assert ok.status_code == 200, ok.text
    # tool messages are rendered (Qwen2.5's <tool_response> turn); the deprecated function_call is refused
    ok = post(
        server,
        {
            "model": "tiny",
            "max_tokens": 2,
            "messages": [{"role": "user", "content": "Hi"}, {"role": "tool", "content": "42", "tool_call_id": "c1"}],
        },
    )
    assert ok.status_code == 200, ok.text
    err = error_of(
        post(
            server,
            {
                "model": "tiny",
                "max_tokens": 2,
                "messages": [{"role": "assistant", "content": "", "function_call": {"name": "f", "arguments": "{}"}}],
            },
        ),
        400,
    )
    assert "function_call" in err["message"]
    as_system = post(
        server,
        {
            "model": "tiny",
            "max_tokens": 3,
            "messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        },
    ).json()
    as_developer = post(
        server,
        {
            "model": "tiny",
            "max_tokens": 3,
            "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
        },
    ).json()
    assert as_developer["choices"][0]["message"] == as_system["choices"][0]["message"]


def _raw_socket(server) -> socket.socket:
    host, port = server.base.removeprefix("http://").split(":")
    return socket.create_connection((host, int(port)), timeout=10)


def test_slow_headers_and_slow_body_are_cut_off(server, caplog):
    with _raw_socket(server) as s:  # headers one piece at a time, never finished
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")
        started = time.monotonic()
        answer = b""
        while chunk := s.recv(4096):
            answer += chunk
            if time.monotonic() - started > 8:
                break
        assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    body = json.dumps(request("Hi")).encode()
    with _raw_socket(server) as s:  # headers complete, body never finished
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body[:10]
        )
        answer = s.recv(65536)
        assert answer.startswith(b"HTTP/1.1 408"), answer[:100]
    with caplog.at_level("ERROR"):
        with _raw_socket(server) as s:  # gone in the middle of its body: not an error worth a traceback
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + KEY.encode()
                + b'\r\nContent-Length: 1000\r\n\r\n{"model"'
            )
        time.sleep(0.3)
    assert not [r for r in caplog.records if r.levelname == "ERROR"], caplog.text
    assert server.engine.stats()["kv_slots_used"] == 0


def _metric(server, name: str) -> float:
    text = httpx.get(server.base + "/metrics").text
    return float(next(line.split()[1] for line in text.splitlines() if line.startswith(name + " ")))


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_goes_away_frees_its_slot_within_a_step(server, stream):
    body = json.dumps(request("Talk for long.", max_tokens=900, stream=stream)).encode()
    before = _metric(server, "qwen2vl_generation_tokens_total")
    with _raw_socket(server) as s:
        s.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
            + KEY.encode()
            + b"\r\nContent-Type: application/json\r\nContent-Length: "
            + str(len(body)).encode()
            + b"\r\n\r\n"
            + body
        )
        deadline = time.monotonic() + 30
        while _metric(server, "qwen2vl_generation_tokens_total") < before + 5:  # decoding has started
            assert time.monotonic() < deadline
            time.sleep(0.01)
    deadline = time.monotonic() + 10
    while _metric(server, "qwen2vl_kv_slots_used") > 0:
        assert time.monotonic() < deadline, "the slot was not freed"
        time.sleep(0.01)
    produced = _metric(server, "qwen2vl_generation_tokens_total") - before
    time.sleep(0.3)
    assert _metric(server, "qwen2vl_generation_tokens_total") - before == produced < 900
    assert _metric(server, "qwen2vl_requests_prefilling") == 0 and _metric(server, "qwen2vl_vision_pieces_total") >= 0
    assert 0 < _metric(server, "qwen2vl_engine_longest_step_seconds") < 60


def test_requests_waiting_for_preparation_are_bounded(server):
    engine, saved = server.engine, server.engine.max_waiting
    engine.max_waiting = 1
    try:
        with _raw_socket(server) as s:  # one request stuck in its body read holds the only place
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                + KEY.encode()
                + b"\r\nContent-Length: 1000\r\n\r\n{"
            )
            time.sleep(0.2)
            busy = post(server, request("Hi"))
            assert error_of(busy, 429)["type"] == "rate_limit_error" and busy.headers["retry-after"] == "1"
        time.sleep(1.5)  # the stuck one timed out (408) and gave its place back
        assert post(server, request("Hi")).status_code == 200
    finally:
        engine.max_waiting = saved


def test_fit_field_fits_a_long_video_instead_of_refusing(server):
    from qwen2vl.testing.video import write_test_video

    video = write_test_video(server.media / "long.mp4", 60, size=(320, 180), fps=12, gop=60)
    part = {"type": "video_url", "video_url": {"url": f"file://{video}"}}
    err = error_of(post(server, request([part, "Summarise."], max_tokens=24)), 400)
    assert err["code"] == "context_length_exceeded"
    fitted = post(server, request([part, "Summarise."], max_tokens=24, fit=True))
    assert fitted.status_code == 200, fitted.text
    usage = fitted.json()["usage"]
    assert usage["prompt_tokens"] + 24 <= CONTEXT and usage["prompt_tokens_details"]["video_tokens"] > 0
    error_of(post(server, request([part], fit="yes")), 400)
