"""`cake bench`, `cake plan` and `cake split`: thin commands over cake.bench,
cake.plan and cake.split. `register(app)` adds them to the typer app."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated

import typer

from cake.errors import CakeError


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    ms = seconds * 1e3
    return f"{ms:.3g}" if ms < 1000 else f"{ms:.0f}"


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f}"


def _pair(v: tuple[float, float]) -> str:
    return f"{_ms(v[0])} / {_ms(v[1])}"


def _workers(
    topology: Path | None, workers: str | None, discover=None, model_fp=None
) -> list:
    """WorkerSpecs to probe, from a topology file or HOST:PORT,... (named so),
    or `discover`ed (--workers discover)."""
    from cake.net.bench import worker_specs
    from cake.topology import load_topology

    if topology is not None and workers is not None:
        raise CakeError("give --topology or --workers, not both")
    if topology is not None:
        return list(load_topology(topology).workers)
    if workers == "discover":
        from cake.net.discovery import find_workers

        # a probe does not assign layers: a worker with fixed ones will do
        return find_workers(discover, model_fingerprint=model_fp, fixed_ok=True)
    return worker_specs(workers)


def bench_command(
    model: Annotated[
        Path | None,
        typer.Option(
            "--model",
            "-m",
            help="Model folder or .gguf to probe; default: a synthetic layer.",
        ),
    ] = None,
    backend: Annotated[str, typer.Option(help="auto, jax, mlx, numpy, ...")] = "auto",
    context: Annotated[
        int, typer.Option(help="The long context (positions) to probe at.", min=1)
    ] = 4096,
    layers: Annotated[
        int, typer.Option(help="Layers in the probed stage.", min=1, max=8)
    ] = 2,
    synthetic: Annotated[
        str, typer.Option(help="Shape of the synthetic layer without --model.")
    ] = "llama3-8b",
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")] = (
        "auto"
    ),
    name: Annotated[str, typer.Option(help="This device's name in the profile.")] = (
        "master"
    ),
    topology: Annotated[
        Path | None, typer.Option(help="Also probe the workers of this topology.")
    ] = None,
    workers: Annotated[
        str | None,
        typer.Option(
            help="Also probe these workers: HOST:PORT,..., or 'discover' (the "
            "workers found on the local network whose keys --allow-workers holds)."
        ),
    ] = None,
    discover_timeout: Annotated[
        float,
        typer.Option(
            "--discover-timeout", min=0.1, help="Seconds --workers discover listens."
        ),
    ] = 3.0,
    min_workers: Annotated[
        int,
        typer.Option(
            "--min-workers", min=0, help="With --workers discover: fail with fewer."
        ),
    ] = 1,
    allow_workers: Annotated[
        Path | None,
        typer.Option(
            "--allow-workers",
            help="Folder of the workers' public NAME.key files (--workers discover).",
        ),
    ] = None,
    json_path: Annotated[
        Path | None, typer.Option("--json", help="Write every figure here as JSON.")
    ] = None,
    client_key: Annotated[
        Path | None,
        typer.Option("--client-key", help="This master's NAME.key_secret (cake keys)."),
    ] = None,
    bench_timeout: Annotated[
        float,
        typer.Option(
            "--bench-timeout", min=1.0, help="Seconds one worker's probe may take."
        ),
    ] = 300.0,
) -> None:
    """Measure each device: time per layer, memory, and (workers) the network."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from cake.bench import profile_local, save_profiles, synthetic_config
    from cake.net.bench import probe_workers
    from cake.net.discovery import Discover

    if model is not None:
        from cake.net.protocol import fingerprint
        from cake.weights.checkpoint import open_checkpoint

        config, tensors = open_checkpoint(model)
        label = str(model)
        model_fp = fingerprint(config, [], tensors)
    else:
        config, tensors = synthetic_config(synthetic), None
        label = f"synthetic {synthetic}"
        model_fp = None  # a synthetic probe: any worker's model will do
    if allow_workers is not None and workers != "discover":
        raise CakeError("--allow-workers goes with --workers discover")
    discover = Discover(discover_timeout, min_workers, allow_workers)
    remote = (
        _workers(topology, workers, discover, model_fp) if topology or workers else []
    )
    err = Console(stderr=True)
    with Progress(
        TextColumn("{task.fields[device]:>12}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.description}"),
        console=err,
        transient=True,
    ) as bar:

        def tracker(device: str):
            task = bar.add_task("starting", total=None, device=device)

            def update(phase: str, done: int, total: int) -> None:
                bar.update(task, description=phase, completed=done, total=total)

            return update

        trackers: dict = {}

        def remote_progress(device: str, phase: str, done: int, total: int) -> None:
            if device not in trackers:
                trackers[device] = tracker(device)
            trackers[device](phase, done, total)

        local = tracker(name)
        # The workers first: an unreachable one fails before the local probe.
        others = (
            probe_workers(
                remote,
                synthetic=None if model is not None else synthetic,
                context=context,
                layers=layers,
                dtype=dtype,
                progress=remote_progress,
                client_key=client_key,
                bench_timeout=bench_timeout,
            )
            if remote
            else []
        )
        profiles = [
            profile_local(
                backend,
                config,
                tensors,
                context=context,
                layers=layers,
                dtype=dtype,
                name=name,
                label=label,
                progress=local,
            ),
            *others,
        ]
    _print_profiles(profiles, config.num_hidden_layers)
    if json_path is not None:
        save_profiles(json_path, profiles)
        print(f"wrote {json_path}", file=sys.stderr)


