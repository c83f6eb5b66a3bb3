"""The bound-speed benchmark package: a --quick run end to end, its parts in process."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:  # `benchmarks` is not installed: import it from the checkout
    sys.path.insert(0, str(ROOT))

from benchmarks.boundspeed.config import Config, Layer  # noqa: E402
from benchmarks.boundspeed.measure import Job, check_soundness, measure  # noqa: E402
from benchmarks.boundspeed.methods import METHODS, PROVABLE  # noqa: E402
from benchmarks.boundspeed.sections import paper  # noqa: E402
from benchmarks.boundspeed.tables import paper_row  # noqa: E402

MODULE = ["-m", "benchmarks.boundspeed"]


def _run(
    args: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess:
    if env is None:
        path = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])
        env = {**os.environ, "PYTHONPATH": path}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
        check=False,
    )


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
    out_file = tmp_path_factory.mktemp("bench") / "sub" / "quick.md"  # parent created
    proc = _run([*MODULE, "--quick", "--output", str(out_file)])
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout, out_file.read_text()


PAPER_COLS = ["FF-PI(1)", "FF-PI(50)", "FF", "Gram-FF", "tightest", "FFT"]
REAL_COLS = ["FF-PI(1)", "FF-PI(50)", "FF", "Gram-FF", "tightest", "grid-Gram", "op-PI", "FFT"]
SPEEDUPS = ["FFT/tightest", "FFT/FF", "FFT/FF-PI(50)"]


def _value_head(methods: list[str], exact: str) -> list[str]:
    ratios = ["tightest by", "tightest/FF", f"FF/{exact}", f"tightest/{exact}"]
    return ["layer", "shape", "n", *methods, *ratios]


def test_quick_run_structure(quick_run: tuple[str, str]) -> None:
    stdout, written = quick_run
    assert written.strip() == stdout.strip()
    headings = [line for line in stdout.splitlines() if line.startswith("#")]
    assert (
        headings[0]
        == "# Spectral-norm bounds: speed and tightness (--quick smoke run, reduced sizes)"
    )
    assert [h.split(" (")[0] for h in headings[1:]] == [
        "## 1. ResNet-18 at the paper's table sizes",
        "## 2. ResNet-18 layers as they are, at their input sizes for a 32x32 image",
        "## 3. SmallCNN trained on the digits",
        "## 4. One batched power-iteration step over all ResNet-18 convolutions",
        "## Soundness",
    ]
    # --quick shrinks table 1's input sizes, and says so.
    assert "n (16/8/8/8 for 64/128/256/512 output channels; the paper's table has" in stdout
    machine = next(line for line in stdout.splitlines() if line.startswith("Machine: "))
    for part in (f"torch {torch.__version__}", "CPUs", "device cpu", "set_num_threads(1)"):
        assert part in machine
    quick_reps = ["conv1", "layer1.0.conv1 (+1)", "layer2.0.conv1", "layer2.0.downsample.0"]
    memory_rows = [
        "read every weight once (sum per tensor)",
        "power iteration step, weights pre-stacked",
        "power iteration step, stacking included",
    ]
    expected = [
        (_value_head(PAPER_COLS, "FFT"), quick_reps),
        (["layer", *PAPER_COLS, *SPEEDUPS], [*quick_reps, "**all 5 layers**"]),
        (_value_head(REAL_COLS, "op-PI"), quick_reps),
        (["layer", *REAL_COLS, *SPEEDUPS], [*quick_reps, "**all 5 layers**"]),
        (_value_head([*REAL_COLS, "matrix"], "matrix"), ["conv1", "conv2", "conv3"]),
        (
            ["layer", *REAL_COLS, "matrix", *SPEEDUPS],
            ["conv1", "conv2", "conv3", "**all 3 layers**"],
        ),
        (["operation", "median time", "passes over the weights' memory"], memory_rows),
    ]
    tables = _tables(stdout)
    assert len(tables) == len(expected)
    for (header, rows), (want_header, want_labels) in zip(tables, expected, strict=True):
        assert header == want_header
        assert all(len(row) == len(header) for row in rows)
        assert [row[0] for row in rows] == want_labels


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


def test_module_from_the_checkout_fails_early_on_an_output_directory(tmp_path: Path) -> None:
    # From the repository root and without PYTHONPATH: `-m` finds the checkout itself.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    proc = _run([*MODULE, "--quick", "--output", str(tmp_path)], cwd=ROOT, env=env)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "is a directory" in proc.stderr
    assert proc.stdout == ""  # nothing measured, nothing printed


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (["--output", "{tmp}"], "is a directory"),
        (["--output", "{tmp}/file.md/x.md"], "is not a writable directory"),
        (["--threads", "0"], "must be a positive integer"),
        (["--device", "nonsense"], "--device 'nonsense'"),
    ],
    ids=["output-dir", "output-under-file", "threads", "device"],
)
def test_bad_arguments_fail_before_measuring(tmp_path: Path, bad: list[str], message: str) -> None:
    (tmp_path / "file.md").write_text("")
    args = [a.replace("{tmp}", str(tmp_path)) for a in bad]
    proc = _run([*MODULE, "--quick", *args])
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert message in proc.stderr
    assert proc.stdout == ""  # nothing measured, nothing printed


class _Counting:
    """A real job: sums a tensor, counting its calls and preparations."""

    def __init__(self) -> None:
        self.runs = self.prepares = 0

    def run(self) -> torch.Tensor:
        self.runs += 1
        return torch.ones(3).sum()

    def prepare(self) -> None:
        self.prepares += 1


def test_measure_discards_the_warm_up_and_takes_the_median() -> None:
    job = _Counting()
    cfg = Config(quick=False, threads=1, device=torch.device("cpu"), time_budget=60.0)
    timing = measure(Job(job.run, job.prepare), cfg)
    assert timing.repeats == cfg.max_repeats
    assert job.runs == job.prepares == cfg.max_repeats + 1  # the warm-up call is not timed
    assert timing.value == 3.0 and timing.seconds > 0


def test_measure_keeps_a_call_over_the_budget_as_the_only_one() -> None:
    cfg = Config(quick=False, threads=1, device=torch.device("cpu"), time_budget=0.05)
    calls = []

    def slow() -> torch.Tensor:
        calls.append(None)
        time.sleep(0.06)
        return torch.zeros(())

    timing = measure(Job(slow), cfg)
    assert (timing.repeats, len(calls)) == (1, 1)
    assert timing.seconds >= 0.06


def test_every_method_on_a_strided_layer_brackets_its_exact_norm() -> None:
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1)
    cfg = Config(quick=True, threads=1, device=torch.device("cpu"), time_budget=0.0)
    values = {
        name: measure(m.build(conv, (7, 7), cfg), cfg).value
        for name, m in METHODS.items()
        if name != "FFT"  # the norm of another operator, the circular stride-1 stand-in
    }
    exact = values["matrix"]
    for name in PROVABLE:
        assert values[name] >= exact, name
    assert values["op-PI"] <= exact * (1 + 1e-5)
    assert values["FF-PI(1)"] <= values["FF-PI(50)"] * (1 + 1e-5)
    assert values["FF-PI(50)"] <= values["FF"] * (1 + 1e-5)
    assert values["tightest"] <= values["FF"]


def test_paper_row_checks_the_fft_extrapolation() -> None:
    conv = nn.Conv2d(6, 8, 3, padding=1, bias=False)
    cfg = Config(
        quick=False,
        threads=1,
        device=torch.device("cpu"),
        time_budget=0.0,
        paper_sizes={8: 16},
        fft_check_layer="c",
    )
    layer, checks = paper_row(Layer("c", conv, (16, 16), represents=["c", "d"]), cfg, {})
    assert [c.layer for c in checks] == ["c"]
    check = checks[0]
    # The n/4 grid's frequencies are among the n/2 grid's; every bound holds at every size.
    assert layer.values["FFT"] == check.subgrid_value <= check.half.value
    assert layer.values["tightest"] >= check.half.value
    assert layer.bounds_on_standin and layer.count == 2
    note = [line for line in paper([layer], checks, cfg) if line.startswith("Extrapolation")]
    assert len(note) == 1 and "n/2 = 8 grid" in note[0] and "n/4 grid" in note[0]


def test_check_soundness_names_a_bound_below_an_exact_value() -> None:
    conv = nn.Conv2d(1, 1, 1)
    sound = {"FF": 2.0, "Gram-FF": 2.0, "tightest": 1.5, "matrix": 1.5, "op-PI": 1.4}
    low = Layer("low", conv, (4, 4), values={**sound, "tightest": 1.2})
    standin = Layer("s", conv, (4, 4), values={**sound, "FFT": 1.7}, bounds_on_standin=True)
    assert check_soundness([Layer("ok", conv, (4, 4), values=sound)], PROVABLE) == []
    problems = check_soundness([low, standin], PROVABLE)
    assert any(p.startswith("low: tightest") and "< matrix" in p for p in problems)
    assert [p.split(":")[0] for p in problems if "FFT" in p] == ["s"]
