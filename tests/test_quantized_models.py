"""Quantized GGUF models on every backend against HF on the same weights decoded.

A tiny llama (in-dims multiples of 256, as K-quants need) is written as a GGUF
in each type; HF transformers runs the file's weights dequantized by gguf-py
(the oracle). Backends that multiply the stored floats exactly (NumPy; JAX with
its float paths) must match it to float32 rounding. Kernels that quantize the
activations per block as llama.cpp does (the JAX CPU kernels for the integer
formats) are held to the error that rounding brings, measured here against
the same oracle. Each stage must also hold about the file's bytes, not more.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest

from cake.backends import Step, available_backends, get_backend
from cake.shard import Shard
from cake.weights.checkpoint import open_checkpoint
from tests.gguf_models import hf_twin, write_gguf
from tests.models import hf_reference, make_checkpoint

BACKENDS = [b for b in ("numpy", "jax") if b in available_backends()]
PROMPT = [1, 5, 17, 99, 3, 42, 7, 64, 12, 33, 8]
# logits here reach ~10 (random blocks decode to larger values than HF's init):
# float32 rounding in a different summation order is ~1e-4 of that
ATOL = 1e-3
FORMATS = [
    "F32",
    "F16",
    "BF16",
    "Q8_0",
    "Q4_0",
    "Q4_1",
    "Q5_0",
    "Q5_1",
    "Q2_K",
    "Q3_K",
    "Q4_K",
    "Q5_K",
    "Q6_K",
    "mixed",
]


def q4_k_m(name: str) -> str:
    """A Q4_K_M-like mix: v and down projections Q6_K, embedding Q8_0, rest Q4_K."""
    if "v_proj" in name or "down_proj" in name or name.endswith(".w2.weight"):
        return "Q6_K"
    return "Q8_0" if "embed" in name else "Q4_K"


# in-dims multiples of 256, as K-quants need
SHAPE = dict(
    hidden_size=256,
    intermediate_size=512,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    num_hidden_layers=2,
)


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    return make_checkpoint("llama", tmp_path_factory.mktemp("hf"), **SHAPE)


@pytest.fixture(scope="module")
def moe_folder(tmp_path_factory):
    """A Mixtral of the same shape (4 experts, 2 per token): its experts go
    through the kernels' grouped products (cake_cpu_matmul_grouped)."""
    # a llama GGUF carries no sliding window
    return make_checkpoint(
        "mixtral", tmp_path_factory.mktemp("moe"), **SHAPE, sliding_window=None
    )


# every format on the llama; the MoE in a legacy, a K-quant and the mixed file
MODELS = [("llama", f) for f in FORMATS] + [
    ("mixtral", f) for f in ("Q4_0", "Q4_K", "mixed")
]


@pytest.fixture(scope="module", params=MODELS, ids=lambda m: "-".join(m))
def model(request, hf_folder, moe_folder, tmp_path_factory):
    arch, fmt = request.param
    folder = moe_folder if arch == "mixtral" else hf_folder
    d = tmp_path_factory.mktemp(fmt)
    path = write_gguf(
        folder, d / "m.gguf", q4_k_m if fmt == "mixed" else fmt, fan_in_scale=True
    )
    twin = hf_twin(path, folder, d / "twin")
    return fmt, path, hf_reference(twin, PROMPT, steps=6)


_FLOATS = {np.dtype(ml_dtypes.bfloat16): "BF16", np.dtype(np.float16): "F16"}


def kernel_formats(backend: str) -> frozenset[str]:
    """Formats whose products round the activations (the JAX CPU kernels: per
    block to 8 bits for the integer formats, to bfloat16 for BF16, as
    llama.cpp does); empty elsewhere."""
    if backend != "jax":
        return frozenset()
    from cake.backends.jax.linear import cpu_kernel_formats

    return cpu_kernel_formats() - {"F16", "F32"}


def load(path, backend: str):
    config, tensors = open_checkpoint(path)
    stage = get_backend(backend).load(
        config,
        Shard.whole(config.num_hidden_layers),
        tensors,
        "float32",
        max_context=64,
        max_sequences=2,
    )
    return stage, sum(tensors.nbytes(n) for n in tensors.keys())


