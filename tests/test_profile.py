"""zoo.profile: hand-computed MACs (incl. depthwise, grouped and int8 layers), fvcore, sparsity, modes."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import zoo
from zoo.weights.checkpoint import serialized_size
from zoo.profile import Profile, count_macs, profile


def tiny_net() -> nn.Sequential:
    """3x8x8 input: conv 3->8 (3x3, pad 1), depthwise 8 (3x3, stride 2), grouped 8->16 (1x1, g=4), fc."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),  # out 8x8x8 = 512 elements x (3 * 9) = 13,824 MACs; 224 params
        nn.BatchNorm2d(8),  # 16 params, 0 MACs
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1, groups=8),  # out 8x4x4 = 128 x (1 * 9) = 1,152; 80 params
        nn.Conv2d(8, 16, 1, groups=4),  # out 16x4x4 = 256 x (2 * 1) = 512; 48 params
        nn.Flatten(),
        nn.Linear(256, 10),  # 10 x 256 = 2,560; 2,570 params
    )


TINY_MACS = 13_824 + 1_152 + 512 + 2_560
TINY_PARAMS = 224 + 16 + 80 + 48 + 2_570
TINY_SIZE = (3, 8, 8)


def test_tiny_net_hand_computed() -> None:
    p = profile(tiny_net(), input_size=TINY_SIZE)
    assert isinstance(p, Profile)
    assert p.macs == TINY_MACS == 18_048
    assert p.params == TINY_PARAMS == 2_938
    assert [(r.name, r.macs) for r in p.layers] == [("0", 13_824), ("1", 0), ("3", 1_152), ("4", 512), ("6", 2_560)]
    assert [r.output_shape for r in p.layers] == [(8, 8, 8), (8, 8, 8), (8, 4, 4), (16, 4, 4), (10,)]
    assert [r.params for r in p.layers] == [224, 16, 80, 48, 2_570]
    assert p.size_bytes == serialized_size(tiny_net())
    assert p.latency_ms is None and p.input_size == TINY_SIZE
    text = p.table()
    assert "18,048" in text and "2,938" in text and "Conv2d" in text and "Linear" in text
    s = p.summary()
    assert s["macs"] == TINY_MACS and s["params"] == TINY_PARAMS and "layers" not in s


def test_macs_are_per_sample() -> None:
    # Linear on (N, 5, 256): each of the 5 rows costs out * in; a batch never multiplies the count.
    net = nn.Sequential(nn.Flatten(2), nn.Linear(4, 3))
    assert count_macs(net, (5, 2, 2)) == 5 * 3 * 4
    assert profile(tiny_net(), input_size=TINY_SIZE, latency=True, batch_size=4).macs == TINY_MACS


def test_input_size_required_for_plain_module() -> None:
    with pytest.raises(zoo.ZooError, match="input_size"):
        profile(tiny_net())
    for bad in [(3, 8), (3, 0, 8), "3x8x8", (3.0, 8, 8)]:
        with pytest.raises(zoo.ZooError, match="input_size"):
            profile(tiny_net(), input_size=bad)
    with pytest.raises(zoo.ZooError, match="batch_size"):
        profile(tiny_net(), input_size=TINY_SIZE, batch_size=0)


def test_int8_converted_modules_counted_from_weights() -> None:
    from torch.ao import quantization as tq

    class Q(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.quant, self.net, self.dequant = tq.QuantStub(), tiny_net(), tq.DeQuantStub()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.dequant(self.net(self.quant(x)))

    model = Q().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.qconfig = tq.get_default_qconfig("qnnpack" if "x86" not in torch.backends.quantized.supported_engines else "x86")
        tq.fuse_modules(model.net, [["0", "1", "2"]], inplace=True)  # conv+bn+relu -> ConvReLU2d
        tq.prepare(model, inplace=True)
        model(torch.randn(4, *TINY_SIZE))
        tq.convert(model, inplace=True)
    types = {type(m).__name__ for m in model.modules()}
    assert {"ConvReLU2d", "Conv2d", "Linear"} <= types and "BatchNorm2d" not in types
    p = profile(model, input_size=TINY_SIZE)
    assert p.macs == TINY_MACS
    assert p.params == TINY_PARAMS - 16  # BN folded into the conv
    assert p.flops_fvcore is None and any("fvcore" in n for n in p.notes)  # recorded, not raised

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        dyn = tq.quantize_dynamic(nn.Sequential(nn.Flatten(), nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 5)),
                                  {nn.Linear})
    pd = profile(dyn, input_size=(3, 2, 2))
    assert pd.macs == 12 * 20 + 20 * 5 and pd.params == 12 * 20 + 20 + 20 * 5 + 5


