"""Recipe reports: results.json, the markdown table, the accuracy-vs-MACs plot, and the comparison
used by `zoo recipe check` (committed table vs a re-run, within the recipe's tolerance).

Top layer of zoo.recipe (below only its CLI): `run_recipe` runs the stages through zoo.recipe.engine and
writes the report; `check_recipe` compares a re-run with the committed table.
"""

from __future__ import annotations

import math
import os
import statistics
from pathlib import Path
from typing import Any, Callable

import torch

from zoo.errors import ZooError
from zoo.io import make_out_dir
from zoo.deploy import runtime_forward
from zoo.profile import measure_latency, profile
from zoo.recipe.compare import CheckReport, compare, tolerances
from zoo.recipe.columns import COLUMNS, TEXT_COLUMNS, mean_std
from zoo.recipe.engine import Run, committed_paths, default_out, environment, load_checkpoint, run_stages, write_json
from zoo.recipe.schema import Recipe, load_recipe
from zoo.recipe.share_stage import file_fields, layer_lines
from zoo.untrusted import clip, parse_json, read_text, short_repr

RESULTS_VERSION = 1
FILE_COLUMNS = ("error", "delta_error", "file_kb", "file_ratio", "index_share", "codebook_share", "value_share",
                "other_share", "decode_ms")
FILE_NOTE = ("Error: 100 - top-1; error change: this row's error minus that of the dense model at the start of its "
             "`from` chain. File size: os.path.getsize of the file the stage wrote: `model.deep.safetensors` (the "
             "Deep Compression file of zoo.compress.deepfile) for share stages, else the fp32 safetensors "
             "checkpoint; "
             "smaller: the dense fp32 checkpoint's size / this file's size. Index, codebook and values: the Huffman "
             "streams of the relative indices, the centroids plus both Huffman codebooks, and the Huffman streams of "
             "the cluster indices; other: unshared tensors stored raw (biases) and the safetensors header (spec, "
             "layout, sha256). Decode: median of 5 loads of the deep file through zoo.weights.load_checkpoint "
             "(read, sha256 check, Huffman decoding, model rebuild) with the run's torch threads; the table's top-1 "
             "is that of the decoded model.")


def _signed(mean: float, std: float | None) -> str:
    return f"{mean:+.2f}" if std is None else f"{mean:+.2f} ± {std:.2f}"


# two-sided 5% critical values of Student's t for 1..10 degrees of freedom
T_CRIT_5 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228)


def _verdict(diffs: list[float]) -> str:
    """Paired t-test of the per-seed differences at the 5% level (two-sided)."""
    n = len(diffs)
    m, s = mean_std(diffs)
    if s is None or n - 1 > len(T_CRIT_5):
        return "no test"
    if s == 0:
        return "identical on every seed" if m == 0 else "same difference on every seed"
    t = m / (s / math.sqrt(n))
    crit = T_CRIT_5[n - 2]
    if abs(t) < crit:
        return f"paired t = {t:.2f}, |t| < {crit:.2f}: no significant difference at the 5% level"
    return f"paired t = {t:.2f}: KD {'better' if t > 0 else 'worse'} at the 5% level"




