"""Resume files of `zoo.train.fit`: RNG state capture and restore, and validation of a resume file
before any of it is applied.

A resume file is safetensors (model, optimizer and extra tensors) with the scalar state as JSON in its
`zoo.resume` header entry. It may have been damaged or edited by hand, so every field is checked here
(types, ranges, RNG state sizes, optimizer tensor names and shapes, finite values) and any problem is
one ZooError naming the file and the field, instead of a KeyError or a torch RuntimeError later on.
"""

from __future__ import annotations

import math
import os
import random
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch import Tensor

from zoo.errors import ZooError
from zoo.untrusted import clip, load_tensors, read_header, short_repr

RESUME_FORMAT = 1
# config fields that may change between a run and its resume (everything else must match)
RESUMABLE_CHANGES = ("epochs", "progress", "device")
# optimizer state tensors zoo's optimizers (SGD, AdamW) keep per parameter; `step` is a scalar
OPTIM_TENSORS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")
HISTORY_NUMBERS = ("epoch", "train_loss", "val_loss", "top1", "top5", "lr")
_MT_WORDS = 624  # numpy / python Mersenne Twister state size


def seed_all(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy and Python's random with one seed."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """The torch, numpy, Python (and initialised CUDA) generator states as JSON-able lists."""
    np_state = np.random.get_state()
    py = random.getstate()
    st = {"torch": torch.get_rng_state().tolist(),
          "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])],
          "python": [py[0], list(py[1]), py[2]]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        st["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return st


def _int(v: Any, lo: int | None = None, hi: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (lo is None or v >= lo) and (hi is None or v <= hi)


def _ints(v: Any, n: int | None, lo: int, hi: int) -> bool:
    return isinstance(v, list) and (n is None or len(v) == n) and all(_int(x, lo, hi) for x in v)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _rng_problem(st: Any) -> str | None:
    """What is wrong with a saved RNG state (None: it has the shape `rng_state` writes)."""
    if not isinstance(st, dict):
        return "rng must be an object"
    if not _ints(st.get("torch"), len(torch.get_rng_state()), 0, 255):
        return f"rng.torch must be {len(torch.get_rng_state())} ints in 0..255"
    n = st.get("numpy")
    if not (isinstance(n, list) and len(n) == 5 and n[0] == "MT19937" and _ints(n[1], _MT_WORDS, 0, 2**32 - 1)
            and _int(n[2], 0, _MT_WORDS) and _int(n[3], 0, 1) and _number(n[4])):
        return f"rng.numpy must be ['MT19937', {_MT_WORDS} uint32 words, position, has_gauss, cached_gauss]"
    p = st.get("python")
    if not (isinstance(p, list) and len(p) == 3 and _int(p[0]) and _ints(p[1], _MT_WORDS + 1, 0, 2**32)
            and (p[2] is None or _number(p[2]))):
        return f"rng.python must be [version, {_MT_WORDS + 1} ints, null or a number]"
    cuda = st.get("cuda", [])
    if not (isinstance(cuda, list) and all(_ints(c, None, 0, 255) for c in cuda)):
        return "rng.cuda must be a list of byte lists"
    return None


def set_rng_state(st: dict[str, Any], path: str | os.PathLike = "the resume file") -> None:
    """Restore the generator states `rng_state` captured; a malformed state is a ZooError naming the file."""
    problem = _rng_problem(st)
    if problem is not None:
        raise ZooError(f"cannot resume from {path}: {problem}")
    try:
        torch.set_rng_state(torch.tensor(st["torch"], dtype=torch.uint8))
        n = st["numpy"]
        np.random.set_state((n[0], np.array(n[1], dtype=np.uint32), n[2], n[3], n[4]))
        p = st["python"]
        random.setstate((p[0], tuple(p[1]), p[2]))
        if "cuda" in st and torch.cuda.is_available() and len(st["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in st["cuda"]])
    except (ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise ZooError(f"cannot resume from {path}: the saved RNG state is not usable "
                       f"({type(e).__name__}: {clip(str(e))})") from None


# key -> (check, what is allowed) of the scalar state in a resume file
_STATE_FIELDS: dict[str, tuple[Any, str]] = {
    "epoch": (lambda v: _int(v, 0), "an int >= 0"),
    "step": (lambda v: _int(v, 0), "an int >= 0"),
    "best_top1": (lambda v: _number(v), "a finite number"),
    "best_epoch": (lambda v: _int(v, 0), "an int >= 0"),
    "steps_per_epoch": (lambda v: _int(v, 1), "an int >= 1"),
    "num_train": (lambda v: _int(v, 0), "an int >= 0"),
    "history": (lambda v: isinstance(v, list), "a list of epoch records"),
    "rng": (lambda v: isinstance(v, dict), "an object"),
    "scaler": (lambda v: isinstance(v, dict) and all(_number(x) for x in v.values()), "an object of numbers"),
    "optim_scalars": (lambda v: isinstance(v, dict) and all(isinstance(x, dict) for x in v.values()),
                      "an object of parameter index -> object"),
    "config": (lambda v: isinstance(v, dict), "an object of train config fields"),
}


def check_state(state: Any, path: str | os.PathLike) -> dict[str, Any]:
    """The scalar state of a resume file if every field has the type and range `fit` writes."""
    if not isinstance(state, dict):
        raise ZooError(f"cannot resume from {path}: zoo.resume is {short_repr(state)}; expected an object")
    if state.get("format") != RESUME_FORMAT:
        raise ZooError(f"cannot resume from {path}: format {short_repr(state.get('format'))}, expected "
                       f"{RESUME_FORMAT}")
    for key, (ok, allowed) in _STATE_FIELDS.items():
        if key not in state:
            raise ZooError(f"cannot resume from {path}: the field {key!r} is missing (not a complete zoo resume file)")
        if not ok(state[key]):
            raise ZooError(f"cannot resume from {path}: {key}={short_repr(state[key])} is not allowed; "
                           f"expected {allowed}")
    for i, rec in enumerate(state["history"]):
        if not isinstance(rec, dict) or not all(_number(rec.get(k)) for k in HISTORY_NUMBERS):
            raise ZooError(f"cannot resume from {path}: history[{i}]={short_repr(rec)} is not allowed; expected an "
                           f"object with finite numbers {', '.join(HISTORY_NUMBERS)}")
    if len(state["history"]) != state["epoch"] or state["step"] != state["epoch"] * state["steps_per_epoch"]:
        raise ZooError(f"cannot resume from {path}: epoch {state['epoch']}, step {state['step']} and "
                       f"{len(state['history'])} history records do not agree ({state['steps_per_epoch']} steps "
                       "per epoch)")
    problem = _rng_problem(state["rng"])
    if problem is not None:
        raise ZooError(f"cannot resume from {path}: {problem}")
    sp = state.get("speed")  # absent in files written before zoo.train_speed
    if sp is not None and not (isinstance(sp, dict) and sp.get("precision") in ("fp32", "bf16")
                               and isinstance(sp.get("channels_last"), bool) and isinstance(sp.get("reason"), str)):
        raise ZooError(f"cannot resume from {path}: speed={short_repr(sp)} is not allowed; expected an object with "
                       "precision 'fp32' or 'bf16', channels_last true/false and a reason string")
    return state


def read_resume(path: Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Tensors and checked scalar state of a resume file; ZooError when it is missing, corrupt or malformed."""
    if not path.is_file():
        raise ZooError(f"cannot resume: no checkpoint {path} (start without resume, or point out_dir at the run)")
    try:
        meta, _ = read_header(path)
        tensors = load_tensors(path)  # NaN/inf refused: fit never writes them (it stops with TrainingDiverged)
    except ZooError as e:
        raise ZooError(f"cannot resume from {path}: {e}") from None
    if "resume" not in meta:
        raise ZooError(f"cannot resume from {path}: the file is not a zoo resume file (no zoo.resume header entry)")
    odd = [k for k in tensors if not k.startswith(("model.", "optim.", "extra."))]
    if odd:
        raise ZooError(f"cannot resume from {path}: tensor {short_repr(odd[0])} is not allowed; a resume file holds "
                       "only model.*, optim.* and extra.* tensors")
    return tensors, check_state(meta["resume"], path)


def check_resume(state: Mapping[str, Any], cfg: Mapping[str, Any], spe: int, n_train: int, path: Path) -> None:
    """Refuse resuming with a different train config (except RESUMABLE_CHANGES) or a different dataset size."""
    saved = state["config"]
    diff = [f"{k}: {short_repr(saved.get(k))} -> {v!r}" for k, v in cfg.items()
            if k not in RESUMABLE_CHANGES and saved.get(k) != v]
    if diff:
        raise ZooError(f"cannot resume from {path}: the train config differs from the checkpoint's ("
                       + "; ".join(diff[:5]) + f"); only {', '.join(RESUMABLE_CHANGES)} may change")
    if state["steps_per_epoch"] != spe or state["num_train"] != n_train:
        raise ZooError(f"cannot resume from {path}: the checkpoint was made with {state['num_train']} training "
                       f"images in {state['steps_per_epoch']} steps per epoch, this run has {n_train} in {spe}")


def optimizer_state(tensors: Mapping[str, Tensor], scalars: Mapping[str, Any], params: Sequence[Tensor],
                    path: Path) -> dict[int, dict[str, Any]]:
    """Per-parameter optimizer state from a resume file, every name, index and shape checked against `params`."""
    out: dict[int, dict[str, Any]] = {}
    for k, v in tensors.items():
        if not k.startswith("optim."):
            continue
        _, pid, name = (k.split(".", 2) + ["", ""])[:3]
        if not pid.isdigit() or int(pid) >= len(params) or name not in OPTIM_TENSORS:
            raise ZooError(f"cannot resume from {path}: optimizer tensor {short_repr(k)} is not allowed; expected "
                           f"optim.<parameter index below {len(params)}>.<one of {', '.join(OPTIM_TENSORS)}>")
        want = () if name == "step" else tuple(params[int(pid)].shape)
        if tuple(v.shape) != want or not v.is_floating_point():
            raise ZooError(f"cannot resume from {path}: optimizer tensor {k} is {v.dtype} {tuple(v.shape)}, "
                           f"expected a float tensor of shape {want}")
        out.setdefault(int(pid), {})[name] = v
    for pid, d in scalars.items():
        if not pid.isdigit() or int(pid) >= len(params) or not all(
                isinstance(x, str) and (v is None or isinstance(v, (bool, int, float))) for x, v in d.items()):
            raise ZooError(f"cannot resume from {path}: optim_scalars entry {short_repr(pid)}: "
                           f"{short_repr(d)} is not allowed; expected a parameter index -> object of numbers")
        out.setdefault(int(pid), {}).update(d)
    return out
