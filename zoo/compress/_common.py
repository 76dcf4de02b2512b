"""Shared helpers of zoo.compress: argument checks, data batches, module paths and the spec steps.

A compressed model records what was done to it in its spec's `compression` (zoo.spec), a list of
JSON-able steps applied in order (channel surgery, weight masks, low-rank factorisation, weight quantisation, int8
conversion). `zoo.weights.checkpoint.model_spec` writes that list into the checkpoint header, and
`zoo.compress.serialize.build_from_spec` replays the structural part of each step on a fresh model.
"""

from __future__ import annotations

import copy
import warnings
from contextlib import contextmanager
from typing import Any, Iterable, Iterator

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from zoo.errors import ZooError
from zoo.spec import attach_spec, smallest_input_size, spec_of

WEIGHT_LAYERS = (nn.Conv2d, nn.Linear)


def check_choice(func: str, name: str, value: Any, allowed: Iterable[Any]) -> Any:
    """Return value if it is one of `allowed`, else raise ZooError naming the value and the choices."""
    allowed = tuple(allowed)
    if not isinstance(value, str) or value not in allowed:
        raise ZooError(f"{func}: {name}={value!r} is not supported; allowed: " + ", ".join(repr(a) for a in allowed))
    return value


def check_amount(func: str, amount: Any) -> float:
    """A pruning fraction strictly between 0 and 1."""
    ok = isinstance(amount, (int, float)) and not isinstance(amount, bool) and 0.0 < float(amount) < 1.0
    if not ok:
        raise ZooError(f"{func}: amount={amount!r} is not allowed; expected a float strictly between 0 and 1")
    return float(amount)


def check_model(func: str, model: Any) -> nn.Module:
    """Raise ZooError unless `model` is an nn.Module."""
    if not isinstance(model, nn.Module):
        raise ZooError(f"{func}: expected an nn.Module, got {type(model).__name__}")
    return model


def steps(model: nn.Module) -> list[dict[str, Any]]:
    """The compression steps recorded in the model's spec (empty list if none)."""
    spec = spec_of(model)
    return list(spec.compression) if spec is not None else []


def set_steps(model: nn.Module, new: list[dict[str, Any]]) -> None:
    """Replace the model's recorded compression steps (a fresh list, never shared with a copy)."""
    attach_spec(model).compression = list(new)


def add_step(model: nn.Module, step: dict[str, Any]) -> None:
    """Append a step to the model's recorded compression steps."""
    set_steps(model, steps(model) + [step])


def copy_model(model: nn.Module, inplace: bool) -> nn.Module:
    """The model itself (inplace) or a deep copy that keeps its spec (a GraphModule's deepcopy drops it)."""
    if inplace:
        return model
    out = copy.deepcopy(model)
    if spec_of(model) is not None:
        out.spec = copy.deepcopy(spec_of(model))
    return out


def get_module(model: nn.Module, path: str) -> nn.Module:
    """Submodule by dotted path ('' is the model)."""
    return model.get_submodule(path) if path else model


def set_module(model: nn.Module, path: str, new: nn.Module) -> None:
    """Replace the submodule at a dotted path."""
    parent, _, name = path.rpartition(".")
    setattr(get_module(model, parent), name, new)


def is_quantized_model(model: nn.Module) -> bool:
    """True if the model holds int8-converted or observer/fake-quant-prepared modules."""
    from torch.ao.nn.quantized import FloatFunctional
    from torch.ao.quantization import FakeQuantizeBase, ObserverBase

    for m in model.modules():
        if isinstance(m, (ObserverBase, FakeQuantizeBase)):
            return True
        if isinstance(m, FloatFunctional):  # the float add/cat helper of the zoo blocks
            continue
        mod = type(m).__module__
        if mod.startswith(("torch.ao.nn.quantized", "torch.ao.nn.intrinsic.quantized", "torch.ao.nn.qat",
                           "torch.ao.nn.intrinsic.qat")):
            return True
    return False


def has_parametrizations(model: nn.Module) -> bool:
    """True if any module has a torch parametrization (masks or weight quantizers)."""
    return any(parametrize.is_parametrized(m) for m in model.modules())


def weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of every Conv2d and Linear, in forward (call) order when it can be traced."""
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]
    order = call_order(model, [m for _, m in layers])
    if order is not None:
        rank = {id(m): i for i, m in enumerate(order)}
        layers.sort(key=lambda nm: rank.get(id(nm[1]), len(rank)))
    return layers


def call_order(model: nn.Module, modules: list[nn.Module]) -> list[nn.Module] | None:
    """The given modules in the order a forward pass calls them (None if the input size is unknown)."""
    size = smallest_input_size(model)
    if size is None:
        return None
    seen: list[nn.Module] = []
    ids: set[int] = set()

    def hook(mod: nn.Module, _inp: Any) -> None:
        """Record the first call of each module."""
        if id(mod) not in ids:
            ids.add(id(mod))
            seen.append(mod)

    handles = [m.register_forward_pre_hook(hook) for m in modules]
    try:
        with eval_mode(model), torch.no_grad():
            model(torch.zeros(1, *size, device=device_of(model)))
    finally:
        for h in handles:
            h.remove()
    return seen


def resolve_protect(model: nn.Module, protect: Iterable[str]) -> set[str]:
    """Module paths named by `protect`: 'first' / 'last' are the first and last conv/linear layers."""
    if isinstance(protect, str):
        protect = (protect,)
    layers = weight_layers(model)
    names = {n for n, _ in layers}
    out: set[str] = set()
    for p in protect:
        if p == "first" and layers:
            out.add(layers[0][0])
        elif p == "last" and layers:
            out.add(layers[-1][0])
        elif p in names:
            out.add(p)
        else:
            raise ZooError(f"protect: {p!r} is not 'first', 'last' or the path of a conv/linear layer of this model")
    return out


def device_of(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU if it has none)."""
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put the model in eval mode, then restore every module's own training flag."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, f in flags:
            m.training = f


@contextmanager
def quiet() -> Iterator[None]:
    """Silence torch.ao's deprecation and observer warnings inside zoo's own calls."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def example_input(model: nn.Module, example_inputs: torch.Tensor | None, func: str,
                  smallest: bool = True) -> torch.Tensor:
    """A batch-1 input to trace the model with: `example_inputs[:1]`, else zeros of the smallest
    input the model accepts (`smallest`) or of its default input size."""
    if example_inputs is not None:
        if not isinstance(example_inputs, torch.Tensor) or example_inputs.dim() < 2:
            raise ZooError(f"{func}: example_inputs must be a batched tensor, got {type(example_inputs).__name__}")
        return example_inputs[:1].to(device_of(model))
    spec = spec_of(model)
    size = smallest_input_size(model) if smallest else (spec.input_size if spec is not None else None)
    if size is None:
        raise ZooError(f"{func}: the model was not built by zoo.create, so pass example_inputs (a batch tensor)")
    return torch.zeros(1, *size, device=device_of(model))


def split_batch(batch: Any, func: str, need_target: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(inputs, targets) from a batch that is a tensor or an (input, target, ...) pair."""
    if isinstance(batch, torch.Tensor):
        if need_target:
            raise ZooError(f"{func}: this needs (input, target) batches, got bare input tensors")
        return batch, None
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        y = batch[1] if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        if need_target and y is None:
            raise ZooError(f"{func}: this needs (input, target) batches; a batch had no target tensor")
        return batch[0], y
    raise ZooError(f"{func}: a batch must be a tensor or an (input, target) pair, got {type(batch).__name__}")


def batches(data: Any, func: str, need_target: bool, max_batches: int | None = None
            ) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Materialise up to `max_batches` batches of `data` (any iterable, e.g. a DataLoader)."""
    if data is None:
        raise ZooError(f"{func}: this needs data (an iterable of input batches or (input, target) pairs)")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int)
                                    or max_batches < 1):
        raise ZooError(f"{func}: max_batches={max_batches!r} is not allowed; expected None or an int >= 1")
    if isinstance(data, torch.Tensor) or (isinstance(data, (tuple, list)) and data
                                          and isinstance(data[0], torch.Tensor) and data[0].dim() >= 2
                                          and len(data) == 2 and data[1].dim() == 1):
        data = [data]  # a single batch given directly
    try:
        it = iter(data)
    except TypeError:
        raise ZooError(f"{func}: data must be an iterable of batches, got {type(data).__name__}") from None
    out = []
    for b in it:
        if max_batches is not None and len(out) >= max_batches:
            break
        out.append(split_batch(b, func, need_target))
    if not out:
        raise ZooError(f"{func}: the data iterable gave no batches")
    return out
