"""The report of a real run: valid figures and the final values of its metrics.csv.

The run is a real ``Trainer.fit`` with the callback and a CSVLogger; the expected values are
read back from its ``metrics.csv`` with the ``csv`` module, independently of the report code.
"""

from __future__ import annotations

import csv
import math
import re
import shutil
import subprocess
import sys
import warnings
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Decimal
from pathlib import Path

import numpy as np
import pytest
from helpers.callback import Module, loader, quiet_trainer, tiny_net
from hypothesis import given
from hypothesis import strategies as st
from lightning.pytorch.loggers import CSVLogger
from matplotlib.image import imread

from lightning_spectral.callback import SpectralBoundRegularizer
from lightning_spectral.report import format_value, main, make_report
from lightning_spectral.report_logs import certified_families, layer_keys, load_log

ROOT = Path(__file__).resolve().parents[2]
EPSILONS = [0.1, 0.5]
FIGURES = ["layers.png", "estimates.png", "bounds.png", "certified.png"]


@pytest.fixture(scope="module")
def run_root(tmp_path_factory) -> Path:
    """The CSVLogger save_dir of a 2-epoch fit (the metrics are under lightning_logs/version_0)."""
    root = tmp_path_factory.mktemp("logs")
    reg = SpectralBoundRegularizer(beta=1e-2, certify_epsilons=EPSILONS, exact_every_n_epochs=1)
    trainer = quiet_trainer(max_epochs=2, callbacks=[reg], logger=CSVLogger(root),
                            log_every_n_steps=2, limit_val_batches=None)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        trainer.fit(Module(tiny_net()), loader(8), loader(16))
    return root


def _metrics_csv(root: Path) -> Path:
    (path,) = root.glob("lightning_logs/version_*/metrics.csv")
    return path


def _last_values(path: Path) -> dict[str, float]:
    """Last non-empty value of every column, read directly from the CSV."""
    last: dict[str, float] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            last.update({k: float(v) for k, v in row.items() if v != ""})
    return last


def _tables(markdown: str) -> dict[str, list[list[str]]]:
    """Markdown tables of the report by their first header cell, rows as lists of cells."""
    tables: dict[str, list[list[str]]] = {}
    lines = markdown.splitlines()
    for i, line in enumerate(lines):
        if line.startswith("|") and i + 1 < len(lines) and lines[i + 1].startswith("|---"):
            rows = []
            for body in lines[i + 2:]:
                if not body.startswith("|"):
                    break
                rows.append([c.strip().strip("`") for c in body.strip("|").split("|")])
            tables[line.strip("|").split("|")[0].strip()] = rows
    return tables


def _assert_rounded(shown: str, exact: float, direction: str) -> None:
    value = float(shown)
    assert math.isclose(value, exact, rel_tol=1e-5, abs_tol=1e-12), (shown, exact)
    if direction == "up":
        assert Decimal(shown) >= Decimal(exact), (shown, exact)
    elif direction == "down":
        assert Decimal(shown) <= Decimal(exact), (shown, exact)


def _assert_valid_png(path: Path) -> None:
    image = imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
    assert len(np.unique(image[..., :3].reshape(-1, 3), axis=0)) > 10, f"{path} is blank"


def test_report_of_a_real_run(run_root, tmp_path):
    written = make_report(run_root, tmp_path / "out")
    assert [p.name for p in written] == ["report.md", *FIGURES]
    for name in FIGURES:
        _assert_valid_png(tmp_path / "out" / name)

    last = _last_values(_metrics_csv(run_root))
    text = (tmp_path / "out" / "report.md").read_text()
    assert str(_metrics_csv(run_root)) in text
    tables = _tables(text)
    final = {row[1]: row[2] for row in tables["value"]}
    for key, direction in [("spectral_bound/max", "up"), ("lipschitz/network", "up"),
                           ("certified/radius", "down"), ("spectral_ratio/max", "nearest")]:
        _assert_rounded(final[key], last[key], direction)
    certified = {float(row[0]): row[1] for row in tables["eps"]}
    assert sorted(certified) == EPSILONS
    for eps, shown in certified.items():
        _assert_rounded(shown, last[f"certified/acc@{eps:g}"], "down")

    layers = {row[0]: row[1:] for row in tables["layer"]}
    expected_layers = {k.split("/", 1)[1] for k in last if k.startswith("spectral_bound/")}
    assert set(layers) == expected_layers - {"max"}
    estimate_prefix = "spectral_estimate/" if "spectral_estimate/max" in last else "spectral/"
    for name, (estimate, bound, exact, ratio) in layers.items():
        _assert_rounded(estimate, last[estimate_prefix + name], "nearest")
        _assert_rounded(bound, last[f"spectral_bound/{name}"], "up")
        _assert_rounded(exact, last[f"spectral_exact/{name}"], "nearest")
        _assert_rounded(ratio, last[f"spectral_ratio/{name}"], "nearest")


