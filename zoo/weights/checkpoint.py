"""Checkpoint files: safetensors with the zoo spec in the header; reading, checking and loading them.

Only safetensors is accepted. Pickle-based files (torch.save's .pt/.pth/.bin, zip or raw pickle) are
refused, because unpickling runs arbitrary code. The header carries `zoo.spec` (architecture, kwargs,
compression, see zoo.io) and optionally `zoo.classes`, `zoo.mean`, `zoo.std`.
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from zoo._registry import COMMON_ARGS, MAX_NUM_CLASSES
from zoo.errors import ZooError
from zoo.io import save_model, state_tensors
from zoo.untrusted import (  # PICKLE_SUFFIXES and check_file are also used from here (zoo.weights.loading)
    NONFINITE_HINT, PICKLE_SUFFIXES, check_file, check_flag, check_spec, clip, load_tensors, read_header, short_repr,
)

MAX_IN_CHANS = int(COMMON_ARGS["in_chans"].max or 64)

HEAD_KEYS_SHOWN = 3  # how many keys of each kind an error message lists
MAX_CLASS_NAME = 256  # characters of one class name in a header


@dataclass
class Checkpoint:
    """A checked safetensors checkpoint: its path, zoo spec and header metadata (tensors not loaded)."""

    path: Path
    spec: dict[str, Any] | None  # {"name", "kwargs", optional "compression"}; None for a bare file
    metadata: dict[str, Any] = field(default_factory=dict)  # zoo.* header entries other than spec, decoded
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    allow_nonfinite: bool = False  # NaN/inf tensors and statistics load (explicit opt-out of the check)

    def describe(self) -> str:
        """`name(k=v, ...)` of the architecture the file was saved for."""
        if self.spec is None:
            return "an unknown architecture (no zoo.spec in the header)"
        return describe_spec(self.spec["name"], self.spec.get("kwargs", {}))


def describe_spec(name: str, kwargs: dict[str, Any]) -> str:
    """`name(k=v, ...)`, leaving out the default input resolution which does not affect weights."""
    inner = ", ".join(f"{_cut(k)}={short_repr(v)}" for k, v in sorted(kwargs.items()) if k != "resolution")
    return f"{_cut(name)}({inner})"


def _cut(s: str, limit: int = 100) -> str:
    return s if len(s) <= limit else s[: limit - 3] + "..."


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _numbers(meta: dict[str, Any], key: str, where: str, allow_nonfinite: bool) -> None:
    vals = meta[key]
    if not (isinstance(vals, list) and 1 <= len(vals) <= MAX_IN_CHANS
            and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in vals)):
        raise ZooError(f"{where}: zoo.{key}={short_repr(vals)} is not allowed; expected a list of 1 to "
                       f"{MAX_IN_CHANS} numbers, one per input channel")
    if not allow_nonfinite and not all(math.isfinite(v) for v in vals):
        raise ZooError(f"{where}: zoo.{key}={short_repr(vals)} holds NaN/inf; non-finite statistics are "
                       f"refused ({NONFINITE_HINT})")
    if key == "std" and not all(v > 0 for v in vals if math.isfinite(v)):
        raise ZooError(f"{where}: zoo.std={short_repr(vals)} is not allowed; every std must be > 0 (inputs are "
                       "divided by it)")


def check_metadata(meta: dict[str, Any], where: str, allow_nonfinite: bool = False) -> None:
    """Refuse header class names and normalisation statistics that cannot be used as they are."""
    classes = meta.get("classes")
    if classes is not None and not (
            isinstance(classes, list) and 1 <= len(classes) <= MAX_NUM_CLASSES
            and all(isinstance(c, str) and len(c) <= MAX_CLASS_NAME for c in classes)):
        raise ZooError(f"{where}: zoo.classes={short_repr(classes)} is not allowed; expected a list of 1 to "
                       f"{MAX_NUM_CLASSES:,} strings of at most {MAX_CLASS_NAME} characters")
    for key in ("mean", "std"):
        if key in meta:
            _numbers(meta, key, where, allow_nonfinite)


def read_checkpoint(path: str | os.PathLike, allow_nonfinite: bool = False) -> Checkpoint:
    """Check a file (no pickles, bounded valid safetensors header, sane zoo metadata); tensors are not read."""
    check_flag("allow_nonfinite", allow_nonfinite)
    p = check_file(path)
    meta, shapes = read_header(p)
    spec = meta.pop("spec", None)
    where = f"weights file {str(p)!r}"
    if spec is not None:
        check_spec(spec, where)
    check_metadata(meta, where, allow_nonfinite)
    return Checkpoint(path=p, spec=spec, metadata=meta, shapes=shapes, allow_nonfinite=allow_nonfinite)


def load_checkpoint_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """All tensors of a checked checkpoint, on the CPU (NaN/inf refused unless the checkpoint allows them)."""
    return load_tensors(ckpt.path, allow_nonfinite=ckpt.allow_nonfinite)


def classifier_prefix(model: nn.Module) -> str:
    """State-dict prefix (with trailing dot) of the model's classifier module."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "classifier", None)
    for name, mod in model.named_modules():
        if mod is head and name:
            return name + "."
    raise ZooError(f"{type(model).__name__} has no classifier module, so its head cannot be re-initialised")


def _list(items: Sequence[str]) -> str:
    shown = ", ".join(_cut(k) for k in items[:HEAD_KEYS_SHOWN])
    return shown + (f", ... ({len(items) - HEAD_KEYS_SHOWN} more)" if len(items) > HEAD_KEYS_SHOWN else "")


