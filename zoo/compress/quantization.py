"""Quantization API: int8 (dynamic, static post-training, QAT) and weight-only binary/ternary/k-bit.

int8 uses PyTorch's eager torch.ao flow (Jacob et al. 2018, "Quantization and Training of Neural
Networks for Efficient Integer-Arithmetic-Only Inference") on the x86 engine (fbgemm for models with
grouped convs): the zoo blocks are written for it (QuantStub/DeQuantStub, FloatFunctional adds and
concats). ConvNormAct is fused as conv+bn+relu. torch.ao has no fused ReLU6, so a ConvNormAct ending in
ReLU6 (MobileNet v2, TFLite-imported v1) is fused as conv+bn+relu whose output grid is fixed at [0, 6]
(scale 6/255, zero point 0), as TFLite does: saturation clips at 6. Quantizing the conv output before a
standalone ReLU6 instead spent most of the 256 levels on negative values and on the range above 6, and
cost 2.2 points on the CIFAR MobileNet v2 0.5 (recipes/cifar10_quant_mbv2.md). Weights are per-channel
symmetric int8; activations use histogram (or min/max) observers, 8-bit on CPUs with VNNI and 7-bit
elsewhere (fbgemm's overflow workaround).

Backends: 'auto' / 'x86' / 'fbgemm' are the eager torch.ao engines above; 'x86_pt2e' and 'xnnpack'
run torchao's PT2E flow (zoo.compress.pt2e: X86InductorQuantizer / ExecuTorch's XNNPACKQuantizer),
whose result is a torch.fx graph, stored and reloaded exactly by zoo.compress.save / load too.
Why 'auto' stays eager (measured by benchmarks/bench_int8.py, batch 1, 224 px, 2 threads; benchmarks/int8.md):
it is the only int8 model that is fast as an ordinary module in Python. On ResNet-18 it is the fastest
of every runtime (2026-12-07 05:15 UTC: 3.6 ms; PT2E + inductor 3.7, ONNX Runtime 5.2, ExecuTorch 5.3; 76.7 vs
90.3 ms at batch 32 on 2026-11-29); its input is quantized in channels-last order (ChannelsLastQuantize).
On MobileNet v1/v2 and SqueezeNet an x86_pt2e graph is no faster in-process (3.7 vs 3.5, 4.9 vs 5.0,
3.5 vs 3.2 ms), and only after compile_x86 (torch.compile with inductor freezing, a compile per loaded
model); xnnpack is fast only inside ExecuTorch (zoo.export.to_executorch). On ShuffleNet v1/v2 eager int8
is no faster than fp32 (15.8 vs 15.8 ms; 16.0 vs 12.4 ms): deploy those, and the others, through the
runtime `zoo.deploy.recommended_int8(model)` names for each family (ExecuTorch for ShuffleNet v2,
MobileNet v1/v2 and SqueezeNet; ONNX Runtime for ShuffleNet v1; eager for ResNet).
The eager torch.ao flow is deprecated upstream: its warnings are silenced in `_common.quiet` (the one
place zoo calls it through), and removing it means deleting the eager branch of `quantize`/`rebuild`.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.ao.nn.quantized as nnq
import torch.ao.quantization as tq
import torch.nn as nn
from torch.nn.utils import parametrize

from zoo.compress._common import (add_step, batches, check_choice, check_model, copy_model, device_of,
                                  eval_mode, example_input, get_module, has_parametrizations, is_quantized_model,
                                  quiet, resolve_protect, set_steps, steps,
                                  weight_layers)
from zoo.compress import pt2e
from zoo.compress.pruning import make_permanent, masked_layers
from zoo.compress.weightquant import BinaryWeight, KBitWeight, TernaryWeight, WEIGHT_QUANTIZERS
from zoo.errors import ZooError
from zoo.layers import ConvNormAct

METHODS = ("dynamic", "static", "qat", "binary", "ternary", "weights_kbit")
BACKENDS = ("auto", "x86", "fbgemm") + pt2e.PT2E_BACKENDS  # eager torch.ao engines, then torchao PT2E
OBSERVERS = ("histogram", "minmax")


def _has_grouped_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) and 1 < m.groups < m.in_channels for m in model.modules())


def resolve_backend(model: nn.Module, backend: str) -> str:
    """'auto' -> 'x86', except 'fbgemm' for models with grouped (non-depthwise) convs: the x86 engine
    hands some grouped shapes to oneDNN, whose weight prepacking fails on them (e.g. 480->240, g=3)."""
    if backend != "auto":
        return backend
    return "fbgemm" if _has_grouped_conv(model) else "x86"


def _engine(backend: str) -> None:
    if backend not in torch.backends.quantized.supported_engines:
        raise ZooError(f"quantize: backend={backend!r} is not supported by this torch build; available: "
                       + ", ".join(torch.backends.quantized.supported_engines))
    torch.backends.quantized.engine = backend


def _conv_name(block: ConvNormAct) -> str:
    """The block's conv to fuse (before fusion): 'conv', or the last conv of a low-rank factorised pair."""
    return f"conv.{len(block.conv) - 1}" if isinstance(block.conv, nn.Sequential) else "conv"


