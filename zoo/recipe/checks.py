"""Checks shared by the recipe schema and the stage types: `RecipeError`, the `Checker` (errors prefixed with
the recipe file and key path, typed getters), value helpers for messages, and the model-kwargs checks
against a recipe's dataset (`check_model_kwargs`, `fill_kwargs`).

It also checks train-config mappings against zoo.train.TrainConfig (`check_train_config`, used by the
stage types and by the recipe's `quick:` section) and builds the config a stage trains with (`train_config`).

Depends only on the registry, zoo.train's and zoo.distill's configs, zoo.errors and zoo.untrusted; zoo.recipe.schema builds on it.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any

from zoo._registry import model_args, model_card
from zoo.data import DATASETS
from zoo.distill import KDConfig
from zoo.errors import ZooError
from zoo.train import TrainConfig
from zoo.untrusted import short_repr

# config keys whose default is a bool or number but that also take these words
WORD_VALUES = {"channels_last": ("auto",)}
# keys the engine sets itself; a recipe may not put them in a train section
ENGINE_TRAIN_KEYS = {"seed": "set by the recipe's `seeds` (or the stage's `seed`)"}


class RecipeError(ZooError):
    """A recipe file that does not validate: message is `<file>: <key path>: <problem>`."""


class Checker:
    """Raises RecipeError prefixed with the recipe file and a key path; small typed getters."""

    def __init__(self, file: str) -> None:
        self.file = file

    def fail(self, path: str, msg: str) -> RecipeError:
        """Build (for `raise`) the error for key `path`."""
        return RecipeError(f"{self.file}: {path}: {msg}" if path else f"{self.file}: {msg}")

    def mapping(self, value: Any, path: str, allowed: dict[str, str] | None = None,
                required: tuple[str, ...] = ()) -> dict:
        """Check `value` is a mapping with string keys among `allowed` and all `required` keys."""
        if not isinstance(value, dict):
            raise self.fail(path, f"expected a mapping, got {type_name(value)} {short_value(value)}")
        for k in value:
            if not isinstance(k, str):
                raise self.fail(path, f"keys must be strings, got {short_value(k)}")
            if allowed is not None and k not in allowed:
                raise self.fail(join_key(path, k), "unknown key; allowed: " + ", ".join(allowed))
        for k in required:
            if k not in value:
                raise self.fail(join_key(path, k), f"missing required key ({allowed.get(k, '') if allowed else ''})")
        return value

    def typed(self, value: Any, path: str, kind: str) -> Any:
        """Check one scalar/list value against kind: str, int, float, bool, number, int_list."""
        ok = {
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(float(value)),
            "int_list": isinstance(value, list) and all(isinstance(v, int) and not isinstance(v, bool)
                                                         for v in value),
            "str_list": isinstance(value, list) and all(isinstance(v, str) for v in value),
            "float_list": isinstance(value, list) and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v)) for v in value),
        }[kind]
        if not ok:
            want = {"int_list": "a list of ints", "str_list": "a list of strings", "float": "a number",
                    "float_list": "a list of numbers"}.get(kind, kind)
            hint = ""
            if kind == "float" and isinstance(value, str) and re.fullmatch(r"[-+]?\d+[eE][-+]?\d+", value.strip()):
                hint = f" (YAML reads {value} as a string; write it with a dot and a signed exponent, e.g. 1.0e-4)"
            raise self.fail(path, f"expected {want}, got {type_name(value)} {short_value(value)}{hint}")
        return float(value) if kind == "float" else value


def type_name(v: Any) -> str:
    """The YAML-facing name of a value's type (mapping, list, string, ...)."""
    return {dict: "mapping", list: "list", str: "string", bool: "bool", int: "int", float: "float",
            type(None): "null"}.get(type(v), type(v).__name__)


def short_value(v: Any) -> str:
    """A bounded repr of a user value, for error messages."""
    return short_repr(v, 60)  # bounded: never repr() a whole (possibly alias-expanded) user value


def join_key(path: str, key: str) -> str:
    """The key path `path.key` (just `key` at the top level)."""
    return f"{path}.{key}" if path else key


