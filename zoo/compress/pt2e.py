"""int8 through torchao's PT2E flow: torch.export, a backend quantizer, calibration or QAT, conversion.

Source: torchao.quantization.pt2e ("PyTorch 2 Export Quantization", the successor of the eager
torch.ao flow), with the int8 scheme of Jacob et al. 2018. Two quantizers:

* `x86_pt2e`: torchao's X86InductorQuantizer (per-channel int8 weights, uint8 activations). The
  converted model is a reference graph (quantize / dequantize ops around float ops): it is fast only
  after `compile_x86`, which runs torch.compile with inductor freezing so the q/dq patterns become
  oneDNN int8 kernels.
* `xnnpack`: ExecuTorch's XNNPACKQuantizer (symmetric per-channel int8 weights, int8 activations),
  meant for `zoo.export.to_executorch(..., int8=True)`, which lowers it to the XNNPACK delegate.

The result is a torch.fx GraphModule carrying the zoo attributes (spec, input size, weights info);
`zoo.profile`, the recipes and zoo.compress.save / load take it: `encode_state` stores the graph's
int8 weights and per-channel scales plus the activation scales and zero points (Python numbers inside
the graph) as tensors; `rebuild` replays export + prepare + convert from the spec on zeros, and
`load_state` puts the stored values back, so a reload gives identical outputs. A QAT model is stored
only after `convert`.
"""

from __future__ import annotations

import contextlib
import copy
import types
import warnings
from typing import Any, Iterator

import torch
import torch._inductor.config as inductor_config
import torch.nn as nn
from torch.nn.modules.module import _IncompatibleKeys

from zoo.compress._common import add_step, eval_mode, steps
from zoo.errors import ZooError
from zoo.spec import input_size, model_name, spec_of

PT2E_BACKENDS = ("x86_pt2e", "xnnpack")
INSTALL_HINT = "pip install 'zoo[deploy]'"
MAX_BATCH = 4096
ZOO_ATTRS = ("in_chans", "num_classes", "fixed_input_size", "min_input_size")  # ZooModel attributes a graph keeps


