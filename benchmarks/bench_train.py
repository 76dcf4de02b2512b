"""Training throughput on this CPU: fp32 vs bf16 autocast, NCHW vs channels_last, per model, interleaved.

Each round times every variant of every model for a few SGD steps (zoo.train_speed.probe: copies of the
model, random data, median step time); rounds repeat the whole set, so a slow spell of the machine hits every
variant alike. The report gives the median images/s over rounds, the spread, and each variant's ratio to fp32
NCHW, and names the CPU and whether it has native bf16.

    OMP_NUM_THREADS=2 python benchmarks/bench_train.py --rounds 3 [--models resnet20 ...] [--write FILE]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
from pathlib import Path

import torch

import zoo
from zoo.recipe.engine import environment
from zoo.train_speed import native_bf16, probe

MODELS = {  # name -> (entry point, kwargs): the CIFAR-10 models of recipes/cifar10_scratch.yaml
    "resnet20": ("resnet20", {}),
    "resnet56": ("resnet56", {}),
    "mobilenet_v2_0.5_cifar": ("mobilenet_v2", {"width": 0.5, "stem": "cifar"}),
    "shufflenet_v2_0.5_cifar": ("shufflenet_v2", {"width": 0.5, "stem": "cifar"}),
}
VARIANTS = [("fp32", False), ("fp32", True), ("bf16", False), ("bf16", True)]


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (or write) the markdown report."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=4, help="timed steps per variant and round")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--write", default=None, help="also write the report to this markdown file")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    x = torch.zeros(args.batch_size, 3, 32, 32)
    models = {}
    for name in args.models:
        torch.manual_seed(0)
        fn, kw = MODELS[name]
        models[name] = zoo.create(fn, num_classes=10, **kw)
    rates: dict[tuple[str, str, bool], list[float]] = {}
    for r in range(args.rounds):
        for name, m in models.items():
            ips = probe(m, x, ("fp32", "bf16"), (False, True), steps=args.steps, rounds=1)
            for (p, cl), v in ips.items():
                rates.setdefault((name, p, cl), []).append(v)
        print(f"round {r + 1}/{args.rounds} done", file=sys.stderr, flush=True)
    report = render(rates, args)
    print(report)
    if args.write:
        Path(args.write).write_text(report)
    return 0


def render(rates: dict[tuple[str, str, bool], list[float]], args: argparse.Namespace) -> str:
    """The markdown report: median images/s (min-max over rounds) and the ratio to fp32 NCHW."""
    head = "| model | " + " | ".join(f"{p}{' + channels_last' if cl else ''}" for p, cl in VARIANTS) + " |"
    lines = [f"# Training throughput: {environment()['cpu']} ({platform.machine()}), {torch.get_num_threads()} threads",
             "", f"native bf16 (AVX512-BF16 or AMX): {'yes' if native_bf16() else 'no'}; torch {torch.__version__}; "
             f"batch {args.batch_size} at 32x32, SGD; images/s, median of {args.rounds} interleaved rounds of "
             f"{args.steps} steps (min-max), ratio to fp32 NCHW.", "",
             f"`python benchmarks/bench_train.py --rounds {args.rounds} --steps {args.steps}`", "", head,
             "|---|" + "---:|" * len(VARIANTS)]
    for name in args.models:
        base = statistics.median(rates[(name, "fp32", False)])
        cells = []
        for p, cl in VARIANTS:
            v = rates[(name, p, cl)]
            med = statistics.median(v)
            cells.append(f"{med:.0f} ({min(v):.0f}-{max(v):.0f}), {med / base:.2f}x")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
