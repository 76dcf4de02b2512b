"""File utilities with no model knowledge: atomic safetensors writes, checked tensor reads, output paths.

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


def check_out_file(path: str | os.PathLike, what: str, suffix: str = ".safetensors") -> Path:
    """`path` as a file to write: named *suffix, not an existing folder, under no existing file; ZooError naming
    `what` (e.g. --out) otherwise. Nothing is created."""
    p = Path(path)
    if p.suffix != suffix:
        raise ZooError(f"{what} {str(p)!r} is not allowed; expected a file path ending with {suffix}")
    if p.is_dir():
        raise ZooError(f"{what} {str(p)!r} is not allowed: it is an existing folder; expected a {suffix} file path "
                       f"(e.g. {str(p / ('model' + suffix))!r})")
    parent = next((q for q in p.absolute().parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ZooError(f"{what} {str(p)!r} is not allowed: {str(parent)!r} is a file, not a folder")
    return p


def atomic_save(tensors: dict[str, torch.Tensor], path: str | os.PathLike, metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically: temp file in the same folder, then rename; ZooError naming the
    path when it is a folder or cannot be written."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise ZooError(f"cannot write {path!r}: it is an existing folder; expected a file path")
    d = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(d, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=d, suffix=".tmp")
    except OSError as e:
        raise ZooError(f"cannot write {path!r}: {e.strerror or e}; expected a path in a writable folder") from None
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, path)
    except OSError as e:
        raise ZooError(f"cannot write {path!r}: {e.strerror or e}") from None
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
