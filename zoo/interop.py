"""Interop with torchvision and timm: convert their models (or state dicts) into the zoo model of the
same architecture, so reference weights can be used, profiled, compressed and exported by zoo.

The mapping is structural, not by key names: both models' stateful layers (conv, batch norm, linear)
are listed in registration order and paired one to one; each pair must agree in type and in every
hyper-parameter (channels, kernel, stride, padding, groups, bias, eps), otherwise the conversion fails
naming the first differing layers. With `check=True` both must also use the same activation types
(ReLU and ReLU6 agree on small activations, so outputs alone can miss that) and, run in eval mode on
one seeded random input, agree to 1e-5 (relative to the output scale). timm's mobilenetv1_100 uses
ReLU6 where the paper uses ReLU, so it maps to zoo's mobilenet_v1 built with act="relu6".
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any, Callable

import torch
import torch.nn as nn

from zoo._registry import create
from zoo.errors import ZooError
from zoo.spec import model_name

# torchvision builder -> (zoo model, zoo kwargs)
TORCHVISION: dict[str, tuple[str, dict[str, Any]]] = {
    **{f"resnet{d}": (f"resnet{d}", {}) for d in (18, 34, 50, 101, 152)},
    "mobilenet_v2": ("mobilenet_v2", {}),
    "squeezenet1_0": ("squeezenet1_0", {}),
    "squeezenet1_1": ("squeezenet1_1", {}),
    **{f"shufflenet_v2_x{w.replace('.', '_')}": ("shufflenet_v2", {"width": float(w)})
       for w in ("0.5", "1.0", "1.5", "2.0")},
}
# torchvision class name -> builders to try when no name is given
_TV_CLASSES = {"ResNet": [n for n in TORCHVISION if n.startswith("resnet")], "MobileNetV2": ["mobilenet_v2"],
               "SqueezeNet": ["squeezenet1_0", "squeezenet1_1"],
               "ShuffleNetV2": [n for n in TORCHVISION if n.startswith("shufflenet")]}
# timm architecture -> (zoo model, zoo kwargs)
TIMM: dict[str, tuple[str, dict[str, Any]]] = {
    "mobilenetv1_100": ("mobilenet_v1", {"width": 1.0, "act": "relu6"}),  # timm uses ReLU6
    "mobilenetv2_100": ("mobilenet_v2", {"width": 1.0}),
    **{f"resnet{d}": (f"resnet{d}", {}) for d in (18, 34, 50, 101, 152)},
}
CHECK_RTOL = 1e-5  # allowed max |zoo - reference| relative to max(1, max |reference|)
_ACTS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish, nn.Hardsigmoid, nn.GELU, nn.Sigmoid, nn.LeakyReLU)


def _stateful(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules that own parameters or buffers, in registration order."""
    out = []
    for name, mod in model.named_modules():
        if any(True for _ in mod.parameters(recurse=False)) or any(True for _ in mod.buffers(recurse=False)):
            out.append((name, mod))
    return out


def _layer_config(mod: nn.Module) -> tuple[str, dict[str, Any]]:
    if isinstance(mod, nn.Conv2d):
        return "Conv2d", {"in": mod.in_channels, "out": mod.out_channels, "kernel": mod.kernel_size,
                          "stride": mod.stride, "padding": mod.padding, "dilation": mod.dilation,
                          "groups": mod.groups, "bias": mod.bias is not None, "padding_mode": mod.padding_mode}
    if isinstance(mod, nn.BatchNorm2d):
        return "BatchNorm2d", {"features": mod.num_features, "eps": mod.eps, "affine": mod.affine,
                               "running_stats": mod.track_running_stats}
    if isinstance(mod, nn.Linear):
        return "Linear", {"in": mod.in_features, "out": mod.out_features, "bias": mod.bias is not None}
    return type(mod).__name__, {"tensors": sorted((k, tuple(v.shape)) for k, v in mod.state_dict().items()
                                                  if "." not in k)}


def _fmt(kind: str, cfg: dict[str, Any], keys: list[str]) -> str:
    return f"{kind}(" + ", ".join(f"{k}={cfg[k]}" for k in keys) + ")"


def _acts(model: nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules() if isinstance(m, _ACTS)}


