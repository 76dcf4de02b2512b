"""README.md's "Extending zoo" examples run as written, and its package map matches the real imports.

Each example is the fenced block right after an `<!-- example: NAME -->` marker. It runs in a fresh
namespace; the test then checks what it registered through the public APIs (create, profile, tables,
compress; a recipe run; loaders and a training run). A fixture restores every registry afterwards, so
the examples' registrations never leak into other tests run in the same process (pytest-xdist workers).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
import torch.nn as nn
import yaml

import zoo
import zoo.compress
import zoo.data
import zoo.recipe.checks
import zoo.tables
from zoo import _registry
from zoo.recipe import STAGE_TYPES, RecipeError, load_checkpoint, load_recipe, run_recipe
from zoo.recipe.registry import DEFAULT_SECTIONS

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
PACKAGE = REPO / "zoo"


def readme_block(name: str) -> tuple[str, int]:
    """(text, line number of its first line) of the fenced block right after `<!-- example: NAME -->`."""
    text = README.read_text(encoding="utf-8")
    found = re.search(rf"^<!-- example: {re.escape(name)} -->\n```[a-z]*\n(.*?)^```$", text, re.S | re.M)
    if found is None:
        pytest.fail(f"README.md has no fenced block right after `<!-- example: {name} -->`")
    return found.group(1), text.count("\n", 0, found.start(1)) + 1


def run_block(name: str) -> dict[str, Any]:
    """Execute a README Python block in a fresh namespace; tracebacks point at README.md's own lines."""
    code, first = readme_block(name)
    namespace: dict[str, Any] = {"__name__": f"readme_{name.replace('-', '_')}"}
    exec(compile("\n" * (first - 1) + code, str(README), "exec"), namespace)  # noqa: S102 - our own README
    return namespace


def check_printed(name: str, out: str) -> None:
    """Each `print(...)  # X` line of a block printed X (or X's head, before ' = ' or other explanation)."""
    code, _ = readme_block(name)
    expected = [ln.split("  # ", 1)[1] for ln in code.splitlines() if ln.startswith("print(") and "  # " in ln]
    printed = out.strip().splitlines()[-len(expected):] if expected else []
    assert len(printed) == len(expected), f"README {name}: printed {printed}, README says {expected}"
    for got, want in zip(printed, expected):
        assert want == got or want.startswith(got + " "), f"README {name}: printed {got!r}, README says {want!r}"