def _profile_row(model: torch.nn.Module, input_size: tuple[int, ...], latency: dict[str, int]) -> dict[str, Any]:
    """Counts and sizes of a stage's model, and its latency on the runtime its int8 backend targets
    (ExecuTorch for 'xnnpack', inductor for 'x86_pt2e', else eager PyTorch; zoo.deploy.runtime_forward)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(latency["threads"])
    try:
        fwd, runtime = runtime_forward(model, torch.zeros(latency["batch_size"], *input_size), latency["threads"])
        p = profile(model, input_size=input_size, latency=runtime == "eager", batch_size=latency["batch_size"],
                    flops=False)
        ms = p.latency_ms if runtime == "eager" else measure_latency(fwd, input_size, latency["batch_size"])
    finally:
        torch.set_num_threads(prev)
    row = {"params": p.params, "macs": p.macs, "size_bytes": p.size_bytes, "latency_ms": ms,
           "nonzero_params": p.nonzero_params, "sparsity": p.sparsity, "sparse_size_bytes": p.sparse_size_bytes}
    if runtime != "eager":
        row["latency_runtime"] = runtime
    return row


def _root_stage(recipe: Recipe, stage: str) -> str:
    """The stage at the start of a `from` chain (the dense model a compressed one derives from)."""
    while recipe.stages[stage].source is not None:
        stage = recipe.stages[stage].source
    return stage


def _dense_ref(run: Run, stage: str, seed: int, cache: dict[str, tuple[int, int, int]]) -> tuple[int, int, int]:
    """(serialized fp32 bytes, nonzero params, MACs) of the dense root model of `stage`'s `from` chain."""
    root = _root_stage(run.recipe, stage)
    if root not in cache:
        eff = run.effective_seed(run.recipe.stages[root], seed)
        m = load_checkpoint(run.stage_dir(root, eff) / "model.safetensors")
        p = profile(m, input_size=run.recipe.input_size, flops=False)
        cache[root] = (p.size_bytes, p.nonzero_params, p.macs)  # size_bytes: serialized_size, already run
    return cache[root]


def _dense_top1(run: Run, records: dict[str, dict[int, dict]], stage: str, seed: int) -> float | None:
    """Top-1 of the dense root model of `stage`'s `from` chain at the first seed (None if it is not recorded)."""
    root = _root_stage(run.recipe, stage)
    rec = records.get(root, {}).get(run.effective_seed(run.recipe.stages[root], seed))
    return None if rec is None else float(rec["metrics"]["top1"])


def build_results(run: Run, records: dict[str, dict[int, dict]], seeds: list[int], wall_s: float) -> dict[str, Any]:
    """Aggregate stage records over seeds, profile each table row's model and return results.json content."""
    recipe = run.recipe
    rows: list[dict[str, Any]] = []
    label_of = {r.stage: r.label for r in recipe.rows}
    dense_cache: dict[str, tuple[int, int, int]] = {}
    for row in [r for r in recipe.rows if r.stage in records]:  # a partial run (--stages) reports what ran
        spec = recipe.stages[row.stage]
        recs = [records[row.stage][k] for k in sorted(records[row.stage])]
        top1 = [r["metrics"]["top1"] for r in recs]
        top5 = [r["metrics"]["top5"] for r in recs]
        first = run.effective_seed(spec, seeds[0])
        model = load_checkpoint(run.stage_dir(row.stage, first) / "model.safetensors")
        prof = _profile_row(model, recipe.input_size, recipe.latency)
        teacher = None
        if spec.type == "distill":
            t = run.recipe.raw["stages"][row.stage]["teacher"]
            teacher = os.path.basename(t) if "teacher" in spec.files else label_of.get(t, t)
        m1, s1 = mean_std(top1)
        m5, s5 = mean_std(top5)
        pre = [r["metrics"].get("top1_before_finetune") for r in recs]
        dense, dense_nz, dense_macs = _dense_ref(run, row.stage, seeds[0], dense_cache)
        stored = prof.get("sparse_size_bytes")
        comp = {"top1_pre": statistics.fmean(pre) if pre and None not in pre else None,
                "dense_size_bytes": dense, "dense_params": dense_nz, "dense_macs": dense_macs,
                "dense_top1": _dense_top1(run, records, row.stage, seeds[0]),
                "compression_ratio": dense / stored if stored else None}
        root = _root_stage(recipe, row.stage)
        files = file_fields(run.stage_dir(row.stage, first),
                            run.stage_dir(root, run.effective_seed(recipe.stages[root], seeds[0])),
                            recs[0]["metrics"].get("decode_ms"))
        rows.append({
            "stage": row.stage, "label": row.label, "type": spec.type, "model": spec.model,
            "kwargs": {k: v for k, v in spec.kwargs.items()}, "from": spec.source, "teacher": teacher,
            "seeds": [r["seed"] for r in recs], "top1": m1, "top1_std": s1, "top1_seeds": top1,
            "top5": m5, "top5_std": s5, "num_val": recs[0].get("num_val"),
            "hashes": [r["hash"] for r in recs], "time_s": statistics.fmean(r["time_s"] for r in recs),
            "reference": row.reference or None, "options": run.options(spec), **prof, **comp, **files,
            "precision": recs[0]["metrics"].get("precision"), "memory_format": recs[0]["metrics"].get("memory_format"),
        })
    info = run.info
    stage_time = sum(r["time_s"] for per in records.values() for r in per.values())
    return {
        "version": RESULTS_VERSION, "recipe": recipe.name, "description": recipe.description,
        "file": _display_path(recipe.path),
        "quick": run.quick, "seeds": list(seeds), "columns": recipe.columns,
        "dataset": {"name": info.name, "input_size": list(recipe.input_size), "num_train": info.num_train,
                    "num_val": info.num_val, "num_classes": info.num_classes,
                    "val_fraction": recipe.dataset["val_fraction"], "split": getattr(info, "split", ""),
                    "title": getattr(info, "title", "") or info.name},
        "latency": {**recipe.latency, "repeats": "median of 20 after 3 warm-up"},
        "tolerance": recipe.tolerance, "environment": {**environment(), "train_threads": _threads(records)},
        "timing": {"stage_total_s": round(stage_time, 1), "this_run_wall_s": round(wall_s, 1)},
        "rows": rows, "kd_effect": kd_effect(rows),
        "missing_rows": [r.stage for r in recipe.rows if r.stage not in records],
    }


