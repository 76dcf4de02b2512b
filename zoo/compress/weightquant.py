"""Weight-only quantizers trained with a straight-through estimator (STE).

* binary: w_b = alpha * sign(w), alpha = mean |w| per output channel (BinaryConnect, Courbariaux et al.
  2015, with the XNOR-Net scaling of Rastegari et al. 2016); gradient passed where |w| <= 1
  (hard-tanh derivative).
* ternary: w_t = alpha * sign(w) * [|w| > delta], delta = 0.7 * mean |w|, alpha = mean of the kept
  |w| per output channel (Ternary Weight Networks, Li et al. 2016); STE as for binary.
* kbit: symmetric per-output-channel k-bit (2..8) rounding with a scale fixed at quantization time,
  w_q = s * clamp(round(w / s), -(2^(k-1)-1), 2^(k-1)-1), STE inside the clipping range.

Each is a torch parametrization, so the latent float weight is what the optimizer trains and
`module.weight` is the quantized one. Stored as bit-packed codes plus per-channel alpha / scale.
"""

from __future__ import annotations

import torch
import torch.nn as nn


def _per_channel(t: torch.Tensor) -> tuple[int, ...]:
    return (t.shape[0],) + (1,) * (t.dim() - 1)


class _SignSTE(torch.autograd.Function):
    """sign with sign(0) = +1 forward; hard-tanh gradient (pass where |w| <= 1) backward."""

    @staticmethod
    def forward(ctx, w: torch.Tensor) -> torch.Tensor:
        """+1 where w >= 0, else -1."""
        ctx.save_for_backward(w)
        return torch.where(w >= 0, torch.ones_like(w), -torch.ones_like(w))

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        """Straight-through where |w| <= 1 (derivative of hard-tanh), zero outside."""
        (w,) = ctx.saved_tensors
        return g * (w.abs() <= 1).to(g.dtype)


class _TernarySTE(torch.autograd.Function):
    """sign(w) * [|w| > delta] forward; hard-tanh gradient backward."""

    @staticmethod
    def forward(ctx, w: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """sign(w) where |w| > delta, else 0."""
        ctx.save_for_backward(w)
        return torch.sign(w) * (w.abs() > delta).to(w.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        """Straight-through where |w| <= 1, zero outside; no gradient for delta."""
        (w,) = ctx.saved_tensors
        return g * (w.abs() <= 1).to(g.dtype), None


class _RoundSTE(torch.autograd.Function):
    """round forward, identity backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        """Round to the nearest integer."""
        return torch.round(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        """Identity (straight-through)."""
        return g


def channel_mean(t: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Per-output-channel mean of t (over `mask` if given), computed in float64 then cast back.

    float64 makes alpha exactly reproducible when the latent weights are re-created as alpha * codes.
    """
    d = t.detach().double().reshape(t.shape[0], -1)
    if mask is None:
        m = d.mean(1)
    else:
        mk = mask.reshape(t.shape[0], -1).double()
        m = (d * mk).sum(1) / mk.sum(1).clamp_min(1)
    return m.to(t.dtype).reshape(_per_channel(t))


class BinaryWeight(nn.Module):
    """Parametrization: alpha * sign(w) with alpha = mean |w| per output channel."""

    bits = 1

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The binarised weight used by the layer."""
        return channel_mean(w.abs()) * _SignSTE.apply(w)

    @staticmethod
    def codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes 0/1, alpha) of a latent weight: code 1 for +alpha."""
        return (w >= 0).to(torch.uint8), channel_mean(w.abs()).reshape(-1)

    @staticmethod
    def latent(codes: torch.Tensor, alpha: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A latent weight that this parametrization maps to exactly alpha * (+-1)."""
        s = codes.to(torch.float32).reshape(shape) * 2 - 1
        return alpha.reshape((shape[0],) + (1,) * (len(shape) - 1)) * s


class TernaryWeight(nn.Module):
    """Parametrization: alpha * sign(w) * [|w| > 0.7 mean |w|] (TWN), alpha per output channel."""

    bits = 2
    ratio = 0.7

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The ternarised weight used by the layer."""
        delta = self.ratio * channel_mean(w.abs())
        keep = w.detach().abs() > delta
        alpha = channel_mean(w.abs(), keep)
        return alpha * _TernarySTE.apply(w, delta)

    @classmethod
    def codes(cls, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes 0 = -alpha, 1 = 0, 2 = +alpha, alpha) of a latent weight."""
        delta = cls.ratio * channel_mean(w.abs())
        keep = w.abs() > delta
        alpha = channel_mean(w.abs(), keep)
        t = torch.sign(w) * keep.to(w.dtype)
        return (t + 1).to(torch.uint8), alpha.reshape(-1)

    @staticmethod
    def latent(codes: torch.Tensor, alpha: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A latent weight that this parametrization maps to exactly alpha * {-1, 0, +1}."""
        t = codes.to(torch.float32).reshape(shape) - 1
        return alpha.reshape((shape[0],) + (1,) * (len(shape) - 1)) * t


class KBitWeight(nn.Module):
    """Parametrization: symmetric per-channel k-bit rounding with a fixed per-channel scale."""

    def __init__(self, bits: int, scale: torch.Tensor):
        super().__init__()
        self.bits = bits
        self.register_buffer("scale", scale)

    @property
    def qmax(self) -> int:
        """Largest code magnitude, 2^(k-1) - 1."""
        return 2 ** (self.bits - 1) - 1

    @staticmethod
    def init_scale(w: torch.Tensor, bits: int) -> torch.Tensor:
        """max |w| / qmax per output channel (1 where a channel is all zero)."""
        qmax = 2 ** (bits - 1) - 1
        s = w.detach().abs().reshape(w.shape[0], -1).amax(1) / qmax
        s = torch.where(s > 0, s, torch.ones_like(s))
        return s.reshape(_per_channel(w))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        """The k-bit weight used by the layer."""
        return _RoundSTE.apply(w / self.scale).clamp(-self.qmax, self.qmax) * self.scale

    def codes(self, w: torch.Tensor) -> torch.Tensor:
        """Unsigned codes q + qmax in [0, 2 qmax] of a latent weight."""
        q = torch.round(w / self.scale).clamp(-self.qmax, self.qmax)
        return (q + self.qmax).to(torch.uint8)

    def latent(self, codes: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """A latent weight that this parametrization maps to exactly scale * q."""
        q = codes.to(torch.float32).reshape(shape) - self.qmax
        return q * self.scale


WEIGHT_QUANTIZERS = (BinaryWeight, TernaryWeight, KBitWeight)
