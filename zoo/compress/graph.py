"""Channel dependency graph traced from the computation (Fang et al. 2023, "DepGraph: Towards Any
Structural Pruning"), by label propagation on a torch.fx graph.

`trace` turns a model into a torch.fx graph (convs, linears, batch norms, activations, pools and
zoo's PadShortcut are leaves; zoo's FloatFunctional adds and concats trace into torch.add / torch.cat)
and records every node's output shape on one example input. `Sim` then runs that graph on *label
tensors*: int64 tensors of the same shapes (batch 1) whose entries name the channel unit an element
belongs to. A label is `2 * unit + t`, where t = 1 marks "non-zero even when the unit is removed"
(after a sigmoid or an added constant); -2 and -1 are constant zero and constant non-zero elements.
Shape ops (view, transpose, chunk, split, cat, getitem, flatten, ...) run on the labels themselves, so
channel shuffles, splits and flattens are followed exactly, whatever module they sit in; every other
op has a rule in zoo.compress.rules, and an op without one makes the trace refuse with a ZooError
naming the op and the module.

A run's `Mode` decides what producers emit and what alignments mean. `TraceMode` (here) gives every
output channel of a conv / linear / PadShortcut a fresh *atom* and unites the atoms an elementwise op
aligns (union-find): a unit is a class of atoms. zoo.compress.select re-runs the graph with *slots*
(candidate kept counts) and zoo.compress.surgery with the chosen units, checking every alignment.
"""

from __future__ import annotations

import inspect
from abc import ABC, abstractmethod
from typing import Any

import torch
import torch.fx as fx
import torch.nn as nn
from torch.fx.passes.shape_prop import ShapeProp

from zoo.compress import rules as R
from zoo.compress._common import eval_mode
from zoo.errors import ZooError

ZERO, CONST = -2, -1  # labels of constant zero / constant non-zero elements
MASK40 = (1 << 40) - 1


class Infeasible(Exception):
    """A candidate kept count that the traced graph cannot realise (caught by the search)."""


def key(*parts: int) -> int:
    """A deterministic 40-bit hash of integers (splitmix64), the signature key of a node or block."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (p & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & MASK40


class _Tracer(fx.Tracer):
    """Leaves: every module type with a rule (Conv2d, Linear, BatchNorm, PadShortcut, activations,
    pools, ...), and torch.nn modules (refused later unless they have a rule); the rest is traced."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        """True for layers the channel graph handles as one op."""
        return R.module_rule(m) is not None or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, x: torch.Tensor) -> fx.GraphModule:
    """The fx graph of `model` with every node's output shape recorded on input `x` (eval mode)."""
    name = type(model).__name__
    params = list(inspect.signature(model.forward).parameters.values())[1:]
    concrete = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
    try:
        graph = _Tracer().trace(model, concrete_args=concrete or None)
    except Exception as e:  # noqa: BLE001 - any tracing failure becomes one clear refusal
        raise ZooError(f"structured pruning: torch.fx cannot trace {name} ({type(e).__name__}: {e}); "
                       "prune a model whose forward has no data-dependent Python control flow") from None
    gm = fx.GraphModule(model, graph)
    try:
        with eval_mode(model), torch.no_grad():
            ShapeProp(gm).propagate(x)
    except Exception as e:  # noqa: BLE001
        raise ZooError(f"structured pruning: running the traced {name} on an input of shape "
                       f"{tuple(x.shape)} failed ({type(e).__name__}: {e})") from None
    return gm


def op_name(node: fx.Node) -> str:
    """Canonical name of a call_function / call_method node: in-place suffix and operator prefixes dropped."""
    t = node.target
    name = t if isinstance(t, str) else getattr(t, "__name__", str(t))
    name = name.strip("_") if name.startswith("__") else name.rstrip("_")
    return R.ALIASES.get(name, name)


class Mode(ABC):
    """What a run of the graph does at producers, members, alignments and freezes (one per phase)."""

    @abstractmethod
    def input(self, sim: "Sim", node: fx.Node) -> torch.Tensor:
        """Labels of the model input."""

    @abstractmethod
    def emit(self, sim: "Sim", node: fx.Node, path: str, n: int) -> torch.Tensor:
        """Labels (1-d) of the output channels of producer `path` (n of them in the traced model)."""

    def member(self, sim: "Sim", node: fx.Node, path: str, kind: str, labels: torch.Tensor) -> None:
        """Layer `path` reads ('in', 'skip_in') or writes ('out', 'skip_out', 'dw', 'bn') these channels."""

    def unify(self, sim: "Sim", node: fx.Node, a: torch.Tensor, b: torch.Tensor) -> None:
        """Units a[i] and b[i] are aligned by an elementwise op."""

    def freeze(self, ids: torch.Tensor, reason: str) -> None:
        """Units `ids` may not be removed."""

    def observe(self, sim: "Sim", node: fx.Node, labels: torch.Tensor) -> None:
        """Labels present in a node's output (signatures: where each unit travels)."""

    def blocks(self, sim: "Sim", node: fx.Node, side: str, labels: torch.Tensor, blocks: torch.Tensor) -> None:
        """Channels `labels` of a grouped conv fall into conv groups `blocks` on `side` ('in' / 'out')."""

    def sensitive(self, labels: torch.Tensor) -> None:
        """Labels entering an op whose result depends on the channel count (view, chunk, ...)."""

    def fail(self, sim: "Sim", node: fx.Node, msg: str, labels: torch.Tensor | None = None,
             fatal: bool = True) -> None:
        """The graph cannot be followed (or a candidate cannot be realised) at `node`; `labels`: the
        channels at fault when known (else the node's inputs). A search run may go on after a failure
        that is not `fatal` (the op itself still runs) to test other candidates in the same run."""
        raise ZooError(f"structured pruning: {msg} ({op_label(node)} in {R.where_of(node)!r})")


