"""`cake chat`: talk to a running `cake serve` (or any OpenAI-compatible server).

stdout carries only the answers, stderr the rest; one line per error.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TextIO

import openai

from cake.errors import ServerError

DEFAULT_URL = "http://127.0.0.1:8080/v1"
HELP = "/reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops an answer"


@dataclass(frozen=True)
class ChatOptions:
    """Where the server is and how to sample; None leaves a field to the server."""

    prompt: str | None = None
    url: str = DEFAULT_URL
    api_key: str | None = None
    model: str | None = None  # the first of /v1/models
    system: str | None = None
    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    seed: int | None = None


class Chat:
    """A conversation with a server: each `ask` sends the whole history."""

    def __init__(self, o: ChatOptions) -> None:
        self.o = o
        # a server without --api-key takes any key; the client insists on one
        self.client = openai.OpenAI(base_url=o.url, api_key=o.api_key or "-")
        self.model = o.model or self._first_model()
        self.history: list[dict[str, str]] = []

    def _first_model(self) -> str:
        try:
            models = self.client.models.list().data
        except openai.OpenAIError as e:
            raise server_error(e, self.o.url) from None
        if not models:
            raise ServerError(f"{self.o.url}/models lists no model; pass --model")
        return models[0].id

    def reset(self) -> None:
        self.history.clear()

    def ask(self, text: str) -> Iterator[str]:
        """Stream the answer to `text`, piece by piece. The turn joins the history
        when the answer ends, or when the caller closes the iterator early (the
        answer so far: Ctrl-C); an error leaves the history as it was."""
        system = [{"role": "system", "content": self.o.system}] if self.o.system else []
        question = {"role": "user", "content": text}
        sampling = {
            k: v
            for k, v in (
                ("temperature", self.o.temperature),
                ("top_p", self.o.top_p),
                ("max_tokens", self.o.max_tokens),
                ("seed", self.o.seed),
            )
            if v is not None
        }
        answer: list[str] = []
        try:
            stream = self.client.chat.completions.create(
                model=self.model,
                messages=[*system, *self.history, question],
                stream=True,
                **sampling,
            )
        except openai.OpenAIError as e:
            raise server_error(e, self.o.url) from None
        done = False
        try:
            for chunk in stream:
                for c in chunk.choices:
                    if c.delta.content:
                        answer.append(c.delta.content)
                        yield c.delta.content
            done = True
        except openai.OpenAIError as e:
            raise server_error(e, self.o.url) from None
        except (GeneratorExit, KeyboardInterrupt):
            done = bool(answer)  # stopped: the answer so far is the answer
            raise
        finally:
            stream.close()  # a client that leaves cancels its request at once
            if done:
                answer_msg = {"role": "assistant", "content": "".join(answer)}
                self.history += [question, answer_msg]


class TurnError(ServerError):
    """The server refused or failed one request (400, 429, 5xx, an error in the
    stream): the next turn may go through."""


def server_error(e: openai.OpenAIError, url: str) -> ServerError:
    """One line for what the server (or the way to it) said."""
    if isinstance(e, openai.APIConnectionError):
        cause = f": {e.__cause__}" if e.__cause__ else ""
        return ServerError(
            f"cannot reach {url}{cause}; is `cake serve` running there? (--url)"
        )
    body = getattr(e, "body", None)
    message = body.get("message") if isinstance(body, dict) else None
    message = message or e.message
    if isinstance(e, openai.AuthenticationError):
        return ServerError(
            f"{url} refused the API key ({message}); pass --api-key KEY or set "
            "$CAKE_API_KEY to the key the server was started with"
        )
    if isinstance(e, openai.NotFoundError):
        code = body.get("code") if isinstance(body, dict) else None
        hint = "" if code == "model_not_found" else " (--url is the API base: .../v1)"
        return ServerError(f"{url}: {message}{hint}")
    if isinstance(e, openai.APIStatusError):
        code = body.get("code") if isinstance(body, dict) else None
        hint = "; /reset starts over" if code == "context_length_exceeded" else ""
        return TurnError(f"the server answered {e.status_code}: {message}{hint}")
    return TurnError(f"the server failed: {message}")  # an error in the stream


def chat_command(o: ChatOptions) -> None:
    """One answer for o.prompt, or a conversation over stdin."""
    chat = Chat(o)
    if o.prompt is not None:
        _answer(chat, o.prompt, sys.stdout, interactive=False)
        return
    if _repl(chat, sys.stdin, sys.stdout):
        sys.exit(1)


def _answer(chat: Chat, text: str, out: TextIO, interactive: bool) -> None:
    pieces = chat.ask(text)
    wrote = False
    try:
        for piece in pieces:
            out.write(piece)
            out.flush()
            wrote = True
    except ServerError:
        if wrote:  # the error line follows a whole line of the answer so far
            out.write("\n")
            out.flush()
        raise
    except KeyboardInterrupt:
        pieces.close()  # closes the stream: the server cancels the request
        out.write("\n")
        out.flush()
        if not interactive:
            raise
        print("cake: stopped", file=sys.stderr)
        return
    out.write("\n")
    out.flush()


def _repl(chat: Chat, inp: TextIO, out: TextIO) -> bool:
    """Answer each line of `inp` until /exit or EOF; True if a turn failed."""
    tty = inp.isatty()
    if tty:
        import readline  # noqa: F401  (line editing for input())

        print(f"cake chat: {chat.model} at {chat.o.url}; {HELP}", file=sys.stderr)
    failed = False
    while True:
        line = _read_line(inp, out, tty)
        if line is None:
            return failed
        text = line.strip()
        if not text:
            continue
        if text == "/exit":
            return failed
        if text == "/reset":
            chat.reset()
            if tty:
                print("cake: the conversation is cleared", file=sys.stderr)
            continue
        try:
            _answer(chat, text, out, interactive=True)
        except TurnError as e:  # the others end the chat (cake.cli.main)
            print(f"cake: error: {e}", file=sys.stderr)
            failed = True


def _read_line(inp: TextIO, out: TextIO, tty: bool) -> str | None:
    if not tty:
        line = inp.readline()
        return line if line else None
    try:
        if out.isatty():
            return input("> ")
        print("> ", end="", file=sys.stderr, flush=True)
        return input()
    except EOFError:
        print(file=sys.stderr)
        return None
