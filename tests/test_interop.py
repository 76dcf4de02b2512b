"""Interop: torchvision / timm reference models (random init, no download) converted to zoo models."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torchvision

import zoo
from zoo.interop import TIMM, TORCHVISION
from zoo.weights import from_timm, from_torchvision

TV_NAMES = ["resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "mobilenet_v2", "squeezenet1_0",
            "squeezenet1_1", "shufflenet_v2_x0_5", "shufflenet_v2_x1_0", "shufflenet_v2_x1_5", "shufflenet_v2_x2_0"]


def _randomize(m: nn.Module) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics, so that every buffer's mapping matters."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5, generator=g)
                mod.bias.normal_(0, 0.1, generator=g)
                mod.running_mean.normal_(0, 0.1, generator=g)
                mod.running_var.uniform_(0.5, 1.5, generator=g)
    return m.eval()


def _diff(a: nn.Module, b: nn.Module, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


def test_table_covers_the_brief():
    assert sorted(TORCHVISION) == sorted(TV_NAMES)
    assert "mobilenetv1_100" in TIMM
    for zoo_name, _ in list(TORCHVISION.values()) + list(TIMM.values()):
        assert zoo_name in zoo.list_models()


@pytest.mark.parametrize("tv_name", TV_NAMES)
def test_torchvision_outputs_match(tv_name: str):
    ref = _randomize(getattr(torchvision.models, tv_name)(num_classes=7))
    z = from_torchvision(ref)
    zoo_name, zoo_kwargs = TORCHVISION[tv_name]
    assert z.spec.name == zoo_name and z.spec.kwargs["num_classes"] == 7
    assert all(z.spec.kwargs[k] == v for k, v in zoo_kwargs.items())
    x = torch.randn(1, 3, 32, 32)
    assert _diff(ref, z, x) <= 1e-5
    assert z.spec.provenance == {"source": f"torchvision {tv_name}"}


@pytest.mark.parametrize("tv_name", ["resnet18", "shufflenet_v2_x1_5", "squeezenet1_1"])
def test_torchvision_state_dict_is_recognised(tv_name: str):
    """A bare state dict: the architecture (and width) is found from the tensor shapes alone."""
    ref = _randomize(getattr(torchvision.models, tv_name)(num_classes=5))
    z = from_torchvision(ref.state_dict())
    assert (z.spec.name, z.spec.kwargs.get("width")) == (TORCHVISION[tv_name][0],
                                                       TORCHVISION[tv_name][1].get("width"))
    assert _diff(ref, z, torch.randn(1, 3, 32, 32)) <= 1e-5


def test_timm_mobilenetv1_maps_exactly_with_relu6():
    timm = pytest.importorskip("timm")
    ref = _randomize(timm.create_model("mobilenetv1_100", pretrained=False, num_classes=6))
    z = from_timm(ref)
    assert z.spec.name == "mobilenet_v1" and z.spec.kwargs["act"] == "relu6" and z.spec.kwargs["num_classes"] == 6
    ref_t, zoo_t = list(ref.state_dict().values()), list(z.state_dict().values())
    assert len(ref_t) == len(zoo_t) == 164 and all(torch.equal(a, b) for a, b in zip(ref_t, zoo_t))
    big = 40 * torch.randn(1, 3, 32, 32)  # large activations, where ReLU and ReLU6 would disagree
    with torch.no_grad():
        scale = float(ref(big).abs().max())
    assert _diff(ref, z, big) <= 1e-5 * max(1.0, scale)
    assert _diff(ref, z, torch.randn(1, 3, 32, 32)) <= 1e-5


def test_activation_mismatch_is_reported():
    timm = pytest.importorskip("timm")
    ref = _randomize(timm.create_model("mobilenetv1_100", pretrained=False, num_classes=6))
    for name, mod in list(ref.named_modules()):  # make timm's model use plain ReLU: zoo (ReLU6) must refuse
        if isinstance(mod, nn.ReLU6):
            parent, _, attr = name.rpartition(".")
            setattr(ref.get_submodule(parent), attr, nn.ReLU(inplace=True))
    with pytest.raises(zoo.ZooError, match=r"activations differ"):
        from_timm(ref)
    assert from_timm(ref, check=False).spec.kwargs["act"] == "relu6"


@pytest.mark.parametrize("arch", ["mobilenetv2_100", "resnet18"])
def test_timm_outputs_match(arch: str):
    timm = pytest.importorskip("timm")
    ref = _randomize(timm.create_model(arch, pretrained=False, num_classes=4))
    z = from_timm(ref)
    assert z.spec.name == TIMM[arch][0]
    assert _diff(ref, z, torch.randn(1, 3, 32, 32)) <= 1e-5
    assert _diff(ref, from_timm(ref.state_dict(), name=arch), torch.randn(1, 3, 32, 32)) <= 1e-5


def test_structural_difference_is_named():
    ref = torchvision.models.resnet18(num_classes=3)
    ref.layer2[0].conv1.stride = (1, 1)  # same tensors, different network
    with pytest.raises(zoo.ZooError, match=r"torchvision resnet18 layer2\.0\.conv1 Conv2d\(stride=\(1, 1\)\) vs zoo "
                                           r"stages\.1\.0\.conv1\.conv Conv2d\(stride=\(2, 2\)\)"):
        from_torchvision(ref)


def test_output_check_catches_what_tensors_cannot():
    ref = torchvision.models.resnet18(num_classes=3)
    ref.maxpool = nn.AvgPool2d(3, 2, 1)  # no tensors, same activations: only the outputs can tell
    with pytest.raises(zoo.ZooError, match="does not reproduce torchvision resnet18: max |difference|"):
        from_torchvision(ref)
    assert from_torchvision(ref, check=False).spec.name == "resnet18"


def test_bad_inputs():
    with pytest.raises(zoo.ZooError, match="torchvision Sequential is not supported"):
        from_torchvision(nn.Sequential(nn.Conv2d(3, 8, 3)))
    with pytest.raises(zoo.ZooError, match="expected an nn.Module or a non-empty state dict"):
        from_torchvision(42)
    with pytest.raises(zoo.ZooError, match="name='vgg16' is not supported"):
        from_torchvision({"w": torch.zeros(1)}, name="vgg16")
    with pytest.raises(zoo.ZooError, match="the tensors do not match torchvision"):
        from_torchvision({"conv1.weight": torch.zeros(64, 3, 7, 7)})
    with pytest.raises(zoo.ZooError, match="the tensors do not match timm mobilenetv1_100"):
        from_timm({"conv1.weight": torch.zeros(64, 3, 7, 7)}, name="mobilenetv1_100")
