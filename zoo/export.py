"""Export zoo models for deployment: ONNX (onnxruntime) and TorchScript (trace), with output checks.

ONNX uses PyTorch's TorchScript-based exporter (`dynamo=False`): the default dynamo exporter of
torch >= 2.9 needs onnxscript, which zoo does not depend on. Both exporters trace the model in eval
mode, with a dynamic batch dimension; the zoo spec, class names and normalisation go into the file's
metadata.

int8 (torch.ao eager-converted models): TorchScript works for every family (outputs identical). ONNX
writes QDQ graphs (int8 weights, QuantizeLinear/DequantizeLinear that onnxruntime fuses) and works for
LeNet/MLP, MobileNet v1, ResNet, SqueezeNet and ShuffleNet v1 (within a few output quantisation
steps of PyTorch); it fails with one ZooError for MobileNet v2 (no ONNX symbolic for quantized::relu6)
and ShuffleNet v2 (channel split = Slice of a quantized tensor). See tests/test_export.py.
A TorchScript file is a zip of pickles: a deployment format, never zoo's storage format.
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

from zoo.errors import ZooError

FORMATS = ("onnx", "torchscript")
SUFFIX = {"onnx": ".onnx", "torchscript": ".pt"}
OPSET = 17


def input_shape(model: nn.Module, input_size: int | Sequence[int] | None = None, batch: int = 1) -> tuple[int, ...]:
    """(N, C, H, W) for an export: `input_size` as side or (C, H, W), else the model's default input size."""
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ZooError(f"batch={batch!r} is not allowed; expected an int >= 1")
    c = getattr(model, "in_chans", 3)
    if input_size is None:
        size = tuple(getattr(model, "default_input_size", (c, 224, 224)))
    elif isinstance(input_size, int) and not isinstance(input_size, bool):
        size = (c, input_size, input_size)
    else:
        size = tuple(input_size)
    if len(size) != 3 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in size):
        raise ZooError(f"input_size={input_size!r} is not allowed; expected a side (int) or (C, H, W) positive ints")
    fixed = getattr(model, "fixed_input_size", None)
    if fixed is not None and size[1:] != (fixed, fixed):
        raise ZooError(f"input_size={input_size!r} is not allowed; this model needs exactly {fixed}x{fixed} inputs")
    smallest = getattr(model, "min_input_size", 1)
    if min(size[1:]) < smallest:
        raise ZooError(f"input_size={input_size!r} is not allowed; this model needs sides >= {smallest}")
    return (batch, *size)


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
    if hasattr(model, "zoo_name"):
        from zoo.io import model_spec

        meta["zoo.spec"] = json.dumps(model_spec(model))
    info = getattr(model, "zoo_weights", None) or {}
    for key in ("classes", "mean", "std", "tag", "sha256", "source"):
        if key in info:
            meta[f"zoo.{key}"] = json.dumps(info[key])
    return meta


def _first_line(e: Exception, limit: int = 300) -> str:
    lines = str(e).strip().splitlines()
    text = lines[0] if lines else ""
    return f"{type(e).__name__}: " + (text if len(text) <= limit else text[:limit] + " ...")


def _check_model(model: Any, fn: str) -> None:
    if not isinstance(model, nn.Module):
        raise ZooError(f"{fn}: expected an nn.Module, got {type(model).__name__}")


def to_onnx(model: nn.Module, path: str | os.PathLike, input_size: int | Sequence[int] | None = None,
            opset: int = OPSET, dynamic_batch: bool = True) -> Path:
    """Export to an ONNX file (input "input", output "logits"); returns the path."""
    _check_model(model, "to_onnx")
    try:
        import onnx
    except ImportError:
        raise ZooError("to_onnx needs the onnx package: pip install 'zoo[onnx]'") from None
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    x = example_input(model, input_size)
    axes = {"input": {0: "batch"}, "logits": {0: "batch"}} if dynamic_batch else None
    with _eval_quiet(model), torch.no_grad(), _silence_fds():
        try:
            torch.onnx.export(model, (x,), os.fspath(p), dynamo=False, opset_version=opset,
                              input_names=["input"], output_names=["logits"], dynamic_axes=axes)
        except Exception as e:  # the exporter's own errors (unsupported op ...) become one message
            what = getattr(model, "zoo_name", type(model).__name__)
            raise ZooError(f"to_onnx: PyTorch's ONNX exporter failed for {what}: {_first_line(e)}") from None
    proto = onnx.load(os.fspath(p))
    for k, v in _metadata(model).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = k, v
    onnx.save(proto, os.fspath(p))
    return p


