"""zoo's own index entries name no URL (the files ship with the package); a file missing from the weights
folder is downloaded once into the cache ($ZOO_HOME/weights) from $ZOO_WEIGHTS_URL + file (or an entry's
own url) through the real urllib code, here from local file:// URLs, and kept only when its sha256
matches. Nothing is downloaded when the file is present locally; without a URL the error names the file
and the ways to get it."""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import pytest
import torch

import zoo
from zoo.errors import ZooError
from zoo.weights.index import read_index, register_checkpoint, verify_index

REPO = Path(__file__).resolve().parents[1]
WEIGHTS = REPO / "weights"
FILE = "mobilenet_v1_w025_digits.safetensors"  # the smallest float checkpoint of the index
KWARGS = {"width": 0.25}
X = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))


def _raw_entry(file: str) -> dict[str, Any]:
    return next(r for r in json.loads((WEIGHTS / "index.json").read_text())["weights"] if r["file"] == file)


@pytest.fixture
def published(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """A weights folder whose index lists FILE at a file:// URL but does not hold it, an empty cache, and a
    counter of the urlopen calls (each still runs the real urllib code)."""
    pub = tmp_path / "published"
    pub.mkdir()
    shutil.copy(WEIGHTS / FILE, pub / FILE)
    wdir = tmp_path / "weights"
    wdir.mkdir()
    raw = {**_raw_entry(FILE), "url": (pub / FILE).as_uri()}
    (wdir / "index.json").write_text(json.dumps({"format": 1, "weights": [raw]}))
    monkeypatch.setenv("ZOO_WEIGHTS_DIR", str(wdir))
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))
    calls: list[str] = []
    real = urllib.request.urlopen

    def counting(url: str, *args: Any, **kwargs: Any) -> Any:
        calls.append(url)
        return real(url, *args, **kwargs)

    monkeypatch.setattr(urllib.request, "urlopen", counting)
    return {"wdir": wdir, "raw": raw, "calls": calls, "cache": tmp_path / "home" / "weights", "pub": pub}


