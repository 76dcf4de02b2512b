"""Datasets and loaders of the zoo: digits (embedded), MNIST, Fashion-MNIST, CIFAR-10 (lossless or the
JPEG q75 copy), CIFAR-100 and custom image folders.

Datasets are registered by name (`register_dataset`, `DATASETS`). `get_loaders(name, input_size)`
returns deterministic train/val DataLoaders whose images are resized to the model's (H, W), converted
to its channel count and normalised with the training split's mean/std, plus a `DatasetInfo`. Shuffling depends only on (seed, epoch) (see `EpochSampler`).
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from zoo.errors import ZooError
from zoo.data.common import (ArrayDataset, DatasetInfo, EpochSampler, ImageTransform, channel_stats,
                             convert_channels, seed_worker, stratified_split, stratified_subset)
from zoo.data.imagefolder import (ImageFileDataset, folder_stats, load_image, scan_imagefolder,
                                  verify_imagefolder)
from zoo.data.sources import ArraySource, load_cifar_source, load_digits_source, load_idx_source

__all__ = ["DATASETS", "IMAGENET_MEAN", "IMAGENET_STD", "ArraySource", "DatasetEntry", "DatasetInfo", "EpochSampler",
           "convert_channels", "get_loaders", "load_image", "make_loaders", "register_dataset", "stratified_split",
           "verify_imagefolder"]

SourceFn = Callable[[Optional[str], float, bool], ArraySource]  # (root, val_fraction, download) -> split arrays


@dataclass(frozen=True)
class DatasetEntry:
    """A registered dataset: what `get_loaders(name, ...)`, recipes and `zoo train --data` read."""

    description: str           # one line: what it is and where its files are found
    num_classes: int | None     # None: read from the data (image folders)
    source: SourceFn | None     # builds the train/val arrays; None: the image-folder reader


DATASETS: dict[str, DatasetEntry] = {}  # name -> entry, in registration order; add with register_dataset


def register_dataset(name: str, description: str, num_classes: int | None, source: SourceFn) -> None:
    """Make `name` a dataset of get_loaders, recipes and `zoo train --data`: `source(root, val_fraction,
    download)` returns its images as an ArraySource (uint8 (N, C, H, W) tensors, already split)."""
    if not isinstance(name, str) or not re.fullmatch(r"[a-z][a-z0-9_]*", name):
        raise ZooError(f"register_dataset: name {name!r} is not allowed; expected lowercase letters, digits and _")
    if name in DATASETS:
        raise ZooError(f"register_dataset: {name!r} is already registered ({DATASETS[name].description})")
    if num_classes is not None and (isinstance(num_classes, bool) or not isinstance(num_classes, int)
                                    or num_classes < 2):
        raise ZooError(f"register_dataset: num_classes={num_classes!r} is not allowed; expected an int >= 2")
    if not callable(source):
        raise ZooError(f"register_dataset: source={source!r} is not callable; expected "
                       "source(root, val_fraction, download) -> ArraySource")
    DATASETS[name] = DatasetEntry(str(description), num_classes, source)


register_dataset("digits", "scikit-learn 8x8 digits, 1,797 images, 10 classes (embedded, no download)", 10,
                 lambda root, val_fraction, download: load_digits_source(val_fraction))
register_dataset("mnist", "MNIST IDX files, 60,000 / 10,000 (root, $ZOO_MNIST or $ZOO_DATA/mnist)", 10,
                 lambda root, val_fraction, download: load_idx_source("mnist", root, val_fraction))
register_dataset("fashion_mnist", "Fashion-MNIST IDX files, 60,000 / 10,000 (root, $ZOO_FASHION_MNIST or "
                 "$ZOO_DATA/fashion_mnist)", 10,
                 lambda root, val_fraction, download: load_idx_source("fashion_mnist", root, val_fraction))
register_dataset("cifar10", "CIFAR-10: a torchvision folder (lossless, downloads when online) or the JPEG q75 "
                 "copy's train.npz/test.npz (root, $ZOO_CIFAR10 or $ZOO_DATA/cifar10)", 10,
                 lambda root, val_fraction, download: load_cifar_source("cifar10", root, download))
register_dataset("cifar100", "CIFAR-100 via torchvision (root, $ZOO_CIFAR100 or $ZOO_DATA/cifar100)", 100,
                 lambda root, val_fraction, download: load_cifar_source("cifar100", root, download))
DATASETS["imagefolder"] = DatasetEntry("your images: root/<class>/* or root/train/<class>/* + root/val/<class>/*",
                                       None, None)  # the one entry without an array source
QUICK_TRAIN, QUICK_VAL = 256, 128  # quick=True: class-balanced subsets of this many images


def _check_args(name, input_size, batch_size, seed, num_workers, val_fraction) -> tuple[int, int, int]:
    if name not in DATASETS:
        raise ZooError(f"unknown dataset {name!r}; available: {', '.join(DATASETS)}")
    ok = isinstance(input_size, (tuple, list)) and len(input_size) == 3 and all(
        isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in input_size)
    if not ok:
        raise ZooError(f"input_size={input_size!r} is not allowed; expected (C, H, W) positive ints")
    if input_size[0] not in (1, 3):
        raise ZooError(f"input_size={tuple(input_size)} has {input_size[0]} channels; datasets deliver 1 or 3")
    for key, v, lo in (("batch_size", batch_size, 1), ("seed", seed, 0), ("num_workers", num_workers, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ZooError(f"{key}={v!r} is not allowed; expected int >= {lo}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ZooError(f"val_fraction={val_fraction!r} is not allowed; expected a float in (0, 1)")
    return tuple(int(v) for v in input_size)


IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)  # torchvision's ImageNet models


def _check_norm(mean: Sequence[float] | None, std: Sequence[float] | None, channels: int) -> tuple | None:
    if mean is None and std is None:
        return None
    for key, v in (("mean", mean), ("std", std)):
        ok = isinstance(v, (tuple, list)) and len(v) == channels and all(
            isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in v)
        if not ok:
            raise ZooError(f"{key}={v!r} is not allowed; expected {channels} finite numbers (one per channel), "
                           "given together with the other of mean/std")
    if min(std) <= 0:
        raise ZooError(f"std={std!r} is not allowed; every value must be > 0")
    return tuple(float(x) for x in mean), tuple(float(x) for x in std)


def _subset_source(src: ArraySource) -> ArraySource:
    tr, va = stratified_subset(src.train_y, QUICK_TRAIN), stratified_subset(src.val_y, QUICK_VAL)
    return ArraySource(src.train_x[torch.from_numpy(tr)], src.train_y[tr], src.val_x[torch.from_numpy(va)],
                       src.val_y[va], src.scale, src.class_names, src.split + f", quick subset {len(tr)}/{len(va)}",
                       src.root, src.title)


def _array_datasets(src: ArraySource, input_size, quick: bool, norm: tuple | None
                    ) -> tuple[Dataset, Dataset, tuple, tuple, ArraySource]:
    mean, std = norm or channel_stats(src.train_x, src.scale, input_size)  # on the full training split
    if quick:
        src = _subset_source(src)
    t = ImageTransform(input_size, mean, std)
    train = ArrayDataset(src.train_x, torch.from_numpy(src.train_y), src.scale, t)
    val = ArrayDataset(src.val_x, torch.from_numpy(src.val_y), src.scale, t)
    return train, val, mean, std, src


def dist_env() -> tuple[int, int]:
    """(world_size, rank) from the torchrun environment or an initialised process group."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))


