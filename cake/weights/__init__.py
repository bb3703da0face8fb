"""Checkpoint readers. Every reader is a TensorSource speaking Hugging Face names."""

from cake.weights.names import layer_tensor_names, shard_tensor_names
from cake.weights.source import TensorSource

__all__ = ["TensorSource", "layer_tensor_names", "shard_tensor_names"]
