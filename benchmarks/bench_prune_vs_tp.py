"""Structured pruning head to head: zoo.compress.prune against Torch-Pruning's MetaPruner.

Torch-Pruning is Fang et al. 2023, "DepGraph: Towards Any Structural Pruning" (the `torch-pruning`
package, zoo's optional `bench` extra; only called here, never a runtime dependency). Both prune 50 % of
the channels of every prunable layer by L1 filter magnitude (zoo: prune(..., 'magnitude', 'channel',
'layer', p=1); Torch-Pruning: MagnitudeImportance(p=1), pruning_ratio=0.5, local), the classifier
untouched. Per model and library the table gives: ran or crashed (the exception's first line), MACs
and parameter ratios pruned / dense, the equivalence error and the latency ratio pruned / dense at
batch 1 and 32 (dense, zoo and Torch-Pruning timed interleaved in rotating order; medians).

Equivalence error: zoo.compress.pruning.equivalence_error, the measure of zoo's post-surgery check
(max |pruned - masked| / max |masked| on its probe input), against the *masked* model: the original with
the removed channels zeroed. For zoo the kept units come from the same building blocks prune() uses
(build_groups, unit_scores, plan) and zero_removed builds the masked model; the bench checks that this
replay gives the very weights prune() returned. For Torch-Pruning the removed output channels of every
conv, linear and batch norm are recorded from its groups (step(interactive=True)) and zeroed the same
way (filters, biases, BN affine). BN statistics and affine are randomised so a wrong channel shows.

    .venv/bin/pip install -c constraints.txt -e '.[bench]'
    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/bench_prune_vs_tp.py --threads 2 --write benchmarks/prune_vs_tp.md
    .venv/bin/python benchmarks/bench_prune_vs_tp.py --no-latency --models "zoo mobilenet_v2" "tv resnet18"
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import shlex
import sys
from typing import Callable

import torch
import torch.nn as nn

import zoo
from bench_compress import interleaved, time_ms  # one timing loop for the benchmarks (run from benchmarks/)
import zoo.compress as zc
from zoo.compress import criteria
from zoo.compress._common import resolve_protect
from zoo.compress.groups import build_groups
from zoo.compress.pruning import equivalence_error
from zoo.compress.surgery import apply_plan, plan, zero_removed
from zoo.profile import count_macs, count_params

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "tests"))
from toy_nets import Toy  # noqa: E402  the 8-channel toy net of issue 12, shared with the pruning tests

AMOUNT = 0.5
LOAD = os.getloadavg()  # other processes on the machine distort latency: the report states the load
MAX_ROUNDS = 200  # fast models get more rounds: at least about one second of dense time per batch size
EXACT = 1e-4  # zoo's check accepts |a - b| <= 1e-4 * max|a| (+ rtol 1e-3): below this the row is exact


def _tv(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)(weights=None)
    return build


def _zoo(name: str, **kw: object) -> Callable[[], nn.Module]:
    return lambda: zoo.create(name, **kw)


# label: (builder, input side)
ROWS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "zoo mobilenet_v1": (_zoo("mobilenet_v1"), 224),
    "zoo mobilenet_v2": (_zoo("mobilenet_v2"), 224),
    "zoo shufflenet_v1 g3": (_zoo("shufflenet_v1", groups=3), 224),
    "zoo shufflenet_v2": (_zoo("shufflenet_v2"), 224),
    "zoo squeezenet1_1": (_zoo("squeezenet1_1"), 224),
    "zoo resnet18": (_zoo("resnet18"), 224),
    "zoo resnet56 (A)": (_zoo("resnet56", shortcut="A"), 32),
    "tv mobilenet_v2": (_tv("mobilenet_v2"), 224),
    "tv resnet18": (_tv("resnet18"), 224),
    "tv squeezenet1_1": (_tv("squeezenet1_1"), 224),
    "tv shufflenet_v2_x1_0": (_tv("shufflenet_v2_x1_0"), 224),
    "toy residual (custom module)": (Toy, 32),
}


def build(label: str) -> tuple[nn.Module, torch.Tensor]:
    """A seeded model in eval mode with random BN statistics, and a batch-1 example input."""
    builder, side = ROWS[label]
    torch.manual_seed(0)
    m = builder()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) * 0.2 - 0.1)
                mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.weight.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
                mod.bias.copy_(torch.rand(mod.num_features, generator=g) * 0.2 - 0.1)
    return m.eval(), torch.randn(1, 3, side, side, generator=g)


def first_line(e: BaseException) -> str:
    """`Type: first line of the message`, shortened for a table cell."""
    msg = (str(e).strip().splitlines() or [""])[0]
    out = f"`{type(e).__name__}: {msg}`"
    return (out[:116] + "...`") if len(out) > 120 else out


def run_zoo(model: nn.Module, x: torch.Tensor, round_to: int | None = None) -> tuple[nn.Module, nn.Module]:
    """(pruned, masked): prune() through the public API, and its masked model replayed from its building blocks."""
    pruned = zc.prune(model, AMOUNT, "magnitude", "channel", "layer", example_inputs=x, p=1, round_to=round_to)
    groups = build_groups(model, x)
    kept = plan(groups, criteria.unit_scores(model, groups, "magnitude", p=1), AMOUNT, "layer", round_to or 1)
    masked, replay = copy.deepcopy(model), copy.deepcopy(model)
    zero_removed(masked, groups, kept)
    apply_plan(replay, groups, kept)
    a, b = replay.state_dict(), pruned.state_dict()
    if a.keys() != b.keys() or any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a):
        raise RuntimeError("bench: the replayed plan differs from what zoo.compress.prune returned")
    return pruned, masked


def run_tp(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, nn.Module | None, str]:
    """(pruned, masked or None, why not): MetaPruner with L1 magnitude; removed channels recorded per layer."""
    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    names = {id(m): n for n, m in pruned.named_modules()}
    last = resolve_protect(pruned, ["last"]).pop()
    pruner = tp.pruner.MetaPruner(pruned, x, importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=AMOUNT, ignored_layers=[pruned.get_submodule(last)])
    left: dict[str, list[int]] = {}  # path -> original output channels still there
    why = ""
    for group in pruner.step(interactive=True):
        for dep, idxs in group:
            mod = dep.target.module
            if not pruner.DG.is_out_channel_pruning_fn(dep.handler) or not isinstance(mod, nn.Module):
                continue
            if not any(True for _ in mod.parameters()):  # an add, concat or split node: nothing to zero
                continue
            if not isinstance(mod, (nn.Conv2d, nn.Linear, nn.modules.batchnorm._BatchNorm)) or id(mod) not in names:
                why = why or f"it pruned the outputs of {type(mod).__name__}, which the bench cannot mask"
                continue
            n = mod.weight.shape[0]
            cur = left.setdefault(names[id(mod)], list(range(n)))
            gone = {int(getattr(i, "idx", i)) for i in idxs}
            left[names[id(mod)]] = [c for j, c in enumerate(cur) if j not in gone]
        group.prune()
    if why:
        return pruned, None, why
    masked = copy.deepcopy(model)
    with torch.no_grad():
        for path, keep in left.items():
            mod = masked.get_submodule(path)
            gone = sorted(set(range(mod.weight.shape[0])) - set(keep))
            for t in (mod.weight, getattr(mod, "bias", None)):
                if isinstance(t, torch.Tensor):
                    t[gone] = 0
    return pruned, masked, ""


def evaluate(label: str) -> tuple[dict[str, dict[str, object]], nn.Module, torch.Tensor]:
    """Per library: ran/crashed, MACs and params ratios, equivalence error and the pruned model."""
    model, x = build(label)
    size = tuple(x.shape[1:])
    macs, params = count_macs(model, size), count_params(model)
    out: dict[str, dict[str, object]] = {}
    for lib in ("zoo", "tp"):
        r: dict[str, object] = {"ran": False}
        stage = "pruning"
        try:
            if lib == "zoo":
                pruned, masked = run_zoo(model, x)
                why = ""
            else:
                pruned, masked, why = run_tp(model, x)
            stage = "forward of the pruned model"
            with torch.no_grad():
                pruned.eval()(x)
            stage = "measuring"
            r.update(ran=True, model=pruned, macs=count_macs(pruned, size) / macs,
                     params=count_params(pruned) / params)
            r["err"] = equivalence_error(masked, pruned, x) if masked is not None else None
            r["why"] = why
        except Exception as e:  # the table reports the crash, it does not hide it
            r["error"] = f"{stage}: {first_line(e)}"
        out[lib] = r
    return out, model, x




def latency(model: nn.Module, res: dict[str, dict[str, object]], x: torch.Tensor, batches: list[int],
            repeats: int) -> None:
    """Add `lat{b}` (pruned / dense median latency) to every library row that ran."""
    models = {"dense": model} | {lib: r["model"] for lib, r in res.items() if r["ran"]}
    for b in batches:
        xb = x.expand(b, *x.shape[1:]).contiguous()
        with torch.inference_mode():
            v = {k: (lambda m=m: m(xb)) for k, m in models.items()}
            v["dense"]()
            rounds = repeats if b == 1 else max(3, repeats // 3)
            rounds = max(rounds, min(MAX_ROUNDS, int(1e3 / max(time_ms(v["dense"]), 1e-3))))  # >= ~1 s of dense
            t = interleaved(v, rounds, warmup=2)
        for lib, r in res.items():
            if r["ran"]:
                r[f"lat{b}"] = t[lib] / t["dense"]
                r[f"ms{b}"] = t[lib]
        for r in res.values():
            r[f"dense_ms{b}"] = t["dense"]


def cells(r: dict[str, object], batches: list[int]) -> list[str]:
    """Table cells of one library on one model."""
    if not r["ran"]:
        return [f"crashed in {r['error'].replace('|', '/')}", "", "", ""] + ["" for _ in batches]
    err = r["err"]
    if err is None:
        e = f"n/a ({r['why']})"
    else:
        e = f"{err:.1e}" + (" exact" if err <= EXACT else " **wrong**")
    lat = [f"{r[f'lat{b}']:.2f}" if f"lat{b}" in r else "-" for b in batches]
    return ["ran", f"{r['macs']:.3f}", f"{r['params']:.3f}", e] + lat


def main(argv: list[str] | None = None) -> int:
    """Prune every row with both libraries, time them, print (and optionally write) the table."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(ROWS), choices=list(ROWS), metavar="ROW")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=15, help="timed rounds at batch 1 (a third, >= 3, at batch > 1)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--write", default=None, help="also write the markdown table to this file")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from importlib.metadata import PackageNotFoundError, version

    try:
        tp_version = version("torch-pruning")
    except PackageNotFoundError:
        raise SystemExit("bench_prune_vs_tp: needs Torch-Pruning, the optional `bench` extra: "
                         ".venv/bin/pip install -c constraints.txt -e '.[bench]'") from None

    batches = [] if args.no_latency else args.batches
    head = ["model", "lib", "ran", "MACs ratio", "params ratio", "equivalence error"]
    head += [f"latency b{b}" for b in batches]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ms_head = ["model"] + [f"{k} b{b}" for b in batches for k in ("dense", "zoo", "Torch-Pruning")]
    ms = ["| " + " | ".join(ms_head) + " |", "|" + "---|" * len(ms_head)]
    print("\n".join(lines), flush=True)
    for label in args.models:
        res, model, x = evaluate(label)
        if batches:
            latency(model, res, x, batches, args.repeats)
            ms.append("| " + " | ".join([label] + [_ms(res, k, b) for b in batches for k in ("dense", "zoo", "tp")])
                      + " |")
        for lib in ("zoo", "tp"):
            name = "zoo" if lib == "zoo" else "Torch-Pruning"
            line = "| " + " | ".join([label, name] + cells(res[lib], batches)) + " |"
            lines.append(line)
            print(line, flush=True)
    if batches:
        print("\nmedian ms\n" + "\n".join(ms), flush=True)
    if args.write:
        write(args, lines, ms if batches else [], tp_version)
    return 0


