"""lightning-spectral: provable spectral-norm bounds for convolution layers in PyTorch Lightning.

``lightning_spectral.functional`` is pure tensor math (no Lightning import); the names
below are imported on first use so that ``import lightning_spectral.functional`` stays light.
The small models and data modules of the examples, tests and benchmarks are in
``lightning_spectral.demos``, which the library itself never imports.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "SpectralBoundRegularizer": "lightning_spectral.callback",
    "network_lipschitz_bound": "lightning_spectral.network",
    "compositional_lipschitz_bound": "lightning_spectral.network",
    "register_lipschitz_rule": "lightning_spectral.network",
    "network_curvature_bound": "lightning_spectral.network",
    "network_curvature_bounds": "lightning_spectral.network",
    "network_pairwise_lipschitz": "lightning_spectral.network",
    "network_pairwise_curvature": "lightning_spectral.network",
    "register_curvature_rule": "lightning_spectral.network",
    "NonSmoothOperationError": "lightning_spectral.network",
    "CertifiedRobustAccuracy": "lightning_spectral.certify",
    "CertifiedRadius": "lightning_spectral.certify",
    "layer_spectral_bound": "lightning_spectral.functional.bounds",
    "activation_curvature": "lightning_spectral.functional.activations",
    "curvature_certified_radius": "lightning_spectral.functional.curvature_radius",
    "crc_certified_radius": "lightning_spectral.functional.crc",
    "linear_head_pairwise_curvature": "lightning_spectral.functional.curvature_radius",
    "SmoothSoftplus": "lightning_spectral.functional.activations",
    "NonSmoothActivationError": "lightning_spectral.functional.activations",
    "GroupSort": "lightning_spectral.activations",
    "MaxMin": "lightning_spectral.activations",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'lightning_spectral' has no attribute {name!r}")
