"""Export zoo models for deployment: ONNX (onnxruntime), TorchScript (trace) and ExecuTorch, with output checks.

ONNX uses PyTorch's TorchScript-based exporter (`dynamo=False`): the default dynamo exporter of
torch >= 2.9 needs onnxscript, which zoo does not depend on. Both exporters trace the model in eval
mode, with a dynamic batch dimension; the zoo spec, class names and normalisation go into the file's
metadata.

int8 (torch.ao eager-converted models): TorchScript works for every family (outputs identical). ONNX
writes QDQ graphs (int8 weights, QuantizeLinear/DequantizeLinear that onnxruntime fuses) and works for
LeNet/MLP, MobileNet v1/v2, ResNet, SqueezeNet and ShuffleNet v1 (within a few output quantisation
steps of PyTorch); it fails with one ZooError for ShuffleNet v2 (channel split = Slice of a quantized
tensor) and for a standalone quantized ReLU6 (no ONNX symbolic for quantized::relu6; zoo.compress.quantize
fuses ReLU6 into the conv, other torch.ao flows may not). See tests/test_export.py.
A TorchScript file is a zip of pickles: a deployment format, never zoo's storage format.
A float ShuffleNet v2 is exported to ONNX and ExecuTorch with its channel shuffles folded into the
weights (zoo.shuffle_fold): the same function, with slices and concats instead of a runtime shuffle.

Deployment int8 from the float model (zoo.deploy, `pip install 'zoo[deploy]'`): `to_onnx(..., int8=True,
calibration=...)` writes a QDQ model quantized by onnxruntime, and `to_executorch` writes an ExecuTorch
`.pte` program lowered to the XNNPACK delegate (int8 through torchao PT2E and the XNNPACKQuantizer);
`load_executorch` runs it through executorch.runtime.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.nn as nn

from zoo import deploy
from zoo._registry import create
from zoo.data import DATASETS, get_loaders
from zoo.deploy import ExecutorchModule, load_executorch
from zoo.errors import ZooError
from zoo.shuffle_fold import fold_channel_shuffles, has_channel_shuffles
from zoo.spec import input_size as resolve_input_size, model_name, spec_of
from zoo.weights.checkpoint import load_checkpoint, model_spec
from zoo.weights.index import list_weights

FORMATS = ("onnx", "torchscript", "executorch")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt", "executorch": ".pte"}
__all__ = ["ExecutorchModule", "export", "load_executorch", "load_torchscript", "max_abs_diff", "onnx_outputs",
           "to_executorch", "to_onnx", "to_torchscript"]
OPSET = 17


def input_shape(model: nn.Module, input_size: int | Sequence[int] | None = None, batch: int = 1) -> tuple[int, ...]:
    """(N, C, H, W) for an export: `input_size` as side or (C, H, W), else the model's default input size."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ZooError(f"batch={batch!r} is not allowed; expected an int >= 1")
    return (batch, *resolve_input_size(model, input_size))


def example_input(model: nn.Module, input_size: int | Sequence[int] | None = None, batch: int = 1,
                  seed: int = 0) -> torch.Tensor:
    """A seeded random input of the export shape."""
    return torch.randn(*input_shape(model, input_size, batch), generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def _eval_quiet(model: nn.Module) -> Iterator[None]:
    """Eval mode and no deprecation chatter from the legacy tracers; restores the training flag."""
    was_training = model.training
    model.eval()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=DeprecationWarning)
            warnings.filterwarnings("ignore", category=FutureWarning)
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
            yield
    finally:
        model.train(was_training)


@contextlib.contextmanager
def _silence_fds() -> Iterator[None]:
    """Send file descriptors 1 and 2 to a temp file: on failure the exporter's C++ side dumps its whole IR
    graph to stdout, which would bury the one-line error."""
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        saved = [os.dup(1), os.dup(2)]
    except OSError:  # no standard descriptors (e.g. a daemon): nothing to protect
        yield
        return
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 1)
        os.dup2(sink.fileno(), 2)
        try:
            yield
        finally:
            for fd, old in zip((1, 2), saved):
                os.dup2(old, fd)
                os.close(old)