def _threads(records: dict[str, dict[int, dict]]) -> int | list[int]:
    """Torch threads the stages trained with (one number, or the sorted list when they differ)."""
    used = sorted({r.get("threads", torch.get_num_threads()) for per in records.values() for r in per.values()})
    return used[0] if len(used) == 1 else used


def _display_path(p: Path) -> str:
    rel = os.path.relpath(p)
    return str(p) if rel.startswith("..") else rel


def kd_effect(rows: list[dict]) -> list[dict[str, Any]]:
    """For each distilled row with a from-scratch twin (same model and kwargs): top-1 difference,
    paired over the seeds both have."""
    out = []
    for d in rows:
        if d["type"] != "distill" or d["from"] is not None:
            continue
        twin = next((r for r in rows if r["type"] == "train" and r["from"] is None and r["model"] == d["model"]
                     and r["kwargs"] == d["kwargs"]), None)
        if twin is None:
            continue
        common = [s for s in d["seeds"] if s in twin["seeds"]]
        diffs = [d["top1_seeds"][d["seeds"].index(s)] - twin["top1_seeds"][twin["seeds"].index(s)] for s in common]
        if not diffs:
            continue
        m, s = mean_std(diffs)
        out.append({"distilled": d["stage"], "scratch": twin["stage"], "label": twin["label"], "seeds": common,
                    "diff_mean": m, "diff_std": s, "diffs": diffs,
                    "wins": sum(x > 0 for x in diffs), "ties": sum(x == 0 for x in diffs)})
    return out


