"""Models of the examples and benchmarks, and a plain classification LightningModule.

* :class:`SmallCNN` - three convolutions and a linear head for 8x8 digits (seconds to train on CPU).
* :func:`resnet32` - the CIFAR-10 ResNet-32 of He et al. (2016), the model Singla & Feizi
  (ICLR 2021) regularize on CIFAR-10.
* :class:`ImageClassifier` - cross-entropy training with SGD, logging ``train/loss``,
  ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``; the regularizer callback adds its own
  terms on top of it, so the module knows nothing about spectral norms.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BasicBlock", "CifarResNet", "ImageClassifier", "SmallCNN", "resnet32"]


class SmallCNN(nn.Sequential):
    """Three 3x3 convolutions (padding 1; the last two with stride 2) with ReLU and a linear head.

    For ``8 x 8`` inputs the feature maps are ``8x8 -> 4x4 -> 2x2``; other sizes work as long as
    they are at least ``3 x 3`` and ``input_size`` is passed so the head knows its width. Written
    as an ``nn.Sequential`` of named layers (``conv1``, ``conv2``, ``conv3``, ``fc``) so that the
    network's Lipschitz bound is a plain product along the chain and layer names are stable for
    the callback's include/exclude patterns. No batch norm: its train-mode behaviour has no
    Lipschitz constant, and the model is small enough to train without it.

    Args:
        in_channels: channels of the input image.
        num_classes: number of logits.
        width: channels of the first convolution (the other two have ``2 * width``).
        input_size: spatial size ``(h, w)`` of the input.
    """

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        input_size: Sequence[int] = (8, 8),
    ) -> None:
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("width", width),
        ):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value!r}")
        # A 3x3 convolution with padding 1 and stride 2 maps n pixels to ceil(n / 2); two of them.
        h_out, w_out = (((n + 1) // 2 + 1) // 2 for n in input_size)
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1, stride=2)
        self.relu2 = nn.ReLU()
        self.conv3 = nn.Conv2d(2 * width, 2 * width, 3, padding=1, stride=2)
        self.relu3 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc = nn.Linear(2 * width * h_out * w_out, num_classes)


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`` with 3x3 convolutions (He et al. 2016).

    The shortcut is the identity when the shape is kept, otherwise a strided 1x1 convolution with
    batch norm (the paper's "option B" projection).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )
        else:
            self.shortcut = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016), section 4.2: depth ``6 n + 2``.

    A 3x3 convolution to 16 channels, three stages of ``n`` basic blocks with 16, 32, 64 channels
    (the first block of stages 2 and 3 halves the resolution with stride 2), global average
    pooling and a linear layer.
    """

    def __init__(self, blocks_per_stage: int, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage must be positive, got {blocks_per_stage!r}")
        self.conv1 = nn.Conv2d(in_channels, 16, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages = []
        channels = 16
        for i, width in enumerate((16, 32, 64)):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def resnet32(num_classes: int = 10, in_channels: int = 3) -> CifarResNet:
    """ResNet-32 for CIFAR-10 (5 basic blocks per stage, 31 convolutions + 1 linear layer)."""
    return CifarResNet(5, num_classes=num_classes, in_channels=in_channels)


class ImageClassifier(pl.LightningModule):
    """Cross-entropy classification of any ``model`` mapping images to logits, trained with SGD.

    Logs ``train/loss`` (and returns it from :meth:`training_step`), ``val/loss`` and ``val/acc``,
    ``test/loss`` and ``test/acc``; epoch values are means weighted by batch size and synced across
    processes. ``model`` is excluded from the saved hyperparameters (it is a module, not a
    value), so checkpoints reload with ``ImageClassifier.load_from_checkpoint(path, model=...)``
    and LightningCLI takes it as a ``class_path``.

    Args:
        model: the network; ``forward`` returns ``model(x)``.
        lr: SGD learning rate (0.1 for ResNet-32 as in the paper).
        momentum: SGD momentum.
        weight_decay: L2 penalty in the optimizer (the paper uses 1e-4 or 0).
        lr_schedule: ``"none"``; ``"cosine"`` annealing to 0 over ``trainer.max_epochs``; or
            ``"step"``: multiply by ``gamma`` at each epoch of ``milestones`` (the paper:
            0.1 at epochs 100 and 150 of 200).
        milestones: epochs of the step schedule.
        gamma: factor of the step schedule.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 0.1,
        momentum: float = 0.9,
        weight_decay: float = 0.0,
        lr_schedule: Literal["none", "cosine", "step"] = "none",
        milestones: Sequence[int] = (100, 150),
        gamma: float = 0.1,
    ) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        if not 0 <= momentum < 1:
            raise ValueError(f"momentum must lie in [0, 1), got {momentum!r}")
        if weight_decay < 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay!r}")
        if lr_schedule not in ("none", "cosine", "step"):
            raise ValueError(f"lr_schedule must be 'none', 'cosine' or 'step', got {lr_schedule!r}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True, batch_size=len(y))
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], prefix: str) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        acc = (logits.argmax(dim=1) == y).float().mean()
        self.log(f"{prefix}/loss", loss, batch_size=len(y), sync_dist=True)
        self.log(f"{prefix}/acc", acc, prog_bar=True, batch_size=len(y), sync_dist=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self):
        hp = self.hparams
        optimizer = torch.optim.SGD(
            self.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay
        )
        if hp.lr_schedule == "none":
            return optimizer
        if hp.lr_schedule == "cosine":
            epochs = max(1, self.trainer.max_epochs or 1)
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
        else:
            scheduler = torch.optim.lr_scheduler.MultiStepLR(
                optimizer, milestones=list(hp.milestones), gamma=hp.gamma
            )
        lr_scheduler = {"scheduler": scheduler, "interval": "epoch"}
        return {"optimizer": optimizer, "lr_scheduler": lr_scheduler}
