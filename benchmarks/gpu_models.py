"""The model shapes benchmarks/gpu_check.py measures: SmolLM2-135M and
Llama-3-shaped 1B and 8B models (random weights), and --smoke's tiny size."""

from __future__ import annotations

from jax_decode_profile import SMOLLM2

_LLAMA3 = dict(
    model_type="llama",
    vocab_size=128256,
    num_key_value_heads=8,
    rms_norm_eps=1e-5,
    rope_theta=500000.0,
    max_position_embeddings=8192,
)
MODELS: dict[str, dict] = {
    "smollm2-135m": SMOLLM2,
    "llama-1b": _LLAMA3
    | dict(
        hidden_size=2048,
        intermediate_size=8192,
        num_hidden_layers=16,
        num_attention_heads=32,
        head_dim=64,
        tie_word_embeddings=True,
    ),
    "llama-8b": _LLAMA3
    | dict(
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        head_dim=128,
        tie_word_embeddings=False,
    ),
}
# --smoke: a model keeps its family and head tying, at this size (in-dims are
# multiples of 256, as K-quants need)
TINY = dict(
    vocab_size=1024,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
)


def model_dict(model: str, smoke: bool) -> dict:
    return MODELS[model] | (TINY if smoke else {})
