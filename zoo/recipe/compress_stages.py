"""Compression recipe stages: `prune`, `quantize` and `lowrank`, each with optional fine-tuning.

They transform the model of an earlier stage (`from:`) with zoo.compress:

* `prune`: Han et al. 2015 ("Learning both Weights and Connections for Efficient Neural Networks")
  unstructured magnitude pruning with retraining, structured channel pruning (Li et al. 2017) by the
  magnitude / taylor / hessian / loss_change criteria, gradual pruning on the cubic schedule of Zhu &
  Gupta 2017 (`schedule: iterative`) and SNIP at initialisation (Lee et al. 2019, `schedule: snip`).
* `quantize`: int8 dynamic / static / QAT (Jacob et al. 2018) and STE binary / ternary / k-bit weights.
* `lowrank`: SVD / Tucker-2 factorisation (Denton et al. 2014, Kim et al. 2016) by rank or energy.

The optional `finetune:` block holds zoo.train.TrainConfig keys over `defaults.finetune` (`true`
takes `defaults.finetune` as it is); `--quick` overrides it with the recipe's quick.finetune (default:
quick.train, as for every train section). A prune stage's `kd:` distils that fine-tune from the stage's own
dense `from` model (Hinton et al. 2015), which recovers the accuracy pruning removed faster than labels
alone. The final model is evaluated on the held-out images after compression (for QAT: after conversion to
int8).

The option vocabularies (criteria, granularities, scopes, methods, backends, observers) are zoo.compress's;
zoo.finetune's `--then` steps compile into these stages and run through these runners.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn as nn

from zoo.compress import (BACKENDS, CRITERIA, GRANULARITIES, METHODS, OBSERVERS, SCOPES, convert, low_rank,
                          make_permanent, prune, prune_iterative, quantize, snip, sparsity)
from zoo.compress.pt2e import is_pt2e
from zoo.distill import KDConfig, distill
from zoo.recipe.checks import Checker, check_kd_config, check_train_config, train_config
from zoo.recipe.registry import StageContext, StageType
from zoo.train import evaluate, fit

SCHEDULES = ("one_shot", "iterative", "snip")  # prune, prune_iterative, snip of zoo.compress
DEFAULT_BATCH_SIZE = 64  # images per batch of criterion / calibration data and of the evaluation
FINETUNE_DOC = ("fine-tuning: zoo.train.TrainConfig keys over defaults.finetune (true: defaults.finetune as is; "
                "absent or false: none)")

PRUNE_KEYS = {
    "amount": "fraction pruned, in (0, 1): of the prunable weights (granularity weight) or of the channel units; "
              "or, for weights, a mapping layer path -> fraction (layer-wise rates as in Han et al. 2015; "
              "unlisted layers stay dense)",
    "criterion": "one of " + ", ".join(CRITERIA) + " (default magnitude)",
    "granularity": "weight (unstructured masks) or channel (structured, physical removal); default weight",
    "scope": "global (rank across layers, default) or layer (same fraction in every layer)",
    "schedule": "one_shot (default), iterative (cubic schedule, fine-tune after each step) or snip (prune a "
                "fresh, untrained model of the `from` architecture at initialisation, then train it with finetune)",
    "steps": "number of pruning steps of the iterative schedule (int >= 1; default 3)",
    "protect": "list of layer paths (or 'first' / 'last') never pruned; default: zoo.compress's",
    "batches": "training batches fed to the data-driven criteria (taylor, hessian, loss_change; default 4)",
    "batch_size": "images per batch of that criterion data (default 64); loss_change costs one forward pass "
                  "of all of them per channel unit",
    "round_to": "granularity channel only: kept channel counts rounded up to a multiple of this int >= 1 "
                "(e.g. 8, for fast kernels), capped at each layer's own count; default: no rounding",
    "finetune": FINETUNE_DOC + "; iterative: this fine-tune runs after every step",
    "kd": "distil the fine-tune from this stage's dense `from` model: true (defaults.kd as is) or zoo.distill "
          "KDConfig keys over defaults.kd (temperature, alpha); needs finetune, not with schedule snip",
}
QUANT_KEYS = {
    "method": "one of " + ", ".join(METHODS),
    "calibration": "training batches used to calibrate static int8 (int >= 1; default 8)",
    "batch_size": "images per batch of the static calibration, and of the evaluation without a finetune block "
                  "(default 64)",
    "bits": "bits of weights_kbit (2..8)",
    "backend": "int8 engine: " + ", ".join(BACKENDS) + " (default auto)",
    "observer": "static activation observer: histogram (default) or minmax",
    "protect": "layers kept in float by binary / ternary / weights_kbit (default first and last)",
    "finetune": FINETUNE_DOC + "; required for qat (fake-quant training, then conversion to int8)",
}
LOWRANK_KEYS = {
    "rank": "rank of every factorised layer (int >= 1), or use energy",
    "energy": "fraction in (0, 1] of the squared singular values each layer keeps, or use rank",
    "finetune": FINETUNE_DOC,
}


# --------------------------------------------------------------------------- validation


def _choice(chk: Checker, stage: dict, path: str, key: str, allowed: tuple[str, ...], default: str) -> str:
    if key not in stage:
        return default
    v = chk.typed(stage[key], f"{path}.{key}", "str")
    if v not in allowed:
        raise chk.fail(f"{path}.{key}", f"{v!r} is not allowed; allowed: " + ", ".join(allowed))
    return v


def _int(chk: Checker, stage: dict, path: str, key: str, default: int | None, lo: int, hi: int | None = None
         ) -> int | None:
    if key not in stage:
        return default
    v = chk.typed(stage[key], f"{path}.{key}", "int")
    if v < lo or (hi is not None and v > hi):
        want = f"an int in {lo}..{hi}" if hi is not None else f"an int >= {lo}"
        raise chk.fail(f"{path}.{key}", f"{v} is not allowed; expected {want}")
    return v


def _fraction(chk: Checker, stage: dict, path: str, key: str, closed_top: bool = False) -> float:
    v = chk.typed(stage[key], f"{path}.{key}", "float")
    if not (0.0 < v < 1.0 or (closed_top and v == 1.0)):
        raise chk.fail(f"{path}.{key}", f"{v:g} is not allowed; expected a number in (0, {'1]' if closed_top else '1)'}")
    return v


def _finetune(chk: Checker, path: str, stage: dict, defaults: dict) -> dict[str, Any] | None:
    """The stage's fine-tune TrainConfig (merged over defaults.finetune), or None for no fine-tuning."""
    base = check_train_config(chk, "defaults.finetune", defaults.get("finetune", {}) or {}, partial=True)
    v = stage.get("finetune")
    if v is None or v is False:
        return None
    if v is True:
        return check_train_config(chk, f"{path}.finetune", dict(base))
    own = check_train_config(chk, f"{path}.finetune", chk.mapping(v, f"{path}.finetune"), partial=True)
    return check_train_config(chk, f"{path}.finetune", {**base, **own})


