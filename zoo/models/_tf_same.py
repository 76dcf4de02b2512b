"""TensorFlow "SAME" padding for the MobileNets' strided convolutions, so that weights trained in
TF-slim (Howard et al. 2017, "MobileNets", arXiv:1704.04861; Sandler et al. 2018, "MobileNetV2",
arXiv:1801.04381) give the same outputs in zoo, as timm's `tf_` models do.

SAME pads `total = (ceil(in / s) - 1) * s + k - in` pixels, `total // 2` before and the rest after. At
stride 1 with an odd kernel that is `(k - 1) / 2` on both sides, exactly PyTorch's symmetric padding, so
only strided layers change: a 3x3 stride-2 conv on an even-sized input pads 0 before and 1 after,
where PyTorch pads 1 and 1 (same output size, windows shifted by one pixel). The padding depends on the
input size, so it is computed in `forward`. Models built with the default padding never contain these
modules, so they run exactly the code they ran before.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from zoo.errors import ZooError
from zoo.layers import ConvNormAct

# `padding` model option: "symmetric" = PyTorch's k // 2 on every side (default), "same" = TensorFlow SAME.
PADDINGS: tuple[str, ...] = ("symmetric", "same")


def same_pad(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """(before, after) padding of TensorFlow SAME along one axis of length `size` (needs kernel >= stride)."""
    out = (size + stride - 1) // stride
    total = (out - 1) * stride + kernel - size  # >= kernel - stride >= 0, so no max() (FX-traceable)
    return total // 2, total - total // 2


class PadSame(nn.Module):
    """Zero padding of TensorFlow SAME for a `kernel` x `kernel` window at `stride`; no parameters."""

    def __init__(self, kernel: int, stride: int):
        super().__init__()
        if kernel < stride:
            raise ZooError(f"PadSame: kernel={kernel} < stride={stride} is not allowed; expected kernel >= stride")
        self.kernel, self.stride = kernel, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        top, bottom = same_pad(x.shape[-2], self.kernel, self.stride)
        left, right = same_pad(x.shape[-1], self.kernel, self.stride)
        return F.pad(x, (left, right, top, bottom))  # quantized tensors pad with their zero point (= 0.0)

    def extra_repr(self) -> str:
        return f"kernel={self.kernel}, stride={self.stride}"


class ConvNormActSame(ConvNormAct):
    """ConvNormAct whose conv pads like TensorFlow SAME; same state-dict keys, fusable as [conv, bn, act]."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int, stride: int, groups: int = 1,
                 act: str | None = "relu"):
        super().__init__(in_chs, out_chs, kernel_size, stride, groups=groups, act=act, padding=0)
        self.pad = PadSame(kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(self.pad(x)))
        return self.act(x) if self.has_act else x


def conv_norm_act(in_chs: int, out_chs: int, kernel_size: int, stride: int, groups: int = 1,
                  act: str | None = "relu", padding: str = "symmetric") -> ConvNormAct:
    """A ConvNormAct; with padding="same" and stride > 1 its TensorFlow SAME twin (stride 1 pads alike)."""
    if padding not in PADDINGS:
        raise ZooError(f"padding={padding!r} is not allowed; allowed: " + ", ".join(repr(p) for p in PADDINGS))
    if padding == "same" and stride > 1:
        return ConvNormActSame(in_chs, out_chs, kernel_size, stride, groups=groups, act=act)
    return ConvNormAct(in_chs, out_chs, kernel_size, stride, groups=groups, act=act)
