"""Models of the examples and benchmarks, and a plain classification LightningModule.

* :class:`SmallCNN` - three convolutions and a linear head for 8x8 digits (seconds to train on CPU).
* :class:`MnistCNN` - two strided convolutions and two linear layers for 28x28 MNIST.
* :func:`resnet32` - the CIFAR-10 ResNet-32 of He et al. (2016), the model Singla & Feizi
  (ICLR 2021) regularize on CIFAR-10.
* :class:`ImageClassifier` - cross-entropy training with SGD, logging ``train/loss``,
  ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``; the regularizer callback adds its own
  terms on top of it, so the module knows nothing about spectral norms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "ImageClassifier",
    "MnistCNN",
    "SmallCNN",
    "ZeroPadShortcut",
    "lipschitz_margin_loss",
    "resnet32",
]


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


class MnistCNN(nn.Sequential):
    """Two 4x4 convolutions (stride 2, padding 1) and two linear layers, for ``28 x 28`` MNIST.

    ``28x28 -> 14x14 -> 7x7``, then ``fc1`` to ``hidden`` units and ``fc2`` to the logits, with
    ReLU in between: the "small" MNIST model of the certified-robustness literature (Wong &
    Kolter, ICML 2018). Strided convolutions instead of pooling, and no batch norm, so the
    network is a plain chain of bounded layers and 1-Lipschitz activations: its Lipschitz bound
    is the product of the four layer bounds. It trains to about 99% in a few CPU epochs.

    Args:
        in_channels: channels of the input image.
        num_classes: number of logits.
        width: channels of ``conv1`` (``conv2`` has ``2 * width``).
        hidden: width of ``fc1``.
    """

    def __init__(
        self, in_channels: int = 1, num_classes: int = 10, width: int = 16, hidden: int = 100
    ) -> None:
        for name, value in (
            ("in_channels", in_channels),
            ("num_classes", num_classes),
            ("width", width),
            ("hidden", hidden),
        ):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value!r}")
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 4, stride=2, padding=1)
        self.relu1 = nn.ReLU()
        self.conv2 = nn.Conv2d(width, 2 * width, 4, stride=2, padding=1)
        self.relu2 = nn.ReLU()
        self.flatten = nn.Flatten()
        self.fc1 = nn.Linear(2 * width * 7 * 7, hidden)
        self.relu3 = nn.ReLU()
        self.fc2 = nn.Linear(hidden, num_classes)


class ZeroPadShortcut(nn.Module):
    """Option-A shortcut of He et al. (2016): subsample by ``stride``, append zero channels.

    ``x -> pad(x[:, :, ::stride, ::stride])`` with ``out_channels - in_channels`` zero channels
    split between both ends of the channel axis. No parameters. As a linear map it copies some
    input entries to distinct output positions and writes zeros elsewhere, so its l2 operator
    norm is exactly 1, which :func:`~lightning_spectral.network_lipschitz_bound` finds by
    tracing the strided slice and the zero padding (no rule needs registering).
    """

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        if out_channels < in_channels:
            raise ValueError(
                f"out_channels ({out_channels}) must be at least in_channels ({in_channels})"
            )
        if stride < 1:
            raise ValueError(f"stride must be positive, got {stride!r}")
        self.stride = stride
        self.before = (out_channels - in_channels) // 2
        self.after = out_channels - in_channels - self.before

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        return F.pad(x[:, :, ::s, ::s], (0, 0, 0, 0, self.before, self.after))


class BasicBlock(nn.Module):
    """``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`` with 3x3 convolutions (He et al. 2016).

    The shortcut is the identity when the shape is kept. Otherwise, with ``shortcut="B"`` a
    strided 1x1 convolution with batch norm (the "option B" projection); with ``shortcut="A"``
    the parameter-free :class:`ZeroPadShortcut` ("option A", the CIFAR ResNets of the paper and
    of He et al.'s CIFAR experiments).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int = 1,
        shortcut: Literal["A", "B"] = "B",
    ) -> None:
        super().__init__()
        if shortcut not in ("A", "B"):
            raise ValueError(f"shortcut must be 'A' or 'B', got {shortcut!r}")
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module
        if stride == 1 and in_channels == out_channels:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = ZeroPadShortcut(in_channels, out_channels, stride)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """The CIFAR ResNet of He et al. (2016), section 4.2: depth ``6 n + 2``.

    A 3x3 convolution to 16 channels, three stages of ``n`` basic blocks with 16, 32, 64 channels
    (the first block of stages 2 and 3 halves the resolution with stride 2), global average
    pooling and a linear layer. ``shortcut`` chooses the shortcut of the downsampling blocks
    (see :class:`BasicBlock`).
    """

    def __init__(
        self,
        blocks_per_stage: int,
        num_classes: int = 10,
        in_channels: int = 3,
        shortcut: Literal["A", "B"] = "B",
    ) -> None:
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
                blocks.append(BasicBlock(channels, width, stride, shortcut))
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


