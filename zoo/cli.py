"""The `zoo` command line: an argparse dispatcher over subcommands contributed by zoo modules.

Core commands live here (`list`, `info`; `zoo profile` and `zoo tables` live in zoo/tables.py). Every
module named in COMMAND_MODULES defines `add_commands(subparsers)`, which adds its subcommands and sets
`func=callable(args) -> int` with `set_defaults`. A module there may also define
`info_lines(name: str) -> list[str]`; `zoo info NAME` prints those lines after the model card (e.g. the
weights available for the model).

Bad input raises ZooError, printed as one line `zoo: error: <message>` with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import Any, Sequence

from zoo._registry import list_models, model_args, model_card, resolve_kwargs
from zoo.errors import ZooError

# Modules that contribute subcommands (each defines add_commands(subparsers)); add yours here.
COMMAND_MODULES: tuple[str, ...] = (
    "zoo.tables", "zoo.train", "zoo.finetune", "zoo.predict", "zoo.weights", "zoo.export", "zoo.recipe",
)

# (flag, kwarg) pairs of `zoo profile` (zoo/tables.py) that are passed to zoo.create only when given.
MODEL_FLAGS: tuple[tuple[str, str], ...] = (
    ("--width", "width"), ("--resolution", "resolution"), ("--groups", "groups"), ("--bypass", "bypass"),
    ("--num-classes", "num_classes"), ("--in-chans", "in_chans"),
)


class _Parser(argparse.ArgumentParser):
    """ArgumentParser whose usage errors are one line: `<prog>: error: <message>`, exit code 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def _guess(raw: str) -> Any:
    for conv in (int, float):
        try:
            return conv(raw)
        except ValueError:
            pass
    return raw


def coerce_kwarg(name: str, key: str, raw: str) -> Any:
    """Convert a command-line string to the type model `name` declares for `key` (validation is create's)."""
    spec = model_args(name).get(key)
    if spec is None:
        return _guess(raw)  # zoo.create rejects the unknown key and lists the accepted ones
    try:
        if spec.type is bool:
            low = raw.strip().lower()
            return {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}.get(low, raw)
        if spec.type is int:
            try:
                return int(raw)
            except ValueError:
                return float(raw)  # 3.0 is accepted as 3 by the registry, 3.5 is rejected there
        if spec.type is float:
            return float(raw)
        if spec.type is tuple:
            return tuple(int(v) for v in raw.split(","))
    except ValueError:
        return raw  # left as a string so zoo.create names the value and what is allowed
    return raw


def model_kwargs_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """The model kwargs the user gave on the command line (flags and --kw key=value), typed."""
    raw: dict[str, str] = {}
    for flag, key in MODEL_FLAGS:
        v = getattr(args, key, None)
        if v is not None:
            raw[key] = v
    for item in getattr(args, "kw", None) or []:
        key, sep, val = item.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ZooError(f"--kw {item!r} is not allowed; expected key=value, e.g. --kw drop_rate=0.2")
        if key in raw:
            raise ZooError(f"model argument {key!r} is given twice ({raw[key]!r} and {val!r})")
        raw[key] = val
    return {k: coerce_kwarg(args.name, k, v) for k, v in raw.items()}


def _size_str(size: Sequence[int]) -> str:
    return "x".join(str(s) for s in size)


def _cmd_list(args: argparse.Namespace) -> int:
    names = list_models(args.pattern)
    if not names:
        raise ZooError(f"no registered model matches {args.pattern!r}; `zoo list` shows them all")
    rows = []
    for n in names:
        card = model_card(n)
        rows.append((n, card.family, _size_str(card.input_size(resolve_kwargs(n))), card.description))
    w = [max(len(r[i]) for r in rows + [("name", "family", "input", "")]) for i in range(3)]
    print(f"{'name'.ljust(w[0])}  {'family'.ljust(w[1])}  {'input'.ljust(w[2])}  description")
    for r in rows:
        print(f"{r[0].ljust(w[0])}  {r[1].ljust(w[1])}  {r[2].ljust(w[2])}  {r[3]}".rstrip())
    return 0


