"""Which channel units to keep: kept counts per group (layer or global scope), then units that the traced
graph can realise.

Counts: 'layer' scope keeps the same fraction of every group; 'global' ranks every unit of every group on
per-group normalised scores (Molchanov et al. 2019 rank globally) and removes the lowest, but never more
than a per-layer maximum of any group (by default all but one unit), handing the rest to other groups.

Units: a *free* group (zoo.compress.groups) keeps its best-scored units. A component with a channel split,
shuffle or grouped conv re-runs the traced graph with *slots* (zoo.compress.graph): each group's producers
emit its first n' kept units in order, and each slot's path through the graph (which nodes and which conv
groups it reaches) is its signature. A unit may fill a slot only if its own path, traced on the full model,
has the same signature; the best-scored such subsequence (a dynamic programme over the group's units)
is kept. Counts the graph cannot realise (a chunk of an odd count, a view that no longer divides, a
channel that would change conv group) fail that candidate, and the search tries the nearest other
fractions of the component (ShuffleNet's width multiplier is such a fraction).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Iterator

import torch

from zoo.compress.graph import Infeasible, Mode, Sim, key
from zoo.compress.groups import ChannelGraph, Group
from zoo.compress.rules import leaves
from zoo.errors import ZooError

SLOT_BASE = 1 << 40
MAX_TRIES = 48
WINDOW = 0.25  # how far from the planned fraction a rounder one is preferred


def keep_counts(groups: list[Group], scores: list[torch.Tensor | None], amount: float, scope: str,
                max_fraction: float | None = None) -> dict[int, int]:
    """Kept units per live group for `amount` removed in 'layer' or 'global' scope."""
    live = [i for i, g in enumerate(groups) if not g.frozen]
    if not live:
        raise ZooError("structured pruning: this model has no prunable channel group")
    if scope == "layer":
        out = {i: groups[i].size - int(round(amount * groups[i].size)) for i in live}
        for i, n in out.items():
            if n <= 0:
                raise ZooError(f"structured pruning: amount={amount:g} (layer scope) would remove every one of the "
                               f"{groups[i].size} channels of {groups[i].name!r}; use a smaller amount")
        return out
    normed, owner, rank, cap = [], [], [], {}
    for i in live:
        s = scores[i].double()
        mean = s.abs().mean()
        s = s / mean if mean > 0 else s
        normed.append(s)
        owner.append(torch.full((groups[i].size,), i))
        r = torch.empty(groups[i].size, dtype=torch.long)
        r[torch.argsort(s, stable=True)] = torch.arange(groups[i].size)
        rank.append(r)
        n = groups[i].size
        cap[i] = n - 1 if max_fraction is None else min(n - 1, int(max_fraction * n + 1e-9))
    allv, allo, allr = torch.cat(normed), torch.cat(owner), torch.cat(rank)
    caps = torch.tensor([cap[int(o)] for o in allo.tolist()]) if allo.numel() else allo
    n_prune = int(round(amount * allv.numel()))
    order = torch.argsort(allv, stable=True)
    allowed = order[allr[order] < caps[order]]  # a group's k-th weakest unit goes only while k < its cap
    pruned = torch.bincount(allo[allowed[:n_prune]], minlength=len(groups))
    return {i: groups[i].size - int(pruned[i]) for i in live}


def choose(groups: list[Group], scores: list[torch.Tensor | None], counts: dict[int, int],
           round_to: int = 1) -> list[torch.Tensor | None]:
    """Kept units (group indices, ascending) per group; None where every unit stays or the group is frozen."""
    kept: list[torch.Tensor | None] = [None] * len(groups)
    comps: dict[int, list[int]] = {}
    for i in counts:
        comps.setdefault(groups[i].component, []).append(i)
    got: dict[int, torch.Tensor | None] = {}
    hard: dict[int, list[int]] = {}
    for c, gis in comps.items():
        if all(groups[i].free for i in gis):
            got.update({i: _top(scores[i], _round(counts[i], groups[i].size, round_to)) for i in gis})
        else:
            hard[c] = gis
    if hard:
        got.update(_search(groups, scores, hard, counts, round_to))
    for i, k in got.items():
        if k is not None and k.numel() < groups[i].size:
            kept[i] = k
    return kept


def _round(n: int, size: int, round_to: int) -> int:
    return max(1, min(size, -(-n // round_to) * round_to))


def _top(score: torch.Tensor, n: int) -> torch.Tensor:
    return torch.sort(torch.argsort(score.double(), descending=True, stable=True)[:n]).values


def _candidates(groups: list[Group], gis: list[int], want: dict[int, int], round_to: int) -> Iterator[dict[int, int]]:
    """The planned counts first, then every group at a common fraction, nearest the planned one first:
    fractions that keep a whole number of units in every group (k / gcd of the sizes) before the rest.
    Each fraction is tried with every count rounded to its group's grain (its grouped convs) first."""
    sizes = [groups[i].size for i in gis]
    f = sum(want.values()) / sum(sizes)
    big, step = max(sizes), math.gcd(*sizes)

    def rank(t: Fraction) -> tuple:
        """Near the target, round fractions first (a conv group or a shuffle divides them), but keeping
        everything only when nothing else fits."""
        near = abs(t - f) <= WINDOW
        return (not near, t == 1, -math.gcd(t.numerator * step // t.denominator, step) if near else 0, abs(t - f), -t)

    exact = sorted((Fraction(k, step) for k in range(1, step + 1)), key=rank)
    rest = sorted((Fraction(k, big) for k in range(1, big + 1)), key=lambda t: (abs(t - f), -t))
    seen: set[tuple] = set()
    for t in [None] + exact + rest:
        for grain in (True, False):
            cand = {i: _count(groups[i], want[i] if t is None else t * groups[i].size, round_to, grain) for i in gis}
            k = tuple(sorted(cand.items()))
            if k not in seen:
                seen.add(k)
                yield cand


def _count(g: Group, x: float, round_to: int, grain: bool) -> int:
    """x units of group g rounded to a multiple of round_to (and of its grain when `grain`), within 1..size."""
    q = math.lcm(round_to, g.grain) if grain else 1
    n = max(q, int(round(x / q)) * q) if q > 1 else int(round(x))
    return _round(n, g.size, round_to)


def _search(groups: list[Group], scores: list[torch.Tensor | None], comps: dict[int, list[int]],
            counts: dict[int, int], round_to: int) -> dict[int, torch.Tensor | None]:
    """Try candidate counts for every component at once (one slot run per round); a component whose
    candidate fails moves on to its next one, the others keep theirs."""
    cg: ChannelGraph = groups[next(iter(comps.values()))[0]].graph
    cands = {c: _candidates(groups, gis, {i: _round(counts[i], groups[i].size, round_to) for i in gis}, round_to)
             for c, gis in comps.items()}
    tries = dict.fromkeys(comps, 0)
    current: dict[int, dict[int, int] | None] = {c: next(it) for c, it in cands.items()}
    out: dict[int, torch.Tensor | None] = {}
    while any(v is not None for v in current.values()):
        live = {c: v for c, v in current.items() if v is not None}
        slots = SlotMode(cg, {i: n for v in live.values() for i, n in v.items()}, groups)
        aborted = False
        try:
            with torch.no_grad():
                cg.sim.run(slots)
            failed = set(slots.culprits)
        except Infeasible as e:
            failed, aborted = set(e.args[0]), True
        for c in live:
            if aborted and c not in failed:
                continue  # not reached: retry the same candidate
            got = None if c in failed else _match_component(cg, groups, scores, comps[c], slots)
            if got is not None:
                out.update(got)
                current[c] = None
                continue
            tries[c] += 1
            current[c] = next(cands[c], None) if tries[c] < MAX_TRIES else None
            if current[c] is None:
                out.update(_give_up(groups, comps[c]))
    return out


def _match_component(cg: ChannelGraph, groups: list[Group], scores: list[torch.Tensor | None], gis: list[int],
                     slots: "SlotMode") -> dict[int, torch.Tensor] | None:
    got = {}
    for i in gis:
        k = match(cg.sig[groups[i].units], slots.signatures(i), scores[i])
        if k is None:
            return None
        got[i] = k
    return got


def _give_up(groups: list[Group], gis: list[int]) -> dict[int, None]:
    reason = "no kept count of its channel layout could be realised by the traced graph"
    for i in gis:
        groups[i].frozen = groups[i].frozen or reason
    return dict.fromkeys(gis)


def match(unit_sig: torch.Tensor, slot_sig: torch.Tensor, score: torch.Tensor) -> torch.Tensor | None:
    """The best-scored subsequence of units whose signatures equal the slots' (in order), or None."""
    n, m = unit_sig.numel(), slot_sig.numel()
    if m > n:
        return None
    score = score.double()
    ok = slot_sig[:, None] == unit_sig[None, :]
    neg = torch.tensor(float("-inf"), dtype=torch.float64)
    prev = torch.zeros(n + 1, dtype=torch.float64)  # prev[i]: best for the slots so far using units < i
    picks = []
    for j in range(m):
        cand = torch.where(ok[j], prev[:-1] + score, neg)
        best, arg = torch.cummax(cand, 0)
        prev = torch.cat([neg.view(1), best])
        picks.append(arg)
    if not bool(torch.isfinite(prev[-1])):
        return None
    kept, i = [], n - 1
    for j in reversed(range(m)):
        u = int(picks[j][i])
        kept.append(u)
        i = u - 1
    return torch.tensor(sorted(kept), dtype=torch.long)


class SlotMode(Mode):
    """A run in which the candidate groups emit slots 0..n'-1 and record where every slot travels."""

    def __init__(self, cg: ChannelGraph, counts: dict[int, int], groups: list[Group]):
        self.cg = cg
        self.counts = counts
        self.offset: dict[int, int] = {}
        off = 0
        owner = []
        for i in sorted(counts):
            self.offset[i] = off
            off += counts[i]
            owner += [groups[i].component] * counts[i]
        self.owner = torch.tensor(owner, dtype=torch.long)  # component of every slot
        self.sig = torch.zeros(off, dtype=torch.long)
        self.culprits: set[int] = set()

    def input(self, sim: Sim, node: object) -> torch.Tensor:
        """The input's unit labels."""
        return self.cg.input_labels

    def emit(self, sim: Sim, node: object, path: str, n: int) -> torch.Tensor:
        """Slots for candidate groups, every unit for the others."""
        parts = []
        for gi, units in self.cg.layouts[path]:
            if gi in self.counts:
                base = SLOT_BASE + self.offset[gi]
                parts.append(torch.arange(base, base + self.counts[gi]) * 2)
            else:
                parts.append(units * 2)
        return torch.cat(parts)

    def _slots(self, labels: torch.Tensor) -> torch.Tensor:
        s = labels[labels >= 2 * SLOT_BASE] >> 1
        return torch.unique(s) - SLOT_BASE

    def observe(self, sim: Sim, node: object, labels: torch.Tensor) -> None:
        """Add this node's key to the signature of every slot present."""
        s = self._slots(labels)
        if s.numel():
            self.sig.index_add_(0, s, torch.full_like(s, key(sim.index[node])))

    def blocks(self, sim: Sim, node: object, side: str, labels: torch.Tensor, blocks: torch.Tensor) -> None:
        """Add each slot's conv-group key to its signature."""
        i = sim.index[node]
        for b in torch.unique(blocks).tolist():
            s = self._slots(labels[blocks == b])
            if s.numel():
                self.sig.index_add_(0, s, torch.full_like(s, key(i, 1 + (side == "out"), b)))

    def unify(self, sim: Sim, node: object, a: torch.Tensor, b: torch.Tensor) -> None:
        """Blame the components whose slots an elementwise op would misalign."""
        bad = a != b
        if bool(bad.any()):
            for t in (a[bad], b[bad]):
                s = t[t >= SLOT_BASE] - SLOT_BASE
                self.culprits.update(torch.unique(self.owner[s]).tolist())

    def fail(self, sim: Sim, node: object, msg: str, labels: torch.Tensor | None = None, fatal: bool = True) -> None:
        """Blame the components whose slots are at fault (or reach this node); a fatal failure stops the run."""
        values: list[object] = [labels] if labels is not None else [sim.env.get(a) for a in node.all_input_nodes]
        found: set[int] = set()
        for v in values:
            for t in leaves(v):
                if isinstance(t, torch.Tensor) and t.dtype == torch.int64:
                    found.update(torch.unique(self.owner[self._slots(t)]).tolist())
        if not fatal and found:
            self.culprits |= found
            return
        raise Infeasible(found or set(self.owner.tolist()))

    def signatures(self, gi: int) -> torch.Tensor:
        """Signature of each slot of group gi, in slot order."""
        off = self.offset[gi]
        return self.sig[off:off + self.counts[gi]]
