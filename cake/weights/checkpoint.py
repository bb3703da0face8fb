"""Open a model by path: a Hugging Face folder, a `.gguf` file, or a folder
holding one `.gguf` (a part written by `cake split`)."""

from __future__ import annotations

from pathlib import Path

from cake.config import ModelConfig
from cake.errors import CakeError, ModelError
from cake.kv import DTYPES
from cake.weights.source import TensorSource


def open_checkpoint(path: str | Path) -> tuple[ModelConfig, TensorSource]:
    """The model's config and a lazy TensorSource over its weights."""
    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"model path {path} does not exist")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelError(f"{path} is neither a model folder nor a .gguf file")
        from cake.weights.gguf import GGUFSource

        source = GGUFSource(path)
        return source.config, source
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs and not any(path.glob("*.safetensors")):
        return _gguf_folder(path, ggufs)
    from cake.weights.safetensors import SafetensorsSource

    config = ModelConfig.from_file(path / "config.json")
    quantization = _quantization(path / "config.json")
    return config, SafetensorsSource(path, quantization, config)


def _quantization(config_json: Path) -> dict | None:
    """mlx-lm's "quantization" entry ({group_size, bits, ...}) or None."""
    import json

    try:
        q = json.loads(config_json.read_text()).get("quantization")
    except (OSError, ValueError):
        return None  # ModelConfig.from_file has already said what is wrong
    return q if isinstance(q, dict) else None


def _gguf_folder(path: Path, ggufs: list[Path]) -> tuple[ModelConfig, TensorSource]:
    """A folder with one .gguf. Its config.json, if any, gives the config: a part
    written by `cake split` lacks tensors the GGUF reader infers facts from (no
    `output.weight` would read as a tied head), and the split writes the whole
    model's config there."""
    if len(ggufs) > 1:
        raise ModelError(
            f"{path} holds {len(ggufs)} .gguf files: point --model at one of them"
        )
    from cake.weights.gguf import GGUFSource

    source = GGUFSource(ggufs[0])
    config_json = path / "config.json"
    if config_json.is_file():
        return ModelConfig.from_file(config_json), source
    return source.config, source


DEFAULT_CONTEXT = 4096  # positions per sequence when a load does not say


def context_for(config: ModelConfig, asked: int | None) -> int:
    """The positions a stage caches per sequence: `asked`, or the model's own
    context up to DEFAULT_CONTEXT."""
    return asked or min(config.max_position_embeddings, DEFAULT_CONTEXT)


def resolve_dtype(dtype: str, tensors: TensorSource) -> str:
    """'auto' means the checkpoint's own dtype (quantized GGUF: float32; an
    mlx-lm folder: its scales' dtype)."""
    if dtype != "auto":
        if dtype not in DTYPES:
            raise CakeError(
                f"unknown dtype {dtype!r}: use auto, float32, bfloat16 or float16"
            )
        return dtype
    from cake.weights.packed import Packed, stored_tensor

    probe = stored_tensor(tensors, "model.layers.0.self_attn.o_proj.weight")
    if isinstance(probe, Packed):  # no decoding just to learn a dtype
        name = "float32" if probe.scales is None else probe.scales.dtype.name
    else:
        name = probe.dtype.name
    return name if name in DTYPES else "float32"