def make_loaders(train: Dataset, val: Dataset, batch_size: int, seed: int = 0, num_workers: int = 0,
                 distributed: bool = False) -> tuple[DataLoader, DataLoader]:
    """Train loader (epoch-seeded shuffling, drop_last) and sequential val loader for two datasets."""
    if distributed:
        world, rank = dist_env()
        if world < 2:
            raise ZooError("distributed=True needs a multi-process launch (torchrun sets WORLD_SIZE > 1); "
                           f"WORLD_SIZE is {world}")
        sampler = DistributedSampler(train, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    else:
        sampler = EpochSampler(len(train), seed)
    g = torch.Generator()
    g.manual_seed(seed)
    extra = {"persistent_workers": True, "worker_init_fn": seed_worker} if num_workers else {}
    # drop the ragged last batch (a batch of 1 breaks BatchNorm) unless that would leave no batch at all
    train_loader = DataLoader(train, batch_size=batch_size, sampler=sampler, num_workers=num_workers,
                              drop_last=len(sampler) >= batch_size, generator=g, **extra)
    val_loader = DataLoader(val, batch_size=batch_size, shuffle=False, num_workers=num_workers, **extra)
    return train_loader, val_loader


def get_loaders(name: str, input_size: tuple[int, int, int], batch_size: int = 64, root: str | None = None,
                seed: int = 0, quick: bool = False, num_workers: int = 0, val_fraction: float = 0.2,
                distributed: bool = False, download: bool = True, verify: bool = False,
                mean: Sequence[float] | None = None, std: Sequence[float] | None = None
                ) -> tuple[DataLoader, DataLoader, DatasetInfo]:
    """Deterministic (train, val) loaders and a DatasetInfo for a dataset, at the model's input size.

    Splits are fixed (seed-independent); `seed` only drives shuffling. `quick` keeps class-balanced
    subsets of QUICK_TRAIN / QUICK_VAL images. `download` lets CIFAR fetch missing data; `verify`
    decodes every image of an imagefolder dataset up front. Images are normalised with the training
    split's per-channel mean/std (as delivered: resized, channel-converted), unless `mean` and `std`
    are given, e.g. IMAGENET_MEAN / IMAGENET_STD for models pretrained with those.
    """
    input_size = _check_args(name, input_size, batch_size, seed, num_workers, val_fraction)
    norm = _check_norm(mean, std, input_size[0])
    if DATASETS[name].source is None:
        src = scan_imagefolder(root, val_fraction)
        if verify:
            verify_imagefolder(root, val_fraction)
        train_items, val_items, split = src.train, src.val, src.split
        mean, std = norm or folder_stats(train_items, input_size)
        if quick:
            tr = stratified_subset(np.array([y for _, y in train_items]), QUICK_TRAIN)
            va = stratified_subset(np.array([y for _, y in val_items]), QUICK_VAL)
            train_items, val_items = [train_items[i] for i in tr], [val_items[i] for i in va]
            split += f", quick subset {len(tr)}/{len(va)}"
        t = ImageTransform(input_size, mean, std)
        train, val = ImageFileDataset(train_items, t), ImageFileDataset(val_items, t)
        classes, folder, title = src.class_names, src.root, f"image folder {src.root}"
    else:
        asrc = DATASETS[name].source(root, val_fraction, download)
        if not isinstance(asrc, ArraySource):
            raise ZooError(f"dataset {name!r}: its source returned {type(asrc).__name__}; expected an ArraySource")
        train, val, mean, std, asrc = _array_datasets(asrc, input_size, quick, norm)
        classes, split, folder, title = asrc.class_names, asrc.split, asrc.root, asrc.title
    train_loader, val_loader = make_loaders(train, val, batch_size, seed, num_workers, distributed)
    info = DatasetInfo(name=name, num_classes=len(classes), class_names=list(classes), mean=mean, std=std,
                       input_size=input_size, num_train=len(train), num_val=len(val), split=split, root=folder,
                       title=title)
    return train_loader, val_loader, info