def fuse_list(model: nn.Module) -> list[list[str]]:
    """Module-path lists to fuse: ConvNormAct as [conv, bn, relu] / [conv, bn] / [conv, relu], and
    [conv|linear, (bn), relu] runs inside nn.Sequential containers."""
    out: list[list[str]] = []
    for path, m in model.named_modules():
        p = f"{path}." if path else ""
        if isinstance(m, ConvNormAct):
            conv = _conv_name(m)
            has_bn = isinstance(m.bn, nn.BatchNorm2d)
            relu = type(m.act) is nn.ReLU
            names = [conv] + (["bn"] if has_bn else []) + (["act"] if relu else [])
            if len(names) > 1:
                out.append([p + n for n in names])
        elif isinstance(m, nn.Sequential):
            kids = list(m.named_children())
            i = 0
            while i < len(kids):
                n0, m0 = kids[i]
                if isinstance(m0, (nn.Conv2d, nn.Linear)):
                    names = [n0]
                    j = i + 1
                    if isinstance(m0, nn.Conv2d) and j < len(kids) and isinstance(kids[j][1], nn.BatchNorm2d):
                        names.append(kids[j][0])
                        j += 1
                    if j < len(kids) and type(kids[j][1]) is nn.ReLU:
                        names.append(kids[j][0])
                        j += 1
                    if len(names) > 1:
                        out.append([p + n for n in names])
                    i = j
                else:
                    i += 1
    return out


def reduce_range() -> bool:
    """Whether activations must use 7 bits: fbgemm's AVX2 kernels can saturate int16 intermediate sums
    with full 8-bit activations; CPUs with VNNI accumulate in int32, so they keep all 8 bits."""
    try:
        return not bool(torch.cpu._is_vnni_supported())
    except AttributeError:  # pragma: no cover - older torch: stay on the safe side
        return True


def _qconfig(backend: str, observer: str, qat: bool = False) -> tq.QConfig:
    """Per-channel symmetric int8 weights (the backend default) and histogram (default) or min/max
    activation observers, with 8-bit activations where the CPU allows (see reduce_range)."""
    rr = reduce_range()
    if qat:
        base = tq.get_default_qat_qconfig(backend)
        act = tq.FakeQuantize.with_args(observer=tq.MovingAverageMinMaxObserver, quant_min=0,
                                        quant_max=127 if rr else 255, dtype=torch.quint8, reduce_range=False)
        return tq.QConfig(activation=act, weight=base.weight)
    base = tq.get_default_qconfig(backend)
    obs = tq.HistogramObserver if observer == "histogram" else tq.MinMaxObserver
    return tq.QConfig(activation=obs.with_args(reduce_range=rr), weight=base.weight)


