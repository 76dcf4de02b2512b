"""Serialisation of zoo models to safetensors (no pickles), with the architecture spec in the header.

A file holds the state tensors plus string metadata: `zoo.spec` is JSON with the registry name, the
resolved kwargs and any compression applied, so the model can be rebuilt through the registry.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from safetensors.torch import save, save_file

from zoo.errors import ZooError
from zoo.untrusted import load_tensors as _checked_tensors


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The JSON-able architecture spec of a model built by `zoo.create`."""
    if not hasattr(model, "zoo_name"):
        raise ValueError("model was not built by zoo.create, so it has no architecture spec")
    spec: dict[str, Any] = {"name": model.zoo_name, "kwargs": dict(model.zoo_kwargs)}
    compression = getattr(model, "zoo_compression", None)
    if compression:
        spec["compression"] = compression
    return spec


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Contiguous, de-aliased tensors of the model's state dict, ready for safetensors.

    Compressed models (int8, bit-packed weights, masks) are encoded by zoo.compress.serialize.
    """
    from zoo.compress.serialize import encode_state, is_compressed

    if is_compressed(model):
        return encode_state(model)
    out: dict[str, torch.Tensor] = {}
    seen: dict[int, str] = {}
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor):
            continue
        ptr = v.data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen:  # shared storage: safetensors refuses aliases
            v = v.clone()
        if ptr is not None:
            seen[ptr] = k
        out[k] = v.detach().contiguous().cpu()
    return out


def serialized_size(model: nn.Module) -> int:
    """Bytes of the model's safetensors serialisation (header included)."""
    return len(save(state_tensors(model)))


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically: temp file in the same folder, then rename."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_model(model: nn.Module, path: str | os.PathLike, extra: dict[str, Any] | None = None) -> None:
    """Save weights and spec (plus optional JSON-able extra metadata) to a safetensors file."""
    meta = {"zoo.spec": json.dumps(model_spec(model))}
    for k, v in (extra or {}).items():
        meta[f"zoo.{k}"] = json.dumps(v)
    atomic_save(state_tensors(model), path, meta)


def load_tensors(path: str | os.PathLike, allow_nonfinite: bool = False) -> dict[str, torch.Tensor]:
    """Load the tensors of a checked safetensors file onto the CPU (see zoo.untrusted; NaN/inf refused)."""
    return _checked_tensors(path, allow_nonfinite=allow_nonfinite)


def make_out_dir(path: str | os.PathLike, what: str = "--out") -> Path:
    """Create an output folder (and its parents) and check it is writable; ZooError naming it otherwise."""
    p = Path(path)
    try:
        p.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise ZooError(f"{what} {str(p)!r} is not allowed: it exists and is not a folder") from None
    except OSError as e:
        raise ZooError(f"{what} {str(p)!r} is not allowed: cannot create the folder ({e.strerror or e}); "
                       "expected a writable folder path") from None
    if not os.access(p, os.W_OK | os.X_OK):
        raise ZooError(f"{what} {str(p)!r} is not allowed: the folder is not writable")
    return p
