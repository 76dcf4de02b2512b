"""File utilities with no model knowledge: atomic safetensors writes, checked tensor reads, output folders.

Zoo checkpoints (tensors plus the model spec in the header) are read and written by
zoo.weights.checkpoint, which uses these helpers; this module imports no other zoo module but
zoo.errors and zoo.untrusted, so anything may import it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from zoo.errors import ZooError
from zoo.untrusted import load_tensors as _checked_tensors


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
