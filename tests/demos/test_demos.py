"""The demos package: the README's demo command, and its separation from the library proper."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}


def _python(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=ROOT,
        timeout=300,
        check=False,
    )


def test_readme_demo_command_runs(tmp_path: Path) -> None:
    log_dir = tmp_path / "demo_logs"
    proc = _python("-m", "lightning_spectral.demo", "--epochs", "2", "--log-dir", str(log_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    # The demo sets no option that does nothing (the callback warns about such options).
    assert "has no effect" not in proc.stderr, proc.stderr[-3000:]
    rows = {
        cells[0]: cells[1:]
        for line in proc.stdout.splitlines()
        if line.startswith("|")
        for cells in [[c.strip() for c in line.strip("|").split("|")]]
    }
    for layer in ("model.conv1", "model.conv2", "model.conv3", "model.fc", "network L"):
        assert layer in rows, proc.stdout
        assert all(float(v) > 0 for v in rows[layer]), rows[layer]
    assert all(0.0 <= float(v) <= 1.0 for v in rows["test acc"][1:]), rows["test acc"]
    # The penalized run's logs hold guaranteed bounds and certificates, and the report of them
    # is written and named in the output.
    header = (log_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("spectral_bound/max", "spectral_estimate/max", "certified/acc@0.1"):
        assert key in header, header
    report = log_dir / "report" / "report.md"
    assert report.is_file() and str(report) in proc.stdout, proc.stdout


def test_library_does_not_import_the_demos() -> None:
    code = (
        "import sys, lightning_spectral as ls\n"
        "import lightning_spectral.callback, lightning_spectral.network\n"
        "import lightning_spectral.certify\n"
        "import lightning_spectral.functional\n"
        "[getattr(ls, name) for name in ls.__all__]\n"
        "print(sorted(m for m in sys.modules if m.startswith('lightning_spectral.demo')))\n"
    )
    proc = _python("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "[]"


def test_demos_package_exports_the_data_and_models() -> None:
    import lightning_spectral.demos as demos
    from lightning_spectral.demos import (
        classifier,
        data_digits,
        data_torchvision,
        models_digits,
        models_resnet,
    )

    sources = (classifier, data_digits, data_torchvision, models_digits, models_resnet)
    assert set(demos.__all__) == {name for source in sources for name in source.__all__}
    for name in demos.__all__:
        source = next(source for source in sources if name in source.__all__)
        assert getattr(demos, name) is getattr(source, name)
