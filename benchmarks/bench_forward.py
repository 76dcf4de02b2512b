"""Forward-pass benchmark: zoo models vs their torchvision counterparts, side by side in one process.

Both models of a pair run in eval mode under no_grad on the same input, interleaved (zoo and
torchvision alternate every repetition, and which one goes first alternates too), so machine noise
hits both alike. Prints the median time of each and the ratio zoo / torchvision (goal: <= 1.05).

    python benchmarks/bench_forward.py                       # all pairs, batch 1 and 32
    python benchmarks/bench_forward.py --models resnet50 --batches 1 --reps 3 --warmup 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
import torchvision

import zoo

# label: (zoo name, zoo kwargs, torchvision builder name)
PAIRS: dict[str, tuple[str, dict, str]] = {
    "mobilenet_v2": ("mobilenet_v2", {}, "mobilenet_v2"),
    "shufflenet_v2": ("shufflenet_v2", {"width": 1.0}, "shufflenet_v2_x1_0"),
    "squeezenet1_1": ("squeezenet1_1", {}, "squeezenet1_1"),
    "resnet50": ("resnet50", {}, "resnet50"),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=list(PAIRS), choices=list(PAIRS), help="pairs to time")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 32], help="batch sizes (default 1 32)")
    p.add_argument("--reps", type=int, default=30, help="timed repetitions per model (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed warm-up runs per model (default 5)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--resolution", type=int, default=224, help="input side (default 224)")
    args = p.parse_args(argv)
    if args.reps < 1 or args.warmup < 0 or any(b < 1 for b in args.batches) or (args.threads or 1) < 1:
        p.error("--reps, --batches and --threads must be >= 1 and --warmup >= 0")
    return args


def build_pair(label: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The zoo model and the torchvision model of a pair, both in eval mode with random weights."""
    name, kwargs, tv_name = PAIRS[label]
    if name not in zoo.list_models():
        raise SystemExit(f"bench_forward: zoo model {name!r} is not registered (registered: "
                         f"{', '.join(zoo.list_models())}); choose others with --models")
    z = zoo.create(name, **kwargs).eval()
    tv = getattr(torchvision.models, tv_name)(weights=None).eval()
    nz, nt = sum(p.numel() for p in z.parameters()), sum(p.numel() for p in tv.parameters())
    if nz != nt:
        print(f"note: {label}: zoo has {nz:,} params, torchvision {nt:,}", file=sys.stderr)
    return z, tv


def time_pair(z: torch.nn.Module, tv: torch.nn.Module, x: torch.Tensor, reps: int, warmup: int) -> tuple[list[float], list[float]]:
    """Interleaved forward times in ms: (zoo times, torchvision times)."""
    tz, tt = [], []
    with torch.no_grad():
        for _ in range(warmup):
            z(x)
            tv(x)
        for i in range(reps):
            order = ((z, tz), (tv, tt)) if i % 2 == 0 else ((tv, tt), (z, tz))
            for model, times in order:
                t0 = time.perf_counter()
                model(x)
                times.append((time.perf_counter() - t0) * 1e3)
    return tz, tt


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print the table."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pairs = {label: build_pair(label) for label in args.models}  # fail before timing if one is missing
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {torch.get_num_threads()} threads, "
          f"{args.reps} reps after {args.warmup} warm-up, input {args.resolution}px, eval + no_grad, CPU")
    head = f"{'model':<15} {'batch':>5} {'zoo ms':>10} {'tv ms':>10} {'zoo/tv':>7}"
    print(head)
    print("-" * len(head))
    worst = 0.0
    for label, (z, tv) in pairs.items():
        for b in args.batches:
            torch.manual_seed(0)
            x = torch.randn(b, 3, args.resolution, args.resolution)
            tz, tt = time_pair(z, tv, x, args.reps, args.warmup)
            mz, mt = statistics.median(tz), statistics.median(tt)
            worst = max(worst, mz / mt)
            print(f"{label:<15} {b:>5} {mz:>10.2f} {mt:>10.2f} {mz / mt:>7.3f}", flush=True)
    print(f"worst ratio zoo/tv: {worst:.3f} (goal <= 1.05)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
