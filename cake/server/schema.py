"""OpenAI request bodies -> what the engine runs; OpenAI's error objects.

Every field OpenAI defines for /v1/chat/completions and /v1/completions is
either honoured or refused with a 400 naming it, never silently dropped.
Extensions (as vLLM and llama.cpp's server accept them): top_k, min_p,
repetition_penalty.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from cake.errors import CakeError
from cake.grammar import GrammarError, json_grammar
from cake.sampling import SamplingParams
from cake.server.tools import Tools

MAX_N = 16  # choices per request
MAX_TOP_LOGPROBS = 20  # as OpenAI


class ApiError(Exception):
    """An error answered as OpenAI's error object with an HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status,
            message,
            type,
            param,
            code,
        )

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass
class Generation:
    """A parsed request: the prompt (text or ids) and how to generate."""

    params: list[SamplingParams]  # one per choice (n)
    max_tokens: int | None
    stop: tuple[str, ...]
    logprobs: int | None  # None: off; k: k alternatives per token
    stream: bool
    include_usage: bool
    grammar: str | None = None  # cake.grammar: the output must follow it
    messages: list[dict] | None = None  # chat
    tools: Tools | None = None  # None: no tool may be called
    prompts: list[str | list[int]] = field(default_factory=list)  # completions
    echo: bool = False


def bad(message: str, param: str | None = None) -> ApiError:
    return ApiError(400, message, param=param)


def _number(body: dict, name: str, default: float, lo: float, hi: float) -> float:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        raise bad(f"'{name}' must be a number", name)
    if not lo <= v <= hi:
        raise bad(f"'{name}' must be between {lo} and {hi}; got {v}", name)
    return float(v)


def _int(body: dict, name: str, default: int | None, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, int):
        raise bad(f"'{name}' must be an integer", name)
    if not lo <= v <= hi:
        raise bad(f"'{name}' must be between {lo} and {hi}; got {v}", name)
    return v


def _bool(body: dict, name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise bad(f"'{name}' must be true or false", name)
    return v


def _stop(body: dict) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    if isinstance(v, str):
        return (v,)
    if isinstance(v, list) and all(isinstance(s, str) for s in v):
        return tuple(s for s in v if s)
    raise bad("'stop' must be a string or a list of strings", "stop")


def _sampling(body: dict, n: int) -> list[SamplingParams]:
    seed = _int(body, "seed", None, -(2**63), 2**63 - 1)
    top_k = int(_int(body, "top_k", 0, -1, 2**31) or 0)
    common = dict(
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        # top_p 0 keeps the most likely token alone, as a tiny top_p does
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0) or 1e-9,
        top_k=max(top_k, 0),  # -1 (vLLM's "off") and 0 are off
        min_p=_number(body, "min_p", 0.0, 0.0, 1.0),
        repetition_penalty=_number(body, "repetition_penalty", 1.0, 1e-6, 10.0),
        presence_penalty=_number(body, "presence_penalty", 0.0, -2.0, 2.0),
        frequency_penalty=_number(body, "frequency_penalty", 0.0, -2.0, 2.0),
    )
    try:
        # choice i draws from seed + i: n choices differ, and each is reproducible
        return [
            SamplingParams(seed=None if seed is None else (seed + i) % 2**64, **common)
            for i in range(n)
        ]
    except CakeError as e:
        raise bad(str(e)) from None


def _response_format(body: dict) -> str | None:
    """The grammar the output must follow (cake.grammar), or None."""
    rf = body.get("response_format")
    if rf is None:
        return None
    kind = rf.get("type") if isinstance(rf, dict) else None
    if kind == "text":
        return None
    try:
        if kind == "json_object":
            return json_grammar(None)
        if kind == "json_schema":
            js = rf.get("json_schema")
            schema = js.get("schema") if isinstance(js, dict) else None
            if not isinstance(schema, dict):
                raise bad(
                    "response_format json_schema needs 'json_schema': "
                    "{'name': ..., 'schema': {...}}",
                    "response_format",
                )
            return json_grammar(schema)
    except GrammarError as e:
        raise bad(str(e), "response_format") from None
    raise bad("'response_format' must have type text, json_object or json_schema")


