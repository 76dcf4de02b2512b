"""Writes the hand-made bad files of tests/corpus (committed; run again only to change them).

Each file is a small, deliberately broken or malicious input of one kind zoo reads: weights files
(safetensors headers, pickles, truncations, NaN), resume files, recipes, a results.json and a weights
index. tests/test_untrusted.py feeds every file to the entry points that read it and expects one
ZooError (or exit code 2 with one line). CORPUS.md in this folder lists the files and the expected refusal.

    OMP_NUM_THREADS=1 .venv/bin/python tests/corpus/make_corpus.py
"""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import struct
import tempfile
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

import zoo
from zoo.data import get_loaders
from zoo.train import TrainConfig, fit

HERE = Path(__file__).resolve().parent
TINY = {"hidden": [4], "resolution": 4, "num_classes": 2, "in_chans": 1, "drop_rate": 0.0}
GOOD_META = {"classes": ["a", "b"], "mean": [0.5], "std": [0.25]}


def _tiny_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    m = zoo.create("mlp", **{**TINY, "hidden": (4,)})
    return {k: v.detach().clone().contiguous() for k, v in m.state_dict().items()}


def _weights(name: str, tensors: dict[str, torch.Tensor] | None = None, spec: Any = None, **meta: Any) -> None:
    """A safetensors file with the tiny MLP's tensors, the given zoo.spec and zoo.* header entries."""
    spec = {"name": "mlp", "kwargs": TINY} if spec is None else spec
    header = {"zoo.spec": spec if isinstance(spec, str) else json.dumps(spec)}
    header.update({f"zoo.{k}": json.dumps(v) for k, v in {**GOOD_META, **meta}.items()})
    save_file(_tiny_tensors() if tensors is None else tensors, str(HERE / name), metadata=header)


