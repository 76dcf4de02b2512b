"""Checkpoint files of one training run: resume file, weights (last/best), log.jsonl and the manifest.

Writing happens on rank 0 only, each file atomically; resume files are read and validated through
zoo.train_state (no pickles).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch import Tensor

from zoo.errors import ZooError
from zoo.io import atomic_save, make_out_dir
from zoo.spec import spec_of
from zoo.weights.checkpoint import model_spec, state_tensors
from zoo.train_config import TrainConfig
from zoo.train_state import RESUME_FORMAT, optimizer_state, read_resume, rng_state, set_rng_state


def _write_json(path: Path, obj: Any) -> None:
    """Write `obj` as JSON to `path` atomically (temporary file, then rename)."""
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
    """The zoo.* header entries of the user-facing weights files."""
    out = {f"zoo.{k}": json.dumps(v) for k, v in meta.items()}
    spec = spec_of(model)
    if spec is not None and spec.name is not None:  # a model zoo.create built (others have nothing to rebuild)
        out["zoo.spec"] = json.dumps(model_spec(model))
    out["zoo.epoch"] = json.dumps(epoch)
    out["zoo.metrics"] = json.dumps(record)
    out["zoo.train"] = json.dumps(cfg.to_dict())
    return out


class Checkpointer:
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


def restore_checkpoint(model: nn.Module, opt: torch.optim.Optimizer, extra: list[nn.Parameter], scaler: Any,
                       tensors: dict[str, Tensor], state: dict[str, Any], path: Path) -> None:
    """Load a read resume file into model, extra parameters, optimizer, grad scaler and the RNGs."""
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

