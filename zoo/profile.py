"""Model profiler: parameters, multiply-accumulates, fvcore FLOPs, storage size, sparsity and latency.

Conventions (those of the MobileNet / ShuffleNet / ResNet papers):

* `macs` counts only the multiply-accumulates of convolutions and fully connected layers, per sample
  (batch 1): a conv costs out_elements * (in_channels / groups) * kh * kw, so depthwise and grouped
  convs are counted correctly; a linear layer costs out_features * in_features per output row.
  Biases, batch norm, activations, pooling and additions are not counted. int8-converted modules
  (torch.ao.nn.quantized Conv2d / ConvReLU2d / Linear / LinearReLU and quantized.dynamic.Linear) are
  counted from their weight shapes, exactly like their float originals. A model with no conv/linear
  modules at all (a torch.export / PT2E int8 graph calls them as functions) is counted from its
  aten convolution and matrix-multiply ops under torch.utils.flop_counter (2 flops per MAC), which
  gives the same numbers as the module count of its float original.
* `flops_fvcore` is fvcore's `FlopCountAnalysis` total. fvcore counts one fused multiply-add as ONE
  flop, so for these CNNs it is close to `macs`; it also counts a few extra ops (batch norm as two
  flops per element, adaptive average pooling), so it is slightly larger. It is None, with the reason
  in `notes`, when fvcore cannot trace the model or does not know its ops (e.g. int8-converted ones).
* `params` counts every parameter once (shared ones once), plus the packed weights and biases of
  int8-converted conv/linear modules, which are not nn.Parameters.
* `sparse_size_bytes` is `size_bytes` with every conv/linear weight re-stored, where that is smaller,
  in a simple sparse format: a bitmask with one bit per element (ceil(numel / 8) bytes) followed by
  the nonzero values at the weight's element size.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn as nn
import torch.ao.nn.quantized as nnq
from torch.utils.flop_counter import FlopCounterMode

from zoo.errors import ZooError
from zoo.spec import input_size as input_size_of, model_name
from zoo.weights.checkpoint import serialized_size

_CONV = (nn.modules.conv._ConvNd, nnq.Conv1d, nnq.Conv2d, nnq.Conv3d)
_LINEAR = (nn.Linear, nnq.Linear)  # nnq.LinearReLU and nnq.dynamic.Linear subclass nnq.Linear


@dataclass
class LayerStat:
    """One row of the per-layer table: a conv/linear module or another leaf module with parameters."""

    name: str
    type: str
    output_shape: tuple[int, ...] | None  # without the batch dimension; None if never called
    params: int
    macs: int


@dataclass
class Profile:
    """Counts for one model at one input size; `table()` renders them, `summary()` returns a dict."""

    params: int
    macs: int
    flops_fvcore: int | None
    size_bytes: int | None
    nonzero_params: int
    sparsity: float
    sparse_size_bytes: int | None
    latency_ms: float | None
    input_size: tuple[int, int, int]
    batch_size: int = 1
    layers: list[LayerStat] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    name: str = ""

    def summary(self) -> dict[str, Any]:
        """The totals as a JSON-able dict (no per-layer rows)."""
        d = asdict(self)
        d.pop("layers")
        d["input_size"] = list(self.input_size)
        return d

    def table(self) -> str:
        """The per-layer table (conv/linear and other leaves with parameters) followed by the totals."""
        rows = [("layer", "type", "output", "params", "MACs")]
        for r in self.layers:
            shape = "-" if r.output_shape is None else "x".join(str(s) for s in r.output_shape)
            rows.append((r.name or "(root)", r.type, shape, f"{r.params:,}", f"{r.macs:,}"))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        lines = []
        for i, row in enumerate(rows):
            cells = [row[j].ljust(widths[j]) if j < 3 else row[j].rjust(widths[j]) for j in range(5)]
            lines.append("  ".join(cells).rstrip())
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines.append("")
        lines.extend(self._totals())
        return "\n".join(lines)

    def _totals(self) -> list[str]:
        c, h, w = self.input_size
        out = [f"model:            {self.name or '-'}", f"input size:       {c}x{h}x{w}",
               f"params:           {self.params:,}",
               f"MACs:             {self.macs:,} ({self.macs / 1e6:.2f} M, conv + linear, per sample)"]
        if self.flops_fvcore is None:
            out.append("fvcore flops:     n/a")
        else:
            out.append(f"fvcore flops:     {self.flops_fvcore:,} ({self.flops_fvcore / 1e6:.2f} M, 1 FMA = 1 flop)")
        out.append(f"size:             {_fmt_bytes(self.size_bytes)} (safetensors)")
        out.append(f"nonzero params:   {self.nonzero_params:,} (sparsity {100 * self.sparsity:.2f}% of conv/linear weights)")
        out.append(f"sparse size:      {_fmt_bytes(self.sparse_size_bytes)} (bitmask + nonzeros where smaller)")
        if self.latency_ms is not None:
            out.append(f"latency:          {self.latency_ms:.3f} ms (median, batch {self.batch_size}, "
                       f"{torch.get_num_threads()} threads)")
        out.extend(f"note:             {n}" for n in self.notes)
        return out


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    return f"{n:,} bytes ({n / 2**20:.2f} MiB)"


def _weight_of(m: nn.Module) -> torch.Tensor | None:
    """The effective (float) weight of a conv/linear module, float or int8-converted, or None."""
    if isinstance(m, (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.Linear)):
        w = m.weight()
        return w.dequantize() if w.is_quantized else w
    w = getattr(m, "weight", None)
    return w if isinstance(w, torch.Tensor) else None


def _quantized_bias(m: nn.Module) -> torch.Tensor | None:
    b = m.bias() if callable(getattr(m, "bias", None)) else None
    return b if isinstance(b, torch.Tensor) else None


def _is_quantized(m: nn.Module) -> bool:
    return isinstance(m, (nnq.Conv1d, nnq.Conv2d, nnq.Conv3d, nnq.Linear))


def _own_params(m: nn.Module) -> int:
    n = sum(p.numel() for p in m.parameters(recurse=False))
    if _is_quantized(m):
        n += _weight_of(m).numel()
        b = _quantized_bias(m)
        n += 0 if b is None else b.numel()
    return n


def count_params(model: nn.Module) -> int:
    """All parameters (shared ones once) plus the packed weights/biases of int8 conv/linear modules."""
    n = sum(p.numel() for p in model.parameters())
    for m in model.modules():
        if _is_quantized(m):
            n += _own_params(m)
    return n


def _module_macs(m: nn.Module, out: torch.Tensor) -> int:
    """MACs of one call of a conv/linear module that produced `out` (per sample)."""
    if not isinstance(out, torch.Tensor) or out.dim() == 0:
        return 0
    per_sample = out.numel() // max(out.shape[0], 1)
    if isinstance(m, _CONV):
        k = math.prod(m.kernel_size) if isinstance(m.kernel_size, tuple) else m.kernel_size
        return per_sample * (m.in_channels // m.groups) * k
    return per_sample * m.in_features  # linear: out_features * in_features per output row


def _device(model: nn.Module) -> torch.device:
    for t in list(model.parameters()) + list(model.buffers()):
        return t.device
    return torch.device("cpu")


class _Mode:
    """Context manager: eval mode during counting, then every module's own training flag restored."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> nn.Module:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        return self.model

    def __exit__(self, *exc: Any) -> None:
        for m, flag in self.flags:
            m.training = flag


