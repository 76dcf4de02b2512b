"""zoo works outside the checkout: the wheel ships the weights index and the committed checkpoints as the
package data `zoo._weights`, an install of it loads tagged weights from another working directory with
outputs equal to the checkout's, and shared data is found only through $ZOO_DATA (or `zoo --data-root`).

The packaging tests build the wheel from a copy of the sources (no build isolation, no network), so
they take about 30 s; they are marked `packaging` (deselect with `-m "not packaging"`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest
import torch

import zoo
from zoo.cli import main
from zoo.data.sources import data_root
from zoo.errors import ZooError
from zoo.weights.index import read_index

REPO = Path(__file__).resolve().parents[1]
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", "build")
X = torch.randn(2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
# run by `python -S` from a folder outside the checkout, with this environment's packages on PYTHONPATH (its
# .pth files, so the checkout's editable zoo, are not read) and the zoo install under test first on the path
# and read as a site folder (argv[1]; its .pth files run): where zoo and its weights come from, the data
# root's error without $ZOO_DATA, and the outputs of a tagged weight for the input in argv[2], saved to argv[3],
# computed with this process's torch thread count (argv[4]) so that they are bit-identical to the checkout's
PROBE = """
import json, site, sys
sys.path.insert(0, sys.argv[1])
site.addsitedir(sys.argv[1])
import torch, zoo
torch.set_num_threads(int(sys.argv[4]))
from zoo.data.sources import data_root
from zoo.errors import ZooError
from zoo.weights.index import weights_root
try:
    data_error = str(data_root())
except ZooError as e:
    data_error = str(e)
m = zoo.create("mobilenet_v1", width=0.5, weights="digits").eval()
with torch.no_grad():
    torch.save(m(torch.load(sys.argv[2])), sys.argv[3])
print(json.dumps({"zoo": zoo.__file__, "weights": str(weights_root()), "data_error": data_error}))
"""


def _pip(*args: str, cwd: Path) -> None:
    subprocess.run([sys.executable, "-m", "pip", "-q", "--disable-pip-version-check", "--no-input", *args],
                   cwd=cwd, check=True, timeout=300)


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of what the build reads (pyproject.toml, README.md, zoo/, weights/), so that nothing is built
    in the checkout itself."""
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("zoo", "weights"):
        shutil.copytree(REPO / name, src / name, ignore=IGNORE)
    return src


def _probe(install: Path, tmp: Path) -> tuple[dict[str, str], torch.Tensor]:
    """Run PROBE on the zoo installed in `install`; its report and its outputs."""
    cwd = tmp / "elsewhere"
    cwd.mkdir()
    torch.save(X, tmp / "x.pt")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZOO_")}
    env.update(PYTHONPATH=sysconfig.get_paths()["purelib"], ZOO_HOME=str(tmp / "home"))
    args = [str(install), str(tmp / "x.pt"), str(tmp / "y.pt"), str(torch.get_num_threads())]
    out = subprocess.run([sys.executable, "-S", "-c", PROBE, *args], cwd=cwd, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert not (tmp / "home").exists(), "the installed zoo downloaded weights it ships"
    return json.loads(out.stdout.strip().splitlines()[-1]), torch.load(tmp / "y.pt")


def _same(reported: str, expected: Path) -> bool:
    return Path(reported).resolve() == expected.resolve()


def _checkout_outputs() -> torch.Tensor:
    with torch.no_grad():
        return zoo.create("mobilenet_v1", width=0.5, weights="digits").eval()(X)


@pytest.mark.packaging
def test_wheel_installed_outside_the_checkout_loads_tagged_weights(source: Path, tmp_path: Path) -> None:
    _pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w", str(tmp_path / "dist"), str(source),
         cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("zoo-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    files = ["__init__.py", "index.json"] + [e.file for e in read_index(REPO / "weights")]
    assert {f"zoo/_weights/{n}" for n in files} <= names, f"the wheel lacks some of {files}"
    sources = {p.relative_to(source).as_posix() for p in (source / "zoo").rglob("*.py")}
    assert sources <= names, (f"the wheel lacks {sorted(sources - names)}: add their package to [tool.setuptools] "
                              "packages in pyproject.toml")
    assert not [n for n in names if n.startswith(("weights/", "tests/"))]
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-index", "--target", str(site), str(wheel), cwd=tmp_path)
    report, y = _probe(site, tmp_path)
    assert _same(report["zoo"], site / "zoo" / "__init__.py") and _same(report["weights"], site / "zoo" / "_weights")
    assert "$ZOO_DATA is not set" in report["data_error"]
    assert torch.equal(y, _checkout_outputs())


@pytest.mark.packaging
def test_editable_install_maps_the_weights_folder(source: Path, tmp_path: Path) -> None:
    """`pip install -e .` (make install): the weights package is the source tree's weights/ folder itself."""
    site = tmp_path / "site"
    _pip("install", "--no-deps", "--no-build-isolation", "--no-index", "--target", str(site), "-e", str(source),
         cwd=tmp_path)
    report, y = _probe(site, tmp_path)
    assert _same(report["zoo"], source / "zoo" / "__init__.py") and _same(report["weights"], source / "weights")
    assert torch.equal(y, _checkout_outputs())


def test_data_root_is_only_zoo_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZOO_DATA", raising=False)
    with pytest.raises(ZooError, match=r"no data folder: \$ZOO_DATA is not set; set it \(or pass `zoo --data-root "
                                       r"DIR`\)"):
        data_root()
    monkeypatch.setenv("ZOO_DATA", str(tmp_path))
    assert data_root() == tmp_path


def test_cli_data_root_flag_sets_zoo_data(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ZOO_DATA", "unused")  # so that monkeypatch restores the variable the flag overwrites
    assert main(["--data-root", str(tmp_path), "list", "lenet*"]) == 0
    assert data_root() == tmp_path
    assert main(["--data-root", str(tmp_path / "absent"), "list"]) == 2
    assert f"--data-root '{tmp_path / 'absent'}' is not a folder" in capsys.readouterr().err
