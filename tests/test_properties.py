"""Property tests (hypothesis) for every reader of user input: `create` kwargs, recipe dicts,
checkpoint headers (random JSON, truncated files, mutated bytes) and image-folder layouts.

The one property: each call either succeeds or raises ZooError, never another exception type.
Examples are derandomized (the suite is reproducible) and few (the suite runs on two CPU cores).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from safetensors.torch import save_file

import zoo
from zoo._registry import meta_model, model_args
from zoo.compress import load as compress_load
from zoo.data import scan_imagefolder, verify_imagefolder
from zoo.errors import ZooError
from zoo.predict import load_classifier
from zoo.recipe.engine import load_checkpoint
from zoo.recipe.schema import load_recipe, validate_recipe

CORPUS = Path(__file__).resolve().parent / "corpus"
FEW = settings(max_examples=40, deadline=None, derandomize=True, database=None,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CHEAP_MODELS = ["mlp", "lenet5", "lenet_300_100", "resnet20", "mobilenet_v1", "squeezenet1_1", "shufflenet_v2"]
LOADERS: dict[str, Callable[[Path], Any]] = {
    "create": lambda f: zoo.create("mlp", weights=str(f)),
    "compress.load": compress_load,
    "recipe engine": load_checkpoint,
    "predict": load_classifier,
}

scalars = (st.none() | st.booleans() | st.integers() | st.integers(-3, 300)
           | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8))
json_values = st.recursive(scalars, lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=6), c,
                                                                                          max_size=4),
                           max_leaves=12)


def maybe(good: st.SearchStrategy) -> st.SearchStrategy:
    """Mostly plausible values, sometimes anything."""
    return st.one_of(good, good, json_values)


def _only_zoo_errors(fn: Callable[[], Any]) -> Any:
    """Run fn; a ZooError is an accepted outcome (returned), any other exception fails the property."""
    try:
        return fn()
    except ZooError as e:
        assert str(e), "a ZooError needs a message"
        return e


# ---------------------------------------------------------------------------------------------- create kwargs

@st.composite
def model_kwargs(draw) -> tuple[str, dict[str, Any]]:
    name = draw(st.sampled_from(zoo.list_models()) | st.text(max_size=12))
    keys = list(model_args(name)) if name in zoo.list_models() else []
    kwargs = draw(st.dictionaries(st.sampled_from(keys + ["bogus", "Width"]), maybe(scalars | st.lists(
        st.integers(-2, 2**40), max_size=20)), max_size=4))
    return name, kwargs


@FEW
@given(model_kwargs())
def test_create_kwargs_succeed_or_zoo_error(case):
    name, kwargs = case
    # the shapes are built on the meta device: every validated kwarg set must construct, without memory
    out = _only_zoo_errors(lambda: meta_model(name, **kwargs))
    if not isinstance(out, ZooError) and name in ("mlp", "lenet5", "resnet20"):
        n = sum(p.numel() for p in out.parameters())
        if n < 5_000_000:  # small enough to build for real too
            assert sum(p.numel() for p in zoo.create(name, **kwargs).parameters()) == n


# ---------------------------------------------------------------------------------------------- recipes

GOOD_STAGE = {"type": "train", "model": "mlp", "kwargs": {"hidden": [4]}, "train": {"epochs": 1}}
GOOD_RECIPE = {"dataset": {"name": "digits", "input_size": [1, 8, 8]}, "seeds": [0], "stages": {"s0": GOOD_STAGE}}
stage = st.dictionaries(  # a valid stage with up to three keys replaced
    st.sampled_from(["type", "model", "kwargs", "from", "teacher", "train", "amount", "method", "seed", "x"]),
    st.sampled_from(["train", "distill", "prune", "quantize", "lowrank", "bogus"])
    | st.sampled_from(["mlp", "lenet5", "resnet20", "s0", "s1", "s2"])
    | st.dictionaries(st.sampled_from(["hidden", "num_classes", "width", "epochs", "lr", "batch_size", "zz"]),
                      maybe(st.integers(-1, 100) | st.lists(st.integers(0, 64), max_size=3)), max_size=3)
    | json_values, max_size=3).map(lambda d: {**GOOD_STAGE, **d})
recipes = st.fixed_dictionaries(
    {"dataset": maybe(st.dictionaries(
        st.sampled_from(["name", "input_size", "normalize", "val_fraction", "root", "num_workers", "x"]),
        maybe(st.sampled_from(["digits", "mnist", "imagefolder", "imagenet", "dataset"])
              | st.lists(st.integers(-2, 64), max_size=4) | st.floats(0, 1)), max_size=2)
        .map(lambda d: {**GOOD_RECIPE["dataset"], **d})),
     "stages": maybe(st.dictionaries(st.sampled_from(["s0", "s1", "s2", "bad name"]), stage, min_size=1, max_size=3)),
     "seeds": maybe(st.lists(st.integers(-1, 3), max_size=3))},
    optional={"name": maybe(st.sampled_from(["r", "bad name"])), "description": maybe(st.text(max_size=5)),
              "tolerance": maybe(st.dictionaries(st.sampled_from(["top1", "params", "x"]), st.floats(-1, 1))),
              "table": maybe(st.fixed_dictionaries({"rows": st.lists(st.sampled_from(["s0", "s1", "zz"]),
                                                                     max_size=2)})),
              "quick": maybe(st.fixed_dictionaries({"train": st.dictionaries(st.sampled_from(["epochs", "x"]),
                                                                              st.integers(-1, 2))})),
              "defaults": maybe(st.fixed_dictionaries({"train": st.dictionaries(st.sampled_from(["lr", "seed"]),
                                                                                 json_values, max_size=1)}))})
recipes = st.tuples(recipes, st.dictionaries(st.sampled_from(["seed", "latency", "junk"]), json_values, max_size=1)
                    | st.just({}) | st.just({})).map(lambda rd: {**rd[0], **rd[1]})


@FEW
@given(recipes)
def test_recipe_dicts_succeed_or_zoo_error(raw):
    _only_zoo_errors(lambda: validate_recipe(raw, Path("prop.yaml")))
    with tempfile.TemporaryDirectory() as d:  # the same dict through the YAML reader
        p = Path(d) / "prop.yaml"
        p.write_text(yaml.safe_dump(raw))
        _only_zoo_errors(lambda: load_recipe(p))


# ---------------------------------------------------------------------------------------------- headers

step = st.fixed_dictionaries(
    {"kind": maybe(st.sampled_from(["channels", "mask", "lowrank", "weightquant", "int8", "x"]))},
    optional={"modules": maybe(st.lists(st.sampled_from(["features.1", "classifier", "", "nope"]), max_size=2)
                               | st.dictionaries(st.sampled_from(["features.1", "classifier", "nope"]), json_values,
                                                 max_size=2)),
              "method": maybe(st.sampled_from(["dynamic", "static", "binary", "ternary", "weights_kbit", "svd"])),
              "backend": maybe(st.sampled_from(["x86", "fbgemm", "qnnpack", "nope"])), "bits": json_values,
              "attrs": json_values})
TINY = {"hidden": [4], "resolution": 4, "num_classes": 2, "in_chans": 1, "drop_rate": 0.0}  # the tensors' model
tiny_kwargs = st.dictionaries(  # the true kwargs with a few entries replaced
    st.sampled_from(["hidden", "resolution", "num_classes", "in_chans", "drop_rate", "width"]),
    maybe(st.integers(1, 2**40) | st.integers(1, 8) | st.lists(st.integers(1, 64), max_size=3)), max_size=2,
).map(lambda d: {**TINY, **d})
specs = maybe(st.fixed_dictionaries(
    {"name": st.sampled_from(["mlp", "mlp", "mlp"] + CHEAP_MODELS) | json_values, "kwargs": tiny_kwargs | json_values},
    optional={"compression": st.lists(step, max_size=2) | json_values}))
headers = st.fixed_dictionaries(
    {"spec": specs},
    optional={"classes": maybe(st.lists(st.text(max_size=3), min_size=1, max_size=3)),
              "mean": maybe(st.lists(st.floats(), min_size=1, max_size=2)),
              "std": maybe(st.lists(st.floats(), min_size=1, max_size=2)),
              "input_size": maybe(st.lists(st.integers(-1, 10**6), min_size=3, max_size=3))})


def _tiny_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.detach().clone() for k, v in zoo.create("mlp", hidden=(4,), resolution=4, num_classes=2)
            .state_dict().items()}


def _all_loaders(path: Path) -> None:
    for name, load in LOADERS.items():
        _only_zoo_errors(lambda: load(path))


@FEW
@given(headers)
def test_random_headers_load_or_zoo_error(header):
    meta = {f"zoo.{k}": json.dumps(v) for k, v in header.items()}  # NaN/inf become JSON NaN/Infinity
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "w.safetensors"
        save_file(_tiny_tensors(), str(p), metadata=meta)
        _all_loaders(p)


@pytest.fixture(scope="module")
def good_files(tmp_path_factory) -> list[bytes]:
    """Valid files to damage: the corpus MLP, an int8 (dynamic) one and a 50%-masked one."""
    d = tmp_path_factory.mktemp("good")
    m = zoo.create("mlp", hidden=(8, 8), resolution=4, num_classes=2)
    zoo.compress.save(zoo.compress.quantize(m, "dynamic"), d / "q.safetensors")
    zoo.compress.save(zoo.compress.prune(m, 0.5, criterion="magnitude", granularity="weight"), d / "m.safetensors")
    return [(CORPUS / "good.safetensors").read_bytes(), (d / "q.safetensors").read_bytes(),
            (d / "m.safetensors").read_bytes()]


@FEW
@given(which=st.integers(0, 2), cut=st.floats(0, 1), flips=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)),
                                                                     max_size=6))
def test_truncated_or_mutated_files_load_or_zoo_error(good_files, which, cut, flips):
    data = bytearray(good_files[which])
    for pos, val in flips:
        data[min(int(pos * len(data)), len(data) - 1)] = val
    if cut < 0.5:  # half the examples are also truncated
        data = data[: int(cut * 2 * len(data))]
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "w.safetensors"
        p.write_bytes(bytes(data))
        _all_loaders(p)


# ---------------------------------------------------------------------------------------------- image folders

ENTRIES = ["x.png", "y.jpg", "notes.txt", "broken.png", "sub/w.png", "", ".hidden.png",
           "LINK_ROOT", "LINK_SPLIT", "LINK_OTHER", "LINK_OUT", "LINK_FILE"]


def _make_entry(root: Path, outside: Path, prefix: str, cls: str, item: str) -> None:
    folder = root / prefix / cls
    if item.startswith("LINK_"):
        target = {"LINK_ROOT": root, "LINK_SPLIT": root / prefix, "LINK_OTHER": root / prefix / "a",
                  "LINK_OUT": outside, "LINK_FILE": outside / "o.png"}[item]
        folder.parent.mkdir(parents=True, exist_ok=True)
        if not os.path.lexists(folder):
            folder.symlink_to(target)
        return
    if folder.is_symlink():
        return
    folder.mkdir(parents=True, exist_ok=True)
    if not item:
        return
    f = folder / item
    f.parent.mkdir(parents=True, exist_ok=True)
    if item == "broken.png":
        f.write_bytes(b"\x89PNG\r\n\x1a\n broken")
    elif item.endswith((".png", ".jpg")):
        Image.fromarray(np.full((3, 3), 7 * len(item), dtype=np.uint8), "L").save(f)
    else:
        f.write_text("not an image")


@FEW
@given(skeleton=st.booleans(),
       layout=st.lists(st.tuples(st.sampled_from(["", "train", "val"]), st.sampled_from(["a", "b", "c", ".h"]),
                                 st.sampled_from(ENTRIES)), max_size=8),
       val_fraction=maybe(st.sampled_from([0.25, 0.5])) | st.floats(0, 1) | st.floats(allow_nan=True))
def test_image_folder_layouts_scan_or_zoo_error(skeleton, layout, val_fraction):
    with tempfile.TemporaryDirectory() as d:
        root, outside = Path(d) / "root", Path(d) / "outside"
        root.mkdir()
        outside.mkdir()
        Image.fromarray(np.zeros((3, 3), dtype=np.uint8), "L").save(outside / "o.png")
        base = [("", c, f) for c in "ab" for f in ("x.png", "y.jpg", "sub/w.png")] if skeleton else []
        for prefix, cls, item in base + layout:
            _make_entry(root, outside, prefix, cls, item)
        src = _only_zoo_errors(lambda: scan_imagefolder(root, val_fraction))
        if not isinstance(src, ZooError):
            top = root.resolve()
            for f, _ in src.train + src.val:  # every class folder the scan accepted lies inside the root
                assert top in Path(f).parent.resolve().parents or Path(f).parent.resolve() == top
            _only_zoo_errors(lambda: verify_imagefolder(root, val_fraction))
