"""Data, models and the demo run used by the examples, tests and benchmarks.

Kept apart from the library proper, as ``lightning.pytorch.demos`` is: nothing in
``lightning_spectral`` itself imports this package. The datasets need the ``examples`` extra
(``pip install "lightning-spectral[examples]"``: scikit-learn for the digits, torchvision for
MNIST and CIFAR-10); each data module checks for it when it is constructed.

* :mod:`~lightning_spectral.demos.data`: ``DigitsDataModule``, ``MNISTDataModule``,
  ``CIFAR10DataModule``.
* :mod:`~lightning_spectral.demos.models`: ``SmallCNN``, ``MnistCNN``, ``resnet32`` (option-A or
  -B shortcuts), ``ImageClassifier`` (cross-entropy or Lipschitz-margin loss).
* :mod:`~lightning_spectral.demos.digits`: ``python -m lightning_spectral.demo``, the
  regularizer on the digits with and without the penalty.
"""

from .data import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    MNIST_MEAN,
    MNIST_STD,
    CIFAR10DataModule,
    DigitsDataModule,
    MNISTDataModule,
)
from .models import (
    BasicBlock,
    CifarResNet,
    ImageClassifier,
    MaxMinCNN,
    MnistCNN,
    SmallCNN,
    ZeroPadShortcut,
    lipschitz_margin_loss,
    resnet32,
)

__all__ = [
    "BasicBlock",
    "CIFAR10DataModule",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "CifarResNet",
    "DigitsDataModule",
    "ImageClassifier",
    "MNISTDataModule",
    "MNIST_MEAN",
    "MNIST_STD",
    "MaxMinCNN",
    "MnistCNN",
    "SmallCNN",
    "ZeroPadShortcut",
    "lipschitz_margin_loss",
    "resnet32",
]
