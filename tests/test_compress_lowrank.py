"""Low-rank factorisation (SVD for linear / 1x1 convs, Tucker-2 for kxk convs) of zoo.compress.

Every registered family at 32x32 and 10 classes; the heavy ImageNet ResNets resnet34 / resnet101 /
resnet152 are represented by resnet18 and resnet50 (the same blocks, stem and head).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import zoo
import zoo.compress as zc
from zoo.compress.lowrank import _rank_for
from zoo.errors import ZooError
from zoo.profile import count_macs, layer_stats

from toy_nets import outputs, small  # (tests/ is on sys.path)

REPRESENTED = {"resnet34": "resnet18", "resnet101": "resnet50", "resnet152": "resnet50"}
MODELS = [n for n in zoo.list_models() if n not in REPRESENTED]


@pytest.mark.parametrize("name", MODELS)
def test_low_rank_every_family(name, tmp_path):
    m = small(name)
    size = m.spec.input_size
    x = torch.randn(2, *size)
    f = zc.low_rank(m, energy=0.6)
    step = f.spec.compression[-1]
    assert step["kind"] == "lowrank" and step["modules"], "nothing was factorised"
    before = {r.name: r.macs for r in layer_stats(m, size)}
    after = {r.name: r.macs for r in layer_stats(f, size)}
    for path, d in step["modules"].items():  # every factorised layer really costs fewer MACs
        parts = sum(v for k, v in after.items() if k.startswith(path + "."))
        assert 0 < parts < before[path], path
        assert isinstance(f.get_submodule(path), nn.Sequential)
        assert len(f.get_submodule(path)) == (2 if d["method"] == "svd" else 3)
    for path in step["skipped"]:
        assert not isinstance(f.get_submodule(path), nn.Sequential)
    assert count_macs(f, size) < count_macs(m, size)
    assert outputs(f, x).shape == (2, 10)
    path = str(tmp_path / "lr.safetensors")
    zc.save(f, path)
    assert torch.equal(outputs(zc.load(path), x), outputs(f, x))


def test_exact_low_rank_weights_are_reproduced():
    """Weights of known rank are reproduced exactly by SVD / Tucker-2 at that rank, and `energy` finds it."""
    torch.manual_seed(0)
    conv3 = nn.Conv2d(24, 32, 3, stride=2, padding=1)
    conv1 = nn.Conv2d(32, 40, 1)
    lin = nn.Linear(40, 48)
    with torch.no_grad():
        core, u0, u1 = torch.randn(5, 6, 3, 3), torch.randn(32, 5), torch.randn(24, 6)
        conv3.weight.copy_(torch.einsum("rskl,or,is->oikl", core, u0, u1))  # Tucker ranks (5, 6)
        conv1.weight.copy_((torch.randn(40, 4) @ torch.randn(4, 32))[:, :, None, None])  # rank 4
        lin.weight.copy_(torch.randn(48, 3) @ torch.randn(3, 40))  # rank 3
    net = nn.Sequential(conv3, conv1, nn.AdaptiveAvgPool2d(1), nn.Flatten(1), lin).eval()
    x = torch.randn(2, 24, 32, 32)
    f = zc.low_rank(net, rank=6, example_inputs=x)
    d = f.spec.compression[-1]["modules"]
    assert d == {"0": {"method": "tucker2", "ranks": [6, 6]}, "1": {"method": "svd", "ranks": [6]},
                 "4": {"method": "svd", "ranks": [6]}}
    ref, got = outputs(net, x), outputs(f, x)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))
    g = zc.low_rank(net, energy=0.999999, example_inputs=x)  # energy picks the true ranks
    d = g.spec.compression[-1]["modules"]
    assert d["4"]["ranks"] == [3] and d["1"]["ranks"] == [4] and d["0"]["ranks"] == [5, 6]
    assert torch.allclose(outputs(g, x), ref, rtol=1e-4, atol=1e-4 * float(ref.abs().max()))


def test_rank_by_energy_is_the_smallest_sufficient():
    s = torch.tensor([4.0, 2.0, 1.0, 1.0])  # energies 16, 4, 1, 1 of 22
    assert _rank_for(s, None, 16 / 22) == 1
    assert _rank_for(s, None, 16.5 / 22) == 2
    assert _rank_for(s, None, 1.0) == 4
    assert _rank_for(s, 3, None) == 3 and _rank_for(s, 9, None) == 4


def test_layers_that_would_not_shrink_are_skipped():
    m = small("resnet20")
    f = zc.low_rank(m, rank=10_000)
    step = f.spec.compression[-1]
    assert step["modules"] == {} and len(step["skipped"]) == sum(
        isinstance(mod, (nn.Conv2d, nn.Linear)) for mod in m.modules())
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(outputs(f, x), outputs(m, x))
    dw = small("mobilenet_v1", width=0.25)
    g = zc.low_rank(dw, energy=0.5)
    done = g.spec.compression[-1]["modules"]
    assert done and all(getattr(dw.get_submodule(p), "groups", 1) == 1 for p in done)  # no depthwise conv


def test_factorised_then_pruned_order_and_int8(tmp_path):
    m = small("mobilenet_v1", width=0.5)
    p = zc.prune(m, 0.3, "magnitude", "channel")
    f = zc.low_rank(p, energy=0.7)
    q = zc.quantize(f, "static", [torch.randn(4, 3, 32, 32)], observer="minmax")
    assert [s["kind"] for s in q.spec.compression] == ["channels", "lowrank", "int8"]
    x = torch.randn(2, 3, 32, 32)
    path = str(tmp_path / "plq.safetensors")
    zc.save(q, path)
    assert torch.equal(outputs(zc.load(path), x), outputs(q, x))
    with pytest.raises(ZooError, match="low-rank|before"):
        zc.prune(f, 0.3, "magnitude", "channel")


def test_bad_low_rank_arguments():
    m = small("resnet20")
    with pytest.raises(ZooError, match="exactly one"):
        zc.low_rank(m)
    with pytest.raises(ZooError, match="exactly one"):
        zc.low_rank(m, rank=4, energy=0.5)
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ZooError, match="rank="):
            zc.low_rank(m, rank=bad)
    for bad in (0, 1.5, -0.2, "0.5"):
        with pytest.raises(ZooError, match="energy="):
            zc.low_rank(m, energy=bad)
    with pytest.raises(ZooError, match="make_permanent"):
        zc.low_rank(zc.prune(m, 0.5), energy=0.5)
    with pytest.raises(ZooError, match="quantized"):
        zc.low_rank(zc.quantize(m, "dynamic"), energy=0.5)
