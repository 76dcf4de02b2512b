"""Bad input on the user's path ends in one ZooError (or one `zoo: error:` line, exit 2) that names the input
and what is expected, and nothing is written: truncated / corrupt / non-finite TFLite files at every entry
point that reads them, `zoo weights import` flags a .tflite file does not use, wrong normalisation or class
counts, and an output path that is an existing folder, for every caller of the checkpoint writer."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
from safetensors.torch import save_file

import zoo
from zoo.cli import main
from zoo.compress import save as compress_save
from zoo.errors import ZooError
from zoo.finetune import finetune
from zoo.io import atomic_save
from zoo.weights import import_state_dict, save_checkpoint

pytest.importorskip("tflite", reason="needs the TFLite extra: pip install 'zoo[tflite]'")

from test_finetune import make_folder  # noqa: E402
from tflite_builder import Builder, Exporter  # noqa: E402
from zoo.weights.tflite import import_tflite  # noqa: E402

KW = {"width": 0.25, "resolution": 32, "act": "relu6", "padding": "same"}


def _tiny(nan: bool = False) -> nn.Module:
    torch.manual_seed(0)
    m = zoo.create("mobilenet_v1", **KW).eval()
    if nan:
        with torch.no_grad():
            m.blocks[2].pw.conv.weight[3, 1, 0, 0] = float("nan")
    return m


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("bad")
    good = Exporter(_tiny(), quantized=True).export()
    out = {"good": d / "good.tflite", "cut": d / "cut.tflite", "nan": d / "nan.tflite", "size": d / "size.tflite"}
    out["good"].write_bytes(good)
    out["cut"].write_bytes(good[: len(good) // 2])
    out["nan"].write_bytes(Exporter(_tiny(nan=True), quantized=False).export())
    b = Builder()  # a constant tensor whose buffer is half the size its shape needs
    x = b.tensor("input", (1, 8, 8, 8))
    w = b.tensor("dw/w", (16, 1, 1, 8), data=np.zeros(64, np.float32))
    b.op("CONV_2D", [x, w, b.tensor("dw/b", (16,), data=np.zeros(16, np.float32))], [b.tensor("y", (1, 8, 8, 16))])
    out["size"].write_bytes(b.finish([x], [len(b.tensors) - 1]))
    torch.manual_seed(0)
    save_file(zoo.create("resnet20").state_dict(), str(d / "foreign.safetensors"))  # another project's: no spec
    out["foreign"] = d / "foreign.safetensors"
    out["folder"] = make_folder(d / "imgs")
    return out


def _cli_fails(capsys: pytest.CaptureFixture, argv: list[str], *needles: str) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("zoo: error: "), err
    for n in needles:
        assert n in err, err
    return err


CORRUPT = {"cut": "is a truncated or corrupt TFLite file", "size": "needs 512 bytes of data but its buffer holds 256",
           "nan": "has 1 NaN/inf weights; zoo imports only finite weights"}


@pytest.mark.parametrize("kind", sorted(CORRUPT))
def test_bad_tflite_fails_at_every_entry_point(kind: str, files: dict[str, Path], tmp_path: Path,
                                               capsys: pytest.CaptureFixture) -> None:
    path, needle = files[kind], CORRUPT[kind]
    with pytest.raises(ZooError, match=needle):
        import_tflite(path, tmp_path / "x.safetensors")
    _cli_fails(capsys, ["weights", "import", str(path), "--out", str(tmp_path / "x.safetensors")], str(path), needle)
    _cli_fails(capsys, ["finetune", "--weights", str(path), "--data", str(files["folder"]), "--out",
                        str(tmp_path / "ft")], str(path), needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # nothing written


@pytest.mark.parametrize("flags", [["--classes", "cifar10"], ["--mean", "0.5,0.5,0.5", "--std", "0.2,0.2,0.2"],
                                   ["--kw", "act=relu"]])
def test_tflite_import_refuses_flags_it_would_ignore(flags: list[str], files: dict[str, Path], tmp_path: Path,
                                                    capsys: pytest.CaptureFixture) -> None:
    _cli_fails(capsys, ["weights", "import", str(files["good"]), "--out", str(tmp_path / "x.safetensors"), *flags],
               f"{flags[0]}", "cannot be used with the TFLite file", "gives its own architecture, classes and input")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, needle", [
    (["--mean", "0.5,0.5", "--std", "0.2,0.2"], "--mean has 2 values, but resnet20("),
    (["--mean", "0.5,0.5,0.5", "--std", "0.2,0,0.2"],
     "--std=[0.2, 0.0, 0.2] is not allowed; expected one finite number > 0"),
    (["--classes", "digits", "--kw", "num_classes=9"], "--classes names 10 classes, but resnet20("),
])
def test_foreign_import_names_the_flag(flags: list[str], needle: str, files: dict[str, Path], tmp_path: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    _cli_fails(capsys, ["weights", "import", str(files["foreign"]), "--model", "resnet20", "--out",
                        str(tmp_path / "x.safetensors"), *flags], needle)
    assert list(tmp_path.iterdir()) == []


def test_output_path_that_is_a_folder(files: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    taken = tmp_path / "m.safetensors"
    taken.mkdir()
    expect = f"'{taken}' is not allowed: it is an existing folder; expected a .safetensors file path"
    model = _tiny()
    for call in (lambda: save_checkpoint(model, taken), lambda: compress_save(model, taken),
                 lambda: import_tflite(files["good"], taken),
                 lambda: import_state_dict(files["foreign"], "resnet20", taken)):
        with pytest.raises(ZooError, match=expect.replace("(", r"\(").replace(".", r"\.")):
            call()
    with pytest.raises(ZooError, match="it is an existing folder; expected a file path"):
        atomic_save({"x": torch.zeros(1)}, taken, {})
    for src in (files["good"], files["foreign"]):
        _cli_fails(capsys, ["weights", "import", str(src), "--model", "mobilenet_v1" if src.suffix == ".tflite"
                            else "resnet20", "--out", str(taken)], f"--out {expect}")
    (tmp_path / "ft" / "model.safetensors").mkdir(parents=True)
    with pytest.raises(ZooError, match="--out file '.*model.safetensors' is not allowed: it is an existing folder"):
        finetune(None, files["folder"], weights=files["good"], out=tmp_path / "ft", epochs=1, progress=False)
    assert list(taken.iterdir()) == [] and list((tmp_path / "ft").iterdir()) == [tmp_path / "ft" / "model.safetensors"]
