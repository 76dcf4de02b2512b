"""`stem="cifar"` on MobileNet v1/v2, ShuffleNet v1/v2 and SqueezeNet 1.0/1.1 (32 px inputs).

The models are found through the registry (every entry point with a `stem` kwarg). MobileNet v2 and
ShuffleNet v2 are checked against chenyaofo/pytorch-cifar-models' README (CIFAR-10 table, params and
MAdds in millions with two decimals); the ImageNet default is pinned to the exact counts it had
before the kwarg existed.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import zoo
import zoo.compress as zc
from zoo._registry import model_args, model_card
from zoo.profile import count_macs, count_params
from zoo.tables import table_rows

STEM_MODELS = [n for n in zoo.list_models() if "stem" in model_args(n)]

# chenyaofo/pytorch-cifar-models README, CIFAR-10: model -> (zoo name, width, #Params (M), #MAdds (M)).
CHENYAOFO = {
    "mobilenetv2_x0_5": ("mobilenet_v2", 0.5, 0.70, 27.97),
    "mobilenetv2_x0_75": ("mobilenet_v2", 0.75, 1.37, 59.31),
    "mobilenetv2_x1_0": ("mobilenet_v2", 1.0, 2.24, 87.98),
    "mobilenetv2_x1_4": ("mobilenet_v2", 1.4, 4.33, 170.07),
    "shufflenetv2_x0_5": ("shufflenet_v2", 0.5, 0.35, 10.90),
    "shufflenetv2_x1_0": ("shufflenet_v2", 1.0, 1.26, 45.00),
    "shufflenetv2_x1_5": ("shufflenet_v2", 1.5, 2.49, 94.26),
    "shufflenetv2_x2_0": ("shufflenet_v2", 2.0, 5.37, 187.81),
}

# Default (stem="imagenet", 1000 classes, 224 px) params and MACs, measured before `stem` was added.
IMAGENET_DEFAULT = {
    "mobilenet_v1": (4_231_976, 568_740_352),
    "mobilenet_v2": (3_504_872, 300_774_272),
    "shufflenet_v1": (1_865_728, 137_460_672),
    "shufflenet_v2": (2_278_604, 144_907_992),
    "squeezenet1_0": (1_248_424, 818_924_576),
    "squeezenet1_1": (1_235_496, 349_151_936),
}

# Side of the last feature map at 32 px with stem="cifar" (1x1 for every model with the ImageNet stem).
CIFAR_FINAL_SIDE = {"mobilenet_v1": 2, "mobilenet_v2": 4, "shufflenet_v1": 4, "shufflenet_v2": 4,
                    "squeezenet1_0": 4, "squeezenet1_1": 4}


def cifar(name: str) -> nn.Module:
    """`name` with the CIFAR stem and 10 classes, seeded, in eval mode."""
    torch.manual_seed(0)
    return zoo.create(name, stem="cifar", num_classes=10).eval()


def test_stem_models_are_the_expected_families() -> None:
    assert STEM_MODELS == sorted(IMAGENET_DEFAULT)
    for name in STEM_MODELS:
        assert model_args(name)["stem"].default == "imagenet"
        assert model_args(name)["stem"].choices == ("imagenet", "cifar")


@pytest.mark.parametrize("label", sorted(CHENYAOFO))
def test_chenyaofo_params_and_macs(label: str) -> None:
    """Params and MACs at 32 px with 10 classes round to chenyaofo's README table (0.01 M)."""
    name, width, params_m, macs_m = CHENYAOFO[label]
    m = zoo.create(name, width=width, stem="cifar", num_classes=10)
    assert m.spec.input_size == (3, 32, 32)
    assert round(count_params(m) / 1e6, 2) == params_m
    assert round(count_macs(m, (3, 32, 32)) / 1e6, 2) == macs_m
    assert round(zoo.profile(m, flops=False).macs / 1e6, 2) == macs_m


def test_chenyaofo_rows_in_zoo_tables() -> None:
    rows = {r.label: r for r in table_rows("mobilenet_v2") + table_rows("shufflenet_v2")}
    for label, (name, width, params_m, macs_m) in CHENYAOFO.items():
        r = rows[label]
        assert r.ok and "chenyaofo/pytorch-cifar-models" in r.source and r.input_size == (3, 32, 32)
        assert r.kwargs == {"width": width, "stem": "cifar", "num_classes": 10}
        assert (r.paper_params, r.paper_macs) == (round(params_m * 1e6), round(macs_m * 1e6))


@pytest.mark.parametrize("name", STEM_MODELS)
def test_cifar_stem_shapes_and_default_resolution(name: str) -> None:
    m = cifar(name)
    assert m.spec.input_size == (3, 32, 32) and m.spec.kwargs["stem"] == "cifar"
    if "resolution" in model_args(name):
        assert m.spec.kwargs["resolution"] == 32
        assert zoo.create(name, stem="cifar", resolution=64).spec.input_size == (3, 64, 64)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        side = CIFAR_FINAL_SIDE[name]
        assert m.forward_features(x).shape[-2:] == (side, side)
        assert m(x).shape == (2, 10)
        imagenet = zoo.create(name, num_classes=10).eval()
        assert imagenet.forward_features(x).shape[-2:] == (1, 1)
    # the stem changes strides (and SqueezeNet's padding) only: same tensors, same names
    assert {k: v.shape for k, v in m.state_dict().items()} == \
           {k: v.shape for k, v in imagenet.state_dict().items()}


@pytest.mark.parametrize("name", STEM_MODELS)
def test_bad_stem_is_one_clear_error(name: str) -> None:
    with pytest.raises(zoo.ZooError) as e:
        zoo.create(name, stem="foo")
    assert str(e.value) == f"{name}: stem='foo' is not supported; allowed: 'imagenet', 'cifar'"


@pytest.mark.parametrize("name", STEM_MODELS)
def test_imagenet_default_unchanged(name: str) -> None:
    params, macs = IMAGENET_DEFAULT[name]
    card = model_card(name)
    for m in (zoo.create(name), zoo.create(name, stem="imagenet")):
        assert m.spec.kwargs["stem"] == "imagenet" and m.spec.input_size == (3, 224, 224)
        assert count_params(m) == params and count_macs(m, m.spec.input_size) == macs
    assert card.input_size({"stem": "imagenet"}) == (3, 224, 224)


@pytest.mark.parametrize("name", STEM_MODELS)
def test_cifar_stem_prunes_and_quantizes(name: str) -> None:
    m = cifar(name)
    x = torch.randn(4, 3, 32, 32)
    p = zc.prune(m, 0.5, granularity="channel")
    assert count_params(p) < 0.6 * count_params(m)
    assert count_macs(p, (3, 32, 32)) < 0.6 * count_macs(m, (3, 32, 32))
    with torch.no_grad():
        assert p.eval()(x).shape == (4, 10)
        assert p.forward_features(x).shape[-2:] == m.forward_features(x).shape[-2:]
    q = zc.quantize(m, "static", calibration=[torch.randn(8, 3, 32, 32)])
    assert any(type(mod).__module__.startswith("torch.ao.nn.quantized") for mod in q.modules())
    with torch.no_grad():
        out = q(x)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
