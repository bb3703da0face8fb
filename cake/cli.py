"""The `cake` command line: thin; it parses arguments and calls the library."""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from cake.errors import CakeError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run large language models split by layers across ordinary devices.",
)


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


# Loading options shared by `run` and `serve`
ModelOpt = Annotated[
    Path | None,
    typer.Option(
        "--model",
        "-m",
        help="Hugging Face model folder or .gguf file (default: SmolLM2-135M-Instruct).",
    ),
]
BackendOpt = Annotated[
    str, typer.Option(help="auto, jax, mlx, numpy or a registered backend.")
]
ContextOpt = Annotated[
    int | None,
    typer.Option(
        help="KV cache positions (default: the model's, at most 4096).", min=1
    ),
]
TopologyOpt = Annotated[
    Path | None,
    typer.Option(
        help="Topology YAML: workers run their layers, the master the rest; "
        "'auto': probe --workers, plan and run the plan."
    ),
]
WorkersOpt = Annotated[
    str | None,
    typer.Option(
        help="With --topology auto: HOST:PORT,... (or a topology file, for "
        "its hosts and public keys); 'discover': the workers found on the local "
        "network whose keys --allow-workers holds (implies --topology auto)."
    ),
]
DiscoverTimeoutOpt = Annotated[
    float,
    typer.Option(
        "--discover-timeout", min=0.1, help="Seconds --workers discover listens."
    ),
]
MinWorkersOpt = Annotated[
    int,
    typer.Option(
        "--min-workers", min=0, help="With --workers discover: fail with fewer."
    ),
]
AllowWorkersOpt = Annotated[
    Path | None,
    typer.Option(
        "--allow-workers",
        help="Folder of the workers' public NAME.key files: --workers discover "
        "uses only those.",
    ),
]
BenchTimeoutOpt = Annotated[
    float,
    typer.Option(
        "--bench-timeout", min=1.0, help="Seconds one worker's probe may take."
    ),
]
RetryTimeoutOpt = Annotated[
    float,
    typer.Option("--retry-timeout", min=0.0, help="Seconds to wait for a lost worker."),
]
ClientKeyOpt = Annotated[
    Path | None,
    typer.Option("--client-key", help="This master's NAME.key_secret (cake keys)."),
]


@app.command()
def run(
    prompt: Annotated[
        str | None,
        typer.Argument(help="Prompt; read from stdin if absent (chat if a terminal)."),
    ] = None,
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    max_tokens: Annotated[int, typer.Option("--max-tokens", "-n", min=1)] = 256,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0)] = 0.7,
    top_k: Annotated[int, typer.Option("--top-k", min=0)] = 0,
    top_p: Annotated[float, typer.Option("--top-p", min=0.0, max=1.0)] = 1.0,
    min_p: Annotated[float, typer.Option("--min-p", min=0.0, max=1.0)] = 0.05,
    repetition_penalty: Annotated[
        float, typer.Option("--repetition-penalty", min=0.0)
    ] = 1.0,
    seed: Annotated[int | None, typer.Option()] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Continue the prompt as given.")
    ] = False,
    chat: Annotated[
        bool,
        typer.Option(
            "--chat",
            help="Wrap the prompt in the chat template (default when there is one).",
        ),
    ] = False,
    system: Annotated[
        str | None, typer.Option(help="System message for --chat.")
    ] = None,
    stop: Annotated[
        list[str] | None, typer.Option(help="Stop when this text appears (repeatable).")
    ] = None,
    dtype: Annotated[DType, typer.Option()] = DType.auto,
    context: ContextOpt = None,
    stats_json: Annotated[
        Path | None,
        typer.Option("--stats-json", help="Write the statistics as JSON here."),
    ] = None,
    topology: TopologyOpt = None,
    workers: WorkersOpt = None,
    discover_timeout: DiscoverTimeoutOpt = 3.0,
    min_workers: MinWorkersOpt = 1,
    allow_workers: AllowWorkersOpt = None,
    bench_timeout: BenchTimeoutOpt = 300.0,
    retry_timeout: RetryTimeoutOpt = 30.0,
    client_key: ClientKeyOpt = None,
) -> None:
    """Generate text: stdout carries only the generated text, stderr the rest."""
    from cake.cli_run import LoadOptions, RunOptions, run_command

    if raw and chat:
        raise CakeError("--raw and --chat exclude each other")
    run_command(
        RunOptions(
            prompt=prompt,
            load=LoadOptions(
                model=model,
                backend=backend,
                dtype=dtype.value,
                context=context,
                topology=topology,
                workers=workers,
                discover_timeout=discover_timeout,
                min_workers=min_workers,
                allow_workers=allow_workers,
                retry_timeout=retry_timeout,
                client_key=client_key,
                bench_timeout=bench_timeout,
            ),
            max_tokens=max_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition_penalty=repetition_penalty,
            seed=seed,
            mode="raw" if raw else "chat" if chat else "auto",
            system=system,
            stop=tuple(stop or ()),
            stats_json=stats_json,
        )
    )


