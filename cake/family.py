"""Architecture families: what each Hugging Face `model_type` is, as data.

Every backend runs one decoder block per family module (backends/<b>/<block>.py,
`attn_in` and `attn_out` around the shared attention) over a layer's tensors
read by role (cake.weights.layer). What differs between families within one
block's math is described here: which tensors a layer holds and how they stack,
the kind of q/k norm, the config keys that switch features on. A family whose
math differs beyond that names its own `block`.

What the config turns on is read by cake.config into ModelConfig fields that
the shared code reads (the MLP activation, the attention scale and soft-caps,
each layer's window and RoPE base); a family here only says which keys count.
"""

from __future__ import annotations

from dataclasses import dataclass

from cake.errors import ModelError


@dataclass(frozen=True)
class MoeNames:
    """Where a mixture-of-experts family keeps its experts, and which config
    keys count. A sparse layer's MLP is the router's top-k experts, weighted by
    their softmax probabilities (renormalised to sum 1 where `normalize_key`
    says so, or always when it is None), plus a shared expert where the family
    has one (Qwen2-MoE: an MLP gated by sigmoid(x . shared_gate))."""

    block: str  # the layer's MoE module: "block_sparse_moe" (Mixtral) or "mlp"
    # config keys of the number of experts, the first that is set (transformers
    # 5 writes Qwen3-MoE's as num_local_experts)
    count_keys: tuple[str, ...] = ("num_experts", "num_local_experts")
    gate_up: tuple[str, str] = ("gate_proj", "up_proj")  # each expert's gate|up
    down: str = "down_proj"
    normalize_key: str | None = "norm_topk_prob"  # None: always renormalised
    # config keys of the expert MLP's width; None: intermediate_size (Mixtral)
    size_key: str | None = "moe_intermediate_size"
    shared: str | None = None  # the shared expert's module (Qwen2-MoE)
    shared_gate: str | None = None  # its (1, D) sigmoid gate
    # which layers are sparse: `decoder_sparse_step` and `mlp_only_layers`
    # (Qwen), else every layer (Mixtral)
    sparse_keys: bool = True


@dataclass(frozen=True)
class Family:
    model_type: str
    architecture: str  # the transformers class: config.json's `architectures`
    block: str = "llama"  # backends/<backend>/<block>.py holds the decoder block
    # the attention's and the MLP's RMSNorm (before the sublayer in the llama
    # block, on its output in the olmo2 block)
    norms: tuple[str, str] = ("input_layernorm", "post_attention_layernorm")
    qkv: tuple[str, ...] = ("q_proj", "k_proj", "v_proj")  # rows stack as q|k|v
    gate_up: tuple[str, ...] = ("gate_proj", "up_proj")  # rows stack as gate|up
    # RMSNorm of q and k before RoPE: "head" per head, (hd,) weights (Qwen3);
    # "proj" over the whole projection, (nh hd,) and (nkv hd,) weights (OLMo 2)
    qk_norm: str | None = None
    qkv_bias: bool = False  # q/k/v biases whatever the config says (Qwen2)
    # whether config.json's `sliding_window` applies: "always" (Mistral), "never"
    # (ignored, as transformers ignores it: Llama), the name of a boolean key
    # that must be true (Qwen's "use_sliding_window"), or "layer_types": the
    # layers config.json's `layer_types` marks "sliding_attention" (Gemma 2/3;
    # without it, all but every `sliding_pattern`-th layer, as transformers)
    sliding_window: str = "never"
    sliding_pattern: int = 0
    # RMSNorms on the attention's and the MLP's outputs, before the residual
    # add, besides `norms` before them (Gemma 2/3's sandwich)
    post_norms: tuple[str, str] | None = None
    # every RMSNorm weight w is used as (norm_offset + w) in float32 (Gemma's 1 + w)
    norm_offset: float = 0.0
    embed_scale: bool = False  # embeddings times sqrt(hidden_size), in the model dtype
    # tie_word_embeddings where config.json leaves it out: the transformers
    # class's default (transformers omits a value equal to its base default,
    # True, so Google's Gemma configs never say it)
    tie_default: bool = False
    # the MLP's activation: the first of these config keys that is set, else
    # act_default; act_aliases renames legacy values (Gemma's "gelu")
    act_keys: tuple[str, ...] = ("hidden_act", "hidden_activation")
    act_default: str = "silu"
    act_aliases: tuple[tuple[str, str], ...] = ()
    # optional config keys read as they are (the others are ignored, as
    # transformers ignores them for the family): "query_pre_attn_scalar",
    # "attn_logit_softcapping", "final_logit_softcapping"
    config_keys: tuple[str, ...] = ()
    # sliding layers turn with a RoPE base of their own, unscaled (Gemma 3's
    # rope_local_base_freq): the default where the config gives none
    rope_local_default: float | None = None
    # llama.cpp's `general.architecture`, if read; a dense family and a MoE one
    # may share one (llama: Llama, and Mixtral where the file has experts)
    gguf_arch: str | None = None
    moe: MoeNames | None = None  # a mixture of experts: where its experts are


