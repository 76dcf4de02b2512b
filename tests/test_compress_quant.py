"""Quantization API of zoo.compress: int8 (static / dynamic / QAT), binary, ternary, k-bit weights.

int8 agreement is measured on sklearn digits (8x8 upsampled, zoo.data "digits") with one small model
per family trained for a few epochs inside the test (widths reduced where the family has a width
argument; SqueezeNet and MobileNet v2 at 48 px, where they train reliably in a few epochs). The ImageNet ResNet family is trained as
resnet18; resnet34/50/101/152 use the same int8 blocks (bottleneck conversion and exact reload are
checked on resnet50 below, untrained). Latency is never asserted here: see benchmarks/bench_compress.py.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo
import zoo.compress as zc
import zoo.compress.quantization as zq
import zoo.data
from zoo.compress._common import set_steps
from zoo.compress.quantization import reduce_range
from zoo.errors import ZooError
from zoo.weights.checkpoint import serialized_size, state_tensors
from zoo.profile import profile

from toy_nets import INT8_AGREEMENT_FLOOR, outputs  # (tests/ is on sys.path)

# family -> (model, kwargs, input side, epochs, lr)
TRAIN = {
    "lenet": ("lenet5", {}, 28, 2, 3e-3),
    "mobilenet_v1": ("mobilenet_v1", {"width": 0.25}, 32, 4, 1e-2),
    "mobilenet_v2": ("mobilenet_v2", {"width": 0.35}, 48, 3, 1e-2),
    "resnet_cifar": ("resnet20", {}, 32, 2, 2e-2),
    "resnet": ("resnet18", {}, 32, 1, 3e-3),
    "squeezenet": ("squeezenet1_1", {"drop_rate": 0.0}, 48, 3, 1e-3),
    "shufflenet_v1": ("shufflenet_v1", {"groups": 3, "width": 0.25}, 32, 4, 1e-2),
    "shufflenet_v2": ("shufflenet_v2", {"width": 0.5}, 32, 3, 1e-2),
}

_DATA: dict[tuple[int, int, int], tuple[torch.Tensor, ...]] = {}
_TRAINED: dict[str, nn.Module] = {}


def digits(size: tuple[int, int, int]) -> tuple[torch.Tensor, ...]:
    """(x_train, y_train, x_val, y_val) of sklearn digits at `size`, normalised by zoo.data."""
    if size not in _DATA:
        tr, va, _ = zoo.data.get_loaders("digits", size, batch_size=256)
        xs, ys = zip(*tr)
        xv, yv = zip(*va)
        _DATA[size] = (torch.cat(xs), torch.cat(ys), torch.cat(xv), torch.cat(yv))
    return _DATA[size]


def trained(family: str) -> nn.Module:
    """A small model of the family trained on digits (AdamW, one-cycle, batch 32); cached per module."""
    if family not in _TRAINED:
        name, kw, side, epochs, lr = TRAIN[family]
        torch.manual_seed(0)
        kwargs = dict(kw, num_classes=10)
        if "resolution" in zoo.model_args(name) and not zoo.model_card(name).fixed_resolution:
            kwargs["resolution"] = side
        m = zoo.create(name, **kwargs)
        size = (m.in_chans, side, side)
        m.spec.input_size = size
        if family == "squeezenet":  # ReLU'd conv logits: start them positive so they can learn
            nn.init.constant_(m.classifier.bias, 1.0)
        x, y, _, _ = digits(size)
        opt = torch.optim.AdamW(m.parameters(), lr, weight_decay=1e-4)
        steps = epochs * (len(x) // 32)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, lr, total_steps=steps)
        m.train()
        g = torch.Generator().manual_seed(0)
        for _ in range(epochs):
            perm = torch.randperm(len(x), generator=g)
            for i in range(0, len(x) - 31, 32):
                idx = perm[i:i + 32]
                loss = F.cross_entropy(m(x[idx]), y[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        _TRAINED[family] = m.eval()
    return _TRAINED[family]


@pytest.mark.parametrize("family", sorted(TRAIN))
def test_static_int8_agrees_with_fp32_on_digits(family, tmp_path):
    m = trained(family)
    x, _, xv, yv = digits(m.spec.input_size)
    fp = outputs(m, xv)
    acc = (fp.argmax(1) == yv).float().mean().item()
    assert acc >= 0.85, f"{family}: the fp32 model did not train ({acc:.3f})"
    calib = [(x[i:i + 64], None) for i in range(0, 256, 64)]  # (input, target) pairs work too
    q = zc.quantize(m, "static", calibration=[c for c, _ in calib])
    out = outputs(q, xv)
    agree = (out.argmax(1) == fp.argmax(1)).float().mean().item()
    assert agree >= INT8_AGREEMENT_FLOOR, f"{family}: int8 agrees with fp32 on {agree:.3f} of digits"
    assert any(type(mod).__module__.startswith("torch.ao.nn.quantized") for mod in q.modules())
    data_bytes = lambda mod: sum(v.numel() * v.element_size() for v in state_tensors(mod).values())  # noqa: E731
    assert 0.2 < data_bytes(q) / data_bytes(m) < 0.3  # int8 weights + per-channel scales, BN folded
    assert serialized_size(q) < 0.36 * serialized_size(m)  # (tiny test models: the header adds a little)
    assert profile(q, flops=False).size_bytes == serialized_size(q)
    path = str(tmp_path / "q.safetensors")
    zc.save(q, path)
    r = zc.load(path)
    assert torch.equal(outputs(r, xv), out)  # scales and zero points reproduced exactly (not #5890)


def test_static_calibration_accepts_a_dataloader_of_pairs():
    m = trained("lenet")
    tr, _, _ = zoo.data.get_loaders("digits", m.spec.input_size, batch_size=64)
    a = zc.quantize(m, "static", calibration=tr, max_batches=3, observer="minmax")
    x = digits(m.spec.input_size)[0]
    b = zc.quantize(m, "static", calibration=[x[i:i + 64] for i in range(0, 192, 64)], observer="minmax")
    assert a.spec.compression[-1]["method"] == "static"
    assert outputs(a, x[:8]).shape == outputs(b, x[:8]).shape == (8, 10)


def test_relu6_fused_into_the_conv_with_a_fixed_0_to_6_grid(tmp_path):
    """torch.ao has no fused ReLU6: zoo fuses conv+bn+relu and fixes the output grid at [0, 6], as TFLite
    does, instead of quantizing the conv output (negatives and all) before a standalone ReLU6."""
    m = trained("mobilenet_v2")
    x = digits(m.spec.input_size)[0]
    q = zc.quantize(m, "static", [x[:64]], observer="minmax")
    qmax = 127 if reduce_range() else 255
    for blk in (q.stem, q.blocks[1].expand, q.blocks[1].dw):
        assert type(blk.conv).__name__ == "ConvReLU2d" and type(blk.act).__name__ == "Identity"
        assert blk.conv.scale == pytest.approx(6 / qmax) and blk.conv.zero_point == 0
    assert type(q.blocks[1].project.conv).__name__ == "Conv2d"  # no activation: its own observed range
    assert type(q.blocks[1].skip).__name__ == "QFunctional"
    assert q.spec.compression[-1]["relu6"] == "fused"
    inp = torch.quantize_per_tensor(40 * torch.rand(1, q.stem.conv.in_channels, 8, 8), 0.2, 0, torch.quint8)
    y = q.stem.conv(inp).dequantize()
    assert y.min() == 0 and y.max() == 6  # saturation is the clip at 6
    r18 = zc.quantize(trained("resnet"), "static", [digits((3, 32, 32))[0][:32]], observer="minmax")
    assert type(r18.stem.conv).__name__ == "ConvReLU2d"
    p = zc.quantize(m, "qat")  # the fake-quant model clips at 6 while it trains, too
    blk = p.blocks[1].expand
    assert type(blk.conv).__name__ == "ConvBnReLU2d"
    out = blk.eval()(50 * torch.randn(2, blk.conv.in_channels, 6, 6))  # running BN statistics: large outputs
    assert out.min() == 0 and out.max() == 6


def test_int8_saved_before_relu6_fusion_still_reloads(tmp_path, monkeypatch):
    """A step without "relu6" (files written before the fusion) rebuilds the standalone quantized ReLU6."""
    m = trained("mobilenet_v2")
    x = digits(m.spec.input_size)[0]
    monkeypatch.setattr(zq, "_prepare_static", functools.partial(zq._prepare_static, fuse_relu6=False))
    old = zc.quantize(m, "static", [x[:64]], observer="minmax")
    monkeypatch.undo()
    set_steps(old, [{k: v for k, v in s.items() if k != "relu6"} for s in old.spec.compression])
    assert type(old.blocks[1].expand.act).__name__ == "ReLU6"
    path = str(tmp_path / "old.safetensors")
    zc.save(old, path)
    r = zc.load(path)
    assert type(r.blocks[1].expand.act).__module__.startswith("torch.ao")
    assert torch.equal(outputs(r, x[:32]), outputs(old, x[:32]))


def test_bottleneck_and_grouped_models_reload_exactly(tmp_path):
    x = torch.randn(2, 3, 32, 32)
    for name, kw in (("resnet50", {}), ("shufflenet_v1", {"groups": 8, "width": 0.5}), ("squeezenet1_0", {"bypass": "complex"})):
        m = zoo.create(name, num_classes=10, **kw).eval()
        m.spec.input_size = (3, 32, 32)
        q = zc.quantize(m, "static", [x], observer="minmax")
        if name == "resnet50":  # a full-size model: the file is ~1/4 of the fp32 one
            assert serialized_size(q) < 0.27 * serialized_size(m)
        if name.startswith("shufflenet"):
            assert q.spec.compression[-1]["backend"] == "fbgemm"  # oneDNN cannot pack some grouped convs
        path = str(tmp_path / f"{name}.safetensors")
        zc.save(q, path)
        assert torch.equal(outputs(zc.load(path), x), outputs(q, x))


def test_dynamic_int8_linear_model(tmp_path):
    m = trained("lenet")
    _, _, xv, _ = digits(m.spec.input_size)
    q = zc.quantize(m, "dynamic")
    assert type(q.features[5]).__module__.startswith("torch.ao.nn.quantized.dynamic")
    agree = (outputs(q, xv).argmax(1) == outputs(m, xv).argmax(1)).float().mean().item()
    assert agree >= INT8_AGREEMENT_FLOOR
    assert serialized_size(q) < 0.32 * serialized_size(m)  # LeNet-5's weights are mostly in fc layers
    path = str(tmp_path / "d.safetensors")
    zc.save(q, path)
    assert torch.equal(outputs(zc.load(path), xv), outputs(q, xv))


def test_qat_prepare_finetune_convert(tmp_path):
    m = trained("resnet_cifar")
    x, y, xv, _ = digits(m.spec.input_size)
    fp = outputs(m, xv).argmax(1)
    p = zc.quantize(m, "qat")
    assert p.training and any("FakeQuantize" in type(mod).__name__ for mod in p.modules())
    opt = torch.optim.SGD(p.parameters(), 1e-3, momentum=0.9)
    for i in range(0, 8 * 32, 32):  # a few fine-tuning steps with the straight-through estimator
        loss = F.cross_entropy(p(x[i:i + 32]), y[i:i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = str(tmp_path / "p.safetensors")
    zc.save(p, path)  # a prepared (fake-quant) model saves and reloads too
    rp = zc.load(path)
    assert torch.equal(outputs(rp, xv[:16]), outputs(p, xv[:16]))
    q = zc.convert(p)
    agree = (outputs(q, xv).argmax(1) == fp).float().mean().item()
    assert agree >= INT8_AGREEMENT_FLOOR
    zc.save(q, path)
    assert torch.equal(outputs(zc.load(path), xv), outputs(q, xv))
    with pytest.raises(ZooError, match="convert"):
        zc.convert(q)


@pytest.mark.parametrize("method,levels", [("binary", 2), ("ternary", 3)])
def test_binary_ternary_weights(method, levels, tmp_path):
    m = trained("mobilenet_v1")
    x, y, xv, _ = digits(m.spec.input_size)
    q = zc.quantize(m, method)
    layers = zc.prunable_layers(m)  # every conv/linear except the first and last
    names = {n for n, _ in layers}
    assert q.spec.compression[-1]["modules"] == [n for n, _ in layers]
    for n, mod in q.named_modules():
        if n in names:
            w = mod.weight.detach()
            for row in w.reshape(w.shape[0], -1):
                vals = torch.unique(row.abs())
                assert len(torch.unique(row)) <= levels and len(vals[vals > 0]) <= 1
    assert torch.equal(q.stem.conv.weight, m.stem.conv.weight) and torch.equal(q.classifier.weight, m.classifier.weight)
    # storage: 1 (binary) or 2 (ternary) bits per weight + one float32 alpha per output channel
    enc = state_tensors(q)
    bits = 1 if method == "binary" else 2
    for n, mod in layers:
        stored = sum(v.numel() * v.element_size() for k, v in enc.items()
                     if k.startswith(n + ".parametrizations.weight.original#") and not k.endswith("#shape"))
        w = mod.weight
        assert stored == -(-w.numel() * bits // 8) + 4 * w.shape[0], n
        if w[0].numel() >= 128:  # not depthwise: the alpha per channel is small
            assert stored < w.numel() * 4 * (bits + 0.5) / 32, n
    # STE: gradients reach the latent weights and fine-tuning changes the binarised model
    q.train()
    opt = torch.optim.Adam(q.parameters(), 1e-3)
    before = q.blocks[3].pw.conv.weight.detach().clone()
    for i in range(0, 4 * 32, 32):
        loss = F.cross_entropy(q(x[i:i + 32]), y[i:i + 32])
        opt.zero_grad()
        loss.backward()
        lat = q.blocks[3].pw.conv.parametrizations.weight.original
        assert lat.grad is not None and lat.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(q.blocks[3].pw.conv.weight.detach(), before)
    path = str(tmp_path / "b.safetensors")
    zc.save(q, path)
    r = zc.load(path)
    assert torch.equal(outputs(r, xv), outputs(q, xv))
    assert serialized_size(q) < 0.2 * serialized_size(m)


def test_weights_kbit_size_accuracy_curve(tmp_path):
    m = trained("resnet_cifar")
    _, _, xv, yv = digits(m.spec.input_size)
    ref = outputs(m, xv)
    sizes, errs = [], []
    for bits in (2, 3, 4, 6, 8):
        q = zc.quantize(m, "weights_kbit", bits=bits)
        w = q.stages[1][0].conv1.conv.weight.detach()
        for row in w.reshape(w.shape[0], -1):
            assert len(torch.unique(row)) <= 2 ** bits - 1
        out = outputs(q, xv)
        sizes.append(serialized_size(q))
        errs.append(float((out - ref).abs().mean()))
        path = str(tmp_path / f"k{bits}.safetensors")
        zc.save(q, path)
        assert torch.equal(outputs(zc.load(path), xv), out)
    assert sizes == sorted(sizes) and sizes[0] < 0.2 * serialized_size(m)
    assert errs[-1] < errs[0] and errs[-1] == min(errs)
    acc8 = (outputs(zc.quantize(m, "weights_kbit", bits=8), xv).argmax(1) == yv).float().mean()
    assert acc8 >= (ref.argmax(1) == yv).float().mean() - 0.01


def test_masked_model_is_baked_before_int8():
    m = trained("lenet")
    p = zc.prune(m, 0.5)
    q = zc.quantize(p, "dynamic")
    assert not any(torch.nn.utils.parametrize.is_parametrized(mod) for mod in q.modules())
    assert any(torch.nn.utils.parametrize.is_parametrized(mod) for mod in p.modules())  # source untouched
    x = digits(m.spec.input_size)[2][:4]
    assert outputs(p, x).shape == outputs(q, x).shape


def test_bad_quantize_arguments_fail_clearly():
    m = zoo.create("mlp", hidden=(8, 8), num_classes=10)
    with pytest.raises(ZooError, match="method='int4'.*allowed"):
        zc.quantize(m, "int4")
    with pytest.raises(ZooError, match="calibration"):
        zc.quantize(m, "static")
    with pytest.raises(ZooError, match="no batches"):
        zc.quantize(m, "static", calibration=[])
    with pytest.raises(ZooError, match="bits"):
        zc.quantize(m, "weights_kbit", bits=1)
    with pytest.raises(ZooError, match="bits"):
        zc.quantize(m, "weights_kbit", bits=9)
    with pytest.raises(ZooError, match="bits"):
        zc.quantize(m, "binary", bits=4)
    with pytest.raises(ZooError, match="backend"):
        zc.quantize(m, "dynamic", backend="tpu")
    with pytest.raises(ZooError, match="observer"):
        zc.quantize(m, "static", [torch.randn(2, 1, 28, 28)], observer="mse")
    q = zc.quantize(m, "dynamic")
    with pytest.raises(ZooError, match="already quantized"):
        zc.quantize(q, "static", [torch.randn(2, 1, 28, 28)])
    with pytest.raises(ZooError, match="qat"):
        zc.convert(m)
    b = zc.quantize(m, "binary")
    with pytest.raises(ZooError, match="already quantized"):
        zc.quantize(b, "ternary")
    with pytest.raises(ZooError, match="calibration|batch"):
        zc.quantize(m, "static", calibration=[3, 4])
    with pytest.raises(ZooError, match="takes no calibration"):
        zc.quantize(m, "dynamic", calibration=[torch.randn(2, 1, 28, 28)])
    with pytest.raises(ZooError, match="max_batches"):
        zc.quantize(m, "static", [torch.randn(2, 1, 28, 28)], max_batches=0)
    with pytest.raises(ZooError, match="does not exist"):
        zc.load("/nonexistent/x.safetensors")
    assert copy.deepcopy(q) is not q


def test_eager_int8_takes_its_input_channels_last(tmp_path):
    torch.manual_seed(0)
    m = zoo.create("resnet18", num_classes=10).eval()
    q = zc.quantize(m, "static", [torch.randn(2, 3, 64, 64) for _ in range(2)])
    assert type(q.quant) is zq.ChannelsLastQuantize
    x = torch.randn(2, 3, 64, 64)
    seen = []
    h = q.stem.register_forward_pre_hook(lambda mod, args: seen.append(args[0].is_contiguous(
        memory_format=torch.channels_last)))
    with torch.no_grad():
        y = q(x)
        assert torch.equal(y, q(x.contiguous(memory_format=torch.channels_last)))
    h.remove()
    assert seen == [True, True]  # the first int8 conv gets NHWC either way
    zc.save(q, tmp_path / "q.safetensors")
    r = zc.load(tmp_path / "q.safetensors").eval()
    assert type(r.quant) is zq.ChannelsLastQuantize and torch.equal(r(x), y)
