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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from zoo._registry import list_models, model_card
from zoo.compress import pt2e
from zoo.compress._common import batches, steps
from zoo.errors import ZooError
from zoo.shuffle_fold import fold_channel_shuffles, has_channel_shuffles
from zoo.untrusted import short_repr
from zoo.spec import model_name

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
    if int8 and not calibration:
        raise ZooError("to_executorch: int8=True needs calibration batches (an iterable of input tensors)")
    # ShuffleNet v2: the shuffles become weight permutations (zoo.shuffle_fold; a third of its int8 time)
    source = fold_channel_shuffles(model).eval() if has_channel_shuffles(model) else model
    graph: nn.Module = pt2e.quantize_static(source, "xnnpack", calibration) if int8 else source
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
        raise ZooError(f"to_executorch: lowering {model_name(model)} failed: {type(e).__name__}: "
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
    """Size ExecuTorch's thread pool (XNNPACK's workers) to `n` threads; call it before loading programs.

    Resizing replaces the pool, and a program loaded earlier keeps a pointer to the old one: running it
    afterwards crashed (SIGFPE) or hung in most tries here, so size the pool first.
    """
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
        self.folder: tempfile.TemporaryDirectory | None = None  # set when the file is a temporary copy
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


@dataclass(frozen=True)
class Int8Path:
    """zoo's recommended int8 deployment of one model family, chosen by measurement (benchmarks/int8.md)."""

    runtime: str  # 'executorch' (.pte, XNNPACK delegate), 'onnxruntime' (QDQ .onnx) or 'eager' (torch.ao module)
    export: str | None  # the `zoo export --format` that produces it; None: zoo.compress.quantize in Python
    speedup: float  # measured at batch 1, 224 px, 2 threads, over zoo's fp32 eager forward
    why: str  # the measurement behind the choice (median ms at batch 1)


# From `python benchmarks/bench_int8.py` (batch 1, 224 px, 2 threads, interleaved, settle 3; benchmarks/int8.md, run
# of 2026-12-07 05:15 UTC; the 2026-11-29 run on another VM chose the same paths except MobileNet v1: ORT there).
INT8_PATHS: dict[str, Int8Path] = {
    "mobilenet_v1": Int8Path("executorch", "executorch", 6.1, "ExecuTorch int8 2.4 ms; ORT int8 2.8; eager int8 "
                             "3.5; PT2E x86 3.7; fp32 eager 14.6. ExecuTorch led ORT in all four runs on this VM "
                             "(5.0-6.1x vs 4.5-5.1x); on the 2026-11-29 VM ORT led (3.6 vs 4.2 ms)"),
    "mobilenet_v2": Int8Path("executorch", "executorch", 7.1, "ExecuTorch int8 2.2 ms; ORT int8 2.9; PT2E x86 "
                             "4.9; eager int8 5.0; fp32 eager 15.6"),
    "shufflenet_v1": Int8Path("onnxruntime", "onnx", 3.8, "ORT int8 4.1 ms; ExecuTorch int8 11.9 (its three "
                              "avg_pool2d shortcuts are not delegated to XNNPACK); eager int8 15.8, no faster than "
                              "fp32 eager 15.8; PT2E x86 fails in inductor on the grouped convs"),
    "shufflenet_v2": Int8Path("executorch", "executorch", 7.4, "ExecuTorch int8 1.7 ms (channel shuffles folded "
                              "into the weights at export, zoo.shuffle_fold; 2.0 ms with them); ORT int8 2.7 "
                              "(also folded; 3.0 without); "
                              "PT2E x86 6.1; eager int8 16.0, slower than fp32 eager 12.4"),
    "squeezenet": Int8Path("executorch", "executorch", 8.2, "ExecuTorch int8 1.5 ms; ORT int8 2.3; PT2E x86 3.5; "
                           "eager int8 3.2; fp32 eager 12.6"),
    "resnet": Int8Path("eager", None, 6.7, "eager int8 3.6 ms (channels-last input), PT2E x86 3.7, ORT int8 5.2 at "
                       "batch 1 (resnet18; fp32 eager 24.1); eager needs no compile or export step"),
}


def recommended_int8(model: nn.Module | str) -> Int8Path:
    """The measured fastest int8 deployment for a zoo model (or model name); ZooError for unmeasured families."""
    name = model if isinstance(model, str) else model_name(model)
    if name not in list_models():
        raise ZooError(f"recommended_int8: {short_repr(name)} is not a zoo model; allowed: {', '.join(list_models())}")
    family = model_card(name).family
    if family not in INT8_PATHS:
        raise ZooError(f"recommended_int8: the {family!r} family ({name}) has not been measured; measured "
                       f"families: {', '.join(INT8_PATHS)} (benchmarks/bench_int8.py --models {name})")
    return INT8_PATHS[family]


def runtime_forward(model: nn.Module, example: torch.Tensor, threads: int | None = None) -> tuple[Any, str]:
    """(a tensor -> tensor callable, runtime name) that runs `model` where its int8 backend is fast: an
    'xnnpack' graph lowered to an ExecuTorch program (its thread pool sized to `threads` first, if given),
    an 'x86_pt2e' graph compiled by inductor with freezing, anything else as the eager module."""
    backend = next((s.get("backend") for s in reversed(steps(model)) if s.get("kind") == "int8"), None)
    if backend == "x86_pt2e":
        return pt2e.compile_x86(model, example), "inductor (x86_pt2e)"
    if backend != "xnnpack":
        return model, "eager"
    if threads is not None:
        set_threads(threads)
    data, _ = executorch_lowered(model, example)
    folder = tempfile.TemporaryDirectory()  # the runtime reads the program from a file: kept while it lives
    path = Path(folder.name) / "model.pte"
    path.write_bytes(data)
    program = load_executorch(path)
    program.folder = folder
    return program, "executorch (xnnpack)"
