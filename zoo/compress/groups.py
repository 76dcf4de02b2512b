"""Channel groups for structured pruning, read off the traced channel graph (zoo.compress.graph).

The dependency-graph idea of Torch-Pruning (Fang et al. 2023, "DepGraph: Towards Any Structural
Pruning"), built from the computation rather than from module names: a *unit* is a class of output
channels that elementwise ops tie together (every add of a ResNet stage, a squeeze-excite gate and
the channels it scales); a *group* is the set of units written by the same producers (convs, linears,
option-A shortcuts), in the order its first producer writes them. Its *members* are every layer slice
that holds its units: 'out' filters, 'in' input channels (k positions per unit after a flatten),
depthwise 'dw' filters, 'bn' entries, and the 'skip_in' / 'skip_out' channels of a PadShortcut
(He et al. 2016's option-A shortcut, a routing that surgery rewrites).

A group is *free* when any kept count works and its units are interchangeable: no channel split,
view, shuffle or grouped conv sees it. Otherwise zoo.compress.select searches kept counts and
units that the traced graph can realise, for all the groups of its *component* (groups that share a
tensor) together. Frozen groups (model input and output, units mixed by a norm or tainted, layouts
the graph cannot follow) keep every unit; `frozen` says why.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from zoo.compress._common import example_input
from zoo.compress.graph import Sim, TraceMode, build_trace

OUT_KINDS = ("out", "skip_out")  # members that create a group's channels
IN_KINDS = ("in", "skip_in")  # members that index a layer's input channels
KINDS = ("out", "in", "dw", "bn", "skip_in", "skip_out")


@dataclass
class Member:
    """One layer slice of a group: `units[i]` (index into the group) sits at positions `pos[i]` (k per unit)
    of the layer's output ('out', 'dw', 'bn', 'skip_out') or input ('in', 'skip_in') channels."""

    module: str
    kind: str
    units: torch.Tensor
    pos: torch.Tensor


@dataclass(eq=False)
class Group:
    """A set of `size` coupled channel units with its members (frozen: the reason it may not be pruned)."""

    name: str
    size: int
    members: list[Member] = field(default_factory=list)
    frozen: str = ""
    free: bool = True
    component: int = -1
    grain: int = 1  # kept counts that are multiples of it fit every grouped conv the group meets
    units: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long), repr=False)
    graph: Any = field(default=None, repr=False)


class ChannelGraph:
    """The traced graph with its units mapped to groups: what the search and the surgery re-run."""

    def __init__(self, sim: Sim, tm: TraceMode):
        self.sim = sim
        self.roots = tm.uf.roots()
        n = self.roots.numel()
        self.gid = torch.full((n,), -1, dtype=torch.long)  # group of a unit (indexed by root atom id)
        self.local = torch.full((n,), -1, dtype=torch.long)  # index of a unit within its group
        self.seq = {k: self.unit_labels(v) for k, v in tm.records.items()}  # (path, kind) -> unit labels
        self.order = list(tm.order)
        self.input_labels = self.unit_labels(tm.input_labels)
        self.block_of = {k: (self.unit_labels(v[0]) >> 1, v[1]) for k, v in tm.block_of.items()}
        self.layouts: dict[str, list[tuple[int, torch.Tensor]]] = {}
        self.groups: list[Group] = []

    def unit_labels(self, codes: torch.Tensor) -> torch.Tensor:
        """Atom labels -> unit labels (2 * root + taint); constants unchanged."""
        ok = codes >= 0
        safe = torch.where(ok, codes >> 1, torch.zeros_like(codes))
        return torch.where(ok, self.roots[safe] * 2 + (codes & 1), codes)


def build_groups(model: nn.Module, example_inputs: torch.Tensor | None = None) -> list[Group]:
    """All channel groups of a model (frozen ones included, with the reason in `frozen`)."""
    x = example_input(model, example_inputs, "structured pruning")
    sim, tm = build_trace(model, x)
    cg = ChannelGraph(sim, tm)
    _make_groups(cg)
    _freeze(cg, tm)
    _members(cg)
    _layouts(cg)
    _components(cg, tm)
    return cg.groups


