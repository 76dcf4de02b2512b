"""Deployment exports of zoo.export / zoo.deploy: ExecuTorch .pte (XNNPACK, fp32 and PT2E int8), ONNX int8 QDQ.

fp32 programs must match eager PyTorch within 1e-4 relative (max |diff| over max |logit|) on several
families; int8 must keep top-1: on the embedded digits set (a LeNet-5 trained here for two epochs)
and, where the MNIST files exist, on the 10,000 MNIST test images with the committed LeNet-5 weights.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

pytest.importorskip("executorch", reason="ExecuTorch export needs the deploy extra: pip install 'zoo[deploy]'")
pytest.importorskip("torchao", reason="PT2E int8 needs the deploy extra: pip install 'zoo[deploy]'")
onnx = pytest.importorskip("onnx", reason="ONNX export needs the onnx extra: pip install 'zoo[onnx]'")
pytest.importorskip("onnxruntime", reason="ONNX int8 needs onnxruntime: pip install 'zoo[onnx]'")

import zoo  # noqa: E402
import zoo.data  # noqa: E402
from zoo.cli import main  # noqa: E402
from zoo.compress import make_permanent  # noqa: E402
from zoo.deploy import executorch_lowered  # noqa: E402
from zoo.export import example_input, load_executorch, onnx_outputs, to_executorch, to_onnx  # noqa: E402

from toy_nets import random_bn  # noqa: E402  (tests/ is on sys.path)

REPO = Path(__file__).resolve().parents[1]
FAMILIES = [("lenet5", {}, None), ("mobilenet_v2", {"width": 0.35}, 32), ("shufflenet_v2", {"width": 0.5}, 32),
            ("resnet20", {}, 32)]
_DIGITS: dict[str, object] = {}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("name,kw,side", FAMILIES, ids=[f[0] for f in FAMILIES])
def test_executorch_fp32_matches_eager(name: str, kw: dict, side: int | None, tmp_path: Path):
    m = random_bn(zoo.create(name, num_classes=10, **kw), seed=3)
    x = example_input(m, side, batch=3, seed=1)  # a batch-1 program runs a batch of 3 in chunks
    prog = load_executorch(to_executorch(m, tmp_path / f"{name}.pte", input_size=side))
    assert prog.input_shape == (1,) + tuple(x.shape[1:])
    with torch.no_grad():
        ref = m(x)
    assert ref.abs().max() > 1e-3  # a real signal, not all-zero logits
    rel = _rel(prog(x), ref)
    assert rel <= 1e-4, f"{name}: .pte differs from eager by {rel:.2e} relative"
    if name == "shufflenet_v2":  # its channel split is two slices, which XNNPACK takes (split_with_sizes it did not)
        assert executorch_lowered(m, x[:1])[1] == {}


def _digits_lenet() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """LeNet-5 trained two epochs on digits at 28 px; (model, training images, held-out images)."""
    if not _DIGITS:
        torch.manual_seed(0)
        m = zoo.create("lenet5", num_classes=10)
        tr, va, _ = zoo.data.get_loaders("digits", (1, 28, 28), batch_size=32)
        opt = torch.optim.AdamW(m.parameters(), 3e-3)
        m.train()
        for _ in range(3):
            for x, y in tr:
                loss = F.cross_entropy(m(x), y)
                opt.zero_grad()
                loss.backward()
                opt.step()
        _DIGITS.update(model=m.eval(), x=torch.cat([x for x, _ in tr]), xv=torch.cat([x for x, _ in va]),
                       yv=torch.cat([y for _, y in va]))
    return _DIGITS["model"], _DIGITS["x"], _DIGITS["xv"]  # type: ignore[return-value]


def test_int8_executorch_and_onnx_keep_digits_top1(tmp_path: Path):
    m, x, xv = _digits_lenet()
    with torch.no_grad():
        ref = m(xv)
    acc = float((ref.argmax(1) == _DIGITS["yv"]).float().mean())
    assert acc >= 0.9, f"the fp32 LeNet-5 did not train ({acc:.3f})"
    cal = [x[i:i + 32] for i in range(0, 256, 32)]
    pte = to_executorch(m, tmp_path / "q.pte", int8=True, calibration=cal)
    fp = to_executorch(m, tmp_path / "f.pte")
    assert pte.stat().st_size < 0.4 * fp.stat().st_size  # int8 weights in the program
    out = load_executorch(pte)(xv)
    agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
    assert agree >= 0.98, f"int8 .pte agrees with fp32 on {agree:.3f} of digits"
    assert 0 < _rel(out, ref) < 0.2  # really quantized, still close
    qdq = to_onnx(m, tmp_path / "q.onnx", int8=True, calibration=[(c, None) for c in cal])
    ops = {n.op_type for n in onnx.load(str(qdq)).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    out_onnx = onnx_outputs(qdq, xv)
    agree = float((out_onnx.argmax(1) == ref.argmax(1)).float().mean())
    assert agree >= 0.98, f"int8 ONNX agrees with fp32 on {agree:.3f} of digits"
    assert 0 < _rel(out_onnx, ref) < 0.2


def _int8_top1s(m: nn.Module, tr, va, tmp_path: Path) -> tuple[float, float, float]:
    """Top-1 (%) on the 10,000 held-out images of fp32 eager, ExecuTorch int8 and ONNX int8 (8 calibration
    batches of 64 training images)."""
    cal = [x[:64] for x, _ in zip(tr, range(8))]
    xs, ys = zip(*va)
    xv, yv = torch.cat(xs), torch.cat(ys)
    assert len(yv) == 10000
    with torch.no_grad():  # in batches of 500: one 10,000-image batch is memory-bound and several times slower
        top_fp = float((torch.cat([m(c) for c in xv.split(500)]).argmax(1) == yv).float().mean()) * 100
    pte = load_executorch(to_executorch(m, tmp_path / "m.pte", int8=True, calibration=cal, batch=500))
    top_pte = float((pte(xv).argmax(1) == yv).float().mean()) * 100
    top_onnx = float((onnx_outputs(to_onnx(m, tmp_path / "m.onnx", int8=True, calibration=cal), xv).argmax(1)
                      == yv).float().mean()) * 100
    return top_fp, top_pte, top_onnx


def test_mnist_int8_top1_within_half_a_point(mnist_dir: Path, tmp_path: Path):
    m = zoo.create("lenet5", weights=str(REPO / "weights" / "lenet5_mnist_pruned92.safetensors"))
    make_permanent(m)
    m.eval()
    tr, va, _ = zoo.data.get_loaders("mnist", (1, 28, 28), batch_size=500, mean=m.spec.mean, std=m.spec.std)
    top_fp, top_pte, top_onnx = _int8_top1s(m, tr, va, tmp_path)
    assert top_fp > 98.5
    assert abs(top_pte - top_fp) <= 0.5, f"int8 .pte top-1 {top_pte:.2f} vs fp32 {top_fp:.2f}"
    assert abs(top_onnx - top_fp) <= 0.5, f"int8 ONNX top-1 {top_onnx:.2f} vs fp32 {top_fp:.2f}"


def test_bad_arguments_fail_clearly(tmp_path: Path):
    m = zoo.create("lenet5", num_classes=10)
    with pytest.raises(zoo.ZooError, match="int8 needs calibration data"):
        to_executorch(m, tmp_path / "a.pte", int8=True)
    with pytest.raises(zoo.ZooError, match="int8 needs calibration data"):
        to_onnx(m, tmp_path / "a.onnx", int8=True)
    with pytest.raises(zoo.ZooError, match="calibration is only used with int8=True"):
        to_executorch(m, tmp_path / "a.pte", calibration=[torch.zeros(1, 1, 28, 28)])
    with pytest.raises(zoo.ZooError, match="int8='yes' is not allowed"):
        to_executorch(m, tmp_path / "a.pte", int8="yes")
    with pytest.raises(zoo.ZooError, match="needs exactly 28x28"):
        to_executorch(m, tmp_path / "a.pte", input_size=32)
    with pytest.raises(zoo.ZooError, match="no such file"):
        load_executorch(tmp_path / "missing.pte")
    (tmp_path / "junk.pte").write_bytes(b"not a program")
    with pytest.raises(zoo.ZooError, match="not a loadable ExecuTorch program"):
        load_executorch(tmp_path / "junk.pte")
    prog = load_executorch(to_executorch(m, tmp_path / "b.pte"))
    with pytest.raises(zoo.ZooError, match=r"input shape \(1, 1, 32, 32\) is not allowed"):
        prog(torch.zeros(1, 1, 32, 32))


def test_cli_executorch_and_onnx_int8(tmp_path: Path, capfd: pytest.CaptureFixture):
    out = tmp_path / "l.pte"
    assert main(["export", "lenet5", "--format", "executorch", "--out", str(out)]) == 0
    assert "max |executorch - pytorch| = " in capfd.readouterr().out
    assert main(["export", "lenet5", "--format", "executorch", "--int8", "--out", str(out)]) == 2
    assert "--int8 needs --calibration DATA" in capfd.readouterr().err
    assert main(["export", "lenet5", "--format", "onnx", "--int8", "--calibration", "nope"]) == 2
    assert "--calibration 'nope' is not allowed" in capfd.readouterr().err
    q = tmp_path / "l8.onnx"
    assert main(["export", "lenet5", "--format", "onnx", "--int8", "--calibration", "digits",
                 "--calibration-batches", "2", "--out", str(q)]) == 0
    text = capfd.readouterr().out
    assert "int8 top-1 agrees with pytorch fp32 on" in text and "256 held-out digits images" in text
    assert "QuantizeLinear" in {n.op_type for n in onnx.load(str(q)).graph.node}


def test_recommended_int8_paths_are_measured_families():
    from zoo._registry import model_card
    from zoo.deploy import INT8_PATHS, recommended_int8

    families = {model_card(n).family for n in zoo.list_models()}
    assert set(INT8_PATHS) <= families
    assert recommended_int8("mobilenet_v2").export == "executorch"
    assert recommended_int8(zoo.create("shufflenet_v1", groups=3)).runtime == "onnxruntime"
    assert recommended_int8("resnet50") is INT8_PATHS["resnet"]
    with pytest.raises(zoo.ZooError, match="'lenet' family .*has not been measured"):
        recommended_int8("lenet5")
    with pytest.raises(zoo.ZooError, match="'mobilenet_v9' is not a zoo model"):
        recommended_int8("mobilenet_v9")


def test_runtime_forward_runs_each_backend_on_its_runtime():
    import zoo.compress as zc
    from zoo.deploy import ExecutorchModule, runtime_forward

    m, x, xv = _digits_lenet()
    cal = [x[i:i + 32] for i in range(0, 128, 32)]
    same, name = runtime_forward(m, xv[:4])
    assert same is m and name == "eager"
    for backend, cls, runtime in (("xnnpack", ExecutorchModule, "executorch (xnnpack)"),
                                  ("x86_pt2e", None, "inductor (x86_pt2e)")):
        q = zc.quantize(m, "static", cal, backend=backend)
        fast, name = runtime_forward(q, xv[:64])
        assert name == runtime
        if cls is not None:
            assert isinstance(fast, cls)
        with torch.no_grad():
            ref, out = q(xv[:64]), fast(xv[:64])
        agree = float((out.argmax(1) == ref.argmax(1)).float().mean())
        assert agree >= 0.95, f"{backend} on its runtime agrees with the int8 graph on {agree:.3f} of digits"
        assert _rel(out, ref) < 0.5  # int8 kernels vs the reference graph: same network, some output quanta apart


_DATA = Path(os.environ.get("ZOO_DATA", "/nonexistent"))
_R20 = _DATA / "pretrained" / "cifar10_resnets_akamaster" / "resnet20.safetensors"


@pytest.mark.slow
@pytest.mark.skipif(not _R20.is_file() or not (_DATA / "cifar10" / "test.npz").is_file(),
                    reason="needs $ZOO_DATA with the pretrained CIFAR ResNets and the CIFAR-10 JPEG q75 copy")
def test_cifar10_int8_top1_within_half_a_point(tmp_path: Path):
    """The imported ResNet-20 on the 10,000 CIFAR-10 (JPEG q75 copy) test images: ExecuTorch and ONNX
    int8 top-1 within 0.5 points of eager fp32 (issue 13)."""
    from zoo.weights import import_state_dict

    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    out = import_state_dict(_R20, "resnet20", tmp_path / "r20.safetensors", classes="cifar10", mean=mean, std=std)
    m = zoo.create("resnet20", weights=str(out)).eval()
    tr, va, _ = zoo.data.get_loaders("cifar10", (3, 32, 32), batch_size=500, mean=mean, std=std)
    top_fp, top_pte, top_onnx = _int8_top1s(m, tr, va, tmp_path)
    assert top_fp == pytest.approx(81.03, abs=0.05)
    assert abs(top_pte - top_fp) <= 0.5, f"int8 .pte top-1 {top_pte:.2f} vs fp32 {top_fp:.2f}"
    assert abs(top_onnx - top_fp) <= 0.5, f"int8 ONNX top-1 {top_onnx:.2f} vs fp32 {top_fp:.2f}"
