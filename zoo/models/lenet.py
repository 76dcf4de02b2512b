"""MNIST networks of Han et al. 2015, "Learning both Weights and Connections for Efficient Neural
Networks" (NeurIPS 2015, arXiv:1506.02626): LeNet-300-100 and Caffe's LeNet-5 (20/50 conv, 500 fc);
plus a generic MLP (used e.g. for the Hinton et al. 2015 distillation nets).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from zoo._registry import Arg, ModelCard, Reference, register_model
from zoo.layers import ZooModel


class MLP(ZooModel):
    """Fully connected net: flatten -> [Linear -> ReLU -> Dropout] x len(hidden) -> Linear."""

    def __init__(self, *, hidden: tuple[int, ...], resolution: int, num_classes: int, in_chans: int,
                 drop_rate: float):
        super().__init__(in_chans, min_input_size=resolution, fixed_input_size=resolution)
        layers: list[nn.Module] = [nn.Flatten(1)]  # (N, C*H*W)
        prev = in_chans * resolution * resolution
        for h in hidden:
            layers += [nn.Linear(prev, h), nn.ReLU(inplace=True)]
            if drop_rate > 0:
                layers.append(nn.Dropout(drop_rate))
            prev = h
        self.features = nn.Sequential(*layers)  # (N, hidden[-1])
        self.num_features = prev
        self.head_drop = nn.Identity()
        self.classifier = nn.Linear(prev, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Classifier on the last hidden layer; `pre_logits=True` returns the hidden features."""
        return x if pre_logits else self.classifier(x)

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the output layer for `num_classes` outputs (PyTorch default init)."""
        super().reset_classifier(num_classes)
        self.classifier = nn.Linear(self.num_features, num_classes)


class LeNet5(ZooModel):
    """Caffe LeNet-5 as used by Han et al.: conv5x5(20) -> pool -> conv5x5(50) -> pool -> fc500 -> fc.

    Like Caffe's model there is no non-linearity after the convolutions, only after the 500-unit layer.
    """

    def __init__(self, *, resolution: int, num_classes: int, in_chans: int, drop_rate: float):
        super().__init__(in_chans, min_input_size=resolution, fixed_input_size=resolution)
        side = ((resolution - 4) // 2 - 4) // 2
        self.features = nn.Sequential(
            nn.Conv2d(in_chans, 20, 5), nn.MaxPool2d(2),  # (N, 20, 12, 12) at 28 px
            nn.Conv2d(20, 50, 5), nn.MaxPool2d(2),  # (N, 50, 4, 4)
            nn.Flatten(1), nn.Linear(50 * side * side, 500), nn.ReLU(inplace=True),  # (N, 500)
        )
        self.num_features = 500
        self.head_drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(500, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Dropout then the output layer; `pre_logits=True` returns the 500-d features."""
        return x if pre_logits else self.classifier(self.head_drop(x))

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the output layer for `num_classes` outputs (PyTorch default init)."""
        super().reset_classifier(num_classes)
        self.classifier = nn.Linear(500, num_classes)


_HAN = "Han et al. 2015, Learning both Weights and Connections for Efficient Neural Networks"
_URL = "https://arxiv.org/abs/1506.02626"


def _res_arg(minimum: int) -> Arg:
    return Arg(int, 28, min=minimum, max=256, doc="input side (the network needs exactly this size)")


# MNIST defaults: 10 classes, one channel.
_MNIST_ARGS = {
    "num_classes": Arg(int, 10, min=1, doc="number of output classes"),
    "in_chans": Arg(int, 1, min=1, max=64, doc="number of input channels"),
}


@register_model(ModelCard(
    name="lenet_300_100", family="lenet", paper=_HAN, url=_URL,
    args={**_MNIST_ARGS, "resolution": _res_arg(4), "drop_rate": Arg(float, 0.0, min=0.0, max=0.99, doc="dropout after hidden layers")},
    references=(Reference({}, "Han et al. 2015, Table 1 (params); MACs computed layer by layer",
                          params=266_610, macs=266_200, label="LeNet-300-100"),),
    default_resolution=28, min_resolution=4, fixed_resolution=True,
    description="Two hidden fully connected layers of 300 and 100 units.",
))
def lenet_300_100(*, resolution: int, num_classes: int, in_chans: int, drop_rate: float) -> MLP:
    """LeNet-300-100 (Han et al. 2015): 784-300-100-10 at 28 px, one channel."""
    return MLP(hidden=(300, 100), resolution=resolution, num_classes=num_classes, in_chans=in_chans,
               drop_rate=drop_rate)


@register_model(ModelCard(
    name="lenet5", family="lenet", paper=_HAN, url=_URL,
    args={**_MNIST_ARGS, "resolution": _res_arg(16), "drop_rate": Arg(float, 0.0, min=0.0, max=0.99, doc="dropout before the classifier")},
    references=(Reference({}, "Han et al. 2015, Table 1 (params); MACs computed layer by layer",
                          params=431_080, macs=2_293_000, label="LeNet-5"),),
    default_resolution=28, min_resolution=16, fixed_resolution=True,
    description="Caffe LeNet-5: 20 and 50 5x5 conv filters, a 500-unit fc layer.",
))
def lenet5(*, resolution: int, num_classes: int, in_chans: int, drop_rate: float) -> LeNet5:
    """Caffe LeNet-5 as pruned by Han et al. 2015."""
    return LeNet5(resolution=resolution, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)


@register_model(ModelCard(
    name="mlp", family="lenet", paper="Generic multi-layer perceptron (e.g. Hinton et al. 2015, 2x1200 / 2x800 nets)",
    url="https://arxiv.org/abs/1503.02531",
    args={**_MNIST_ARGS, "hidden": Arg(tuple, (300, 100), doc="hidden layer sizes"), "resolution": _res_arg(4),
          "drop_rate": Arg(float, 0.0, min=0.0, max=0.99, doc="dropout after each hidden layer")},
    default_resolution=28, min_resolution=4, fixed_resolution=True,
    description="Fully connected net on flattened images.",
))
def mlp(*, hidden: tuple[int, ...], resolution: int, num_classes: int, in_chans: int, drop_rate: float) -> MLP:
    """Generic MLP with the given hidden sizes."""
    return MLP(hidden=hidden, resolution=resolution, num_classes=num_classes, in_chans=in_chans, drop_rate=drop_rate)
