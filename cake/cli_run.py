"""`cake run`: load with a progress bar, generate to stdout, statistics to stderr."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

import cake
from cake.errors import CakeError
from cake.stats import GenerationStats
from cake.warmup import freeze_heap


@dataclass(frozen=True)
class LoadOptions:
    """How `cake run` and `cake serve` load the model (see cake.load)."""

    model: Path | None = None
    backend: str = "auto"
    dtype: str = "auto"
    context: int | None = None
    topology: Path | None = None
    workers: str | None = None  # with topology "auto"; "discover": by mDNS
    discover_timeout: float = 3.0
    min_workers: int = 1
    allow_workers: Path | None = None  # the workers' NAME.key files, for discover
    retry_timeout: float = 30.0
    client_key: Path | None = None
    bench_timeout: float = 300.0
    max_sequences: int = 1


@dataclass(frozen=True)
class RunOptions:
    prompt: str | None
    load: LoadOptions
    max_tokens: int
    temperature: float
    top_k: int
    top_p: float
    min_p: float
    repetition_penalty: float
    seed: int | None
    mode: str  # "raw", "chat" or "auto"
    system: str | None
    stop: tuple[str, ...]
    stats_json: Path | None


def run_command(o: RunOptions) -> None:
    err = Console(stderr=True)
    model = load_model(o.load, err)
    try:
        chat = o.mode == "chat" or (o.mode == "auto" and model.tokenizer.chat_template)
        if o.mode == "chat" and not model.tokenizer.chat_template:
            raise CakeError("this model has no chat template; use --raw")
        # the decode step compiles now, not after the first token
        _, warm_s = model.engine.warm_up(batches=[1], widths=())
        freeze_heap()
        if o.prompt is None and sys.stdin.isatty():
            _interactive(model, o, err, warm_s)
            return
        prompt = o.prompt if o.prompt is not None else sys.stdin.read()
        if chat:
            pieces = model.chat(_messages(o.system, [], prompt), **_kwargs(o))
        else:
            pieces = model.generate(prompt, **_kwargs(o))
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        sys.stdout.flush()
        _report(model, model.stats, o, err, warm_s)
    finally:
        model.close()


def load_model(o: LoadOptions, err: Console) -> cake.Model:
    """cake.load with a progress bar on stderr."""
    topology: str | Path | None = o.topology
    workers: object = o.workers
    if o.workers == "discover":
        from cake.net.discovery import Discover

        if o.topology is not None and str(o.topology) != "auto":
            raise CakeError("--workers discover goes with --topology auto, not a file")
        topology = "auto"
        workers = Discover(o.discover_timeout, o.min_workers, o.allow_workers)
    elif o.allow_workers is not None:
        raise CakeError("--allow-workers goes with --workers discover")
    elif o.topology is not None and str(o.topology) == "auto":
        topology = "auto"
        if not o.workers:
            raise CakeError(
                "--topology auto needs --workers HOST:PORT,... (or discover)"
            )
    elif o.workers:
        raise CakeError("--workers goes with --topology auto")
    with Progress(
        TextColumn("loading"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("tensors"),
        console=err,
        transient=True,
    ) as bar:
        task = bar.add_task("load", total=None)

        def progress(done: int, total: int) -> None:
            bar.update(task, completed=done, total=total)

        return cake.load(
            o.model,
            backend=o.backend,
            dtype=o.dtype,
            max_context=o.context,
            progress=progress,
            topology=topology,
            retry_timeout=o.retry_timeout,
            client_key=o.client_key,
            workers=workers,
            bench_timeout=o.bench_timeout,
            max_sequences=o.max_sequences,
        )


def _kwargs(o: RunOptions) -> dict:
    return dict(
        max_tokens=o.max_tokens,
        temperature=o.temperature,
        top_k=o.top_k,
        top_p=o.top_p,
        min_p=o.min_p,
        repetition_penalty=o.repetition_penalty,
        seed=o.seed,
        stop=o.stop,
    )


def _messages(system: str | None, history: list[dict], prompt: str) -> list[dict]:
    head = [{"role": "system", "content": system}] if system else []
    return head + history + [{"role": "user", "content": prompt}]


def _interactive(model: cake.Model, o: RunOptions, err: Console, warm_s: float) -> None:
    if not model.tokenizer.chat_template:
        raise CakeError(
            "interactive mode needs a chat template; pass a PROMPT with --raw"
        )
    err.print("[dim]chat with the model; an empty line or Ctrl-D ends[/dim]")
    history: list[dict] = []
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if not line.strip():
            break
        reply = []
        for piece in model.chat(_messages(o.system, history, line), **_kwargs(o)):
            reply.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history += [
            {"role": "user", "content": line},
            {"role": "assistant", "content": "".join(reply)},
        ]
        _report(model, model.stats, o, err, warm_s)


def _report(
    model: cake.Model,
    st: GenerationStats,
    o: RunOptions,
    err: Console,
    warm_s: float = 0.0,
) -> None:
    info = model.info
    if st.stop_reason == "context":
        err.print(
            f"cake: stopped: the context of {model.pipeline.max_context} tokens is full"
        )
    print(
        f"cake: {info.backend} on {info.device} ({info.dtype}): "
        f"prompt {st.prompt_tokens} tok at {st.prompt_tokens_per_s:.1f} tok/s, "
        f"decode {st.decode_tokens} tok at {st.decode_tokens_per_s:.1f} tok/s, "
        f"first token {st.first_token_s:.2f} s, load {info.load_s:.1f} s"
        + (f", warm-up {warm_s:.1f} s" if warm_s else "")
        # rates leave out the steps that compiled a new shape
        + (f", compiling {st.compile_s:.1f} s" if st.compile_s else ""),
        file=sys.stderr,
    )
    if o.stats_json:
        data = {
            "backend": info.backend,
            "device": info.device,
            "dtype": info.dtype,
            "load_s": info.load_s,
            "warm_up_s": warm_s,
            **st.as_dict(),
        }
        try:
            o.stats_json.write_text(json.dumps(data, indent=1) + "\n")
        except OSError as e:
            raise CakeError(f"cannot write {o.stats_json}: {e}") from None
