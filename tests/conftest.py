"""Shared pytest fixtures for the zoo test-suite."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# hypothesis caches (unicode tables, constants) go to a temp folder, not a new .hypothesis/ in the repo root;
# read lazily by hypothesis, so setting it here, before the first test runs, is early enough
os.environ.setdefault("HYPOTHESIS_STORAGE_DIRECTORY", str(Path(tempfile.gettempdir()) / "zoo-hypothesis"))

REPO = Path(__file__).resolve().parents[1]
# zoo finds shared data only through $ZOO_DATA (or `zoo --data-root`); the test suite points it at the
# checkout's neighbour ../shared/data unless it is set. Without those files the real-data tests skip, each
# naming the folder it looked in and $ZOO_DATA. Subprocesses (DDP, train repro) inherit it.
os.environ.setdefault("ZOO_DATA", str(REPO.parent / "shared" / "data"))
MNIST_DIR = Path(os.environ.get("ZOO_MNIST") or Path(os.environ["ZOO_DATA"]) / "mnist")

# One intra-op thread in every test process, with or without xdist: two workers on a two-core machine
# would otherwise oversubscribe, and the small trainings some tests run (test_compress_quant's digits
# models) reach different accuracies with a different float summation order, so a plain `pytest` must
# compute what `make test` computes. Tests about threading set their own count.
torch.set_num_threads(1)


@pytest.fixture
def mnist_dir() -> Path:
    """The offline MNIST test split; tests that need it are skipped on machines without it."""
    if not (MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST files not found in {MNIST_DIR} (set ZOO_DATA to the shared data folder, or ZOO_MNIST "
                    "to a folder with the IDX files)")
    return MNIST_DIR


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
