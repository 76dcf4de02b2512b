"""Structured pruning of models zoo did not build (torchvision, timm): traced, exact, trainable, reloadable."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo.compress as zc
from zoo.compress import criteria
from zoo.compress.groups import build_groups
from zoo.compress.portable import load_pruned, save_pruned
from zoo.compress.surgery import apply_plan, plan, zero_removed
from zoo.errors import ZooError

from toy_nets import outputs, random_bn  # (tests/ is on sys.path)
from zoo.profile import count_macs

torchvision = pytest.importorskip("torchvision")
timm = pytest.importorskip("timm")

SIZE = (3, 32, 32)
FOREIGN = {
    "tv_mobilenet_v2": lambda: torchvision.models.mobilenet_v2(num_classes=10),
    "tv_resnet18": lambda: torchvision.models.resnet18(num_classes=10),
    "tv_squeezenet1_1": lambda: torchvision.models.squeezenet1_1(num_classes=10),
    "tv_shufflenet_v2_x1_0": lambda: torchvision.models.shufflenet_v2_x1_0(num_classes=10),
    "timm_mobilenetv3_small_100": lambda: timm.create_model("mobilenetv3_small_100", num_classes=10),
    "timm_resnet18": lambda: timm.create_model("resnet18", num_classes=10),
    "timm_ghostnet_100": lambda: timm.create_model("ghostnet_100", num_classes=10),
}


def _build(name: str) -> nn.Module:
    torch.manual_seed(0)
    return random_bn(FOREIGN[name]())  # non-trivial BN statistics, so that a wrong channel shows in the outputs


@pytest.mark.parametrize("name", sorted(FOREIGN))
def test_foreign_model_prunes_exactly(name, tmp_path):
    m = _build(name)
    x = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(2))
    # exact: equal to the model with the removed channels zeroed (random choice, so no layout is favoured)
    groups = build_groups(m, x[:1])
    kept = plan(groups, criteria.unit_scores(m, groups, "random", seed=4), 0.5, "layer")
    ref, cut = copy.deepcopy(m), copy.deepcopy(m)
    zero_removed(ref, groups, kept)
    apply_plan(cut, groups, kept)
    a, b = outputs(ref, x), outputs(cut, x)
    assert float((a - b).abs().max()) <= 1e-5 * float(a.abs().max())
    # the public API: L1 magnitude, global, checked against the masked model inside prune
    p = zc.prune(m, 0.5, "magnitude", "channel", "global", p=1, example_inputs=x[:1])
    assert count_macs(p, SIZE) <= 0.35 * count_macs(m, SIZE)
    assert sum(t.numel() for t in p.parameters()) <= 0.4 * sum(t.numel() for t in m.parameters())
    p.train()
    loss = F.cross_entropy(p(x), torch.tensor([1, 2]))
    loss.backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in p.parameters() if t.requires_grad)
    path = tmp_path / "p.safetensors"
    save_pruned(p, path)
    assert b"\x80" not in path.read_bytes()[:8]  # a safetensors header, not a pickle
    r = load_pruned(path, FOREIGN[name]())
    assert torch.equal(outputs(r, x), outputs(p, x))


def test_load_pruned_refuses_other_files(tmp_path):
    m = _build("tv_squeezenet1_1")
    p = zc.prune(m, 0.5, "magnitude", "channel", example_inputs=torch.zeros(1, *SIZE))
    path = tmp_path / "p.safetensors"
    save_pruned(p, path)
    with pytest.raises(ZooError, match="do not fit"):
        load_pruned(path, torchvision.models.squeezenet1_0(num_classes=10))
    with pytest.raises(ZooError, match="no such file"):
        load_pruned(tmp_path / "missing.safetensors", m)


def test_foreign_model_needs_an_example_input():
    with pytest.raises(ZooError, match="example_inputs"):
        zc.prune(_build("tv_resnet18"), 0.5, "magnitude", "channel")
