"""Checkpoint files: safetensors with the zoo spec in the header; reading, checking and loading them.

Only safetensors is accepted. Pickle-based files (torch.save's .pt/.pth/.bin, zip or raw pickle) are
refused, because unpickling runs arbitrary code. The header carries `zoo.spec` (architecture, kwargs,
compression, see zoo.io) and optionally `zoo.classes`, `zoo.mean`, `zoo.std`.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from zoo.errors import ZooError
from zoo.io import save_model, state_tensors

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt", ".tar")
_PICKLE_REASON = (
    "unpickling allows arbitrary code execution, so zoo only loads safetensors; convert it once in a "
    "trusted session with `safetensors.torch.save_file(torch.load(path, weights_only=True), "
    "'model.safetensors')`"
)
HEAD_KEYS_SHOWN = 3  # how many keys of each kind an error message lists


@dataclass
class Checkpoint:
    """A checked safetensors checkpoint: its path, zoo spec and header metadata (tensors not loaded)."""

    path: Path
    spec: dict[str, Any] | None  # {"name", "kwargs", optional "compression"}; None for a bare file
    metadata: dict[str, Any] = field(default_factory=dict)  # zoo.* header entries other than spec, decoded
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def describe(self) -> str:
        """`name(k=v, ...)` of the architecture the file was saved for."""
        if self.spec is None:
            return "an unknown architecture (no zoo.spec in the header)"
        return describe_spec(self.spec["name"], self.spec.get("kwargs", {}))


def describe_spec(name: str, kwargs: dict[str, Any]) -> str:
    """`name(k=v, ...)`, leaving out the default input resolution which does not affect weights."""
    inner = ", ".join(f"{k}={v!r}" for k, v in sorted(kwargs.items()) if k != "resolution")
    return f"{name}({inner})"


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _looks_like_safetensors(head: bytes, size: int) -> bool:
    if len(head) < 9:
        return False
    (n,) = struct.unpack("<Q", head[:8])
    return 0 < n <= size - 8 and head[8:9] == b"{"


def _looks_like_pickle(head: bytes) -> bool:
    return head[:4] == b"PK\x03\x04" or (len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5)


def check_file(path: str | os.PathLike) -> Path:
    """Return the path if it is an existing non-pickle file; raise ZooError otherwise."""
    p = Path(path)
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise ZooError(f"refusing to load {str(p)!r}: a {p.suffix} file is a pickle, and {_PICKLE_REASON}")
    if not p.is_file():
        raise ZooError(f"weights file {str(p)!r} does not exist")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(16)
    if not _looks_like_safetensors(head, size) and _looks_like_pickle(head):
        kind = "a zip archive (torch.save format)" if head[:2] == b"PK" else "a pickle"
        raise ZooError(f"refusing to load {str(p)!r}: it is {kind}, and {_PICKLE_REASON}")
    return p


def _corrupt(p: Path, why: object) -> ZooError:
    return ZooError(f"weights file {str(p)!r} is truncated or corrupt (not a valid safetensors file): {why}")


def read_checkpoint(path: str | os.PathLike) -> Checkpoint:
    """Check a file (no pickles, valid safetensors header) and read its zoo metadata, not its tensors."""
    p = check_file(path)
    try:
        with safe_open(os.fspath(p), framework="pt", device="cpu") as f:
            raw = f.metadata() or {}
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise _corrupt(p, e) from None
    meta: dict[str, Any] = {}
    for k, v in raw.items():
        if not k.startswith("zoo."):
            continue
        try:
            meta[k[4:]] = json.loads(v)
        except json.JSONDecodeError as e:
            raise _corrupt(p, f"header entry {k!r} is not JSON ({e})") from None
    spec = meta.pop("spec", None)
    if spec is not None and not (isinstance(spec, dict) and isinstance(spec.get("name"), str)
                                 and isinstance(spec.get("kwargs", {}), dict)):
        raise _corrupt(p, f"zoo.spec must be an object with 'name' and 'kwargs', got {spec!r}")
    return Checkpoint(path=p, spec=spec, metadata=meta, shapes=shapes)


def load_checkpoint_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """All tensors of a checked checkpoint, on the CPU."""
    try:
        return load_file(os.fspath(ckpt.path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise _corrupt(ckpt.path, e) from None


def classifier_prefix(model: nn.Module) -> str:
    """State-dict prefix (with trailing dot) of the model's classifier module."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else getattr(model, "classifier", None)
    for name, mod in model.named_modules():
        if mod is head and name:
            return name + "."
    raise ZooError(f"{type(model).__name__} has no classifier module, so its head cannot be re-initialised")


def _list(items: Sequence[str]) -> str:
    shown = ", ".join(items[:HEAD_KEYS_SHOWN])
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


def load_into(model: nn.Module, ckpt: Checkpoint, skip_prefix: str | None = None) -> None:
    """Copy the checkpoint's tensors into `model`, failing with a summary if keys or shapes differ.

    `skip_prefix` (e.g. "classifier.") leaves those model tensors untouched and ignores the checkpoint's.
    """
    model_tensors = state_tensors(model)
    keep = (lambda k: not k.startswith(skip_prefix)) if skip_prefix else (lambda k: True)
    model_shapes = {k: tuple(v.shape) for k, v in model_tensors.items() if keep(k)}
    ckpt_shapes = {k: s for k, s in ckpt.shapes.items() if keep(k)}
    report = mismatch_report(ckpt_shapes, model_shapes)
    if report:
        target = describe_spec(getattr(model, "zoo_name", type(model).__name__), getattr(model, "zoo_kwargs", {}))
        raise ZooError(f"weights {str(ckpt.path)!r} were saved for {ckpt.describe()} and do not fit {target}: "
                       f"{report}")
    tensors = {k: v for k, v in load_checkpoint_tensors(ckpt).items() if keep(k)}
    # strict unless the head is skipped (a compressed model's load_state_dict decodes its packed tensors)
    result = model.load_state_dict(tensors, strict=skip_prefix is None)
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
