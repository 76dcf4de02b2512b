"""Batch augmentation for real images: random crop with padding and horizontal flip.

The CIFAR augmentation of He et al. 2016 ("Deep Residual Learning for Image Recognition", section 4.2):
pad 4 pixels on each side, take a random crop of the original size, flip horizontally with
probability 0.5. With padding 2 and no flip it is the +-2 pixel jitter of Hinton et al. 2015 on MNIST.

It runs on whole batches inside `zoo.train.fit`, after normalisation, and pads by reflection (as fast
CIFAR trainers do; torchvision's `RandomCrop(padding=4)` pads with black instead). The random draws
come from a generator seeded by (seed, global step, rank) only, so a run is reproducible per seed
and a resumed run draws exactly what the uninterrupted one would have.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from zoo.errors import ZooError


def augment_batch(x: Tensor, crop_padding: int, hflip: bool, seed: int, step: int, rank: int = 0) -> Tensor:
    """Randomly crop (reflect-padded by `crop_padding`) and/or flip each image of (N, C, H, W) `x`."""
    if crop_padding == 0 and not hflip:
        return x
    if x.dim() != 4:
        raise ZooError(f"crop_padding/hflip augment (N, C, H, W) image batches; got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    g = torch.Generator()
    g.manual_seed(((seed * 1_000_003 + step) * 257 + rank) % 2**63)
    if crop_padding:
        p = crop_padding
        if p >= min(h, w):
            raise ZooError(f"crop_padding={p} needs images larger than {p} pixels; got {h}x{w}")
        padded = F.pad(x, (p, p, p, p), mode="reflect")  # (N, C, H+2p, W+2p)
        dy = torch.randint(0, 2 * p + 1, (n, 1), generator=g).to(x.device)
        dx = torch.randint(0, 2 * p + 1, (n, 1), generator=g).to(x.device)
        rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
        cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
        batch = torch.arange(n, device=x.device)[:, None, None, None]
        chans = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]  # (N, C, H, W)
    if hflip:
        flip = (torch.rand(n, generator=g) < 0.5).to(x.device)[:, None, None, None]
        x = torch.where(flip, x.flip(-1), x)
    return x
