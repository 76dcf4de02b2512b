"""Reading TensorFlow Lite flatbuffers for zoo.weights.tflite: the ops, tensors and constant data of a
file, parsed with the `tflite` package (the TFLite schema's generated reader; `pip install 'zoo[tflite]'`),
never by decoding bytes by hand, and its quantized weights dequantized by the scheme of Jacob et al. 2018
("Quantization and Training of Neural Networks for Efficient Integer-Arithmetic-Only Inference", CVPR):
real = scale * (q - zero_point), per tensor or per output channel, and int32 biases with scale = input
scale * weight scale, as the TFLite kernels compute them.

Refused with one ZooError naming what was found: float16 (or other) tensor types, ops outside
SUPPORTED_OPS, several subgraphs, dilated / VALID-padded / depth-multiplied convs, other fused activations,
NaN / infinite weights, and truncated or corrupt files (offsets past the end, buffers of the wrong size).
"""

from __future__ import annotations

import os
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from zoo.errors import ZooError
from zoo.untrusted import clip

try:  # the optional extra zoo[tflite]
    import tflite
    from tflite.utils import BUILTIN_OPCODE2NAME
except ImportError:  # pragma: no cover - exercised only without the extra
    tflite = None
    BUILTIN_OPCODE2NAME = {}

SUPPORTED_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "ADD", "AVERAGE_POOL_2D", "FULLY_CONNECTED", "RESHAPE",
                 "SQUEEZE", "SOFTMAX")
WEIGHT_TYPES = ("UINT8", "INT8", "FLOAT32")  # quantized (dequantized here) or float weights
TENSOR_TYPES = WEIGHT_TYPES + ("INT32", "INT64")  # + biases and shape tensors
NUMPY_TYPES = {"FLOAT32": np.float32, "FLOAT16": np.float16, "INT32": np.int32, "UINT8": np.uint8,
               "INT8": np.int8, "INT64": np.int64, "INT16": np.int16, "FLOAT64": np.float64}
ACTIVATIONS = {0: None, 1: "relu", 3: "relu6"}  # tflite ActivationFunctionType NONE, RELU, RELU6
SAME = 0  # tflite Padding.SAME (VALID = 1)
_INSTALL = "the TFLite importer needs the `tflite` package: pip install 'zoo[tflite]'"


@dataclass
class TfTensor:
    """One tensor of a TFLite graph: name, shape, type, quantization and constant data (None if computed)."""

    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    scale: np.ndarray | None = None
    zero_point: np.ndarray | None = None
    quant_dim: int = 0
    data: np.ndarray | None = None


@dataclass
class TfOp:
    """One operator: its builtin name, input / output tensors (None for an omitted input) and options."""

    kind: str
    inputs: list[TfTensor | None]
    outputs: list[TfTensor]
    options: dict[str, int] = field(default_factory=dict)


@dataclass
class TfGraph:
    """The single subgraph of a TFLite file, ops in execution order."""

    path: Path
    ops: list[TfOp]
    inputs: list[TfTensor]
    outputs: list[TfTensor]

    def summary(self) -> str:
        """`CONV_2D x15, DEPTHWISE_CONV_2D x13, ...`: what the file holds."""
        return ", ".join(f"{k} x{n}" for k, n in Counter(op.kind for op in self.ops).items())


def _type_names() -> dict[int, str]:
    return {v: k for k, v in vars(tflite.TensorType).items() if not k.startswith("_") and isinstance(v, int)}


def _buffer(model: Any, raw: bytes, index: int) -> bytes | None:
    buf = model.Buffers(index)
    if buf is None:
        return None
    if buf.DataLength():
        return buf.DataAsNumpy().tobytes()
    offset, size = buf.Offset(), buf.Size()
    return raw[offset:offset + size] if offset > 1 and size else None  # large models keep data after the flatbuffer


def _tensor(model: Any, graph: Any, raw: bytes, i: int, types: dict[int, str], path: Path) -> TfTensor:
    t = graph.Tensors(i)
    shape = tuple(int(s) for s in t.ShapeAsNumpy()) if t.ShapeLength() else ()
    out = TfTensor(i, t.Name().decode("utf-8", "replace"), shape, types.get(t.Type(), f"type {t.Type()}"))
    q = t.Quantization()
    if q is not None and q.ScaleLength():
        out.scale = q.ScaleAsNumpy().astype(np.float64)
        out.zero_point = q.ZeroPointAsNumpy().astype(np.int64) if q.ZeroPointLength() else np.zeros(1, np.int64)
        out.quant_dim = int(q.QuantizedDimension())
    data = _buffer(model, raw, t.Buffer())
    if data is not None and out.dtype in NUMPY_TYPES:
        want = int(np.prod(shape, dtype=np.int64)) * np.dtype(NUMPY_TYPES[out.dtype]).itemsize
        if any(d < 0 for d in shape) or len(data) != want:
            raise ZooError(f"{str(path)!r} is a truncated or corrupt TFLite file: tensor {out.name!r} of shape {shape} "
                           f"({out.dtype.lower()}) needs {want} bytes of data but its buffer holds {len(data)}")
        out.data = np.frombuffer(data, dtype=NUMPY_TYPES[out.dtype]).reshape(shape).copy()
    return out