def _make_groups(cg: ChannelGraph) -> None:
    """Units with the same producers form a group, in the order their first producer writes them."""
    producers: dict[int, set[str]] = {}
    firsts: dict[int, tuple[str, str]] = {}
    for k in cg.order:
        if k[1] not in OUT_KINDS + ("input",):
            continue
        labels = cg.seq[k]
        for u in (labels[labels >= 0] >> 1).tolist():
            producers.setdefault(u, set()).add(k[0])
            firsts.setdefault(u, k)
    by_key: dict[tuple[str, ...], list[int]] = {}
    for u, ps in producers.items():
        by_key.setdefault(tuple(sorted(ps)), []).append(u)
    for us in by_key.values():
        first = firsts[us[0]]
        canon = _first_run((cg.seq[first] >> 1).tolist(), set(us))
        rank = {u: i for i, u in enumerate(canon)}
        units = sorted(us, key=lambda u: (rank.get(u, len(rank)), u))
        g = Group(name=first[0] or "input", size=len(us), units=torch.tensor(units), graph=cg)
        if len(canon) != len(us):
            g.frozen = f"the channels of {first[0]!r} interleave with other groups"
        gi = len(cg.groups)
        cg.groups.append(g)
        cg.gid[g.units] = gi
        cg.local[g.units] = torch.arange(g.size)


def _first_run(seq: list[int], member: set[int]) -> list[int]:
    """The first unbroken run of distinct members of `member` in `seq`."""
    run: list[int] = []
    seen: set[int] = set()
    for u in seq:
        if u in member and u not in seen:
            run.append(u)
            seen.add(u)
        elif run:
            break
    return run


def _freeze(cg: ChannelGraph, tm: TraceMode) -> None:
    """Groups holding a frozen unit are frozen (the first reason is kept)."""
    for ids, reason in tm.frozen:
        for gi in torch.unique(cg.gid[cg.roots[ids]]).tolist():
            if gi >= 0 and not cg.groups[gi].frozen:
                cg.groups[gi].frozen = reason


def _members(cg: ChannelGraph) -> None:
    """Every recorded layer slice, split by group: positions per unit (k per unit, the same k for all)."""
    for path, kind in cg.order:
        if kind == "input":
            continue
        u = cg.seq[(path, kind)] >> 1
        safe = torch.where(u >= 0, u, torch.zeros_like(u))
        gids = torch.where(u >= 0, cg.gid[safe], torch.full_like(u, -1))
        for gi in torch.unique(gids[gids >= 0]).tolist():
            g = cg.groups[gi]
            pos = torch.nonzero(gids == gi).flatten()
            loc = cg.local[u[pos]]
            order = torch.argsort(loc, stable=True)
            loc, pos = loc[order], pos[order]
            units, counts = torch.unique_consecutive(loc, return_counts=True)
            if bool((counts != counts[0]).any()):
                g.frozen = g.frozen or f"{path!r} holds some units of {g.name!r} more often than others"
                continue
            g.members.append(Member(path, kind, units, pos.view(units.numel(), int(counts[0]))))


def _layouts(cg: ChannelGraph) -> None:
    """How each producer's output channels split into group traversals (what a pruned run emits)."""
    for path, kind in cg.order:
        if kind not in OUT_KINDS:
            continue
        u = (cg.seq[(path, kind)] >> 1).tolist()
        segs: list[tuple[int, torch.Tensor]] = []
        i = 0
        while i < len(u):
            gi = int(cg.gid[u[i]])
            g = cg.groups[gi]
            run = g.units.tolist()
            if u[i:i + g.size] != run:
                g.frozen = g.frozen or f"{path!r} writes the units of {g.name!r} in another order"
                run = u[i:i + 1]
            segs.append((gi, torch.tensor(run)))
            i += len(run)
        cg.layouts[path] = segs


def _components(cg: ChannelGraph, tm: TraceMode) -> None:
    """Signatures (where each unit travels), free groups, and components (groups sharing a tensor)."""
    sig = torch.zeros(cg.roots.numel(), dtype=torch.long)
    parent = list(range(len(cg.groups)))

    def find(a: int) -> int:
        """Root of a group in the component union-find."""
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for k, atoms in tm.seen:
        units = torch.unique(cg.roots[atoms])
        sig.index_add_(0, units, torch.full_like(units, k))
        gis = torch.unique(cg.gid[units]).tolist()
        for gi in gis[1:]:
            parent[find(gi)] = find(gis[0])
    sensitive = torch.zeros(cg.roots.numel(), dtype=torch.bool)
    for atoms in tm.sens:
        sensitive[cg.roots[atoms]] = True
    cg.sig = sig
    for atoms, g in tm.grain:
        for gi in torch.unique(cg.gid[cg.roots[atoms]]).tolist():
            cg.groups[gi].grain = math.lcm(cg.groups[gi].grain, g)
    for gi, g in enumerate(cg.groups):
        g.component = find(gi)
        s = sig[g.units]
        g.free = not bool(sensitive[g.units].any()) and bool((s == s[0]).all())
