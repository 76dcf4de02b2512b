"""Supervised training of zoo models: SGD with Nesterov momentum or AdamW (Loshchilov & Hutter 2019),
cosine (Loshchilov & Hutter 2017) or step learning rate with linear warm-up (Goyal et al. 2017),
label smoothing (Szegedy et al. 2016), AMP on CUDA, DDP under torchrun.

Checkpoints are safetensors + JSON (no pickles), written atomically every epoch, and `resume=True`
continues bit-exactly (on CPU): model, optimizer, LR position, RNG states and the (seed, epoch)
determined shuffling are all restored. A NaN/inf loss stops training with `TrainingDiverged`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from zoo.data.augment import augment_batch
from zoo.errors import ZooError
from zoo.io import atomic_save, make_out_dir, model_spec, state_tensors
from zoo.train_state import (  # RESUMABLE_CHANGES is part of this module's API too
    RESUMABLE_CHANGES, RESUME_FORMAT, check_resume, optimizer_state, read_resume, rng_state, seed_all, set_rng_state,
)

OPTIMIZERS = ("sgd", "adamw")
SCHEDULES = ("cosine", "step", "constant")


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
    schedule: str = "cosine"  # "cosine" to 0, "step" (x gamma every step_size epochs) or "constant"; per iteration
    warmup_epochs: float = 0.0  # linear warm-up from lr/warmup_steps to lr over this many epochs (0: none)
    step_size: int = 30  # epochs between decays of the "step" schedule
    gamma: float = 0.1  # decay factor of the "step" schedule
    label_smoothing: float = 0.0  # cross-entropy label smoothing (default loss only)
    channels_last: bool = False  # NHWC memory format for model and inputs (faster convs on some hardware)
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
        for name, choices in (("optimizer", OPTIMIZERS), ("schedule", SCHEDULES)):
            if getattr(self, name) not in choices:
                raise bad(name, "one of " + ", ".join(repr(c) for c in choices))
        for name in ("nesterov", "channels_last", "amp", "progress", "hflip"):
            if not isinstance(getattr(self, name), bool):
                raise bad(name, "True or False")
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
    return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """torch.device for a TrainConfig.device string (`cuda` means this process's local GPU under torchrun)."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ZooError(f"device={device!r} was requested but CUDA is not available; use device='cpu' or 'auto'")
    if device == "cuda":
        device = f"cuda:{local_rank}"
    return torch.device(device)


def init_distributed(device: str = "auto") -> tuple[int, int, int]:
    """(world_size, rank, local_rank); under torchrun (WORLD_SIZE > 1) joins the process group (gloo/nccl)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 1, 0, 0
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if resolve_device(device, local).type == "cuda" else "gloo"
        dist.init_process_group(backend)
    return dist.get_world_size(), dist.get_rank(), local


def evaluate(model: nn.Module, loader: Iterable, device: torch.device | str | None = None) -> dict[str, float]:
    """Mean cross-entropy and top-1/top-5 accuracy (percent) of `model` over a loader, in eval mode."""
    if device is None:
        p = next(iter(model.parameters()), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    loss_sum, c1, c5, n = 0.0, 0, 0, 0
    with torch.no_grad():
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            logits = model(x).float()
            loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
            k = min(5, logits.shape[1])
            hit = logits.topk(k, dim=1).indices.eq(y[:, None])
            c1 += int(hit[:, 0].sum())
            c5 += int(hit.any(dim=1).sum())
            n += y.shape[0]
    model.train(was_training)
    if n == 0:
        raise ZooError("evaluate: the validation loader yielded no images")
    return {"loss": loss_sum / n, "top1": 100.0 * c1 / n, "top5": 100.0 * c5 / n}


# ---------------------------------------------------------------------------------------------- state

def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def _raw_state(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict as plain CPU tensors (no compression encoding), for exact resume."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for k, v in model.state_dict().items():
        if not isinstance(v, Tensor):
            raise ZooError(f"cannot checkpoint {type(model).__name__}: state entry {k!r} is not a tensor")
        v = v.detach().cpu()
        if v.numel() and v.data_ptr() in seen:  # safetensors refuses shared storage
            v = v.clone()
        seen.add(v.data_ptr())
        out[k] = v.contiguous()
    return out


def _weights_meta(model: nn.Module, epoch: int, record: dict, cfg: TrainConfig, meta: dict) -> dict[str, str]:
    out = {f"zoo.{k}": json.dumps(v) for k, v in meta.items()}
    if hasattr(model, "zoo_name"):
        out["zoo.spec"] = json.dumps(model_spec(model))
    out["zoo.epoch"] = json.dumps(epoch)
    out["zoo.metrics"] = json.dumps(record)
    out["zoo.train"] = json.dumps(cfg.to_dict())
    return out


class _Checkpointer:
    """Files of one run in out_dir; only the writer process (rank 0) touches them."""

    def __init__(self, out_dir: str | os.PathLike | None, write: bool):
        self.dir = None if out_dir is None else Path(out_dir)
        self.write = write and self.dir is not None
        if self.dir is not None:
            d = self.dir
            self.paths = {"last": d / "last.safetensors", "best": d / "best.safetensors",
                          "resume": d / "resume.safetensors", "state": d / "last_state.json", "log": d / "log.jsonl"}
        else:
            self.paths = {}

    def start(self, history: list[dict], fresh: bool) -> None:
        """Create out_dir and (re)write log.jsonl so it holds exactly `history`.

        A fresh run first removes the checkpoint files of an earlier run in the same folder, so that
        nothing there can be mistaken for (or resumed as) this run's.
        """
        if not self.write:
            return
        make_out_dir(self.dir, "out_dir")
        if fresh:
            for key in ("state", "resume", "last", "best"):  # manifest first: it vouches for the others
                self.paths[key].unlink(missing_ok=True)
        tmp = self.paths["log"].with_name(f"log.jsonl.{os.getpid()}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in history))
        os.replace(tmp, self.paths["log"])

    def save(self, model: nn.Module, opt: torch.optim.Optimizer, extra: list[nn.Parameter], scaler: Any,
             state: dict[str, Any], record: dict, improved: bool, cfg: TrainConfig, meta: dict) -> None:
        """Write one epoch's checkpoint: resume file, weights, best, log line, then the manifest."""
        if not self.write:
            return
        epoch = state["epoch"]
        tensors = {f"model.{k}": v for k, v in _raw_state(model).items()}
        optim_scalars: dict[str, dict[str, Any]] = {}
        for pid, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                if isinstance(v, Tensor):
                    tensors[f"optim.{pid}.{k}"] = v.detach().cpu().contiguous()
                else:
                    optim_scalars.setdefault(str(pid), {})[k] = v
        for i, p in enumerate(extra):
            tensors[f"extra.{i}"] = p.detach().cpu().contiguous()
        full = {**state, "format": RESUME_FORMAT, "rng": rng_state(), "scaler": scaler.state_dict(),
                "optim_scalars": optim_scalars, "config": cfg.to_dict()}
        # 1. the resume file holds everything needed to continue, in one atomic rename
        atomic_save(tensors, self.paths["resume"], {"zoo.resume": json.dumps(full)})
        weights_meta = _weights_meta(model, epoch, record, cfg, meta)
        weights = state_tensors(model)
        atomic_save(weights, self.paths["last"], weights_meta)  # 2. the user-facing weights
        if improved:
            atomic_save(weights, self.paths["best"], weights_meta)  # 3. best so far
        with open(self.paths["log"], "a") as f:  # 4. one log line per epoch
            f.write(json.dumps(record) + "\n")
        manifest = {"epoch": epoch, "step": state["step"], "best_top1": state["best_top1"],
                    "best_epoch": state["best_epoch"], "metrics": record,
                    "files": {k: p.name for k, p in self.paths.items() if k != "state"}}
        _write_json(self.paths["state"], manifest)  # 5. manifest last: it names a complete epoch

    def load(self) -> tuple[dict[str, Tensor], dict[str, Any]]:
        """Tensors and scalar state of the resume file; ZooError when there is none."""
        if self.dir is None:
            raise ZooError("resume=True needs out_dir (the folder of the run to continue)")
        return read_resume(self.paths["resume"])


def _restore(model: nn.Module, opt: torch.optim.Optimizer, extra: list[nn.Parameter], scaler: Any,
             tensors: dict[str, Tensor], state: dict[str, Any], path: Path) -> None:
    weights = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        lines = str(e).strip().splitlines()
        raise ZooError(f"cannot resume from {path}: the checkpoint does not fit this model: "
                       + " ".join(line.strip() for line in lines[:3])) from None
    n_extra = sum(1 for k in tensors if k.startswith("extra."))
    if n_extra != len(extra):
        raise ZooError(f"cannot resume from {path}: it holds {n_extra} extra parameters, this run has {len(extra)}")
    with torch.no_grad():
        for i, p in enumerate(extra):
            t = tensors.get(f"extra.{i}")
            if t is None or t.shape != p.shape:
                raise ZooError(f"cannot resume from {path}: extra parameter {i} has shape "
                               f"{None if t is None else tuple(t.shape)}, expected {tuple(p.shape)}")
            p.copy_(t)
    sd = opt.state_dict()
    sd["state"] = optimizer_state(tensors, state["optim_scalars"],
                                  [p for g in opt.param_groups for p in g["params"]], path)
    opt.load_state_dict(sd)
    if state["scaler"]:
        scaler.load_state_dict(state["scaler"])
    set_rng_state(state["rng"], path)


# ---------------------------------------------------------------------------------------------- fit

def _param_groups(model: nn.Module, extra: list[nn.Parameter], wd: float) -> list[dict[str, Any]]:
    decay, no_decay = [], []
    for p in [p for p in model.parameters() if p.requires_grad] + extra:
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def _distributed_loader(loader: DataLoader, seed: int, world: int, rank: int) -> DataLoader:
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, drop_last=len(sampler) >= (loader.batch_size or 1),
                      worker_init_fn=loader.worker_init_fn)