def _metadata(model: nn.Module) -> dict[str, str]:
    meta: dict[str, str] = {}
    spec = spec_of(model)
    if spec is None:
        return meta
    if spec.name is not None:
        meta["zoo.spec"] = json.dumps(model_spec(model))
    for key, value in (("classes", spec.classes), ("mean", spec.mean), ("std", spec.std)):
        if value is not None:
            meta[f"zoo.{key}"] = json.dumps(value)
    for key in ("tag", "sha256", "source"):
        if key in spec.provenance:
            meta[f"zoo.{key}"] = json.dumps(spec.provenance[key])
    return meta


def _first_line(e: Exception, limit: int = 300) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: " + (text if len(text) <= limit else text[:limit] + " ...")


def _check_model(model: Any, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise ZooError(f"{fn}: expected an nn.Module, got {type(model).__name__}")


def to_onnx(model: nn.Module, path: str | os.PathLike, input_size: int | Sequence[int] | None = None,
            opset: int = OPSET, dynamic_batch: bool = True, int8: bool = False, calibration: Any = None) -> Path:
    """Export to an ONNX file (input "input", output "logits"); int8: QDQ, calibrated on `calibration` batches."""
    _check_model(model, "to_onnx")
    if int8:
        cal = deploy.calibration_inputs(calibration, "to_onnx")
        with tempfile.TemporaryDirectory() as tmp:
            fp32 = to_onnx(model, Path(tmp) / "fp32.onnx", input_size, opset, dynamic_batch)
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            return deploy.onnx_quantize_static(fp32, path, cal)
    if calibration is not None:
        raise ZooError("to_onnx: calibration is only used with int8=True")
    try:
        import onnx
    except ImportError:
        raise ZooError("to_onnx needs the onnx package: pip install 'zoo[onnx]'") from None
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    x = example_input(model, input_size)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    # ShuffleNet v2: the shuffles become weight permutations, as in to_executorch (ORT int8 3.6 -> 3.0 ms)
    graph = fold_channel_shuffles(model) if has_channel_shuffles(model) else model
    with _eval_quiet(graph), torch.no_grad(), _silence_fds():
        try:
            torch.onnx.export(graph, (x,), os.fspath(p), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"], dynamic_axes=axes)
        except Exception as e:  # the exporter's own errors (unsupported op ...) become one message
            raise ZooError(f"to_onnx: PyTorch's ONNX exporter failed for {model_name(model)}: "
                           f"{_first_line(e)}") from None
    proto = onnx.load(os.fspath(p))
    for k, v in _metadata(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, os.fspath(p))
    return p


def onnx_outputs(path: str | os.PathLike, x: torch.Tensor) -> torch.Tensor:
    """Run an exported ONNX file in onnxruntime (CPU) on `x`."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ZooError("running ONNX files needs onnxruntime: pip install 'zoo[onnx]'") from None
    try:
        sess = deploy.ort_session(path)
        (y,) = sess.run(["logits"], {"input": x.detach().cpu().numpy()})
    except Exception as e:
        raise ZooError(f"onnxruntime cannot run {str(path)!r}: {_first_line(e)}") from None
    return torch.from_numpy(y)


def to_torchscript(model: nn.Module, path: str | os.PathLike, input_size: int | Sequence[int] | None = None) -> Path:
    """Trace the model in eval mode and save it with torch.jit.save (spec in the extra files); returns the path."""
    _check_model(model, "to_torchscript")
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    x = example_input(model, input_size)
    with _eval_quiet(model), torch.no_grad():
        try:
            traced = torch.jit.trace(model, (x,), check_trace=False)
            torch.jit.save(traced, os.fspath(p), _extra_files={k: v.encode() for k, v in _metadata(model).items()})
        except Exception as e:
            raise ZooError(f"to_torchscript: tracing failed: {_first_line(e)}") from None
    return p


def to_executorch(model: nn.Module, path: str | os.PathLike, int8: bool = False, calibration: Any = None,
                  input_size: int | Sequence[int] | None = None, batch: int = 1) -> Path:
    """Write an ExecuTorch `.pte` program (XNNPACK delegate) for a fixed (batch, C, H, W); returns the path.

    int8=True quantizes with torchao PT2E and the XNNPACKQuantizer, calibrated on `calibration` (an
    iterable of input batches or (input, target) pairs; the first 8 are used). A ShuffleNet v2 is exported
    with its channel shuffles folded into the weights (zoo.shuffle_fold): same function, no runtime shuffle.
    """
    _check_model(model, "to_executorch")
    if not isinstance(int8, bool):
        raise ZooError(f"to_executorch: int8={int8!r} is not allowed; expected True or False")
    if int8:
        cal = deploy.calibration_inputs(calibration, "to_executorch")
    elif calibration is not None:
        raise ZooError("to_executorch: calibration is only used with int8=True")
    else:
        cal = None
    x = example_input(model, input_size, batch)
    data = deploy.executorch_program(model, x, int8=int8, calibration=cal)
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def load_torchscript(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """torch.jit.load a TorchScript export (trusted files only: TorchScript archives contain pickles)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return torch.jit.load(os.fspath(path), map_location="cpu")


@torch.no_grad()
def max_abs_diff(model: nn.Module, path: str | os.PathLike, x: torch.Tensor) -> float:
    """Max |exported(x) - model(x)| for an .onnx (onnxruntime), .pte (ExecuTorch) or TorchScript file."""
    with _eval_quiet(model):
        y = model(x)
    if str(path).endswith(".onnx"):
        y2 = onnx_outputs(path, x)
    elif str(path).endswith(".pte"):
        y2 = load_executorch(path)(x)
    else:
        ts = load_torchscript(path)
        with _eval_quiet(ts):
            y2 = ts(x)
    return float((y2.float() - y.float()).abs().max())


def export(model: nn.Module, fmt: str, out: str | os.PathLike, input_size: int | Sequence[int] | None = None,
           int8: bool = False, calibration: Any = None) -> Path:
    """Export in format 'onnx', 'torchscript' or 'executorch' (int8 with calibration: onnx and executorch)."""
    if fmt not in FORMATS:
        raise ZooError(f"format={fmt!r} is not allowed; allowed: {', '.join(FORMATS)}")
    if fmt == "onnx":
        return to_onnx(model, out, input_size, int8=int8, calibration=calibration)
    if fmt == "executorch":
        return to_executorch(model, out, int8=int8, calibration=calibration, input_size=input_size)
    if int8:
        raise ZooError("format='torchscript' does not take int8=True; quantize with zoo.compress.quantize first, "
                       "or use format 'onnx' / 'executorch'")
    return to_torchscript(model, out, input_size)


def _cmd_export(args: argparse.Namespace) -> int:
    name, weights = args.name, args.weights
    if name is None and weights is None:
        raise ZooError("zoo export needs a model NAME, --weights (a tag or a .safetensors file), or both")
    if name is None and weights is not None and not os.path.isfile(weights):
        hits = [e for e in list_weights(weights) if e.tag == weights]
        if len(hits) != 1:
            found = ", ".join(e.describe() for e in hits) or "none"
            raise ZooError(f"--weights {weights!r} is not a file; as a tag it matches {found}; give the model NAME "
                           f"too, e.g. `zoo export mobilenet_v1 --weights {weights}`")
        name = hits[0].architecture
        model = create(name, weights=weights, **hits[0].kwargs)
    elif name is None:
        model = load_checkpoint(weights)
    else:
        model = create(name, weights=weights) if weights is not None else create(name)
    stem = Path(weights).stem if weights is not None and os.path.isfile(weights) else (
        f"{model.spec.name}-{weights}" if weights is not None else model.spec.name)
    out = Path(args.out) if args.out else Path(stem + ("-int8" if args.int8 else "") + SUFFIX[args.format])
    if args.calibration is not None and not args.int8:
        raise ZooError("--calibration is only used with --int8")
    if not args.int8:
        export(model, args.format, out, args.input_size)
        x = example_input(model, args.input_size, batch=2, seed=1)
        diff = max_abs_diff(model, out, x)
        print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); max |{args.format} - pytorch| = {diff:.2e} on a "
              f"random batch of 2")
        return 0
    if args.calibration is None:
        raise ZooError("--int8 needs --calibration DATA, a dataset name: " + ", ".join(_calibration_sets()))
    cal, held_out = _calibration_data(model, args.calibration, args.input_size, args.calibration_batches)
    export(model, args.format, out, args.input_size, int8=True, calibration=cal)
    with _eval_quiet(model), torch.no_grad():
        ref = model(held_out)
    got = onnx_outputs(out, held_out) if args.format == "onnx" else load_executorch(out)(held_out)
    agree = float((got.argmax(1) == ref.argmax(1)).float().mean())
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); int8 top-1 agrees with pytorch fp32 on {agree:.2%} of "
          f"{len(held_out)} held-out {args.calibration} images (calibrated on {len(cal)} training batches)")
    return 0


