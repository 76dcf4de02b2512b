"""Built-in recipe stage types: `train` (supervised training) and `distill` (Hinton et al. 2015,
"Distilling the Knowledge in a Neural Network", plus optional FitNets hints).

A train stage may start from pretrained weights (transfer learning, Yosinski et al. 2014, "How
transferable are features in deep neural networks?"): `init` names a .safetensors checkpoint (zoo's, or
another project's state dict paired by structure, zoo.weights.foreign), a TFLite MobileNet (imported by
zoo.weights.tflite) or another stage; every tensor but the classifier must fit
(the classifier too when the classes agree), and when the weights' header gives the input normalisation
the first conv is rescaled so that the dataset's normalised images reach it as the pretrained model's
did. `freeze_backbone: true` trains only the classifier, BatchNorm statistics frozen (`frozen_backbone`,
which zoo.finetune uses too).

Each type (`TRAIN`, `DISTILL`) holds its allowed keys, a validator (run before anything trains) and a runner
`runner(ctx: StageContext) -> (model, metrics)`; zoo.recipe's `__init__` registers them, and the
compression stages of zoo.recipe.compress_stages, through zoo.recipe.registry.register_stage_type.
"""

from __future__ import annotations

import itertools
import types
from typing import Any

import torch
import torch.nn as nn

from zoo.distill import KDConfig, distill, load_teacher
from zoo.errors import ZooError
from zoo.layers import ConvNormAct
from zoo.recipe.checks import Checker, check_kd_config, check_train_config, train_config
from zoo.recipe.registry import StageContext, StageType
from zoo.train import TrainResult, fit
from zoo.weights.checkpoint import classifier_prefix, describe_spec, mismatch_report
from zoo.weights.loading import weights_source

REBASE_BATCHES = 8  # training batches whose statistics re-base BatchNorm after `init` (rebase_batchnorm)


# --------------------------------------------------------------------------- frozen backbone


def _backbone_norms(model: nn.Module) -> list[nn.Module]:
    head = set(model.get_classifier().modules())
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m not in head]


def _frozen_train(self: nn.Module, mode: bool = True) -> nn.Module:
    nn.Module.train(self, mode)
    for m in _backbone_norms(self):
        m.eval()  # frozen backbone: BatchNorm keeps its running statistics
    return self


class frozen_backbone:
    """Context: only the classifier trains; backbone weights and BatchNorm statistics stay unchanged."""

    def __init__(self, model: nn.Module, enabled: bool = True):
        self.model, self.enabled = model, enabled
        self.saved: list[tuple[nn.Parameter, bool]] = []

    def __enter__(self) -> nn.Module:
        if not self.enabled:
            return self.model
        if not hasattr(self.model, "get_classifier"):
            raise ZooError(f"freeze_backbone: {type(self.model).__name__} has no get_classifier()")
        head = {id(p) for p in self.model.get_classifier().parameters()}
        for p in self.model.parameters():
            self.saved.append((p, p.requires_grad))
            p.requires_grad_(id(p) in head)
        self.model.train = types.MethodType(_frozen_train, self.model)  # type: ignore[method-assign]
        return self.model

    def __exit__(self, *exc: Any) -> None:
        if not self.enabled:
            return
        for p, flag in self.saved:
            p.requires_grad_(flag)
        self.model.__dict__.pop("train", None)


# --------------------------------------------------------------------------- validation


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


def _final_metrics(result: TrainResult) -> dict[str, Any]:
    """Validation metrics after the last epoch, plus the best epoch's top-1 (for information only)."""
    out = {k: float(result.final[k]) for k in ("top1", "top5", "loss")}
    out["best_top1"] = float(result.best_top1)
    out["best_epoch"] = int(result.best_epoch)
    out["epochs_run"] = len(result.history)
    out["precision"], out["memory_format"] = result.precision, result.memory_format
    return out


def _init_source(ctx: StageContext) -> tuple[nn.Module, tuple | None]:
    """The model named by the stage's `init` and the input (mean, std) it was trained with, if known."""
    f = ctx.spec.files.get("init")
    if f is None:
        return ctx.stage_model(ctx.raw["init"]), None  # a stage of this recipe: same data, same normalisation
    return weights_source(f, ctx.initial_model)


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


