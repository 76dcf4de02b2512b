"""Export: ONNX (checked in onnxruntime) and TorchScript (reloaded) for one model of every family; int8."""

from __future__ import annotations

import json
from pathlib import Path

import onnx
import pytest
import torch
import torch.ao.quantization as tq
import torch.nn as nn

import zoo
from zoo.cli import main
from zoo.export import example_input, load_torchscript, max_abs_diff, to_onnx, to_torchscript
from zoo.weights.checkpoint import model_spec
from zoo.weights import register_checkpoint, save_checkpoint


def _representatives() -> list[tuple[str, dict]]:
    """Per registered family, the model with the fewest parameters at its narrowest width (meta device)."""
    best: dict[str, tuple[int, str, dict]] = {}
    for name in zoo.list_models():
        width = zoo.model_args(name).get("width")
        kw = {} if width is None else {"width": min(width.choices) if width.choices else 0.25}
        with torch.device("meta"):
            n = sum(p.numel() for p in zoo.create(name, num_classes=10, **kw).parameters())
        fam = zoo.model_card(name).family
        if fam not in best or n < best[fam][0]:
            best[fam] = (n, name, kw)
    return sorted((name, kw) for _, name, kw in best.values())


def _model(name: str, kw: dict) -> tuple[nn.Module, int | None]:
    m = zoo.create(name, num_classes=10, **kw)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    side = None if zoo.model_card(name).fixed_resolution else 32
    return m.eval(), side


def _int8(m: nn.Module, side: int) -> nn.Module:
    """torch.ao eager int8: fuse conv-bn(-relu), calibrate on random data, convert."""
    for mod in m.modules():
        if type(mod).__name__ == "ConvNormAct" and isinstance(mod.bn, nn.BatchNorm2d):
            tq.fuse_modules(mod, ["conv", "bn"] + (["act"] if type(mod.act) is nn.ReLU else []), inplace=True)
    m.qconfig = tq.get_default_qconfig("x86")
    tq.prepare(m, inplace=True)
    with torch.no_grad():
        m(example_input(m, side, batch=8, seed=5))
    return tq.convert(m, inplace=True)


def test_every_family_is_covered():
    fams = {zoo.model_card(n).family for n, _ in _representatives()}
    assert fams == {zoo.model_card(n).family for n in zoo.list_models()}


@pytest.mark.parametrize("name,kw", _representatives(), ids=lambda v: v if isinstance(v, str) else "")
def test_onnx_and_torchscript_match(name: str, kw: dict, tmp_path: Path):
    m, side = _model(name, kw)
    x = example_input(m, side, batch=3, seed=1)  # exported at batch 1: the batch axis is dynamic
    onnx_path = to_onnx(m, tmp_path / f"{name}.onnx", side)
    d_onnx = max_abs_diff(m, onnx_path, x)
    assert d_onnx <= 1e-4, f"{name}: onnx max |diff| {d_onnx:.3g}"
    props = {p.key: p.value for p in onnx.load(str(onnx_path)).metadata_props}
    assert json.loads(props["zoo.spec"]) == model_spec(m)
    ts_path = to_torchscript(m, tmp_path / f"{name}.pt", side)
    assert max_abs_diff(m, ts_path, x) <= 1e-5
    extra = {"zoo.spec": ""}
    torch.jit.load(str(ts_path), _extra_files=extra)
    assert json.loads(extra["zoo.spec"]) == model_spec(m)


def test_export_restores_training_mode(tmp_path: Path):
    m = zoo.create("resnet20", num_classes=10)
    assert m.training
    to_torchscript(m, tmp_path / "r.pt", 32)
    assert m.training


