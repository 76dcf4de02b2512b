"""Import TensorFlow Lite MobileNets into zoo checkpoints: MobileNet v1 (Howard et al. 2017, "MobileNets:
Efficient Convolutional Neural Networks for Mobile Vision Applications", arXiv:1704.04861) and MobileNet
v2 (Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks", arXiv:1801.04381) as
TF-slim exported them, e.g. the uint8 files of the TFLite / Coral model lists.

    import_tflite("mobilenet_v1_0.25_128_quant.tflite", "mnv1_025_128.safetensors")
    zoo.create("mobilenet_v1", weights="mnv1_025_128.safetensors")   # 1000 ImageNet classes

The graph is read and dequantized by zoo.weights.tflite_graph. The architecture is detected from it: no
ADD ops means MobileNet v1 (width = last pointwise channels / 1024, activation = the fused ReLU / ReLU6),
ADDs mean MobileNet v2 (width = last projection channels / 320); the resolution is the input side, and
`padding="same"` (TensorFlow SAME, zoo.models._tf_same). Every conv is then checked against the zoo
model with those kwargs, layer by layer (kernel, channels, stride, groups, activation), and the number of
ADDs against its residual blocks, so another network fails naming the first layer that differs.

Folded batch norm (W' = W * gamma / sigma, b' = beta - gamma * mu / sigma) is stored exactly in zoo's
usual conv (no bias) + BatchNorm2d: conv weight W', BN weight 1, bias b', running mean 0, running var
1 - eps. In eval mode BN computes x / sqrt((1 - eps) + eps) + b' = x + b' (float32(1 - eps) + eps is
exactly 1) and conv-BN fusion gives back W', b' unchanged; the keys are those of any zoo MobileNet, so
fine-tuning, pruning and quantization need nothing new. A 1001-way classifier (index 0 = background)
loses row 0: the result has the 1000 ImageNet classes in torchvision's order (sorted synsets, as
TF-slim's labels after the background), names in the header. The input quantization becomes `zoo.mean`
/ `zoo.std` on [0, 1] images: scale * (u - zero_point) = (u / 255 - mean) / std for uint8 pixels u.

`activations="uint8"` also keeps the file's activation quantization: each conv, residual ADD, the global
pool and the logits round their output to the file's (scale, zero point) grid (zoo.compress.actgrid, a
recorded compression step), so the model reproduces the interpreter's integer model; on the Coral v1
0.25 file that raises top-1 agreement from 94.0% to 97.6% (benchmarks/tflite_import.md).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn
from torchvision.models import MobileNet_V2_Weights

from zoo._registry import create
from zoo.compress import fix_activation_grids
from zoo.compress._common import check_choice
from zoo.errors import ZooError
from zoo.io import check_out_file
from zoo.layers import ConvNormAct, InvertedResidual
from zoo.weights.checkpoint import save_checkpoint, sha256_file
from zoo.weights.tflite_graph import Layer, TfGraph, TfOp, read_graph, to_layer

CONV_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D")
HEAD_OPS = ("CONV_2D", "FULLY_CONNECTED")  # the classifier after the global pool
IMAGENET_CLASSES = 1000
WITH_BACKGROUND = 1001  # TF-slim's ImageNet heads: index 0 = background
V1_LAST, V2_LAST_PROJECT = 1024, 320  # channels at width 1.0 that give the width multiplier
TF_SLIM_RANGE = (0.5, 0.5)  # float32 inputs: TF-slim's x / 127.5 - 1, i.e. mean = std = 0.5 on [0, 1]


@dataclass
class Detected:
    """What a TFLite file holds: the zoo model (name, kwargs), its convs, classifier, ADDs and input coding."""

    graph: TfGraph
    name: str
    kwargs: dict[str, Any]
    layers: list[Layer]
    classifier: Layer
    adds: int
    background: bool
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    input_range: dict[str, Any]
    conv_ops: list[TfOp]  # the backbone's CONV_2D / DEPTHWISE_CONV_2D ops, in graph order (one per layer)
    head_op: TfOp  # the classifier op after the global pool

    def describe(self) -> str:
        """`mobilenet_v1(act='relu6', num_classes=1000, padding='same', resolution=128, width=0.25)`."""
        return f"{self.name}(" + ", ".join(f"{k}={v!r}" for k, v in sorted(self.kwargs.items())) + ")"

    def weight_types(self) -> str:
        """`uint8`, `float32`, ...: the types of the conv weights in the file."""
        return "/".join(sorted({op.inputs[1].dtype.lower() for op in self.graph.ops if op.kind in CONV_OPS}))


def _fail(graph: TfGraph, msg: str) -> ZooError:
    return ZooError(f"cannot import {str(graph.path)!r} ({graph.summary()}): {msg}")


def _split(graph: TfGraph) -> tuple[list[TfOp], TfOp, int]:
    """(backbone convs, classifier op, number of ADDs) around the single global average pool."""
    pools = [i for i, op in enumerate(graph.ops) if op.kind == "AVERAGE_POOL_2D"]
    if len(pools) != 1:
        raise _fail(graph, f"found {len(pools)} AVERAGE_POOL_2D ops; a MobileNet has one global average pool")
    k = pools[0]
    pool = graph.ops[k]
    _, h, w, _ = pool.inputs[0].shape
    if (pool.options.get("filter_h"), pool.options.get("filter_w")) != (h, w):
        raise _fail(graph, f"the AVERAGE_POOL_2D window {pool.options.get('filter_h')}x{pool.options.get('filter_w')}"
                           f" does not cover its {h}x{w} input, so it is not a global pool")
    before = [op for op in graph.ops[:k] if op.kind not in CONV_OPS + ("ADD",)]
    heads = [op for op in graph.ops[k + 1:] if op.kind in CONV_OPS + ("FULLY_CONNECTED", "ADD")]
    if before:
        raise _fail(graph, f"found {before[0].kind} before the global pool; MobileNets have only convs and ADDs there")
    if len(heads) != 1 or heads[0].kind not in HEAD_OPS:
        found = ", ".join(op.kind for op in heads) or "none"
        raise _fail(graph, f"after the global pool found {found}; expected one classifier (CONV_2D or FULLY_CONNECTED)")
    return [op for op in graph.ops[:k] if op.kind in CONV_OPS], heads[0], sum(op.kind == "ADD" for op in graph.ops)


def _input_coding(graph: TfGraph) -> tuple[int, tuple, tuple, dict[str, Any]]:
    """(resolution, mean, std, input_range) from the input tensor's shape and quantization."""
    if len(graph.inputs) != 1:
        raise _fail(graph, f"it has {len(graph.inputs)} inputs; expected one image")
    x = graph.inputs[0]
    if len(x.shape) != 4 or x.shape[3] != 3 or x.shape[1] != x.shape[2]:
        raise _fail(graph, f"input {x.name!r} has shape {x.shape}; expected (1, S, S, 3) square RGB images")
    if x.dtype == "FLOAT32":
        mean, std = TF_SLIM_RANGE
        rng: dict[str, Any] = {"dtype": "float32", "assumed": "TF-slim inputs x / 127.5 - 1 in [-1, 1]"}
    elif x.dtype in ("UINT8", "INT8") and x.scale is not None:
        s, z = float(x.scale[0]), int(x.zero_point[0])
        if not (np.isfinite(s) and s > 0):
            raise _fail(graph, f"input {x.name!r} has quantization scale {s}; expected a finite number > 0")
        offset = 128 if x.dtype == "INT8" else 0  # int8 inputs take pixel - 128
        mean, std = (z + offset) / 255.0, 1.0 / (255.0 * s)
        rng = {"dtype": x.dtype.lower(), "scale": s, "zero_point": z, "pixel_offset": -offset,
               "float_min": s * (0 - offset - z), "float_max": s * (255 - offset - z)}
    else:
        raise _fail(graph, f"input {x.name!r} is {x.dtype.lower()} without quantization; expected uint8, int8 or "
                           "float32 images")
    return x.shape[1], (mean,) * 3, (std,) * 3, rng