def _protect(chk: Checker, stage: dict, path: str) -> list[str] | None:
    if "protect" not in stage:
        return None
    return list(chk.typed(stage["protect"], f"{path}.protect", "str_list"))


def _validate_prune(chk: Checker, path: str, stage: dict, defaults: dict) -> dict[str, Any]:
    if "amount" not in stage:
        raise chk.fail(f"{path}.amount", "missing required key (" + PRUNE_KEYS["amount"] + ")")
    schedule = _choice(chk, stage, path, "schedule", SCHEDULES, "one_shot")
    if isinstance(stage["amount"], dict):
        amounts = chk.mapping(stage["amount"], f"{path}.amount")
        if not amounts:
            raise chk.fail(f"{path}.amount", "an empty mapping; give layer path -> fraction pairs")
        amount: float | dict[str, float] = {k: _fraction(chk, amounts, f"{path}.amount", k) for k in amounts}
        for k in ("granularity", "scope", "protect"):
            if k in stage and not (k == "granularity" and stage[k] == "weight"):
                raise chk.fail(f"{path}.{k}", "not allowed with layer-wise amounts (each listed layer is pruned to "
                                              "its own fraction; unlisted layers stay dense)")
        if schedule == "snip":
            raise chk.fail(f"{path}.amount", "schedule snip takes one global fraction")
    else:
        amount = _fraction(chk, stage, path, "amount")
    if schedule == "snip":
        for k in ("criterion", "granularity", "scope"):
            if k in stage:
                raise chk.fail(f"{path}.{k}", "not allowed with schedule: snip (SNIP ranks single weights globally "
                                              "by connection sensitivity |g * w| on one batch)")
    criterion = _choice(chk, stage, path, "criterion", CRITERIA, "magnitude")
    granularity = _choice(chk, stage, path, "granularity", GRANULARITIES, "weight")
    if criterion == "loss_change" and granularity != "channel":
        raise chk.fail(f"{path}.criterion", "loss_change measures removing whole channel units; use it with "
                                            "granularity: channel")
    if "steps" in stage and schedule != "iterative":
        raise chk.fail(f"{path}.steps", "only used with schedule: iterative")
    if "round_to" in stage and (granularity != "channel" or schedule == "snip"):
        raise chk.fail(f"{path}.round_to", "only used with granularity: channel (it rounds kept channel counts)")
    ft = _finetune(chk, path, stage, defaults)
    if schedule in ("snip", "iterative") and ft is None:
        raise chk.fail(f"{path}.finetune", f"missing: schedule {schedule} needs a finetune block "
                                           + ("(SNIP trains the pruned network from scratch)" if schedule == "snip"
                                              else "(the retraining after each pruning step)"))
    out: dict[str, Any] = {
        "amount": amount, "criterion": "taylor" if schedule == "snip" else criterion,
        "granularity": "weight" if schedule == "snip" else granularity,
        "scope": _choice(chk, stage, path, "scope", SCOPES, "global"), "schedule": schedule,
        "steps": _int(chk, stage, path, "steps", 3, 1) if schedule == "iterative" else None,
        "protect": _protect(chk, stage, path), "batches": _int(chk, stage, path, "batches", 4, 1),
        "batch_size": _int(chk, stage, path, "batch_size", DEFAULT_BATCH_SIZE, 1),
    }
    if "round_to" in stage:  # only when given: the options hash of existing recipes stays the same
        out["round_to"] = _int(chk, stage, path, "round_to", None, 1)
    if ft is not None:
        out["train"] = ft
    if "kd" in stage:  # only when given: the options hash of existing recipes stays the same
        out["kd"] = _kd(chk, path, stage, defaults, ft is not None and schedule != "snip")
    return out


