"""Channel shuffles folded into the weights, for deployment: ShuffleNet v2 (Ma et al. 2018, "ShuffleNet V2:
Practical Guidelines for Efficient CNN Architecture Design", arXiv:1807.11164) without a runtime shuffle.

A channel shuffle is a fixed permutation. XNNPACK computes in NHWC, so ExecuTorch runs each shuffle's
view / transpose / view as layout conversions around a transpose: the 16 shuffles of ShuffleNet v2 took
about a third of its int8 program (benchmarks/int8.md). `fold_channel_shuffles` returns a copy whose
units never permute at run time. Each tensor between units is kept in a *physical* channel order `p`
(logical channel j = physical channel p[j]), and every consumer absorbs it:

  * a 1x1 conv or the depthwise conv of a stride-2 unit: its weights (and batch norm) are permuted;
  * the channel split of a stride-1 unit: the pass-through and the branch input are gathered with
    slices and one concat each (the channels of a half form a few contiguous runs of the physical order);
  * a unit's output: the concat of its halves without the shuffle, whose permutation becomes the new `p`;
  * the 1x1 `conv_head` after the last unit absorbs the final `p`.

The result computes the same function (float rounding aside) with slices and concats instead of shuffles.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from zoo.errors import ZooError
from zoo.layers import ConvNormAct, ShuffleV2Unit, channel_shuffle

Runs = list[tuple[int, int]]  # [start, end) ranges of physical channels, in increasing order


def _runs(channels: list[int]) -> tuple[Runs, dict[int, int]]:
    """Contiguous runs of the sorted channels, and each channel's position in the gathered tensor."""
    s = sorted(channels)
    runs: Runs = []
    for c in s:
        if runs and runs[-1][1] == c:
            runs[-1] = (runs[-1][0], c + 1)
        else:
            runs.append((c, c + 1))
    return runs, {c: i for i, c in enumerate(s)}


def _gather(x: torch.Tensor, runs: Runs) -> list[torch.Tensor]:
    return [x[:, a:b] for a, b in runs]


@torch.no_grad()
def _permute_inputs(m: ConvNormAct, src: list[int]) -> None:
    """Make 1x1 / dense conv `m` read logical input j from gathered channel src[j]."""
    w = m.conv.weight
    new = torch.empty_like(w)
    new[:, src] = w
    m.conv.weight.copy_(new)


@torch.no_grad()
def _permute_depthwise(m: ConvNormAct, src: list[int]) -> None:
    """Depthwise conv (and its BN) computing logical channel j on physical channel src[j], in place."""
    idx = torch.tensor(src)
    bn = [m.bn.weight, m.bn.bias, m.bn.running_mean, m.bn.running_var] if isinstance(m.bn, nn.BatchNorm2d) else []
    for t in [m.conv.weight, m.conv.bias] + bn:  # (no BN: folded into the conv, or built without one)
        if t is not None:
            new = torch.empty_like(t)
            new[idx] = t.clone()
            t.copy_(new)


def _shuffled(n: int, groups: int) -> list[int]:
    """The permutation a channel shuffle applies: output channel j = input channel perm[j]."""
    return channel_shuffle(torch.arange(n, dtype=torch.float32).view(1, n, 1, 1), groups).flatten().long().tolist()


class FoldedSplitUnit(nn.Module):
    """A stride-1 ShuffleNet v2 unit with its shuffle folded: gathers, branch, one concat."""

    def __init__(self, branch: nn.Module, pass_runs: Runs, branch_runs: Runs):
        super().__init__()
        self.branch2, self.pass_runs, self.branch_runs = branch, pass_runs, branch_runs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = _gather(x, self.branch_runs)
        y = self.branch2(b[0] if len(b) == 1 else torch.cat(b, 1))
        return torch.cat(_gather(x, self.pass_runs) + [y], 1)


class FoldedStridedUnit(nn.Module):
    """A stride-2 ShuffleNet v2 unit with its shuffle folded: the two branches concatenated."""

    def __init__(self, branch1: nn.Module, branch2: nn.Module):
        super().__init__()
        self.branch1, self.branch2 = branch1, branch2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.branch1(x), self.branch2(x)], 1)


def _fold_unit(unit: ShuffleV2Unit, p: list[int]) -> tuple[nn.Module, list[int]]:
    """(folded unit reading physical order p, the physical order of its output)."""
    groups = unit.shuffle.groups
    if unit.stride > 1:
        _permute_depthwise(unit.branch1[0], p)
        _permute_inputs(unit.branch1[1], p)
        _permute_inputs(unit.branch2[0], p)
        left = unit.branch1[1].conv.out_channels
        pre = list(range(left + unit.branch2[-1].conv.out_channels))  # physical = cat(b1, b2)
        return FoldedStridedUnit(unit.branch1, unit.branch2), [pre[j] for j in _shuffled(len(pre), groups)]
    half = (len(p) + 1) // 2
    branch_runs, branch_pos = _runs(p[half:])
    _permute_inputs(unit.branch2[0], [branch_pos[c] for c in p[half:]])
    pass_runs, pass_pos = _runs(p[:half])
    out = unit.branch2[-1].conv.out_channels
    pre = [pass_pos[c] for c in p[:half]] + [half + i for i in range(out)]  # logical cat -> physical
    return FoldedSplitUnit(unit.branch2, pass_runs, branch_runs), [pre[j] for j in _shuffled(len(pre), groups)]


def _unfoldable(model: nn.Module) -> str | None:
    """Why `fold_channel_shuffles` cannot fold `model`, or None when it can."""
    stages, head = getattr(model, "stages", None), getattr(model, "conv_head", None)
    units = [m for m in model.modules() if isinstance(m, ShuffleV2Unit)]
    if not units:
        return "it has no ShuffleV2Unit"
    chain = [u for s in stages for u in s] if isinstance(stages, nn.Sequential) else []
    if chain != units or not isinstance(head, ConvNormAct) or head.conv.kernel_size != (1, 1):
        return "expected stages of ShuffleV2Unit followed by a 1x1 conv_head"
    if units[0].stride == 1:
        return "its first unit has stride 1; expected a strided unit that reads the whole input"
    if any(parametrize.is_parametrized(m) for m in model.modules()):
        return "it has parametrized weights (masks or quantizers); fold the plain float model"
    if any(type(m.conv) is not nn.Conv2d for m in model.modules() if isinstance(m, ConvNormAct)):
        return "its convs are not plain nn.Conv2d (quantized, fused with their ReLU, or factorised); fold the float model"
    return None


def has_channel_shuffles(model: nn.Module) -> bool:
    """True for a ShuffleNet v2 whose channel shuffles `fold_channel_shuffles` can fold."""
    return _unfoldable(model) is None


def fold_channel_shuffles(model: nn.Module) -> nn.Module:
    """A copy of a ShuffleNet v2 whose channel shuffles are folded into its weights (see the module doc)."""
    why = _unfoldable(model)
    if why is not None:
        raise ZooError(f"fold_channel_shuffles: cannot fold {type(model).__name__}: {why}")
    units = [m for m in model.modules() if isinstance(m, ShuffleV2Unit)]
    folded = copy.deepcopy(model)
    p = list(range(units[0].branch1[0].conv.in_channels))
    for stage in folded.stages:
        for i, unit in enumerate(stage):
            stage[i], p = _fold_unit(unit, p)
    _permute_inputs(folded.conv_head, p)
    return folded
