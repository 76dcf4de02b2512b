"""The recipe stage registry: a stage's validated spec (`StageSpec`), what its runner gets (`StageContext`),
the stage types (`StageType`, `register_stage_type`) and the `defaults:` sections (`register_defaults_section`).

Bottom layer of zoo.recipe with zoo.recipe.checks: the stage types (zoo.recipe.stages,
zoo.recipe.compress_stages) build on it, and the package's `__init__` registers the built-in ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from zoo._registry import create
from zoo.errors import ZooError
from zoo.recipe.checks import Checker, fill_kwargs

Loaders = tuple[Any, Any, Any]  # (train DataLoader, val DataLoader, zoo.data.DatasetInfo)


@dataclass
class StageSpec:
    """One validated stage: its type, model (own or inherited via `from`), options and dependencies."""

    name: str
    type: str
    model: str  # registry name (inherited through `from`)
    kwargs: dict[str, Any]  # kwargs as written (inherited through `from`), before dataset fill-in
    source: str | None  # `from` stage
    seed: int | None  # fixed seed or None (follow the recipe's seeds)
    options: dict[str, Any]  # type-specific validated keys (train config, kd config, teacher, ...)
    deps: tuple[str, ...]  # stages this one needs (from + references), in key order
    files: dict[str, Path] = field(default_factory=dict)  # reference keys that point to files


@dataclass
class StageContext:
    """What a stage runner gets: its spec and options, seed, data, upstream models and checkpoint folder.

    The recipe engine builds one per stage run; zoo.finetune builds them for its `--then` steps.
    `loaders(batch_size)` gives (train, val, DatasetInfo) shuffled by `seed`; `stage_model(name)` the model of
    a completed stage. `report` collects what a runner tells its caller besides the metrics (the TrainResult
    of each fine-tune under "finetunes", calibration images under "calibration_images"); the engine does
    not store it.
    """

    spec: StageSpec
    seed: int  # the stage's fixed seed, else the recipe seed being run
    options: dict[str, Any]  # validated options, --quick train overrides applied
    raw: dict[str, Any]  # the stage as written
    input_size: tuple[int, int, int]  # (C, H, W) fed to the model
    dataset: dict[str, Any]  # the recipe's dataset section, num_classes filled in from the data
    loaders: Callable[[int], Loaders]
    stage_model: Callable[[str], nn.Module]
    dir: Path | None = None  # checkpoints of the stage's training (None: write none)
    resume: bool = False  # an interrupted run of the same config left a resume checkpoint in `dir`
    meta: dict[str, Any] = field(default_factory=dict)  # JSON stored in the weights' header by training
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The stage's name."""
        return self.spec.name

    def fresh_model(self) -> nn.Module:
        """A new model of the stage's architecture, initialised under the stage seed."""
        torch.manual_seed(self.seed)
        return create(self.spec.model, **fill_kwargs(self.spec.model, self.spec.kwargs, self.dataset))

    def initial_model(self) -> nn.Module:
        """The model this stage starts from: the `from` stage's model, or a fresh one."""
        if self.spec.source is not None:
            return self.stage_model(self.spec.source)
        return self.fresh_model()


Runner = Callable[[StageContext], tuple[nn.Module, dict[str, Any]]]


@dataclass(frozen=True)
class StageType:
    """A stage type: its own allowed keys (name -> description), checks, references and runner.

    `validate(chk, path, stage_dict, recipe_defaults)` normalises the type-specific keys and returns
    them as a dict (raise via `chk.fail(key_path, message)`); `ref_keys` name the keys whose value is
    another stage (or, for keys also in `file_refs`, a .safetensors file); `runner(ctx)` trains or
    transforms the model and returns `(model, metrics)` with at least metrics["top1"], ["top5"] and
    ["loss"]. `needs_model=False` types (`prune`, `quantize`, `lowrank`) take their input model only
    through `from`; `finetunes=True` types keep their `finetune:` block under options["train"] (--quick
    overrides it with the recipe's quick.finetune instead of quick.train).
    """

    name: str
    keys: dict[str, str]
    validate: Callable[[Checker, str, dict, dict], dict]
    runner: Runner
    ref_keys: tuple[str, ...] = ()
    file_refs: tuple[str, ...] = ()
    needs_model: bool = True
    finetunes: bool = False
    doc: str = ""


STAGE_TYPES: dict[str, StageType] = {}
# sections allowed under `defaults:` (e.g. train, kd) -> partial checker(chk, path, mapping)
DEFAULT_SECTIONS: dict[str, Callable[[Checker, str, dict], dict]] = {}

COMMON_STAGE_KEYS: dict[str, str] = {
    "type": "stage type (" + "registered types" + ")",
    "model": "registered model name (or use `from`)",
    "kwargs": "model keyword arguments (validated through the registry)",
    "from": "name of an earlier stage whose trained model this stage starts from",
    "seed": "fixed seed for this stage (shared by all recipe seeds, e.g. one teacher)",
    "description": "free text",
}


def register_stage_type(st: StageType) -> StageType:
    """Add a stage type to the registry; a duplicate name is an error."""
    if st.name in STAGE_TYPES:
        raise ZooError(f"a recipe stage type named {st.name!r} is already registered")
    overlap = set(st.keys) & set(COMMON_STAGE_KEYS)
    if overlap:
        raise ZooError(f"stage type {st.name!r} redefines common keys {sorted(overlap)}")
    STAGE_TYPES[st.name] = st
    return st


def register_defaults_section(name: str, check: Callable[[Checker, str, dict], dict]) -> None:
    """Allow `defaults: {name: {...}}` in recipes, checked by `check(chk, path, mapping)`; duplicates are errors."""
    if name in DEFAULT_SECTIONS:
        raise ZooError(f"a recipe defaults section named {name!r} is already registered")
    DEFAULT_SECTIONS[name] = check
