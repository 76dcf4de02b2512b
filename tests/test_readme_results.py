"""Every figure in README.md's "Results on real data" table is read from a committed results file.

The rows are rendered by tests/readme_results.py from recipes/*.results.json and benchmarks/*.md; a number
typed into the README by hand, or left behind when a table is re-run, fails here.
"""

from __future__ import annotations

from pathlib import Path

from readme_results import ROWS, rendered_rows

REPO = Path(__file__).resolve().parents[1]


def _readme_results_rows() -> list[str]:
    """The body rows of the first table after the '## Results on real data' heading."""
    lines = (REPO / "README.md").read_text().splitlines()
    start = lines.index("## Results on real data")
    first = next(i for i in range(start, len(lines)) if lines[i].startswith("|"))
    end = next((i for i in range(first, len(lines)) if not lines[i].startswith("|")), len(lines))
    return lines[first + 2:end]


def test_readme_results_table_is_rendered_from_committed_files() -> None:
    readme, want = _readme_results_rows(), rendered_rows()
    assert len(readme) == len(ROWS), f"README has {len(readme)} result rows, tests/readme_results.py renders {len(ROWS)}"
    for got, exp in zip(readme, want):
        assert got == exp, ("README.md's results row differs from the committed files; paste the output of "
                            f"`python tests/readme_results.py`:\nREADME: {got}\nfiles:  {exp}")

