"""The tutorial notebooks: committed without outputs, and each one runs top to bottom (nbclient) on the
venv's own Python, printing the checks it makes along the way."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = REPO / "notebooks"
KERNEL = "zoo-test-python"
CELL_TIMEOUT = 300  # seconds per cell; each notebook takes well under a minute on 2 cores

# lines each notebook must print (its own assertions run right before them)
EXPECTED: dict[str, list[str]] = {
    "01_quickstart.ipynb": ["CHECK mobilenet_v1 1.0-224 matches the paper", "CHECK profiled every registered model"],
    "02_compress.ipynb": ["CHECK int8 file is", "Pareto front (smallest first):"],
    "03_your_own_data.ipynb": ["CHECK validation top-1", "CHECK held-out top-1", "CHECK onnxruntime agrees"],
}


def test_the_three_notebooks_are_there() -> None:
    assert sorted(p.name for p in NOTEBOOK_DIR.glob("*.ipynb")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_is_committed_without_outputs(name: str) -> None:
    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code, f"{name} has no code cells"
    for i, cell in enumerate(code):
        assert cell.outputs == [], f"{name}: code cell {i} has stored outputs; strip them before committing"
        assert cell.execution_count is None, f"{name}: code cell {i} has an execution count; strip it"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3"
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith("# ")


@pytest.fixture
def kernel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    """A kernelspec in a temporary JUPYTER_PATH that runs ipykernel on this very interpreter (the venv's)."""
    spec = tmp_path / "kernels" / KERNEL
    spec.mkdir(parents=True)
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "zoo test kernel", "language": "python",
    }))
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    # one intra-op thread: on a shared 2-core machine, OpenMP threads fighting for cores is far slower
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    monkeypatch.setenv("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    return KERNEL


def _outputs(nb: nbformat.NotebookNode) -> tuple[str, list[str]]:
    text, kinds = [], []
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            kinds.append(out.output_type)
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type == "error":
                text.append(f"{out.ename}: {out.evalue}")
            else:
                kinds.extend(out.get("data", {}))
    return "".join(text), kinds


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_notebook_runs(name: str, kernel: str) -> None:
    from nbclient import NotebookClient

    nb = nbformat.read(NOTEBOOK_DIR / name, as_version=4)
    client = NotebookClient(nb, timeout=CELL_TIMEOUT, kernel_name=kernel,
                            resources={"metadata": {"path": str(NOTEBOOK_DIR)}})
    client.execute()  # raises CellExecutionError (with the cell and traceback) if any cell fails
    text, kinds = _outputs(nb)
    assert "error" not in kinds
    assert f"python: {sys.executable}\n" in text  # the kernel ran the venv's interpreter
    for line in EXPECTED[name]:
        assert line in text, f"{name} did not print {line!r}; its output:\n{text[-3000:]}"
    assert "image/png" in kinds, f"{name} drew no figure"
