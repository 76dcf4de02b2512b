"""Per-op and per-layer-type rules of the traced channel graph (zoo.compress.graph).

Registered by op name and by layer type, in the style of Torch-Pruning's pruner registry (Fang et al.
2023, "DepGraph: Towards Any Structural Pruning"), but each rule maps label tensors to label tensors so
that the same rule serves the trace, the slot search and the final pruned run:

* producers (Conv2d, Linear, PadShortcut) read their input channels as an 'in' member and *emit* new
  labels for their outputs; a depthwise conv and a batch norm pass channels through ('dw', 'bn');
  a grouped conv marks the conv group of every channel on both sides;
* shape ops run on the labels; elementwise ops align (unify) their operands' units; pools, pads and
  spatial means keep channels; reductions or normalisations across channels freeze the units they mix;
* an op that maps a removed (zero) channel to a non-zero value (sigmoid, + constant, a batch norm
  without affine) *taints* it: a tainted channel that reaches a conv, a linear or the output freezes.

`register_module_rule(cls, rule)` / `register_function_rule(name, rule)` add rules for other layers.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
from torch.ao.quantization import DeQuantStub, QuantStub

from zoo.layers import PadShortcut

ZERO, CONST = -2, -1
Rule = Callable[..., Any]
MODULE_RULES: dict[type, Rule] = {}
FUNCTION_RULES: dict[str, Rule] = {}
ALIASES = {"iadd": "add", "isub": "sub", "imul": "mul", "truediv": "div", "itruediv": "div", "true_divide": "div",
           "multiply": "mul", "divide": "div", "subtract": "sub", "concat": "cat", "concatenate": "cat",
           "clip": "clamp", "swapaxes": "transpose", "swapdims": "transpose", "moveaxis": "movedim",
           "absolute": "abs", "negative": "neg"}


def register_module_rule(cls: type, rule: Rule) -> None:
    """Use `rule(sim, node, path, module, labels) -> labels` for layers of type `cls` (and subclasses)."""
    MODULE_RULES[cls] = rule


def register_function_rule(name: str, rule: Rule) -> None:
    """Use `rule(sim, node, name, args, kwargs) -> value` for the op called `name` (function or method)."""
    FUNCTION_RULES[name] = rule


def module_rule(m: nn.Module) -> Rule | None:
    """The rule for a layer, looked up along its class hierarchy."""
    for c in type(m).__mro__:
        if c in MODULE_RULES:
            return MODULE_RULES[c]
    return None


def function_rule(name: str) -> Rule | None:
    """The rule for an op name."""
    return FUNCTION_RULES.get(name)


# --- label helpers ---------------------------------------------------------------------------------
def ids(t: torch.Tensor) -> torch.Tensor:
    """Unit ids of labels (-1 for constants)."""
    return t >> 1


def taint(t: torch.Tensor) -> torch.Tensor:
    """Labels marked non-zero-when-removed (constant zero becomes constant non-zero)."""
    return torch.where(t >= 0, t | 1, torch.full_like(t, CONST))


def clean(t: torch.Tensor) -> torch.Tensor:
    """Labels after a layer whose removed channels are zeroed (weights and bias): taint cleared."""
    return torch.where(t >= 0, t & ~1, t)


def spread(codes: torch.Tensor, shape: list[int] | tuple[int, ...], dim: int) -> torch.Tensor:
    """Per-channel labels broadcast to `shape` along `dim`."""
    view = [1] * len(shape)
    view[dim] = codes.numel()
    shape = list(shape)
    shape[dim] = codes.numel()
    return codes.view(view).expand(shape).contiguous()


def channels(sim: Any, node: Any, x: torch.Tensor, dim: int) -> torch.Tensor:
    """Labels per position along `dim`, which must be constant over every other dim; the units of a
    position that mixes several labels are frozen and the position gets the constant label."""
    if x.dim() == 0:
        sim.mode.fail(sim, node, "a scalar where channels were expected")
    y = x.movedim(dim, -1).reshape(-1, x.shape[dim])
    u = ids(y)
    hi, lo = u.amax(0), u.amin(0)
    mixed = hi != lo
    if bool(mixed.any()):
        sim.mode.freeze(u[:, mixed].reshape(-1), f"channels mixed by a reshape before {where_of(node)!r}")
    t = (y & 1).amax(0)
    const = torch.where((y == ZERO).all(0), ZERO, CONST)
    return torch.where(mixed, CONST, torch.where(hi >= 0, hi * 2 + t, const))


def where_of(node: Any) -> str:
    """The module path a node belongs to (see zoo.compress.graph.where)."""
    if node.op == "call_module":
        return str(node.target)
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else "the model's forward"


def produce(sim: Any, node: Any, path: str, n: int, dim: int, kind: str = "out") -> tuple[torch.Tensor, torch.Tensor]:
    """Emit a producer's output labels (n channels in the traced model) and record its member."""
    codes = sim.mode.emit(sim, node, path, n)
    sim.mode.member(sim, node, path, kind, codes)
    return spread(codes, sim.shape(node), dim), codes


