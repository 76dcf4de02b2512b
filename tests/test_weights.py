"""Weights: checkpoint files, the index (register, list, hash check) and `zoo.create(..., weights=...)`."""

from __future__ import annotations

import hashlib
import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import zoo
from zoo.cli import main
from zoo.weights import (
    info_lines, load_weights, read_checkpoint, read_index, register_checkpoint, save_checkpoint, verify_index,
    weights_for,
)

REPO = Path(__file__).resolve().parents[1]
KW = {"width": 0.25, "num_classes": 10, "resolution": 32}
CLASSES = [f"digit{i}" for i in range(10)]


def _small() -> torch.nn.Module:
    m = zoo.create("mobilenet_v1", **KW)
    with torch.no_grad():  # non-trivial BN statistics, so that loading them is visible in the outputs
        for mod in m.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.normal_(0, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    return m.eval()


@pytest.fixture
def wdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty weights folder used through $ZOO_WEIGHTS_DIR."""
    d = tmp_path / "weights"
    monkeypatch.setenv("ZOO_WEIGHTS_DIR", str(d))
    return d


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    """A saved mobilenet_v1 (width 0.25, 10 classes) checkpoint outside the weights folder, and its model."""
    m = _small()
    p = save_checkpoint(m, tmp_path / "runs" / "mnv1_w025_digits.safetensors", classes=CLASSES,
                        mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25])
    return p, m


@pytest.fixture
def registered(wdir: Path, ckpt: tuple[Path, torch.nn.Module]):
    """The checkpoint registered under tag 'digits' in the temporary index."""
    p, m = ckpt
    e = register_checkpoint(p, "digits", "sklearn-digits", {"top1": 0.9731}, "recipes/digits_mobilenet.yaml")
    return e, m


def _same_outputs(a: torch.nn.Module, b: torch.nn.Module) -> float:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        return float((a.eval()(x) - b.eval()(x)).abs().max())


def test_checkpoint_header_holds_spec_classes_and_normalisation(ckpt):
    p, m = ckpt
    c = read_checkpoint(p)
    assert c.spec == {"name": "mobilenet_v1", "kwargs": m.spec.kwargs}
    assert c.metadata == {"classes": CLASSES, "mean": [0.5] * 3, "std": [0.25] * 3}
    assert set(c.shapes) == set(m.state_dict())


def test_register_writes_index_entry_and_copies_file(registered, wdir: Path, ckpt):
    e, _ = registered
    p, m = ckpt
    dest = wdir / p.name
    assert dest.read_bytes() == p.read_bytes()
    assert e.sha256 == hashlib.sha256(p.read_bytes()).hexdigest()
    assert (e.tag, e.architecture, e.file, e.size_bytes) == ("digits", "mobilenet_v1", p.name, p.stat().st_size)
    assert e.kwargs == m.spec.kwargs and e.metrics == {"top1": 0.9731} and e.compression is None
    assert e.classes == CLASSES and e.recipe == "recipes/digits_mobilenet.yaml" and e.dataset == "sklearn-digits"
    data = json.loads((wdir / "index.json").read_text())
    assert data["format"] == 1 and len(data["weights"]) == 1 and data["weights"][0]["sha256"] == e.sha256
    assert read_index() == [e]
    assert verify_index() == []


def test_list_weights_and_weights_for(registered):
    e, _ = registered
    assert zoo.list_weights() == [e]
    assert zoo.list_weights("mobilenet_v1*") == [e] and zoo.list_weights("digits") == [e]
    assert zoo.list_weights("resnet*") == []
    assert weights_for("mobilenet_v1") == [e] and weights_for("resnet18") == []
    lines = info_lines("mobilenet_v1")
    assert lines[0] == "weights:" and "digits" in lines[1] and "top1=0.9731" in lines[1]
    assert info_lines("resnet18") == ["weights:      none in the index"]


def test_load_by_tag_checks_hash_and_restores_everything(registered):
    e, m = registered
    m2 = zoo.create("mobilenet_v1", width=0.25, weights="digits")
    assert m2.spec.kwargs == m.spec.kwargs  # num_classes and resolution come from the checkpoint
    assert _same_outputs(m, m2) == 0.0
    info = m2.spec.provenance
    assert info["tag"] == "digits" and info["sha256"] == e.sha256 and m2.spec.classes == CLASSES
    assert m2.spec.mean == [0.5] * 3 and m2.spec.std == [0.25] * 3 and info["metrics"] == {"top1": 0.9731}
    assert _same_outputs(m, zoo.create("mobilenet_v1", weights="digits")) == 0.0  # width from the index too


def test_load_local_path(ckpt):
    p, m = ckpt
    assert _same_outputs(m, zoo.create("mobilenet_v1", weights=str(p))) == 0.0
    assert _same_outputs(m, zoo.create("mobilenet_v1", width=0.25, weights=p)) == 0.0  # a Path works too
    bare = p.with_name("bare.safetensors")  # no zoo header: the kwargs must then be given
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(bare))
    assert _same_outputs(m, zoo.create("mobilenet_v1", **KW, weights=str(bare))) == 0.0


def test_load_weights_into_existing_model(ckpt):
    p, m = ckpt
    fresh = zoo.create("mobilenet_v1", **KW)
    assert load_weights(fresh, p) is fresh and _same_outputs(m, fresh) == 0.0
    with pytest.raises(zoo.ZooError, match="do not fit mobilenet_v1"):
        load_weights(zoo.create("mobilenet_v1", width=0.5, num_classes=10), p)


def test_compressed_checkpoints_rebuild_their_own_model(wdir: Path, tmp_path: Path):
    """A channel-pruned, then int8 model: the file rebuilds the smaller int8 network (zoo.compress)."""
    from zoo.compress import prune, quantize

    x = torch.randn(4, 3, 32, 32)
    pruned = prune(_small(), 0.5, granularity="channel", example_inputs=x[:1]).eval()
    q = quantize(pruned, "static", calibration=[x]).eval()
    dense = sum(p.numel() for p in _small().parameters())
    for tag, m in (("digits_pruned", pruned), ("digits_int8", q)):
        f = save_checkpoint(m, tmp_path / f"{tag}.safetensors", classes=CLASSES)
        e = register_checkpoint(f, tag, "sklearn-digits", {"top1": 0.9}, "recipes/x.yaml")
        # the index keeps each step without its per-layer details; the file header keeps everything
        assert e.compression == [{k: v for k, v in s.items() if not isinstance(v, (dict, list))}
                                 for s in m.spec.compression]
        for w in (str(f), tag):
            r = zoo.create("mobilenet_v1", weights=w).eval()
            assert r.spec.compression == m.spec.compression and r.spec.classes == CLASSES
            with torch.no_grad():
                assert torch.equal(r(x), m(x))
    assert [s["kind"] for s in e.compression] == ["channels", "int8"] and e.compression[-1]["method"] == "static"
    assert sum(p.numel() for p in zoo.create("mobilenet_v1", weights="digits_pruned").parameters()) < dense / 2
    r = zoo.create("mobilenet_v1", weights="digits_int8")  # int8 models come back in eval mode
    assert any(type(mod).__module__.startswith("torch.ao.nn.quantized") for mod in r.modules()) and not r.training
    with pytest.raises(zoo.ZooError, match="hold a compressed mobilenet_v1.*without reinit_head"):
        zoo.create("mobilenet_v1", weights="digits_int8", num_classes=5, reinit_head=True)


def test_wrong_hash(registered, wdir: Path):
    e, _ = registered
    f = wdir / e.file
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the tensor data: still valid safetensors, different hash
    f.write_bytes(bytes(data))
    with pytest.raises(zoo.ZooError, match=r"sha256 of .* is [0-9a-f]{64}, but the index says " + e.sha256):
        zoo.create("mobilenet_v1", weights="digits")
    assert len(verify_index()) == 1


@pytest.mark.parametrize("damage", ["truncate", "garbage", "header"])
def test_truncated_or_corrupt_file(ckpt, damage: str):
    p, _ = ckpt
    data = p.read_bytes()
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "garbage":
        data = b"not a safetensors file at all"
    else:
        data = data[:8] + b"#" + data[9:]  # the JSON header no longer parses
    p.write_bytes(data)
    with pytest.raises(zoo.ZooError, match="is truncated or corrupt .not a valid safetensors file"):
        zoo.create("mobilenet_v1", weights=str(p))


def test_other_width_names_shape_mismatches(ckpt):
    p, _ = ckpt
    with pytest.raises(zoo.ZooError) as exc:
        zoo.create("mobilenet_v1", width=0.5, weights=str(p))
    msg = str(exc.value)
    assert "saved for mobilenet_v1(act='relu', drop_rate=0.0, in_chans=3, num_classes=10, padding='symmetric', stem='imagenet', width=0.25)" in msg
    assert "do not fit mobilenet_v1(act='relu', drop_rate=0.0, in_chans=3, num_classes=10, padding='symmetric', stem='imagenet', width=0.5)" in msg
    assert "136 shape mismatches (stem.conv.weight: checkpoint (8, 3, 3, 3) vs model (16, 3, 3, 3), " in msg
    assert "blocks.0.dw.conv.weight: checkpoint (8, 1, 3, 3) vs model (16, 1, 3, 3)" in msg  # next layer, not stem.bn
    assert "missing keys" not in msg and "unexpected keys" not in msg


def test_other_architecture_names_missing_and_unexpected(ckpt):
    p, _ = ckpt
    with pytest.raises(zoo.ZooError) as exc:
        zoo.create("resnet20", weights=str(p))
    msg = str(exc.value)
    assert "do not fit resnet20(" in msg
    assert "missing keys (stages.0.0.conv1.conv.weight, " in msg
    assert "unexpected keys (blocks.0.dw.bn.bias, " in msg and "more)" in msg


def test_tag_for_other_width_or_unknown_tag(registered):
    with pytest.raises(zoo.ZooError, match=r"the 'digits' weights do not exist for width=0.5; available: "
                                           r"mobilenet_v1\(.*width=0.25\)\.digits"):
        zoo.create("mobilenet_v1", width=0.5, weights="digits")
    with pytest.raises(zoo.ZooError, match="no weights tagged 'imagenet'.*available tags: digits"):
        zoo.create("mobilenet_v1", weights="imagenet")
    with pytest.raises(zoo.ZooError, match="no weights tagged 'digits'.*the index has no weights for it"):
        zoo.create("resnet18", weights="digits")


def test_num_classes_mismatch_and_reinit_head(registered, ckpt):
    p, m = ckpt
    for w in ("digits", str(p)):
        with pytest.raises(zoo.ZooError, match="num_classes=5 differs from the 10 classes.*pass reinit_head=True"):
            zoo.create("mobilenet_v1", num_classes=5, weights=w)
        m5 = zoo.create("mobilenet_v1", num_classes=5, weights=w, reinit_head=True)
        assert m5.classifier.weight.shape == (5, 256) and m5.spec.kwargs["num_classes"] == 5
        sd, ref = m5.state_dict(), m.state_dict()
        assert all(torch.equal(sd[k], ref[k]) for k in ref if not k.startswith("classifier."))
        assert m5.spec.classes is None and m5.spec.provenance["head_reinitialised"] is True
    same = zoo.create("mobilenet_v1", weights="digits", reinit_head=True)  # same classes, fresh head
    assert same.classifier.weight.shape == (10, 256)
    assert not torch.equal(same.classifier.weight, m.classifier.weight)
    assert torch.equal(same.blocks[3].pw.conv.weight, m.blocks[3].pw.conv.weight)
    with pytest.raises(zoo.ZooError, match=r"reinit_head=True needs weights="):
        zoo.create("mobilenet_v1", reinit_head=True)
    with pytest.raises(zoo.ZooError, match=r"reinit_head=1 is not allowed"):
        zoo.create("mobilenet_v1", weights="digits", reinit_head=1)


def test_pickles_are_refused(tmp_path: Path):
    sd = {"w": torch.zeros(2)}
    torch.save(sd, tmp_path / "model.pt")
    torch.save(sd, tmp_path / "zip_in_disguise.safetensors")  # zip archive with a harmless-looking name
    torch.save(sd, tmp_path / "legacy.safetensors", _use_new_zipfile_serialization=False)
    (tmp_path / "raw.safetensors").write_bytes(pickle.dumps(sd, protocol=4))
    cases = {"model.pt": "a .pt file is a pickle", "zip_in_disguise.safetensors": "it is a zip archive",
             "legacy.safetensors": "it is a pickle", "raw.safetensors": "it is a pickle"}
    for name, why in cases.items():
        with pytest.raises(zoo.ZooError, match=f"refusing to load .*{why}.*arbitrary code execution.*safetensors"):
            zoo.create("resnet20", weights=str(tmp_path / name))
    for suffix in (".pth", ".bin"):  # refused by name, before the file is even opened
        with pytest.raises(zoo.ZooError, match="is a pickle"):
            zoo.create("resnet20", weights=str(tmp_path / f"missing{suffix}"))


def test_bad_weights_arguments(tmp_path: Path):
    with pytest.raises(zoo.ZooError, match="weights=3 is not allowed"):
        zoo.create("resnet20", weights=3)
    with pytest.raises(zoo.ZooError, match="does not exist"):
        zoo.create("resnet20", weights=str(tmp_path / "nope.safetensors"))
    with pytest.raises(zoo.ZooError, match="width=-1"):
        zoo.create("mobilenet_v1", width=-1, weights=str(tmp_path / "nope.safetensors"))


def test_register_validation(wdir: Path, ckpt, tmp_path: Path):
    p, m = ckpt
    args = ("digits", "sklearn-digits", {"top1": 0.97}, "recipes/x.yaml")
    with pytest.raises(zoo.ZooError, match="tag='a/b' is not allowed"):
        register_checkpoint(p, "a/b", *args[1:])
    with pytest.raises(zoo.ZooError, match="metrics=.* is not allowed"):
        register_checkpoint(p, "digits", "sklearn-digits", {}, "recipes/x.yaml")
    with pytest.raises(zoo.ZooError, match="metrics entry 'top1': 'high' is not allowed"):
        register_checkpoint(p, "digits", "sklearn-digits", {"top1": "high"}, "recipes/x.yaml")
    with pytest.raises(zoo.ZooError, match="over the 0.1 MB budget"):
        register_checkpoint(p, *args, max_total_mb=0.1)
    assert read_index() == [] and not (wdir / p.name).exists()
    bare = tmp_path / "bare.safetensors"
    save_file({"w": torch.zeros(2)}, str(bare))
    with pytest.raises(zoo.ZooError, match="has no zoo.spec header"):
        register_checkpoint(bare, *args)
    register_checkpoint(p, *args)
    with pytest.raises(zoo.ZooError, match=r"already in the index; pass replace=True"):
        register_checkpoint(p, *args)
    e = register_checkpoint(p, "digits", "sklearn-digits", {"top1": 0.98}, "recipes/x.yaml", replace=True)
    assert read_index() == [e] and e.metrics == {"top1": 0.98}
    with pytest.raises(zoo.ZooError, match="3 class names given for a model with num_classes=10"):
        save_checkpoint(m, tmp_path / "x.safetensors", classes=["a", "b", "c"])


def test_cli_weights_add_list_verify(wdir: Path, ckpt, capsys: pytest.CaptureFixture):
    p, _ = ckpt
    rc = main(["weights", "add", str(p), "--tag", "digits", "--dataset", "sklearn-digits", "--metric", "top1=0.97",
               "--metric", "params=123", "--recipe", "recipes/x.yaml"])
    out = capsys.readouterr().out
    assert rc == 0 and out.startswith("added mobilenet_v1(") and "top1=0.97, params=123" in out
    assert main(["weights", "list", "mobilenet*"]) == 0 and "digits" in capsys.readouterr().out
    assert main(["weights", "verify"]) == 0
    (wdir / p.name).write_bytes(p.read_bytes()[:-1] + b"\x00")
    assert main(["weights", "verify"]) == 1 and "does not match the index" in capsys.readouterr().out
    assert main(["weights", "add", str(p), "--tag", "x", "--dataset", "d", "--metric", "top1", "--recipe", "r"]) == 2
    assert "--metric 'top1' is not allowed" in capsys.readouterr().err


def test_committed_index_is_valid():
    """weights/index.json in the repository parses and every file it lists matches its sha256."""
    d = REPO / "weights"
    entries = read_index(d)
    assert verify_index(d) == []
    assert sum(e.size_bytes for e in entries) < 20e6
    for e in entries:
        assert e.recipe and e.metrics and e.architecture in zoo.list_models()
