"""A recipe `quantize` stage with `method: qat, backend: xnnpack`, run through the `zoo` CLI in its own
process: its own file, so that pytest-xdist (--dist loadfile) can run it beside test_quant_pt2e.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("torchao", reason="the PT2E backends need the deploy extra: pip install 'zoo[deploy]'")
pytest.importorskip("executorch", reason="backend xnnpack needs the deploy extra: pip install 'zoo[deploy]'")

from test_recipe_compress import _write  # noqa: E402


def test_recipe_qat_stage_with_xnnpack_backend_runs_in_a_fresh_process(tmp_path: Path):
    """A PT2E QAT stage fine-tunes its fake-quant graph without mid-training checkpoints (a fake-quant
    graph has no storage form), then converts and is timed on ExecuTorch, through the CLI as users run it.
    The report sizes ExecuTorch's thread pool before it loads the program: resizing it after the load
    crashed this run (SIGFPE) or hung it in most tries. LeNet-5 keeps it short: torchao's conv-bn
    folding made converting ResNet-20's QAT graph take 73 s against 18 s for static PTQ (on a busy machine)."""
    stages = {"dense": {"type": "train", "model": "lenet5"},
              "qat": {"type": "quantize", "from": "dense", "method": "qat", "backend": "xnnpack", "finetune": True}}
    p = _write(tmp_path, stages, table={"rows": ["dense", "qat"], "columns": ["model", "stage", "top1", "stored_kb"]})
    out = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "zoo", "recipe", "run", str(p), "--quick", "--out", str(out),
                        "--threads", "1"], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {row["stage"]: row for row in json.loads((out / "results.json").read_text())["rows"]}
    assert rows["qat"]["latency_runtime"].startswith("executorch") and rows["qat"]["latency_ms"] > 0
    assert rows["qat"]["compression_ratio"] > 2.5 and rows["qat"]["macs"] == rows["dense"]["macs"] > 0
    assert rows["qat"]["top1"] > 0.5 * rows["dense"]["top1"]  # 1 quick epoch of QAT keeps a working model
    done = json.loads((out / "qat" / "seed0" / "done.json").read_text())
    assert done["metrics"]["top1"] == pytest.approx(rows["qat"]["top1"])
