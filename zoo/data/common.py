"""Shared pieces of the zoo data pipeline: dataset info, tensor transforms, stratified splits, samplers.

Every dataset yields float images in [0, 1] at their native size and channel count; one transform
then resizes them to the model's (H, W) (bilinear), converts the channels (grey -> RGB by repeating,
RGB -> grey by ITU-R BT.601 luminance, as PIL does) and normalises with the dataset's mean/std.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset, Sampler

from zoo.errors import ZooError

LUMA = (0.299, 0.587, 0.114)  # ITU-R BT.601 weights, the ones PIL's convert("L") uses
SPLIT_SEED = 0  # train/val splits are fixed: the same for every training seed
CACHE_BYTES = 256 * 2**20  # array datasets whose transformed tensors fit in this are transformed once
STATS_IMAGES = 4096  # normalisation statistics use at most this many (evenly spaced) training images


@dataclass
class DatasetInfo:
    """What a loader pair holds: classes, normalisation and sizes."""

    name: str
    num_classes: int
    class_names: list[str]
    mean: tuple[float, ...]  # per delivered channel, [0, 1] units, from the training split at input_size
    std: tuple[float, ...]
    input_size: tuple[int, int, int]  # (C, H, W) the images are delivered at
    num_train: int
    num_val: int
    split: str = ""  # how train/val were made
    root: str | None = None  # folder the data was read from (None for embedded data)
    title: str = ""  # the dataset as tables name it, e.g. "CIFAR-10 (JPEG q75 copy)"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able dict of the fields."""
        d = dataclasses.asdict(self)
        d["mean"], d["std"], d["input_size"] = list(self.mean), list(self.std), list(self.input_size)
        return d


