"""Pruning API: unstructured weight masks and structured (physical) channel removal.

* Unstructured (granularity='weight'): a mask parametrization keeps pruned weights at exactly zero
  through fine-tuning (their gradient is masked too); `make_permanent` leaves plain weights with real
  zeros (Han et al. 2015, "Learning both Weights and Connections for Efficient Neural Networks").
* Structured (granularity='channel'): channel groups read off a traced dependency graph
  (zoo.compress.graph, after Fang et al. 2023's DepGraph) are scored and the weakest units are
  physically removed; the result is an ordinary, smaller nn.Module (Li et al. 2017). Every result is
  checked on a probe input against the masked model (the removed channels zeroed in the original).
* When to prune: at initialisation with SNIP (Lee et al. 2019, connection sensitivity |g * w| on one
  batch), one-shot, or gradually on the cubic schedule of Zhu & Gupta 2017 ("To prune, or not to
  prune") with `cubic_schedule` / `prune_iterative` and a fine-tune callback.
"""

from __future__ import annotations

import copy
import math
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from zoo.compress import criteria as C
from zoo.compress._common import (check_amount, check_choice, check_model, copy_model, eval_mode, example_input,
                                  get_module, has_parametrizations, is_quantized_model, resolve_protect, set_steps,
                                  steps, weight_layers)
from zoo.compress.groups import Group, build_groups
from zoo.compress.surgery import apply_plan, plan, zero_removed
from zoo.errors import ZooError

GRANULARITIES = ("weight", "channel")
SCOPES = ("global", "layer")
HESSIAN_ESTIMATORS = ("fisher", "hutchinson")


class WeightMask(nn.Module):
    """Parametrization: effective weight = original * mask (mask is a bool buffer)."""

    def __init__(self, mask: torch.Tensor):
        super().__init__()
        self.register_buffer("mask", mask.to(torch.bool))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The masked weight (its gradient is masked too, so pruned weights stay zero)."""
        return w * self.mask


def masked_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(path, module) of layers whose weight carries a pruning mask."""
    out = []
    for n, m in model.named_modules():
        if parametrize.is_parametrized(m, "weight") and any(isinstance(p, WeightMask)
                                                           for p in m.parametrizations.weight):
            out.append((n, m))
    return out


def _set_mask(m: nn.Module, mask: torch.Tensor) -> None:
    """Install or replace the mask of a layer and zero the pruned entries of its stored weight."""
    with torch.no_grad():
        if parametrize.is_parametrized(m, "weight"):
            pm = next(p for p in m.parametrizations.weight if isinstance(p, WeightMask))
            pm.mask.copy_(mask)
        else:
            parametrize.register_parametrization(m, "weight", WeightMask(mask.to(m.weight.device)))
        m.parametrizations.weight.original.mul_(m.parametrizations.weight[0].mask)


def make_permanent(model: nn.Module) -> nn.Module:
    """Turn weight masks into plain weights with real zeros (in place); returns the model."""
    check_model("make_permanent", model)
    for path, m in masked_layers(model):
        if len(m.parametrizations) != 1 or len(m.parametrizations.weight) != 1:
            raise ZooError(f"make_permanent: {path!r} has other parametrizations besides its pruning mask")
        # Not parametrize.remove_parametrizations: a deepcopy shares the injected class with its source,
        # and removing the class property there would break the source model's `weight`.
        w = m.weight.detach().clone()
        del m._modules["parametrizations"]
        m.__class__ = m.__class__.__bases__[0]
        m.weight = nn.Parameter(w)
    set_steps(model, [s for s in steps(model) if s.get("kind") != "mask"])
    return model


def sparsity(model: nn.Module) -> float:
    """Fraction of zero entries among the conv/linear weights (effective weights when masked)."""
    tot = zeros = 0
    for _, m in weight_layers(model):
        w = m.weight
        tot += w.numel()
        zeros += int((w == 0).sum())
    return zeros / tot if tot else 0.0