def _out(m: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return m.eval()(X)


def test_committed_index_names_no_url_and_every_sha256() -> None:
    entries = read_index(WEIGHTS)
    assert entries
    for e in entries:
        assert e.url is None and (WEIGHTS / e.file).is_file()  # shipped with the package, not published anywhere
        assert len(e.sha256) == 64


def test_missing_file_is_downloaded_once_into_the_cache_and_loads(published: dict[str, Any]) -> None:
    m = zoo.create("mobilenet_v1", weights="digits", **KWARGS)
    cached = published["cache"] / FILE
    assert published["calls"] == [published["raw"]["url"]]
    assert cached.read_bytes() == (WEIGHTS / FILE).read_bytes()
    assert sorted(p.name for p in published["cache"].iterdir()) == [FILE]  # no partial download left behind
    ref = zoo.create("mobilenet_v1", weights=str(WEIGHTS / FILE))
    assert torch.equal(_out(m), _out(ref))
    (published["pub"] / FILE).unlink()  # the second load needs neither the network nor the published file
    assert torch.equal(_out(zoo.create("mobilenet_v1", weights="digits", **KWARGS)), _out(ref))
    assert len(published["calls"]) == 1
    assert verify_index() == []  # the downloaded copy is what verify hashes


def test_sha256_mismatch_names_the_file_and_both_hashes_and_keeps_nothing(published: dict[str, Any]) -> None:
    raw = {**published["raw"], "sha256": "0" * 64}
    (published["wdir"] / "index.json").write_text(json.dumps({"format": 1, "weights": [raw]}))
    actual = published["raw"]["sha256"]
    with pytest.raises(ZooError, match=rf"weights file '{FILE}' downloaded from 'file://.*' has sha256 {actual}, "
                                       rf"but the index expects {'0' * 64}; the download was not kept"):
        zoo.create("mobilenet_v1", weights="digits", **KWARGS)
    assert published["calls"] == [raw["url"]]
    assert list(published["cache"].iterdir()) == []


def test_corrupt_cached_copy_is_reported_not_replaced(published: dict[str, Any]) -> None:
    published["cache"].mkdir(parents=True)
    (published["cache"] / FILE).write_bytes(b"not the checkpoint")
    with pytest.raises(ZooError, match=rf"cached weights file '.*{FILE}' has sha256 [0-9a-f]{{64}}, but the index "
                                       rf"expects {published['raw']['sha256']}; delete it to download it again"):
        zoo.create("mobilenet_v1", weights="digits", **KWARGS)
    assert published["calls"] == []
    assert "but the index expects" in verify_index()[0]


def test_unreachable_url_and_absent_url_fail_clearly(published: dict[str, Any]) -> None:
    (published["pub"] / FILE).unlink()
    with pytest.raises(ZooError, match=rf"cannot download weights file '{FILE}' from 'file://"):
        zoo.create("mobilenet_v1", weights="digits", **KWARGS)
    raw = {**published["raw"], "url": None}
    (published["wdir"] / "index.json").write_text(json.dumps({"format": 1, "weights": [raw]}))
    ways = (rf"zoo's weights ship with the package \(reinstall zoo: `pip install .`\), or set \$ZOO_WEIGHTS_DIR to a "
            rf"folder holding '{FILE}' and its index.json, or set \$ZOO_WEIGHTS_URL to a base URL serving '{FILE}'")
    with pytest.raises(ZooError, match=rf"file '{FILE}' is missing from '{published['wdir']}'; " + ways):
        zoo.create("mobilenet_v1", weights="digits", **KWARGS)
    assert re.search(rf"file '{FILE}' is missing from .* and not downloaded to .*; " + ways, verify_index()[0])
    assert published["calls"] == [published["raw"]["url"]]  # the url-less entry tried nothing
    assert not published["cache"].exists() or list(published["cache"].iterdir()) == []


def test_base_url_set_by_the_user_serves_the_files(published: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    raw = {**published["raw"], "url": None}
    (published["wdir"] / "index.json").write_text(json.dumps({"format": 1, "weights": [raw]}))
    monkeypatch.setenv("ZOO_WEIGHTS_URL", published["pub"].as_uri())  # no trailing slash: zoo adds it
    m = zoo.create("mobilenet_v1", weights="digits", **KWARGS)
    assert published["calls"] == [published["pub"].as_uri() + "/" + FILE]
    assert torch.equal(_out(m), _out(zoo.create("mobilenet_v1", weights=str(WEIGHTS / FILE))))
    monkeypatch.setenv("ZOO_WEIGHTS_URL", "ftp://mirror.example/")
    with pytest.raises(ZooError, match=r"\$ZOO_WEIGHTS_URL: url='ftp://mirror.example/' is not allowed; expected a URL "
                                       r"with scheme https, http, file"):
        zoo.create("mobilenet_v1", weights="digits", **KWARGS).eval()  # cached: the base is still checked
    assert len(published["calls"]) == 1


def test_index_refuses_urls_zoo_does_not_download(published: dict[str, Any]) -> None:
    raw = {**published["raw"], "url": "ftp://example.org/" + FILE}
    (published["wdir"] / "index.json").write_text(json.dumps({"format": 1, "weights": [raw]}))
    with pytest.raises(ZooError, match=r"url='ftp://example.org/.*' is not allowed; expected a URL with scheme "
                                       r"https, http, file"):
        read_index()


def test_registered_weights_get_a_url_only_when_given(tmp_path: Path) -> None:
    src = tmp_path / FILE
    shutil.copy(WEIGHTS / FILE, src)
    args = (src, "t", "digits", {"top1": 90.0}, "recipes/r.yaml")
    assert register_checkpoint(*args, weights_dir=tmp_path / "a").url is None
    assert register_checkpoint(*args, weights_dir=tmp_path / "b", url=src.as_uri()).url == src.as_uri()
    with pytest.raises(ZooError, match=r"url='ftp://x' is not allowed; expected a URL with scheme https, http, file"):
        register_checkpoint(*args, weights_dir=tmp_path / "c", url="ftp://x")
    assert read_index(tmp_path / "b")[0].url == src.as_uri()


def test_nothing_is_downloaded_when_the_file_is_present(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZOO_WEIGHTS_DIR", raising=False)
    monkeypatch.setenv("ZOO_HOME", str(tmp_path / "home"))

    def refuse(url: str, *args: Any, **kwargs: Any) -> Any:
        raise AssertionError(f"downloaded {url} although the file is installed")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    m = zoo.create("mobilenet_v1", weights="digits", **KWARGS)
    assert torch.equal(_out(m), _out(zoo.create("mobilenet_v1", weights=str(WEIGHTS / FILE))))
    assert not (tmp_path / "home").exists()