def test_command_line_writes_the_same_report(run_root, tmp_path):
    expected = make_report(run_root, tmp_path / "function")[0].read_text()
    out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "lightning_spectral.report", str(run_root), "--out", str(out)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"wrote report to {out}" in proc.stdout
    assert (out / "report.md").read_text() == expected
    for name in FIGURES:
        assert str(out / name) in proc.stdout
        _assert_valid_png(out / name)


def test_default_output_is_next_to_the_metrics(run_root, tmp_path):
    root = tmp_path / "copy"
    shutil.copytree(run_root, root)
    written = make_report(root)
    assert written[0] == _metrics_csv(root).parent / "report" / "report.md"


def test_every_way_to_name_the_run_reads_the_same_file(run_root):
    path = _metrics_csv(run_root)
    for given_path in (run_root, run_root / "lightning_logs", path.parent, path):
        assert load_log(given_path).source == path


def _replace_in_csv(path: Path, column: str, value: float) -> None:
    with open(path, newline="") as handle:
        rows = list(csv.DictReader(handle))
    for row in rows:
        if row[column] != "":
            row[column] = repr(value)
    _write_rows(path, rows)


def _write_rows(path: Path, rows: list[dict[str, str]]) -> None:
    fields = list(dict.fromkeys(k for row in rows for k in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def test_latest_version_is_numeric(run_root, tmp_path):
    logs = tmp_path / "lightning_logs"
    for n, value in [(2, 2.0), (10, 10.0)]:  # "version_10" < "version_2" as strings
        shutil.copytree(_metrics_csv(run_root).parent, logs / f"version_{n}")
        _replace_in_csv(logs / f"version_{n}" / "metrics.csv", "lipschitz/network", value)
    (logs / "version_11").mkdir()  # a run that has not logged anything yet
    log = load_log(tmp_path)
    assert log.source == logs / "version_10" / "metrics.csv"
    assert log.last("lipschitz/network").value == 10.0


def _renamed_rows(run_root: Path) -> list[dict[str, str]]:
    """The run's rows with the estimates under their new names, plus other logged families."""
    with open(_metrics_csv(run_root), newline="") as handle:
        rows = list(csv.DictReader(handle))
    renamed = []
    for row in rows:
        new = {k.replace("spectral/penalty", "spectral_penalty").replace(
            "spectral/", "spectral_estimate/"): v for k, v in row.items()}
        accuracy = new.get("certified/acc@0.1", "")
        new["certified_curvature/acc@0.1"] = accuracy and repr(min(1.0, float(accuracy) + 0.1))
        new["test/certified/acc@0.5"] = accuracy
        new["val/acc@5"] = accuracy  # a top-5 accuracy, not a certificate
        new["spectral_bound/step_max"] = new.get("spectral_estimate/max", "")
        renamed.append(new)
    return renamed


def test_new_estimate_names_and_other_certificate_families(run_root, tmp_path):
    path = tmp_path / "metrics.csv"
    _write_rows(path, _renamed_rows(run_root))
    log = load_log(path)
    old = load_log(_metrics_csv(run_root))
    assert set(layer_keys(log, "estimate")) == set(layer_keys(old, "estimate")) != set()
    assert set(layer_keys(log, "bound")) == set(layer_keys(old, "bound"))  # no "step_max"
    families = certified_families(log)
    assert set(families) == {"certified", "certified_curvature", "test/certified"}
    assert set(families["certified_curvature"]) == {0.1}
    written = make_report(path, tmp_path / "out")
    text = written[0].read_text()
    assert "| eps | certified | certified_curvature | test/certified |" in text
    assert "`spectral_estimate/max`" in text and "`spectral_bound/step_max`" in text
    _assert_valid_png(tmp_path / "out" / "certified.png")


@pytest.mark.parametrize(
    "make_path, error, message",
    [
        (lambda tmp: tmp / "nowhere", FileNotFoundError, "does not exist"),
        (lambda tmp: tmp, FileNotFoundError, "no metrics.csv (CSVLogger) and no TensorBoard"),
    ],
)
def test_missing_log_is_named(tmp_path, make_path, error, message):
    with pytest.raises(error, match=re.escape(message)):
        load_log(make_path(tmp_path))


@pytest.mark.parametrize(
    "content, message",
    [
        ("epoch,step,spectral_bound/max\n0,1,big\n", "metrics.csv:2: spectral_bound/max='big'"),
        ("epoch,step,spectral_bound/max\n0,1,2.0,3.0\n", "metrics.csv:2: more values than"),
    ],
)
def test_malformed_csv_is_named_with_its_line(tmp_path, content, message):
    (tmp_path / "metrics.csv").write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        load_log(tmp_path)


def test_log_without_spectral_keys_lists_the_keys_found(tmp_path):
    _write_rows(tmp_path / "metrics.csv", [{"epoch": "0", "step": "1", "train/loss": "2.3",
                                           "val/acc": "0.5"}])
    with pytest.raises(ValueError, match="keys found: train/loss, val/acc"):
        make_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_several_loggers_must_be_chosen(run_root, tmp_path):
    for name in ("run_a", "run_b"):
        shutil.copytree(run_root / "lightning_logs", tmp_path / name)
    with pytest.raises(ValueError, match="several loggers' runs .*run_a.*run_b"):
        load_log(tmp_path)


def test_out_that_is_a_file_fails_before_reading(run_root, tmp_path):
    target = tmp_path / "taken"
    target.write_text("keep me")
    with pytest.raises(NotADirectoryError, match="is not a directory"):
        make_report(run_root, target)
    assert target.read_text() == "keep me"


def test_command_line_errors_exit_2_with_the_message(tmp_path, capsys):
    assert main([str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_tensorboard_events_without_tensorboard_say_what_to_install(tmp_path):
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.skip("tensorboard is installed: the TensorBoard test below covers reading")
    (tmp_path / "events.out.tfevents.1700000000.host.1.0").write_bytes(b"")
    with pytest.raises(ImportError, match=r"pip install tensorboard"):
        load_log(tmp_path)


def test_tensorboard_log_gives_the_same_report_as_the_csv(tmp_path):
    pytest.importorskip("tensorboard")
    from lightning.pytorch.loggers import TensorBoardLogger

    reg = SpectralBoundRegularizer(certify_epsilons=EPSILONS, exact_every_n_epochs=1)
    loggers = [CSVLogger(tmp_path / "csv"), TensorBoardLogger(tmp_path / "tb")]
    trainer = quiet_trainer(max_epochs=2, callbacks=[reg], log_every_n_steps=2,
                            logger=loggers, limit_val_batches=None)
    trainer.fit(Module(tiny_net()), loader(8), loader(16))
    log = load_log(tmp_path / "tb")
    assert log.source.parent.name == "lightning_logs" and log.source.name == "version_0"
    assert log.last("spectral_bound/max").epoch == 1
    from_tb = make_report(tmp_path / "tb", tmp_path / "out_tb")
    from_csv = make_report(tmp_path / "csv", tmp_path / "out_csv")
    assert [p.name for p in from_tb] == [p.name for p in from_csv] == ["report.md", *FIGURES]
    # Same values, steps and epochs; only the "Run:" line names another source.
    tb_text, csv_text = (p[0].read_text().split("\n", 3)[3] for p in (from_tb, from_csv))
    assert tb_text == csv_text


finite = st.floats(allow_nan=False, allow_infinity=False, width=64)


@given(finite)
def test_displayed_bounds_round_in_the_safe_direction(value):
    up, down = format_value(value, ROUND_CEILING), format_value(value, ROUND_FLOOR)
    assert Decimal(down) <= Decimal(value) <= Decimal(up)
    nearest = Decimal(format_value(value, ROUND_HALF_EVEN))
    assert abs(nearest - Decimal(value)) <= abs(Decimal(value)) * Decimal("1e-5")
