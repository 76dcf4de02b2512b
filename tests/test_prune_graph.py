"""The traced channel graph of structured pruning (zoo.compress.graph): followed ops, refusals, taints,
search over shuffles and splits, the probe check, global-scope caps and size-normalised scores."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo
import zoo.compress as zc
from zoo.compress import criteria, rules
from zoo.compress.groups import build_groups
from zoo.compress.pruning import verify_pruned
from zoo.compress.select import keep_counts
from zoo.compress.surgery import apply_plan, plan, zero_removed
from zoo.errors import ZooError
from zoo.profile import count_macs
from toy_nets import Toy, outputs, random_bn  # noqa: E402  (tests/ is on sys.path)

X8 = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


def _masked_vs_pruned(m: nn.Module, x: torch.Tensor, amount: float, scope: str, seed: int = 3
                      ) -> tuple[torch.Tensor, torch.Tensor, nn.Module]:
    groups = build_groups(m, x[:1])
    kept = plan(groups, criteria.unit_scores(m, groups, "random", seed=seed), amount, scope)
    ref, pruned = copy.deepcopy(m), copy.deepcopy(m)
    zero_removed(ref, groups, kept)
    apply_plan(pruned, groups, kept)
    return outputs(ref, x), outputs(pruned, x), pruned


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / a.abs().max())


def test_residual_inside_a_custom_module_is_one_group():
    m = random_bn(Toy())
    groups = build_groups(m, X8[:1])
    stage = [g for g in groups if any(mm.module == "blocks.0.conv2" and mm.kind == "out" for mm in g.members)]
    assert len(stage) == 1
    outs = {mm.module for mm in stage[0].members if mm.kind == "out"}
    assert outs == {"stem.0", "blocks.0.conv2", "blocks.1.conv2"}  # both sides of both adds
    a, b, _ = _masked_vs_pruned(m, X8, 0.5, "global")
    assert _rel(a, b) < 1e-5
    p = zc.prune(m, 0.5, "magnitude", "channel", "global", example_inputs=X8[:1], p=1)
    widths = {p.stem[0].out_channels, p.blocks[0].conv2.out_channels, p.blocks[1].conv1.in_channels,
              p.blocks[1].conv2.out_channels, p.fc.in_features}
    assert len(widths) == 1 and widths.pop() < 8


class Shuffled(nn.Module):
    """Functional channel split, shuffle and flatten into a linear layer, without any zoo layer."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 12, 1)
        self.b = nn.Conv2d(6, 6, 3, padding=1, groups=3)
        self.c = nn.Conv2d(12, 8, 1, groups=2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.a(x))
        x1, x2 = x.chunk(2, dim=1)
        x = torch.cat([x1, self.b(x2)], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        x = F.max_pool2d(self.c(x), 4)
        return self.fc(x.flatten(1))


def test_split_shuffle_grouped_and_flatten_are_followed_exactly():
    m = Shuffled().eval()
    for amount, scope, seed in ((0.5, "layer", 1), (0.4, "global", 2), (0.3, "global", 5)):
        a, b, p = _masked_vs_pruned(m, X8, amount, scope, seed)
        assert _rel(a, b) < 1e-5, (amount, scope)
    assert count_macs(p, (3, 16, 16)) < count_macs(m, (3, 16, 16))
    assert p.fc.in_features == p.c.out_channels * 16  # a flattened channel keeps its 4x4 features


class HardSplit(nn.Module):
    """torch.split with hard-coded sizes: its input channels cannot shrink."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 8, 1), nn.Conv2d(4, 8, 1), nn.Conv2d(4, 8, 1)
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = torch.split(self.a(x), [4, 4], dim=1)
        return self.fc((self.b(x1) + self.c(x2)).mean((2, 3)))


def test_a_layout_the_graph_cannot_shrink_stays_whole():
    m = HardSplit().eval()
    p = zc.prune(m, 0.5, "magnitude", "channel", "layer", example_inputs=X8[:1])
    assert p.a.out_channels == 8 and p.b.out_channels == p.c.out_channels == p.fc.in_features == 4
    groups = {g.name: g for g in build_groups(m, X8[:1])}
    assert not groups["a"].free and not groups["a"].frozen
    kept = plan(list(groups.values()), criteria.unit_scores(m, list(groups.values()), "random"), 0.5, "layer")
    assert kept[list(groups).index("a")] is None  # only the full count fits the split: the group stays whole


class Gated(nn.Module):
    """conv -> sigmoid -> conv: a removed channel would still feed 0.5 into the second conv; z * sigmoid(z)
    (a swish gate) keeps a removed channel at zero."""

    def __init__(self):
        super().__init__()
        self.a, self.b, self.fc = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 8, 1), nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.relu(self.b(torch.sigmoid(self.a(x))))
        return self.fc((z * torch.sigmoid(z)).mean((2, 3)))


def test_nonzero_when_removed_channels_are_frozen_but_gates_are_not():
    m = Gated().eval()
    groups = {g.name: g for g in build_groups(m, X8[:1])}
    assert "non-zero when removed" in groups["a"].frozen
    assert not groups["b"].frozen
    p = zc.prune(m, 0.5, "magnitude", "channel", "layer", example_inputs=X8[:1])
    assert p.a.out_channels == 8 and p.b.out_channels == 4 == p.fc.in_features


class Cumsum(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.cumsum(1)


class Branchy(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return y if y.sum() > 0 else -y


@pytest.mark.parametrize("body,match", [
    (Cumsum(), r"op 'cumsum' in 'body'"),
    (nn.InstanceNorm2d(8), r"InstanceNorm2d \(module body in 'body'\)"),
    (nn.Sequential(nn.ReLU(), nn.ConvTranspose2d(8, 8, 1)), r"ConvTranspose2d \(module body\.1"),
])
def test_an_op_without_a_rule_is_refused_by_name(body, match):
    m = nn.Sequential()
    m.add_module("stem", nn.Conv2d(3, 8, 1))
    m.add_module("body", body)
    m.add_module("pool", nn.AdaptiveAvgPool2d(1))
    with pytest.raises(ZooError, match=match):
        zc.prune(m, 0.5, "magnitude", "channel", example_inputs=X8[:1])


def test_untraceable_control_flow_is_refused():
    with pytest.raises(ZooError, match="torch.fx cannot trace Branchy"):
        zc.prune(Branchy(), 0.5, "magnitude", "channel", example_inputs=X8[:1])


def test_the_probe_check_names_the_first_wrong_layer():
    m = random_bn(Toy())
    groups = build_groups(m, X8[:1])
    kept = plan(groups, criteria.unit_scores(m, groups, "random", seed=1), 0.5, "layer")
    ref, pruned = copy.deepcopy(m), copy.deepcopy(m)
    zero_removed(ref, groups, kept)
    index: dict[str, torch.Tensor] = {}
    apply_plan(pruned, groups, kept, index)
    verify_pruned(ref, pruned, X8[:1], index)  # right: passes
    with torch.no_grad():
        pruned.blocks[1].conv1.weight[0, 0, 1, 1] += 1.0
    with pytest.raises(ZooError, match="differs from the masked model at 'blocks.1.conv1'"):
        verify_pruned(ref, pruned, X8[:1], index)


def _skewed(groups, stem: int) -> list:
    """Scores that make plain global ranking empty the stem: its units all score the group mean, every other
    group has a tenth of its units far below its mean and the rest just above it."""
    out = []
    for i, g in enumerate(groups):
        if g.frozen:
            out.append(None)
        elif i == stem:
            out.append(torch.ones(g.size, dtype=torch.float64))
        else:
            s = torch.full((g.size,), 1.1, dtype=torch.float64)
            s[: g.size // 10] = 0.01
            out.append(s)
    return out


def test_global_scope_caps_each_layer_and_redistributes():
    m = zoo.create("mobilenet_v1", width=0.25, resolution=32, num_classes=10).eval()
    groups = build_groups(m)
    stem = next(i for i, g in enumerate(groups) if g.name == "stem.conv")
    scores = _skewed(groups, stem)
    live = [i for i, g in enumerate(groups) if not g.frozen]
    want = round(0.3 * sum(groups[i].size for i in live))
    counts = keep_counts(groups, scores, 0.3, "global")
    assert counts[stem] == 1  # default: at least one channel stays
    assert sum(groups[i].size - counts[i] for i in live) == want  # the rest went to other layers
    capped = keep_counts(groups, scores, 0.3, "global", max_fraction=0.5)
    assert capped[stem] == 4 and all(capped[i] >= groups[i].size - groups[i].size // 2 for i in live)
    assert sum(groups[i].size - capped[i] for i in live) == want
    kept = plan(groups, scores, 0.3, "global")
    assert kept[stem].numel() == 1
    for bad in (0, 1.5, -0.1, "0.5", True):
        with pytest.raises(ZooError, match="max_per_layer"):
            zc.prune(m, 0.3, "magnitude", "channel", max_per_layer=bad)


@pytest.mark.slow
def test_global_loss_change_on_a_thin_mobilenet_keeps_every_layer():
    """Issue 12: loss_change in global scope used to remove every channel of a thin stem."""
    m = zoo.create("mobilenet_v1", width=0.25, resolution=32, num_classes=10).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g))]
    p = zc.prune(m, 0.3, "loss_change", "channel", "global", data=data)
    convs = [c for c in p.modules() if isinstance(c, nn.Conv2d)]
    assert all(c.out_channels >= 1 for c in convs)
    assert count_macs(p, (3, 32, 32)) < count_macs(m, (3, 32, 32))


class MixedSizes(nn.Module):
    """Half of a conv's channels also pass a 3x3 depthwise conv: one group, two filter sizes per unit."""

    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1, bias=False)
        self.dw = nn.Conv2d(4, 4, 3, padding=1, groups=4, bias=False)
        self.b = nn.Conv2d(8, 4, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(torch.cat([self.dw(y[:, :4]), y[:, 4:]], 1)).mean((2, 3))


@pytest.mark.parametrize("p", [1, 2])
def test_scores_are_normalised_for_filter_size(p):
    m = MixedSizes()
    with torch.no_grad():
        for w in (m.a.weight, m.dw.weight, m.b.weight):
            w.fill_(0.5)
    g = next(g for g in build_groups(m, X8[:1]) if g.name == "a")
    s = criteria.unit_scores(m, [g], "magnitude", p=p)[0]
    assert torch.allclose(s, s[0].expand_as(s))  # 3 + 9 weights vs 3 weights of the same size: equal scores
    raw = torch.tensor([3 + 9] * 4 + [3] * 4, dtype=torch.float64) * 0.5 ** p
    assert torch.allclose(s, (raw.mean()).pow(1 / p).expand_as(s))


@pytest.mark.parametrize("name", ["squeezenet1_0", "squeezenet1_1"])
def test_squeezenet_l1_magnitude_prunes_every_fire(name):
    m = zoo.create(name, num_classes=10).eval()
    size = (3, 64, 64)
    for scope in ("global", "layer"):
        p = zc.prune(m, 0.5, "magnitude", "channel", scope, p=1, example_inputs=torch.zeros(1, *size))
        fires = [f for f in p.modules() if type(f).__name__ == "Fire"]
        assert all(0 < f.expand1x1.conv.out_channels and 0 < f.expand3x3.conv.out_channels for f in fires)
        assert count_macs(p, size) < 0.4 * count_macs(m, size)


class WithOptions(nn.Module):
    """A forward with defaulted options: traced with those defaults."""

    def __init__(self):
        super().__init__()
        self.a, self.fc = nn.Conv2d(3, 8, 1), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor, scale: float = 2.0, features: bool = False) -> torch.Tensor:
        y = F.relu(self.a(x)) * scale
        return y if features else self.fc(y.mean((2, 3)))


