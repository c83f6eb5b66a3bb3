"""The certification options the tracker and the callback's configuration share, checked once.

Units (``input_scale``): epsilons and radii are l2 norms in "input units". If the batch holds
the data as the user thinks of it (or the model normalizes inside its forward), that is the
batch's units and ``input_scale = 1`` (the default). If the batch holds normalized inputs
``x_norm = (x - mean) / std`` and radii are wanted in units of the raw ``x``, the scale is
``std``: a raw perturbation ``delta`` is a perturbation ``delta / std`` of what the model sees,
so the raw-input Lipschitz constant is ``L / std``. For a per-channel std the minimum is used
(``||delta / std|| <= ||delta|| / min(std)``, valid, slightly loose), so one number is all that
any certificate needs.
"""

from __future__ import annotations

from typing import Any, Literal, cast, get_args

from .._checks import check_reals

__all__ = ["CERTIFY_METHODS", "CertifyMethod", "check_certify_method", "check_input_scale"]

CertifyMethod = Literal["lipschitz", "curvature", "both"]

#: ``"lipschitz"``: the first-order radius; ``"curvature"``: the second-order one; ``"both"``.
CERTIFY_METHODS: tuple[CertifyMethod, ...] = get_args(CertifyMethod)


def check_certify_method(name: str, value: Any) -> CertifyMethod:
    """``value`` if it is one of :data:`CERTIFY_METHODS`; ``ValueError`` naming ``name`` else."""
    if value not in CERTIFY_METHODS:
        allowed = ", ".join(repr(m) for m in CERTIFY_METHODS[:-1])
        raise ValueError(f"{name} must be {allowed} or {CERTIFY_METHODS[-1]!r}, got {value!r}")
    return cast(CertifyMethod, value)


def check_input_scale(value: Any) -> float:
    """The smallest std of a scalar or per-channel ``input_scale`` (each finite and ``> 0``)."""
    return min(check_reals("input_scale (one std, or one per channel)", value, low=0.0,
                           strict=True))
