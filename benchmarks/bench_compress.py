"""CPU latency of compressed zoo models: fp32 vs int8 and dense vs structured-pruned, side by side.

All variants of a model are timed in ONE run and interleaved (each repeat times every variant once, in
a rotating order), so machine noise hits them alike; the table gives medians and ratios to fp32.
A second table compares the two int8 flows zoo could use: eager torch.ao (what zoo.compress.quantize
uses) and torchao's PT2E flow (export -> X86InductorQuantizer -> convert -> torch.compile), against
fp32 eager and fp32 torch.compile, at batch 1.

    python benchmarks/bench_compress.py                      # mobilenet_v2 + resnet18, 224 px
    python benchmarks/bench_compress.py --models mobilenet_v2 --size 224 --threads 2 --no-pt2e
    python benchmarks/bench_compress.py --models mobilenet_v2 --threads 2 --tables round   # round_to only
    python benchmarks/bench_compress.py --models mobilenet_v2 --threads 2 --tables breakdown --round-to none 16

The round_to table prunes 50% of the channels (L1 magnitude) in global and layer scope with kept counts
rounded up to multiples of 8 / 16 (prune(..., round_to=N)) or not, and times dense and all of them
interleaved, in fp32 on each of three runtimes: eager NCHW (zoo's default), eager channels_last (the
model converted with .to(memory_format=torch.channels_last), the input likewise) and an ExecuTorch
program with the XNNPACK delegate. The ratio to the dense model on the same runtime is the pruned
latency, MACs/dense the work left.

The breakdown table says where the eager time of the dense and the layer-scope pruned model goes: the
forward time summed per layer kind (1x1 conv, depthwise conv, other conv, batch norm, activation, linear;
forward hooks, so the kinds add up to a little more than the plain call) in eager NCHW and channels_last,
each pruned kind as a ratio to the same kind in the dense model.

Weights are random (latency does not depend on them); int8 is calibrated on random batches.
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import ctypes.util
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

import zoo
import zoo.compress as zc
from zoo.deploy import executorch_program, set_threads
from zoo.export import load_executorch
from zoo.profile import count_macs


M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameters (malloc.h)


def pin_allocator(mmap_mb: int = 32) -> bool:
    """Fix glibc malloc's mmap and trim thresholds (mallopt) so eager timings do not depend on heap history.

    By default glibc raises both thresholds only after a large mmapped block is freed, so until then every
    activation over 128 KB is mmapped, or the heap top is trimmed after each forward, and the next forward
    page-faults its memory in again. That history differs between processes: dense MobileNet v2 at batch 1
    (2 threads) took 2,300-3,500 minor faults and 16.6-18.6 ms per forward by default, 0 faults and
    12.5-14.3 ms with the thresholds fixed (benchmarks/prune_round.md, 2026-12-07). False where there is no
    glibc mallopt.
    """
    name = ctypes.util.find_library("c")
    if not name or sys.platform != "linux":
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    ok = libc.mallopt(M_MMAP_THRESHOLD, mmap_mb << 20)
    return bool(ok and libc.mallopt(M_TRIM_THRESHOLD, 2 * mmap_mb << 20))


def add_allocator_option(ap: argparse.ArgumentParser) -> None:
    """Add the benchmarks' --allocator option (pinned, the default, or glibc's dynamic thresholds)."""
    ap.add_argument("--allocator", default="pinned", choices=["pinned", "default"],
                    help="pinned (default): fix glibc malloc's mmap/trim thresholds first (pin_allocator); "
                         "default: glibc's dynamic ones, as runs before 2026-12-07 14:00 UTC did")


def set_allocator(choice: str) -> str:
    """Apply an --allocator choice; returns what the report header should say."""
    return "pinned (32 MB mmap, 64 MB trim)" if choice == "pinned" and pin_allocator() else "glibc default"


def time_ms(fn: Callable[[], object]) -> float:
    """Wall time of one call in ms."""
    t0 = time.perf_counter()
    fn()
    return (time.perf_counter() - t0) * 1e3


def interleaved(variants: dict[str, Callable[[], object]], repeats: int, warmup: int,
                settle: int = 3) -> dict[str, float]:
    """Median ms per variant, timing each variant once per repeat in a rotating order.

    Before each timed call the same variant runs `settle` untimed calls back to back, so the timed call
    sees its own runtime's warm thread pool, not the tail of the previous variant's (XNNPACK's workers
    spin for a while after a call and slow a following eager call by ~10 % on 2 cores; one settle call
    did not absorb that tail, three did: benchmarks/int8.md, 2026-12-07). No sleep between
    calls: on this VM an idle pause of 20 ms made the next eager forwards ~50 % slower (vCPU wake-up).
    """
    names = list(variants)
    for _ in range(warmup):
        for n in names:
            variants[n]()
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for i in range(len(names)):
            n = names[(i + r) % len(names)]
            for _ in range(settle):
                variants[n]()
            times[n].append(time_ms(variants[n]))
    return {n: statistics.median(t) for n, t in times.items()}


def build(name: str, size: int) -> nn.Module:
    """A randomly initialised 1000-class model in eval mode at `size` px."""
    kw = {"num_classes": 1000}
    if "resolution" in zoo.model_args(name):
        kw["resolution"] = size
    m = zoo.create(name, **kw).eval()
    m.spec.input_size = (3, size, size)
    return m


def compress_table(names: list[str], size: int, batches: list[int], repeats: int) -> None:
    """Print fp32 / int8 / pruned / pruned+int8 latencies per model and batch size, with ratios."""
    print(f"\n== fp32 vs int8 (static, eager torch.ao) vs 50% channel-pruned (magnitude, global); {size}px, "
          f"{torch.get_num_threads()} threads, median ms over {repeats} interleaved repeats (fewer at batch>1) ==")
    print("   pruned = prune(..., round_to=8); 'pr1+int8' = the same without rounding (odd channel counts)")
    cols = ["fp32", "int8", "pruned", "pr+int8", "pr1+int8"]
    print(f"{'model':14s} {'batch':>5s} " + " ".join(f"{c:>9s}" for c in cols) + "   ratios to fp32: "
          + " ".join(f"{c:>8s}" for c in cols[1:]) + "   MACs pruned/dense")
    for name in names:
        m = build(name, size)
        cal = [torch.randn(8, 3, size, size) for _ in range(2)]
        p = zc.prune(m, 0.5, "magnitude", "channel", round_to=8)
        p1 = zc.prune(m, 0.5, "magnitude", "channel")
        models = {"fp32": m, "int8": zc.quantize(m, "static", cal, observer="minmax"), "pruned": p,
                  "pr+int8": zc.quantize(p, "static", cal, observer="minmax"),
                  "pr1+int8": zc.quantize(p1, "static", cal, observer="minmax")}
        macs = count_macs(p, (3, size, size)) / count_macs(m, (3, size, size))
        for b in batches:
            x = torch.randn(b, 3, size, size)
            with torch.inference_mode():
                v = {k: (lambda mm=mm: mm(x)) for k, mm in models.items()}
                t = interleaved(v, repeats if b == 1 else max(3, repeats // 3), warmup=2)
            print(f"{name:14s} {b:5d} " + " ".join(f"{t[c]:9.2f}" for c in cols) + "                   "
                  + " ".join(f"{t[c] / t['fp32']:8.2f}" for c in cols[1:]) + f"   {macs:.2f}", flush=True)


RUNTIMES = ("eager", "channels_last", "executorch")  # where the round_to table runs each model (fp32)


def runtime_call(model: nn.Module, x: torch.Tensor, runtime: str, folder: Path) -> Callable[[], object]:
    """A no-argument call of `model` on `x` in fp32: eager NCHW, eager channels_last, or ExecuTorch XNNPACK."""
    if runtime == "eager":
        return lambda: model(x)
    if runtime == "channels_last":
        cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        xc = x.contiguous(memory_format=torch.channels_last)
        return lambda: cl(xc)
    path = folder / f"m{len(list(folder.iterdir()))}.pte"
    path.write_bytes(executorch_program(model, x))
    prog = load_executorch(path)
    return lambda: prog(x)


def round_table(names: list[str], size: int, batches: list[int], repeats: int, scopes: list[str],
                rounds: list[int | None], runtimes: list[str]) -> None:
    """Print dense vs 50% channel-pruned latency per runtime, scope and round_to, all interleaved, with ratios
    to the dense model on the same runtime."""
    print(f"\n== 50% channel pruning (L1 magnitude) with round_to: latency / dense on the same runtime; {size}px, "
          f"{torch.get_num_threads()} threads, median ms over {repeats} interleaved repeats (fewer at batch>1) ==")
    print(f"{'model':14s} {'runtime':13s} {'scope':6s} {'round_to':>8s} {'MACs/dense':>10s} "
          + " ".join(f"{'ms b' + str(b):>9s} {'ratio b' + str(b):>9s}" for b in batches))
    for name in names:
        m = build(name, size)
        dense_macs = count_macs(m, (3, size, size))
        models: dict[str, nn.Module] = {"dense": m}
        for scope in scopes:
            for r in rounds:
                models[f"{scope} {r}"] = zc.prune(m, 0.5, "magnitude", "channel", scope, p=1, round_to=r)
        times = {}
        with tempfile.TemporaryDirectory() as tmp:
            for b in batches:
                x = torch.randn(b, 3, size, size)
                with torch.inference_mode():
                    v = {(rt, k): runtime_call(mm, x, rt, Path(tmp)) for rt in runtimes for k, mm in models.items()}
                    times[b] = interleaved(v, repeats if b == 1 else max(3, repeats // 3), warmup=2)
        for rt in runtimes:
            for k, mm in models.items():
                scope, r = ("-", "-") if k == "dense" else k.split(" ")
                macs = count_macs(mm, (3, size, size)) / dense_macs
                print(f"{name:14s} {rt:13s} {scope:6s} {r:>8s} {macs:10.3f} "
                      + " ".join(f"{times[b][rt, k]:9.2f} {times[b][rt, k] / times[b][rt, 'dense']:9.3f}"
                                 for b in batches), flush=True)


KINDS = ("conv 1x1", "conv dw", "conv other", "bn", "act", "linear")


def _kind(m: nn.Module) -> str | None:
    """The breakdown kind of a leaf layer, or None for layers the table does not time."""
    if isinstance(m, nn.Conv2d):
        return "conv dw" if m.groups > 1 and m.groups == m.in_channels else \
            "conv 1x1" if m.kernel_size == (1, 1) else "conv other"
    kinds = {nn.BatchNorm2d: "bn", nn.ReLU: "act", nn.ReLU6: "act", nn.Hardtanh: "act", nn.Linear: "linear"}
    return kinds.get(type(m))


def kind_times(model: nn.Module, x: torch.Tensor, repeats: int) -> dict[str, float]:
    """Mean ms per forward spent in each layer kind, timed with forward hooks, after two warm-up calls."""
    spent = dict.fromkeys(KINDS, 0.0)
    start: dict[str, float] = {}

    def pre(name: str) -> Callable[..., None]:
        return lambda mod, args: start.__setitem__(name, time.perf_counter())

    def post(name: str, kind: str) -> Callable[..., None]:
        return lambda mod, args, out: spent.__setitem__(kind, spent[kind] + time.perf_counter() - start[name])

    hooks = []
    for name, mod in model.named_modules():
        kind = _kind(mod)
        if kind is not None:
            hooks += [mod.register_forward_pre_hook(pre(name)), mod.register_forward_hook(post(name, kind))]
    try:
        for _ in range(2):
            model(x)
        spent.update(dict.fromkeys(KINDS, 0.0))
        for _ in range(repeats):
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return {k: v * 1e3 / repeats for k, v in spent.items()}


def breakdown_table(names: list[str], size: int, repeats: int, rounds: list[int | None]) -> None:
    """Print per-kind eager time of dense and layer-scope 50%-pruned models at batch 1, NCHW and channels_last."""
    print(f"\n== where the eager time goes: ms per forward by layer kind, batch 1, {size}px, "
          f"{torch.get_num_threads()} threads, mean of {repeats}; pruned rows also as a ratio to dense ==")
    print(f"{'model':14s} {'layout':13s} {'variant':9s} " + " ".join(f"{k:>10s}" for k in KINDS))
    for name in names:
        m = build(name, size)
        models = {"dense": m} | {f"layer {r}": zc.prune(m, 0.5, "magnitude", "channel", "layer", p=1, round_to=r)
                                 for r in rounds}
        for layout in ("eager", "channels_last"):
            fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
            x = torch.randn(1, 3, size, size).contiguous(memory_format=fmt)
            with torch.inference_mode():
                t = {k: kind_times(copy.deepcopy(mm).to(memory_format=fmt), x, repeats) for k, mm in models.items()}
            for k, row in t.items():
                cells = [f"{row[c]:10.2f}" if k == "dense" else
                         f"{row[c]:5.2f} {row[c] / t['dense'][c]:4.2f}" if t["dense"][c] else f"{row[c]:10.2f}"
                         for c in KINDS]
                print(f"{name:14s} {layout:13s} {k:9s} " + " ".join(cells), flush=True)


def pt2e_int8(m: nn.Module, x: torch.Tensor, cal: list[torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
    """torchao PT2E: export, X86InductorQuantizer (per-channel weights), calibrate, convert, compile."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    gm = torch.export.export(m, (x,)).module()
    quantizer = X86InductorQuantizer().set_global(get_default_x86_inductor_quantization_config())
    prepared = prepare_pt2e(gm, quantizer)
    for c in cal:
        prepared(c)
    converted = convert_pt2e(prepared)
    return torch.compile(converted)


