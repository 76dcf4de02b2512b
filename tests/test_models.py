"""Registry-driven model tests: every registered model, at small inputs, and every paper reference count.

The model list is read from `zoo.list_models()` at collection time, so a new family is tested as soon
as it is registered. Each (model, in_chans) is built once; tests work on deep copies.
"""

from __future__ import annotations

import copy
import functools

import pytest
import torch

import zoo
from zoo._registry import model_card, resolve_kwargs
from zoo.profile import count_params, profile
from zoo.tables import reference_row

NAMES = zoo.list_models()
REFS = [(n, i) for n in NAMES for i in range(len(model_card(n).references))]
NUM_CLASSES = 7
CHANS = (1, 3)


def side_for(name: str) -> int:
    """Input side for the small-input tests: the fixed size, else 32 (or the card's minimum if larger)."""
    card = model_card(name)
    if card.fixed_resolution:
        return card.input_size(resolve_kwargs(name))[1]
    return max(32, card.min_resolution)


@functools.lru_cache(maxsize=None)
def _prototype(name: str, in_chans: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return zoo.create(name, num_classes=NUM_CLASSES, in_chans=in_chans)


def _fresh(name: str, in_chans: int) -> torch.nn.Module:
    return copy.deepcopy(_prototype(name, in_chans))


def _batch(name: str, in_chans: int, side: int | None = None, n: int = 2) -> torch.Tensor:
    s = side_for(name) if side is None else side
    return torch.randn(n, in_chans, s, s)


@pytest.mark.parametrize("in_chans", CHANS)
@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(name: str, in_chans: int) -> None:
    model = _fresh(name, in_chans).train()
    out = model(_batch(name, in_chans))
    assert out.shape == (2, NUM_CLASSES)
    out.sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"{name}: parameters without gradient: {missing[:5]}"
    bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
    assert not bad, f"{name}: non-finite gradients in {bad[:5]}"


@pytest.mark.parametrize("in_chans", CHANS)
@pytest.mark.parametrize("name", NAMES)
def test_profile_small(name: str, in_chans: int) -> None:
    model = _fresh(name, in_chans)
    s = side_for(name)
    p = profile(model, input_size=(in_chans, s, s), flops=(in_chans == 3))
    assert p.input_size == (in_chans, s, s)
    assert p.params == sum(q.numel() for q in model.parameters())
    assert p.macs == sum(r.macs for r in p.layers) > 0
    assert sum(r.params for r in p.layers) == p.params  # every parameter sits in a table row
    assert p.size_bytes is not None and p.size_bytes > 4 * p.params
    if in_chans == 3:
        assert p.flops_fvcore is not None, p.notes
        assert p.macs <= p.flops_fvcore <= 1.5 * p.macs  # fvcore: 1 FMA = 1 flop, plus BN/pool extras
    assert model.training  # profiling restored the mode


@pytest.mark.parametrize("in_chans", CHANS)
@pytest.mark.parametrize("name", NAMES)
def test_reset_classifier(name: str, in_chans: int) -> None:
    model = _fresh(name, in_chans).eval()
    model.reset_classifier(5)
    with torch.no_grad():
        out = model(_batch(name, in_chans))
    assert out.shape == (2, 5)


@pytest.mark.parametrize("in_chans", CHANS)
@pytest.mark.parametrize("name", NAMES)
def test_eval_deterministic(name: str, in_chans: int) -> None:
    model = _fresh(name, in_chans).eval()
    x = _batch(name, in_chans)
    with torch.no_grad():
        a, b = model(x), model(x)
    assert torch.equal(a, b)


@pytest.mark.parametrize("in_chans", CHANS)
@pytest.mark.parametrize("name", NAMES)
def test_bad_input_shapes(name: str, in_chans: int) -> None:
    card = model_card(name)
    model = _fresh(name, in_chans).eval()
    s = side_for(name)
    with pytest.raises(zoo.ZooError) as e:
        model(_batch(name, in_chans + 1))
    assert f"(N, {in_chans}," in str(e.value)
    with pytest.raises(zoo.ZooError) as e:
        model(torch.randn(in_chans, s, s))  # missing batch dimension
    assert f"(N, {in_chans}," in str(e.value)
    smallest = s if card.fixed_resolution else card.min_resolution
    with torch.no_grad():
        assert model(_batch(name, in_chans, smallest)).shape == (2, NUM_CLASSES)  # the minimum works
    with pytest.raises(zoo.ZooError) as e:
        model(_batch(name, in_chans, smallest - 1))
    msg = str(e.value)
    assert f"(N, {in_chans}," in msg and str(smallest) in msg, msg


@pytest.mark.parametrize("name,index", REFS, ids=[f"{n}-{i}" for n, i in REFS])
def test_reference_counts(name: str, index: int) -> None:
    """Params within params_tol and MACs within macs_rtol of the paper, at the default input size."""
    row = reference_row(name, index)
    ref = model_card(name).references[index]
    assert ref.params is not None or ref.macs is not None, f"{name}: reference {index} has no numbers"
    assert row.params_ok, (f"{row.label}: zoo params {row.zoo_params:,} vs paper {row.paper_params:,} "
                           f"(tol {row.params_tol:,})")
    assert row.macs_ok, (f"{row.label}: zoo MACs {row.zoo_macs:,} vs paper {row.paper_macs:,} "
                         f"({row.macs_delta_pct:+.2f}%, rtol {100 * row.macs_rtol:g}%)")


def test_every_model_counted_at_its_default_size() -> None:
    """Count helpers agree with a plain parameter sum for a model with no references (e.g. mlp)."""
    for name in NAMES:
        if model_card(name).references:
            continue
        model = zoo.create(name)
        assert count_params(model) == sum(p.numel() for p in model.parameters())
        assert profile(model, flops=False).input_size == model.spec.input_size
