"""Fine-tuning a zoo model on your own image folder (transfer learning with a new classifier head, as in
Yosinski et al. 2014, "How transferable are features in deep neural networks?"), optionally followed
by compression steps (structured pruning + recovery fine-tune, int8 quantization).

    zoo finetune --model mobilenet_v1 --width 0.5 --data path/to/folder --epochs 5 --out runs/ft \
        [--weights TAG|PATH] [--freeze-backbone] [--then prune=0.5,quantize=static]
    zoo predict --weights runs/ft/model.safetensors image.png

The folder is `root/train/<class>/*` + `root/val/<class>/*`, or `root/<class>/*` split deterministically
(stratified, see zoo.data). Every image is decoded up front, so a corrupt file fails before training.
`--out` receives `model.safetensors` (spec, class names, mean/std and input size in the header) and
`metrics.json` (per-epoch loss and validation top-1, then one entry per compression step).
`--freeze-backbone` trains only the new head (BatchNorm statistics frozen too) during the fine-tune; the
short recovery fine-tune after `prune` trains every layer, since pruning has changed the backbone.

For longer pipelines (distillation, several seeds, a report), a recipe can point at the same folder:
`dataset: {name: imagefolder, root: path/to/folder, input_size: [3, 64, 64]}` (see zoo.recipe).
"""

from __future__ import annotations

import argparse
import json
import os
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from zoo.errors import ZooError
from zoo.io import make_out_dir
from zoo.untrusted import short_repr

DEFAULT_EPOCHS = 5
DEFAULT_BATCH_SIZE = 32
DEFAULT_LR = 0.05  # from scratch; with --weights the default is PRETRAINED_LR
PRETRAINED_LR = 0.01
PRUNE_LR_FACTOR = 0.2  # recovery fine-tune after pruning runs at this fraction of the learning rate
CALIBRATION_BATCHES = 8  # training batches used to calibrate static quantization
QUANT_METHODS = ("static", "dynamic")
THEN_STEPS: dict[str, str] = {
    "prune": "prune=<fraction of channels to remove, 0 < x < 1> (structured, magnitude; then a short fine-tune)",
    "quantize": "quantize=<" + "|".join(QUANT_METHODS) + "> (int8; static calibrates on training batches; last step)",
}
RESERVED_KWARGS = {"num_classes": "it is set from the number of class folders"}


@dataclass(frozen=True)
class ThenStep:
    """One compression step after fine-tuning: ('prune', 0.5) or ('quantize', 'static')."""

    name: str
    value: Any

    def __str__(self) -> str:
        return f"{self.name}={self.value}"


@dataclass
class FinetuneResult:
    """What `finetune` produced: the model, its files, classes, normalisation and validation metrics."""

    model: nn.Module
    out: Path
    weights: Path  # out/model.safetensors
    metrics_file: Path  # out/metrics.json
    class_names: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    input_size: tuple[int, int, int]
    history: list[dict[str, Any]] = field(default_factory=list)  # per-epoch records of the fine-tune
    steps: list[dict[str, Any]] = field(default_factory=list)  # one record per --then step
    metrics: dict[str, Any] = field(default_factory=dict)  # the content of metrics.json

    @property
    def top1(self) -> float:
        """Validation top-1 (percent) of the final model (after every step)."""
        return float(self.metrics["final"]["val_top1"])


def _allowed_steps() -> str:
    return "; ".join(THEN_STEPS.values())


def parse_then(then: str | Sequence[Any] | None) -> list[ThenStep]:
    """Parse `prune=0.5,quantize=static` (or a list of such items / (name, value) pairs) into steps."""
    if then is None:
        return []
    if isinstance(then, str):
        items: list[Any] = [s for s in (p.strip() for p in then.split(",")) if s] if then.strip() else []
        if not items:
            raise ZooError(f"--then {short_repr(then)} is empty; allowed steps: {_allowed_steps()}")
    elif isinstance(then, (list, tuple)):
        items = list(then)
    else:
        raise ZooError(f"then={short_repr(then)} is not allowed; expected a string like 'prune=0.5,quantize=static'")
    steps: list[ThenStep] = []
    for item in items:
        if isinstance(item, ThenStep):
            name, raw = item.name, item.value
        elif isinstance(item, (list, tuple)) and len(item) == 2:
            name, raw = item
        elif isinstance(item, str):
            name, sep, raw = item.partition("=")
            name, raw = name.strip(), raw.strip()
            if not sep or not raw:
                raise ZooError(f"--then step {short_repr(item)} is not allowed; expected name=value, allowed steps: "
                               f"{_allowed_steps()}")
        else:
            raise ZooError(f"--then step {short_repr(item)} is not allowed; allowed steps: {_allowed_steps()}")
        if not isinstance(name, str) or name not in THEN_STEPS:
            raise ZooError(f"--then step {short_repr(name)} is not allowed; allowed steps: {_allowed_steps()}")
        if name == "prune":
            try:
                amount = float(raw)
            except (TypeError, ValueError):
                amount = float("nan")
            if isinstance(raw, bool) or not 0 < amount < 1:
                raise ZooError(f"--then prune={short_repr(raw)} is not allowed; expected a fraction 0 < x < 1, "
                               "e.g. prune=0.5")
            steps.append(ThenStep("prune", amount))
        else:
            if raw not in QUANT_METHODS:
                raise ZooError(f"--then quantize={short_repr(raw)} is not allowed; allowed: {', '.join(QUANT_METHODS)}")
            steps.append(ThenStep("quantize", raw))
    q = [i for i, s in enumerate(steps) if s.name == "quantize"]
    if len(q) > 1 or (q and q[0] != len(steps) - 1):
        raise ZooError(f"--then {','.join(map(str, steps))}: quantize must be the last step and appear once "
                       "(an int8 model cannot be pruned or trained further)")
    return steps


