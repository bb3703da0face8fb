"""Tool calls parsed back from model text (cake.server.tools), in each family's
syntax, streamed piece by piece or whole."""

from __future__ import annotations

import json

import pytest

from cake.server.schema import ApiError, parse_tools
from cake.server.tools import (
    Hermes,
    Llama3Json,
    ToolStream,
    syntax_for,
    template_inputs,
)

NAMES = frozenset({"get_weather", "add"})
HERMES_TEXT = (
    "Let me check.\n<tool_call>\n"
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n'
    "</tool_call>\n<tool_call>\n"
    '{"name": "add", "arguments": "{\\"a\\": 1, \\"b\\": 2}"}\n</tool_call>'
)
LLAMA_TEXT = (
    '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
    '{"name": "add", "parameters": {"a": 1}}'
)
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {}}},
    {"type": "function", "function": {"name": "add"}},
]


def test_hermes_blocks_become_calls_and_the_rest_stays_text():
    content, calls = Hermes().parse(HERMES_TEXT, NAMES)
    assert content.strip() == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "add"]
    assert json.loads(calls[0].arguments) == {"city": "Paris", "unit": "celsius"}
    assert json.loads(calls[1].arguments) == {"a": 1, "b": 2}  # JSON text, decoded


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": </tool_call>',
        '<tool_call>{"name": "unknown_tool", "arguments": {}}</tool_call>',
        'Just text with {"name": "add"} in it.',
    ],
)
def test_a_call_that_does_not_parse_is_left_as_text(text):
    assert Hermes().parse(text, NAMES) == (text, [])


def test_llama3_json_calls_with_the_python_tag_and_semicolons():
    content, calls = Llama3Json().parse(LLAMA_TEXT, NAMES)
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": "Oslo"}),
        ("add", {"a": 1}),
    ]
    text = "The answer is 3."
    assert Llama3Json().parse(text, NAMES) == (text, [])


@pytest.mark.parametrize(
    ("syntax", "text"),
    [
        (Hermes(), HERMES_TEXT),
        (Llama3Json(), LLAMA_TEXT),
        (Hermes(), "No call here, only a < sign and <tool text."),
        (Llama3Json(), "Plain words."),
    ],
)
def test_a_stream_split_anywhere_gives_what_the_whole_text_gives(syntax, text):
    whole_content, whole_calls = syntax.parse(text, NAMES)
    for size in (1, 3, 7, len(text)):
        ts = ToolStream(syntax, NAMES)
        sent = "".join(ts.push(text[i : i + size]) for i in range(0, len(text), size))
        tail, calls = ts.finish()
        assert calls == whole_calls
        if calls:
            assert sent + tail == whole_content
            assert "<tool_call>" not in sent and "{" not in sent
        else:
            assert sent + tail == text


def test_a_template_without_tools_gets_them_in_a_system_message():
    plain = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    tools = parse_tools(TOOLS, "auto")
    msgs = [
        {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function",
             "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
        {"role": "tool", "tool_call_id": "c1", "content": "18 C"},
    ]  # fmt: skip
    out, extra = template_inputs(msgs, tools, plain)
    assert extra == {}
    assert out[0]["role"] == "system" and "<tools>" in out[0]["content"]
    assert '"name": "get_weather"' in out[0]["content"]
    assert out[2] == {
        "role": "assistant",
        "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}'
        "\n</tool_call>",
    }
    assert out[3] == {
        "role": "user",
        "content": "<tool_response>\n18 C\n</tool_response>",
    }
    # a template that renders `tools` gets them as transformers passes them
    qwen_like = (
        "{% if tools %}<tools>{{ tools | tojson }}</tools>{% endif %}<tool_call>"
    )
    out, extra = template_inputs(msgs, tools, qwen_like)
    assert [t["function"]["name"] for t in extra["tools"]] == ["get_weather", "add"]
    assert out[1]["content"] == ""
    assert out[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Rome"}
    assert isinstance(syntax_for(qwen_like), Hermes)


def test_tool_choice_is_checked():
    assert parse_tools(TOOLS, "none") is None
    assert parse_tools(TOOLS, None).choice == "auto"
    named = parse_tools(TOOLS, {"type": "function", "function": {"name": "add"}})
    assert (named.choice, named.forced) == ("named", "add")
    for tools, choice in [
        (None, "required"),
        (TOOLS, {"type": "function", "function": {"name": "nope"}}),
        (TOOLS, "sometimes"),
        ([{"type": "function"}], "auto"),
        (["get_weather"], "auto"),
    ]:
        with pytest.raises(ApiError):
            parse_tools(tools, choice)