def detect(path: str | os.PathLike) -> Detected:
    """Read a .tflite file and work out which zoo MobileNet (and kwargs) it holds; ZooError if none."""
    graph = read_graph(path)
    backbone, head, adds = _split(graph)
    layers = [to_layer(op, graph.path) for op in backbone]
    classifier = to_layer(head, graph.path)
    if len(layers) < 2:
        raise _fail(graph, f"{len(layers)} convs before the pool; a MobileNet has dozens")
    if classifier.weight.shape[2:] != (1, 1) or classifier.act is not None:
        raise _fail(graph, f"the classifier is {classifier.describe()}; expected a linear 1x1 conv or dense layer")
    res, mean, std, rng = _input_coding(graph)
    n = classifier.weight.shape[0]
    kwargs: dict[str, Any] = {"num_classes": IMAGENET_CLASSES if n == WITH_BACKGROUND else n, "padding": "same",
                              "resolution": res}
    if adds == 0:
        name, width = "mobilenet_v1", layers[-1].weight.shape[0] / V1_LAST
        if layers[0].act is None:
            raise _fail(graph, f"the first layer {layers[0].describe()} has no activation; MobileNet v1 uses ReLU(6)")
        kwargs["act"] = layers[0].act
    else:
        name, width = "mobilenet_v2", layers[-2].weight.shape[0] / V2_LAST_PROJECT
    kwargs["width"] = width
    return Detected(graph, name, kwargs, layers, classifier, adds, n == WITH_BACKGROUND, mean, std, rng, backbone,
                    head)


