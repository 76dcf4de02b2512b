"""Physical channel removal (Li et al. 2017, "Pruning Filters for Efficient ConvNets"), driven by the
traced channel graph (zoo.compress.graph; Fang et al. 2023's DepGraph idea).

`plan` picks the kept units (zoo.compress.select). `apply_plan` re-runs the traced graph with only those
units: every producer writes its kept channels in order, shape ops (splits, shuffles, flattens) place them,
and each layer's input is read off the run, so a channel lands wherever the pruned network will deliver
it. The run checks that every elementwise op still adds the same units, that every layer receives
exactly the kept channels it read before and that no channel changes conv group; then every conv,
linear, batch norm and option-A shortcut is sliced in place. `zero_removed` builds the masked model
the result must equal, and `rebuild_structure` recreates the smaller shapes on a fresh model.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from zoo.compress._common import get_module, set_module
from zoo.compress.graph import Mode, Sim
from zoo.compress.groups import IN_KINDS, ChannelGraph, Group
from zoo.compress.select import choose, keep_counts
from zoo.errors import ZooError
from zoo.layers import PadShortcut

OUT_SIDE = ("out", "skip_out", "dw", "bn")  # member kinds that index a layer's output channels


def plan(groups: list[Group], scores: list[torch.Tensor | None], amount: float, scope: str,
         round_to: int = 1, max_fraction: float | None = None) -> list[torch.Tensor | None]:
    """Kept units (ascending group indices) per group; None for groups left whole. `round_to` > 1 rounds
    kept counts up to a multiple; `max_fraction` caps what global scope removes from one group."""
    counts = keep_counts(groups, scores, amount, scope, max_fraction)
    return choose(groups, scores, counts, round_to)


class PrunedMode(Mode):
    """A run with only the kept units: records each layer's channels in their new order and checks them."""

    def __init__(self, cg: ChannelGraph, kept: list[torch.Tensor | None]):
        self.cg = cg
        self.removed = torch.zeros(cg.roots.numel(), dtype=torch.bool)
        self.emitted: dict[int, torch.Tensor] = {}
        for gi, k in enumerate(kept):
            if k is not None:
                g = cg.groups[gi]
                gone = torch.ones(g.size, dtype=torch.bool)
                gone[k] = False
                self.removed[g.units[gone]] = True
                self.emitted[gi] = g.units[torch.sort(k).values]
        self.seqs: dict[tuple[str, str], torch.Tensor] = {}

    def input(self, sim: Sim, node: Any) -> torch.Tensor:
        """The input's unit labels."""
        return self.cg.input_labels

    def emit(self, sim: Sim, node: Any, path: str, n: int) -> torch.Tensor:
        """The kept units of each group the producer writes, in order."""
        return torch.cat([self.emitted.get(gi, units) * 2 for gi, units in self.cg.layouts[path]])

    def member(self, sim: Sim, node: Any, path: str, kind: str, labels: torch.Tensor) -> None:
        """Record a layer's channels; an input must be exactly the kept channels it read before."""
        k = (path, kind)
        if k in self.seqs:
            if not torch.equal(self.seqs[k] >> 1, labels >> 1):
                self.fail(sim, node, f"{path!r} is called twice on different channels")
            return
        self.seqs[k] = labels
        if kind in OUT_SIDE[:2]:
            return
        old = self.cg.seq[k] >> 1
        keep = old < 0
        keep[~keep] = ~self.removed[old[~keep]]
        if not torch.equal(torch.sort(old[keep]).values, torch.sort(labels >> 1).values):
            self.fail(sim, node, f"{path!r} would not receive exactly the kept channels it read")

    def unify(self, sim: Sim, node: Any, a: torch.Tensor, b: torch.Tensor) -> None:
        """An elementwise op must still combine the same units."""
        if not torch.equal(a, b):
            self.fail(sim, node, "an elementwise op would combine different channels")

    def blocks(self, sim: Sim, node: Any, side: str, labels: torch.Tensor, blocks: torch.Tensor) -> None:
        """Every channel must stay in its conv group."""
        old_ids, old_blocks = self.cg.block_of[(sim.index[node], side)]
        lookup = torch.full((self.cg.roots.numel(),), -1, dtype=torch.long)
        ok = old_ids >= 0
        lookup[old_ids[ok]] = old_blocks[ok]
        new = labels >> 1
        ok = new >= 0
        if not torch.equal(lookup[new[ok]], blocks[ok]):
            self.fail(sim, node, f"a channel would move to another conv group ({side} side)")


