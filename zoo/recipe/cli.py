"""The `zoo recipe` subcommands: `run`, `check` and `validate`."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from zoo.errors import ZooError
from zoo.recipe.report import check_recipe, run_recipe
from zoo.recipe.schema import load_recipe


def _threads(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise ZooError(f"--threads {args.threads} is not allowed; expected an int >= 1")
        torch.set_num_threads(args.threads)


def _cmd_run(args: argparse.Namespace) -> int:
    _threads(args)
    stages = [s for s in args.stages.split(",") if s] if args.stages else None
    run_recipe(args.file, out=args.out, quick=args.quick, write_table=args.write_table, stages=stages)
    return 0


def _cmd_check(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.file)
    _threads(args)
    report = check_recipe(recipe, out=args.out, quick=args.quick)
    print("\n" + report.summary())
    return 0 if report.ok else 1


def _cmd_validate(args: argparse.Namespace) -> int:
    for f in args.files:
        r = load_recipe(f)
        print(f"{f}: ok ({r.name}: {len(r.stages)} stages, {len(r.seeds)} seed(s), {len(r.rows)} table rows)")
    return 0


def add_commands(sub: Any) -> None:
    """Add `zoo recipe {run,check,validate}` to the zoo CLI."""
    p = sub.add_parser("recipe", help="run, check or validate a recipe (YAML)",
                       description="Recipes chain train / distill / prune / quantize / lowrank stages over seeds and "
                                   "report a table.")
    rsub = p.add_subparsers(dest="recipe_command", metavar="ACTION", required=True, parser_class=type(p))

    r = rsub.add_parser("run", help="run a recipe; completed stages are skipped",
                        description="Run every stage of a recipe for each seed, then write results.json, "
                                    "table.md and accuracy_vs_macs.png into --out and print the table.")
    r.add_argument("file", help="recipe YAML file, e.g. recipes/digits_kd.yaml")
    r.add_argument("--out", default=None, help="output folder (default runs/<recipe name>[-quick])")
    r.add_argument("--quick", action="store_true", help="smoke test: 1 epoch, a data subset, the first seed")
    r.add_argument("--write-table", action="store_true",
                   help="also write the committed table next to the recipe (<stem>.md, <stem>.results.json)")
    r.add_argument("--threads", type=int, default=None,
                   help="torch threads for training (default: torch's choice; 1 is fastest on a busy machine)")
    r.add_argument("--stages", default=None, metavar="NAME[,NAME]",
                   help="run only these stages (and the stages they start from), every seed of one before the next; "
                        "the table is written once every row's stage is done")
    r.set_defaults(func=_cmd_run)

    c = rsub.add_parser("check", help="re-run a recipe and compare with its committed table",
                        description="Re-run the recipe (completed stages in --out are reused) and compare "
                                    "with <stem>.results.json / <stem>.md next to it, within the recipe's "
                                    "tolerance. Exit code 1 on a mismatch.")
    c.add_argument("file", help="recipe YAML file")
    c.add_argument("--out", default=None, help="output folder (default runs/<recipe name>-check[-quick])")
    c.add_argument("--quick", action="store_true", help="check the quick smoke run against <stem>.quick.results.json / .quick.md")
    c.add_argument("--threads", type=int, default=None, help="torch threads for training")
    c.set_defaults(func=_cmd_check)

    v = rsub.add_parser("validate", help="validate recipe files without running them")
    v.add_argument("files", nargs="+", help="recipe YAML files")
    v.set_defaults(func=_cmd_validate)