def _calibration_sets() -> list[str]:
    """Datasets `--calibration` accepts (every registered one read from arrays, not from an image folder)."""
    return [n for n, d in DATASETS.items() if d.source is not None]


def _calibration_data(model: nn.Module, name: str, input_size: int | None, n_batches: int
                      ) -> tuple[list[torch.Tensor], torch.Tensor]:
    """`n_batches` training batches of dataset `name` and up to 256 held-out images, normalised as the
    weights were (their mean / std), at the export input size."""
    if name not in _calibration_sets():
        raise ZooError(f"--calibration {name!r} is not allowed; allowed: " + ", ".join(_calibration_sets()))
    if isinstance(n_batches, bool) or not isinstance(n_batches, int) or n_batches < 1:
        raise ZooError(f"--calibration-batches {n_batches!r} is not allowed; expected an int >= 1")
    size = input_shape(model, input_size)[1:]
    spec = spec_of(model)
    norm = {"mean": spec.mean, "std": spec.std} if spec is not None and spec.mean and spec.std else {}
    train, val, _ = get_loaders(name, size, batch_size=32, **norm)
    cal = []
    for x, _ in train:
        cal.append(x)
        if len(cal) >= n_batches:
            break
    held: list[torch.Tensor] = []
    for x, _ in val:
        held.append(x)
        if sum(len(h) for h in held) >= 256:
            break
    return cal, torch.cat(held)[:256]


