"""Configuration and results of zoo training: `TrainConfig` (validated on construction), `config_from_dict`,
`TrainResult`, `TrainingDiverged` and the learning-rate schedule `lr_at`.

This module depends only on zoo.errors; the loop, checkpoint and CLI modules build on it.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping

from zoo.errors import ZooError

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "linear", "step", "constant")
PRECISIONS = ("fp32", "bf16", "auto")


def config_from_dict(cls: type, d: Mapping[str, Any], what: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys with the list of accepted ones."""
    if not isinstance(d, Mapping):
        raise ZooError(f"{what} config must be a mapping of {cls.__name__} keys, got {type(d).__name__}")
    accepted = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in d if k not in accepted]
    if unknown:
        raise ZooError(f"unknown {what} config key(s) {', '.join(map(repr, unknown))}; accepted: "
                       + ", ".join(accepted))
    return cls(**d)


@dataclass
class TrainConfig:
    """Hyper-parameters of `fit`; validated on construction."""

    epochs: int = 10  # passes over the training set
    batch_size: int = 64  # images per step and process; used by callers that build the loaders
    optimizer: str = "sgd"  # "sgd" (momentum, optional Nesterov) or "adamw" (betas 0.9, 0.999)
    lr: float = 0.05  # peak learning rate, reached after warm-up
    momentum: float = 0.9  # SGD momentum (unused by AdamW)
    weight_decay: float = 5e-4  # L2 (SGD) / decoupled (AdamW) decay; never on norm or bias parameters
    nesterov: bool = True  # Nesterov momentum for SGD
    schedule: str = "cosine"  # "cosine" or "linear" to 0, "step" (x gamma every step_size epochs) or "constant"; per step
    warmup_epochs: float = 0.0  # linear warm-up from lr/warmup_steps to lr over this many epochs (0: none)
    step_size: int = 30  # epochs between decays of the "step" schedule
    gamma: float = 0.1  # decay factor of the "step" schedule
    label_smoothing: float = 0.0  # cross-entropy label smoothing (default loss only)
    channels_last: bool | str = False  # NHWC model and inputs; "auto": timed against NCHW (zoo.train_speed)
    precision: str = "fp32"  # CPU: "bf16" autocast (fp32 master weights), "auto": bf16 where native and faster
    amp: bool = True  # float16 autocast + gradient scaling, on CUDA only (ignored on CPU)
    seed: int = 0  # seeds torch, numpy and random at the start; shuffling depends on (seed, epoch)
    grad_clip: float | None = None  # clip the global gradient norm to this value (None: no clipping)
    crop_padding: int = 0  # random crop after reflect-padding this many pixels (CIFAR: 4; 0: off)
    hflip: bool = False  # random horizontal flip with probability 0.5 (see zoo.data.augment)
    progress: bool = True  # tqdm bar per epoch (on a terminal, rank 0) and one summary line per epoch
    device: str = "auto"  # "auto" (CUDA if available, else CPU), "cpu", "cuda" or "cuda:N"

    def __post_init__(self) -> None:
        def bad(name: str, allowed: str) -> ZooError:
            return ZooError(f"TrainConfig: {name}={getattr(self, name)!r} is not allowed; expected {allowed}")

        for name, lo in (("epochs", 1), ("batch_size", 1), ("step_size", 1), ("seed", 0), ("crop_padding", 0)):
            v = getattr(self, name)
            if isinstance(v, float) and v.is_integer():
                v = int(v)
                setattr(self, name, v)
            if isinstance(v, bool) or not isinstance(v, int) or v < lo:
                raise bad(name, f"an int >= {lo}")
        for name, lo, hi, lo_open, hi_open in (
            ("lr", 0, None, True, False), ("momentum", 0, 1, False, True), ("weight_decay", 0, None, False, False),
            ("warmup_epochs", 0, self.epochs, False, False), ("gamma", 0, 1, True, False),
            ("label_smoothing", 0, 1, False, True),
        ):
            v = getattr(self, name)
            ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)
            ok = ok and (v > lo if lo_open else v >= lo) and (hi is None or (v < hi if hi_open else v <= hi))
            if not ok:
                rng = f"{'>' if lo_open else '>='} {lo}"
                rng += "" if hi is None else f" and {'<' if hi_open else '<='} {hi}"
                raise bad(name, f"a finite number {rng}")
            setattr(self, name, float(v))
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES), ("precision", PRECISIONS)):
            if getattr(self, name) not in choices:
                raise bad(name, "one of " + ", ".join(repr(c) for c in choices))
        for name in ("nesterov", "amp", "progress", "hflip"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
        if not (isinstance(self.channels_last, bool) or self.channels_last == "auto"):
            raise bad("channels_last", "True, False or 'auto'")
        if self.grad_clip is not None:
            v = self.grad_clip
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v <= 0:
                raise bad("grad_clip", "None or a finite number > 0")
            self.grad_clip = float(v)
        d = self.device
        if not isinstance(d, str) or not (d in ("auto", "cpu", "cuda") or (d.startswith("cuda:") and d[5:].isdigit())):
            raise bad("device", "'auto', 'cpu', 'cuda' or 'cuda:N'")
        if self.optimizer == "sgd" and self.nesterov and self.momentum == 0:
            raise ZooError("TrainConfig: nesterov=True needs momentum > 0 (got momentum=0.0); "
                           "set nesterov=False or a momentum such as 0.9")

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "TrainConfig":
        """Build from a mapping (e.g. a recipe section); unknown keys are rejected with the accepted list."""
        return config_from_dict(cls, d, "train")

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields."""
        return dataclasses.asdict(self)


class TrainingDiverged(ZooError):
    """The loss became NaN or infinite; the last good checkpoint is left untouched."""

    def __init__(self, message: str, epoch: int, step: int, loss: float):
        super().__init__(message)
        self.epoch, self.step, self.loss = epoch, step, loss


@dataclass
class TrainResult:
    """Outcome of `fit`: final and best validation metrics, per-epoch history, files written."""

    final: dict[str, float]  # val metrics after the last epoch: loss, top1, top5 (percent)
    best_top1: float  # best val top-1 over the epochs (percent)
    best_epoch: int  # 1-based epoch of best_top1
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per epoch, as in log.jsonl
    paths: dict[str, str] = field(default_factory=dict)  # last, best, resume, state, log (empty without out_dir)
    precision: str = "fp32"  # what the run trained with ("fp32" or "bf16" autocast; zoo.train_speed)
    memory_format: str = "contiguous"  # "contiguous" (NCHW) or "channels_last"
    speed_reason: str = ""  # why: as configured, a fallback, or the probe's images/s

    @property
    def top1(self) -> float:
        """Final val top-1 (percent)."""
        return self.final["top1"]

    @property
    def top5(self) -> float:
        """Final val top-5 (percent)."""
        return self.final["top5"]


def lr_at(cfg: TrainConfig, step: int, steps_per_epoch: int) -> float:
    """Learning rate of iteration `step` (0-based): linear warm-up, then the configured schedule."""
    warm = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "step":
        return cfg.lr * cfg.gamma ** ((step // steps_per_epoch) // cfg.step_size)
    total = cfg.epochs * steps_per_epoch
    frac = (step - warm) / max(1, total - warm)
    if cfg.schedule == "linear":
        return cfg.lr * (1.0 - frac)
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * frac))

