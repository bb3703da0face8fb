"""mlx-lm folders of mixtures of experts (Mixtral, Qwen2-MoE, Qwen3-MoE), as
Mac users download them: each role's experts stacked in one tensor as mlx-lm's
`sanitize` stacks them (`<block>.switch_mlp.{gate,up,down}_proj`, (E, out,
in)), float or quantized by `mx.quantize` with config.json's "quantization"
as mlx-lm writes it. Built here from the tiny HF checkpoints of tests/models.py;
the reader hands each expert out under its HF name as a view of its slice.
"""

from __future__ import annotations

import json
import re
import shutil
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from cake.backends import Step, available_backends, get_backend
from cake.errors import ModelError
from cake.shard import Shard
from cake.split import SAFETENSORS_PART, split_model
from cake.topology import parse_topology
from cake.weights.checkpoint import open_checkpoint
from cake.weights.names import layer_tensor_names
from cake.weights.packed import Packed
from cake.weights.safetensors import SafetensorsSource
from tests.models import hf_reference, make_checkpoint
from tests.split_parts import TOPOLOGY, assert_parts_compute_the_whole
from tests.test_oracle import PROMPT, greedy_matches_hf

try:
    import mlx.core as mx
except ImportError:  # the quantized folders need mx.quantize
    mx = None
needs_mlx = pytest.mark.skipif(mx is None, reason="mx.quantize writes the folders")

BACKENDS = [b for b in ("numpy", "jax", "mlx") if b in available_backends()]
ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe")
# every expert matrix in groups of 64; Qwen2-MoE's dense layer 1 (down_proj 96
# wide) and Qwen3-MoE's o_proj (4 heads of 24) stay float, as mlx-lm's
# predicate keeps a matrix whose rows do not split into groups
SIZES = {
    "mixtral": {"intermediate_size": 128},
    "qwen2_moe": {"moe_intermediate_size": 64, "shared_expert_intermediate_size": 64},
    "qwen3_moe": {"moe_intermediate_size": 64},
}
BLOCK = {"mixtral": "block_sparse_moe", "qwen2_moe": "mlp", "qwen3_moe": "mlp"}
# mlx-lm's stack of each HF leaf (Mixtral's w1, w3, w2; Qwen's keep theirs)
ROLE = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}
_EXPERT = re.compile(r"(model\.layers\.\d+\.\w+)\.experts\.(\d+)\.(\w+)\.weight")
_DEFAULT = {"group_size": 64, "bits": 4, "mode": "affine"}
# config.json "quantization" as mlx-lm writes it: Mixtral with layer 1's down
# stack in 8 bits, groups of 32, by hand (4 bits in 64 and 8 in 32 give the same
# entry shapes: only the right entry reads it right); Qwen3-MoE's routers in 8
# bits (its quant_predicate)
QUANT = {
    "mixtral": {
        **_DEFAULT,
        "model.layers.1.block_sparse_moe.switch_mlp.down_proj": {
            "group_size": 32,
            "bits": 8,
        },
    },
    "qwen2_moe": _DEFAULT,
    "qwen3_moe": {
        **_DEFAULT,
        **{
            f"model.layers.{i}.mlp.gate": {"group_size": 64, "bits": 8}
            for i in range(3)
        },
    },
}