def resnet32(
    num_classes: int = 10, in_channels: int = 3, shortcut: Literal["A", "B"] = "B"
) -> CifarResNet:
    """ResNet-32 for CIFAR-10, 5 basic blocks per stage.

    ``shortcut="A"`` (zero-padding shortcuts, the paper's setting): 31 convolutions + 1 linear
    layer; ``"B"``: two more, the 1x1 projections of the downsampling blocks.
    """
    return CifarResNet(5, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut)


def lipschitz_margin_loss(
    logits: Tensor, target: Tensor, margin: float, temperature: float
) -> Tensor:
    """``CE(temperature * (logits + margin * (1 - onehot(target))), target)`` (Tsuzuku et al.).

    Zero only in the limit where the true logit leads every other one by more than ``margin``;
    with ``margin = 0`` and ``temperature = 1`` it is plain cross-entropy.
    """
    wrong = 1.0 - F.one_hot(target, logits.shape[1]).to(logits.dtype)
    return F.cross_entropy(temperature * (logits + margin * wrong), target)


def _check_loss(loss: str, margin: float, temperature: float) -> None:
    if loss not in ("cross_entropy", "lipschitz_margin"):
        raise ValueError(f"loss must be 'cross_entropy' or 'lipschitz_margin', got {loss!r}")
    if not (math.isfinite(margin) and margin >= 0):
        raise ValueError(f"margin must be finite and non-negative, got {margin!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be finite and positive, got {temperature!r}")
    if loss == "cross_entropy" and (margin != 0 or temperature != 1):
        # Silently ignoring them would train something other than what the config says.
        raise ValueError(
            f"margin={margin!r} and temperature={temperature!r} only apply to "
            "loss='lipschitz_margin'; with loss='cross_entropy' leave them at 0 and 1"
        )


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
        loss: training loss. ``"cross_entropy"``: ``CE(f(x), y)``. ``"lipschitz_margin"``: the
            Lipschitz-margin loss of Tsuzuku, Sato & Sugiyama (NeurIPS 2018),
            ``CE(temperature * (f(x) + margin * (1 - onehot(y))), y)``: every wrong logit is
            raised by ``margin``, so the loss keeps pushing the true logit's lead past
            ``margin``. With a network Lipschitz bound ``L`` (on the model's input), a lead of
            ``sqrt(2) * L * eps`` certifies radius ``eps``, so ``margin = sqrt(2) * L * eps``
            trains for radius ``eps`` (``L <= 1`` for a ReLU chain whose layers are constrained
            to 1). Validation and test losses are always plain cross-entropy.
        margin: logit offset of ``"lipschitz_margin"`` (must be 0 with cross-entropy).
        temperature: logit scale inside ``"lipschitz_margin"`` (must be 1 with cross-entropy):
            a 1-Lipschitz network has a narrow logit range on which plain cross-entropy
            saturates early.
        optimizer: ``"sgd"`` (with ``momentum``) or ``"adam"`` (``momentum`` unused).
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
        loss: Literal["cross_entropy", "lipschitz_margin"] = "cross_entropy",
        margin: float = 0.0,
        temperature: float = 1.0,
        optimizer: Literal["sgd", "adam"] = "sgd",
    ) -> None:
        super().__init__()
        _check_loss(loss, margin, temperature)
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"optimizer must be 'sgd' or 'adam', got {optimizer!r}")
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
        logits = self(x)
        if self.hparams.loss == "lipschitz_margin":
            loss = lipschitz_margin_loss(logits, y, self.hparams.margin, self.hparams.temperature)
        else:
            loss = F.cross_entropy(logits, y)
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
        if hp.optimizer == "adam":
            optimizer = torch.optim.Adam(self.parameters(), lr=hp.lr, weight_decay=hp.weight_decay)
        else:
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
