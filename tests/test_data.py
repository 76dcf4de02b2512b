"""Tests of zoo.data: shapes, channels and normalisation of every dataset, deterministic stratified
splits and shuffling, and one clear error for each kind of bad data."""

from __future__ import annotations

import gzip
import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo.data.sources as sources
from zoo.data import DatasetInfo, convert_channels, get_loaders, load_image, stratified_split, verify_imagefolder
from zoo.data.common import EpochSampler
from zoo.errors import ZooError


def _all(loader) -> tuple[torch.Tensor, torch.Tensor]:
    xs, ys = zip(*(loader.dataset[i] for i in range(len(loader.dataset))))
    return torch.stack(xs), torch.tensor(ys)


# ---------------------------------------------------------------------------------------------- digits

@pytest.mark.parametrize("size", [(1, 8, 8), (3, 32, 32), (1, 28, 28)])
def test_digits_shapes_and_normalisation(size):
    tr, va, info = get_loaders("digits", size, batch_size=50)
    assert isinstance(info, DatasetInfo)
    assert (info.num_classes, info.class_names) == (10, [str(i) for i in range(10)])
    assert (info.num_train, info.num_val) == (1438, 359)  # round(1797 * 0.2) = 359 in val
    assert info.input_size == size and len(info.mean) == len(info.std) == size[0]
    x, y = next(iter(tr))
    assert x.shape == (50, *size) and x.dtype == torch.float32 and y.dtype == torch.int64
    xs, _ = _all(tr)
    # statistics are computed on the training split as delivered, so it is standardised
    assert xs.mean(dim=(0, 2, 3)).abs().max() < 1e-3
    assert (xs.std(dim=(0, 2, 3)) - 1).abs().max() < 1e-3
    if size[0] == 3:
        assert torch.equal(xs[:, 0], xs[:, 1]) and torch.equal(xs[:, 1], xs[:, 2])  # grey repeated


def test_digits_native_values():
    """At 8x8 no resize happens: (pixel / 16 - mean) / std exactly."""
    from sklearn.datasets import load_digits

    _, va, info = get_loaders("digits", (1, 8, 8))
    raw = load_digits().images / 16.0
    x0, _ = va.dataset[0]
    expect = (raw - info.mean[0]) / info.std[0]
    assert any(np.allclose(x0[0].numpy(), e, atol=1e-5) for e in expect)


def test_digits_split_stratified_fixed_and_disjoint():
    a = get_loaders("digits", (1, 8, 8), seed=0)
    b = get_loaders("digits", (1, 8, 8), seed=7)
    xa, ya = _all(a[1])
    xb, yb = _all(b[1])
    assert torch.equal(xa, xb) and torch.equal(ya, yb)  # same val set for every seed
    from sklearn.datasets import load_digits

    per_class = np.bincount(load_digits().target)
    val_counts = np.bincount(ya.numpy(), minlength=10)
    assert val_counts.sum() == 359
    assert np.all(np.abs(val_counts - 0.2 * per_class) <= 1)
    xt, _ = _all(a[0])
    flat_t = {tuple(v.flatten().tolist()) for v in xt}
    overlap = sum(tuple(v.flatten().tolist()) in flat_t for v in xa)
    # the digits set has a handful of exact duplicate images; only those may appear on both sides
    assert overlap <= 3


def test_stratified_split_counts():
    labels = np.array([0] * 50 + [1] * 30 + [2] * 7 + [3] * 2)
    tr, va = stratified_split(labels, 0.25)
    assert len(va) == round(89 * 0.25) and len(tr) + len(va) == 89
    assert set(tr).isdisjoint(va) and sorted(np.concatenate([tr, va])) == list(range(89))
    counts = np.bincount(labels[va], minlength=4)
    assert counts.tolist()[3] == 1 and all(c >= 1 for c in counts)  # every class on both sides
    assert np.array_equal(stratified_split(labels, 0.25)[1], va)  # deterministic
    with pytest.raises(ZooError, match="class 'b' has 1 image"):
        stratified_split(np.array([0, 0, 1]), 0.5, ["a", "b"])


def test_shuffling_depends_only_on_seed_and_epoch():
    def first_labels(seed, epoch):
        tr, _, _ = get_loaders("digits", (1, 8, 8), batch_size=32, seed=seed)
        tr.sampler.set_epoch(epoch)
        return next(iter(tr))[1]

    assert torch.equal(first_labels(0, 0), first_labels(0, 0))
    assert torch.equal(first_labels(3, 5), first_labels(3, 5))
    assert not torch.equal(first_labels(0, 0), first_labels(0, 1))
    assert not torch.equal(first_labels(0, 0), first_labels(1, 0))
    s = EpochSampler(10, seed=2)
    assert list(s) != list(s)  # without set_epoch each pass advances the epoch
    s.set_epoch(0)
    e0 = list(s)
    s.set_epoch(0)
    assert list(s) == e0 and sorted(e0) == list(range(10))


