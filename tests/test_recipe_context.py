"""The recipe package's layers and the typed StageContext its runners get.

Layers: checks / columns / registry / schema <- stage types (stages, compress_stages, share_stage) <- engine <- report <- cli;
each module imports only the layers to its left, and no zoo import hides inside a function.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import typing
from pathlib import Path

import pytest
import torch
import yaml

import zoo
from zoo.recipe import STAGE_TYPES, StageContext, StageSpec, StageType, load_checkpoint, register_stage_type, run_recipe
from zoo.train import evaluate

REPO = Path(__file__).resolve().parents[1]
RECIPE = REPO / "zoo" / "recipe"
# module -> layer; a module may import modules of lower layers, and of its own layer only as listed in SAME_LAYER
LAYERS = {"checks": 0, "columns": 0, "compare": 0, "registry": 0, "schema": 0, "stages": 1, "compress_stages": 1,
          "share_stage": 1, "engine": 2, "report": 3, "cli": 4}
SAME_LAYER = {"registry": {"checks"}, "schema": {"checks", "columns", "registry"}, "share_stage": {"compress_stages"}}


def _zoo_imports(path: Path) -> tuple[list[str], list[str]]:
    """(module-level zoo imports, zoo imports inside functions) of a source file."""
    tree = ast.parse(path.read_text())
    inner = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
             for n in ast.walk(f)}
    top, hidden = [], []
    for node in ast.walk(tree):
        names = [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else \
            [a.name for a in node.names] if isinstance(node, ast.Import) else []
        for name in names:
            if name == "zoo" or name.startswith("zoo."):
                (hidden if id(node) in inner else top).append(name)
    return top, hidden


def test_recipe_modules_import_only_the_layers_to_their_left() -> None:
    assert {p.stem for p in RECIPE.glob("*.py")} == set(LAYERS) | {"__init__"}
    for mod, layer in LAYERS.items():
        top, _ = _zoo_imports(RECIPE / f"{mod}.py")
        for name in top:
            if name == "zoo.recipe":
                raise AssertionError(f"zoo.recipe.{mod} imports the package itself (its __init__ is the top)")
            if not name.startswith("zoo.recipe."):
                continue
            dep = name.split(".")[2]
            ok = LAYERS[dep] < layer or dep in SAME_LAYER.get(mod, set())
            assert ok, f"zoo.recipe.{mod} (layer {layer}) imports {name} (layer {LAYERS[dep]})"


def test_no_zoo_import_hides_inside_a_function() -> None:
    for path in sorted(RECIPE.glob("*.py")) + [REPO / "zoo" / "finetune.py"]:
        _, hidden = _zoo_imports(path)
        assert hidden == [], f"{path.name} imports {hidden} inside functions"


def test_runners_are_typed_with_the_context_dataclass() -> None:
    assert dataclasses.is_dataclass(StageContext)
    for name in ("train", "distill", "prune", "quantize", "lowrank", "share"):
        hints = typing.get_type_hints(STAGE_TYPES[name].runner)
        assert hints[next(iter(hints))] is StageContext, name


def _context(spec: StageSpec, stage_model=None) -> StageContext:
    return StageContext(spec=spec, seed=3, options={}, raw={}, input_size=(1, 8, 8),
                        dataset={"name": "digits", "input_size": [1, 8, 8]},
                        loaders=lambda bs: pytest.fail("no data needed"), stage_model=stage_model or pytest.fail)


def test_initial_model_is_fresh_and_seeded_or_the_from_stages() -> None:
    spec = StageSpec(name="s", type="train", model="mlp", kwargs={"hidden": [16]}, source=None, seed=None,
                     options={}, deps=())
    a, b = _context(spec).initial_model(), _context(spec).initial_model()
    linears = [m for m in a.modules() if isinstance(m, torch.nn.Linear)]
    assert linears[0].in_features == 64 and linears[-1].out_features == 10  # in_chans, classes from the dataset
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    upstream = zoo.create("mlp", hidden=[4], num_classes=10, in_chans=1, resolution=8)
    asked: list[str] = []
    ctx = _context(dataclasses.replace(spec, source="up"), stage_model=lambda n: asked.append(n) or upstream)
    assert ctx.initial_model() is upstream and asked == ["up"] and ctx.name == "s"


def test_engine_hands_runners_a_stage_context(tmp_path: Path) -> None:
    seen: list[StageContext] = []

    def runner(ctx: StageContext) -> tuple[torch.nn.Module, dict]:
        seen.append(ctx)
        model = ctx.initial_model()
        _, val, _ = ctx.loaders(32)
        return model, evaluate(model, val)

    register_stage_type(StageType(name="probe", keys={}, validate=lambda chk, p, st, d: {"k": 1}, runner=runner,
                                  needs_model=False))
    try:
        recipe = {"name": "ctx", "dataset": {"name": "digits", "input_size": [1, 8, 8]}, "seed": 2,
                  "defaults": {"train": {"epochs": 1, "lr": 0.1, "batch_size": 32}},
                  "stages": {"base": {"type": "train", "model": "mlp", "kwargs": {"hidden": [16]}},
                             "probe": {"type": "probe", "from": "base"}}}
        path = tmp_path / "ctx.yaml"
        path.write_text(yaml.safe_dump(recipe))
        res = run_recipe(path, out=tmp_path / "out", quick=True, log=lambda s: None)
    finally:
        STAGE_TYPES.pop("probe", None)
    (ctx,) = seen
    assert isinstance(ctx, StageContext) and ctx.name == "probe" and ctx.spec.source == "base"
    assert ctx.seed == 2 and ctx.options == {"k": 1} and ctx.dir == tmp_path / "out" / "probe" / "seed2"
    assert ctx.input_size == (1, 8, 8) and ctx.dataset["num_classes"] == 10 and not ctx.resume
    assert ctx.meta["stage"] == "probe" and len(ctx.meta["classes"]) == 10
    base = load_checkpoint(tmp_path / "out" / "base" / "seed2" / "model.safetensors")
    got = ctx.stage_model("base")
    assert all(torch.equal(x, y) for x, y in zip(base.state_dict().values(), got.state_dict().values()))
    rows = {r["stage"]: r for r in res["rows"]}
    assert rows["probe"]["top1"] == rows["base"]["top1"]  # the unchanged `from` model
    assert json.loads((tmp_path / "out" / "probe" / "seed2" / "done.json").read_text())["type"] == "probe"
