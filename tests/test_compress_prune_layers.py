"""Per-layer amounts in zoo.compress.prune / prune_iterative: a mapping layer path -> fraction prunes each
listed layer to its own fraction (layer-wise rates as in Han et al. 2015), the other layers stay dense."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

import zoo
import zoo.compress as zc
from zoo.errors import ZooError

RATES = {"features.0": 0.34, "features.5": 0.9, "classifier": 0.5}  # a conv, a linear and the head of lenet5


def lenet() -> nn.Module:
    torch.manual_seed(0)
    return zoo.create("lenet5").eval()


def batches(n: int = 2) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(n)]


def zeros_per_layer(model: nn.Module) -> dict[str, int]:
    return {n: int((m.weight == 0).sum()) for n, m in zc.prunable_layers(model, protect=())}


def test_each_listed_layer_gets_its_own_fraction_and_the_rest_stays_dense() -> None:
    model = lenet()
    sizes = {n: m.weight.numel() for n, m in zc.prunable_layers(model, protect=())}
    pruned = zc.make_permanent(zc.prune(model, RATES))
    zeros = zeros_per_layer(pruned)
    for name, n in sizes.items():
        want = math.ceil(RATES[name] * n) if name in RATES else 0
        assert zeros[name] == want, (name, zeros[name], want)
    assert zeros_per_layer(model) == {n: 0 for n in sizes}  # a copy: the input model is untouched


@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_per_layer_amount_equals_one_layer_at_a_time(criterion: str) -> None:
    """The mapping is the old recipe schedule: each layer pruned in turn in 'layer' scope, the others protected."""
    model, data = lenet(), batches()
    layers = [n for n, _ in zc.prunable_layers(model, protect=())]
    step = model
    for name, a in RATES.items():
        step = zc.prune(step, a, criterion, "weight", "layer", data, protect=[n for n in layers if n != name])
    got = zc.prune(model, RATES, criterion, data=data)
    for (n1, m1), (n2, m2) in zip(zc.prunable_layers(step, protect=()), zc.prunable_layers(got, protect=())):
        assert n1 == n2 and torch.equal(m1.weight, m2.weight), n1
    assert got.spec.compression == step.spec.compression  # one mask step naming every pruned layer


def test_iterative_per_layer_amounts_follow_their_own_cubic_schedules() -> None:
    model = lenet()
    sizes = {n: m.weight.numel() for n, m in zc.prunable_layers(model, protect=())}
    seen: list[dict[str, int]] = []
    zc.prune_iterative(model, RATES, 3, lambda m, step: seen.append(zeros_per_layer(m)))
    assert len(seen) == 3
    for t, zeros in enumerate(seen):
        for name, n in sizes.items():
            want = math.ceil(round(zc.cubic_schedule(RATES[name], 3)[t] * n, 6)) if name in RATES else 0
            assert zeros[name] == want, (t, name)


@pytest.mark.parametrize("amount,kw,words", [
    ({"features.9": 0.5}, {}, ["'features.9'", "not a conv/linear layer", "features.0, features.2"]),
    ({"features.0": 1.5}, {}, ["amount['features.0']", "1.5"]),
    ({}, {}, ["amount={}", "layer path -> fraction"]),
    ({"features.0": 0.5}, {"granularity": "channel"}, ["per-layer amount", "granularity='channel'"]),
    ({"features.0": 0.5}, {"protect": ["classifier"]}, ["protect=", "per-layer amount"]),
])
def test_bad_per_layer_amounts_fail_naming_the_value(amount: dict, kw: dict, words: list[str]) -> None:
    with pytest.raises(ZooError) as e:
        zc.prune(lenet(), amount, **kw)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_iterative_per_layer_amount_needs_weight_granularity() -> None:
    with pytest.raises(ZooError, match="per-layer amount"):
        zc.prune_iterative(lenet(), {"features.0": 0.5}, 2, lambda m, s: None, granularity="channel")


def test_vocabularies_live_in_zoo_compress() -> None:
    import zoo.recipe.compress_stages as cs
    from zoo.compress import criteria, pruning, quantization

    assert zc.CRITERIA is criteria.CRITERIA and zc.GRANULARITIES is pruning.GRANULARITIES
    assert zc.SCOPES is pruning.SCOPES and zc.METHODS is quantization.METHODS
    assert zc.BACKENDS is quantization.BACKENDS and zc.OBSERVERS is quantization.OBSERVERS
    for name in ("CRITERIA", "GRANULARITIES", "SCOPES", "METHODS", "BACKENDS", "OBSERVERS"):
        assert getattr(cs, name) is getattr(zc, name), name  # imported by the recipe stages, not re-declared