def check_model_kwargs(chk: Checker, path: str, model: str, kwargs: dict, dataset: dict) -> dict[str, Any]:
    """Validate model name and kwargs (through the registry) against the dataset; return full kwargs."""
    try:
        args = model_args(model)
    except ZooError as e:
        raise chk.fail(f"{path}.model", str(e)) from None
    for k, v in kwargs.items():
        if k not in args:
            raise chk.fail(f"{path}.kwargs.{k}", f"{model} has no argument {short_value(k)}; accepted: " + ", ".join(sorted(args)))
        try:
            args[k].validate(model, k, v)
        except ZooError as e:
            raise chk.fail(f"{path}.kwargs.{k}", str(e)) from None
    full = fill_kwargs(model, kwargs, dataset)
    c, h, w = dataset["input_size"]
    for k in ("in_chans", "num_classes", "resolution"):
        if k in kwargs and full[k] != kwargs[k]:
            raise chk.fail(f"{path}.kwargs.{k}", f"{short_value(kwargs[k])} does not match the dataset ({k}={short_value(full[k])}); "
                                                 "leave it out, the dataset sets it")
    card = model_card(model)
    if card.fixed_resolution:
        want = card.input_size(full)
        if (want[1], want[2]) != (h, w):
            raise chk.fail(f"{path}.model", f"{model} needs {want[1]}x{want[2]} inputs but dataset.input_size is "
                                            f"{[c, h, w]}")
    elif min(h, w) < card.min_resolution:
        raise chk.fail(f"{path}.model", f"{model} needs inputs of at least {card.min_resolution}x"
                                        f"{card.min_resolution}; dataset.input_size is {[c, h, w]}")
    return full


def fill_kwargs(model: str, kwargs: dict, dataset: dict) -> dict[str, Any]:
    """Kwargs with in_chans, num_classes (when the dataset fixes it) and resolution set from the dataset."""
    args = model_args(model)
    out = dict(kwargs)
    c, h, _ = dataset["input_size"]
    out["in_chans"] = c
    n = dataset.get("num_classes") or DATASETS[dataset["name"]].num_classes
    if n is not None:
        out["num_classes"] = n
    if "resolution" in args:
        out["resolution"] = h
    return out


# --------------------------------------------------------------------------- train configs


def dataclass_defaults(cls: type) -> dict[str, Any]:
    """Field name -> default of a dataclass (None for a field without one)."""
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            out[f.name] = None
    return out


def check_like_defaults(chk: Checker, path: str, d: dict, defaults: dict[str, Any], what: str) -> None:
    """Unknown keys and the basic type of each value (judged from the dataclass default)."""
    for k, v in d.items():
        if k not in defaults:
            raise chk.fail(f"{path}.{k}", f"unknown {what} key; allowed: " + ", ".join(defaults))
        default = defaults[k]
        if v in WORD_VALUES.get(k, ()):
            continue  # e.g. channels_last: auto (the dataclass checks the combination)
        if isinstance(default, bool):
            chk.typed(v, f"{path}.{k}", "bool")
        elif isinstance(default, int) and not isinstance(v, float):
            chk.typed(v, f"{path}.{k}", "int")
        elif isinstance(default, float):
            chk.typed(v, f"{path}.{k}", "float")
        elif isinstance(default, str):
            chk.typed(v, f"{path}.{k}", "str")


def build_checked(chk: Checker, path: str, cls: type, d: dict) -> Any:
    """`cls.from_dict(d)` (or `cls(**d)`), its error re-raised at the key path the message names."""
    try:
        if hasattr(cls, "from_dict"):
            return cls.from_dict(dict(d))
        return cls(**d)
    except (ZooError, ValueError, TypeError) as e:
        msg = str(e)
        # the key the message is about: named as `key=`, `'key'` or `key ` (longest match wins)
        key = next((k for k in sorted(d, key=len, reverse=True)
                    if re.search(rf"(?<![\w]){re.escape(k)}(=|'|\s)", msg)), None)
        raise chk.fail(f"{path}.{key}" if key else path, msg) from None


def check_train_config(chk: Checker, path: str, d: dict, partial: bool = False) -> dict[str, Any]:
    """Validate a train-config mapping against zoo.train.TrainConfig; return it as a plain dict."""
    chk.mapping(d, path)
    for k in d:
        if k in ENGINE_TRAIN_KEYS:
            raise chk.fail(f"{path}.{k}", f"not allowed here: {ENGINE_TRAIN_KEYS[k]}")
    defaults = {k: v for k, v in dataclass_defaults(TrainConfig).items() if k not in ENGINE_TRAIN_KEYS}
    check_like_defaults(chk, path, d, defaults, "train")
    if not partial:
        build_checked(chk, path, TrainConfig, {"progress": False, **d})  # values and their combinations
    return dict(d)  # as written: the stage hash covers what the recipe says, not the code's defaults


def train_config(train: dict[str, Any], seed: int) -> TrainConfig:
    """The zoo.train.TrainConfig of a stage: its train section, quiet by default, with the run's seed."""
    return TrainConfig.from_dict({"progress": False, **train, "seed": seed})


def check_kd_config(chk: Checker, path: str, d: dict, partial: bool = False) -> dict[str, Any]:
    """Validate a distillation-config mapping against zoo.distill.KDConfig; return it as a dict."""
    chk.mapping(d, path)
    check_like_defaults(chk, path, d, dataclass_defaults(KDConfig), "kd")
    if not partial:
        build_checked(chk, path, KDConfig, d)
    return dict(d)