def apply_plan(model: nn.Module, groups: list[Group], kept: list[torch.Tensor | None],
               index: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, Any]]:
    """Slice every layer the kept units touch (in place); return {path: new shape} for the spec.
    `index`, if given, receives each sliced layer's kept output channels (old positions, new order)."""
    cg: ChannelGraph = groups[0].graph
    run = PrunedMode(cg, kept)
    with torch.no_grad():
        cg.sim.run(run)
    kinds: dict[str, dict[str, str]] = {}
    for path, kind in cg.order:
        if kind != "input":
            kinds.setdefault(path, {})["in" if kind in IN_KINDS else "out"] = kind
    structure: dict[str, dict[str, Any]] = {}
    for path, ks in kinds.items():
        idx = {side: old_positions(cg.seq[(path, k)] >> 1, run.seqs[(path, k)] >> 1) for side, k in ks.items()}
        n_old = {side: cg.seq[(path, k)].numel() for side, k in ks.items()}
        if all(idx[s].numel() == n_old[s] and torch.equal(idx[s], torch.arange(n_old[s])) for s in idx):
            continue
        if any(i.numel() == 0 for i in idx.values()):
            raise ZooError(f"structured pruning: this would leave layer {path!r} with zero channels; "
                           "use a smaller amount")
        mod = get_module(model, path)
        if index is not None:
            index[path] = idx["out"]
        new = slice_layer(path, mod, idx["out"], idx.get("in"))
        if new is not mod:
            set_module(model, path, new)
        structure[path] = describe(new)
    return structure


def old_positions(old: torch.Tensor, new: torch.Tensor) -> torch.Tensor:
    """For each new position, the old position of its label (the j-th occurrence maps to the j-th)."""
    table: dict[int, list[int]] = {}
    for p, c in enumerate(old.tolist()):
        table.setdefault(c, []).append(p)
    used: dict[int, int] = {}
    out = []
    for c in new.tolist():
        j = used.get(c, 0)
        out.append(table[c][j])
        used[c] = j + 1
    return torch.tensor(out, dtype=torch.long)


def slice_layer(path: str, m: nn.Module, out_idx: torch.Tensor, in_idx: torch.Tensor | None) -> nn.Module:
    """Keep output channels `out_idx` and input channels `in_idx` of a layer (in place where possible)."""
    if isinstance(m, PadShortcut):
        return _slice_shortcut(m, out_idx, in_idx)
    with torch.no_grad():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            for name in ("weight", "bias", "running_mean", "running_var"):
                _set(m, name, out_idx, None)
            m.num_features = out_idx.numel()
        elif isinstance(m, nn.Linear):
            _set(m, "weight", out_idx, in_idx)
            _set(m, "bias", out_idx, None)
            m.out_features, m.in_features = out_idx.numel(), in_idx.numel()
        elif isinstance(m, nn.Conv2d):
            _slice_conv(path, m, out_idx, in_idx)
        else:
            raise ZooError(f"structured pruning: cannot slice {path!r} of type {type(m).__name__}")
    return m


def _set(m: nn.Module, name: str, rows: torch.Tensor, cols: torch.Tensor | None) -> None:
    t = getattr(m, name, None)
    if not isinstance(t, torch.Tensor):
        return
    new = t.detach()[rows.to(t.device)]
    if cols is not None:
        new = new[:, cols.to(t.device)]
    new = new.clone()
    setattr(m, name, nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new)


def _slice_conv(path: str, m: nn.Conv2d, out_idx: torch.Tensor, in_idx: torch.Tensor | None) -> None:
    if in_idx is None:  # depthwise: k filters per input channel
        k = m.out_channels // m.in_channels
        _set(m, "weight", out_idx, None)
        _set(m, "bias", out_idx, None)
        m.out_channels, m.in_channels = out_idx.numel(), out_idx.numel() // k
        m.groups = m.in_channels
        return
    g = m.groups
    if g > 1:
        w = _grouped_weight(path, m, out_idx, in_idx)
        m.weight = nn.Parameter(w, requires_grad=m.weight.requires_grad)
    else:
        _set(m, "weight", out_idx, in_idx)
    _set(m, "bias", out_idx, None)
    m.out_channels, m.in_channels = out_idx.numel(), in_idx.numel()


def _slice_shortcut(m: PadShortcut, out_idx: torch.Tensor, in_idx: torch.Tensor | None) -> PadShortcut:
    """The shortcut between the kept channels: kept input i goes where its old output channel now is,
    or nowhere if that output channel was removed (in the masked model it is dropped too, see zero_removed)."""
    in_idx = torch.arange(m.in_chs) if in_idx is None else in_idx
    new_pos = {old: new for new, old in enumerate(out_idx.tolist())}
    index = [new_pos.get(m.index[i], -1) if m.index[i] >= 0 else -1 for i in in_idx.tolist()]
    new = PadShortcut(in_idx.numel(), out_idx.numel(), m.stride, index)
    new.train(m.training)
    return new


