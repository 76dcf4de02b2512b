"""Custom image datasets in the class-per-folder layout (as torchvision's ImageFolder reads it).

`root/train/<class>/...` and `root/val/<class>/...`, or `root/<class>/...` (also `root/train/<class>`
without val/) with a fixed stratified split. Images may be PNG, JPEG, BMP, GIF, TIFF or WebP, in any
PIL mode (L, RGB, RGBA, P, LA, 16-bit, CMYK...) and any size; transparency is composited onto white.
Problems fail with one message naming the folder or file: nothing is skipped silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from zoo.errors import ZooError
from zoo.data.common import ImageTransform, stratified_split

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")
LAYOUT = "expected root/<class>/<images> or root/train/<class>/<images> with root/val/<class>/<images>"


@dataclass
class FolderSource:
    """Image files and labels of an image-folder dataset, split into train and val."""

    train: list[tuple[str, int]]
    val: list[tuple[str, int]]
    class_names: list[str]
    split: str
    root: str


def _hidden(name: str) -> bool:
    return name.startswith(".") or name == "__MACOSX"


def _class_dirs(folder: Path) -> list[str]:
    names = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not _hidden(e.name))
    loose = sorted(e.name for e in os.scandir(folder)
                   if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS))
    if loose:
        raise ZooError(f"images must sit inside class folders, but {folder} holds {len(loose)} loose image(s), "
                       f"e.g. {loose[0]!r}; {LAYOUT}")
    return names


def _class_files(folder: Path) -> list[str]:
    """Image files under one class folder (recursively, sorted); other non-hidden files are errors."""
    out = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not _hidden(d))
        for f in sorted(filenames):
            if _hidden(f):
                continue
            p = os.path.join(dirpath, f)
            if not f.lower().endswith(IMAGE_EXTENSIONS):
                raise ZooError(f"{p} is not an image file; class folders may hold only "
                               + ", ".join(IMAGE_EXTENSIONS) + " files")
            out.append(p)
    return out


def _scan(folder: Path, what: str) -> tuple[list[str], list[tuple[str, int]]]:
    classes = _class_dirs(folder)
    if not classes:
        raise ZooError(f"no class folders in {what} folder {folder}; {LAYOUT}")
    items = []
    for i, c in enumerate(classes):
        files = _class_files(folder / c)
        if not files:
            raise ZooError(f"class folder {folder / c} (class {c!r}) holds no images "
                           f"({', '.join(IMAGE_EXTENSIONS)})")
        items += [(f, i) for f in files]
    return classes, items


def scan_imagefolder(root: str | os.PathLike, val_fraction: float) -> FolderSource:
    """Find classes and image files; split train/val when there is no val/ folder."""
    if root is None:
        raise ZooError(f"the imagefolder dataset needs root= (a folder of class folders); {LAYOUT}")
    root = Path(root)
    if not root.is_dir():
        raise ZooError(f"image folder {root} does not exist; {LAYOUT}")
    train_dir, val_dir = root / "train", root / "val"
    if val_dir.is_dir() and not train_dir.is_dir():
        raise ZooError(f"{root} has a val/ folder but no train/ folder; {LAYOUT}")
    base = train_dir if train_dir.is_dir() else root
    classes, train = _scan(base, "training")
    if len(classes) < 2:
        raise ZooError(f"{base} holds a single class ({classes[0]!r}); classification needs at least 2 "
                       "class folders")
    if val_dir.is_dir():
        vclasses, val = _scan(val_dir, "validation")
        if vclasses != classes:
            only_t = sorted(set(classes) - set(vclasses))
            only_v = sorted(set(vclasses) - set(classes))
            raise ZooError(f"train/ and val/ in {root} have different classes: only in train/: {only_t}, "
                           f"only in val/: {only_v}")
        return FolderSource(train, val, classes, "given train/ and val/ folders", str(root))
    labels = np.array([y for _, y in train])
    tr, va = stratified_split(labels, val_fraction, classes)
    split = (f"stratified {len(tr)}/{len(va)} split of {base} (fixed, seed-independent)")
    return FolderSource([train[i] for i in tr], [train[i] for i in va], classes, split, str(root))


def load_image(path: str) -> torch.Tensor:
    """Decode an image file to a float (C, H, W) tensor in [0, 1], C = 1 (grey) or 3 (colour)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return _to_tensor(im)
    except ZooError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, DecompressionBombError...
        raise ZooError(f"cannot read image {path}: {type(e).__name__}: {e}") from None


def _to_tensor(im) -> torch.Tensor:
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode in ("1", "L"):
        im = im.convert("L")
    elif mode in ("CMYK", "YCbCr", "LAB", "HSV", "RGBX"):
        im = im.convert("RGB")
    mode = im.mode
    if mode.startswith("I;16") or mode == "I":
        a = np.asarray(im, dtype=np.float32) / 65535.0
    elif mode == "F":
        a = np.clip(np.asarray(im, dtype=np.float32), 0.0, 1.0)
    elif mode in ("L", "LA", "RGB", "RGBA"):
        a = np.asarray(im, dtype=np.float32) / 255.0
    elif mode in ("La", "RGBa"):
        a = np.asarray(im.convert("RGBA" if mode == "RGBa" else "LA"), dtype=np.float32) / 255.0
        mode = "RGBA" if mode == "RGBa" else "LA"
    else:
        raise ZooError(f"unsupported image mode {im.mode!r}")
    if a.ndim == 2:
        a = a[:, :, None]
    if mode in ("LA", "RGBA"):  # composite onto white
        alpha = a[:, :, -1:]
        a = a[:, :, :-1] * alpha + (1.0 - alpha)
    return torch.from_numpy(np.ascontiguousarray(a.transpose(2, 0, 1)))


class ImageFileDataset(Dataset):
    """Image files decoded on access and transformed to the model's input."""

    def __init__(self, items: list[tuple[str, int]], transform: ImageTransform):
        self.items, self.transform = items, transform

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        path, y = self.items[i]
        return self.transform(load_image(path)[None])[0], y


def folder_stats(items: list[tuple[str, int]], input_size: tuple[int, int, int], max_images: int = 256
                 ) -> tuple[tuple, tuple]:
    """Per-channel mean/std over up to `max_images` evenly spaced training images at the input size."""
    if not items:
        raise ZooError("cannot compute normalisation statistics of an empty training split")
    t = ImageTransform(input_size)
    idx = np.unique(np.linspace(0, len(items) - 1, min(max_images, len(items))).round().astype(int))
    x = torch.cat([t(load_image(items[i][0])[None]) for i in idx]).double()
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3), unbiased=False).clamp_min(1e-6)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def verify_imagefolder(root: str | os.PathLike, val_fraction: float = 0.2) -> int:
    """Open and fully decode every image of an image-folder dataset; return the count or raise ZooError.

    All unreadable files are listed (up to 10) in one message.
    """
    src = scan_imagefolder(root, val_fraction)
    bad = []
    items = src.train + src.val
    for path, _ in items:
        try:
            load_image(path)
        except ZooError as e:
            bad.append(str(e))
    if bad:
        more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
        raise ZooError(f"{len(bad)} unreadable image(s) in {root}{more}:\n  " + "\n  ".join(bad[:10]))
    return len(items)
