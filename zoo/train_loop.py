"""The training loop: `fit` (DDP under torchrun, AMP on CUDA, resume, divergence checks, per-epoch logging
and checkpoints) and `evaluate`, plus the device and process-group helpers they share.

Imports point one way: this module uses zoo.train_config, zoo.train_checkpoint and zoo.train_state.
"""

from __future__ import annotations

import math
import os
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, DistributedSampler

from zoo.data.augment import augment_batch
from zoo.errors import ZooError
from zoo.train_checkpoint import Checkpointer, restore_checkpoint
from zoo.train_config import TrainConfig, TrainingDiverged, TrainResult, lr_at
from zoo.train_speed import SpeedChoice, autocast, resolve
from zoo.train_state import check_resume, seed_all

LossFn = Callable[[Tensor, Tensor, Tensor], Tensor]


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



def _param_groups(model: nn.Module, extra: list[nn.Parameter], wd: float) -> list[dict[str, Any]]:
    """Optimizer groups: weight decay on matrices and kernels, none on norm or bias parameters."""
    decay, no_decay = [], []
    for p in [p for p in model.parameters() if p.requires_grad] + extra:
        (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": wd}, {"params": no_decay, "weight_decay": 0.0}]


def _distributed_loader(loader: DataLoader, seed: int, world: int, rank: int) -> DataLoader:
    """`loader` rebuilt over a seeded DistributedSampler (unchanged when it already has one)."""
    if isinstance(loader.sampler, DistributedSampler):
        return loader
    sampler = DistributedSampler(loader.dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, drop_last=len(sampler) >= (loader.batch_size or 1),
                      worker_init_fn=loader.worker_init_fn)


def _check_inputs(model: Any, train_loader: Any, val_loader: Any, cfg: Any, extra: list[Any]) -> None:
    """Reject arguments of `fit` that cannot work, with a message naming the argument."""
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



@dataclass
class _Run:
    """The state of one `fit` call: what was set up before the first epoch, and the counters it advances."""

    model: nn.Module
    net: nn.Module  # model, or its DistributedDataParallel wrapper
    train_loader: DataLoader
    cfg: TrainConfig
    device: torch.device
    world: int
    rank: int
    opt: torch.optim.Optimizer
    scaler: Any
    ck: Checkpointer
    extra: list[nn.Parameter]
    loss_fn: LossFn | None
    out_dir: str | os.PathLike | None
    spe: int  # steps per epoch
    n_train: int
    use_amp: bool = False
    speed: SpeedChoice = SpeedChoice("fp32", False, "as configured")
    show_bar: bool = False
    criterion: nn.Module = field(default_factory=nn.CrossEntropyLoss)
    params: list[nn.Parameter] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    start: int = 0
    step: int = 0
    best_top1: float = -1.0
    best_epoch: int = 0


def _make_optimizer(model: nn.Module, extra: list[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    """SGD (momentum, optional Nesterov) or AdamW over the decay / no-decay parameter groups."""
    groups = _param_groups(model, extra, cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def _setup(model: nn.Module, train_loader: DataLoader, cfg: TrainConfig, out_dir: str | os.PathLike | None,
           extra: list[nn.Parameter], loss_fn: LossFn | None) -> _Run:
    """Join the process group, move model and extras to the device, build optimizer, scaler and checkpointer."""
    world, rank, local = init_distributed(cfg.device)
    device = resolve_device(cfg.device, local)
    if world > 1:
        train_loader = _distributed_loader(train_loader, cfg.seed, world, rank)
    spe = len(train_loader)
    n_train = len(train_loader.dataset) if hasattr(train_loader, "dataset") else spe * cfg.batch_size
    use_amp = cfg.amp and device.type == "cuda" and cfg.precision == "fp32"
    model.to(device=device)
    for p in extra:
        p.data = p.data.to(device)
    opt = _make_optimizer(model, extra, cfg)
    scaler = torch.amp.GradScaler("cuda", enabled=use_amp)
    ck = Checkpointer(out_dir, write=rank == 0)
    return _Run(model=model, net=model, train_loader=train_loader, cfg=cfg, device=device, world=world, rank=rank,
                opt=opt, scaler=scaler, ck=ck, extra=extra, loss_fn=loss_fn, out_dir=out_dir, spe=spe,
                n_train=n_train, use_amp=use_amp)


def _memory_format(speed: SpeedChoice) -> torch.memory_format:
    """NHWC when the run trains channels_last, else contiguous."""
    return torch.channels_last if speed.channels_last else torch.contiguous_format


def _choose_speed(run: _Run, saved: dict[str, Any] | None) -> SpeedChoice:
    """The run's precision and memory format: the saved choice when resuming, else zoo.train_speed.resolve
    on a batch shaped like the training data (a probe only for "auto" settings)."""
    if saved is not None:
        return SpeedChoice(saved["precision"], saved["channels_last"], saved["reason"])
    cfg = run.cfg
    ds = getattr(run.train_loader, "dataset", None)
    shape = tuple(ds[0][0].shape) if ds is not None and hasattr(ds, "__getitem__") and len(ds) else None
    example = None if shape is None else torch.zeros(cfg.batch_size, *shape, device=run.device)
    quiet = (lambda s: None) if run.rank else None
    choice = [resolve(cfg.precision, cfg.channels_last, run.model, example, log=quiet, device=run.device)
              if run.rank == 0 else None]
    if run.world > 1:  # every rank trains as rank 0 measured
        dist.broadcast_object_list(choice, src=0)
    return choice[0]


def _resume_or_seed(run: _Run, resume: bool) -> None:
    """Restore the run's state from its resume file, or seed all RNGs for a fresh run; then start the log."""
    if resume:
        tensors, state = run.ck.load()
        check_resume(state, run.cfg.to_dict(), run.spe, run.n_train, run.ck.paths["resume"])
        restore_checkpoint(run.model, run.opt, run.extra, run.scaler, tensors, state, run.ck.paths["resume"])
        run.speed = _choose_speed(run, state.get("speed"))
        run.model.to(device=run.device, memory_format=_memory_format(run.speed))
        run.start, run.step, run.history = state["epoch"], state["step"], state["history"]
        run.best_top1, run.best_epoch = state["best_top1"], state["best_epoch"]
    else:
        run.speed = _choose_speed(run, None)
        run.model.to(memory_format=_memory_format(run.speed))
        seed_all(run.cfg.seed)
    if run.cfg.progress and run.rank == 0 and "probe" in run.speed.reason:
        print(f"training in {run.speed.precision}, {run.speed.memory_format}: {run.speed.reason}", file=sys.stderr,
              flush=True)
    run.ck.start(run.history, fresh=not resume)


def _prepare_loop(run: _Run) -> None:
    """Wrap the model in DDP when distributed; set criterion, parameter list and progress-bar choice."""
    if run.world > 1:
        dev = run.device
        run.net = nn.parallel.DistributedDataParallel(run.model, device_ids=[dev.index] if dev.type == "cuda" else None)
    run.criterion = nn.CrossEntropyLoss(label_smoothing=run.cfg.label_smoothing)
    run.params = [p for g in run.opt.param_groups for p in g["params"]]
    run.show_bar = run.cfg.progress and run.rank == 0 and sys.stderr.isatty()


def _check_finite_loss(run: _Run, lval: float, epoch: int, i: int) -> None:
    """Raise TrainingDiverged when the training loss of step `i` of `epoch` (0-based) is NaN or infinite."""
    if math.isfinite(lval):
        return
    out_dir = run.out_dir
    kept = ("no checkpoint was written yet" if epoch == 0 else
            f"the checkpoint of epoch {epoch} in {out_dir} is kept untouched" if out_dir is not None
            else f"no out_dir was given, so nothing was saved (epoch {epoch} was the last good one)")
    raise TrainingDiverged(
        f"training diverged at epoch {epoch + 1}, step {i + 1} (iteration {run.step + 1}): loss = {lval}; "
        f"{kept}. Lower the learning rate (lr={run.cfg.lr:g}), add warmup_epochs or set grad_clip",
        epoch + 1, i + 1, lval)


def _forward_loss(run: _Run, x: Tensor, y: Tensor) -> tuple[Tensor, float]:
    """Loss of one batch under autocast (AMP on CUDA) and its value averaged over ranks."""
    cfg = run.cfg
    x = augment_batch(x, cfg.crop_padding, cfg.hflip, cfg.seed, run.step, run.rank)
    if run.speed.channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    ctx = torch.autocast("cuda", dtype=torch.float16) if run.use_amp else autocast(run.speed.precision, run.device)
    with ctx:
        logits = run.net(x).float()
        loss = run.criterion(logits, y) if run.loss_fn is None else run.loss_fn(logits, y, x)
    if not isinstance(loss, Tensor) or loss.dim() != 0:
        raise ZooError(f"fit: the loss must be a scalar tensor, got {getattr(loss, 'shape', type(loss))}")
    lv = loss.detach().float().clone()
    if run.world > 1:
        dist.all_reduce(lv)
        lv /= run.world
    return loss, float(lv)


def _backward_step(run: _Run, loss: Tensor) -> None:
    """Backward pass with gradient scaling, extra-parameter all-reduce, optional clipping, optimizer step."""
    run.opt.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    if run.world > 1:
        for p in run.extra:
            if p.grad is not None:
                dist.all_reduce(p.grad)
                p.grad /= run.world
    if run.cfg.grad_clip is not None:
        run.scaler.unscale_(run.opt)
        nn.utils.clip_grad_norm_(run.params, run.cfg.grad_clip)
    run.scaler.step(run.opt)
    run.scaler.update()


def _epoch_batches(run: _Run, epoch: int) -> Iterable:
    """The training batches of `epoch`, behind a tqdm bar when one is shown."""
    if not run.show_bar:
        return run.train_loader
    from tqdm import tqdm  # optional third-party progress bar, imported only when shown

    return tqdm(run.train_loader, desc=f"epoch {epoch + 1}/{run.cfg.epochs}", leave=False, dynamic_ncols=True)


def _train_epoch(run: _Run, epoch: int) -> tuple[float, int, float, float]:
    """One pass over the training set: (loss sum, images seen, last learning rate, seconds)."""
    run.model.train()
    sampler = getattr(run.train_loader, "sampler", None)
    if hasattr(sampler, "set_epoch"):
        sampler.set_epoch(epoch)
    t0, loss_sum, seen, lr = time.perf_counter(), 0.0, 0, run.cfg.lr
    batches = _epoch_batches(run, epoch)
    for i, (x, y) in enumerate(batches):
        lr = lr_at(run.cfg, run.step, run.spe)
        for g in run.opt.param_groups:
            g["lr"] = lr
        x, y = x.to(run.device, non_blocking=True), y.to(run.device, non_blocking=True)
        loss, lval = _forward_loss(run, x, y)
        _check_finite_loss(run, lval, epoch, i)
        _backward_step(run, loss)
        run.step += 1
        loss_sum += lval * y.shape[0]
        seen += y.shape[0]
        if run.show_bar:
            batches.set_postfix(loss=f"{lval:.4f}", lr=f"{lr:.3g}")
    return loss_sum, seen, lr, time.perf_counter() - t0


def _validate(run: _Run, val_loader: Iterable, epoch: int) -> dict[str, float]:
    """Validation metrics after `epoch` (0-based); TrainingDiverged when the weights hold NaN/inf."""
    if run.world > 1:  # BatchNorm statistics differ per rank: take rank 0's, as DDP does before each forward
        for b in run.model.buffers():
            dist.broadcast(b, 0)
    m = evaluate(run.model, val_loader, run.device)
    if not math.isfinite(m["loss"]):
        raise TrainingDiverged(
            f"training diverged at epoch {epoch + 1}: validation loss = {m['loss']} (the weights hold NaN/inf); "
            f"the checkpoint of epoch {epoch} is kept. Lower the learning rate (lr={run.cfg.lr:g}) or set grad_clip",
            epoch + 1, run.spe, m["loss"])
    return m


def _end_epoch(run: _Run, epoch: int, m: dict[str, float], train: tuple[float, int, float, float],
               meta: dict[str, Any]) -> None:
    """Record the epoch in the history, write its checkpoint and print its summary line (rank 0)."""
    loss_sum, seen, lr, train_time = train
    record = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "val_loss": m["loss"],
              "top1": m["top1"], "top5": m["top5"], "lr": lr,
              "images_per_s": seen * run.world / max(train_time, 1e-9), "epoch_time_s": train_time}
    run.history.append(record)
    improved = m["top1"] > run.best_top1
    if improved:
        run.best_top1, run.best_epoch = m["top1"], epoch + 1
    state = {"epoch": epoch + 1, "step": run.step, "best_top1": run.best_top1, "best_epoch": run.best_epoch,
             "history": run.history, "steps_per_epoch": run.spe, "num_train": run.n_train,
             "speed": run.speed.to_dict()}
    run.ck.save(run.model, run.opt, run.extra, run.scaler, state, record, improved, run.cfg, meta)
    if run.cfg.progress and run.rank == 0:
        print(f"epoch {epoch + 1}/{run.cfg.epochs}  train_loss {record['train_loss']:.4f}  "
              f"val_loss {m['loss']:.4f}  top1 {m['top1']:.2f}  top5 {m['top5']:.2f}  lr {lr:.4g}  "
              f"{record['images_per_s']:.0f} img/s", file=sys.stderr, flush=True)


def fit(model: nn.Module, train_loader: DataLoader, val_loader: DataLoader, cfg: TrainConfig,
        out_dir: str | os.PathLike | None = None, resume: bool = False,
        loss_fn: LossFn | None = None,
        extra_params: Iterable[nn.Parameter] = (), meta: dict[str, Any] | None = None) -> TrainResult:
    """Train `model` in place and validate after every epoch; checkpoints go to out_dir (rank 0 only).

    loss_fn(logits, targets, inputs) replaces the label-smoothed cross-entropy (e.g. distillation);
    extra_params (e.g. hint adapters) are optimised and checkpointed with the model. `meta` is JSON
    stored as zoo.<key> in the weights' header (e.g. classes, mean, std).
    """
    extra = list(extra_params)
    _check_inputs(model, train_loader, val_loader, cfg, extra)
    run = _setup(model, train_loader, cfg, out_dir, extra, loss_fn)
    _resume_or_seed(run, resume)
    _prepare_loop(run)
    meta = dict(meta or {})
    for epoch in range(run.start, cfg.epochs):
        train = _train_epoch(run, epoch)
        m = _validate(run, val_loader, epoch)
        _end_epoch(run, epoch, m, train, meta)
    if not run.history:
        raise ZooError("fit: nothing was trained (resumed at or past cfg.epochs and no history saved)")
    last = run.history[-1]
    final = {"loss": last["val_loss"], "top1": last["top1"], "top5": last["top5"]}
    paths = {k: str(p) for k, p in run.ck.paths.items()}
    return TrainResult(final=final, best_top1=run.best_top1, best_epoch=run.best_epoch, history=run.history,
                       paths=paths, precision=run.speed.precision, memory_format=run.speed.memory_format,
                       speed_reason=run.speed.reason)
