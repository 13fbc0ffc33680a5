"""The server's structured output, tool calls, penalties, /v1/completions, CORS, cached tokens and latency
histograms, driven by the official `openai` client and raw HTTP on the random tiny checkpoint."""

from __future__ import annotations

import json
import random
from concurrent.futures import ThreadPoolExecutor

import httpx
import jsonschema
import openai
import pytest
import torch

import qwen2vl
from qwen2vl.cli import build_parser
from qwen2vl.processing.chat import normalize_messages, render
from qwen2vl.processing.tools import render_tools
from qwen2vl.serve.config import ServerConfig
from qwen2vl.serve.server import build_server, serve_in_thread
from test_structured import CLOCK, WEATHER, random_schema

KEY = "sk-test"
ORIGIN = "http://app.example"


@pytest.fixture(scope="module")
def server(tiny_ckpt):
    srv = build_server(
        ServerConfig.from_args(
            build_parser().parse_args(
                [
                    "serve",
                    "--model",
                    str(tiny_ckpt),
                    "--dtype",
                    "float32",
                    "--api-key",
                    KEY,
                    "--served-model-name",
                    "tiny",
                    "--max-model-len",
                    "1024",
                    "--max-num-seqs",
                    "8",
                    "--kv-cache-memory",
                    "1GiB",
                    "--prefill-chunk",
                    "32",
                    "--allowed-origins",
                    ORIGIN,
                ]
            )
        )
    )
    uv, srv.base = serve_in_thread(srv)
    yield srv
    uv.should_exit = True


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return qwen2vl.load(str(tiny_ckpt), dtype=torch.float32, progress=False)


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key=KEY, max_retries=0, timeout=300)


def post(server, body, path="/v1/chat/completions", **kw):
    return httpx.post(server.base + path, json=body, headers={"Authorization": f"Bearer {KEY}", **kw}, timeout=300)


def user(text):
    return [{"role": "user", "content": text}]


def schema_format(schema):
    return {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema, "strict": True}}


# -- structured output ---------------------------------------------------------------------------------------------
def test_json_schema_streaming_and_not_validate(client):
    for seed in range(3):
        schema = random_schema(random.Random(100 + seed))
        r = client.chat.completions.create(
            model="tiny", messages=user(f"JSON {seed}"), max_tokens=400, response_format=schema_format(schema)
        )
        assert r.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
        chunks = list(
            client.chat.completions.create(
                model="tiny",
                messages=user(f"JSON {seed}"),
                max_tokens=400,
                response_format=schema_format(schema),
                stream=True,
            )
        )
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text == r.choices[0].message.content  # greedy: the same answer either way
        assert chunks[-1].choices[0].finish_reason == "stop"


def test_constrained_and_free_requests_share_the_batch(client):
    """Each constrained request validates and each free one is exactly what it is alone."""
    free = [user(f"Tell me about {w}") for w in ("cats", "the sea", "tea")]
    alone = [
        client.chat.completions.create(model="tiny", messages=m, max_tokens=24).choices[0].message.content for m in free
    ]
    schemas = [random_schema(random.Random(200 + k)) for k in range(3)]

    def constrained(k):
        kw = {"temperature": 1.0, "top_p": 1.0, "seed": k, "extra_body": {"top_k": 0}} if k % 2 else {}
        r = client.chat.completions.create(
            model="tiny", messages=user(f"data {k}"), max_tokens=400, response_format=schema_format(schemas[k]), **kw
        )
        return r.choices[0]

    with ThreadPoolExecutor(6) as pool:
        jobs = [pool.submit(constrained, k) for k in range(3)]
        free_jobs = [
            pool.submit(
                lambda m: (
                    client.chat.completions.create(model="tiny", messages=m, max_tokens=24).choices[0].message.content
                ),
                m,
            )
            for m in free
        ]
        for k, job in enumerate(jobs):
            choice = job.result()
            assert choice.finish_reason == "stop"
            jsonschema.validate(json.loads(choice.message.content), schemas[k])
        assert [j.result() for j in free_jobs] == alone


