"""The network bounds a certificate is computed from, checked per input shape.

Every bound that reaches a certificate passes a check here: finite and ``>= 0``, else no
certificate can follow from it and the error says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from ..network.compositional import chain_bound_of_forward

__all__ = ["checked_curvature", "checked_lipschitz", "with_chain_bound"]


def checked_lipschitz(lipschitz_fn: Callable[[Any, tuple[int, ...]], Any], pl_module: Any,
                      shape: tuple[int, ...], compositional: bool = False
                      ) -> tuple[Tensor, Tensor | None]:
    """``lipschitz_fn(pl_module, shape)`` as ``(L, K)``: ``L`` a float64 CPU scalar and ``K``
    the ``(C, C)`` pairwise margin bounds or ``None`` (when the function returns ``L`` alone),
    refused unless finite and ``>= 0``; a forward the graph walk cannot bound raises a
    ``TypeError`` saying what to do. ``compositional``: see :func:`with_chain_bound`."""
    try:
        result = lipschitz_fn(pl_module, shape)
    except TypeError as exc:
        raise TypeError(
            f"certification traces {type(pl_module).__name__}.forward and could not bound "
            f"it: {exc}. Make forward map the input to the logits with supported layers "
            "(e.g. `return self.model(x)`), or register a rule with "
            "lightning_spectral.register_lipschitz_rule."
        ) from exc
    model_lip, pairwise = result if isinstance(result, tuple) else (result, None)
    lip = torch.as_tensor(model_lip, dtype=torch.float64).detach().cpu().reshape(())
    k = None if pairwise is None else torch.as_tensor(
        pairwise, dtype=torch.float64).detach().cpu()
    finite = bool(torch.isfinite(lip)) and bool(lip >= 0) and (
        k is None or (bool(torch.isfinite(k).all()) and bool((k >= 0).all())))
    if not finite:
        raise ValueError(
            f"the network Lipschitz bound of {type(pl_module).__name__} at input shape "
            f"{shape} is {float(lip)}, not a finite number >= 0: no certificate can "
            "follow from it (diverged or non-finite weights?)"
        )
    return with_chain_bound(lip, k, pl_module, shape) if compositional else (lip, k)


def with_chain_bound(lip: Tensor, k: Tensor | None, pl_module: Any, shape: tuple[int, ...]
                     ) -> tuple[Tensor, Tensor | None]:
    """``L`` lowered to the certified chain bound of the forward when it is a chain whose
    cost is predicted small (:func:`~lightning_spectral.network.compositional.
    chain_bound_of_forward`, at most ``MAX_ROWS`` rows per check), and ``K`` to ``sqrt(2) L``
    (a margin ``z_y - z_j`` is ``f`` followed by a map of norm ``sqrt(2)``; the product is
    rounded up). Both bounds are guaranteed, so their minimum is."""
    chain = chain_bound_of_forward(pl_module, shape)
    if chain is None or not bool(chain < lip):
        return lip, k
    lip = chain.to(torch.float64).reshape(())
    if k is not None:
        k = torch.minimum(k, lip * (math.sqrt(2) * (1 + 2.0**-50)))
    return lip, k


def checked_curvature(
    curvature_fn: Callable[[Any, tuple[int, ...]], tuple[Tensor, Tensor]], pl_module: Any,
    shape: tuple[int, ...],
) -> tuple[Tensor, Tensor]:
    """``(C, K) = curvature_fn(pl_module, shape)`` as float64 CPU tensors (``C`` 0-dim),
    refused unless every entry is finite and ``>= 0``."""
    # NonSmoothOperationError (a ReLU, max pooling, ...) names the node: passed on.
    c, k = (torch.as_tensor(v, dtype=torch.float64).detach().cpu()
            for v in curvature_fn(pl_module, shape))
    if not (bool(torch.isfinite(c)) and bool(c >= 0) and bool(torch.isfinite(k).all())
            and bool((k >= 0).all())):
        raise ValueError(
            f"the network curvature bound of {type(pl_module).__name__} at input shape "
            f"{shape} is {float(c)}, not a finite number >= 0: no certificate can "
            "follow from it (diverged or non-finite weights?)")
    return c.reshape(()), k