def run(stage, tokens: list[int]) -> list[np.ndarray]:
    """Prefill logits (L, V), then one logits row per teacher-forced step."""
    n = len(PROMPT)
    out = [stage.forward(np.array([PROMPT], np.int32), Step((0,), (0,), (n,), True))[0]]
    for i, tok in enumerate(tokens[:-1]):
        step = Step((0,), (n + i,), (1,))
        out.append(stage.forward(np.array([[tok]], np.int32), step)[0])
    return out


@pytest.mark.parametrize("backend", BACKENDS)
def test_quantized_gguf_matches_hf_on_decoded_weights(model, backend, monkeypatch):
    fmt, path, (prefill, tokens, step_logits) = model
    stage, file_bytes = load(path, backend)
    assert stage.weight_bytes <= 1.15 * file_bytes, (stage.weight_bytes, file_bytes)
    got = run(stage, tokens)
    quantized = kernel_formats(backend)
    if not ({fmt, "Q4_K", "Q6_K", "Q8_0"} if fmt == "mixed" else {fmt}) & quantized:
        # float math on the stored weights: HF's numbers and HF's greedy tokens
        np.testing.assert_allclose(got[0], prefill, atol=ATOL, rtol=1e-4)
        for i, lg in enumerate(got[1:]):
            np.testing.assert_allclose(lg, step_logits[i], atol=ATOL, rtol=1e-4)
            assert int(lg.argmax()) == tokens[i + 1]
        return
    # The kernels round each block of activations to 8 bits before an integer
    # product. The reference for that is NumPy's stage with the same rounding
    # (kernels/cpu/reference.py) in front of its float products; HF bounds how
    # far the rounding moves the logits (random tiny models amplify it).
    from cake.backends.numpy import llama as np_llama
    from cake.kernels.cpu.reference import quantize_activations
    from cake.weights.packed import Packed

    exact_linear = np_llama.linear

    def rounded_linear(x, w):
        fmt = w.format if isinstance(w, Packed) else _FLOATS.get(w.dtype)
        if fmt in quantized:
            shape = x.shape
            x = quantize_activations(x.reshape(-1, shape[-1]), fmt)
            x = x.astype(np.float32).reshape(shape)
        return exact_linear(x, w)

    monkeypatch.setattr(np_llama, "linear", rounded_linear)
    cache_dtype = np.dtype(getattr(stage, "cache_dtype", np.float32))
    if cache_dtype != np.float32:
        # the stage keeps K and V rounded to 16 bits (JaxLlamaStage's
        # _cache_dtype): so does the reference
        exact_write = np_llama._SeqCache.write

        def rounded_write(self, layer, pos, k, v):
            r = lambda a: a.astype(cache_dtype).astype(np.float32)  # noqa: E731
            exact_write(self, layer, pos, r(k), r(v))

        monkeypatch.setattr(np_llama._SeqCache, "write", rounded_write)
    want = run(load(path, "numpy")[0], tokens)
    # Equal to float32 rounding (measured ~2e-6 of the spread), except where
    # that rounding moved an activation across a boundary of the 8-bit grid: it
    # then shifts the logits by up to ~10 % of their spread (measured: Q3_K, a
    # flip in the prefill, reproduced by nudging the reference's activations by
    # 1e-6), and a flip in the prefill stays in the KV cache. The kernels' own exactness is tested
    # product by product in test_kernels_cpu.py / test_kernels_kquants.py.
    errs = [np.abs(g - w).max() / w.std() for g, w in zip(got, want, strict=True)]
    assert max(errs) < 0.15, errs
    if open_checkpoint(path)[0].moe is not None:
        # the rounding can move a token to another expert, which HF's float
        # math does not pick (measured: 1.6x the spread, Mixtral mixed): the
        # bound above, against the same rounding, is the MoE's check
        return
    for g, ref in zip(got, [prefill, *step_logits], strict=True):
        # the rounding's own effect: <= 0.17 of the spread here, measured
        assert np.abs(g - ref).max() < 0.3 * ref.std()


