"""ShuffleNet v2: Ma et al. 2018, "ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture
Design" (ECCV 2018, arXiv:1807.11164). Channel split, concat and shuffle.

`stem="cifar"` (32 px inputs) follows chenyaofo/pytorch-cifar-models: the stem conv has stride 1 and
the stem max-pool is dropped, so the network downsamples 8x and 32 px ends at 4x4. Parameters are
unchanged; the default input side becomes 32. With 10 classes the params and MACs equal that
repository's README table (checked by `zoo tables`).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from zoo._registry import Arg, ModelCard, Reference, register_model
from zoo.layers import ConvNormAct, ShuffleV2Unit, ZooModel, init_weights

# Output channels of (stem, stage2, stage3, stage4, conv5) per width, paper Table 5.
CHANNELS: dict[float, tuple[int, int, int, int, int]] = {
    0.5: (24, 48, 96, 192, 1024),
    1.0: (24, 116, 232, 464, 1024),
    1.5: (24, 176, 352, 704, 1024),
    2.0: (24, 244, 488, 976, 2048),
}
REPEATS = (4, 8, 4)
STEMS = ("imagenet", "cifar")  # cifar: stride-1 stem conv and no stem max-pool


class ShuffleNetV2(ZooModel):
    """ShuffleNet v2: stem + max-pool, three stages of units, 1x1 conv5, global pool, classifier."""

    def __init__(self, *, width: float, num_classes: int, in_chans: int, drop_rate: float, stem: str):
        super().__init__(in_chans, min_input_size=32)
        chs = CHANNELS[width]
        imagenet = stem == "imagenet"
        self.stem = ConvNormAct(in_chans, chs[0], 3, 2 if imagenet else 1)  # (N, 24, H/2, W/2) ImageNet
        self.stem_pool = nn.MaxPool2d(3, 2, 1) if imagenet else nn.Identity()  # (N, 24, H/4, W/4) ImageNet
        stages, prev = [], chs[0]
        for out, n in zip(chs[1:4], REPEATS):
            stages.append(nn.Sequential(*[ShuffleV2Unit(prev if i == 0 else out, out, 2 if i == 0 else 1)
                                          for i in range(n)]))
            prev = out
        self.stages = nn.Sequential(*stages)  # (N, C4, H/32, W/32) ImageNet; (N, C4, H/8, W/8) CIFAR
        self.conv_head = ConvNormAct(prev, chs[4], 1)  # (N, 1024, H/32, W/32) ImageNet
        self.init_head(chs[4], num_classes, drop_rate)
        init_weights(self)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_head(self.stages(self.stem_pool(self.stem(x))))


_SRC = "torchvision params; Ma et al. 2018, Table 5 MACs"
# chenyaofo/pytorch-cifar-models README, CIFAR-10 table: (width, #Params (M), #MAdds (M)) at 32 px with
# stem="cifar". Printed with two decimals, so zoo must agree to half the last digit (5,000).
CIFAR10_TABLE: tuple[tuple[float, float, float], ...] = (
    (0.5, 0.35, 10.90), (1.0, 1.26, 45.00), (1.5, 2.49, 94.26), (2.0, 5.37, 187.81),
)
_CIFAR_SRC = "chenyaofo/pytorch-cifar-models README, CIFAR-10"
CARD = ModelCard(
    name="shufflenet_v2",
    family="shufflenet_v2",
    paper="Ma et al. 2018, ShuffleNet V2: Practical Guidelines for Efficient CNN Architecture Design",
    url="https://arxiv.org/abs/1807.11164",
    args={
        "width": Arg(float, 1.0, choices=(0.5, 1.0, 1.5, 2.0), doc="width multiplier"),
        "drop_rate": Arg(float, 0.0, min=0.0, max=0.99, doc="dropout before the classifier"),
        "stem": Arg(str, "imagenet", choices=STEMS, doc="'cifar': stride-1 stem, no max-pool, for 32 px inputs"),
    },
    references=tuple(
        Reference({"width": w}, _SRC, params=p, macs=m, macs_rtol=0.03, label=f"ShuffleNet v2 {w}x")
        for w, p, m in ((0.5, 1_366_792, 41_000_000), (1.0, 2_278_604, 146_000_000),
                        (1.5, 3_503_624, 299_000_000), (2.0, 7_393_996, 591_000_000))
    ) + tuple(
        Reference({"width": w, "stem": "cifar", "num_classes": 10}, _CIFAR_SRC, params=round(p * 1e6),
                  params_tol=5_000, macs=round(m * 1e6), macs_rtol=5_000 / (m * 1e6),
                  label="shufflenetv2_x" + str(w).replace(".", "_")) for w, p, m in CIFAR10_TABLE
    ),
    resolution_by=(("stem", "cifar", 32),),
    description="Channel split, concat and channel shuffle; equal-width branches.",
)


@register_model(CARD)
def shufflenet_v2(*, width: float, num_classes: int, in_chans: int, drop_rate: float, stem: str) -> ShuffleNetV2:
    """ShuffleNet v2 (Ma et al. 2018) at width 0.5, 1.0, 1.5 or 2.0, with an ImageNet or CIFAR stem."""
    return ShuffleNetV2(width=width, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate, stem=stem)
