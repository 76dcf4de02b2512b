"""Fixed activation grids: layer outputs rounded to recorded affine uint8 grids, as integer-only kernels
store them (Jacob et al. 2018, "Quantization and Training of Neural Networks for Efficient
Integer-Arithmetic-Only Inference", arXiv:1712.05877, eq. 1: r = S (q - Z)).

A model imported from a uint8 TFLite file computes in float32 on the dequantized weights, while the
interpreter rounds every layer output to that layer's (scale S, zero point Z) grid. `fix_activation_grids`
makes the float model do the same rounding, so it reproduces the file's arithmetic up to the
interpreter's fixed-point requantization:

    model = fix_activation_grids(model, {"stem": (0.0235, 0), "blocks.0.dw": (0.0235, 0)})   # name -> (S, Z)

Each grid is a forward hook on the named module. The grids are recorded as a compression step
(`{"kind": "actgrid", "modules": {name: [S, Z]}, "qmin": 0, "qmax": 255}`), so a saved model reloads
with them. Rounding is half away from zero, as TFLite's; in training the gradient passes straight
through (Bengio et al. 2013), so the model can be fine-tuned under the file's grid.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import torch
import torch.nn as nn

from zoo.compress._common import add_step, check_model, steps
from zoo.errors import ZooError
from zoo.untrusted import short_repr

UINT8 = (0, 255)  # the integer range of uint8 activations


class GridHook:
    """Forward hook: round a module's float output to the grid S * (q - Z), q integer in [qmin, qmax]."""

    def __init__(self, scale: float, zero_point: int, qmin: int, qmax: int) -> None:
        self.scale, self.zero_point, self.qmin, self.qmax = scale, zero_point, qmin, qmax

    def __call__(self, module: nn.Module, inputs: tuple, y: torch.Tensor) -> torch.Tensor:
        if not isinstance(y, torch.Tensor) or not y.is_floating_point():
            raise ZooError(f"actgrid: {type(module).__name__} returned {type(y).__name__}"
                           f"{'' if not isinstance(y, torch.Tensor) else ' of ' + str(y.dtype)}; a fixed activation "
                           "grid rounds float tensors only")
        t = y / self.scale
        q = torch.clamp(torch.sign(t) * torch.floor(t.abs() + 0.5) + self.zero_point, self.qmin, self.qmax)
        out = (q - self.zero_point) * self.scale  # on the grid, bit for bit, in eval
        if torch.is_grad_enabled() and y.requires_grad:
            return y + (out - y).detach()  # straight-through estimator
        return out


def _check_grid(who: str, name: str, grid: Any, qmin: int, qmax: int) -> tuple[float, int]:
    ok = isinstance(grid, (tuple, list)) and len(grid) == 2
    s, z = (grid[0], grid[1]) if ok else (None, None)
    ok = ok and isinstance(s, (int, float)) and not isinstance(s, bool) and math.isfinite(s) and s > 0
    ok = ok and isinstance(z, int) and not isinstance(z, bool) and qmin <= z <= qmax
    if not ok:
        raise ZooError(f"{who}: the grid of {short_repr(name)} is {short_repr(grid)}; expected (scale, "
                       f"zero_point) with a finite scale > 0 and an int zero_point in {qmin}..{qmax}")
    return float(s), int(z)


def _install(who: str, model: nn.Module, grids: Mapping[str, Any], qmin: int, qmax: int) -> dict[str, list]:
    """Register one GridHook per named module; return the checked grids as the step records them."""
    modules = dict(model.named_modules())
    checked: dict[str, list] = {}
    for name, grid in grids.items():
        if not isinstance(name, str) or name not in modules or name == "":
            raise ZooError(f"{who}: {short_repr(name)} is not a submodule of "
                           f"{type(model).__name__}; expected a name from model.named_modules()")
        checked[name] = list(_check_grid(who, name, grid, qmin, qmax))
    for name, (s, z) in checked.items():
        modules[name].register_forward_hook(GridHook(s, z, qmin, qmax))
    return checked


def fix_activation_grids(model: nn.Module, grids: Mapping[str, Any], qmin: int = UINT8[0],
                         qmax: int = UINT8[1]) -> nn.Module:
    """Round each named module's output to its (scale, zero_point) grid in [qmin, qmax], in place; recorded."""
    check_model("fix_activation_grids", model)
    if not isinstance(grids, Mapping) or not grids:
        raise ZooError(f"fix_activation_grids: grids={short_repr(grids)} is not allowed; expected a non-empty "
                       "mapping of module name -> (scale, zero_point)")
    for k, v in (("qmin", qmin), ("qmax", qmax)):
        if not isinstance(v, int) or isinstance(v, bool):
            raise ZooError(f"fix_activation_grids: {k}={v!r} is not allowed; expected an int")
    if not qmin < qmax:
        raise ZooError(f"fix_activation_grids: qmin={qmin} must be below qmax={qmax}")
    if any(s.get("kind") in ("actgrid", "int8") for s in steps(model)):
        raise ZooError("fix_activation_grids: the model already has fixed activation grids or int8 layers")
    checked = _install("fix_activation_grids", model, grids, qmin, qmax)
    add_step(model, {"kind": "actgrid", "modules": checked, "qmin": qmin, "qmax": qmax})
    return model


def rebuild(model: nn.Module, step: dict[str, Any]) -> None:
    """Re-register the hooks of a recorded actgrid step (zoo.compress.serialize replays it on load)."""
    qmin, qmax = step.get("qmin", UINT8[0]), step.get("qmax", UINT8[1])
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (qmin, qmax)) or not qmin < qmax:
        raise ZooError(f"spec: actgrid step has qmin={short_repr(qmin)}, qmax={short_repr(qmax)}; expected ints "
                       "with qmin < qmax")
    _install("spec: actgrid step", model, step["modules"], qmin, qmax)