def _check_inputs(model, train_loader, val_loader, cfg, extra) -> None:
    if not isinstance(cfg, TrainConfig):
        raise ZooError(f"fit: cfg must be a TrainConfig, got {type(cfg).__name__}")
    if not isinstance(model, nn.Module):
        raise ZooError(f"fit: model must be a torch nn.Module, got {type(model).__name__}")
    if len(train_loader) == 0:
        raise ZooError("fit: the training loader yields no batches (empty dataset, or fewer images than "
                       "one batch with drop_last)")
    bs = getattr(train_loader, "batch_size", None)
    if bs is not None and bs != cfg.batch_size:
        raise ZooError(f"fit: the training loader has batch_size={bs} but cfg.batch_size={cfg.batch_size}; "
                       "build the loaders with the config's batch size")
    own = {id(p) for p in model.parameters()}
    for p in extra:
        if not isinstance(p, nn.Parameter):
            raise ZooError(f"fit: extra_params must be nn.Parameter objects, got {type(p).__name__}")
        if id(p) in own:
            raise ZooError("fit: extra_params must not include parameters of the model itself")


def fit(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, cfg: TrainConfig,
        out_dir: str | os.PathLike | None = None, resume: bool = False,
        loss_fn: Callable[[Tensor, Tensor, Tensor], Tensor] | None = None,
        extra_params: Iterable[nn.Parameter] = (), meta: dict[str, Any] | None = None) -> TrainResult:
    """Train `model` in place and validate after every epoch; checkpoints go to out_dir (rank 0 only).

    loss_fn(logits, targets, inputs) replaces the label-smoothed cross-entropy (e.g. distillation);
    extra_params (e.g. hint adapters) are optimised and checkpointed with the model. `meta` is JSON
    stored as zoo.<key> in the weights' header (e.g. classes, mean, std).
    """
    extra = list(extra_params)
    _check_inputs(model, train_loader, val_loader, cfg, extra)
    world, rank, local = init_distributed(cfg.device)
    device = resolve_device(cfg.device, local)
    if world > 1:
        train_loader = _distributed_loader(train_loader, cfg.seed, world, rank)
    spe = len(train_loader)
    n_train = len(train_loader.dataset) if hasattr(train_loader, "dataset") else spe * cfg.batch_size
    use_amp = cfg.amp and device.type == "cuda"
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(device=device, memory_format=fmt)
    for p in extra:
        p.data = p.data.to(device)
    opt: torch.optim.Optimizer
    groups = _param_groups(model, extra, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        opt = torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    else:
        opt = torch.optim.AdamW(groups, lr=cfg.lr)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ck = _Checkpointer(out_dir, write=rank == 0)
    history: list[dict[str, Any]] = []
    start, step, best_top1, best_epoch = 0, 0, -1.0, 0
    if resume:
        tensors, state = ck.load()
        check_resume(state, cfg.to_dict(), spe, n_train, ck.paths["resume"])
        _restore(model, opt, extra, scaler, tensors, state, ck.paths["resume"])
        model.to(device=device, memory_format=fmt)
        start, step, history = state["epoch"], state["step"], state["history"]
        best_top1, best_epoch = state["best_top1"], state["best_epoch"]
    else:
        seed_all(cfg.seed)
    ck.start(history, fresh=not resume)
    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    criterion = nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing)
    params = [p for g in opt.param_groups for p in g["params"]]
    show_bar = cfg.progress and rank == 0 and sys.stderr.isatty()
    meta = dict(meta or {})

    for epoch in range(start, cfg.epochs):
        model.train()
        sampler = getattr(train_loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        t0, loss_sum, seen, lr = time.perf_counter(), 0.0, 0, cfg.lr
        batches = train_loader
        if show_bar:
            from tqdm import tqdm

            batches = tqdm(train_loader, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, dynamic_ncols=True)
        for i, (x, y) in enumerate(batches):
            lr = lr_at(cfg, step, spe)
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            x = augment_batch(x, cfg.crop_padding, cfg.hflip, cfg.seed, step, rank)
            if cfg.channels_last and x.dim() == 4:
                x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16, enabled=use_amp):
                logits = net(x)
                loss = criterion(logits, y) if loss_fn is None else loss_fn(logits, y, x)
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise ZooError(f"fit: the loss must be a scalar tensor, got {getattr(loss, 'shape', type(loss))}")
            lv = loss.detach().float().clone()
            if world > 1:
                dist.all_reduce(lv)
                lv /= world
            lval = float(lv)
            if not math.isfinite(lval):
                kept = ("no checkpoint was written yet" if epoch == 0 else
                        f"the checkpoint of epoch {epoch} in {out_dir} is kept untouched" if out_dir is not None
                        else f"no out_dir was given, so nothing was saved (epoch {epoch} was the last good one)")
                raise TrainingDiverged(
                    f"training diverged at epoch {epoch + 1}, step {i + 1} (iteration {step + 1}): loss = {lval}; "
                    f"{kept}. Lower the learning rate (lr={cfg.lr:g}), add warmup_epochs or set grad_clip",
                    epoch + 1, i + 1, lval)
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if world > 1:
                for p in extra:
                    if p.grad is not None:
                        dist.all_reduce(p.grad)
                        p.grad /= world
            if cfg.grad_clip is not None:
                scaler.unscale_(opt)
                nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            scaler.step(opt)
            scaler.update()
            step += 1
            loss_sum += lval * y.shape[0]
            seen += y.shape[0]
            if show_bar:
                batches.set_postfix(loss=f"{lval:.4f}", lr=f"{lr:.3g}")
        train_time = time.perf_counter() - t0
        if world > 1:  # BatchNorm statistics differ per rank: take rank 0's, as DDP does before each forward
            for b in model.buffers():
                dist.broadcast(b, 0)
        m = evaluate(model, val_loader, device)
        if not math.isfinite(m["loss"]):
            raise TrainingDiverged(
                f"training diverged at epoch {epoch + 1}: validation loss = {m['loss']} (the weights hold NaN/inf); "
                f"the checkpoint of epoch {epoch} is kept. Lower the learning rate (lr={cfg.lr:g}) or set grad_clip",
                epoch + 1, spe, m["loss"])
        record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "val_loss": m["loss"],
                  "top1": m["top1"], "top5": m["top5"], "lr": lr,
                  "images_per_s": seen * world / max(train_time, 1e-9), "epoch_time_s": train_time}
        history.append(record)
        improved = m["top1"] > best_top1
        if improved:
            best_top1, best_epoch = m["top1"], epoch + 1
        state = {"epoch": epoch + 1, "step": step, "best_top1": best_top1, "best_epoch": best_epoch,
                 "history": history, "steps_per_epoch": spe, "num_train": n_train}
        ck.save(model, opt, extra, scaler, state, record, improved, cfg, meta)
        if cfg.progress and rank == 0:
            print(f"epoch {epoch + 1}/{cfg.epochs}  train_loss {record['train_loss']:.4f}  val_loss {m['loss']:.4f}  "
                  f"top1 {m['top1']:.2f}  top5 {m['top5']:.2f}  lr {lr:.4g}  {record['images_per_s']:.0f} img/s",
                  file=sys.stderr, flush=True)
    if not history:
        raise ZooError("fit: nothing was trained (resumed at or past cfg.epochs and no history saved)")
    last = history[-1]
    final = {"loss": last["val_loss"], "top1": last["top1"], "top5": last["top5"]}
    paths = {k: str(p) for k, p in ck.paths.items()}
    return TrainResult(final=final, best_top1=best_top1, best_epoch=best_epoch, history=history, paths=paths)