def onnx_outputs(path: str | os.PathLike, x: torch.Tensor) -> torch.Tensor:
    """Run an exported ONNX file in onnxruntime (CPU) on `x`."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise ZooError("running ONNX files needs onnxruntime: pip install 'zoo[onnx]'") from None
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, torch.get_num_threads())
    try:
        sess = ort.InferenceSession(os.fspath(path), opts, providers=["CPUExecutionProvider"])
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


def load_torchscript(path: str | os.PathLike) -> torch.jit.ScriptModule:
    """torch.jit.load a TorchScript export (trusted files only: TorchScript archives contain pickles)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        return torch.jit.load(os.fspath(path), map_location="cpu")


@torch.no_grad()
def max_abs_diff(model: nn.Module, path: str | os.PathLike, x: torch.Tensor) -> float:
    """Max |exported(x) - model(x)| for an .onnx (onnxruntime) or TorchScript file, model in eval mode."""
    with _eval_quiet(model):
        y = model(x)
    if str(path).endswith(".onnx"):
        y2 = onnx_outputs(path, x)
    else:
        ts = load_torchscript(path)
        with _eval_quiet(ts):
            y2 = ts(x)
    return float((y2.float() - y.float()).abs().max())


def export(model: nn.Module, fmt: str, out: str | os.PathLike, input_size: int | Sequence[int] | None = None) -> Path:
    """Export in format 'onnx' or 'torchscript'."""
    if fmt not in FORMATS:
        raise ZooError(f"format={fmt!r} is not allowed; allowed: {', '.join(FORMATS)}")
    return to_onnx(model, out, input_size) if fmt == "onnx" else to_torchscript(model, out, input_size)


def _cmd_export(args: argparse.Namespace) -> int:
    from zoo._registry import create
    from zoo.weights import read_checkpoint
    from zoo.weights.index import list_weights

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
        ckpt = read_checkpoint(weights)
        if ckpt.spec is None:
            raise ZooError(f"{weights!r} has no zoo.spec header; give the model NAME too")
        model = create(ckpt.spec["name"], weights=weights)
    else:
        model = create(name, weights=weights) if weights is not None else create(name)
    stem = Path(weights).stem if weights is not None and os.path.isfile(weights) else (
        f"{model.zoo_name}-{weights}" if weights is not None else model.zoo_name)
    out = Path(args.out) if args.out else Path(stem + SUFFIX[args.format])
    export(model, args.format, out, args.input_size)
    x = example_input(model, args.input_size, batch=2, seed=1)
    diff = max_abs_diff(model, out, x)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB); max |{args.format} - pytorch| = {diff:.2e} on a "
          f"random batch of 2")
    return 0


def add_commands(sub: Any) -> None:
    """Add `zoo export` to the zoo CLI."""
    p = sub.add_parser("export", help="export a model (optionally with weights) to ONNX or TorchScript",
                       description="Export to ONNX (onnxruntime) or TorchScript; prints the max output difference "
                                   "to PyTorch on a random batch.")
    p.add_argument("name", nargs="?", default=None, help="registered model name (optional with a weights file)")
    p.add_argument("--weights", default=None, help="a weights tag (see `zoo weights list`) or a .safetensors file")
    p.add_argument("--format", required=True, choices=FORMATS, help="onnx or torchscript")
    p.add_argument("--out", default=None, help="output file (default: <weights or model>.onnx / .pt)")
    p.add_argument("--input-size", type=int, default=None, help="input side for tracing (default: the model's)")
    p.set_defaults(func=_cmd_export)