def _options(op: Any, kind: str) -> dict[str, int]:
    cls = {"CONV_2D": "Conv2DOptions", "DEPTHWISE_CONV_2D": "DepthwiseConv2DOptions", "ADD": "AddOptions",
           "AVERAGE_POOL_2D": "Pool2DOptions", "FULLY_CONNECTED": "FullyConnectedOptions"}.get(kind)
    table = op.BuiltinOptions()
    if cls is None or table is None:
        return {}
    o = getattr(tflite, cls)()
    o.Init(table.Bytes, table.Pos)
    names = {"padding": "Padding", "stride_h": "StrideH", "stride_w": "StrideW", "act": "FusedActivationFunction",
             "dilation_h": "DilationHFactor", "dilation_w": "DilationWFactor", "depth_multiplier": "DepthMultiplier",
             "filter_h": "FilterHeight", "filter_w": "FilterWidth"}
    return {k: int(getattr(o, g)()) for k, g in names.items() if hasattr(o, g)}


def _op_name(model: Any, op: Any) -> str:
    code = model.OperatorCodes(op.OpcodeIndex())
    builtin = max(int(code.BuiltinCode()), int(code.DeprecatedBuiltinCode()))  # schema v3a keeps both fields
    if BUILTIN_OPCODE2NAME.get(builtin) == "CUSTOM":
        return "CUSTOM:" + (code.CustomCode() or b"?").decode("utf-8", "replace")
    return BUILTIN_OPCODE2NAME.get(builtin, f"builtin op {builtin}")


def _check_types(path: Path, tensors: list[TfTensor]) -> None:
    bad = [t for t in tensors if t.dtype not in TENSOR_TYPES]
    if bad:
        kinds = Counter(t.dtype for t in bad)
        found = " and ".join(f"{k.lower()} tensors ({n}" + (f", e.g. {bad[0].name!r})" if i == 0 else ")")
                             for i, (k, n) in enumerate(kinds.items()))
        raise ZooError(f"cannot import {str(path)!r}: it holds {found}; zoo imports TFLite files with uint8 / int8 "
                       f"quantized or float32 weights")


def read_graph(path: str | os.PathLike) -> TfGraph:
    """Parse a .tflite file with the `tflite` package; ZooError for float16 / other types, unknown ops and
    truncated or corrupt files."""
    if tflite is None:
        raise ZooError(_INSTALL)
    p = Path(path)
    if not p.is_file():
        raise ZooError(f"TFLite file {str(p)!r} does not exist")
    raw = p.read_bytes()
    if len(raw) < 8 or not tflite.Model.ModelBufferHasIdentifier(raw, 0):
        raise ZooError(f"{str(p)!r} is not a TFLite flatbuffer (no 'TFL3' identifier at byte 4, found {raw[4:8]!r})")
    try:
        return _parse(p, raw)
    except ZooError:
        raise
    except (struct.error, IndexError, ValueError, TypeError, AttributeError, UnicodeDecodeError) as e:
        # flatbuffer offsets that point past the end (or into garbage) of a cut or damaged file
        raise ZooError(f"{str(p)!r} is a truncated or corrupt TFLite file ({len(raw):,} bytes; reading it failed with "
                       f"{type(e).__name__}: {clip(str(e), 120)}); expected a complete .tflite flatbuffer") from None


def _parse(p: Path, raw: bytes) -> TfGraph:
    """The graph of a flatbuffer that has the TFLite identifier (read_graph turns read errors into ZooErrors)."""
    model = tflite.Model.GetRootAsModel(raw, 0)
    if model.SubgraphsLength() != 1:
        raise ZooError(f"cannot import {str(p)!r}: it has {model.SubgraphsLength()} subgraphs; expected 1")
    g, types = model.Subgraphs(0), _type_names()
    tensors = [_tensor(model, g, raw, i, types, p) for i in range(g.TensorsLength())]
    _check_types(p, tensors)
    ops = []
    for i in range(g.OperatorsLength()):
        op = g.Operators(i)
        kind = _op_name(model, op)
        ins = [tensors[j] if j >= 0 else None for j in op.InputsAsNumpy()] if op.InputsLength() else []
        outs = [tensors[j] for j in op.OutputsAsNumpy()] if op.OutputsLength() else []
        ops.append(TfOp(kind, ins, outs, _options(op, kind)))
    unknown = Counter(op.kind for op in ops if op.kind not in SUPPORTED_OPS)
    if unknown:
        found = ", ".join(f"{k} x{n}" for k, n in unknown.items())
        raise ZooError(f"cannot import {str(p)!r}: unsupported op(s) {found}; the MobileNet importer knows "
                       + ", ".join(SUPPORTED_OPS))
    return TfGraph(p, ops, [tensors[j] for j in g.InputsAsNumpy()], [tensors[j] for j in g.OutputsAsNumpy()])


