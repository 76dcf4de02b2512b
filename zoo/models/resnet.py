"""ResNet: He et al. 2016, "Deep Residual Learning for Image Recognition" (CVPR 2016, arXiv:1512.03385).

ImageNet ResNets (18/34 with basic blocks, 50/101/152 with bottlenecks, stride on the 3x3 conv as in
torchvision, 1x1 projection shortcuts) and the CIFAR ResNets of section 4.2 (6n+2 layers, 16/32/64
channels), which serve as distillation teachers. The CIFAR ones use the paper's option-A shortcuts by
default (identity; where the shape changes, stride-2 subsampling plus zero-padded new channels, no
parameters: Table 6's 0.27/0.46/0.66/0.85 M); `shortcut="B"` gives 1x1 projections instead.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from zoo._registry import Arg, ModelCard, Reference, register_model
from zoo.layers import SHORTCUTS, BasicBlock, Bottleneck, ConvNormAct, ZooModel, init_weights


class ResNet(ZooModel):
    """ResNet with an ImageNet stem (7x7/2 conv + 3x3/2 max-pool) or a CIFAR stem (3x3/1 conv)."""

    def __init__(self, block: type[BasicBlock] | type[Bottleneck], layers: tuple[int, ...],
                 widths: tuple[int, ...] = (64, 128, 256, 512), stem: str = "imagenet", *,
                 num_classes: int, in_chans: int, drop_rate: float, shortcut: str = "B"):
        super().__init__(in_chans, min_input_size=32 if stem == "imagenet" else 8)
        if shortcut != "B" and block is not BasicBlock:
            raise ValueError(f"shortcut={shortcut!r}: option-A shortcuts exist for basic blocks only")
        extra = {"shortcut": shortcut} if block is BasicBlock else {}
        if stem == "imagenet":
            self.stem = ConvNormAct(in_chans, widths[0], 7, 2)  # (N, 64, H/2, W/2)
            self.stem_pool = nn.MaxPool2d(3, 2, 1)  # (N, 64, H/4, W/4)
        else:
            self.stem = ConvNormAct(in_chans, widths[0], 3, 1)  # (N, 16, H, W)
            self.stem_pool = nn.Identity()
        stages, prev = [], widths[0]
        for i, (n, planes) in enumerate(zip(layers, widths)):
            blocks = []
            for j in range(n):
                blocks.append(block(prev, planes, stride=2 if (i > 0 and j == 0) else 1, **extra))
                prev = planes * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)  # (N, C_last, H/32, W/32) ImageNet; (N, 64, H/4, W/4) CIFAR
        self.init_head(prev, num_classes, drop_rate)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem_pool(self.stem(x)))


_PAPER = "He et al. 2016, Deep Residual Learning for Image Recognition"
_URL = "https://arxiv.org/abs/1512.03385"
_ARGS = {"drop_rate": Arg(float, 0.0, min=0.0, max=0.99, doc="dropout before the classifier")}
_TV = "torchvision parameter count and published GFLOPS (MACs)"

_IMAGENET = {
    # name: (block, layers, torchvision params, reference MACs or None)
    "resnet18": (BasicBlock, (2, 2, 2, 2), 11_689_512, 1_810_000_000),
    "resnet34": (BasicBlock, (3, 4, 6, 3), 21_797_672, 3_660_000_000),
    "resnet50": (Bottleneck, (3, 4, 6, 3), 25_557_032, 4_090_000_000),
    "resnet101": (Bottleneck, (3, 4, 23, 3), 44_549_160, 7_800_000_000),
    "resnet152": (Bottleneck, (3, 8, 36, 3), 60_192_808, 11_510_000_000),
}

# name: (n blocks per stage, He et al. 2016 Table 6 params (option A), reference MACs at 32 px)
_CIFAR = {
    "resnet20": (3, 270_000, 40_810_000),
    "resnet32": (5, 460_000, 69_120_000),
    "resnet44": (7, 660_000, 97_440_000),
    "resnet56": (9, 850_000, 125_750_000),
}
# chenyaofo's networks use 1x1 projections (= shortcut "B", which matches their MACs exactly); option A
# has no shortcut MACs, 0.26 M fewer (0.2-0.6 %).
_CIFAR_SOURCE = "He et al. 2016, Table 6 params (option A); MACs: chenyaofo/pytorch-cifar-models (1x1 proj., +0.26 M)"
_SHORTCUT = Arg(str, "A", choices=SHORTCUTS,
                doc="A: identity / zero-padding shortcuts, no parameters (the paper); B: 1x1 projections")


def _register_imagenet(name: str, block, layers, params: int, macs: int | None) -> None:
    card = ModelCard(
        name=name, family="resnet", paper=_PAPER, url=_URL, args=_ARGS,
        references=(Reference({}, _TV, params=params, macs=macs, macs_rtol=0.01, label=name),),
        description=f"ImageNet ResNet, {'basic' if block is BasicBlock else 'bottleneck'} blocks {layers}.",
    )

    @register_model(card)
    def entry(*, num_classes: int, in_chans: int, drop_rate: float) -> ResNet:
        return ResNet(block, layers, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"{name} (He et al. 2016), ImageNet stem."
    globals()[name] = entry


def _register_cifar(name: str, n: int, params: int, macs: int) -> None:
    card = ModelCard(
        name=name, family="resnet_cifar", paper=_PAPER, url=_URL,
        args={**_ARGS, "num_classes": Arg(int, 10, min=1, doc="number of output classes"), "shortcut": _SHORTCUT},
        references=(Reference({}, _CIFAR_SOURCE, params=params, params_tol=5_000, macs=macs, macs_rtol=0.01,
                              label=name),),
        default_resolution=32, min_resolution=8,
        description=f"CIFAR ResNet-{6 * n + 2}: 3 stages of {n} basic blocks, 16/32/64 channels, option-A "
                    f"(zero-padding) shortcuts unless shortcut='B'.",
    )

    @register_model(card)
    def entry(*, num_classes: int, in_chans: int, drop_rate: float, shortcut: str) -> ResNet:
        return ResNet(BasicBlock, (n, n, n), widths=(16, 32, 64), stem="cifar", num_classes=num_classes,
                      in_chans=in_chans, drop_rate=drop_rate, shortcut=shortcut)

    entry.__name__ = entry.__qualname__ = name
    entry.__doc__ = f"{name} (He et al. 2016, section 4.2), CIFAR stem, 32 px input."
    globals()[name] = entry


for _name, (_block, _layers, _params, _macs) in _IMAGENET.items():
    _register_imagenet(_name, _block, _layers, _params, _macs)
for _name, (_n, _params, _macs) in _CIFAR.items():
    _register_cifar(_name, _n, _params, _macs)
