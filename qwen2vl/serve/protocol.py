"""The OpenAI chat-completions request as typed models, and the error object every failure becomes.

A body is read as JSON with `NaN`/`Infinity` refused, then validated by pydantic models that mirror the OpenAI
schema (the subset vLLM's server also takes): strict types (`"stream": "false"` is not a boolean), ranges, finite
numbers. Output constraints (response_format, vLLM's guided_json / guided_regex / guided_choice / guided_grammar and
structured_outputs, tool_choice) become one `Constraint`. Fields that change what is generated and that this server
does not implement (functions, min_p, best_of, ...) are refused by name unless they carry their no-op value; other
unknown top-level fields are accepted and ignored, as OpenAI-compatible servers do. Per-item extension fields
(min_pixels, max_pixels, resized_height, resized_width, fps, nframes, ...) may sit on the content part or inside its
image_url / video_url object; a video may also be a list of frame URLs. Any failure is an `ApiError` carrying the
HTTP status and the OpenAI error object (`{"error": {"message", "type", "param", "code"}}`).
"""

from __future__ import annotations

import json
import math
import time
import uuid
from dataclasses import dataclass
from typing import Annotated, Any, Literal, NoReturn

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictStr,
    ValidationError,
    model_validator,
)

from ..generate.sampling import SamplingParams
from ..generate.structured import Constraint, GrammarError
from ..processing.chat import normalize_part
from ..processing.errors import InputError
from ..processing.tools import tool_call_grammar

# per-item fields of qwen-vl-utils' `fetch_image` / `fetch_video` that a content part may carry
ITEM_FIELDS = (
    "min_pixels",
    "max_pixels",
    "resized_height",
    "resized_width",
    "fps",
    "nframes",
    "min_frames",
    "max_frames",
    "total_pixels",
    "video_start",
    "video_end",
)
# below this a temperature overflows float32 logits (30 / 1e-40 = inf); vLLM's _SAMPLING_EPS treats it as greedy too
GREEDY_BELOW = 1e-5


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code, self.headers = status, kind, param, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


# -- field types -----------------------------------------------------------------------------------------------
def _integral(value: Any) -> int:
    """An integer, also when JSON spells it as a float (2e7); never a bool, a string or a fraction."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"must be an integer, got {type(value).__name__}")
    if isinstance(value, float) and not (math.isfinite(value) and value.is_integer()):
        raise ValueError(f"must be a finite integer, got {value}")
    return int(value)


Count = Annotated[int, BeforeValidator(_integral)]
Number = Annotated[float, Strict(), Field(allow_inf_nan=False)]  # strict: "1.5" is not a number
PositiveCount = Annotated[Count, Field(ge=1, le=2**40)]  # bounded so that products of them stay exact
StopString = Annotated[StrictStr, Field(min_length=1, max_length=4096)]  # matched against every new token


class ItemFields(BaseModel):
    """qwen-vl-utils' per-item sizing fields, where the client may put them (part or image_url/video_url)."""

    model_config = ConfigDict(extra="ignore")
    min_pixels: PositiveCount | None = None
    max_pixels: PositiveCount | None = None
    total_pixels: PositiveCount | None = None
    resized_height: PositiveCount | None = None
    resized_width: PositiveCount | None = None
    fps: Annotated[Number, Field(gt=0, le=1000)] | None = None
    nframes: PositiveCount | None = None
    min_frames: PositiveCount | None = None
    max_frames: PositiveCount | None = None
    video_start: Annotated[Number, Field(ge=0)] | None = None
    video_end: Annotated[Number, Field(ge=0)] | None = None

    def fields(self) -> dict:
        return {k: getattr(self, k) for k in ITEM_FIELDS if getattr(self, k) is not None}


class ImageUrl(ItemFields):
    url: StrictStr
    detail: Literal["auto", "low", "high"] | None = None  # accepted; sizing follows the pixel fields


class VideoUrl(ItemFields):
    url: StrictStr | list[StrictStr]


class TextPart(BaseModel):
    type: Literal["text"]
    text: StrictStr


