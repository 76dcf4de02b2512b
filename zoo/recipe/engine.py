"""The recipe engine: runs the stages of a validated recipe in dependency order, once per seed.

Each stage run writes `<out>/<stage>/seed<k>/model.safetensors` (zoo.weights.save_checkpoint, spec in the
header) and, last, `done.json` holding its metrics and a hash of its config, the dataset, the seed
and the hashes of its upstream stages; a re-run skips a stage whose done-marker hash matches, so a
changed config (here or upstream) re-runs exactly the stages it affects.

`run_stages` runs them and returns the stage records; zoo.recipe.report turns those into the table
(`run_recipe`, `check_recipe`). Stage runners get a zoo.recipe.registry.StageContext built here.
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

from zoo.data import get_loaders
from zoo.errors import ZooError
from zoo.recipe.checks import fill_kwargs, train_config
from zoo.recipe.registry import STAGE_TYPES, Loaders, StageContext, StageSpec
from zoo.recipe.schema import Recipe
from zoo.untrusted import parse_json, read_text, short_repr
from zoo.weights.checkpoint import load_checkpoint as load_zoo_checkpoint, save_checkpoint

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
    """Rebuild a stage's model from its checkpoint through zoo.weights.checkpoint.load_checkpoint, the one loader."""
    return load_zoo_checkpoint(path)


class Run:
    """State of one `run_recipe` call: output folder, loaders, and the hashes of stage runs."""

    def __init__(self, recipe: Recipe, out: Path, quick: bool, log: Callable[[str], None]):
        self.recipe, self.out, self.quick, self.log = recipe, out, quick, log
        self._loaders: dict[tuple[int, int], tuple[Any, Any, Any]] = {}
        self.hashes: dict[tuple[str, int], str] = {}
        self.dataset = dict(recipe.dataset)
        self.info: Any = None

    def loaders(self, batch_size: int, seed: int) -> Loaders:
        """(train_loader, val_loader, DatasetInfo); the split is fixed, `seed` only drives shuffling."""
        key = (batch_size, seed)
        if key not in self._loaders:
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
        """The stage's options with the --quick overrides applied: quick.finetune to the fine-tune block of a
        `finetunes` stage type (prune, quantize, lowrank), quick.train to every other train section."""
        opts = json.loads(_canon(spec.options))
        if self.quick and "train" in opts:
            opts["train"].update(self.recipe.quick["finetune" if STAGE_TYPES[spec.type].finetunes else "train"])
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


def stage_context(run: Run, spec: StageSpec, seed: int, resume: bool) -> StageContext:
    """The context a stage runner gets for one recipe seed: its options, effective seed, folder, data and the
    models of completed stages (for the same recipe seed)."""
    eff = run.effective_seed(spec, seed)
    info = run.info

    def stage_model(name: str) -> nn.Module:
        dep = run.recipe.stages[name]
        return load_checkpoint(run.stage_dir(name, run.effective_seed(dep, seed)) / "model.safetensors")

    return StageContext(
        spec=spec, seed=eff, options=run.options(spec), raw=run.recipe.raw["stages"][spec.name],
        input_size=run.recipe.input_size, dataset=run.dataset, loaders=lambda bs: run.loaders(bs, eff),
        stage_model=stage_model, dir=run.stage_dir(spec.name, eff), resume=resume,
        meta={"recipe": run.recipe.name, "stage": spec.name, "classes": list(info.class_names),
              "mean": list(info.mean), "std": list(info.std)})


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
    ctx = stage_context(run, spec, seed, resume)
    model, metrics = STAGE_TYPES[spec.type].runner(ctx)
    elapsed = time.perf_counter() - t0
    rec = {"hash": h, "stage": spec.name, "type": spec.type, "seed": eff, "metrics": metrics,
           "time_s": round(elapsed, 2), "threads": torch.get_num_threads(),
           "num_val": run.info.num_val if run.info is not None else None}
    meta = dict(ctx.meta)
    save_checkpoint(model.cpu(), sdir / "model.safetensors", classes=meta.pop("classes"), mean=meta.pop("mean"),
                    std=meta.pop("std"), extra={**meta, "hash": h, "metrics": metrics})
    write_json(done, rec)
    run.log(f"{tag}: top-1 {metrics['top1']:.2f}% in {elapsed:.1f} s")
    rec["skipped"] = False
    return rec


