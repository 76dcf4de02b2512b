"""The model registry: entry points, model cards kept as data, and validation of `create` kwargs.

Modelled on the torchvision `models/_api.py` idea (a small registry that rejects duplicate names,
fnmatch listing, metadata as data). Every entry point declares the keyword arguments it accepts
with their types and ranges, so a bad value fails at `create` with one clear message; the Arg holds
the only default of each kwarg (entry points take every kwarg, keyword-only, without defaults).

The registry only builds: `create` stamps a `zoo.spec.ModelSpec` on the model and nothing else.
`create(name, weights=...)` is delegated to a loader that `zoo/__init__.py` installs at package init
(`install_weights_loader(zoo.weights.create_pretrained)`), so the registry never imports the weights
package above it: every import points down to the registry.
"""

from __future__ import annotations

import difflib
import fnmatch
import importlib
import inspect
import math
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
import torch.nn as nn

from zoo.errors import ZooError
from zoo.spec import ModelSpec
from zoo.untrusted import short_repr

# Modules that define model families. They are imported explicitly (not via star-import side effects)
# the first time the registry is queried.
FAMILY_MODULES: tuple[str, ...] = (
    "zoo.models.mobilenet_v1",
    "zoo.models.mobilenet_v2",
    "zoo.models.squeezenet",
    "zoo.models.shufflenet_v1",
    "zoo.models.shufflenet_v2",
    "zoo.models.resnet",
    "zoo.models.lenet",
)
# Bounds that hold for every model, so that no kwargs (e.g. from a crafted checkpoint header) can make
# `create` allocate more than a few GB: class count, tuple kwargs (layer widths) and their length.
MAX_NUM_CLASSES = 100_000
MAX_TUPLE_VALUE = 16_384
MAX_TUPLE_LEN = 16
MAX_NAME_LEN = 64  # longer model names are not registered; they get no "did you mean"
MAX_PARAMS = 1_000_000_000  # parameters of a model rebuilt from a file (checked on the meta device first)