def _grouped_weight(path: str, m: nn.Conv2d, out_idx: torch.Tensor, in_idx: torch.Tensor) -> torch.Tensor:
    g = m.groups
    ob, ib = m.out_channels // g, m.in_channels // g
    if out_idx.numel() % g or in_idx.numel() % g:
        raise ZooError(f"structured pruning: kept channels of {path!r} do not divide into its {g} conv groups")
    ob2, ib2 = out_idx.numel() // g, in_idx.numel() // g
    parts = []
    for k in range(g):
        rows = out_idx[k * ob2:(k + 1) * ob2]
        cols = in_idx[k * ib2:(k + 1) * ib2] - k * ib
        if bool(((rows // ob) != k).any()) or bool(((cols < 0) | (cols >= ib)).any()):
            raise ZooError(f"structured pruning: kept channels of {path!r} would cross its conv groups")
        parts.append(m.weight.detach()[rows][:, cols])
    return torch.cat(parts, 0).clone()


def describe(m: nn.Module) -> dict[str, Any]:
    """JSON-able shape of a conv / linear / batch-norm layer or option-A shortcut (enough to recreate it)."""
    if isinstance(m, PadShortcut):
        return {"type": "PadShortcut", "in": m.in_chs, "out": m.out_chs, "index": list(m.index)}
    if isinstance(m, nn.Conv2d):
        return {"type": "Conv2d", "in": m.in_channels, "out": m.out_channels, "groups": m.groups}
    if isinstance(m, nn.Linear):
        return {"type": "Linear", "in": m.in_features, "out": m.out_features}
    kind = "BatchNorm1d" if isinstance(m, nn.BatchNorm1d) else "BatchNorm2d"
    return {"type": kind, "num_features": m.num_features}


SHAPE_KEYS = {"PadShortcut": ("in", "out"), "Conv2d": ("in", "out", "groups"), "Linear": ("in", "out"),
              "BatchNorm1d": ("num_features",), "BatchNorm2d": ("num_features",)}


def rebuild_structure(model: nn.Module, structure: dict[str, dict[str, Any]]) -> None:
    """Recreate the recorded (smaller) layer shapes on a fresh model, in place; weights are loaded afterwards."""
    for path, d in structure.items():
        t = _check_shape(path, d)
        try:
            old = get_module(model, path)
        except AttributeError:
            raise ZooError(f"spec: the model has no layer {path!r} to resize") from None
        if t == "PadShortcut" and isinstance(old, PadShortcut):
            try:
                set_module(model, path, PadShortcut(d["in"], d["out"], old.stride, d.get("index")))
            except (TypeError, ValueError) as e:
                raise ZooError(f"spec: layer {path!r}: {e}") from None
        elif t == "Conv2d" and isinstance(old, nn.Conv2d):
            kh, kw = old.kernel_size
            _fresh(old, "weight", (d["out"], d["in"] // d["groups"], kh, kw))
            _fresh(old, "bias", (d["out"],))
            old.in_channels, old.out_channels, old.groups = d["in"], d["out"], d["groups"]
        elif t == "Linear" and isinstance(old, nn.Linear):
            _fresh(old, "weight", (d["out"], d["in"]))
            _fresh(old, "bias", (d["out"],))
            old.in_features, old.out_features = d["in"], d["out"]
        elif t in ("BatchNorm1d", "BatchNorm2d") and isinstance(old, nn.modules.batchnorm._BatchNorm):
            for name in ("weight", "bias", "running_mean", "running_var"):
                _fresh(old, name, (d["num_features"],))
            old.num_features = d["num_features"]
        else:
            raise ZooError(f"spec: cannot give {path!r} ({type(old).__name__}) the recorded shape {d!r}")


def _check_shape(path: str, d: Any) -> str:
    """The layer type of a recorded shape whose sizes are ints >= 1 (groups dividing a conv's channels)."""
    t = d.get("type") if isinstance(d, dict) else None
    if t not in SHAPE_KEYS:
        raise ZooError(f"spec: layer {path!r} has shape {d!r}; expected a type among {', '.join(SHAPE_KEYS)}")
    for k in SHAPE_KEYS[t]:
        v = d.get(k)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ZooError(f"spec: layer {path!r}: {k}={v!r} is not allowed; expected an int >= 1")
    if t == "Conv2d" and (d["in"] % d["groups"] or d["out"] % d["groups"]):
        raise ZooError(f"spec: layer {path!r}: groups={d['groups']} does not divide in={d['in']} and out={d['out']}")
    return t


def _fresh(m: nn.Module, name: str, shape: tuple[int, ...]) -> None:
    t = getattr(m, name, None)
    if isinstance(t, torch.Tensor):
        new = torch.zeros(shape, dtype=t.dtype, device=t.device)
        setattr(m, name, nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new)


def zero_removed(model: nn.Module, groups: list[Group], kept: list[torch.Tensor | None]) -> None:
    """Make the units a plan removes dead in the unpruned model (zero their filters, biases and BN
    affine, and drop option-A shortcut channels that land on them), so that the pruned model must
    compute exactly the same function: the masked model of a surgery self-check."""
    with torch.no_grad():
        for g, k in zip(groups, kept):
            if k is None:
                continue
            gone = torch.ones(g.size, dtype=torch.bool)
            gone[k] = False
            for m in g.members:
                if m.kind not in OUT_SIDE:
                    continue
                pos = m.pos[gone[m.units]].reshape(-1)
                mod = get_module(model, m.module)
                if isinstance(mod, PadShortcut):  # its identity must not revive a removed channel
                    dead = set(pos.tolist())
                    mod.set_index([-1 if o in dead else o for o in mod.index])
                    continue
                for name in ("weight", "bias"):
                    t = getattr(mod, name, None)
                    if isinstance(t, torch.Tensor):
                        t[pos.to(t.device)] = 0