def info_extensions() -> list[Any]:
    """The `info_lines(name)` callables of the COMMAND_MODULES that define one (e.g. available weights)."""
    out = []
    for mod in COMMAND_MODULES:
        fn = getattr(importlib.import_module(mod), "info_lines", None)
        if callable(fn):
            out.append(fn)
    return out


def info_text(name: str) -> str:
    """The model card of `name` as text: paper, url, input size, kwargs with ranges, references."""
    card = model_card(name)
    specs = model_args(name)
    lines = [f"{name} (family {card.family})", f"paper:        {card.paper}", f"url:          {card.url}"]
    if card.description:
        lines.append(f"description:  {card.description}")
    size = card.input_size(resolve_kwargs(name))
    extra = " (fixed)" if card.fixed_resolution else f" (minimum side {card.min_resolution})"
    lines.append(f"input size:   {_size_str(size)}{extra}")
    lines.append("arguments:")
    kw = max(len(k) for k in specs)
    for k, s in specs.items():
        lines.append(f"  {k.ljust(kw)}  default {s.default!r:<8}  {s.describe()}" + (f"  ({s.doc})" if s.doc else ""))
    if card.references:
        lines.append("references:")
        for r in card.references:
            params = "-" if r.params is None else f"{r.params:,} (tol {r.params_tol:,})"
            macs = "-" if r.macs is None else f"{r.macs / 1e6:,.1f}M (rtol {r.macs_rtol:g})"
            args = ", ".join(f"{k}={v!r}" for k, v in r.kwargs.items()) or "defaults"
            lines.append(f"  {r.label or args}: params {params}, MACs {macs}; {r.source} [{args}]")
    for fn in info_extensions():
        lines.extend(fn(name))
    return "\n".join(lines)


def _cmd_info(args: argparse.Namespace) -> int:
    print(info_text(args.name))
    return 0


def _add_core_commands(sub: Any) -> None:
    p = sub.add_parser("list", help="list registered models", description="List registered models.")
    p.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern, e.g. 'resnet*' (default: all)")
    p.set_defaults(func=_cmd_list)

    p = sub.add_parser("info", help="model card: paper, kwargs and their ranges, reference numbers",
                       description="Show the model card of a registered model.")
    p.add_argument("name", help="registered model name")
    p.set_defaults(func=_cmd_info)


def set_data_root(folder: str | None) -> None:
    """`zoo --data-root DIR`: check that DIR is a folder and export it as $ZOO_DATA (None: leave $ZOO_DATA)."""
    if folder is None:
        return
    if not os.path.isdir(folder):
        raise ZooError(f"--data-root {folder!r} is not a folder; expected the folder holding the shared datasets")
    os.environ["ZOO_DATA"] = os.path.abspath(folder)


def build_parser() -> argparse.ArgumentParser:
    """The full `zoo` parser: core commands plus those of every module in COMMAND_MODULES."""
    parser = _Parser(prog="zoo", description="Lightweight CNN model zoo: profile, check, train, compress.")
    parser.add_argument("--data-root", default=None, metavar="DIR",
                        help="folder holding the shared datasets (mnist/, cifar10/, pretrained/, ...); sets $ZOO_DATA "
                             "for this run (default: $ZOO_DATA)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, parser_class=_Parser)
    _add_core_commands(sub)
    for mod in COMMAND_MODULES:
        importlib.import_module(mod).add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the zoo CLI; returns the exit code (0 ok, 1 failed check, 2 bad input)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # argparse: --help (0) or a usage error (2), already printed
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        set_data_root(args.data_root)
        return int(args.func(args) or 0)
    except ZooError as e:
        print(f"zoo: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("zoo: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `zoo list | head`
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
