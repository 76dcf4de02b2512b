"""Shared building blocks for the zoo's lightweight CNNs.

Blocks from: MobileNets (Howard et al. 2017, depthwise-separable conv), MobileNetV2 (Sandler et al.
2018, inverted residual), SqueezeNet (Iandola et al. 2016, Fire module), ShuffleNet (Zhang et al.
2017, group conv + channel shuffle), ShuffleNet V2 (Ma et al. 2018) and ResNet (He et al. 2016, including
the parameter-free option-A shortcut of its CIFAR networks).

Every block is written once and is quantization-ready: conv-bn-act live in `ConvNormAct` (fusable by
`torch.ao.quantization.fuse_modules` on `[conv, bn, act]`), and residual adds / concatenations go
through `FloatFunctional`, so the same module runs in fp32 and, after conversion, in int8.
"""

from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.ao.nn.quantized import FloatFunctional
from torch.ao.quantization import DeQuantStub, QuantStub
from torch.fx._symbolic_trace import is_fx_symbolic_tracing

from zoo.errors import ZooError
from zoo.spec import ModelSpec, model_name


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None, round_limit: float = 0.9) -> int:
    """Round `v` to the nearest multiple of `divisor`, never going below `round_limit * v`."""
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < round_limit * v:
        new_v += divisor
    return new_v


def make_act(act: str | None) -> nn.Module:
    """Activation module by name: 'relu', 'relu6' or None (identity)."""
    if act is None:
        return nn.Identity()
    if act == "relu":
        return nn.ReLU(inplace=True)
    if act == "relu6":
        return nn.ReLU6(inplace=True)
    raise ValueError(f"unknown activation {act!r}; allowed: 'relu', 'relu6', None")


class ConvNormAct(nn.Module):
    """Conv2d -> BatchNorm2d (optional) -> activation (optional); fusable as [conv, bn, act]."""

    def __init__(
        self,
        in_chs: int,
        out_chs: int,
        kernel_size: int = 1,
        stride: int = 1,
        groups: int = 1,
        act: str | None = "relu",
        norm: bool = True,
        bias: bool | None = None,
        padding: int | None = None,
    ):
        super().__init__()
        padding = kernel_size // 2 if padding is None else padding
        bias = (not norm) if bias is None else bias
        self.conv = nn.Conv2d(in_chs, out_chs, kernel_size, stride, padding, groups=groups, bias=bias)
        self.bn = nn.BatchNorm2d(out_chs) if norm else nn.Identity()
        self.act = make_act(act)
        self.has_act = act is not None  # skip the Identity call when there is no activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return self.act(x) if self.has_act else x


