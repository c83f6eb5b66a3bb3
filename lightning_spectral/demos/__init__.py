"""Data, models and the demo run used by the examples, tests and benchmarks.

Kept apart from the library proper, as ``lightning.pytorch.demos`` is: nothing in
``lightning_spectral`` itself imports this package. The datasets need the ``examples`` extra
(``pip install "lightning-spectral[examples]"``: scikit-learn for the digits, torchvision for
MNIST and CIFAR-10); each data module checks for it when it is constructed and raises
``ImportError`` with the install command otherwise.

* :mod:`~lightning_spectral.demos.data_digits`: ``DigitsDataModule``, scikit-learn's
  handwritten digits (1797 images of 8x8 pixels, bundled with scikit-learn, so nothing is
  downloaded): small enough to train a CNN on CPU in seconds, which is what the demo, the
  tests and the benchmarks need.
* :mod:`~lightning_spectral.demos.data_torchvision`: ``MNISTDataModule``,
  ``CIFAR10DataModule``, the datasets on which Singla & Feizi (ICLR 2021) train with their
  bound as a penalty, read through ``torchvision.datasets`` (nothing is downloaded unless the
  user passes ``download=True``).
* :mod:`~lightning_spectral.demos.models_digits`: ``SmallCNN`` (three convolutions and a
  linear head for 8x8 digits), ``MnistCNN`` (two strided convolutions and two linear layers
  for 28x28 MNIST), ``MaxMinCNN``.
* :mod:`~lightning_spectral.demos.models_resnet`: ``resnet32``, the CIFAR-10 ResNet-32 of He
  et al. (2016) with option-A or -B shortcuts, the model Singla & Feizi regularize on
  CIFAR-10.
* :mod:`~lightning_spectral.demos.classifier`: ``ImageClassifier``, cross-entropy (or
  Lipschitz-margin) training with SGD, logging ``train/loss``, ``val/loss``, ``val/acc``,
  ``test/loss``, ``test/acc``; the regularizer callback adds its own terms on top of it, so
  the module knows nothing about spectral norms.
* :mod:`~lightning_spectral.demos.digits`: ``python -m lightning_spectral.demo``, the
  regularizer on the digits with and without the penalty.

Every data module exposes ``input_scale``: the factor that turns a certified l2 radius measured
on the model's (normalized) input into a radius in pixel units with values in ``[0, 1]``.
Normalization ``x -> (x - mean) / std`` stretches a pixel-space perturbation ``delta`` to at
most ``||delta|| / min(std)``, so a radius ``r`` after normalization certifies ``r * min(std)``
in pixel space: ``input_scale = min(std)`` (1.0 when nothing is normalized). Equivalently the
network's Lipschitz constant in pixel units is its constant on normalized inputs divided by
``input_scale``.
"""

from .classifier import ImageClassifier, lipschitz_margin_loss
from .data_digits import DigitsDataModule
from .data_torchvision import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    MNIST_MEAN,
    MNIST_STD,
    CIFAR10DataModule,
    MNISTDataModule,
)
from .models_digits import MaxMinCNN, MnistCNN, SmallCNN
from .models_resnet import BasicBlock, CifarResNet, ZeroPadShortcut, resnet32

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
