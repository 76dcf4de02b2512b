"""MobileNet v1: Howard et al. 2017, "MobileNets: Efficient Convolutional Neural Networks for Mobile
Vision Applications" (arXiv:1704.04861). Width multiplier alpha and resolution multiplier rho.

`stem="cifar"` (32 px inputs) makes the stem conv stride 1 instead of 2, as in the usual CIFAR
MobileNet (e.g. kuangliu/pytorch-cifar): the network downsamples 16x, so 32 px ends at 2x2 instead of
1x1. Parameters are unchanged; the default input side becomes 32.

`padding="same"` pads the strided convs like TensorFlow's SAME (zoo.models._tf_same), as TF-slim /
TFLite MobileNets were trained; `zoo.weights.tflite` imports those files with it and `act="relu6"`.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from zoo._registry import Arg, ModelCard, Reference, register_model
from zoo.layers import DepthwiseSeparable, ZooModel, init_weights, make_divisible
from zoo.models._tf_same import PADDINGS, conv_norm_act

# (out_channels, stride) of the 13 depthwise-separable blocks, paper Table 1.
CFG: tuple[tuple[int, int], ...] = (
    (64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
    (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2), (1024, 1),
)
# Stride of the 3x3 stem conv per `stem`: the paper's 2, or 1 for 32 px CIFAR inputs.
STEM_STRIDE: dict[str, int] = {"imagenet": 2, "cifar": 1}


class MobileNetV1(ZooModel):
    """MobileNet v1 with a width multiplier applied to every layer, stem and last layer included."""

    def __init__(self, *, width: float, num_classes: int, in_chans: int, drop_rate: float, act: str, stem: str,
                 padding: str):
        super().__init__(in_chans, min_input_size=32)
        ch = lambda c: make_divisible(c * width, 8)  # noqa: E731
        # (N, 32a, H/2, W/2) ImageNet
        self.stem = conv_norm_act(in_chans, ch(32), 3, STEM_STRIDE[stem], act=act, padding=padding)
        blocks, prev = [], ch(32)
        for c, s in CFG:
            block = DepthwiseSeparable(prev, ch(c), s, act=act)
            if padding == "same" and s > 1:  # only strided convs pad differently from PyTorch
                block.dw = conv_norm_act(prev, prev, 3, s, groups=prev, act=act, padding=padding)
            blocks.append(block)
            prev = ch(c)
        self.blocks = nn.Sequential(*blocks)  # (N, 1024a, H/32, W/32) ImageNet; (N, 1024a, H/16, W/16) CIFAR
        self.init_head(prev, num_classes, drop_rate)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.stem(x))


_PAPER = "Howard et al. 2017, MobileNets: Efficient Convolutional Neural Networks for Mobile Vision Applications"
_T6, _T7 = "Howard et al. 2017, Table 6", "Howard et al. 2017, Table 7"
# The configurations of the TFLite files that zoo.weights.tflite imports (act relu6, TF SAME padding): params
# from Table 6 (they do not depend on the resolution), MACs from tensorflow/models research/slim/nets/
# mobilenet_v1.md ("Million MACs", whole numbers). That table's 0.75 MACs (317M at 224, 233M at 192) are 2.5%
# below the paper's own 325M at 224, which zoo matches, so the 0.75-192 row checks params only; its MACs
# (239.3M) equal those counted from the TFLite graph's conv shapes (benchmarks/tflite_import.md).
SLIM_TABLE: tuple[tuple[float, int, int, int | None], ...] = (
    (0.25, 128, 500_000, 14_000_000), (0.5, 160, 1_300_000, 77_000_000), (0.75, 192, 2_600_000, None),
)
_SLIM = "Howard et al. 2017, Table 6 params; TF-slim mobilenet_v1.md MACs"
_TFLITE = {"act": "relu6", "padding": "same"}

CARD = ModelCard(
    name="mobilenet_v1",
    family="mobilenet_v1",
    paper=_PAPER,
    url="https://arxiv.org/abs/1704.04861",
    args={
        "width": Arg(float, 1.0, min=0.0, max=4.0, min_exclusive=True, doc="width multiplier alpha"),
        "resolution": Arg(int, 224, min=32, max=1024, doc="default input side (resolution multiplier)"),
        "drop_rate": Arg(float, 0.0, min=0.0, max=0.99, doc="dropout before the classifier"),
        "act": Arg(str, "relu", choices=("relu", "relu6"), doc="activation: the paper's ReLU, or timm's ReLU6"),
        "stem": Arg(str, "imagenet", choices=tuple(STEM_STRIDE), doc="'cifar': stride-1 stem for 32 px inputs"),
        "padding": Arg(str, "symmetric", choices=PADDINGS, doc="'same': TensorFlow SAME padding (TF-slim weights)"),
    },
    references=(
        Reference({"width": 1.0}, _T6, params=4_200_000, params_tol=50_000, macs=569_000_000, label="1.0 MobileNet-224"),
        Reference({"width": 0.75}, _T6, params=2_600_000, params_tol=50_000, macs=325_000_000, label="0.75 MobileNet-224"),
        Reference({"width": 0.5}, _T6, params=1_300_000, params_tol=50_000, macs=149_000_000, label="0.5 MobileNet-224"),
        Reference({"width": 0.25}, _T6, params=500_000, params_tol=50_000, macs=41_000_000, label="0.25 MobileNet-224"),
        Reference({"resolution": 192}, _T7, params=4_200_000, params_tol=50_000, macs=418_000_000, label="1.0 MobileNet-192"),
        Reference({"resolution": 160}, _T7, params=4_200_000, params_tol=50_000, macs=290_000_000, label="1.0 MobileNet-160"),
        Reference({"resolution": 128}, _T7, params=4_200_000, params_tol=50_000, macs=186_000_000, label="1.0 MobileNet-128"),
        *(Reference({"width": w, "resolution": r, **_TFLITE}, _SLIM, params=p, params_tol=50_000, macs=m,
                    macs_rtol=0.5e6 / m if m else 0.01, label=f"{w} MobileNet-{r} (TFLite import)")
          for w, r, p, m in SLIM_TABLE),
    ),
    resolution_by=(("stem", "cifar", 32),),
    description="Depthwise-separable convolutions; width and resolution multipliers.",
)


@register_model(CARD)
def mobilenet_v1(*, width: float, resolution: int, num_classes: int, in_chans: int, drop_rate: float, act: str,
                 stem: str, padding: str) -> MobileNetV1:
    """MobileNet v1 (Howard et al. 2017); `resolution` sets the default input size, `stem` the stem stride."""
    return MobileNetV1(width=width, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, act=act,
                       stem=stem, padding=padding)
