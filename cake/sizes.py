"""What a model's layers weigh: the bytes each stores and the bytes one token's
decode step reads of it, for the planner (cake/plan.py) and the probes
(cake/bench.py).

Weights are counted as the checkpoint stores them (`checkpoint_sizes`: a
quantized layer by its blocks, a mixed file layer by layer), or as parameters x
a dtype (`model_sizes`, a model without a file). A mixture-of-experts layer
keeps every expert in memory, but a token reads only `top_k` of them beside
the attention, the router and the shared expert (`stored_and_active`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from cake.config import ModelConfig
from cake.errors import PlanError
from cake.kv import dtype_of
from cake.pipeline import expected_shape
from cake.weights.names import head_tensor_names, layer_names, layer_shapes
from cake.weights.packed import stored_tensor
from cake.weights.source import TensorSource


@dataclass(frozen=True)
class ModelSizes:
    """Byte counts of one model, all that planning needs of it.

    Weights are counted as the checkpoint stores them (`checkpoint_sizes`), or
    as parameters x a dtype (`model_sizes`); the KV cache and activations are in
    the compute dtype. `each_layer` lists every layer's weights when they
    differ (a quantized file mixing formats); `layer_bytes` is then the largest,
    what the planner reserves for every layer. `each_active` lists what one
    token's decode step reads of each layer where that is less than it stores
    (a mixture of experts: all experts resident, top_k of them read).
    """

    n_layers: int
    layer_bytes: int  # weights of the largest transformer layer
    kv_bytes_per_token: int  # K and V of one layer for one position
    activation_bytes: int  # hidden state of one token crossing a hop
    master_bytes: int  # embedding, final norm and head: always on the master
    each_layer: tuple[int, ...] = ()  # weights of layers 0, 1, ...; () if uniform
    # weights one token reads of layers 0, 1, ...; () if every weight (dense)
    each_active: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        each = self.each_layer
        if each and (len(each) != self.n_layers or max(each) != self.layer_bytes):
            raise PlanError(
                f"{len(each)} layer sizes for {self.n_layers} layers, or their "
                f"largest is not layer_bytes {self.layer_bytes}"
            )
        active = self.each_active
        if active and (
            len(active) != self.n_layers
            or any(a > b for a, b in zip(active, self.per_layer, strict=True))
        ):
            raise PlanError(
                f"{len(active)} active layer sizes for {self.n_layers} layers, or "
                "one exceeds the bytes its layer stores"
            )

    @property
    def per_layer(self) -> tuple[int, ...]:
        """Every layer's weights, in order."""
        return self.each_layer or (self.layer_bytes,) * self.n_layers

    @property
    def active_per_layer(self) -> tuple[int, ...]:
        """What one token's decode step reads of every layer, in order."""
        return self.each_active or self.per_layer

    @property
    def mean_layer_bytes(self) -> float:
        return sum(self.per_layer) / self.n_layers if self.n_layers else 0.0

    @property
    def mean_active_bytes(self) -> float:
        """What one token reads of the mean layer: what its time is scaled by."""
        return sum(self.active_per_layer) / self.n_layers if self.n_layers else 0.0

    def range_bytes(self, start: int, end: int) -> int:
        """Weights of layers [start, end)."""
        if not self.each_layer:
            return (end - start) * self.layer_bytes
        return sum(self.each_layer[start:end])

    def active_range_bytes(self, start: int, end: int) -> int:
        """What one token reads of layers [start, end)."""
        if not self.each_active:
            return self.range_bytes(start, end)
        return sum(self.each_active[start:end])

    @property
    def weight_bytes(self) -> int:
        """Every weight of the model: the layers and the master's part."""
        return self.range_bytes(0, self.n_layers) + self.master_bytes

    @property
    def active_weight_bytes(self) -> int:
        """What one token reads of the model: its layers' active bytes and the
        master's part (the whole embedding, as MoE parameter counts go)."""
        return self.active_range_bytes(0, self.n_layers) + self.master_bytes


def _master_names(config: ModelConfig) -> list[str]:
    """The embedding, final norm and head (a tied head is the embedding)."""
    names = ["model.embed_tokens.weight", *head_tensor_names(config)]
    return list(dict.fromkeys(names))


def expert_names(config: ModelConfig, i: int) -> tuple[list[str], list[str]]:
    """Layer i's tensors that every token reads (attention, norms, router, the
    shared expert, a dense MLP), and its experts' tensors, of which a token
    reads top_k of num_experts (none in a dense layer)."""
    names = layer_names(config, i)
    experts = [n for parts in names.expert_gate_up for n in parts]
    experts += names.expert_down
    routed = set(experts)
    return [n for n in names.all() if n not in routed], experts


def stored_and_active(
    config: ModelConfig, i: int, count: Callable[[str], int]
) -> tuple[int, int]:
    """(stored, active) bytes of layer i, each tensor counted by `count`: every
    tensor; and what one token's decode step reads (batch 1), the tensors
    besides the experts and top_k / num_experts of the experts' bytes (the mean
    expert, top_k times: quantized experts count as stored)."""
    always, experts = expert_names(config, i)
    base = sum(count(n) for n in always)
    if not experts:
        return base, base
    routed = sum(count(n) for n in experts)
    m = config.moe
    return base + routed, base + round(routed * m.top_k / m.num_experts)


