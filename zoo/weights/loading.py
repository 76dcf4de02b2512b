"""`zoo.create(name, weights=...)`: pretrained weights by tag (index, sha256) or by path.

The registry only builds models; it does not import this module. `zoo/__init__.py` passes
`create_pretrained` to `zoo._registry.install_weights_loader` when the package is imported, and
`create(name, weights=...)` delegates to it. A tag is looked up in the index and its sha256 checked;
a path is loaded as is; both then go through `zoo.weights.checkpoint.load_checkpoint`, the one loader.
"""

from __future__ import annotations

import json
import os
from typing import Any

import torch.nn as nn

from zoo._registry import resolve_kwargs
from zoo.errors import ZooError
from zoo.untrusted import PICKLE_SUFFIXES, check_flag, short_repr
from zoo.weights.checkpoint import load_checkpoint, read_checkpoint, sha256_file
from zoo.weights.index import entry_path, find_entry


def _is_path(weights: str | os.PathLike) -> bool:
    """True if `weights` names a file rather than an index tag."""
    if isinstance(weights, os.PathLike):
        return True
    return ("/" in weights or os.sep in weights or weights.endswith(".safetensors")
            or weights.lower().endswith(PICKLE_SUFFIXES) or os.path.isfile(weights))


def create_pretrained(name: str, weights: str | os.PathLike, reinit_head: bool = False,
                      weights_dir: str | os.PathLike | None = None, allow_nonfinite: bool = False,
                      **kwargs: Any) -> nn.Module:
    """Build `name` with weights from a tag in the index (hash-checked) or from a local safetensors path."""
    if not isinstance(reinit_head, bool):
        raise ZooError(f"{short_repr(name)}: reinit_head={short_repr(reinit_head)} is not allowed; "
                       "expected True or False")
    check_flag("allow_nonfinite", allow_nonfinite)
    if not isinstance(weights, (str, os.PathLike)) or (isinstance(weights, str) and not weights):
        raise ZooError(f"{short_repr(name)}: weights={short_repr(weights)} is not allowed; expected a tag from "
                       f"zoo.list_weights() or a path to a .safetensors file")
    resolved = resolve_kwargs(name, **kwargs)  # validate first
    given = json.loads(json.dumps({k: v for k, v in resolved.items() if k in kwargs}))  # tuples as the index's lists
    if _is_path(weights):
        ckpt = read_checkpoint(weights, allow_nonfinite=allow_nonfinite)
        return load_checkpoint(ckpt, name, kwargs, reinit_head=reinit_head)
    entry = find_entry(name, weights, given if not reinit_head else
                       {k: v for k, v in given.items() if k != "num_classes"}, weights_dir)
    path = entry_path(entry, weights_dir)
    if not path.is_file():
        raise ZooError(f"{name}: the {weights!r} weights file {str(path)!r} is missing")
    digest = sha256_file(path)
    if digest != entry.sha256:
        raise ZooError(f"{name}: sha256 of {str(path)!r} is {digest}, but the index says {entry.sha256}; "
                       f"the file is corrupt or was changed (restore it, or re-register it with "
                       f"zoo.weights.register_checkpoint)")
    provenance = {"tag": entry.tag, "sha256": entry.sha256, "dataset": entry.dataset,
                  "metrics": dict(entry.metrics), "recipe": entry.recipe}
    return load_checkpoint(read_checkpoint(path, allow_nonfinite=allow_nonfinite), name, kwargs,
                           reinit_head=reinit_head, provenance=provenance)
