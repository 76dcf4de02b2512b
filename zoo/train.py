"""Supervised training of zoo models: SGD with Nesterov momentum or AdamW (Loshchilov & Hutter 2019),
cosine (Loshchilov & Hutter 2017) or step learning rate with linear warm-up (Goyal et al. 2017),
label smoothing (Szegedy et al. 2016), AMP on CUDA, DDP under torchrun.

Checkpoints are safetensors + JSON (no pickles), written atomically every epoch, and `resume=True`
continues bit-exactly (on CPU): model, optimizer, LR position, RNG states and the (seed, epoch)
determined shuffling are all restored. A NaN/inf loss stops training with `TrainingDiverged`.

This module is the public face; the code lives in sibling modules, imported one way:
  zoo.train_config      TrainConfig, config_from_dict, TrainResult, TrainingDiverged, lr_at
  zoo.train_state       resume-file validation, RNG and optimizer state (no pickles)
  zoo.train_checkpoint  the run's files: resume, last/best weights, log.jsonl, manifest (uses the two above)
  zoo.train_loop        fit, evaluate, resolve_device, init_distributed (uses the three above)
  zoo.train_cli         `zoo train` (add_commands) and weights_sha256 (uses the loop)
"""

from __future__ import annotations

from zoo.train_cli import add_commands, weights_sha256
from zoo.train_config import (
    OPTIMIZERS, SCHEDULES, TrainConfig, TrainingDiverged, TrainResult, config_from_dict, lr_at,
)
from zoo.train_loop import evaluate, fit, init_distributed, resolve_device
from zoo.train_state import (  # RESUMABLE_CHANGES is part of this module's API too
    RESUMABLE_CHANGES, RESUME_FORMAT, check_resume, optimizer_state, read_resume, rng_state, seed_all, set_rng_state,
)

__all__ = [
    "OPTIMIZERS", "RESUMABLE_CHANGES", "RESUME_FORMAT", "SCHEDULES", "TrainConfig", "TrainResult", "TrainingDiverged",
    "add_commands", "check_resume", "config_from_dict", "evaluate", "fit", "init_distributed", "lr_at",
    "optimizer_state", "read_resume", "resolve_device", "rng_state", "seed_all", "set_rng_state", "weights_sha256",
]
