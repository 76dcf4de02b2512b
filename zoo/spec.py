"""The declared spec of a model: what it is, the input it takes, what its outputs mean, what was done to it.

`zoo.create` attaches a `ModelSpec` to every model it builds, as `model.spec` (declared on
`zoo.layers.ZooModel`; zoo.compress.pt2e copies it onto the int8 graphs it makes). Every other
module reads a model's name, kwargs, default input size, class names, normalisation and compression
history from there, through the helpers below, and nowhere else.

Models zoo did not build (a torchvision model passed to `zoo.compress.prune` or `zoo.profile`) have no
spec: `spec_of` returns None and callers pass input sizes explicitly. Compressing one (or loading
weights into it) attaches an unregistered spec (name None) that records the steps (or the header's
classes); such a model cannot be saved as a checkpoint, since nothing could rebuild it.

This module imports no zoo module but zoo.errors and zoo.untrusted, so every layer may use it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch.nn as nn

from zoo.errors import ZooError
from zoo.untrusted import short_repr

InputSize = tuple[int, int, int]  # (C, H, W)


@dataclass
class ModelSpec:
    """Name and resolved kwargs of a registered model, its default input, outputs and compression history."""

    name: str | None  # registry name; None for a model zoo did not build (only compression is recorded)
    kwargs: dict[str, Any] = field(default_factory=dict)  # every kwarg of the entry point, defaults filled in
    input_size: InputSize | None = None  # default (C, H, W) input
    classes: list[str] | None = None  # one name per output, when known (from a checkpoint header)
    mean: list[float] | None = None  # input normalisation the weights were trained with, one per channel
    std: list[float] | None = None
    compression: list[dict[str, Any]] = field(default_factory=list)  # JSON-able steps, in the order applied
    provenance: dict[str, Any] = field(default_factory=dict)  # where the weights came from: file, tag, sha256, ...

    def header(self) -> dict[str, Any]:
        """The `zoo.spec` JSON of a checkpoint header: name, kwargs and (if any) the compression steps."""
        if self.name is None:
            raise ZooError("the model was not built by zoo.create, so it has no architecture spec to save")
        out: dict[str, Any] = {"name": self.name, "kwargs": dict(self.kwargs)}
        if self.compression:
            out["compression"] = list(self.compression)
        return out


def spec_of(model: nn.Module) -> ModelSpec | None:
    """The model's spec, or None for a model zoo did not build."""
    spec = model.__dict__.get("spec")
    return spec if isinstance(spec, ModelSpec) else None


def require_spec(model: nn.Module, what: str) -> ModelSpec:
    """The spec of a model built by zoo.create; ZooError naming `what` needed it otherwise."""
    spec = spec_of(model)
    if spec is None or spec.name is None:
        raise ZooError(f"{what}: {type(model).__name__} was not built by zoo.create, so it has no model spec "
                       "(name, kwargs, input size)")
    return spec


def attach_spec(model: nn.Module) -> ModelSpec:
    """The model's spec; an unregistered one (name None) is attached to a model zoo did not build."""
    spec = spec_of(model)
    if spec is None:
        spec = ModelSpec(name=None)
        model.spec = spec
    return spec


def model_name(model: nn.Module) -> str:
    """The registry name of a zoo model, else its class name (for messages)."""
    spec = spec_of(model)
    return spec.name if spec is not None and spec.name is not None else type(model).__name__


def _sides(model: nn.Module) -> tuple[int | None, int]:
    """(the one input side the model accepts or None, the smallest side it accepts) from zoo.layers.ZooModel."""
    fixed = model.__dict__.get("fixed_input_size")
    smallest = model.__dict__.get("min_input_size")
    return fixed, (smallest if isinstance(smallest, int) else 1)


def input_size(model: nn.Module, size: int | Sequence[int] | None = None, what: str = "input_size") -> InputSize:
    """(C, H, W) to run the model at: `size` (a side, or (C, H, W)) checked against the model, else its default.

    A side takes the channel count from the model's spec. Models zoo did not build need `size` as (C, H, W).
    """
    spec, given = spec_of(model), size
    if size is None:
        if spec is None or spec.input_size is None:
            raise ZooError(f"{what}: {type(model).__name__} was not built by zoo.create, so it has no default input "
                           "size; pass (C, H, W)")
        return tuple(spec.input_size)
    if isinstance(size, int) and not isinstance(size, bool):
        chans = spec.input_size[0] if spec is not None and spec.input_size is not None else None
        if chans is None:
            raise ZooError(f"{what}={size!r} gives no channel count for {type(model).__name__}; pass (C, H, W)")
        size = (chans, size, size)
    if not (isinstance(size, (tuple, list)) and len(size) == 3
            and all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size)):
        raise ZooError(f"{what}={short_repr(given)} is not allowed; expected a side (int) or (C, H, W) positive ints")
    size = tuple(size)
    fixed, smallest = _sides(model)
    if fixed is not None and size[1:] != (fixed, fixed):
        raise ZooError(f"{what}={given!r} is not allowed; this model needs exactly {fixed}x{fixed} inputs")
    if min(size[1:]) < smallest:
        raise ZooError(f"{what}={given!r} is not allowed; this model needs sides >= {smallest}")
    if spec is not None and spec.input_size is not None and size[0] != spec.input_size[0]:
        raise ZooError(f"{what}={given!r} is not allowed; this model takes {spec.input_size[0]} input channels")
    return size


def smallest_input_size(model: nn.Module) -> InputSize | None:
    """The smallest (C, H, W) a zoo model accepts (cheapest to trace); its default input for other models with
    a spec; None without a spec."""
    spec = spec_of(model)
    if spec is None or spec.input_size is None:
        return None
    if "min_input_size" not in model.__dict__:
        return tuple(spec.input_size)
    fixed, smallest = _sides(model)
    side = fixed or smallest
    return (spec.input_size[0], side, side)