@pytest.mark.parametrize("fmt", ["BF16", "F16", "F32"])
def test_long_16bit_prefill_through_the_panel_gemm(hf_folder, tmp_path, fmt):
    """A 100-token prefill of a 16-bit (or float32) GGUF in one call: on the CPU
    kernels its products go through the panel GEMM (kernels/cpu/src/gemm16.cc,
    from 32 / 24 rows on), no longer widened for XLA; its logits must equal the NumPy
    stage's with the same activation rounding (BF16: to bfloat16) to float32
    rounding in another summation order (and BF16's flips, below)."""
    if "jax" not in BACKENDS:
        pytest.skip("no jax")
    from cake.backends.jax.linear import cpu_kernel_formats, kernel_rows
    from cake.backends.numpy import llama as np_llama
    from cake.kernels.cpu.reference import quantize_activations
    from cake.weights.packed import Packed

    if fmt not in cpu_kernel_formats():
        pytest.skip(f"no CPU kernels for {fmt} here")
    n = 100
    assert kernel_rows(fmt) >= n  # one kernel call per product, not widened
    path = write_gguf(hf_folder, tmp_path / "m.gguf", fmt, fan_in_scale=True)
    config, tensors = open_checkpoint(path)
    prompt = np.array([(np.arange(n) * 7 + 3) % config.vocab_size], np.int32)
    step = Step((0,), (0,), (n,), True)

    def stage(backend):
        return get_backend(backend).load(
            config,
            Shard.whole(config.num_hidden_layers),
            tensors,
            "float32",
            max_context=128,
            max_sequences=1,
        )

    got = stage("jax").forward(prompt, step)[0]
    exact_linear = np_llama.linear

    def rounded_linear(x, w):
        wf = w.format if isinstance(w, Packed) else _FLOATS.get(w.dtype)
        if wf == "BF16":
            shape = x.shape
            x = quantize_activations(x.reshape(-1, shape[-1]), wf)
            x = x.astype(np.float32).reshape(shape)
        return exact_linear(x, w)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(np_llama, "linear", rounded_linear)
        want = stage("numpy").forward(prompt, step)[0]
    err = np.abs(got - want).max() / want.std()
    # F16: 5.6e-6 of the spread. BF16: 1.1e-2, where float32 rounding moved an
    # activation across a bfloat16 rounding boundary (the dot kernels, forced
    # for all M, give 1.3e-2 here), as the 8-bit flips in the test above.
    assert err < (5e-2 if fmt == "BF16" else 1e-4), err


def _entry_parameters(hlo: str) -> int:
    """How many parameters the entry computation of an HLO module's text takes."""
    entry = hlo[hlo.index("\nENTRY ") :]
    entry = entry[: entry.index("\n}")]
    return entry.count(" parameter(")


