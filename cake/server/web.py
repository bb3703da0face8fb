"""The chat page of `cake serve` (GET /) and the markdown it shows, rendered here.

The page (static/chat.*: plain HTML, CSS and JavaScript, no build step) talks to
the OpenAI API of the same server. Answers are rendered server-side by
markdown-it-py with raw HTML disabled, so markup in the model's output is
escaped; fenced code is highlighted by Pygments into classes that
/ui/pygments.css colours. The page and the renderer need no API key: they hold
no secret and touch no model.
"""

from __future__ import annotations

from functools import cache
from importlib.resources import files

from markdown_it import MarkdownIt
from pygments import highlight
from pygments.formatters import HtmlFormatter
from pygments.lexers import get_lexer_by_name
from pygments.util import ClassNotFound
from starlette.requests import Request
from starlette.responses import HTMLResponse, Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.staticfiles import StaticFiles

from cake.server.schema import ApiError

STATIC = files("cake.server") / "static"
MAX_MARKDOWN = 1 << 20  # bytes; an answer of the whole 4096-token context is ~20 KB
# Inline scripts and styles are refused, and images other than data: URLs
# (markdown from a model may point anywhere)
CSP = (
    "default-src 'self'; img-src 'self' data:; base-uri 'none'; "
    "form-action 'none'; frame-ancestors 'none'"
)
_CODE = HtmlFormatter(nowrap=True)  # spans only: markdown-it wraps <pre><code>


def _highlight(code: str, lang: str, _attrs: str) -> str:
    try:
        lexer = get_lexer_by_name(lang) if lang else None
    except ClassNotFound:
        lexer = None
    if lexer is None:
        return ""  # markdown-it escapes the code itself
    return highlight(code, lexer, _CODE)


def _link_open(self, tokens, idx, options, env) -> str:
    # a link in an answer opens a new tab: leaving the page would lose the chat
    tokens[idx].attrSet("target", "_blank")
    tokens[idx].attrSet("rel", "noopener noreferrer")
    return self.renderToken(tokens, idx, options, env)


@cache
def _markdown() -> MarkdownIt:
    md = MarkdownIt("commonmark", {"html": False, "highlight": _highlight})
    md.enable(["table", "strikethrough"])
    md.add_render_rule("link_open", _link_open)
    return md


def render_markdown(text: str) -> str:
    """HTML for markdown `text`: CommonMark with tables and strikethrough, raw
    HTML escaped, fenced code highlighted by Pygments (`language-X` classes)."""
    return _markdown().render(text)


@cache
def pygments_css() -> str:
    """The colours of highlighted code inside `.md`, light and dark."""
    css = []
    for scheme, style in (("light", "default"), ("dark", "github-dark")):
        rules = HtmlFormatter(style=style).get_token_style_defs(".md pre code")
        css.append(f"@media (prefers-color-scheme: {scheme}) {{\n")
        css += [f"  {r}\n" for r in rules]
        css.append("}\n")
    return "".join(css)


async def _page(_request: Request) -> Response:
    html = (STATIC / "chat.html").read_text(encoding="utf-8")
    return HTMLResponse(html, headers={"Content-Security-Policy": CSP})


async def _markdown_page(request: Request) -> Response:
    body = await request.body()
    if len(body) > MAX_MARKDOWN:
        raise ApiError(413, f"the text is over {MAX_MARKDOWN} bytes")
    try:
        text = body.decode("utf-8")
    except UnicodeDecodeError:
        raise ApiError(400, "the text is not UTF-8") from None
    return HTMLResponse(render_markdown(text))


async def _css(_request: Request) -> Response:
    return Response(pygments_css(), media_type="text/css")


def routes() -> list[BaseRoute]:
    """GET / (the page), /ui/static/* (its script and style), /ui/pygments.css,
    POST /ui/markdown (text in, HTML out)."""
    return [
        Route("/", _page, methods=["GET"]),
        Route("/ui/markdown", _markdown_page, methods=["POST"]),
        Route("/ui/pygments.css", _css, methods=["GET"]),
        Mount("/ui/static", StaticFiles(directory=str(STATIC)), name="static"),
    ]