def _check_common(func: str, model: nn.Module, amount: float | Mapping[str, float], criterion: str, granularity: str,
                  scope: str, hessian: str) -> float | dict[str, float]:
    check_model(func, model)
    amount = _check_layer_amounts(func, model, amount, granularity) if isinstance(amount, Mapping) \
        else check_amount(func, amount)
    check_choice(func, "criterion", criterion, C.CRITERIA)
    check_choice(func, "granularity", granularity, GRANULARITIES)
    check_choice(func, "scope", scope, SCOPES)
    check_choice(func, "hessian", hessian, HESSIAN_ESTIMATORS)
    if is_quantized_model(model):
        raise ZooError(f"{func}: the model is already quantized; prune the float model before quantizing it")
    return amount


def _check_layer_amounts(func: str, model: nn.Module, amount: Mapping[str, float], granularity: str
                         ) -> dict[str, float]:
    """A per-layer amount: a non-empty mapping of conv/linear layer paths to fractions in (0, 1), weights only."""
    if granularity != "weight":
        raise ZooError(f"{func}: a per-layer amount (a mapping layer path -> fraction) prunes single weights; "
                       f"granularity={granularity!r} is not allowed with it, use 'weight'")
    if not amount:
        raise ZooError(f"{func}: amount={{}} is not allowed; give layer path -> fraction pairs or one float")
    layers = [n for n, _ in weight_layers(model)]
    out: dict[str, float] = {}
    for name, a in amount.items():
        if name not in layers:
            raise ZooError(f"{func}: amount names layer {name!r}, which is not a conv/linear layer of "
                           f"{type(model).__name__}; its layers: " + ", ".join(layers))
        out[name] = check_amount(f"{func}: amount[{name!r}]", a)
    return out


def prune(model: nn.Module, amount: float | Mapping[str, float], criterion: str = "magnitude",
          granularity: str = "weight", scope: str = "global", data: Any = None,
          example_inputs: torch.Tensor | None = None, *, p: int = 2, protect: Sequence[str] | None = None,
          loss_fn: C.LossFn | None = None, max_batches: int | None = None, hessian: str = "fisher", seed: int = 0,
          round_to: int | None = None, max_per_layer: float | None = None, check: bool = True,
          inplace: bool = False) -> nn.Module:
    """Prune `amount` of the weights (granularity='weight') or channel units ('channel'); or, given a per-layer
    `amount` (a mapping layer path -> fraction, weights only), each listed layer to its own fraction.

    criterion: magnitude (Lp norm, p=1 or 2) | taylor | hessian (estimator `hessian`='fisher' or
    'hutchinson') | loss_change (channel only) | random; taylor/hessian/loss_change need `data`, an
    iterable of (input, target) batches (held-out batches for loss_change). scope: 'global' ranks
    across layers, 'layer' prunes the same fraction everywhere. For 'weight', `amount` is the target
    sparsity of the prunable weights (already-masked weights count as pruned), `protect` defaults to
    ('first', 'last'). For 'channel', `amount` is the fraction of units of the current model removed;
    the image channels and class outputs are never pruned and `protect` (default none) freezes the
    channel groups a named layer belongs to; `round_to` (None: no rounding) rounds every kept channel count
    up to a multiple, as Torch-Pruning's round_to (8 suits int8 and SIMD kernels), capped at the layer's
    own count and never zero; in global scope no group loses more than `max_per_layer` of
    its units (default: all but one), the rest goes to other groups. Models not built by zoo.create
    need `example_inputs`. With `check` (default) the result is compared on a probe input with the
    masked model, and a mismatch raises a ZooError naming the first layer that differs. Returns a copy
    unless inplace=True. A per-layer amount (layer-wise rates as in Han et al. 2015) prunes the listed layers
    one after another in the mapping's order, each ranked on its own (so `scope` does not apply) with the
    other layers left as they are; `protect` does not apply either.
    """
    func = "prune"
    amount = _check_common(func, model, amount, criterion, granularity, scope, hessian)
    if p not in (1, 2):
        raise ZooError(f"prune: p={p!r} is not allowed; magnitude uses the L1 (p=1) or L2 (p=2) norm")
    round_to = _check_round_to(round_to, granularity)
    ok = max_per_layer is None or (isinstance(max_per_layer, (int, float)) and not isinstance(max_per_layer, bool)
                                   and 0.0 < max_per_layer <= 1.0)
    if not ok:
        raise ZooError(f"prune: max_per_layer={max_per_layer!r} is not allowed; expected None or a float in (0, 1]")
    if criterion in ("taylor", "hessian", "loss_change") and data is None:
        raise ZooError(f"prune: criterion={criterion!r} needs data, an iterable of (input, target) batches")
    kw = dict(loss_fn=loss_fn, max_batches=max_batches, hessian=hessian, seed=seed)
    if isinstance(amount, dict):
        if protect is not None:
            raise ZooError(f"prune: protect={protect!r} does not apply to a per-layer amount (only the listed "
                           "layers are pruned)")
        model = copy_model(model, inplace)
        layers = [n for n, _ in weight_layers(model)]
        for name, a in amount.items():
            _prune_weights(model, a, criterion, "layer", data, [n for n in layers if n != name], p, kw)
        return model
    if granularity == "weight":
        model = copy_model(model, inplace)
        _prune_weights(model, amount, criterion, scope, data, ("first", "last") if protect is None else protect, p, kw)
        return model
    if masked_layers(model) or has_parametrizations(model):
        raise ZooError("prune(granularity='channel'): the model has weight masks or weight quantizers; call "
                       "zoo.compress.make_permanent(model) first or prune channels before them")
    if any(s.get("kind") != "channels" for s in steps(model)):
        raise ZooError("prune(granularity='channel'): prune channels before low-rank or quantization steps")
    model = copy_model(model, inplace)
    groups = build_groups(model, example_inputs)
    _protect_groups(model, groups, protect or ())
    scores = C.unit_scores(model, groups, criterion, data, p=p, **kw)
    kept = plan(groups, scores, amount, scope, round_to, max_per_layer)
    ref = None
    if check:
        ref = copy.deepcopy(model)
        zero_removed(ref, groups, kept)
    index: dict[str, torch.Tensor] = {}
    apply_structure(model, groups, kept, index)
    if ref is not None:
        verify_pruned(ref, model, example_input(model, example_inputs, func), index)
    return model