@pytest.mark.parametrize("fmt", ["mixed", "Q8_0", "BF16", "F32", "Q4_K"])
def test_a_layer_in_one_kernel_call_gives_the_same_bits(hf_folder, tmp_path, fmt):
    """On the CPU kernel path a llama layer is one custom call
    (cake.kernels.cpu.layer) making the calls the layer made one custom call
    each: logits and cache must be the same bits as with CAKE_CPU_LAYER=0, for
    a batch of two sequences of different lengths (padding rows), the chunk
    after it and a decode step; the Q4_K_M-like file has q|k|v in two parts.
    The stage holds the layers' weights in the kernels (layer_held): its decode
    step takes none of them as parameters, and gives the bits of the call that
    takes them (CAKE_CPU_LAYER_HELD=0)."""
    if "jax" not in BACKENDS:
        pytest.skip("no jax")
    from cake.backends.jax import llama as jax_llama
    from cake.backends.jax.linear import cpu_kernel_formats
    from cake.backends.jax.programs import Shape
    from cake.kernels.cpu import layer as cpu_layer

    if not (
        cpu_layer.available()
        and {"Q4_K", "Q6_K", fmt} <= cpu_kernel_formats() | {"mixed"}
    ):
        pytest.skip("no CPU kernels here")
    path = write_gguf(hf_folder, tmp_path / "m.gguf", q4_k_m if fmt == "mixed" else fmt)
    steps = [
        (
            np.array([PROMPT, PROMPT[:4] + [0] * 7], np.int32),
            Step((0, 1), (0, 0), (11, 4), True),
        ),
        (
            np.array([[9, 10, 11], [12, 0, 0]], np.int32),
            Step((0, 1), (11, 4), (3, 1), True),
        ),
        (np.array([[13], [14]], np.int32), Step((0, 1), (14, 5), (1, 1))),
    ]
    layers = open_checkpoint(path)[0].num_hidden_layers
    got, params = {}, {}
    for mode, env in (
        ("held", {}),
        ("operands", {"CAKE_CPU_LAYER_HELD": "0"}),
        ("off", {"CAKE_CPU_LAYER": "0"}),
    ):
        with pytest.MonkeyPatch.context() as mp:
            for k, v in env.items():
                mp.setenv(k, v)
            jax_llama._layer_kernel_available.cache_clear()
            stage = load(path, "jax")[0]
            got[mode] = [stage.forward(x, s) for x, s in steps] + [
                np.asarray(stage._cache)
            ]
            text = stage.programs.get(Shape(2, 1, 64, False, None, True)).as_text()
            params[mode] = _entry_parameters(text)
            per_layer = [
                2 + len(w["wqkv"]) + len(w["wgu"]) + 2  # ln1, ln2 and the matrices
                for w in stage._params["layers"]
            ]
        calls = {
            t: text.count(f'custom_call_target="cake_cpu_{t}"')
            for t in ("layer", "layer_held")
        }
        assert (
            calls
            == {
                "held": {"layer": 0, "layer_held": layers},
                "operands": {"layer": layers, "layer_held": 0},
                "off": {"layer": 0, "layer_held": 0},
            }[mode]
        ), mode
        assert ('custom_call_target="cake_cpu_attention"' in text) == (mode == "off")
    jax_llama._layer_kernel_available.cache_clear()
    assert params["held"] == params["operands"] - sum(per_layer), params
    for mode in ("operands", "off"):
        for a, b in zip(got["held"], got[mode], strict=True):
            np.testing.assert_array_equal(a, b, err_msg=mode)


def test_held_weights_go_with_the_stage(hf_folder, tmp_path):
    """The kernels hold a stage's layers by key until the stage goes (its
    finalizer releases them); a step naming a released key fails with one
    line, and a layer the kernels cannot take is refused at hold time."""
    if "jax" not in BACKENDS:
        pytest.skip("no jax")
    import gc

    import jax

    from cake.kernels.cpu import layer as cpu_layer

    if not cpu_layer.available():
        pytest.skip("no CPU kernels here")
    path = write_gguf(hf_folder, tmp_path / "m.gguf", "Q8_0")
    stage = load(path, "jax")[0]
    keys = [h.key for h in stage._held]
    assert keys and all(k in cpu_layer._arrays for k in keys)
    step = Step((0,), (0,), (4,))
    want = stage.forward(np.array([PROMPT[:4]], np.int32), step)
    stage.release([0])
    cpu_layer.release(keys[-1])
    with pytest.raises(jax.errors.JaxRuntimeError, match="no weights held under key"):
        stage.forward(np.array([PROMPT[:4]], np.int32), step)
    del stage
    gc.collect()
    assert not any(k in cpu_layer._arrays for k in keys)
    again = load(path, "jax")[0]
    assert min(h.key for h in again._held) > max(keys)  # never reused
    np.testing.assert_array_equal(
        again.forward(np.array([PROMPT[:4]], np.int32), step), want
    )
    w = again._params["layers"][0]
    with pytest.raises(ValueError, match="weights for K=256 must be"):
        cpu_layer.hold(
            ln1=w["ln1"],
            ln2=w["ln2"],
            wqkv=tuple((m.data, m.fmt) for m in w["wqkv"]),
            wo=(w["wd"].data, w["wd"].fmt),  # the wrong matrix
            wgu=tuple((m.data, m.fmt) for m in w["wgu"]),
            wd=(w["wd"].data, w["wd"].fmt),
            attn_cols=w["ln1"].shape[0],
        )
