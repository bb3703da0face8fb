"""ModelConfig.from_dict on the config layouts the families write: per-layer
windows and RoPE bases, activations, attention scale and soft-caps, and the
one-line ModelError for what cake cannot run."""

from __future__ import annotations

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
    ],
)  # fmt: skip
def test_unsupported_values_are_one_model_error(d, match):
    with pytest.raises(ModelError, match=match):
        config(**d)