def _kd(chk: Checker, path: str, stage: dict, defaults: dict, allowed: bool) -> dict[str, Any]:
    """A prune stage's `kd:` (true, or KD keys over defaults.kd) as a complete KD config."""
    if not allowed:
        raise chk.fail(f"{path}.kd", "needs a finetune block, and a teacher: schedule snip has no trained dense "
                                     "model to distil from")
    v = stage["kd"]
    base = check_kd_config(chk, "defaults.kd", defaults.get("kd", {}) or {}, partial=True)
    if isinstance(v, bool) and v:
        return check_kd_config(chk, f"{path}.kd", dict(base))
    own = check_kd_config(chk, f"{path}.kd", chk.mapping(v, f"{path}.kd") if not isinstance(v, bool) else v,
                          partial=True)
    return check_kd_config(chk, f"{path}.kd", {**base, **own})


def _validate_quantize(chk: Checker, path: str, stage: dict, defaults: dict) -> dict[str, Any]:
    if "method" not in stage:
        raise chk.fail(f"{path}.method", "missing required key; allowed: " + ", ".join(METHODS))
    method = _choice(chk, stage, path, "method", METHODS, "")
    if "calibration" in stage and method != "static":
        raise chk.fail(f"{path}.calibration", "only used with method: static")
    if method == "weights_kbit" and "bits" not in stage:
        raise chk.fail(f"{path}.bits", "missing: method weights_kbit needs bits (2..8)")
    if "bits" in stage and method != "weights_kbit":
        raise chk.fail(f"{path}.bits", "only used with method: weights_kbit")
    if "observer" in stage and method != "static":
        raise chk.fail(f"{path}.observer", "only used with method: static")
    if "protect" in stage and method not in ("binary", "ternary", "weights_kbit"):
        raise chk.fail(f"{path}.protect", "only used with methods binary, ternary and weights_kbit")
    ft = _finetune(chk, path, stage, defaults)
    if method == "qat" and ft is None:
        raise chk.fail(f"{path}.finetune", "missing: method qat needs a finetune block (the fake-quant training)")
    if method in ("dynamic", "static") and ft is not None:
        raise chk.fail(f"{path}.finetune", f"method {method} is post-training (an int8 model cannot be trained); "
                                           "use method: qat to fine-tune")
    out: dict[str, Any] = {
        "method": method, "calibration": _int(chk, stage, path, "calibration", 8, 1) if method == "static" else None,
        "bits": _int(chk, stage, path, "bits", None, 2, 8),
        "backend": _choice(chk, stage, path, "backend", BACKENDS, "auto"),
        "observer": _choice(chk, stage, path, "observer", OBSERVERS, "histogram"),
        "protect": _protect(chk, stage, path),
    }
    if "batch_size" in stage:  # only when given: the options hash of existing recipes stays the same
        out["batch_size"] = _int(chk, stage, path, "batch_size", None, 1)
    if ft is not None:
        out["train"] = ft
    return out


