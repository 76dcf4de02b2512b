"""Built-in recipe stage types: `train` (supervised training) and `distill` (Hinton et al. 2015,
"Distilling the Knowledge in a Neural Network", plus optional FitNets hints).

A train stage may start from pretrained weights (transfer learning, Yosinski et al. 2014, "How
transferable are features in deep neural networks?"): `init` names a .safetensors checkpoint (zoo's, or
another project's state dict paired by structure, zoo.weights.foreign), a TFLite MobileNet (imported by
zoo.weights.tflite) or another stage; every tensor but the classifier must fit
(the classifier too when the classes agree), and when the weights' header gives the input normalisation
the first conv is rescaled so that the dataset's normalised images reach it as the pretrained model's
did. `freeze_backbone: true` trains only the classifier, BatchNorm statistics frozen (zoo.finetune).

Each type registers its allowed keys, a validator (run before anything trains) and a runner
`runner(ctx) -> (model, metrics)`; compression stages (`prune`, `quantize`, `lowrank`) plug in the
same way through `zoo.recipe.schema.register_stage_type`.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
from typing import Any

import torch
import torch.nn as nn

from zoo.errors import ZooError
from zoo.finetune import frozen_backbone
from zoo.layers import ConvNormAct
from zoo.recipe.schema import DEFAULT_SECTIONS, Checker, StageType, register_stage_type
from zoo.weights.checkpoint import classifier_prefix, describe_spec, mismatch_report, read_checkpoint
from zoo.weights.foreign import load_foreign
from zoo.weights.loading import build_from_checkpoint
from zoo.weights.tflite import tflite_to_model

REBASE_BATCHES = 8  # training batches whose statistics re-base BatchNorm after `init` (rebase_batchnorm)
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
    if "init" in stage and "from" in stage:
        raise chk.fail(f"{path}.init", "`init` starts a new `model` from weights; a `from` stage already has them")
    out = {"train": _train_section(chk, path, stage, defaults)}
    if "freeze_backbone" in stage:  # only when given, so that the hashes of other recipes' stages stay the same
        out["freeze_backbone"] = chk.typed(stage["freeze_backbone"], f"{path}.freeze_backbone", "bool")
    return out


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


def _init_source(ctx: Any) -> tuple[nn.Module, tuple | None]:
    """The model named by the stage's `init` and the input (mean, std) it was trained with, if known."""
    f = ctx.spec.files.get("init")
    if f is None:
        return ctx.stage_model(ctx.raw["init"]), None  # a stage of this recipe: same data, same normalisation
    if f.suffix == ".tflite":
        src = tflite_to_model(f)
        return src, (src.tflite_import.mean, src.tflite_import.std)
    ckpt = read_checkpoint(f)
    if ckpt.spec is None:  # another project's state dict: paired by structure with the stage's own model
        return load_foreign(ckpt, ctx.initial_model()), None
    meta = ckpt.metadata
    return build_from_checkpoint(ckpt), ((meta["mean"], meta["std"]) if "mean" in meta and "std" in meta else None)


@torch.no_grad()
def adapt_first_conv(model: nn.Module, trained: tuple, data: tuple) -> bool:
    """Rescale the first ConvNormAct so that images normalised with `data` (mean, std) reach it as images
    normalised with `trained` did: x_t = x_d * s_d / s_t + (m_d - m_t) / s_t; the constant goes into the BN's
    running mean (exact away from the zero-padded border). False when there is no conv + BN to adapt."""
    first = next((m for m in model.modules() if isinstance(m, ConvNormAct)), None)
    if first is None or not isinstance(first.bn, nn.BatchNorm2d) or first.conv.groups != 1:
        return False
    mt, st = (torch.tensor(v, dtype=torch.float64) for v in trained)
    md, sd = (torch.tensor(v, dtype=torch.float64) for v in data)
    w = first.conv.weight.double()
    shift = (w.sum(dim=(2, 3)) * ((md - mt) / st)).sum(dim=1)  # per output channel
    first.conv.weight.copy_(w * (sd / st).view(1, -1, 1, 1))
    first.bn.running_mean.sub_(shift.to(first.bn.running_mean.dtype))
    return True


