"""Tests of the real-data readers (Fashion-MNIST, the CIFAR-10 JPEG q75 copy) and of the batch
augmentation (random crop with padding, horizontal flip). Tests on the shared files skip without them."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import zoo.data.sources as sources
from zoo.data import get_loaders
from zoo.data.augment import augment_batch
from zoo.errors import ZooError
from zoo.train import TrainConfig

DATA = sources.data_root()


def _need(sub: str, *files: str) -> Path:
    folder = DATA / sub
    missing = [f for f in files if not (folder / f).is_file()]
    if missing:
        pytest.skip(f"{', '.join(missing)} not found in {folder} (set ZOO_DATA to the shared data folder)")
    return folder


# ---------------------------------------------------------------------------------------------- Fashion-MNIST

def test_fashion_mnist_official_split_and_shuffled_batches():
    folder = _need("fashion_mnist", "train-images-idx3-ubyte.gz", "t10k-images-idx3-ubyte.gz")
    tr, va, info = get_loaders("fashion_mnist", (1, 28, 28), root=str(folder), batch_size=256)
    assert (info.num_train, info.num_val, info.title) == (60000, 10000, "Fashion-MNIST")
    assert info.class_names[0] == "T-shirt/top" and info.class_names[9] == "Ankle boot"
    assert np.bincount(tr.dataset.labels.numpy()).tolist() == [6000] * 10
    assert info.mean[0] == pytest.approx(0.2860, abs=5e-3) and info.std[0] == pytest.approx(0.3530, abs=5e-3)
    _, y = next(iter(tr))  # the files are ordered by class: the training order must not be
    assert len(torch.unique(y)) == 10


def test_fashion_mnist_missing_folder_names_it(tmp_path):
    with pytest.raises(ZooError, match=r"Fashion-MNIST folder .*nowhere does not exist; download .*fashion-mnist"):
        get_loaders("fashion_mnist", (1, 28, 28), root=str(tmp_path / "nowhere"))


# ---------------------------------------------------------------------------------------------- CIFAR-10 JPEG

def test_cifar10_jpeg_copy():
    folder = _need("cifar10", "train.npz", "test.npz")
    tr, va, info = get_loaders("cifar10", (3, 32, 32), root=str(folder), batch_size=128)
    assert (info.num_train, info.num_val) == (50000, 10000)
    assert info.title == "CIFAR-10 (JPEG q75 copy)" and "quality 75" in info.split
    assert info.class_names == list(sources.CIFAR10_CLASSES)
    assert np.bincount(va.dataset.labels.numpy()).tolist() == [1000] * 10
    x, _ = sources.decode_jpeg_npz(folder / "test.npz")
    assert x.dtype == torch.uint8 and x.shape == (10000, 3, 32, 32)
    mean = (x.double() / 255).mean(dim=(0, 2, 3))  # the data README's verified test mean
    assert torch.allclose(mean, torch.tensor([0.4941, 0.4851, 0.4504], dtype=torch.float64), atol=1e-4)
    assert sources.decode_jpeg_npz(folder / "test.npz")[0] is x  # decoded once per process


def _write_jpeg_npz(path: Path, n: int = 20, **override) -> None:
    g = torch.Generator().manual_seed(0)
    blobs = []
    for _ in range(n):
        buf = io.BytesIO()
        rgb = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=g).numpy()
        Image.fromarray(rgb).save(buf, format="JPEG", quality=75)
        blobs.append(np.frombuffer(buf.getvalue(), dtype=np.uint8))
    arrays = {"jpeg": np.concatenate(blobs), "offsets": np.cumsum([0] + [len(b) for b in blobs]).astype(np.int64),
              "labels": np.arange(n, dtype=np.int64) % 10, "classes": np.array(sources.CIFAR10_CLASSES)}
    arrays.update(override)
    np.savez(path, **arrays)


def test_cifar10_jpeg_generated_files(tmp_path):
    _write_jpeg_npz(tmp_path / "train.npz", 40)
    _write_jpeg_npz(tmp_path / "test.npz", 20)
    tr, va, info = get_loaders("cifar10", (3, 32, 32), root=str(tmp_path), batch_size=8, download=False)
    assert (info.num_train, info.num_val, info.title) == (40, 20, "CIFAR-10 (JPEG q75 copy)")


def test_cifar10_lossless_folder_wins_over_jpeg(tmp_path):
    from tests.test_data import _write_cifar

    _write_cifar(tmp_path)
    _write_jpeg_npz(tmp_path / "train.npz", 40)
    _, _, info = get_loaders("cifar10", (3, 32, 32), root=str(tmp_path), download=False)
    assert info.title == "CIFAR-10" and "lossless" in info.split


@pytest.mark.parametrize("case,message", [
    ("missing_test", r"missing test.npz; expected train.npz and test.npz"),
    ("garbage", r"cannot read CIFAR-10 JPEG file .*train.npz: .*expected an npz archive"),
    ("no_offsets", r"CIFAR-10 JPEG file .*train.npz lacks the array\(s\) offsets; expected arrays jpeg"),
    ("bad_offsets", r"offsets are not increasing from 0 to"),
    ("bad_labels", r"labels span 0..12; expected 0..9"),
    ("bad_jpeg", r"image 0 does not decode"),
])
def test_cifar10_jpeg_bad_files(tmp_path, case, message):
    sources._JPEG_CACHE.clear()
    _write_jpeg_npz(tmp_path / "train.npz")
    if case == "garbage":
        (tmp_path / "train.npz").write_bytes(b"not a zip archive")
    elif case == "no_offsets":
        np.savez(tmp_path / "train.npz", jpeg=np.zeros(4, np.uint8), labels=np.zeros(1, np.int64))
    elif case == "bad_offsets":
        _write_jpeg_npz(tmp_path / "train.npz", offsets=np.array([0] + [5] * 20, dtype=np.int64))
    elif case == "bad_labels":
        _write_jpeg_npz(tmp_path / "train.npz", labels=np.arange(20, dtype=np.int64) % 13)
    elif case == "bad_jpeg":
        z = dict(np.load(tmp_path / "train.npz"))
        z["jpeg"] = z["jpeg"].copy()
        z["jpeg"][: z["offsets"][1]] = 7
        np.savez(tmp_path / "train.npz", **z)
    if case != "missing_test":
        _write_jpeg_npz(tmp_path / "test.npz")
    with pytest.raises(ZooError, match=message):
        get_loaders("cifar10", (3, 32, 32), root=str(tmp_path), download=False)


# ---------------------------------------------------------------------------------------------- augmentation

def _batch(n: int = 16) -> torch.Tensor:
    return torch.arange(n * 3 * 8 * 8, dtype=torch.float32).view(n, 3, 8, 8)


def test_augment_is_identity_when_off_and_deterministic_per_seed_and_step():
    x = _batch()
    assert augment_batch(x, 0, False, seed=0, step=0) is x
    a = augment_batch(x, 2, True, seed=3, step=7)
    assert torch.equal(a, augment_batch(x, 2, True, seed=3, step=7))
    assert not torch.equal(a, augment_batch(x, 2, True, seed=3, step=8))
    assert not torch.equal(a, augment_batch(x, 2, True, seed=4, step=7))
    assert not torch.equal(a, augment_batch(x, 2, True, seed=3, step=7, rank=1))


def test_augment_crop_is_a_window_of_the_reflect_padded_image():
    x = _batch()
    out = augment_batch(x, 2, False, seed=0, step=0)
    padded = torch.nn.functional.pad(x, (2, 2, 2, 2), mode="reflect")
    shifts = set()
    for i in range(len(x)):
        found = [(dy, dx) for dy in range(5) for dx in range(5)
                 if torch.equal(out[i], padded[i, :, dy:dy + 8, dx:dx + 8])]
        assert found, f"image {i} is not a crop of its padded image"
        shifts.add(found[0])
    assert len(shifts) > 3  # offsets vary across the batch


def test_augment_flip_mirrors_about_half():
    x = _batch(64)
    out = augment_batch(x, 0, True, seed=0, step=0)
    flipped = [torch.equal(out[i], x[i].flip(-1)) for i in range(64)]
    kept = [torch.equal(out[i], x[i]) for i in range(64)]
    assert all(f or k for f, k in zip(flipped, kept)) and 16 < sum(flipped) < 48


def test_augment_bad_values():
    with pytest.raises(ZooError, match=r"crop_padding=8 needs images larger than 8 pixels; got 8x8"):
        augment_batch(_batch(), 8, False, seed=0, step=0)
    with pytest.raises(ZooError, match=r"TrainConfig: crop_padding=-1 is not allowed; expected an int >= 0"):
        TrainConfig(crop_padding=-1)
    with pytest.raises(ZooError, match=r"TrainConfig: hflip='yes' is not allowed; expected True or False"):
        TrainConfig(hflip="yes")


# ---------------------------------------------------------------------------------------------- normalisation

def test_explicit_normalisation_overrides_the_dataset_statistics():
    from zoo.data import IMAGENET_MEAN, IMAGENET_STD

    _, va, info = get_loaders("digits", (3, 16, 16), mean=IMAGENET_MEAN, std=IMAGENET_STD)
    assert info.mean == IMAGENET_MEAN and info.std == IMAGENET_STD
    x, _ = va.dataset[0]
    _, va0, info0 = get_loaders("digits", (3, 16, 16))
    raw = va0.dataset[0][0] * torch.tensor(info0.std).view(3, 1, 1) + torch.tensor(info0.mean).view(3, 1, 1)
    expected = (raw - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    assert torch.allclose(x, expected, atol=1e-5)


@pytest.mark.parametrize("mean,std,message", [
    ((0.5,), (0.2, 0.2, 0.2), r"mean=\(0.5,\) is not allowed; expected 3 finite numbers"),
    ((0.5, 0.5, 0.5), None, r"std=None is not allowed; expected 3 finite numbers"),
    ((0.5, 0.5, 0.5), (0.2, 0.0, 0.2), r"std=\(0.2, 0.0, 0.2\) is not allowed; every value must be > 0"),
])
def test_bad_normalisation(mean, std, message):
    with pytest.raises(ZooError, match=message):
        get_loaders("digits", (3, 16, 16), mean=mean, std=std)


def test_recipe_normalize_key():
    from zoo.recipe.schema import RecipeError, validate_recipe

    base = {"dataset": {"name": "digits", "input_size": [3, 32, 32]},
            "stages": {"a": {"type": "train", "model": "mobilenet_v1", "kwargs": {"width": 0.25}}}}
    r = validate_recipe({**base, "dataset": {**base["dataset"], "normalize": "imagenet"}}, Path("r.yaml"))
    assert r.dataset["normalize"] == {"mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}
    assert validate_recipe(base, Path("r.yaml")).dataset["normalize"] == "dataset"
    with pytest.raises(RecipeError, match=r"dataset.normalize.std: expected 3 numbers > 0"):
        validate_recipe({**base, "dataset": {**base["dataset"], "normalize": {"mean": [0, 0, 0], "std": [1, 0, 1]}}},
                        Path("r.yaml"))