def _validate_lowrank(chk: Checker, path: str, stage: dict, defaults: dict) -> dict[str, Any]:
    if ("rank" in stage) == ("energy" in stage):
        raise chk.fail(f"{path}.rank" if "rank" in stage else path,
                       "give exactly one of `rank` (int >= 1) or `energy` (a fraction in (0, 1])")
    out: dict[str, Any] = {"rank": _int(chk, stage, path, "rank", None, 1),
                           "energy": _fraction(chk, stage, path, "energy", closed_top=True) if "energy" in stage
                           else None}
    ft = _finetune(chk, path, stage, defaults)
    if ft is not None:
        out["train"] = ft
    return out


# --------------------------------------------------------------------------- runners


def _train_batches(ctx: StageContext, n: int, batch_size: int = DEFAULT_BATCH_SIZE
                   ) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first n batches of the stage's (seed-shuffled) training loader, for criteria and calibration."""
    train_loader, _, _ = ctx.loaders(batch_size)
    out = []
    for x, y in train_loader:
        out.append((x, y))
        if len(out) >= n:
            break
    return out


def _finetune_run(ctx: StageContext, model: nn.Module, sub: str, checkpoints: bool = True,
                  teacher: nn.Module | None = None) -> dict[str, Any]:
    """Fine-tune in place with the stage's finetune config (checkpoints in <stage dir>/<sub>, unless the
    model has no storage form while it trains: a PT2E fake-quant graph reruns its stage if interrupted);
    with a `teacher`, distilled from it with the stage's `kd` config."""
    cfg = train_config(ctx.options["train"], ctx.seed)
    train_loader, val_loader, _ = ctx.loaders(cfg.batch_size)
    out_dir = None if ctx.dir is None or not checkpoints else ctx.dir / sub
    if teacher is not None:
        result = distill(model, teacher, train_loader, val_loader, cfg, KDConfig.from_dict(ctx.options["kd"]),
                         out_dir=out_dir, meta=ctx.meta)
    else:
        result = fit(model, train_loader, val_loader, cfg, out_dir=out_dir, resume=False, meta=ctx.meta)
    ctx.report.setdefault("finetunes", []).append(result)
    return {"epochs": len(result.history), "top1": float(result.final["top1"])}


def _evaluate(ctx: StageContext, model: nn.Module) -> dict[str, float]:
    """Validation metrics on the CPU, in batches of the fine-tune (else of a static quantize's calibration)."""
    o = ctx.options
    if "train" in o:
        batch_size = o["train"].get("batch_size", DEFAULT_BATCH_SIZE)
    else:
        batch_size = o.get("batch_size", DEFAULT_BATCH_SIZE) if ctx.spec.type == "quantize" else DEFAULT_BATCH_SIZE
    _, val_loader, _ = ctx.loaders(batch_size)
    return evaluate(model.cpu(), val_loader, torch.device("cpu"))


def _metrics(ctx: StageContext, model: nn.Module, before: dict[str, float] | None, ft_epochs: int
             ) -> dict[str, Any]:
    """The stage's metrics: validation top-1/top-5/loss, top-1 before the fine-tune, its epochs, sparsity."""
    m = _evaluate(ctx, model)
    out: dict[str, Any] = {k: float(m[k]) for k in ("top1", "top5", "loss")}
    if before is not None:
        out["top1_before_finetune"] = float(before["top1"])
    out["finetune_epochs"] = ft_epochs
    out["sparsity"] = float(sparsity(model))
    return out


def _example(ctx: StageContext) -> torch.Tensor:
    return torch.zeros(1, *ctx.input_size)