def convert_channels(x: torch.Tensor, channels: int) -> torch.Tensor:
    """(N, c, H, W) with c in {1, 3} -> (N, channels, H, W): grey repeated, RGB -> BT.601 luminance."""
    c = x.shape[1]
    if c == channels:
        return x
    if c == 1 and channels == 3:
        return x.expand(-1, 3, -1, -1).contiguous()
    if c == 3 and channels == 1:
        w = torch.tensor(LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
        return (x * w).sum(1, keepdim=True)
    raise ZooError(f"cannot convert {c}-channel images to {channels} channels; supported: 1 and 3")


def resize(x: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """Bilinear resize of (N, C, h, w) to (N, C, H, W); anti-aliased when shrinking."""
    if tuple(x.shape[-2:]) == tuple(hw):
        return x
    shrink = x.shape[-2] > hw[0] or x.shape[-1] > hw[1]
    return F.interpolate(x, size=hw, mode="bilinear", align_corners=False, antialias=shrink)


class ImageTransform:
    """[0, 1] images (N, c, h, w) -> resized, channel-converted, normalised (N, C, H, W) float32."""

    def __init__(self, input_size: tuple[int, int, int], mean: tuple[float, ...] | None = None,
                 std: tuple[float, ...] | None = None):
        self.input_size = tuple(input_size)
        c = self.input_size[0]
        self.mean = None if mean is None else torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
        self.std = None if std is None else torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        c, h, w = self.input_size
        x = x.float()
        if x.shape[1] > c:  # fewer channels first: cheaper, and both steps are linear
            x = resize(convert_channels(x, c), (h, w))
        else:
            x = convert_channels(resize(x, (h, w)), c)
        if self.mean is not None:
            x = (x - self.mean) / self.std
        return x


def channel_stats(images: torch.Tensor, scale: float, input_size: tuple[int, int, int],
                  max_images: int = STATS_IMAGES, chunk: int = 512) -> tuple[tuple, tuple]:
    """Per-channel mean/std of images (N, c, h, w) times `scale`, as delivered (resized, converted).

    Uses up to `max_images` evenly spaced images, so the numbers are fixed for a given split.
    """
    n = images.shape[0]
    if n == 0:
        raise ZooError("cannot compute normalisation statistics of an empty training split")
    idx = torch.from_numpy(np.unique(np.linspace(0, n - 1, min(max_images, n)).round().astype(np.int64)))
    t = ImageTransform(input_size)
    c = input_size[0]
    s = torch.zeros(c, dtype=torch.float64)
    s2 = torch.zeros(c, dtype=torch.float64)
    count = 0
    for i in range(0, len(idx), chunk):
        x = t(images[idx[i:i + chunk]].float() * scale).double()
        s += x.sum(dim=(0, 2, 3))
        s2 += (x * x).sum(dim=(0, 2, 3))
        count += x.shape[0] * x.shape[2] * x.shape[3]
    mean = s / count
    std = (s2 / count - mean * mean).clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def _apportion(counts: np.ndarray, total: int, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Integer shares of `total` proportional to `counts` (largest remainder), within [lo, hi] per class."""
    exact = counts * (total / max(int(counts.sum()), 1))
    share = np.clip(np.floor(exact).astype(np.int64), lo, hi)
    rem = exact - np.floor(exact)
    order = sorted(range(len(counts)), key=lambda i: (-rem[i], i))
    while share.sum() < total:
        moved = False
        for i in order:
            if share.sum() >= total:
                break
            if share[i] < hi[i]:
                share[i] += 1
                moved = True
        if not moved:
            break
    while share.sum() > total:
        moved = False
        for i in reversed(order):
            if share.sum() <= total:
                break
            if share[i] > lo[i]:
                share[i] -= 1
                moved = True
        if not moved:
            break
    return share


def stratified_split(labels: np.ndarray, val_fraction: float, class_names: list[str] | None = None,
                     seed: int = SPLIT_SEED) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified (train_idx, val_idx): round(N * val_fraction) images go to val.

    Per-class shares follow the largest-remainder rule, every class keeps at least one image on each
    side; images inside a class are picked by a fixed permutation (numpy RandomState(seed)).
    """
    labels = np.asarray(labels)
    classes = np.unique(labels)
    counts = np.array([(labels == c).sum() for c in classes])
    for c, n in zip(classes, counts):
        if n < 2:
            name = class_names[int(c)] if class_names else str(int(c))
            raise ZooError(f"class {name!r} has {n} image(s); a train/val split needs at least 2 per class")
    total = int(round(len(labels) * val_fraction))
    share = _apportion(counts, total, np.ones_like(counts), counts - 1)
    rng = np.random.RandomState(seed)
    train, val = [], []
    for c, k in zip(classes, share):
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        val.append(idx[:k])
        train.append(idx[k:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(val))


def stratified_subset(labels: np.ndarray, size: int, seed: int = SPLIT_SEED) -> np.ndarray:
    """Sorted indices of a deterministic class-balanced subset of `size` items (all if fewer)."""
    labels = np.asarray(labels)
    if size >= len(labels):
        return np.arange(len(labels))
    classes = np.unique(labels)
    counts = np.array([(labels == c).sum() for c in classes])
    lo = np.minimum(counts, 1 if size >= len(classes) else 0)
    share = _apportion(counts, size, lo, counts)
    rng = np.random.RandomState(seed + 1)
    out = []
    for c, k in zip(classes, share):
        idx = np.flatnonzero(labels == c)
        out.append(idx[rng.permutation(len(idx))[:k]])
    return np.sort(np.concatenate(out))


class ArrayDataset(Dataset):
    """In-memory images (N, c, h, w) (uint8 or float) times `scale`, transformed on access.

    When the transformed tensors are small (<= CACHE_BYTES) they are computed once up front.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, scale: float, transform: ImageTransform):
        self.images, self.labels = images, labels.long()
        self.scale, self.transform = scale, transform
        c, h, w = transform.input_size
        self.cache: torch.Tensor | None = None
        if len(images) * c * h * w * 4 <= CACHE_BYTES:
            self.cache = torch.cat([self._convert(i, i + 1024) for i in range(0, len(images), 1024)]) \
                if len(images) else torch.empty(0, c, h, w)

    def _convert(self, a: int, b: int) -> torch.Tensor:
        return self.transform(self.images[a:b].float() * self.scale)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        x = self.cache[i] if self.cache is not None else self._convert(i, i + 1)[0]
        return x, int(self.labels[i])


class EpochSampler(Sampler[int]):
    """Shuffled order that depends only on (seed, epoch): a fresh torch.Generator per epoch.

    `set_epoch(k)` selects epoch k (as DistributedSampler does); without it each iteration advances
    the epoch by one, so a plain loop over the loader still gets a new order every epoch.
    """

    def __init__(self, n: int, seed: int = 0, shuffle: bool = True):
        self.n, self.seed, self.shuffle, self.epoch = n, seed, shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        """Choose the epoch whose order the next iteration yields."""
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        if not self.shuffle:
            return iter(range(self.n))
        g = torch.Generator()
        g.manual_seed(self.seed * 100_003 + epoch)
        return iter(torch.randperm(self.n, generator=g).tolist())

    def __len__(self) -> int:
        return self.n


def seed_worker(worker_id: int) -> None:
    """DataLoader worker init: seed numpy and random from the worker's torch seed."""
    import random

    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)