@torch.no_grad()
def rebase_batchnorm(model: nn.Module, batches: list[torch.Tensor]) -> int:
    """Re-express every BatchNorm2d around the statistics of its input on `batches` (eval-mode passes),
    keeping its eval-mode function y = a * x + c: running stats = those statistics, weight = a * std, bias =
    c + a * mean. Train-mode steps then start from the pretrained function instead of normalising away the
    scales that an imported file folded into its convs (BN weight 1, mean 0, var 1 - eps). Returns the count."""
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d) and m.track_running_stats]
    stats = {m: [0, 0.0, 0.0] for m in norms}

    def record(m: nn.Module, inputs: tuple) -> None:
        x = inputs[0].detach().double().transpose(0, 1).flatten(1)  # (C, N*H*W)
        s = stats[m]
        s[0] += x.shape[1]
        s[1] = s[1] + x.sum(1)
        s[2] = s[2] + (x * x).sum(1)

    hooks = [m.register_forward_pre_hook(record) for m in norms]
    was_training = model.training
    model.eval()
    try:
        for x in batches:
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for m in norms:
        n, s1, s2 = stats[m]
        mean = s1 / n
        var = (s2 / n - mean * mean).clamp_min(0)
        a = m.weight.double() / torch.sqrt(m.running_var.double() + m.eps)
        c = m.bias.double() - m.running_mean.double() * a
        m.running_mean.copy_(mean)
        m.running_var.copy_(var)
        m.weight.copy_(a * torch.sqrt(var + m.eps))
        m.bias.copy_(c + a * mean)
    return len(norms)


def load_init(ctx: Any, model: nn.Module, data_norm: tuple, batches: list[torch.Tensor]) -> None:
    """Copy the `init` weights into the stage's fresh model: all but the classifier (it too if it fits);
    adapt the first conv to the data's normalisation and re-base BatchNorm on `batches`."""
    src, trained_norm = _init_source(ctx)
    where = f"stage {ctx.name!r}: init {ctx.raw['init']!r}"
    head = classifier_prefix(model)
    ours, theirs = model.state_dict(), src.state_dict()
    body = {k: tuple(v.shape) for k, v in ours.items() if not k.startswith(head)}
    report = mismatch_report({k: tuple(v.shape) for k, v in theirs.items() if not k.startswith(head)}, body)
    if report:
        raise ZooError(f"{where} holds {describe_spec(src.zoo_name, src.zoo_kwargs)}, which does not fit "
                       f"{describe_spec(model.zoo_name, model.zoo_kwargs)}: {report}")
    keep = {k: v for k, v in theirs.items() if k in body or (k in ours and ours[k].shape == v.shape)}
    model.load_state_dict(keep, strict=False)
    if trained_norm is not None and len(trained_norm[0]) == len(data_norm[0]):
        adapt_first_conv(model, trained_norm, data_norm)
    rebase_batchnorm(model, batches)


def run_train(ctx: Any) -> tuple[Any, dict[str, Any]]:
    """Train the stage's model (fresh, from `init` weights, or the model of `from`) with its train config."""
    from zoo.train import fit

    cfg = train_config(ctx.options["train"], ctx.seed)
    model = ctx.initial_model()
    train_loader, val_loader, info = ctx.loaders(cfg.batch_size)
    if "init" in ctx.raw and not ctx.resume:
        batches = [x for x, _ in itertools.islice(train_loader, REBASE_BATCHES)]
        load_init(ctx, model, (info.mean, info.std), batches)
    with frozen_backbone(model, ctx.options.get("freeze_backbone", False)):
        result = fit(model, train_loader, val_loader, cfg, out_dir=ctx.dir, resume=ctx.resume, meta=ctx.meta)
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
    name="train", keys={"train": "train config (zoo.train.TrainConfig keys), over defaults.train",
                        "init": "weights to start from: a .safetensors or .tflite file, or a stage (classifier "
                                "re-initialised unless it fits)",
                        "freeze_backbone": "true: train only the classifier (BatchNorm statistics frozen too)"},
    validate=_validate_train, runner=run_train, ref_keys=("init",), file_refs=("init",),
    doc="supervised training with cross-entropy",
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