def mismatch_report(ckpt_shapes: dict[str, tuple[int, ...]], model_shapes: dict[str, tuple[int, ...]]) -> str:
    """Empty string if keys and shapes agree, else a summary naming a few mismatched tensors of each kind."""
    missing = [k for k in model_shapes if k not in ckpt_shapes]
    unexpected = [k for k in ckpt_shapes if k not in model_shapes]
    bad = [k for k in model_shapes if k in ckpt_shapes and tuple(ckpt_shapes[k]) != tuple(model_shapes[k])]
    firsts, seen = [], set()  # list one tensor per layer first, so the few shown name different layers
    for k in bad:
        if k.rpartition(".")[0] not in seen:
            seen.add(k.rpartition(".")[0])
            firsts.append(k)
    bad = firsts + [k for k in bad if k not in firsts]
    shape = [f"{k}: checkpoint {tuple(ckpt_shapes[k])} vs model {tuple(model_shapes[k])}" for k in bad]
    parts = []
    if missing:
        parts.append(f"{len(missing)} missing keys ({_list(missing)})")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys ({_list(unexpected)})")
    if shape:
        parts.append(f"{len(shape)} shape mismatches ({_list(shape)})")
    return "; ".join(parts)


def check_fits(model_shapes: dict[str, tuple[int, ...]], ckpt: Checkpoint, target: str,
               skip_prefix: str | None = None) -> None:
    """Raise ZooError with a summary unless the checkpoint's tensors fit these model state shapes exactly."""
    keep = (lambda k: not k.startswith(skip_prefix)) if skip_prefix else (lambda k: True)
    report = mismatch_report({k: s for k, s in ckpt.shapes.items() if keep(k)},
                             {k: s for k, s in model_shapes.items() if keep(k)})
    if report:
        raise ZooError(f"weights {str(ckpt.path)!r} were saved for {ckpt.describe()} and do not fit {target}: "
                       f"{report}")


def check_classes(ckpt: Checkpoint, num_classes: int | None) -> None:
    """Refuse header class names whose count differs from the model's number of outputs."""
    classes = ckpt.metadata.get("classes")
    if classes is not None and num_classes is not None and len(classes) != num_classes:
        raise ZooError(f"weights {str(ckpt.path)!r}: zoo.classes names {len(classes)} classes but the model has "
                       f"num_classes={num_classes} outputs; the header must name exactly one class per output")


def load_into(model: nn.Module, ckpt: Checkpoint, skip_prefix: str | None = None) -> None:
    """Copy the checkpoint's tensors into `model`, failing with a summary if keys or shapes differ.

    `skip_prefix` (e.g. "classifier.") leaves those model tensors untouched and ignores the checkpoint's.
    NaN/inf tensors are refused unless the checkpoint was read with allow_nonfinite=True.
    """
    keep = (lambda k: not k.startswith(skip_prefix)) if skip_prefix else (lambda k: True)
    target = describe_spec(getattr(model, "zoo_name", type(model).__name__), getattr(model, "zoo_kwargs", {}))
    check_fits({k: tuple(v.shape) for k, v in state_tensors(model).items()}, ckpt, target, skip_prefix)
    tensors = {k: v for k, v in load_checkpoint_tensors(ckpt).items() if keep(k)}
    # strict unless the head is skipped (a compressed model's load_state_dict decodes its packed tensors)
    try:
        result = model.load_state_dict(tensors, strict=skip_prefix is None)
    except RuntimeError as e:  # e.g. encoded int8 parts whose values do not decode to this structure
        raise ZooError(f"weights {str(ckpt.path)!r} do not load into {target}: {clip(str(e), 240)}") from None
    left = [k for k in result.missing_keys if keep(k)]
    if left or result.unexpected_keys:  # only non-tensor state could get here; never silently skip it
        raise ZooError(f"weights {str(ckpt.path)!r}: could not load {_list(left + list(result.unexpected_keys))}")


def save_checkpoint(model: nn.Module, path: str | os.PathLike, classes: Sequence[str] | None = None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    extra: dict[str, Any] | None = None) -> Path:
    """Save a zoo model as safetensors with its spec, class names and input normalisation in the header."""
    if not hasattr(model, "zoo_name"):
        raise ZooError("save_checkpoint: the model was not built by zoo.create, so it has no architecture spec")
    p = Path(path)
    if p.suffix != ".safetensors":
        raise ZooError(f"save_checkpoint: path {str(p)!r} must end with .safetensors")
    kwargs = getattr(model, "zoo_kwargs", {})
    meta: dict[str, Any] = dict(extra or {})
    if classes is not None:
        classes = [str(c) for c in classes]
        n = kwargs.get("num_classes")
        if n is not None and len(classes) != n:
            raise ZooError(f"save_checkpoint: {len(classes)} class names given for a model with num_classes={n}")
        meta["classes"] = classes
    for key, val in (("mean", mean), ("std", std)):
        if val is None:
            continue
        vals = [float(v) for v in val]
        c = kwargs.get("in_chans")
        if c is not None and len(vals) != c:
            raise ZooError(f"save_checkpoint: {key} has {len(vals)} values for a model with in_chans={c}")
        if key == "std" and any(v <= 0 for v in vals):
            raise ZooError(f"save_checkpoint: std={vals} must be positive")
        meta[key] = vals
    save_model(model, p, meta)
    return p
