"""Open a model by path: a Hugging Face folder, a `.gguf` file, or a folder
holding one `.gguf` (a part written by `cake split`)."""

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
    ggufs = sorted(path.glob("*.gguf"))
    if ggufs and not any(path.glob("*.safetensors")):
        return _gguf_folder(path, ggufs)
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