# ---------------------------------------------------------------------------------------------- CLI

def weights_sha256(model: nn.Module) -> str:
    """sha256 over the model's state tensors (names, dtypes, shapes and bytes), e.g. to compare DDP ranks."""
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(state_tensors(model).items()):
        h.update(f"{k}:{v.dtype}:{tuple(v.shape)};".encode())
        h.update(v.numpy().tobytes() if v.dtype != torch.bfloat16 else v.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


_CLI_CONFIG = (  # (flag, TrainConfig field, type)
    ("--epochs", "epochs", int), ("--batch-size", "batch_size", int), ("--lr", "lr", float),
    ("--optimizer", "optimizer", str), ("--schedule", "schedule", str), ("--warmup-epochs", "warmup_epochs", float),
    ("--weight-decay", "weight_decay", float), ("--momentum", "momentum", float),
    ("--label-smoothing", "label_smoothing", float), ("--grad-clip", "grad_clip", float),
    ("--seed", "seed", int), ("--device", "device", str), ("--crop-padding", "crop_padding", int),
)


def _cmd_train(args: Any) -> int:
    from zoo._registry import create, model_card, resolve_kwargs
    from zoo.cli import model_kwargs_from_args
    from zoo.data import get_loaders

    overrides = {key: getattr(args, key) for _, key, _ in _CLI_CONFIG if getattr(args, key) is not None}
    if args.no_progress:
        overrides["progress"] = False
    if args.channels_last:
        overrides["channels_last"] = True
    if args.hflip:
        overrides["hflip"] = True
    cfg = TrainConfig.from_dict(overrides)
    kwargs = model_kwargs_from_args(args)
    input_size = model_card(args.name).input_size(resolve_kwargs(args.name, **kwargs))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    train_loader, val_loader, info = get_loaders(
        args.data, input_size, batch_size=cfg.batch_size, root=args.root, seed=cfg.seed, quick=args.quick,
        num_workers=args.workers, distributed=world > 1)
    if kwargs.get("num_classes", info.num_classes) != info.num_classes:
        raise ZooError(f"--kw num_classes={kwargs['num_classes']} differs from the {info.num_classes} classes of "
                       f"{args.data}; leave num_classes out")
    out = make_out_dir(args.out or os.path.join("runs", f"train-{args.name}-{args.data}"), "--out")
    seed_all(cfg.seed)  # before the model exists, so --seed fixes the initial weights too
    model = create(args.name, **{**kwargs, "num_classes": info.num_classes})
    meta = {"classes": info.class_names, "mean": list(info.mean), "std": list(info.std),
            "data": {"name": info.name, "split": info.split, "quick": args.quick}}
    result = fit(model, train_loader, val_loader, cfg, out_dir=out, resume=args.resume, meta=meta)
    _, rank, _ = init_distributed(cfg.device)
    digest = weights_sha256(model)
    if args.hash_dir:
        Path(args.hash_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.hash_dir) / f"rank{rank}.sha256").write_text(digest + "\n")
    if rank == 0:
        print(f"{args.name} on {args.data} ({info.num_train} train / {info.num_val} val images, world size {world}): "
              f"top1 {result.top1:.2f}%  top5 {result.top5:.2f}%  best top1 {result.best_top1:.2f}% "
              f"(epoch {result.best_epoch})")
        print(f"weights: {result.paths['last']}  sha256(state) {digest[:16]}")
    if dist.is_initialized():
        dist.destroy_process_group()
    return 0