def transfer_weights(model: nn.Module, src: nn.Module, trained_norm: tuple | None, data_norm: tuple,
                     batches: list[torch.Tensor], where: str) -> None:
    """Copy `src`'s weights into the fresh `model`: all but the classifier (it too if it fits); adapt the first
    conv from `trained_norm` to the data's normalisation and re-base BatchNorm on `batches` (transfer learning,
    the steps of a recipe's `init` and of `zoo finetune --weights`)."""
    head = classifier_prefix(model)
    ours, theirs = model.state_dict(), src.state_dict()
    body = {k: tuple(v.shape) for k, v in ours.items() if not k.startswith(head)}
    report = mismatch_report({k: tuple(v.shape) for k, v in theirs.items() if not k.startswith(head)}, body)
    if report:
        raise ZooError(f"{where} holds {describe_spec(src.spec.name, src.spec.kwargs)}, which does not fit "
                       f"{describe_spec(model.spec.name, model.spec.kwargs)}: {report}")
    keep = {k: v for k, v in theirs.items() if k in body or (k in ours and ours[k].shape == v.shape)}
    model.load_state_dict(keep, strict=False)
    if trained_norm is not None and len(trained_norm[0]) == len(data_norm[0]):
        adapt_first_conv(model, trained_norm, data_norm)
    rebase_batchnorm(model, batches)


def load_init(ctx: StageContext, model: nn.Module, data_norm: tuple, batches: list[torch.Tensor]) -> None:
    """Copy the `init` weights into the stage's fresh model (transfer_weights)."""
    src, trained_norm = _init_source(ctx)
    transfer_weights(model, src, trained_norm, data_norm, batches, f"stage {ctx.name!r}: init {ctx.raw['init']!r}")


def run_train(ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    """Train the stage's model (fresh, from `init` weights, or the model of `from`) with its train config."""
    cfg = train_config(ctx.options["train"], ctx.seed)
    model = ctx.initial_model()
    train_loader, val_loader, info = ctx.loaders(cfg.batch_size)
    if "init" in ctx.raw and not ctx.resume:
        batches = [x for x, _ in itertools.islice(train_loader, REBASE_BATCHES)]
        load_init(ctx, model, (info.mean, info.std), batches)
    with frozen_backbone(model, ctx.options.get("freeze_backbone", False)):
        result = fit(model, train_loader, val_loader, cfg, out_dir=ctx.dir, resume=ctx.resume, meta=ctx.meta)
    return model, _final_metrics(result)


def run_distill(ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    """Distil the teacher (a stage or a weights file) into the stage's student model."""
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


TRAIN = StageType(
    name="train", keys={"train": "train config (zoo.train.TrainConfig keys), over defaults.train",
                        "init": "weights to start from: a .safetensors or .tflite file, or a stage (classifier "
                                "re-initialised unless it fits)",
                        "freeze_backbone": "true: train only the classifier (BatchNorm statistics frozen too)"},
    validate=_validate_train, runner=run_train, ref_keys=("init",), file_refs=("init",),
    doc="supervised training with cross-entropy",
)
DISTILL = StageType(
    name="distill",
    keys={"teacher": "teacher stage name or a .safetensors weights file",
          "train": "train config (zoo.train.TrainConfig keys), over defaults.train",
          "kd": "distillation config (zoo.distill.KDConfig keys), over defaults.kd"},
    validate=_validate_distill, runner=run_distill, ref_keys=("teacher",), file_refs=("teacher",),
    doc="knowledge distillation from a teacher",
)


def check_train_defaults(chk: Checker, path: str, d: dict) -> dict[str, Any]:
    """The `defaults.train` section: train-config keys, each checked on its own."""
    return check_train_config(chk, path, d, partial=True)


def check_kd_defaults(chk: Checker, path: str, d: dict) -> dict[str, Any]:
    """The `defaults.kd` section: distillation-config keys, each checked on its own."""
    return check_kd_config(chk, path, d, partial=True)