@contextlib.contextmanager
def quiet_export() -> Iterator[None]:
    """Silence the deprecation / tracing chatter of torch.export, torchao and ExecuTorch in zoo's calls."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _torchao_pt2e() -> Any:
    try:
        from torchao.quantization.pt2e import quantize_pt2e
    except ImportError:
        raise ZooError(f"the PT2E int8 backends need torchao: {INSTALL_HINT}") from None
    return quantize_pt2e


def make_quantizer(backend: str, qat: bool = False, dynamic: bool = False, reduce_range: bool = False) -> Any:
    """The torchao quantizer of a PT2E backend ('x86_pt2e' or 'xnnpack'), per-channel int8 weights;
    `reduce_range` (x86 only): 7-bit activations for CPUs without VNNI."""
    if backend == "x86_pt2e":
        _torchao_pt2e()
        from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xq

        cfg = xq.get_default_x86_inductor_quantization_config(is_qat=qat, is_dynamic=dynamic,
                                                              reduce_range=reduce_range)
        if dynamic:  # dynamic int8 is for Linear layers only (as the eager 'dynamic' method)
            return xq.X86InductorQuantizer().set_module_type_qconfig(nn.Linear, cfg)
        return xq.X86InductorQuantizer().set_global(cfg)
    if backend == "xnnpack":
        try:
            with quiet_export():
                from executorch.backends.xnnpack.quantizer import xnnpack_quantizer as xn
        except ImportError:
            raise ZooError(f"backend='xnnpack' needs executorch: {INSTALL_HINT}") from None
        cfg = xn.get_symmetric_quantization_config(is_per_channel=True, is_qat=qat, is_dynamic=dynamic)
        if dynamic:
            return xn.XNNPACKQuantizer().set_module_type(nn.Linear, cfg)
        return xn.XNNPACKQuantizer().set_global(cfg)
    raise ZooError(f"PT2E backend={backend!r} is not allowed; allowed: " + ", ".join(PT2E_BACKENDS))


def _train(self: nn.Module, mode: bool = True) -> nn.Module:
    """train() / eval() of an exported graph: torchao switches its dropout and batch-norm ops, then the
    flags are set as nn.Module.train would (torchao's own replacement returns None and keeps the flags)."""
    from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

    (move_exported_model_to_train if mode else move_exported_model_to_eval)(self)
    for m in self.modules():
        m.training = mode
    return self


def _eval(self: nn.Module) -> nn.Module:
    return _train(self, False)


def copy_attrs(src: nn.Module, dst: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
    """Give a graph a copy of `src`'s spec (zoo.spec), its ZooModel attributes and a working train()/eval();
    with the `example` it was traced on, the one input side it accepts."""
    dst.train = types.MethodType(_train, dst)  # profile / recipes call .eval() and .train()
    dst.eval = types.MethodType(_eval, dst)
    if spec_of(src) is not None:
        dst.spec = copy.deepcopy(spec_of(src))  # a copy: recording a step on the graph leaves `src` as it was
    for a in ZOO_ATTRS:
        if hasattr(src, a):
            setattr(dst, a, getattr(src, a))
    if example is not None and example.dim() == 4 and example.shape[2] == example.shape[3]:
        dst.fixed_input_size = int(example.shape[2])  # the graph is specialised to the side it was traced at
    return dst


def capture(model: nn.Module, example: torch.Tensor, train: bool = False) -> torch.fx.GraphModule:
    """torch.export the model on `example` (eval mode unless `train`) and return the graph module."""
    was = model.training
    model.train(train)
    try:
        with quiet_export():
            batch = torch.export.Dim("batch", min=1, max=MAX_BATCH)  # calibrate and run at any batch size
            if example.shape[0] == 1:  # a batch-1 example would specialise the batch dimension to 1
                example = example.expand(2, *example.shape[1:]).contiguous()
            gm = torch.export.export(model, (example,), dynamic_shapes=({0: batch},)).module()
    except Exception as e:
        name = model_name(model)
        raise ZooError(f"torch.export failed for {name}: {type(e).__name__}: {str(e).splitlines()[0][:240]}") from None
    finally:
        model.train(was)
    return gm


def quantize_static(model: nn.Module, backend: str, calibration: list[torch.Tensor],
                    dynamic: bool = False, reduce_range: bool = False) -> torch.fx.GraphModule:
    """Post-training int8 (static: calibrated on the batches; dynamic: Linear weights only) through PT2E."""
    q = _torchao_pt2e()
    quantizer = make_quantizer(backend, dynamic=dynamic, reduce_range=reduce_range)
    example = calibration[0] if calibration else _zeros(model)
    with quiet_export(), torch.no_grad():
        prepared = q.prepare_pt2e(capture(model, example), quantizer)
        for x in calibration or [example]:  # dynamic: one pass so the weight observers see the weights
            prepared(x)
        out = q.convert_pt2e(prepared)
    return copy_attrs(model, out, example)


def prepare_qat(model: nn.Module, backend: str, calibration: list[torch.Tensor] | None,
                reduce_range: bool = False) -> torch.fx.GraphModule:
    """A fake-quant PT2E graph in train mode, to fine-tune; finish with `convert_qat`."""
    q = _torchao_pt2e()
    example = calibration[0] if calibration else _zeros(model)
    with quiet_export():
        quantizer = make_quantizer(backend, qat=True, reduce_range=reduce_range)
        prepared = q.prepare_qat_pt2e(capture(model, example, train=True), quantizer)
    copy_attrs(model, prepared, example)
    if calibration:
        with quiet_export(), eval_mode(prepared), torch.no_grad():
            for x in calibration:
                prepared(x)
    return prepared.train()


def convert_qat(model: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """Turn a fine-tuned PT2E fake-quant graph into its int8 reference graph."""
    q = _torchao_pt2e()
    _train(model, False)
    with quiet_export(), torch.no_grad():
        out = q.convert_pt2e(model)
    return copy_attrs(model, out)


def _zeros(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """Zeros of the model's default input size: placeholder calibration data."""
    if spec_of(model) is None or spec_of(model).input_size is None:
        raise ZooError("quantize: the model was not built by zoo.create; pass calibration batches")
    return torch.zeros(batch, *input_size(model))


def run(model: nn.Module, method: str, backend: str, cal: list[torch.Tensor] | None,
        reduce_range: bool = False) -> nn.Module:
    """zoo.compress.quantize's PT2E branch: static / dynamic / qat on a float model; records the spec step."""
    if method == "static":
        out = quantize_static(model, backend, cal or [], reduce_range=reduce_range)
    elif method == "dynamic":
        out = quantize_static(model, backend, [], dynamic=True, reduce_range=reduce_range)
    else:
        out = prepare_qat(model, backend, cal, reduce_range=reduce_range)
    step: dict[str, Any] = {"kind": "int8", "method": method, "backend": backend, "reduce_range": reduce_range}
    if method == "qat":
        step["converted"] = False
    add_step(out, step)
    return out


def is_pt2e(model: nn.Module) -> bool:
    """True if the model's last int8 step was made by a PT2E backend."""
    st = steps(model)
    return any(isinstance(s, dict) and s.get("kind") == "int8" and s.get("backend") in PT2E_BACKENDS for s in st)


QPARAM_OPS = ("quantized_decomposed.quantize_per_tensor.default", "quantized_decomposed.dequantize_per_tensor.default")
QPARAMS_KEY = "pt2e/qparams"


def _qparam_nodes(gm: torch.fx.GraphModule) -> list[torch.fx.Node]:
    return [n for n in gm.graph.nodes if n.op == "call_function" and str(n.target) in QPARAM_OPS]


def _attr_nodes(gm: torch.fx.GraphModule) -> list[str]:
    out = []
    for n in gm.graph.nodes:
        if n.op == "get_attr" and isinstance(_fetch(gm, n.target), torch.Tensor) and n.target not in out:
            out.append(n.target)
    return out


def _fetch(gm: nn.Module, target: str) -> Any:
    obj: Any = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def check_savable(model: nn.Module) -> None:
    """Raise ZooError for a PT2E QAT model not yet converted: only converted int8 graphs are stored."""
    st = steps(model)
    if st and st[-1].get("backend") in PT2E_BACKENDS and st[-1].get("converted") is False:
        raise ZooError("save: a PT2E QAT model is stored after zoo.compress.convert, not while it trains "
                       "(its fake-quant graph has no stable storage form); convert it first")


def encode_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a converted PT2E graph: every tensor it reads (int8 weights, per-channel scales and
    zero points, biases) by graph attribute name, and the activation (scale, zero point) pairs that the
    graph holds as Python numbers, in graph order, as one float64 tensor."""
    check_savable(model)
    out = {f"pt2e/{t}": _fetch(model, t).detach().cpu().contiguous().clone() for t in _attr_nodes(model)}
    rows = [[float(n.args[1]), float(n.args[2])] for n in _qparam_nodes(model)]
    out[QPARAMS_KEY] = torch.tensor(rows, dtype=torch.float64).reshape(-1, 2)
    return out


def load_state(model: torch.fx.GraphModule, tensors: dict[str, torch.Tensor]) -> Any:
    """Load `encode_state` tensors into a graph rebuilt from the same spec (ZooError when they do not fit);
    returns load_state_dict's (missing, unexpected) keys result, both empty."""
    names = _attr_nodes(model)
    want = {f"pt2e/{t}" for t in names} | {QPARAMS_KEY}
    if set(tensors) != want:
        extra, missing = sorted(set(tensors) - want)[:3], sorted(want - set(tensors))[:3]
        raise ZooError(f"load: the PT2E tensors do not fit the rebuilt graph (unexpected {extra}, missing {missing})")
    nodes = _qparam_nodes(model)
    qp = tensors[QPARAMS_KEY]
    if tuple(qp.shape) != (len(nodes), 2):
        raise ZooError(f"load: {tuple(qp.shape)} activation qparams stored, the rebuilt graph has {len(nodes)}")
    with torch.no_grad():
        for t in names:
            cur, new = _fetch(model, t), tensors[f"pt2e/{t}"]
            if cur.shape != new.shape or cur.dtype != new.dtype:
                raise ZooError(f"load: PT2E tensor {t!r} is {new.dtype} {tuple(new.shape)}, the graph expects "
                               f"{cur.dtype} {tuple(cur.shape)}")
            cur.copy_(new)
    for n, (scale, zp) in zip(nodes, qp.tolist()):
        n.args = (n.args[0], scale, int(zp), *n.args[3:])
    model.recompile()
    return _IncompatibleKeys([], [])


def rebuild(model: nn.Module, step: dict[str, Any]) -> nn.Module:
    """The graph a recorded PT2E step produced, with placeholder values (load_state fills them in)."""
    if step["method"] == "qat" and not step.get("converted"):
        raise ZooError("load: PT2E QAT models are stored only after conversion")
    zeros = [_zeros(model, batch=2)]
    if step["method"] == "qat":
        out = convert_qat(prepare_qat(model, step["backend"], zeros, step.get("reduce_range", False)))
    else:
        out = quantize_static(model, step["backend"], [] if step["method"] == "dynamic" else zeros,
                              dynamic=step["method"] == "dynamic", reduce_range=step.get("reduce_range", False))
    return _train(out, False)


class CompiledX86:
    """An x86_pt2e int8 graph compiled by inductor with freezing (oneDNN int8 kernels), as a callable.

    Every call runs under inductor's `freezing=True`: a recompile (a new input shape, or a dynamo reset
    by a later torch.export, e.g. an ExecuTorch lowering) would otherwise build the unfrozen reference
    graph, measured 7-10x slower on resnet18 (25 vs 3.4 ms at batch 1, 2 threads).
    """

    def __init__(self, model: nn.Module):
        """Wrap `model` (a converted x86_pt2e graph) in torch.compile; compiled lazily on the first call."""
        self._compiled = torch.compile(model)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Forward under no_grad with inductor freezing on."""
        with quiet_export(), inductor_config.patch(freezing=True), torch.no_grad():
            return self._compiled(x)


def compile_x86(model: nn.Module, example: torch.Tensor) -> CompiledX86:
    """torch.compile an x86_pt2e int8 graph with inductor freezing (oneDNN int8 kernels); warmed on `example`."""
    compiled = CompiledX86(model)
    compiled(example)
    return compiled