def run_prune(ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    """Prune the `from` model (one-shot, iterative or SNIP at initialisation), fine-tune, bake the masks.

    A layer-wise amount (a mapping layer path -> fraction) goes to zoo.compress as it is: each listed layer
    is pruned to its own fraction (iterative: on its own cubic schedule), the others stay dense."""
    o = ctx.options
    data_needed = o["criterion"] in ("taylor", "hessian", "loss_change")
    data = _train_batches(ctx, o["batches"], o["batch_size"]) if data_needed else None
    kw: dict[str, Any] = {"max_batches": o["batches"]} if data_needed else {}
    if o["protect"] is not None:
        kw["protect"] = o["protect"]
    if o.get("round_to") is not None:
        kw["round_to"] = o["round_to"]
    before, ft_epochs = None, 0
    dense = ctx.initial_model() if o["schedule"] != "snip" else None
    teacher = copy.deepcopy(dense) if "kd" in o else None  # the stage's own dense model
    if o["schedule"] == "snip":
        # a fresh network of the `from` architecture, initialised like a train stage
        model = snip(ctx.fresh_model(), o["amount"], data=_train_batches(ctx, 1, o["batch_size"]),
                     protect=o["protect"])
        ft_epochs = _finetune_run(ctx, model, "finetune")["epochs"]
    elif o["schedule"] == "iterative":

        def fine_tune(m: nn.Module, step: int) -> None:
            nonlocal ft_epochs
            ft_epochs += _finetune_run(ctx, m, f"finetune_step{step + 1}", teacher=teacher)["epochs"]

        model = prune_iterative(dense, o["amount"], o["steps"], fine_tune, o["criterion"],
                                o["granularity"], o["scope"], data, example_inputs=_example(ctx), **kw)
    else:
        model = prune(dense, o["amount"], o["criterion"], o["granularity"], o["scope"], data=data,
                      example_inputs=_example(ctx), **kw)
        if "train" in o:
            before = _evaluate(ctx, model)
            ft_epochs = _finetune_run(ctx, model, "finetune", teacher=teacher)["epochs"]
    # masks -> plain weights with real zeros (a no-op for channel pruning); reported with sparse storage
    model = make_permanent(model.cpu())
    return model, _metrics(ctx, model, before, ft_epochs)


def run_quantize(ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    """Quantize the `from` model: int8 post-training, QAT (fine-tune, then convert) or STE weights."""
    o = ctx.options
    source = ctx.initial_model().cpu()
    kw: dict[str, Any] = {"backend": o["backend"]}
    if o["method"] == "static":
        calibration = _train_batches(ctx, o["calibration"], o.get("batch_size", DEFAULT_BATCH_SIZE))
        ctx.report["calibration_images"] = sum(int(x.shape[0]) for x, _ in calibration)
        kw.update(calibration=calibration, observer=o["observer"])
    if o["method"] == "weights_kbit":
        kw["bits"] = o["bits"]
    if o["protect"] is not None:
        kw["protect"] = o["protect"]
    model = quantize(source, o["method"], **kw)
    before, ft_epochs = None, 0
    if "train" in o:
        # (a QAT model's observers have seen no data before its fine-tune: no meaningful int8 accuracy yet)
        before = None if o["method"] == "qat" else _evaluate(ctx, model)
        ft_epochs = _finetune_run(ctx, model, "finetune", checkpoints=not is_pt2e(model))["epochs"]
        model = model.cpu()
    if o["method"] == "qat":
        model = convert(model)
    return model, _metrics(ctx, model, before, ft_epochs)


def run_lowrank(ctx: StageContext) -> tuple[nn.Module, dict[str, Any]]:
    """Factorise the `from` model by rank or energy, then fine-tune it (optional)."""
    o = ctx.options
    model = low_rank(ctx.initial_model().cpu(), rank=o["rank"], energy=o["energy"], example_inputs=_example(ctx))
    before, ft_epochs = None, 0
    if "train" in o:
        before = _evaluate(ctx, model)
        ft_epochs = _finetune_run(ctx, model, "finetune")["epochs"]
    return model.cpu(), _metrics(ctx, model, before, ft_epochs)


PRUNE = StageType(name="prune", keys=PRUNE_KEYS, validate=_validate_prune, runner=run_prune, needs_model=False,
                  finetunes=True, doc="pruning (zoo.compress.prune) with optional fine-tuning")
QUANTIZE = StageType(name="quantize", keys=QUANT_KEYS, validate=_validate_quantize, runner=run_quantize,
                     needs_model=False, finetunes=True,
                     doc="quantization (zoo.compress.quantize) with optional QAT / STE fine-tuning")
LOWRANK = StageType(name="lowrank", keys=LOWRANK_KEYS, validate=_validate_lowrank, runner=run_lowrank,
                    needs_model=False, finetunes=True,
                    doc="low-rank factorisation (zoo.compress.low_rank) with optional fine-tuning")


def check_finetune_defaults(chk: Checker, path: str, d: dict) -> dict[str, Any]:
    """The `defaults.finetune` section: train-config keys, each checked on its own."""
    return check_train_config(chk, path, d, partial=True)
