"""Bad and malicious input (issue 15): the hand-made corpus in tests/corpus, and one test per class of
failure. Every input must end in one ZooError (or, on the command line, exit code 2 and one line).
"""

from __future__ import annotations

import json
import math
import shutil
import struct
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

import zoo
import zoo.untrusted as untrusted
from zoo.cli import main
from zoo.compress import load as compress_load
from zoo.data import get_loaders
from zoo.errors import ZooError
from zoo.predict import evaluate_folder, load_classifier, predict
from zoo.recipe import check_recipe, load_checkpoint
from zoo.recipe.schema import load_recipe
from zoo.train import TrainConfig, fit
from zoo.untrusted import check_tree, parse_json, short_repr
from zoo.weights import read_checkpoint, save_checkpoint

CORPUS = Path(__file__).resolve().parent / "corpus"
LOADERS = {
    "create": lambda f: zoo.create("mlp", weights=str(f)),
    "compress.load": compress_load,
    "recipe engine": load_checkpoint,
    "predict": load_classifier,
}
# corpus weights file -> what the refusal says (the same through every loader that reads that part)
WEIGHTS_CORPUS = {
    "empty.safetensors": "truncated or corrupt",
    "truncated.safetensors": "truncated or corrupt",
    "random.safetensors": "truncated or corrupt",
    "header_claims_1tb.safetensors": "truncated or corrupt",
    "pickle.safetensors": "it is a pickle",
    "zip_in_disguise.safetensors": "it is a zip archive",
    "legacy.pt": "a .pt file is a pickle",
    "nested_spec.safetensors": "nest deeper than 32 levels",
    "huge_num_classes.safetensors": r"num_classes=1000000000000 is not allowed; expected int >= 1 and <= 100000",
    "huge_hidden.safetensors": r"hidden=\[1073741824, 1073741824\] is not allowed",
    "step_without_modules.safetensors": r"compression step 0 \(channels\) needs 'modules' as a dict",
    "step_huge_layer.safetensors": r"1,900,000,002 parameters and buffers; at most [\d,]+ are allowed",
    "step_attr_injection.safetensors": "sets 'load_state_dict', which is not an int attribute",
    "nan_weights.safetensors": r"tensor 'features.1.weight' holds 1 NaN/inf value.*allow_nonfinite=True",
}
# written at test time, not committed (a zero-byte file matches any empty file's checksum)
RUNTIME_CORPUS = {"empty.safetensors": b""}


def _corpus_file(name: str, tmp_path: Path) -> Path:
    """The corpus file `name`: committed in tests/corpus, or written into tmp_path."""
    if name in RUNTIME_CORPUS:
        (tmp_path / name).write_bytes(RUNTIME_CORPUS[name])
        return tmp_path / name
    return CORPUS / name


# files whose problem is in header metadata that only some loaders use (compress.load returns just the model)
META_CORPUS = {
    "classes_mismatch.safetensors": ("zoo.classes names 3 classes but the model has num_classes=2 outputs",
                                     ("create", "recipe engine", "predict")),
    "std_zero.safetensors": (r"zoo.std=\[0.0\] is not allowed; every std must be > 0", ("create", "recipe engine",
                                                                                        "predict")),
    "mean_nan.safetensors": (r"zoo.mean=\[nan\] holds NaN/inf.*allow_nonfinite=True", ("create", "recipe engine",
                                                                                       "predict")),
    "input_size_huge.safetensors": (r"zoo.input_size=\[1, 100000, 100000\] is not allowed", ("predict",)),
}
TRAIN = ["train", "--model", "mlp", "--kw", "hidden=4", "--kw", "resolution=8", "--data", "digits", "--quick",
         "--epochs", "2", "--batch-size", "32", "--no-progress"]


