"""LightningDataModules for the datasets the examples, tests and benchmarks use.

* :class:`DigitsDataModule` - scikit-learn's handwritten digits (1797 images of 8x8 pixels,
  bundled with scikit-learn, so nothing is downloaded): small enough to train a CNN on CPU in
  seconds, which is what the demo, the tests and the benchmarks need.
* :class:`MNISTDataModule`, :class:`CIFAR10DataModule` - the datasets on which Singla & Feizi
  (ICLR 2021) train with their bound as a penalty, read through ``torchvision.datasets``.
  Nothing is downloaded unless the user passes ``download=True``.

scikit-learn and torchvision come with the ``examples`` extra; every module checks at
construction that its library imports and raises ``ImportError`` with the install command
(``pip install "lightning-spectral[examples]"``) otherwise.

Every module exposes ``input_scale``: the factor that turns a certified l2 radius measured on the
model's (normalized) input into a radius in pixel units with values in ``[0, 1]``. Normalization
``x -> (x - mean) / std`` stretches a pixel-space perturbation ``delta`` to at most
``||delta|| / min(std)``, so a radius ``r`` after normalization certifies ``r * min(std)`` in
pixel space: ``input_scale = min(std)`` (1.0 when nothing is normalized). Equivalently the
network's Lipschitz constant in pixel units is its constant on normalized inputs divided by
``input_scale``.

The digits live in :mod:`.data_digits`, MNIST and CIFAR-10 in :mod:`.data_torchvision`; this
module gathers them.
"""

from __future__ import annotations

from .data_digits import DigitsDataModule
from .data_torchvision import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    MNIST_MEAN,
    MNIST_STD,
    CIFAR10DataModule,
    MNISTDataModule,
)

__all__ = [
    "CIFAR10DataModule",
    "DigitsDataModule",
    "MNISTDataModule",
    "MNIST_MEAN",
    "MNIST_STD",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
]