def _ms(res: dict[str, dict[str, object]], lib: str, b: int) -> str:
    """Median ms of one library (or 'dense') at batch b, '-' where it did not run."""
    key = f"dense_ms{b}" if lib == "dense" else f"ms{b}"
    r = res["zoo"] if lib == "dense" else res[lib]
    return f"{r[key]:.1f}" if key in r else "-"


def write(args: argparse.Namespace, lines: list[str], ms: list[str], tp_version: str) -> None:
    """The markdown report: command, date, versions, the table and how to read it."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    cmd = "OMP_NUM_THREADS=" + str(args.threads) + " .venv/bin/python " + shlex.join(sys.argv)
    text = [
        "# Structured pruning: zoo vs Torch-Pruning", "",
        f"`{cmd}`", "",
        f"Measured {now}; torch {torch.__version__}, torch-pruning {tp_version}, --threads {args.threads}, "
        f"{torch.get_num_threads()} intra-op threads in use, {os.cpu_count()} CPUs; 1-minute load average "
        f"{LOAD[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end.", "",
        "50 % L1-magnitude channel pruning of every prunable layer (zoo: `prune(m, 0.5, 'magnitude', 'channel', "
        "'layer', p=1)`; Torch-Pruning: `MetaPruner(MagnitudeImportance(p=1), pruning_ratio=0.5)`, classifier in "
        "`ignored_layers`). Random weights (torchvision `weights=None`), BN statistics randomised; ImageNet models "
        "at 224 px, resnet56 and the toy net at 32 px.", "",
        *lines, "",
        "- **equivalence error**: max |pruned - masked| / max |masked| on zoo's probe input "
        "(`zoo.compress.pruning.equivalence_error`), the masked model being the original with the removed "
        f"channels zeroed; 'exact' when <= {EXACT:g} (zoo's post-surgery tolerance).",
        "- **latency**: not measured in this run (--no-latency)." if not ms else
        "- **latency**: pruned / dense median latency at batch 1 and 32, dense, zoo and Torch-Pruning "
        f"interleaved in rotating order ({args.repeats} rounds at batch 1, {max(3, args.repeats // 3)} at "
        f"batch 32, more for fast models: at least about 1 s of dense time, at most {MAX_ROUNDS}), after 2 warm-up "
        "rounds, eval mode, `torch.inference_mode`.",
    ]
    if ms:
        text += ["", "Median latency in ms (the figures behind the ratios):", "", *ms]
    with open(args.write, "w") as f:
        f.write("\n".join(text) + "\n")


if __name__ == "__main__":
    sys.exit(main())
