"""Physical channel removal: choose the units to keep per group, then rebuild smaller layers.

`plan` turns per-unit scores into kept units (respecting grouped-conv and channel-shuffle layouts),
`apply_plan` slices every conv / linear / batch norm touched by a group into a new, smaller module,
and `rebuild_structure` recreates those shapes on a fresh model when a pruned model is loaded.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from zoo.compress._common import get_module, set_module
from zoo.compress.groups import IN_KINDS, Group, Member
from zoo.errors import ZooError
from zoo.layers import PadShortcut


def _keep_count(n: int, amount: float) -> int:
    return n - int(round(amount * n))


def plan(groups: list[Group], scores: list[torch.Tensor | None], amount: float, scope: str,
         round_to: int = 1) -> list[torch.Tensor | None]:
    """Kept units (in their new order) per group; None for groups left untouched. `round_to` > 1 rounds
    each group's kept count up to a multiple of it (int8 / SIMD kernels prefer multiples of 8)."""
    live = [i for i, g in enumerate(groups) if not g.frozen]
    if not live:
        raise ZooError("structured pruning: this model has no prunable channel group")
    keep_n: dict[int, int] = {}
    if scope == "layer":
        for i in live:
            keep_n[i] = _keep_count(groups[i].size, amount)
    else:  # global: rank every unit of every group on per-group normalised scores
        normed, owner = [], []
        for i in live:
            s = scores[i].double()
            mean = s.abs().mean()
            normed.append(s / mean if mean > 0 else s)
            owner.append(torch.full((groups[i].size,), i))
        allv, allo = torch.cat(normed), torch.cat(owner)
        n_prune = int(round(amount * allv.numel()))
        order = torch.argsort(allv, stable=True)[:n_prune]
        pruned = torch.bincount(allo[order], minlength=len(groups))
        for i in live:
            keep_n[i] = groups[i].size - int(pruned[i])
    out: list[torch.Tensor | None] = [None] * len(groups)
    for i in live:
        g = groups[i]
        if keep_n[i] <= 0:
            raise ZooError(f"structured pruning: amount={amount:g} ({scope} scope) would remove every one of the "
                           f"{g.size} channels of {g.name!r}; use a smaller amount")
        n_keep = min(g.size, -(-keep_n[i] // round_to) * round_to)
        kept = select(g, scores[i], n_keep)
        for m in g.members:
            if not bool(torch.isin(m.units, kept).any()):
                raise ZooError(f"structured pruning: amount={amount:g} would leave layer {m.module!r} with zero "
                               "channels; use a smaller amount")
        if kept.numel() < g.size:
            out[i] = kept
    return out


def select(g: Group, score: torch.Tensor, n_keep: int) -> torch.Tensor:
    """The `n_keep` best units of a group (rounded to what its layout allows), in their new order."""
    score = score.double()
    if g.shuffle is not None:
        return _select_shuffle(g, score, n_keep)
    if g.blocks is not None:
        nb = int(g.blocks.max()) + 1
        per = max(1, int(round(n_keep / nb)))
        kept = []
        for blk in range(nb):
            idx = torch.nonzero(g.blocks == blk).flatten()
            top = idx[torch.argsort(score[idx], descending=True, stable=True)[:per]]
            kept.append(top)
        return torch.sort(torch.cat(kept)).values
    top = torch.argsort(score, descending=True, stable=True)[:n_keep]
    return torch.sort(top).values


def _select_shuffle(g: Group, score: torch.Tensor, n_keep: int) -> torch.Tensor:
    """ShuffleNet v1 bottleneck: keep c' channels per conv1 group such that after the shuffle every
    kept channel still lands in its original conv2 group (cells = (conv1 group, conv2 group))."""
    sg, _ = g.shuffle
    n = g.size
    c = n // sg
    units = torch.arange(n)
    pre_blk = units // c
    post_blk = ((units % c) * sg + pre_blk) // c
    avail = torch.zeros(sg, sg, dtype=torch.long)
    for b, k in zip(pre_blk.tolist(), post_blk.tolist()):
        avail[b, k] += 1

    def need(cp: int) -> torch.Tensor:
        """Channels each (conv1 group, conv2 group) cell must supply when c' = cp are kept per group."""
        nd = torch.zeros(sg, sg, dtype=torch.long)
        for b in range(sg):
            for j in range(cp):
                nd[b, (j * sg + b) // cp] += 1
        return nd

    target = min(c, max(1, int(round(n_keep / sg))))
    cands = sorted(range(1, c + 1), key=lambda cp: (abs(cp - target), -cp))
    cp = next(cp for cp in cands if bool((need(cp) <= avail).all()))
    nd = need(cp)
    queues: dict[tuple[int, int], list[int]] = {}
    for b in range(sg):
        for k in range(sg):
            cell = torch.nonzero((pre_blk == b) & (post_blk == k)).flatten()
            best = cell[torch.argsort(score[cell], descending=True, stable=True)[: int(nd[b, k])]]
            queues[(b, k)] = sorted(best.tolist())
    kept = []
    for b in range(sg):
        for j in range(cp):
            kept.append(queues[(b, (j * sg + b) // cp)].pop(0))
    return torch.tensor(kept, dtype=torch.long)


def member_order(m: Member, kept: torch.Tensor) -> torch.Tensor:
    """The kept units in the order this member sees them (after a channel shuffle if it has one)."""
    if m.shuffle:
        return kept.view(m.shuffle, -1).t().reshape(-1)
    return kept


def member_positions(m: Member, kept: torch.Tensor, group: Group) -> torch.Tensor:
    """New index along the member's dim: positions of its kept units, in new order (flattened k)."""
    order = member_order(m, kept)
    lookup = torch.full((group.size,), -1, dtype=torch.long)
    lookup[m.units] = torch.arange(m.units.numel())
    rows = lookup[order]
    rows = rows[rows >= 0]
    return m.pos[rows].reshape(-1)


def _dims(groups: list[Group], kept: list[torch.Tensor | None]
          ) -> dict[tuple[str, str], list[tuple[int, torch.Tensor]]]:
    """(module, dim) -> segments (sort key, new positions) contributed by the pruned groups."""
    segs: dict[tuple[str, str], list[tuple[int, torch.Tensor]]] = {}
    for g, k in zip(groups, kept):
        if k is None:
            continue
        for m in g.members:
            dim = "in" if m.kind in IN_KINDS else "out"
            segs.setdefault((m.module, dim), []).append((int(m.pos.min()), member_positions(m, k, g)))
    return segs


def _index(segs: list[tuple[int, torch.Tensor]] | None, n: int, covered: torch.Tensor | None = None) -> torch.Tensor:
    """Full new index of a dim of size n: group segments plus every uncovered position kept in place."""
    if not segs:
        return torch.arange(n)
    mask = torch.zeros(n, dtype=torch.bool)
    for _, s in segs:
        mask[s] = True
    if covered is not None:
        mask |= covered
    pieces = list(segs) + [(int(p), torch.tensor([p])) for p in torch.nonzero(~mask).flatten().tolist()]
    pieces.sort(key=lambda t: t[0])
    return torch.cat([s for _, s in pieces])


def apply_plan(model: nn.Module, groups: list[Group], kept: list[torch.Tensor | None]) -> dict[str, dict[str, Any]]:
    """Replace every touched layer by a smaller one; return {path: new shape} for the spec."""
    segs = _dims(groups, kept)
    covered: dict[tuple[str, str], torch.Tensor] = {}
    for g, k in zip(groups, kept):  # positions of pruned groups that were removed: not 'uncovered'
        if k is None:
            continue
        for m in g.members:
            key = (m.module, "in" if m.kind in IN_KINDS else "out")
            mod = get_module(model, m.module)
            n = _dim_size(mod, key[1])
            cov = covered.setdefault(key, torch.zeros(n, dtype=torch.bool))
            cov[m.pos.reshape(-1)] = True
    structure: dict[str, dict[str, Any]] = {}
    for path in sorted({p for p, _ in segs}):
        mod = get_module(model, path)
        out_idx = _index(segs.get((path, "out")), _dim_size(mod, "out"), covered.get((path, "out")))
        in_idx = _index(segs.get((path, "in")), _dim_size(mod, "in"), covered.get((path, "in")))
        new = _slice(path, mod, out_idx, in_idx)
        set_module(model, path, new)
        structure[path] = describe(new)
    return structure


def _dim_size(m: nn.Module, dim: str) -> int:
    if isinstance(m, PadShortcut):
        return m.out_chs if dim == "out" else m.in_chs
    if isinstance(m, nn.Conv2d):
        return m.out_channels if dim == "out" else m.in_channels
    if isinstance(m, nn.Linear):
        return m.out_features if dim == "out" else m.in_features
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        return m.num_features
    raise ZooError(f"structured pruning: cannot slice {type(m).__name__}")


def _slice(path: str, m: nn.Module, out_idx: torch.Tensor, in_idx: torch.Tensor) -> nn.Module:
    """A new module holding the selected output / input channels of m."""
    if isinstance(m, PadShortcut):
        return _slice_shortcut(m, out_idx, in_idx)
    with torch.no_grad():
        if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            new = type(m)(out_idx.numel(), m.eps, m.momentum, m.affine, m.track_running_stats)
            new.load_state_dict(_bn_state(m, out_idx))
        elif isinstance(m, nn.Linear):
            new = nn.Linear(in_idx.numel(), out_idx.numel(), bias=m.bias is not None)
            new.weight.copy_(m.weight[out_idx][:, in_idx])
            if m.bias is not None:
                new.bias.copy_(m.bias[out_idx])
        elif isinstance(m, nn.Conv2d):
            dw = m.groups > 1 and m.groups == m.in_channels == m.out_channels
            if dw:
                groups, w = out_idx.numel(), m.weight[out_idx]
            else:
                groups, w = m.groups, _grouped_weight(path, m, out_idx, in_idx)
            new = nn.Conv2d(in_idx.numel() if not dw else out_idx.numel(), out_idx.numel(), m.kernel_size,
                            m.stride, m.padding, m.dilation, groups, m.bias is not None, m.padding_mode)
            new.weight.copy_(w)
            if m.bias is not None:
                new.bias.copy_(m.bias[out_idx])
        else:
            raise ZooError(f"structured pruning: cannot slice {path!r} of type {type(m).__name__}")
    new.train(m.training)
    return new.to(device=m.weight.device if hasattr(m, "weight") and m.weight is not None else None)


def _slice_shortcut(m: PadShortcut, out_idx: torch.Tensor, in_idx: torch.Tensor) -> PadShortcut:
    """The shortcut between the kept channels: kept input i goes where its old output channel now is,
    or nowhere if that output channel was removed (in the masked model it is dropped too, see zero_removed)."""
    new_pos = {old: new for new, old in enumerate(out_idx.tolist())}
    index = [new_pos.get(m.index[i], -1) if m.index[i] >= 0 else -1 for i in in_idx.tolist()]
    new = PadShortcut(in_idx.numel(), out_idx.numel(), m.stride, index)
    new.train(m.training)
    return new


def _bn_state(m: nn.Module, idx: torch.Tensor) -> dict[str, torch.Tensor]:
    sd = {}
    for k, v in m.state_dict().items():
        sd[k] = v if k == "num_batches_tracked" else v[idx].clone()
    return sd


def _grouped_weight(path: str, m: nn.Conv2d, out_idx: torch.Tensor, in_idx: torch.Tensor) -> torch.Tensor:
    g = m.groups
    if g == 1:
        return m.weight[out_idx][:, in_idx]
    ob, ib = m.out_channels // g, m.in_channels // g
    if out_idx.numel() % g or in_idx.numel() % g:
        raise AssertionError(f"{path}: kept channels not divisible by groups={g}")
    ob2, ib2 = out_idx.numel() // g, in_idx.numel() // g
    parts = []
    for k in range(g):
        rows = out_idx[k * ob2:(k + 1) * ob2]
        cols = in_idx[k * ib2:(k + 1) * ib2] - k * ib
        if bool(((rows // ob) != k).any()) or bool(((cols < 0) | (cols >= ib)).any()):
            raise AssertionError(f"{path}: kept channels cross conv groups")
        parts.append(m.weight[rows][:, cols])
    return torch.cat(parts, 0)


def describe(m: nn.Module) -> dict[str, Any]:
    """JSON-able shape of a conv / linear / batch-norm layer or option-A shortcut (enough to recreate it)."""
    if isinstance(m, PadShortcut):
        return {"type": "PadShortcut", "in": m.in_chs, "out": m.out_chs, "index": list(m.index)}
    if isinstance(m, nn.Conv2d):
        return {"type": "Conv2d", "in": m.in_channels, "out": m.out_channels, "groups": m.groups}
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "in": m.in_features, "out": m.out_features}
    return {"type": type(m).__name__, "num_features": m.num_features}


def rebuild_structure(model: nn.Module, structure: dict[str, dict[str, Any]]) -> None:
    """Recreate the recorded (smaller) layer shapes on a fresh model; weights are loaded afterwards."""
    for path, d in structure.items():
        old = get_module(model, path)
        t = d["type"]
        if t == "Conv2d":
            new = nn.Conv2d(d["in"], d["out"], old.kernel_size, old.stride, old.padding, old.dilation, d["groups"],
                            old.bias is not None, old.padding_mode)
        elif t == "Linear":
            new = nn.Linear(d["in"], d["out"], bias=old.bias is not None)
        elif t in ("BatchNorm1d", "BatchNorm2d"):
            new = type(old)(d["num_features"], old.eps, old.momentum, old.affine, old.track_running_stats)
        elif t == "PadShortcut":
            new = PadShortcut(d["in"], d["out"], old.stride, d["index"])
        else:
            raise ZooError(f"spec: unknown layer type {t!r} at {path!r}")
        set_module(model, path, new)


def zero_removed(model: nn.Module, groups: list[Group], kept: list[torch.Tensor | None]) -> None:
    """Make the units a plan removes dead in the unpruned model (zero their filters, biases and BN
    affine, and drop option-A shortcut channels that land on them), so that the pruned model must
    compute exactly the same function: a surgery self-check."""
    with torch.no_grad():
        for g, k in zip(groups, kept):
            if k is None:
                continue
            gone = torch.ones(g.size, dtype=torch.bool)
            gone[k] = False
            for m in g.members:
                if m.kind in IN_KINDS:
                    continue
                sel = gone[m.units]
                pos = m.pos[sel].reshape(-1)
                mod = get_module(model, m.module)
                if isinstance(mod, PadShortcut):  # its identity must not revive a removed channel
                    dead = set(pos.tolist())
                    mod.set_index([-1 if o in dead else o for o in mod.index])
                    continue
                for name in ("weight", "bias"):
                    t = getattr(mod, name, None)
                    if isinstance(t, torch.Tensor):
                        t[pos] = 0