def render_markdown(res: dict[str, Any]) -> str:
    """The table (plus its provenance notes) as markdown; deterministic in results.json."""
    cols = [c for c in res["columns"] if c in COLUMNS]
    ds = res["dataset"]
    n = len(res["seeds"])
    lines = [f"# Recipe `{res['recipe']}`" + (" — QUICK RUN (smoke test, not a result)" if res["quick"] else ""), ""]
    if res.get("description"):
        lines += [res["description"].strip(), ""]
    named = f"{ds['title']} (`{ds['name']}`)" if ds.get("title") else f"`{ds['name']}`"
    lines.append(f"Dataset {named}, input {'x'.join(map(str, ds['input_size']))}, {ds['num_train']:,} "
                 f"training / {ds['num_val']:,} held-out images ({ds.get('split') or 'fixed split'}); top-1 of the "
                 f"final model on the held-out images (one image is {100 / ds['num_val']:.2f} points)"
                 + (f", mean ± std over {n} seeds ({', '.join(map(str, res['seeds']))})." if n > 1
                    else f", seed {res['seeds'][0]}."))
    lines.append("")
    header = [COLUMNS[c][0] for c in cols]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---" if c in TEXT_COLUMNS else "---:" for c in cols) + "|")
    for r in res["rows"]:
        lines.append("| " + " | ".join(COLUMNS[c][1](r) for c in cols) + " |")
    lines.append("")
    if res.get("missing_rows"):
        lines += [f"**Partial table:** rows {', '.join(res['missing_rows'])} have not run yet (`zoo recipe run "
                  f"{res.get('file', '')} --stages {','.join(res['missing_rows'])}` continues it).", ""]
    if res.get("kd_effect"):
        lines.append("Effect of distillation (distilled minus from-scratch top-1, paired by seed):")
        lines.append("")
        for e in res["kd_effect"]:
            per = ", ".join(f"{x:+.2f}" for x in e["diffs"])
            lines.append(f"- {e['label']}: `{e['distilled']}` minus `{e['scratch']}`: "
                         f"{_signed(e['diff_mean'], e['diff_std'])} points"
                         + (f" (per seed {per}; KD better in {e['wins']} of {len(e['diffs'])}; {_verdict(e['diffs'])})"
                            if len(e["diffs"]) > 1 else " (one seed: no noise estimate)"))
        lines.append("")
    refs = sorted({r["reference"]["source"] for r in res["rows"] if r.get("reference") and r["reference"].get("source")})
    if refs:
        lines.append("Published numbers: " + "; ".join(refs) + ".")
        lines.append("")
    env, lat, t = res["environment"], res["latency"], res["timing"]
    q = " --quick" if res["quick"] else ""
    thr = f" --threads {env['train_threads']}" if isinstance(env["train_threads"], int) else ""
    lines.append(f"MACs: multiply-accumulates of conv and linear layers per image (zoo.profile). Size: safetensors "
                 f"bytes. CPU latency: zoo.profile(latency=True), median of 20 forward passes at batch "
                 f"{lat['batch_size']} with {lat['threads']} torch thread{'s' if lat['threads'] > 1 else ''} on "
                 f"{env['cpu']} (torch {env['torch']}); latency is noisy on a shared machine.")
    runtimes = sorted({f"{r['stage']}: {r['latency_runtime']}" for r in res["rows"] if r.get("latency_runtime")})
    if runtimes:
        lines.append("Latency of PT2E int8 rows is measured on the runtime their backend targets, not eager "
                     "PyTorch: " + "; ".join(runtimes) + ".")
    lines.append("")
    if any(c in cols for c in ("stored_kb", "ratio", "nonzero")):
        lines.append("Nonzero params: parameters that are not exactly zero. Stored size: the safetensors bytes at the "
                     "stored precision (int8 weights 1 byte, binary weights 1 bit plus a float scale per output "
                     "channel), with every conv/linear weight that has enough zeros re-stored as a bitmask plus its "
                     "nonzero values (zoo.profile sparse_size_bytes). Compression ratio: dense fp32 size of the "
                     "stage's source model (the start of its `from` chain) / stored size"
                     + ("; fewer nonzero params: nonzero params of that source model / this model's"
                        if "nz_reduction" in cols else "")
                     + ". MACs count dense compute: unstructured zeros are not skipped.")
        lines.append("")
    if any(c in cols for c in FILE_COLUMNS):
        lines.append(FILE_NOTE)
        lines.append("")
        lines += layer_lines(res["rows"])
    if any(c in cols for c in ("delta_top1", "ref_delta_top1", "mac_reduction")):
        lines.append("Top-1 change: this row's top-1 minus the top-1 of the dense model at the start of its `from` "
                     "chain; published change: the same difference in the cited work. Fewer MACs: MACs of that "
                     "dense model / this model's.")
        lines.append("")
    th = env["train_threads"]
    th_text = (f"{th} torch thread{'s' if th > 1 else ''}" if isinstance(th, int)
               else "torch threads " + ", ".join(map(str, th)) + " (stages trained in different runs)")
    lines.append(f"Training time, all stages and seeds: {t['stage_total_s']:.0f} s with {th_text}. Reproduce: "
                 f"`zoo recipe run {res['file']}{q}{thr} --write-table`; verify: "
                 f"`zoo recipe check {res['file']}{q}{thr}`.")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], path: Path) -> None:
    """accuracy_vs_macs.png: top-1 (with std error bars) against MACs on a log axis."""
    import matplotlib  # (optional plotting dependency, imported only when a plot is drawn)

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    styles = {"train": ("o", "tab:blue"), "distill": ("^", "tab:orange"), "prune": ("s", "tab:green"),
              "quantize": ("D", "tab:red"), "lowrank": ("v", "tab:purple")}
    seen: set[str] = set()
    for r in res["rows"]:
        marker, color = styles.get(r["type"], ("s", "tab:green"))
        name = {"train": "trained", "distill": "distilled"}.get(r["type"], r["type"])
        ax.errorbar(r["macs"] / 1e6, r["top1"], yerr=r.get("top1_std") or 0, fmt=marker, color=color, capsize=3,
                    label=None if r["type"] in seen else name)
        seen.add(r["type"])
        ax.annotate(r["label"], (r["macs"] / 1e6, r["top1"]), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel("MACs per image (millions, log scale)")
    ax.set_ylabel("top-1 on held-out images (%)")
    title = f"{res['recipe']}: {res['dataset'].get('title') or res['dataset']['name']} {'x'.join(map(str, res['dataset']['input_size']))}"
    ax.set_title(title + (" (quick run)" if res["quick"] else ""))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def write_outputs(res: dict[str, Any], out: Path) -> None:
    """results.json, table.md and accuracy_vs_macs.png into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "results.json", res)
    (out / "table.md").write_text(render_markdown(res))
    plot(res, out / "accuracy_vs_macs.png")


def load_json(path: Path) -> dict[str, Any]:
    """Read a results.json (bounded size and nesting; not validated, see load_results)."""
    return parse_json(read_text(path, "results file"), f"results file {path}")


# results.json fields `compare` and `render_markdown` read: top level (key -> JSON types) and per row
RESULT_TYPES: dict[str, tuple[type, ...]] = {
    "recipe": (str,), "quick": (bool,), "seeds": (list,), "columns": (list,), "dataset": (dict,),
    "rows": (list,), "kd_effect": (list,), "environment": (dict,), "latency": (dict,), "timing": (dict,),
}
OPTIONAL_TYPES: dict[str, tuple[type, ...]] = {"missing_rows": (list,)}
ROW_NUMBERS = ("top1", "top1_std", "top5", "top5_std", "num_val", "time_s", "params", "macs", "size_bytes",
               "latency_ms", "top1_pre", "nonzero_params", "sparsity", "sparse_size_bytes", "dense_params",
               "dense_size_bytes", "compression_ratio", "dense_macs", "dense_top1", "file_bytes",
               "dense_file_bytes", "file_ratio", "decode_ms")


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _check_row(i: int, r: Any, where: str) -> None:
    if not isinstance(r, dict) or not isinstance(r.get("stage"), str) or not isinstance(r.get("label"), str):
        raise ZooError(f"{where}: rows[{i}] = {short_repr(r)} is not allowed; expected an object with "
                       "'stage' and 'label' strings")
    for key in ROW_NUMBERS:
        if r.get(key) is not None and not _number(r[key]):
            raise ZooError(f"{where}: rows[{i}].{key} = {short_repr(r[key])} is not allowed; expected a finite "
                           "number or null")
    for key in ("top1_seeds", "seeds"):
        if not isinstance(r.get(key, []), list) or not all(_number(v) for v in r.get(key, [])):
            raise ZooError(f"{where}: rows[{i}].{key} = {short_repr(r.get(key))} is not allowed; expected a "
                           "list of numbers")


def load_results(path: Path) -> dict[str, Any]:
    """A committed results.json, with every field that `recipe check` compares or renders type-checked."""
    res = load_json(path)
    where = f"results file {path}"
    if not isinstance(res, dict):
        raise ZooError(f"{where} holds {short_repr(res)}; expected a JSON object written by `zoo recipe run`")
    for key, types in RESULT_TYPES.items():
        if not isinstance(res.get(key), types):
            raise ZooError(f"{where}: {key} = {short_repr(res.get(key))} is not allowed; expected "
                           f"{' or '.join(t.__name__ for t in types)} (re-write it with --write-table)")
    for key, types in OPTIONAL_TYPES.items():
        if key in res and not (isinstance(res[key], types) and all(isinstance(v, str) for v in res[key])):
            raise ZooError(f"{where}: {key} = {short_repr(res[key])} is not allowed; expected a list of stage names")
    if not res["seeds"] or not all(isinstance(s, int) and not isinstance(s, bool) for s in res["seeds"]):
        raise ZooError(f"{where}: seeds = {short_repr(res['seeds'])} is not allowed; expected a list of ints")
    for i, r in enumerate(res["rows"]):
        _check_row(i, r, where)
    try:
        render_markdown(res)
    except (KeyError, TypeError, ValueError, IndexError, AttributeError, ZeroDivisionError) as e:
        raise ZooError(f"{where} cannot be rendered as a table ({type(e).__name__}: {clip(str(e))}); "
                       "re-write it with --write-table") from None
    return res


# --------------------------------------------------------------------------- run and check


def run_recipe(recipe: Recipe | str | Path, out: str | Path | None = None, quick: bool = False,
               write_table: bool = False, log: Callable[[str], None] | None = None,
               stages: list[str] | None = None) -> dict[str, Any]:
    """Run every stage for every seed (skipping completed ones), then write results.json, table.md
    and accuracy_vs_macs.png into `out`; `write_table` also writes the committed table next to the recipe.
    `stages` runs only those stages (and their upstream ones) for every seed and writes no table until
    every row's stage is done: a long table resumes stage by stage across sessions."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    log = log or (lambda s: print(s, flush=True))
    out = make_out_dir(Path(out) if out is not None else default_out(recipe, quick), "--out")
    run, records, seeds, wall = run_stages(recipe, out, quick, log, only=stages)
    if not any(r.stage in records for r in recipe.rows):
        raise ZooError(f"--stages {','.join(stages or [])}: none of them is a table row of {recipe.path}; rows: "
                       + ", ".join(r.stage for r in recipe.rows))
    results = build_results(run, records, seeds, wall)
    write_outputs(results, out)
    if write_table:
        js, md = committed_paths(recipe, quick)
        write_json(js, results)
        md.write_text(render_markdown(results))
        log(f"wrote the committed table {md} and {js}")
    log("")
    log(render_markdown(results))
    return results


def check_recipe(recipe: Recipe | str | Path, out: str | Path | None = None, quick: bool = False,
                 log: Callable[[str], None] | None = None) -> CheckReport:
    """Re-run a recipe (into `out`, default runs/<name>-check) and compare with the committed table next to
    it; the report lists the differences beyond tolerance (none: the check passes) and which tolerances applied
    (zoo.recipe.compare: bit-exact on the machine the table records, the seed spread elsewhere)."""
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    js, md = committed_paths(recipe, quick)
    if not js.exists():
        raise ZooError(f"{recipe.path}: no committed results {js}; write them with "
                       f"`zoo recipe run {recipe.path}{' --quick' if quick else ''} --write-table`")
    committed = load_results(js)
    if bool(committed.get("quick")) != quick:
        raise ZooError(f"{js} holds a {'quick' if committed.get('quick') else 'full'} run; check it "
                       f"{'with' if committed.get('quick') else 'without'} --quick")
    out = Path(out) if out is not None else default_out(recipe, quick, "-check")
    # a partial table (written with --stages) is checked on the rows it holds
    only = [r["stage"] for r in committed["rows"]] if committed.get("missing_rows") else None
    new = run_recipe(recipe, out, quick=quick, log=log, stages=only)
    tol = tolerances(committed, environment(), recipe.tolerance)
    diffs = compare(committed, new, tol)
    if not md.exists():
        diffs.append(f"{md}: missing (the committed markdown table)")
    elif md.read_text() != render_markdown(committed):
        diffs.append(f"{md}: does not match what {js.name} renders (edited by hand, or written by another run); "
                     f"re-write both with --write-table")
    return CheckReport(diffs, tol, js)