def add_commands(sub: Any) -> None:
    """Add `zoo export` to the zoo CLI."""
    p = sub.add_parser("export", help="export a model (optionally with weights) to ONNX, TorchScript or ExecuTorch",
                       description="Export to ONNX (onnxruntime), TorchScript or ExecuTorch (.pte, XNNPACK); prints "
                                   "the max output difference to PyTorch on a random batch, or with --int8 the top-1 "
                                   "agreement with PyTorch fp32 on held-out images of the calibration dataset.")
    p.add_argument("name", nargs="?", default=None, help="registered model name (optional with a weights file)")
    p.add_argument("--weights", default=None, help="a weights tag (see `zoo weights list`) or a .safetensors file")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx, torchscript or executorch")
    p.add_argument("--out", default=None, help="output file (default: <weights or model>[-int8].onnx / .pt / .pte)")
    p.add_argument("--int8", action="store_true", help="onnx: QDQ int8 (onnxruntime); executorch: PT2E int8 "
                                                       "(XNNPACKQuantizer); needs --calibration")
    p.add_argument("--calibration", default=None, metavar="DATA",
                   help="dataset whose training images calibrate --int8: " + ", ".join(_calibration_sets()))
    p.add_argument("--calibration-batches", type=int, default=8, help="calibration batches of 32 images (default 8)")
    p.add_argument("--input-size", type=int, default=None, help="input side for tracing (default: the model's)")
    p.set_defaults(func=_cmd_export)