def dequantize(t: TfTensor) -> np.ndarray:
    """Float32 values of a constant tensor: scale * (q - zero_point), per tensor or along `quant_dim`."""
    if t.data is None:
        raise ZooError(f"tensor {t.name!r} has no constant data")
    if t.dtype == "FLOAT32":
        return t.data.astype(np.float32)
    if t.scale is None:
        raise ZooError(f"tensor {t.name!r} is {t.dtype.lower()} without quantization parameters")
    shape = [1] * t.data.ndim
    if t.scale.size > 1:
        shape[t.quant_dim] = t.scale.size
    scale, zp = t.scale.reshape(shape), t.zero_point.reshape(shape if t.zero_point.size > 1 else [1] * t.data.ndim)
    return (scale * (t.data.astype(np.int64) - zp)).astype(np.float32)  # exact in float64, then rounded once


@dataclass
class Layer:
    """A conv of the graph in PyTorch layout: weight (O, I/groups, kh, kw), bias (O,), stride, groups, act."""

    name: str
    weight: np.ndarray
    bias: np.ndarray
    stride: int
    groups: int
    act: str | None

    def describe(self) -> str:
        """`conv 3x3 /2 3->8 relu6` (groups shown when > 1)."""
        o, i, kh, kw = self.weight.shape
        g = f" groups={self.groups}" if self.groups > 1 else ""
        return f"conv {kh}x{kw} /{self.stride} {i * self.groups}->{o}{g} {self.act or 'linear'}"


def _bias(op: TfOp, w: TfTensor, out_chs: int) -> np.ndarray:
    b = op.inputs[2] if len(op.inputs) > 2 else None
    if b is None:
        return np.zeros(out_chs, np.float32)
    if b.dtype == "INT32" and w.dtype != "FLOAT32":
        x = op.inputs[0]
        if x is None or x.scale is None:
            raise ZooError(f"int32 bias {b.name!r} needs the quantized input scale of its conv, which is missing")
        # what the TFLite kernels use: input scale * weight scale (per output channel when the weights are)
        return (b.data.astype(np.float64) * x.scale[0] * w.scale).astype(np.float32)
    return dequantize(b)


def to_layer(op: TfOp, path: Path) -> Layer:
    """A CONV_2D / DEPTHWISE_CONV_2D / FULLY_CONNECTED op as a Layer (SAME padding, no dilation)."""
    o, w = op.options, op.inputs[1]
    where = f"{str(path)!r}: {op.kind} {w.name!r}"
    if o.get("dilation_h", 1) != 1 or o.get("dilation_w", 1) != 1:
        raise ZooError(f"{where} is dilated ({o['dilation_h']}x{o['dilation_w']}); MobileNets are not")
    if o.get("stride_h", 1) != o.get("stride_w", 1):
        raise ZooError(f"{where} has strides {o['stride_h']}x{o['stride_w']}; expected equal strides")
    act = o.get("act", 0)
    if act not in ACTIVATIONS:
        raise ZooError(f"{where} has fused activation type {act}; supported: NONE, RELU, RELU6")
    weight = dequantize(w)
    if op.kind == "DEPTHWISE_CONV_2D":  # (1, kh, kw, C * m) -> (C * m, 1, kh, kw)
        if weight.shape[3] != op.inputs[0].shape[3]:
            raise ZooError(f"{where} maps {op.inputs[0].shape[3]} to {weight.shape[3]} channels (depth multiplier "
                           f"> 1); MobileNets use 1")
        weight, groups = weight[0].transpose(2, 0, 1)[:, None], weight.shape[3]
    elif op.kind == "CONV_2D":  # (O, kh, kw, I) -> (O, I, kh, kw)
        weight, groups = weight.transpose(0, 3, 1, 2), 1
    else:  # FULLY_CONNECTED (O, I)
        weight, groups = weight[:, :, None, None], 1
    if weight.shape[2] > 1 and o.get("padding", SAME) != SAME:
        raise ZooError(f"{where} uses VALID padding on a {weight.shape[2]}x{weight.shape[3]} kernel; the "
                       "MobileNet importer expects TensorFlow SAME")
    bias = _bias(op, w, weight.shape[0])
    for what, arr in (("weights", weight), ("bias", bias)):
        if not np.isfinite(arr).all():
            raise ZooError(f"{where} has {int((~np.isfinite(arr)).sum())} NaN/inf {what}; zoo imports only finite "
                           "weights (a checkpoint holding them would be refused when loaded)")
    return Layer(w.name, np.ascontiguousarray(weight), bias, o.get("stride_h", 1), groups, ACTIVATIONS[act])


def conv_macs(graph: TfGraph) -> int:
    """Multiply-accumulates per image of the graph's convs and dense layers, from their tensor shapes."""
    total = 0
    for op in graph.ops:
        if op.kind not in ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED"):
            continue
        w, y = op.inputs[1].shape, op.outputs[0].shape
        per_output = w[1] * w[2] if op.kind == "DEPTHWISE_CONV_2D" else int(np.prod(w[1:]))
        total += int(np.prod(y[1:])) * per_output
    return total
