"""The recipe engine: runs the stages of a validated recipe in dependency order, once per seed.

Each stage run writes `<out>/<stage>/seed<k>/model.safetensors` (zoo.io.save_model, spec in the
header) and, last, `done.json` holding its metrics and a hash of its config, the dataset, the seed
and the hashes of its upstream stages; a re-run skips a stage whose done-marker hash matches, so a
changed config (here or upstream) re-runs exactly the stages it affects.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from zoo.errors import ZooError
from zoo.io import make_out_dir
from zoo.recipe.schema import STAGE_TYPES, Recipe, StageSpec, fill_kwargs, load_recipe
from zoo.untrusted import parse_json, read_text, short_repr
from zoo.weights.checkpoint import read_checkpoint
from zoo.weights.loading import build_from_checkpoint

ENGINE_VERSION = 1  # bump when a change makes old done-markers invalid
HASH_EXCLUDE_TRAIN = ("progress",)  # options that do not change the result


def _canon(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=list)


def _sha(obj: Any) -> str:
    return hashlib.sha256(_canon(obj).encode()).hexdigest()[:16]


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def write_json(path: Path, obj: Any) -> None:
    """Write JSON atomically (temp file + rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=list) + "\n")
    os.replace(tmp, path)


def read_marker(path: Path) -> dict[str, Any]:
    """A done.json / config.json the engine wrote; a damaged or hand-edited one is a ZooError naming it."""
    rec = parse_json(read_text(path, "stage marker"), f"stage marker {path}")
    if not isinstance(rec, dict):
        raise ZooError(f"stage marker {path} holds {short_repr(rec)}; expected a JSON object (delete the file to "
                       "re-run the stage)")
    return rec


def check_metrics(metrics: Any, where: str) -> dict[str, Any]:
    """Stage metrics as a runner returns them: an object with finite numbers top1, top5 and loss."""
    ok = isinstance(metrics, dict) and all(
        isinstance(metrics.get(k), (int, float)) and not isinstance(metrics.get(k), bool)
        and math.isfinite(metrics[k]) for k in ("top1", "top5", "loss"))
    if not ok:
        raise ZooError(f"{where}: metrics={short_repr(metrics)} is not allowed; expected an object with finite "
                       "numbers top1, top5 and loss (delete the file to re-run the stage)")
    return metrics


def load_checkpoint(path: Path) -> nn.Module:
    """Rebuild a model saved by zoo.io.save_model (or zoo.compress.save): spec from the header, then the weights.

    Every check of `zoo.create(weights=...)` applies (zoo.weights.loading): no pickles, bounded header, the
    spec validated against the file before building, finite tensors; compressed models rebuild their steps.
    """
    ckpt = read_checkpoint(path)
    if ckpt.spec is None:
        raise ZooError(f"{path}: no zoo.spec in the safetensors header; not saved by zoo.io.save_model")
    return build_from_checkpoint(ckpt)


class Run:
    """State of one `run_recipe` call: output folder, loaders, and the hashes of stage runs."""

    def __init__(self, recipe: Recipe, out: Path, quick: bool, log: Callable[[str], None]):
        self.recipe, self.out, self.quick, self.log = recipe, out, quick, log
        self._loaders: dict[tuple[int, int], tuple[Any, Any, Any]] = {}
        self.hashes: dict[tuple[str, int], str] = {}
        self.dataset = dict(recipe.dataset)
        self.info: Any = None

    def loaders(self, batch_size: int, seed: int) -> tuple[Any, Any, Any]:
        """(train_loader, val_loader, DatasetInfo); the split is fixed, `seed` only drives shuffling."""
        key = (batch_size, seed)
        if key not in self._loaders:
            from zoo.data import get_loaders

            d = self.dataset
            self._loaders = {k: v for k, v in self._loaders.items() if k[1] == seed}  # keep memory bounded
            self._loaders[key] = get_loaders(
                d["name"], tuple(d["input_size"]), batch_size=batch_size, root=d["root"], seed=seed,
                quick=self.quick, num_workers=d["num_workers"], val_fraction=d["val_fraction"],
                **(d["normalize"] if isinstance(d["normalize"], dict) else {}))
            self.info = self._loaders[key][2]
            self.dataset["num_classes"] = self.info.num_classes
        return self._loaders[key]

    def effective_seed(self, spec: StageSpec, seed: int) -> int:
        """The stage's fixed seed if it has one, else the recipe seed being run."""
        return spec.seed if spec.seed is not None else seed

    def options(self, spec: StageSpec) -> dict[str, Any]:
        """The stage's options with the --quick train overrides applied."""
        opts = json.loads(_canon(spec.options))
        if self.quick and "train" in opts:
            opts["train"].update(self.recipe.quick["train"])
        return opts

    def stage_dir(self, name: str, eff_seed: int) -> Path:
        """Folder of one stage run."""
        return self.out / name / f"seed{eff_seed}"

    def stage_hash(self, name: str, seed: int) -> str:
        """Hash of everything that determines a stage run's result (its upstream hashes included)."""
        spec = self.recipe.stages[name]
        eff = self.effective_seed(spec, seed)
        key = (name, eff)
        if key not in self.hashes:
            opts = self.options(spec)
            for k in HASH_EXCLUDE_TRAIN:
                opts.get("train", {}).pop(k, None)
            d = self.dataset
            cfg = {
                "engine": ENGINE_VERSION, "type": spec.type, "model": spec.model,
                "kwargs": fill_kwargs(spec.model, spec.kwargs, d), "from": spec.source, "options": opts,
                "seed": eff, "quick": self.quick,
                "dataset": {**{k: d[k] for k in ("name", "input_size", "val_fraction")},
                            **{k: getattr(self.info, k) for k in ("num_train", "num_val", "num_classes")},
                            **({"normalize": d["normalize"]} if d["normalize"] != "dataset" else {})},
                "deps": {dep: self.stage_hash(dep, seed) for dep in spec.deps},
                "files": {k: _file_sha(f) for k, f in spec.files.items()},
            }
            self.hashes[key] = _sha(cfg)
        return self.hashes[key]


