"""Weights for zoo models: safetensors checkpoints with the spec in the header, an index with sha256
and provenance, loading through `zoo.create(name, weights=...)`, conversion of torchvision / timm
reference weights (`from_torchvision`, `from_timm`, implemented in zoo.interop) and import of other
projects' safetensors state dicts by structure (`import_state_dict`, zoo.weights.foreign) and of TFLite
MobileNets (`import_tflite`, zoo.weights.tflite).
"""

from __future__ import annotations

from zoo.interop import from_timm, from_torchvision
from zoo.weights.checkpoint import (
    Checkpoint, load_checkpoint, load_weights, read_checkpoint, save_checkpoint, serialized_size, sha256_file,
)
from zoo.weights.cli import add_commands, info_lines
from zoo.weights.foreign import import_state_dict
from zoo.weights.tflite import import_tflite
from zoo.weights.index import (
    WeightsEntry, list_weights, read_index, register_checkpoint, verify_index, weights_for, weights_root,
)
from zoo.weights.loading import create_pretrained

__all__ = [
    "Checkpoint", "WeightsEntry", "add_commands", "create_pretrained", "from_timm", "from_torchvision",
    "import_state_dict", "import_tflite", "info_lines", "list_weights", "load_checkpoint", "load_weights",
    "read_checkpoint", "read_index", "register_checkpoint", "save_checkpoint", "serialized_size", "sha256_file",
    "verify_index", "weights_for", "weights_root",
]
