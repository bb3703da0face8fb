"""JaxLlamaStage: the host side of a JAX stage (NumPy in and out, slots, buckets)."""

from __future__ import annotations

import importlib
import os
import weakref
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cake import heap
from cake.backends.base import DeviceInfo, Step
from cake.backends.jax import cache as kvcache
from cake.backends.jax import cache_writes
from cake.backends.jax import draw as jdraw
from cake.backends.jax.linear import KERNEL_ROWS, QMat, cpu_kernel_formats, kernel_rows
from cake.backends.jax.llama import kernel_weights, one_call_rows, stage_step
from cake.backends.jax.params import load_params, rounded_activations, weight_bytes
from cake.backends.jax.programs import Programs, Shape
from cake.config import ModelConfig
from cake.errors import CakeError
from cake.kv import check_step, dtype_of
from cake.sequence import StageSequences
from cake.shard import Shard
from cake.weights import TensorSource

CAUSAL_CHUNK = 128  # query block of a prefill's attention, see llama.attention

# XLA:CPU hands attention's dots and reductions to YNNPACK, which builds each
# fusion's pipeline at the program's first run: a SmolLM2 decode step on XLA's
# attention took 100-125 ms the first time and 14-18 after (1024 and 2048
# cache positions; 30 layers x 4 such fusions; 30 % of that first run's
# samples in YNNPACK's `slinky` simplifier, perf). The program of each next
# cache bucket runs first in the middle of a generation, so that was a stall
# at every bucket, whether it was compiled ahead or read from the cache.
# Without them the first run takes 25-36 ms (18-45 within a generation), and
# a step 3-6 % longer (8.3 / 14.2 / 21.7 ms -> 8.5 / 15.1 / 22.4 at 256 / 1024
# / 2048 positions, medians of 3 alternating processes, 2026-12-06). Decode
# steps only: a 256-row prefill's widened products are dots too, 710 -> 546
# tok/s without.
NO_LIBRARY_FUSIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}

# XLA:CPU splits a program's LLVM module and generates its code on a thread
# pool of its own, which the first (foreground) compile starts at normal
# priority: a cache bucket's program compiled ahead then ends in code
# generation on both cores beside the steps, not at the compile thread's
# niceness. In one part it should be generated on the compile thread itself
# (inferred from the figures below, not traced).
# SmolLM2, CAKE_CPU_ATTENTION=0, empty cache, worst step over the median, 300
# tokens after 1 / 300 / 1200 / 3000-token prompts, 4 alternating processes
# each (2026-12-06, ms, medians [ranges]): split as XLA chooses 121 [96-135] /
# 46 [38-51] / 135 [129-169] / 28 [24-33]; in one part 97 [94-126] / 35
# [33-41] / 122 [85-127] / 22 [14-24]. Less, not under 100 ms: what is left
# is the new bucket's first run (see NO_LIBRARY_FUSIONS) and the compile's
# other passes beside the steps. Cold `cake run` (kernel path): first token
# 0.14 s against 0.18-0.24, no compile slower. Every CPU program takes it, so
# a program's cache key does not depend on which thread compiled it.
ONE_CODEGEN_PART = {"xla_cpu_parallel_codegen_split_count": 1}


def _attention_kernel_available() -> bool:
    if os.environ.get("CAKE_CPU_ATTENTION", "1") == "0":  # to measure the XLA path
        return False
    from cake.kernels.cpu import attention

    return attention.available()


def _cache_dtype(
    model: np.dtype, rounded: bool, on_cpu: bool, attention_kernel: bool
) -> np.dtype:
    """The KV cache's element type.

    The model's dtype, as the checkpoint's activations: a 16-bit cache halves
    its memory and the bytes attention reads. On the CPU without the attention
    kernel it is float32: XLA there computes in float32 and converting the
    cache at every read costs more than its bytes save (the kernel reads 16-bit
    rows as they are). Where the kernels' products round the activations to 8
    bits (a GGUF of Q8_0, Q4_K_M, ... computed in float32: the numbers are
    llama.cpp's, not HF's exact ones) the cache is float16, as llama.cpp keeps
    it by default: its rounding (2^-11 relative) is far below that of the
    activations, it halves the cache's memory, and at 8 sequences it is the
    bytes that bound attention: SmolLM2 Q4_1, a step for 8 sequences at 16-24
    positions, min of 10 interleaved rounds in one process, float32 / float16
    cache: 4.15 / 3.82 ms (a step for one: 2.48 / 2.55 ms). Float math (float
    checkpoints, MLX groups) keeps the model's dtype, to give HF's numbers;
    on other devices (GPU: not measured yet) the cache stays in it too.
    """
    if on_cpu and not attention_kernel:
        return np.dtype(np.float32)
    if rounded and on_cpu and model == np.float32:
        return np.dtype(np.float16)
    return model