def op_label(node: fx.Node) -> str:
    """'op add', 'module Conv2d', ... for messages."""
    if node.op == "call_module":
        return f"module {node.target}"
    return f"op {op_name(node)!r}"


class Sim:
    """Runs a traced graph on label tensors under a Mode."""

    def __init__(self, gm: fx.GraphModule):
        self.gm = gm
        self.nodes = list(gm.graph.nodes)
        self.index = {n: i for i, n in enumerate(self.nodes)}
        self.modules = dict(gm.named_modules())
        self.mode: Mode  # set by run()
        self.env: dict[fx.Node, Any] = {}
        last: dict[fx.Node, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last[a] = i
        self.last_use = last

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        """The traced (batch-1) output shape of a tensor-valued node."""
        meta = node.meta.get("tensor_meta")
        if meta is None or not hasattr(meta, "shape"):
            self.mode.fail(self, node, "no traced shape for this node's output")
        return tuple(meta.shape)

    def run(self, mode: Mode) -> Any:
        """Run every node under `mode`; returns the labels of the graph's output."""
        self.mode = mode
        env: dict[fx.Node, Any] = {}
        self.env = env
        out = None
        for i, node in enumerate(self.nodes):
            val = self._node(node, env)
            if isinstance(val, torch.Tensor) and val.dtype == torch.int64:
                mode.observe(self, node, val)
            env[node] = val
            if node.op == "output":
                out = val
            for a in node.all_input_nodes:
                if self.last_use.get(a) == i:
                    env.pop(a, None)
        return out

    def _node(self, node: fx.Node, env: dict[fx.Node, Any]) -> Any:
        args = fx.node.map_arg(node.args, lambda n: env[n])
        kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n])
        if node.op == "placeholder":
            if node is self.nodes[0]:
                return self.mode.input(self, node)
            if not node.args:  # arguments with defaults are traced as those constants
                self.mode.fail(self, node, "only models with one tensor input can be pruned")
            return node.args[0]
        if node.op == "get_attr":
            val = self._attr(str(node.target))
            return torch.full(val.shape, CONST, dtype=torch.int64) if isinstance(val, torch.Tensor) else val
        if node.op == "output":
            labels = [t for t in R.leaves(args) if isinstance(t, torch.Tensor)]
            for t in labels:
                self.mode.freeze(t[t >= 0] >> 1, "model output")
            return args[0]
        if node.op == "call_module":
            m = self.modules[str(node.target)]
            rule = R.module_rule(m)
            if rule is None:
                self.mode.fail(self, node, f"no pruning rule for layer type {type(m).__name__}")
            if len(args) != 1 or kwargs or not isinstance(args[0], torch.Tensor):
                self.mode.fail(self, node, "a layer called with other than one tensor argument")
            return rule(self, node, str(node.target), m, args[0])
        return self._call(node, args, kwargs)

    def _attr(self, target: str) -> Any:
        obj: Any = self.gm
        for part in target.split("."):
            obj = getattr(obj, part)
        return obj

    def _call(self, node: fx.Node, args: tuple, kwargs: dict) -> Any:
        name = op_name(node)
        if not any(isinstance(t, torch.Tensor) for t in R.leaves((args, kwargs))):
            out = R.run_op(node, args, kwargs)
            if isinstance(out, torch.Tensor):  # created from sizes: follows the pruned shapes
                zero = out.numel() > 0 and not bool(out.any())
                return torch.full(out.shape, ZERO if zero else CONST, dtype=torch.int64)
            return out
        rule = R.function_rule(name)
        if rule is None:
            self.mode.fail(self, node, "the channel graph cannot follow this op")
        return rule(self, node, name, args, kwargs)


class UnionFind:
    """Union-find over atom ids (path halving)."""

    def __init__(self) -> None:
        self.parent: list[int] = []

    def add(self, n: int) -> int:
        """Add n new singleton atoms; returns the first id."""
        first = len(self.parent)
        self.parent.extend(range(first, first + n))
        return first

    def find(self, a: int) -> int:
        """The root of atom a."""
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        """Merge the classes of a and b (the smaller root wins, so roots are stable in atom order)."""
        ra, rb = self.find(a), self.find(b)
        if ra != rb:
            lo, hi = min(ra, rb), max(ra, rb)
            self.parent[hi] = lo

    def roots(self) -> torch.Tensor:
        """Root of every atom."""
        return torch.tensor([self.find(a) for a in range(len(self.parent))], dtype=torch.int64)


