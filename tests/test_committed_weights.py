"""The committed checkpoints in weights/ load by tag, pass their hash check and reproduce their metrics."""

from __future__ import annotations

import pytest

import zoo
from zoo.data import get_loaders
from zoo.train import evaluate

ENTRIES = zoo.list_weights()


def test_index_is_small_and_nonempty():
    assert ENTRIES, "weights/index.json lists no checkpoint"
    assert sum(e.size_bytes for e in ENTRIES) < 20 * 2**20


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: f"{e.architecture}-{e.tag}-{e.sha256[:8]}")
def test_committed_weights_reproduce_their_top1(entry, request):
    if entry.dataset == "mnist":
        request.getfixturevalue("mnist_dir")  # skips without the MNIST files
    model = zoo.create(entry.architecture, weights=entry.tag, **{k: v for k, v in entry.kwargs.items()
                                                                  if k in ("width", "hidden", "groups")})
    size = model.default_input_size
    _, val, info = get_loaders(entry.dataset, size, batch_size=256)
    assert info.class_names == entry.classes
    top1 = evaluate(model, val)["top1"]
    assert top1 == pytest.approx(entry.metrics["top1"], abs=0.01)
