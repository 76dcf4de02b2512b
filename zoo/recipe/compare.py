"""`zoo recipe check`'s comparison of a re-run with a committed table, and where its tolerances come from.

Training amplifies rounding: the same recipe re-run on a CPU whose kernels round differently (AVX2 against
AVX-512, Intel against AMD, another thread count) ends a few images away, and a global magnitude threshold
can move by a weight or two. So a check first asks whether it runs on the machine the table records
(`same_machine`: CPU model, kernel ISA, torch, threads):
- on that machine a quick table (`--quick`, a smoke run) must match bit for bit, and a full table within
  the recipe's `tolerance`;
- elsewhere top-1 may move by 3 standard errors of the difference of two means over the row's seeds, with
  the standard deviation taken as the larger of the row's measured seed spread (the pooled spread of the
  table's multi-seed rows when the row has one seed) and the sampling spread of a top-1 on `num_val`
  images; never less than the recipe's tolerance. Counts that depend on a magnitude or importance ranking
  (nonzero weights, stored size) may move by `RANK_RTOL` of the dense count; architecture counts stay exact.

Statistics as in any seed study (e.g. Bouthillier et al. 2021, "Accounting for variance in machine learning
benchmarks"): report mean ± std over seeds, call a difference only beyond its standard error.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# environment keys that decide whether a re-run can be bit-exact with the committed table
FINGERPRINT = ("machine", "cpu", "cpu_capability", "torch", "train_threads")
Z = 3.0  # standard errors a re-run's top-1 may move on another machine
# relative band for counts that follow a ranking or rounding of float values (nonzero weights after a
# magnitude prune or after int8 rounds small weights to zero; stored bytes): a Zen 4 re-run of the
# cifar10_compress quick table kept 410,917 int8 nonzeros against the Xeon's 410,918 (issue 26); AVX2 kernels
# on the Xeon (ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2) moved them by 1 to 5 of 8.5e5 and top-1 by up
# to 3 of 128 images. 1e-4 of the dense count (85 weights of ResNet-56) covers that with room to spare
RANK_RTOL = 1e-4


def same_machine(committed_env: dict[str, Any], env: dict[str, Any]) -> tuple[bool, str]:
    """Whether `env` is the machine `committed_env` records, and a sentence saying which case applies."""
    missing = [k for k in FINGERPRINT if k not in committed_env]
    differ = [f"{k} {committed_env[k]!r} here {env.get(k)!r}" for k in FINGERPRINT
              if k in committed_env and committed_env[k] != env.get(k)]
    if differ:
        return False, "another machine than the committed table's (" + "; ".join(differ) + ")"
    if missing:
        return False, f"the committed table does not record {', '.join(missing)}, so this may be another machine"
    return True, f"the machine the committed table records ({committed_env['cpu']}, {committed_env['cpu_capability']}, " \
                 f"torch {committed_env['torch']}, {committed_env['train_threads']} thread(s))"


def _binomial_std(top1: float, n: int | None) -> float:
    """Sampling std (points) of a top-1 of `top1` percent measured on n images (0 when n is unknown)."""
    if not n:
        return 0.0
    p = min(max(top1 / 100.0, 0.5 / n), 1 - 0.5 / n)  # a perfect score still has a one-image uncertainty
    return 100.0 * math.sqrt(p * (1 - p) / n)


def pooled_seed_std(rows: list[dict[str, Any]]) -> float | None:
    """Pooled std (points) of top-1 over seeds, across the rows that have ≥ 2 seeds (None when none has)."""
    ss, dof = 0.0, 0
    for r in rows:
        vals = r.get("top1_seeds") or []
        if len(vals) >= 2:
            ss += statistics.variance(vals) * (len(vals) - 1)
            dof += len(vals) - 1
    return math.sqrt(ss / dof) if dof else None


@dataclass
class Tolerances:
    """What a re-run may differ by, per row and key, and why."""

    same_machine: bool
    why: str  # which case applies, in a sentence
    base: dict[str, float]  # the recipe's tolerance, keys top1/params/macs/size_kb/nonzero/stored_kb
    top1: dict[str, tuple[float, str]] = field(default_factory=dict)  # stage -> (points, how derived)

    def key(self, stage: str, key: str, row: dict[str, Any]) -> float:
        """Tolerance for `key` of `stage` (row: the committed row)."""
        if key == "top1":
            return self.top1[stage][0]
        if self.same_machine:
            return self.base[key]
        if key == "nonzero":
            return max(self.base[key], math.ceil(RANK_RTOL * (row.get("dense_params") or row.get("params") or 0)))
        if key in ("stored_kb", "file_kb"):  # both follow the weights' values (sparsity, Huffman codes)
            dense = row.get("dense_size_bytes") or row.get("size_bytes") or 0
            return max(self.base[key], RANK_RTOL * dense / 1024 * 2)  # a weight costs its value and its index
        return self.base[key]


@dataclass
class CheckReport:
    """The outcome of `zoo recipe check`: differences beyond tolerance (none: it passes) and the tolerances used."""

    diffs: list[str]
    tolerances: Tolerances
    committed: Path  # the committed results.json compared with

    @property
    def ok(self) -> bool:
        """True when the re-run matches the committed table within tolerance."""
        return not self.diffs

    def summary(self) -> str:
        """One paragraph: the verdict, the case that applied and the top-1 tolerance of each row."""
        t = self.tolerances
        rows = ", ".join(f"{s} {v:.2f}" for s, (v, _) in t.top1.items())
        head = (f"zoo recipe check: OK, the re-run matches {self.committed}" if self.ok else
                f"zoo recipe check: FAILED, {len(self.diffs)} difference(s) from {self.committed}")
        return f"{head}\nchecked on {t.why}\ntop-1 tolerance (points): {rows}" + "".join(
            f"\n  - {d}" for d in self.diffs)


def tolerances(committed: dict[str, Any], env: dict[str, Any], recipe_tol: dict[str, float]) -> Tolerances:
    """The tolerances a re-run on the machine described by `env` is checked with."""
    quick = bool(committed.get("quick"))
    base = {"top1": 0.0, "params": 0.0, "macs": 0.0, "size_kb": 0.0, **recipe_tol}
    base.setdefault("nonzero", base["params"])
    base.setdefault("stored_kb", base["size_kb"])
    base.setdefault("file_kb", base["size_kb"])
    same, why = same_machine(committed.get("environment", {}), env)
    if same and quick:
        base = {k: 0.0 for k in base}
        why += ": a quick table must reproduce bit for bit"
    elif same:
        why += ": within the recipe's tolerance"
    else:
        why += f": top-1 within {Z:g} standard errors of the seed spread, ranked counts within {RANK_RTOL:g}"
    tol = Tolerances(same, why, base)
    pooled = pooled_seed_std(committed.get("rows", []))
    for r in committed.get("rows", []):
        tol.top1[r["stage"]] = (base["top1"], "recipe tolerance") if same else _top1_spread(r, pooled, base["top1"])
    return tol


def _top1_spread(row: dict[str, Any], pooled: float | None, floor: float) -> tuple[float, str]:
    """(tolerance in points, how it was derived) for one row's top-1 on another machine."""
    vals = row.get("top1_seeds") or [row.get("top1") or 0.0]
    n = len(vals)
    if n >= 2:
        seed_std, src = statistics.stdev(vals), f"std of {n} seeds"
    elif pooled is not None:
        seed_std, src = pooled, "pooled std of the table's multi-seed rows"
    else:
        seed_std, src = 0.0, ""
    binom = _binomial_std(statistics.fmean(vals), row.get("num_val"))
    s, src = (seed_std, src) if seed_std >= binom else (binom, f"sampling std of top-1 on {row.get('num_val')} images")
    tol = Z * s * math.sqrt(2.0 / n)
    if tol <= floor:
        return floor, "recipe tolerance"
    return tol, f"{Z:g} x {s:.2f} x sqrt(2/{n}) ({src})"


