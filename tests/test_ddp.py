"""`zoo train` under torchrun: two CPU processes (gloo) train with DDP and end with identical weights."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                    reason="torch.distributed with gloo is not available")
def test_two_process_ddp_ranks_agree(tmp_path):
    out, hashes = tmp_path / "run", tmp_path / "hashes"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    env.pop("WORLD_SIZE", None)
    # mobilenet_v1 has BatchNorm: the ranks only agree if its running statistics are synchronised too
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "zoo", "train", "--model", "mobilenet_v1", "--kw", "width=0.25",
           "--kw", "resolution=32", "--data", "digits", "--quick", "--epochs", "1", "--batch-size", "32",
           "--lr", "0.05", "--out", str(out), "--hash-dir", str(hashes), "--no-progress", "--device", "cpu"]
    p = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    h0, h1 = (hashes / "rank0.sha256").read_text(), (hashes / "rank1.sha256").read_text()
    assert len(h0.strip()) == 64 and h0 == h1
    assert p.stdout.count("world size 2") == 1  # only rank 0 reports
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1]
    # 256 quick images over 2 ranks of batch 32: 4 steps per epoch each
    state = json.loads((out / "last_state.json").read_text())
    assert state["step"] == 4