def test_forward_options_are_traced_with_their_defaults():
    m = WithOptions().eval()
    p = zc.prune(m, 0.5, "magnitude", "channel", example_inputs=X8[:1])
    assert p.a.out_channels == p.fc.in_features == 4
    a, b, _ = _masked_vs_pruned(m, X8, 0.5, "layer")
    assert _rel(a, b) < 1e-5


class ShapeGuard(nn.Module):
    """An elementwise layer whose forward branches on the input's rank: torch.fx cannot trace into it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp(min=0) if x.dim() == 4 else x


def test_a_registered_layer_rule_makes_an_untraceable_layer_a_leaf():
    m = nn.Sequential(nn.Conv2d(3, 8, 1), ShapeGuard(), nn.Conv2d(8, 8, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                      nn.Linear(8, 4)).eval()
    with pytest.raises(ZooError, match="torch.fx cannot trace"):
        zc.prune(m, 0.5, "magnitude", "channel", example_inputs=X8[:1])
    rules.register_module_rule(ShapeGuard, rules.passthrough_rule)
    try:
        p = zc.prune(m, 0.5, "magnitude", "channel", "layer", example_inputs=X8[:1])
    finally:
        del rules.MODULE_RULES[ShapeGuard]
    assert p[0].out_channels == p[2].in_channels == 4