def _common(body: dict) -> dict[str, Any]:
    n = int(_int(body, "n", 1, 1, MAX_N) or 1)
    max_tokens = _int(body, "max_completion_tokens", None, 1, 2**31)
    if max_tokens is None:
        max_tokens = _int(body, "max_tokens", None, 1, 2**31)
    opts = body.get("stream_options")
    if opts is not None and not isinstance(opts, dict):
        raise bad("'stream_options' must be an object", "stream_options")
    stream = _bool(body, "stream")
    if opts and not stream:
        raise bad(
            "'stream_options' is only allowed with stream: true", "stream_options"
        )
    return dict(
        grammar=_response_format(body),
        params=_sampling(body, n),
        max_tokens=max_tokens,
        stop=_stop(body),
        stream=stream,
        include_usage=bool(opts and opts.get("include_usage")),
    )


def _content(message: dict, i: int) -> str | None:
    c = message.get("content")
    if c is None or isinstance(c, str):
        return c
    if isinstance(c, list):  # content parts: text only
        texts = []
        for part in c:
            if not isinstance(part, dict) or part.get("type") != "text":
                raise bad(
                    "only text content parts are supported",
                    f"messages[{i}].content",
                )
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise bad("'content' must be a string or a list of parts", f"messages[{i}].content")


def parse_chat(body: dict) -> Generation:
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise bad("'messages' must be a non-empty list", "messages")
    messages = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise bad("each message needs a 'role'", f"messages[{i}]")
        messages.append({**m, "content": _content(m, i)})
    lp = _bool(body, "logprobs")
    top = _int(body, "top_logprobs", None, 0, MAX_TOP_LOGPROBS)
    if top is not None and not lp:
        raise bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    tools = body.get("tools")
    if tools is not None and not isinstance(tools, list):
        raise bad("'tools' must be a list", "tools")
    return Generation(
        **_common(body),
        logprobs=(top or 0) if lp else None,
        messages=messages,
        tools=parse_tools(
            tools or None,
            body.get("tool_choice"),
            _bool_or(body, "parallel_tool_calls"),
        ),
    )


def _bool_or(body: dict, name: str, default: bool = True) -> bool:
    return default if body.get(name) is None else _bool(body, name)


def parse_tools(tools: Any, tool_choice: Any, parallel: bool = True) -> Tools | None:
    """A request's tools and tool_choice; None when no tool may be called."""
    if tools is None:
        if tool_choice not in (None, "none", "auto"):
            raise bad("'tool_choice' needs 'tools'", "tool_choice")
        return None
    functions = []
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(f, dict) or t.get("type") != "function":
            raise bad(
                "each tool must be {'type': 'function', 'function': {...}}",
                f"tools[{i}]",
            )
        if not isinstance(f.get("name"), str) or not f["name"]:
            raise bad("each function needs a 'name'", f"tools[{i}].function.name")
        params = f.get("parameters", {"type": "object"})
        if not isinstance(params, dict):
            raise bad(
                "'parameters' must be a JSON schema object", f"tools[{i}].function"
            )
        functions.append({**f, "parameters": params})
    if tool_choice in (None, "auto"):
        return Tools(tuple(functions), "auto", parallel=parallel)
    if tool_choice == "none":
        return None
    if tool_choice == "required":
        return Tools(tuple(functions), "required", parallel=parallel)
    name = None
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
    if not isinstance(name, str):
        raise bad(
            "'tool_choice' must be none, auto, required or "
            "{'type': 'function', 'function': {'name': ...}}",
            "tool_choice",
        )
    if name not in {f["name"] for f in functions}:
        raise bad(f"tool_choice names '{name}', which is not in 'tools'", "tool_choice")
    return Tools(tuple(functions), "named", name)


def parse_completion(body: dict) -> Generation:
    p = body.get("prompt")
    if isinstance(p, str):
        prompts: list[str | list[int]] = [p]
    elif isinstance(p, list) and p and all(isinstance(x, str) for x in p):
        prompts = list(p)
    elif isinstance(p, list) and p and all(_is_id(x) for x in p):
        prompts = [list(p)]
    elif (
        isinstance(p, list)
        and p
        and all(isinstance(x, list) and x and all(_is_id(t) for t in x) for x in p)
    ):
        prompts = [list(x) for x in p]
    else:
        raise bad(
            "'prompt' must be a string, a list of strings, or token ids", "prompt"
        )
    for name in ("suffix", "best_of"):
        if body.get(name) not in (None, 1) and not (
            name == "suffix" and body[name] == ""
        ):
            raise bad(f"'{name}' is not supported", name)
    return Generation(
        **_common(body),
        logprobs=_int(body, "logprobs", None, 0, 5),
        prompts=prompts,
        echo=_bool(body, "echo"),
    )


def _is_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0