def default_out(recipe: Recipe, quick: bool, suffix: str = "") -> Path:
    """runs/<name>[-check][-quick]."""
    return Path("runs") / f"{recipe.name}{suffix}{'-quick' if quick else ''}"


def needed_stages(recipe: Recipe, only: list[str]) -> list[str]:
    """`only` and every stage they depend on, in recipe order; an unknown name is a ZooError listing the stages."""
    unknown = [s for s in only if s not in recipe.stages]
    if unknown:
        raise ZooError(f"--stages {','.join(unknown)}: no such stage in {recipe.path}; stages: "
                       + ", ".join(recipe.stages))
    need, todo = set(), list(only)
    while todo:
        s = todo.pop()
        if s not in need:
            need.add(s)
            todo.extend(recipe.stages[s].deps)
    return [s for s in recipe.stages if s in need]


def run_stages(recipe: Recipe, out: Path, quick: bool, log: Callable[[str], None], only: list[str] | None = None
               ) -> tuple[Run, dict[str, dict[int, dict[str, Any]]], list[int], float]:
    """Run every stage (or the `only` ones and their upstream stages, stage by stage) for every seed into `out`
    (skipping completed ones): (run, records by stage and effective seed, the recipe seeds run, seconds)."""
    run = Run(recipe, out, quick, log)
    seeds = recipe.quick["seeds"] if quick else recipe.seeds
    log(f"recipe {recipe.name}: {len(recipe.stages)} stages x {len(seeds)} seed(s){' (quick)' if quick else ''}"
        f" -> {out}")
    t0 = time.perf_counter()
    first_bs = next((train_config(s.options["train"], 0).batch_size for s in recipe.stages.values()
                     if "train" in s.options), 64)
    run.loaders(first_bs, seeds[0])  # dataset info (num_classes, sizes) for the kwargs and the report
    records: dict[str, dict[int, dict[str, Any]]] = {}
    # the whole recipe runs seed by seed; `only` runs stage by stage, so one model's seeds finish first
    order = [(seed, name) for seed in seeds for name in recipe.stages] if only is None else \
        [(seed, name) for name in needed_stages(recipe, only) for seed in seeds]
    for seed, name in order:
        spec = recipe.stages[name]
        eff = run.effective_seed(spec, seed)
        if eff in records.get(name, {}):
            continue  # a fixed-seed stage shared by all recipe seeds
        records.setdefault(name, {})[eff] = _run_stage(run, spec, seed)
    return run, records, seeds, time.perf_counter() - t0


def committed_paths(recipe: Recipe, quick: bool = False) -> tuple[Path, Path]:
    """(results.json, table .md) committed next to the recipe file: <stem>.results.json and <stem>.md,
    or <stem>.quick.results.json and <stem>.quick.md for the --quick smoke run that CI checks in seconds."""
    stem = recipe.path.name.split(".")[0] + (".quick" if quick else "")
    return recipe.path.with_name(f"{stem}.results.json"), recipe.path.with_name(f"{stem}.md")


def environment() -> dict[str, Any]:
    """Where the numbers were measured."""
    return {"torch": torch.__version__, "python": platform.python_version(), "machine": platform.machine(),
            "cpu": _cpu_name(), "cpu_capability": cpu_capability(), "cpu_count": os.cpu_count(),
            "platform": sys.platform, "train_threads": torch.get_num_threads()}


def cpu_capability() -> str:
    """The vector ISA torch's CPU kernels run with (AVX512, AVX2, ...), and oneDNN's cap when one is set."""
    cap = torch.backends.cpu.get_cpu_capability()
    onednn = os.environ.get("ONEDNN_MAX_CPU_ISA") or os.environ.get("DNNL_MAX_CPU_ISA")
    return f"{cap}, oneDNN {onednn}" if onednn else cap


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