def weights_files() -> None:
    """Crafted and damaged weights files (see CORPUS.md)."""
    _weights("good.safetensors")  # the valid file the others are variants of (not itself in the corpus test)
    good = (HERE / "good.safetensors").read_bytes()
    # empty.safetensors (zero bytes) is written by the test itself: see RUNTIME_CORPUS in tests/test_untrusted.py
    (HERE / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    (HERE / "random.safetensors").write_bytes(random.Random(0).randbytes(512))
    (HERE / "pickle.safetensors").write_bytes(pickle.dumps({"w": [1.0, 2.0]}, protocol=4))
    with zipfile.ZipFile(HERE / "zip_in_disguise.safetensors", "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"w": 1}, protocol=2))
    (HERE / "legacy.pt").write_bytes(pickle.dumps({"w": 1}, protocol=2))
    (HERE / "header_claims_1tb.safetensors").write_bytes(struct.pack("<Q", 2**40) + b"{" + b" " * 64)
    nested = '{"name": "mlp", "kwargs": {"hidden": ' + "[" * 5000 + "]" * 5000 + "}}"
    _weights("nested_spec.safetensors", spec=nested)
    _weights("huge_num_classes.safetensors", spec={"name": "mlp", "kwargs": {**TINY, "num_classes": 10**12}})
    _weights("huge_hidden.safetensors", spec={"name": "mlp", "kwargs": {**TINY, "hidden": [2**30, 2**30]}})
    _weights("step_without_modules.safetensors",
             spec={"name": "mlp", "kwargs": TINY, "compression": [{"kind": "channels"}]})
    huge = {"features.1": {"type": "Linear", "in": 16, "out": 10**8},
            "classifier": {"type": "Linear", "in": 10**8, "out": 2}}
    _weights("step_huge_layer.safetensors",
             spec={"name": "mlp", "kwargs": TINY, "compression": [{"kind": "channels", "modules": huge}]})
    _weights("step_attr_injection.safetensors", spec={"name": "mlp", "kwargs": TINY, "compression": [
        {"kind": "channels", "modules": {}, "attrs": {"load_state_dict": 1}}]})
    _weights("classes_mismatch.safetensors", classes=["a", "b", "c"])
    nan = _tiny_tensors()
    nan["features.1.weight"][0, 0] = float("nan")
    _weights("nan_weights.safetensors", tensors=nan)
    _weights("std_zero.safetensors", std=[0.0])
    _weights("mean_nan.safetensors", mean=[0.5])  # json.dumps writes no NaN for zoo: patch it in by hand
    data = (HERE / "mean_nan.safetensors").read_bytes().replace(b'"zoo.mean":"[0.5]"', b'"zoo.mean":"[NaN]"')
    (HERE / "mean_nan.safetensors").write_bytes(data)
    _weights("input_size_huge.safetensors", input_size=[1, 100_000, 100_000])


def resume_files() -> None:
    """A real resume file of `zoo train` (mlp on digits), then three hand edits of its zoo.resume entry."""
    torch.manual_seed(0)
    model = zoo.create("mlp", hidden=(4,), resolution=8, num_classes=10)
    tr, va, _ = get_loaders("digits", (1, 8, 8), batch_size=32, quick=True, seed=0)
    with tempfile.TemporaryDirectory() as d:
        fit(model, tr, va, TrainConfig(epochs=1, batch_size=32, progress=False), out_dir=d)
        src = Path(d) / "resume.safetensors"
        with safe_open(str(src), "pt") as f:
            state = json.loads(f.metadata()["zoo.resume"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    edits = {
        "resume_missing_config.safetensors": lambda s: s.pop("config"),
        "resume_bad_rng.safetensors": lambda s: s["rng"].update(torch=[7] * 10),
        "resume_epoch_string.safetensors": lambda s: s.update(epoch="1"),
    }
    for name, edit in edits.items():
        s = json.loads(json.dumps(state))
        edit(s)
        save_file(tensors, str(HERE / name), metadata={"zoo.resume": json.dumps(s)})


RECIPE_HEAD = "dataset: {name: digits, input_size: [1, 8, 8]}\n"


def recipe_files() -> None:
    """Malicious or broken recipes and a committed results.json with a string where a number belongs."""
    lines = ["  - &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for prev, cur in zip("abcdefgh", "bcdefghi"):
        lines.append(f"  - &{cur} [" + ", ".join([f"*{prev}"] * 9) + "]")
    (HERE / "alias_bomb.yaml").write_text("# billion laughs: 9^9 strings once the aliases are expanded\n"
                                          "name: bomb\ndataset:\n" + "\n".join(lines) + "\nstages: {}\n")
    (HERE / "python_tag.yaml").write_text(RECIPE_HEAD + 'name: !!python/object/apply:os.system ["echo pwned"]\n'
                                          "stages: {}\n")
    (HERE / "deep_nesting.yaml").write_text(RECIPE_HEAD + "stages: " + "[" * 3000 + "]" * 3000 + "\n")
    (HERE / "huge_int.yaml").write_text(RECIPE_HEAD + "seeds: [" + "9" * 5000 + "]\nstages: {}\n")
    (HERE / "bad_results.yaml").write_text(
        "# committed results next to it hold top1 as a string\n" + RECIPE_HEAD
        + "seeds: [0]\nstages:\n  w:\n    type: train\n    model: mlp\n    kwargs: {hidden: [4]}\n"
        + "    train: {epochs: 1, batch_size: 32}\ntable:\n  rows: [{stage: w}]\n")
    results = {"version": 1, "recipe": "bad_results", "quick": False, "seeds": [0], "columns": ["model", "top1"],
               "dataset": {}, "rows": [{"stage": "w", "label": "mlp", "top1": "97.5", "params": 10}],
               "kd_effect": [], "environment": {}, "latency": {}, "timing": {}}
    (HERE / "bad_results.results.json").write_text(json.dumps(results, indent=1) + "\n")
    (HERE / "bad_results.md").write_text("# a table\n")


def index_files() -> None:
    """A weights index whose entry points outside its folder, at a real (finite) weights file."""
    d = HERE / "index_traversal"
    d.mkdir(exist_ok=True)
    target = HERE / "good.safetensors"
    entry = {"tag": "outside", "architecture": "mlp", "kwargs": {**TINY, "hidden": [4]}, "dataset": "x",
             "metrics": {"top1": 1.0}, "sha256": hashlib.sha256(target.read_bytes()).hexdigest(),
             "file": "../good.safetensors", "size_bytes": target.stat().st_size, "recipe": "none",
             "compression": None, "classes": ["a", "b"]}
    (d / "index.json").write_text(json.dumps({"format": 1, "weights": [entry]}, indent=2) + "\n")


if __name__ == "__main__":
    weights_files()
    resume_files()
    recipe_files()
    index_files()
    print(f"wrote {len(list(HERE.iterdir()))} entries to {HERE}")
