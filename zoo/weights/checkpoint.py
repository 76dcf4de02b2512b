"""Zoo checkpoints: the one reader, loader and writer of them.

A *checkpoint* (in zoo, only this) is a safetensors file written by `save_checkpoint`: the model's
state tensors (compressed ones encoded by zoo.compress.serialize) plus string metadata in the header:
`zoo.spec` (registry name, resolved kwargs, compression steps), optionally `zoo.classes`, `zoo.mean`,
`zoo.std` and any JSON extras; `save_checkpoint(..., format="deep")` writes the Deep Compression file
of zoo.compress.deepfile instead (one payload tensor with sparse, Huffman-coded shared weights; the
layout and a sha256 in the header), which the same functions read back. `read_checkpoint` checks a
file without reading its tensors (a `Checkpoint`); `load_checkpoint` rebuilds its model (registry, then
the compression steps) and loads the tensors. Every loader of zoo (`zoo.create(weights=)`,
`zoo.compress.load`, the recipe engine, predict, export, finetune, distill) goes through these two functions.

Only safetensors is accepted. Pickle-based files (torch.save's .pt/.pth/.bin, zip or raw pickle) are
refused, because unpickling runs arbitrary code. Imports point down only: the registry, zoo.compress
(codec and step replay) and zoo.io (file utilities); tags and the index live above, in zoo.weights.loading.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn
from safetensors.torch import save

from zoo._registry import COMMON_ARGS, MAX_NUM_CLASSES, create, meta_model, model_card, resolve_kwargs
from zoo.compress import deepfile
from zoo.compress._common import is_quantized_model, steps
from zoo.compress.serialize import build_from_spec, encode_state, is_compressed, params_budget
from zoo.errors import ZooError
from zoo.io import atomic_save, check_out_file
from zoo.spec import attach_spec, model_name, require_spec, spec_of
from zoo.untrusted import (
    NONFINITE_HINT, check_file, check_finite, check_flag, check_spec, clip, load_tensors, read_header, short_repr,
)

MAX_IN_CHANS = int(COMMON_ARGS["in_chans"].max or 64)

HEAD_KEYS_SHOWN = 3  # how many keys of each kind an error message lists
MAX_CLASS_NAME = 256  # characters of one class name in a header
FORMATS = ("safetensors", "deep")  # save_checkpoint's file formats


@dataclass
class Checkpoint:
    """A checked safetensors checkpoint: its path, zoo spec and header metadata (tensors not loaded)."""

    path: Path
    spec: dict[str, Any] | None  # {"name", "kwargs", optional "compression"}; None for another project's file
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
    if "deep" in meta:  # a Deep Compression file: the shapes its payload decodes to
        if not isinstance(meta.get("sha256"), str):
            raise ZooError(f"{where}: deep-compression header has no zoo.sha256 checksum")
        shapes = deepfile.layout_shapes(meta["deep"], shapes.get(deepfile.PAYLOAD), where)
    return Checkpoint(path=p, spec=spec, metadata=meta, shapes=shapes, allow_nonfinite=allow_nonfinite)


def load_checkpoint_tensors(ckpt: Checkpoint) -> dict[str, torch.Tensor]:
    """All tensors of a checked checkpoint, on the CPU (NaN/inf refused unless the checkpoint allows them).

    A Deep Compression file's payload is checked against its sha256, then decoded."""
    if "deep" not in ckpt.metadata:
        return load_tensors(ckpt.path, allow_nonfinite=ckpt.allow_nonfinite)
    where = f"weights file {str(ckpt.path)!r}"
    payload = load_tensors(ckpt.path)[deepfile.PAYLOAD].numpy().tobytes()
    header = {k: v for k, v in ckpt.metadata.items() if k != "sha256"}
    if ckpt.spec is not None:
        header["spec"] = ckpt.spec
    digest = deepfile.checksum(header, payload)
    if digest != ckpt.metadata["sha256"]:
        raise ZooError(f"{where}: checksum mismatch: the header and payload hash to sha256 {digest}, the header's "
                       f"zoo.sha256 says {short_repr(ckpt.metadata['sha256'])}; the file is corrupt")
    tensors = deepfile.decode(ckpt.metadata["deep"], payload, where)
    check_finite(tensors, where, ckpt.allow_nonfinite)
    return tensors


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
    spec = spec_of(model)
    target = describe_spec(model_name(model), spec.kwargs if spec is not None else {})
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