def sanitize(weights: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """HF names -> mlx-lm's: each layer's experts of a role stacked (E, out, in)
    as `<block>.switch_mlp.<role>.weight`, as mlx-lm's models' sanitize does."""
    out: dict[str, np.ndarray] = {}
    stacks: dict[str, dict[int, np.ndarray]] = {}
    for name, w in weights.items():
        m = _EXPERT.fullmatch(name)
        if m is None:
            out[name] = w
            continue
        role = ROLE.get(m[3], m[3])
        stacks.setdefault(f"{m[1]}.switch_mlp.{role}.weight", {})[int(m[2])] = w
    for name, by in stacks.items():
        out[name] = np.stack([by[e] for e in range(len(by))])
    return out


def unstack(weights: dict[str, np.ndarray], arch: str) -> dict[str, np.ndarray]:
    """`sanitize` undone: each stack's slices under their HF names."""
    leaf = {v: k for k, v in ROLE.items()} if arch == "mixtral" else {}
    out = {}
    for name, w in weights.items():
        m = re.fullmatch(r"(.+)\.switch_mlp\.(\w+)\.weight", name)
        if m is None:
            out[name] = w
            continue
        for e in range(len(w)):
            out[f"{m[1]}.experts.{e}.{leaf.get(m[2], m[2])}.weight"] = w[e]
    return out


def quantize(weights: dict[str, np.ndarray], quant: dict) -> tuple[dict, dict]:
    """mlx-lm's quantization of `weights` (mlx-lm names): each matrix and stack
    whose rows split into its module's groups, in bfloat16, with bfloat16 scales
    and biases; the others kept. Returns the entries (mx arrays) and each
    weight as the quantized one decodes (float32)."""
    entries, decoded = {}, {}
    for name, w in weights.items():
        module = name.removesuffix(".weight")
        q = quant.get(module, quant)
        group, bits = q["group_size"], q["bits"]
        if w.ndim == 1 or w.shape[-1] % group:
            entries[name], decoded[name] = mx.array(w), w
            continue
        wq, s, b = mx.quantize(
            mx.array(w).astype(mx.bfloat16), group_size=group, bits=bits
        )
        entries |= {name: wq, f"{module}.scales": s, f"{module}.biases": b}
        s32, b32 = s.astype(mx.float32), b.astype(mx.float32)
        deq = mx.dequantize(wq, s32, b32, group_size=group, bits=bits)
        decoded[name] = np.array(deq)
    return entries, decoded


def mlx_lm_folder(tmp_path, arch: str, quantized: bool):
    """(HF folder, mlx-lm folder, the mlx-lm folder's weights under HF names
    as they decode). The float folder is sharded in two files, as mlx-lm
    writes larger models (model.safetensors.index.json)."""
    hf = make_checkpoint(arch, tmp_path / "hf", **SIZES[arch])
    _, src = open_checkpoint(hf)
    stacked = sanitize({n: src.get(n) for n in src.keys()})
    folder = tmp_path / ("q4" if quantized else "float")
    folder.mkdir()
    config = json.loads((hf / "config.json").read_text())
    if quantized:
        entries, decoded = quantize(stacked, QUANT[arch])
        mx.save_safetensors(
            str(folder / "model.safetensors"), entries, metadata={"format": "mlx"}
        )
        config["quantization"] = config["quantization_config"] = QUANT[arch]
    else:
        decoded, weight_map = stacked, {}
        for k, part in enumerate(("layers.0.", "")):  # layer 0, then the rest
            names = [n for n in stacked if part in n and n not in weight_map]
            fname = f"model-0000{k + 1}-of-00002.safetensors"
            save_file({n: stacked[n] for n in names}, folder / fname, {"format": "mlx"})
            weight_map |= dict.fromkeys(names, fname)
        index = {"metadata": {}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    (folder / "config.json").write_text(json.dumps(config))
    return hf, folder, unstack(decoded, arch)


def hf_twin(hf, weights: dict[str, np.ndarray], folder):
    """HF's outputs on PROMPT with `weights` (HF names) in the model of the HF
    folder `hf` (written as a checkpoint: transformers 5 fuses the experts as it
    loads one)."""
    folder.mkdir()
    shutil.copy2(hf / "config.json", folder / "config.json")
    save_file({n: np.asarray(w, np.float32) for n, w in weights.items()},
              folder / "model.safetensors")  # fmt: skip
    return hf_reference(folder, PROMPT, steps=8)


def load(config, tensors, backend: str):
    shard = Shard.whole(config.num_hidden_layers)
    return get_backend(backend).load(
        config, shard, tensors, "float32", max_context=64, max_sequences=2
    )


def check_experts_are_views(folder, hf, arch: str, quantized: bool) -> None:
    """The mlx-lm folder speaks the HF checkpoint's names and shapes; each
    expert is a view of its slice of the stack, its bytes 1/E of the stack's."""
    config, src = open_checkpoint(folder)
    want_config, want = open_checkpoint(hf)
    assert config == want_config
    assert sorted(src.keys()) == sorted(want.keys())
    assert not any("switch_mlp" in n for n in src.keys())
    n_experts = config.moe.num_experts
    block = BLOCK[arch]
    leaves = ("w1", "w3", "w2") if arch == "mixtral" else (
        "gate_proj", "up_proj", "down_proj")  # fmt: skip
    stack_bytes = _stack_bytes(folder)
    for i in range(config.num_hidden_layers):
        if not config.is_moe(i):
            assert f"model.layers.{i}.mlp.down_proj.weight" in src
            continue
        for leaf in leaves:
            names = [f"model.layers.{i}.{block}.experts.{e}.{leaf}.weight"
                     for e in range(n_experts)]  # fmt: skip
            role = ROLE.get(leaf, leaf)
            stack = f"model.layers.{i}.{block}.switch_mlp.{role}"
            assert sum(src.nbytes(n) for n in names) == stack_bytes[stack]
            ws = [src.stored(n) for n in names]
            for name, w in zip(names, ws, strict=True):
                assert name in src and src.shape(name) == want.shape(name)
                assert w.shape == want.shape(name) and w.nbytes == src.nbytes(name)
                if quantized:
                    assert isinstance(w, Packed) and w.format == src.format(name)
                    assert f"{name.removesuffix('weight')}scales" in src
                else:
                    np.testing.assert_array_equal(w, want.get(name))
            # slices of one mapped stack: expert e's bytes follow expert e-1's
            for part in ("data", "scales", "biases") if quantized else ("data",):
                arrays = [getattr(w, part) if quantized else w for w in ws]
                at = [a.__array_interface__["data"][0] for a in arrays]
                assert not any(a.flags.owndata for a in arrays)
                assert np.diff(at).tolist() == [arrays[0].nbytes] * (n_experts - 1)


def _stack_bytes(folder) -> dict[str, int]:
    """module -> bytes of its entries (weight, scales, biases), from the headers."""
    out: dict[str, int] = {}
    for f in folder.glob("*.safetensors"):
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        for name, e in header.items():
            module = name.rsplit(".", 1)[0]
            a, b = e["data_offsets"]
            out[module] = out.get(module, 0) + b - a
    return out


@pytest.mark.parametrize("arch", ARCHS)
def test_float_folder_matches_hf(tmp_path, arch):
    hf, folder, _ = mlx_lm_folder(tmp_path, arch, quantized=False)
    check_experts_are_views(folder, hf, arch, quantized=False)
    reference = hf_reference(hf, PROMPT, steps=8)
    config, tensors = open_checkpoint(folder)
    for backend in BACKENDS:
        greedy_matches_hf(load(config, tensors, backend).forward, reference)


@needs_mlx
@pytest.mark.parametrize("arch", ARCHS)
def test_quantized_folder_matches_numpy_and_hf_on_its_weights(tmp_path, arch):
    hf, folder, decoded = mlx_lm_folder(tmp_path, arch, quantized=True)
    check_experts_are_views(folder, hf, arch, quantized=True)
    config, tensors = open_checkpoint(folder)
    block = BLOCK[arch]
    expert = f"model.layers.{{}}.{block}.experts.3.{{}}.weight"
    down = "w2" if arch == "mixtral" else "down_proj"
    assert tensors.format(expert.format(0, down)) == "MLX4G64"
    if arch == "mixtral":  # by the override on its stack's module
        assert tensors.format(expert.format(1, down)) == "MLX8G32"
    if arch == "qwen3_moe":
        assert tensors.format("model.layers.2.mlp.gate.weight") == "MLX8G64"
        assert tensors.format("model.layers.0.self_attn.o_proj.weight") == "F32"
    for name in tensors.keys():  # the reader decodes as mlx does
        np.testing.assert_allclose(tensors.get(name), decoded[name], rtol=1e-6)
    reference = hf_twin(hf, decoded, tmp_path / "twin")
    x = np.array([PROMPT], np.int32)
    step = Step((0,), (0,), (len(PROMPT),), all_logits=True)
    want = load(config, tensors, "numpy").forward(x, step)
    file_bytes = sum(tensors.nbytes(n) for n in tensors.keys())
    for backend in BACKENDS:
        stage = load(config, tensors, backend)
        greedy_matches_hf(stage.forward, reference)
        stage = load(config, tensors, backend)
        np.testing.assert_allclose(stage.forward(x, step), want, atol=1e-5, rtol=1e-5)
        if backend == "mlx":  # the experts restacked as stored, not widened
            assert file_bytes <= stage.weight_bytes <= 1.15 * file_bytes


def test_expert_count_must_match_the_stacks(tmp_path):
    _, folder, _ = mlx_lm_folder(tmp_path, "mixtral", quantized=False)
    config = json.loads((folder / "config.json").read_text())
    config["num_local_experts"] = 3
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="not a stack of the 3 experts"):
        open_checkpoint(folder)
    config["model_type"] = "mistral"  # a dense family has no experts to stack
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelError, match="config.json .no mixture of experts."):
        open_checkpoint(folder)
    with pytest.raises(ModelError, match="open it with its config"):
        SafetensorsSource(folder)


