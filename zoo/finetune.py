"""Fine-tuning a zoo model on your own image folder (transfer learning with a new classifier head, as in
Yosinski et al. 2014, "How transferable are features in deep neural networks?"), optionally followed
by compression steps (structured pruning + recovery fine-tune, int8 quantization): `--then` compiles
into zoo.recipe `prune` / `quantize` stages, checked by the recipe validators and run by the recipe runners.

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
import itertools
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn as nn

from zoo._registry import create, model_args, model_card
from zoo.cli import MODEL_FLAGS, model_kwargs_from_args
from zoo.data import get_loaders, scan_imagefolder
from zoo.data.imagefolder import verify_imagefolder
from zoo.errors import ZooError
from zoo.io import check_out_file, make_out_dir
from zoo.profile import count_params
from zoo.recipe import STAGE_TYPES, RecipeError, StageContext, StageSpec
from zoo.recipe.checks import Checker, train_config
from zoo.recipe.registry import Loaders
from zoo.recipe.schema import chain_stages
from zoo.recipe.stages import REBASE_BATCHES, frozen_backbone, transfer_weights
from zoo.spec import input_size as resolve_input_size
from zoo.train import TrainConfig, evaluate, fit
from zoo.untrusted import short_repr
from zoo.weights.checkpoint import save_checkpoint, serialized_size
from zoo.weights.loading import is_weights_path, pretrained_spec, weights_source

DEFAULT_EPOCHS = 5
DEFAULT_BATCH_SIZE = 32
DEFAULT_LR = 0.05  # from scratch; with --weights the default is PRETRAINED_LR
PRETRAINED_LR = 0.01
PRUNE_LR_FACTOR = 0.2  # recovery fine-tune after pruning runs at this fraction of the learning rate
# --then quantizes last, with no fine-tune after it: the post-training int8 methods of zoo.compress.METHODS
THEN_METHODS = ("static", "dynamic")
THEN_STEPS: dict[str, str] = {
    "prune": "prune=<fraction of channels to remove, 0 < x < 1> (structured, magnitude; then a short fine-tune)",
    "quantize": "quantize=<" + "|".join(THEN_METHODS) + "> (int8; static calibrates on training batches; last step)",
}
THEN_SOURCE = "finetune"  # the stage name of the fine-tuned model the --then stages start from
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
    written: list[str] = []  # each step as the user wrote it, for error messages
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
        steps.append(ThenStep(name, _then_value(name, raw)))
        written.append(f"{name}={short_repr(raw)}")
    q = [i for i, s in enumerate(steps) if s.name == "quantize"]
    if len(q) > 1 or (q and q[0] != len(steps) - 1):
        raise ZooError(f"--then {','.join(map(str, steps))}: quantize must be the last step and appear once "
                       "(an int8 model cannot be pruned or trained further)")
    # the values, through the recipe validators (the stages' checks do not depend on the model, unknown here)
    then_specs(steps, StageSpec(THEN_SOURCE, "train", "", {}, None, 0, {}, ()), None, DEFAULT_BATCH_SIZE, written)
    return steps


def _then_value(name: str, raw: Any) -> Any:
    """The value of one step as the stage takes it: a number for prune, a method name for quantize."""
    if name == "quantize":
        if raw not in THEN_METHODS:
            raise ZooError(f"--then quantize={short_repr(raw)} is not allowed; allowed: {', '.join(THEN_METHODS)}")
        return raw
    if isinstance(raw, bool) or not isinstance(raw, (str, int, float)):
        raise ZooError(f"--then prune={short_repr(raw)} is not allowed; expected a number, e.g. prune=0.5")
    try:
        return float(raw)
    except ValueError:
        raise ZooError(f"--then prune={short_repr(raw)} is not allowed; expected a number, e.g. prune=0.5") from None


class _ThenChecker(Checker):
    """Recipe-validator errors about --then stages, named by the step as written (e.g. `--then prune='1.5'`)."""

    def __init__(self, written: dict[str, str]) -> None:
        super().__init__("--then")
        self.written = written

    def fail(self, path: str, msg: str) -> RecipeError:
        """The error of a --then step's stage: `--then <step as written>: <problem>`."""
        parts = path.split(".")
        step = self.written.get(parts[1], path) if len(parts) > 1 and parts[0] == "stages" else path
        return RecipeError(f"--then {step}: {msg}")


