"""Deep Compression (Han et al. 2016): weight sharing by k-means with trained centroids, Huffman coding, the
compressed file read back bit for bit by the one checkpoint loader, its refusals of damaged files, and the
`share` recipe stage on digits."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors import safe_open
from safetensors.torch import save_file

import zoo
from zoo.compress import deepfile, huffman, make_permanent, prune, save, share_weights
from zoo.compress.sharing import linear_kmeans, shared_layers
from zoo.recipe import RecipeError, load_recipe, run_recipe
from zoo.weights import load_checkpoint
from zoo.weights.checkpoint import state_tensors

BITS = {"conv": 8, "fc": 5}


def _pruned_lenet5(amount: float = 0.8) -> torch.nn.Module:
    """A small LeNet-5 (16 px input, 55k weights) with `amount` of each layer's weights zeroed by magnitude."""
    torch.manual_seed(0)
    return make_permanent(prune(zoo.create("lenet5", resolution=16), amount, scope="layer", protect=[]))


@pytest.fixture(scope="module")
def shared() -> torch.nn.Module:
    """The pruned small LeNet-5 with shared weights, conv 8 bits and fc 5 bits."""
    return share_weights(_pruned_lenet5(), bits=BITS)


def _bytes_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(
        a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        and torch.equal(a[k].reshape(-1).view(torch.uint8), b[k].reshape(-1).view(torch.uint8)) for k in a)


def test_kmeans_starts_linear_and_converges_to_cluster_means() -> None:
    v = torch.tensor([-1.0, -0.9, -1.1, 0.5, 0.6, 0.4, 2.0])
    cent, _ = linear_kmeans(v, 4, iters=0)  # no Lloyd step: the linear initialisation itself
    assert torch.allclose(cent, torch.linspace(-1.1, 2.0, 4), atol=1e-6)
    cent, assign = linear_kmeans(v, 3)
    assert torch.allclose(cent, torch.tensor([-1.0, 0.5, 2.0]), atol=1e-6)
    assert assign.tolist() == [0, 0, 0, 1, 1, 1, 2]
    cent, assign = linear_kmeans(torch.tensor([-1.0, -1.0, 1.0, 1.0]), 3)  # the middle cluster stays empty: 0
    assert cent.tolist() == [-1.0, 0.0, 1.0] and assign.tolist() == [0, 0, 2, 2]


def test_share_weights_bits_per_layer_kind_and_zeros_kept(shared: torch.nn.Module) -> None:
    pruned = _pruned_lenet5()
    steps = shared.spec.compression
    assert steps[-1] == {"kind": "share", "modules": {"features.0": 8, "features.2": 8, "features.5": 5,
                                                     "classifier": 5}}
    for path, m, p in shared_layers(shared):
        w, w0 = m.weight.detach(), pruned.get_submodule(path).weight.detach()
        assert torch.equal(w == 0, w0 == 0)  # pruned weights stay zero; kept weights get a centroid
        assert torch.unique(w[w != 0]).numel() <= 2 ** p.bits
        assert (w - w0).abs().max() < (w0.max() - w0.min()) / 2 ** p.bits  # nearest of 2^bits shared values


def test_centroid_gradient_is_the_sum_over_its_cluster_and_pruned_weights_stay_zero(shared: torch.nn.Module
                                                                                     ) -> None:
    model = copy.deepcopy(shared)
    m = model.classifier
    p = m.parametrizations.weight[0]
    x = torch.randn(4, 500)
    w = m.weight.detach().clone().requires_grad_(True)
    F.linear(x, w, m.bias).square().sum().backward()
    F.linear(x, m.weight, m.bias).square().sum().backward()
    keep = p.mask.reshape(-1)
    expected = torch.zeros(32).index_add_(0, p.idx.reshape(-1).long()[keep], w.grad.reshape(-1)[keep])
    assert torch.allclose(m.parametrizations.weight.original.grad, expected, rtol=1e-5, atol=1e-6)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    opt.step()
    assert torch.equal(m.weight.detach() == 0, ~p.mask)
    assert torch.unique(m.weight.detach()[p.mask]).numel() <= 32


