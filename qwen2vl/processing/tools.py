"""Tool calling in the format of Qwen's function-calling models, for Qwen2-VL (whose own template has none).

Qwen2.5-Instruct's chat template (its `tools` branch) prompts like this, and we render the same text through the
checkpoint's own template by rewriting the messages first (`render_tools`):
- the system turn (the checkpoint's default "You are a helpful assistant." when the conversation has none) gains
  "\\n\\n# Tools\\n\\nYou may call one or more functions ...<tools>" + one JSON line per tool + "</tools>" and the
  instruction to answer with `<tool_call>\\n{"name": <function-name>, "arguments": <args-json-object>}\\n</tool_call>`;
- an assistant turn with `tool_calls` becomes its content (if any) then, per call,
  "\\n<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>" (the first newline dropped when there is no
  content);
- consecutive `tool` messages become one user turn of "<tool_response>\\n...\\n</tool_response>" blocks, joined by
  newlines.
`ToolCallParser` reads `<tool_call>` blocks back out of the generated text, incrementally (for streaming) or all at
once; `tool_call_grammar` writes the grammar (an xgrammar structural tag) that makes every call parse and, with
`tool_choice` "required" or a named function, makes the model call.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass

from .errors import InputError

DEFAULT_SYSTEM = "You are a helpful assistant."  # the Qwen2-VL template's system turn when a conversation has none
TOOLS_HEADER = (
    "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>"
)
TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
    '<tool_call></tool_call> XML tags:\n<tool_call>\n{"name": <function-name>, "arguments": '
    "<args-json-object>}\n</tool_call>"
)
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def _dumps(value) -> str:
    """JSON as transformers' chat-template `tojson` filter writes it (", " and ": " separators, unicode kept)."""
    return json.dumps(value, ensure_ascii=False)


def _call_text(call: dict) -> str:
    fn = call.get("function", call)
    args = fn.get("arguments", {})
    if isinstance(args, str):  # OpenAI sends arguments as a JSON string; the template writes the object
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            raise InputError(f"tool call {fn.get('name')!r}: arguments are not valid JSON") from None
    return f'{CALL_OPEN}\n{{"name": "{fn["name"]}", "arguments": {_dumps(args)}}}\n{CALL_CLOSE}'


