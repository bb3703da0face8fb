"""`cake serve`: load as `cake run` does, then answer the OpenAI API over HTTP."""

from __future__ import annotations

import sys
import threading
from dataclasses import dataclass

from rich.console import Console

from cake.cli_run import LoadOptions, load_model
from cake.warmup import freeze_heap


@dataclass(frozen=True)
class ServeOptions:
    load: LoadOptions
    host: str = "127.0.0.1"
    port: int = 8080
    api_key: str | None = None
    max_queue: int = 64
    served_name: str | None = None
    prefill_chunk: int = 32


def serve_command(o: ServeOptions) -> None:
    import uvicorn

    from cake.server.app import Served, create_app

    err = Console(stderr=True)
    model = load_model(o.load, err)
    name = o.served_name or _model_name(o.load)
    engine = model.engine  # its pool holds the sequences the stages cache
    engine.max_waiting = o.max_queue
    # A request that arrives waits for the chunk in flight: 32 tokens take
    # ~28 ms on 2 cores (SmolLM2 Q4_1), and prefill runs at 0.84x of 128-chunks
    engine.prefill_chunk = o.prefill_chunk
    served = Served(
        name, model.tokenizer, engine, model.pipeline.max_context, o.api_key
    )
    closed = []

    def close() -> None:  # once: at the app's shutdown, or after uvicorn returns
        if not closed:
            closed.append(True)
            engine.close()
            model.close()

    app = create_app(served, on_shutdown=[close])
    # every batch size and chunk width compiles now, not in a client's request
    shapes, warm_s = engine.warm_up()
    freeze_heap()
    threading.Thread(target=engine.grammars.prepare, daemon=True).start()
    engine.start()
    info = model.info
    warm = f", {shapes} step shapes compiled in {warm_s:.1f} s" if shapes else ""
    print(
        f"cake: serving {name} on http://{o.host}:{o.port}/v1 ({info.backend} on "
        f"{info.device}, {info.dtype}; {model.max_sequences} sequences of "
        f"{model.pipeline.max_context} positions; loaded in {info.load_s:.1f} s"
        f"{warm})",
        file=sys.stderr,
        flush=True,
    )
    try:
        uvicorn.run(app, host=o.host, port=o.port, log_level="warning")
    finally:
        close()


def _model_name(o: LoadOptions) -> str:
    if o.model is None:
        from cake.api import DEFAULT_MODEL_FILE

        return DEFAULT_MODEL_FILE.removesuffix(".gguf")
    name = o.model.resolve().name
    return name.removesuffix(".gguf")
