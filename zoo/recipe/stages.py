"""Built-in recipe stage types: `train` (supervised training) and `distill` (Hinton et al. 2015,
"Distilling the Knowledge in a Neural Network", plus optional FitNets hints).

Each type registers its allowed keys, a validator (run before anything trains) and a runner
`runner(ctx) -> (model, metrics)`; compression stages (`prune`, `quantize`, `lowrank`) plug in the
same way through `zoo.recipe.schema.register_stage_type`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from zoo.errors import ZooError
from zoo.recipe.schema import DEFAULT_SECTIONS, Checker, StageType, register_stage_type

# keys the engine sets itself; a recipe may not put them in a train section
ENGINE_TRAIN_KEYS = {"seed": "set by the recipe's `seeds` (or the stage's `seed`)"}


def _dataclass_defaults(cls: type) -> dict[str, Any]:
    out = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            out[f.name] = f.default_factory()  # type: ignore[misc]
        else:
            out[f.name] = None
    return out


def _check_like_defaults(chk: Checker, path: str, d: dict, defaults: dict[str, Any], what: str) -> None:
    """Unknown keys and the basic type of each value (judged from the dataclass default)."""
    for k, v in d.items():
        if k not in defaults:
            raise chk.fail(f"{path}.{k}", f"unknown {what} key; allowed: " + ", ".join(defaults))
        default = defaults[k]
        if isinstance(default, bool):
            chk.typed(v, f"{path}.{k}", "bool")
        elif isinstance(default, int) and not isinstance(v, float):
            chk.typed(v, f"{path}.{k}", "int")
        elif isinstance(default, float):
            chk.typed(v, f"{path}.{k}", "float")
        elif isinstance(default, str):
            chk.typed(v, f"{path}.{k}", "str")


def _from_dict(chk: Checker, path: str, cls: type, d: dict) -> Any:
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
    from zoo.train import TrainConfig

    chk.mapping(d, path)
    for k in d:
        if k in ENGINE_TRAIN_KEYS:
            raise chk.fail(f"{path}.{k}", f"not allowed here: {ENGINE_TRAIN_KEYS[k]}")
    defaults = {k: v for k, v in _dataclass_defaults(TrainConfig).items() if k not in ENGINE_TRAIN_KEYS}
    _check_like_defaults(chk, path, d, defaults, "train")
    if not partial:
        _from_dict(chk, path, TrainConfig, {"progress": False, **d})  # values and their combinations
    return dict(d)  # as written: the stage hash covers what the recipe says, not the code's defaults


def train_config(train: dict[str, Any], seed: int) -> Any:
    """The zoo.train.TrainConfig of a stage: its train section, quiet by default, with the run's seed."""
    from zoo.train import TrainConfig

    return TrainConfig.from_dict({"progress": False, **train, "seed": seed})


def check_kd_config(chk: Checker, path: str, d: dict, partial: bool = False) -> dict[str, Any]:
    """Validate a distillation-config mapping against zoo.distill.KDConfig; return it as a dict."""
    from zoo.distill import KDConfig

    chk.mapping(d, path)
    _check_like_defaults(chk, path, d, _dataclass_defaults(KDConfig), "kd")
    if not partial:
        _from_dict(chk, path, KDConfig, d)
    return dict(d)


def _train_section(chk: Checker, path: str, stage: dict, defaults: dict) -> dict[str, Any]:
    base = check_train_config(chk, "defaults.train", defaults.get("train", {}) or {}, partial=True)
    own = check_train_config(chk, f"{path}.train", stage.get("train", {}) or {}, partial=True)
    merged = {**base, **own}
    return check_train_config(chk, f"{path}.train", merged)


def _validate_train(chk: Checker, path: str, stage: dict, defaults: dict) -> dict[str, Any]:
    return {"train": _train_section(chk, path, stage, defaults)}


def _validate_distill(chk: Checker, path: str, stage: dict, defaults: dict) -> dict[str, Any]:
    if "teacher" not in stage:
        raise chk.fail(f"{path}.teacher", "missing required key (a stage name or a .safetensors file)")
    base = check_kd_config(chk, "defaults.kd", defaults.get("kd", {}) or {}, partial=True)
    own = check_kd_config(chk, f"{path}.kd", stage.get("kd", {}) or {}, partial=True)
    kd = check_kd_config(chk, f"{path}.kd", {**base, **own})
    return {"train": _train_section(chk, path, stage, defaults), "kd": kd}


def _final_metrics(result: Any) -> dict[str, Any]:
    """Validation metrics after the last epoch, plus the best epoch's top-1 (for information only)."""
    out = {k: float(result.final[k]) for k in ("top1", "top5", "loss")}
    out["best_top1"] = float(result.best_top1)
    out["best_epoch"] = int(result.best_epoch)
    out["epochs_run"] = len(result.history)
    return out


def run_train(ctx: Any) -> tuple[Any, dict[str, Any]]:
    """Train the stage's model (fresh, or the model of `from`) with its train config."""
    from zoo.train import fit

    cfg = train_config(ctx.options["train"], ctx.seed)
    model = ctx.initial_model()
    train_loader, val_loader, _ = ctx.loaders(cfg.batch_size)
    result = fit(model, train_loader, val_loader, cfg, out_dir=ctx.dir, resume=ctx.resume,
                 meta=ctx.meta)
    return model, _final_metrics(result)


def run_distill(ctx: Any) -> tuple[Any, dict[str, Any]]:
    """Distil the teacher (a stage or a weights file) into the stage's student model."""
    from zoo.distill import KDConfig, distill, load_teacher

    cfg = train_config(ctx.options["train"], ctx.seed)
    kd = KDConfig.from_dict(ctx.options["kd"])
    if "teacher" in ctx.spec.files:
        teacher = load_teacher(str(ctx.spec.files["teacher"]))
    else:
        teacher = ctx.stage_model(ctx.raw["teacher"])
    teacher.eval()
    model = ctx.initial_model()
    train_loader, val_loader, _ = ctx.loaders(cfg.batch_size)
    result = distill(model, teacher, train_loader, val_loader, cfg, kd, out_dir=ctx.dir, resume=ctx.resume,
                     meta=ctx.meta)
    return model, _final_metrics(result)


register_stage_type(StageType(
    name="train", keys={"train": "train config (zoo.train.TrainConfig keys), over defaults.train"},
    validate=_validate_train, runner=run_train, doc="supervised training with cross-entropy",
))
register_stage_type(StageType(
    name="distill",
    keys={"teacher": "teacher stage name or a .safetensors weights file",
          "train": "train config (zoo.train.TrainConfig keys), over defaults.train",
          "kd": "distillation config (zoo.distill.KDConfig keys), over defaults.kd"},
    validate=_validate_distill, runner=run_distill, ref_keys=("teacher",), file_refs=("teacher",),
    doc="knowledge distillation from a teacher",
))
DEFAULT_SECTIONS["train"] = lambda chk, path, d: check_train_config(chk, path, d, partial=True)
DEFAULT_SECTIONS["kd"] = lambda chk, path, d: check_kd_config(chk, path, d, partial=True)
