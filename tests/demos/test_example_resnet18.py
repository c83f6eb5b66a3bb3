"""examples/torchvision_resnet18_mnist.py: its model and data module on real MNIST."""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
RAW = ROOT / "data" / "MNIST" / "raw"

needs_mnist = pytest.mark.skipif(not RAW.is_dir(), reason="MNIST is not in data/MNIST/raw")


def _example():
    path = ROOT / "examples" / "torchvision_resnet18_mnist.py"
    spec = importlib.util.spec_from_file_location("torchvision_resnet18_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key)]


@needs_mnist
def test_model_and_data_fit_together() -> None:
    pytest.importorskip("torchvision")
    ex = _example()
    data = ex.MNISTSubset(str(ROOT / "data"), train_size=8, val_size=4, batch_size=4)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 1, 28, 28) and len(data.val) == 4
    for small in (False, True):
        model = ex.Classifier(small=small)
        assert model.net.conv1.in_channels == 1
        logits = model(x)
        assert logits.shape == (4, 10) and torch.isfinite(logits).all()
        assert float(model.training_step((x, y), 0)) > 0


@needs_mnist
def test_fast_run_trains_certifies_tests_predicts_and_resumes(tmp_path, capsys) -> None:
    pytest.importorskip("torchvision")
    metrics = _example().main(["--fast", "--data-dir", str(ROOT / "data"),
                               "--log-dir", str(tmp_path)])

    # The test metrics are the test step's and the certification's, under test/.
    assert set(metrics) == {"test/acc", "test/certified/acc@0.1", "test/certified/acc@0.3",
                            "test/certified/radius", "test/lipschitz/network"}
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert metrics["test/certified/acc@0.3"] <= metrics["test/certified/acc@0.1"]
    assert metrics["test/certified/acc@0.1"] <= metrics["test/acc"]
    assert 0.0 < metrics["test/lipschitz/network"] < float("inf")
    assert "predicted 32 digits" in capsys.readouterr().out

    # Checkpoints: the last one, and the resumed run's best (epoch 1, 4 steps per epoch).
    ckpts = {p.name for p in (tmp_path / "checkpoints").iterdir()}
    assert "last.ckpt" in ckpts and "epoch=1-step=8.ckpt" in ckpts
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["epoch"] == 1 and state["global_step"] == 8

    # The first fit (version_0) and the resumed one (version_1) keep their own logs.
    first = _rows(tmp_path / "resnet18_mnist" / "version_0" / "metrics.csv")
    resumed = _rows(tmp_path / "resnet18_mnist" / "version_1" / "metrics.csv")
    assert {float(r["epoch"]) for r in first} == {0.0}
    assert 1.0 in {float(r["epoch"]) for r in resumed}
    for rows in (first, resumed):
        assert len(_column(rows, "val/acc")) == 1
        assert len(_column(rows, "certified/acc@0.1")) == 1
        bound = _column(rows, "spectral_bound/max")
        assert len(bound) == 1 and 0.0 < bound[0] < float("inf")
        assert _column(rows, "spectral_bound/net.fc") and _column(rows, "spectral_penalty")
        assert _column(rows, "spectral_estimate/net.layer1.0.conv1")
    (test_row,) = [r for r in resumed if r["test/acc"]]
    assert float(test_row["test/acc"]) == pytest.approx(metrics["test/acc"])
    assert not test_row["val/acc"]  # the test step logs test/acc, not the validation key
