"""The pieces the experiment configs need: MnistCNN, option-A ResNets, the Lipschitz-margin loss
and Adam in ImageClassifier."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev

from lightning_spectral import network_lipschitz_bound
from lightning_spectral.demos import (
    CifarResNet,
    DigitsDataModule,
    ImageClassifier,
    MnistCNN,
    SmallCNN,
    ZeroPadShortcut,
    lipschitz_margin_loss,
    resnet32,
)


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def test_mnist_cnn_shapes_and_layers() -> None:
    model = MnistCNN()
    assert model(torch.rand(3, 1, 28, 28)).shape == (3, 10)
    names = [n for n, m in model.named_children() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert names == ["conv1", "conv2", "fc1", "fc2"]
    assert model.fc1.in_features == 32 * 7 * 7 and model.fc1.out_features == 100
    with pytest.raises(ValueError, match="hidden"):
        MnistCNN(hidden=0)


def test_zero_pad_shortcut_is_subsampling_with_zero_channels() -> None:
    x = torch.randn(2, 4, 6, 6)
    y = ZeroPadShortcut(4, 8, stride=2)(x)
    assert y.shape == (2, 8, 3, 3)
    torch.testing.assert_close(y[:, 2:6], x[:, :, ::2, ::2], rtol=0, atol=0)
    assert not y[:, :2].any() and not y[:, 6:].any()
    with pytest.raises(ValueError, match="out_channels"):
        ZeroPadShortcut(8, 4, stride=2)


def test_zero_pad_shortcut_operator_norm_is_one() -> None:
    # The registered constant, checked against the map's own matrix: largest singular value.
    layer = ZeroPadShortcut(3, 7, stride=2)
    jac = jacrev(lambda v: layer(v.reshape(1, 3, 5, 5)).flatten())(torch.zeros(75))
    assert torch.linalg.matrix_norm(jac, ord=2).item() == pytest.approx(1.0, abs=1e-6)
    assert network_lipschitz_bound(nn.Sequential(layer), (3, 5, 5)).item() == 1.0


def test_zero_pad_shortcut_is_traced_exactly_and_a_subclass_is_read_too() -> None:
    # The graph walk reads the slice and the zero padding: norm exactly 1, and a subclass
    # that doubles the output is bounded by what its own forward computes.
    class Doubled(ZeroPadShortcut):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 2 * super().forward(x)

    plain = network_lipschitz_bound(nn.Sequential(ZeroPadShortcut(2, 4, stride=2)), (2, 4, 4))
    doubled = network_lipschitz_bound(nn.Sequential(Doubled(2, 4, stride=2)), (2, 4, 4))
    assert float(plain) == 1.0 and float(doubled) == 2.0


def test_resnet32_option_a_has_the_papers_layers() -> None:
    model = resnet32(shortcut="A")
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 31 and all(c.kernel_size == (3, 3) for c in convs)
    assert sum(isinstance(m, ZeroPadShortcut) for m in model.modules()) == 2
    assert len([m for m in resnet32().modules() if isinstance(m, nn.Conv2d)]) == 33
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(ValueError, match="shortcut"):
        resnet32(shortcut="C")


def test_option_a_network_bound_holds_on_input_pairs() -> None:
    # ResNet-8 in eval mode with non-trivial batch-norm statistics: the guaranteed bound must
    # be at least every observed ratio ||f(x) - f(y)|| / ||x - y||.
    model = CifarResNet(1, shortcut="A")
    model.train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(16, 3, 16, 16))
    model.eval()
    bound = network_lipschitz_bound(model, (3, 16, 16)).item()
    x = torch.randn(64, 3, 16, 16)
    y = x + 1e-2 * torch.randn_like(x)
    with torch.no_grad():
        ratios = (model(x) - model(y)).flatten(1).norm(dim=1) / (x - y).flatten(1).norm(dim=1)
    assert 0 < ratios.max().item() <= bound


def test_lipschitz_margin_loss() -> None:
    logits = torch.tensor([[2.0, 1.0, -1.0], [0.0, 3.0, 0.5]])
    y = torch.tensor([0, 2])
    torch.testing.assert_close(
        lipschitz_margin_loss(logits, y, 0.0, 1.0), F.cross_entropy(logits, y)
    )
    shifted = torch.tensor([[2.0, 1.5, -0.5], [0.5, 3.5, 0.5]])
    torch.testing.assert_close(
        lipschitz_margin_loss(logits, y, 0.5, 3.0), F.cross_entropy(3.0 * shifted, y)
    )


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"loss": "hinge"}, "loss"),
        ({"loss": "lipschitz_margin", "margin": -1.0}, "margin"),
        ({"loss": "lipschitz_margin", "temperature": 0.0}, "temperature"),
        ({"loss": "lipschitz_margin", "margin": math.inf}, "margin"),
        ({"margin": 0.5}, "only apply to loss='lipschitz_margin'"),
        ({"temperature": 10.0}, "only apply to loss='lipschitz_margin'"),
        ({"optimizer": "rmsprop"}, "optimizer"),
    ],
)
def test_image_classifier_rejects_bad_loss_options(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ImageClassifier(SmallCNN(), **kwargs)


def test_margin_loss_is_what_training_step_returns(tmp_path: Path) -> None:
    seen: list[tuple[float, float]] = []

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            x, y = batch
            with torch.no_grad():
                self.expected = lipschitz_margin_loss(pl_module(x), y, 0.7, 5.0).item()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seen.append((outputs["loss"].item(), self.expected))

    module = ImageClassifier(
        SmallCNN(width=4),
        lr=1e-3,
        loss="lipschitz_margin",
        margin=0.7,
        temperature=5.0,
        optimizer="adam",
    )
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0, callbacks=[Probe()])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16))
    assert isinstance(trainer.optimizers[0], torch.optim.Adam)
    assert len(seen) == 2
    for returned, expected in seen:
        assert returned == pytest.approx(expected, rel=1e-6)
