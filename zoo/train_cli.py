"""`zoo train`: the command-line front of zoo.train.fit (argument parsing, data, model, summary, DDP hashes).

zoo.cli finds this command through zoo.train.add_commands, which is re-exported from here.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from zoo._registry import create, model_card, resolve_kwargs
from zoo.cli import model_kwargs_from_args
from zoo.data import DATASETS, get_loaders
from zoo.errors import ZooError
from zoo.io import make_out_dir
from zoo.weights.checkpoint import state_tensors
from zoo.train_config import TrainConfig
from zoo.train_loop import fit, init_distributed
from zoo.train_state import seed_all


def weights_sha256(model: nn.Module) -> str:
    """sha256 over the model's state tensors (names, dtypes, shapes and bytes), e.g. to compare DDP ranks."""
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
    ("--precision", "precision", str),
)


def _cmd_train(args: Any) -> int:
    """Run `zoo train`: build loaders and model from the arguments, fit, print the summary."""
    overrides = {key: getattr(args, key) for _, key, _ in _CLI_CONFIG if getattr(args, key) is not None}
    if args.no_progress:
        overrides["progress"] = False
    if args.channels_last is not None:
        overrides["channels_last"] = {"true": True, "false": False}.get(args.channels_last, args.channels_last)
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
    p.add_argument("--channels-last", nargs="?", const="true", default=None, choices=["true", "false", "auto"],
                   help="NHWC memory format; `auto` times it against NCHW on this machine (zoo.train_speed)")
    p.add_argument("--hflip", action="store_true", help="random horizontal flips (TrainConfig.hflip)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or per-epoch lines")
    p.add_argument("--out", default=None, help="run folder (default runs/train-MODEL-DATA)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--hash-dir", default=None,
                   help="write rankN.sha256 (hash of the final weights) here, e.g. to check DDP ranks agree")
    p.set_defaults(func=_cmd_train)
