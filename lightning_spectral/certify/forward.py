"""The eval-mode forward of the network being certified: its logits, their precision, and
the second-order radii computed from it.

Logits and radii are computed for the eval-mode network, the one the bounds are for.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from ..functional import curvature_certified_radius
from ..functional.modules import evaluating

__all__ = ["curvature_radii", "eval_logits", "warn_if_low_precision"]


def eval_logits(pl_module: Any, x: Tensor) -> Tensor:
    """``pl_module(x)`` under ``no_grad`` in eval mode, refused unless ``(N, C)`` logits."""
    with torch.no_grad(), evaluating(pl_module):
        logits = pl_module(x)
    if not isinstance(logits, Tensor) or logits.ndim != 2:
        raise TypeError(
            f"{type(pl_module).__name__}(x) must return (N, C) logits for certification, "
            f"got {getattr(logits, 'shape', type(logits))}"
        )
    return logits


def warn_if_low_precision(dtype: torch.dtype) -> bool:
    """Warn that the certificate does not cover the rounding of a forward in ``dtype`` when it
    is coarser than float32; returns whether it warned."""
    eps = torch.finfo(dtype).eps
    if eps <= torch.finfo(torch.float32).eps:
        return False
    rank_zero_warn(
        f"certifying {dtype} logits: the certificate holds for the network evaluated "
        "in exact arithmetic; the rounding of a half-precision forward (relative error ~"
        f"{eps:.0e} per operation) is not accounted for, so samples with small margins may "
        "be certified wrongly. Certify a float32 copy of the model for a guarantee."
    )
    return True


def curvature_radii(pl_module: Any, x: Tensor, y: Tensor, pairwise: Tensor) -> Tensor:
    """``curvature_certified_radius`` of the eval-mode network in float64, for its input.

    Gradients are needed (the input gradient of every margin), also inside Lightning's
    inference mode, which is left for this computation.
    """
    with torch.inference_mode(False), torch.enable_grad(), evaluating(pl_module):
        params = {name: t.detach().clone().double() if t.is_floating_point() else t
                  for name, t in (*pl_module.named_parameters(),
                                  *pl_module.named_buffers())}

        def forward(v: Tensor) -> Tensor:
            return torch.func.functional_call(pl_module, params, (v,))

        return curvature_certified_radius(forward, x.detach().clone(), y.clone(),
                                          pairwise.to(x.device))
