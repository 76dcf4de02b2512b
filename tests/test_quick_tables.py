"""The recipe's `quick:` overrides reach the sections they name (quick.train the train sections, quick.finetune
the `finetune:` blocks of prune / quantize / lowrank stages) and are checked merged into each of them."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from zoo.recipe import RecipeError, load_recipe
from zoo.recipe.engine import Run

BASE = {
    "dataset": {"name": "digits", "input_size": [1, 28, 28]},
    "defaults": {"train": {"epochs": 5, "lr": 0.1, "batch_size": 64},
                 "finetune": {"epochs": 2, "lr": 0.01, "batch_size": 64}},
    "stages": {
        "dense": {"type": "train", "model": "lenet5"},
        "pruned": {"type": "prune", "from": "dense", "amount": 0.5, "finetune": True},
        "int8": {"type": "quantize", "from": "pruned", "method": "static"},
        "qat": {"type": "quantize", "from": "dense", "method": "qat", "finetune": {"epochs": 3}},
    },
}


def _options(tmp_path: Path, quick: dict | None, run_quick: bool = True) -> dict[str, dict]:
    raw = dict(BASE, **({"quick": quick} if quick is not None else {}))
    p = tmp_path / "q.yaml"
    p.write_text(yaml.safe_dump(raw))
    recipe = load_recipe(p)
    run = Run(recipe, tmp_path / "out", run_quick, log=lambda s: None)
    return {name: run.options(spec).get("train") for name, spec in recipe.stages.items()}


def test_quick_finetune_overrides_only_finetune_blocks(tmp_path: Path) -> None:
    o = _options(tmp_path, {"train": {"epochs": 2}, "finetune": {"epochs": 4, "batch_size": 16}})
    assert (o["dense"]["epochs"], o["dense"]["batch_size"], o["dense"]["lr"]) == (2, 64, 0.1)
    assert (o["pruned"]["epochs"], o["pruned"]["batch_size"], o["pruned"]["lr"]) == (4, 16, 0.01)
    assert (o["qat"]["epochs"], o["qat"]["batch_size"]) == (4, 16)
    assert o["int8"] is None  # post-training: no train section to override


def test_quick_finetune_defaults_to_the_train_overrides(tmp_path: Path) -> None:
    o = _options(tmp_path, {"train": {"epochs": 2, "batch_size": 32}})
    assert [(o[s]["epochs"], o[s]["batch_size"]) for s in ("dense", "pruned", "qat")] == [(2, 32)] * 3
    o = _options(tmp_path, None)
    assert [o[s]["epochs"] for s in ("dense", "pruned", "qat")] == [1, 1, 1]


def test_full_runs_ignore_the_quick_section(tmp_path: Path) -> None:
    o = _options(tmp_path, {"train": {"epochs": 2}, "finetune": {"epochs": 4}}, run_quick=False)
    assert [o[s]["epochs"] for s in ("dense", "pruned", "qat")] == [5, 2, 3]


@pytest.mark.parametrize("quick,key,fragment,dense", [
    ({"finetune": {"lrr": 0.1}}, "quick.finetune.lrr", "unknown train key", {}),
    ({"finetune": [4]}, "quick.finetune", "expected a mapping", {}),
    ({"finetune": {"epochs": 0}}, "quick.finetune.epochs", "stages.pruned's finetune section", {}),
    ({"fine_tune": {"epochs": 2}}, "quick.fine_tune", "seeds, train, finetune", {}),
    # a valid override that breaks a stage it reaches: dense warms up for 2 epochs, quick trains it for 1
    ({}, "quick.train", "warmup_epochs=2 is not allowed; expected a finite number >= 0 and <= 1 (with "
                        "stages.dense's train section)", {"warmup_epochs": 2}),
])
def test_bad_quick_overrides_name_the_key(tmp_path: Path, quick: dict, key: str, fragment: str, dense: dict
                                         ) -> None:
    """Checked at load time, each override merged into every train section it reaches."""
    raw = dict(BASE, quick=quick)
    raw["stages"] = dict(BASE["stages"], dense={**BASE["stages"]["dense"], "train": dense})
    p = tmp_path / "q.yaml"
    p.write_text(yaml.safe_dump(raw))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    assert str(e.value).startswith(f"{p}: {key}: ") and fragment in str(e.value), str(e.value)
