"""`zoo.create(name, weights=...)`: pretrained weights by tag (index, sha256) or by path.

The registry only builds models; it does not import this module. `zoo/__init__.py` passes
`create_pretrained` to `zoo._registry.install_weights_loader` when the package is imported, and
`create(name, weights=...)` delegates to it. A tag is looked up in the index and its sha256 checked;
a path is loaded as is; both then go through `zoo.weights.checkpoint.load_checkpoint`, the one loader.

For transfer learning (a recipe's `init`, `zoo finetune --weights`), `pretrained_spec` reads which model a
weights file holds from its header (a zoo checkpoint's spec, a TFLite MobileNet's graph) and
`weights_source` loads it with the input normalisation it was trained with.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable

import torch.nn as nn

from zoo._registry import resolve_kwargs
from zoo.errors import ZooError
from zoo.untrusted import PICKLE_SUFFIXES, check_flag, short_repr
from zoo.weights.checkpoint import describe_spec, load_checkpoint, read_checkpoint, sha256_file
from zoo.weights.foreign import load_foreign
from zoo.weights.index import entry_path, find_entry
from zoo.weights.tflite import detect, is_tflite, tflite_to_model

# kwargs that a pretrained model's weights do not depend on: a fine-tune may change them
FREE_KWARGS = ("resolution", "drop_rate", "num_classes")


def is_weights_path(weights: str | os.PathLike) -> bool:
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
    if is_weights_path(weights):
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


def pretrained_spec(weights: str | os.PathLike, name: str | None, kwargs: dict[str, Any],
                    flag: str = "model") -> tuple[str, dict[str, Any]]:
    """The model name and kwargs to fine-tune from `weights`: a file's own (its zoo spec, or the architecture a
    TFLite file holds) under the caller's `kwargs`; `name`, needed for a tag or a foreign state dict, must agree
    with the file, and so must every given kwarg its weights depend on (all but FREE_KWARGS)."""
    if not is_weights_path(weights):
        if name is None:
            raise ZooError(f"weights {short_repr(weights)} is a tag, which does not say which model it is for; "
                           f"give {flag} (see `zoo weights list`), or a .safetensors / .tflite file")
        return name, dict(kwargs)
    if is_tflite(weights):
        found = detect(weights)
        saved, what = dict(found.kwargs), found.name
    else:
        ckpt = read_checkpoint(weights)
        if ckpt.spec is None:
            if name is None:
                raise ZooError(f"weights {str(ckpt.path)!r} have no zoo.spec header (another project's state dict), "
                               f"so they do not say which model they fit; give {flag}")
            return name, dict(kwargs)
        if ckpt.spec.get("compression"):
            raise ZooError(f"weights {str(ckpt.path)!r} hold a compressed {ckpt.describe()}; fine-tune from an "
                           "uncompressed checkpoint (compress after fine-tuning, e.g. --then)")
        saved, what = dict(ckpt.spec.get("kwargs", {})), ckpt.spec["name"]
    where = f"weights {str(weights)!r} hold {describe_spec(what, saved)}"
    if name is not None and name != what:
        raise ZooError(f"{flag}={name!r} disagrees with the file: {where}; leave {flag} out to use the file's model")
    for k, v in kwargs.items():
        if k not in FREE_KWARGS and k in saved and json.loads(json.dumps(v)) != saved[k]:
            raise ZooError(f"{k}={short_repr(v)} disagrees with the file: {where} ({k}={short_repr(saved[k])}); "
                           f"leave {k} out to use the file's value")
    return what, {**{k: v for k, v in saved.items() if k != "num_classes"}, **kwargs}


def weights_source(f: str | os.PathLike, fresh: Callable[[], nn.Module]) -> tuple[nn.Module, tuple | None]:
    """The model a weights file holds and the input (mean, std) it was trained with, if known: a TFLite
    MobileNet, a zoo checkpoint, or another project's state dict (paired by structure with `fresh()`)."""
    if is_tflite(f):
        src = tflite_to_model(f)
        return src, (src.tflite_import.mean, src.tflite_import.std)
    ckpt = read_checkpoint(f)
    if ckpt.spec is None:  # another project's state dict: paired by structure with the receiving model
        return load_foreign(ckpt, fresh()), None
    meta = ckpt.metadata
    return load_checkpoint(ckpt), ((meta["mean"], meta["std"]) if "mean" in meta and "std" in meta else None)