# header entries save_checkpoint writes from its arguments (and, for format="deep", the layout and checksum)
RESERVED_KEYS = ("spec", "classes", "mean", "std", "deep", "sha256")


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The JSON-able `zoo.spec` of a model built by `zoo.create`: name, kwargs and compression steps."""
    return require_spec(model, "save").header()


def state_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors a checkpoint stores: contiguous, de-aliased CPU tensors (compressed state encoded)."""
    if is_compressed(model):
        return encode_state(model)
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor):
            continue
        ptr = v.data_ptr() if v.numel() else None
        if ptr is not None and ptr in seen:  # shared storage: safetensors refuses aliases
            v = v.clone()
        if ptr is not None:
            seen.add(ptr)
        out[k] = v.detach().contiguous().cpu()
    return out


def serialized_size(model: nn.Module) -> int:
    """Bytes of the model's tensors as a checkpoint stores them (safetensors header of the tensors included)."""
    return len(save(state_tensors(model)))


def _header(model: nn.Module, classes: Sequence[str] | None, mean: Sequence[float] | None,
            std: Sequence[float] | None, extra: dict[str, Any] | None) -> dict[str, str]:
    """The zoo.* header entries of a checkpoint, each checked against the model."""
    kwargs = require_spec(model, "save_checkpoint").kwargs
    clash = sorted(set(extra or {}) & set(RESERVED_KEYS))
    if clash:
        raise ZooError(f"save_checkpoint: extra key {clash[0]!r} is not allowed; pass classes=, mean= and std= "
                       f"as arguments (reserved: {', '.join(RESERVED_KEYS)})")
    meta: dict[str, Any] = {"spec": model_spec(model), **(extra or {})}
    if classes is not None:
        classes = [str(c) for c in classes]
        if len(classes) != kwargs["num_classes"]:
            raise ZooError(f"save_checkpoint: {len(classes)} class names given for a model with "
                           f"num_classes={kwargs['num_classes']}")
        meta["classes"] = classes
    for key, val in (("mean", mean), ("std", std)):
        if val is None:
            continue
        vals = [float(v) for v in val]
        if len(vals) != kwargs["in_chans"]:
            raise ZooError(f"save_checkpoint: {key} has {len(vals)} values for a model with "
                           f"in_chans={kwargs['in_chans']}")
        if key == "std" and any(v <= 0 for v in vals):
            raise ZooError(f"save_checkpoint: std={vals} must be positive")
        meta[key] = vals
    return {f"zoo.{k}": json.dumps(v) for k, v in meta.items()}


def save_checkpoint(model: nn.Module, path: str | os.PathLike, classes: Sequence[str] | None = None,
                    mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                    extra: dict[str, Any] | None = None, format: str = "safetensors") -> Path:
    """Write a checkpoint atomically: tensors, spec, class names, input normalisation and JSON extras.

    `format="deep"`: the Deep Compression file of zoo.compress.deepfile (shared weights stored sparse and
    Huffman-coded, every other tensor raw, one payload tensor; the layout and a sha256 in the header)."""
    p = check_out_file(path, "save_checkpoint: path")
    if not isinstance(format, str) or format not in FORMATS:
        raise ZooError(f"save_checkpoint: format={short_repr(format)} is not allowed; allowed: {', '.join(FORMATS)}")
    header = _header(model, classes, mean, std, extra)
    tensors = state_tensors(model)
    if format == "deep":
        payload, layout = deepfile.encode(model, tensors)
        parsed = {k[len("zoo."):]: json.loads(v) for k, v in header.items()}
        parsed["deep"] = layout
        header = {f"zoo.{k}": json.dumps(v, separators=(",", ":")) for k, v in parsed.items()}
        header["zoo.sha256"] = json.dumps(deepfile.checksum(parsed, payload))
        data = torch.frombuffer(bytearray(payload), dtype=torch.uint8) if payload else torch.zeros(0, dtype=torch.uint8)
        tensors = {deepfile.PAYLOAD: data}
    atomic_save(tensors, p, header)
    return p


def _annotate(model: nn.Module, ckpt: Checkpoint, provenance: dict[str, Any] | None, reinit_head: bool) -> nn.Module:
    """Record the header's classes and normalisation in the model's spec, and where the weights came from."""
    spec = attach_spec(model)
    spec.mean, spec.std = ckpt.metadata.get("mean"), ckpt.metadata.get("std")
    spec.classes = None if reinit_head else ckpt.metadata.get("classes")
    spec.provenance = {"file": str(ckpt.path), **(provenance or {}), "head_reinitialised": reinit_head}
    return model


def _jsonable(kwargs: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(kwargs))


