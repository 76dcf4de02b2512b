"""zoo.compress.actgrid: layer outputs rounded to fixed affine uint8 grids (Jacob et al. 2018, eq. 1)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import zoo
from zoo.compress import fix_activation_grids
from zoo.errors import ZooError


def _net() -> nn.Module:
    return nn.Sequential(nn.Identity(), nn.Linear(5, 5))


def test_rounds_half_away_from_zero_and_saturates():
    m = fix_activation_grids(_net(), {"0": (0.5, 10)})
    x = torch.tensor([-5.25, -0.25, 0.25, 0.75, 1.2, 200.0])  # q = x / 0.5 + 10, rounded, clamped to 0..255
    want = torch.tensor([-5.0, -0.5, 0.5, 1.0, 1.0, 122.5])
    with torch.no_grad():
        assert torch.equal(m[0](x), want)
    assert zoo.compress._common.steps(m) == [{"kind": "actgrid", "modules": {"0": [0.5, 10]}, "qmin": 0, "qmax": 255}]


def test_gradient_passes_straight_through():
    m = fix_activation_grids(_net(), {"1": (0.1, 128)})
    x = torch.randn(3, 5)
    y = m(x)
    y.sum().backward()
    assert torch.allclose(m[1].weight.grad, x.sum(0).expand(5, 5))  # as without the grid
    with torch.no_grad():
        q = m(x) / 0.1 + 128
    assert torch.allclose(q, q.round(), atol=1e-4) and torch.allclose(y.detach(), m(x).detach(), atol=1e-6)


def test_int8_range():
    m = fix_activation_grids(_net(), {"0": (1.0, 0)}, qmin=-128, qmax=127)
    with torch.no_grad():
        assert torch.equal(m[0](torch.tensor([-500.0, 2.5, 500.0])), torch.tensor([-128.0, 3.0, 127.0]))


@pytest.mark.parametrize("grids,qmin,qmax,msg", [
    ({}, 0, 255, "grids={} is not allowed; expected a non-empty mapping"),
    ({"2": (0.1, 0)}, 0, 255, "'2' is not a submodule of Sequential"),
    ({"0": (0.0, 0)}, 0, 255, r"the grid of '0' is \(0.0, 0\); expected \(scale, zero_point\) with a finite scale"),
    ({"0": (float("nan"), 0)}, 0, 255, "the grid of '0' is"),
    ({"0": (0.1, 256)}, 0, 255, "an int zero_point in 0..255"),
    ({"0": (0.1, 1.0)}, 0, 255, "an int zero_point in 0..255"),
    ({"0": (0.1, 0)}, 5, 5, "qmin=5 must be below qmax=5"),
    ({"0": (0.1, 0)}, 0.0, 255, "qmin=0.0 is not allowed; expected an int"),
])
def test_bad_grids_refused(grids, qmin, qmax, msg):
    with pytest.raises(ZooError, match=msg):
        fix_activation_grids(_net(), grids, qmin=qmin, qmax=qmax)


def test_save_reload_and_refusals(tmp_path):
    torch.manual_seed(0)
    m = zoo.create("mobilenet_v1", width=0.25, resolution=32, num_classes=10).eval()
    fix_activation_grids(m, {"stem": (6 / 255, 0), "blocks.0.pw": (6 / 255, 0), "classifier": (0.05, 128)})
    with pytest.raises(ZooError, match="already has fixed activation grids"):
        fix_activation_grids(m, {"stem": (0.1, 0)})
    with pytest.raises(ZooError, match="rounds its activations to fixed grids .* quantize the float import instead"):
        zoo.compress.quantize(m, "dynamic")
    zoo.compress.save(m, tmp_path / "g.safetensors")
    r = zoo.compress.load(tmp_path / "g.safetensors").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(r(x), m(x))
        q = r.classifier(torch.zeros(1, 256)) / 0.05  # the bias, on the classifier's grid
        assert torch.allclose(q, q.round(), atol=1e-4) and not torch.equal(r.classifier.bias, q.round() * 0.05)
    assert zoo.profile(r).params == zoo.profile(m).params


def test_crafted_actgrid_step_refused():
    spec = {"name": "mlp", "kwargs": {"resolution": 4}}
    with pytest.raises(ZooError, match=r"compression step 0 \(actgrid\) needs 'modules' as a dict"):
        zoo.compress.build_from_spec({**spec, "compression": [{"kind": "actgrid", "modules": [1]}]})
    with pytest.raises(ZooError, match="spec: actgrid step: 'nope' is not a submodule"):
        zoo.compress.build_from_spec({**spec, "compression": [{"kind": "actgrid", "modules": {"nope": [1.0, 0]}}]})
    with pytest.raises(ZooError, match="spec: actgrid step has qmin=.*expected ints with qmin < qmax"):
        zoo.compress.build_from_spec({**spec, "compression": [
            {"kind": "actgrid", "modules": {"features.1": [1.0, 0]}, "qmin": 3, "qmax": 1}]})