def test_quick_subsets_are_class_balanced():
    tr, va, info = get_loaders("digits", (1, 8, 8), quick=True)
    assert (info.num_train, info.num_val) == (256, 128)
    counts = np.bincount(_all(tr)[1].numpy(), minlength=10)
    assert counts.min() >= 24 and counts.max() <= 27


def test_bad_arguments():
    with pytest.raises(ZooError, match="unknown dataset 'svhn'; available: digits, mnist"):
        get_loaders("svhn", (3, 32, 32))
    with pytest.raises(ZooError, match=r"input_size=\(3, 32\)"):
        get_loaders("digits", (3, 32))
    with pytest.raises(ZooError, match="has 4 channels; datasets deliver 1 or 3"):
        get_loaders("digits", (4, 32, 32))
    with pytest.raises(ZooError, match="val_fraction=1.5"):
        get_loaders("digits", (1, 8, 8), val_fraction=1.5)
    with pytest.raises(ZooError, match="batch_size=0"):
        get_loaders("digits", (1, 8, 8), batch_size=0)
    with pytest.raises(ZooError, match="distributed=True needs a multi-process launch"):
        get_loaders("digits", (1, 8, 8), distributed=True)


def test_convert_channels_matches_pil_luminance():
    rgb = np.random.RandomState(0).randint(0, 256, (6, 5, 3)).astype(np.uint8)
    pil_l = np.asarray(Image.fromarray(rgb).convert("L"), dtype=np.float32)
    x = torch.from_numpy(rgb.transpose(2, 0, 1)).float()[None]
    ours = convert_channels(x, 1)[0, 0].numpy()
    assert np.abs(ours - pil_l).max() <= 0.51  # PIL rounds to integers
    grey = torch.rand(2, 1, 3, 3)
    assert torch.equal(convert_channels(grey, 3), grey.repeat(1, 3, 1, 1))
    with pytest.raises(ZooError, match="cannot convert 2-channel images to 3 channels"):
        convert_channels(torch.zeros(1, 2, 2, 2), 3)


# ---------------------------------------------------------------------------------------------- MNIST

def test_mnist_official_split(mnist_dir):
    if not (mnist_dir / "train-images-idx3-ubyte.gz").exists():
        pytest.skip(f"MNIST train files not found in {mnist_dir}")
    tr, va, info = get_loaders("mnist", (1, 28, 28), root=str(mnist_dir), batch_size=100)
    assert (info.num_train, info.num_val, info.title) == (60000, 10000, "MNIST")
    assert info.split == "official 60,000 train / 10,000 test splits"
    published = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]  # train class counts
    assert np.bincount(tr.dataset.labels.numpy(), minlength=10).tolist() == published
    assert np.bincount(va.dataset.labels.numpy(), minlength=10).tolist() == [980, 1135, 1032, 1010, 982, 892,
                                                                             958, 1028, 974, 1009]
    assert info.mean[0] == pytest.approx(0.1307, abs=2e-3)  # 4,096 evenly spaced training images


def test_mnist_split_8000_2000(mnist_dir, tmp_path):
    for f in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):  # only the test files
        (tmp_path / f).symlink_to(mnist_dir / f)
    tr, va, info = get_loaders("mnist", (1, 28, 28), root=str(tmp_path), batch_size=100)
    assert (info.num_train, info.num_val) == (8000, 2000)
    assert info.split.startswith("no train files: stratified 8000/2000 split")
    reference = np.array([980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009])  # test-split class counts
    val_counts = np.bincount(va.dataset.labels.numpy(), minlength=10)
    train_counts = np.bincount(tr.dataset.labels.numpy(), minlength=10)
    assert np.array_equal(val_counts + train_counts, reference)
    assert np.all(np.abs(val_counts - 0.2 * reference) <= 1)
    x, _ = next(iter(tr))
    assert x.shape == (100, 1, 28, 28)
    again = get_loaders("mnist", (1, 28, 28), root=str(tmp_path), seed=5)[1]
    assert torch.equal(again.dataset.labels, va.dataset.labels)


