"""`zoo finetune --weights FILE` on a tiny imported TFLite MobileNet: the model and kwargs come from the file's
header, and the CLI starts training from the same weights as a recipe stage with `init: FILE` (first conv
adapted to the folder's normalisation, BatchNorm re-based, fresh head); a --model or kwarg that disagrees
with the file fails before anything is written."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
import yaml

import zoo
import zoo.finetune
import zoo.recipe.stages
from zoo.cli import main
from zoo.recipe import run_recipe
from zoo.train import fit

pytest.importorskip("tflite", reason="needs the TFLite extra: pip install 'zoo[tflite]'")

from test_finetune import CLASSES, make_folder  # noqa: E402
from tflite_builder import Exporter  # noqa: E402

KW = {"width": 0.25, "resolution": 32, "act": "relu6", "padding": "same"}
BATCH = 8


@pytest.fixture(scope="module")
def imported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny MobileNet v1 with random batch-norm statistics, exported as a uint8 TFLite file, imported by the CLI."""
    d = tmp_path_factory.mktemp("imp")
    torch.manual_seed(5)
    m = zoo.create("mobilenet_v1", **KW)
    with torch.no_grad():
        for bn in m.modules():
            if isinstance(bn, nn.BatchNorm2d):  # so that the folded weights differ from unit-BN ones
                bn.running_mean.uniform_(-0.5, 0.5)
                bn.running_var.uniform_(0.5, 2.0)
                bn.weight.uniform_(0.5, 1.5)
    (d / "tiny.tflite").write_bytes(Exporter(m.eval(), quantized=True).export())
    assert main(["weights", "import", str(d / "tiny.tflite"), "--out", str(d / "m.safetensors")]) == 0
    return d / "m.safetensors"


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("ftt") / "data")


def _spy(monkeypatch: pytest.MonkeyPatch, module: Any) -> list[dict[str, torch.Tensor]]:
    """Record the model's state when `module`'s fit starts, then train as usual."""
    seen: list[dict[str, torch.Tensor]] = []

    def spy(model: nn.Module, *args: Any, **kwargs: Any) -> Any:
        seen.append({k: v.detach().clone() for k, v in model.state_dict().items()})
        return fit(model, *args, **kwargs)

    monkeypatch.setattr(module, "fit", spy)
    return seen


def _recipe_start(tmp_path: Path, folder: Path, weights: Path, monkeypatch: pytest.MonkeyPatch) -> dict:
    """The state a recipe train stage with `init: weights` starts training from, on the same folder."""
    seen = _spy(monkeypatch, zoo.recipe.stages)
    raw = {"name": "t", "dataset": {"name": "imagefolder", "root": str(folder), "input_size": [3, 32, 32]},
           "seed": 0, "defaults": {"train": {"epochs": 1, "batch_size": BATCH, "lr": 0.01}},
           "stages": {"ft": {"type": "train", "model": "mobilenet_v1", "kwargs": KW, "init": str(weights)}}}
    (tmp_path / "t.yaml").write_text(yaml.safe_dump(raw))
    run_recipe(tmp_path / "t.yaml", out=tmp_path / "run", log=lambda s: None)
    return seen[0]


def test_cli_starts_from_the_recipe_paths_weights(imported: Path, folder: Path, tmp_path: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy(monkeypatch, zoo.finetune)
    out = tmp_path / "ft"
    argv = ["finetune", "--weights", str(imported), "--data", str(folder), "--epochs", "1", "--batch-size",
            str(BATCH), "--out", str(out), "--quiet"]  # no --model: the header says mobilenet_v1 and its kwargs
    assert main(argv) == 0
    cli = seen[0]
    ref = _recipe_start(tmp_path, folder, imported, monkeypatch)
    body = [k for k in ref if not k.startswith("classifier.")]
    assert set(cli) == set(ref) and body
    for k in body:  # same transfer: adapted first conv and re-based BatchNorm
        assert torch.allclose(cli[k].double(), ref[k].double(), rtol=1e-4, atol=1e-6), k
    src = zoo.create("mobilenet_v1", weights=str(imported))
    assert not torch.allclose(cli["stem.bn.running_var"], src.stem.bn.running_var)  # re-based, not the file's 1s
    assert cli["classifier.weight"].shape == (len(CLASSES), src.num_features)
    m = zoo.create("mobilenet_v1", weights=str(out / "model.safetensors"))
    assert {k: v for k, v in m.spec.kwargs.items() if k in KW} == KW
    loss = json.loads((out / "metrics.json").read_text())["epochs"][0]["train_loss"]
    assert loss < 2 * math.log(len(CLASSES))  # the untransferred start gave losses of tens


def test_tflite_file_starts_like_its_import(imported: Path, folder: Path, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _spy(monkeypatch, zoo.finetune)
    for weights in (imported, imported.with_name("tiny.tflite")):
        assert main(["finetune", "--weights", str(weights), "--data", str(folder), "--epochs", "1", "--batch-size",
                     str(BATCH), "--out", str(tmp_path / weights.suffix[1:]), "--quiet"]) == 0
    assert all(torch.equal(seen[0][k], seen[1][k]) for k in seen[0] if not k.startswith("classifier."))


@pytest.mark.parametrize("extra, needle", [
    (["--model", "mobilenet_v2"], r"--model \(model_name\)='mobilenet_v2' disagrees with the file: weights "
                                  r"'.*m\.safetensors' hold mobilenet_v1\("),
    (["--model", "mobilenet_v1", "--kw", "act=relu"], r"act='relu' disagrees with the file: .* \(act='relu6'\)"),
    (["--width", "0.5"], r"width=0.5 disagrees with the file: .*\(width=0.25\)"),
])
def test_disagreeing_model_fails_before_writing(extra: list[str], needle: str, imported: Path, folder: Path,
                                                tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "ft"
    assert main(["finetune", "--weights", str(imported), "--data", str(folder), "--out", str(out), *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("zoo: error: ")
    assert re.search(needle, err), err
    assert not out.exists()


@pytest.mark.parametrize("extra, needle", [
    ([], "--model is required unless --weights names a weights file"),
    (["--weights", "digits"], "weights 'digits' is a tag, which does not say which model it is for; give --model"),
])
def test_model_needed_without_a_file(extra: list[str], needle: str, folder: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture) -> None:
    assert main(["finetune", "--data", str(folder), "--out", str(tmp_path / "ft"), *extra]) == 2
    assert needle in capsys.readouterr().err
    assert not (tmp_path / "ft").exists()