def test_corpus_is_complete():
    """Every file of the corpus is exercised below (a new file without a test fails here)."""
    used = set(WEIGHTS_CORPUS) | set(META_CORPUS) | {
        "good.safetensors", "make_corpus.py", "CORPUS.md", "index_traversal", "alias_bomb.yaml", "python_tag.yaml",
        "deep_nesting.yaml", "huge_int.yaml", "bad_results.yaml", "bad_results.results.json", "bad_results.md",
        "resume_missing_config.safetensors", "resume_bad_rng.safetensors", "resume_epoch_string.safetensors"}
    assert {p.name for p in CORPUS.iterdir() if p.name != "__pycache__"} == used - set(RUNTIME_CORPUS)


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_good_corpus_file_loads_everywhere(loader):
    model = LOADERS[loader](CORPUS / "good.safetensors")
    model = model.model if hasattr(model, "model") else model
    assert model.spec.kwargs["hidden"] == (4,)


@pytest.mark.parametrize("name", sorted(WEIGHTS_CORPUS))
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_corpus_weights_refused(name, loader, tmp_path):
    with pytest.raises(ZooError, match=WEIGHTS_CORPUS[name]):
        LOADERS[loader](_corpus_file(name, tmp_path))


@pytest.mark.parametrize("name", sorted(META_CORPUS))
def test_corpus_header_metadata_refused(name):
    msg, loaders = META_CORPUS[name]
    for loader in loaders:
        with pytest.raises(ZooError, match=msg):
            LOADERS[loader](CORPUS / name)


def test_nonfinite_opt_out_is_explicit():
    m = zoo.create("mlp", weights=str(CORPUS / "nan_weights.safetensors"), allow_nonfinite=True)
    assert torch.isnan(m.features[1].weight).sum() == 1
    assert torch.isnan(compress_load(CORPUS / "nan_weights.safetensors", allow_nonfinite=True)
                       .features[1].weight).sum() == 1
    assert math.isnan(load_classifier(CORPUS / "mean_nan.safetensors", allow_nonfinite=True).mean[0])
    with pytest.raises(ZooError, match="allow_nonfinite='yes' is not allowed; expected True or False"):
        zoo.create("mlp", weights=str(CORPUS / "good.safetensors"), allow_nonfinite="yes")
    with pytest.raises(ZooError, match="allow_nonfinite=True needs weights="):
        zoo.create("mlp", allow_nonfinite=True)


def test_header_size_limit(tmp_path, monkeypatch):
    shutil.copy(CORPUS / "good.safetensors", tmp_path / "w.safetensors")
    (n,) = struct.unpack("<Q", (tmp_path / "w.safetensors").read_bytes()[:8])
    monkeypatch.setattr(untrusted, "MAX_HEADER_BYTES", n - 1)
    with pytest.raises(ZooError, match=rf"has a {n:,}-byte header; at most {n - 1:,} bytes are allowed"):
        read_checkpoint(tmp_path / "w.safetensors")


def test_index_path_stays_inside_weights_root(tmp_path, monkeypatch):
    monkeypatch.setenv("ZOO_WEIGHTS_DIR", str(CORPUS / "index_traversal"))
    with pytest.raises(ZooError, match=r"file='../good.safetensors' is not allowed; expected a plain file name"):
        zoo.create("mlp", weights="outside")
    wdir = tmp_path / "weights"  # a plain name that is a symlink out of the folder is refused too
    wdir.mkdir()
    (wdir / "link.safetensors").symlink_to(CORPUS / "good.safetensors")
    index = json.loads((CORPUS / "index_traversal" / "index.json").read_text())
    index["weights"][0]["file"] = "link.safetensors"
    (wdir / "index.json").write_text(json.dumps(index))
    monkeypatch.setenv("ZOO_WEIGHTS_DIR", str(wdir))
    with pytest.raises(ZooError, match="resolves to .*good.safetensors', outside the weights folder"):
        zoo.create("mlp", weights="outside")
    assert "outside the weights folder" in zoo.weights.verify_index()[0]


def test_crafted_spec_is_refused_before_allocating():
    t0 = time.perf_counter()
    with pytest.raises(ZooError, match="num_classes=1000000000000 is not allowed"):
        zoo.create("mlp", weights=str(CORPUS / "huge_num_classes.safetensors"))
    with pytest.raises(ZooError, match="at most 1,000,000,000 are allowed"):
        zoo.compress.build_from_spec({"name": "mlp", "kwargs": {"resolution": 4}, "compression": [
            {"kind": "channels", "modules": {"features.1": {"type": "Linear", "in": 16, "out": 10**9}}}]})
    assert time.perf_counter() - t0 < 5  # no terabyte allocation was attempted