def test_huffman_lengths_roundtrip_and_length_limit() -> None:
    assert huffman.code_lengths(np.array([1, 1, 2, 4, 0])).tolist() == [3, 3, 2, 1, 0]
    fib = [1, 1]
    while len(fib) < 30:
        fib.append(fib[-1] + fib[-2])
    lengths = huffman.code_lengths(np.array(fib))
    assert lengths.max() <= huffman.MAX_CODE_BITS
    huffman.check_lengths(lengths, 1, "test")
    rng = np.random.default_rng(0)
    sym = rng.choice(30, size=5000, p=np.array(fib) / sum(fib))
    sym[:30] = np.arange(30)
    data = huffman.encode(sym, lengths)
    assert np.array_equal(huffman.decode(data, lengths, sym.size, "test"), sym)
    packed = huffman.pack_lengths(lengths)
    assert len(packed) == 15 and np.array_equal(huffman.unpack_lengths(packed, 30), lengths)


def test_relative_indices_use_filler_entries_on_overflow() -> None:
    pos = np.array([0, 40, 41, 103, 200])
    sym = deepfile.relative_indices(pos, 5)  # F = 31: gaps 1, 40, 1, 62, 97 from position -1
    assert sym.tolist() == [0, 31, 8, 0, 31, 30, 31, 31, 31, 3]
    assert np.array_equal(deepfile.positions_of(sym, 5), pos)
    assert np.array_equal(deepfile.positions_of(deepfile.relative_indices(pos, 1), 1), pos)  # 1 bit: all fillers


def test_deep_file_decodes_bit_for_bit_through_the_one_loader(shared: torch.nn.Module, tmp_path: Path) -> None:
    dense, deep = tmp_path / "dense.safetensors", tmp_path / "deep.safetensors"
    save(zoo.create("lenet5", resolution=16), dense)
    save(shared, deep, format="deep", classes=[str(i) for i in range(10)])
    assert os.path.getsize(dense) / os.path.getsize(deep) > 10  # 80% pruned, 5-8 bits, Huffman-coded
    for loaded in (load_checkpoint(deep), zoo.create("lenet5", weights=str(deep), resolution=16),
                   zoo.compress.load(deep)):
        assert _bytes_equal(state_tensors(shared), state_tensors(loaded))
        for (_, m, _), (_, m2, _) in zip(shared_layers(shared), shared_layers(loaded)):
            assert torch.equal(m.weight.view(torch.int32), m2.weight.view(torch.int32))
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(shared.eval()(x), loaded.eval()(x))
    with safe_open(str(deep), "pt") as f:
        meta = f.metadata()
        assert list(f.keys()) == [deepfile.PAYLOAD]
    assert json.loads(meta["zoo.spec"])["compression"][-1]["kind"] == "share"
    assert len(json.loads(meta["zoo.sha256"])) == 64


def _rewrite(src: Path, dst: Path, edit_layout=None, edit_payload=None, fix_checksum: bool = True) -> Path:
    """Copy a deep file with its layout and/or payload edited, the checksum recomputed (or left stale)."""
    with safe_open(str(src), "pt") as f:
        meta, payload = f.metadata(), f.get_tensor(deepfile.PAYLOAD).numpy().tobytes()
    layout = json.loads(meta["zoo.deep"])
    if edit_layout:
        edit_layout(layout)
    if edit_payload:
        payload = edit_payload(bytearray(payload))
    meta["zoo.deep"] = json.dumps(layout)
    if fix_checksum:
        header = {k[4:]: json.loads(v) for k, v in meta.items() if k.startswith("zoo.") and k != "zoo.sha256"}
        meta["zoo.sha256"] = json.dumps(deepfile.checksum(header, bytes(payload)))
    save_file({deepfile.PAYLOAD: torch.frombuffer(bytearray(payload), dtype=torch.uint8)}, str(dst), metadata=meta)
    return dst


def _flip(buf: bytearray, at: int) -> bytearray:
    buf[at] ^= 0xFF
    return buf


def _first_shared(layout: dict) -> tuple[int, dict, int]:
    """(position in the layout, fields, payload offset) of the first shared record of a layout."""
    o = 0
    for i, rec in enumerate(deepfile.records(layout, "test")):
        if "layer" in rec:
            return i, rec, o
        o += sum(deepfile.sections(rec).values())
    raise AssertionError("no shared record")


