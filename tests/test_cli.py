"""The `zoo` command line: list, profile, tables, info, and one-line errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

import zoo
from zoo.cli import COMMAND_MODULES, build_parser, main
from zoo.profile import profile
from zoo.tables import table_rows


def run(capsys: pytest.CaptureFixture, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "list")
    assert code == 0
    listed = [line.split()[0] for line in out.splitlines()[1:]]
    assert listed == zoo.list_models()
    code, out, _ = run(capsys, "list", "resnet*")
    assert code == 0 and "resnet50" in out and "mobilenet_v1" not in out
    code, _, err = run(capsys, "list", "nothing_like_this*")
    assert code == 2 and err.startswith("zoo: error:")


def test_profile_prints_table_and_totals(capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "profile", "mobilenet_v1", "--width", "0.5")
    assert code == 0, err
    p = profile(zoo.create("mobilenet_v1", width=0.5), flops=False)
    assert f"params:           {p.params:,}" in out
    assert f"MACs:             {p.macs:,}" in out
    assert "blocks.12.pw.conv" in out and "classifier" in out  # per-layer rows


def test_profile_passes_only_given_flags_and_kw(capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "profile", "resnet20", "--num-classes", "10", "--kw", "drop_rate=0.1", "--json")
    assert code == 0, err
    assert '"num_classes": 10' in out and '"drop_rate": 0.1' in out
    code, out, err = run(capsys, "profile", "mobilenet_v1", "--resolution", "96", "--in-chans", "1")
    assert code == 0, err
    assert "input size:       1x96x96" in out


@pytest.mark.parametrize("argv,needle", [
    (["profile", "mobilenet_v1", "--width", "wide"], "width='wide'"),
    (["profile", "mobilenet_v1", "--width", "0"], "width=0.0"),
    (["profile", "mobilenet_v1", "--width", "nan"], "width=nan"),
    (["profile", "mobilenet_v1", "--groups", "3"], "unknown argument 'groups'"),
    (["profile", "mobilenet_v1", "--resolution", "16"], "minimum 32"),
    (["profile", "mobilenet_v1", "--kw", "drop_rate"], "key=value"),
    (["profile", "mobilenet_v1", "--width", "0.5", "--kw", "width=0.75"], "given twice"),
    (["profile", "mobilenet_v"], "did you mean"),
    (["info", "resnet5"], "did you mean"),
])
def test_bad_values_one_line_exit_2(capsys: pytest.CaptureFixture, argv: list[str], needle: str) -> None:
    code, out, err = run(capsys, *argv)
    assert code == 2
    assert err.startswith("zoo: error:") and needle in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_usage_errors_are_one_line(capsys: pytest.CaptureFixture) -> None:
    code, _, err = run(capsys, "profile", "mobilenet_v1", "--no-such-flag")
    assert code == 2 and err.count("\n") == 1 and "--no-such-flag" in err
    code, _, err = run(capsys)
    assert code == 2 and err.count("\n") == 1
    code, out, _ = run(capsys, "--help")
    assert code == 0 and "profile" in out and "tables" in out


def test_python_m_zoo_subprocess() -> None:
    r = subprocess.run([sys.executable, "-m", "zoo", "profile", "mobilenet_v1", "--width", "-1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and r.stderr.startswith("zoo: error:")
    assert "width=-1" in r.stderr and "Traceback" not in r.stderr


def test_info(capsys: pytest.CaptureFixture) -> None:
    code, out, _ = run(capsys, "info", "mobilenet_v1")
    assert code == 0
    card = zoo.model_card("mobilenet_v1")
    assert card.paper in out and card.url in out and "3x224x224" in out
    for key, spec in zoo.model_args("mobilenet_v1").items():
        assert key in out and spec.describe() in out
    for ref in card.references:
        assert ref.label in out


def test_tables_runs(capsys: pytest.CaptureFixture) -> None:
    code, out, err = run(capsys, "tables")
    assert code == 0, out[-3000:]
    for name in zoo.list_models():
        card = zoo.model_card(name)
        if card.references:
            assert f"== {card.family} ==" in out
            assert all(ref.label in out for ref in card.references if ref.label)
    assert "MISMATCH" not in out.strip().rsplit("\n", 1)[0]  # rows (summary line excluded)
    assert out.strip().endswith("0 MISMATCH (MACs = conv + linear multiply-accumulates per image at the default input size)")


def test_tables_rows_and_mismatch_exit(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    rows = table_rows("resnet20")
    assert len(rows) == 1 and rows[0].ok and rows[0].zoo_params == 269_722  # option A, He et al. Table 6
    import zoo.tables as tables

    def broken(pattern: str = "*"):
        r = table_rows(pattern)
        r[0].paper_macs = r[0].zoo_macs * 2  # a 50% MAC mismatch must be flagged and fail the command
        return r

    monkeypatch.setattr(tables, "table_rows", broken)
    code, out, _ = run(capsys, "tables", "resnet20")
    assert code == 1 and "MISMATCH MACs" in out


def test_command_modules_are_importable() -> None:
    parser = build_parser()
    assert parser.prog == "zoo"
    for mod in COMMAND_MODULES:
        __import__(mod)