def _sizes_of(config, each, master, item) -> ModelSizes:
    """ModelSizes of per-layer (stored, active) pairs, cache and activations in
    `item`-byte elements."""
    stored = tuple(s for s, _ in each)
    active = tuple(a for _, a in each)
    c = config
    return ModelSizes(
        n_layers=c.num_hidden_layers,
        layer_bytes=max(stored, default=0),
        kv_bytes_per_token=2 * c.num_key_value_heads * c.head_dim * item,
        activation_bytes=c.hidden_size * item,
        master_bytes=master,
        each_layer=stored if len(set(stored)) > 1 else (),
        each_active=active if active != stored else (),
    )


def model_sizes(config: ModelConfig, dtype: str) -> ModelSizes:
    """Sizes of `config` with weights, cache and activations in `dtype` (for a
    model without a file, e.g. a synthetic probe; a checkpoint's weights are
    counted by `checkpoint_sizes`). Layers differ where a MoE config makes some
    dense (Qwen's mlp_only_layers, decoder_sparse_step)."""
    item = dtype_of(dtype).itemsize
    each = [
        stored_and_active(config, i, _by_shape(layer_shapes(config, i), item))
        for i in range(config.num_hidden_layers)
    ]
    master = _master_shapes(config)
    return _sizes_of(config, each, sum(map(_by_shape(master, item), master)), item)


def _by_shape(shapes: Mapping[str, tuple[int, ...]], item: int) -> Callable[[str], int]:
    """name -> parameters x `item` bytes, by the shapes the config implies (a
    layer's worked out once: a MoE layer has hundreds of tensors)."""
    return lambda name: item * math.prod(shapes.get(name, ()))


def _master_shapes(config: ModelConfig) -> dict[str, tuple[int, ...]]:
    return {n: expected_shape(config, n) or () for n in _master_names(config)}


def byte_counter(tensors: TensorSource) -> Callable[[str], int]:
    """name -> bytes the tensor takes as stored: the source's own `nbytes(name)`
    where it has one (GGUF, safetensors, mlx-quantized: the bytes in the file);
    else its elements x the bytes per element of the stored form, read once from
    the first tensor of each rank asked for (a source without `nbytes` is
    expected to hold one dtype for its matrices and one for its vectors)."""
    own = getattr(tensors, "nbytes", None)
    if own is not None:
        return lambda name: int(own(name))
    per_element: dict[int, float] = {}

    def count(name: str) -> int:
        shape = tuple(tensors.shape(name))
        if len(shape) not in per_element:
            w = stored_tensor(tensors, name)
            per_element[len(shape)] = w.nbytes / max(math.prod(shape), 1)
        return round(math.prod(shape) * per_element[len(shape)])

    return count


def stored_bytes(tensors: TensorSource, names: Iterable[str]) -> int:
    """Bytes the tensors `names` take as the checkpoint stores them."""
    count = byte_counter(tensors)
    return sum(count(n) for n in names)


def checkpoint_sizes(
    config: ModelConfig, tensors: TensorSource, dtype: str
) -> ModelSizes:
    """Sizes of the checkpoint `tensors`: each layer's weights as stored (a
    quantized layer by its blocks, a mixed file layer by layer; a MoE layer
    with every expert) and what one token reads of it (a MoE layer: top_k of
    its experts' stored bytes, see `stored_and_active`), the KV cache and
    activations in the compute `dtype`. Tensors the source lacks (a split part
    holds only some layers) count as parameters x `dtype`."""
    stored = byte_counter(tensors)
    item = dtype_of(dtype).itemsize

    def counter(shapes: Mapping[str, tuple[int, ...]]) -> Callable[[str], int]:
        missing = _by_shape(shapes, item)
        return lambda n: stored(n) if n in tensors else missing(n)

    each = [
        stored_and_active(config, i, counter(layer_shapes(config, i)))
        for i in range(config.num_hidden_layers)
    ]
    master = _master_shapes(config)
    return _sizes_of(config, each, sum(map(counter(master), master)), item)


def experts_line(config: ModelConfig, sizes: ModelSizes) -> str | None:
    """For a mixture of experts, the weights it keeps against those a token
    reads, e.g. "experts: 8, 2 active per token; a token reads 25.76 of 93.41
    GB"; None for a dense model."""
    m, n = config.moe, config.num_hidden_layers
    if m is None:
        return None
    sparse = sum(config.is_moe(i) for i in range(n))
    shared = " and a shared one" if m.shared_intermediate_size else ""
    where = "" if sparse == n else f" in {sparse} of {n} layers"
    unit, scale = ("GB", 1e9) if sizes.weight_bytes >= 1e9 else ("MB", 1e6)
    return (
        f"experts: {m.num_experts}{shared}, {m.top_k} active per token{where}; "
        f"a token reads {sizes.active_weight_bytes / scale:.2f} of "
        f"{sizes.weight_bytes / scale:.2f} {unit}"
    )