def _print_profiles(profiles: list, n_layers: int) -> None:
    from rich.console import Console
    from rich.table import Table

    p0 = profiles[0]
    table = Table(title="milliseconds per layer (median)")
    table.add_column("device")
    table.add_column("cached", justify="right")
    for col in ("decode", f"decode x{p0.decode_batch}", f"prefill {p0.prefill_chunk}"):
        table.add_column(col, justify="right")
    for p in profiles:
        star = "*" if "decode_batch_s" in p.estimated else ""
        for j, ctx in enumerate((p.short_context, p.long_context)):
            table.add_row(
                p.name if j == 0 else "",
                str(ctx),
                _ms(p.decode_s[j]),
                _ms(p.decode_batch_s[j]) + (star if j else ""),
                _ms(p.prefill_s[j]),
                end_section=j == 1,
            )
    Console().print(table)
    if any(p.estimated for p in profiles):
        print("* estimated from the short figure: see docs/bench.md")
    for p in profiles:
        net = ""
        if p.rtt_s is not None:
            bw = (
                f", {p.bandwidth_bytes_s / 1e6:.0f} MB/s" if p.bandwidth_bytes_s else ""
            )
            net = f"; round trip {_ms(p.rtt_s)} ms{bw}"
        alone = 1.0 / (n_layers * p.decode_s[1])
        held = ""
        ratio = p.held_layer_bytes / p.layer_bytes if p.layer_bytes else 1.0
        if p.held_layer_bytes and abs(ratio - 1) > 0.05:
            held = f" ({p.held_layer_bytes / 1e6:.1f} MB as {p.backend} holds them)"
        if p.active_layer_bytes is not None:
            held += f" (a token reads {p.active_layer_bytes / 1e6:.1f} MB)"
        loaded = ""
        if p.loaded_bytes is not None:
            loaded = f"; holds {_gb(p.loaded_bytes)} GB of weights now"
        print(
            f"{p.name}: {p.backend} on {p.device_kind}: {p.device_name}; "
            f"{_gb(p.memory_bytes)} GB free{loaded}; weights "
            f"{p.layer_bytes / 1e6:.1f} MB{held} and KV cache "
            f"{p.kv_bytes_per_1k / 1e6:.2f} MB per 1k tokens per layer{net}; "
            f"all {n_layers} layers here: about {alone:.1f} tokens/s "
            f"({p.model}, {p.dtype}; probe {p.probe_seconds:.0f} s)"
        )


