"""prune(..., round_to=N): kept channel counts are multiples of N (Torch-Pruning's round_to, Fang et al. 2023),
never zero, never above the original, still exactly the masked model; bad values refused."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import yaml

import zoo
import zoo.compress as zc
from zoo.compress import criteria
from zoo.compress.groups import build_groups
from zoo.compress.pruning import equivalence_error
from zoo.compress.surgery import apply_plan, plan, zero_removed
from zoo.errors import ZooError
from zoo.profile import count_macs
from toy_nets import Toy, outputs, random_bn  # noqa: E402  (tests/ is on sys.path)

X = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))


MODELS = {
    "mobilenet_v2": lambda: zoo.create("mobilenet_v2", stem="cifar", num_classes=10),
    "shufflenet_v2": lambda: zoo.create("shufflenet_v2", stem="cifar", num_classes=10),
    "shufflenet_v1": lambda: zoo.create("shufflenet_v1", groups=3, stem="cifar", num_classes=10),
    "squeezenet1_1": lambda: zoo.create("squeezenet1_1", stem="cifar", num_classes=10),
    "resnet20": lambda: zoo.create("resnet20"),
    "toy": lambda: Toy(c=40),
}


def _widths(m: nn.Module) -> dict[tuple[str, str], int]:
    out = {}
    for n, mod in m.named_modules():
        if isinstance(mod, nn.Conv2d):
            out[(n, "out")], out[(n, "in")] = mod.out_channels, mod.in_channels
        elif isinstance(mod, nn.Linear):
            out[(n, "out")], out[(n, "in")] = mod.out_features, mod.in_features
    return out


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("round_to, scope", [(8, "global"), (16, "layer")])
def test_kept_counts_are_multiples_and_the_result_is_exact(name, round_to, scope):
    torch.manual_seed(0)
    m = random_bn(MODELS[name]())
    p = zc.prune(m, 0.5, "magnitude", "channel", scope, example_inputs=X[:1], p=1, round_to=round_to)
    before, after = _widths(m), _widths(p)
    assert before.keys() == after.keys()
    changed = [k for k in before if after[k] != before[k]]
    assert changed, "round_to left every layer whole"
    for k in before:  # a multiple, or the layer's own count where rounding up reached it (never above, never 0)
        assert 0 < after[k] <= before[k], (k, after[k], before[k])
        assert after[k] == before[k] or after[k] % round_to == 0, (k, after[k], round_to)
    assert count_macs(p, (3, 32, 32)) < count_macs(m, (3, 32, 32))
    # the masked model (removed channels zeroed) computes the same function as the smaller one
    groups = build_groups(m, X[:1])
    kept = plan(groups, criteria.unit_scores(m, groups, "magnitude", p=1), 0.5, scope, round_to)
    ref, cut = copy.deepcopy(m), copy.deepcopy(m)
    zero_removed(ref, groups, kept)
    apply_plan(cut, groups, kept)
    assert equivalence_error(ref, cut, X) < 1e-5
    assert torch.equal(outputs(cut, X), outputs(p, X))  # prune() returned that very plan


def test_rounding_is_up_and_per_group():
    m = random_bn(zoo.create("mobilenet_v2", stem="cifar", num_classes=10))
    groups = build_groups(m, X[:1])
    scores = criteria.unit_scores(m, groups, "magnitude", p=1)
    plain = plan(groups, scores, 0.5, "layer")
    rounded = plan(groups, scores, 0.5, "layer", 8)
    n_rounded = 0
    for g, a, b in zip(groups, plain, rounded):
        na = g.size if a is None else a.numel()
        nb = g.size if b is None else b.numel()
        assert na <= nb <= g.size and (nb % 8 == 0 or nb == g.size), (g.name, na, nb, g.size)
        n_rounded += nb > na
    assert n_rounded > 0  # mobilenet_v2 has groups (24, 40, 320, ...) whose halves are not multiples of 8


def test_round_to_above_every_group_keeps_the_model_whole():
    m = random_bn(Toy(c=8))
    p = zc.prune(m, 0.5, "magnitude", "channel", "layer", example_inputs=X[:1], round_to=64)
    assert _widths(p) == _widths(m)
    assert torch.allclose(outputs(p, X), outputs(m, X))


def test_none_means_no_rounding():
    m = random_bn(Toy(c=12))
    a = zc.prune(m, 0.5, "magnitude", "channel", "layer", example_inputs=X[:1])
    b = zc.prune(m, 0.5, "magnitude", "channel", "layer", example_inputs=X[:1], round_to=None)
    c = zc.prune(m, 0.5, "magnitude", "channel", "layer", example_inputs=X[:1], round_to=8)
    assert _widths(a) == _widths(b)
    assert a.stem[0].out_channels == 6 and c.stem[0].out_channels == 8


@pytest.mark.parametrize("bad", [0, -8, 2.5, "8", True, [8]])
def test_bad_round_to_is_refused(bad):
    with pytest.raises(ZooError, match=r"round_to=.*not allowed; expected None or an int >= 1"):
        zc.prune(Toy(c=40), 0.5, "magnitude", "channel", example_inputs=X[:1], round_to=bad)


def test_round_to_is_refused_for_weight_masks():
    with pytest.raises(ZooError, match=r"round_to=8 only applies to granularity='channel'"):
        zc.prune(Toy(c=40), 0.5, "magnitude", "weight", round_to=8)


RECIPE = {
    "name": "r", "dataset": {"name": "digits", "input_size": [1, 32, 32]}, "seed": 0,
    "defaults": {"train": {"epochs": 1, "lr": 0.1, "batch_size": 64}},
    "stages": {"dense": {"type": "train", "model": "mobilenet_v1", "kwargs": {"width": 0.25}}},
}


def _recipe(tmp_path: Path, stage: dict) -> Path:
    r = copy.deepcopy(RECIPE)
    r["stages"]["s"] = {"type": "prune", "from": "dense", "amount": 0.5, **stage}
    p = tmp_path / "r.yaml"
    p.write_text(yaml.safe_dump(r, sort_keys=False))
    return p


@pytest.mark.parametrize("stage, words", [
    ({"granularity": "channel", "round_to": 0}, ["stages.s.round_to", "expected an int >= 1"]),
    ({"granularity": "channel", "round_to": "8"}, ["stages.s.round_to", "expected int"]),
    ({"round_to": 8}, ["stages.s.round_to", "granularity: channel"]),
])
def test_recipe_prune_stage_validates_round_to(tmp_path, stage, words):
    from zoo.recipe import RecipeError, load_recipe

    p = _recipe(tmp_path, stage)
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    for w in words:
        assert w in str(e.value), (w, str(e.value))


def test_recipe_prune_stage_passes_round_to(tmp_path, monkeypatch):
    from zoo.recipe import compress_stages, load_recipe

    r = load_recipe(_recipe(tmp_path, {"granularity": "channel", "round_to": 8}))
    stage = r.stages["s"]
    assert stage.options["round_to"] == 8
    seen = {}

    def fake_prune(model, *a, **kw):
        seen.update(kw)
        return model

    monkeypatch.setattr(compress_stages, "prune", fake_prune)
    monkeypatch.setattr(compress_stages, "_metrics", lambda ctx, model, before, ft: {})

    class Ctx:
        options = stage.options
        input_size = (1, 32, 32)

        @staticmethod
        def initial_model():
            return Toy(c=40)

    compress_stages.run_prune(Ctx())
    assert seen["round_to"] == 8