# ---------------------------------------------------------------------------------------------- freezing

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


# ---------------------------------------------------------------------------------------------- steps

def _first_batches(loader: Any, n: int) -> Iterator[torch.Tensor]:
    for i, (x, _) in enumerate(loader):
        if i >= n:
            return
        yield x


def _size_stats(model: nn.Module) -> dict[str, Any]:
    from zoo.profile import count_params
    from zoo.io import serialized_size

    out: dict[str, Any] = {"params": int(count_params(model))}
    try:
        out["size_bytes"] = int(serialized_size(model))
    except Exception as e:  # noqa: BLE001 - a format the serialiser cannot measure is reported, not fatal
        out["size_bytes"] = None
        out["size_note"] = f"{type(e).__name__}: {e}"
    return out


def _run_prune(model: nn.Module, step: ThenStep, loaders: tuple[Any, Any], cfg: Any) -> tuple[nn.Module, dict]:
    from zoo.compress import prune
    from zoo.train import TrainConfig, evaluate, fit

    train_loader, val_loader = loaders
    model = model.cpu()
    example = next(iter(train_loader))[0][:1]
    model = prune(model, step.value, criterion="magnitude", granularity="channel", example_inputs=example)
    before = evaluate(model, val_loader)
    rec_cfg = TrainConfig.from_dict({**cfg.to_dict(), "epochs": max(1, cfg.epochs // 2),
                                     "lr": cfg.lr * PRUNE_LR_FACTOR, "warmup_epochs": 0.0})
    res = fit(model, train_loader, val_loader, rec_cfg)
    model = model.cpu()
    return model, {"step": "prune", "amount": step.value, "criterion": "magnitude", "granularity": "channel",
                   "val_top1_before_finetune": before["top1"], "epochs": _epoch_records(res.history),
                   "finetune": {"epochs": rec_cfg.epochs, "lr": rec_cfg.lr}}


def _run_quantize(model: nn.Module, step: ThenStep, loaders: tuple[Any, Any], cfg: Any) -> tuple[nn.Module, dict]:
    from zoo.compress import quantize

    train_loader, _ = loaders
    model = model.cpu().eval()
    calibration = list(_first_batches(train_loader, CALIBRATION_BATCHES)) if step.value == "static" else None
    qmodel = quantize(model, step.value, calibration=calibration)
    model = qmodel if isinstance(qmodel, nn.Module) else model
    rec = {"step": "quantize", "method": step.value}
    if calibration is not None:
        rec["calibration_images"] = int(sum(x.shape[0] for x in calibration))
    return model, rec


def _epoch_records(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"epoch": r["epoch"], "train_loss": r["train_loss"], "val_loss": r["val_loss"], "val_top1": r["top1"],
             "val_top5": r["top5"], "lr": r["lr"], "time_s": round(r["epoch_time_s"], 3)} for r in history]


# ---------------------------------------------------------------------------------------------- finetune

def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ZooError(f"{name}={short_repr(v)} is not allowed; expected an int >= {lo}")
    return v