class TraceMode(Mode):
    """First run: fresh atoms per producer channel, unions at elementwise ops, records for the groups."""

    def __init__(self) -> None:
        self.uf = UnionFind()
        self.owner: list[str] = []  # producer path of every atom ('' for the model input)
        self.produced: dict[str, torch.Tensor] = {}  # producer path -> its atoms (first call)
        self.records: dict[tuple[str, str], torch.Tensor] = {}  # (path, kind) -> labels per position
        self.order: list[tuple[str, str]] = []  # record keys in call order
        self.frozen: list[tuple[torch.Tensor, str]] = []
        self.seen: list[tuple[int, torch.Tensor]] = []  # (signature key, atom ids present)
        self.sens: list[torch.Tensor] = []
        self.block_of: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]] = {}
        self.grain: list[tuple[torch.Tensor, int]] = []  # (atoms, conv groups) of every grouped-conv side
        self.input_labels: torch.Tensor | None = None

    def _atoms(self, path: str, n: int) -> torch.Tensor:
        if path not in self.produced:
            first = self.uf.add(n)
            self.owner.extend([path] * n)
            self.produced[path] = torch.arange(first, first + n)
        return self.produced[path]

    def input(self, sim: Sim, node: fx.Node) -> torch.Tensor:
        """Fresh, frozen atoms for the input channels."""
        shape = sim.shape(node)
        atoms = self._atoms("", shape[1])
        self.freeze(atoms, "model input channels")
        self.records[("", "input")] = atoms * 2
        self.order.append(("", "input"))
        view = [1] * len(shape)
        view[1] = shape[1]
        self.input_labels = (atoms * 2).view(view).expand(shape).contiguous()
        return self.input_labels

    def emit(self, sim: Sim, node: fx.Node, path: str, n: int) -> torch.Tensor:
        """Fresh atoms for a producer's outputs (the same ones when it is called again)."""
        return self._atoms(path, n) * 2

    def member(self, sim: Sim, node: fx.Node, path: str, kind: str, labels: torch.Tensor) -> None:
        """Record the slice (a second call unifies with the first); tainted inputs freeze."""
        k = (path, kind)
        if kind in ("in", "skip_in"):
            bad = labels[(labels >= 0) & (labels % 2 == 1)] >> 1
            self.freeze(bad, f"non-zero when removed where {path!r} reads it")
        if k in self.records:  # a layer called twice: the same weights read / write the same units
            prev = self.records[k]
            if prev.shape != labels.shape:
                self.fail(sim, node, "a layer called twice on different channel counts")
            self.unify(sim, node, prev >> 1, labels >> 1)
            return
        self.records[k] = labels
        self.order.append(k)

    def unify(self, sim: Sim, node: fx.Node, a: torch.Tensor, b: torch.Tensor) -> None:
        """Union the aligned atoms."""
        ok = (a >= 0) & (b >= 0)
        pairs = torch.unique(torch.stack([a[ok], b[ok]], 1), dim=0)
        for x, y in pairs.tolist():
            if x != y:
                self.uf.union(x, y)

    def freeze(self, ids: torch.Tensor, reason: str) -> None:
        """Remember the atoms and the reason."""
        ids = ids[ids >= 0]
        if ids.numel():
            self.frozen.append((torch.unique(ids), reason))

    def observe(self, sim: Sim, node: fx.Node, labels: torch.Tensor) -> None:
        """Record which atoms reach this node (their signature)."""
        ids = torch.unique(labels[labels >= 0] >> 1)
        if ids.numel():
            self.seen.append((key(sim.index[node]), ids))

    def blocks(self, sim: Sim, node: fx.Node, side: str, labels: torch.Tensor, blocks: torch.Tensor) -> None:
        """Record each channel's conv group (part of its signature); the layout is count-sensitive."""
        i = sim.index[node]
        self.block_of.setdefault((i, side), (labels, blocks))
        self.grain.append((torch.unique(labels[labels >= 0] >> 1), int(blocks.max()) + 1))
        for b in torch.unique(blocks).tolist():
            ids = labels[(blocks == b) & (labels >= 0)] >> 1
            if ids.numel():
                self.seen.append((key(i, 1 + (side == "out"), b), torch.unique(ids)))
        self.sensitive(labels)

    def sensitive(self, labels: torch.Tensor) -> None:
        """Remember the atoms."""
        ids = torch.unique(labels[labels >= 0] >> 1)
        if ids.numel():
            self.sens.append(ids)


def build_trace(model: nn.Module, x: torch.Tensor) -> tuple[Sim, TraceMode]:
    """Trace `model` on `x` (batch 1) and run the first, atom-creating pass."""
    gm = trace(model, x)
    sim = Sim(gm)
    mode = TraceMode()
    with torch.no_grad():
        sim.run(mode)
    return sim, mode