def _check_round_to(round_to: object, granularity: str) -> int:
    """The channel multiple of `round_to` (1 for None), or a ZooError saying what is allowed."""
    if round_to is None:
        return 1
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ZooError(f"prune: round_to={round_to!r} is not allowed; expected None or an int >= 1 "
                       "(kept channel counts become multiples of it)")
    if granularity != "channel" and round_to > 1:
        raise ZooError(f"prune: round_to={round_to} only applies to granularity='channel' (kept channel counts); "
                       f"granularity={granularity!r} masks single weights")
    return round_to


def verify_pruned(masked: nn.Module, pruned: nn.Module, example: torch.Tensor,
                  index: dict[str, torch.Tensor] | None = None) -> None:
    """Raise a ZooError naming the first differing layer unless `pruned` equals `masked` on a probe input."""
    x = probe_input(example)
    with eval_mode(masked), eval_mode(pruned), torch.no_grad():
        a, b = masked(x), pruned(x)
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape and _close(a, b):
        return
    where = _first_mismatch(masked, pruned, x, index or {})
    raise ZooError(f"structured pruning: the pruned model differs from the masked model at {where!r} on a probe "
                   "input; the channel graph missed a dependency there (please report it)")


def probe_input(example: torch.Tensor) -> torch.Tensor:
    """The post-surgery check's probe: two standard-normal samples (seed 0) shaped like `example`."""
    gen = torch.Generator().manual_seed(0)
    return torch.randn((2,) + tuple(example.shape[1:]), generator=gen).to(example.device)


def equivalence_error(masked: nn.Module, pruned: nn.Module, example: torch.Tensor) -> float:
    """max |pruned - masked| / max |masked| on the check's probe input (inf when the outputs differ in shape)."""
    x = probe_input(example)
    with eval_mode(masked), eval_mode(pruned), torch.no_grad():
        a, b = masked(x), pruned(x)
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)) or a.shape != b.shape:
        return math.inf
    scale = float(a.abs().max()) if a.numel() else 0.0
    diff = float((a - b).abs().max()) if a.numel() else 0.0
    return diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    scale = float(a.abs().max()) if a.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=1e-3, atol=1e-4 * scale + 1e-6))


