"""Test helper: write small TFLite flatbuffers with the `tflite` package's generated builder functions
(the TFLite schema, as the converter writes it), and export a zoo MobileNet (Howard et al. 2017; Sandler
et al. 2018) to such a file with its batch norm folded, float32 or uint8-quantized as in Jacob et al. 2018.
Nothing here is used by zoo itself; it lets the importer's tests run without any downloaded file.
"""

from __future__ import annotations

from typing import Any

import flatbuffers
import numpy as np
import torch
import torch.nn as nn
import tflite

from zoo.layers import ConvNormAct, DepthwiseSeparable, InvertedResidual

TYPES = {"FLOAT32": tflite.TensorType.FLOAT32, "FLOAT16": tflite.TensorType.FLOAT16, "INT32": tflite.TensorType.INT32,
         "UINT8": tflite.TensorType.UINT8, "INT8": tflite.TensorType.INT8}
ACT = {None: 0, "relu": 1, "relu6": 3}
SAME, VALID = 0, 1


class Builder:
    """Collects tensors and ops, then serialises one subgraph with `finish`."""

    def __init__(self) -> None:
        self.tensors: list[dict[str, Any]] = []
        self.buffers: list[bytes] = [b""]  # buffer 0 stays empty, as in converter output
        self.ops: list[dict[str, Any]] = []
        self.codes: list[int] = []

    def tensor(self, name: str, shape: tuple[int, ...], dtype: str = "FLOAT32", data: np.ndarray | None = None,
               scale: float | None = None, zero_point: int = 0) -> int:
        """Add a tensor (constant when `data` is given) and return its index."""
        buf = 0
        if data is not None:
            self.buffers.append(np.ascontiguousarray(data).tobytes())
            buf = len(self.buffers) - 1
        self.tensors.append({"name": name, "shape": shape, "type": TYPES[dtype], "buffer": buf,
                             "scale": scale, "zero_point": zero_point})
        return len(self.tensors) - 1

    def op(self, kind: str, inputs: list[int], outputs: list[int], **options: int) -> None:
        """Add an op by builtin name, e.g. op("CONV_2D", [x, w, b], [y], stride=2, act=3)."""
        code = getattr(tflite.BuiltinOperator, kind)
        if code not in self.codes:
            self.codes.append(code)
        self.ops.append({"kind": kind, "code": self.codes.index(code), "inputs": inputs, "outputs": outputs,
                         "options": options})

    def _options(self, b: flatbuffers.Builder, kind: str, o: dict[str, int]) -> tuple[int, int]:
        if kind in ("CONV_2D", "DEPTHWISE_CONV_2D"):
            pre = "Conv2DOptions" if kind == "CONV_2D" else "DepthwiseConv2DOptions"
            getattr(tflite, pre + "Start")(b)
            getattr(tflite, pre + "AddPadding")(b, o.get("padding", SAME))
            getattr(tflite, pre + "AddStrideW")(b, o.get("stride", 1))
            getattr(tflite, pre + "AddStrideH")(b, o.get("stride", 1))
            getattr(tflite, pre + "AddFusedActivationFunction")(b, o.get("act", 0))
            getattr(tflite, pre + "AddDilationWFactor")(b, 1)
            getattr(tflite, pre + "AddDilationHFactor")(b, 1)
            if kind == "DEPTHWISE_CONV_2D":
                tflite.DepthwiseConv2DOptionsAddDepthMultiplier(b, 1)
            return getattr(tflite.BuiltinOptions, pre), getattr(tflite, pre + "End")(b)
        if kind in ("AVERAGE_POOL_2D", "MAX_POOL_2D"):
            tflite.Pool2DOptionsStart(b)
            tflite.Pool2DOptionsAddPadding(b, VALID)
            tflite.Pool2DOptionsAddStrideW(b, 1)
            tflite.Pool2DOptionsAddStrideH(b, 1)
            tflite.Pool2DOptionsAddFilterWidth(b, o["filter"])
            tflite.Pool2DOptionsAddFilterHeight(b, o["filter"])
            return tflite.BuiltinOptions.Pool2DOptions, tflite.Pool2DOptionsEnd(b)
        if kind == "ADD":
            tflite.AddOptionsStart(b)
            return tflite.BuiltinOptions.AddOptions, tflite.AddOptionsEnd(b)
        if kind == "SOFTMAX":
            tflite.SoftmaxOptionsStart(b)
            tflite.SoftmaxOptionsAddBeta(b, 1.0)
            return tflite.BuiltinOptions.SoftmaxOptions, tflite.SoftmaxOptionsEnd(b)
        return 0, 0

    @staticmethod
    def _vector(b: flatbuffers.Builder, start: Any, items: list[int]) -> int:
        start(b, len(items))
        for off in reversed(items):
            b.PrependUOffsetTRelative(off)
        return b.EndVector()

    def _tensor_table(self, b: flatbuffers.Builder, t: dict[str, Any]) -> int:
        name = b.CreateString(t["name"])
        shape = b.CreateNumpyVector(np.array(t["shape"], dtype=np.int32))
        quant = None
        if t["scale"] is not None:
            scale = b.CreateNumpyVector(np.array([t["scale"]], dtype=np.float32))
            zp = b.CreateNumpyVector(np.array([t["zero_point"]], dtype=np.int64))
            tflite.QuantizationParametersStart(b)
            tflite.QuantizationParametersAddScale(b, scale)
            tflite.QuantizationParametersAddZeroPoint(b, zp)
            quant = tflite.QuantizationParametersEnd(b)
        tflite.TensorStart(b)
        tflite.TensorAddShape(b, shape)
        tflite.TensorAddType(b, t["type"])
        tflite.TensorAddBuffer(b, t["buffer"])
        tflite.TensorAddName(b, name)
        if quant is not None:
            tflite.TensorAddQuantization(b, quant)
        return tflite.TensorEnd(b)

    def _buffer_table(self, b: flatbuffers.Builder, data: bytes) -> int:
        vec = None
        if data:
            b.StartVector(1, len(data), 16)  # 16-byte aligned, as the converter writes weights
            b.head -= len(data)
            b.Bytes[b.head:b.head + len(data)] = data
            vec = b.EndVector()
        tflite.BufferStart(b)
        if vec is not None:
            tflite.BufferAddData(b, vec)
        return tflite.BufferEnd(b)

    def _op_table(self, b: flatbuffers.Builder, op: dict[str, Any]) -> int:
        ins = b.CreateNumpyVector(np.array(op["inputs"], dtype=np.int32))
        outs = b.CreateNumpyVector(np.array(op["outputs"], dtype=np.int32))
        otype, opts = self._options(b, op["kind"], op["options"])
        tflite.OperatorStart(b)
        tflite.OperatorAddOpcodeIndex(b, op["code"])
        tflite.OperatorAddInputs(b, ins)
        tflite.OperatorAddOutputs(b, outs)
        if otype:
            tflite.OperatorAddBuiltinOptionsType(b, otype)
            tflite.OperatorAddBuiltinOptions(b, opts)
        return tflite.OperatorEnd(b)

    def finish(self, inputs: list[int], outputs: list[int]) -> bytes:
        """Serialise the model ('TFL3', schema version 3, one subgraph)."""
        b = flatbuffers.Builder(1 << 16)
        buffers = [self._buffer_table(b, d) for d in self.buffers]
        tensors = [self._tensor_table(b, t) for t in self.tensors]
        ops = [self._op_table(b, op) for op in self.ops]
        codes = []
        for c in self.codes:
            tflite.OperatorCodeStart(b)
            tflite.OperatorCodeAddDeprecatedBuiltinCode(b, min(c, 127))
            tflite.OperatorCodeAddBuiltinCode(b, c)
            tflite.OperatorCodeAddVersion(b, 1)
            codes.append(tflite.OperatorCodeEnd(b))
        t_vec = self._vector(b, tflite.SubGraphStartTensorsVector, tensors)
        o_vec = self._vector(b, tflite.SubGraphStartOperatorsVector, ops)
        i_vec = b.CreateNumpyVector(np.array(inputs, dtype=np.int32))
        out_vec = b.CreateNumpyVector(np.array(outputs, dtype=np.int32))
        tflite.SubGraphStart(b)
        tflite.SubGraphAddTensors(b, t_vec)
        tflite.SubGraphAddInputs(b, i_vec)
        tflite.SubGraphAddOutputs(b, out_vec)
        tflite.SubGraphAddOperators(b, o_vec)
        graph = tflite.SubGraphEnd(b)
        g_vec = self._vector(b, tflite.ModelStartSubgraphsVector, [graph])
        c_vec = self._vector(b, tflite.ModelStartOperatorCodesVector, codes)
        b_vec = self._vector(b, tflite.ModelStartBuffersVector, buffers)
        desc = b.CreateString("zoo test builder")
        tflite.ModelStart(b)
        tflite.ModelAddVersion(b, 3)
        tflite.ModelAddOperatorCodes(b, c_vec)
        tflite.ModelAddSubgraphs(b, g_vec)
        tflite.ModelAddDescription(b, desc)
        tflite.ModelAddBuffers(b, b_vec)
        b.Finish(tflite.ModelEnd(b), file_identifier=b"TFL3")
        return bytes(b.Output())