def _relu6_qconfig(backend: str, qat: bool) -> tq.QConfig:
    """The backend's weights, and an output grid fixed at [0, 6]: TFLite's fused ReLU6."""
    qmax = 127 if reduce_range() else 255
    obs = tq.FixedQParamsObserver.with_args(scale=6.0 / qmax, zero_point=0, dtype=torch.quint8, quant_min=0,
                                            quant_max=qmax)
    act = tq.FixedQParamsFakeQuantize.with_args(observer=obs) if qat else obs
    return tq.QConfig(activation=act, weight=_qconfig(backend, "minmax", qat).weight)


def _prepare_static(model: nn.Module, backend: str, qat: bool, observer: str = "histogram",
                    fuse_relu6: bool = True) -> nn.Module:
    """Fuse, attach qconfigs and observers (or fake-quant modules for QAT), in place. With fuse_relu6, a
    ConvNormAct ending in ReLU6 is fused as conv+bn+relu with a [0, 6] output grid (see the module doc);
    without it (steps saved before that existed), ReLU6 stays a standalone quantized op."""
    relu6 = [(m, _conv_name(m)) for m in model.modules()
             if fuse_relu6 and isinstance(m, ConvNormAct) and type(m.act) is nn.ReLU6]
    for block, _ in relu6:
        block.act = nn.ReLU()  # fusable; the fixed grid (and, before convert, the ReLU6 put back) clips at 6
    fl = fuse_list(model)
    with quiet():
        if qat:
            model.train()
            if fl:
                tq.fuse_modules_qat(model, fl, inplace=True)
            model.qconfig = _qconfig(backend, "minmax", qat=True)
        else:
            model.eval()
            if fl:
                tq.fuse_modules(model, fl, inplace=True)
            model.qconfig = _qconfig(backend, observer)
        for block, conv in relu6:
            fused = get_module(block, conv)  # the fused conv+relu now sits where the conv was
            fused.qconfig = _relu6_qconfig(backend, qat)
            if not qat:  # calibrate through the real ReLU6 (convert reads only the conv of a fused pair)
                fused[-1] = nn.ReLU6()
        (tq.prepare_qat if qat else tq.prepare)(model, inplace=True)
    return model


class ChannelsLastQuantize(nnq.Quantize):
    """The input Quantize of an eager int8 model, handing its convs an NHWC (channels-last) image.

    The x86 / fbgemm int8 convs compute in NHWC and return channels-last tensors; given an NCHW input the
    first conv converts it itself, which cost ResNet-18 about 5 % of its int8 time (224 px, batch 1, 2
    threads: 2.88 vs 2.73 ms; outputs identical). Same state (scale, zero_point) as nnq.Quantize.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Quantize `x`, 4-d inputs in channels-last memory order."""
        if x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return super().forward(x)


def _convert(model: nn.Module) -> nn.Module:
    model.eval()
    with quiet():
        try:
            tq.convert(model, inplace=True)
        except RuntimeError as e:
            if "primitive" not in str(e):
                raise
            raise ZooError(f"quantize: the {torch.backends.quantized.engine!r} engine cannot pack one of this "
                           "model's grouped convs (oneDNN limitation); use backend='fbgemm' or 'auto'") from None
    q = getattr(model, "quant", None)
    if type(q) is nnq.Quantize:
        model.quant = ChannelsLastQuantize(float(q.scale), int(q.zero_point), q.dtype)
    return model


def _prime(model: nn.Module) -> None:
    """One forward on zeros so every observer has seen data (used when rebuilding from a spec)."""
    x = example_input(model, None, "quantize")
    with quiet(), eval_mode(model), torch.no_grad():
        model(x)