def _act_name(m: ConvNormAct) -> str | None:
    if not m.has_act:
        return None
    return "relu6" if isinstance(m.act, nn.ReLU6) else "relu"


def _zoo_layers(found: Detected) -> tuple[nn.Module, list[ConvNormAct]]:
    """The zoo model for `found` and its ConvNormAct layers, checked against the file layer by layer."""
    try:
        model = create(found.name, **found.kwargs)
    except ZooError as e:
        raise _fail(found.graph, f"looks like {found.describe()}, which zoo cannot build: {e}") from None
    convs = [m for m in model.modules() if isinstance(m, ConvNormAct)]
    residual = sum(isinstance(m, InvertedResidual) and m.use_res for m in model.modules())
    if len(convs) != len(found.layers) or residual != found.adds:
        raise _fail(found.graph, f"{len(found.layers)} convs and {found.adds} ADDs before the pool, but zoo "
                                 f"{found.describe()} has {len(convs)} convs and {residual} residual adds")
    for i, (m, layer) in enumerate(zip(convs, found.layers)):
        want = Layer("", m.conv.weight.detach().numpy(), np.zeros(0, np.float32), m.conv.stride[0], m.conv.groups,
                     _act_name(m))
        if want.describe() != layer.describe():
            raise _fail(found.graph, f"layer {i + 1} ({layer.name!r}) is {layer.describe()}, where zoo "
                                     f"{found.describe()} has {want.describe()}")
    return model, convs


@torch.no_grad()
def store_folded_bias(bn: nn.BatchNorm2d, bias: torch.Tensor) -> None:
    """Make `bn` add `bias` and nothing else in eval mode, exactly: weight 1, running mean 0, var 1 - eps."""
    bn.weight.fill_(1.0)
    bn.bias.copy_(bias)
    bn.running_mean.zero_()
    bn.running_var.fill_(1.0 - bn.eps)  # float32(1 - eps) + eps == 1.0, so 1 / sqrt(var + eps) == 1
    if bn.num_batches_tracked is not None:
        bn.num_batches_tracked.zero_()


ACTIVATIONS = ("float", "uint8")  # float32 activations, or rounded to the file's grids (zoo.compress.actgrid)
GRID_RANGES = {"UINT8": (0, 255), "INT8": (-128, 127)}


def _activation_grids(model: nn.Module, found: Detected) -> tuple[dict[str, tuple[float, int]], tuple[int, int]]:
    """{module name: (scale, zero point)} of the file's quantized layer outputs, and their integer range:
    every conv (after its fused activation), every residual ADD, the global pool and the logits."""
    named = list(model.named_modules())
    convs = [n for n, m in named if isinstance(m, ConvNormAct)]
    residual = [n for n, m in named if isinstance(m, InvertedResidual) and m.use_res]
    head = next(n for n, m in named if m is model.get_classifier())
    ops = found.graph.ops
    pairs = (list(zip(convs, found.conv_ops)) + list(zip(residual, [op for op in ops if op.kind == "ADD"]))
             + [("global_pool", next(op for op in ops if op.kind == "AVERAGE_POOL_2D")), (head, found.head_op)])
    kinds = {op.outputs[0].dtype for _, op in pairs}
    if len(kinds) != 1 or next(iter(kinds)) not in GRID_RANGES or any(op.outputs[0].scale is None for _, op in pairs):
        raise _fail(found.graph, f"activations='uint8' needs a fully quantized file (uint8 or int8 layer outputs); "
                                 f"its layer outputs are {'/'.join(sorted(k.lower() for k in kinds))}")
    grids = {n: (float(op.outputs[0].scale[0]), int(op.outputs[0].zero_point[0])) for n, op in pairs}
    return grids, GRID_RANGES[next(iter(kinds))]


