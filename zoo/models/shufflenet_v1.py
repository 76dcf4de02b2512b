"""ShuffleNet v1: Zhang et al. 2017, "ShuffleNet: An Extremely Efficient Convolutional Neural Network for
Mobile Devices" (CVPR 2018, arXiv:1707.01083). Pointwise group convolutions with channel shuffle.

Below width 1.0 the stem has 12 channels (8 for g = 8, which must divide it), as in the authors' released
0.5x models (megvii-model/ShuffleNet-Series: 12 for g = 3, 16 for g = 8); this reproduces Table 2's
38 MFLOPs (0.5x) and 13 MFLOPs (0.25x) within 5% for every g. `stem_channels=24` keeps the 24-channel
stem of every width (zoo before issue 12, used by recipes/digits_compress.yaml).

`stem="cifar"` (32 px inputs; no published table) makes the stem conv stride 1 and drops the stem
max-pool, as ShuffleNet v2's CIFAR stem in chenyaofo/pytorch-cifar-models and the usual CIFAR
ShuffleNet (e.g. kuangliu/pytorch-cifar): the network downsamples 8x, so 32 px ends at 4x4 instead
of 1x1. Parameters are unchanged; the default input side becomes 32.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from zoo._registry import Arg, ModelCard, Reference, register_model
from zoo.errors import ZooError
from zoo.layers import ConvNormAct, ShuffleV1Unit, ZooModel, init_weights, make_divisible

# Output channels of stages 2-4 at width 1.0 for each group count, paper Table 1.
STAGE_CHANNELS: dict[int, tuple[int, int, int]] = {
    1: (144, 288, 576), 2: (200, 400, 800), 3: (240, 480, 960), 4: (272, 544, 1088), 8: (384, 768, 1536),
}
REPEATS = (4, 8, 4)
STEM = 24  # stem channels at width >= 1.0
SMALL_STEM = 12  # below width 1.0 (rounded down to a multiple of g)
STEMS = ("imagenet", "cifar")  # cifar: stride-1 stem conv and no stem max-pool


class ShuffleNetV1(ZooModel):
    """ShuffleNet v1 (g groups, width s): stem 3x3/2 + max-pool, three stages of ShuffleNet units.

    Stage channels are scaled by `width` and rounded to multiples of 4*g, so that the bottleneck
    (a quarter of the output) and every branch (out - in on stride-2 units) divide by g. At width 1.0
    this reproduces Table 1 exactly. The stem has 24 channels at width >= 1 and 12 (8 for g = 8) below,
    unless `stem_channels` (a multiple of g) fixes it.
    """

    def __init__(self, *, groups: int, width: float, num_classes: int, in_chans: int, drop_rate: float, stem: str,
                 stem_channels: int):
        super().__init__(in_chans, min_input_size=32)
        imagenet = stem == "imagenet"
        chs = stem_channels or stem_width(width, groups)
        if chs % groups:
            raise ZooError(f"shufflenet_v1: stem_channels={stem_channels} is not allowed; expected 0 (by width) "
                           f"or a multiple of groups={groups}")
        self.stem = ConvNormAct(in_chans, chs, 3, 2 if imagenet else 1)  # (N, chs, H/2, W/2) ImageNet
        self.stem_pool = nn.MaxPool2d(3, 2, 1) if imagenet else nn.Identity()  # (N, chs, H/4, W/4) ImageNet
        stages, prev = [], chs
        for si, (c, n) in enumerate(zip(STAGE_CHANNELS[groups], REPEATS)):
            out = make_divisible(c * width, 4 * groups)
            units = []
            for i in range(n):
                # Paper 3.3: no group conv on the first pointwise layer of stage 2 (few input channels).
                first_groups = 1 if (si == 0 and i == 0) else groups
                units.append(ShuffleV1Unit(prev, out, out // 4, groups, 2 if i == 0 else 1, first_groups))
                prev = out
            stages.append(nn.Sequential(*units))
        self.stages = nn.Sequential(*stages)  # (N, C4, H/32, W/32) ImageNet; (N, C4, H/8, W/8) CIFAR
        self.init_head(prev, num_classes, drop_rate)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem_pool(self.stem(x)))


def stem_width(width: float, groups: int) -> int:
    """Stem channels of ShuffleNet s x: 24 for s >= 1, else 12 rounded down to a multiple of g."""
    return STEM if width >= 1.0 else SMALL_STEM // groups * groups


_SRC = "Zhang et al. 2017, Table 2 (ShuffleNet 1x)"
# Paper complexity (MFLOPs, i.e. mult-adds) of ShuffleNet 1x for g = 1, 2, 3, 4, 8 is about 140 M.
CARD = ModelCard(
    name="shufflenet_v1",
    family="shufflenet_v1",
    paper="Zhang et al. 2017, ShuffleNet: An Extremely Efficient Convolutional Neural Network for Mobile Devices",
    url="https://arxiv.org/abs/1707.01083",
    args={
        "groups": Arg(int, 3, choices=(1, 2, 3, 4, 8), doc="groups of the pointwise convolutions"),
        "width": Arg(float, 1.0, choices=(0.25, 0.5, 1.0, 1.5, 2.0), doc="width multiplier s"),
        "drop_rate": Arg(float, 0.0, min=0.0, max=0.99, doc="dropout before the classifier"),
        "stem": Arg(str, "imagenet", choices=STEMS, doc="'cifar': stride-1 stem, no max-pool, for 32 px inputs"),
        "stem_channels": Arg(int, 0, min=0, max=96,
                             doc="stem width; 0: 24 at width >= 1, else 12 (8 for g=8), as Table 2"),
    },
    references=tuple(
        Reference({"groups": g}, _SRC, macs=140_000_000, macs_rtol=0.05, label=f"ShuffleNet 1x (g={g})")
        for g in (1, 2, 3, 4, 8)
    ) + tuple(
        Reference({"groups": g, "width": w}, f"Zhang et al. 2017, Table 2 (ShuffleNet {w:g}x)", macs=macs,
                  macs_rtol=0.05, label=f"ShuffleNet {w:g}x (g={g})")
        for w, macs in ((0.5, 38_000_000), (0.25, 13_000_000)) for g in (1, 2, 3, 4, 8)
    ),
    resolution_by=(("stem", "cifar", 32),),
    description="Pointwise group convolutions and channel shuffle.",
)


@register_model(CARD)
def shufflenet_v1(*, groups: int, width: float, num_classes: int, in_chans: int, drop_rate: float, stem: str,
                  stem_channels: int) -> ShuffleNetV1:
    """ShuffleNet v1 (Zhang et al. 2017) with `groups` in {1,2,3,4,8}, width in {0.25,...,2.0} and a stem."""
    return ShuffleNetV1(groups=groups, width=width, num_classes=num_classes, in_chans=in_chans,
                        drop_rate=drop_rate, stem=stem, stem_channels=stem_channels)