def quantize(model: nn.Module, method: str, calibration: Any = None, *, backend: str = "auto",
             bits: int | None = None, protect: Sequence[str] = ("first", "last"), observer: str = "histogram",
             max_batches: int | None = None, inplace: bool = False) -> nn.Module:
    """Quantize a model; returns a copy (unless inplace=True) with its spec step recorded.

    method:
      'dynamic'       int8 Linear weights, activations quantized at run time.
      'static'        int8 post-training: `calibration` is an iterable of input batches or (input,
                      target) pairs, e.g. a DataLoader (the first `max_batches` are used); `observer`
                      'histogram' (default, most accurate) or 'minmax' (faster) for the activations.
      'qat'           returns the fake-quant model in train mode to fine-tune (optional calibration
                      batches initialise its ranges); finish with `convert`.
      'binary', 'ternary'  STE-trainable weights, `protect`ed layers (default first and last) float.
      'weights_kbit'  `bits` in 2..8, per-channel weight-only rounding (STE-trainable too).
    backend: 'auto' (x86, or fbgemm when the model has grouped convs), 'x86' or 'fbgemm' (eager torch.ao);
      'x86_pt2e' or 'xnnpack' (torchao PT2E, a torch.fx graph; see zoo.compress.pt2e; 'dynamic' = Linear only).
    """
    check_model("quantize", model)
    check_choice("quantize", "method", method, METHODS)
    check_choice("quantize", "backend", backend, BACKENDS)
    check_choice("quantize", "observer", observer, OBSERVERS)
    if is_quantized_model(model) or any(s.get("kind") in ("int8", "weightquant") for s in steps(model)):
        raise ZooError("quantize: the model is already quantized; quantize the float model instead")
    if any(s.get("kind") == "actgrid" for s in steps(model)):
        raise ZooError("quantize: the model rounds its activations to fixed grids (fix_activation_grids, e.g. a "
                       "TFLite import with activations='uint8'); quantize the float import instead")
    if method == "weights_kbit":
        if isinstance(bits, bool) or not isinstance(bits, int) or not 2 <= bits <= 8:
            raise ZooError(f"quantize: bits={bits!r} is not allowed for method='weights_kbit'; expected an int in 2..8")
    elif bits is not None:
        raise ZooError(f"quantize: bits={bits!r} is only used by method='weights_kbit'")
    if method == "static" and calibration is None:
        raise ZooError("quantize: method='static' needs calibration data (an iterable of input batches or "
                       "(input, target) pairs, e.g. a DataLoader)")
    if calibration is not None and method not in ("static", "qat"):
        raise ZooError(f"quantize: method={method!r} takes no calibration data (only 'static' and 'qat' do)")
    cal = None if calibration is None else batches(calibration, "quantize", need_target=False,
                                                    max_batches=max_batches)
    if any(isinstance(p, WEIGHT_QUANTIZERS) for _, m in _param_modules(model) for p in m.parametrizations.weight):
        raise ZooError("quantize: the model already has weight quantizers")
    model = copy_model(model, inplace)
    if masked_layers(model):
        make_permanent(model)  # masks -> plain weights with the same (zero) values
    if has_parametrizations(model):
        raise ZooError("quantize: the model has parametrized weights zoo does not know; remove them first")
    if method in ("binary", "ternary", "weights_kbit"):
        return _weight_only(model, method, bits, protect)
    if str(device_of(model)) != "cpu":
        raise ZooError("quantize: int8 models run on the CPU; move the model there first (model.cpu())")
    if backend in pt2e.PT2E_BACKENDS:
        return pt2e.run(model, method, backend, None if cal is None else [x for x, _ in cal], reduce_range())
    backend = resolve_backend(model, backend)
    _engine(backend)
    if method == "dynamic":
        model.eval()
        with quiet():
            tq.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
        add_step(model, {"kind": "int8", "method": "dynamic", "backend": backend})
        return model
    if method == "qat":
        _prepare_static(model, backend, qat=True)
        if cal:  # optional: start the fake-quant ranges from real activations (BN statistics untouched)
            with quiet(), eval_mode(model), torch.no_grad():
                for x, _ in cal:
                    model(x)
        add_step(model, {"kind": "int8", "method": "qat", "backend": backend, "converted": False,
                         "reduce_range": reduce_range(), "relu6": "fused"})
        return model
    _prepare_static(model, backend, qat=False, observer=observer)
    with quiet(), torch.no_grad():
        for x, _ in cal:
            model(x)
    _convert(model)
    add_step(model, {"kind": "int8", "method": "static", "backend": backend, "observer": observer,
                     "reduce_range": reduce_range(), "relu6": "fused"})
    return model