def add_commands(subparsers: Any) -> None:
    """Add `zoo train` to the zoo command line."""
    from zoo.data import DATASETS

    p = subparsers.add_parser(
        "train", help="train a registered model on a dataset (DDP under torchrun)",
        description="Train a zoo model with zoo.train.fit. Run under `torchrun --nproc_per_node=N -m zoo train "
                    "...` for data-parallel training (gloo on CPU, nccl on GPU).")
    p.add_argument("--model", dest="name", required=True, help="registered model name (see `zoo list`)")
    p.add_argument("--kw", action="append", default=[], metavar="KEY=VALUE",
                   help="model argument (repeatable), typed as the model declares it, e.g. --kw width=0.25")
    p.add_argument("--data", default="digits", choices=list(DATASETS), help="dataset (default digits)")
    p.add_argument("--root", default=None, help="dataset folder (mnist, cifar*, imagefolder)")
    p.add_argument("--quick", action="store_true", help="small class-balanced subsets, for smoke tests")
    p.add_argument("--workers", type=int, default=0, help="DataLoader worker processes (default 0)")
    for flag, key, typ in _CLI_CONFIG:
        default = TrainConfig.__dataclass_fields__[key].default
        p.add_argument(flag, dest=key, type=typ, default=None, help=f"TrainConfig.{key} (default {default!r})")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips (TrainConfig.hflip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--out", default=None, help="run folder (default runs/train-MODEL-DATA)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--hash-dir", default=None,
                   help="write rankN.sha256 (hash of the final weights) here, e.g. to check DDP ranks agree")
    p.set_defaults(func=_cmd_train)