def folded(m: ConvNormAct) -> tuple[np.ndarray, np.ndarray]:
    """(weight, bias) of a ConvNormAct with its eval-mode BatchNorm folded in (PyTorch layout)."""
    bn = m.bn
    k = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).detach()
    w = m.conv.weight.detach() * k.view(-1, 1, 1, 1)
    return w.numpy().astype(np.float32), (bn.bias.detach() - bn.running_mean * k).numpy().astype(np.float32)


def _quantize(x: np.ndarray) -> tuple[np.ndarray, float, int]:
    lo, hi = min(float(x.min()), 0.0), max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0 or 1.0
    zp = int(round(-lo / scale))
    return np.clip(np.round(x / scale) + zp, 0, 255).astype(np.uint8), scale, zp


class Exporter:
    """Writes a zoo MobileNet v1/v2 (eval mode) as a TF-slim-like TFLite graph: float32 or uint8."""

    def __init__(self, model: nn.Module, quantized: bool, background: bool = True):
        self.model, self.q, self.background = model.eval(), quantized, background
        self.b = Builder()
        self.shapes: dict[nn.Module, tuple[int, ...]] = {}
        size = model.spec.input_size[1]
        hooks = [m.register_forward_hook(lambda mod, i, o: self.shapes.__setitem__(mod, tuple(o.shape)))
                 for m in model.modules() if isinstance(m, ConvNormAct)]
        with torch.no_grad():
            model(torch.zeros(1, 3, size, size))
        for h in hooks:
            h.remove()
        self.size = size
        self.act_scale = {"relu6": 6.0 / 255, "relu": 0.05, None: 0.1}

    def _activation(self, name: str, shape: tuple[int, ...], act: str | None) -> int:
        if not self.q:
            return self.b.tensor(name, shape)
        return self.b.tensor(name, shape, "UINT8", scale=self.act_scale[act], zero_point=0 if act else 128)

    def conv(self, m: ConvNormAct, x: int, x_scale: float | None, name: str) -> tuple[int, float | None]:
        """Append m as CONV_2D / DEPTHWISE_CONV_2D; return its output tensor and output scale."""
        w, bias = folded(m)
        dw = m.conv.groups > 1
        w = w[:, 0].transpose(1, 2, 0)[None] if dw else w.transpose(0, 2, 3, 1)
        act = None if not m.has_act else ("relu6" if isinstance(m.act, nn.ReLU6) else "relu")
        if self.q:
            qw, sw, zw = _quantize(w)
            wt = self.b.tensor(name + "/weights", w.shape, "UINT8", qw, sw, zw)
            qb = np.round(bias / (x_scale * sw)).astype(np.int32)
            bt = self.b.tensor(name + "/bias", bias.shape, "INT32", qb, x_scale * sw, 0)
        else:
            wt = self.b.tensor(name + "/weights", w.shape, data=w)
            bt = self.b.tensor(name + "/bias", bias.shape, data=bias)
        n, c, h, wd = self.shapes[m]
        y = self._activation(name + "/out", (1, h, wd, c), act)
        self.b.op("DEPTHWISE_CONV_2D" if dw else "CONV_2D", [x, wt, bt], [y], stride=m.conv.stride[0], act=ACT[act])
        return y, self.act_scale[act] if self.q else None

    def block(self, blk: nn.Module, x: int, s: float | None, name: str) -> tuple[int, float | None]:
        """One DepthwiseSeparable / InvertedResidual block, with its ADD when it is residual."""
        y, ys = x, s
        for part in ("expand", "dw", "pw", "project"):
            m = getattr(blk, part, None)
            if isinstance(m, ConvNormAct):
                y, ys = self.conv(m, y, ys, f"{name}/{part}")
        if isinstance(blk, InvertedResidual) and blk.use_res:
            shape = self.b.tensors[y]["shape"]
            out = self._activation(name + "/add", shape, None)
            self.b.op("ADD", [y, x], [out])
            return out, ys
        return y, ys

    def export(self, softmax: bool = False) -> bytes:
        """The serialised graph: input (1, S, S, 3) -> ... -> (1, 1001 or 1000) logits (or softmax)."""
        m, s = self.model, self.size
        x0 = (self.b.tensor("input", (1, s, s, 3), "UINT8", scale=1 / 128, zero_point=128) if self.q
              else self.b.tensor("input", (1, s, s, 3)))
        y, ys = self.conv(m.stem, x0, 1 / 128 if self.q else None, "stem")
        for i, blk in enumerate(m.blocks):
            assert isinstance(blk, (DepthwiseSeparable, InvertedResidual))
            y, ys = self.block(blk, y, ys, f"block{i}")
        if hasattr(m, "conv_head"):
            y, ys = self.conv(m.conv_head, y, ys, "conv_head")
        _, h, w, c = self.b.tensors[y]["shape"]
        pooled = self._activation("pool", (1, 1, 1, c), "relu6")
        self.b.op("AVERAGE_POOL_2D", [y], [pooled], filter=h)
        return self._head(pooled, ys, c, softmax)

    def _head(self, pooled: int, ys: float | None, c: int, softmax: bool) -> bytes:
        w = self.model.classifier.weight.detach().numpy()
        bias = self.model.classifier.bias.detach().numpy()
        if self.background:  # TF-slim's extra class 0
            w = np.concatenate([np.full((1, c), 0.01, np.float32), w])
            bias = np.concatenate([np.full(1, -5.0, np.float32), bias])
        n = w.shape[0]
        w4 = np.ascontiguousarray(w.reshape(n, 1, 1, c))
        if self.q:
            qw, sw, zw = _quantize(w4)
            wt = self.b.tensor("logits/weights", w4.shape, "UINT8", qw, sw, zw)
            bt = self.b.tensor("logits/bias", (n,), "INT32", np.round(bias / (ys * sw)).astype(np.int32), ys * sw, 0)
        else:
            wt, bt = self.b.tensor("logits/weights", w4.shape, data=w4), self.b.tensor("logits/bias", (n,), data=bias)
        logits = self._activation("logits", (1, 1, 1, n), None)
        self.b.op("CONV_2D", [pooled, wt, bt], [logits])
        shape = self.b.tensor("shape", (2,), "INT32", np.array([1, n], np.int32))
        flat = self._activation("logits_flat", (1, n), None)
        self.b.op("RESHAPE", [logits, shape], [flat])
        out = flat
        if softmax:
            quant = {"dtype": "UINT8", "scale": 1 / 256, "zero_point": 0} if self.q else {}
            out = self.b.tensor("probs", (1, n), **quant)
            self.b.op("SOFTMAX", [flat], [out])
        return self.b.finish([0], [out])
