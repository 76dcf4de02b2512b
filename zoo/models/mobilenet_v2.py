"""MobileNet v2: Sandler et al. 2018, "MobileNetV2: Inverted Residuals and Linear Bottlenecks"
(CVPR 2018, arXiv:1801.04381). Width multiplier with channels rounded to multiples of 8
(so that torchvision issue #973 does not recur) and a resolution multiplier.

`stem="cifar"` (32 px inputs) follows chenyaofo/pytorch-cifar-models: the stem conv and the first
block of the 24-channel stage get stride 1 instead of 2, so the network downsamples 8x and 32 px
ends at 4x4. Parameters are unchanged; the default input side becomes 32. With 10 classes the
params and MACs equal that repository's README table (checked by `zoo tables`).

`padding="same"` pads the strided convs like TensorFlow's SAME (zoo.models._tf_same), as TF-slim /
TFLite MobileNets were trained; `zoo.weights.tflite` imports those files with it.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from zoo._registry import Arg, ModelCard, Reference, register_model
from zoo.layers import ConvNormAct, InvertedResidual, ZooModel, init_weights, make_divisible
from zoo.models._tf_same import PADDINGS, conv_norm_act

# (expansion t, out channels c, repeats n, first stride s), paper Table 2.
CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1),
)
# Per `stem`: (stem conv stride, block table). CIFAR as chenyaofo/pytorch-cifar-models: stem stride 1 and
# stride 1 on the first block of the 24-channel stage, so the network downsamples 8x instead of 32x.
STEMS: dict[str, tuple[int, tuple[tuple[int, int, int, int], ...]]] = {
    "imagenet": (2, CFG),
    "cifar": (1, tuple((t, c, n, 1 if c == 24 else s) for t, c, n, s in CFG)),
}


class MobileNetV2(ZooModel):
    """MobileNet v2: stem, 17 inverted residual blocks, 1x1 conv to 1280 (scaled up only for width > 1)."""

    def __init__(self, *, width: float, num_classes: int, in_chans: int, drop_rate: float, stem: str, padding: str):
        super().__init__(in_chans, min_input_size=32)
        stem_stride, cfg = STEMS[stem]
        prev = make_divisible(32 * width, 8)
        # (N, 32, H/2, W/2) ImageNet
        self.stem = conv_norm_act(in_chans, prev, 3, stem_stride, act="relu6", padding=padding)
        blocks = []
        for t, c, n, s in cfg:
            out = make_divisible(c * width, 8)
            for i in range(n):
                block = InvertedResidual(prev, out, s if i == 0 else 1, t)
                if padding == "same" and i == 0 and s > 1:  # only strided convs pad differently from PyTorch
                    hidden = block.dw.conv.in_channels
                    block.dw = conv_norm_act(hidden, hidden, 3, s, groups=hidden, act="relu6", padding=padding)
                blocks.append(block)
                prev = out
        self.blocks = nn.Sequential(*blocks)  # (N, 320, H/32, W/32) ImageNet; (N, 320, H/8, W/8) CIFAR
        last = make_divisible(1280 * max(1.0, width), 8)
        self.conv_head = ConvNormAct(prev, last, 1, act="relu6")  # (N, 1280, H/32, W/32) ImageNet
        self.init_head(last, num_classes, drop_rate)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.blocks(self.stem(x)))


# chenyaofo/pytorch-cifar-models README, CIFAR-10 table: (width, #Params (M), #MAdds (M)) at 32 px with
# stem="cifar". Printed with two decimals, so zoo must agree to half the last digit (5,000).
CIFAR10_TABLE: tuple[tuple[float, float, float], ...] = (
    (0.5, 0.70, 27.97), (0.75, 1.37, 59.31), (1.0, 2.24, 87.98), (1.4, 4.33, 170.07),
)
_CIFAR_SRC = "chenyaofo/pytorch-cifar-models README, CIFAR-10"

CARD = ModelCard(
    name="mobilenet_v2",
    family="mobilenet_v2",
    paper="Sandler et al. 2018, MobileNetV2: Inverted Residuals and Linear Bottlenecks",
    url="https://arxiv.org/abs/1801.04381",
    args={
        "width": Arg(float, 1.0, min=0.0, max=4.0, min_exclusive=True, doc="width multiplier"),
        "resolution": Arg(int, 224, min=32, max=1024, doc="default input side (resolution multiplier)"),
        "drop_rate": Arg(float, 0.2, min=0.0, max=0.99, doc="dropout before the classifier"),
        "stem": Arg(str, "imagenet", choices=tuple(STEMS), doc="'cifar': 8x downsampling for 32 px inputs"),
        "padding": Arg(str, "symmetric", choices=PADDINGS, doc="'same': TensorFlow SAME padding (TF-slim weights)"),
    },
    references=(
        Reference({"width": 1.0}, "torchvision params; Sandler et al. 2018, Table 3 MACs", params=3_504_872,
                  macs=300_000_000, label="MobileNetV2 1.0-224"),
        *(Reference({"width": w, "stem": "cifar", "num_classes": 10}, _CIFAR_SRC, params=round(p * 1e6),
                    params_tol=5_000, macs=round(m * 1e6), macs_rtol=5_000 / (m * 1e6),
                    label="mobilenetv2_x" + str(w).replace(".", "_")) for w, p, m in CIFAR10_TABLE),
    ),
    resolution_by=(("stem", "cifar", 32),),
    description="Inverted residuals with linear bottlenecks; ReLU6.",
)


@register_model(CARD)
def mobilenet_v2(*, width: float, resolution: int, num_classes: int, in_chans: int, drop_rate: float, stem: str,
                 padding: str) -> MobileNetV2:
    """MobileNet v2 (Sandler et al. 2018); `resolution` sets the default input size, `stem` the early strides."""
    return MobileNetV2(width=width, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, stem=stem,
                       padding=padding)
