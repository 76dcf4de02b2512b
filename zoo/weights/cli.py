"""`zoo weights add|list|verify|import` subcommands and the weights lines of `zoo info NAME`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from zoo.cli import model_kwargs_from_args
from zoo.errors import ZooError
from zoo.io import check_out_file
from zoo.weights.checkpoint import read_checkpoint
from zoo.weights.evaluate import evaluate_index
from zoo.weights.foreign import CLASS_SETS, import_state_dict
from zoo.weights.tflite import ACTIVATIONS, import_tflite_command, is_tflite
from zoo.weights.index import WeightsEntry, list_weights, register_checkpoint, verify_index, weights_for


def _metric(item: str) -> tuple[str, float]:
    key, sep, val = item.partition("=")
    try:
        if not sep or not key.strip():
            raise ValueError
        return key.strip(), float(val)
    except ValueError:
        raise ZooError(f"--metric {item!r} is not allowed; expected name=number, e.g. --metric top1=0.981") from None


def _fmt_metrics(e: WeightsEntry) -> str:
    return ", ".join(f"{k}={v:g}" for k, v in e.metrics.items())


def _row(e: WeightsEntry) -> str:
    comp = f"  compression={json.dumps(e.compression)}" if e.compression else ""
    return (f"{e.describe()}  dataset={e.dataset}  {_fmt_metrics(e)}  {e.size_bytes / 1e3:.0f} kB  "
            f"recipe={e.recipe}{comp}")


def _cmd_add(args: argparse.Namespace) -> int:
    compression: Any = None
    if args.compression is not None:
        try:
            compression = json.loads(args.compression)
        except json.JSONDecodeError as e:
            raise ZooError(f"--compression {args.compression!r} is not JSON: {e}") from None
    metrics = dict(_metric(m) for m in args.metric)
    e = register_checkpoint(args.path, args.tag, args.dataset, metrics, args.recipe, compression,
                            weights_dir=args.weights_dir, replace=args.replace, url=args.url)
    print(f"added {_row(e)}  sha256={e.sha256}")
    return 0


def _cmd_list(args: argparse.Namespace) -> int:
    entries = list_weights(args.pattern, weights_dir=args.weights_dir)
    if not entries:
        print(f"no weights match {args.pattern!r}")
    for e in entries:
        print(_row(e))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    problems = verify_index(args.weights_dir)
    for p in problems:
        print(p)
    if not problems:
        print("all indexed weights files match their sha256")
    if args.evaluate and not problems:
        results = evaluate_index(args.weights_dir)
        for r in results:
            print(r.line())
        problems = [r for r in results if not r.ok]
    return 1 if problems else 0


def _floats(flag: str, raw: str | None) -> list[float] | None:
    if raw is None:
        return None
    try:
        return [float(v) for v in raw.split(",")]
    except ValueError:
        raise ZooError(f"{flag} {raw!r} is not allowed; expected comma-separated numbers, e.g. "
                       f"{flag} 0.485,0.456,0.406") from None


TFLITE_OWN = (("--classes", "classes"), ("--mean", "mean"), ("--std", "std"), ("--kw", "kw"))


def _cmd_import(args: argparse.Namespace) -> int:
    check_out_file(args.out, "--out")
    if is_tflite(args.path):  # architecture, classes and normalisation come from the file itself
        given = [flag for flag, key in TFLITE_OWN if getattr(args, key)]
        if given:
            raise ZooError(f"{', '.join(given)} cannot be used with the TFLite file {args.path}: it gives its own "
                           "architecture, classes and input normalisation; leave them out (only --model, checked "
                           "against the file, and --activations apply)")
        print(import_tflite_command(args.path, args.out, model=args.name, activations=args.activations))
        return 0
    if args.activations != "float":
        raise ZooError(f"--activations {args.activations} is only for .tflite files, whose layer outputs have "
                       f"quantization grids; {args.path} is a state dict")
    if args.name is None:
        raise ZooError(f"--model is required for {args.path}: a safetensors state dict does not say which zoo model "
                       "it fits (only TFLite MobileNets are detected from the file)")
    kwargs = model_kwargs_from_args(args)
    out = import_state_dict(args.path, args.name, args.out, classes=args.classes, mean=_floats("--mean", args.mean),
                            std=_floats("--std", args.std), flags=True, **kwargs)
    print(f"imported {args.path} as {read_checkpoint(out).describe()} -> {out}; load it with "
          f"zoo.create({args.name!r}, weights={str(out)!r})")
    return 0


def _add_import(ws: Any) -> None:
    i = ws.add_parser("import", help="turn a foreign safetensors state dict or a TFLite MobileNet into a zoo checkpoint",
                      description="Map a foreign state dict onto a zoo model by structure (tensors paired in "
                                  "module order, shapes checked) and save it with spec, classes and "
                                  "normalisation in the header. Safetensors only: pickle files are refused. "
                                  "A .tflite MobileNet (v1/v2, uint8 or float) is detected, dequantized and "
                                  "imported with its 1000 ImageNet classes (zoo.weights.tflite).")
    i.add_argument("path", help="the foreign .safetensors state dict, or a .tflite file")
    i.add_argument("--model", dest="name", default=None,
                   help="registered zoo model, e.g. resnet56 (required for safetensors; checked for .tflite)")
    i.add_argument("--kw", action="append", metavar="KEY=VALUE", default=[],
                   help="a model argument (repeatable), e.g. --kw shortcut=A")
    i.add_argument("--out", required=True, help="the zoo checkpoint to write (.safetensors)")
    i.add_argument("--activations", choices=ACTIVATIONS, default="float",
                   help="TFLite only: float32 activations (default), or uint8 = every layer output rounded to the "
                        "file's own grid, reproducing the interpreter's integer model")
    i.add_argument("--mean", default=None, help="input normalisation mean per channel, e.g. 0.485,0.456,0.406")
    i.add_argument("--std", default=None, help="input normalisation std per channel, e.g. 0.229,0.224,0.225")
    i.add_argument("--classes", default=None,
                   help=f"class names: a named set ({', '.join(CLASS_SETS)}) or a text file, one name per line")
    i.set_defaults(func=_cmd_import)


def add_commands(sub: Any) -> None:
    """Add `zoo weights {add,list,verify,import}` to the zoo CLI."""
    p = sub.add_parser("weights", help="list, add and verify the indexed checkpoints; import foreign ones",
                       description="Manage weights/index.json (folder: --weights-dir, else $ZOO_WEIGHTS_DIR, "
                                   "else the weights installed with zoo, the package zoo._weights). A file the "
                                   "folder lacks is downloaded from $ZOO_WEIGHTS_URL (a base URL serving the files "
                                   "by name; else the entry's url) into $ZOO_HOME/weights (default "
                                   "~/.cache/zoo/weights) when first loaded, and checked against its sha256.")
    ws = p.add_subparsers(dest="weights_command", metavar="ACTION", required=True, parser_class=type(p))
    a = ws.add_parser("add", help="copy a checkpoint into the weights folder and index it")
    a.add_argument("path", help="a .safetensors file written by zoo.weights.save_checkpoint")
    a.add_argument("--tag", required=True, help="weights tag, e.g. digits")
    a.add_argument("--dataset", required=True, help="dataset the weights were trained on")
    a.add_argument("--metric", action="append", default=[], required=True, metavar="NAME=VALUE",
                   help="a measured metric (repeatable), e.g. --metric top1=0.981")
    a.add_argument("--recipe", required=True, help="the recipe that produced the checkpoint")
    a.add_argument("--compression", default=None, help="JSON description of the compression applied")
    a.add_argument("--replace", action="store_true", help="update an existing entry")
    a.add_argument("--url", default=None,
                   help="where the file is published, if anywhere (default: none, the file ships with the weights "
                        "folder; $ZOO_WEIGHTS_URL gives a base URL for every file)")
    a.set_defaults(func=_cmd_add)
    lst = ws.add_parser("list", help="list indexed weights")
    lst.add_argument("pattern", nargs="?", default="*", help="fnmatch pattern on ARCH.TAG or TAG")
    lst.set_defaults(func=_cmd_list)
    v = ws.add_parser("verify", help="re-hash every indexed file, local or downloaded (exit code 1 on a mismatch)")
    v.add_argument("--evaluate", action="store_true",
                   help="also re-measure each checkpoint's top-1 on its dataset's held-out split and compare it "
                        "with the index (entries whose dataset is not on this machine are skipped, with why)")
    v.set_defaults(func=_cmd_verify)
    _add_import(ws)
    for q in (a, lst, v):
        q.add_argument("--weights-dir", default=None,
                       help="weights folder (default $ZOO_WEIGHTS_DIR, else the one installed with zoo)")


def info_lines(name: str) -> list[str]:
    """Lines for `zoo info NAME`: the indexed weights of that model with their metrics."""
    entries = weights_for(name)
    if not entries:
        return ["weights:      none in the index"]
    return ["weights:"] + [f"  {_row(e)}" for e in entries]
