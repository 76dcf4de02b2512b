"""Fast CPU training chosen by measurement: bf16 autocast (Kalamkar et al. 2019, "A Study of BFLOAT16 for
Deep Learning Training") with fp32 master weights, and the NHWC (channels_last) memory format.

Neither is a win everywhere. bf16 needs native instructions (AVX512-BF16 or AMX) to be fast, and even then a
model made of small grouped convolutions and channel shuffles (ShuffleNet v2) can train slower in bf16 than
in fp32; channels_last helps convolutions but costs a copy around every reshape. So `TrainConfig.precision
= "auto"` and `channels_last = "auto"` time a few real training steps of the model at hand in each variant
(`probe`) and keep the fastest, and an explicit `precision="bf16"` on a CPU without native bf16 falls back
to fp32 with one line saying so. `resolve` returns the choice with its reason, which every results row
records.

Depends on zoo.errors only; zoo.train_loop calls `resolve` once per run (a resumed run keeps its choice).
"""

from __future__ import annotations

import copy
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ZooError

PRECISIONS = ("fp32", "bf16", "auto")
PROBE_STEPS = 2  # timed steps per variant and round, after one warm-up step
PROBE_ROUNDS = 3  # interleaved rounds over the variants; the median step of each variant counts
AUTO_MARGIN = 1.05  # `auto` leaves the default (fp32, NCHW) only for a variant at least 5% faster


def cpu_flags() -> set[str]:
    """The CPU feature flags of /proc/cpuinfo (empty where it cannot be read, e.g. not Linux)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether bf16 matrix math runs natively: AVX512-BF16 or AMX on x86 CPUs, bf16 support on CUDA."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


@dataclass(frozen=True)
class SpeedChoice:
    """How a run trains: autocast dtype, memory format, and why they were chosen."""

    precision: str  # "fp32" or "bf16" (autocast, fp32 master weights)
    channels_last: bool  # NHWC model and inputs
    reason: str  # one sentence: explicit, fallback, or the probe's images/s

    @property
    def memory_format(self) -> str:
        """'channels_last' or 'contiguous', as results rows record it."""
        return "channels_last" if self.channels_last else "contiguous"

    def to_dict(self) -> dict[str, object]:
        """JSON-ready fields (stored in the resume state, so a resumed run trains as it started)."""
        return asdict(self)


def autocast(precision: str, device: torch.device) -> torch.autocast:
    """The autocast context of one training step: bf16 on CPU or CUDA when asked, else disabled."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def _step_times(model: nn.Module, x: torch.Tensor, y: torch.Tensor, precision: str, steps: int,
                warmup: bool) -> list[float]:
    """Seconds of each of `steps` SGD forward-backward-steps of `model` (a throwaway copy) on (x, y), after one
    untimed step when `warmup` (the first step pays kernel selection and allocation)."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    times = []
    for i in range(steps + int(warmup)):
        t0 = time.perf_counter()
        with autocast(precision, x.device):
            loss = F.cross_entropy(model(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if i or not warmup:
            times.append(time.perf_counter() - t0)
    return times


def probe(model: nn.Module, example: torch.Tensor, precisions: tuple[str, ...], formats: tuple[bool, ...],
          steps: int = PROBE_STEPS, rounds: int = PROBE_ROUNDS) -> dict[tuple[str, bool], float]:
    """Training images/s of each (precision, channels_last) variant, timed on copies of `model` with a batch
    shaped like `example`: `rounds` interleaved passes over the variants, `steps` timed steps each, the median
    step of every variant (a busy spell of the machine hits all variants alike). The model and the global RNG
    are left as they were."""
    if not isinstance(model, nn.Module):
        raise ZooError(f"probe: model must be a torch nn.Module, got {type(model).__name__}")
    if not isinstance(example, torch.Tensor) or example.dim() < 2:
        raise ZooError(f"probe: example must be a batch tensor (N, ...), got {getattr(example, 'shape', example)!r}")
    rng = torch.get_rng_state()
    try:
        x = torch.randn(example.shape, device=example.device)
        with torch.no_grad():
            num_classes = copy.deepcopy(model).eval()(x[:1]).shape[1]
        y = torch.randint(0, num_classes, (example.shape[0],), device=example.device)
        variants = [(p, cl) for cl in formats for p in precisions]
        copies = {}
        for p, cl in variants:
            fmt = torch.channels_last if cl and x.dim() == 4 else torch.contiguous_format
            copies[(p, cl)] = (copy.deepcopy(model).to(memory_format=fmt), x.contiguous(memory_format=fmt))
        times: dict[tuple[str, bool], list[float]] = {v: [] for v in variants}
        for r in range(rounds):
            for v in variants:
                m, xv = copies[v]
                times[v] += _step_times(m, xv, y, v[0], steps, warmup=r == 0)
        return {v: example.shape[0] / sorted(t)[len(t) // 2] for v, t in times.items()}
    finally:
        torch.set_rng_state(rng)


def resolve(precision: str, channels_last: bool | str, model: nn.Module, example: torch.Tensor | None,
            log: Callable[[str], None] | None = None, device: torch.device | str = "cpu") -> SpeedChoice:
    """The (precision, memory format) a run trains with: explicit values are kept (bf16 without native
    support falls back to fp32 with a message), "auto" ones are chosen by `probe` on a batch like `example`
    (None: no batch to probe with, so "auto" keeps fp32 NCHW)."""
    if precision not in PRECISIONS:
        raise ZooError(f"precision={precision!r} is not allowed; expected one of {', '.join(PRECISIONS)}")
    if not (isinstance(channels_last, bool) or channels_last == "auto"):
        raise ZooError(f"channels_last={channels_last!r} is not allowed; expected True, False or 'auto'")
    log = log or (lambda s: print(s, file=sys.stderr, flush=True))
    device = torch.device(device) if example is None else example.device
    native = native_bf16(device)
    notes = []
    if precision == "bf16" and not native:
        log(f"precision bf16: this {'GPU' if device.type == 'cuda' else 'CPU'} has no native bf16 "
            "(AVX512-BF16 or AMX); training in fp32 instead")
        precision, notes = "fp32", ["bf16 asked, no native bf16: fp32"]
    if example is None and "auto" in (precision, channels_last):
        notes.append("auto: no training batch to probe with, fp32 NCHW")
        precision, channels_last = ("fp32" if precision == "auto" else precision), channels_last is True
    precs = ("fp32", "bf16") if precision == "auto" and native else ("fp32",) if precision == "auto" else (precision,)
    if precision == "auto" and len(precs) == 1:
        notes.append("auto: no native bf16, fp32")
    fmts = (False, True) if channels_last == "auto" and example.dim() == 4 else (channels_last is True,)
    if len(precs) * len(fmts) == 1:
        notes = notes or ["as configured"]
        return SpeedChoice(precs[0], fmts[0], "; ".join(notes))
    ips = probe(model, example, precs, fmts)
    base = ips.get(("fp32", False), ips.get((precs[0], fmts[0])))
    best = max(ips, key=ips.get)
    if ips[best] < AUTO_MARGIN * base:  # not clearly faster: keep the default variant
        best = ("fp32", False) if ("fp32", False) in ips else (precs[0], fmts[0])
    measured = ", ".join(f"{p}{' NHWC' if cl else ''} {v:.0f}" for (p, cl), v in sorted(ips.items()))
    notes.append(f"probe (images/s: {measured})")
    return SpeedChoice(best[0], best[1], "; ".join(notes))
