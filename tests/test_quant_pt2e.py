"""PT2E int8 backends of zoo.compress.quantize (torchao): x86_pt2e (X86InductorQuantizer) and xnnpack.

Agreement is measured on digits with the small models test_compress_quant.py trains (LeNet-5 and
ResNet-20). Latency is never asserted: see benchmarks/bench_int8.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("torchao", reason="the PT2E backends need the deploy extra: pip install 'zoo[deploy]'")
pytest.importorskip("executorch", reason="backend xnnpack needs the deploy extra: pip install 'zoo[deploy]'")

import zoo  # noqa: E402
import zoo.compress as zc  # noqa: E402
from test_compress_quant import digits, trained  # noqa: E402
from toy_nets import INT8_AGREEMENT_FLOOR, outputs  # noqa: E402
from zoo.compress.pt2e import compile_x86  # noqa: E402
from zoo.errors import ZooError  # noqa: E402
from zoo.weights.checkpoint import model_spec, serialized_size  # noqa: E402
from zoo.recipe.compress_stages import BACKENDS as RECIPE_BACKENDS  # noqa: E402


def _q_ops(model: torch.nn.Module) -> set[str]:
    return {str(n.target) for n in model.graph.nodes if n.op == "call_function" and "quantize" in str(n.target)}


@pytest.mark.parametrize("backend", ["x86_pt2e", "xnnpack"])
@pytest.mark.parametrize("family", ["lenet", "resnet_cifar"])
def test_static_pt2e_agrees_with_fp32(family: str, backend: str, tmp_path: Path):
    m = trained(family)
    x, _, xv, _ = digits(m.spec.input_size)
    fp = outputs(m, xv)
    q = zc.quantize(m, "static", calibration=[x[i:i + 64] for i in range(0, 256, 64)], backend=backend)
    assert "quantized_decomposed.quantize_per_tensor.default" in _q_ops(q)
    rr = zc.quantization.reduce_range()  # 7-bit activations only on CPUs without VNNI
    assert q.spec.compression[-1] == {"kind": "int8", "method": "static", "backend": backend, "reduce_range": rr}
    assert model_spec(q)["name"] == m.spec.name and not m.spec.compression  # source untouched
    out = outputs(q, xv)  # .eval() works on the exported graph
    assert not torch.equal(out, fp)
    agree = (out.argmax(1) == fp.argmax(1)).float().mean().item()
    assert agree >= INT8_AGREEMENT_FLOOR, f"{family} {backend}: int8 agrees with fp32 on {agree:.3f} of digits"
    assert outputs(q, xv[:5]).shape == (5, 10)  # any batch size, not only the calibration one
    path = tmp_path / "q.safetensors"
    zc.save(q, path)
    r = zc.load(path)
    assert torch.equal(outputs(r, xv), out)  # int8 weights, scales and activation qparams restored exactly
    assert r.spec.compression == q.spec.compression
    fp_bytes, q_bytes = serialized_size(m), zoo.profile(q, flops=False).size_bytes
    assert q_bytes == serialized_size(q) and 0.2 < q_bytes / fp_bytes < 0.4  # int8 weights, float biases
    with pytest.raises(ZooError, match="already quantized"):
        zc.quantize(q, "static", [x[:8]], backend=backend)


def test_dynamic_pt2e_quantizes_linear_layers(tmp_path: Path):
    m = trained("lenet")
    _, _, xv, _ = digits(m.spec.input_size)
    q = zc.quantize(m, "dynamic", backend="x86_pt2e")
    assert any("choose_qparams" in t for t in map(str, (n.target for n in q.graph.nodes)))
    out = outputs(q, xv)
    agree = (out.argmax(1) == outputs(m, xv).argmax(1)).float().mean().item()
    assert agree >= INT8_AGREEMENT_FLOOR
    zc.save(q, tmp_path / "d.safetensors")
    assert torch.equal(outputs(zc.load(tmp_path / "d.safetensors"), xv), out)


def test_qat_pt2e_prepare_finetune_convert(tmp_path: Path):
    # LeNet-5: the flow (prepare, train, refuse to save, convert, record, reload) is the same for every
    # model, and a small graph keeps the export + prepare + convert, done twice (convert, then load), cheap;
    # the recipe test below runs QAT through the recipe stage on a model with batch norm
    m = trained("lenet")
    x, y, xv, _ = digits(m.spec.input_size)
    fp = outputs(m, xv).argmax(1)
    p = zc.quantize(m, "qat", backend="x86_pt2e", calibration=[x[:64]])
    assert p.training and p.spec.compression[-1]["converted"] is False
    opt = torch.optim.SGD(p.parameters(), 1e-3, momentum=0.9)
    for i in range(0, 12 * 32, 32):
        loss = F.cross_entropy(p(x[i:i + 32]), y[i:i + 32])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with pytest.raises(ZooError, match="PT2E QAT model is stored after zoo.compress.convert"):
        zc.save(p, tmp_path / "p.safetensors")
    q = zc.convert(p)
    assert q.spec.compression[-1] == {"kind": "int8", "method": "qat", "backend": "x86_pt2e",
                                     "reduce_range": zc.quantization.reduce_range(), "converted": True}
    zc.save(q, tmp_path / "q.safetensors")
    assert torch.equal(outputs(zc.load(tmp_path / "q.safetensors"), xv), outputs(q, xv))
    assert "quantized_decomposed.quantize_per_tensor.default" in _q_ops(q)
    agree = (outputs(q, xv).argmax(1) == fp).float().mean().item()
    assert agree >= INT8_AGREEMENT_FLOOR
    with pytest.raises(ZooError, match="convert"):
        zc.convert(q)


def test_compiled_x86_graph_keeps_predictions():
    m = trained("lenet")
    x, _, xv, _ = digits(m.spec.input_size)
    q = zc.quantize(m, "static", calibration=[x[:128]], backend="x86_pt2e")
    ref = outputs(q, xv[:64])
    fast = compile_x86(q, xv[:64])
    with torch.no_grad():
        out = fast(xv[:64])
    assert (out.argmax(1) == ref.argmax(1)).float().mean().item() >= INT8_AGREEMENT_FLOOR
    assert float((out - ref).abs().max()) < 0.1 * float(ref.abs().max())


def test_compiled_x86_graph_stays_frozen_after_a_recompile():
    """A dynamo reset (as a later torch.export does) must not leave the graph recompiled without freezing,
    which skips the oneDNN int8 weight prepacking (measured 7x slower on resnet18)."""
    from torch._dynamo.utils import counters

    m = trained("lenet")
    x, _, xv, _ = digits(m.spec.input_size)
    q = zc.quantize(m, "static", calibration=[x[:128]], backend="x86_pt2e")
    fast = compile_x86(q, xv[:8])
    before = fast(xv[:8])
    counters.clear()
    torch._dynamo.reset()
    after = fast(xv[:8])
    assert counters["inductor"]["qconv_weight_prepack_matcher_count"] >= 2  # lenet5's two convs
    assert torch.equal(before, after)


def test_backend_vocabulary_is_shared_with_recipes():
    assert {"x86_pt2e", "xnnpack"} <= set(zc.quantization.BACKENDS) == set(RECIPE_BACKENDS)
    with pytest.raises(ZooError, match="backend='tpu' is not supported; allowed: .*'x86_pt2e', 'xnnpack'"):
        zc.quantize(zoo.create("lenet5"), "dynamic", backend="tpu")


def test_recipe_quantize_stage_with_pt2e_backend(tmp_path: Path):
    """A recipe `quantize` stage takes `backend: x86_pt2e`; its checkpoint reloads to the recorded top-1."""
    from test_recipe_compress import _write
    from zoo.data import get_loaders
    from zoo.recipe import load_checkpoint, run_recipe
    from zoo.train import evaluate

    stages = {"q": {"type": "quantize", "from": "dense", "method": "static", "calibration": 2, "backend": "x86_pt2e"}}
    p = _write(tmp_path, stages, table={"rows": ["dense", "q"], "columns": ["model", "stage", "top1", "stored_kb"]})
    res = run_recipe(p, out=tmp_path / "run", quick=True, log=lambda s: None)
    rows = {r["stage"]: r for r in res["rows"]}
    assert rows["q"]["compression_ratio"] > 2.5
    assert rows["q"]["latency_runtime"] == "inductor (x86_pt2e)" and rows["q"]["latency_ms"] > 0  # issue 13 item 5
    assert "latency_runtime" not in rows["dense"]
    assert rows["q"]["macs"] == rows["dense"]["macs"] > 0  # counted on the graph's aten ops
    assert "q: inductor (x86_pt2e)" in (tmp_path / "run" / "table.md").read_text()
    m = load_checkpoint(tmp_path / "run" / "q" / "seed0" / "model.safetensors")
    assert m.spec.compression[-1]["backend"] == "x86_pt2e"
    _, val, _ = get_loaders("digits", (1, 32, 32), batch_size=64, quick=True)
    rec = json.loads((tmp_path / "run" / "q" / "seed0" / "done.json").read_text())["metrics"]["top1"]
    assert evaluate(m, val, torch.device("cpu"))["top1"] == pytest.approx(rec)


def test_pt2e_graph_accepts_only_the_side_it_was_traced_at():
    # an exported graph is specialised to its example's H x W; zoo's helpers that run the model on the
    # smallest input (sparsity, via weight_layers' call order) must use that side, not the family's minimum
    m = zoo.create("resnet20")
    q = zc.quantize(m, "static", calibration=[torch.randn(2, 3, 32, 32)], backend="xnnpack")
    assert q.fixed_input_size == 32
    assert zc.sparsity(q) == 0.0
    with pytest.raises(ZooError, match="exactly 32x32"):
        zoo.profile(q, input_size=64)


@pytest.mark.parametrize("name,kwargs", [("resnet20", {}), ("mobilenet_v2", {"width": 0.5, "stem": "cifar",
                                                                               "num_classes": 10})])
def test_profile_counts_the_macs_of_a_pt2e_graph_like_its_float_model(name: str, kwargs: dict):
    m = zoo.create(name, **kwargs)
    q = zc.quantize(m, "static", calibration=[torch.randn(2, 3, 32, 32)], backend="xnnpack")
    assert zoo.profile(q, flops=False).macs == zoo.profile(m, flops=False).macs > 0
