"""CIFAR ResNets (He et al. 2016, section 4.2): option-A shortcuts by default, 1x1 projections with
shortcut="B"; both through zoo.compress (static int8, structured channel pruning)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import zoo
import zoo.compress as zc
from zoo.compress import criteria
from zoo.compress.groups import build_groups
from zoo.compress.surgery import apply_plan, plan, zero_removed
from zoo.export import example_input, max_abs_diff, to_onnx, to_torchscript
from zoo.layers import BasicBlock, ConvNormAct, PadShortcut
from zoo.profile import count_macs, count_params

from toy_nets import outputs, random_bn  # (tests/ is on sys.path)

# He et al. 2016 Table 6 (0.27 / 0.46 / 0.66 / 0.85 M); exact option-A counts with 10 classes
PAPER_PARAMS = {"resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018}
PROJECTION_MACS = 16 * 32 * 16 * 16 + 32 * 64 * 8 * 8  # the two 1x1 projections of option B at 32 px


@pytest.mark.parametrize("name", sorted(PAPER_PARAMS))
def test_option_a_is_the_papers_network(name):
    a, b = zoo.create(name), zoo.create(name, shortcut="B")
    assert a.spec.kwargs["shortcut"] == "A" and count_params(a) == PAPER_PARAMS[name]
    shortcuts = [blk.downsample for blk in a.modules() if isinstance(blk, BasicBlock) and blk.downsample is not None]
    assert len(shortcuts) == 2 and all(isinstance(s, PadShortcut) for s in shortcuts)
    assert not any(True for s in shortcuts for _ in s.parameters()) and not any(True for s in shortcuts
                                                                                for _ in s.buffers())
    assert all(isinstance(blk.downsample, (ConvNormAct, type(None))) for blk in b.modules()
               if isinstance(blk, BasicBlock))
    assert count_params(b) - count_params(a) == 16 * 32 + 2 * 32 + 32 * 64 + 2 * 64  # 1x1 conv + BN affine
    assert count_macs(b, (3, 32, 32)) - count_macs(a, (3, 32, 32)) == PROJECTION_MACS


@pytest.mark.parametrize("bad", ["C", "a", "", 1, None, True])
def test_shortcut_is_validated(bad):
    with pytest.raises(zoo.ZooError, match=r"resnet56: shortcut=.*(allowed|expected).*'A', 'B'"):
        zoo.create("resnet56", shortcut=bad)


def test_pad_shortcut_matches_the_reference_formula():
    """Default layout = Idelbayev's F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, planes // 4, planes // 4))."""
    x = torch.randn(2, 16, 8, 8)
    ref = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, 32 // 4, 32 // 4))
    assert torch.equal(PadShortcut(16, 32, 2)(x), ref)
    s = PadShortcut(4, 6, 1, index=[5, -1, 0, 2])  # re-routed channels (after pruning): gather path
    y = s(x[:, :4])
    want = torch.zeros(2, 6, 8, 8)
    want[:, 5], want[:, 0], want[:, 2] = x[:, 0], x[:, 2], x[:, 3]
    assert s.pad == [] and torch.equal(y, want)
    xq = torch.quantize_per_tensor(x, 0.05, 60, torch.quint8)  # int8 path: same values, same quantisation
    for sc, inp in ((PadShortcut(16, 32, 2), xq), (s, xq[:, :4])):
        yq = sc(inp)
        assert yq.is_quantized and yq.q_scale() == 0.05 and yq.q_zero_point() == 60
        assert torch.equal(yq.dequantize(), sc(inp.dequantize()))
    for index in ([0, 0, 1, 2], [0, 1, 2], [0, 1, 2, 6], [-2, 0, 1, 2]):
        with pytest.raises(ValueError, match="index"):
            PadShortcut(4, 6, 1, index=index)


