"""Tool calls: the tools a chat request offers reach the model through its chat
template; the calls it writes come back parsed, in OpenAI's shape.

Each template family writes calls its own way, and the template says which:

- Hermes (Qwen 2/2.5/3, Hermes, and most templates that mention `<tool_call>`):
  `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, one block
  per call, with text around them allowed;
- Llama 3.1/3.2/3.3 JSON (templates that write `"parameters": `): the whole
  answer is `{"name": ..., "parameters": {...}}`, optionally after
  `<|python_tag|>`, several calls joined by `;`.

A template that does not know tools at all (SmolLM2's) gets them in a system
message that describes the Hermes syntax, and earlier calls and results are
written into the conversation as Hermes text, so any chat model can be offered
tools. tool_choice "required" or a named function constrains the answer to
such calls by a grammar (cake.grammar), so it always parses.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from cake.grammar import lark_grammar


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str  # JSON text, as OpenAI sends it

    def openai(self, index: int | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {} if index is None else {"index": index}
        return {
            **out,
            "id": f"call_{uuid.uuid4().hex[:24]}",
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }


@dataclass(frozen=True)
class Tools:
    """The functions a request offers and what it asks of them."""

    functions: tuple[dict, ...]  # OpenAI's {"name", "description", "parameters"}
    choice: str  # "auto", "required" or "named"
    forced: str | None = None  # the function tool_choice names
    parallel: bool = True  # more than one call per answer (required, auto)

    @property
    def names(self) -> frozenset[str]:
        return frozenset(f["name"] for f in self.functions)


class Syntax:
    """How one template family writes tool calls."""

    name = ""

    def parse(self, text: str, names: frozenset[str]) -> tuple[str, list[ToolCall]]:
        """(the text outside the calls, the calls); no calls when any fails to parse."""
        raise NotImplementedError

    def held(self, text: str) -> int:
        """Where in `text` a call may begin: a stream sends only what is before."""
        raise NotImplementedError

    def grammar(self, tools: Tools) -> str:
        """A grammar (cake.grammar) of answers that are only calls of `tools`."""
        raise NotImplementedError


def _call_schema(tools: Tools, args_key: str) -> dict:
    fs = [f for f in tools.functions if tools.forced in (None, f["name"])]
    one = [
        {
            "type": "object",
            "properties": {"name": {"const": f["name"]}, args_key: f["parameters"]},
            "required": ["name", args_key],
            "additionalProperties": False,
        }
        for f in fs
    ]
    return one[0] if len(one) == 1 else {"anyOf": one}


def _call(
    obj: Any, names: frozenset[str], args_keys: tuple[str, ...]
) -> ToolCall | None:
    if not isinstance(obj, dict) or obj.get("name") not in names:
        return None
    for key in args_keys:
        if key in obj:
            args = obj[key]
            if isinstance(args, str):  # some models write the arguments as JSON text
                try:
                    args = json.loads(args)
                except json.JSONDecodeError:
                    return None
            if not isinstance(args, dict):
                return None
            return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))
    return ToolCall(obj["name"], "{}")


class Hermes(Syntax):
    name = "hermes"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    _BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|\Z)", re.DOTALL)

    def parse(self, text, names):
        calls, outside, at = [], [], 0
        for m in self._BLOCK.finditer(text):
            try:
                call = _call(json.loads(m.group(1)), names, ("arguments", "parameters"))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
            outside.append(text[at : m.start()])
            at = m.end()
        outside.append(text[at:])
        return "".join(outside), calls

    def held(self, text):
        i = text.find(self.OPEN)
        if i >= 0:
            return i
        for k in range(min(len(self.OPEN) - 1, len(text)), 0, -1):  # a partial "<tool"
            if self.OPEN.startswith(text[-k:]):
                return len(text) - k
        return len(text)

    def grammar(self, tools):
        block = r'"<tool_call>\n" call "\n</tool_call>"'
        many = r' ("\n" tc)*' if tools.parallel and not tools.forced else ""
        return lark_grammar(
            f"start: tc{many}\ntc: {block}\ncall: %json "
            + json.dumps(_call_schema(tools, "arguments"))
        )


class Llama3Json(Syntax):
    name = "llama3_json"
    TAG = "<|python_tag|>"

    def parse(self, text, names):
        body = text.strip().removeprefix(self.TAG).strip()
        if not body.startswith("{"):
            return text, []
        calls = []
        for part in body.split(";"):
            try:
                call = _call(json.loads(part), names, ("parameters", "arguments"))
            except json.JSONDecodeError:
                call = None
            if call is None:
                return text, []
            calls.append(call)
        return "", calls

    def held(self, text):
        head = text.lstrip()
        if (
            not head
            or head.startswith("{")
            or self.TAG.startswith(head[: len(self.TAG)])
        ):
            return 0  # it may be a call: the answer waits for its end
        return len(text)

    def grammar(self, tools):
        many = ' ("; " call)*' if tools.parallel and not tools.forced else ""
        return lark_grammar(
            f"start: call{many}\ncall: %json "
            + json.dumps(_call_schema(tools, "parameters"))
        )


def syntax_for(template: str | None) -> Syntax:
    if template and '"parameters": ' in template and "<|start_header_id|>" in template:
        return Llama3Json()
    return Hermes()


def knows_tools(template: str | None) -> bool:
    """Does the template render the `tools` it is given?"""
    return bool(template) and re.search(r"\btools\b", template) is not None


def _system_text(tools: Tools) -> str:
    lines = "\n".join(
        json.dumps({"type": "function", "function": f}, ensure_ascii=False)
        for f in tools.functions
    )
    return (
        "You may call one or more functions to answer. Their signatures, as JSON "
        f"schemas, are inside <tools></tools>:\n<tools>\n{lines}\n</tools>\n"
        "To call one, answer with a JSON object of its name and arguments inside "
        '<tool_call></tool_call> tags:\n<tool_call>\n{"name": <function-name>, '
        '"arguments": <arguments-object>}\n</tool_call>'
    )


def _arguments(call: dict) -> dict:
    f = call.get("function") or {}
    args = f.get("arguments")
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except json.JSONDecodeError:
            pass
    return {"name": f.get("name"), "arguments": args}


def template_inputs(
    messages: list[dict], tools: Tools | None, template: str | None
) -> tuple[list[dict], dict[str, Any]]:
    """The messages and extra variables to render with the chat template."""
    if knows_tools(template):
        out = []
        for m in messages:
            m = {**m, "content": m.get("content") or ""}
            if m.get("tool_calls"):  # transformers' convention: arguments as a dict
                m["tool_calls"] = [
                    {**c, "function": _arguments(c)} for c in m["tool_calls"]
                ]
            out.append(m)
        if tools is None:
            return out, {}
        return out, {
            "tools": [{"type": "function", "function": f} for f in tools.functions]
        }
    out = []
    for m in messages:
        content = m.get("content") or ""
        if m["role"] == "assistant" and m.get("tool_calls"):
            blocks = [
                "<tool_call>\n"
                + json.dumps(_arguments(c), ensure_ascii=False)
                + "\n</tool_call>"
                for c in m["tool_calls"]
            ]
            content = "\n".join(([content] if content else []) + blocks)
            out.append({"role": "assistant", "content": content})
        elif m["role"] == "tool":
            text = f"<tool_response>\n{content}\n</tool_response>"
            out.append({"role": "user", "content": text})
        else:
            out.append({**m, "content": content})
    if tools is not None:
        system = _system_text(tools)
        if out and out[0]["role"] == "system":
            out[0] = {**out[0], "content": out[0]["content"] + "\n\n" + system}
        else:
            out.insert(0, {"role": "system", "content": system})
    return out, {}


class ToolStream:
    """One streamed choice: text goes out as it comes until a call may begin;
    the rest waits for the end, then goes out as calls or as text."""

    def __init__(self, syntax: Syntax, names: frozenset[str]) -> None:
        self.syntax, self.names = syntax, names
        self.text = ""
        self.sent = 0

    def push(self, piece: str) -> str:
        self.text += piece
        safe = max(self.sent, self.syntax.held(self.text))
        out, self.sent = self.text[self.sent : safe], safe
        return out

    def finish(self) -> tuple[str, list[ToolCall]]:
        """(the text not yet sent, the calls)."""
        content, calls = self.syntax.parse(self.text, self.names)
        if not calls:
            return self.text[self.sent :], []
        return content[self.sent :], calls