def transfer(ref: nn.Module, model: nn.Module, source: str = "reference") -> nn.Module:
    """Copy `ref`'s parameters and buffers into the zoo `model`, pairing layers structurally."""
    a, b = _stateful(ref), _stateful(model)
    problems = []
    for (na, ma), (nb, mb) in zip(a, b):
        (ka, ca), (kb, cb) = _layer_config(ma), _layer_config(mb)
        if ka != kb:
            problems.append(f"{source} {na or '<root>'} is {ka} but zoo {nb} is {kb}")
        elif ca != cb:
            diff = [k for k in ca if ca[k] != cb.get(k)]
            problems.append(f"{source} {na} {_fmt(ka, ca, diff)} vs zoo {nb} {_fmt(kb, cb, diff)}")
        if len(problems) >= 3:
            break
    if len(a) != len(b) and not problems:
        problems.append(f"{source} has {len(a)} layers with weights, zoo {model_name(model)} has "
                        f"{len(b)}")
    if problems:
        raise ZooError(f"cannot map {source} weights onto zoo {model_name(model)}: "
                       + "; ".join(problems))
    state: dict[str, torch.Tensor] = {}
    for (na, ma), (nb, mb) in zip(a, b):
        own = dict(ma.named_parameters(recurse=False))
        own.update(dict(ma.named_buffers(recurse=False)))
        for k, v in own.items():
            if v is not None:
                state[f"{nb}.{k}" if nb else k] = v.detach().clone()  # never share storage with `ref`
    expected = {k for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    if set(state) != expected:
        missing = sorted(expected - set(state))[:3]
        extra = sorted(set(state) - expected)[:3]
        raise ZooError(f"cannot map {source} weights onto zoo {model_name(model)}: "
                       f"unfilled zoo tensors {missing}, unused {source} tensors {extra}")
    model.load_state_dict(state, strict=True, assign=True)  # assign: `model` may live on the meta device
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ZooError(f"cannot map {source} weights onto zoo {model_name(model)}: {left[:3]} were not filled")
    return model


def _check(ref: nn.Module, model: nn.Module, source: str) -> None:
    """Fail unless both use the same activations and agree on a seeded random input in eval mode."""
    keep = "; pass check=False to keep the converted model anyway (e.g. as a fine-tuning start)"
    acts_ref, acts_zoo = _acts(ref), _acts(model)
    if acts_ref != acts_zoo:  # e.g. ReLU vs ReLU6 agree on small activations, so outputs alone can miss it
        raise ZooError(f"zoo {model_name(model)} does not reproduce {source} although every weight was mapped: "
                       f"the activations differ ({source} uses {', '.join(sorted(acts_ref))}, zoo "
                       f"{model_name(model)} uses {', '.join(sorted(acts_zoo))}){keep}")
    with torch.no_grad():
        ref.eval()
        model.eval()
        side = max(32, getattr(model, "min_input_size", 32))
        x = torch.randn(1, getattr(model, "in_chans", 3), side, side, generator=torch.Generator().manual_seed(0))
        x = x.to(next(model.parameters()).device)
        y_ref, y = ref(x), model(x)
    scale = max(1.0, float(y_ref.abs().max()))
    err = float((y - y_ref).abs().max())
    if not err <= CHECK_RTOL * scale:
        raise ZooError(f"zoo {model_name(model)} does not reproduce {source}: max |difference| {err:.3g} on outputs "
                       f"of scale {scale:.3g} although every weight was mapped{keep}")


def _builder(lib: str, arch: str) -> Callable[..., nn.Module]:
    if lib == "timm":
        import timm

        return lambda **kw: timm.create_model(arch, pretrained=False, **kw)
    import torchvision.models as tvm

    return lambda in_chans=3, **kw: getattr(tvm, arch)(**kw)


@functools.lru_cache(maxsize=None)
def _layout(lib: str, arch: str) -> tuple[str, dict[str, tuple[int, ...]]]:
    """(name of the last layer, key -> shape) of a reference architecture, built once on the meta device."""
    with torch.device("meta"):
        probe = _builder(lib, arch)()
    return _stateful(probe)[-1][0], {k: tuple(v.shape) for k, v in probe.state_dict().items()}


def _fits(lib: str, arch: str, state: Mapping[str, torch.Tensor]) -> tuple[int, int] | None:
    """(num_classes, in_chans) if `state` has the architecture's keys and shapes (head and stem may vary)."""
    last, shapes = _layout(lib, arch)
    if set(shapes) != set(state):
        return None
    first = next(k for k, v in shapes.items() if len(v) == 4)  # the stem conv's weight
    head = (f"{last}.weight", f"{last}.bias")
    for k, want in shapes.items():
        got = tuple(state[k].shape)
        if got == want:
            continue
        if k in head and got[1:] == want[1:]:
            continue
        if k == first and lib == "timm" and got[0] == want[0] and got[2:] == want[2:]:
            continue
        return None
    return int(state[f"{last}.weight"].shape[0]), int(state[first].shape[1])


def _reference(lib: str, arch: str, module: nn.Module | None, state: Mapping[str, torch.Tensor],
               num_classes: int, in_chans: int) -> nn.Module:
    """The user's module, or for a bare state dict the reference architecture holding those tensors."""
    if module is not None:
        return module
    with torch.device("meta"):
        ref = _builder(lib, arch)(num_classes=num_classes, in_chans=in_chans)
    ref.load_state_dict(dict(state), assign=True, strict=True)
    return ref


def _as_state(obj: Any, fn: str) -> tuple[nn.Module | None, dict[str, torch.Tensor]]:
    if isinstance(obj, nn.Module):
        return obj, {k: v for k, v in obj.state_dict().items()}
    if isinstance(obj, Mapping) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                for k, v in obj.items()):
        return None, {k: v.detach().cpu() for k, v in obj.items()}
    raise ZooError(f"{fn}: expected an nn.Module or a non-empty state dict of tensors, got {type(obj).__name__}")


