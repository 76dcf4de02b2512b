"""Recipe validation: every bad recipe fails before anything runs, naming the file, the key path and
what is allowed; the committed recipes validate and every model they name builds (no training)."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

import zoo
from zoo.cli import main
from zoo.recipe import RecipeError, load_recipe
from zoo.data.sources import data_root
from zoo.recipe.checks import fill_kwargs
from zoo.recipe.schema import recipe_path

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
CIFAR_FAMILIES = ("mobilenet_v1", "mobilenet_v2", "shufflenet_v1", "shufflenet_v2", "squeezenet", "resnet")

BASE = {
    "name": "v",
    "dataset": {"name": "digits", "input_size": [1, 32, 32]},
    "seeds": [0, 1],
    "defaults": {"train": {"epochs": 2, "lr": 0.05}, "kd": {"temperature": 4.0}},
    "stages": {
        "teacher": {"type": "train", "model": "resnet20", "seed": 0},
        "student": {"type": "train", "model": "mobilenet_v1", "kwargs": {"width": 0.25}},
        "kd_w05": {"type": "distill", "model": "mobilenet_v1", "kwargs": {"width": 0.5}, "teacher": "teacher",
                   "kd": {"alpha": 0.5}},
        "finetune": {"type": "train", "from": "student", "train": {"epochs": 1}},
    },
    "table": {"rows": ["teacher", {"stage": "kd_w05", "label": "KD 0.5"}]},
    "tolerance": {"top1": 1.0, "params": 0},
}


def _write(tmp_path: Path, recipe: dict, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return p


def _fails(tmp_path: Path, recipe: dict, key: str, *fragments: str) -> str:
    """Validate and expect `<file>: <key>: ...` naming every fragment; return the message."""
    p = _write(tmp_path, recipe)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    msg = str(e.value)
    assert msg.startswith(f"{p}: {key}: "), msg
    for f in fragments:
        assert f in msg, (f, msg)
    return msg


def _mut(**paths: object) -> dict:
    """A copy of BASE with dotted paths set (value None deletes the key)."""
    r = copy.deepcopy(BASE)
    for dotted, value in paths.items():
        keys = dotted.split("__")
        d = r
        for k in keys[:-1]:
            d = d[k]
        if value is None:
            del d[keys[-1]]
        else:
            d[keys[-1]] = value
    return r


def test_base_recipe_validates_in_dependency_order(tmp_path: Path) -> None:
    r = load_recipe(_write(tmp_path, BASE))
    order = list(r.stages)
    assert order.index("teacher") < order.index("kd_w05")
    assert order.index("student") < order.index("finetune")
    assert r.seeds == [0, 1]
    assert r.stages["finetune"].model == "mobilenet_v1" and r.stages["finetune"].kwargs == {"width": 0.25}
    assert r.stages["kd_w05"].deps == ("teacher",)
    assert r.stages["kd_w05"].options["kd"]["alpha"] == 0.5 and r.stages["kd_w05"].options["kd"]["temperature"] == 4
    assert r.stages["finetune"].options["train"]["epochs"] == 1 and r.stages["student"].options["train"]["epochs"] == 2
    assert [row.stage for row in r.rows] == ["teacher", "kd_w05"] and r.rows[1].label == "KD 0.5"
    assert r.quick["seeds"] == [0] and r.quick["train"] == {"epochs": 1}
    assert r.latency == {"threads": 1, "batch_size": 1}


@pytest.mark.parametrize("recipe,key,fragments", [
    (_mut(epochs=3), "epochs", ["unknown key", "allowed: name, description, dataset"]),
    (_mut(dataset__name="svhn"), "dataset.name", ["'svhn'", "digits, mnist, fashion_mnist, cifar10"]),
    (_mut(dataset__size=[1, 32, 32]), "dataset.size", ["unknown key", "input_size"]),
    (_mut(stages__teacher__epochs=3), "stages.teacher.epochs", ["unknown key", "train", "from"]),
    (_mut(stages__teacher__type="prune_it"), "stages.teacher.type", ["'prune_it'", "train, distill"]),
    (_mut(stages__student__train={"epoch": 3}), "stages.student.train.epoch", ["unknown train key", "epochs"]),
    (_mut(stages__kd_w05__kd={"temp": 3}), "stages.kd_w05.kd.temp", ["unknown kd key", "temperature"]),
    (_mut(defaults__train={"lrr": 0.1}), "defaults.train.lrr", ["unknown train key", "lr"]),
    (_mut(defaults__optim={}), "defaults.optim", ["unknown key", "train, kd"]),
    (_mut(stages__student__train={"seed": 3}), "stages.student.train.seed", ["recipe's `seeds`"]),
    (_mut(table={"rows": ["teacher"], "cols": []}), "table.cols", ["unknown key", "columns"]),
    (_mut(tolerance={"top1": 1, "acc": 2}), "tolerance.acc", ["unknown key", "top1, params, macs, size_kb"]),
])
def test_unknown_keys_name_the_key_and_the_allowed_ones(tmp_path, recipe, key, fragments) -> None:
    _fails(tmp_path, recipe, key, *fragments)


@pytest.mark.parametrize("recipe,key,fragments", [
    (_mut(seeds="0,1"), "seeds", ["expected a list of ints", "'0,1'"]),
    (_mut(seeds=[0, 0]), "seeds", ["distinct"]),
    (_mut(seed=-1, seeds=None), "seed", [">= 0"]),
    (_mut(stages__student__train={"epochs": 4, "warmup_epochs": 5}), "stages.student.train.warmup_epochs",
     ["warmup_epochs=5"]),
    (_mut(stages__student__train={"epochs": "ten"}), "stages.student.train.epochs", ["expected int", "'ten'"]),
    (_mut(stages__student__train={"lr": -1.0}), "stages.student.train.lr", ["lr=-1.0", "> 0"]),
    (_mut(stages__student__train={"weight_decay": "1e-4"}), "stages.student.train.weight_decay",
     ["expected a number", "YAML reads 1e-4 as a string", "1.0e-4"]),
    (_mut(stages__student__train={"nesterov": "yes"}), "stages.student.train.nesterov", ["expected bool"]),
    (_mut(stages__student__train={"optimizer": "lion"}), "stages.student.train.optimizer", ["'lion'", "'sgd'"]),
    (_mut(stages__kd_w05__kd={"alpha": "high"}), "stages.kd_w05.kd.alpha", ["expected a number"]),
    (_mut(stages__kd_w05__kd={"alpha": 1.5}), "stages.kd_w05.kd.alpha", ["alpha=1.5", "[0, 1]"]),
    (_mut(stages__teacher__seed=1.5), "stages.teacher.seed", ["expected int"]),
    (_mut(stages=[{"type": "train"}]), "stages", ["expected a mapping", "list"]),
    (_mut(stages__student__kwargs=[0.25]), "stages.student.kwargs", ["expected a mapping"]),
    (_mut(dataset__input_size=[32, 32]), "dataset.input_size", ["[C, H, W]"]),
    (_mut(dataset__input_size=[2, 32, 32]), "dataset.input_size", ["2 channels", "1 or 3"]),
    (_mut(dataset__val_fraction=1.5), "dataset.val_fraction", ["(0, 1)"]),
    (_mut(tolerance={"top1": -1}), "tolerance.top1", [">= 0"]),
    (_mut(latency={"threads": 0}), "latency.threads", [">= 1"]),
    (_mut(table={"rows": [{"stage": "teacher", "reference": {"top1": 92.6}}]}), "table.rows[0].reference.source",
     ["needs its source"]),
    (_mut(table={"rows": ["teacher"], "columns": ["model", "accuracy"]}), "table.columns[1]", ["'accuracy'", "top1"]),
])
def test_wrong_types_and_values_name_the_key(tmp_path, recipe, key, fragments) -> None:
    _fails(tmp_path, recipe, key, *fragments)


@pytest.mark.parametrize("recipe,key,fragments", [
    (_mut(stages__kd_w05__teacher="teachr"), "stages.kd_w05.teacher",
     ["'teachr' is not a stage", "allowed: teacher, student, finetune", ".safetensors"]),
    (_mut(stages__finetune__from="nosuch"), "stages.finetune.from", ["'nosuch' is not a stage"]),
    (_mut(stages__finetune__from="finetune"), "stages.finetune.from", ["cannot refer to itself"]),
    (_mut(stages__kd_w05__teacher="missing.safetensors"), "stages.kd_w05.teacher", ["does not exist"]),
    (_mut(table={"rows": ["teacher", "ghost"]}), "table.rows[1].stage", ["'ghost' is not a stage"]),
    (_mut(stages__kd_w05__teacher=None), "stages.kd_w05.teacher", ["missing required key"]),
    (_mut(stages__student__model=None), "stages.student", ["exactly one of `model`", "`from`"]),
    (_mut(stages__finetune__model="resnet20"), "stages.finetune", ["exactly one of `model`"]),
    (_mut(stages__finetune__kwargs={"width": 1.0}), "stages.finetune.kwargs", ["inherits"]),
])
def test_missing_references_name_the_key(tmp_path, recipe, key, fragments) -> None:
    _fails(tmp_path, recipe, key, *fragments)


def test_cycle_names_the_key_and_the_cycle(tmp_path: Path) -> None:
    r = _mut(stages__student={"type": "train", "from": "finetune"})
    _fails(tmp_path, r, "stages.student.from", "cycle", "student -> finetune -> student")
    r = _mut(stages__teacher={"type": "distill", "model": "resnet20", "teacher": "kd_w05"})
    _fails(tmp_path, r, "stages.teacher.teacher", "cycle", "teacher -> kd_w05 -> teacher")


def test_fixed_seed_stage_cannot_follow_per_seed_stage(tmp_path: Path) -> None:
    r = _mut(stages__finetune__seed=0)
    _fails(tmp_path, r, "stages.finetune.seed", "'student'", "fixed seed")


@pytest.mark.parametrize("recipe,key,fragments", [
    (_mut(stages__student__model="mobilenet_v9"), "stages.student.model", ["unknown model 'mobilenet_v9'"]),
    (_mut(stages__student__kwargs={"width": -1}), "stages.student.kwargs.width", ["width=-1", "> 0"]),
    (_mut(stages__student__kwargs={"widht": 0.5}), "stages.student.kwargs.widht", ["no argument 'widht'", "width"]),
    (_mut(stages__student__kwargs={"num_classes": 100}), "stages.student.kwargs.num_classes",
     ["does not match the dataset", "num_classes=10"]),
    (_mut(stages__student__kwargs={"in_chans": 3}), "stages.student.kwargs.in_chans", ["in_chans=1"]),
    (_mut(dataset__input_size=[1, 16, 16], stages__teacher__model="lenet5"), "stages.student.model",
     ["mobilenet_v1 needs inputs of at least 32x32", "[1, 16, 16]"]),
])
def test_model_kwargs_are_validated_through_the_registry(tmp_path, recipe, key, fragments) -> None:
    _fails(tmp_path, recipe, key, *fragments)


def test_dataset_fills_in_chans_classes_and_resolution(tmp_path: Path) -> None:
    r = load_recipe(_write(tmp_path, _mut(stages__teacher__model="lenet5")))  # fixed-size net follows the data
    assert fill_kwargs("lenet5", {}, r.dataset) == {"in_chans": 1, "num_classes": 10, "resolution": 32}
    assert fill_kwargs("resnet20", {}, r.dataset) == {"in_chans": 1, "num_classes": 10}
    assert fill_kwargs("mobilenet_v1", {"width": 0.5}, r.dataset) == {
        "width": 0.5, "in_chans": 1, "num_classes": 10, "resolution": 32}


def test_yaml_problems_and_cli_exit_code(tmp_path: Path, capsys) -> None:
    p = tmp_path / "dup.yaml"
    p.write_text("name: a\nname: b\ndataset: {name: digits, input_size: [1, 32, 32]}\nstages: {}\n")
    with pytest.raises(RecipeError, match=r"line 2: duplicate key 'name'"):
        load_recipe(p)
    p.write_text("name: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(p)
    p.write_text("!!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(RecipeError, match="not valid YAML"):  # safe_load never constructs objects
        load_recipe(p)
    bad = _write(tmp_path, _mut(stages__kd_w05__teacher="teachr"), "bad.yaml")
    assert main(["recipe", "validate", str(bad)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("zoo: error: ") and "stages.kd_w05.teacher" in err and "Traceback" not in err
    assert main(["recipe", "run", str(tmp_path / "absent.yaml")]) == 2
    assert "cannot read recipe" in capsys.readouterr().err


def _shared_files(recipe: Path) -> list[Path]:
    """The `$ZOO_DATA/...` files a committed recipe refers to (string values of the parsed YAML)."""
    found: list[Path] = []
    stack: list[Any] = [yaml.safe_load(recipe.read_text())]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, str) and v.startswith("$ZOO_DATA/"):
            found.append(data_root() / v[len("$ZOO_DATA/"):])
    return found


def test_committed_recipes_exist_and_validate() -> None:
    names = {p.name for p in RECIPES}
    assert {"digits_kd.yaml", "mnist_hinton.yaml"} <= names
    assert {f"cifar10_{f}.yaml" for f in CIFAR_FAMILIES} <= names
    self_contained = [p for p in RECIPES if not _shared_files(p)]
    assert main(["recipe", "validate", *map(str, self_contained)]) == 0


@pytest.mark.parametrize("recipe", [p for p in RECIPES if _shared_files(p)], ids=lambda p: p.stem)
def test_committed_recipes_on_shared_data_validate(recipe: Path) -> None:
    missing = [str(f) for f in _shared_files(recipe) if not f.exists()]
    if missing:
        pytest.skip(f"{recipe.name} needs {', '.join(missing)} (set ZOO_DATA to the shared data folder)")
    assert main(["recipe", "validate", str(recipe)]) == 0


def test_zoo_data_paths_are_under_the_data_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZOO_DATA", str(tmp_path))
    assert recipe_path("$ZOO_DATA/pretrained/x.tflite", REPO / "recipes" / "r.yaml") == tmp_path / "pretrained/x.tflite"
    assert recipe_path("w.safetensors", tmp_path / "r.yaml") == tmp_path / "w.safetensors"
    recipe = {**BASE, "stages": {**BASE["stages"], "teacher": {"type": "train", "model": "resnet20", "seed": 0,
                                                               "init": "$ZOO_DATA/absent.safetensors"}}}
    _fails(tmp_path, recipe, "stages.teacher.init", str(tmp_path / "absent.safetensors"), "does not exist")


@pytest.mark.parametrize("family", CIFAR_FAMILIES)
def test_cifar_recipes_build_every_model(family: str) -> None:
    r = load_recipe(REPO / "recipes" / f"cifar10_{family}.yaml")
    assert r.dataset["name"] == "cifar10" and r.input_size == (3, 32, 32)
    assert r.seeds and all(s.type == "train" for s in r.stages.values())
    for stage in r.stages.values():
        model = zoo.create(stage.model, **fill_kwargs(stage.model, stage.kwargs, r.dataset))
        assert model.spec.kwargs["num_classes"] == 10 and model.spec.kwargs["in_chans"] == 3
        assert stage.options["train"]["epochs"] >= 100  # the standard CIFAR schedules are long
    for row in r.rows:
        ref = row.reference
        assert "top1" in ref and ref.get("source"), row  # a number with its source, or null marked absent
        if ref["top1"] is not None:
            assert 50 < ref["top1"] < 100 and re.search(r"\w", ref["source"])