@app.command()
def serve(
    model: ModelOpt = None,
    backend: BackendOpt = "auto",
    dtype: Annotated[DType, typer.Option()] = DType.auto,
    context: ContextOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=1, max=65535)] = 8080,
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="CAKE_API_KEY",
            help="Require 'Authorization: Bearer KEY' (also $CAKE_API_KEY).",
        ),
    ] = None,
    parallel: Annotated[
        int,
        typer.Option(
            "--parallel",
            min=1,
            help="Sequences generated at once (each caches --context positions).",
        ),
    ] = 8,
    max_queue: Annotated[
        int,
        typer.Option("--max-queue", min=0, help="Requests that may wait; then 429."),
    ] = 64,
    served_name: Annotated[
        str | None,
        typer.Option("--served-model-name", help="The model id clients send."),
    ] = None,
    prefill_chunk: Annotated[
        int,
        typer.Option(
            "--prefill-chunk",
            min=1,
            help="Prompt tokens per step: smaller lets a new request in sooner, "
            "larger prefills faster (docs/serving.md).",
        ),
    ] = 32,
    topology: TopologyOpt = None,
    workers: WorkersOpt = None,
    discover_timeout: DiscoverTimeoutOpt = 3.0,
    min_workers: MinWorkersOpt = 1,
    allow_workers: AllowWorkersOpt = None,
    bench_timeout: BenchTimeoutOpt = 300.0,
    retry_timeout: RetryTimeoutOpt = 30.0,
    client_key: ClientKeyOpt = None,
) -> None:
    """Serve the model over an OpenAI-compatible HTTP API, batching requests."""
    from cake.cli_run import LoadOptions
    from cake.cli_serve import ServeOptions, serve_command

    serve_command(
        ServeOptions(
            load=LoadOptions(
                model=model,
                backend=backend,
                dtype=dtype.value,
                context=context,
                topology=topology,
                workers=workers,
                discover_timeout=discover_timeout,
                min_workers=min_workers,
                allow_workers=allow_workers,
                retry_timeout=retry_timeout,
                client_key=client_key,
                bench_timeout=bench_timeout,
                max_sequences=parallel,
            ),
            host=host,
            port=port,
            api_key=api_key,
            max_queue=max_queue,
            served_name=served_name,
            prefill_chunk=prefill_chunk,
        )
    )


@app.command()
def chat(
    prompt: Annotated[
        str | None,
        typer.Argument(
            help="Print the answer to this and exit; without it, a conversation "
            "over stdin (/reset clears it, /exit or EOF quits)."
        ),
    ] = None,
    url: Annotated[
        str, typer.Option(help="The server's API base.")
    ] = "http://127.0.0.1:8080/v1",
    api_key: Annotated[
        str | None,
        typer.Option(
            "--api-key",
            envvar="CAKE_API_KEY",
            help="The key of `cake serve --api-key` (also $CAKE_API_KEY).",
        ),
    ] = None,
    model: Annotated[
        str | None,
        typer.Option("--model", "-m", help="Model id (default: the first served)."),
    ] = None,
    system: Annotated[str | None, typer.Option(help="System message.")] = None,
    temperature: Annotated[float, typer.Option("--temperature", "-t", min=0.0)] = 0.7,
    top_p: Annotated[float | None, typer.Option("--top-p", min=0.0, max=1.0)] = None,
    max_tokens: Annotated[
        int | None,
        typer.Option("--max-tokens", "-n", min=1, help="(default: the server's)"),
    ] = None,
    seed: Annotated[int | None, typer.Option()] = None,
) -> None:
    """Chat with a running `cake serve`: answers stream to stdout."""
    from cake.cli_chat import ChatOptions, chat_command

    chat_command(
        ChatOptions(
            prompt=prompt,
            url=url,
            api_key=api_key,
            model=model,
            system=system,
            temperature=temperature,
            top_p=top_p,
            max_tokens=max_tokens,
            seed=seed,
        )
    )