def test_n_choices_each_follow_the_grammar(client):
    schema = random_schema(random.Random(7))
    r = client.chat.completions.create(
        model="tiny",
        messages=user("several"),
        max_tokens=400,
        n=3,
        seed=5,
        temperature=1.0,
        top_p=1.0,
        response_format=schema_format(schema),
        extra_body={"top_k": 0},
    )
    for c in r.choices:
        assert c.finish_reason == "stop"
        jsonschema.validate(json.loads(c.message.content), schema)


def test_vllm_style_fields(client, server):
    choices = ["alpha", "beta gamma"]
    r = client.chat.completions.create(
        model="tiny", messages=user("pick"), max_tokens=20, extra_body={"guided_choice": choices}
    )
    assert r.choices[0].message.content in choices
    r = client.chat.completions.create(
        model="tiny", messages=user("id"), max_tokens=20, extra_body={"guided_regex": r"[a-f]{4}-\d\d"}
    )
    import re

    assert re.fullmatch(r"[a-f]{4}-\d\d", r.choices[0].message.content)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    for body in (
        {"guided_json": schema},
        {"guided_json": json.dumps(schema)},
        {"structured_outputs": {"json": schema}},
    ):
        r = client.chat.completions.create(model="tiny", messages=user("ok?"), max_tokens=40, extra_body=body)
        jsonschema.validate(json.loads(r.choices[0].message.content), schema)
    r = post(
        server,
        {"model": "tiny", "messages": user("x"), "max_tokens": 20, "structured_outputs": {"choice": ["one", "two"]}},
    )
    assert r.json()["choices"][0]["message"]["content"] in ("one", "two")


@pytest.mark.parametrize(
    "body,param,words",
    [
        ({"response_format": schema_format({"type": "objectx"})}, "response_format", "objectx"),
        ({"response_format": {"type": "yaml"}}, "response_format", "yaml"),
        ({"response_format": {"type": "json_schema"}}, "response_format", "json_schema"),
        ({"guided_regex": "(unclosed"}, "guided_regex", "regex"),
        ({"guided_json": "{not json"}, None, "not valid JSON"),
        ({"guided_grammar": "root ::= nowhere"}, "guided_grammar", "nowhere"),
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided_choice", "give one"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs", "exactly one"),
        ({"response_format": {"type": "json_object"}, "tools": [WEATHER]}, "response_format", "tool_choice"),
        ({"tool_choice": "required"}, "tool_choice", "needs tools"),
        (
            {"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "other"}}},
            "tool_choice",
            "other",
        ),
        ({"tools": [{"type": "function", "function": {"name": "bad name!"}}]}, "tools", "pattern"),
        ({"logit_bias": {"999999": 1}}, "logit_bias", "vocabulary"),
        ({"logit_bias": {"abc": 1}}, "logit_bias", "token ids"),
        ({"logit_bias": {"5": 101}}, "logit_bias", "100"),
        ({"presence_penalty": 2.5}, "presence_penalty", "2"),
        ({"frequency_penalty": "1"}, "frequency_penalty", "number"),
        ({"functions": [{"name": "f"}]}, "functions", "not supported"),
        ({"min_p": 0.1}, "min_p", "not supported"),
    ],
)
def test_bad_constraints_and_fields_are_400_naming_why(server, body, param, words):
    r = post(server, {"model": "tiny", "messages": user("x"), "max_tokens": 4, **body})
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert words in err["message"], err
    if param:
        assert err["param"] == param, err


# -- tool calls ----------------------------------------------------------------------------------------------------
def test_required_tool_choice_returns_parsed_calls(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny",
            messages=user("Weather in Rome?"),
            tools=[WEATHER, CLOCK],
            tool_choice="required",
            max_tokens=300,
            seed=seed,
            temperature=1.0,
            top_p=1.0,
            extra_body={"top_k": 0},
        )
        choice = r.choices[0]
        assert choice.finish_reason == "tool_calls" and choice.message.content is None
        for call in choice.message.tool_calls:
            assert call.type == "function" and call.id.startswith("call_")
            tool = {"get_weather": WEATHER, "now": CLOCK}[call.function.name]
            jsonschema.validate(json.loads(call.function.arguments), tool["function"]["parameters"])