def grouped(sim: Any, node: Any, side: str, codes: torch.Tensor, g: int) -> None:
    """Mark the conv group of every channel on one side of a grouped conv."""
    n = codes.numel()
    if n % g:
        sim.mode.fail(sim, node, f"{n} channels do not split into {g} conv groups", codes, fatal=False)
        return
    sim.mode.blocks(sim, node, side, codes, torch.arange(n) // (n // g))


def mix(sim: Any, node: Any, x: torch.Tensor, dims: list[int], what: str) -> torch.Tensor:
    """An op that mixes elements along `dims`: units whose labels vary along them are frozen."""
    u = ids(x)
    dims = [d % max(1, x.dim()) for d in dims]
    if dims and bool((u.amax(dims, keepdim=True) != u.amin(dims, keepdim=True)).any()):
        sim.mode.freeze(u.reshape(-1), f"mixed across channels by {what} in {where_of(node)!r}")
    return taint(x)


# --- layer rules -------------------------------------------------------------------------------------
def conv2d_rule(sim: Any, node: Any, path: str, m: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Dense / grouped conv: reads 'in', emits 'out'; depthwise conv (k outputs per input): 'dw'."""
    if x.dim() != 4:
        sim.mode.fail(sim, node, "a Conv2d on a tensor that is not (N, C, H, W)")
    codes = channels(sim, node, x, 1)
    if m.groups > 1 and m.groups == m.in_channels:
        k = m.out_channels // m.in_channels
        out = clean(codes)
        if m.bias is not None:
            out = torch.where(out == ZERO, CONST, out)
        out = out.repeat_interleave(k)
        sim.mode.member(sim, node, path, "dw", out)
        return spread(out, sim.shape(node), 1)
    sim.mode.member(sim, node, path, "in", codes)
    if m.groups > 1:
        grouped(sim, node, "in", codes, m.groups)
    y, out = produce(sim, node, path, m.out_channels, 1)
    if m.groups > 1:
        grouped(sim, node, "out", out, m.groups)
    return y


def linear_rule(sim: Any, node: Any, path: str, m: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """Reads its last dim as 'in', emits 'out' along it."""
    sim.mode.member(sim, node, path, "in", channels(sim, node, x, -1))
    return produce(sim, node, path, m.out_features, -1)[0]


def batchnorm_rule(sim: Any, node: Any, path: str, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Per-channel affine ('bn'): zeroed for removed channels unless it has no affine (then tainted)."""
    codes = channels(sim, node, x, 1)
    sim.mode.member(sim, node, path, "bn", codes)
    out = clean(codes) if getattr(m, "affine", False) else taint(codes)
    act = getattr(m, "act", None)  # timm's BatchNormAct2d applies an activation after the affine
    if isinstance(act, nn.Module) and module_rule(act) is not passthrough_rule:
        out = taint(out)
    return spread(out, x.shape, 1)


def pad_shortcut_rule(sim: Any, node: Any, path: str, m: PadShortcut, x: torch.Tensor) -> torch.Tensor:
    """Option-A shortcut: a channel routing (input i -> output index[i]) that surgery rewrites, so its
    inputs ('skip_in') and outputs ('skip_out') are separate channels, like a weightless 1x1 conv."""
    sim.mode.member(sim, node, path, "skip_in", channels(sim, node, x, 1))
    return produce(sim, node, path, m.out_chs, 1, "skip_out")[0]


def passthrough_rule(sim: Any, node: Any, path: str, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Elementwise layer with f(0) = 0 (ReLU, Hardswish, Dropout, Identity, ...)."""
    lo, hi = getattr(m, "min_val", None), getattr(m, "max_val", None)  # Hardtanh / ReLU6
    if isinstance(lo, (int, float)) and not (lo <= 0 <= hi):
        return taint(x)
    if isinstance(m, nn.PReLU) and m.num_parameters > 1:
        sim.mode.freeze(ids(x).reshape(-1), f"per-channel PReLU weights of {path!r}")
    return x


def taint_rule(sim: Any, node: Any, path: str, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Elementwise layer with f(0) != 0 (Sigmoid, Hardsigmoid, Softplus)."""
    return taint(x)


def spatial_rule(sim: Any, node: Any, path: str, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Pools, pads and upsampling: each channel stays itself."""
    out = spread(channels(sim, node, x, 1), sim.shape(node), 1)
    return taint(out) if getattr(m, "value", 0) else out


def reshape_module_rule(sim: Any, node: Any, path: str, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Flatten / Unflatten / ChannelShuffle / PixelShuffle layers: run on the labels."""
    if not isinstance(m, nn.Flatten):
        sim.mode.sensitive(x)
    try:
        return m(x)
    except Exception as e:  # noqa: BLE001
        sim.mode.fail(sim, node, f"cannot reshape {tuple(x.shape)} channels ({e})")


def norm_module_rule(sim: Any, node: Any, path: str, m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm / GroupNorm / LocalResponseNorm / Softmax: freeze the units they mix."""
    if isinstance(m, nn.LayerNorm):
        dims = list(range(-len(m.normalized_shape), 0))
    elif isinstance(m, (nn.Softmax, nn.LogSoftmax)):
        dims = [m.dim if m.dim is not None else 1]
    else:
        dims = list(range(1, x.dim()))
    return mix(sim, node, x, dims, type(m).__name__)


for _cls in (nn.ReLU, nn.Hardtanh, nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.GELU, nn.SiLU, nn.Mish,
             nn.Hardswish, nn.Tanh, nn.Softsign, nn.Hardshrink, nn.Softshrink, nn.Tanhshrink, nn.PReLU,
             nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
             nn.FeatureAlphaDropout, QuantStub, DeQuantStub):
    register_module_rule(_cls, passthrough_rule)
for _cls in (nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.LogSigmoid):
    register_module_rule(_cls, taint_rule)
for _cls in (nn.MaxPool1d, nn.MaxPool2d, nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
             nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.Upsample, nn.ZeroPad2d, nn.ConstantPad2d,
             nn.ReflectionPad2d, nn.ReplicationPad2d):
    register_module_rule(_cls, spatial_rule)
for _cls in (nn.Flatten, nn.Unflatten, nn.ChannelShuffle, nn.PixelShuffle, nn.PixelUnshuffle):
    register_module_rule(_cls, reshape_module_rule)
for _cls in (nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.Softmax, nn.LogSoftmax, nn.Softmax2d):
    register_module_rule(_cls, norm_module_rule)
register_module_rule(nn.Conv2d, conv2d_rule)
register_module_rule(nn.Linear, linear_rule)
register_module_rule(nn.modules.batchnorm._BatchNorm, batchnorm_rule)
register_module_rule(PadShortcut, pad_shortcut_rule)


# --- op rules ------------------------------------------------------------------------------------------
def run_op(node: Any, args: tuple, kwargs: dict) -> Any:
    """Evaluate a call_function / call_method node on the given values."""
    if node.op == "call_method":
        return getattr(args[0], str(node.target))(*args[1:], **kwargs)
    return node.target(*args, **kwargs)


def leaves(obj: Any) -> list[Any]:
    """Leaves of nested tuples / lists / dicts."""
    if isinstance(obj, (tuple, list)):
        return [x for o in obj for x in leaves(o)]
    if isinstance(obj, dict):
        return [x for o in obj.values() for x in leaves(o)]
    return [obj]


IDENTITY_OPS = ("contiguous", "clone", "detach", "to", "float", "double", "half", "bfloat16", "type", "type_as",
                "cpu", "cuda", "requires_grad")
FREE_SHAPE_OPS = ("flatten", "cat", "unsqueeze")  # their result does not depend on how many channels are kept
SHAPE_OPS = ("view", "reshape", "transpose", "permute", "squeeze", "t", "chunk", "split", "tensor_split",
             "unbind", "narrow", "getitem", "stack", "expand", "expand_as", "movedim", "unflatten", "repeat",
             "roll", "flip", "channel_shuffle", "pixel_shuffle", "pixel_unshuffle", "view_as", "reshape_as")
META_OPS = ("size", "dim", "numel", "getattr")


def shape_op_rule(sim: Any, node: Any, name: str, args: tuple, kwargs: dict) -> Any:
    """Shape ops run on the labels themselves (so a shuffle or a split lands each unit where it goes)."""
    if name in IDENTITY_OPS:  # dtype / device / copies: the labels stay (made contiguous for later views)
        return args[0].contiguous()
    if name == "getitem" and not isinstance(args[0], torch.Tensor):
        return args[0][args[1]]
    if name == "getitem" and any(isinstance(t, torch.Tensor) for t in leaves(args[1])):
        sim.mode.fail(sim, node, "indexing with a tensor")
    if name not in FREE_SHAPE_OPS:
        for t in leaves((args, kwargs)):
            if isinstance(t, torch.Tensor):
                sim.mode.sensitive(t)
    try:
        return run_op(node, args, kwargs)
    except Exception as e:  # noqa: BLE001 - e.g. a view with a hard-coded channel count
        shapes = [tuple(t.shape) for t in leaves(args) if isinstance(t, torch.Tensor)]
        sim.mode.fail(sim, node, f"cannot apply it to {shapes} ({type(e).__name__}: {e})")


def meta_rule(sim: Any, node: Any, name: str, args: tuple, kwargs: dict) -> Any:
    """size(), dim(), .shape, ... read from the labels (same shapes as the real tensors)."""
    out = run_op(node, args, kwargs)
    if isinstance(out, torch.Tensor):  # .T, .data, .mT: tensors again
        sim.mode.sensitive(args[0])
    return out


def creation_rule(sim: Any, node: Any, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """zeros_like, new_zeros, ones_like, ...: constant labels of the (pruned) shape."""
    out = run_op(node, args, kwargs)
    fill_pos = 1 if name == "full_like" else 2
    fill = args[fill_pos] if len(args) > fill_pos else kwargs.get("fill_value", 1)
    zero = "zeros" in name or (name in ("full_like", "new_full") and not fill)
    return torch.full(out.shape, ZERO if zero else CONST, dtype=torch.int64)


def passthrough_fn(sim: Any, node: Any, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """Elementwise f with f(0) = 0; clamp / hardtanh / pow check their arguments."""
    x = args[0]
    if name in ("clamp", "hardtanh", "clamp_min", "clamp_max"):
        lo = args[1] if len(args) > 1 else kwargs.get("min", kwargs.get("min_val", -1 if name == "hardtanh" else None))
        hi = args[2] if len(args) > 2 else kwargs.get("max", kwargs.get("max_val", 1 if name == "hardtanh" else None))
        if name == "clamp_max":
            lo, hi = None, lo
        if isinstance(lo, torch.Tensor) or isinstance(hi, torch.Tensor):
            sim.mode.fail(sim, node, "clamping with tensor bounds")
        if (lo is not None and lo > 0) or (hi is not None and hi < 0):
            return taint(x)
    if name == "pow":
        e = args[1] if len(args) > 1 else kwargs.get("exponent")
        if isinstance(e, torch.Tensor):
            sim.mode.fail(sim, node, "a power with a tensor exponent")
        if e <= 0:
            return taint(x)
    return x


def taint_fn(sim: Any, node: Any, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """Elementwise f with f(0) != 0."""
    return taint(args[0])


def _scalar_op(sim: Any, node: Any, name: str, t: torch.Tensor, s: Any, tensor_first: bool) -> torch.Tensor:
    if not isinstance(s, (int, float, bool)):
        sim.mode.fail(sim, node, f"an elementwise op with a {type(s).__name__}")
    if name == "mul":
        return t if s != 0 else torch.full_like(t, ZERO)
    if name == "div" and not tensor_first:  # s / x: a removed (zero) channel would divide by zero
        sim.mode.freeze(ids(t).reshape(-1), f"divisor in {where_of(node)!r}")
        return taint(t)
    if name == "div":
        return t
    if name == "maximum":
        return taint(t) if s > 0 else t
    if name == "minimum":
        return taint(t) if s < 0 else t
    return taint(t) if s != 0 else t  # add / sub


def elementwise_rule(sim: Any, node: Any, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """add / sub / mul / div / maximum / minimum: aligned units are unified (they must be pruned together)."""
    a = args[0]
    b = args[1] if len(args) > 1 else kwargs.get("other")
    if not isinstance(b, torch.Tensor):
        return _scalar_op(sim, node, name, a, b, True)
    if not isinstance(a, torch.Tensor):
        return _scalar_op(sim, node, name, b, a, False)
    for c, other in ((a, b), (b, a)):  # a per-element constant (a parameter) cannot follow a pruned tensor
        if c.numel() > 1 and bool((c < 0).all()) and bool((other >= 0).any()):
            sim.mode.freeze(ids(other).reshape(-1), f"combined with a constant tensor in {where_of(node)!r}")
    try:
        A, B = torch.broadcast_tensors(a, b)
    except RuntimeError as e:
        sim.mode.fail(sim, node, f"operands {tuple(a.shape)} and {tuple(b.shape)} do not broadcast ({e})")
    ia, ib = ids(A), ids(B)
    both = (ia >= 0) & (ib >= 0)
    sim.mode.unify(sim, node, ia[both], ib[both])
    ta, tb = A & 1, B & 1  # constants: ZERO -> 0, CONST -> 1
    if name == "div":
        sim.mode.freeze(ib.reshape(-1), f"divisor in {where_of(node)!r}")
        t = ta
    else:
        t = ta & tb if name == "mul" else ta | tb
    out = torch.where(ia >= 0, ia, ib)
    return torch.where(out >= 0, out * 2 + t, torch.where(t == 1, CONST, ZERO))


def spatial_fn(sim: Any, node: Any, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """Pools, interpolation and spatial padding keep every channel itself."""
    x = args[0]
    if name == "pad":
        pad = args[1] if len(args) > 1 else kwargs["pad"]
        if len(pad) > 2 * (x.dim() - 2):
            sim.mode.fail(sim, node, "padding the channel dim")
        value = args[3] if len(args) > 3 else kwargs.get("value", 0)
        out = spread(channels(sim, node, x, 1), sim.shape(node), 1)
        return taint(out) if value else out
    return spread(channels(sim, node, x, 1), sim.shape(node), 1)


def reduce_rule(sim: Any, node: Any, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """mean / sum / amax / amin / std / var: fine over spatial dims; across channels the units are frozen
    (a mean's divisor counts removed channels; a sum only needs its removed channels to be zero)."""
    x = args[0]
    dim = args[1] if len(args) > 1 else kwargs.get("dim")
    keep_pos = 3 if name in ("std", "var") else 2
    keep = args[keep_pos] if len(args) > keep_pos else kwargs.get("keepdim", False)
    if isinstance(dim, int):
        dim = [dim]
    dims = list(range(x.dim())) if dim is None or len(dim) == 0 else [d % x.dim() for d in dim]
    u = ids(x)
    hi, lo = u.amax(dims, keepdim=keep), u.amin(dims, keepdim=keep)
    mixed = hi != lo
    if bool(mixed.any()):
        bad = u[(x & 1) == 1] if name == "sum" else u
        sim.mode.freeze(bad.reshape(-1), f"reduced across channels by {name} in {where_of(node)!r}")
    t = (x & 1).amax(dims, keepdim=keep)
    return torch.where(mixed | (hi < 0), CONST, hi * 2 + t)


def mix_fn(sim: Any, node: Any, name: str, args: tuple, kwargs: dict) -> torch.Tensor:
    """softmax / layer_norm / group_norm / normalize / local_response_norm: freeze the units they mix."""
    x = args[0]
    if name in ("softmax", "log_softmax", "normalize"):
        pos = 2 if name == "normalize" else 1
        dims = [args[pos] if len(args) > pos else kwargs.get("dim", 1)]
    elif name == "layer_norm":
        shape = args[1] if len(args) > 1 else kwargs["normalized_shape"]
        dims = list(range(-len(shape), 0))
    else:
        dims = list(range(1, x.dim()))
    return mix(sim, node, x, dims, name)


for _n in SHAPE_OPS + FREE_SHAPE_OPS + IDENTITY_OPS:
    register_function_rule(_n, shape_op_rule)
for _n in META_OPS:
    register_function_rule(_n, meta_rule)
for _n in ("zeros_like", "ones_like", "full_like", "empty_like", "rand_like", "randn_like", "new_zeros", "new_ones",
           "new_full", "new_empty"):
    register_function_rule(_n, creation_rule)
for _n in ("relu", "relu6", "hardtanh", "leaky_relu", "elu", "celu", "selu", "gelu", "silu", "mish", "hardswish",
           "tanh", "softsign", "dropout", "dropout1d", "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout",
           "neg", "abs", "sqrt", "square", "erf", "sin", "sign", "clamp", "clamp_min", "clamp_max", "pow",
           "hardshrink", "softshrink", "tanhshrink", "expm1", "log1p", "identity"):
    register_function_rule(_n, passthrough_fn)
for _n in ("sigmoid", "hardsigmoid", "exp", "cos", "softplus", "log", "reciprocal", "rsqrt", "logsigmoid", "cosh"):
    register_function_rule(_n, taint_fn)
for _n in ("add", "sub", "mul", "div", "maximum", "minimum"):
    register_function_rule(_n, elementwise_rule)
for _n in ("adaptive_avg_pool1d", "adaptive_avg_pool2d", "adaptive_max_pool1d", "adaptive_max_pool2d", "avg_pool1d",
           "avg_pool2d", "max_pool1d", "max_pool2d", "interpolate", "upsample", "pad"):
    register_function_rule(_n, spatial_fn)
for _n in ("mean", "sum", "amax", "amin", "std", "var"):
    register_function_rule(_n, reduce_rule)
for _n in ("softmax", "log_softmax", "layer_norm", "group_norm", "normalize", "local_response_norm"):
    register_function_rule(_n, mix_fn)
