"""The command line: help texts of every registered demo and one tiny run of the toy demo."""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from iama import cli

REPO = Path(__file__).resolve().parents[1]


def _available_demos() -> list[str]:
    names = []
    for name in cli.DEMOS:
        try:
            importlib.import_module(f"iama.demos.{name}")
        except ModuleNotFoundError as error:
            if error.name != f"iama.demos.{name}":
                raise
            continue
        names.append(name)
    return names


def _help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(argv)
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_top_level_help(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help(["--help"], capsys)
    assert "usage: iama" in out and "demo" in out


def test_demo_help_lists_available_demos(capsys: pytest.CaptureFixture[str]) -> None:
    out = _help(["demo", "--help"], capsys)
    for name in _available_demos():
        assert name in out


@pytest.mark.parametrize("name", list(cli.DEMOS))
def test_each_demo_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    if name not in _available_demos():
        pytest.skip(f"iama/demos/{name}.py is not in this tree")
    out = _help(["demo", name, "--help"], capsys)
    assert f"iama demo {name}" in out and "--out" in out


def test_help_through_python_dash_m() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "iama.cli", "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    assert "usage: iama" in proc.stdout


def test_toy_demo_tiny_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out_dir = tmp_path / "toy"
    code = cli.main(["demo", "toy", "--out", str(out_dir), "--grid", "101", "--steps", "300",
                     "--no-progress"])
    assert code == 0
    png = out_dir / "toy.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    printed = capsys.readouterr().out
    results = json.loads((out_dir / "results.json").read_text())
    for n in (2, 4, 8):
        run = results["runs"][str(n)]
        # The printed row is the saved numbers: n, reached, closed form, rel. gap, point mass.
        row = re.search(rf"^\s*{n}\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)", printed, re.MULTILINE)
        assert row is not None, printed
        reached, optimum, _, naive = (float(v) for v in row.groups())
        assert reached == pytest.approx(run["reached"], abs=1e-8)
        assert optimum == pytest.approx(run["optimum"], abs=1e-8)
        assert naive == pytest.approx(0.75, abs=1e-8)
        # Even on a coarse grid and few steps the inference-aware policy beats the point mass.
        assert run["reached"] > run["naive"] + 0.05
        assert abs(run["reached"] - run["optimum"]) / run["optimum"] < 2e-3
        assert run["monotone"]
    assert results["rate"]["bound_holds"]
    assert "bound holds at every T: True" in printed


def test_toy_demo_with_backtracking_steps(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fixed = cli.main(["demo", "toy", "--out", str(tmp_path / "fixed"), "--grid", "101", "--steps", "150",
                      "--no-progress"])
    trial = cli.main(["demo", "toy", "--out", str(tmp_path / "trial"), "--grid", "101", "--steps", "150",
                      "--no-progress", "--eta", "backtracking"])
    assert fixed == trial == 0
    assert "150 exact mirror steps of backtracking sizes" in capsys.readouterr().out
    runs = {name: json.loads((tmp_path / name / "results.json").read_text())["runs"]
            for name in ("fixed", "trial")}
    for n in ("2", "4", "8"):  # every step an ascent, and closer to the optimum than eta = 2
        assert runs["trial"][n]["monotone"]
        assert runs["trial"][n]["reached"] >= runs["fixed"][n]["reached"] - 1e-12
    with pytest.raises(SystemExit):
        cli.main(["demo", "toy", "--eta", "fast"])


def test_import_iama_is_light_and_lazy_names_resolve() -> None:
    code = (
        "import sys, iama; assert 'transformers' not in sys.modules, 'import iama pulled transformers'; "
        "assert iama.TrainerConfig.__name__ == 'TrainerConfig'; "
        "assert callable(iama.mirror_descent) and callable(iama.best_of_n)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
