"""Models of the examples and benchmarks, and a plain classification LightningModule.

* :class:`SmallCNN` - three convolutions and a linear head for 8x8 digits (seconds to train on CPU).
* :class:`MnistCNN` - two strided convolutions and two linear layers for 28x28 MNIST.
* :func:`resnet32` - the CIFAR-10 ResNet-32 of He et al. (2016), the model Singla & Feizi
  (ICLR 2021) regularize on CIFAR-10.
* :class:`ImageClassifier` - cross-entropy training with SGD, logging ``train/loss``,
  ``val/loss``, ``val/acc``, ``test/loss``, ``test/acc``; the regularizer callback adds its own
  terms on top of it, so the module knows nothing about spectral norms.

The definitions live in :mod:`.models_digits`, :mod:`.models_resnet` and :mod:`.classifier`;
this module gathers them under one name.
"""

from .classifier import ImageClassifier, lipschitz_margin_loss
from .models_digits import MaxMinCNN, MnistCNN, SmallCNN
from .models_resnet import BasicBlock, CifarResNet, ZeroPadShortcut, resnet32

__all__ = [
    "BasicBlock",
    "CifarResNet",
    "ImageClassifier",
    "MaxMinCNN",
    "MnistCNN",
    "SmallCNN",
    "ZeroPadShortcut",
    "lipschitz_margin_loss",
    "resnet32",
]