def test_spec_kwargs_caps():
    with pytest.raises(ZooError, match="num_classes=100001 is not allowed; expected int >= 1 and <= 100000"):
        zoo.create("resnet20", num_classes=100_001)  # a family's own num_classes keeps the global cap
    with pytest.raises(ZooError, match="hidden=.* expected a tuple of at most 16 ints from 1 to 16384"):
        zoo.create("mlp", hidden=(4,) * 17)
    with pytest.raises(ZooError, match=r"unknown model 'x+\.\.\.x+': names have at most 64 characters"):
        zoo.create("x" * 10**6)


@pytest.mark.parametrize("name,msg", [
    ("alias_bomb.yaml", "more than 200,000 values once aliases are expanded"),
    ("python_tag.yaml", "not valid YAML: .*could not determine a constructor"),
    ("deep_nesting.yaml", "nest deeper than 32 levels"),
    ("huge_int.yaml", "not a usable YAML document .ValueError"),
])
def test_corpus_recipes_refused_quickly(name, msg, capsys):
    t0 = time.perf_counter()
    with pytest.raises(ZooError, match=msg):
        load_recipe(CORPUS / name)
    assert main(["recipe", "validate", str(CORPUS / name)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("zoo: error: ") and len(err) < 600
    assert time.perf_counter() - t0 < 10


def test_recipe_check_refuses_malformed_committed_results(tmp_path, capsys):
    with pytest.raises(ZooError, match=r"rows\[0\].top1 = '97.5' is not allowed; expected a finite number or null"):
        check_recipe(CORPUS / "bad_results.yaml", out=tmp_path / "check")
    assert not (tmp_path / "check").exists()  # refused before anything ran
    assert main(["recipe", "check", str(CORPUS / "bad_results.yaml"), "--out", str(tmp_path / "c")]) == 2
    assert "rows[0].top1 = '97.5'" in capsys.readouterr().err


@pytest.mark.parametrize("name,msg", [
    ("resume_missing_config", "the field 'config' is missing"),
    ("resume_bad_rng", "rng.torch must be 5056 ints in 0..255"),
    ("resume_epoch_string", "epoch='1' is not allowed; expected an int >= 0"),
])
def test_corpus_resume_files_refused(tmp_path, capsys, name, msg):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(CORPUS / f"{name}.safetensors", out / "resume.safetensors")
    assert main(TRAIN + ["--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"cannot resume from {out / 'resume.safetensors'}: {msg}" in err


def _digits_folder(root: Path, classes=("a", "b"), per_class: int = 6) -> Path:
    rng = np.random.default_rng(0)
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (8, 8), dtype=np.uint8), "L").save(root / c / f"{i}.png")
    return root


def test_out_folder_under_a_file_is_one_error(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    folder = _digits_folder(tmp_path / "imgs")
    runs = [TRAIN + ["--out", str(blocker / "run")],
            ["finetune", "--model", "mlp", "--input-size", "8", "--data", str(folder), "--epochs", "1",
             "--out", str(blocker / "ft"), "--quiet"],
            ["recipe", "run", str(CORPUS / "bad_results.yaml"), "--out", str(blocker / "r")],
            TRAIN + ["--out", str(blocker)]]
    for argv in runs:
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"out '{blocker}" in err and "is not allowed" in err, err


def test_forward_dtype_is_checked():
    m = zoo.create("mlp", hidden=(4,), resolution=8).eval()
    for dt in (torch.float64, torch.uint8, torch.int64):
        with pytest.raises(ZooError, match=f"expected a float32 input tensor .*got {str(dt)[6:]}"):
            m(torch.zeros(1, 1, 8, 8, dtype=dt))
    assert m.double()(torch.zeros(1, 1, 8, 8, dtype=torch.float64)).dtype == torch.float64


def test_class_folder_symlinks_are_refused(tmp_path):
    root = _digits_folder(tmp_path / "data", ("cat", "dog"))
    (root / "all").symlink_to(root)  # a "class" holding every other class's images
    with pytest.raises(ZooError, match="resolves to .*data, which is not inside the dataset root"):
        zoo.data.scan_imagefolder(root, 0.5)
    (root / "all").unlink()
    outside = _digits_folder(tmp_path / "elsewhere", ("emu",))
    (root / "emu").symlink_to(outside / "emu")
    with pytest.raises(ZooError, match="not inside the dataset root"):
        zoo.data.scan_imagefolder(root, 0.5)
    (root / "emu").unlink()
    (root / "cat2").symlink_to(root / "cat")
    with pytest.raises(ZooError, match="two class folders .* resolve to the same folder"):
        zoo.data.scan_imagefolder(root, 0.5)
    (root / "cat2").unlink()
    (root / "cat" / "inner").mkdir()
    (root / "kitten").symlink_to(root / "cat" / "inner")
    with pytest.raises(ZooError, match="lies inside class folder"):
        zoo.data.scan_imagefolder(root, 0.5)
    (root / "kitten").unlink()
    (root / "cat" / "inner").rmdir()
    assert zoo.data.scan_imagefolder(root, 0.5).class_names == ["cat", "dog"]


def test_predict_refuses_fake_class_folder(tmp_path):
    root = _digits_folder(tmp_path / "val", ("a", "b"))
    model = zoo.create("mlp", hidden=(4,), resolution=8, num_classes=3)
    ckpt = save_checkpoint(model, tmp_path / "m.safetensors", classes=["a", "b", "c"], mean=[0.5], std=[0.25])
    assert evaluate_folder(ckpt, root)["images"] == 12
    (root / "c").symlink_to(root)
    with pytest.raises(ZooError, match="not inside the dataset root"):
        evaluate_folder(ckpt, root)
    assert len(predict(ckpt, [root / "a" / "0.png"], top=3)[0]) == 3


def test_resume_rejects_tampered_optimizer_state(tmp_path):
    model = zoo.create("mlp", hidden=(4,), resolution=8)
    tr, va, _ = get_loaders("digits", (1, 8, 8), batch_size=32, quick=True)
    fit(model, tr, va, TrainConfig(epochs=1, batch_size=32, progress=False), out_dir=tmp_path)
    with safe_open(str(tmp_path / "resume.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    buf = next(k for k in tensors if k.startswith("optim."))
    tensors[buf] = torch.zeros(3)
    save_file(tensors, str(tmp_path / "resume.safetensors"), metadata=meta)
    with pytest.raises(ZooError, match=rf"optimizer tensor {buf} is torch.float32 \(3,\), expected a float tensor"):
        fit(model, tr, va, TrainConfig(epochs=2, batch_size=32, progress=False), out_dir=tmp_path, resume=True)


def test_bounded_repr_and_tree_limits():
    bomb: list = ["lol"] * 9
    for _ in range(8):
        bomb = [bomb] * 9  # 9^9 leaves, shared: repr() would expand them all
    t0 = time.perf_counter()
    s = short_repr(bomb)
    assert len(s) <= 80 and s.startswith("[[[") and time.perf_counter() - t0 < 1
    assert short_repr(10**5000) == "<int of 16610 bits>"
    with pytest.raises(ZooError, match="more than 200,000 values"):
        check_tree(bomb, "x")
    with pytest.raises(ZooError, match="nest deeper than 32 levels"):
        parse_json("[" * 100_000 + "]" * 100_000, "x")
    with pytest.raises(ZooError, match="x is not valid JSON"):
        parse_json("9" * 5000, "x")
    assert parse_json('{"a": [[1]]}', "x") == {"a": [[1]]}


def test_compressed_encodings_that_do_not_decode(tmp_path):
    model = zoo.create("mlp", hidden=(4,), resolution=8)
    q = zoo.compress.quantize(model, "dynamic")
    zoo.compress.save(q, tmp_path / "q.safetensors")
    with safe_open(str(tmp_path / "q.safetensors"), "pt") as f:
        meta, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    key = next(k for k in tensors if k.endswith("#dtype"))
    tensors[key] = torch.tensor([200], dtype=torch.uint8)  # no such dtype code
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    assert compress_load(tmp_path / "q.safetensors").features[1] is not None
    with pytest.raises(ZooError, match="the encoded tensors do not decode: IndexError"):
        compress_load(tmp_path / "bad.safetensors")
