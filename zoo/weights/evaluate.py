"""Re-measure the indexed weights: load each checkpoint by tag, evaluate it on its dataset's held-out
split and compare the top-1 with the one recorded in the index (like timm's `validate.py`, but against
the committed number). Entries whose dataset is not on this machine are reported as skipped, with why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from zoo._registry import create
from zoo.data import get_loaders
from zoo.errors import ZooError
from zoo.train import evaluate
from zoo.weights.index import WeightsEntry, entry_path, read_index

TOP1_TOLERANCE = 0.01  # points: the index stores top-1 rounded to two decimals


@dataclass(frozen=True)
class Measured:
    """One entry re-evaluated: the recorded and measured top-1, or why it was skipped."""

    entry: WeightsEntry
    recorded: float | None  # top-1 in the index (None: the entry records no top-1)
    measured: float | None  # None when skipped
    skipped: str = ""  # why it was not evaluated

    @property
    def ok(self) -> bool:
        """True when skipped or when the measured top-1 is within TOP1_TOLERANCE of the recorded one."""
        if self.measured is None or self.recorded is None:
            return True
        return abs(self.measured - self.recorded) <= TOP1_TOLERANCE + 1e-9

    def line(self) -> str:
        """One line for `zoo weights verify --evaluate`."""
        name = self.entry.describe()
        if self.measured is None:
            return f"{name}: skipped ({self.skipped})"
        verdict = "ok" if self.ok else f"MISMATCH (tolerance {TOP1_TOLERANCE} points)"
        return (f"{name}: top-1 {self.measured:.2f}% on {self.entry.dataset} held-out images, "
                f"index says {self.recorded:.2f}%: {verdict}")


def evaluate_entry(entry: WeightsEntry, weights_dir: str | os.PathLike | None = None,
                   batch_size: int = 256) -> Measured:
    """Load one indexed checkpoint (its spec rebuilds the model) and measure its held-out top-1."""
    recorded = entry.metrics.get("top1")
    model = create(entry.architecture, weights=str(entry_path(entry, weights_dir)))
    try:  # the dataset may simply not be on this machine (MNIST and CIFAR files live outside the repo)
        norm = {k: v for k, v in (("mean", model.spec.mean), ("std", model.spec.std)) if v is not None}
        _, val, info = get_loaders(entry.dataset, model.spec.input_size, batch_size=batch_size, **norm)
    except ZooError as e:
        return Measured(entry, recorded, None, skipped=str(e).split("; ")[0])
    if entry.classes is not None and info.class_names != entry.classes:
        raise ZooError(f"{entry.describe()}: the index lists classes {entry.classes[:3]}... but dataset "
                       f"{entry.dataset!r} has {info.class_names[:3]}...")
    return Measured(entry, recorded, evaluate(model, val)["top1"])


def evaluate_index(weights_dir: str | os.PathLike | None = None) -> list[Measured]:
    """Every indexed checkpoint re-evaluated (or skipped with a reason), in index order."""
    return [evaluate_entry(e, weights_dir) for e in read_index(weights_dir)]
