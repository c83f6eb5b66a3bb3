"""examples/torchvision_resnet18_mnist.py: its model and data module on real MNIST."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
RAW = ROOT / "data" / "MNIST" / "raw"


def _example():
    path = ROOT / "examples" / "torchvision_resnet18_mnist.py"
    spec = importlib.util.spec_from_file_location("torchvision_resnet18_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(not RAW.is_dir(), reason="MNIST is not in data/MNIST/raw")
def test_model_and_data_fit_together() -> None:
    pytest.importorskip("torchvision")
    ex = _example()
    data = ex.MNISTSubset(str(ROOT / "data"), train_size=8, val_size=4, batch_size=4)
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    assert x.shape == (4, 1, 28, 28) and len(data.val) == 4
    model = ex.Classifier()
    assert model.net.conv1.in_channels == 1
    logits = model(x)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    assert float(model.training_step((x, y), 0)) > 0