def test_damaged_deep_files_are_refused_naming_the_file_and_the_part(shared: torch.nn.Module,
                                                                     tmp_path: Path) -> None:
    good = save(shared, tmp_path / "good.safetensors", format="deep")
    data = good.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(zoo.ZooError, match=r"cut\.safetensors.*truncated or corrupt.*header"):
        load_checkpoint(cut)
    with safe_open(str(good), "pt") as f:
        layout = json.loads(f.metadata()["zoo.deep"])
    _, rec, start = _first_shared(layout)
    k = 2 ** rec["bits"]
    bad = _rewrite(good, tmp_path / "sum.safetensors", edit_payload=lambda b: _flip(b, start), fix_checksum=False)
    with pytest.raises(zoo.ZooError, match=r"sum\.safetensors.*checksum mismatch"):
        load_checkpoint(bad)
    lengths_at = start + 4 * rec["centroids"]  # the code lengths of the cluster indices: all 1 bit is no prefix code
    bad = _rewrite(good, tmp_path / "cb.safetensors",
                   edit_payload=lambda b: b[:lengths_at] + bytes([0x11]) * (k // 2) + b[lengths_at + k // 2:])
    with pytest.raises(zoo.ZooError, match=r"cb\.safetensors.*codebook of the cluster indices.*Kraft"):
        load_checkpoint(bad)

    def more_entries(lay: dict) -> None:
        lay["records"][_first_shared(lay)[0]][deepfile.SHARED_FIELDS.index("entries")] += 50  # more than it holds

    bad = _rewrite(good, tmp_path / "huff.safetensors", edit_layout=more_entries)
    with pytest.raises(zoo.ZooError, match=r"huff\.safetensors.*Huffman stream of the relative indices"):
        load_checkpoint(bad)

    def bits9(lay: dict) -> None:
        lay["records"][_first_shared(lay)[0]][deepfile.SHARED_FIELDS.index("bits")] = 9

    bad = _rewrite(good, tmp_path / "head.safetensors", edit_layout=bits9)
    with pytest.raises(zoo.ZooError, match=r"head\.safetensors.*deep-compression header.*1\.\.8"):
        load_checkpoint(bad)


@pytest.mark.parametrize("bits, words", [
    (0, ["bits=0", "1..8"]), (9, ["bits=9", "1..8"]), (True, ["bits=True", "1..8"]),
    ({"conv": 12}, ["bits['conv']=12", "1..8"]),
    ({"fc1": 5}, ["'fc1'", "allowed: conv, fc, features.0, features.2, features.5, classifier"]),
])
def test_bad_bits_and_absent_layers_are_refused_with_the_allowed_values(bits, words) -> None:
    with pytest.raises(zoo.ZooError) as e:
        share_weights(zoo.create("lenet5", resolution=16), bits=bits)
    for w in words:
        assert w in str(e.value)


def test_bad_format_is_refused(shared: torch.nn.Module, tmp_path: Path) -> None:
    with pytest.raises(zoo.ZooError, match="format='zip' is not allowed; allowed: safetensors, deep"):
        save(shared, tmp_path / "x.safetensors", format="zip")


RECIPE = {
    "name": "dcq",
    "dataset": {"name": "digits", "input_size": [1, 8, 8]},
    "seed": 0,
    "defaults": {"train": {"epochs": 2, "lr": 0.1, "batch_size": 64},
                 "finetune": {"epochs": 1, "lr": 0.01, "batch_size": 64}},
    "stages": {
        "dense": {"type": "train", "model": "mlp", "kwargs": {"hidden": [64], "resolution": 8}},
        "pruned": {"type": "prune", "from": "dense", "amount": 0.7, "protect": []},
        "dc": {"type": "share", "from": "pruned", "bits": {"fc": 4}, "finetune": {"lr": 0.001}},
    },
    "table": {"rows": [{"stage": "dense", "label": "dense"}, {"stage": "dc", "label": "deep"}],
              "columns": ["model", "error", "file_kb", "file_ratio", "index_share", "codebook_share",
                          "value_share", "other_share", "decode_ms"]},
}


def test_share_stage_writes_and_rereads_the_deep_file(tmp_path: Path) -> None:
    p = tmp_path / "dcq.yaml"
    p.write_text(yaml.safe_dump(RECIPE, sort_keys=False))
    res = run_recipe(p, out=tmp_path / "out", log=lambda s: None)
    dense, dc = res["rows"]
    deep = tmp_path / "out" / "dc" / "seed0" / "model.deep.safetensors"
    assert dc["file"] == deep.name and dc["file_bytes"] == os.path.getsize(deep)
    assert dc["file_ratio"] == os.path.getsize(tmp_path / "out" / "dense" / "seed0" / "model.safetensors") / \
        os.path.getsize(deep)
    assert dense["file_ratio"] == 1.0 and "file_parts" not in dense
    assert sum(dc["file_parts"].values()) == dc["file_bytes"] and dc["decode_ms"] > 0
    model = load_checkpoint(deep)
    assert model.spec.classes == [str(i) for i in range(10)]
    assert abs(dc["top1"] - dense["top1"]) < 10


@pytest.mark.parametrize("stage, words", [
    ({"type": "share", "from": "dense"}, ["stages.dc.bits", "missing required key"]),
    ({"type": "share", "from": "dense", "bits": 9}, ["stages.dc.bits", "9 is not allowed", "1..8"]),
    ({"type": "share", "from": "dense", "bits": {"fc": 0}}, ["stages.dc.bits.fc", "0 is not allowed"]),
])
def test_share_stage_validation(tmp_path: Path, stage: dict, words: list[str]) -> None:
    r = copy.deepcopy(RECIPE)
    r["stages"]["dc"] = stage
    p = tmp_path / "bad.yaml"
    p.write_text(yaml.safe_dump(r, sort_keys=False))
    with pytest.raises(RecipeError) as e:
        load_recipe(p)
    for w in words:
        assert w in str(e.value)


def test_unshared_models_and_pruning_masks(tmp_path: Path) -> None:
    torch.manual_seed(0)
    plain = zoo.create("mlp", hidden=(16,), resolution=8)
    path = save(plain, tmp_path / "plain.safetensors", format="deep")  # no shared layer: every tensor raw
    assert _bytes_equal(state_tensors(plain), state_tensors(load_checkpoint(path)))
    masked = prune(plain, 0.5, protect=[])  # masks not baked: share_weights bakes them, zeros stay zero
    s = share_weights(masked, bits=3)
    assert [st["kind"] for st in s.spec.compression] == ["share"]
    for path_, m, _ in shared_layers(s):
        assert torch.equal(m.weight == 0, masked.get_submodule(path_).weight == 0)
    path = save(s, tmp_path / "s3.safetensors", format="deep")
    assert _bytes_equal(state_tensors(s), state_tensors(load_checkpoint(path)))


def test_nonzero_unused_centroids_are_stored_too(shared: torch.nn.Module, tmp_path: Path) -> None:
    model = copy.deepcopy(shared)
    m, p = model.features[0], model.features[0].parametrizations.weight[0]
    unused = torch.ones(256, dtype=torch.bool)
    unused[p.idx[p.mask].long()] = False
    assert unused.any()
    small = save(model, tmp_path / "small.safetensors", format="deep")
    with torch.no_grad():
        m.parametrizations.weight.original[unused.nonzero()[0]] = 1.5  # no weight uses it: the file keeps it anyway
    full = save(model, tmp_path / "full.safetensors", format="deep")
    assert os.path.getsize(full) > os.path.getsize(small)
    assert _bytes_equal(state_tensors(model), state_tensors(load_checkpoint(full)))


@pytest.mark.parametrize("name", ["lenet_300_100", "lenet5"])
def test_committed_deep_files_load_by_tag(name: str) -> None:
    entry = next(e for e in zoo.list_weights() if e.architecture == name and e.tag == "mnist-deep-compression")
    model = zoo.create(name, weights="mnist-deep-compression")
    assert model.spec.compression[-1]["kind"] == "share" and shared_layers(model)
    with safe_open(str(Path(__file__).resolve().parents[1] / "weights" / entry.file), "pt") as f:
        assert list(f.keys()) == [deepfile.PAYLOAD] and "zoo.deep" in f.metadata()
