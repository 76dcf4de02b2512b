"""`zoo.create(name, weights=...)`: build a model from a tagged or local checkpoint, with every check.

A tag is looked up in the index and its sha256 checked; a path is loaded as is. The checkpoint's
kwargs fill in those the caller did not give; its tensors must fit the model exactly, except the
classifier when `reinit_head=True`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from zoo._registry import create, meta_model, model_card, resolve_kwargs
from zoo.errors import ZooError
from zoo.untrusted import check_flag, short_repr
from zoo.weights.checkpoint import (
    PICKLE_SUFFIXES, Checkpoint, check_classes, check_fits, classifier_prefix, describe_spec, load_into,
    read_checkpoint, sha256_file,
)
from zoo.weights.index import entry_path, find_entry


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(kwargs))


def _is_path(weights: str | os.PathLike) -> bool:
    if isinstance(weights, os.PathLike):
        return True
    return ("/" in weights or os.sep in weights or weights.endswith(".safetensors")
            or weights.lower().endswith(PICKLE_SUFFIXES) or os.path.isfile(weights))


def _rebuild_compressed(ckpt: Checkpoint) -> nn.Module:
    """The smaller / int8 model a compressed checkpoint describes, rebuilt by zoo.compress from the spec."""
    try:
        from zoo.compress.serialize import build_from_spec, params_budget
    except ModuleNotFoundError as e:
        if e.name not in ("zoo.compress", "zoo.compress.serialize"):
            raise
        raise ZooError(f"weights {str(ckpt.path)!r} hold a compressed model "
                       f"({short_repr(ckpt.spec['compression'])}); rebuilding it needs "
                       "zoo.compress.serialize.build_from_spec, which is not available in this installation") from None
    return build_from_spec(ckpt.spec, max_params=params_budget(ckpt.path))


def _eval_if_int8(model: nn.Module) -> None:
    """Converted int8 models are inference-only: put them in eval mode (as zoo.compress.load does)."""
    from zoo.compress._common import is_quantized_model, steps

    pending_qat = any(s.get("method") == "qat" and not s.get("converted") for s in steps(model))
    if is_quantized_model(model) and not pending_qat:
        model.eval()


def _annotate(model: nn.Module, ckpt: Checkpoint, entry: Any, reinit_head: bool) -> nn.Module:
    info: dict[str, Any] = {"file": str(ckpt.path), "spec": ckpt.spec}
    if entry is not None:
        info.update(tag=entry.tag, sha256=entry.sha256, dataset=entry.dataset, metrics=dict(entry.metrics),
                    recipe=entry.recipe)
    for key in ("mean", "std"):
        if key in ckpt.metadata:
            info[key] = ckpt.metadata[key]
    if "classes" in ckpt.metadata and not reinit_head:
        info["classes"] = ckpt.metadata["classes"]
    info["head_reinitialised"] = reinit_head
    model.zoo_weights = info
    return model


def build_from_checkpoint(ckpt: Checkpoint, name: str | None = None, kwargs: dict[str, Any] | None = None,
                          reinit_head: bool = False, entry: Any = None) -> nn.Module:
    """Build the checkpoint's model (or `name` with `kwargs` overriding the checkpoint's) and load it."""
    kwargs = dict(kwargs or {})
    spec = ckpt.spec
    if name is None:
        if spec is None:
            raise ZooError(f"{str(ckpt.path)!r} has no zoo.spec header, so the model name must be given")
        name = spec["name"]
    model_card(name)  # unknown model name -> ZooError with suggestions
    saved = dict(spec.get("kwargs", {})) if spec is not None and spec["name"] == name else {}
    user = resolve_kwargs(name, **kwargs)  # validates what the caller gave
    user = {k: user[k] for k in kwargs}
    if saved:
        try:
            resolve_kwargs(name, **saved)
        except ZooError as e:
            raise ZooError(f"weights {str(ckpt.path)!r}: the saved kwargs no longer fit {name}: {e}") from None
    n_saved, n_user = saved.get("num_classes"), user.get("num_classes")
    if n_saved is not None and n_user is not None and n_saved != n_user and not reinit_head:
        raise ZooError(f"{name}: num_classes={n_user} differs from the {n_saved} classes of the weights "
                       f"{str(ckpt.path)!r}; pass reinit_head=True to load them with a freshly initialised head, "
                       f"or leave num_classes out to keep the checkpoint's classes")
    if spec is not None and spec.get("compression"):
        if reinit_head or spec["name"] != name or any(_jsonable({k: v})[k] != saved.get(k) for k, v in user.items()):
            raise ZooError(f"weights {str(ckpt.path)!r} hold a compressed {describe_spec(spec['name'], saved)}; "
                           f"load it with its own kwargs and without reinit_head")
        model = _rebuild_compressed(ckpt)
        check_classes(ckpt, (spec.get("kwargs") or {}).get("num_classes"))
        load_into(model, ckpt)
        _eval_if_int8(model)
        return _annotate(model, ckpt, entry, False)
    merged = {**saved, **user}
    meta = meta_model(name, **merged)  # the spec is checked against the file before anything is allocated
    skip = classifier_prefix(meta) if reinit_head else None
    check_fits({k: tuple(v.shape) for k, v in meta.state_dict().items()}, ckpt,
               describe_spec(name, meta.zoo_kwargs), skip)
    if not reinit_head:
        check_classes(ckpt, meta.zoo_kwargs["num_classes"])
    model = create(name, **merged)
    if reinit_head and (n_user is None or n_user == n_saved) and hasattr(model, "reset_classifier"):
        model.reset_classifier(model.zoo_kwargs["num_classes"])  # asked for a fresh head with the same classes
    load_into(model, ckpt, skip_prefix=classifier_prefix(model) if reinit_head else None)
    return _annotate(model, ckpt, entry, reinit_head)


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
    given = _jsonable({k: v for k, v in resolve_kwargs(name, **kwargs).items() if k in kwargs})  # validate first
    entry = None
    if _is_path(weights):
        ckpt = read_checkpoint(weights, allow_nonfinite=allow_nonfinite)
    else:
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
        ckpt = read_checkpoint(path, allow_nonfinite=allow_nonfinite)
    return build_from_checkpoint(ckpt, name, kwargs, reinit_head=reinit_head, entry=entry)


def load_weights(model: nn.Module, weights: str | os.PathLike, reinit_head: bool = False,
                 allow_nonfinite: bool = False) -> nn.Module:
    """Load a local safetensors checkpoint into an existing model in place (tensors must fit exactly)."""
    if not isinstance(weights, (str, os.PathLike)):
        raise ZooError(f"weights={short_repr(weights)} is not allowed; expected a path to a .safetensors file")
    ckpt = read_checkpoint(Path(weights), allow_nonfinite=allow_nonfinite)
    load_into(model, ckpt, skip_prefix=classifier_prefix(model) if reinit_head else None)
    return _annotate(model, ckpt, None, reinit_head)