def plan_command(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model to place.")],
    profile: Annotated[
        Path, typer.Option(help="Device profiles written by `cake bench --json`.")
    ],
    context: Annotated[
        int | None,
        typer.Option(
            help="Positions per sequence (default: the model's, at most 4096).", min=1
        ),
    ] = None,
    dtype: Annotated[str, typer.Option(help="auto, float32, bfloat16, float16.")] = (
        "auto"
    ),
    master: Annotated[str, typer.Option(help="The master's profile name.")] = "master",
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the topology here.")
    ] = None,
) -> None:
    """Place the model's layers on the profiled devices for the fastest decode."""
    from cake.bench import load_profiles
    from cake.plan import even_split, memory_share_split, plan, to_topology
    from cake.sizes import checkpoint_sizes, experts_line
    from cake.topology import dump_topology
    from cake.weights.checkpoint import context_for, open_checkpoint, resolve_dtype

    profiles = load_profiles(profile)
    config, tensors = open_checkpoint(model)
    sizes = checkpoint_sizes(config, tensors, resolve_dtype(dtype, tensors))
    ctx = context_for(config, context)
    args = (
        profiles,
        sizes.n_layers,
        sizes.per_layer,
        sizes.kv_bytes_per_token,
        ctx,
        master,
    )
    kw = dict(
        activation_bytes=sizes.activation_bytes,
        master_bytes=sizes.master_bytes,
        active_bytes=sizes.active_per_layer,
    )
    mean = sizes.mean_layer_bytes
    print(
        f"{model}: {sizes.weight_bytes / 1e9:.2f} GB of weights as stored, "
        f"{mean / 1e6:.1f} MB per layer on average (largest "
        f"{sizes.layer_bytes / 1e6:.1f} MB)",
        file=sys.stderr,
    )
    if (experts := experts_line(config, sizes)) is not None:
        print(experts, file=sys.stderr)
    read = sizes.mean_active_bytes  # what times are scaled by
    for p in profiles:
        probed = p.active_layer_bytes or p.layer_bytes
        ratio = read / probed if probed else 1.0
        if not 0.5 <= ratio <= 2:
            print(
                f"cake: note: {p.name} was probed with layers of {probed / 1e6:.0f} "
                f"MB read per token; its times are scaled to this model's "
                f"{read / 1e6:.0f} MB (probe with --model for accuracy)",
                file=sys.stderr,
            )
    best = plan(*args, **kw)
    _print_plan(best)
    for name, fn in (("even split", even_split), ("memory share", memory_share_split)):
        other = fn(*args, **kw)
        got = (
            "does not fit"
            if other is None
            else f"{other.tokens_per_second:.2f} tokens/s"
        )
        print(f"  for comparison, {name}: {got}")
    if output is not None:
        if len(best.assignments) == 1 and best.assignments[0].name == master:
            print("every layer runs on the master: no topology file written")
            return
        output.write_text(dump_topology(to_topology(best)))
        print(f"wrote {output}")


def _print_plan(best) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"plan ({best.method}) at {best.context} positions")
    for col in ("device", "layers", "ms/token", "hop ms", "memory GB", "of GB"):
        table.add_column(col, justify="left" if col == "device" else "right")
    for a in best.assignments:
        table.add_row(
            f"{a.name} ({a.backend}, {a.device})",
            f"{a.start}-{a.end - 1} ({a.layers})",
            _ms(a.seconds),
            _ms(a.hop_seconds),
            _gb(a.memory_bytes),
            _gb(a.memory_available),
        )
    Console().print(table)
    for name, why in best.dropped:
        what = "runs no layers (it keeps the embedding and head)"
        print(f"  {name}: {what if name == best.master else 'left out'}, {why}")
    print(
        f"predicted: {best.tokens_per_second:.2f} tokens/s "
        f"({best.seconds_per_token * 1e3:.1f} ms per token, one stream)"
    )


def split_command(
    model: Annotated[Path, typer.Option("--model", "-m", help="Model to split.")],
    topology: Annotated[Path, typer.Option(help="Topology file naming the workers.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="New folder.")],
    master: Annotated[
        bool, typer.Option(help="Also write the master's part (embedding, head).")
    ] = True,
) -> None:
    """Write one model folder per worker holding only that worker's tensors."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

    from cake.split import split_model

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        console=Console(stderr=True),
        transient=True,
    ) as bar:
        task = bar.add_task("split", total=None)

        def progress(name: str, done: int, total: int) -> None:
            bar.update(task, description=name, completed=done, total=total)

        folders = split_model(model, topology, output, master=master, progress=progress)
    for name, folder in folders.items():
        size = sum(f.stat().st_size for f in folder.iterdir() if f.is_file())
        print(f"{name}: {folder} ({size / 1e6:.1f} MB)")


def register(app: typer.Typer) -> None:
    """Add the commands to the `cake` app."""
    app.command("bench")(bench_command)
    app.command("plan")(plan_command)
    app.command("split")(split_command)
