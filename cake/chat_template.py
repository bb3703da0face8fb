"""Chat templates: the model's Jinja template rendered the way Hugging Face renders it.

Templates come from model files (tokenizer_config.json, chat_template.jinja, GGUF
metadata) and are untrusted code, so they run in Jinja's immutable sandbox with the
same environment transformers builds: trim_blocks, lstrip_blocks, loop controls, a
`tojson` that does not escape HTML, and the `raise_exception` / `strftime_now`
globals.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from cake.errors import TokenizerError


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}` renders its body unchanged.

    transformers uses the tag to find assistant tokens for training masks; a
    template that contains it must still parse here.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(
            lineno
        )

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # Jinja's own tojson escapes <, >, & and ' for HTML, which changes the prompt.
    return json.dumps(
        value,
        ensure_ascii=ensure_ascii,
        indent=indent,
        separators=separators,
        sort_keys=sort_keys,
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def select_chat_template(value: Any) -> str | None:
    """The default template from a config value: a string, or a list of
    `{"name": ..., "template": ...}` (named templates; "default" is used)."""
    if isinstance(value, str):
        return value or None
    if isinstance(value, Sequence):
        named = {
            item.get("name"): item.get("template")
            for item in value
            if isinstance(item, Mapping)
        }
        template = named.get("default")
        return template if isinstance(template, str) and template else None
    return None


def render_chat_template(
    template: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    special_tokens: Mapping[str, str] | None = None,
    **extra: Any,
) -> str:
    """Render `messages` (dicts with "role" and "content") with `template`.

    `special_tokens` are the named tokens (bos_token, eos_token, ...) that the
    template sees as variables; `extra` are further template variables, and
    override them, as in transformers.
    """
    if not messages:
        raise TokenizerError("cannot apply a chat template to an empty conversation")
    # Like transformers: keys whose value is None are dropped, because templates
    # test for a key's presence and would render "None".
    chat = []
    for message in messages:
        if not isinstance(message, Mapping):
            raise TokenizerError(
                f"chat messages must be dicts with 'role' and 'content', got {message!r}"
            )
        chat.append({k: v for k, v in message.items() if v is not None})
    variables = {**(special_tokens or {}), **extra}
    variables.setdefault("tools", None)
    variables.setdefault("documents", None)
    try:
        compiled = _compile(template)
        return compiled.render(
            messages=chat, add_generation_prompt=add_generation_prompt, **variables
        )
    except jinja2.exceptions.TemplateError as err:
        raise TokenizerError(
            f"the model's chat template failed: {err}; "
            "check the messages (roles, order) or use --raw"
        ) from err