def _convert(ref: nn.Module, name: str, kwargs: dict[str, Any], source: str, check: bool) -> nn.Module:
    first = next((m for m in ref.modules() if isinstance(m, nn.Conv2d)), None)
    in_chans = first.in_channels if first is not None else 3
    last = _stateful(ref)[-1][1]
    num_classes = last.out_features if isinstance(last, nn.Linear) else getattr(last, "out_channels", None)
    if num_classes is None:
        raise ZooError(f"{source}: cannot tell the number of classes from its last layer {type(last).__name__}")
    with torch.device("meta"):  # no time spent initialising tensors that transfer() replaces
        model = create(name, num_classes=num_classes, in_chans=in_chans, **kwargs)
    transfer(ref, model, source)
    if check:
        _check(ref, model, source)
    model.spec.provenance = {"source": source}
    return model


def _pick(fn: str, name: str | None, table: dict[str, Any], candidates: list[str]) -> list[str]:
    if name is not None:
        if name not in table:
            raise ZooError(f"{fn}: name={name!r} is not supported; supported: {', '.join(table)}")
        return [name]
    return candidates


def _convert_first(fn: str, lib: str, table: Mapping[str, tuple[str, dict[str, Any]]], candidates: list[str],
                   module: nn.Module | None, state: Mapping[str, torch.Tensor], check: bool) -> nn.Module:
    """Convert with the first candidate architecture whose keys and shapes fit the state dict."""
    for arch in candidates:
        fit = _fits(lib, arch, state)
        if fit is None:
            continue
        ref = _reference(lib, arch, module, state, *fit)
        name, kwargs = table[arch]
        return _convert(ref, name, kwargs, f"{lib} {arch}", check)
    raise ZooError(f"{fn}: the tensors do not match {lib} {', '.join(candidates)} (keys or shapes differ)")


def from_torchvision(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], name: str | None = None,
                     check: bool = True) -> nn.Module:
    """The zoo model equivalent to a torchvision model or state dict, carrying its weights.

    `name` is the torchvision builder (e.g. "resnet50", "shufflenet_v2_x0_5"); if omitted it is found
    from the model class and the tensor shapes. Supported: the keys of zoo.interop.TORCHVISION.
    """
    fn = "from_torchvision"
    module, state = _as_state(model_or_state_dict, fn)
    if module is not None and name is None:
        cls = type(module).__name__
        if cls not in _TV_CLASSES:
            raise ZooError(f"{fn}: torchvision {cls} is not supported; supported: {', '.join(TORCHVISION)}")
        candidates = _TV_CLASSES[cls]
    else:
        candidates = _pick(fn, name, TORCHVISION, list(TORCHVISION))
    return _convert_first(fn, "torchvision", TORCHVISION, candidates, module, state, check)


def from_timm(model_or_state_dict: nn.Module | Mapping[str, torch.Tensor], name: str | None = None,
              check: bool = True) -> nn.Module:
    """The zoo model equivalent to a timm model or state dict, carrying its weights.

    `name` is the timm architecture (e.g. "mobilenetv1_100"); a timm model knows its own. Supported: the
    keys of zoo.interop.TIMM. timm's mobilenetv1_100 becomes mobilenet_v1(act="relu6") (timm uses ReLU6).
    """
    fn = "from_timm"
    module, state = _as_state(model_or_state_dict, fn)
    if module is not None and name is None:
        cfg = getattr(module, "pretrained_cfg", None) or {}
        name = cfg.get("architecture")
        if name is None:
            raise ZooError(f"{fn}: {type(module).__name__} does not say which timm architecture it is; pass name=")
    if name is None:
        candidates = list(TIMM)
    else:
        candidates = _pick(fn, name, TIMM, [])
    return _convert_first(fn, "timm", TIMM, candidates, module, state, check)