class ImagePart(ItemFields):
    type: Literal["image_url"]
    image_url: ImageUrl | StrictStr


class VideoPart(ItemFields):
    type: Literal["video_url"]
    video_url: VideoUrl | StrictStr | list[StrictStr]


PART_TYPES = {"text": TextPart, "image_url": ImagePart, "video_url": VideoPart}


def _part(value: Any) -> Any:
    if isinstance(value, str):  # a bare string part is text
        return TextPart(type="text", text=value)
    if not isinstance(value, dict):
        raise ValueError("a content part must be an object")
    kind = value.get("type")
    if kind not in PART_TYPES:
        raise ValueError(f"content part type {kind!r} is not supported (text, image_url, video_url)")
    return PART_TYPES[kind].model_validate(value)


Part = Annotated[TextPart | ImagePart | VideoPart, BeforeValidator(_part)]


FUNCTION_NAME = r"^[A-Za-z0-9_-]{1,64}$"  # OpenAI's rule for function names


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME)]
    arguments: StrictStr | dict  # JSON text (OpenAI), or the object itself


class ToolCallItem(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: StrictStr | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: StrictStr | list[Part] | None = None
    name: StrictStr | None = None  # accepted; Qwen2-VL's template has no place for it
    tool_calls: Annotated[list[ToolCallItem], Field(max_length=128)] | None = None  # assistant turns
    tool_call_id: StrictStr | None = None  # tool turns

    @model_validator(mode="before")
    @classmethod
    def _refuse_function_call(cls, value: Any) -> Any:
        if isinstance(value, dict) and value.get("function_call"):
            raise ValueError(
                "'function_call' in a message is not supported (the deprecated functions API): use tool_calls"
            )
        return value

    @model_validator(mode="after")
    def _roles(self) -> Message:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"'tool_calls' belong to assistant messages, not {self.role!r} ones")
        if (
            self.role == "tool"
            and isinstance(self.content, list)
            and any(not isinstance(p, TextPart) for p in self.content)
        ):
            raise ValueError("a 'tool' message's content must be text")
        return self


class FunctionDef(BaseModel):
    model_config = ConfigDict(extra="ignore")
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME)]
    description: StrictStr | None = None
    parameters: dict | None = None
    strict: StrictBool | None = None


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(BaseModel):
    name: Annotated[StrictStr, Field(pattern=FUNCTION_NAME)]


