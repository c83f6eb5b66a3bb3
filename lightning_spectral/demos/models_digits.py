"""Small convolutional networks for the digits and MNIST demos.

* :class:`SmallCNN` - three convolutions and a linear head for 8x8 digits (seconds to train on CPU).
* :class:`MnistCNN` - two strided convolutions and two linear layers for 28x28 MNIST.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..activations import MaxMin

__all__ = ["MaxMinCNN", "MnistCNN", "SmallCNN"]


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



class MaxMinCNN(nn.Sequential):
    """GloRo's "4C3F" layout for ``28 x 28`` MNIST with MaxMin activations (certified training).

    Four convolutions (``3x3``, then ``4x4`` stride 2, twice: ``28 -> 14 -> 7``) with ``width``,
    ``width``, ``2 width``, ``2 width`` channels, then two dense layers of ``dense`` units and
    the linear head; every activation is :class:`~lightning_spectral.MaxMin`, which keeps
    gradient norms, so a network trained for a Lipschitz certificate keeps its capacity
    (Leino, Wang & Fredrikson, ICML 2021). A plain chain: its Lipschitz bound is the product of
    the layer bounds, and the head is an ``nn.Linear`` (pairwise certificates).

    Args:
        in_channels: channels of the input image.
        num_classes: number of logits.
        width: channels of the first two convolutions (even).
        dense: units of the two dense layers (even).
    """

    def __init__(self, in_channels: int = 1, num_classes: int = 10, width: int = 16,
                 dense: int = 256) -> None:
        for name, value in (("width", width), ("dense", dense)):
            if value < 2 or value % 2:
                raise ValueError(f"{name} must be a positive even number (MaxMin pairs), got "
                                 f"{value!r}")
        w = width
        super().__init__(
            nn.Conv2d(in_channels, w, 3, padding=1), MaxMin(),
            nn.Conv2d(w, w, 4, stride=2, padding=1), MaxMin(),
            nn.Conv2d(w, 2 * w, 3, padding=1), MaxMin(),
            nn.Conv2d(2 * w, 2 * w, 4, stride=2, padding=1), MaxMin(),
            nn.Flatten(),
            nn.Linear(2 * w * 49, dense), MaxMin(),
            nn.Linear(dense, dense), MaxMin(),
            nn.Linear(dense, num_classes),
        )
