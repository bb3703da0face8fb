"""A user-written backend registered through cake.register_backend generates text."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

import cake
from cake.backends import DeviceInfo, Step
from cake.backends.numpy.llama import rms_norm, silu
from cake.kv import check_step
from cake.rope import rope_cos_sin, rope_inv_freq
from cake.sequence import StageSequences
from cake.weights.names import layer_tensor_names
from tests.models import hf_reference, make_checkpoint


class Float64Stage:
    """Whole-model llama stage in float64 that re-runs the whole sequence each step
    (no KV cache): the smallest correct backend, as in docs/backends.md."""

    def __init__(self, config, shard, tensors, dtype):
        self.config, self.shard, self.dtype = config, shard, dtype
        self.device = DeviceInfo("cpu", "float64-demo")
        self.w = {n: np.asarray(tensors.get(n), np.float64) for n in tensors.keys()}
        self.inv_freq = rope_inv_freq(config)
        self.seen: dict[int, list[int]] = {}
        self.seqs = StageSequences(max_sequences=8, max_context=1 << 30)
        self.calls = 0

    def release(self, seq_ids):
        self.seqs.release(seq_ids)
        for s in seq_ids:
            self.seen.pop(s, None)

    def forward(self, x, step: Step):
        self.calls += 1
        check_step(step, x, self.shard, self.config)
        self.seqs.admit(step)
        out = []
        for b, (sid, pos, n) in enumerate(
            zip(step.seq_ids, step.positions, step.lengths, strict=True)
        ):
            toks = self.seen.get(sid, [])[:pos] + [int(t) for t in x[b, :n]]
            self.seen[sid] = toks
            out.append(self._logits(toks)[-1])
        self.seqs.advance(step)
        return np.stack(out).astype(np.float32)

    def _logits(self, toks):
        c, w = self.config, self.w
        h = w["model.embed_tokens.weight"][toks]
        cos, sin = rope_cos_sin(self.inv_freq, np.arange(len(toks)))
        nh, nkv, hd = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        mask = np.tril(np.ones((len(toks), len(toks)), bool))

        def rot(t):
            half = hd // 2
            return (
                t * cos[:, None]
                + np.concatenate([-t[..., half:], t[..., :half]], -1) * sin[:, None]
            )

        for i in range(c.num_hidden_layers):
            p = dict(
                zip(
                    [n.split(f"layers.{i}.")[1] for n in layer_tensor_names(c, i)],
                    [w[n] for n in layer_tensor_names(c, i)],
                    strict=True,
                )
            )
            a = rms_norm(h, p["input_layernorm.weight"], c.rms_norm_eps)
            q = rot((a @ p["self_attn.q_proj.weight"].T).reshape(-1, nh, hd))
            k = rot((a @ p["self_attn.k_proj.weight"].T).reshape(-1, nkv, hd))
            v = (a @ p["self_attn.v_proj.weight"].T).reshape(-1, nkv, hd)
            k, v = np.repeat(k, nh // nkv, 1), np.repeat(v, nh // nkv, 1)
            s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
            s = np.exp(np.where(mask, s, -np.inf) - s.max(-1, keepdims=True))
            o = np.einsum("hqk,khd->qhd", s / s.sum(-1, keepdims=True), v)
            h = h + o.reshape(len(toks), -1) @ p["self_attn.o_proj.weight"].T
            m = rms_norm(h, p["post_attention_layernorm.weight"], c.rms_norm_eps)
            g = silu(m @ p["mlp.gate_proj.weight"].T) * (m @ p["mlp.up_proj.weight"].T)
            h = h + g @ p["mlp.down_proj.weight"].T
        h = rms_norm(h, w["model.norm.weight"], c.rms_norm_eps)
        return h @ w["lm_head.weight"].T


@cake.register_backend
class Float64Backend:
    name: ClassVar[str] = "float64-demo"

    @classmethod
    def is_available(cls):
        return True

    @classmethod
    def devices(cls):
        return [DeviceInfo("cpu", "float64-demo")]

    def load(self, config, shard, tensors, dtype, *, max_context, max_sequences):
        return Float64Stage(config, shard, tensors, dtype)


def test_registered_backend_generates_like_hf(tmp_path):
    from tests.smollm import hf_smollm

    folder = make_checkpoint("llama", tmp_path / "m", vocab_size=49152)
    _, tok = hf_smollm()
    tok.save_pretrained(folder)
    m = cake.load(folder, backend="float64-demo")
    assert m.info.backend == "float64-demo"
    ids = m.tokenizer.encode("Hello there")
    _, hf_tokens, _ = hf_reference(folder, ids, steps=5)
    text = "".join(m.generate("Hello there", max_tokens=6, temperature=0))
    assert text == m.tokenizer.decode(hf_tokens[:6])
    stage = m.pipeline.stages[0]
    assert stage.calls == 6  # prefill + 5 decode steps


def test_check_step_refuses_ids_outside_the_vocabulary():
    import pytest

    from cake.config import ModelConfig
    from cake.errors import CakeError
    from cake.shard import Shard

    cfg = ModelConfig.from_dict(
        dict(model_type="llama", vocab_size=100, hidden_size=8, intermediate_size=16,
             num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
    )  # fmt: skip
    shard = Shard(0, 2, 2, embed=True)
    step = Step((0, 1), (0, 0), (3, 3))
    check_step(step, np.array([[1, 2, 3], [4, 5, 99]], np.int32), shard, cfg)
    for bad, got in (
        ([[1, 2, 3], [4, 5, 100]], "1..100"),
        ([[-1, 2, 3], [4, 5, 6]], "-1..6"),
    ):
        with pytest.raises(CakeError, match=f"must be in \\[0, 100\\): got {got};"):
            check_step(step, np.array(bad, np.int32), shard, cfg)
    big = np.zeros((1, 2000), np.int32)  # past the list path: NumPy's min/max
    big[0, 7] = 100
    with pytest.raises(CakeError, match="got 0..100;"):
        check_step(Step((0,), (0,), (2000,)), big, shard, cfg)
    with pytest.raises(CakeError, match="does not match the step"):
        check_step(step, np.zeros((2, 4), np.int32), shard, cfg)