def test_named_tool_choice_streams_the_call_as_the_client_expects(client):
    stream = client.chat.completions.create(
        model="tiny",
        messages=user("Weather?"),
        tools=[WEATHER, CLOCK],
        max_tokens=300,
        stream=True,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        parallel_tool_calls=False,
    )
    calls: dict[int, dict] = {}
    finish = None
    for chunk in stream:
        delta = chunk.choices[0].delta
        for tc in delta.tool_calls or []:  # the openai client's accumulation rule: by index, strings appended
            entry = calls.setdefault(tc.index, {"id": None, "name": "", "arguments": ""})
            entry["id"] = tc.id or entry["id"]
            entry["name"] += tc.function.name or ""
            entry["arguments"] += tc.function.arguments or ""
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER["function"]["parameters"])


def test_parallel_tool_calls_false_gives_one_call(client):
    for seed in range(3):
        r = client.chat.completions.create(
            model="tiny",
            messages=user("Both tools"),
            tools=[WEATHER, CLOCK],
            tool_choice="required",
            parallel_tool_calls=False,
            max_tokens=300,
            seed=seed,
            temperature=1.0,
            top_p=1.0,
            extra_body={"top_k": 0},
        )
        assert len(r.choices[0].message.tool_calls) == 1


def test_tool_history_renders_like_qwen25_and_auto_and_none_answer(client, server, pipe):
    history = [
        {"role": "user", "content": "Weather in Paris?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 1}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "clear"}'},
    ]
    r = client.chat.completions.create(model="tiny", messages=history, tools=[WEATHER], max_tokens=5)
    assert r.choices[0].finish_reason in ("length", "stop", "tool_calls")
    internal = [{**m, "content": m["content"] or ""} for m in history]
    text = render(pipe.processor.chat_template, normalize_messages(render_tools(internal, [WEATHER])))
    assert r.usage.prompt_tokens == len(pipe.processor.tokenizer.encode(text))
    assert '<tool_response>\n{"sky": "clear"}\n</tool_response>' in text
    # tool_choice none: the tools are not shown to the model, the history still is
    r = client.chat.completions.create(
        model="tiny", messages=history, tools=[WEATHER], tool_choice="none", max_tokens=5
    )
    text = render(pipe.processor.chat_template, normalize_messages(render_tools(internal, None)))
    assert r.usage.prompt_tokens == len(pipe.processor.tokenizer.encode(text))
    assert r.choices[0].message.tool_calls is None


# -- penalties, logit_bias ------------------------------------------------------------------------------------------
def test_penalties_and_logit_bias_give_what_the_pipeline_gives(client, pipe):
    target = pipe.processor.tokenizer.encode(" river")[0]
    for kw in (
        {"presence_penalty": 1.5},
        {"frequency_penalty": -0.7},
        {"logit_bias": {target: 6.0}},
        {"presence_penalty": 0.5, "frequency_penalty": 1.0, "logit_bias": {target: 12.0, 17: -100.0}},
    ):
        r = client.chat.completions.create(
            model="tiny",
            messages=user("Describe a river"),
            max_tokens=16,
            **{k: ({str(t): b for t, b in v.items()} if k == "logit_bias" else v) for k, v in kw.items()},
        )
        assert r.choices[0].message.content == pipe.chat(user("Describe a river"), max_new_tokens=16, **kw)


# -- the rest of the surface ---------------------------------------------------------------------------------------
def test_cached_tokens_come_from_the_prefix_cache(client):
    messages = [{"role": "system", "content": "You are a careful assistant. " * 20}, *user("First question")]
    first = client.chat.completions.create(model="tiny", messages=messages, max_tokens=2)
    again = client.chat.completions.create(
        model="tiny",
        messages=messages[:1] + user("Second question"),
        max_tokens=2,
        stream=True,
        stream_options={"include_usage": True},
    )
    usage = next(c.usage for c in again if c.usage)
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = usage.prompt_tokens_details.cached_tokens
    assert cached > 0 and cached % 32 == 0 and cached < usage.prompt_tokens  # whole prefill chunks of 32


def test_text_completions_streaming_and_not(client, pipe):
    r = client.completions.create(model="tiny", prompt="The quick brown fox", max_tokens=7)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    assert r.usage.prompt_tokens == len(pipe.processor.tokenizer.encode("The quick brown fox"))
    chunks = list(
        client.completions.create(
            model="tiny",
            prompt="The quick brown fox",
            max_tokens=7,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert chunks[-1].usage.completion_tokens == 7
    c = client.completions.create(model="tiny", prompt="Pick:", max_tokens=10, extra_body={"guided_choice": ["x", "y"]})
    assert c.choices[0].text in ("x", "y")


@pytest.mark.parametrize(
    "body,param",
    [
        ({"echo": True}, "echo"),
        ({"suffix": "z"}, "suffix"),
        ({"logprobs": 2}, "logprobs"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": ""}, "prompt"),
        ({"best_of": 3}, "best_of"),
    ],
)
def test_text_completions_refuse_what_they_do_not_implement(server, body, param):
    r = post(server, {"model": "tiny", "prompt": "Hi", "max_tokens": 2, **body}, path="/v1/completions")
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


def test_cors_preflight_and_headers(server):
    pre = httpx.options(
        server.base + "/v1/chat/completions",
        headers={
            "Origin": ORIGIN,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert pre.status_code == 200 and pre.headers["access-control-allow-origin"] == ORIGIN
    assert "POST" in pre.headers["access-control-allow-methods"]
    r = post(server, {"model": "tiny", "messages": user("hi"), "max_tokens": 1}, Origin=ORIGIN)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
    r = post(server, {"model": "tiny", "messages": user("hi"), "max_tokens": 1}, Origin="http://evil.example")
    assert "access-control-allow-origin" not in r.headers
    bad = httpx.options(
        server.base + "/v1/chat/completions",
        headers={"Origin": "http://evil.example", "Access-Control-Request-Method": "POST"},
    )
    assert bad.status_code == 400


def test_latency_histograms_in_metrics(client, server):
    from prometheus_client.parser import text_string_to_metric_families

    before = _counts(server)
    client.chat.completions.create(model="tiny", messages=user("time me"), max_tokens=5)
    after = _counts(server)
    for name in (
        "qwen2vl_time_to_first_token_seconds",
        "qwen2vl_time_per_output_token_seconds",
        "qwen2vl_e2e_request_latency_seconds",
    ):
        assert after[name] == before.get(name, 0) + 1, name
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(server.base + "/metrics").text)}
    assert families["qwen2vl_time_to_first_token_seconds"].type == "histogram"


def _counts(server) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    out = {}
    for family in text_string_to_metric_families(httpx.get(server.base + "/metrics").text):
        for sample in family.samples:
            if sample.name.endswith("_count"):
                out[family.name] = sample.value
    return out


def test_openai_client_parse_with_a_pydantic_model(client):
    """The client's own structured-output helper: it sends the model's strict JSON schema and parses the answer."""
    from typing import Literal

    from pydantic import BaseModel, Field

    class Item(BaseModel):
        colour: Literal["red", "green"]
        count: int = Field(ge=0, le=50)
        fragile: bool
        code: str = Field(max_length=4)

    r = client.chat.completions.parse(
        model="tiny", messages=user("Describe the item"), response_format=Item, max_tokens=200
    )
    assert r.choices[0].finish_reason == "stop"
    item = r.choices[0].message.parsed
    assert isinstance(item, Item) and 0 <= item.count <= 50 and len(item.code) <= 4


@pytest.mark.parametrize(
    "messages,words",
    [
        (
            [{"role": "tool", "tool_call_id": "c", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
            "text",
        ),
        (
            [
                {
                    "role": "user",
                    "content": "x",
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{}"}}],
                }
            ],
            "assistant",
        ),
        (
            [
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": "{broken"}}],
                },
                {"role": "user", "content": "x"},
            ],
            "not valid JSON",
        ),
    ],
)
def test_bad_tool_history_is_400(server, messages, words):
    r = post(server, {"model": "tiny", "messages": messages, "max_tokens": 2})
    assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
