"""Constrained decoding (xgrammar) and OpenAI's penalties in the sampler, without the server.

Random weights do not want to write JSON: these tests show that the grammar forces valid output anyway, so every
answer must parse, validate against its schema and end with a stop token (finish, not a cut at max_new_tokens).
"""

from __future__ import annotations

import json
import random
import re

import jsonschema
import pytest
import torch

import qwen2vl
from qwen2vl.generate.sampling import SamplingParams, chooser, process_logits
from qwen2vl.generate.structured import (
    Constraint,
    GrammarError,
    GrammarProcessor,
    apply_bitmask_reference,
    grammars_for,
    with_processors,
)
from qwen2vl.processing.tools import (
    ToolCallParser,
    parse_tool_calls,
    render_tools,
    tool_call_grammar,
)

STOPS = (151645, 151643)


def render_template(pipe, messages) -> str:
    from qwen2vl.processing.chat import normalize_messages, render

    return render(pipe.processor.chat_template, normalize_messages(messages))


@pytest.fixture(scope="module")
def pipe(tiny_ckpt):
    return qwen2vl.load(str(tiny_ckpt), dtype=torch.float32, progress=False)


@pytest.fixture(scope="module")
def grammars(pipe):
    return grammars_for(pipe.processor.tokenizer, pipe.model.config.text.vocab_size, STOPS)


