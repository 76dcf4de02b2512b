"""Helpers shared by the tests: a toy residual add written inside a custom module (no zoo block), the case
issue 12 found zoo's old pruner silently wrong on; `random_bn` for equivalence tests; `small` (a zoo model at
10 classes and 32 px) and `outputs` (an eval-mode, no-grad forward)."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import zoo


class Residual(nn.Module):
    """relu(x + bn(conv(relu(bn(conv(x)))))), written by hand."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class Toy(nn.Module):
    """Stem (c channels), two custom residual blocks and a pooled linear head (issue 12's toy net has c = 8)."""

    def __init__(self, c: int = 8):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, c, 3, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU())
        self.blocks = nn.Sequential(Residual(c), Residual(c))
        self.fc = nn.Linear(c, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


def random_bn(m: nn.Module, seed: int = 1) -> nn.Module:
    """Seeded non-trivial batch-norm statistics and affine terms, so every layer matters; eval mode."""
    g = torch.Generator().manual_seed(seed)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.copy_(torch.rand(mod.num_features, generator=g) * 0.2 - 0.1)
            mod.running_var.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.weight.data.copy_(torch.rand(mod.num_features, generator=g) + 0.5)
            mod.bias.data.copy_(torch.rand(mod.num_features, generator=g) * 0.2 - 0.1)
    return m.eval()


def small(name: str, **kw) -> nn.Module:
    """`name` with 10 classes at 32x32 (MNIST nets keep their fixed 28x28 one-channel input), eval mode."""
    if "resolution" in zoo.model_args(name) and not zoo.model_card(name).fixed_resolution:
        kw.setdefault("resolution", 32)
    m = zoo.create(name, num_classes=10, **kw).eval()
    if not zoo.model_card(name).fixed_resolution:
        m.spec.input_size = (m.in_chans, 32, 32)
    return m


def outputs(m: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """m(x) in eval mode without autograd."""
    with torch.no_grad():
        return m.eval()(x)


# int8 vs fp32 top-1 agreement on the 359 held-out digits that the quantization tests require. Measured
# disagreements: 0-7 of 359 on the Intel Xeon VM (AVX-512 VNNI) across the families of test_compress_quant,
# 11 on a Zen 4 (issue 26: 0.969). Modelled as Poisson around the worst, the floor allows d + 3 sqrt(d) + 1
# = 22 images. CPUs without VNNI were not measured: emulating them here (ATEN_CPU_CAPABILITY=avx2
# ONEDNN_MAX_CPU_ISA=AVX2) gave up to 64 of 359, but that is not faithful, since torch chooses reduce_range from
# the real CPU's VNNI flag (torch.cpu._is_vnni_supported) and so kept 8-bit activations on 16-bit kernels.
INT8_AGREEMENT_FLOOR = 1 - (11 + 3 * 11 ** 0.5 + 1) / 359