def _model_kwargs(model_name: str, input_size: int | None, kwargs: dict[str, Any]) -> dict[str, Any]:
    from zoo._registry import model_args, model_card

    for k, why in RESERVED_KWARGS.items():
        if k in kwargs:
            raise ZooError(f"{model_name}: {k}={short_repr(kwargs[k])} cannot be given to finetune; {why}")
    card = model_card(model_name)  # unknown name -> ZooError with suggestions
    if input_size is None:
        return dict(kwargs)
    _check_int("input_size", input_size, 1)
    if "resolution" in model_args(model_name):
        if "resolution" in kwargs and kwargs["resolution"] != input_size:
            raise ZooError(f"{model_name}: input_size={input_size} and resolution={short_repr(kwargs['resolution'])} "
                           "disagree; give one of them")
        return {**kwargs, "resolution": input_size}
    if input_size < card.min_resolution:
        raise ZooError(f"{model_name}: input_size={input_size} is below the minimum {card.min_resolution} "
                       "for this model")
    return dict(kwargs)


def _build_model(model_name: str, weights: Any, num_classes: int, kwargs: dict[str, Any]) -> nn.Module:
    from zoo._registry import create

    if weights is None:
        return create(model_name, num_classes=num_classes, **kwargs)
    model = create(model_name, weights=weights, reinit_head=True, **kwargs)
    model.reset_classifier(num_classes)  # a fresh head for the new classes
    return model


