"""Pickle-free save and reload of a channel-pruned model that zoo did not build (torchvision, timm, your own).

Structured pruning (Li et al. 2017; Fang et al. 2023's dependency graph, zoo.compress.graph) changes layer
shapes, so a plain `load_state_dict` into a fresh model fails. `save_pruned` writes the state tensors to a
safetensors file with the channel step (every resized layer's new shape) in its header; `load_pruned`
resizes the layers of a freshly built, unpruned model of the same architecture and loads the tensors
into it. Nothing is unpickled. zoo's own models use `zoo.compress.save` / `load`, which rebuild the
model from the registry instead.
"""

from __future__ import annotations

import json
import os

import torch.nn as nn
from safetensors import safe_open
from safetensors.torch import save_file

from zoo.compress._common import check_model, set_steps, steps
from zoo.compress.surgery import rebuild_structure
from zoo.errors import ZooError

KEY = "zoo.channels"


def save_pruned(model: nn.Module, path: str | os.PathLike) -> None:
    """Save a channel-pruned model's tensors and its new layer shapes (safetensors, no pickle)."""
    check_model("save_pruned", model)
    step = [s for s in steps(model) if s.get("kind") == "channels"]
    others = [s.get("kind") for s in steps(model) if s.get("kind") != "channels"]
    if others:
        raise ZooError(f"save_pruned: the model also has {others} steps; save_pruned stores channel pruning only")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    meta = {KEY: json.dumps(step[0] if step else {"kind": "channels", "modules": {}, "attrs": {}})}
    save_file(tensors, os.fspath(path), metadata=meta)


def load_pruned(path: str | os.PathLike, model: nn.Module) -> nn.Module:
    """Resize `model` (a fresh, unpruned model of the saved architecture) as recorded and load the tensors."""
    check_model("load_pruned", model)
    p = os.fspath(path)
    if not os.path.isfile(p):
        raise ZooError(f"load_pruned: no such file {p!r}")
    with safe_open(p, framework="pt") as f:
        meta = f.metadata() or {}
        if KEY not in meta:
            raise ZooError(f"load_pruned: {p!r} has no {KEY!r} header; it was not written by save_pruned")
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    step = json.loads(meta[KEY])
    try:
        rebuild_structure(model, step.get("modules", {}))
        model.load_state_dict(tensors, strict=True)
    except (ZooError, RuntimeError) as e:
        raise ZooError(f"load_pruned: the tensors of {p!r} do not fit this model ({e})") from None
    for a, v in step.get("attrs", {}).items():
        setattr(model, a, v)
    set_steps(model, [step] if step.get("modules") else [])
    return model