def _first_mismatch(masked: nn.Module, pruned: nn.Module, x: torch.Tensor, index: dict[str, torch.Tensor]) -> str:
    """The first layer (in call order) whose output differs between the two models."""
    outs: list[dict[str, torch.Tensor]] = [{}, {}]
    order: list[str] = []
    handles = []
    for k, model in enumerate((masked, pruned)):
        for path, m in model.named_modules():
            if path and not list(m.children()):
                def hook(mod: nn.Module, inp: Any, out: Any, path: str = path, k: int = k) -> None:
                    """Keep the first output of each layer."""
                    if isinstance(out, torch.Tensor) and path not in outs[k]:
                        outs[k][path] = out.detach()
                        if k == 0:
                            order.append(path)
                handles.append(m.register_forward_hook(hook))
    try:
        with eval_mode(masked), eval_mode(pruned), torch.no_grad():
            masked(x)
            pruned(x)
    finally:
        for h in handles:
            h.remove()
    for path in order:
        a, b = outs[0][path], outs[1].get(path)
        if b is None:
            continue
        if path in index:
            dim = -1 if isinstance(get_module(masked, path), nn.Linear) else 1
            a = a.index_select(dim, index[path].to(a.device))
        if a.shape == b.shape and not _close(a, b):  # (pass-through layers between sliced ones: not compared)
            return path
    return "the model output"