def render_tools(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Messages for the Qwen2-VL template that render as Qwen2.5's template renders `tools`, `tool_calls` and `tool`
    messages. Without tools and without tool messages the messages are returned unchanged."""
    out: list[dict] = []
    for m in messages:
        role = m["role"]
        if role == "assistant" and m.get("tool_calls"):
            content = m.get("content") or ""
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
            calls = "\n".join(_call_text(c) for c in m["tool_calls"])
            out.append({"role": "assistant", "content": (content + "\n" if content else "") + calls})
        elif role == "tool":
            content = m.get("content") or ""
            if isinstance(content, list):
                content = "".join(p.get("text", "") for p in content if p.get("type") == "text")
            block = f"<tool_response>\n{content}\n</tool_response>"
            if out and out[-1].get("_tool_responses"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_responses": True})
        else:
            out.append({k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")})
    for m in out:
        m.pop("_tool_responses", None)
    if tools:
        section = TOOLS_HEADER + "".join("\n" + _dumps(t) for t in tools) + TOOLS_FOOTER
        if out and out[0]["role"] == "system":
            system = out[0]["content"]
            if isinstance(system, list):
                system = "".join(p.get("text", "") for p in system if p.get("type") == "text")
            out[0] = {**out[0], "content": system + section}
        else:
            out.insert(0, {"role": "system", "content": DEFAULT_SYSTEM + section})
    return out


@dataclass(frozen=True)
class ToolCall:
    id: str
    name: str
    arguments: str  # JSON text, as the OpenAI API carries it

    def openai(self, index: int | None = None) -> dict:
        out = {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}
        return out if index is None else {"index": index, **out}


def _parse_call(inner: str) -> ToolCall | None:
    try:
        obj = json.loads(inner)
    except json.JSONDecodeError:
        return None
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    args = obj.get("arguments", {})
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall("call_" + uuid.uuid4().hex[:24], obj["name"], json.dumps(args, ensure_ascii=False))


class ToolCallParser:
    """Splits generated text into content and tool calls as it arrives. `feed` returns (text to show now, calls
    completed now); text that may begin a `<tool_call>` block is held until it is clear. A block that does not
    parse as {"name": str, "arguments": object} stays content; whitespace between calls is dropped."""

    def __init__(self) -> None:
        self.held = ""
        self.inside = False
        self.calls: list[ToolCall] = []

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        self.held += text
        shown, new = [], []
        while True:
            if self.inside:
                end = self.held.find(CALL_CLOSE)
                if end < 0:
                    break
                inner, block = self.held[:end], CALL_OPEN + self.held[: end + len(CALL_CLOSE)]
                self.held, self.inside = self.held[end + len(CALL_CLOSE) :], False
                call = _parse_call(inner.strip())
                if call is None:
                    shown.append(block)
                else:
                    new.append(call)
                    self.calls.append(call)
                continue
            start = self.held.find(CALL_OPEN)
            if start >= 0:
                shown.append(self.held[:start])
                self.held, self.inside = self.held[start + len(CALL_OPEN) :], True
                continue
            keep = max((k for k in range(1, len(CALL_OPEN)) if self.held.endswith(CALL_OPEN[:k])), default=0)
            shown.append(self.held[: len(self.held) - keep])
            self.held = self.held[len(self.held) - keep :]
            break
        text = "".join(shown)
        if self.calls and not text.strip():
            text = ""
        return text, new

    def flush(self) -> str:
        """The end of the output: a block left open, or a held prefix, is content after all."""
        out = (CALL_OPEN if self.inside else "") + self.held
        self.held, self.inside = "", False
        return "" if self.calls and not out.strip() else out


def parse_tool_calls(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content, calls) of a whole output; content is None when the output is only calls."""
    parser = ToolCallParser()
    shown, calls = parser.feed(text)
    shown += parser.flush()
    content = shown.strip() if parser.calls else shown
    return (content or None) if parser.calls else content, calls


def tool_call_grammar(tools: list[dict], choice: str | dict, parallel: bool = True) -> str | None:
    """The grammar for `tool_choice`, as xgrammar structural-tag JSON (`generate.structured.Constraint`'s
    "structural_tag" kind): "auto" lets the model write text, and any `<tool_call>` it opens must be a
    well-formed call of one of the tools; "required" allows only calls (at least one); {"type": "function",
    "function": {"name": N}} only calls of N; "none" is no constraint. `parallel` False allows one call."""
    if choice == "none" or not tools:
        return None
    if isinstance(choice, dict):
        name = choice["function"]["name"]
        tools = [t for t in tools if t["function"]["name"] == name]
        if not tools:
            raise InputError(f"tool_choice names the function {name!r}, which is not in tools")
    tags = [
        {
            "type": "tag",
            "begin": f'{CALL_OPEN}\n{{"name": "{t["function"]["name"]}", "arguments": ',
            # at most one whitespace character in a row, as in the compact JSON of response_format
            "content": {
                "type": "json_schema",
                "max_whitespace_cnt": 1,
                "json_schema": t["function"].get("parameters") or {"type": "object", "properties": {}},
            },
            "end": f"}}\n{CALL_CLOSE}",
        }
        for t in tools
    ]
    if choice == "auto":
        fmt = {"type": "triggered_tags", "triggers": [CALL_OPEN], "tags": tags, "stop_after_first": not parallel}
    else:
        fmt = {
            "type": "tags_with_separator",
            "tags": tags,
            "separator": "\n",
            "at_least_one": True,
            "stop_after_first": not parallel,
        }
    return json.dumps({"type": "structural_tag", "format": fmt})
