"""The columns of a recipe's report table: name -> (header, cell formatter of a results.json row).

Bottom layer of zoo.recipe: zoo.recipe.schema checks `table.columns` against these names and
zoo.recipe.report renders the cells.
"""

from __future__ import annotations

import statistics
from typing import Callable


def mean_std(xs: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (None for a single value)."""
    return (statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else None)


def pm(mean: float | None, std: float | None, digits: int = 2) -> str:
    """`mean ± std` with `digits` decimals (`-` when there is no mean)."""
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _errors(top1: float, num_val: int) -> int:
    return int(round(num_val * (100.0 - top1) / 100.0))


def _row_errors(r: dict) -> tuple[float | None, float | None]:
    errs = [_errors(t, r["num_val"]) for t in r["top1_seeds"]] if r.get("num_val") else []
    return mean_std(errs) if errs else (None, None)


def _ref(key: str) -> Callable[[dict], str]:
    def f(r: dict) -> str:
        v = (r.get("reference") or {}).get(key)
        if v is None:
            return "absent" if r.get("reference") else "-"
        return f"{v:,.0f}" if key == "params" else f"{v:g}"
    return f


def _signed(v: float | None) -> str:
    return "-" if v is None else f"{v:+.2f}"


def _delta(r: dict) -> float | None:
    """This row's top-1 minus the top-1 of the dense model at the start of its `from` chain."""
    return None if r.get("dense_top1") is None or r.get("from") is None else r["top1"] - r["dense_top1"]


def _ref_delta(r: dict) -> float | None:
    ref = r.get("reference") or {}
    return None if ref.get("top1") is None or ref.get("base_top1") is None else ref["top1"] - ref["base_top1"]


def _share(r: dict, *parts: str) -> str:
    """Percentage of the row's deep file taken by these parts (`-` for a file that is not a deep file)."""
    p = r.get("file_parts")
    return "-" if not p or not r.get("file_bytes") else f"{100 * sum(p[k] for k in parts) / r['file_bytes']:.1f}"


def _errors_cell(r: dict) -> str:
    m, s = _row_errors(r)
    return "-" if m is None else f"{pm(m, s, 1 if s is not None else 0)} / {r['num_val']:,}"


def _errors_10k_cell(r: dict) -> str:
    m, s = _row_errors(r)
    if m is None:
        return "-"
    k = 10_000 / r["num_val"]
    return pm(m * k, None if s is None else s * k, 0)


# column name -> (header, cell formatter); `table.columns` in a recipe picks and orders them
COLUMNS: dict[str, tuple[str, Callable[[dict], str]]] = {
    "model": ("model", lambda r: r["label"]),
    "stage": ("stage", lambda r: f"{r['stage']} ({r['type']})"),
    "teacher": ("teacher", lambda r: r.get("teacher") or "-"),
    "top1": ("top-1 (%)", lambda r: pm(r["top1"], r.get("top1_std"))),
    "top5": ("top-5 (%)", lambda r: pm(r["top5"], r.get("top5_std"))),
    "ref_top1": ("published top-1 (%)", _ref("top1")),
    "errors": ("test errors", _errors_cell),
    "errors_per_10k": ("errors per 10k", _errors_10k_cell),
    "ref_errors_per_10k": ("paper errors per 10k", _ref("errors_per_10k")),
    "params": ("params", lambda r: f"{r['params']:,}"),
    "macs": ("MACs", lambda r: f"{r['macs'] / 1e6:,.2f} M"),
    "size_kb": ("size (KB)", lambda r: "-" if r.get("size_bytes") is None else f"{r['size_bytes'] / 1024:,.1f}"),
    "latency_ms": ("CPU latency (ms)", lambda r: "-" if r.get("latency_ms") is None else f"{r['latency_ms']:.2f}"),
    "train_time_s": ("train time (s)", lambda r: pm(r.get("time_s"), None, 1)),
    "precision": ("trained in", lambda r: "-" if not r.get("precision") else
                  f"{r['precision']}{', NHWC' if r.get('memory_format') == 'channels_last' else ''}"),
    # compression columns (zoo.recipe.compress_stages)
    "top1_pre": ("top-1 before fine-tune (%)", lambda r: pm(r.get("top1_pre"), None)),
    "nonzero": ("nonzero params", lambda r: "-" if r.get("nonzero_params") is None else f"{r['nonzero_params']:,}"),
    "sparsity": ("weight sparsity (%)", lambda r: "-" if r.get("sparsity") is None else f"{100 * r['sparsity']:.1f}"),
    "stored_kb": ("stored size (KB)",
                  lambda r: "-" if r.get("sparse_size_bytes") is None else f"{r['sparse_size_bytes'] / 1024:,.1f}"),
    "ref_params": ("paper weights", _ref("params")),
    "nz_reduction": ("fewer nonzero params", lambda r: "-" if not r.get("nonzero_params") or not r.get("dense_params")
                     else f"{r['dense_params'] / r['nonzero_params']:.1f}x"),
    "delta_top1": ("top-1 change (points)", lambda r: _signed(_delta(r))),
    "ref_delta_top1": ("published change (points)", lambda r: _signed(_ref_delta(r))),
    "mac_reduction": ("fewer MACs", lambda r: "-" if not r.get("dense_macs") or not r.get("macs")
                      else f"{r['dense_macs'] / r['macs']:.2f}x"),
    # Deep Compression file columns (zoo.recipe.share_stage.file_fields): real bytes on disk
    "error": ("error (%)", lambda r: f"{100 - r['top1']:.2f}"),
    "delta_error": ("error change (points)", lambda r: _signed(None if _delta(r) is None else -_delta(r))),
    "file_kb": ("file size (KB)", lambda r: "-" if r.get("file_bytes") is None else f"{r['file_bytes'] / 1024:,.1f}"),
    "file_ratio": ("smaller (dense fp32 file / file)",
                   lambda r: "-" if r.get("file_ratio") is None else f"{r['file_ratio']:.1f}x"),
    "index_share": ("index (% of file)", lambda r: _share(r, "index")),
    "codebook_share": ("codebook (% of file)", lambda r: _share(r, "codebook")),
    "value_share": ("values (% of file)", lambda r: _share(r, "values")),
    "other_share": ("other tensors + header (% of file)", lambda r: _share(r, "other", "header")),
    "decode_ms": ("decode (ms)", lambda r: "-" if r.get("decode_ms") is None else f"{r['decode_ms']:.1f}"),
    "ratio": ("compression ratio", lambda r: "-" if r.get("compression_ratio") is None
              else f"{r['compression_ratio']:.1f}x"),
}
TEXT_COLUMNS = ("model", "stage", "teacher", "precision")
DEFAULT_COLUMNS = ("model", "stage", "teacher", "top1", "params", "macs", "size_kb", "latency_ms")
