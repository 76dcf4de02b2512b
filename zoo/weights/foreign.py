"""Import a foreign state dict (safetensors) into a zoo checkpoint, mapping tensors by structure.

Made for reference weights published by other projects, e.g. the CIFAR ResNets of He et al. 2016
("Deep Residual Learning for Image Recognition", option-A shortcuts) converted from Idelbayev's
pytorch_resnet_cifar10. Key names differ between projects, so tensors are paired by position, not by
name: both sides are listed in module order (BatchNorm `num_batches_tracked` counters left out) and
matched one by one, and every pair must have the same shape.

A safetensors file stores its tensors sorted by name, so the foreign module order is recovered from
the names: numbers compare as numbers (layer2 before layer10), a layer comes before the normalisation
that shares its number (conv1, bn1, conv2, bn2), sub-networks come after the layers with their number
(conv1, bn1, layer1, ...), names without a number after numbered ones, and a classifier head (fc,
linear, classifier, head) last among its siblings; within a layer the order is weight, bias,
running_mean, running_var. Other orders (e.g. SqueezeNet's squeeze / expand1x1 / expand3x3) cannot be
told from the names: the shape check then stops at the first misplaced tensor and names it.

The result is written with the ordinary checkpoint saver (spec, class names and input normalisation in
the header), so it loads with `zoo.create(name, weights=FILE)`.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from zoo._registry import create
from zoo.errors import ZooError
from zoo.io import check_out_file
from zoo.untrusted import short_repr
from zoo.weights.checkpoint import (Checkpoint, describe_spec, load_checkpoint_tensors, read_checkpoint, save_checkpoint,
                                    sha256_file)

SKIPPED = ("num_batches_tracked",)  # BatchNorm counters: not weights, absent from many exports
_LEAF_RANK = {"weight": 0, "bias": 1, "running_mean": 2, "running_var": 3}
_NUMBER = re.compile(r"(\d+)$")
HEAD_NAMES = ("fc", "linear", "classifier", "head", "last_linear")
CLASS_SETS: dict[str, tuple[str, ...]] = {
    "cifar10": ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"),
    "digits": tuple(str(i) for i in range(10)),
    "mnist": tuple(str(i) for i in range(10)),
    "fashion_mnist": ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                      "Ankle boot"),
}


def _kept(key: str) -> bool:
    return key.rpartition(".")[2] not in SKIPPED


def foreign_order(shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """The keys of a name-sorted state dict (num_batches_tracked left out) in recovered module order."""
    keys = [k for k in shapes if _kept(k)]
    containers = {".".join(k.split(".")[:i]) for k in keys for i in range(1, len(k.split(".")) - 1)}

    def role(prefix: str) -> int:
        if prefix in containers:
            return 2
        w = shapes.get(prefix + ".weight")
        is_norm = prefix + ".running_mean" in shapes or (w is not None and len(w) == 1)
        return 1 if is_norm else 0

    def sort_key(key: str) -> tuple:
        parts = key.split(".")
        path = []
        for i, name in enumerate(parts[:-1]):
            m = _NUMBER.search(name)
            path.append((name in HEAD_NAMES, int(m.group(1)) if m else math.inf, role(".".join(parts[:i + 1])),
                         name))
        return (*path, (False, -math.inf, -1, ""), (_LEAF_RANK.get(parts[-1], len(_LEAF_RANK)), parts[-1]))

    return sorted(keys, key=sort_key)


def _describe(model: nn.Module) -> str:
    return describe_spec(model.spec.name, model.spec.kwargs)


def match_tensors(foreign: dict[str, tuple[int, ...]], model: nn.Module, source: str) -> list[tuple[str, str]]:
    """(foreign key, zoo key) pairs in module order; ZooError at the first pair whose shapes differ."""
    theirs = foreign_order(foreign)
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items() if _kept(k)]
    counts = (f"the foreign file has {len(theirs)} tensors, the zoo model {len(ours)} "
              f"(num_batches_tracked not counted)")
    for i, (fk, (zk, zshape)) in enumerate(zip(theirs, ours)):
        if tuple(foreign[fk]) != zshape:
            extra = f"; {counts}" if len(theirs) != len(ours) else ""
            raise ZooError(f"cannot import {source} into zoo {_describe(model)}: tensor {i + 1} in module order, "
                           f"foreign {fk!r} {tuple(foreign[fk])} does not fit zoo {zk!r} {zshape}{extra}")
    if len(theirs) != len(ours):
        n = min(len(theirs), len(ours))
        first = f"first unmatched foreign tensor {theirs[n]!r}" if len(theirs) > n else \
            f"first unfilled zoo tensor {ours[n][0]!r}"
        raise ZooError(f"cannot import {source} into zoo {_describe(model)}: {counts}; the first {n} fit, "
                       f"{first}")
    return [(fk, zk) for fk, (zk, _) in zip(theirs, ours)]


def resolve_classes(classes: str | os.PathLike | Sequence[str] | None) -> list[str] | None:
    """Class names from a named set (see CLASS_SETS), a text file with one name per line, or a list."""
    if classes is None:
        return None
    if isinstance(classes, str) and classes in CLASS_SETS:
        return list(CLASS_SETS[classes])
    if isinstance(classes, (str, os.PathLike)):
        p = Path(classes)
        if not p.is_file():
            raise ZooError(f"classes={str(classes)!r} is not allowed; expected a named set ("
                           + ", ".join(CLASS_SETS) + "), a text file with one class name per line, or a list")
        names = [line.strip() for line in p.read_text().splitlines() if line.strip()]
        if not names:
            raise ZooError(f"classes file {str(p)!r} holds no class names (expected one per line)")
        return names
    if isinstance(classes, (list, tuple)) and classes and all(isinstance(c, str) for c in classes):
        return list(classes)
    raise ZooError(f"classes={classes!r} is not allowed; expected a named set (" + ", ".join(CLASS_SETS)
                   + "), a text file with one class name per line, or a list of strings")


def _norm(name: str, value: Sequence[float] | None, flag: str) -> list[float] | None:
    if value is None:
        return None
    try:
        vals = [float(v) for v in value]
    except (TypeError, ValueError):
        vals = []
    if not vals or not all(math.isfinite(v) for v in vals) or (name == "std" and not all(v > 0 for v in vals)):
        more = " > 0" if name == "std" else ""
        raise ZooError(f"{flag}={short_repr(value)} is not allowed; expected one finite number{more} per input "
                       f"channel, e.g. {name}=(0.485, 0.456, 0.406)")
    return vals


def _check_counts(model: nn.Module, names: list[str] | None, norm: dict[str, list[float] | None],
                  flags: dict[str, str]) -> None:
    """One class name per output and one mean / std value per input channel of `model`, before anything is written."""
    kw = model.spec.kwargs
    if names is not None and len(names) != kw["num_classes"]:
        raise ZooError(f"{flags['classes']} names {len(names)} classes, but {describe_spec(model.spec.name, kw)} has "
                       f"num_classes={kw['num_classes']} outputs; give one name per output")
    for key, vals in norm.items():
        if vals is not None and len(vals) != kw["in_chans"]:
            raise ZooError(f"{flags[key]} has {len(vals)} values, but {describe_spec(model.spec.name, kw)} has "
                           f"in_chans={kw['in_chans']}; give one value per input channel")


def load_foreign(ckpt: Checkpoint, model: nn.Module) -> nn.Module:
    """Fill `model` in place with a foreign checkpoint's tensors, paired by structure (see match_tensors)."""
    pairs = match_tensors(ckpt.shapes, model, f"{str(ckpt.path)!r}")
    tensors = load_checkpoint_tensors(ckpt)
    state = model.state_dict()
    with torch.no_grad():
        for fk, zk in pairs:
            state[zk] = tensors[fk].to(dtype=state[zk].dtype).clone()
    model.load_state_dict(state, strict=True)
    return model


