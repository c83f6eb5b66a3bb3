"""Certified robustness: the torchmetrics certificates and the tracker the callback runs.

* :mod:`~lightning_spectral.certify.metrics`: :class:`CertifiedRobustAccuracy` and
  :class:`CertifiedRadius`, torchmetrics state holders around
  :func:`lightning_spectral.functional.certify.certified_radius`.
* :mod:`~lightning_spectral.certify.tracker`: :class:`CertificationTracker`, certified accuracy
  and radius at validation and test with guaranteed network bounds, as
  ``SpectralBoundRegularizer(certify_epsilons=...)`` logs them.
* :mod:`~lightning_spectral.certify.options`: the options the tracker and the callback share
  (:data:`CERTIFY_METHODS`, :func:`check_input_scale`), checked in one place.
* :mod:`~lightning_spectral.certify.runs`, :mod:`~lightning_spectral.certify.bounds` and
  :mod:`~lightning_spectral.certify.forward`: the tracker's parts (per-run state, the checked
  network bounds per input shape, the eval-mode forward and its second-order radii).
"""

from .metrics import CertifiedRadius, CertifiedRobustAccuracy
from .options import CERTIFY_METHODS, CertifyMethod, check_certify_method, check_input_scale
from .tracker import CertificationTracker, default_batch_to_input_target

__all__ = [
    "CERTIFY_METHODS",
    "CertificationTracker",
    "CertifiedRadius",
    "CertifiedRobustAccuracy",
    "CertifyMethod",
    "check_certify_method",
    "check_input_scale",
    "default_batch_to_input_target",
]
