"""Models: shapes, the ResNet-32 architecture, and real Trainer runs of ImageClassifier."""

from __future__ import annotations

from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from torch import nn

from lightning_spectral.demos import (
    BasicBlock,
    DigitsDataModule,
    ImageClassifier,
    SmallCNN,
    resnet32,
)


def _trainer(tmp_path: Path, **kwargs) -> pl.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    return pl.Trainer(**{**defaults, **kwargs})


def test_small_cnn_shapes_and_layers() -> None:
    model = SmallCNN()
    assert model(torch.randn(5, 1, 8, 8)).shape == (5, 10)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [tuple(c.weight.shape) for c in convs] == [(16, 1, 3, 3), (32, 16, 3, 3), (32, 32, 3, 3)]
    # Other sizes: the head's width follows ceil(ceil(n / 2) / 2).
    for size, channels in (((28, 28), 1), ((32, 30), 3), ((5, 7), 2)):
        m = SmallCNN(in_channels=channels, num_classes=4, width=4, input_size=size)
        assert m(torch.randn(2, channels, *size)).shape == (2, 4)
    with pytest.raises(ValueError, match="width"):
        SmallCNN(width=0)


def test_resnet32_architecture() -> None:
    model = resnet32(num_classes=7)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # 1 stem + 3 stages x 5 blocks x 2 convs = 31 layers of 3x3 (6n + 2 = 32 with the linear
    # layer), plus the two 1x1 option-B projections where the shape changes.
    assert sum(c.kernel_size == (3, 3) for c in convs) == 31
    projections = [c for c in convs if c.kernel_size == (1, 1)]
    assert [(c.in_channels, c.out_channels, c.stride) for c in projections] == [
        (16, 32, (2, 2)),
        (32, 64, (2, 2)),
    ]
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock)]
    assert len(blocks) == 15
    assert [b.conv2.out_channels for b in blocks] == [16] * 5 + [32] * 5 + [64] * 5
    n_params = sum(p.numel() for p in model.parameters())
    assert 0.46e6 < n_params < 0.48e6  # He et al. report 0.46M (with option A shortcuts)
    # Feature map sizes 32 -> 16 -> 8 through the stages.
    x = torch.randn(1, 3, 32, 32)
    x = model.conv1(x)
    assert model.layer1(x).shape[-1] == 32
    assert model.layer2(model.layer1(x)).shape[-1] == 16
    assert model.layer3(model.layer2(model.layer1(x))).shape == (1, 64, 8, 8)


def test_image_classifier_learns_digits(tmp_path: Path) -> None:
    pl.seed_everything(0)
    dm = DigitsDataModule(batch_size=64, seed=0)
    module = ImageClassifier(SmallCNN(), lr=0.05)
    trainer = _trainer(tmp_path, max_epochs=4, limit_val_batches=2)
    dm.setup()
    x_val, y_val = next(iter(dm.val_dataloader()))
    loss_before = nn.functional.cross_entropy(module(x_val), y_val).item()
    trainer.fit(module, datamodule=dm)
    metrics = trainer.callback_metrics
    assert {"train/loss", "val/loss", "val/acc"} <= set(metrics)
    assert metrics["val/loss"].item() < 0.5 * loss_before
    results = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert results["test/acc"] > 0.7  # chance is 0.1
    # test/acc is the accuracy of the whole test split, checked independently.
    module.eval()
    with torch.no_grad():
        xs, ys = zip(*dm.test_dataloader(), strict=True)
        acc = (module(torch.cat(xs)).argmax(1) == torch.cat(ys)).float().mean().item()
    assert results["test/acc"] == pytest.approx(acc, abs=1e-6)


def test_training_step_returns_logged_loss(tmp_path: Path) -> None:
    seen: list[tuple[float, float, float]] = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            x, y = batch
            with torch.no_grad():
                # The weights have stepped since the loss was computed: only the logged and
                # returned values must agree exactly; the recomputation is a sanity check.
                recomputed = nn.functional.cross_entropy(pl_module(x), y).item()
            logged = trainer.callback_metrics["train/loss"].item()
            seen.append((outputs["loss"].item(), logged, recomputed))

    module = ImageClassifier(SmallCNN(), lr=1e-6)
    trainer = _trainer(tmp_path, max_steps=3, limit_val_batches=0, callbacks=[Probe()])
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=16))
    assert len(seen) == 3
    for returned, logged, recomputed in seen:
        assert returned == logged
        assert recomputed == pytest.approx(returned, rel=1e-3)


@pytest.mark.parametrize("schedule", ["cosine", "step"])
def test_lr_schedules(tmp_path: Path, schedule: str) -> None:
    module = ImageClassifier(
        SmallCNN(width=4), lr=0.1, lr_schedule=schedule, milestones=[1], gamma=0.5
    )
    trainer = _trainer(tmp_path, max_epochs=2, limit_train_batches=1, limit_val_batches=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=8))
    lr = trainer.optimizers[0].param_groups[0]["lr"]
    # Schedulers step once per epoch: cosine with T_max = max_epochs = 2 has reached 0; the step
    # schedule halved the rate once, when the epoch counter passed milestone 1.
    assert lr == pytest.approx(0.0 if schedule == "cosine" else 0.05, abs=1e-12)


def test_hyperparameters_exclude_the_model_and_checkpoint_reloads(tmp_path: Path) -> None:
    module = ImageClassifier(SmallCNN(width=4), lr=0.03, weight_decay=1e-4)
    assert "model" not in module.hparams
    assert module.hparams.lr == 0.03 and module.hparams.weight_decay == 1e-4
    trainer = _trainer(tmp_path, max_epochs=1, limit_train_batches=2, limit_val_batches=0)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=8))
    path = tmp_path / "m.ckpt"
    trainer.save_checkpoint(path)
    loaded = ImageClassifier.load_from_checkpoint(path, model=SmallCNN(width=4))
    assert loaded.hparams.lr == 0.03
    for a, b in zip(module.parameters(), loaded.parameters(), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"lr": 0.0}, "lr"),
        ({"momentum": 1.0}, "momentum"),
        ({"weight_decay": -1.0}, "weight_decay"),
        ({"lr_schedule": "linear"}, "lr_schedule"),
    ],
)
def test_image_classifier_rejects_bad_arguments(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        ImageClassifier(SmallCNN(), **kwargs)