def convert(model: nn.Module, *, inplace: bool = False) -> nn.Module:
    """Finish QAT: turn the fine-tuned fake-quant model into a real int8 model (eval mode)."""
    check_model("convert", model)
    st = steps(model)
    if not st or st[-1].get("kind") != "int8" or st[-1].get("method") != "qat" or st[-1].get("converted"):
        raise ZooError("convert: expected a model returned by quantize(method='qat') and not yet converted")
    if st[-1]["backend"] in pt2e.PT2E_BACKENDS:
        out = pt2e.copy_attrs(model, pt2e.convert_qat(copy_model(model, inplace)))  # a deep copy drops them
        set_steps(out, st[:-1] + [dict(st[-1], converted=True)])
        return out
    model = copy_model(model, inplace)
    _engine(st[-1]["backend"])
    _convert(model)
    set_steps(model, st[:-1] + [dict(st[-1], converted=True)])
    return model


def _param_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if parametrize.is_parametrized(m, "weight")]


def _weight_only(model: nn.Module, method: str, bits: int | None, protect: Sequence[str]) -> nn.Module:
    names = resolve_protect(model, protect)
    layers = [(n, m) for n, m in weight_layers(model) if n not in names]
    if not layers:
        raise ZooError("quantize: every conv/linear layer is protected; nothing to quantize")
    for _, m in layers:
        _attach(m, method, bits)
    add_step(model, {"kind": "weightquant", "method": method, "bits": {"binary": 1, "ternary": 2}.get(method, bits),
                     "modules": [n for n, _ in layers]})
    return model


def _attach(m: nn.Module, method: str, bits: int | None) -> None:
    if method == "binary":
        p: nn.Module = BinaryWeight()
    elif method == "ternary":
        p = TernaryWeight()
    else:
        p = KBitWeight(bits, KBitWeight.init_scale(m.weight, bits))
    parametrize.register_parametrization(m, "weight", p)


def rebuild(model: nn.Module, step: dict[str, Any]) -> None:
    """Recreate the structure a quantization step left (weights are loaded afterwards)."""
    kind = step["kind"]
    if kind == "weightquant":
        method = step["method"]
        for path in step["modules"]:
            m = get_module(model, path)
            if method == "weights_kbit":
                p = KBitWeight(step["bits"], torch.ones((m.weight.shape[0],) + (1,) * (m.weight.dim() - 1)))
                parametrize.register_parametrization(m, "weight", p)
            else:
                _attach(m, method, None)
        return
    if step["backend"] in pt2e.PT2E_BACKENDS:
        raise ZooError(f"rebuild: backend {step['backend']!r} (PT2E) builds a new graph: use "
                       "zoo.compress.pt2e.rebuild, as zoo.compress.load does")
    _engine(step["backend"])
    if step["method"] == "dynamic":
        model.eval()
        with quiet():
            tq.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8, inplace=True)
        return
    # observer choice does not change the converted structure, and the qparams are loaded afterwards
    _prepare_static(model, step["backend"], qat=step["method"] == "qat", observer="minmax",
                    fuse_relu6=step.get("relu6") == "fused")
    _prime(model)
    if step["method"] == "static" or step.get("converted"):
        _convert(model)