def then_stages(steps: Sequence[ThenStep], recovery: dict[str, Any] | None, batch_size: int) -> dict[str, dict]:
    """The recipe stages (name -> stage as a recipe would write it, without `from`) of `--then` steps:
    prune=x is a structured magnitude prune stage with `recovery` as its finetune block (None: none), and
    quantize=m a quantize stage calibrating (static) and evaluating on batches of `batch_size` images."""
    out: dict[str, dict] = {}
    for s in steps:
        name = s.name if s.name not in out else f"{s.name}_{sum(k.startswith(s.name) for k in out) + 1}"
        if s.name == "prune":
            st: dict[str, Any] = {"type": "prune", "amount": s.value, "criterion": "magnitude",
                                  "granularity": "channel"}
            if recovery is not None:
                st["finetune"] = dict(recovery)
        else:
            st = {"type": "quantize", "method": s.value, "batch_size": batch_size}
        out[name] = st
    return out


def then_specs(steps: Sequence[ThenStep], source: StageSpec, recovery: dict[str, Any] | None, batch_size: int,
               written: Sequence[str] | None = None) -> list[StageSpec]:
    """The validated stage specs of `--then` steps, chained from `source` (the recipe validators check them)."""
    stages = then_stages(steps, recovery, batch_size)
    names = dict(zip(stages, written if written is not None else map(str, steps)))
    return chain_stages(_ThenChecker(names), source, stages)


# ---------------------------------------------------------------------------------------------- steps

def _size_stats(model: nn.Module) -> dict[str, Any]:
    out: dict[str, Any] = {"params": int(count_params(model))}
    try:
        out["size_bytes"] = int(serialized_size(model))
    except Exception as e:  # noqa: BLE001 - a format the serialiser cannot measure is reported, not fatal
        out["size_bytes"] = None
        out["size_note"] = f"{type(e).__name__}: {e}"
    return out


def then_recovery(cfg: TrainConfig) -> dict[str, Any]:
    """The finetune block of a --then prune stage: half the epochs (at least one) at a fifth of the learning rate,
    no warm-up, otherwise the fine-tune's own settings."""
    return {"epochs": max(1, cfg.epochs // 2), "batch_size": cfg.batch_size, "lr": cfg.lr * PRUNE_LR_FACTOR,
            "warmup_epochs": 0.0, "progress": cfg.progress, "device": cfg.device}


def _run_steps(model: nn.Module, steps: list[tuple[ThenStep, StageSpec]], data: Loaders,
               size: tuple[int, int, int], seed: int, progress: bool) -> tuple[nn.Module, list[dict[str, Any]]]:
    """Run the --then stages on the fine-tuned model with the recipe runners; one record per step."""
    batch_size = data[0].batch_size

    def loaders(bs: int) -> Loaders:
        if bs != batch_size:  # then_stages asks for batches of the fine-tune's size only
            raise ZooError(f"finetune --then: a step asked for batches of {bs} images; the loaders hold {batch_size}")
        return data

    records = []
    for step, spec in steps:
        dataset = {"name": "imagefolder", "input_size": list(size), "num_classes": data[2].num_classes}
        ctx = StageContext(spec=spec, seed=seed, options=spec.options, raw={}, input_size=size, dataset=dataset,
                           loaders=loaders, stage_model=lambda name, m=model: m)
        model, metrics = STAGE_TYPES[spec.type].runner(ctx)
        rec = _step_record(spec, ctx, metrics)
        rec.update(val_top1=metrics["top1"], val_top5=metrics["top5"], val_loss=metrics["loss"], **_size_stats(model))
        records.append(rec)
        if progress:
            print(f"{step}: val top1 {metrics['top1']:.2f}%  params {rec['params']:,}", flush=True)
    return model, records


def _step_record(spec: StageSpec, ctx: StageContext, metrics: dict[str, Any]) -> dict[str, Any]:
    """What metrics.json says about one --then step (before its validation metrics and sizes)."""
    o = spec.options
    if spec.type == "quantize":
        rec: dict[str, Any] = {"step": "quantize", "method": o["method"]}
        if "calibration_images" in ctx.report:
            rec["calibration_images"] = ctx.report["calibration_images"]
        return rec
    cfg = train_config(o["train"], ctx.seed)
    return {"step": "prune", "amount": o["amount"], "criterion": o["criterion"], "granularity": o["granularity"],
            "val_top1_before_finetune": metrics["top1_before_finetune"],
            "epochs": _epoch_records(ctx.report["finetunes"][-1].history),
            "finetune": {"epochs": cfg.epochs, "lr": cfg.lr}}


def _epoch_records(history: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"epoch": r["epoch"], "train_loss": r["train_loss"], "val_loss": r["val_loss"], "val_top1": r["top1"],
             "val_top5": r["top5"], "lr": r["lr"], "time_s": round(r["epoch_time_s"], 3)} for r in history]