def flow_table(names: list[str], size: int, repeats: int) -> None:
    """Print fp32 eager / fp32 compiled / int8 eager (zoo) / int8 PT2E latencies at batch 1."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True  # needed for inductor's int8 weight prepacking (torchao PT2E docs)
    print(f"\n== int8 flow choice at batch 1, {size}px, {torch.get_num_threads()} threads: eager torch.ao "
          f"(zoo) vs torchao PT2E + inductor (freezing on, also for fp32 compile); median ms ==")
    print(f"{'model':14s} {'fp32 eager':>10s} {'fp32 compile':>12s} {'int8 eager':>10s} {'int8 PT2E':>10s}"
          f"  {'compile+PT2E setup s':>20s}")
    for name in names:
        m = build(name, size)
        x = torch.randn(1, 3, size, size)
        cal = [torch.randn(1, 3, size, size) for _ in range(4)]
        q = zc.quantize(m, "static", cal, observer="minmax")
        t0 = time.perf_counter()
        with torch.no_grad():
            comp = torch.compile(m)
            comp(x)
            try:
                pt = pt2e_int8(m, x, cal)
                pt(x)
                err = ""
            except Exception as e:  # report, do not hide: the table says why PT2E has no figure
                pt, err = None, f"{type(e).__name__}: {str(e).splitlines()[0][:80]}"
        setup = time.perf_counter() - t0
        with torch.inference_mode() if pt is None else torch.no_grad():
            v = {"fp32": lambda: m(x), "compile": lambda: comp(x), "int8": lambda: q(x)}
            if pt is not None:
                v["pt2e"] = lambda: pt(x)
            t = interleaved(v, repeats, warmup=3)
        pt_s = f"{t['pt2e']:10.2f}" if "pt2e" in t else f"{'failed':>10s}"
        print(f"{name:14s} {t['fp32']:10.2f} {t['compile']:12.2f} {t['int8']:10.2f} {pt_s}  {setup:20.1f}"
              + (f"  ({err})" if err else ""), flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run both tables with the command-line options."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["mobilenet_v2", "resnet18"])
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--no-pt2e", action="store_true", help="skip the eager-vs-PT2E int8 flow table")
    ap.add_argument("--tables", nargs="+", default=["compress", "round", "flow"],
                    choices=["compress", "round", "breakdown", "flow"],
                    help="which tables to print (default compress, round, flow; --no-pt2e drops 'flow')")
    ap.add_argument("--scopes", nargs="+", default=["global", "layer"], choices=["global", "layer"],
                    help="pruning scopes of the round_to table")
    ap.add_argument("--round-to", nargs="+", default=["none", "8", "16"],
                    help="round_to values of the round_to table ('none': no rounding)")
    ap.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=RUNTIMES,
                    help="fp32 runtimes of the round_to table (default all: eager NCHW, eager channels_last, "
                         "ExecuTorch XNNPACK)")
    add_allocator_option(ap)
    args = ap.parse_args(argv)
    rounds = [None if r.lower() == "none" else int(r) for r in args.round_to]
    if args.threads:
        torch.set_num_threads(args.threads)
        set_threads(args.threads)
    warnings.filterwarnings("ignore")
    heap = set_allocator(args.allocator)
    print(f"torch {torch.__version__}, quantized engines {torch.backends.quantized.supported_engines}, "
          f"{os.cpu_count()} CPUs, 1-minute load average {os.getloadavg()[0]:.2f}, "
          f"malloc thresholds {heap}")
    if "compress" in args.tables:
        compress_table(args.models, args.size, args.batches, args.repeats)
    if "round" in args.tables:
        round_table(args.models, args.size, args.batches, args.repeats, args.scopes, rounds, args.runtimes)
    if "breakdown" in args.tables:
        breakdown_table(args.models, args.size, args.repeats, rounds)
    if "flow" in args.tables and not args.no_pt2e:
        flow_table(args.models, args.size, args.repeats)
    if "flow" in args.tables and not args.no_pt2e:
        print("\nzoo.compress.quantize uses the eager torch.ao flow: compare 'int8 eager' with 'int8 PT2E' above.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