def _saved_kwargs(ckpt: Checkpoint, name: str) -> dict[str, Any]:
    """The checkpoint's kwargs when it was saved for `name` (checked against the registry), else {}."""
    spec = ckpt.spec
    saved = dict(spec.get("kwargs", {})) if spec is not None and spec["name"] == name else {}
    if saved:
        try:
            resolve_kwargs(name, **saved)
        except ZooError as e:
            raise ZooError(f"weights {str(ckpt.path)!r}: the saved kwargs no longer fit {name}: {e}") from None
    return saved


def _load_compressed(ckpt: Checkpoint) -> nn.Module:
    """The smaller / int8 model a compressed checkpoint describes, with its weights; int8 models in eval mode."""
    budget = deepfile.params_budget(ckpt.path) if "deep" in ckpt.metadata else params_budget(ckpt.path)
    model = build_from_spec(ckpt.spec, max_params=budget)
    check_classes(ckpt, (ckpt.spec.get("kwargs") or {}).get("num_classes"))
    load_into(model, ckpt)
    pending_qat = any(s.get("method") == "qat" and not s.get("converted") for s in steps(model))
    if is_quantized_model(model) and not pending_qat:  # converted int8 models are inference-only
        model.eval()
    return model


def load_checkpoint(source: str | os.PathLike | Checkpoint, name: str | None = None,
                    kwargs: dict[str, Any] | None = None, reinit_head: bool = False, allow_nonfinite: bool = False,
                    provenance: dict[str, Any] | None = None) -> nn.Module:
    """Rebuild a checkpoint's model and load its weights: the one loader of zoo checkpoints.

    `name` and `kwargs` (given by the caller) override the header's spec; `reinit_head=True` keeps a fresh
    classifier. The spec is checked against the file on the meta device before anything is allocated.
    """
    check_flag("reinit_head", reinit_head)
    ckpt = source if isinstance(source, Checkpoint) else read_checkpoint(source, allow_nonfinite=allow_nonfinite)
    kwargs = dict(kwargs or {})
    spec = ckpt.spec
    if name is None:
        if spec is None:
            raise ZooError(f"{str(ckpt.path)!r} has no zoo.spec header, so the model name must be given; save "
                           "checkpoints with zoo.weights.save_checkpoint")
        name = spec["name"]
    model_card(name)  # unknown model name -> ZooError with suggestions
    saved = _saved_kwargs(ckpt, name)
    user = resolve_kwargs(name, **kwargs)  # validates what the caller gave
    user = {k: user[k] for k in kwargs}
    n_saved, n_user = saved.get("num_classes"), user.get("num_classes")
    if n_saved is not None and n_user is not None and n_saved != n_user and not reinit_head:
        raise ZooError(f"{name}: num_classes={n_user} differs from the {n_saved} classes of the weights "
                       f"{str(ckpt.path)!r}; pass reinit_head=True to load them with a freshly initialised head, "
                       f"or leave num_classes out to keep the checkpoint's classes")
    if spec is not None and spec.get("compression"):
        if reinit_head or spec["name"] != name or any(_jsonable({k: v})[k] != saved.get(k) for k, v in user.items()):
            raise ZooError(f"weights {str(ckpt.path)!r} hold a compressed {describe_spec(spec['name'], saved)}; "
                           f"load it with its own kwargs and without reinit_head")
        return _annotate(_load_compressed(ckpt), ckpt, provenance, False)
    merged = {**saved, **user}
    meta = meta_model(name, **merged)
    skip = classifier_prefix(meta) if reinit_head else None
    check_fits({k: tuple(v.shape) for k, v in meta.state_dict().items()}, ckpt,
               describe_spec(name, meta.spec.kwargs), skip)
    if not reinit_head:
        check_classes(ckpt, meta.spec.kwargs["num_classes"])
    model = create(name, **merged)
    if reinit_head and (n_user is None or n_user == n_saved) and hasattr(model, "reset_classifier"):
        model.reset_classifier(model.spec.kwargs["num_classes"])  # asked for a fresh head with the same classes
    load_into(model, ckpt, skip_prefix=classifier_prefix(model) if reinit_head else None)
    return _annotate(model, ckpt, provenance, reinit_head)


def load_weights(model: nn.Module, weights: str | os.PathLike, reinit_head: bool = False,
                 allow_nonfinite: bool = False) -> nn.Module:
    """Load a checkpoint's tensors into an existing model in place (tensors must fit exactly)."""
    check_flag("reinit_head", reinit_head)
    ckpt = read_checkpoint(weights, allow_nonfinite=allow_nonfinite)
    load_into(model, ckpt, skip_prefix=classifier_prefix(model) if reinit_head else None)
    return _annotate(model, ckpt, None, reinit_head)