@app.command()
def worker(
    model: Annotated[
        Path | None,
        typer.Option(
            "--model", "-m", help="The same model file or folder as the master."
        ),
    ] = None,
    layers: Annotated[
        str | None,
        typer.Option(
            help="Layers to serve, inclusive: A-B, e.g. 0-13 (default: none until "
            "a master assigns them)."
        ),
    ] = None,
    name: Annotated[
        str | None, typer.Option(help="This worker's name in --topology.")
    ] = None,
    topology: Annotated[Path | None, typer.Option(help="Topology YAML.")] = None,
    backend: Annotated[
        str | None,
        typer.Option(help="auto, jax, mlx, numpy (default: the topology's, or auto)."),
    ] = None,
    bind: Annotated[
        str | None,
        typer.Option(help="tcp://HOST:PORT (default: tcp://127.0.0.1:10128)."),
    ] = None,
    context: Annotated[
        int | None, typer.Option(help="KV cache positions per sequence.", min=1)
    ] = None,
    max_sequences: Annotated[
        int, typer.Option("--max-sequences", help="Sequences cached at once.", min=1)
    ] = 4,
    dtype: Annotated[DType, typer.Option()] = DType.auto,
    secret_key: Annotated[
        Path | None,
        typer.Option("--secret-key", help="This worker's NAME.key_secret (cake keys)."),
    ] = None,
    allow_keys: Annotated[
        Path | None,
        typer.Option(
            "--allow-keys", help="Folder of the masters' public NAME.key files."
        ),
    ] = None,
    insecure: Annotated[
        bool,
        typer.Option("--insecure", help="Allow a non-loopback bind without keys."),
    ] = False,
    announce: Annotated[
        bool,
        typer.Option(
            help="With keys: announce this worker on the local network (mDNS)."
        ),
    ] = True,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            "--cache-dir",
            help="No model here: the master streams the weights of the layers it "
            "assigns, kept in DIR for later runs.",
        ),
    ] = None,
    warm_up: Annotated[
        bool,
        typer.Option(
            "--warm-up",
            help="Run every step shape a master may send once, as soon as the "
            "layers are loaded (JAX compiles each; kept in its compile cache).",
        ),
    ] = False,
) -> None:
    """Serve a range of layers to masters over ZeroMQ until Ctrl-C or SIGTERM.

    Without --layers or --name the worker waits for a master to assign its layers
    (`cake run --topology auto --workers ...`); with --cache-dir and no --model
    the master also sends their weights."""
    from cake.cli_worker import WorkerOptions, worker_command

    worker_command(
        WorkerOptions(
            model=model,
            layers=layers,
            name=name,
            topology=topology,
            backend=backend,
            bind=bind,
            context=context,
            max_sequences=max_sequences,
            dtype=dtype.value,
            secret_key=secret_key,
            allow_keys=allow_keys,
            insecure=insecure,
            announce=announce,
            cache_dir=cache_dir,
            warm_up=warm_up,
        )
    )


@app.command()
def keys(
    name: Annotated[
        str, typer.Argument(help="Key name: writes NAME.key, NAME.key_secret.")
    ],
    folder: Annotated[Path, typer.Option("--dir", help="Where to write them.")] = Path(
        "."
    ),
) -> None:
    """Create a CurveZMQ key pair for a worker or a master."""
    from cake.cli_worker import keys_command

    keys_command(name, folder)


@app.command()
def workers(
    timeout: Annotated[
        float, typer.Option(min=0.1, help="Seconds to listen for answers.")
    ] = 3.0,
    allow_workers: AllowWorkersOpt = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="One JSON list on stdout.")
    ] = False,
) -> None:
    """List the workers that announce themselves on the local network (mDNS)."""
    from cake.cli_worker import workers_command

    workers_command(timeout, allow_workers, as_json)


@app.command()
def backends() -> None:
    """List the registered backends and whether each is usable here."""
    from cake.backends.base import _REGISTRY, auto_backend, available_backends

    avail = available_backends()
    for name in sorted(_REGISTRY):
        ok = name in avail
        devs = (
            ", ".join(f"{d.kind}:{d.name}" for d in avail[name].devices())
            if ok
            else "-"
        )
        print(f"{name:8} {'available' if ok else 'unavailable':12} {devs}")
    print(f"auto -> {auto_backend()}")


from cake.cli_tools import register as _register_tools  # noqa: E402

_register_tools(app)  # bench, plan, split


def main() -> None:
    try:
        app()
    except CakeError as e:
        print(f"cake: error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(file=sys.stderr)
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
