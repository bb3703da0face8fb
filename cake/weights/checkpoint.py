"""Open a model by path: a Hugging Face folder or a `.gguf` file."""

from __future__ import annotations

from pathlib import Path

from cake.config import ModelConfig
from cake.errors import ModelError
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
    from cake.weights.safetensors import SafetensorsSource

    config = ModelConfig.from_file(path / "config.json")
    return config, SafetensorsSource(path, _quantization(path / "config.json"))


def _quantization(config_json: Path) -> dict | None:
    """mlx-lm's "quantization" entry ({group_size, bits, ...}) or None."""
    import json

    try:
        q = json.loads(config_json.read_text()).get("quantization")
    except (OSError, ValueError):
        return None  # ModelConfig.from_file has already said what is wrong
    return q if isinstance(q, dict) else None