def _write_idx(folder: Path, prefix: str, n: int, gz: bool = True, seed: int = 0) -> None:
    rng = np.random.RandomState(seed)
    images = rng.randint(0, 256, (n, 28, 28)).astype(np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    blobs = {
        f"{prefix}-images-idx3-ubyte": (2051).to_bytes(4, "big") + b"".join(
            v.to_bytes(4, "big") for v in (n, 28, 28)) + images.tobytes(),
        f"{prefix}-labels-idx1-ubyte": (2049).to_bytes(4, "big") + n.to_bytes(4, "big") + labels.tobytes(),
    }
    folder.mkdir(parents=True, exist_ok=True)
    for name, blob in blobs.items():
        if gz:
            with gzip.open(folder / (name + ".gz"), "wb") as f:
                f.write(blob)
        else:
            (folder / name).write_bytes(blob)


def test_mnist_from_generated_idx(tmp_path, monkeypatch):
    _write_idx(tmp_path, "t10k", 100, gz=False)
    tr, va, info = get_loaders("mnist", (3, 32, 32), root=str(tmp_path))
    assert (info.num_train, info.num_val) == (80, 20) and info.input_size == (3, 32, 32)
    assert np.bincount(va.dataset.labels.numpy()).tolist() == [2] * 10
    assert va.dataset[0][0].shape == (3, 32, 32)
    _write_idx(tmp_path, "train", 60, gz=True, seed=1)  # with train-* files: official train / test
    monkeypatch.setenv("ZOO_MNIST", str(tmp_path))
    tr, va, info = get_loaders("mnist", (1, 28, 28))
    assert (info.num_train, info.num_val) == (60, 100) and info.split == "official 60 train / 100 test splits"


def test_mnist_bad_files(tmp_path):
    with pytest.raises(ZooError, match="MNIST folder .*nowhere does not exist; download t10k-images-idx3-ubyte.gz"):
        get_loaders("mnist", (1, 28, 28), root=str(tmp_path / "nowhere"))
    _write_idx(tmp_path, "t10k", 50)
    img = tmp_path / "t10k-images-idx3-ubyte.gz"
    blob = img.read_bytes()
    img.write_bytes(blob[: len(blob) // 2])  # truncated gzip stream
    with pytest.raises(ZooError, match="cannot read MNIST file .*t10k-images-idx3-ubyte.gz.*truncated or corrupt"):
        get_loaders("mnist", (1, 28, 28), root=str(tmp_path))
    with gzip.open(img, "wb") as f:  # valid gzip, but the IDX payload is cut short
        f.write(gzip.decompress(blob)[:-100])
    with pytest.raises(ZooError, match="t10k-images-idx3-ubyte.gz has 39116 bytes but its header"):
        get_loaders("mnist", (1, 28, 28), root=str(tmp_path))
    with gzip.open(img, "wb") as f:  # wrong magic number (a labels file where images belong)
        f.write(gzip.decompress((tmp_path / "t10k-labels-idx1-ubyte.gz").read_bytes()))
    with pytest.raises(ZooError, match="has magic number 2049, expected 2051"):
        get_loaders("mnist", (1, 28, 28), root=str(tmp_path))
    (tmp_path / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(ZooError, match="t10k-labels-idx1-ubyte.gz missing in"):
        get_loaders("mnist", (1, 28, 28), root=str(tmp_path))


# ---------------------------------------------------------------------------------------------- CIFAR

def _write_cifar(root: Path, name: str = "cifar10", per_file: int = 10) -> np.ndarray:
    """Tiny fake CIFAR in torchvision's python-pickle layout; returns the first training image (HWC)."""
    rng = np.random.RandomState(0)
    n_cls = 10 if name == "cifar10" else 100
    if name == "cifar10":
        folder, label_key = root / "cifar-10-batches-py", "labels"
        files = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
        meta_name, meta = "batches.meta", {"label_names": [f"class{i}" for i in range(n_cls)]}
    else:
        folder, files, label_key = root / "cifar-100-python", ["train", "test"], "fine_labels"
        meta_name, meta = "meta", {"fine_label_names": [f"c{i}" for i in range(n_cls)]}
    folder.mkdir(parents=True)
    first = None
    for f in files:
        data = rng.randint(0, 256, (per_file, 3072)).astype(np.uint8)
        first = data[0].reshape(3, 32, 32).transpose(1, 2, 0) if first is None else first
        with open(folder / f, "wb") as fh:
            pickle.dump({"data": data, label_key: [int(i % n_cls) for i in range(per_file)]}, fh)
    with open(folder / meta_name, "wb") as fh:
        pickle.dump(meta, fh)
    return first


def test_cifar10_from_generated_files(tmp_path):
    first = _write_cifar(tmp_path)
    tr, va, info = get_loaders("cifar10", (3, 32, 32), root=str(tmp_path), batch_size=8, download=False)
    assert (info.num_train, info.num_val, info.num_classes) == (50, 10, 10)
    assert info.class_names[:2] == ["class0", "class1"]
    x0, y0 = tr.dataset[0]
    expect = (torch.from_numpy(first.transpose(2, 0, 1)).float() / 255 - torch.tensor(info.mean).view(3, 1, 1)) \
        / torch.tensor(info.std).view(3, 1, 1)
    assert torch.allclose(x0, expect, atol=1e-5) and y0 == 0
    # the batches folder itself is accepted as root; grey output uses luminance
    tr, va, info = get_loaders("cifar10", (1, 16, 16), root=str(tmp_path / "cifar-10-batches-py"), download=False)
    assert tr.dataset[0][0].shape == (1, 16, 16) and len(info.mean) == 1


def test_cifar100_from_generated_files(tmp_path):
    _write_cifar(tmp_path, "cifar100", per_file=200)
    tr, va, info = get_loaders("cifar100", (3, 32, 32), root=str(tmp_path), download=False)
    assert (info.num_train, info.num_val, info.num_classes) == (200, 200, 100)


def test_cifar_missing_data_messages(tmp_path, monkeypatch):
    with pytest.raises(ZooError, match=r"cifar10: no data in .* and download=False; download https://www.cs.toronto"):
        get_loaders("cifar10", (3, 32, 32), root=str(tmp_path), download=False)

    def offline(cls, root):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(sources, "download_cifar", offline)  # no network: never really download in tests
    with pytest.raises(ZooError, match=r"the download failed \(URLError.*extract it into"):
        get_loaders("cifar10", (3, 32, 32), root=str(tmp_path))
    _write_cifar(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(ZooError, match="incomplete data in .*missing data_batch_3"):
        get_loaders("cifar10", (3, 32, 32), root=str(tmp_path))
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(b"not a pickle at all")
    with pytest.raises(ZooError, match="cannot read the data in .*corrupt or not in the CIFAR python format"):
        get_loaders("cifar10", (3, 32, 32), root=str(tmp_path))


# ---------------------------------------------------------------------------------------------- image folders

def _image(kind: str, size: tuple[int, int], value: int = 0) -> Image.Image:
    w, h = size
    if kind == "L":
        return Image.new("L", size, value)
    if kind == "RGB":
        return Image.new("RGB", size, (value, 255 - value, 30))
    if kind == "RGBA":
        im = Image.new("RGBA", size, (value, 10, 20, 255))
        im.putpixel((0, 0), (0, 0, 0, 0))  # one fully transparent pixel
        return im
    if kind == "P":
        return Image.new("RGB", size, (value, 40, 200)).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    raise AssertionError(kind)


def _make_folder(root: Path, classes=("cat", "dog", "emu"), n: int = 6) -> None:
    kinds = ["L", "RGB", "RGBA", "P"]
    for ci, c in enumerate(classes):
        (root / c).mkdir(parents=True)
        for i in range(n):
            kind = kinds[(i + ci) % 4]
            size = (12 + 3 * i, 9 + 5 * ci)  # every image a different size
            fmt = "jpg" if kind in ("L", "RGB") and i % 2 == 0 else "png"
            _image(kind, size, 40 * ci + i).save(root / c / f"img{i}.{fmt}")


@pytest.mark.parametrize("channels", [1, 3])
def test_imagefolder_split_mixed_images(tmp_path, channels):
    _make_folder(tmp_path)
    tr, va, info = get_loaders("imagefolder", (channels, 16, 20), root=str(tmp_path), batch_size=4, verify=True)
    assert info.class_names == ["cat", "dog", "emu"]
    assert (info.num_train, info.num_val) == (14, 4)  # round(18 * 0.2) = 4: 1.2 per class, remainder to 'cat'
    xs, ys = _all(tr)
    assert xs.shape == (14, channels, 16, 20) and sorted(set(ys.tolist())) == [0, 1, 2]
    assert sorted(_all(va)[1].tolist()) == [0, 0, 1, 2]
    assert torch.isfinite(xs).all()


def test_imagefolder_train_val_folders(tmp_path):
    _make_folder(tmp_path / "train", n=4)
    _make_folder(tmp_path / "val", n=2)
    tr, va, info = get_loaders("imagefolder", (3, 8, 8), root=str(tmp_path))
    assert (info.num_train, info.num_val) == (12, 6) and info.split == "given train/ and val/ folders"
    assert verify_imagefolder(tmp_path) == 18


def test_load_image_modes(tmp_path):
    Image.new("RGB", (3, 2), (255, 0, 51)).save(tmp_path / "rgb.png")
    assert torch.allclose(load_image(str(tmp_path / "rgb.png"))[:, 0, 0], torch.tensor([1.0, 0.0, 0.2]))
    Image.new("L", (3, 2), 102).save(tmp_path / "l.png")
    x = load_image(str(tmp_path / "l.png"))
    assert x.shape == (1, 2, 3) and torch.allclose(x, torch.full_like(x, 0.4))
    _image("RGBA", (4, 4), 255).save(tmp_path / "rgba.png")
    x = load_image(str(tmp_path / "rgba.png"))
    assert x.shape == (3, 4, 4) and torch.equal(x[:, 0, 0], torch.ones(3))  # transparent -> white
    assert torch.allclose(x[:, 1, 1], torch.tensor([1.0, 10 / 255, 20 / 255]))
    p = Image.new("P", (2, 2), 1)
    p.putpalette([0, 0, 0, 255, 128, 0] + [0] * 762)
    p.save(tmp_path / "p.png")
    assert torch.allclose(load_image(str(tmp_path / "p.png"))[:, 0, 0], torch.tensor([1.0, 128 / 255, 0.0]))
    Image.fromarray(np.full((2, 2), 65535, dtype=np.uint16)).save(tmp_path / "g16.png")
    assert torch.allclose(load_image(str(tmp_path / "g16.png")), torch.ones(1, 2, 2))


def test_imagefolder_errors(tmp_path):
    with pytest.raises(ZooError, match="image folder .*missing does not exist; expected root/<class>"):
        get_loaders("imagefolder", (3, 8, 8), root=str(tmp_path / "missing"))
    with pytest.raises(ZooError, match="needs root="):
        get_loaders("imagefolder", (3, 8, 8))

    one = tmp_path / "one"
    _make_folder(one, classes=("only",))
    with pytest.raises(ZooError, match="holds a single class \\('only'\\)"):
        get_loaders("imagefolder", (3, 8, 8), root=str(one))

    empty = tmp_path / "empty"
    _make_folder(empty)
    (empty / "fox").mkdir()
    with pytest.raises(ZooError, match="class folder .*fox \\(class 'fox'\\) holds no images"):
        get_loaders("imagefolder", (3, 8, 8), root=str(empty))

    mism = tmp_path / "mism"
    _make_folder(mism / "train", classes=("cat", "dog", "emu"))
    _make_folder(mism / "val", classes=("cat", "dog", "yak"))
    with pytest.raises(ZooError, match=r"different classes: only in train/: \['emu'\], only in val/: \['yak'\]"):
        get_loaders("imagefolder", (3, 8, 8), root=str(mism))

    loose = tmp_path / "loose"
    _make_folder(loose)
    _image("L", (4, 4)).save(loose / "stray.png")
    with pytest.raises(ZooError, match="loose image\\(s\\), e.g. 'stray.png'"):
        get_loaders("imagefolder", (3, 8, 8), root=str(loose))

    other = tmp_path / "other"
    _make_folder(other)
    (other / "cat" / "notes.txt").write_text("hi")
    with pytest.raises(ZooError, match="notes.txt is not an image file"):
        get_loaders("imagefolder", (3, 8, 8), root=str(other))


def test_corrupt_image_is_named(tmp_path):
    _make_folder(tmp_path)
    tr, _, _ = get_loaders("imagefolder", (3, 8, 8), root=str(tmp_path), batch_size=2)
    bad = tmp_path / "dog" / "img3.png"
    bad.write_bytes(bad.read_bytes()[:40])  # truncated PNG, corrupted after the loaders were made
    idx = [i for i, (p, _) in enumerate(tr.dataset.items) if p == str(bad)]
    assert idx, "the corrupt file should be in the training split"
    with pytest.raises(ZooError, match="cannot read image .*dog/img3.png"):
        tr.dataset[idx[0]]  # checked when an item is loaded
    with pytest.raises(ZooError, match="(?s)1 unreadable image\\(s\\).*dog/img3.png"):
        verify_imagefolder(tmp_path)
    with pytest.raises(ZooError, match="cannot read image .*dog/img3.png"):
        get_loaders("imagefolder", (3, 8, 8), root=str(tmp_path))  # the statistics pass reads it
    with pytest.raises(ZooError, match="cannot read image .*img3.png"):
        load_image(str(bad))
