"""The parts of :class:`~lightning_spectral.certification.CertificationTracker`: per-run state,
the checked bounds per input shape, and the second-order radii.

Every bound that reaches a certificate passes a check here: finite and ``>= 0``, else no
certificate can follow from it and the error says so. Logits and radii are computed for the
eval-mode network, the one the bounds are for.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from .functional import curvature_certified_radius
from .metrics import CertifiedRadius, CertifiedRobustAccuracy
from .network.compositional import chain_bound_of_forward

__all__ = [
    "Run", "checked_curvature", "checked_lipschitz", "curvature_radii", "eval_logits", "eval_mode",
    "warn_if_low_precision",
]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, every submodule's own flag restored afterwards.

    The bound is for the network in eval mode; logits computed in train mode (dropout, batch
    statistics) come from another map, and a train-mode BatchNorm would also update its
    running statistics.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


def eval_logits(pl_module: Any, x: Tensor) -> Tensor:
    """``pl_module(x)`` under ``no_grad`` in eval mode, refused unless ``(N, C)`` logits."""
    with torch.no_grad(), eval_mode(pl_module):
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


class Run:
    """The state of one kind of run (validation or test), never shared with the other."""

    def __init__(self, epsilons: list[float], prefix: str) -> None:
        self.prefix = prefix
        self.accuracy = CertifiedRobustAccuracy(epsilons)
        self.radius = CertifiedRadius()
        self.lipschitz: dict[tuple[int, ...], Tensor] = {}  # per-sample input shape -> L
        # per-sample input shape -> pairwise margin bounds K (None: only L is known)
        self.pairwise: dict[tuple[int, ...], Tensor | None] = {}
        # per-point max of the first- and second-order radii (certify_method="both")
        self.best_accuracy = CertifiedRobustAccuracy(epsilons)
        self.best_radius = CertifiedRadius()
        self.curvature_accuracy = CertifiedRobustAccuracy(epsilons)
        self.curvature_radius = CertifiedRadius()
        # per-sample input shape -> (C, pairwise K), both in model-input units
        self.curvature: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}
        self.seen = False

    def metrics(self) -> list[Any]:
        return [self.accuracy, self.radius, self.curvature_accuracy, self.curvature_radius,
                self.best_accuracy, self.best_radius]

    def _family(self, family: str) -> tuple[CertifiedRobustAccuracy, CertifiedRadius]:
        return {"certified": (self.accuracy, self.radius),
                "certified_curvature": (self.curvature_accuracy, self.curvature_radius),
                "certified_best": (self.best_accuracy, self.best_radius)}[family]

    def add(self, logits: Tensor, y: Tensor, radius: Tensor, second_order: bool = False,
            family: str | None = None) -> None:
        """Feed one batch's certified radii to the first-order metrics (``"certified"``), the
        second-order ones (``second_order`` or ``"certified_curvature"``) or the per-point
        best of both (``"certified_best"``)."""
        if self.accuracy.device != logits.device:
            for metric in self.metrics():
                metric.to(logits.device)
        family = family or ("certified_curvature" if second_order else "certified")
        accuracy, radii = self._family(family)
        accuracy.update(logits, y, radius=radius)
        radii.update(logits, y, radius=radius)

    def values(self, epsilons: list[float], second_order: bool = False,
               family: str | None = None) -> dict[str, Tensor]:
        """Certified accuracy at every epsilon and the radius, by logged name."""
        family = family or ("certified_curvature" if second_order else "certified")
        accuracy, radius = self._family(family)
        acc = accuracy.compute()
        out = {f"{self.prefix}{family}/acc@{e:g}": acc[i] for i, e in enumerate(epsilons)}
        out[f"{self.prefix}{family}/radius"] = radius.compute()
        return out

    def reset(self) -> None:
        for metric in self.metrics():
            metric.reset()
        self.lipschitz = {}  # the weights may have changed since the last run
        self.pairwise = {}
        self.curvature = {}
        self.seen = False


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


def curvature_radii(pl_module: Any, x: Tensor, y: Tensor, pairwise: Tensor) -> Tensor:
    """``curvature_certified_radius`` of the eval-mode network in float64, for its input.

    Gradients are needed (the input gradient of every margin), also inside Lightning's
    inference mode, which is left for this computation.
    """
    with torch.inference_mode(False), torch.enable_grad(), eval_mode(pl_module):
        params = {name: t.detach().clone().double() if t.is_floating_point() else t
                  for name, t in (*pl_module.named_parameters(),
                                  *pl_module.named_buffers())}

        def forward(v: Tensor) -> Tensor:
            return torch.func.functional_call(pl_module, params, (v,))

        return curvature_certified_radius(forward, x.detach().clone(), y.clone(),
                                          pairwise.to(x.device))