def compare(committed: dict[str, Any], new: dict[str, Any], tol: Tolerances) -> list[str]:
    """Lines describing every difference beyond tolerance (empty list: the check passes)."""
    diffs: list[str] = []
    if committed.get("seeds") != new.get("seeds"):
        diffs.append(f"seeds: committed {committed.get('seeds')} vs re-run {new.get('seeds')}")
    old_rows = {r["stage"]: r for r in committed.get("rows", [])}
    new_rows = {r["stage"]: r for r in new["rows"]}
    for s in old_rows.keys() - new_rows.keys():
        diffs.append(f"row {s}: in the committed table but not in the recipe")
    for s in new_rows.keys() - old_rows.keys():
        diffs.append(f"row {s}: in the recipe but not in the committed table")
    for s in [r["stage"] for r in new["rows"] if r["stage"] in old_rows]:
        o, n = old_rows[s], new_rows[s]
        if o.get("hashes") != n.get("hashes"):
            diffs.append(f"row {s}: stage config differs from the one that produced the committed table "
                         f"(hashes {o.get('hashes')} vs {n.get('hashes')})")
        for key, a, b, unit in _row_checks(o, n):
            if a is None or b is None:
                if a != b:
                    diffs.append(f"row {s}: {key} committed {a} vs re-run {b}")
                continue
            t = tol.key(s, key, o)
            if not (isinstance(a, (int, float)) and math.isfinite(a)) or abs(a - b) > t + 1e-9:
                fmt = ((lambda v: f"{v:,.2f}") if key in ("top1", "size_kb", "stored_kb", "file_kb")
                       else (lambda v: f"{int(v):,}"))
                how = f", {tol.top1[s][1]}" if key == "top1" and not tol.same_machine else ""
                diffs.append(f"row {s} ({n['label']}): {key} re-run {fmt(b)} vs committed {fmt(a)} "
                             f"(|diff| {fmt(abs(a - b))}{' ' + unit if unit else ''} > tolerance {t:g}{how})")
    return diffs


def _row_checks(o: dict[str, Any], n: dict[str, Any]) -> list[tuple[str, Any, Any, str]]:
    """(key, committed, re-run, unit) for every compared value of one row."""
    kb = lambda r, k: None if r.get(k) is None else r[k] / 1024  # noqa: E731
    checks = [("top1", o.get("top1"), n["top1"], "points"), ("params", o.get("params"), n["params"], ""),
              ("macs", o.get("macs"), n["macs"], ""), ("size_kb", kb(o, "size_bytes"), kb(n, "size_bytes"), "KB")]
    if "nonzero_params" in o:  # results written before the compression columns lack these
        checks.append(("nonzero", o["nonzero_params"], n.get("nonzero_params"), ""))
    if o.get("file_bytes") is not None:  # the file the stage wrote (a deep file for share stages), real bytes
        checks.append(("file_kb", kb(o, "file_bytes"), kb(n, "file_bytes"), "KB"))
    if "sparse_size_bytes" in o:
        checks.append(("stored_kb", kb(o, "sparse_size_bytes"), kb(n, "sparse_size_bytes"), "KB"))
    return checks
