"""`zoo train --seed N` is bit-reproducible on CPU (same weights, same logs), and a run killed with
SIGKILL in the middle of an epoch, then continued with `--resume`, ends with the same weights and
logs as an uninterrupted run (issue 15)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from zoo.cli import main
from zoo.io import load_tensors

REPO = Path(__file__).resolve().parents[1]
TIMING = ("images_per_s", "epoch_time_s")  # wall-clock fields of a log record: the only ones allowed to differ
# lenet5 at 16 px on digits in batches of 8: 180 steps (about half a second) per epoch on one thread
RUN = ["train", "--model", "lenet5", "--kw", "resolution=16", "--data", "digits", "--batch-size", "8",
       "--lr", "0.02", "--no-progress"]


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_tensors(out / "last.safetensors")


def _log(out: Path) -> list[dict]:
    recs = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIMING} for r in recs]


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_seed_fixes_weights_and_logs(tmp_path, capsys):
    quick = ["train", "--model", "mlp", "--kw", "hidden=32", "--kw", "resolution=8", "--data", "digits", "--quick",
             "--epochs", "2", "--batch-size", "32", "--no-progress"]
    for name, seed in (("a", "3"), ("b", "3"), ("c", "4")):
        assert main(quick + ["--seed", seed, "--out", str(tmp_path / name)]) == 0
    hashes = [line.split("sha256(state) ")[1] for line in capsys.readouterr().out.splitlines() if "sha256" in line]
    a, b, c = (_weights(tmp_path / n) for n in "abc")
    assert _same(a, b) and _log(tmp_path / "a") == _log(tmp_path / "b") and hashes[0] == hashes[1]
    assert not _same(a, c) and hashes[0] != hashes[2]  # the seed matters (initial weights included)


def _killed_mid_epoch(out: Path, epochs: int) -> None:
    """Start `zoo train` in a subprocess and SIGKILL it as soon as epoch 1's checkpoint is complete."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "zoo", *RUN, "--epochs", str(epochs), "--seed", "5",
                             "--out", str(out)], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    manifest = out / "last_state.json"
    deadline = time.monotonic() + 240
    try:
        while not manifest.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        assert manifest.exists(), f"epoch 1 never finished: {proc.stderr.read().decode() if proc.poll() else ''}"
        proc.send_signal(signal.SIGKILL)  # the manifest is written last: we are now inside epoch 2
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert json.loads(manifest.read_text())["epoch"] == 1 and len(_log(out)) == 1


def test_kill_mid_epoch_then_resume_is_bit_exact(tmp_path, capsys):
    epochs = 3
    _killed_mid_epoch(tmp_path / "cut", epochs)
    assert main(RUN + ["--epochs", str(epochs), "--seed", "5", "--out", str(tmp_path / "cut"), "--resume"]) == 0
    assert main(RUN + ["--epochs", str(epochs), "--seed", "5", "--out", str(tmp_path / "full")]) == 0
    hashes = [line.split("sha256(state) ")[1] for line in capsys.readouterr().out.splitlines() if "sha256" in line]
    assert _same(_weights(tmp_path / "cut"), _weights(tmp_path / "full")) and hashes[0] == hashes[1]
    assert _log(tmp_path / "cut") == _log(tmp_path / "full") and len(_log(tmp_path / "full")) == epochs