FAMILIES: dict[str, Family] = {
    f.model_type: f
    for f in (
        Family("llama", "LlamaForCausalLM", gguf_arch="llama"),
        Family("mistral", "MistralForCausalLM", sliding_window="always"),
        Family("qwen2", "Qwen2ForCausalLM", qkv_bias=True,
               sliding_window="use_sliding_window"),
        Family("qwen3", "Qwen3ForCausalLM", qk_norm="head",
               sliding_window="use_sliding_window"),
        # mixtures of experts: the llama block with a routed MLP (cake.config.Moe)
        # (llama.cpp writes Mixtral as a llama GGUF with experts)
        Family("mixtral", "MixtralForCausalLM", sliding_window="always",
               gguf_arch="llama",
               moe=MoeNames("block_sparse_moe", count_keys=("num_local_experts",),
                            gate_up=("w1", "w3"), down="w2", normalize_key=None,
                            size_key=None, sparse_keys=False)),
        Family("qwen2_moe", "Qwen2MoeForCausalLM", qkv_bias=True,
               sliding_window="use_sliding_window", gguf_arch="qwen2moe",
               moe=MoeNames("mlp", shared="shared_expert",
                            shared_gate="shared_expert_gate")),
        Family("qwen3_moe", "Qwen3MoeForCausalLM", qk_norm="head",
               sliding_window="use_sliding_window", gguf_arch="qwen3moe",
               moe=MoeNames("mlp")),
        Family("olmo2", "Olmo2ForCausalLM", block="olmo2",
               norms=("post_attention_layernorm", "post_feedforward_layernorm"),
               qk_norm="proj", gguf_arch="olmo2"),
        Family("phi3", "Phi3ForCausalLM", qkv=("qkv_proj",),
               gate_up=("gate_up_proj",), sliding_window="always",
               gguf_arch="phi3"),
        # Gemma: the llama block with (1 + w) norms, GELU-tanh (a legacy
        # "gelu" means it, as transformers reads it) and scaled embeddings
        Family("gemma", "GemmaForCausalLM", norm_offset=1.0, embed_scale=True,
               tie_default=True,
               act_keys=("hidden_activation", "hidden_act"),
               act_default="gelu_pytorch_tanh",
               act_aliases=(("gelu", "gelu_pytorch_tanh"),), gguf_arch="gemma"),
        # Gemma 2: sandwich norms, (1 + w) norms, GELU-tanh, scaled embeddings,
        # soft-capped attention scores and logits, every other layer local
        Family("gemma2", "Gemma2ForCausalLM", block="gemma",
               norms=("input_layernorm", "pre_feedforward_layernorm"),
               post_norms=("post_attention_layernorm",
                           "post_feedforward_layernorm"),
               norm_offset=1.0, embed_scale=True, tie_default=True,
               act_keys=("hidden_activation", "hidden_act"),
               act_default="gelu_pytorch_tanh",
               config_keys=("query_pre_attn_scalar", "attn_logit_softcapping",
                            "final_logit_softcapping"),
               sliding_window="layer_types", sliding_pattern=2,
               gguf_arch="gemma2"),
        # Gemma 3 (text): Gemma 2's block with per-head (1 + w) q/k norms, no
        # attention soft-cap (transformers ignores the key), 5 local layers in
        # 6 with a RoPE base of their own
        Family("gemma3_text", "Gemma3ForCausalLM", block="gemma",
               norms=("input_layernorm", "pre_feedforward_layernorm"),
               post_norms=("post_attention_layernorm",
                           "post_feedforward_layernorm"),
               qk_norm="head", norm_offset=1.0, embed_scale=True, tie_default=True,
               act_keys=("hidden_activation", "hidden_act"),
               act_default="gelu_pytorch_tanh",
               config_keys=("query_pre_attn_scalar", "final_logit_softcapping"),
               sliding_window="layer_types", sliding_pattern=6,
               rope_local_default=10000.0, gguf_arch="gemma3"),
    )
}  # fmt: skip


def family_of(model_type: object) -> Family:
    """The family of an HF `model_type`; any other is a ModelError naming them."""
    fam = FAMILIES.get(model_type)  # type: ignore[arg-type]
    if fam is None:
        raise ModelError(
            f"unsupported model_type {model_type!r}: cake runs {', '.join(FAMILIES)}"
        )
    return fam