def test_static_int8_with_option_a(tmp_path):
    torch.manual_seed(0)
    m = random_bn(zoo.create("resnet20"))
    cal = [torch.randn(8, 3, 32, 32) for _ in range(3)]
    x = torch.randn(8, 3, 32, 32)
    for model in (m, zc.prune(m, 0.4, "magnitude", "channel", "global")):  # default and re-routed shortcuts
        q = zc.quantize(model, "static", calibration=cal)
        shortcuts = [s for s in q.modules() if isinstance(s, PadShortcut)]
        assert len(shortcuts) == 2
        a, b = outputs(model, x), outputs(q, x)
        assert float((a - b).abs().max()) < 0.1 * float(a.abs().max())
        assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.75
        zc.save(q, tmp_path / "q.safetensors")
        assert torch.equal(outputs(zc.load(tmp_path / "q.safetensors"), x), b)


def test_pruned_int8_option_a_exports(tmp_path):
    """Re-routed int8 shortcuts (zeros in the input's quantisation, per-channel selects) export exactly
    to TorchScript and to ONNX within a quantisation step or two."""
    m = random_bn(zoo.create("resnet20"))
    p = zc.prune(m, 0.4, "random", "channel", "global", seed=3)
    assert any(len(s.pad) == 0 for s in p.modules() if isinstance(s, PadShortcut))
    q = zc.quantize(p, "static", calibration=[torch.randn(8, 3, 32, 32) for _ in range(2)])
    x = example_input(q, 32, batch=2, seed=2)
    assert max_abs_diff(q, to_torchscript(q, tmp_path / "q.pt", 32), x) == 0.0
    assert max_abs_diff(q, to_onnx(q, tmp_path / "q.onnx", 32), x) <= 4 * float(q.classifier.scale)


@pytest.mark.parametrize("amount,scope,seed", [(0.4, "layer", 3), (0.6, "global", 7), (0.3, "global", 1)])
def test_pruning_option_a_equals_the_masked_model(amount, scope, seed):
    """Removing channels = zeroing them: the residual add couples conv2's outputs with the zero-padded
    identity, so a removed output channel must drop the identity that landed on it, and a kept one whose
    identity channel was removed receives zeros."""
    m = random_bn(zoo.create("resnet20"))
    x = torch.randn(2, 3, 32, 32)
    groups = build_groups(m)
    kinds = {mem.kind for g in groups for mem in g.members if mem.module.endswith("downsample")}
    assert kinds == {"skip_in", "skip_out"}
    kept = plan(groups, criteria.unit_scores(m, groups, "random", seed=seed), amount, scope)
    ref, pruned = copy.deepcopy(m), copy.deepcopy(m)
    zero_removed(ref, groups, kept)
    apply_plan(pruned, groups, kept)
    a, b = outputs(ref, x), outputs(pruned, x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-5 * float(a.abs().max()) + 1e-7)
    routed = [s for s in pruned.modules() if isinstance(s, PadShortcut)]
    assert any(-1 in s.index for s in routed)  # some identity channels really were dropped
    blocks = [blk for blk in pruned.modules() if isinstance(blk, BasicBlock) and blk.downsample is not None]
    for blk in blocks:
        assert blk.downsample.out_chs == blk.conv2.conv.out_channels
        assert blk.downsample.in_chs == blk.conv1.conv.in_channels
    # the check can fail: a masked model whose shortcuts still feed the removed channels differs
    leaky = copy.deepcopy(m)
    zero_removed(leaky, groups, kept)
    for s in [s for s in leaky.modules() if isinstance(s, PadShortcut)]:
        s.set_index(PadShortcut(s.in_chs, s.out_chs, s.stride).index)  # identity into every channel again
    assert not torch.allclose(outputs(leaky, x), b, rtol=1e-4, atol=1e-5 * float(a.abs().max()) + 1e-7)


def test_pruned_option_a_saves_and_halves_resnet56(tmp_path):
    m = random_bn(zoo.create("resnet56"))
    x = torch.randn(2, 3, 32, 32)
    p = zc.prune(m, 0.5, "magnitude", "channel", "layer")
    assert count_macs(p, (3, 32, 32)) < 0.5 * count_macs(m, (3, 32, 32))
    assert [s.out_chs for s in p.modules() if isinstance(s, PadShortcut)] == [16, 32]
    zc.save(p, tmp_path / "p.safetensors")
    r = zc.load(tmp_path / "p.safetensors")
    assert torch.equal(outputs(r, x), outputs(p, x))
    assert [s.index for s in r.modules() if isinstance(s, PadShortcut)] == \
        [s.index for s in p.modules() if isinstance(s, PadShortcut)]
