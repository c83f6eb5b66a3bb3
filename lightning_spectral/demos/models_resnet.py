"""The CIFAR-10 ResNet-32 of He et al. (2016), the model Singla & Feizi (ICLR 2021) regularize.

* :func:`resnet32` builds it; :class:`CifarResNet` is the network, :class:`BasicBlock` its
  residual block, :class:`ZeroPadShortcut` the parameter-free option-A shortcut.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BasicBlock", "CifarResNet", "ZeroPadShortcut", "resnet32"]


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

