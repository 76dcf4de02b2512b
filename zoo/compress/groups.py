"""Channel groups for structured pruning, built per block type of zoo/layers.py.

A *channel group* is a set of channels that must be removed together: the output channels of the
layers that produce them, the matching per-channel entries of depthwise convs and batch norms, and
the input channels of the layers that consume them. Residual adds merge groups (every add of a stage
shares one group), concatenations map a group to an offset, flatten maps a channel to its H*W
features, grouped convs require the same number of channels kept per conv group, and ShuffleNet v1's
channel shuffle gets a dedicated layout rule. This is the dependency-graph idea of Torch-Pruning
(Fang et al. 2023, "DepGraph: Towards Any Structural Pruning") specialised to the zoo's known blocks.
An option-A ResNet shortcut (He et al. 2016; zoo.layers.PadShortcut) reads the block's input group and
writes into its output group without weights: it is a member of both ('skip_in' / 'skip_out'), and
surgery re-routes its kept channels (a removed output channel drops the identity that landed on it).

The model is traced once with forward hooks: the top-level *elements* (known blocks, ConvNormAct,
and stray Conv2d / Linear / BatchNorm layers) run as a chain, each feeding the next.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from zoo.compress._common import eval_mode, example_input, get_module
from zoo.errors import ZooError
from zoo.layers import (BasicBlock, Bottleneck, ChannelShuffle, ConvNormAct, DepthwiseSeparable, Fire,
                        InvertedResidual, PadShortcut, ShuffleV1Unit, ShuffleV2Unit)

BLOCKS = (DepthwiseSeparable, InvertedResidual, Fire, ShuffleV1Unit, ShuffleV2Unit, BasicBlock, Bottleneck)
LEAVES = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d)
KINDS = ("out", "in", "dw", "bn", "skip_in", "skip_out")
IN_KINDS = ("in", "skip_in")  # members that index a layer's input channels


@dataclass
class Member:
    """One layer slice of a group: `kind` is 'out' (filters), 'in' (input channels), 'dw', 'bn', or
    'skip_in' / 'skip_out' (input / output channels of a parameter-free PadShortcut).

    `units[i]` is a unit of the group and `pos[i]` its positions along the layer's dim (k per unit:
    k > 1 when a flatten spreads a channel over H*W features). `shuffle` > 0 means the member sees the
    group's channels after a channel shuffle with that many groups.
    """

    module: str
    kind: str
    units: torch.Tensor
    pos: torch.Tensor
    shuffle: int = 0


@dataclass
class Group:
    """A set of `size` coupled channel units with its members and layout constraints."""

    name: str
    size: int
    members: list[Member] = field(default_factory=list)
    frozen: str = ""  # reason it may not be pruned ('' = prunable)
    blocks: torch.Tensor | None = None  # block id per unit: the same count must be kept in every block
    shuffle: tuple[int, int] | None = None  # (groups g, conv1 groups) of a ShuffleNet v1 bottleneck

class _Builder:
    """Collects groups and their members while the chain is walked. A residual add does not create a
    group: the block's output *is* its input group, so every add of a stage lands in one group."""

    def __init__(self, model: nn.Module):
        self.model = model
        self.groups: list[Group] = []

    def new(self, name: str, size: int, frozen: str = "") -> int:
        """A new group of `size` units; returns its id."""
        self.groups.append(Group(name, size, frozen=frozen))
        return len(self.groups) - 1

    def get(self, g: int) -> Group:
        """The group with id g."""
        return self.groups[g]

    def freeze(self, g: int, reason: str) -> None:
        """Mark group g as not prunable (the first reason given is kept)."""
        grp = self.get(g)
        grp.frozen = grp.frozen or reason

    def add(self, g: int, path: str, kind: str, pos: torch.Tensor | None = None, units: torch.Tensor | None = None,
            shuffle: int = 0) -> None:
        """Add a member: layer `path` holds `units` of group g (all by default) at positions `pos`."""
        grp = self.get(g)
        units = torch.arange(grp.size) if units is None else units
        pos = units.clone() if pos is None else pos
        if pos.dim() == 1:
            pos = pos[:, None]
        grp.members.append(Member(path, kind, units, pos, shuffle))

    def set_blocks(self, g: int, blocks: torch.Tensor) -> None:
        """Require the same kept count in every block (conv group) of g; two different layouts freeze g."""
        grp = self.get(g)
        if grp.blocks is not None and not torch.equal(grp.blocks, blocks):
            grp.frozen = grp.frozen or "two incompatible grouped-conv layouts"
        grp.blocks = blocks

    def size(self, g: int) -> int:
        """Number of units of group g."""
        return self.get(g).size

    # --- layer helpers ----------------------------------------------------------------------------
    def consume(self, g: int, path: str, flat: int = 1) -> None:
        """`path` (conv or linear) reads group g as its input channels."""
        m = get_module(self.model, path)
        n = self.size(g)
        if isinstance(m, nn.Conv2d) and m.groups > 1:  # grouped (depthwise convs go through `depthwise`)
            self.add(g, path, "in")
            self.set_blocks(g, torch.arange(n) // (n // m.groups))
            return
        pos = torch.arange(n)[:, None] * flat + torch.arange(flat)[None, :]
        self.add(g, path, "in", pos)

    def produce(self, g: int, cna: str, units: torch.Tensor | None = None) -> None:
        """ConvNormAct (or bare conv/linear) at `cna` writes (part of) group g."""
        conv, bn = _conv_bn(self.model, cna)
        m = get_module(self.model, conv)
        n = m.out_channels if isinstance(m, nn.Conv2d) else m.out_features
        pos = torch.arange(n)
        self.add(g, conv, "out", pos, units)
        if bn:
            self.add(g, bn, "bn", pos, units)
        if isinstance(m, nn.Conv2d) and m.groups > 1:
            if units is not None:
                self.freeze(g, "grouped conv writing part of a group")
            else:
                self.set_blocks(g, torch.arange(n) // (n // m.groups))

    def depthwise(self, g: int, cna: str, shuffle: int = 0, pos: torch.Tensor | None = None) -> None:
        """Depthwise ConvNormAct at `cna` passes group g through channel by channel."""
        conv, bn = _conv_bn(self.model, cna)
        self.add(g, conv, "dw", pos, shuffle=shuffle)
        if bn:
            self.add(g, bn, "bn", pos, shuffle=shuffle)


def _conv_bn(model: nn.Module, path: str) -> tuple[str, str | None]:
    m = get_module(model, path)
    if isinstance(m, ConvNormAct):
        if not isinstance(m.conv, nn.Conv2d):
            raise ZooError(f"structured pruning: {path}.conv is {type(m.conv).__name__}, not a Conv2d "
                           "(prune channels before low-rank factorisation)")
        return f"{path}.conv", (f"{path}.bn" if isinstance(m.bn, nn.BatchNorm2d) else None)
    return path, None


def _is_dw(m: nn.Module) -> bool:
    conv = m.conv if isinstance(m, ConvNormAct) else m
    return isinstance(conv, nn.Conv2d) and conv.groups > 1 and conv.groups == conv.in_channels == conv.out_channels


def _trace(model: nn.Module, x: torch.Tensor) -> list[tuple[str, nn.Module, tuple, tuple]]:
    """Top-level elements in call order with their input and output shapes."""
    names = {id(m): n for n, m in model.named_modules()}
    elems: list[list[Any]] = []
    depth = [0]
    handles = []
    called: set[int] = set()

    def is_elem(m: nn.Module) -> bool:
        return isinstance(m, BLOCKS + (ConvNormAct,) + LEAVES)

    def stray(m: nn.Module, inp: Any) -> None:  # a layer with weights outside every known element
        if depth[0] == 0:
            _unsupported(names[id(m)], m)

    def pre(m: nn.Module, inp: Any) -> None:
        if depth[0] == 0:
            if id(m) in called:
                raise ZooError(f"structured pruning: module {names[id(m)]!r} is called twice (shared weights)")
            called.add(id(m))
            shape = tuple(inp[0].shape) if inp and isinstance(inp[0], torch.Tensor) else ()
            elems.append([names[id(m)], m, shape, ()])
        depth[0] += 1

    def post(m: nn.Module, inp: Any, out: Any) -> None:
        depth[0] -= 1
        if depth[0] == 0 and isinstance(out, torch.Tensor):
            elems[-1][3] = tuple(out.shape)

    for n, m in model.named_modules():
        if is_elem(m):
            handles.append(m.register_forward_pre_hook(pre))
            handles.append(m.register_forward_hook(post))
        elif not list(m.children()) and any(True for _ in m.parameters(recurse=False)):
            handles.append(m.register_forward_pre_hook(stray))
    try:
        with eval_mode(model), torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return [tuple(e) for e in elems]


def _unsupported(path: str, m: nn.Module) -> None:
    raise ZooError(f"structured pruning: layer {path!r} of type {type(m).__name__} is not supported")


def build_groups(model: nn.Module, example_inputs: torch.Tensor | None = None) -> list[Group]:
    """All channel groups of a zoo model (frozen ones included, with the reason in `frozen`)."""
    x = example_input(model, example_inputs, "structured pruning")
    elems = _trace(model, x)
    b = _Builder(model)
    cur = b.new("input", x.shape[1], frozen="model input channels")
    for path, m, in_shape, out_shape in elems:
        flat = 1
        if len(in_shape) >= 2 and in_shape[1] != b.size(cur):
            feats = in_shape[1]
            if len(in_shape) == 2 and feats % b.size(cur) == 0:
                flat = feats // b.size(cur)  # a flatten spread each channel over H*W features
            else:
                raise ZooError(f"structured pruning: cannot follow the channels into {path!r} "
                               f"({b.size(cur)} channels in, input shape {in_shape})")
        cur = _element(b, path, m, cur, flat)
        if out_shape and len(out_shape) >= 2 and out_shape[1] != b.size(cur):
            raise AssertionError(f"group size {b.size(cur)} != output channels of {path} {out_shape}")
    b.freeze(cur, "model output")
    return b.groups


def _element(b: _Builder, path: str, m: nn.Module, g: int, flat: int) -> int:
    """Add the members of one chain element reading group g; return the group it outputs."""
    p = f"{path}." if path else ""
    if isinstance(m, (ConvNormAct, nn.Conv2d)):
        if _is_dw(m):
            b.depthwise(g, path)
            return g
        b.consume(g, _conv_bn(b.model, path)[0], flat)
        conv = get_module(b.model, _conv_bn(b.model, path)[0])
        out = b.new(path, conv.out_channels)
        b.produce(out, path)
        return out
    if isinstance(m, nn.Linear):
        b.consume(g, path, flat)
        out = b.new(path, m.out_features)
        b.produce(out, path)
        return out
    if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
        b.add(g, path, "bn")
        return g
    if isinstance(m, DepthwiseSeparable):
        b.depthwise(g, p + "dw")
        b.consume(g, p + "pw.conv")
        out = b.new(p + "pw", m.pw.conv.out_channels)
        b.produce(out, p + "pw")
        return out
    if isinstance(m, InvertedResidual):
        hid = g
        if isinstance(m.expand, ConvNormAct):
            b.consume(g, p + "expand.conv")
            hid = b.new(p + "hidden", m.expand.conv.out_channels)
            b.produce(hid, p + "expand")
        b.depthwise(hid, p + "dw")
        b.consume(hid, p + "project.conv")
        out = g if m.use_res else b.new(p + "project", m.project.conv.out_channels)
        b.produce(out, p + "project")
        return out
    if isinstance(m, Fire):
        b.consume(g, p + "squeeze.conv")
        s = b.new(p + "squeeze", m.squeeze.conv.out_channels)
        b.produce(s, p + "squeeze")
        b.consume(s, p + "expand1x1.conv")
        b.consume(s, p + "expand3x3.conv")
        e1, e3 = m.expand1x1.conv.out_channels, m.expand3x3.conv.out_channels
        out = g if m.bypass == "simple" else b.new(p + "expand", e1 + e3)
        b.produce(out, p + "expand1x1", units=torch.arange(e1))
        b.produce(out, p + "expand3x3", units=torch.arange(e1, e1 + e3))
        if m.bypass_conv is not None:
            b.consume(g, p + "bypass_conv")
            b.produce(out, p + "bypass_conv")
        return out
    if isinstance(m, (BasicBlock, Bottleneck)):
        names = ["conv1", "conv2"] + (["conv3"] if isinstance(m, Bottleneck) else [])
        prev = g
        for a, c in zip(names[:-1], names[1:]):
            b.consume(prev, f"{p}{a}.conv")
            prev_new = b.new(f"{p}{a}", getattr(m, a).conv.out_channels)
            b.produce(prev_new, p + a)
            prev = prev_new
        b.consume(prev, f"{p}{names[-1]}.conv")
        if isinstance(m.downsample, PadShortcut):  # option A: no weights, its channels are re-routed
            b.add(g, p + "downsample", "skip_in")
            out = b.new(p + "out", getattr(m, names[-1]).conv.out_channels)
            b.add(out, p + "downsample", "skip_out")
        elif m.downsample is not None:
            b.consume(g, p + "downsample.conv")
            out = b.new(p + "out", getattr(m, names[-1]).conv.out_channels)
            b.produce(out, p + "downsample")
        else:
            out = g
        b.produce(out, p + names[-1])
        return out
    if isinstance(m, ShuffleV1Unit):
        return _shuffle_v1(b, p, m, g)
    if isinstance(m, ShuffleV2Unit):
        if m.stride == 1:
            b.freeze(g, "ShuffleNet v2 stage channels (split/concat/shuffle)")
        else:
            b.depthwise(g, p + "branch1.0")
            b.consume(g, p + "branch1.1.conv")
            b.consume(g, p + "branch2.0.conv")
        mid = b.new(p + "branch2", m.branch2[0].conv.out_channels)
        b.produce(mid, p + "branch2.0")
        b.depthwise(mid, p + "branch2.1")
        b.consume(mid, p + "branch2.2.conv")
        return b.new(p + "out", 2 * m.branch2[2].conv.out_channels,
                     frozen="ShuffleNet v2 stage channels (split/concat/shuffle)")
    raise ZooError(f"structured pruning: layer {path!r} of type {type(m).__name__} is not supported")


def _shuffle_v1(b: _Builder, p: str, m: ShuffleV1Unit, g: int) -> int:
    """ShuffleNet v1 unit: only the bottleneck (mid) channels are pruned; stage channels stay."""
    reason = "ShuffleNet v1 stage channels (grouped convs and concat shortcut)"
    b.freeze(g, reason)
    mid_n = m.conv1.conv.out_channels
    mid = b.new(p + "mid", mid_n)
    groups = m.conv2.conv.groups
    b.produce(mid, p + "conv1")
    if isinstance(m.shuffle, ChannelShuffle):
        sg = m.shuffle.groups
        c = mid_n // sg
        units = torch.arange(mid_n)
        post = (units % c) * sg + units // c  # position after the shuffle of pre-shuffle channel p
        b.get(mid).blocks = None  # the shuffle rule below covers conv1's and conv2's groups together
        b.depthwise(mid, p + "dw", shuffle=sg, pos=post)
        b.add(mid, p + "conv2.conv", "in", post, shuffle=sg)
        b.get(mid).shuffle = (sg, m.conv1.conv.groups)
        if groups != sg:
            b.freeze(mid, "shuffle groups differ from the conv groups")
    else:
        b.depthwise(mid, p + "dw")
        b.consume(mid, p + "conv2.conv")
    out = b.new(p + "out", m.conv2.conv.out_channels + (m.conv1.conv.in_channels if m.stride == 2 else 0),
                frozen=reason)
    return out
