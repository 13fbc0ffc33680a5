"""The OpenAI-compatible server, driven over loopback with the official `openai` client and raw HTTP."""

from __future__ import annotations

import base64
import io
import json
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from processing_fixtures import noise_image
from qwen2vl.cli import build_parser
from qwen2vl.serve.config import ServerConfig
from qwen2vl.serve.limits import Limits
from qwen2vl.serve.server import build_server, serve_in_thread

KEY = "sk-test"


def data_uri(w, h, seed=0):
    buf = io.BytesIO()
    noise_image(w, h, seed=seed).save(buf, "PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_the_command_line_fills_every_server_config_field():
    args = build_parser().parse_args(
        [
            "serve",
            "--model",
            "m",
            "--dtype",
            "float32",
            "--port",
            "9",
            "--api-key",
            "k",
            "--served-model-name",
            "n",
            "--max-model-len",
            "77",
            "--allowed-media-domains",
            "a.example",
            "b.example",
            "--max-pixels",
            "1000",
            "--max-video-frames",
            "6",
            "--body-timeout",
            "2.5",
        ]
    )
    config = ServerConfig.from_args(args)
    assert config == ServerConfig(
        model="m",
        dtype="float32",
        port=9,
        api_key="k",
        served_model_name="n",
        max_model_len=77,
        allowed_media_domains=("a.example", "b.example"),
        limits=Limits(max_pixels=1000, max_video_frames=6),
        body_timeout=2.5,
    )
    assert config.model_name == "n" and ServerConfig(model="m").model_name == "m"
    # and with no flags, the command line's defaults are the config's own
    assert ServerConfig.from_args(build_parser().parse_args(["serve", "--model", "m"])) == ServerConfig(model="m")


@pytest.fixture(scope="module")
def server(tiny_ckpt, tmp_path_factory):
    media = tmp_path_factory.mktemp("allowed")
    noise_image(120, 90, seed=5).save(media / "local.png")
    srv = build_server(
        ServerConfig(
            model=str(tiny_ckpt),
            dtype="bfloat16",
            api_key=KEY,
            served_model_name="tiny",
            max_model_len=1024,
            max_num_seqs=16,
            kv_cache_memory="1GiB",
            max_waiting=64,
            prefill_chunk=64,
            allowed_local_media_path=str(media),
            max_request_bytes=2 * 2**20,
        )
    )
    uv, srv.base = serve_in_thread(srv, header_timeout_s=2.0)
    srv.media = media
    yield srv
    uv.should_exit = True


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0)


def ask(client, content, **kw):
    return client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": content}],
        temperature=0,
        max_tokens=kw.pop("max_tokens", 8),
        **kw,
    )


def test_non_streaming_and_streaming_agree(client):
    content = [{"type": "image_url", "image_url": {"url": data_uri(100, 80)}}, {"type": "text", "text": "Describe."}]
    r = ask(client, content)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8
    assert r.usage.prompt_tokens_details.image_tokens == 12  # 112x84 -> 4x3 merged tokens
    stream = ask(client, content, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 8


def test_n_logprobs_stop_seed_and_extras(client, server):
    r = ask(client, "Count to ten.", n=2, logprobs=True, top_logprobs=3, max_tokens=5)
    assert [c.index for c in r.choices] == [0, 1] and r.choices[0].message.content == r.choices[1].message.content
    lp = r.choices[0].logprobs.content
    assert len(lp) == 5 and len(lp[0].top_logprobs) == 3 and lp[0].logprob <= 0
    s1 = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        temperature=1.0,
        seed=11,
        max_tokens=6,
        extra_body={"top_k": 20, "repetition_penalty": 1.1},
    )
    s2 = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Hi"}],
        temperature=1.0,
        seed=11,
        max_tokens=6,
        extra_body={"top_k": 20, "repetition_penalty": 1.1},
    )
    assert s1.choices[0].message.content == s2.choices[0].message.content
    full = ask(client, "Tell me more.", max_tokens=12).choices[0].message.content
    # a two-character stop string taken from the answer itself, past its first character and not blank
    start = next(i for i in range(1, len(full) - 1) if full[i : i + 2].strip())
    stop = full[start : start + 2]
    cut = ask(client, "Tell me more.", max_tokens=12, stop=[stop])
    assert cut.choices[0].message.content == full[: full.find(stop)] and cut.choices[0].finish_reason == "stop"


