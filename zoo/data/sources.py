"""Array datasets of the zoo: scikit-learn digits (embedded), MNIST (LeCun et al. 1998) and Fashion-MNIST
(Xiao et al. 2017) from IDX files, CIFAR-10/100 (Krizhevsky 2009) read through torchvision, and the
CIFAR-10 JPEG q75 copy of the shared data's cifar10/ (train.npz / test.npz).

Files outside the package are found through the data root: $ZOO_DATA (the CLI's `zoo --data-root DIR`
sets it), or a per-dataset variable ($ZOO_MNIST, $ZOO_CIFAR10, ...), or a `root` argument; never through a
path relative to the package or the checkout.

Each reader returns an `ArraySource`: uint8 images (N, C, H, W) with labels for train and val.
"""

from __future__ import annotations

import gzip
import io
import os
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from zoo.errors import ZooError
from zoo.data.common import stratified_split

DATA_ENV = "ZOO_DATA"


@dataclass
class ArraySource:
    """Images and labels of one dataset, already split into train and val."""

    train_x: torch.Tensor  # (N, C, H, W) uint8
    train_y: np.ndarray
    val_x: torch.Tensor
    val_y: np.ndarray
    scale: float  # multiply by this to get [0, 1]
    class_names: list[str]
    split: str
    root: str | None = None
    title: str = ""  # the dataset as named in tables, e.g. "CIFAR-10 (JPEG q75 copy)"


def data_root() -> Path:
    """Base folder of the shared datasets: $ZOO_DATA; a ZooError naming it when it is not set."""
    env = os.environ.get(DATA_ENV)
    if not env:
        raise ZooError(f"no data folder: ${DATA_ENV} is not set; set it (or pass `zoo --data-root DIR`) to the "
                       "folder holding the shared datasets (mnist/, fashion_mnist/, cifar10/, pretrained/)")
    return Path(env).expanduser()


def _split_arrays(x: torch.Tensor, y: np.ndarray, val_fraction: float, names: list[str]) -> tuple:
    tr, va = stratified_split(y, val_fraction, names)
    return x[torch.from_numpy(tr)], y[tr], x[torch.from_numpy(va)], y[va]


