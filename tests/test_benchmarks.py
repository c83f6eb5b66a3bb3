"""benchmarks/bound_speed.py --quick end to end: every method reported, every bound sound."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bound_speed.py"
PROVABLE = ("FF", "Gram-FF", "tightest")


def _tables(text: str) -> list[tuple[list[str], list[list[str]]]]:
    """Every markdown table in ``text`` as (header, rows)."""
    tables, block = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            block.append([c.strip() for c in line.strip().strip("|").split("|")])
        elif block:
            tables.append((block[0], block[2:]))  # block[1] is the |---| rule
            block = []
    return tables


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    out_file = tmp_path_factory.mktemp("bench") / "quick.md"
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--quick", "--output", str(out_file)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, out_file.read_text()


def test_quick_run_reports_every_method(quick_run: tuple[str, str]) -> None:
    stdout, written = quick_run
    assert written.strip() == stdout.strip()
    headers = [h for h, _ in _tables(stdout)]
    methods = {"FF-PI(1)", "FF-PI(50)", "FF", "Gram-FF", "tightest", "FFT", "op-PI", "matrix"}
    seen = set().union(*map(set, headers))
    assert methods <= seen
    assert "passes over the weights' memory" in seen
    for section in ("## 1.", "## 2.", "## 3.", "## 4.", "Machine:", "torch "):
        assert section in stdout


def test_quick_run_bounds_are_sound(quick_run: tuple[str, str]) -> None:
    stdout, _ = quick_run
    checked = 0
    for header, rows in _tables(stdout):
        if "tightest" not in header or "shape" not in header:
            continue  # time tables and the memory table
        col = {name: i for i, name in enumerate(header)}
        # Table 1 bounds the circular stand-in, whose exact norm (on a subgrid) is FFT; the
        # others bound the real layer, bracketed from below by op-PI and exactly by matrix.
        circular = "op-PI" not in col
        refs = ["FFT"] if circular else [r for r in ("op-PI", "matrix") if r in col]
        assert rows
        for row in rows:
            for p in PROVABLE:
                bound = float(row[col[p]])
                for r in refs:
                    assert bound >= float(row[col[r]]) * (1 - 1e-3), (row[0], p, r)
                    checked += 1
            # The tightest bound is the minimum of the library's bounds, FF among them.
            assert float(row[col["tightest"]]) <= float(row[col["FF"]]) * (1 + 1e-3)
            # Power iteration approaches FF from below (3-digit rounding in the table).
            assert float(row[col["FF-PI(50)"]]) <= float(row[col["FF"]]) + 1e-3
            assert float(row[col["FF-PI(1)"]]) <= float(row[col["FF-PI(50)"]]) + 1e-3
            if "matrix" in col:
                assert float(row[col["op-PI"]]) <= float(row[col["matrix"]]) + 1e-3
    assert checked > 20
    assert (
        "Every provable bound >= every exact value and estimate from below of its operator: yes"
        in stdout
    )
