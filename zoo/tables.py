"""`zoo tables`: rebuild the papers' parameter and MAC tables from the registry and check them; and
`zoo profile NAME`, the per-layer table of one model.

For every registered model card with references, the model is built with the reference kwargs,
profiled at its default input size (hooks only: conv + linear MACs per sample, see zoo.profile), and
compared with the paper's numbers using the reference tolerances (`params_tol` absolute,
`macs_rtol` relative).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

import torch

from zoo._registry import create, list_models, model_card
from zoo.cli import MODEL_FLAGS, model_kwargs_from_args
from zoo.errors import ZooError
from zoo.profile import count_params, layer_stats, profile


@dataclass
class TableRow:
    """One configuration from a paper table next to what zoo builds."""

    family: str
    name: str
    kwargs: dict
    label: str
    source: str
    input_size: tuple[int, int, int]
    paper_params: int | None
    zoo_params: int
    params_tol: int
    paper_macs: int | None
    zoo_macs: int
    macs_rtol: float

    @property
    def params_delta(self) -> int | None:
        """zoo params minus paper params (None without a paper number)."""
        return None if self.paper_params is None else self.zoo_params - self.paper_params

    @property
    def macs_delta_pct(self) -> float | None:
        """Relative MAC difference in percent (None without a paper number)."""
        return None if self.paper_macs is None else 100.0 * (self.zoo_macs - self.paper_macs) / self.paper_macs

    @property
    def params_ok(self) -> bool:
        """True when the params are within params_tol (or there is no paper number)."""
        return self.paper_params is None or abs(self.params_delta) <= self.params_tol

    @property
    def macs_ok(self) -> bool:
        """True when the MACs are within macs_rtol (or there is no paper number)."""
        return self.paper_macs is None or abs(self.zoo_macs - self.paper_macs) <= self.macs_rtol * self.paper_macs

    @property
    def ok(self) -> bool:
        """True when both params and MACs match."""
        return self.params_ok and self.macs_ok


def reference_row(name: str, index: int) -> TableRow:
    """Build model `name` with its `index`-th reference kwargs and compare params and MACs."""
    card = model_card(name)
    ref = card.references[index]
    model = create(name, **ref.kwargs)
    size = model.spec.input_size
    macs = sum(r.macs for r in layer_stats(model, size))
    label = ref.label or (f"{name} " + ", ".join(f"{k}={v}" for k, v in ref.kwargs.items())).strip()
    return TableRow(card.family, name, dict(ref.kwargs), label, ref.source, tuple(size), ref.params,
                    count_params(model), ref.params_tol, ref.macs, macs, ref.macs_rtol)


def table_rows(pattern: str = "*") -> list[TableRow]:
    """Rows for every reference of every registered model matching `pattern`, in registry order."""
    rows = []
    with torch.random.fork_rng():  # building models draws random init; leave the caller's RNG alone
        for name in list_models(pattern):
            for i in range(len(model_card(name).references)):
                rows.append(reference_row(name, i))
    return rows


def _fmt_int(v: int | None, signed: bool = False) -> str:
    return "-" if v is None else (f"{v:+,}" if signed else f"{v:,}")


def _fmt_m(v: int | None) -> str:
    return "-" if v is None else f"{v / 1e6:,.2f}M"


def format_tables(rows: list[TableRow]) -> str:
    """Render rows grouped by family, one aligned table per family, with OK/MISMATCH markers."""
    head = ("model", "source", "input", "paper params", "zoo params", "delta", "paper MACs", "zoo MACs",
            "delta %", "check")
    families: dict[str, list[TableRow]] = {}
    for r in rows:
        families.setdefault(r.family, []).append(r)
    body: dict[str, list[tuple[str, ...]]] = {}
    for fam, rs in families.items():
        body[fam] = [(
            r.label, r.source, "x".join(str(s) for s in r.input_size),
            _fmt_int(r.paper_params), _fmt_int(r.zoo_params), _fmt_int(r.params_delta, signed=True),
            _fmt_m(r.paper_macs), _fmt_m(r.zoo_macs),
            "-" if r.macs_delta_pct is None else f"{r.macs_delta_pct:+.2f}%",
            "OK" if r.ok else "MISMATCH" + ("" if r.params_ok else " params") + ("" if r.macs_ok else " MACs"),
        ) for r in rs]
    all_rows = [head] + [row for rs in body.values() for row in rs]
    widths = [max(len(row[i]) for row in all_rows) for i in range(len(head))]
    left = {0, 1, 2, 9}

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    out = []
    for fam, rs in body.items():
        out.append(f"== {fam} ==")
        out.append(line(head))
        out.append("  ".join("-" * w for w in widths))
        out.extend(line(row) for row in rs)
        out.append("")
    bad = sum(not r.ok for r in rows)
    out.append(f"{len(rows)} rows, {len(rows) - bad} OK, {bad} MISMATCH "
               "(MACs = conv + linear multiply-accumulates per image at the default input size)")
    return "\n".join(out)


def _cmd_tables(args: argparse.Namespace) -> int:
    if not list_models(args.pattern):
        raise ZooError(f"no registered model matches {args.pattern!r}; see `zoo list`")
    rows = table_rows(args.pattern)
    print(format_tables(rows))
    return 0 if all(r.ok for r in rows) else 1


def _cmd_profile(args: argparse.Namespace) -> int:
    kwargs = model_kwargs_from_args(args)
    model = create(args.name, **kwargs)
    p = profile(model, latency=args.latency, batch_size=args.batch_size)
    if args.json:
        print(json.dumps({"name": args.name, "kwargs": kwargs, **p.summary()}, indent=2, default=str))
    else:
        given = ", ".join(f"{k}={v!r}" for k, v in kwargs.items())
        print(f"{args.name}({given})")
        print(p.table())
    return 0


def add_commands(subparsers: Any) -> None:
    """Add `zoo tables` and `zoo profile` to the CLI."""
    p = subparsers.add_parser("tables", help="check params/MACs of every model against the papers",
                              description="Rebuild the papers' params/MACs tables and compare (exit 1 on a mismatch).")
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern of model names (default: all)")
    p.set_defaults(func=_cmd_tables)

    p = subparsers.add_parser("profile", help="per-layer params/MACs table and totals of a model",
                              description="Build a model (kwargs validated by zoo.create) and profile it at "
                                          "its default input size.")
    p.add_argument("name", help="registered model name (see `zoo list`)")
    for flag, key in MODEL_FLAGS:
        p.add_argument(flag, dest=key, metavar=key.upper(), default=None, help=f"model argument {key}")
    p.add_argument("--kw", action="append", metavar="KEY=VALUE", default=[],
                   help="any other model argument (repeatable); the value is parsed to the type the model declares "
                        "(int, float, str, bool, or comma-separated ints for tuples)")
    p.add_argument("--latency", action="store_true", help="also time the CPU forward (median ms)")
    p.add_argument("--batch-size", type=int, default=1, help="batch size for --latency (default 1)")
    p.add_argument("--json", action="store_true", help="print the totals as JSON instead of the table")
    p.set_defaults(func=_cmd_profile)