@dataclass(frozen=True)
class Arg:
    """One keyword argument accepted by a model entry point, with its type and allowed range."""

    type: type  # int, float, str, bool or tuple
    default: Any
    choices: tuple | None = None  # allowed values, if the set is finite
    min: float | None = None  # lower bound (inclusive unless min_exclusive)
    max: float | None = None  # upper bound (inclusive)
    min_exclusive: bool = False
    doc: str = ""

    def describe(self) -> str:
        """Human-readable description of the allowed values."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        tname = {int: "int", float: "float", str: "str", bool: "bool", tuple: "tuple of ints"}[self.type]
        parts = []
        if self.min is not None:
            parts.append(f"{'>' if self.min_exclusive else '>='} {self.min:g}")
        if self.max is not None:
            parts.append(f"<= {self.max:g}")
        return tname + (" " + " and ".join(parts) if parts else "")

    def validate(self, model: str, name: str, value: Any) -> Any:
        """Return the value converted to the declared type, or raise ZooError naming the problem."""
        bad = ZooError(f"{model}: {name}={short_repr(value)} is not allowed; expected {self.describe()}")
        if self.type is tuple:
            if isinstance(value, (int,)) and not isinstance(value, bool):
                value = (value,)
            hi = int(self.max) if self.max is not None else MAX_TUPLE_VALUE
            if not isinstance(value, (tuple, list)) or len(value) > MAX_TUPLE_LEN or not all(
                isinstance(v, int) and not isinstance(v, bool) and 0 < v <= hi for v in value
            ):
                raise ZooError(f"{model}: {name}={short_repr(value)} is not allowed; expected a tuple of at most "
                               f"{MAX_TUPLE_LEN} ints from 1 to {hi}")
            return tuple(value)
        if self.type is bool:
            if not isinstance(value, bool):
                raise bad
            return value
        if self.type is str:
            if not isinstance(value, str):
                raise bad
        elif self.type is int:
            if isinstance(value, bool) or not isinstance(value, int):
                if isinstance(value, float) and value.is_integer():
                    value = int(value)
                else:
                    raise bad
        elif self.type is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise bad
            value = float(value)
            if not math.isfinite(value):
                raise bad
        if self.choices is not None:
            if value not in self.choices:
                raise ZooError(
                    f"{model}: {name}={short_repr(value)} is not supported; allowed: "
                    + ", ".join(repr(c) for c in self.choices)
                )
            return value
        if self.min is not None and (value <= self.min if self.min_exclusive else value < self.min):
            if name == "resolution":
                raise ZooError(f"{model}: resolution={value} is below the minimum {self.min:g} for this model")
            raise bad
        if self.max is not None and value > self.max:
            raise bad
        return value


@dataclass(frozen=True)
class Reference:
    """A reference number from the paper (or torchvision) for one configuration of a model."""

    kwargs: dict  # the configuration, e.g. {"width": 0.5}
    source: str  # where the number comes from, e.g. "Howard et al. 2017, Table 6"
    params: int | None = None  # reference parameter count (1000 classes, 3 channels unless kwargs say otherwise)
    params_tol: int = 0  # absolute tolerance on params
    macs: int | None = None  # reference multiply-accumulates at the default input size
    macs_rtol: float = 0.01  # relative tolerance on MACs
    label: str = ""  # row label in `zoo tables`; defaults to the kwargs


@dataclass(frozen=True)
class ModelCard:
    """Everything zoo knows about a registered model, kept as data."""

    name: str
    family: str
    paper: str
    url: str
    args: dict[str, Arg]  # accepted kwargs (model-specific ones; num_classes and in_chans are added)
    references: tuple[Reference, ...] = ()
    default_resolution: int = 224  # input side when the model has no `resolution` kwarg
    min_resolution: int = 32  # smallest input side the network accepts
    fixed_resolution: bool = False  # True for MLP/LeNet heads that need exactly one input size
    # (kwarg, value, side): the default input side when that kwarg has that value, e.g. ("stem", "cifar", 32);
    # it replaces default_resolution, and the `resolution` kwarg's default when the caller gives none
    resolution_by: tuple[tuple[str, Any, int], ...] = ()
    description: str = ""

    def resolution_for(self, kwargs: dict) -> int | None:
        """The default input side the first matching `resolution_by` entry gives these kwargs, or None."""
        return next((side for key, value, side in self.resolution_by if kwargs.get(key) == value), None)

    def input_size(self, kwargs: dict) -> tuple[int, int, int]:
        """Default (C, H, W) input size for the given resolved kwargs."""
        res = kwargs.get("resolution") or self.resolution_for(kwargs) or self.default_resolution
        return (kwargs.get("in_chans", 3), res, res)


COMMON_ARGS: dict[str, Arg] = {
    "num_classes": Arg(int, 1000, min=1, max=MAX_NUM_CLASSES, doc="number of output classes"),
    "in_chans": Arg(int, 3, min=1, max=64, doc="number of input channels"),
}


@dataclass
class _Entry:
    fn: Callable[..., nn.Module]
    card: ModelCard
    all_args: dict[str, Arg] = field(default_factory=dict)


_REGISTRY: dict[str, _Entry] = {}
_loaded = False


def register_model(card: ModelCard) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering an entry point under `card.name`; a duplicate name is an error."""

    def wrap(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if card.name in _REGISTRY:
            raise ZooError(f"a model named {card.name!r} is already registered")
        args = dict(card.args)
        for k, v in COMMON_ARGS.items():
            args.setdefault(k, v)
        if args["num_classes"].max is None:  # a family's own num_classes default keeps the global bound
            args["num_classes"] = replace(args["num_classes"], max=MAX_NUM_CLASSES)
        _check_signature(card.name, fn, args)
        _REGISTRY[card.name] = _Entry(fn=fn, card=card, all_args=args)
        return fn

    return wrap


def _check_signature(name: str, fn: Callable[..., nn.Module], args: dict[str, Arg]) -> None:
    """Refuse an entry point whose parameters are not exactly the declared args, keyword-only and without defaults.

    Defaults are declared once, in each `Arg`; `create` always passes every kwarg, resolved.
    """
    params = inspect.signature(fn).parameters.values()
    names = sorted(p.name for p in params)
    loose = [p.name for p in params if p.kind is not p.KEYWORD_ONLY or p.default is not p.empty]
    if names != sorted(args) or loose:
        raise ZooError(f"register_model({name!r}): the entry point takes {', '.join(names) or 'nothing'}; expected "
                       f"exactly the declared args {', '.join(sorted(args))}, keyword-only and without defaults "
                       "(defaults live in the Arg)")


def _ensure_loaded() -> None:
    global _loaded
    if not _loaded:
        _loaded = True
        for mod in FAMILY_MODULES:
            importlib.import_module(mod)


def _entry(name: str) -> _Entry:
    _ensure_loaded()
    if not isinstance(name, str):
        raise ZooError(f"model name must be a string, got {type(name).__name__}")
    if len(name) > MAX_NAME_LEN:
        raise ZooError(f"unknown model {short_repr(name)}: names have at most {MAX_NAME_LEN} characters; "
                       "see zoo.list_models()")
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=3, cutoff=0.5)
        hint = f"; did you mean {', '.join(close)}?" if close else "; see zoo.list_models()"
        raise ZooError(f"unknown model {name!r}{hint}")
    return _REGISTRY[name]