class DepthwiseSeparable(nn.Module):
    """MobileNet v1 block: 3x3 depthwise ConvNormAct then 1x1 pointwise ConvNormAct."""

    def __init__(self, in_chs: int, out_chs: int, stride: int = 1, act: str = "relu"):
        super().__init__()
        self.dw = ConvNormAct(in_chs, in_chs, 3, stride, groups=in_chs, act=act)
        self.pw = ConvNormAct(in_chs, out_chs, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pw(self.dw(x))


class InvertedResidual(nn.Module):
    """MobileNet v2 block: 1x1 expand -> 3x3 depthwise -> 1x1 linear projection, residual if shapes match."""

    def __init__(self, in_chs: int, out_chs: int, stride: int, expand_ratio: float, act: str = "relu6"):
        super().__init__()
        hidden = int(round(in_chs * expand_ratio))
        self.use_res = stride == 1 and in_chs == out_chs
        self.expand = ConvNormAct(in_chs, hidden, 1, act=act) if expand_ratio != 1 else nn.Identity()
        self.dw = ConvNormAct(hidden, hidden, 3, stride, groups=hidden, act=act)
        self.project = ConvNormAct(hidden, out_chs, 1, act=None)
        self.skip = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.project(self.dw(self.expand(x)))
        return add_(self.skip, out, x) if self.use_res else out


class Fire(nn.Module):
    """SqueezeNet Fire module: 1x1 squeeze, then concatenated 1x1 and 3x3 expands; optional bypass.

    bypass: 'none'; 'simple' (identity add, only when in == out channels); 'complex' (1x1 conv add).
    """

    def __init__(self, in_chs: int, squeeze: int, expand1x1: int, expand3x3: int, bypass: str = "none"):
        super().__init__()
        out_chs = expand1x1 + expand3x3
        self.squeeze = ConvNormAct(in_chs, squeeze, 1, norm=False)
        self.expand1x1 = ConvNormAct(squeeze, expand1x1, 1, norm=False)
        self.expand3x3 = ConvNormAct(squeeze, expand3x3, 3, norm=False)
        if bypass == "simple" and in_chs != out_chs:
            raise ValueError("a simple bypass needs equal input and output channels")
        self.bypass = bypass
        self.bypass_conv = (
            nn.Conv2d(in_chs, out_chs, 1, bias=False) if bypass == "complex" else None
        )
        self.cat = FloatFunctional()
        self.skip = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.squeeze(x)
        out = cat_(self.cat, [self.expand1x1(s), self.expand3x3(s)])
        if self.bypass == "simple":
            out = self.skip.add(out, x)
        elif self.bypass_conv is not None:
            out = self.skip.add(out, self.bypass_conv(x))
        return out


def add_(ff: FloatFunctional, out: torch.Tensor, other: torch.Tensor, relu: bool = False) -> torch.Tensor:
    """Residual add (optionally + ReLU) through `ff`, so that int8 conversion sees it.

    In plain fp32 (no observer attached, not converted) it adds in place into `out` (a fresh block
    output), like torchvision, which saves a full-size allocation per block at large batch sizes.
    """
    if type(ff) is FloatFunctional and isinstance(ff.activation_post_process, nn.Identity):
        out = out.add_(other)
        return out.relu_() if relu else out
    return ff.add_relu(out, other) if relu else ff.add(out, other)


def cat_(ff: FloatFunctional, tensors: list[torch.Tensor], dim: int = 1) -> torch.Tensor:
    """Concatenation through `ff` (int8-convertible); a plain torch.cat while the model is fp32."""
    if type(ff) is FloatFunctional and isinstance(ff.activation_post_process, nn.Identity):
        return torch.cat(tensors, dim)
    return ff.cat(tensors, dim)


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """Interleave channels across `groups` (ShuffleNet): (N, g*c, H, W) -> (N, c*g, H, W)."""
    n, c, h, w = x.shape
    x = x.view(n, groups, c // groups, h, w).transpose(1, 2).contiguous()
    return x.view(n, c, h, w)


class ChannelShuffle(nn.Module):
    """Module form of `channel_shuffle`, so that graph passes can see and respect it."""

    def __init__(self, groups: int):
        super().__init__()
        self.groups = groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return channel_shuffle(x, self.groups)


class ShuffleV1Unit(nn.Module):
    """ShuffleNet v1 unit: 1x1 group conv -> shuffle -> 3x3 depthwise -> 1x1 group conv.

    stride 1: residual add (in == out). stride 2: the branch makes out - in channels, concatenated with
    a 3x3 average-pooled shortcut. `first_groups` lets stage 2's first 1x1 conv be ungrouped (paper 3.3).
    """

    def __init__(self, in_chs: int, out_chs: int, mid_chs: int, groups: int, stride: int, first_groups: int):
        super().__init__()
        self.stride = stride
        branch_out = out_chs - in_chs if stride == 2 else out_chs
        self.conv1 = ConvNormAct(in_chs, mid_chs, 1, groups=first_groups, act="relu")
        self.shuffle = ChannelShuffle(groups) if first_groups > 1 else nn.Identity()
        self.dw = ConvNormAct(mid_chs, mid_chs, 3, stride, groups=mid_chs, act=None)
        self.conv2 = ConvNormAct(mid_chs, branch_out, 1, groups=groups, act=None)
        self.pool = nn.AvgPool2d(3, 2, 1) if stride == 2 else nn.Identity()
        self.merge = FloatFunctional()
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv2(self.dw(self.shuffle(self.conv1(x))))
        if self.stride == 2:
            out = cat_(self.merge, [self.pool(x), out])
        else:
            out = self.merge.add(x, out)
        return self.relu(out)


class ShuffleV2Unit(nn.Module):
    """ShuffleNet v2 unit: channel split (stride 1) or two strided branches (stride 2), concat, shuffle."""

    def __init__(self, in_chs: int, out_chs: int, stride: int):
        super().__init__()
        self.stride = stride
        branch = out_chs // 2
        if stride == 1 and in_chs != 2 * branch:
            raise ValueError("a stride-1 ShuffleNet v2 unit needs in_chs == out_chs")
        if stride > 1:
            self.branch1 = nn.Sequential(
                ConvNormAct(in_chs, in_chs, 3, stride, groups=in_chs, act=None),
                ConvNormAct(in_chs, branch, 1, act="relu"),
            )
        else:
            self.branch1 = nn.Identity()
        b2_in = in_chs if stride > 1 else branch
        self.branch2 = nn.Sequential(
            ConvNormAct(b2_in, branch, 1, act="relu"),
            ConvNormAct(branch, branch, 3, stride, groups=branch, act=None),
            ConvNormAct(branch, branch, 1, act="relu"),
        )
        self.cat = FloatFunctional()
        self.shuffle = ChannelShuffle(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.stride == 1:  # channel split as two slices: ExecuTorch's XNNPACK delegate takes slices but
            half = (x.shape[1] + 1) // 2  # not split_with_sizes (x.chunk(2, 1)), which left 13 ops outside it
            out = cat_(self.cat, [x[:, :half], self.branch2(x[:, half:])])
        else:
            out = cat_(self.cat, [self.branch1(x), self.branch2(x)])
        return self.shuffle(out)


class PadShortcut(nn.Module):
    """Option-A ResNet shortcut (He et al. 2016, section 4.2): parameter-free identity with zero padding.

    Subsamples with `stride` (x[:, :, ::s, ::s]) and places the input channels among `out_chs` zero
    channels: input channel i lands at output channel `index[i]` (-1: dropped). By default the
    `out_chs - in_chs` new channels are split evenly before and after the input ones, as in the
    reference CIFAR ResNets (F.pad by planes // 4 on each side). Structured pruning rewrites `index`.
    On int8 tensors the output is a concatenation of input slices and zeros quantized with the input's
    scale and zero point (exact, and exportable to ONNX, which has no quantized Pad).
    """

    def __init__(self, in_chs: int, out_chs: int, stride: int = 2, index: Sequence[int] | None = None):
        super().__init__()
        if index is None:
            before = (out_chs - in_chs) // 2
            index = range(before, before + in_chs)
        self.in_chs, self.out_chs, self.stride = in_chs, out_chs, stride
        self.set_index(index)

    def set_index(self, index: Sequence[int]) -> None:
        """Route input channel i to output channel index[i] (-1 drops it)."""
        index = [int(i) for i in index]
        used = [i for i in index if i >= 0]
        in_range = all(-1 <= i < self.out_chs for i in index)
        if len(index) != self.in_chs or len(set(used)) != len(used) or not in_range:
            raise ValueError(f"PadShortcut: index {index} must give {self.in_chs} distinct output channels "
                             f"in [0, {self.out_chs}), or -1")
        self.index = index
        source = [-1] * self.out_chs  # input channel feeding each output channel, -1 for zeros
        for i, o in enumerate(index):
            if o >= 0:
                source[o] = i
        runs: list[list[int]] = []  # [first input channel or -1, length]: consecutive inputs or zeros
        for src in source:
            if runs and (src < 0) == (runs[-1][0] < 0) and (src < 0 or src == runs[-1][0] + runs[-1][1]):
                runs[-1][1] += 1
            else:
                runs.append([src, 1])
        self.runs = runs
        inputs = [r for r in runs if r[0] >= 0]  # one run holding every input in order: a plain F.pad
        whole = len(inputs) == 1 and inputs[0] == [0, self.in_chs]
        self.pad = [runs[0][1] if runs[0][0] < 0 else 0, runs[-1][1] if runs[-1][0] < 0 else 0] if whole else []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = x.is_quantized
        if self.stride > 1:  # a kernel-1 max pool is the same subsampling in a form int8 ONNX export knows
            x = F.max_pool2d(x, 1, self.stride) if q else x[:, :, ::self.stride, ::self.stride]
        if len(self.pad) == 2 and not q:
            return F.pad(x, (0, 0, 0, 0, self.pad[0], self.pad[1]))
        n, c, h, w = x.shape
        parts = []
        for src, length in self.runs:
            if src < 0 and q:  # zeros in x's quantisation: stored as its zero point, exactly 0.0
                zeros = torch.zeros(n, length, h, w, device=x.device)
                parts.append(torch.quantize_per_tensor(zeros, x.q_scale(), x.q_zero_point(), x.dtype))
            elif src < 0:
                parts.append(x.new_zeros(n, length, h, w))
            elif src == 0 and length == c:
                parts.append(x)
            elif q:  # select + reshape: int8 channel slices that ONNX export knows (aten::slice it does not)
                parts.extend(x.select(1, i).reshape(n, 1, h, w) for i in range(src, src + length))
            else:
                parts.append(x[:, src:src + length])
        return torch.cat(parts, 1) if len(parts) > 1 else parts[0]

    def extra_repr(self) -> str:
        return f"{self.in_chs}, {self.out_chs}, stride={self.stride}"


SHORTCUTS = ("A", "B")


class BasicBlock(nn.Module):
    """ResNet basic block: two 3x3 ConvNormAct, residual add then ReLU.

    When the shape changes the shortcut is `shortcut` 'B' (1x1 projection ConvNormAct, as torchvision)
    or 'A' (parameter-free `PadShortcut`, He et al. 2016 section 4.2, the paper's CIFAR networks).
    """

    expansion = 1

    def __init__(self, in_chs: int, planes: int, stride: int = 1, shortcut: str = "B"):
        super().__init__()
        if shortcut not in SHORTCUTS:
            raise ValueError(f"shortcut={shortcut!r} is not allowed; allowed: 'A', 'B'")
        out_chs = planes * self.expansion
        self.conv1 = ConvNormAct(in_chs, planes, 3, stride, act="relu")
        self.conv2 = ConvNormAct(planes, out_chs, 3, act=None)
        self.downsample: nn.Module | None = None
        if stride != 1 or in_chs != out_chs:
            self.downsample = (ConvNormAct(in_chs, out_chs, 1, stride, act=None) if shortcut == "B"
                               else PadShortcut(in_chs, out_chs, stride))
        self.skip = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return add_(self.skip, self.conv2(self.conv1(x)), shortcut, relu=True)


class Bottleneck(nn.Module):
    """ResNet bottleneck: 1x1 reduce, 3x3 (carries the stride, as in torchvision), 1x1 expand x4."""

    expansion = 4

    def __init__(self, in_chs: int, planes: int, stride: int = 1):
        super().__init__()
        out_chs = planes * self.expansion
        self.conv1 = ConvNormAct(in_chs, planes, 1, act="relu")
        self.conv2 = ConvNormAct(planes, planes, 3, stride, act="relu")
        self.conv3 = ConvNormAct(planes, out_chs, 1, act=None)
        self.downsample = (
            ConvNormAct(in_chs, out_chs, 1, stride, act=None) if stride != 1 or in_chs != out_chs else None
        )
        self.skip = FloatFunctional()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x if self.downsample is None else self.downsample(x)
        return add_(self.skip, self.conv3(self.conv2(self.conv1(x))), shortcut, relu=True)


def _autocast() -> bool:
    return torch.is_autocast_enabled() or torch.is_autocast_enabled("cpu")


def _skip_checks() -> bool:
    return torch.jit.is_scripting() or torch.jit.is_tracing() or torch.compiler.is_compiling() or is_fx_symbolic_tracing()


class ZooModel(nn.Module):
    """Base class of every zoo model: input checks, quant stubs and the timm-style head API.

    Subclasses set `num_features`, `self.classifier` (or override the head methods) and implement
    `forward_features`. `forward` = quant -> features -> head -> dequant; the stubs are identities
    until the model is converted to int8. `spec` (zoo.spec.ModelSpec) is set by `zoo.create`: name,
    kwargs, default input size, classes, normalisation and compression history.
    """

    spec: ModelSpec | None = None

    def __init__(self, in_chans: int, min_input_size: int, fixed_input_size: int | None = None):
        super().__init__()
        self.in_chans = in_chans
        self.min_input_size = min_input_size
        self.fixed_input_size = fixed_input_size
        self.num_features = 0
        self.quant = QuantStub()
        self.dequant = DeQuantStub()

    def check_input(self, x: torch.Tensor) -> None:
        """Raise ZooError unless x is (N, in_chans, H, W) with H, W large enough for the network."""
        if _skip_checks():
            return
        name = model_name(self)
        shape = tuple(x.shape)
        if self.fixed_input_size is not None:
            s = self.fixed_input_size
            ok = x.dim() == 4 and shape[1] == self.in_chans and shape[2] == s and shape[3] == s
            want = f"(N, {self.in_chans}, {s}, {s})"
        else:
            m = self.min_input_size
            ok = x.dim() == 4 and shape[1] == self.in_chans and shape[2] >= m and shape[3] >= m
            want = f"(N, {self.in_chans}, H, W) with H, W >= {m}"
        if not ok:
            raise ZooError(f"{name}: expected input of shape {want}; got {shape}")
        if x.dtype is not torch.float32 and x.dtype is not self._param_dtype() and not _autocast():
            want = str(self._param_dtype()).replace("torch.", "")
            raise ZooError(f"{name}: expected a {want} input tensor (the dtype of the model's weights); got "
                           f"{str(x.dtype).replace('torch.', '')}; convert it with x.to(torch.{want}), scaling "
                           "uint8 pixels to [0, 1] first")

    def _param_dtype(self) -> torch.dtype:
        """dtype of the model's first floating-point parameter (float32 for an int8 model, which has none)."""
        return next((p.dtype for p in self.parameters() if p.is_floating_point()), torch.float32)

    def init_head(self, num_features: int, num_classes: int, drop_rate: float) -> None:
        """Global average pool, dropout and a linear classifier on `num_features` channels."""
        self.num_features = num_features
        self.global_pool = nn.AdaptiveAvgPool2d(1)
        self.head_drop = nn.Dropout(drop_rate)
        self.classifier = nn.Linear(num_features, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Global pool, dropout and classifier; `pre_logits=True` stops before the classifier."""
        x = self.global_pool(x).flatten(1)
        x = self.head_drop(x)
        return x if pre_logits else self.classifier(x)

    def get_classifier(self) -> nn.Module:
        """The final classification layer."""
        return self.classifier

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for `num_classes` outputs."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
            raise ZooError(f"reset_classifier: num_classes={num_classes!r} is not allowed; expected int >= 1")
        self.classifier = nn.Linear(self.num_features, num_classes)
        init_linear(self.classifier)
        if self.spec is not None:  # the old class names no longer describe the outputs
            self.spec.kwargs["num_classes"] = num_classes
            self.spec.classes = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        x = self.quant(x)
        x = self.forward_features(x)
        x = self.forward_head(x)
        return self.dequant(x)


def init_linear(m: nn.Linear) -> None:
    """torchvision-style classifier init: N(0, 0.01) weights, zero bias."""
    nn.init.normal_(m.weight, 0, 0.01)
    nn.init.zeros_(m.bias)


def init_weights(model: nn.Module) -> None:
    """torchvision-style init: Kaiming-normal (fan_out) convs, unit BN, N(0, 0.01) linears."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            init_linear(m)
