"""MobileNet v2: Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks"
(CVPR 2018, arXiv:1801.04381). Width multiplier with channels rounded to multiples of 8
(so that torchvision issue #973 does not recur) and a resolution multiplier.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from zoo._registry import Arg, ModelCard, Reference, register_model
from zoo.layers import ConvNormAct, InvertedResidual, ZooModel, init_weights, make_divisible

# (expansion t, out channels c, repeats n, first stride s), paper Table 2.
CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)


class MobileNetV2(ZooModel):
    """MobileNet v2: stem, 17 inverted residual blocks, 1x1 conv to 1280 (scaled up only for width > 1)."""

    def __init__(self, width: float = 1.0, num_classes: int = 1000, in_chans: int = 3, drop_rate: float = 0.2):
        super().__init__(in_chans, min_input_size=32)
        prev = make_divisible(32 * width, 8)
        self.stem = ConvNormAct(in_chans, prev, 3, 2, act="relu6")  # (N, 32, H/2, W/2)
        blocks = []
        for t, c, n, s in CFG:
            out = make_divisible(c * width, 8)
            for i in range(n):
                blocks.append(InvertedResidual(prev, out, s if i == 0 else 1, t))
                prev = out
        self.blocks = nn.Sequential(*blocks)  # (N, 320, H/32, W/32)
        last = make_divisible(1280 * max(1.0, width), 8)
        self.conv_head = ConvNormAct(prev, last, 1, act="relu6")  # (N, 1280, H/32, W/32)
        self.init_head(last, num_classes, drop_rate)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.blocks(self.stem(x)))


CARD = ModelCard(
    name="mobilenet_v2",
    family="mobilenet_v2",
    paper="Sandler et al. 2018, MobileNetV2: Inverted Residuals and Linear Bottlenecks",
    url="https://arxiv.org/abs/1801.04381",
    args={
        "width": Arg(float, 1.0, min=0.0, max=4.0, min_exclusive=True, doc="width multiplier"),
        "resolution": Arg(int, 224, min=32, max=1024, doc="default input side (resolution multiplier)"),
        "drop_rate": Arg(float, 0.2, min=0.0, max=0.99, doc="dropout before the classifier"),
    },
    references=(
        Reference({"width": 1.0}, "torchvision params; Sandler et al. 2018, Table 3 MACs", params=3_504_872,
                  macs=300_000_000, label="MobileNetV2 1.0-224"),
    ),
    description="Inverted residuals with linear bottlenecks; ReLU6.",
)


@register_model(CARD)
def mobilenet_v2(width: float = 1.0, resolution: int = 224, num_classes: int = 1000, in_chans: int = 3,
                 drop_rate: float = 0.2) -> MobileNetV2:
    """MobileNet v2 (Sandler et al. 2018); `resolution` sets the default input size."""
    return MobileNetV2(width=width, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