def random_schema(rng: random.Random, depth: int = 0) -> dict:
    """An object schema whose every value is bounded (enums, integer ranges, short strings, short arrays), so a
    model that never chooses to stop can still be driven to the end of it by the grammar."""
    props = {}
    for k in range(rng.randint(1, 4)):
        kind = rng.choice(["enum", "int", "bool", "str", "array", "null", "anyof"] + (["object"] if depth < 1 else []))
        if kind == "enum":
            s = {"enum": rng.sample(["red", "green", "blue", "x y", "Ünï", 'a"b', "1"], rng.randint(1, 3))}
        elif kind == "int":
            lo = rng.randint(-50, 50)
            s = {"type": "integer", "minimum": lo, "maximum": lo + rng.randint(0, 1000)}
        elif kind == "bool":
            s = {"type": "boolean"}
        elif kind == "str":
            s = {"type": "string", "maxLength": rng.randint(0, 6)}
        elif kind == "array":
            s = {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": rng.randint(0, 3)}
        elif kind == "null":
            s = {"type": "null"}
        elif kind == "anyof":
            s = {"anyOf": [{"type": "boolean"}, {"enum": [1, 2, 3]}]}
        else:
            s = random_schema(rng, depth + 1)
        props[f"k{k}_{kind}"] = s
    return {"type": "object", "properties": props, "required": list(props), "additionalProperties": False}


# -- the mask ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(4))
def test_fast_and_reference_bitmask_paths_agree(seed):
    g = torch.Generator().manual_seed(seed)
    vocab = [151936, 1000, 33, 64][seed]
    words = (vocab + 31) // 32
    bitmask = torch.randint(-(2**31), 2**31 - 1, (1, words), generator=g, dtype=torch.int64).to(torch.int32)
    logits = torch.randn(1, vocab, generator=g)
    import xgrammar

    fast = logits.clone()
    xgrammar.apply_token_bitmask_inplace(fast, bitmask)
    ref = apply_bitmask_reference(logits, bitmask)
    assert torch.equal(fast, ref)
    # the reference by its definition, bit by bit
    for token in torch.randint(0, vocab, (200,), generator=g).tolist():
        allowed = (int(bitmask[0, token // 32]) >> (token % 32)) & 1
        assert (ref[0, token] == logits[0, token]) if allowed else ref[0, token] == -float("inf")


def test_processor_fast_and_reference_paths_choose_the_same(grammars):
    schema = random_schema(random.Random(3))
    compiled = grammars.compile(Constraint.json_schema(schema))
    fast, ref = GrammarProcessor(grammars, compiled), GrammarProcessor(grammars, compiled, fast=False)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        logits = torch.randn(1, grammars.vocab_size, generator=g)
        a, b = fast(logits), ref(logits)
        assert torch.equal(a, b)
        token = int(a.argmax())
        fast.accept(token)
        ref.accept(token)
        if fast.terminated:
            break
    assert fast.terminated and ref.terminated


def test_special_tokens_are_never_allowed_and_stops_only_at_the_end(grammars, pipe):
    p = grammars.processor(Constraint("regex", r"[a-c]{2}"))
    special = sorted(pipe.processor.tokenizer.special_ids)
    first = p(torch.zeros(1, grammars.vocab_size))
    assert torch.isinf(first[0, special]).all()  # stop tokens too: the output cannot end before "xx"
    for t in pipe.processor.tokenizer.encode("ab"):
        p.accept(t)
    last = p(torch.zeros(1, grammars.vocab_size))
    allowed = (~torch.isinf(last[0])).nonzero().flatten().tolist()
    assert allowed == sorted(STOPS)


# -- whole generations on the random tiny model --------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_json_schema_output_parses_and_validates(pipe, seed):
    rng = random.Random(seed)
    schema = random_schema(rng)
    sampling = {} if seed % 2 else {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": seed}
    steps = []
    text = pipe.chat(
        [{"role": "user", "content": f"Give me JSON {seed}"}],
        max_new_tokens=400,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
        **sampling,
    )
    steps.append(pipe.last_timings.new_tokens)
    jsonschema.validate(json.loads(text), schema)
    assert steps[0] < 400  # ended with a stop token, not cut at max_new_tokens


def test_json_object_output_is_one_json_value(pipe):
    """Any JSON has unbounded strings, where random weights would write forever: a logit_bias towards closing
    quotes and brackets (applied after the mask, so it cannot let anything invalid through) lets them end."""
    tok = pipe.processor.tokenizer
    closing = {tok.encode(s)[0]: 40.0 for s in ('"', "}", "]", '"}', "}}", "]}")}
    for k in range(4):
        text = pipe.chat(
            [{"role": "user", "content": f"JSON please {k}"}],
            max_new_tokens=300,
            response_format={"type": "json_object"},
            logit_bias=closing,
            **({"temperature": 1.0, "top_k": 0, "top_p": 1.0, "seed": k} if k % 2 else {}),
        )
        assert pipe.last_timings.new_tokens < 300, text[-80:]
        json.loads(text)


def test_regex_and_choice_constraints(pipe):
    for k in range(3):
        text = pipe.chat(
            [{"role": "user", "content": f"code {k}"}],
            max_new_tokens=50,
            response_format=Constraint("regex", r"[A-Z]{2}-\d{3}( ok)?"),
        )
        assert re.fullmatch(r"[A-Z]{2}-\d{3}( ok)?", text), text
        choices = ["yes", "no", 'maybe "so"', "日本"]
        assert (
            pipe.chat(
                [{"role": "user", "content": f"pick {k}"}],
                max_new_tokens=20,
                response_format=Constraint.choice(choices),
            )
            in choices
        )


def test_chat_session_takes_a_response_format(pipe):
    from qwen2vl.pipeline import ChatSession

    s = ChatSession(pipe)
    schema = {
        "type": "object",
        "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 9}},
        "required": ["n"],
        "additionalProperties": False,
    }
    for k in range(2):
        text = s.send(f"turn {k}", max_new_tokens=40, response_format=Constraint.json_schema(schema)).text
        jsonschema.validate(json.loads(text), schema)


def test_unconstrained_output_is_unchanged_by_the_hook(pipe):
    conv = [{"role": "user", "content": "Hello there"}]
    assert (
        pipe.chat(conv, max_new_tokens=12)
        == pipe.chat(conv, max_new_tokens=12, response_format=None)
        == pipe.chat(conv, max_new_tokens=12, response_format={"type": "text"})
    )


def test_uncompilable_constraints_say_why(grammars, pipe):
    for bad, words in [
        (Constraint.json_schema({"type": "objectx"}), "objectx"),
        (Constraint("regex", "(unclosed"), "regex"),
        (Constraint("grammar", "root ::= undefined_rule"), "undefined_rule"),
    ]:
        with pytest.raises(GrammarError, match=re.escape(words)):
            grammars.compile(bad)
    with pytest.raises(GrammarError, match="not supported"):
        Constraint.from_response_format({"type": "yaml"})
    with pytest.raises(GrammarError):
        pipe.chat([{"role": "user", "content": "x"}], response_format={"type": "json_schema", "json_schema": {}})


# -- OpenAI's penalties and logit_bias -----------------------------------------------------------------------------
def reference_penalties(logits, generated, bias, presence, frequency):
    """OpenAI's definition, written out per token with Python numbers."""
    out = logits.clone()
    for row in range(logits.shape[0]):
        counts: dict[int, int] = {}
        for t in generated[row]:
            counts[t] = counts.get(t, 0) + 1
        for j in range(logits.shape[1]):
            value = float(logits[row, j]) + bias.get(j, 0.0)
            c = counts.get(j, 0)
            value -= c * frequency + (1.0 if c > 0 else 0.0) * presence
            out[row, j] = value
    return out


@pytest.mark.parametrize("seed", range(5))
def test_penalties_and_logit_bias_match_their_definition(seed):
    g = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    vocab, rows, prompt_len, new = 41, 3, rng.randint(1, 9), rng.randint(0, 12)
    logits = torch.randn(rows, vocab, generator=g) * 3
    seen = torch.randint(0, vocab, (rows, prompt_len + new), generator=g)
    bias = {rng.randrange(vocab): rng.uniform(-100, 100) for _ in range(rng.randint(0, 6))}
    presence, frequency = rng.uniform(-2, 2), rng.uniform(-2, 2)
    p = SamplingParams(presence_penalty=presence, frequency_penalty=frequency, logit_bias=bias)
    got = process_logits(logits, seen, p, prompt_len)
    want = reference_penalties(logits, seen[:, prompt_len:].tolist(), bias, presence, frequency)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)  # float32 vs Python float sums of the same terms


def test_penalties_count_only_generated_tokens_through_the_chooser():
    vocab = 7
    p = SamplingParams(presence_penalty=1.5, frequency_penalty=0.5)
    choose = chooser(p)
    prompt = torch.tensor([[3, 3, 3]])  # the prompt's 3s are not penalised
    logits = torch.full((1, vocab), -10.0)
    logits[0, 3] = 0.1
    assert int(choose(logits, prompt)[0]) == 3
    seen = torch.cat([prompt, torch.tensor([[3]])], dim=1)
    logits = torch.full((1, vocab), -10.0)
    logits[0, 3], logits[0, 5] = 1.0, -0.5  # 1.0 - 1.5 - 0.5 = -1.0 < -0.5
    assert int(choose(logits, seen)[0]) == 5


def test_logit_bias_and_penalties_steer_a_real_generation(pipe):
    target = pipe.processor.tokenizer.encode(" banana")[0]
    text = pipe.chat([{"role": "user", "content": "Hi"}], max_new_tokens=4, logit_bias={target: 100})
    assert text == " banana" * 4
    # with a frequency penalty the favoured token must give way once it has been used enough
    text = pipe.chat(
        [{"role": "user", "content": "Hi"}],
        max_new_tokens=12,
        logit_bias={target: 20},
        frequency_penalty=2.0,
        presence_penalty=2.0,
    )
    assert 1 <= text.count(" banana") < 12
    with pytest.raises(ValueError):
        SamplingParams(logit_bias={-1: 3})


# -- tool calls ----------------------------------------------------------------------------------------------------
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Weather in a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
CLOCK = {
    "type": "function",
    "function": {"name": "now", "parameters": {"type": "object", "properties": {}, "additionalProperties": False}},
}


def test_tools_render_as_qwen25_prompts_them(pipe):
    messages = [
        {"role": "user", "content": "Weather?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [
                {"function": {"name": "get_weather", "arguments": '{"city": "Paris", "days": 2}'}},
                {"function": {"name": "now", "arguments": {}}},
            ],
        },
        {"role": "tool", "content": "sunny"},
        {"role": "tool", "content": "12:00"},
    ]
    text = render_template(pipe, render_tools(messages, [WEATHER, CLOCK]))
    tools_json = json.dumps(WEATHER, ensure_ascii=False) + "\n" + json.dumps(CLOCK, ensure_ascii=False)
    assert text == (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\nYou may call one or more functions to assist "
        "with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{tools_json}\n</tools>\n\nFor each function call, return a json object with function name and "
        'arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, '
        '"arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", '
        '"days": 2}}\n</tool_call>\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\n12:00\n</tool_response>"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    # an existing system turn keeps its text; content before calls is followed by a newline
    text = render_template(
        pipe,
        render_tools(
            [
                {"role": "system", "content": "Be brief."},
                {"role": "user", "content": "x"},
                {
                    "role": "assistant",
                    "content": "Checking.",
                    "tool_calls": [{"function": {"name": "now", "arguments": "{}"}}],
                },
            ],
            [CLOCK],
        ),
    )
    assert text.startswith("<|im_start|>system\nBe brief.\n\n# Tools\n")
    assert '<|im_start|>assistant\nChecking.\n<tool_call>\n{"name": "now", "arguments": {}}\n</tool_call>' in text


@pytest.mark.parametrize("seed", range(4))
def test_tool_call_parser_gives_the_same_result_however_the_text_is_split(seed):
    rng = random.Random(seed)
    calls = [f'<tool_call>\n{{"name": "f{k}", "arguments": {{"x": {k}}}}}\n</tool_call>' for k in range(3)]
    text = (
        rng.choice(["", "Let me check. ", "<tool_ca"])
        + "\n".join(calls[: rng.randint(0, 3)])
        + rng.choice(["", "\n", "<tool_call>{broken", "<tool_call>\nnot json\n</tool_call>", " done"])
    )
    whole_content, whole_calls = parse_tool_calls(text)
    parser, shown, got = ToolCallParser(), "", []
    cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 8)))
    for a, b in zip([0] + cuts, cuts + [len(text)]):
        piece, new = parser.feed(text[a:b])
        shown += piece
        got += new
    shown += parser.flush()
    assert [(c.name, c.arguments) for c in got] == [(c.name, c.arguments) for c in whole_calls]
    assert (shown.strip() or None if got else shown) == whole_content
    assert [json.loads(c.arguments) for c in whole_calls] == [{"x": k} for k in range(len(whole_calls))]


@pytest.mark.parametrize(
    "choice,parallel",
    [("required", True), ("required", False), ({"type": "function", "function": {"name": "get_weather"}}, True)],
)
def test_required_and_named_tool_choice_always_call(pipe, choice, parallel):
    c = Constraint("structural_tag", tool_call_grammar([WEATHER, CLOCK], choice, parallel))
    messages = render_tools([{"role": "user", "content": "What's the weather?"}], [WEATHER, CLOCK])
    for seed in range(3):
        text = pipe.chat(
            messages, max_new_tokens=300, response_format=c, temperature=1.0, top_k=0, top_p=1.0, seed=seed
        )
        assert pipe.last_timings.new_tokens < 300
        content, calls = parse_tool_calls(text)
        assert content is None and calls, text
        if not parallel or isinstance(choice, dict):
            assert len(calls) == 1 or parallel
        for call in calls:
            tool = {"get_weather": WEATHER, "now": CLOCK}[call.name]
            jsonschema.validate(json.loads(call.arguments), tool["function"]["parameters"])
            if isinstance(choice, dict):
                assert call.name == "get_weather"


def test_processors_run_before_the_choice_and_learn_the_token():
    seen_tokens = []

    class Ban:
        def __call__(self, logits):
            return logits.index_fill(1, torch.tensor([0]), -float("inf"))

        def accept(self, token):
            seen_tokens.append(token)

    choose = with_processors(lambda logits, seen: logits.argmax(-1), [Ban()])
    logits = torch.tensor([[5.0, 1.0, 2.0]])
    assert int(choose(logits, torch.zeros(1, 1, dtype=torch.long))[0]) == 2 and seen_tokens == [2]


@pytest.mark.heavy  # a running engine
def test_engine_keeps_a_matcher_per_request_beside_free_requests(pipe, grammars):
    """In the continuous-batching engine each constrained request gives what the pipeline gives it alone, free
    requests are unchanged, and an aborted request's slot and matcher go away."""
    from qwen2vl.engine.engine import Engine, Request
    from qwen2vl.generate.decode import Prompt

    params = pipe.params(max_new_tokens=200)
    convs = [[{"role": "user", "content": f"row {k}"}] for k in range(6)]
    schemas = [random_schema(random.Random(300 + k)) for k in range(6)]
    kinds = ["schema", "free", "schema", "abort", "free", "schema"]
    expected = {}
    for k, kind in enumerate(kinds):
        if kind == "schema":
            expected[k] = pipe.chat(convs[k], max_new_tokens=200, response_format=Constraint.json_schema(schemas[k]))
        elif kind == "free":
            expected[k] = pipe.chat(convs[k], max_new_tokens=10)

    class Counted:  # a processor that counts its calls, to see that an aborted request's matcher is left alone
        def __init__(self, inner):
            self.inner, self.calls = inner, 0

        def __call__(self, logits):
            self.calls += 1
            return self.inner(logits)

        def accept(self, token):
            self.calls += 1
            self.inner.accept(token)

    engine = Engine(pipe.model, max_num_seqs=4, max_model_len=1024, prefill_chunk=512)
    counted = Counted(grammars.processor(Constraint.json_schema(schemas[3])))
    for k, kind in enumerate(kinds):
        processors = () if kind == "free" else (grammars.processor(Constraint.json_schema(schemas[k])),)
        engine.add(
            Request(
                str(k),
                Prompt.from_batch(pipe.prepare([convs[k]], params)),
                chooser(params),
                10 if kind == "free" else 200,
                params.stop_token_ids,
                processors=(counted,) if kind == "abort" else processors,
            )
        )
    tokens: dict[int, list[int]] = {k: [] for k in range(6)}
    reasons, aborted = {}, False
    while engine.has_work():
        for out in engine.step():
            if out.token is not None:
                tokens[int(out.request_id)].append(out.token)
            if out.finish_reason:
                reasons[int(out.request_id)] = out.finish_reason
        if len(tokens[3]) >= 2 and not aborted:  # mid-output, its matcher part-way through the grammar
            engine.abort("3")
            aborted, calls_at_abort = True, counted.calls
    assert reasons[3] == "abort" and len(engine.free_slots) == engine.pool.slots
    assert 2 <= len(tokens[3]) < 10 and counted.calls == calls_at_abort == 2 * len(tokens[3])
    for k, text in expected.items():
        got = pipe.processor.tokenizer.decode([t for t in tokens[k] if t not in params.stop_token_ids])
        assert got == text, k
        if kinds[k] == "schema":
            assert reasons[k] == "stop"
            jsonschema.validate(json.loads(got), schemas[k])
