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
from zoo.untrusted import short_repr

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


def check_class_paths(folder: Path, classes: list[str], root: Path) -> None:
    """Refuse class folders that resolve outside the root, onto or above `folder`, or onto each other.

    Symlinks are followed: a class folder linked to the root (or to another class) would read images
    twice or under a wrong label, and one linked elsewhere would read files outside the dataset.
    """
    top, here = root.resolve(), folder.resolve()
    real = {}
    for c in classes:
        r = (folder / c).resolve()
        if r == top or top not in r.parents:
            raise ZooError(f"class folder {folder / c} resolves to {r}, which is not inside the dataset root {top}; "
                           "class folders (and their symlinks) must stay inside the root")
        if r == here or r in here.parents:
            raise ZooError(f"class folder {folder / c} resolves to {r}, the folder that holds it or one above it, "
                           "so it would contain the other classes; class folders must be separate folders")
        real[r] = c
    if len(real) < len(classes):
        raise ZooError(f"two class folders in {folder} resolve to the same folder; each class needs its own")
    order = sorted(real, key=lambda r: r.parts)
    for a, b in zip(order, order[1:]):  # a folder and one inside it sort next to each other
        if b.parts[: len(a.parts)] == a.parts:
            raise ZooError(f"class folder {folder / real[b]} lies inside class folder {folder / real[a]} (after "
                           "resolving symlinks); each class needs its own folder")


def _scan(folder: Path, what: str, root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    try:
        return _scan_folder(folder, what, root)
    except (OSError, RuntimeError) as e:  # unreadable folders, symlink loops (Path.resolve raises RuntimeError)
        raise ZooError(f"cannot read the {what} folder {folder}: {e}; {LAYOUT}") from None


def _scan_folder(folder: Path, what: str, root: Path) -> tuple[list[str], list[tuple[str, int]]]:
    classes = _class_dirs(folder)
    if not classes:
        raise ZooError(f"no class folders in {what} folder {folder}; {LAYOUT}")
    check_class_paths(folder, classes, root)
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
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 < val_fraction < 1:
        raise ZooError(f"val_fraction={short_repr(val_fraction)} is not allowed; expected a float in (0, 1)")
    root = Path(root)
    if not root.is_dir():
        raise ZooError(f"image folder {root} does not exist; {LAYOUT}")
    train_dir, val_dir = root / "train", root / "val"
    if val_dir.is_dir() and not train_dir.is_dir():
        raise ZooError(f"{root} has a val/ folder but no train/ folder; {LAYOUT}")
    base = train_dir if train_dir.is_dir() else root
    classes, train = _scan(base, "training", root)
    if len(classes) < 2:
        raise ZooError(f"{base} holds a single class ({classes[0]!r}); classification needs at least 2 "
                       "class folders")
    if val_dir.is_dir():
        vclasses, val = _scan(val_dir, "validation", root)
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