def layer_stats(model: nn.Module, input_size: Sequence[int]) -> list[LayerStat]:
    """Per-layer rows (execution order) from one batch-1 forward with temporary hooks."""
    counted = [(n, m) for n, m in model.named_modules()
               if isinstance(m, _CONV + _LINEAR) or (not any(True for _ in m.children()) and _own_params(m))]
    stats: dict[int, LayerStat] = {}
    order: list[int] = []
    handles = []

    def hook(name: str, m: nn.Module):
        def fn(mod: nn.Module, inp: Any, out: Any) -> None:
            if id(mod) not in stats:
                stats[id(mod)] = LayerStat(name, mod._get_name(), None, _own_params(mod), 0)
                order.append(id(mod))
            row = stats[id(mod)]
            if isinstance(out, torch.Tensor):
                row.output_shape = tuple(out.shape[1:])
                if isinstance(mod, _CONV + _LINEAR):
                    row.macs += _module_macs(mod, out)
        return fn

    x = torch.zeros(1, *input_size, device=_device(model))
    try:
        for name, m in counted:
            handles.append(m.register_forward_hook(hook(name, m)))
        with _Mode(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    rows = [stats[i] for i in order]
    for name, m in counted:  # leaves with parameters that the forward never called
        if id(m) not in stats:
            rows.append(LayerStat(name, m._get_name(), None, _own_params(m), 0))
    return rows


def _functional_macs(model: nn.Module, input_size: Sequence[int]) -> int:
    """Conv + matmul MACs of one batch-1 forward, counted on aten ops (for graphs without conv/linear modules)."""
    counter = FlopCounterMode(display=False)
    with _Mode(model), torch.no_grad(), counter:
        model(torch.zeros(1, *input_size, device=_device(model)))
    return counter.get_total_flops() // 2


def _macs(model: nn.Module, rows: list[LayerStat], input_size: Sequence[int]) -> int:
    if any(isinstance(m, _CONV + _LINEAR) for m in model.modules()):
        return sum(r.macs for r in rows)
    return _functional_macs(model, input_size)


def count_macs(model: nn.Module, input_size: Sequence[int] | None = None) -> int:
    """Conv + linear multiply-accumulates per sample (hooks, or aten ops for graphs; no fvcore)."""
    size = input_size_of(model, input_size, what="input_size")
    return _macs(model, layer_stats(model, size), size)


def _fvcore_flops(model: nn.Module, input_size: Sequence[int]) -> tuple[int | None, str | None]:
    try:
        with warnings.catch_warnings():  # fvcore's import calls the deprecated torch.jit.script
            warnings.simplefilter("ignore")
            from fvcore.nn import FlopCountAnalysis
    except ImportError as e:  # pragma: no cover - fvcore is a declared dependency
        return None, f"fvcore unavailable: {e}"
    x = torch.zeros(1, *input_size, device=_device(model))
    logger = logging.getLogger("fvcore")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with _Mode(model), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            fca = FlopCountAnalysis(model, x)
            fca.unsupported_ops_warnings(False).uncalled_modules_warnings(False).tracer_warnings("none")
            total = int(fca.total())
            skipped = [op for op in fca.unsupported_ops() if op.startswith("quantized::")]
    except Exception as e:  # fvcore traces with torch.jit; some (e.g. int8) models cannot be traced
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return None, f"fvcore could not trace the model ({type(e).__name__}: {msg[:160]})"
    finally:
        logger.setLevel(level)
    if skipped:
        return None, "fvcore does not count int8 ops (" + ", ".join(sorted(skipped)) + ")"
    return total, None


def _sparsity(model: nn.Module) -> tuple[int, float, int]:
    """(nonzero params, zero fraction of conv/linear weights, bytes saved by sparse weight storage)."""
    weighted = [m for m in model.modules() if isinstance(m, _CONV + _LINEAR)]
    skip = set()
    for m in weighted:  # their weights are counted through the effective weight (handles pruning masks)
        for pname in ("weight", "weight_orig"):
            p = m._parameters.get(pname)
            if p is not None:
                skip.add(id(p))
        pz = getattr(m, "parametrizations", None)  # torch parametrizations (zoo.compress masks, quantizers)
        if pz is not None and "weight" in pz:
            skip.add(id(pz["weight"].original))
    nonzero, seen = 0, set()
    for p in model.parameters():
        if id(p) not in skip and id(p) not in seen:
            seen.add(id(p))
            nonzero += int(torch.count_nonzero(p))
    zeros = total = saved = 0
    done = set()
    for m in weighted:
        w = _weight_of(m)
        if w is None or id(m) in done:
            continue
        done.add(id(m))
        nz = int(torch.count_nonzero(w))
        nonzero += nz
        if _is_quantized(m):
            b = _quantized_bias(m)
            nonzero += 0 if b is None else int(torch.count_nonzero(b))
        zeros += w.numel() - nz
        total += w.numel()
        elem = 1 if _is_quantized(m) else w.element_size()
        dense = w.numel() * elem
        sparse = (w.numel() + 7) // 8 + nz * elem
        saved += max(0, dense - sparse)
    return nonzero, (zeros / total if total else 0.0), saved


def measure_latency(model: nn.Module | Callable[[torch.Tensor], Any], input_size: Sequence[int],
                    batch_size: int = 1, warmup: int = 3, repeats: int = 20) -> float:
    """Median forward time in ms of a batch (eval, no_grad), after warm-up runs; `model` may also be a
    runtime's tensor -> tensor callable (an ExecuTorch program, a compiled graph)."""
    module = model if isinstance(model, nn.Module) else nn.Module()  # _Mode / _device need a module
    x = torch.randn(batch_size, *input_size, device=_device(module))
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    times = []
    with _Mode(module), torch.no_grad():
        for i in range(warmup + repeats):
            sync()
            t0 = time.perf_counter()
            model(x)
            sync()
            if i >= warmup:
                times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def profile(model: nn.Module, input_size: Sequence[int] | int | None = None, latency: bool = False,
            batch_size: int = 1, *, flops: bool = True) -> Profile:
    """Profile a model: params, MACs, fvcore flops, size, sparsity, per-layer table, optional latency."""
    if not isinstance(model, nn.Module):
        raise ZooError(f"profile: expected an nn.Module, got {type(model).__name__}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ZooError(f"profile: batch_size={batch_size!r} is not allowed; expected int >= 1")
    size = input_size_of(model, input_size, what="profile: input_size")
    notes: list[str] = []
    rows = layer_stats(model, size)
    flops_fv = None
    if flops:
        flops_fv, note = _fvcore_flops(model, size)
        if note:
            notes.append(note)
    try:
        size_bytes: int | None = serialized_size(model)
    except Exception as e:  # e.g. a storage format the serialiser does not handle yet
        size_bytes = None
        notes.append(f"size unavailable ({type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''})")
    nonzero, sparsity, saved = _sparsity(model)
    lat = measure_latency(model, size, batch_size) if latency else None
    return Profile(
        params=count_params(model), macs=_macs(model, rows, size), flops_fvcore=flops_fv,
        size_bytes=size_bytes, nonzero_params=nonzero, sparsity=sparsity,
        sparse_size_bytes=None if size_bytes is None else size_bytes - saved, latency_ms=lat,
        input_size=size, batch_size=batch_size, layers=rows, notes=notes,
        name=model_name(model),
    )