def apply_structure(model: nn.Module, groups: list[Group], kept: list[torch.Tensor | None],
                    index: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    """Remove the channels not in `kept` from the model (in place) and record the spec step."""
    structure = apply_plan(model, groups, kept, index)
    prev = [s for s in steps(model) if s.get("kind") == "channels"]
    merged = dict(prev[0]["modules"]) if prev else {}
    merged.update(structure)
    attrs = {}
    cls = getattr(model, "classifier", None)
    nf = getattr(model, "num_features", None)
    if isinstance(nf, int) and isinstance(cls, (nn.Linear, nn.Conv2d)):
        model.num_features = cls.in_features if isinstance(cls, nn.Linear) else cls.in_channels
        attrs["num_features"] = model.num_features
    set_steps(model, [{"kind": "channels", "modules": merged, "attrs": attrs}])
    return structure


def _protect_groups(model: nn.Module, groups: list[Group], protect: Sequence[str]) -> None:
    names = resolve_protect(model, protect)
    for g in groups:
        if any(m.module in names for m in g.members):
            g.frozen = g.frozen or "protected layer"


def n_pruned(amount: float, n: int) -> int:
    """Weights removed for a target sparsity: ceil(amount * n), so at most (1 - amount) * n remain."""
    return min(n, math.ceil(round(amount * n, 6)))


def _prune_weights(model: nn.Module, amount: float, criterion: str, scope: str, data: Any,
                   protect: Sequence[str], p: int, kw: dict[str, Any]) -> None:
    names = resolve_protect(model, protect)
    layers = [(n, m) for n, m in weight_layers(model) if n not in names]
    if not layers:
        raise ZooError("prune: every conv/linear layer is protected; nothing to prune")
    scores = C.weight_scores(model, layers, criterion, data, **kw)
    for i, (_, m) in enumerate(layers):  # already-pruned weights stay pruned (they go first)
        if parametrize.is_parametrized(m, "weight"):
            scores[i] = scores[i].masked_fill(~m.parametrizations.weight[0].mask.cpu(), float("-inf"))
    if scope == "global":
        flat = torch.cat([s.reshape(-1) for s in scores])
        k = n_pruned(amount, flat.numel())
        prune_idx = torch.argsort(flat, stable=True)[:k]
        keep = torch.ones(flat.numel(), dtype=torch.bool)
        keep[prune_idx] = False
        masks, off = [], 0
        for s in scores:
            masks.append(keep[off:off + s.numel()].view(s.shape))
            off += s.numel()
    else:
        masks = []
        for s in scores:
            k = n_pruned(amount, s.numel())
            keep = torch.ones(s.numel(), dtype=torch.bool)
            keep[torch.argsort(s.reshape(-1), stable=True)[:k]] = False
            masks.append(keep.view(s.shape))
    for (_, m), mask in zip(layers, masks):
        _set_mask(m, mask)
    done = {n for n, _ in masked_layers(model)}
    other = [s for s in steps(model) if s.get("kind") != "mask"]
    set_steps(model, other + [{"kind": "mask", "modules": sorted(done)}])


def snip(model: nn.Module, amount: float, data: Any, *, protect: Sequence[str] | None = None,
         loss_fn: C.LossFn | None = None, inplace: bool = False) -> nn.Module:
    """SNIP (Lee et al. 2019): prune at initialisation by connection sensitivity |g * w| on one batch."""
    return prune(model, amount, "taylor", "weight", "global", data=data, protect=protect, loss_fn=loss_fn,
                 max_batches=1, inplace=inplace)


def cubic_schedule(final_amount: float, steps_: int, initial_amount: float = 0.0) -> list[float]:
    """Zhu & Gupta 2017 sparsity targets s_t = s_f + (s_i - s_f) * (1 - t/n)^3 for t = 1..n."""
    final_amount = check_amount("cubic_schedule", final_amount)
    if isinstance(steps_, bool) or not isinstance(steps_, int) or steps_ < 1:
        raise ZooError(f"cubic_schedule: steps={steps_!r} is not allowed; expected int >= 1")
    if not (isinstance(initial_amount, (int, float)) and 0.0 <= initial_amount < final_amount):
        raise ZooError(f"cubic_schedule: initial_amount={initial_amount!r} is not allowed; expected "
                       f"0 <= initial_amount < final_amount ({final_amount:g})")
    return [final_amount + (initial_amount - final_amount) * (1 - t / steps_) ** 3 for t in range(1, steps_ + 1)]


def prune_iterative(model: nn.Module, final_amount: float | Mapping[str, float], steps: int,
                    fine_tune: Callable[[nn.Module, int], Any], criterion: str = "magnitude",
                    granularity: str = "weight", scope: str = "global", data: Any = None, *,
                    initial_amount: float = 0.0, **kwargs: Any) -> nn.Module:
    """Gradual pruning on the cubic schedule: prune to each target, then call fine_tune(model, step).

    fine_tune may train in place (return None) or return a new model. For 'weight' the targets are
    sparsities of the prunable weights; for 'channel' each step removes the fraction of the remaining
    units that brings the total to the target. A per-layer `final_amount` (a mapping layer path ->
    fraction, 'weight' only) gives each listed layer its own cubic schedule. Returns the final model
    (masks still applied for 'weight': call make_permanent when done).
    """
    if not callable(fine_tune):
        raise ZooError(f"prune_iterative: fine_tune must be callable(model, step), got {type(fine_tune).__name__}")
    if isinstance(final_amount, Mapping):
        amounts = _check_layer_amounts("prune_iterative", check_model("prune_iterative", model), final_amount,
                                       granularity)
        per_layer = {n: cubic_schedule(a, steps, initial_amount) for n, a in amounts.items()}
        for t in range(steps):
            model = prune(model, {n: s[t] for n, s in per_layer.items()}, criterion, granularity, scope, data,
                          **kwargs)
            out = fine_tune(model, t)
            model = model if out is None else out
        return model
    targets = cubic_schedule(final_amount, steps, initial_amount)
    prev = initial_amount
    for t, s in enumerate(targets):
        amount = s if granularity == "weight" else 1 - (1 - s) / (1 - prev)
        if amount > 0:
            model = prune(model, amount, criterion, granularity, scope, data, **kwargs)
        prev = s
        out = fine_tune(model, t)
        model = model if out is None else out
    return model


def channel_groups(model: nn.Module, example_inputs: torch.Tensor | None = None) -> list[Group]:
    """The channel groups structured pruning sees (for inspection and tests)."""
    return build_groups(check_model("channel_groups", model), example_inputs)


def prunable_layers(model: nn.Module, protect: Sequence[str] = ("first", "last")) -> list[tuple[str, nn.Module]]:
    """(path, module) of the conv/linear layers unstructured pruning acts on."""
    names = resolve_protect(model, protect)
    return [(n, m) for n, m in weight_layers(model) if n not in names]


def register_masks(model: nn.Module, paths: Sequence[str]) -> None:
    """Install all-ones masks on the given layers (used when loading a masked model)."""
    for path in paths:
        m = get_module(model, path)
        _set_mask(m, torch.ones_like(m.weight, dtype=torch.bool))