def finetune(model_name: str, data: str | os.PathLike, weights: str | os.PathLike | None = None,
             freeze_backbone: bool = False, epochs: int = DEFAULT_EPOCHS, out: str | os.PathLike = "runs/finetune",
             then: str | Sequence[Any] | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE,
             lr: float | None = None, seed: int = 0, input_size: int | None = None, val_fraction: float = 0.2,
             progress: bool = True, device: str = "auto", **model_kwargs: Any) -> FinetuneResult:
    """Fine-tune `model_name` on an image folder with a new head; write out/model.safetensors and metrics.json.

    `weights` (a tag or a .safetensors path) initialises the backbone; `freeze_backbone` trains only the
    classifier; `then` adds compression steps ('prune=0.5,quantize=static'); `input_size` is the image side
    (the model's `resolution` where it has one); other keyword arguments go to zoo.create.
    """
    from zoo.data import get_loaders, scan_imagefolder
    from zoo.data.imagefolder import verify_imagefolder
    from zoo.train import TrainConfig, evaluate, fit
    from zoo.weights.checkpoint import save_checkpoint

    # 1. everything the user gave, checked before any work
    if not isinstance(model_name, str):
        raise ZooError(f"model_name={short_repr(model_name)} is not allowed; expected a registered model name")
    if not isinstance(freeze_backbone, bool):
        raise ZooError(f"freeze_backbone={short_repr(freeze_backbone)} is not allowed; expected True or False")
    steps = parse_then(then)
    kwargs = _model_kwargs(model_name, input_size, model_kwargs)
    if lr is None:
        lr = PRETRAINED_LR if weights is not None else DEFAULT_LR
    cfg = TrainConfig.from_dict({"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                                 "progress": progress, "device": device})
    if data is None or not isinstance(data, (str, os.PathLike)):
        raise ZooError(f"data={short_repr(data)} is not allowed; expected an image folder path")
    # 2. the folder: layout, classes, and every image decoded (a corrupt file fails here)
    src = scan_imagefolder(data, val_fraction)
    verify_imagefolder(data, val_fraction)
    out = make_out_dir(out, "out")  # an unusable output folder fails before any training
    # 3. the model with a fresh head for these classes
    torch.manual_seed(seed)
    model = _build_model(model_name, weights, len(src.class_names), kwargs)
    size = tuple(getattr(model, "default_input_size"))
    if input_size is not None and size[1:] != (input_size, input_size):
        size = (size[0], input_size, input_size)
    train_loader, val_loader, info = get_loaders("imagefolder", size, batch_size=batch_size, root=data, seed=seed,
                                                 val_fraction=val_fraction)
    # 4. fine-tune
    with frozen_backbone(model, freeze_backbone):
        res = fit(model, train_loader, val_loader, cfg)
    model = model.cpu()
    history = _epoch_records(res.history)
    # 5. compression steps
    records = []
    for step in steps:
        runner = _run_prune if step.name == "prune" else _run_quantize
        model, rec = runner(model, step, (train_loader, val_loader), cfg)
        m = evaluate(model, val_loader)
        rec.update(val_top1=m["top1"], val_top5=m["top5"], val_loss=m["loss"], **_size_stats(model))
        records.append(rec)
        if progress:
            print(f"{step}: val top1 {m['top1']:.2f}%  params {rec['params']:,}", flush=True)
    # 6. files
    final = evaluate(model, val_loader) if not records else {"top1": records[-1]["val_top1"],
                                                             "top5": records[-1]["val_top5"],
                                                             "loss": records[-1]["val_loss"]}
    summary = {"model": model_name, "kwargs": dict(model.zoo_kwargs) if hasattr(model, "zoo_kwargs") else kwargs,
               "weights": None if weights is None else os.fspath(weights), "freeze_backbone": freeze_backbone,
               "then": [str(s) for s in steps]}
    weights_path = save_checkpoint(model, out / "model.safetensors", classes=info.class_names, mean=info.mean,
                                   std=info.std, extra={"input_size": list(size), "finetune": summary})
    metrics = {**summary, "data": info.to_dict(), "train": cfg.to_dict(), "epochs": history, "steps": records,
               "final": {"val_top1": final["top1"], "val_top5": final["top5"], "val_loss": final["loss"],
                         **_size_stats(model)}}
    metrics_path = out / "metrics.json"
    tmp = metrics_path.with_name("metrics.json.tmp")
    tmp.write_text(json.dumps(metrics, indent=2) + "\n")
    os.replace(tmp, metrics_path)
    return FinetuneResult(model=model, out=out, weights=weights_path, metrics_file=metrics_path,
                          class_names=list(info.class_names), mean=tuple(info.mean), std=tuple(info.std),
                          input_size=size, history=history, steps=records, metrics=metrics)


# ---------------------------------------------------------------------------------------------- CLI

def _cmd_finetune(args: argparse.Namespace) -> int:
    from zoo.cli import model_kwargs_from_args

    kwargs = model_kwargs_from_args(args)
    res = finetune(args.name, args.data, weights=args.weights, freeze_backbone=args.freeze_backbone,
                   epochs=args.epochs, out=args.out, then=args.then, batch_size=args.batch_size, lr=args.lr,
                   seed=args.seed, input_size=args.input_size, val_fraction=args.val_fraction,
                   progress=not args.quiet, device=args.device, **kwargs)
    d = res.metrics["data"]
    print(f"{args.name} fine-tuned on {d['root']} ({d['num_classes']} classes, {d['num_train']} train / "
          f"{d['num_val']} val images): val top1 {res.top1:.2f}%")
    for rec in res.steps:
        print(f"  after {rec['step']}: val top1 {rec['val_top1']:.2f}%  params {rec['params']:,}  "
              f"size {rec['size_bytes'] if rec['size_bytes'] is not None else '?'} bytes")
    print(f"wrote {res.weights} and {res.metrics_file}")
    print(f"predict with: zoo predict --weights {res.weights} IMAGE [IMAGE ...]")
    return 0


def add_commands(sub: Any) -> None:
    """Add `zoo finetune` to the zoo CLI (`zoo predict` is zoo.predict's, listed in zoo.cli.COMMAND_MODULES)."""
    from zoo.cli import MODEL_FLAGS

    p = sub.add_parser(
        "finetune", help="fine-tune a model on your image folder (new head), optionally prune/quantize",
        description="Fine-tune a registered model on an image folder (root/train/<class> + root/val/<class>, or "
                    "root/<class> split deterministically) with a new classifier head. Writes OUT/model.safetensors "
                    "and OUT/metrics.json. For multi-stage pipelines, a recipe's dataset section accepts "
                    "`name: imagefolder` with a `root`.")
    p.add_argument("--model", dest="name", required=True, help="registered model name (see `zoo list`)")
    for flag, key in MODEL_FLAGS:
        if key not in RESERVED_KWARGS:
            p.add_argument(flag, dest=key, metavar=key.upper(), default=None, help=f"model argument {key}")
    p.add_argument("--kw", action="append", metavar="KEY=VALUE", default=[],
                   help="any other model argument (repeatable), e.g. --kw drop_rate=0.2")
    p.add_argument("--data", required=True, help="image folder (class folders, optionally under train/ and val/)")
    p.add_argument("--weights", default=None,
                   help="initial weights: a tag (see `zoo weights list`) or a .safetensors file")
    p.add_argument("--freeze-backbone", action="store_true", help="train only the new classifier head")
    p.add_argument("--epochs", type=int, default=DEFAULT_EPOCHS, help=f"fine-tuning epochs (default {DEFAULT_EPOCHS})")
    p.add_argument("--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help=f"default {DEFAULT_BATCH_SIZE}")
    p.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (default {DEFAULT_LR}, or {PRETRAINED_LR} with --weights)")
    p.add_argument("--seed", type=int, default=0, help="seed of the head init and the shuffling (default 0)")
    p.add_argument("--input-size", type=int, default=None,
                   help="image side the model sees (sets the model's resolution where it has one)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="validation share when the folder has no val/ (default 0.2)")
    p.add_argument("--then", default=None, metavar="STEPS",
                   help="compression after fine-tuning, comma-separated: " + "; ".join(THEN_STEPS.values()))
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--out", default="runs/finetune", help="output folder (default runs/finetune)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    p.set_defaults(func=_cmd_finetune)
