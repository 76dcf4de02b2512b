"""Registry behaviour: duplicates, unknown names and kwargs, argument validation, listing."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch.nn as nn

import zoo
from zoo._registry import model_args, model_card, register_model, resolve_kwargs

NAMES = zoo.list_models()
WIDTH_MODELS = [n for n in NAMES if "width" in model_args(n)]
RES_MODELS = [n for n in NAMES if "resolution" in model_args(n)]


def test_registry_is_populated() -> None:
    for family in ("mobilenet_v1", "resnet50", "resnet20"):
        assert family in NAMES


def test_duplicate_registration_is_an_error() -> None:
    card = model_card("resnet18")
    with pytest.raises(zoo.ZooError, match="already registered"):
        register_model(card)(lambda **kw: None)
    assert zoo.create("resnet18", num_classes=3).classifier.out_features == 3  # original entry intact


def test_entry_points_declare_no_defaults() -> None:
    """Defaults live once, in the Arg: an entry point with its own default (or a missing arg) is refused."""
    card = replace(model_card("resnet18"), name="resnet18_with_defaults")

    def entry(*, num_classes: int = 1000, in_chans: int, drop_rate: float) -> nn.Module:
        return nn.Identity()

    with pytest.raises(zoo.ZooError, match="keyword-only and without defaults"):
        register_model(card)(entry)
    with pytest.raises(zoo.ZooError, match="expected exactly the declared args drop_rate, in_chans, num_classes"):
        register_model(card)(lambda *, num_classes, in_chans: nn.Identity())
    assert "resnet18_with_defaults" not in zoo.list_models()


def test_unknown_name_suggests_close_matches() -> None:
    with pytest.raises(zoo.ZooError) as e:
        zoo.create("resnet5")
    msg = str(e.value)
    assert "'resnet5'" in msg and "did you mean" in msg and "resnet50" in msg
    with pytest.raises(zoo.ZooError, match="unknown model 'mobilenet_v1x'.*mobilenet_v1"):
        zoo.model_card("mobilenet_v1x")
    with pytest.raises(zoo.ZooError, match="list_models"):
        zoo.create("qqqqqqqq")  # nothing close: points to list_models


def test_unknown_kwarg_lists_accepted_ones() -> None:
    with pytest.raises(zoo.ZooError) as e:
        zoo.create("mobilenet_v1", widht=0.5)
    msg = str(e.value)
    assert "'widht'" in msg
    for accepted in model_args("mobilenet_v1"):
        assert accepted in msg


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, "wide", True, None])
@pytest.mark.parametrize("name", WIDTH_MODELS)
def test_bad_width_rejected(name: str, bad: object) -> None:
    with pytest.raises(zoo.ZooError) as e:
        zoo.create(name, width=bad)
    msg = str(e.value)
    assert name in msg and "width" in msg and repr(bad) in msg


@pytest.mark.parametrize("name", NAMES)
def test_bad_common_args_rejected(name: str) -> None:
    for kw in ({"num_classes": 0}, {"num_classes": 2.5}, {"in_chans": 0}, {"in_chans": "rgb"}):
        with pytest.raises(zoo.ZooError, match=list(kw)[0]):
            resolve_kwargs(name, **kw)


def test_unsupported_group_count_rejected() -> None:
    if "shufflenet_v1" not in NAMES:
        pytest.skip("shufflenet_v1 is not registered")
    allowed = model_args("shufflenet_v1")["groups"].choices
    assert allowed is not None and 3 in allowed
    bad = next(g for g in range(1, 100) if g not in allowed)
    with pytest.raises(zoo.ZooError) as e:
        zoo.create("shufflenet_v1", groups=bad)
    msg = str(e.value)
    assert f"groups={bad}" in msg and all(repr(g) in msg for g in allowed)
    for g in allowed:  # every advertised group count builds
        assert resolve_kwargs("shufflenet_v1", groups=g)["groups"] == g


@pytest.mark.parametrize("name", RES_MODELS)
def test_resolution_below_minimum_mentions_minimum(name: str) -> None:
    minimum = model_args(name)["resolution"].min
    assert minimum is not None
    with pytest.raises(zoo.ZooError) as e:
        zoo.create(name, resolution=int(minimum) - 1)
    assert f"{minimum:g}" in str(e.value) and "resolution" in str(e.value)


@pytest.mark.parametrize("name", NAMES)
def test_card_is_consistent(name: str) -> None:
    card = model_card(name)
    assert card.name == name and card.family and card.paper and card.url.startswith("http")
    for ref in card.references:
        resolve_kwargs(name, **ref.kwargs)  # every reference configuration is a valid one
        assert ref.params is not None or ref.macs is not None
    args = model_args(name)
    for key, spec in args.items():  # defaults satisfy their own declared ranges
        assert spec.validate(name, key, spec.default) == spec.default
    model = zoo.create(name)
    assert model.spec.name == name and model.spec.input_size == card.input_size(resolve_kwargs(name))


def test_list_models_patterns_sorted() -> None:
    assert NAMES == sorted(NAMES) and len(NAMES) == len(set(NAMES))
    resnets = zoo.list_models("resnet*")
    assert resnets == sorted(resnets) and "resnet50" in resnets
    assert all(n.startswith("resnet") for n in resnets)
    assert zoo.list_models("mobilenet_v?") == sorted(n for n in NAMES if n.startswith("mobilenet_v"))
    assert zoo.list_models("no_such_model*") == []