SPLITS = [
    ("mixtral", False),
    pytest.param("mixtral", True, marks=needs_mlx),
    pytest.param("qwen2_moe", True, marks=needs_mlx),
    pytest.param("qwen3_moe", True, marks=needs_mlx),
]


@pytest.mark.parametrize(("arch", "quantized"), SPLITS)
def test_split_parts_hold_experts_by_name_and_compute_the_whole(
    tmp_path, arch, quantized
):
    """`cake split` writes each expert of a part's layers under its HF name
    (an mlx-quantized one as its weight, scales and biases), read back as
    stored, with the whole's config.json (its per-stack bits apply to each
    expert of the stack)."""
    _, folder, _ = mlx_lm_folder(tmp_path, arch, quantized)
    config, whole = open_checkpoint(folder)
    folders = split_model(folder, parse_topology(TOPOLOGY), tmp_path / "out")
    for name, layer in (("master", 0), ("w1", 1), ("w2", 2)):
        cfg, part = open_checkpoint(folders[name])
        assert cfg == config
        assert set(layer_tensor_names(config, layer)) <= set(part.keys())
        written = set(_stack_bytes(folders[name]))
        assert not any("switch_mlp" in m for m in written)
        if config.is_moe(layer):
            e = f"model.layers.{layer}.{BLOCK[arch]}.experts.1"
            assert any(m.startswith(e) for m in written)
        for k in part.keys():  # as stored: same format, same bytes
            a, b = part.stored(k), whole.stored(k)
            assert part.format(k) == whole.format(k), k
            assert part.nbytes(k) == whole.nbytes(k), k
            for x in ("data", "scales", "biases") if isinstance(a, Packed) else ():
                assert np.array_equal(getattr(a, x), getattr(b, x)), k
            assert isinstance(a, Packed) or np.array_equal(a, b), k
        assert (folders[name] / SAFETENSORS_PART).is_file()

    assert_parts_compute_the_whole(config, whole, folders)