class Dispatched:
    """A dispatched step's drawn ids, (B, 1) int32 still on the device
    (JaxLlamaStage.dispatch)."""

    __slots__ = ("ids",)

    def __init__(self, ids: jax.Array) -> None:
        self.ids = ids

    def result(self) -> np.ndarray:
        """The ids (B,) on the host, once the step has run."""
        return np.array(self.ids).reshape(-1)


class JaxLlamaStage:
    """Layers [shard.start, shard.end) of a llama-family model on one JAX device.

    `trace_count` counts how often the step function was traced (compiled):
    once per batch size, prefill-length bucket and (XLA attention only)
    cache-length bucket.
    """

    def __init__(
        self,
        config: ModelConfig,
        shard: Shard,
        tensors: TensorSource,
        dtype: str,
        max_context: int,
        max_sequences: int,
        device: DeviceInfo,
        jax_device: jax.Device,
    ) -> None:
        if max_context < 1 or max_sequences < 1:
            raise CakeError("max_context and max_sequences must be at least 1")
        self.config, self.shard, self.dtype, self.device = config, shard, dtype, device
        self.max_context, self.max_sequences = max_context, max_sequences
        self._jax_device = jax_device
        model_dtype = dtype_of(dtype)
        on_cpu = jax_device.platform == "cpu"
        kernels = cpu_kernel_formats() if on_cpu else frozenset()
        # Decode steps and short chunks attend through the CPU kernel, which
        # reads the cache in place at each sequence's own length (see forward).
        self._attention_kernel = bool(kernels) and _attention_kernel_available()
        self._params = load_params(
            config,
            shard,
            tensors,
            model_dtype,
            max_context,
            jax_device,
            kernels=kernels,
        )
        self.weight_bytes = weight_bytes(self._params)
        self.cache_dtype = _cache_dtype(
            model_dtype,
            rounded_activations(self._params),
            on_cpu,
            self._attention_kernel,
        )
        self.prefill_chunk = _prefill_chunk(self._params)
        heap.trim()  # the copies made while loading
        self._cache = kvcache.allocate(
            len(shard),
            max_sequences,
            config.num_key_value_heads,
            max_context,
            config.head_dim,
            jnp.dtype(self.cache_dtype),
            jax_device,
        )
        self.seqs = StageSequences(max_sequences, max_context)  # slots and lengths
        self.trace_count = 0
        # Layers that are one kernel call (decode, short chunks) are held by
        # the kernels: their steps take none of these layers' weights as
        # parameters (cake.kernels.cpu.layer.hold), ~55 KB a layer less
        # resident per compiled step. Longer chunks take them all.
        self._held, self._held_rows = self._hold_layers() if on_cpu else ((), 0)
        self._params_held = (
            dict(
                self._params,
                layers=[
                    {} if h is not None else w
                    for w, h in zip(self._params["layers"], self._held, strict=True)
                ],
            )
            if self._held_rows
            else self._params
        )
        # what a step's params and cache look like, for compiling one on
        # another thread while this one steps (and donates the cache)
        self._avals, self._avals_held = (
            jax.tree_util.tree_map(
                lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                (params, self._cache),
            )
            for params in (self._params, self._params_held)
        )
        # head steps draw tokens in the step (see draw.py): through the
        # kernels' sampler on the CPU where they hold it, else through XLA
        from cake.kernels import cpu

        self._draw_kernel = bool(kernels) and cpu.sample_available()
        self.programs = Programs(self._lower, self._compile_options)
        self._settled: dict[Shape, Any] = {}  # see _xla_program

    def _hold_layers(self) -> tuple[tuple, int]:
        """(per layer its Held or None, the most rows every held layer takes
        in one call; 0: none held). Released when the stage goes."""
        if not self._attention_kernel or os.environ.get("CAKE_CPU_LAYER_HELD") == "0":
            return (), 0  # (=0: weights as parameters, to measure the difference)
        from cake.kernels.cpu import layer as cpu_layer

        cfg = self.config
        block = importlib.import_module(f"cake.backends.jax.{cfg.family.block}")
        layers = self._params["layers"]
        rows = [one_call_rows(cfg, block, w) for w in layers]
        if not layers or min(rows) == 0:  # all or none: one step, one form
            return (), 0
        held = tuple(
            cpu_layer.hold(
                **kernel_weights(w), attn_cols=cfg.num_attention_heads * cfg.head_dim
            )
            for w in layers
        )
        weakref.finalize(self, _release, tuple(h.key for h in held))
        return held, min(rows)

    def _compile_options(self, shape: Shape) -> dict | None:
        """XLA options for `shape`'s program (see NO_LIBRARY_FUSIONS, ONE_CODEGEN_PART)."""
        if self._jax_device.platform != "cpu":
            return None
        if shape.width == 1 and not shape.attention_kernel:
            return {**NO_LIBRARY_FUSIONS, **ONE_CODEGEN_PART}
        return dict(ONE_CODEGEN_PART)

    def _draws(self, shape: Shape) -> bool:
        """Whether `shape`'s step takes a draw's inputs and returns ids too:
        every head step of the last tokens' logits, whether its Step draws or
        not (see draw.py)."""
        return self.shard.head and not shape.all_logits

    def _holds(self, shape: Shape) -> bool:
        """Whether `shape`'s step runs on the held weights (see __init__)."""
        return (
            self._held_rows > 0
            and shape.attention_kernel
            and shape.batch * shape.width <= self._held_rows
        )

    def _traced_step(self, params, cache, x, slots, positions, lengths, draw, **static):
        self.trace_count += 1  # runs only while JAX traces, i.e. compiles
        return stage_step(
            params,
            cache,
            x,
            slots,
            positions,
            lengths,
            draw=draw,
            draw_kernel=self._draw_kernel,
            cfg=self.config,
            embed=self.shard.embed,
            head=self.shard.head,
            out_dtype=self.dtype,
            first=self.shard.start,
            **static,
        )

    compiles = True  # each new (batch, width, cache bucket) is a compilation

    @property
    def draws(self) -> bool:
        """A head stage draws a Step's tokens itself (see draw.py)."""
        return self.shard.head

    @property
    def compile_s(self) -> float:
        """Seconds steps waited for a compilation (tracing included), in this
        thread or for the background one (see programs.py)."""
        return self.programs.waited_s

    def _lower(self, shape: Shape):
        """`shape`'s step, traced and lowered (Programs compiles it)."""
        cfg = self.config
        b, w = shape.batch, shape.width
        if self.shard.embed:
            x = jax.ShapeDtypeStruct((b, w), jnp.int32)
        else:
            x = jax.ShapeDtypeStruct((b, w, cfg.hidden_size), dtype_of(self.dtype))
        ints = [jax.ShapeDtypeStruct((b,), jnp.int32)] * 3
        holds = self._holds(shape)
        params, cache = self._avals_held if holds else self._avals

        # A function and a jit of its own for each shape, dropped once lowered:
        # JAX keys its trace cache weakly on the function, so the traced step
        # (its jaxpr) goes with it instead of living as long as the stage:
        # 1.3-2.2 MB less resident per compiled SmolLM2 step, of 7-8 MB. What
        # stays, ~3.5 MB of it XLA's (the HLO module, buffer assignment and
        # their protos, the thunks), grows with the stage's layers (2026-12-03).
        def _traced_step(params, cache, x, slots, positions, lengths, draw, **static):
            # the names matter: donate_argnames below reads "cache" from them
            return self._traced_step(
                params, cache, x, slots, positions, lengths, draw, **static
            )

        step = jax.jit(
            _traced_step,
            static_argnames=(
                "t_len",
                "all_logits",
                "causal_chunk",
                "attention_kernel",
                "held",
            ),
            donate_argnames=("cache",),
        )
        return step.lower(
            params,
            cache,
            x,
            *ints,
            jdraw.avals(b) if self._draws(shape) else None,
            t_len=shape.t_len,
            all_logits=shape.all_logits,
            causal_chunk=shape.causal_chunk,
            attention_kernel=shape.attention_kernel,
            held=self._held if holds else None,
        )

    def release(self, seq_ids: Sequence[int]) -> None:
        """Forget these sequences and free their cache slots (unknown ids are ignored)."""
        self.seqs.release(seq_ids)

    def close(self) -> None:
        """Stop compiling ahead (cake.Model.close calls this)."""
        self.programs.close()

    @property
    def asynchronous(self) -> bool:
        """Does a decode step run on the device after its call returns? Then
        the engine queues step n+1 before it reads step n's tokens (see
        `dispatch`). On a GPU or TPU, yes; on the CPU where XLA attends (no
        attention kernel) too: `benchmarks/bench_overlap.py`, SmolLM2 Q4_1,
        CAKE_CPU_ATTENTION=0, an engine round 4.6 -> 4.3 ms at 1 sequence,
        14.1 -> 13.7 at 8 (2026-12-04). Not with the CPU kernels: XLA:CPU runs
        a program it counts under 1000 flops in the caller's thread, and the
        kernels' custom calls count none, so the call returns once the step
        has run (overlap there: 0.96-1.06x, noise, and a step's delay before
        each token reaches its stream)."""
        return self._jax_device.platform != "cpu" or not self._attention_kernel

    def forward(self, x: np.ndarray, step: Step) -> np.ndarray:
        """See `cake.backends.base.StageModel`: NumPy in, NumPy out."""
        x = np.asarray(x)
        out = self._launch(x, step)
        if step.draw is not None:  # only the ids leave the device
            return np.array(out[1]).reshape(-1)
        last = self.shard.head and not step.all_logits
        if last:  # its program draws too (see _draws): (logits, ids)
            out = out[0]
        # a private, writable copy: no JAX array leaks (for 8 rows of SmolLM2
        # logits, 1.5 MB, it took 40-130 us a step: a Step that draws spares it)
        out = np.asarray(out).copy()
        return out if last else out[:, : step.max_len]

    def dispatch(self, x: np.ndarray | Dispatched, step: Step) -> Dispatched:
        """`forward` of a Step that draws, without waiting for its ids: they
        stay on the device until `Dispatched.result`. `x` may be the ids of
        an earlier dispatch of this stage, to feed them as they are, a decode
        step of the same sequences in the same order: step n+1 is then queued
        before step n's tokens reach the host."""
        if step.draw is None or not self.shard.head:
            raise CakeError("only a head stage's step that draws can be dispatched")
        if not isinstance(x, Dispatched):
            x = np.asarray(x)
        return Dispatched(self._launch(x, step)[1])

    def _launch(self, x: np.ndarray | Dispatched, step: Step):
        """Check `step`, pad `x`, call the step's program: its outputs, on the
        device ((logits, ids) where the step's shape draws)."""
        cfg = self.config
        if isinstance(x, Dispatched):
            fits = self.shard.embed and x.ids.shape == (step.batch, step.max_len)
            if not fits or step.max_len != 1:
                raise CakeError("drawn ids feed only a decode step of as many rows")
        else:
            check_step(step, x, self.shard, cfg)
        slots = self.seqs.admit(step)
        n = step.max_len
        width = kvcache.bucket(n)  # prefill lengths padded to powers of two
        # The attention kernel takes each sequence's length at run time, so its
        # steps compile once per (batch, width), whatever the cache holds; the
        # XLA path reads a static bucket of cache positions.
        kernel = self._attention_kernel and width <= KERNEL_ROWS
        ends = max(p + k for p, k in zip(step.positions, step.lengths, strict=True))
        t_len = kvcache.bucket(
            0 if kernel else ends, cap=self.max_context, floor=kvcache.MIN_CACHE_BUCKET
        )
        if isinstance(x, Dispatched):
            xp = x.ids  # (B, 1) int32, on the device
        elif self.shard.embed:
            xp = np.zeros((step.batch, width), np.int32)
            xp[:, :n] = x
        else:
            xp = np.zeros((step.batch, width, cfg.hidden_size), dtype_of(self.dtype))
            xp[:, :n] = x
        ints = [np.asarray(a, np.int32) for a in (slots, step.positions, step.lengths)]
        shape = Shape(
            step.batch,
            width,
            t_len,
            step.all_logits,
            # a prefill from position 0 skips the masked half of its attention
            CAUSAL_CHUNK if width > CAUSAL_CHUNK and not any(step.positions) else None,
            kernel,
        )
        if kernel:
            program = self.programs.get(shape)
        else:
            program = self._settled.get(shape)
            if program is None:
                program = self._xla_program(shape, ends)
            else:  # as Programs.get does: no cache write starts mid-generation
                cache_writes.note_step()
        # NumPy inputs go in as they are and the program moves them to the
        # weights' device: a device_put per array first cost ~70 us each (CPU)
        params = self._params_held if self._holds(shape) else self._params
        draw = jdraw.host_inputs(step.draw, step.batch) if self._draws(shape) else None
        out, self._cache = program(params, self._cache, xp, *ints, draw)
        self.seqs.advance(step)
        return out

    def _xla_program(self, shape: Shape, ends: int):
        """The program for a step on XLA's attention: `shape`'s own, else (while
        it compiles) a larger bucket's; queues what later steps will need
        (`ends`: the cache positions the step fills)."""
        # XLA's attention reads t_len positions and masks those past each
        # sequence's length, so a larger bucket's step gives the same
        # result: while this bucket compiles, a larger one answers
        larger, t = [], shape.t_len
        while t < self.max_context:
            t = kvcache.bucket(t + 1, cap=self.max_context)
            larger.append(shape._replace(t_len=t))
        if shape.width == 1 and not self.programs.known(shape):
            # a batch size's first decode step (a warm-up's, as a rule):
            # decode over the whole cache too, now, so that this batch
            # never waits for a bucket's compile (see _next_shapes)
            self.programs.get(shape._replace(t_len=self.max_context))
        program = self.programs.get(shape, larger)
        nexts, waiting = self._next_shapes(shape, ends)
        for later, first in nexts:
            self.programs.ahead(later, first=first)
        if program is self.programs.ready(shape) and not waiting:
            # its own program, and what follows it queued: from now on a
            # dict lookup (all of the above took ~30 us a step, 2026-12-04)
            self._settled[shape] = program
        return program

    def _next_shapes(
        self, shape: Shape, ends: int
    ) -> tuple[list[tuple[Shape, bool]], bool]:
        """What steps after one of `shape` (XLA's attention) that fills `ends`
        cache positions will need, for the background thread (programs.py),
        as (shape, whether before what is queued), and whether a later step
        of `shape` may still add to them: first, decode over the whole cache,
        which can stand in for any bucket (see forward) once it is compiled,
        so that no decode step waits for a compile (for this batch; after a
        prefill chunk, for its one sequence); then the same step in the next
        cache bucket: for decode at once, for a prefill chunk only once the
        next chunk would reach that bucket (the next bucket of a prompt's
        last chunks is a later, longer prompt's: compiled beside this
        prompt's decode, 4-7 s of one core here on XLA's attention, it
        slowed every step of it; SmolLM2 Q4_1, 2 cores, empty cache, worst
        round of 300 tokens after a 1200-token prompt, 3 alternating
        processes: 143-178 ms -> 37-43, medians 28-30 -> 25-28 ms); after a
        decode step, decode with one sequence more or less."""
        whole = self.max_context
        decode = Shape(shape.batch, 1, whole, False, None, False)
        out, waiting = [], False
        if shape.width == 1:
            out.append((decode, True))
        elif not self._attention_kernel:  # else decode reads through the kernel
            out.append((decode._replace(batch=1), True))
        if shape.t_len < whole:  # past position 0: no causal chunk
            nxt = kvcache.bucket(shape.t_len + 1, cap=whole)
            if shape.width == 1 or ends + shape.width > shape.t_len:
                out.append((shape._replace(t_len=nxt, causal_chunk=None), False))
            else:
                waiting = True
        if shape.width == 1:
            out += [
                (shape._replace(batch=b), False)
                for b in (shape.batch + 1, shape.batch - 1)
                if 1 <= b <= self.max_sequences
            ]
        return out, waiting


