"""lightning-spectral: provable spectral-norm bounds for convolution layers in PyTorch Lightning."""

__version__ = "0.1.0"