class StageContext:
    """What a stage runner gets: its spec, options, seed, folder, data and upstream models."""

    def __init__(self, run: Run, spec: StageSpec, seed: int, resume: bool):
        self.run, self.spec, self.name = run, spec, spec.name
        self.seed = run.effective_seed(spec, seed)
        self._recipe_seed = seed
        self.dir = run.stage_dir(spec.name, self.seed)
        self.options = run.options(spec)
        self.raw = run.recipe.raw["stages"][spec.name]
        self.resume = resume
        self.quick = run.quick
        self.input_size = tuple(run.recipe.input_size)

    @property
    def meta(self) -> dict[str, Any]:
        """JSON metadata stored in the stage's weights: recipe, stage, classes and normalisation."""
        info = self.run.info
        return {"recipe": self.run.recipe.name, "stage": self.name, "classes": list(info.class_names),
                "mean": list(info.mean), "std": list(info.std)}

    def loaders(self, batch_size: int) -> tuple[Any, Any, Any]:
        """(train_loader, val_loader, DatasetInfo) for this batch size, shuffled by the stage seed."""
        return self.run.loaders(batch_size, self.seed)

    def stage_model(self, name: str) -> nn.Module:
        """The trained model of another (already completed) stage, for the same recipe seed."""
        dep = self.run.recipe.stages[name]
        return load_checkpoint(self.run.stage_dir(name, self.run.effective_seed(dep, self._recipe_seed))
                               / "model.safetensors")

    def initial_model(self) -> nn.Module:
        """The model this stage starts from: the `from` stage's model, or a fresh one seeded by the stage seed."""
        if self.spec.source is not None:
            return self.stage_model(self.spec.source)
        from zoo._registry import create

        torch.manual_seed(self.seed)
        return create(self.spec.model, **fill_kwargs(self.spec.model, self.spec.kwargs, self.run.dataset))


def _run_stage(run: Run, spec: StageSpec, seed: int) -> dict[str, Any]:
    """Run (or skip, when its done-marker matches) one stage for one recipe seed; return its record."""
    eff = run.effective_seed(spec, seed)
    sdir = run.stage_dir(spec.name, eff)
    h = run.stage_hash(spec.name, seed)
    done = sdir / "done.json"
    tag = f"[seed {eff}] {spec.name} ({spec.type} {spec.model})"
    if done.exists() and (sdir / "model.safetensors").exists():
        rec = read_marker(done)
        if rec.get("hash") == h:
            check_metrics(rec.get("metrics"), f"stage marker {done}")
            run.log(f"{tag}: done already, skipped (top-1 {rec['metrics']['top1']:.2f}%)")
            rec["skipped"] = True
            return rec
    cfg_file = sdir / "config.json"
    resume = False
    if cfg_file.exists() and read_marker(cfg_file).get("hash") == h:
        resume = (sdir / "resume.safetensors").exists()  # an interrupted run of the same config
    elif cfg_file.exists():
        shutil.rmtree(sdir)  # a stale run of a different config: start over
    elif sdir.exists() and any(sdir.iterdir()):
        raise ZooError(f"{sdir} exists but was not written by `zoo recipe run` (no config.json); "
                       "choose another --out or remove it")
    write_json(cfg_file, {"hash": h, "stage": spec.name, "type": spec.type, "seed": eff,
                          "options": run.options(spec), "deps": list(spec.deps)})
    run.log(f"{tag}: running{' (resuming)' if resume else ''} ...")
    t0 = time.perf_counter()
    ctx = StageContext(run, spec, seed, resume)
    model, metrics = STAGE_TYPES[spec.type].runner(ctx)
    elapsed = time.perf_counter() - t0
    from zoo.io import save_model

    rec = {"hash": h, "stage": spec.name, "type": spec.type, "seed": eff, "metrics": metrics,
           "time_s": round(elapsed, 2), "threads": torch.get_num_threads(),
           "num_val": run.info.num_val if run.info is not None else None}
    save_model(model.cpu(), sdir / "model.safetensors", extra={**ctx.meta, "hash": h, "metrics": metrics})
    write_json(done, rec)
    run.log(f"{tag}: top-1 {metrics['top1']:.2f}% in {elapsed:.1f} s")
    rec["skipped"] = False
    return rec


