"""The committed checkpoints in weights/ load, pass their hash check and reproduce their recorded top-1
(`zoo weights verify --evaluate`, which skips datasets that are not on this machine)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

import zoo
from zoo.cli import main
from zoo.data.sources import data_root
from zoo.weights.evaluate import TOP1_TOLERANCE, evaluate_entry

ENTRIES = zoo.list_weights()
WEIGHTS = Path(__file__).resolve().parents[1] / "weights"


def test_index_is_small_and_nonempty():
    assert ENTRIES, "weights/index.json lists no checkpoint"
    assert sum(e.size_bytes for e in ENTRIES) < 20 * 2**20


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: f"{e.architecture}-{e.tag}-{e.sha256[:8]}")
def test_committed_weights_reproduce_their_top1(entry, request):
    if entry.dataset == "mnist":
        request.getfixturevalue("mnist_dir")  # skips without the MNIST files
    if entry.dataset == "cifar10" and not (data_root() / "cifar10" / "test.npz").is_file():
        pytest.skip(f"CIFAR-10 JPEG copy not found in {data_root() / 'cifar10'} (set ZOO_DATA to the shared data folder)")
    m = evaluate_entry(entry)
    assert not m.skipped and m.measured is not None
    assert m.measured == pytest.approx(entry.metrics["top1"], abs=TOP1_TOLERANCE) and m.ok


def _digits_copy(tmp_path: Path, top1: float) -> Path:
    """A weights folder holding one digits checkpoint whose index records `top1`."""
    entry = next(e for e in ENTRIES if e.dataset == "digits")
    shutil.copy(WEIGHTS / entry.file, tmp_path / entry.file)
    raw = next(r for r in json.loads((WEIGHTS / "index.json").read_text())["weights"] if r["file"] == entry.file)
    raw["metrics"] = {"top1": top1}
    (tmp_path / "index.json").write_text(json.dumps({"format": 1, "weights": [raw]}))
    return tmp_path


def test_verify_evaluate_flags_a_wrong_recorded_top1(tmp_path, capsys):
    entry = next(e for e in ENTRIES if e.dataset == "digits")
    d = _digits_copy(tmp_path, entry.metrics["top1"])
    assert main(["weights", "verify", "--evaluate", "--weights-dir", str(d)]) == 0
    assert f"index says {entry.metrics['top1']:.2f}%: ok" in capsys.readouterr().out
    _digits_copy(tmp_path, entry.metrics["top1"] - 0.5)
    assert main(["weights", "verify", "--evaluate", "--weights-dir", str(d)]) == 1
    assert "MISMATCH" in capsys.readouterr().out


def test_verify_evaluate_skips_absent_datasets_with_the_reason(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_DATA", str(tmp_path / "nowhere"))
    monkeypatch.delenv("ZOO_MNIST", raising=False)
    entry = next(e for e in ENTRIES if e.dataset == "mnist")
    m = evaluate_entry(entry)
    assert m.measured is None and m.ok
    assert m.line().endswith(f"skipped (MNIST folder {tmp_path / 'nowhere' / 'mnist'} does not exist)")