def test_resolution_160_mobilenet_profiles_at_160() -> None:
    m160 = zoo.create("mobilenet_v1", width=0.25, resolution=160)
    p = profile(m160, flops=False)
    assert p.input_size == (3, 160, 160)
    m224 = zoo.create("mobilenet_v1", width=0.25)
    assert p.macs == count_macs(m224, (3, 160, 160)) < count_macs(m224)
    assert profile(m160, input_size=(3, 224, 224), flops=False).macs == count_macs(m224)


def test_fvcore_close_to_macs_mobilenet_quarter() -> None:
    p = profile(zoo.create("mobilenet_v1", width=0.25))
    assert p.flops_fvcore is not None, p.notes
    # fvcore: one fused multiply-add = one flop; its extras (BN 2/elem, pooling) add a few percent.
    assert p.macs <= p.flops_fvcore <= 1.08 * p.macs
    assert abs(p.macs - 41_000_000) <= 0.01 * 41_000_000


def test_sparsity_with_planted_zeros() -> None:
    net = tiny_net()
    dense = profile(net, input_size=TINY_SIZE, flops=False)
    assert dense.sparsity == 0.0 and dense.sparse_size_bytes == dense.size_bytes
    # the BN bias (8 values) is zero-initialised; conv/linear biases are random
    assert dense.nonzero_params == TINY_PARAMS - 8
    weights = 216 + 72 + 32 + 2_560
    with torch.no_grad():
        net[6].weight[:, :200].zero_()  # 2,000 of 2,560 linear weights
        net[0].weight[:4].zero_()  # 108 of 216 conv weights
    p = profile(net, input_size=TINY_SIZE, flops=False)
    assert p.nonzero_params == TINY_PARAMS - 8 - 2_108
    assert p.sparsity == pytest.approx(2_108 / weights)
    # linear: dense 10,240 bytes -> 320 (bitmask) + 560 * 4 = 2,560 bytes; conv: 864 -> 27 + 432 = 459
    assert p.size_bytes - p.sparse_size_bytes == (10_240 - 2_560) + (864 - 459)


def test_pruned_weights_counted_through_mask() -> None:
    net = tiny_net()
    from torch.nn.utils import prune

    prune.l1_unstructured(net[6], "weight", amount=0.5)  # weight = weight_orig * mask
    p = profile(net, input_size=TINY_SIZE, flops=False)
    assert p.params == TINY_PARAMS  # weight_orig counted once
    assert p.nonzero_params == TINY_PARAMS - 8 - 1_280


def test_profile_leaves_model_unchanged() -> None:
    model = zoo.create("mobilenet_v1", width=0.25, resolution=64)
    model.train()
    model.blocks[0].eval()  # a mixed state must survive too
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modes = [m.training for m in model.modules()]
    profile(model, latency=True)
    assert [m.training for m in model.modules()] == modes
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # BN running stats untouched
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    model.eval()
    profile(model)
    assert not any(m.training for m in model.modules())


def test_latency_reported_only_when_asked() -> None:
    model = zoo.create("mobilenet_v1", width=0.25, resolution=64)
    assert profile(model, flops=False).latency_ms is None
    p = profile(model, latency=True, batch_size=2, flops=False)
    assert p.latency_ms is not None and p.latency_ms > 0 and p.batch_size == 2
    assert "latency" in p.table()