def default_out(recipe: Recipe, quick: bool, suffix: str = "") -> Path:
    """runs/<name>[-check][-quick]."""
    return Path("runs") / f"{recipe.name}{suffix}{'-quick' if quick else ''}"


def run_recipe(recipe: Recipe | str | Path, out: str | Path | None = None, quick: bool = False,
               write_table: bool = False, log: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every stage for every seed (skipping completed ones), then write results.json, table.md
    and accuracy_vs_macs.png into `out`; `write_table` also writes the committed table next to the recipe."""
    from zoo.recipe import report

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    log = log or (lambda s: print(s, flush=True))
    out = make_out_dir(Path(out) if out is not None else default_out(recipe, quick), "--out")
    run = Run(recipe, out, quick, log)
    seeds = recipe.quick["seeds"] if quick else recipe.seeds
    log(f"recipe {recipe.name}: {len(recipe.stages)} stages x {len(seeds)} seed(s){' (quick)' if quick else ''}"
        f" -> {out}")
    t0 = time.perf_counter()
    from zoo.recipe.stages import train_config

    first_bs = next((train_config(s.options["train"], 0).batch_size for s in recipe.stages.values()
                     if "train" in s.options), 64)
    run.loaders(first_bs, seeds[0])  # dataset info (num_classes, sizes) for the kwargs and the report
    records: dict[str, dict[int, dict[str, Any]]] = {}
    for seed in seeds:
        for name, spec in recipe.stages.items():
            eff = run.effective_seed(spec, seed)
            if eff in records.get(name, {}):
                continue  # a fixed-seed stage shared by all recipe seeds
            records.setdefault(name, {})[eff] = _run_stage(run, spec, seed)
    wall = time.perf_counter() - t0
    results = report.build_results(run, records, seeds, wall)
    report.write_outputs(results, out)
    if write_table:
        js, md = committed_paths(recipe, quick)
        write_json(js, results)
        md.write_text(report.render_markdown(results))
        log(f"wrote the committed table {md} and {js}")
    log("")
    log(report.render_markdown(results))
    return results


def committed_paths(recipe: Recipe, quick: bool = False) -> tuple[Path, Path]:
    """(results.json, table .md) committed next to the recipe file: <stem>.results.json and <stem>.md,
    or <stem>.quick.results.json and <stem>.quick.md for the --quick smoke run that CI checks in seconds."""
    stem = recipe.path.name.split(".")[0] + (".quick" if quick else "")
    return recipe.path.with_name(f"{stem}.results.json"), recipe.path.with_name(f"{stem}.md")


def environment() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu": _cpu_name(), "cpu_count": os.cpu_count(), "platform": sys.platform,
            "train_threads": torch.get_num_threads()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def check_recipe(recipe: Recipe | str | Path, out: str | Path | None = None, quick: bool = False,
                 log: Callable[[str], None] | None = None) -> list[str]:
    """Re-run a recipe (into `out`, default runs/<name>-check) and compare with the committed table
    next to it; returns the differences beyond the recipe's tolerance (empty: the check passes)."""
    from zoo.recipe import report

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    js, md = committed_paths(recipe, quick)
    if not js.exists():
        raise ZooError(f"{recipe.path}: no committed results {js}; write them with "
                       f"`zoo recipe run {recipe.path}{' --quick' if quick else ''} --write-table`")
    committed = report.load_results(js)
    if bool(committed.get("quick")) != quick:
        raise ZooError(f"{js} holds a {'quick' if committed.get('quick') else 'full'} run; check it "
                       f"{'with' if committed.get('quick') else 'without'} --quick")
    out = Path(out) if out is not None else default_out(recipe, quick, "-check")
    new = run_recipe(recipe, out, quick=quick, log=log)
    diffs = report.compare(committed, new, recipe.tolerance)
    if not md.exists():
        diffs.append(f"{md}: missing (the committed markdown table)")
    elif md.read_text() != report.render_markdown(committed):
        diffs.append(f"{md}: does not match what {js.name} renders (edited by hand, or written by another run); "
                     f"re-write both with --write-table")
    return diffs