def import_state_dict(path: str | os.PathLike, model_name: str, out: str | os.PathLike, *,
                      classes: str | os.PathLike | Sequence[str] | None = None,
                      mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                      flags: bool = False, **kwargs: Any) -> Path:
    """Write a zoo checkpoint `out` holding the foreign safetensors state dict `path`, mapped by structure
    onto `zoo.create(model_name, **kwargs)`, with class names and input normalisation in the header.
    `flags=True` names the inputs as `zoo weights import` options (--mean, ...) in error messages."""
    flag = {k: (f"--{k}" if flags else k) for k in ("classes", "mean", "std", "out")}
    mean, std = _norm("mean", mean, flag["mean"]), _norm("std", std, flag["std"])
    if (mean is None) != (std is None):
        raise ZooError(f"{flag['mean']}={short_repr(mean)}, {flag['std']}={short_repr(std)}: give both (the input "
                       "normalisation) or neither")
    names = resolve_classes(classes)
    out_p = check_out_file(out, flag["out"])
    ckpt = read_checkpoint(path)  # refuses pickles, names a missing or corrupt file
    if out_p.exists() and out_p.resolve() == ckpt.path.resolve():
        raise ZooError(f"{flag['out']}={str(out_p)!r} is the foreign file itself; write the zoo checkpoint elsewhere")
    model = create(model_name, **kwargs)
    _check_counts(model, names, {"mean": mean, "std": std}, flag)
    model = load_foreign(ckpt, model)
    source = {"file": ckpt.path.name, "sha256": sha256_file(ckpt.path)}
    return save_checkpoint(model, out_p, classes=names, mean=mean, std=std, extra={"imported_from": source})
