"""SqueezeNet: Iandola et al. 2016, "SqueezeNet: AlexNet-level accuracy with 50x fewer parameters and
<0.5MB model size" (arXiv:1602.07360). Versions 1.0 and 1.1, with the paper's simple and complex
bypass variants (section 6).

`stem="cifar"` (32 px inputs; no published table) gives the stem conv stride 1 and "same" padding
(kernel unchanged: 7x7 for 1.0, 3x3 for 1.1) and keeps the three 3x3/2 max-pools, as the usual CIFAR
SqueezeNet (e.g. weiaicunzai/pytorch-cifar100): the network downsamples 8x, so 32 px ends at 4x4
instead of 1x1. Parameters are unchanged; the default input side becomes 32.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from zoo._registry import Arg, ModelCard, Reference, register_model
from zoo.layers import ConvNormAct, Fire, ZooModel

# Fire modules fire2..fire9: (squeeze, expand1x1, expand3x3). Same for 1.0 and 1.1.
FIRES: tuple[tuple[int, int, int], ...] = (
    (16, 64, 64), (16, 64, 64), (32, 128, 128), (32, 128, 128),
    (48, 192, 192), (48, 192, 192), (64, 256, 256), (64, 256, 256),
)
# Where the 3x3/2 max-pools sit: after the stem and after these fire indices (0 = fire2).
POOL_AFTER = {"1_0": (2, 6), "1_1": (1, 3)}
# Stem conv (stride, padding) per `stem`: the paper's unpadded stride 2, or stride 1 with "same" padding.
STEM_CONV: dict[str, tuple[int, int | None]] = {"imagenet": (2, 0), "cifar": (1, None)}


class SqueezeNet(ZooModel):
    """SqueezeNet 1.0/1.1 with a conv classifier (dropout, 1x1 conv, ReLU, global average pool)."""

    def __init__(self, version: str, *, bypass: str, num_classes: int, in_chans: int, drop_rate: float, stem: str):
        super().__init__(in_chans, min_input_size=32)
        stride, pad = STEM_CONV[stem]
        # ImageNet: (N, C, (H-k)/2+1, .); CIFAR: (N, C, H, W)
        if version == "1_0":
            self.stem = ConvNormAct(in_chans, 96, 7, stride, norm=False, padding=pad)  # C = 96, k = 7
            prev = 96
        else:
            self.stem = ConvNormAct(in_chans, 64, 3, stride, norm=False, padding=pad)  # C = 64, k = 3
            prev = 64
        layers: list[nn.Module] = [nn.MaxPool2d(3, 2, ceil_mode=True)]
        for i, (s, e1, e3) in enumerate(FIRES):
            out = e1 + e3
            # Paper section 6: simple bypass around fire3, 5, 7, 9 (odd positions here, where in == out);
            # complex bypass adds 1x1-conv bypasses around the remaining fires.
            mode = "none"
            if bypass != "none":
                mode = "simple" if prev == out else ("complex" if bypass == "complex" else "none")
            layers.append(Fire(prev, s, e1, e3, bypass=mode))
            prev = out
            if i in POOL_AFTER[version]:
                layers.append(nn.MaxPool2d(3, 2, ceil_mode=True))
        self.features = nn.Sequential(*layers)  # (N, 512, ~H/16, ~W/16) ImageNet; (N, 512, H/8, W/8) CIFAR
        self.num_features = prev
        self.head_drop = nn.Dropout(drop_rate)
        self.classifier = nn.Conv2d(prev, num_classes, 1)  # (N, classes, h, w)
        self.head_act = nn.ReLU(inplace=True)
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                if m is self.classifier:
                    nn.init.normal_(m.weight, 0.0, 0.01)
                else:
                    nn.init.kaiming_uniform_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Conv classifier then global pool; `pre_logits=True` returns globally pooled features."""
        if pre_logits:
            return self.global_pool(x).flatten(1)
        x = self.head_act(self.classifier(self.head_drop(x)))
        return self.global_pool(x).flatten(1)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the 1x1 conv classifier for `num_classes` outputs."""
        super().reset_classifier(num_classes)  # validates and records num_classes
        self.classifier = nn.Conv2d(self.num_features, num_classes, 1)
        nn.init.normal_(self.classifier.weight, 0.0, 0.01)
        nn.init.zeros_(self.classifier.bias)


_PAPER = "Iandola et al. 2016, SqueezeNet: AlexNet-level accuracy with 50x fewer parameters and <0.5MB model size"
_ARGS = {
    "bypass": Arg(str, "none", choices=("none", "simple", "complex"), doc="bypass connections (paper section 6)"),
    "drop_rate": Arg(float, 0.5, min=0.0, max=0.99, doc="dropout before the classifier"),
    "stem": Arg(str, "imagenet", choices=tuple(STEM_CONV), doc="'cifar': stride-1 padded stem for 32 px inputs"),
}


def _card(name: str, params: int, macs: int, note: str) -> ModelCard:
    return ModelCard(
        name=name, family="squeezenet", paper=_PAPER, url="https://arxiv.org/abs/1602.07360", args=_ARGS,
        references=(
            Reference({}, "torchvision params; MACs as published for torchvision", params=params, macs=macs,
                      macs_rtol=0.02, label=f"{name} vanilla"),
            Reference({"bypass": "simple"}, "Iandola et al. 2016, section 6: simple bypass adds no params",
                      params=params, label=f"{name} simple bypass"),
        ),
        resolution_by=(("stem", "cifar", 32),), description=note,
    )


@register_model(_card("squeezenet1_0", 1_248_424, 819_000_000, "SqueezeNet 1.0: 7x7 stem, Fire modules."))
def squeezenet1_0(*, bypass: str, num_classes: int, in_chans: int, drop_rate: float, stem: str) -> SqueezeNet:
    """SqueezeNet 1.0 (Iandola et al. 2016)."""
    return SqueezeNet("1_0", bypass=bypass, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                      stem=stem)


@register_model(_card("squeezenet1_1", 1_235_496, 349_000_000,
                      "SqueezeNet 1.1: 3x3 stem and earlier pooling, 2.4x fewer MACs than 1.0."))
def squeezenet1_1(*, bypass: str, num_classes: int, in_chans: int, drop_rate: float, stem: str) -> SqueezeNet:
    """SqueezeNet 1.1 (the SqueezeNet repository's v1.1 architecture)."""
    return SqueezeNet("1_1", bypass=bypass, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate,
                      stem=stem)
