"""The declared model spec (zoo.spec), the one input-size helper, and the one checkpoint loader / writer."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import zoo
import zoo._registry as registry
import zoo.compress as zc
from zoo.errors import ZooError
from zoo.spec import ModelSpec, input_size, model_name, smallest_input_size, spec_of
from zoo.weights.checkpoint import load_checkpoint, model_spec, save_checkpoint

ZOO = Path(zoo.__file__).resolve().parent


def _tiny_foreign() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(1), nn.Linear(8, 4)).eval()


def test_create_declares_the_spec() -> None:
    m = zoo.create("mobilenet_v1", width=0.25, stem="cifar", num_classes=7)
    assert m.spec == ModelSpec(name="mobilenet_v1", kwargs=zoo._registry.resolve_kwargs(
        "mobilenet_v1", width=0.25, stem="cifar", num_classes=7), input_size=(3, 32, 32))
    assert model_name(m) == "mobilenet_v1" and spec_of(_tiny_foreign()) is None
    assert model_name(_tiny_foreign()) == "Sequential"
    m.reset_classifier(3)  # the spec follows the head
    assert m.spec.kwargs["num_classes"] == 3 and m.spec.classes is None


def test_input_size_helper() -> None:
    m = zoo.create("mobilenet_v1", width=0.25)
    assert input_size(m) == (3, 224, 224) and input_size(m, 64) == (3, 64, 64)
    assert input_size(m, (3, 40, 48)) == (3, 40, 48) and smallest_input_size(m) == (3, 32, 32)
    with pytest.raises(ZooError, match=r"input_size=16 is not allowed; this model needs sides >= 32"):
        input_size(m, 16)
    with pytest.raises(ZooError, match=r"input_size=\(1, 64, 64\) is not allowed; this model takes 3 input"):
        input_size(m, (1, 64, 64))
    with pytest.raises(ZooError, match=r"input_size='big' is not allowed; expected a side"):
        input_size(m, "big")
    assert input_size(zoo.create("lenet5")) == (1, 28, 28)
    with pytest.raises(ZooError, match="needs exactly 28x28 inputs"):
        input_size(zoo.create("lenet5"), 32)
    foreign = _tiny_foreign()
    assert input_size(foreign, (3, 8, 8)) == (3, 8, 8) and smallest_input_size(foreign) is None
    with pytest.raises(ZooError, match="Sequential was not built by zoo.create, so it has no default input size"):
        input_size(foreign)
    with pytest.raises(ZooError, match="input_size=8 gives no channel count for Sequential"):
        input_size(foreign, 8)


def test_foreign_models_record_compression_but_cannot_be_saved(tmp_path: Path) -> None:
    foreign = _tiny_foreign()
    p = zc.prune(foreign, 0.5, "magnitude", "channel", example_inputs=torch.zeros(1, 3, 8, 8))
    assert p.spec.name is None and [s["kind"] for s in p.spec.compression] == ["channels"]
    assert spec_of(foreign) is None  # the source was copied, not changed
    with pytest.raises(ZooError, match="Sequential was not built by zoo.create, so it has no model spec"):
        save_checkpoint(p, tmp_path / "p.safetensors")


def test_one_loader_and_writer(tmp_path: Path) -> None:
    assert zc.load is load_checkpoint and zc.save is save_checkpoint
    m = zoo.create("mlp", hidden=(8,), resolution=8, num_classes=3)
    q = zc.prune(m, 0.5, "magnitude", "weight", protect=())
    path = save_checkpoint(q, tmp_path / "q.safetensors", classes=["a", "b", "c"], mean=[0.5], std=[0.25],
                           extra={"note": "x"})
    with pytest.raises(ZooError, match="extra key 'classes' is not allowed"):
        save_checkpoint(q, tmp_path / "r.safetensors", extra={"classes": ["a", "b", "c"]})
    for r in (zc.load(path), zoo.create("mlp", weights=str(path))):
        assert model_spec(r) == model_spec(q) and r.spec.classes == ["a", "b", "c"]
        assert r.spec.mean == [0.5] and r.spec.std == [0.25] and r.spec.provenance["file"] == str(path)
        assert torch.equal(r.features[1].weight, q.features[1].weight)


def test_create_needs_an_installed_weights_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry, "_weights_loader", None)
    with pytest.raises(ZooError, match="needs a weights loader, and none is installed"):
        zoo.create("mlp", weights="digits")
    with pytest.raises(ZooError, match="loader=3 is not allowed; expected a function"):
        registry.install_weights_loader(3)


def _zoo_imports(path: Path) -> set[str]:
    """Every zoo module a file imports (at any level of nesting)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("zoo"):
            out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("zoo"))
    return out


def test_loading_imports_point_down() -> None:
    """The registry never imports the weights package, zoo.io and zoo.spec import no model code, and the
    compression codec does not import the checkpoint layer above it."""
    assert not {m for m in _zoo_imports(ZOO / "_registry.py") if m.startswith(("zoo.weights", "zoo.compress"))}
    assert _zoo_imports(ZOO / "io.py") <= {"zoo.errors", "zoo.untrusted"}
    assert _zoo_imports(ZOO / "spec.py") <= {"zoo.errors", "zoo.untrusted"}
    assert not {m for m in _zoo_imports(ZOO / "compress" / "serialize.py") if m.startswith(("zoo.weights", "zoo.io"))}
