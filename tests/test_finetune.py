"""`zoo finetune` / `zoo predict` on a small generated image folder (mixed formats, modes and sizes)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

import zoo
import zoo.finetune
from zoo.cli import main
from zoo.errors import ZooError
from zoo.finetune import ThenStep, finetune, parse_then
from zoo.predict import load_classifier, predict
from zoo.train import fit

CLASSES = ["digit0", "digit1", "digit2"]
PER_CLASS = 12
MODES = ("L", "RGB", "RGBA", "P")
TINY = ["--model", "mobilenet_v1", "--width", "0.25", "--input-size", "32", "--batch-size", "8", "--quiet"]


def make_folder(root: Path, classes: list[str] = CLASSES, per_class: int = PER_CLASS) -> Path:
    """3 classes x 12 digits as PNG/JPEG files in modes L/RGB/RGBA/P and sizes 8..24 px."""
    from sklearn.datasets import load_digits

    d = load_digits()
    for c, name in enumerate(classes):
        folder = root / name
        folder.mkdir(parents=True, exist_ok=True)
        for j, i in enumerate(np.flatnonzero(d.target == c)[:per_class]):
            a = (d.images[i] * (255 / 16)).astype(np.uint8)
            im = Image.fromarray(a, "L").resize((8 + 4 * (j % 5), 8 + 4 * (j % 5) + j % 3), Image.BILINEAR)
            mode = MODES[j % 4]
            if mode == "RGB":
                im = im.convert("RGB")
            elif mode == "RGBA":
                im = im.convert("RGBA")
                im.putalpha(255)
            elif mode == "P":
                im = im.convert("RGB").convert("P")
            ext = ".jpg" if mode in ("L", "RGB") and j % 3 == 0 else ".png"
            im.save(folder / f"img{j:02d}{ext}")
    return root


def cli(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def header(path: Path) -> dict:
    with safe_open(str(path), framework="pt") as f:
        return {k: json.loads(v) for k, v in (f.metadata() or {}).items()}


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_folder(tmp_path_factory.mktemp("ft") / "data")


@pytest.fixture(scope="module")
def trained(folder: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("ft") / "out"
    assert main(["finetune", *TINY, "--data", str(folder), "--epochs", "2", "--out", str(out)]) == 0
    return out


def test_folder_has_every_format_and_mode(folder: Path) -> None:
    files = sorted(folder.rglob("*.*"))
    assert len(files) == len(CLASSES) * PER_CLASS
    assert {f.suffix for f in files} == {".png", ".jpg"}
    modes = set()
    for f in files:
        with Image.open(f) as im:
            modes.add(im.mode)
    assert modes == set(MODES)
    assert len({Image.open(f).size for f in files}) > 5


def test_finetune_writes_weights_and_metrics(trained: Path, folder: Path) -> None:
    meta = header(trained / "model.safetensors")
    assert meta["zoo.classes"] == CLASSES
    assert meta["zoo.spec"]["name"] == "mobilenet_v1"
    assert meta["zoo.spec"]["kwargs"]["num_classes"] == 3 and meta["zoo.spec"]["kwargs"]["width"] == 0.25
    assert meta["zoo.input_size"] == [3, 32, 32]
    assert len(meta["zoo.mean"]) == 3 and len(meta["zoo.std"]) == 3 and min(meta["zoo.std"]) > 0
    metrics = json.loads((trained / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == [1, 2]
    for e in metrics["epochs"]:
        assert e["train_loss"] > 0 and 0 <= e["val_top1"] <= 100
    assert metrics["data"]["num_train"] + metrics["data"]["num_val"] == len(CLASSES) * PER_CLASS
    assert metrics["data"]["class_names"] == CLASSES
    assert metrics["final"]["val_top1"] == metrics["epochs"][-1]["val_top1"]
    assert metrics["steps"] == []


def test_predict_prints_top_classes(trained: Path, folder: Path, capsys: pytest.CaptureFixture) -> None:
    images = [str(folder / "digit1" / "img00.jpg"), str(folder / "digit2" / "img03.png")]
    code, out, err = cli(capsys, "predict", "--weights", str(trained / "model.safetensors"), *images)
    assert code == 0, err
    lines = out.splitlines()
    assert len(lines) == len(images) * (1 + len(CLASSES))  # num_classes (3) < 5 rows per image
    for k, img in enumerate(images):
        block = lines[k * 4:(k + 1) * 4]
        assert block[0] == img
        rows = [ln.split() for ln in block[1:]]
        assert sorted(r[0] for r in rows) == CLASSES
        probs = [float(r[1]) for r in rows]
        assert probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-3
    top = predict(trained / "model.safetensors", images, top=2)
    assert [len(t) for t in top] == [2, 2]


def test_predict_preprocesses_like_validation(trained: Path, folder: Path) -> None:
    from zoo.data import get_loaders

    clf = load_classifier(trained / "model.safetensors")
    _, val_loader, _ = get_loaders("imagefolder", clf.input_size, batch_size=8, root=folder)
    path, _ = val_loader.dataset.items[0]
    x_val = val_loader.dataset[0][0]
    assert torch.allclose(clf.preprocess([path])[0], x_val, atol=1e-5)
    # the rebuilt model reproduces the fine-tuned model's logits on validation inputs
    with torch.no_grad():
        probs = clf.probabilities([p for p, _ in val_loader.dataset.items])
    assert probs.shape == (len(val_loader.dataset), 3)
    assert torch.allclose(probs.sum(1), torch.ones(len(probs)), atol=1e-5)


def test_freeze_backbone_keeps_backbone(trained: Path, folder: Path, tmp_path: Path,
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    split = tmp_path / "split"  # the train/ + val/ layout
    for sub, names in (("train", [f"img{j:02d}" for j in range(9)]), ("val", [f"img{j:02d}" for j in range(9, 12)])):
        for c in CLASSES:
            (split / sub / c).mkdir(parents=True)
            for f in (folder / c).iterdir():
                if f.stem in names:
                    shutil.copy(f, split / sub / c / f.name)
    starts: list[dict] = []  # the state training starts from: transferred (first conv adapted, BatchNorm re-based)

    def spy(model: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
        starts.append({k: v.clone() for k, v in model.state_dict().items()})
        return fit(model, *args, **kwargs)

    monkeypatch.setattr(zoo.finetune, "fit", spy)
    res = finetune("mobilenet_v1", split, weights=str(trained / "model.safetensors"), freeze_backbone=True,
                   epochs=1, out=tmp_path / "out", batch_size=8, lr=0.1, progress=False)
    assert res.metrics["data"]["num_train"] == 27 and res.metrics["data"]["num_val"] == 9
    before, after = starts[0], res.model.state_dict()
    assert set(after) == set(before)
    changed = sorted(k for k in before if not torch.equal(before[k], after[k]))
    assert changed == ["classifier.bias", "classifier.weight"]  # BN running stats untouched too
    assert all(p.requires_grad for p in res.model.parameters())  # unfrozen again afterwards
    assert "train" not in res.model.__dict__


def test_then_prune_quantize(trained: Path, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "small"
    code, _, err = cli(capsys, "finetune", *TINY, "--data", str(folder), "--epochs", "2", "--out", str(out),
                       "--weights", str(trained / "model.safetensors"), "--then", "prune=0.5,quantize=static")
    assert code == 0, err
    metrics = json.loads((out / "metrics.json").read_text())
    dense = json.loads((trained / "metrics.json").read_text())["final"]
    prune_rec, quant_rec = metrics["steps"]
    assert prune_rec["step"] == "prune" and prune_rec["amount"] == 0.5 and len(prune_rec["epochs"]) == 1
    assert prune_rec["params"] < 0.6 * dense["params"]
    assert quant_rec["step"] == "quantize" and quant_rec["method"] == "static" and quant_rec["calibration_images"] > 0
    assert metrics["final"]["size_bytes"] < 0.5 * dense["size_bytes"]
    clf = load_classifier(out / "model.safetensors")
    qtypes = {type(m).__module__ for m in clf.model.modules()}
    assert any(m.startswith("torch.ao.nn.quantized") for m in qtypes)
    code, text, err = cli(capsys, "predict", "--weights", str(out / "model.safetensors"),
                          str(folder / "digit0" / "img01.png"))
    assert code == 0, err
    probs = [float(line.split()[1]) for line in text.splitlines()[1:]]
    assert len(probs) == 3 and sum(probs) <= 1.0 + 1e-3


def test_parse_then() -> None:
    assert parse_then("prune=0.5,quantize=static") == [ThenStep("prune", 0.5), ThenStep("quantize", "static")]
    assert parse_then(["quantize=dynamic"]) == [ThenStep("quantize", "dynamic")]
    assert parse_then([("prune", 0.25)]) == [ThenStep("prune", 0.25)]
    assert parse_then(None) == []
    for bad, needle in [("prune", "expected name=value"), ("prune=1.5", "prune='1.5'"), ("prune=x", "prune='x'"),
                        ("quantize=int4", "quantize='int4'"), ("lowrnk=0.5", "step 'lowrnk'"),
                        ("quantize=static,prune=0.5", "last step"), ("", "empty")]:
        with pytest.raises(ZooError, match="allowed|last step|empty") as e:
            parse_then(bad)
        assert needle in str(e.value)
    with pytest.raises(ZooError) as e:
        parse_then("foo=1")
    assert "prune=" in str(e.value) and "quantize=" in str(e.value)  # lists the allowed steps


@pytest.mark.parametrize("case", ["empty_class", "corrupt_image", "single_class"])
def test_bad_folders_fail_with_one_line(case: str, folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad"
    if case == "single_class":
        shutil.copytree(folder / "digit0", bad / "digit0")
        needle = "single class ('digit0')"
    else:
        shutil.copytree(folder, bad)
        if case == "empty_class":
            (bad / "digit9").mkdir()
            needle = str(bad / "digit9")
        else:
            (bad / "digit1" / "img05.png").write_bytes(b"not an image at all")
            needle = str(bad / "digit1" / "img05.png")
    code, out, err = cli(capsys, "finetune", *TINY, "--data", str(bad), "--epochs", "1", "--out", str(tmp_path / "o"))
    assert code == 2
    assert err.startswith("zoo: error:") and needle in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # failed before training


@pytest.mark.parametrize("extra,needle", [
    (["--then", "prune=0.5,sparsify=1"], "step 'sparsify'"),
    (["--kw", "num_classes=3"], "num_classes=3 cannot be given"),
    (["--width", "0"], "width=0.0"),
    (["--epochs", "0"], "epochs=0"),
    (["--input-size", "16"], "resolution=16"),
])
def test_bad_options_fail_with_one_line(extra: list[str], needle: str, folder: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, "finetune", *TINY, "--data", str(folder), "--out", str(tmp_path / "o"), *extra)
    assert code == 2 and err.startswith("zoo: error:") and needle in err, err


def test_predict_errors(trained: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    code, _, err = cli(capsys, "predict", "--weights", str(trained / "model.safetensors"), str(tmp_path / "nope.png"))
    assert code == 2 and "nope.png" in err
    bare = tmp_path / "bare.safetensors"
    zoo.weights.save_checkpoint(zoo.create("mobilenet_v1", width=0.25, num_classes=3), bare)
    code, _, err = cli(capsys, "predict", "--weights", str(bare), str(tmp_path / "nope.png"))
    assert code == 2 and "normalisation" in err
