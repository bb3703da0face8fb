"""ModelConfig.from_dict on the config layouts the families write: per-layer
windows and RoPE bases, activations, attention scale and soft-caps, and the
one-line ModelError for what cake cannot run."""

from __future__ import annotations

import numpy as np
import pytest

from cake.config import ModelConfig
from cake.errors import ModelError

BASE = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
SLIDE, FULL = "sliding_attention", "full_attention"


def config(**d) -> ModelConfig:
    return ModelConfig.from_dict({**BASE, **d})


def test_gemma2_without_layer_types_slides_every_other_layer():
    # transformers' Gemma2Config before layer_types: layers 0, 2, ... are local
    c = config(model_type="gemma2", sliding_window=4, query_pre_attn_scalar=24,
               attn_logit_softcapping=50, final_logit_softcapping=30.0)  # fmt: skip
    assert c.layer_types == (SLIDE, FULL, SLIDE, FULL)
    assert [c.window(i) for i in range(4)] == [4, None, 4, None]
    assert c.attn_scale == 24**-0.5
    assert (c.attn_logit_softcapping, c.final_logit_softcapping) == (50.0, 30.0)
    assert c.hidden_act == "gelu_pytorch_tanh"  # the family's default
    assert not any(c.local_rope(i) for i in range(4))


def test_gemma_configs_without_tie_word_embeddings_are_tied():
    # transformers leaves out a value equal to its base default (True): Google's
    # Gemma configs never say it, and their checkpoints hold no lm_head
    for mt in ("gemma", "gemma2", "gemma3_text"):
        assert config(model_type=mt).tie_word_embeddings, mt
    assert not config(
        model_type="gemma2", tie_word_embeddings=False
    ).tie_word_embeddings
    assert not config(model_type="llama").tie_word_embeddings


def test_layer_types_as_given():
    c = config(model_type="gemma2", sliding_window=8,
               layer_types=[FULL, SLIDE, SLIDE, FULL])  # fmt: skip
    assert [c.window(i) for i in range(4)] == [None, 8, 8, None]


def test_other_families_ignore_gemma_keys():
    c = config(model_type="llama", query_pre_attn_scalar=24,
               attn_logit_softcapping=50, layer_types=[FULL] * 4)  # fmt: skip
    assert c.attn_scale == 16**-0.5
    assert c.attn_logit_softcapping is None and c.layer_types == ()
    m = config(model_type="mistral", sliding_window=6)
    assert [m.window(i) for i in range(4)] == [6] * 4


def test_gemma3_as_google_wrote_it():
    # google/gemma-3-4b's layout before transformers 5: flat RoPE keys, a pattern
    c = config(model_type="gemma3_text", num_hidden_layers=12, sliding_window=1024,
               sliding_window_pattern=6, rope_theta=1e6, rope_local_base_freq=1e4,
               rope_scaling={"rope_type": "linear", "factor": 8.0},
               query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
               final_logit_softcapping=None)  # fmt: skip
    assert [i for i in range(12) if c.window(i) is None] == [5, 11]
    local = [i for i in range(12) if c.local_rope(i)]
    assert local == [i for i in range(12) if i not in (5, 11)]
    assert (c.rope_theta, c.rope_local_base_freq) == (1e6, 1e4)
    assert (c.rope_scaling.rope_type, c.rope_scaling.factor) == ("linear", 8.0)
    # transformers' Gemma 3 never soft-caps attention, whatever the key says
    assert c.attn_logit_softcapping is None and c.final_logit_softcapping is None
    assert c.attn_scale == 256**-0.5


def test_gemma3_rope_parameters_per_layer_type():
    c = config(model_type="gemma3_text", sliding_window=4,
               rope_parameters={
                   "full_attention": {"rope_type": "default", "rope_theta": 5e5},
                   "sliding_attention": {"rope_type": "default", "rope_theta": 50.0}})  # fmt: skip
    assert (c.rope_theta, c.rope_local_base_freq, c.rope_scaling) == (5e5, 50.0, None)
    assert config(model_type="gemma3_text").rope_local_base_freq == 10000.0


def test_rope_by_layer_kind():
    from cake.rope import rope_inv_freq

    c = config(model_type="gemma3_text", rope_theta=1e6, rope_local_base_freq=1e4,
               rope_scaling={"rope_type": "linear", "factor": 8.0})  # fmt: skip
    glob, local = rope_inv_freq(c), rope_inv_freq(c, local=True)
    d = np.arange(0, 16, 2) / 16
    np.testing.assert_allclose(glob, 1 / (1e6**d) / 8, rtol=1e-6)
    np.testing.assert_allclose(local, 1 / (1e4**d), rtol=1e-6)


def test_gemma_legacy_gelu_is_the_tanh_approximation():
    assert config(model_type="gemma", hidden_act="gelu").hidden_act == (
        "gelu_pytorch_tanh"
    )
    c = config(model_type="gemma", hidden_act="gelu",
               hidden_activation="gelu_pytorch_tanh")  # fmt: skip
    assert c.hidden_act == "gelu_pytorch_tanh"
    assert config(model_type="gemma").hidden_act == "gelu_pytorch_tanh"


@pytest.mark.parametrize(
    "d,match",
    [
        (dict(model_type="llama", hidden_act="gelu"), "unsupported activation"),
        (dict(model_type="gemma2", hidden_activation="relu"), "'relu'"),
        (dict(model_type="gemma2", layer_types=[SLIDE] * 3), "layer_types"),
        (dict(model_type="gemma2", layer_types=[SLIDE, FULL, "chunked", FULL]),
         "layer_types"),
        (dict(model_type="gemma2", attn_logit_softcapping=0), "attn_logit"),
        (dict(model_type="gemma2", final_logit_softcapping=-1.0), "final_logit"),
        (dict(model_type="gemma2", use_bidirectional_attention=True),
         "bidirectional"),
        (dict(model_type="gemma3_text", rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "linear", "factor": 2.0}}),
         "sliding layers"),
        (dict(model_type="qwen3", rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}),
         "differ by layer type"),
        (dict(model_type="gemma3_text", rope_scaling={"rope_type": "yarn",
                                                      "factor": 2.0}), "yarn"),
    ],
)  # fmt: skip
def test_unsupported_values_are_one_model_error(d, match):
    with pytest.raises(ModelError, match=match):
        config(**d)