class NamedToolChoice(BaseModel):
    type: Literal["function"]
    function: NamedFunction


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` object (one of json, regex, choice, grammar)."""

    model_config = ConfigDict(extra="forbid")
    json_: Annotated[dict | StrictStr | None, Field(alias="json")] = None
    regex: StrictStr | None = None
    choice: Annotated[list[StrictStr], Field(min_length=1, max_length=4096)] | None = None
    grammar: StrictStr | None = None


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: StrictBool = False


# fields that change what is generated, that this server does not implement, and their no-op values
UNSUPPORTED = {
    "functions": (None, []),
    "function_call": (None, "none"),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    "web_search_options": (None,),
    "reasoning_effort": (None,),
    "best_of": (None, 1),
    "use_beam_search": (None, False),
    "min_p": (None, 0),
    "min_tokens": (None, 0),
    "ignore_eos": (None, False),
    "echo": (None, False),
    "prompt_logprobs": (None,),
    "length_penalty": (None, 1),
}
Penalty = Annotated[Number, Field(ge=-2, le=2)]  # OpenAI's range for presence_penalty and frequency_penalty


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="allow")  # unknown fields (user, metadata, store, ...) are harmless
    model: StrictStr
    messages: Annotated[list[Message], Field(min_length=1, max_length=4096)]
    max_tokens: Annotated[Count, Field(ge=1, le=2**31)] | None = None
    max_completion_tokens: Annotated[Count, Field(ge=1, le=2**31)] | None = None
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[Count, Field(ge=-1, le=2**31)] | None = None  # vLLM's extra field; -1 (and 0) mean off
    repetition_penalty: Annotated[Number, Field(gt=0, le=100)] | None = None
    seed: Annotated[Count, Field(ge=-(2**63), le=2**63 - 1)] | None = None  # torch.Generator's seed range
    stop: StopString | Annotated[list[StopString], Field(max_length=16)] | None = None
    n: Annotated[Count, Field(ge=1, le=8)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    logprobs: StrictBool = False
    top_logprobs: Annotated[Count, Field(ge=0, le=20)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[dict[StrictStr, Annotated[Number, Field(ge=-100, le=100)]], Field(max_length=1024)] | None = (
        None
    )
    response_format: dict | None = None
    guided_json: dict | StrictStr | None = None  # vLLM's extra fields for constrained output
    guided_regex: StrictStr | None = None
    guided_choice: Annotated[list[StrictStr], Field(min_length=1, max_length=4096)] | None = None
    guided_grammar: StrictStr | None = None
    structured_outputs: StructuredOutputs | None = None
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: StrictBool | None = None
    fit: StrictBool = False  # ours: sample videos smaller, then sparser, until the prompt fits (Processor._fit)
    skip_special_tokens: StrictBool = True  # vLLM's extra field; false keeps <|box_start|>... in the text

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, value: Any) -> Any:
        if isinstance(value, dict):
            for key, no_ops in UNSUPPORTED.items():
                if key in value and value[key] not in no_ops:
                    raise ApiError(
                        400, f"'{key}' is not supported by this server", param=key, code="unsupported_parameter"
                    )
        return value


class CompletionRequest(BaseModel):
    """The legacy /v1/completions body: a text prompt, continued without the chat template."""

    model_config = ConfigDict(extra="allow")
    model: StrictStr
    prompt: StrictStr | Annotated[list[StrictStr], Field(min_length=1, max_length=1)]
    max_tokens: Annotated[Count, Field(ge=1, le=2**31)] = 16  # OpenAI's default for completions
    temperature: Annotated[Number, Field(ge=0, le=2)] | None = None
    top_p: Annotated[Number, Field(gt=0, le=1)] | None = None
    top_k: Annotated[Count, Field(ge=-1, le=2**31)] | None = None
    repetition_penalty: Annotated[Number, Field(gt=0, le=100)] | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    logit_bias: Annotated[dict[StrictStr, Annotated[Number, Field(ge=-100, le=100)]], Field(max_length=1024)] | None = (
        None
    )
    seed: Annotated[Count, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    stop: StopString | Annotated[list[StopString], Field(max_length=16)] | None = None
    n: Annotated[Count, Field(ge=1, le=8)] = 1
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    guided_json: dict | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: Annotated[list[StrictStr], Field(min_length=1, max_length=4096)] | None = None
    guided_grammar: StrictStr | None = None
    structured_outputs: StructuredOutputs | None = None
    response_format: dict | None = None
    skip_special_tokens: StrictBool = True

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, value: Any) -> Any:
        if isinstance(value, dict):
            unsupported = {**UNSUPPORTED, "logprobs": (None,), "suffix": (None, ""), "echo": (None, False)}
            for key, no_ops in unsupported.items():
                if key in value and value[key] not in no_ops:
                    raise ApiError(
                        400,
                        f"'{key}' is not supported by this server's /v1/completions",
                        param=key,
                        code="unsupported_parameter",
                    )
            if isinstance(value.get("prompt"), list) and len(value["prompt"]) > 1:
                raise ApiError(
                    400,
                    "'prompt' as a list of several prompts is not supported: send one prompt per request",
                    param="prompt",
                    code="unsupported_parameter",
                )
        return value


@dataclass(frozen=True)
class ChatRequest:
    model: str
    messages: list[dict]  # qwen-vl-utils form: {"role", "content": str | [{"type": "image", "image": ...}, ...]}
    params: SamplingParams
    max_tokens_given: bool  # the client named max_tokens: over the context is a 400, not a silent cap
    fit: bool  # fit the videos to the context instead of refusing
    n: int
    stream: bool
    include_usage: bool
    logprobs: bool
    top_logprobs: int
    skip_special_tokens: bool = True
    constraint: Constraint | None = None  # what the output must match (response_format, guided_*, tool_choice)
    tools: list[dict] | None = None  # rendered into the prompt; None when tool_choice is "none"
    tool_choice: str | dict = "none"
    constraint_param: str | None = None  # the request field the constraint came from (for a 400 naming it)
    prompt: str | None = None  # /v1/completions: the text to continue (messages is then empty)


def _conversation(messages: list[Message]) -> list[dict]:
    out = []
    for m in messages:
        content: Any = m.content if m.content is not None else ""
        if isinstance(content, list):
            content = [_item(p) for p in content]
        # 'developer' is OpenAI's newer name for the system role
        message = {"role": "system" if m.role == "developer" else m.role, "content": content}
        if m.tool_calls:
            message["tool_calls"] = [
                {"function": {"name": c.function.name, "arguments": c.function.arguments}} for c in m.tool_calls
            ]
        out.append(message)
    return out


def _constraint(r: ChatCompletionRequest | CompletionRequest) -> tuple[Constraint | None, str | None]:
    """The output constraint a request asks for, and the field that asked; more than one is a 400."""
    asked = []
    if r.response_format is not None:
        try:
            c = Constraint.from_response_format(r.response_format)
        except GrammarError as e:
            raise ApiError(400, str(e), param="response_format") from None
        if c is not None:
            asked.append(("response_format", c))
    if r.guided_json is not None:
        schema = r.guided_json
        if isinstance(schema, str):
            try:
                schema = json.loads(schema)
            except json.JSONDecodeError as e:
                raise ApiError(400, f"guided_json is not valid JSON ({e})", param="guided_json") from None
        asked.append(("guided_json", Constraint.json_schema(schema)))
    if r.guided_regex is not None:
        asked.append(("guided_regex", Constraint("regex", r.guided_regex)))
    if r.guided_choice is not None:
        asked.append(("guided_choice", Constraint.choice(r.guided_choice)))
    if r.guided_grammar is not None:
        asked.append(("guided_grammar", Constraint("grammar", r.guided_grammar)))
    so = r.structured_outputs
    if so is not None:
        given = [
            (k, v)
            for k, v in (("json", so.json_), ("regex", so.regex), ("choice", so.choice), ("grammar", so.grammar))
            if v is not None
        ]
        if len(given) != 1:
            raise ApiError(
                400, "structured_outputs needs exactly one of json, regex, choice, grammar", param="structured_outputs"
            )
        kind, value = given[0]
        if kind == "json":
            asked.append(
                ("structured_outputs", Constraint.json_schema(json.loads(value) if isinstance(value, str) else value))
            )
        elif kind == "choice":
            asked.append(("structured_outputs", Constraint.choice(value)))
        else:
            asked.append(("structured_outputs", Constraint(kind, value)))
    if len(asked) > 1:
        raise ApiError(
            400, f"{' and '.join(k for k, _ in asked)} each constrain the output; give one", param=asked[1][0]
        )
    return (asked[0][1], asked[0][0]) if asked else (None, None)


def _item(part: TextPart | ImagePart | VideoPart) -> dict:
    """A validated OpenAI part in qwen-vl-utils form, by the one normalisation the processor also applies (the
    fields of image_url / video_url override the part's own)."""
    return normalize_part(part.model_dump(exclude_none=True), "messages")


def _reject_constant(name: str) -> NoReturn:
    raise ValueError(f"{name} is not valid JSON")


def read_json(raw: bytes) -> Any:
    """Standard JSON only: NaN/Infinity refused, nesting bounded by the parser's recursion limit."""
    try:
        return json.loads(raw, parse_constant=_reject_constant)
    except RecursionError:
        raise ApiError(400, "the request body is nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError
        raise ApiError(400, f"the request body is not valid JSON ({e})") from None


def _describe(error: ValidationError) -> tuple[str, str | None]:
    first = error.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    message = first["msg"].removeprefix("Value error, ")
    more = f" (and {error.error_count() - 1} more problems)" if error.error_count() > 1 else ""
    field = str(first["loc"][0]) if first["loc"] else None
    return (f"'{loc}': {message}{more}" if loc else f"{message}{more}"), field


def _validated(body: Any, model: type[BaseModel]) -> tuple[Any, Any, str | None]:
    """The body as `model` (a 400 naming the field otherwise) and its output constraint (a 400 saying why one
    cannot compile) -> (request, constraint, the field that set it)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    try:
        r = model.model_validate(body)
    except ValidationError as e:
        message, param = _describe(e)
        raise ApiError(400, message, param=param) from None
    try:
        constraint, field = _constraint(r)
    except (GrammarError, json.JSONDecodeError) as e:
        raise ApiError(400, str(e)) from None
    return r, constraint, field


def parse_request(body: Any, generation_config: dict) -> ChatRequest:
    r, constraint, field = _validated(body, ChatCompletionRequest)
    tools = [t.model_dump(exclude_none=True) for t in r.tools] if r.tools else None
    choice = r.tool_choice if r.tool_choice is not None else ("auto" if tools else "none")
    if not isinstance(choice, str):
        choice = choice.model_dump()
    if choice != "none" and not tools:
        raise ApiError(400, f"tool_choice {json.dumps(choice)} needs tools", param="tool_choice")
    if choice == "none":
        tools = None  # not rendered: the model answers in text
    else:
        if constraint is not None:
            raise ApiError(400, f'{field} cannot be combined with tools unless tool_choice is "none"', param=field)
        try:
            grammar = tool_call_grammar(tools, choice, r.parallel_tool_calls is not False)
            constraint = None if grammar is None else Constraint("structural_tag", grammar)
        except InputError as e:
            raise ApiError(400, str(e), param="tool_choice") from None
        field = "tools"
    max_tokens = r.max_completion_tokens or r.max_tokens
    params = _sampling(r, generation_config, max_tokens or 512)
    return ChatRequest(
        r.model,
        _conversation(r.messages),
        params,
        max_tokens is not None,
        r.fit,
        r.n,
        r.stream,
        bool(r.stream_options and r.stream_options.include_usage),
        r.logprobs,
        r.top_logprobs or 0,
        r.skip_special_tokens,
        constraint,
        tools,
        choice,
        field,
    )


def _sampling(r, generation_config: dict, max_tokens: int) -> SamplingParams:
    bias = None
    if r.logit_bias:
        try:
            bias = tuple((int(k), v) for k, v in r.logit_bias.items())
        except ValueError:
            raise ApiError(400, "logit_bias keys must be token ids (integers as strings)", param="logit_bias") from None
    temperature = 0.0 if r.temperature is not None and r.temperature < GREEDY_BELOW else r.temperature
    try:
        return SamplingParams.from_generation_config(
            generation_config,
            max_new_tokens=max_tokens,
            temperature=temperature,
            top_p=r.top_p,
            top_k=0 if r.top_k == -1 else r.top_k,
            repetition_penalty=r.repetition_penalty,
            seed=r.seed,
            stop=(r.stop,) if isinstance(r.stop, str) else tuple(r.stop or ()),
            presence_penalty=r.presence_penalty,
            frequency_penalty=r.frequency_penalty,
            logit_bias=bias,
        )
    except (ValueError, TypeError) as e:
        raise ApiError(400, str(e)) from None


def parse_completion_request(body: Any, generation_config: dict) -> ChatRequest:
    """/v1/completions: the same request shape as a chat's, with `prompt` set and no messages."""
    r, constraint, field = _validated(body, CompletionRequest)
    prompt = r.prompt if isinstance(r.prompt, str) else r.prompt[0]
    return ChatRequest(
        r.model,
        [],
        _sampling(r, generation_config, r.max_tokens),
        True,
        False,
        r.n,
        r.stream,
        bool(r.stream_options and r.stream_options.include_usage),
        False,
        0,
        r.skip_special_tokens,
        constraint,
        None,
        "none",
        field,
        prompt,
    )


def completion_id() -> str:
    return "chatcmpl-" + uuid.uuid4().hex[:24]


def now() -> int:
    return int(time.time())