@pytest.fixture(autouse=True)
def _restore_registries(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Run in tmp_path on one thread; then restore the model, stage-type, defaults and dataset registries."""
    zoo.list_models()  # load the built-in families first, so that the snapshot holds them
    registries: list[dict] = [_registry._REGISTRY, STAGE_TYPES, DEFAULT_SECTIONS, zoo.data.DATASETS]
    saved = [dict(r) for r in registries]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small models on a busy machine: more intra-op threads only oversubscribe
    monkeypatch.chdir(tmp_path)
    yield
    torch.set_num_threads(threads)
    for reg, snapshot in zip(registries, saved):
        reg.clear()
        reg.update(snapshot)


def tinynet_macs(width: int, in_chans: int, num_classes: int, side: int) -> int:
    """TinyNet's conv + linear multiply-accumulates per image, counted by hand."""
    s1, s2 = (side + 1) // 2, (side + 3) // 4  # 3x3 convs, stride 2, padding 1
    return s1 * s1 * width * in_chans * 9 + s2 * s2 * 2 * width * width * 9 + 2 * width * num_classes


def test_model_family_example(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    assert "tinynet" not in zoo.list_models()
    ns = run_block("model-family")
    check_printed("model-family", capsys.readouterr().out)
    assert zoo.list_models("tiny*") == ["tinynet"] and zoo.model_card("tinynet").family == "tinynet"
    m = ns["m"]
    assert m.spec.name == "tinynet" and m.spec.input_size == (3, 32, 32)
    assert zoo.profile(m).macs == tinynet_macs(8, 3, 10, 32) == 129_184
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)

    small = zoo.create("tinynet", width=4, in_chans=1, num_classes=3)
    assert small(torch.randn(5, 1, 20, 20)).shape == (5, 3)
    assert zoo.profile(small).macs == tinynet_macs(4, 1, 3, 32)
    assert zoo.profile(small, input_size=(1, 20, 20)).macs == tinynet_macs(4, 1, 3, 20)
    with pytest.raises(zoo.ZooError, match=r"tinynet: width=0 is not allowed; expected int >= 1"):
        zoo.create("tinynet", width=0)
    with pytest.raises(zoo.ZooError, match=r"tinynet: expected input of shape \(N, 3, H, W\) with H, W >= 8"):
        m(torch.randn(1, 3, 4, 4))
    with pytest.raises(zoo.ZooError, match="'tinynet' is already registered"):
        run_block("model-family")

    (row,) = zoo.tables.table_rows("tinynet")  # the card's Reference is checked like the papers' numbers
    assert row.ok and row.zoo_macs == row.paper_macs == 129_184

    # the README's claim: the new family prunes, quantizes and saves like the built-in ones
    pruned = zoo.compress.prune(m, 0.5, granularity="channel")
    assert zoo.profile(pruned).macs < 129_184
    x = torch.randn(8, 3, 32, 32)
    q = zoo.compress.quantize(pruned, "static", calibration=[x])
    assert q(x).shape == (8, 10) and zoo.profile(q).macs == zoo.profile(pruned).macs
    for model in (pruned, q):
        zoo.compress.save(model, tmp_path / "m.safetensors")
        back = zoo.compress.load(tmp_path / "m.safetensors")  # rebuilt through the registry, steps replayed
        assert torch.allclose(back.eval()(x), model.eval()(x), atol=1e-6)


def _bn_buffers(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if k.endswith(("running_mean", "running_var"))}


def test_stage_type_example(tmp_path: Path) -> None:
    assert "bn_recalibrate" not in STAGE_TYPES
    run_block("stage-type")
    assert "bn_recalibrate" in STAGE_TYPES
    fragment = yaml.safe_load(readme_block("stage-type-recipe")[0])
    recal = next(n for n, st in fragment["stages"].items() if st["type"] == "bn_recalibrate")
    source, batches = fragment["stages"][recal]["from"], fragment["stages"][recal]["batches"]
    recipe = {"name": "readme_stage", "dataset": {"name": "digits", "input_size": [1, 8, 8]}, "seed": 0,
              "defaults": {"train": {"epochs": 1, "lr": 0.1, "batch_size": 32}}, **fragment,
              "table": {"rows": list(fragment["stages"])}}
    path = tmp_path / "stage.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    res = run_recipe(path, out=tmp_path / "out", log=lambda s: None)  # full digits: 1,437 train images
    rows = {r["stage"]: r for r in res["rows"]}
    assert rows[recal]["type"] == "bn_recalibrate" and rows[recal]["seeds"] == [0]
    assert rows[recal]["params"] == rows[source]["params"] and 0 <= rows[recal]["top1"] <= 100
    after = load_checkpoint(tmp_path / "out" / recal / "seed0" / "model.safetensors")
    before = load_checkpoint(tmp_path / "out" / source / "seed0" / "model.safetensors")
    bns = [m for m in after.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(int(bn.num_batches_tracked) == batches for bn in bns)  # reset, then `batches` batches
    new, old = _bn_buffers(after), _bn_buffers(before)
    assert not all(torch.equal(new[k], old[k]) for k in new)  # the statistics changed ...
    weights = {k: v for k, v in after.state_dict().items() if k not in new and not k.endswith("num_batches_tracked")}
    assert all(torch.equal(v, before.state_dict()[k]) for k, v in weights.items())  # ... and nothing else

    for bad, message in ((0, r"0 is not allowed; expected an int >= 1"), ("many", r"expected int, got str")):
        recipe["stages"][recal]["batches"] = bad
        path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        with pytest.raises(RecipeError, match=rf"stages\.{recal}\.batches: {message}"):
            load_recipe(path)
    recipe["stages"][recal]["batchez"] = 4
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    with pytest.raises(RecipeError, match=rf"stages\.{recal}\.batchez: unknown key; allowed: .*batches"):
        load_recipe(path)


def test_dataset_example(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ns = run_block("dataset")
    check_printed("dataset", capsys.readouterr().out)
    info = ns["info"]
    assert sorted(p.name for p in (tmp_path / "shapes").iterdir()) == info.class_names == ["circle", "cross", "square"]
    assert info.name == "imagefolder" and info.num_classes == 3 and (info.num_train, info.num_val) == (144, 36)
    x, y = next(iter(ns["train"]))
    assert x.shape == (32, 1, 16, 16) and x.dtype == torch.float32 and set(y.tolist()) <= {0, 1, 2}
    images = torch.cat([b for b, _ in ns["train"]] + [b for b, _ in ns["val"]])
    assert abs(float(images.mean())) < 0.2  # normalised with the training split's statistics

    fragment = yaml.safe_load(readme_block("dataset-recipe")[0])
    recipe = {"name": "readme_data", **fragment, "seed": 0,
              "defaults": {"train": {"epochs": 5, "lr": 0.05, "batch_size": 16}},
              "stages": {"r20": {"type": "train", "model": "resnet20"}}}
    path = tmp_path / "data.yaml"  # next to shapes/: the recipe's root is relative to its own file
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    res = run_recipe(path, out=tmp_path / "out", log=lambda s: None)
    assert res["dataset"]["name"] == "imagefolder" and res["dataset"]["num_train"] == 144
    (row,) = res["rows"]
    assert row["top1"] > 2 * 100 / 3  # chance is 33.3%; resnet20 learns the shapes in 5 epochs


def test_dataset_registration_example(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    ns = run_block("dataset-register")
    check_printed("dataset-register", capsys.readouterr().out)
    assert zoo.data.DATASETS["stripes"].num_classes == 2 and ns["info"].class_names == ["horizontal", "vertical"]
    x, y = next(iter(ns["train"]))
    assert x.shape == (50, 1, 16, 16) and set(y.tolist()) <= {0, 1}
    with pytest.raises(zoo.ZooError, match="'stripes' is already registered"):
        zoo.data.register_dataset("stripes", "again", 2, ns["stripes"])
    with pytest.raises(zoo.ZooError, match="num_classes=1 is not allowed"):
        zoo.data.register_dataset("stripes2", "one class", 1, ns["stripes"])
    recipe = {"name": "readme_stripes", "dataset": {"name": "stripes", "input_size": [1, 16, 16]}, "seed": 0,
              "defaults": {"train": {"epochs": 3, "lr": 0.05, "batch_size": 25}},
              "stages": {"lenet": {"type": "train", "model": "lenet5"}}}
    path = tmp_path / "stripes.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    res = run_recipe(path, out=tmp_path / "out", log=lambda s: None)
    (row,) = res["rows"]
    assert res["dataset"]["num_train"] == 200 and row["top1"] > 90  # stripes are easy; chance is 50%


# ------------------------------------------------------------------------------------------ package map


def _modules() -> dict[str, Path]:
    """Module name -> file of every module of the zoo package."""
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _zoo_imports(path: Path, modules: dict[str, Path]) -> tuple[set[str], list[tuple[str, str]]]:
    """(modules imported at module level, (function, module) of zoo imports inside functions) of a file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    inside = {id(n): f.name for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
              for n in ast.walk(f) if n is not f}
    top: set[str] = set()
    hidden: list[tuple[str, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in modules else node.module
                     for a in node.names]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        else:
            continue
        for name in names:
            if name == "zoo" or name.startswith("zoo."):
                (hidden.append((inside[id(node)], name)) if id(node) in inside else top.add(name))
    return top, hidden


def _map_section() -> str:
    text = README.read_text(encoding="utf-8")
    start = text.index("\n## Package map\n")
    return text[start:text.index("\n## ", start + 1)]


def _map_entries(modules: dict[str, Path]) -> dict[str, tuple[int, str]]:
    """Module -> (position, entry) in the README's table, counting its rows bottom-up, each left to right."""
    rows = [ln for ln in _map_section().splitlines() if ln.startswith("| ") and not ln.startswith("| layer ")]
    owner: dict[str, tuple[int, str]] = {}
    packages: list[tuple[int, str]] = []
    pos = 0
    for row in reversed(rows):
        for token in re.findall(r"`([^`]+)`", row.split(" | ")[1]):
            pos += 1
            if token.endswith("/"):
                packages.append((pos, token))
                continue
            name = "zoo." + token[:-3].replace("/", ".")
            name = {"zoo.__init__": "zoo"}.get(name, name.removesuffix(".__init__"))
            assert token.endswith(".py") and name in modules, f"README package map: `{token}` is not a zoo module"
            assert name not in owner, f"README package map lists `{token}` twice"
            owner[name] = (pos, token)
    for pos, token in packages:
        prefix = "zoo." + token.rstrip("/").replace("/", ".")
        claimed = [m for m in modules if (m == prefix or m.startswith(prefix + ".")) and m not in owner]
        assert claimed, f"README package map: `{token}` is not a zoo package"
        owner.update({m: (pos, token) for m in claimed})
    return owner


def test_package_map_matches_the_imports() -> None:
    """Every module is in the README's table, and imports only modules below it (or left of it in its row)."""
    modules = _modules()
    owner = _map_entries(modules)
    missing = sorted(set(modules) - set(owner))
    assert not missing, f"README package map does not place {missing}"
    bad = []
    for mod, path in modules.items():
        pos, entry = owner[mod]
        top, _ = _zoo_imports(path, modules)
        for dep in sorted(top - {mod}):
            dep_pos, dep_entry = owner[dep]
            if not (dep_pos < pos or (dep_entry == entry and entry.endswith("/"))):
                bad.append(f"{mod} (`{entry}`) imports {dep} (`{dep_entry}`)")
    assert not bad, "imports that go up the README package map: " + "; ".join(bad)


def test_package_map_names_every_import_inside_a_function() -> None:
    section = _map_section()
    modules = _modules()
    for mod, path in modules.items():
        rel = path.relative_to(PACKAGE).as_posix()
        for func, dep in _zoo_imports(path, modules)[1]:
            assert f"`{rel}`'s `{func}`" in section, f"README package map does not mention {rel}'s {func} ({dep})"