def _release(keys: tuple[int, ...]) -> None:
    from cake.kernels.cpu import layer as cpu_layer

    for key in keys:
        cpu_layer.release(key)


def _prefill_chunk(params) -> int:
    """Prompt ids per forward call that this stage runs fastest (Pipeline takes
    the smallest over its stages): KERNEL_ROWS where the CPU kernels multiply
    block formats, whose chunks of 128 beat one widened chunk of 512 (see
    linear.KERNEL_ROWS); else 512. 16-bit formats on the kernels (their panel
    GEMM, any rows): a 512-token SmolLM2 BF16 prefill ran at 2044-2280 tok/s
    in one chunk of 512, 2079-2266 in chunks of 128, 1797-1890 in chunks of
    64 (interleaved, one run): 512, the fewer calls. F32 (kernels up to
    linear.KERNEL_ROWS_F32 rows, XLA's dot past them): 512, as before it went
    to the kernels."""
    leaves = jax.tree_util.tree_leaves(params, is_leaf=lambda x: isinstance(x, QMat))
    blocks = any(
        isinstance(w, QMat)
        and w.kernel
        and w.fmt != "F32"
        and kernel_rows(w.fmt) == KERNEL_ROWS
        for w in leaves
    )
    return KERNEL_ROWS if blocks else 512
