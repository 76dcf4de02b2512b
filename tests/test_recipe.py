"""The recipe engine end to end: --quick runs of the committed offline recipes, done-markers that skip
completed stages (and re-run exactly the stages a config change affects), and `zoo recipe check`
against its own run and against a tampered committed table."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

from zoo.errors import ZooError
from zoo.cli import main
from zoo.recipe import check_recipe, load_checkpoint, load_recipe, run_recipe

REPO = Path(__file__).resolve().parents[1]

# a tiny recipe: MLPs on 8x8 digits, two seeds, a fixed-seed teacher, a distilled and a fine-tuned stage
TINY = {
    "name": "tiny",
    "dataset": {"name": "digits", "input_size": [1, 8, 8]},
    "seeds": [0, 1],
    "quick": {"seeds": [0, 1], "train": {"epochs": 2}},
    "defaults": {"train": {"epochs": 2, "lr": 0.1, "batch_size": 32}, "kd": {"temperature": 4.0, "alpha": 0.5}},
    "stages": {
        "teacher": {"type": "train", "model": "mlp", "kwargs": {"hidden": [64]}, "seed": 0},
        "scratch": {"type": "train", "model": "mlp", "kwargs": {"hidden": [16]}},
        "kd": {"type": "distill", "model": "mlp", "kwargs": {"hidden": [16]}, "teacher": "teacher"},
        "ft": {"type": "train", "from": "scratch", "train": {"epochs": 1, "lr": 0.01}},
    },
    "table": {"rows": ["teacher", "scratch", {"stage": "kd", "label": "mlp-16 distilled"}, "ft"],
              "columns": ["model", "stage", "teacher", "top1", "errors", "errors_per_10k", "params", "macs",
                          "size_kb", "latency_ms"]},
    "tolerance": {"top1": 0.5, "params": 0, "macs": 0, "size_kb": 0},
}


def _tiny(tmp_path: Path, **changes: dict) -> Path:
    r = json.loads(json.dumps(TINY))
    for stage, upd in changes.items():
        r["stages"][stage].update(upd)
    p = tmp_path / "tiny.yaml"
    p.write_text(yaml.safe_dump(r, sort_keys=False))
    return p


def _run(path: Path, out: Path, **kw) -> tuple[dict, list[str]]:
    lines: list[str] = []
    res = run_recipe(path, out=out, quick=True, log=lines.append, **kw)
    return res, lines


def _ran(lines: list[str]) -> set[str]:
    """`stage@seed` of the stages that trained (not skipped) in a run log."""
    out = set()
    for ln in lines:
        if ln.endswith("running ..."):
            seed, stage = ln.split("]")[0].split()[-1], ln.split("] ")[1].split(" (")[0]
            out.add(f"{stage}@{seed}")
    return out


def _check_outputs(out: Path, recipe_path: Path) -> dict:
    res = json.loads((out / "results.json").read_text())
    recipe = load_recipe(recipe_path)
    assert [r["stage"] for r in res["rows"]] == [r.stage for r in recipe.rows]
    assert [r["label"] for r in res["rows"]] == [r.label for r in recipe.rows]
    table = (out / "table.md").read_text()
    for r in recipe.rows:
        assert f"| {r.label} | {r.stage} (" in table
    assert (out / "accuracy_vs_macs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for row in res["rows"]:
        assert 0 <= row["top1"] <= 100 and row["params"] > 0 and row["macs"] > 0 and row["latency_ms"] > 0
        for seed in row["seeds"]:
            assert (out / row["stage"] / f"seed{seed}" / "model.safetensors").is_file()
            assert (out / row["stage"] / f"seed{seed}" / "done.json").is_file()
    return res


def test_tiny_recipe_rows_seeds_skip_and_rerun(tmp_path: Path) -> None:
    path, out = _tiny(tmp_path), tmp_path / "out"
    res, lines = _run(path, out)
    assert _ran(lines) == {"teacher@0", "scratch@0", "kd@0", "ft@0", "scratch@1", "kd@1", "ft@1"}  # teacher once
    _check_outputs(out, path)
    rows = {r["stage"]: r for r in res["rows"]}
    assert rows["teacher"]["seeds"] == [0] and rows["teacher"]["top1_std"] is None
    assert rows["kd"]["seeds"] == [0, 1] and len(rows["kd"]["top1_seeds"]) == 2 and rows["kd"]["top1_std"] is not None
    assert rows["kd"]["teacher"] == "mlp (hidden=[64])" and rows["kd"]["label"] == "mlp-16 distilled"
    assert rows["ft"]["params"] == rows["scratch"]["params"] == 16 * 64 + 16 + 16 * 10 + 10
    assert rows["kd"]["num_val"] == res["dataset"]["num_val"] == 128  # the quick subset
    assert [e["distilled"] for e in res["kd_effect"]] == ["kd"] and len(res["kd_effect"][0]["diffs"]) == 2
    assert " ± " in (out / "table.md").read_text()
    # the saved stage model is the trained one: reloading it reproduces the recorded accuracy
    from zoo.data import get_loaders
    from zoo.train import evaluate

    _, val, _ = get_loaders("digits", (1, 8, 8), batch_size=32, quick=True)
    m = load_checkpoint(out / "kd" / "seed1" / "model.safetensors")
    assert evaluate(m, val)["top1"] == pytest.approx(rows["kd"]["top1_seeds"][1])

    # a re-run trains nothing and reports the same numbers
    res2, lines2 = _run(path, out)
    assert _ran(lines2) == set() and sum("skipped" in ln for ln in lines2) == 7
    assert [r["top1_seeds"] for r in res2["rows"]] == [r["top1_seeds"] for r in res["rows"]]

    # a changed student config re-runs that stage only (both seeds)
    _, lines3 = _run(_tiny(tmp_path, kd={"kd": {"alpha": 0.9}}), out)
    assert _ran(lines3) == {"kd@0", "kd@1"}
    # a changed upstream config re-runs everything downstream of it, nothing else
    _, lines4 = _run(_tiny(tmp_path, kd={"kd": {"alpha": 0.9}}, scratch={"train": {"lr": 0.05}}), out)
    assert _ran(lines4) == {"scratch@0", "scratch@1", "ft@0", "ft@1"}
    _, lines5 = _run(_tiny(tmp_path, kd={"kd": {"alpha": 0.9}}, scratch={"train": {"lr": 0.05}},
                           teacher={"train": {"lr": 0.05}}), out)
    assert _ran(lines5) == {"teacher@0", "kd@0", "kd@1"}


def test_check_passes_on_own_run_and_fails_on_tampered_table(tmp_path: Path, capsys) -> None:
    path, out = _tiny(tmp_path), tmp_path / "out"
    assert main(["recipe", "check", str(path), "--quick", "--out", str(out)]) == 2  # nothing committed yet
    assert "--write-table" in capsys.readouterr().err
    _run(path, out, write_table=True)
    js, md = tmp_path / "tiny.quick.results.json", tmp_path / "tiny.quick.md"  # quick tables sit beside full ones
    assert js.is_file() and md.is_file() and "QUICK RUN" in md.read_text()
    assert not (tmp_path / "tiny.results.json").exists()
    assert main(["recipe", "check", str(path), "--out", str(out)]) == 2  # no full table committed
    assert "no committed results" in capsys.readouterr().err
    # a fresh re-run (new folder: everything retrains) matches the committed table
    assert main(["recipe", "check", str(path), "--quick", "--out", str(tmp_path / "fresh")]) == 0
    assert "check: OK" in capsys.readouterr().out

    committed = json.loads(js.read_text())
    bad = json.loads(json.dumps(committed))
    bad["rows"][2]["top1"] += 5.0
    bad["rows"][0]["params"] += 1
    js.write_text(json.dumps(bad))
    md.write_text(__import__("zoo.recipe.report", fromlist=["x"]).render_markdown(bad))
    assert main(["recipe", "check", str(path), "--quick", "--out", str(out)]) == 1
    text = capsys.readouterr().out
    assert "FAILED, 2 difference(s)" in text
    # a quick table re-run on the machine it records must match bit for bit (the recipe's 0.5 applies to full runs)
    assert "row kd (mlp-16 distilled): top1 re-run" in text and "> tolerance 0)" in text and "bit for bit" in text
    assert "row teacher (mlp (hidden=[64])): params re-run" in text

    js.write_text(json.dumps(committed))  # numbers restored, but the markdown edited by hand
    md.write_text(md.read_text().replace("mlp-16 distilled", "mlp-16 distilled (best!)"))
    assert main(["recipe", "check", str(path), "--quick", "--out", str(out)]) == 1
    assert "does not match what tiny.quick.results.json renders" in capsys.readouterr().out


def test_registered_stage_type_plugs_in(tmp_path: Path) -> None:
    """A new stage type (as prune / quantize / lowrank will be) gets its keys validated and runs."""
    from zoo.recipe import STAGE_TYPES, RecipeError, StageType, register_stage_type
    from zoo.train import evaluate

    def validate(chk, path, stage, defaults):
        return {"scale": chk.typed(stage.get("scale", 1.0), f"{path}.scale", "float")}

    def runner(ctx):
        model = ctx.initial_model()
        for p in model.parameters():
            p.data.mul_(ctx.options["scale"])
        _, val, _ = ctx.loaders(32)
        return model, evaluate(model, val)

    register_stage_type(StageType(name="scale_weights", keys={"scale": "factor"}, validate=validate, runner=runner,
                                  needs_model=False))
    try:
        r = json.loads(json.dumps(TINY))
        r["stages"] = {"scratch": TINY["stages"]["scratch"],
                       "scaled": {"type": "scale_weights", "from": "scratch", "scale": 0.0}}
        r["table"] = {"rows": ["scratch", "scaled"]}
        p = tmp_path / "plug.yaml"
        p.write_text(yaml.safe_dump(r))
        res, _ = _run(p, tmp_path / "out")
        scaled = res["rows"][1]
        assert scaled["type"] == "scale_weights" and scaled["params"] == res["rows"][0]["params"]
        # zero weights: every logit is equal, so every image gets class 0 (about one tenth of them)
        assert all(abs(t - 10.0) < 3 for t in scaled["top1_seeds"]) and len(scaled["top1_seeds"]) == 2
        r["stages"]["scaled"]["scale"] = "big"
        p.write_text(yaml.safe_dump(r))
        with pytest.raises(RecipeError, match=r"stages\.scaled\.scale: expected a number"):
            load_recipe(p)
        del r["stages"]["scaled"]["from"]
        r["stages"]["scaled"]["scale"] = 0.5
        p.write_text(yaml.safe_dump(r))
        with pytest.raises(RecipeError, match=r"stages\.scaled\.from: missing required key"):
            load_recipe(p)
    finally:
        STAGE_TYPES.pop("scale_weights", None)


def test_digits_kd_quick_matches_its_committed_quick_table(tmp_path: Path) -> None:
    src = REPO / "recipes" / "digits_kd.yaml"
    rep = check_recipe(src, out=tmp_path / "out", quick=True, log=lambda s: None)
    assert rep.ok, rep.summary()
    res = _check_outputs(tmp_path / "out", src)
    assert res["quick"] and res["dataset"]["input_size"] == [1, 32, 32]
    rows = {r["stage"]: r for r in res["rows"]}
    assert rows["teacher"]["model"] == "resnet20"
    widths = sorted({r["kwargs"]["width"] for r in res["rows"] if r["model"] == "mobilenet_v1"})
    assert widths == [0.25, 0.5, 1.0]
    assert {e["distilled"] for e in res["kd_effect"]} == {r["stage"] for r in res["rows"] if r["type"] == "distill"}
    assert all(r["teacher"] == rows["teacher"]["label"] for r in res["rows"] if r["type"] == "distill")


def test_mnist_hinton_quick_matches_its_committed_quick_table(tmp_path: Path, mnist_dir: Path, monkeypatch) -> None:
    monkeypatch.setenv("ZOO_MNIST", str(mnist_dir))
    src = REPO / "recipes" / "mnist_hinton.yaml"
    rep = check_recipe(src, out=tmp_path / "out", quick=True, log=lambda s: None)
    assert rep.ok, rep.summary()
    res = _check_outputs(tmp_path / "out", src)
    assert res["dataset"]["input_size"] == [1, 28, 28]
    refs = [r["reference"]["errors_per_10k"] for r in res["rows"]]
    assert refs == [67, 146, 74]
    table = (tmp_path / "out" / "table.md").read_text()
    assert "paper errors per 10k" in table and "errors per 10k" in table


def test_committed_tables_render_from_their_results() -> None:
    for js in sorted((REPO / "recipes").glob("*.results.json")):
        from zoo.recipe.report import render_markdown

        res = json.loads(js.read_text())
        assert res["quick"] == js.name.endswith(".quick.results.json"), js
        md = js.with_name(js.name.replace(".results.json", ".md"))
        assert md.read_text() == render_markdown(res), md
        # the raw YAML, not load_recipe: recipes on $ZOO_DATA files only validate where those files exist
        raw = yaml.safe_load(js.with_name(js.name.split(".")[0] + ".yaml").read_text())
        rows = [r if isinstance(r, str) else r["stage"] for r in raw["table"]["rows"]]
        missing = res.get("missing_rows", [])  # a partial table (--stages) holds the rows that have run
        assert [r["stage"] for r in res["rows"]] == [r for r in rows if r not in missing], js
        assert set(missing) <= set(rows) and (not missing or "**Partial table:**" in md.read_text()), js
        seeds = raw.get("seeds", [raw.get("seed", 0)])
        assert res["seeds"] == ((raw.get("quick") or {}).get("seeds", seeds[:1]) if res["quick"] else seeds), js


@pytest.fixture(autouse=True)
def _no_runs_folder(monkeypatch, tmp_path: Path) -> None:
    """Run from tmp_path so a default output folder (runs/...) never lands in the repository."""
    monkeypatch.chdir(tmp_path)
    yield
    shutil.rmtree(tmp_path / "runs", ignore_errors=True)


def test_kd_verdict_is_a_paired_t_test() -> None:
    from zoo.recipe.report import _verdict

    assert "KD better at the 5% level" in _verdict([1.0, 1.1, 0.9])  # t = 17.3 > 4.30
    assert "KD worse at the 5% level" in _verdict([-2.0, -2.2, -1.9, -2.1])
    assert "no significant difference" in _verdict([0.84, -0.28, 0.28])  # t = 0.87
    assert _verdict([0.5, 0.5]) == "same difference on every seed"


def test_stages_run_stage_by_stage_and_write_a_partial_table_checked_on_its_rows(tmp_path: Path, capsys) -> None:
    path, out = _tiny(tmp_path), tmp_path / "out"
    res, lines = _run(path, out, stages=["ft"], write_table=True)  # ft starts from scratch: both run
    ran = [ln.split("] ")[1].split(" (")[0] + "@" + ln.split("]")[0].split()[-1] for ln in lines
           if ln.endswith("running ...")]
    assert ran == ["scratch@0", "scratch@1", "ft@0", "ft@1"]  # every seed of one stage before the next
    assert [r["stage"] for r in res["rows"]] == ["scratch", "ft"] and res["missing_rows"] == ["teacher", "kd"]
    md = (tmp_path / "tiny.quick.md").read_text()
    assert "**Partial table:** rows teacher, kd have not run yet" in md and "--stages teacher,kd" in md
    # the check re-runs only the committed rows' stages, and passes bit for bit on this machine
    rep = check_recipe(path, out=tmp_path / "check", quick=True, log=lambda s: None)
    assert rep.ok, rep.summary()
    assert not (tmp_path / "check" / "teacher").exists()
    # running the rest completes the table in the same folder (done stages are skipped)
    res, lines = _run(path, out, write_table=True)
    assert res["missing_rows"] == [] and _ran(lines) == {"teacher@0", "kd@0", "kd@1"}
    assert "Partial table" not in (tmp_path / "tiny.quick.md").read_text()
    with pytest.raises(ZooError, match=r"--stages nope: no such stage in .*; stages: teacher, scratch, kd, ft"):
        _run(path, out, stages=["nope"])
