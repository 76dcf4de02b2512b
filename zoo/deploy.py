"""Deployment runtimes: ExecuTorch `.pte` programs (XNNPACK delegate) and ONNX Runtime int8 QDQ models.

Sources: ExecuTorch's export flow (torch.export -> `to_edge_transform_and_lower` with the
XnnpackPartitioner -> `.to_executorch()`, run by `executorch.runtime`), its int8 path through
torchao's PT2E quantization with the XNNPACKQuantizer (zoo.compress.pt2e), and ONNX Runtime's
static quantization (`onnxruntime.quantization.quantize_static`, QDQ format, per-channel int8
weights). Every dependency is optional: `pip install 'zoo[deploy]'`.

zoo.export wraps these functions with zoo's input-size checks and the `zoo export` command.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from zoo.compress import pt2e
from zoo.compress._common import batches
from zoo.errors import ZooError

INSTALL_HINT = pt2e.INSTALL_HINT
CALIBRATION_BATCHES = 8  # default number of calibration batches taken from an iterable


def calibration_inputs(calibration: Any, func: str, max_batches: int | None = CALIBRATION_BATCHES
                       ) -> list[torch.Tensor]:
    """Input tensors of up to `max_batches` calibration batches (tensors or (input, target) pairs)."""
    if calibration is None:
        raise ZooError(f"{func}: int8 needs calibration data: an iterable of input batches (tensors) or "
                       "(input, target) pairs, e.g. a DataLoader of training images")
    return [x.detach().float().cpu() for x, _ in batches(calibration, func, need_target=False,
                                                          max_batches=max_batches)]


def _executorch() -> tuple[Any, Any]:
    try:
        with pt2e.quiet_export():  # executorch's first import emits importlib / experimental-API warnings
            from executorch.backends.xnnpack.partition.xnnpack_partitioner import XnnpackPartitioner
            from executorch.exir import to_edge_transform_and_lower
    except ImportError:
        raise ZooError(f"ExecuTorch export needs executorch: {INSTALL_HINT}") from None
    return XnnpackPartitioner, to_edge_transform_and_lower


def executorch_program(model: nn.Module, example: torch.Tensor, int8: bool = False,
                       calibration: list[torch.Tensor] | None = None) -> bytes:
    """The bytes of an ExecuTorch program for `model` at the shape of `example`, lowered to XNNPACK.

    int8: PT2E static quantization with the XNNPACKQuantizer, calibrated on `calibration` first.
    """
    return executorch_lowered(model, example, int8, calibration)[0]


def executorch_lowered(model: nn.Module, example: torch.Tensor, int8: bool = False,
                       calibration: list[torch.Tensor] | None = None) -> tuple[bytes, dict[str, int]]:
    """(program bytes, {op: count} of the ops XNNPACK did not take, which run on ExecuTorch's portable kernels)."""
    partitioner, lower = _executorch()
    if int8:
        if not calibration:
            raise ZooError("to_executorch: int8=True needs calibration batches (an iterable of input tensors)")
        graph: nn.Module = pt2e.quantize_static(model, "xnnpack", calibration)
    else:
        graph = model
    was = model.training
    model.eval()
    try:
        with pt2e.quiet_export(), torch.no_grad():
            ep = torch.export.export(graph, (example,))
            edge = lower(ep, partitioner=[partitioner()])
            left = _undelegated(edge.exported_program().graph)
            prog = edge.to_executorch()
    except ZooError:
        raise
    except Exception as e:
        name = getattr(model, "zoo_name", type(model).__name__)
        raise ZooError(f"to_executorch: lowering {name} failed: {type(e).__name__}: "
                       f"{str(e).strip().splitlines()[0][:240] if str(e).strip() else ''}") from None
    finally:
        model.train(was)
    return prog.buffer, left


def _undelegated(graph: Any) -> dict[str, int]:
    left: dict[str, int] = {}
    for n in graph.nodes:
        name = str(n.target)
        if n.op == "call_function" and "call_delegate" not in name and name != "<built-in function getitem>":
            left[name] = left.get(name, 0) + 1
    return left


def set_threads(n: int) -> None:
    """Size ExecuTorch's thread pool (XNNPACK's workers) to `n` threads."""
    try:
        with pt2e.quiet_export():
            from executorch.extension.pybindings import portable_lib
    except ImportError:
        raise ZooError(f"ExecuTorch threads: executorch is not installed: {INSTALL_HINT}") from None
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ZooError(f"threads={n!r} is not allowed; expected an int >= 1")
    if portable_lib._threadpool_get_thread_count() != n:
        portable_lib._unsafe_reset_threadpool(n)


class ExecutorchModule:
    """A loaded `.pte` program's `forward`: call it on a tensor, get the output tensor.

    The program has a fixed input shape; a batch whose size is a multiple of the program's batch is
    run in chunks and concatenated.
    """

    def __init__(self, path: str | os.PathLike):
        """Load the program through executorch.runtime (ZooError if the file is missing or not a program)."""
        try:
            with pt2e.quiet_export():
                from executorch.runtime import Runtime
        except ImportError:
            raise ZooError(f"load_executorch needs executorch: {INSTALL_HINT}") from None
        if not os.path.isfile(path):
            raise ZooError(f"load_executorch: no such file {os.fspath(path)!r}")
        try:
            program = Runtime.get().load_program(Path(path))
            self._method = program.load_method("forward")
            meta = self._method.metadata
        except Exception as e:
            raise ZooError(f"load_executorch: {os.fspath(path)!r} is not a loadable ExecuTorch program: "
                           f"{type(e).__name__}") from None
        self.path = Path(path)
        self.input_shape: tuple[int, ...] = tuple(int(v) for v in meta.input_tensor_meta(0).sizes())

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Run forward on `x` (float32, the program's shape or a multiple of its batch)."""
        if not isinstance(x, torch.Tensor):
            raise ZooError(f"ExecutorchModule: expected a tensor, got {type(x).__name__}")
        want = self.input_shape
        if want and (x.dim() != len(want) or tuple(x.shape[1:]) != want[1:] or x.shape[0] % want[0]):
            raise ZooError(f"ExecutorchModule: input shape {tuple(x.shape)} is not allowed; this program takes "
                           f"{want} (or a multiple of its batch)")
        x = x.detach().float().contiguous()
        b = want[0] if want else x.shape[0]
        outs = [self._method.execute([x[i:i + b]])[0] for i in range(0, x.shape[0], b)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)


def load_executorch(path: str | os.PathLike) -> ExecutorchModule:
    """Load a `.pte` file as a callable tensor -> tensor, run by executorch.runtime."""
    return ExecutorchModule(path)


class _Reader:
    """onnxruntime CalibrationDataReader over a list of input batches (one batch per get_next call)."""

    def __init__(self, inputs: list[torch.Tensor], name: str):
        self._items = iter([{name: x.numpy().astype(np.float32)} for x in inputs])

    def get_next(self) -> dict[str, np.ndarray] | None:
        """The next feed dict, or None at the end."""
        return next(self._items, None)


def onnx_quantize_static(fp32_path: str | os.PathLike, out: str | os.PathLike,
                         calibration: list[torch.Tensor], input_name: str = "input") -> Path:
    """Write a QDQ int8 ONNX model from an fp32 one: per-channel int8 weights, uint8 activations (min/max)."""
    try:
        import onnx
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise ZooError(f"int8 ONNX needs onnx and onnxruntime: {INSTALL_HINT}") from None
    if not calibration:
        raise ZooError("to_onnx: int8=True needs calibration batches (an iterable of input tensors)")
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        pre = os.path.join(tmp, "pre.onnx")
        with pt2e.quiet_export():
            quant_pre_process(os.fspath(fp32_path), pre, skip_symbolic_shape=True)
            quantize_static(pre, os.fspath(out), _Reader(calibration, input_name), quant_format=QuantFormat.QDQ,
                            per_channel=True, activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                            calibrate_method=CalibrationMethod.MinMax)
    src, dst = onnx.load(os.fspath(fp32_path)), onnx.load(os.fspath(out))
    for p in src.metadata_props:  # keep zoo's spec / classes / normalisation
        entry = dst.metadata_props.add()
        entry.key, entry.value = p.key, p.value
    onnx.save(dst, os.fspath(out))
    return out


def ort_session(path: str | os.PathLike, threads: int | None = None) -> Any:
    """An onnxruntime CPU session with `threads` intra-op threads (default torch's) and no spin-waiting."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ZooError(f"running ONNX files needs onnxruntime: {INSTALL_HINT}") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads or max(1, torch.get_num_threads())
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