def test_per_item_fields_video_frames_and_local_files(client, server):
    frames = [data_uri(64, 48, seed=i) for i in range(4)]
    r = ask(client, [{"type": "video_url", "video_url": {"url": frames}}, {"type": "text", "text": "?"}])
    assert r.usage.prompt_tokens_details.video_tokens > 0
    small = ask(
        client,
        [
            {"type": "image_url", "image_url": {"url": data_uri(400, 300), "max_pixels": 28 * 28 * 4}},
            {"type": "text", "text": "?"},
        ],
    )
    # 400x300 under max_pixels 3136 -> 28x56 (qwen-vl-utils), then the processor's min bound -> 56x84: 6 tokens,
    # against 154 without the per-item limit
    assert small.usage.prompt_tokens_details.image_tokens == 6
    local = ask(client, [{"type": "image_url", "image_url": {"url": f"file://{server.media / 'local.png'}"}}])
    assert local.usage.prompt_tokens_details.image_tokens > 0


def test_sixteen_concurrent_mixed_requests_equal_each_alone(client):
    frames = [data_uri(56, 56, seed=20 + i) for i in range(4)]
    contents = []
    for i in range(16):
        if i % 4 == 0:
            contents.append(f"Question number {i}: what is {i} plus {i}?")
        elif i % 4 == 3:
            contents.append([{"type": "video_url", "video_url": {"url": frames}}, {"type": "text", "text": f"v{i}"}])
        else:
            contents.append(
                [
                    {"type": "image_url", "image_url": {"url": data_uri(60 + 20 * i, 50 + 9 * i, seed=i)}},
                    {"type": "text", "text": f"Image {i}?"},
                ]
            )
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(lambda c: ask(client, c, max_tokens=10).choices[0].message.content, contents))
    alone = [ask(client, c, max_tokens=10).choices[0].message.content for c in contents]
    assert together == alone


def raw(server, body, headers=None, method="POST", path="/v1/chat/completions"):
    h = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})}
    content = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return httpx.request(method, server.base + path, content=content, headers=h, timeout=30)


def test_errors_are_openai_shaped_and_harmless(server, client):
    ok = {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    cases = [
        (raw(server, ok, {"Authorization": "Bearer wrong"}), 401, "invalid_api_key"),
        (raw(server, {**ok, "model": "gpt-9"}), 404, "model_not_found"),
        (raw(server, b"{not json"), 400, None),
        (raw(server, {**ok, "temperature": "hot"}), 400, None),
        (raw(server, {**ok, "messages": [{"role": "user", "content": [{"type": "audio", "x": 1}]}]}), 400, None),
        (
            raw(
                server,
                {
                    **ok,
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}],
                        }
                    ],
                },
            ),
            400,
            None,
        ),
        (
            raw(server, {**ok, "messages": [{"role": "user", "content": "word " * 1100}]}),
            400,
            "context_length_exceeded",
        ),
        (
            raw(
                server,
                {
                    **ok,
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": "file:///etc/hostname"}}],
                        }
                    ],
                },
            ),
            400,
            None,
        ),
        (
            raw(
                server,
                {
                    **ok,
                    "messages": [
                        {
                            "role": "user",
                            "content": [{"type": "image_url", "image_url": {"url": "http://127.0.0.1:1/x.png"}}],
                        }
                    ],
                },
            ),
            400,
            None,
        ),
        (raw(server, b"x" * (3 * 2**20)), 413, None),
    ]
    for response, status, code in cases:
        assert response.status_code == status, response.text
        err = response.json()["error"]
        assert err["message"] and "type" in err
        if code:
            assert err["code"] == code
    tokens = raw(server, {**ok, "messages": [{"role": "user", "content": "word " * 1100}]}).json()["error"]["message"]
    assert "1024" in tokens and "11" in tokens  # the limit and the prompt's token count
    assert raw(server, None, method="GET", path="/health").status_code == 200
    models = raw(server, None, method="GET", path="/v1/models").json()
    assert models["data"][0]["id"] == "tiny"
    metrics = raw(server, None, method="GET", path="/metrics").text
    assert "qwen2vl_requests_waiting" in metrics and "qwen2vl_kv_cache_usage" in metrics
    assert ask(client, "still fine?").choices[0].message.content  # the server is unharmed


def test_queue_full_is_429_and_disconnect_frees_the_slot(server, client):
    engine = server.engine
    saved = engine.max_waiting
    engine.max_waiting = 0
    try:
        r = raw(server, {"model": "tiny", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
        assert r.status_code == 429 and r.headers.get("retry-after") == "1"
    finally:
        engine.max_waiting = saved
    body = {
        "model": "tiny",
        "messages": [{"role": "user", "content": "Talk for long."}],
        "max_tokens": 900,
        "stream": True,
    }
    with httpx.stream(
        "POST", server.base + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=30
    ) as resp:
        for line in resp.iter_lines():
            if line.startswith("data:") and '"content"' in line:
                break
    for _ in range(100):
        if engine.stats()["running"] == 0 and engine.stats()["kv_slots_used"] == 0:
            break
        time.sleep(0.05)
    assert engine.stats()["kv_slots_used"] == 0 and engine.stats()["generated_tokens"] < 800