def list_models(pattern: str = "*") -> list[str]:
    """Sorted names of registered models matching an fnmatch pattern."""
    _ensure_loaded()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def model_card(name: str) -> ModelCard:
    """The ModelCard of a registered model."""
    return _entry(name).card


def model_args(name: str) -> dict[str, Arg]:
    """All kwargs accepted by `create(name, ...)`, including num_classes and in_chans."""
    return dict(_entry(name).all_args)


def resolve_kwargs(name: str, **kwargs: Any) -> dict[str, Any]:
    """Validate kwargs for `name` and return the complete kwargs with defaults filled in."""
    entry = _entry(name)
    unknown = [k for k in kwargs if k not in entry.all_args]
    if unknown:
        raise ZooError(
            f"{name}: unknown argument {short_repr(unknown[0])}; accepted: " + ", ".join(sorted(entry.all_args))
        )
    out = {}
    for k, spec in entry.all_args.items():
        out[k] = spec.validate(name, k, kwargs[k]) if k in kwargs else spec.default
    side = entry.card.resolution_for(out)  # e.g. stem="cifar" defaults to 32 px
    if side is not None and "resolution" in out and "resolution" not in kwargs:
        out["resolution"] = side
    return out


WeightsLoader = Callable[..., nn.Module]  # (name, weights, reinit_head=, allow_nonfinite=, **kwargs) -> model
_weights_loader: WeightsLoader | None = None  # what `create(weights=...)` calls; see install_weights_loader


def install_weights_loader(loader: WeightsLoader) -> None:
    """Set the function `create(name, weights=...)` delegates to (zoo/__init__.py installs zoo.weights').

    The registry only builds models: pretrained loading lives above it (zoo.weights), and is passed in
    here at package init instead of being imported, so that every import points down to the registry.
    """
    if not callable(loader):
        raise ZooError(f"install_weights_loader: loader={short_repr(loader)} is not allowed; expected a function")
    global _weights_loader
    _weights_loader = loader


def create(name: str, weights: Any = None, reinit_head: bool = False, allow_nonfinite: bool = False,
           **kwargs: Any) -> nn.Module:
    """Build a registered model by name, validating every kwarg first; `weights` is a tag or a .safetensors path.

    Weights holding NaN/inf (or a header with non-finite mean/std) are refused unless `allow_nonfinite=True`.
    """
    if weights is not None or reinit_head is not False or allow_nonfinite is not False:
        for key, val in (("reinit_head", reinit_head), ("allow_nonfinite", allow_nonfinite)):
            if weights is None and val is not False:
                raise ZooError(f"{name}: {key}={short_repr(val)} needs weights= (a tag or a .safetensors path)")
        if _weights_loader is None:
            raise ZooError(f"{name}: weights={short_repr(weights)} needs a weights loader, and none is "
                           "installed; `import zoo` installs zoo.weights.create_pretrained")
        return _weights_loader(name, weights, reinit_head=reinit_head, allow_nonfinite=allow_nonfinite,
                               **kwargs)
    entry = _entry(name)
    resolved = resolve_kwargs(name, **kwargs)
    model = entry.fn(**resolved)
    model.spec = ModelSpec(name=name, kwargs=dict(resolved), input_size=entry.card.input_size(resolved))
    return model


def meta_model(name: str, **kwargs: Any) -> nn.Module:
    """What `create(name, **kwargs)` builds, on the meta device: shapes only, no memory and no RNG used."""
    entry = _entry(name)
    resolved = resolve_kwargs(name, **kwargs)
    with torch.device("meta"):
        model = entry.fn(**resolved)
    model.spec = ModelSpec(name=name, kwargs=dict(resolved), input_size=entry.card.input_size(resolved))
    return model


def check_param_budget(model: nn.Module, limit: int, what: str) -> int:
    """The model's parameter and buffer count; ZooError (before any real allocation) if it is over `limit`."""
    n = sum(t.numel() for t in model.state_dict().values() if isinstance(t, torch.Tensor))
    if n > limit:
        raise ZooError(f"{what}: the model it describes has {n:,} parameters and buffers; at most {limit:,} "
                       "are allowed here")
    return n