@torch.no_grad()
def tflite_to_model(path: str | os.PathLike, activations: str = "float") -> nn.Module:
    """The zoo model (eval mode) that a TFLite MobileNet file describes, with its dequantized weights.

    activations="float" computes in float32; "uint8" also rounds every layer output to the file's own
    activation grid (zoo.compress.fix_activation_grids), reproducing the interpreter's integer model.
    Its `tflite_import` attribute holds what `detect` found (input normalisation, layers, the graph).
    """
    check_choice("tflite_to_model", "activations", activations, ACTIVATIONS)
    found = detect(path)
    model, convs = _zoo_layers(found)
    for m, layer in zip(convs, found.layers):
        m.conv.weight.copy_(torch.from_numpy(layer.weight))
        store_folded_bias(m.bn, torch.from_numpy(layer.bias))
    w, b = torch.from_numpy(found.classifier.weight[:, :, 0, 0]), torch.from_numpy(found.classifier.bias)
    if found.background:
        w, b = w[1:], b[1:]  # drop the background logit
    head = model.get_classifier()
    if tuple(w.shape) != tuple(head.weight.shape):
        raise _fail(found.graph, f"the classifier maps {w.shape[1]} features, where zoo {found.describe()} has "
                                 f"{head.weight.shape[1]}")
    head.weight.copy_(w)
    head.bias.copy_(b)
    if activations == "uint8":
        grids, (qmin, qmax) = _activation_grids(model, found)
        fix_activation_grids(model, grids, qmin=qmin, qmax=qmax)
    model.tflite_import = found
    return model.eval()


def imagenet_classes() -> list[str]:
    """The 1000 ImageNet class names in torchvision's order (sorted synsets), shipped with torchvision."""
    return list(MobileNet_V2_Weights.IMAGENET1K_V1.meta["categories"])


def _import(path: str | os.PathLike, out: str | os.PathLike, model: str | None,
            activations: str) -> tuple[Path, Detected]:
    check_out_file(out, "out")
    zmodel = tflite_to_model(path, activations)
    found: Detected = zmodel.tflite_import
    del zmodel.tflite_import
    if model is not None and model != found.name:
        raise ZooError(f"model={model!r} does not match {str(found.graph.path)!r}, which holds {found.describe()}")
    n, res = found.kwargs["num_classes"], found.kwargs["resolution"]
    source = {"file": found.graph.path.name, "sha256": sha256_file(found.graph.path), "format": "tflite",
              "weights": found.weight_types(), "background_dropped": found.background, "ops": found.graph.summary()}
    extra = {"input_size": [3, res, res], "input_range": found.input_range, "imported_from": source}
    written = save_checkpoint(zmodel, out, classes=imagenet_classes() if n == IMAGENET_CLASSES else None,
                              mean=found.mean, std=found.std, extra=extra)
    return written, found


def import_tflite(path: str | os.PathLike, out: str | os.PathLike, model: str | None = None,
                  activations: str = "float") -> Path:
    """Write a TFLite MobileNet as a zoo checkpoint `out` (spec, classes, normalisation, input range in the header).

    `model`, when given, must be the detected architecture; `activations` as in `tflite_to_model` (the
    "uint8" grids are a compression step of the spec, so the file reloads with them).
    """
    return _import(path, out, model, activations)[0]


def is_tflite(path: str | os.PathLike) -> bool:
    """True when `path` is a TFLite flatbuffer: a .tflite name, or the 'TFL3' identifier at byte 4."""
    p = Path(path)
    if p.suffix.lower() == ".tflite":
        return True
    try:
        with open(p, "rb") as f:
            return f.read(8)[4:8] == b"TFL3"
    except OSError:
        return False


def import_tflite_command(path: str | os.PathLike, out: str | os.PathLike, model: str | None = None,
                          activations: str = "float") -> str:
    """Run `zoo weights import FILE.tflite --out X.safetensors [--model NAME] [--activations A]`; the line to print."""
    written, found = _import(path, out, model, activations)
    dropped = ", background logit dropped" if found.background else ""
    grid = "; activations on the file's uint8 grids" if activations == "uint8" else ""
    return (f"wrote {written}: {found.describe()} from {found.graph.path.name} ({found.weight_types()} weights "
            f"dequantized{dropped}; input {found.input_range['dtype']}{grid})")