def test_int8_torchscript_and_onnx(tmp_path: Path):
    q = _int8(zoo.create("resnet20", num_classes=10).eval(), 32)
    x = example_input(q, 32, batch=2, seed=2)
    assert max_abs_diff(q, to_torchscript(q, tmp_path / "q.pt", 32), x) == 0.0
    step = float(q.classifier.scale)  # one quantisation step of the int8 logits
    d = max_abs_diff(q, to_onnx(q, tmp_path / "q.onnx", 32), x)
    assert d <= 4 * step, f"int8 onnx differs by {d / step:.1f} quantisation steps"  # measured: 2 steps
    graph = onnx.load(str(tmp_path / "q.onnx")).graph  # QDQ form: int8 weights, ORT fuses to QLinearConv
    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= {n.op_type for n in graph.node}
    int8_consts = [n for n in graph.node
                   if n.op_type == "Constant" and n.attribute[0].t.data_type == onnx.TensorProto.INT8]
    assert len(int8_consts) >= sum(isinstance(mod, torch.ao.nn.quantized.Conv2d) for mod in q.modules())


def test_int8_onnx_unsupported_op_is_one_clear_error(tmp_path: Path, capfd: pytest.CaptureFixture):
    """torch's ONNX exporter has no symbolic for a standalone quantized::relu6 (MobileNet v2 converted by
    plain torch.ao, without zoo's ReLU6 fusion): one ZooError, no IR dump."""
    q = _int8(zoo.create("mobilenet_v2", width=0.25, num_classes=10).eval(), 32)
    capfd.readouterr()
    with pytest.raises(zoo.ZooError, match=r"ONNX exporter failed for mobilenet_v2: .*quantized::relu6"):
        to_onnx(q, tmp_path / "q.onnx", 32)
    captured = capfd.readouterr()
    assert "Torch IR graph" not in captured.out + captured.err


def test_bad_arguments(tmp_path: Path):
    m = zoo.create("resnet18", num_classes=10)
    with pytest.raises(zoo.ZooError, match=r"input_size=16 is not allowed; this model needs sides >= 32"):
        to_onnx(m, tmp_path / "a.onnx", 16)
    with pytest.raises(zoo.ZooError, match=r"input_size=\(3, 32\) is not allowed"):
        to_torchscript(m, tmp_path / "a.pt", (3, 32))
    with pytest.raises(zoo.ZooError, match=r"needs exactly 28x28 inputs"):
        to_onnx(zoo.create("lenet5"), tmp_path / "a.onnx", 32)
    with pytest.raises(zoo.ZooError, match="expected an nn.Module, got str"):
        to_onnx("resnet18", tmp_path / "a.onnx")
    with pytest.raises(zoo.ZooError, match="format='tflite' is not allowed"):
        zoo.export.export(m, "tflite", tmp_path / "a.tflite")


def test_cli_export(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture):
    m = zoo.create("lenet_300_100", num_classes=3)
    ck = save_checkpoint(m, tmp_path / "mlp.safetensors", classes=["a", "b", "c"], mean=[0.1307], std=[0.3081])
    out = tmp_path / "mlp.onnx"
    assert main(["export", "--weights", str(ck), "--format", "onnx", "--out", str(out)]) == 0
    assert "max |onnx - pytorch| = " in capfd.readouterr().out
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["zoo.classes"]) == ["a", "b", "c"] and json.loads(props["zoo.std"]) == [0.3081]
    monkeypatch.setenv("ZOO_WEIGHTS_DIR", str(tmp_path / "weights"))
    register_checkpoint(ck, "abc", "toy", {"top1": 0.5}, "recipes/none.yaml")
    ts = tmp_path / "tag.pt"
    assert main(["export", "--weights", "abc", "--format", "torchscript", "--out", str(ts)]) == 0
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(load_torchscript(ts)(x), m.eval()(x))
    assert main(["export", "--format", "onnx"]) == 2
    assert "needs a model NAME, --weights" in capfd.readouterr().err
    assert main(["export", "--weights", "nope", "--format", "onnx"]) == 2
    assert "as a tag it matches none" in capfd.readouterr().err
