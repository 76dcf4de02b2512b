"""Pruning criteria: how important is a weight, or a channel unit of a group.

* magnitude: L1 / L2 norm of a weight or of a unit's filters (Li et al. 2017, "Pruning Filters for
  Efficient ConvNets"; Han et al. 2015 for single weights).
* taylor: first-order saliency |w * dL/dw|, summed over a unit's parameters (Molchanov et al. 2017 /
  2019; at initialisation on one batch this is SNIP's connection sensitivity, Lee et al. 2019).
* hessian: Optimal Brain Damage saliency 1/2 * |h_ii| * w^2 (LeCun et al. 1990) with the Hessian
  diagonal h from the empirical Fisher (mean squared per-sample-group gradients) or Hutchinson's
  estimator E[z * Hz] with Rademacher z.
* loss_change: the measured |loss increase| on held-out batches when a unit's channels are removed
  (its consumers' input slices zeroed), the "oracle" of Molchanov et al. 2017.
* random: uniform scores, the baseline.

Summed channel scores (magnitude, taylor, hessian) are normalised within a group by the number of weights
each unit has, so that a group mixing filter sizes (1x1 and 3x3 filters) ranks its units fairly.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

from zoo.compress._common import batches, eval_mode, get_module
from zoo.compress.groups import Group, Member
from zoo.errors import ZooError

CRITERIA = ("magnitude", "taylor", "hessian", "loss_change", "random")
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, loss_fn: LossFn | None) -> torch.Tensor:
    out = model(x)
    return F.cross_entropy(out, y) if loss_fn is None else loss_fn(out, y)


def param_saliency(model: nn.Module, criterion: str, data: Any, loss_fn: LossFn | None = None,
                   max_batches: int | None = None, hessian: str = "fisher", seed: int = 0) -> dict[int, torch.Tensor]:
    """Per-element saliency of every parameter (keyed by id(param)) for 'taylor' or 'hessian'."""
    func = f"prune(criterion={criterion!r})"
    bs = batches(data, func, need_target=True, max_batches=max_batches)
    params = list(model.parameters())
    acc = {id(p): torch.zeros_like(p, dtype=torch.float64) for p in params}
    req = [(p, p.requires_grad) for p in params]
    dev = params[0].device if params else torch.device("cpu")
    gen = torch.Generator(device="cpu").manual_seed(seed)
    try:
        for p in params:
            p.requires_grad_(True)
        with eval_mode(model):
            for x, y in bs:
                x, y = x.to(dev), y.to(dev)
                if criterion == "taylor":
                    grads = torch.autograd.grad(_loss(model, x, y, loss_fn), params, allow_unused=True)
                    for p, g in zip(params, grads):
                        if g is not None:
                            acc[id(p)] += (p.detach() * g).abs().double()
                elif hessian == "fisher":
                    # empirical Fisher: squared gradients of up to 8 micro-batches per batch
                    chunks = max(1, min(8, x.shape[0]))
                    for xs, ys in zip(x.chunk(chunks), y.chunk(chunks)):
                        grads = torch.autograd.grad(_loss(model, xs, ys, loss_fn), params, allow_unused=True)
                        w = xs.shape[0] / x.shape[0]
                        for p, g in zip(params, grads):
                            if g is not None:
                                acc[id(p)] += 0.5 * w * (g.double() ** 2) * p.detach().double() ** 2
                else:  # Hutchinson: diag(H) ~ z * (H z), z Rademacher
                    loss = _loss(model, x, y, loss_fn)
                    grads = torch.autograd.grad(loss, params, create_graph=True, allow_unused=True)
                    used = [(p, g) for p, g in zip(params, grads) if g is not None and g.requires_grad]
                    zs = [(torch.randint(0, 2, p.shape, generator=gen).to(p) * 2 - 1) for p, _ in used]
                    hz = torch.autograd.grad([g for _, g in used], [p for p, _ in used], grad_outputs=zs,
                                             allow_unused=True)
                    for (p, _), z, h in zip(used, zs, hz):
                        if h is not None:
                            acc[id(p)] += 0.5 * (z * h).abs().double() * p.detach().double() ** 2
    finally:
        for p, r in req:
            p.requires_grad_(r)
    n = len(bs)
    return {k: v / n for k, v in acc.items()}


def _slices(mod: nn.Module, m: Member, t: torch.Tensor, name: str) -> torch.Tensor:
    """Per-unit values of tensor t (a parameter of mod named `name`) for member m: shape (units, -1)."""
    pos = m.pos
    if m.kind == "in":
        if name != "weight":
            return torch.zeros(pos.shape[0], 0, dtype=t.dtype)
        if isinstance(mod, nn.Conv2d) and mod.groups > 1:
            ob, ib = mod.out_channels // mod.groups, mod.in_channels // mod.groups
            rows = []
            for p in pos.reshape(-1).tolist():
                k, loc = divmod(p, ib)
                rows.append(t[k * ob:(k + 1) * ob, loc].reshape(-1))
            return torch.stack(rows).reshape(pos.shape[0], -1)
        cols = t[:, pos.reshape(-1)]  # (out, units*k, ...)
        cols = cols.transpose(0, 1).reshape(pos.shape[0], -1)
        return cols
    return t[pos.reshape(-1)].reshape(pos.shape[0], -1)


def unit_scores(model: nn.Module, groups: list[Group], criterion: str, data: Any = None, *, p: int = 2,
                loss_fn: LossFn | None = None, max_batches: int | None = None, hessian: str = "fisher",
                seed: int = 0) -> list[torch.Tensor | None]:
    """Score per unit of every prunable group (None for frozen groups); higher = more important."""
    live = [g if not g.frozen else None for g in groups]
    if criterion == "random":
        gen = torch.Generator().manual_seed(seed)
        return [None if g is None else torch.rand(g.size, generator=gen, dtype=torch.float64) for g in live]
    if criterion == "loss_change":
        return _loss_change(model, live, data, loss_fn, max_batches)
    sal = None
    if criterion in ("taylor", "hessian"):
        sal = param_saliency(model, criterion, data, loss_fn, max_batches, hessian, seed)
    out: list[torch.Tensor | None] = []
    for g in live:
        if g is None:
            out.append(None)
            continue
        s, count = torch.zeros(g.size, dtype=torch.float64), torch.zeros(g.size, dtype=torch.float64)
        for m in g.members:
            mod = get_module(model, m.module)
            if criterion == "magnitude":
                if m.kind not in ("out", "dw"):
                    continue
                v = _slices(mod, m, mod.weight.detach().double(), "weight")
                s.index_add_(0, m.units, v.abs().pow(p).sum(1))
                count.index_add_(0, m.units, torch.full((m.units.numel(),), float(v.shape[1]), dtype=torch.float64))
                continue
            for name in ("weight", "bias"):
                t = getattr(mod, name, None)
                if isinstance(t, torch.Tensor) and id(t) in sal:
                    v = _slices(mod, m, sal[id(t)], name)
                    s.index_add_(0, m.units, v.sum(1))
                    count.index_add_(0, m.units, torch.full((m.units.numel(),), float(v.shape[1]),
                                                            dtype=torch.float64))
        s = _per_size(s, count)
        out.append(s.pow(1.0 / p) if criterion == "magnitude" else s)
    return out


def _per_size(s: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """Scores of units with more weights (a 3x3 filter next to a 1x1 one, as in a Fire module) scaled to the
    group's mean number of weights per unit, so that mixed filter sizes compare fairly; unchanged when
    every unit has as many weights."""
    if count.numel() == 0 or bool((count == count[0]).all()):
        return s
    return s * (count.mean() / count.clamp(min=1.0))


def _loss_change(model: nn.Module, live: list[Group | None], data: Any, loss_fn: LossFn | None,
                 max_batches: int | None) -> list[torch.Tensor | None]:
    bs = batches(data, "prune(criterion='loss_change')", need_target=True, max_batches=max_batches)
    dev = next(model.parameters()).device
    bs = [(x.to(dev), y.to(dev)) for x, y in bs]

    def total() -> float:
        """Mean loss over the batches, in float64 so that tiny changes do not round away."""
        fn = loss_fn or (lambda out, t: F.cross_entropy(out.double(), t))
        return sum(float(fn(model(x), y)) * x.shape[0] for x, y in bs) / sum(x.shape[0] for x, _ in bs)

    out: list[torch.Tensor | None] = []
    with eval_mode(model), torch.no_grad():
        base = total()
        for g in live:
            if g is None:
                out.append(None)
                continue
            cons = [m for m in g.members if m.kind == "in"]
            if not cons:
                raise ZooError(f"loss_change: group {g.name!r} has no consumer layer")
            s = torch.zeros(g.size, dtype=torch.float64)
            for u in range(g.size):
                saved = []
                for m in cons:
                    mod = get_module(model, m.module)
                    for p in m.pos[m.units == u].reshape(-1).tolist():
                        idx = _in_index(mod, p)
                        saved.append((mod.weight, idx, mod.weight[idx].clone()))
                        mod.weight[idx] = 0
                s[u] = abs(total() - base)
                for w, idx, v in reversed(saved):
                    w[idx] = v
            out.append(s)
    return out


def _in_index(mod: nn.Module, p: int) -> tuple:
    """Index of the weight entries reading input channel p."""
    if isinstance(mod, nn.Conv2d) and mod.groups > 1:
        ob, ib = mod.out_channels // mod.groups, mod.in_channels // mod.groups
        k, loc = divmod(p, ib)
        return (slice(k * ob, (k + 1) * ob), loc)
    return (slice(None), p)


def weight_scores(model: nn.Module, layers: list[tuple[str, nn.Module]], criterion: str, data: Any = None, *,
                  loss_fn: LossFn | None = None, max_batches: int | None = None, hessian: str = "fisher",
                  seed: int = 0) -> list[torch.Tensor]:
    """Score per weight element of each layer (shape of its weight); higher = more important."""
    if criterion == "loss_change":
        raise ZooError("prune: criterion='loss_change' measures removing whole units; use it with "
                       "granularity='channel' (per-weight it would need one forward pass per weight)")
    if criterion == "random":
        gen = torch.Generator().manual_seed(seed)
        return [torch.rand(m.weight.shape, generator=gen, dtype=torch.float64) for _, m in layers]
    if criterion == "magnitude":
        return [m.weight.detach().abs().double().cpu() for _, m in layers]
    sal = param_saliency(model, criterion, data, loss_fn, max_batches, hessian, seed)
    return [sal[id(_weight_param(m))].cpu() for _, m in layers]


def _weight_param(m: nn.Module) -> torch.Tensor:
    """The trainable tensor behind m.weight (the parametrization's original when masked)."""
    if parametrize.is_parametrized(m, "weight"):
        return m.parametrizations.weight.original
    return m.weight
