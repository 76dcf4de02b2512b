"""zoo.shuffle_fold: ShuffleNet v2's channel shuffles folded into weights for deployment (Ma et al. 2018)."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import zoo
import zoo.compress as zc
from zoo.errors import ZooError
from zoo.export import max_abs_diff, to_onnx
from zoo.layers import ChannelShuffle, ConvNormAct
from zoo.shuffle_fold import FoldedSplitUnit, FoldedStridedUnit, fold_channel_shuffles, has_channel_shuffles

from toy_nets import random_bn  # (tests/ is on sys.path)



def _check(m: nn.Module, side: int) -> nn.Module:
    f = fold_channel_shuffles(m).eval()
    x = torch.randn(2, 3, side, side)
    with torch.no_grad():
        ref, got = m(x), f(x)
    assert ref.abs().max() > 1e-3
    assert (got - ref).abs().max() <= 1e-5 * ref.abs().max()
    assert not any(isinstance(mod, ChannelShuffle) for mod in f.modules())
    assert any(isinstance(mod, ChannelShuffle) for mod in m.modules())  # the original is left as it was
    return f


@pytest.mark.parametrize("kw,side", [({"width": 0.5}, 64), ({"width": 1.5}, 64),
                                     ({"width": 0.5, "stem": "cifar"}, 32)])
def test_folded_model_computes_the_same(kw, side):
    m = random_bn(zoo.create("shufflenet_v2", num_classes=10, **kw))
    f = _check(m, side)
    kinds = [type(u) for s in f.stages for u in s]
    assert kinds == [FoldedStridedUnit, FoldedSplitUnit, FoldedSplitUnit, FoldedSplitUnit,
                     FoldedStridedUnit] + [FoldedSplitUnit] * 7 + [FoldedStridedUnit] + [FoldedSplitUnit] * 3
    last = f.stages[1][7]  # the 8th unit of stage 3 gathers each half from runs of the physical order
    half = last.branch2[0].conv.in_channels
    assert sum(b - a for a, b in last.pass_runs) == sum(b - a for a, b in last.branch_runs) == half
    assert 1 < len(last.branch_runs) <= 8  # a few slices, not one per channel


def test_channel_pruned_model_folds():
    torch.manual_seed(1)
    m = random_bn(zoo.create("shufflenet_v2", width=1.0, num_classes=10))
    p = zc.prune(m, 0.5, "magnitude", granularity="channel", example_inputs=torch.randn(1, 3, 64, 64)).eval()
    _check(p, 64)


def test_refusals():
    assert not has_channel_shuffles(zoo.create("mobilenet_v2"))
    with pytest.raises(ZooError, match="cannot fold MobileNetV2: it has no ShuffleV2Unit"):
        fold_channel_shuffles(zoo.create("mobilenet_v2"))
    masked = zc.prune(zoo.create("shufflenet_v2", width=0.5), 0.5, "magnitude")
    assert not has_channel_shuffles(masked)
    with pytest.raises(ZooError, match="parametrized weights"):
        fold_channel_shuffles(masked)



def test_batchnorm_folded_model_folds_and_quantized_one_is_refused():
    m = random_bn(zoo.create("shufflenet_v2", width=0.5, num_classes=10))
    bn_pairs = [[f"{n}.conv", f"{n}.bn"] for n, mod in m.named_modules()
                if isinstance(mod, ConvNormAct) and isinstance(mod.bn, nn.BatchNorm2d)]
    _check(torch.ao.quantization.fuse_modules(m, bn_pairs), 64)  # BN in the conv: still a plain nn.Conv2d
    q = zc.quantize(m, "static", calibration=[torch.randn(4, 3, 64, 64)])
    assert not has_channel_shuffles(q)
    with pytest.raises(ZooError, match="not plain nn.Conv2d"):
        fold_channel_shuffles(q)


def test_onnx_export_folds_the_shuffles(tmp_path):
    onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx extra: pip install 'zoo[onnx]'")
    pytest.importorskip("onnxruntime", reason="the check runs the file in onnxruntime: pip install 'zoo[onnx]'")
    m = random_bn(zoo.create("shufflenet_v2", width=0.5, num_classes=10))
    path = to_onnx(m, tmp_path / "s.onnx", 64)
    ops = {n.op_type for n in onnx.load(str(path)).graph.node}
    assert "Transpose" not in ops and "Slice" in ops  # no shuffle at run time; the split gathers slices
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        scale = float(m(x).abs().max())
    assert max_abs_diff(m, path, x) <= 1e-5 * scale
    assert not m.training and any(isinstance(mod, ChannelShuffle) for mod in m.modules())  # left as it was