def load_digits_source(val_fraction: float) -> ArraySource:
    """scikit-learn's 1,797 8x8 digits (values 0..16), fixed stratified split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.uint8)).unsqueeze(1)  # (1797, 1, 8, 8), exact integers 0..16
    y = d.target.astype(np.int64)
    names = [str(i) for i in range(10)]
    trx, tr_y, vax, va_y = _split_arrays(x, y, val_fraction, names)
    split = f"stratified {1 - val_fraction:.0%}/{val_fraction:.0%} of the 1,797 images (fixed, seed-independent)"
    return ArraySource(trx, tr_y, vax, va_y, 1 / 16, names, split, None, "scikit-learn digits (8x8)")


# ---------------------------------------------------------------------------------- MNIST, Fashion-MNIST

IDX_IMAGES, IDX_LABELS = 2051, 2049  # magic numbers of idx3 (uint8 images) and idx1 (uint8 labels)


@dataclass(frozen=True)
class IdxSet:
    """An MNIST-format dataset: where its IDX files live and what its classes are."""

    name: str  # zoo dataset name, also the folder under the data root and the $ZOO_<NAME> variable
    title: str  # as printed in tables and messages
    url: str  # where users with internet get the files
    classes: tuple[str, ...]


MNIST = IdxSet("mnist", "MNIST", "https://ossci-datasets.s3.amazonaws.com/mnist/", tuple(str(i) for i in range(10)))
FASHION_MNIST = IdxSet(  # Xiao et al. 2017; the offline copy is ordered by class (the loaders shuffle)
    "fashion_mnist", "Fashion-MNIST", "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
    ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"))
IDX_SETS = {d.name: d for d in (MNIST, FASHION_MNIST)}
MNIST_URL = MNIST.url


def idx_root(ds: IdxSet, root: str | os.PathLike | None) -> Path:
    """The dataset folder: `root`, else $ZOO_<NAME>, else <data root>/<name>."""
    if root is not None:
        return Path(root)
    env = os.environ.get("ZOO_" + ds.name.upper())
    return Path(env) if env else data_root() / ds.name


def mnist_root(root: str | os.PathLike | None) -> Path:
    """The MNIST folder: `root`, else $ZOO_MNIST, else <data root>/mnist."""
    return idx_root(MNIST, root)


def _read_bytes(path: Path, ds: IdxSet) -> bytes:
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, OSError, zlib.error) as e:
        raise ZooError(f"cannot read {ds.title} file {path}: {e}; the file is truncated or corrupt, "
                       f"download it again from {ds.url}") from None


def read_idx(path: Path, magic: int, ds: IdxSet = MNIST) -> np.ndarray:
    """Read an IDX file (gzip or raw), checking its magic number and exact size."""
    data = _read_bytes(path, ds)
    ndim = 3 if magic == IDX_IMAGES else 1
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ZooError(f"{ds.title} file {path} is truncated: {len(data)} bytes, shorter than its header")
    found = int.from_bytes(data[:4], "big")
    if found != magic:
        raise ZooError(f"{ds.title} file {path} has magic number {found}, expected {magic} "
                       f"({'idx3 images' if magic == IDX_IMAGES else 'idx1 labels'}); wrong or corrupt file")
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    expected = header + int(np.prod(dims))
    if len(data) != expected:
        raise ZooError(f"{ds.title} file {path} has {len(data)} bytes but its header {dims} needs {expected}; "
                       "the file is truncated or corrupt")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _read_pair(folder: Path, prefix: str, ds: IdxSet) -> tuple[torch.Tensor, np.ndarray]:
    ip, lp = _find(folder, f"{prefix}-images-idx3-ubyte"), _find(folder, f"{prefix}-labels-idx1-ubyte")
    wanted = ((f"{prefix}-images-idx3-ubyte.gz", ip), (f"{prefix}-labels-idx1-ubyte.gz", lp))
    missing = [s for s, p in wanted if p is None]
    if missing:
        raise ZooError(f"{ds.title} file(s) {', '.join(missing)} missing in {folder}")
    images, labels = read_idx(ip, IDX_IMAGES, ds), read_idx(lp, IDX_LABELS, ds)
    if len(images) != len(labels):
        raise ZooError(f"{ds.title} files disagree: {ip} has {len(images)} images, {lp} has {len(labels)} labels")
    if labels.size and labels.max() >= len(ds.classes):
        raise ZooError(f"{ds.title} labels in {lp} go up to {labels.max()}; expected 0..{len(ds.classes) - 1}")
    return torch.from_numpy(images.copy()).unsqueeze(1), labels.astype(np.int64)


def load_idx_source(name: str, root: str | os.PathLike | None, val_fraction: float) -> ArraySource:
    """MNIST or Fashion-MNIST: train-*/t10k-* if both exist, else a fixed stratified split of t10k-*."""
    ds = IDX_SETS[name]
    folder = idx_root(ds, root)
    names = list(ds.classes)
    how = (f"download t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz (and the train-* files) from "
           f"{ds.url} into it, or point root= / $ZOO_{name.upper()} at a folder holding them")
    if not folder.is_dir():
        raise ZooError(f"{ds.title} folder {folder} does not exist; {how}")
    if _find(folder, "t10k-images-idx3-ubyte") is None and _find(folder, "t10k-labels-idx1-ubyte") is None:
        raise ZooError(f"no {ds.title} files in {folder}; {how}")
    vx, vy = _read_pair(folder, "t10k", ds)
    has_train = [_find(folder, f"train-{k}") for k in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    if any(has_train):
        tx, ty = _read_pair(folder, "train", ds)
        return ArraySource(tx, ty, vx, vy, 1 / 255, names, f"official {len(ty):,} train / {len(vy):,} test splits",
                           str(folder), ds.title)
    trx, tr_y, vax, va_y = _split_arrays(vx, vy, val_fraction, names)
    split = (f"no train files: stratified {len(tr_y)}/{len(va_y)} split of the {len(vy)}-image {ds.title} test set "
             "(fixed, seed-independent)")
    return ArraySource(trx, tr_y, vax, va_y, 1 / 255, names, split, str(folder), ds.title)


# ---------------------------------------------------------------------------------------------- CIFAR

def _tv_classes():
    from torchvision.datasets import CIFAR10, CIFAR100

    class _C10(CIFAR10):
        # Files are checked for presence only (their content is validated after loading), so data
        # rebuilt or subsetted by the user still loads; downloads keep torchvision's archive MD5 check.
        train_list = [[f, None] for f, _ in CIFAR10.train_list]
        test_list = [[f, None] for f, _ in CIFAR10.test_list]
        meta = {**CIFAR10.meta, "md5": None}

    class _C100(CIFAR100):
        train_list = [[f, None] for f, _ in CIFAR100.train_list]
        test_list = [[f, None] for f, _ in CIFAR100.test_list]
        meta = {**CIFAR100.meta, "md5": None}

    return {"cifar10": _C10, "cifar100": _C100}


def cifar_root(name: str, root: str | os.PathLike | None) -> Path:
    """torchvision root for CIFAR (the folder holding cifar-10-batches-py / cifar-100-python)."""
    env = os.environ.get("ZOO_" + name.upper())
    folder = Path(root) if root is not None else Path(env) if env else data_root() / name
    if folder.name in ("cifar-10-batches-py", "cifar-100-python"):  # the batches folder itself
        folder = folder.parent
    return folder


def download_cifar(cls, root: Path) -> None:
    """Fetch and extract the CIFAR archive into `root` (torchvision's downloader, MD5-checked)."""
    cls(str(root), train=True, download=True)


def load_cifar_source(name: str, root: str | os.PathLike | None, download: bool) -> ArraySource:
    """CIFAR-10/100 train (50,000) and test (10,000, used as val): a lossless torchvision folder if the
    root holds one, else (CIFAR-10) the JPEG q75 copy's train.npz / test.npz, else a download."""
    cls = _tv_classes()[name]
    folder = cifar_root(name, root)
    sub = folder / cls.base_folder
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [f for f in files if not (sub / f).is_file()]
    if name == "cifar10" and len(missing) == len(files) and any((folder / f).is_file() for f in JPEG_FILES):
        return load_cifar_jpeg(folder)
    how = (f"download {cls.url}, extract it into {folder} (giving {sub}/{files[0]}), or pass root= / set "
           f"$ZOO_{name.upper()} to a folder that holds {cls.base_folder}")
    if missing and len(missing) < len(files):
        raise ZooError(f"{name}: incomplete data in {sub}: missing {', '.join(missing)}; {how}")
    if missing:
        if not download:
            raise ZooError(f"{name}: no data in {folder} and download=False; {how}")
        try:
            download_cifar(cls, folder)
        except Exception as e:  # no network, proxy, disk full: all end the same way for the user
            raise ZooError(f"{name}: no data in {folder} and the download failed ({type(e).__name__}: {e}); "
                           f"{how}") from None
    out = []
    try:
        for train in (True, False):
            ds = cls(str(folder), train=train, download=False)
            out.append((np.asarray(ds.data), np.asarray(ds.targets, dtype=np.int64)))
        classes = list(ds.classes)
    except Exception as e:  # unpickling errors, missing keys, bad reshape: a corrupt or foreign file
        raise ZooError(f"{name}: cannot read the data in {sub} ({type(e).__name__}: {e}); the files are "
                       f"corrupt or not in the CIFAR python format; {how}") from None
    want = 10 if name == "cifar10" else 100
    if len(classes) != want:
        raise ZooError(f"{name}: {sub}/{cls.meta['filename']} lists {len(classes)} classes, expected {want}")
    for (x, y), part in zip(out, ("train", "test")):
        if x.dtype != np.uint8 or x.shape[1:] != (32, 32, 3) or len(x) != len(y):
            raise ZooError(f"{name}: {part} data in {sub} has shape {x.shape} ({x.dtype}) for {len(y)} labels; "
                           "expected (N, 32, 32, 3) uint8")
        if len(y) and (y.min() < 0 or y.max() >= want):
            raise ZooError(f"{name}: {part} labels in {sub} span {y.min()}..{y.max()}; expected 0..{want - 1}")
    (tx, ty), (vx, vy) = out
    to_t = lambda a: torch.from_numpy(np.ascontiguousarray(a.transpose(0, 3, 1, 2)))  # noqa: E731
    title = "CIFAR-10" if name == "cifar10" else "CIFAR-100"
    return ArraySource(to_t(tx), ty, to_t(vx), vy, 1 / 255, classes, "official train / test splits (lossless)",
                       str(folder), title)


# ----------------------------------------------------------------------------------- CIFAR-10 JPEG q75

JPEG_TITLE = "CIFAR-10 (JPEG q75 copy)"
JPEG_FILES = ("train.npz", "test.npz")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
_JPEG_CACHE: dict[tuple[str, int, int], tuple[torch.Tensor, np.ndarray]] = {}  # decoded once per process


def _read_jpeg_npz(path: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(jpeg bytes, offsets, labels) of one npz file, checked against the format of the data README."""
    bad = f"CIFAR-10 JPEG file {path}"
    try:
        with np.load(path, allow_pickle=False) as z:
            lacking = [k for k in ("jpeg", "offsets", "labels") if k not in z.files]
            if lacking:
                raise ZooError(f"{bad} lacks the array(s) {', '.join(lacking)}; expected arrays jpeg, offsets, "
                               "labels, classes")
            jpeg, offsets, labels = z["jpeg"], z["offsets"], z["labels"]
            classes = tuple(str(c) for c in z["classes"]) if "classes" in z.files else CIFAR10_CLASSES
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        raise ZooError(f"cannot read {bad}: {type(e).__name__}: {e}; expected an npz archive (no pickle) "
                       "with arrays jpeg, offsets, labels, classes") from None
    n = len(labels)
    if jpeg.dtype != np.uint8 or jpeg.ndim != 1 or offsets.shape != (n + 1,) or n == 0:
        raise ZooError(f"{bad}: jpeg {jpeg.dtype}{list(jpeg.shape)}, offsets {list(offsets.shape)} for {n} labels; "
                       "expected 1-D uint8 jpeg and N+1 offsets")
    if offsets[0] != 0 or offsets[-1] != len(jpeg) or np.any(np.diff(offsets) <= 0):
        raise ZooError(f"{bad}: offsets are not increasing from 0 to {len(jpeg)} (the jpeg length); corrupt file")
    if labels.min() < 0 or labels.max() > 9:
        raise ZooError(f"{bad}: labels span {labels.min()}..{labels.max()}; expected 0..9")
    if classes != CIFAR10_CLASSES:
        raise ZooError(f"{bad}: classes {list(classes)} differ from CIFAR-10's {list(CIFAR10_CLASSES)}")
    return jpeg, offsets, labels.astype(np.int64)


def _decode_all(path: Path, jpeg: np.ndarray, offsets: np.ndarray) -> torch.Tensor:
    """Decode each JPEG with PIL to uint8 (N, 3, 32, 32); a bad image is named by its index."""
    out = np.empty((len(offsets) - 1, 32, 32, 3), dtype=np.uint8)
    for i in range(len(out)):
        try:
            img = Image.open(io.BytesIO(jpeg[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB")
        except (OSError, ValueError) as e:
            raise ZooError(f"CIFAR-10 JPEG file {path}: image {i} does not decode ({e}); corrupt file") from None
        if img.size != (32, 32):
            raise ZooError(f"CIFAR-10 JPEG file {path}: image {i} is {img.size[0]}x{img.size[1]}; expected 32x32")
        out[i] = np.asarray(img)
    return torch.from_numpy(out.transpose(0, 3, 1, 2).copy())


def decode_jpeg_npz(path: Path) -> tuple[torch.Tensor, np.ndarray]:
    """Decode every image of a CIFAR-10 JPEG npz to uint8 (N, 3, 32, 32), once per process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _JPEG_CACHE:
        jpeg, offsets, labels = _read_jpeg_npz(path)
        _JPEG_CACHE[key] = (_decode_all(path, jpeg, offsets), labels)
    return _JPEG_CACHE[key]


def load_cifar_jpeg(folder: Path) -> ArraySource:
    """The CIFAR-10 JPEG q75 copy (train.npz 50,000 / test.npz 10,000), decoded to uint8 arrays."""
    missing = [f for f in JPEG_FILES if not (folder / f).is_file()]
    if missing:
        raise ZooError(f"CIFAR-10 JPEG copy in {folder}: missing {', '.join(missing)}; expected train.npz and "
                       "test.npz (arrays jpeg, offsets, labels, classes)")
    tx, ty = decode_jpeg_npz(folder / "train.npz")
    vx, vy = decode_jpeg_npz(folder / "test.npz")
    split = f"official {len(ty):,} train / {len(vy):,} test splits, each image JPEG-compressed once (quality 75)"
    return ArraySource(tx, ty, vx, vy, 1 / 255, list(CIFAR10_CLASSES), split, str(folder), JPEG_TITLE)