# ---------------------------------------------------------------------------------------------- finetune

def _check_int(name: str, v: Any, lo: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < lo:
        raise ZooError(f"{name}={short_repr(v)} is not allowed; expected an int >= {lo}")
    return v


def _model_kwargs(model_name: str, input_size: int | None, kwargs: dict[str, Any]) -> dict[str, Any]:
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


def _transfer(model: nn.Module, name: str, weights: str | os.PathLike, kwargs: dict[str, Any], loader: Any,
              data_norm: tuple) -> None:
    """Start `model` (fresh, new head) from `weights` as a recipe's `init` does (zoo.recipe.stages.transfer_weights):
    backbone copied, first conv adapted from the weights' input normalisation to the data's, BatchNorm re-based."""
    if is_weights_path(weights):
        src, trained = weights_source(weights, lambda: create(name, num_classes=model.spec.kwargs["num_classes"],
                                                              **kwargs))
    else:
        src = create(name, weights=weights, reinit_head=True, **kwargs)
        trained = (src.spec.mean, src.spec.std) if src.spec.mean is not None and src.spec.std is not None else None
    batches = [x for x, _ in itertools.islice(loader, REBASE_BATCHES)]
    transfer_weights(model, src, trained, data_norm, batches, f"--weights {os.fspath(weights)!r}")


def finetune(model_name: str | None, data: str | os.PathLike, weights: str | os.PathLike | None = None,
             freeze_backbone: bool = False, epochs: int = DEFAULT_EPOCHS, out: str | os.PathLike = "runs/finetune",
             then: str | Sequence[Any] | None = None, *, batch_size: int = DEFAULT_BATCH_SIZE,
             lr: float | None = None, seed: int = 0, input_size: int | None = None, val_fraction: float = 0.2,
             progress: bool = True, device: str = "auto", precision: str = "fp32",
             **model_kwargs: Any) -> FinetuneResult:
    """Fine-tune `model_name` on an image folder with a new head; write out/model.safetensors and metrics.json.

    `weights` (a tag, a zoo .safetensors checkpoint, another project's state dict or a TFLite MobileNet)
    initialises the backbone as a recipe's `init` does; a file's header gives the model and its kwargs, so
    `model_name` is needed only with a tag, a foreign state dict or no weights (given, it must agree);
    `freeze_backbone` trains only the classifier; `then` adds compression steps ('prune=0.5,quantize=static'); `input_size` is the image side
    (the model's `resolution` where it has one); other keyword arguments go to zoo.create. The `then` steps
    compile into recipe stages (`then_specs`) and run through the recipe's prune / quantize runners.
    """
    # 1. everything the user gave, checked before any work
    if not (isinstance(model_name, str) or (model_name is None and weights is not None)):
        raise ZooError(f"model_name={short_repr(model_name)} (--model) is not allowed; expected a registered model "
                       "name (it may be left out when --weights names a file)")
    if not isinstance(freeze_backbone, bool):
        raise ZooError(f"freeze_backbone={short_repr(freeze_backbone)} is not allowed; expected True or False")
    if weights is not None and not (isinstance(weights, os.PathLike) or (isinstance(weights, str) and weights)):
        raise ZooError(f"weights={short_repr(weights)} is not allowed; expected a tag or a weights file")
    steps = parse_then(then)
    for k, why in RESERVED_KWARGS.items():
        if k in model_kwargs:
            raise ZooError(f"{k}={short_repr(model_kwargs[k])} cannot be given to finetune; {why}")
    model_name, kwargs = ((model_name, model_kwargs) if weights is None else
                          pretrained_spec(weights, model_name, model_kwargs, "--model (model_name)"))
    kwargs = _model_kwargs(model_name, input_size, kwargs)
    if lr is None:
        lr = PRETRAINED_LR if weights is not None else DEFAULT_LR
    cfg = TrainConfig.from_dict({"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
                                 "progress": progress, "device": device, "precision": precision})
    specs = then_specs(steps, StageSpec(THEN_SOURCE, "train", model_name, kwargs, None, seed, {}, ()),
                       then_recovery(cfg), batch_size)
    if data is None or not isinstance(data, (str, os.PathLike)):
        raise ZooError(f"data={short_repr(data)} is not allowed; expected an image folder path")
    # 2. the folder: layout, classes, and every image decoded (a corrupt file fails here)
    src = scan_imagefolder(data, val_fraction)
    verify_imagefolder(data, val_fraction)
    if Path(out).is_dir():  # a folder where the weights file goes (other unusable --out paths: make_out_dir)
        check_out_file(Path(out) / "model.safetensors", "--out file")
    out = make_out_dir(out, "out")  # an unusable output folder fails before any training
    # 3. the model with a fresh head for these classes
    torch.manual_seed(seed)
    model = create(model_name, num_classes=len(src.class_names), **kwargs)
    size = resolve_input_size(model, input_size, what="input_size")
    train_loader, val_loader, info = get_loaders("imagefolder", size, batch_size=batch_size, root=data, seed=seed,
                                                 val_fraction=val_fraction)
    if weights is not None:
        _transfer(model, model_name, weights, kwargs, train_loader, (info.mean, info.std))
    # 4. fine-tune
    with frozen_backbone(model, freeze_backbone):
        res = fit(model, train_loader, val_loader, cfg)
    model = model.cpu()
    history = _epoch_records(res.history)
    # 5. compression steps: the recipe's runners
    model, records = _run_steps(model, list(zip(steps, specs)), (train_loader, val_loader, info), size, seed,
                                progress)
    # 6. files
    final = evaluate(model, val_loader) if not records else {"top1": records[-1]["val_top1"],
                                                             "top5": records[-1]["val_top5"],
                                                             "loss": records[-1]["val_loss"]}
    summary = {"model": model_name, "kwargs": dict(model.spec.kwargs),
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
    if args.name is None and args.weights is None:
        raise ZooError("--model is required unless --weights names a weights file (whose header gives the model)")
    if args.name is None:  # the file's model, so that --kw values are typed for it
        args.name = pretrained_spec(args.weights, None, {}, "--model")[0]
    kwargs = model_kwargs_from_args(args)
    res = finetune(args.name, args.data, weights=args.weights, freeze_backbone=args.freeze_backbone,
                   epochs=args.epochs, out=args.out, then=args.then, batch_size=args.batch_size, lr=args.lr,
                   seed=args.seed, input_size=args.input_size, val_fraction=args.val_fraction,
                   progress=not args.quiet, device=args.device, precision=args.precision, **kwargs)
    d = res.metrics["data"]
    print(f"{res.metrics['model']} fine-tuned on {d['root']} ({d['num_classes']} classes, {d['num_train']} train / "
          f"{d['num_val']} val images): val top1 {res.top1:.2f}%")
    for rec in res.steps:
        print(f"  after {rec['step']}: val top1 {rec['val_top1']:.2f}%  params {rec['params']:,}  "
              f"size {rec['size_bytes'] if rec['size_bytes'] is not None else '?'} bytes")
    print(f"wrote {res.weights} and {res.metrics_file}")
    print(f"predict with: zoo predict --weights {res.weights} IMAGE [IMAGE ...]")
    return 0


def add_commands(sub: Any) -> None:
    """Add `zoo finetune` to the zoo CLI (`zoo predict` is zoo.predict's, listed in zoo.cli.COMMAND_MODULES)."""
    p = sub.add_parser(
        "finetune", help="fine-tune a model on your image folder (new head), optionally prune/quantize",
        description="Fine-tune a registered model on an image folder (root/train/<class> + root/val/<class>, or "
                    "root/<class> split deterministically) with a new classifier head. Writes OUT/model.safetensors "
                    "and OUT/metrics.json. For multi-stage pipelines, a recipe's dataset section accepts "
                    "`name: imagefolder` with a `root`.")
    p.add_argument("--model", dest="name", default=None,
                   help="registered model name (see `zoo list`); optional with a --weights file, whose header gives "
                        "the model and its kwargs (given, it must agree)")
    for flag, key in MODEL_FLAGS:
        if key not in RESERVED_KWARGS:
            p.add_argument(flag, dest=key, metavar=key.upper(), default=None, help=f"model argument {key}")
    p.add_argument("--kw", action="append", metavar="KEY=VALUE", default=[],
                   help="any other model argument (repeatable), e.g. --kw drop_rate=0.2")
    p.add_argument("--data", required=True, help="image folder (class folders, optionally under train/ and val/)")
    p.add_argument("--weights", default=None,
                   help="initial weights: a tag (see `zoo weights list`), a .safetensors file or a TFLite MobileNet; "
                        "the backbone is transferred as a recipe's `init` (first conv adapted to the folder's "
                        "normalisation, BatchNorm re-based, new head)")
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
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "auto"],
                   help="fp32, bf16 autocast, or auto: bf16 where the CPU has it natively and a probe measures it "
                        "faster (default fp32)")
    p.add_argument("--out", default="runs/finetune", help="output folder (default runs/finetune)")
    p.add_argument("--quiet", action="store_true", help="no per-epoch lines")
    p.set_defaults(func=_cmd_finetune)
