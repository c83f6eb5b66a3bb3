"""Certified robustness during validation: the part of the callback that certifies.

:class:`CertificationTracker` is owned by
:class:`lightning_spectral.callback.SpectralBoundRegularizer` (``certify_epsilons=[...]``) and
driven from its validation hooks. Per validation run it

1. computes a guaranteed bound ``L`` on the Lipschitz constant of ``pl_module``'s forward
   (:func:`lightning_spectral.network_lipschitz_bound`, float64, eval mode), once, from the
   shape of the first validation batch;
2. on every validation batch, runs ``pl_module(x)`` under ``no_grad`` and updates
   :class:`~lightning_spectral.metrics.CertifiedRobustAccuracy` and
   :class:`~lightning_spectral.metrics.CertifiedRadius`;
3. logs ``certified/acc@<eps>``, ``certified/radius`` and ``lipschitz/network``.

What is traced is the LightningModule's own ``forward``: it must map the validation input to
the logits with operations the network bound knows (``return self.model(x)`` is fine). If it
cannot be traced, the error says why; nothing is silently skipped.

Units (``input_scale``): epsilons and radii are l2 norms in "input units". If the batch holds
the data as the user thinks of it (or the model normalizes inside its forward), that is the
batch's units and ``input_scale = 1`` (the default). If the batch holds normalized inputs
``x_norm = (x - mean) / std`` and radii are wanted in units of the raw ``x``, pass
``input_scale=std``: a raw perturbation ``delta`` is a perturbation ``delta / std`` of what the
model sees, so the raw-input Lipschitz constant is ``L / std``, the one used and logged. For a
per-channel std pass the sequence: its minimum is used (``||delta / std|| <= ||delta|| /
min(std)``, valid, slightly loose).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .lipschitz import network_lipschitz_bound
from .metrics import CertifiedRadius, CertifiedRobustAccuracy, _check_epsilons

__all__ = ["CertificationTracker", "default_batch_to_input_target"]

BatchToInputTarget = Callable[[Any], "tuple[Tensor, Tensor]"]


def default_batch_to_input_target(batch: Any) -> tuple[Tensor, Tensor]:
    """``(x, y)`` from a tuple/list batch ``(x, y, ...)`` or a dict with keys ``x``/``y``
    (also ``input``/``target``, ``image``/``label``)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        for kx, ky in (("x", "y"), ("input", "target"), ("image", "label")):
            if kx in batch and ky in batch:
                return batch[kx], batch[ky]
    raise TypeError(
        f"cannot find (input, target) in a batch of type {type(batch).__name__}; pass "
        "batch_to_input_target=fn(batch) -> (x, y)"
    )


def _eps_name(eps: float) -> str:
    return f"{eps:g}"


class CertificationTracker:
    """Certified accuracy and radius on the validation set, with a guaranteed network bound.

    Args:
        epsilons: l2 radii (input units, see the module docstring) at which certified accuracy
            is reported; logged as ``certified/acc@<eps>`` with ``eps`` formatted by ``:g``.
        input_scale: the std of a normalization applied to the data *outside* the model
            (scalar, or per-channel sequence: the minimum is used); 1.0 when there is none
            or the model normalizes inside its forward.
        batch_to_input_target: ``fn(batch) -> (x, y)`` for batch layouts other than
            ``(x, y)``; see :func:`default_batch_to_input_target`.
        lipschitz_fn: ``fn(pl_module, input_shape) -> Tensor``, how ``L`` is computed
            (default :func:`lightning_spectral.network_lipschitz_bound`); must be guaranteed.
    """

    def __init__(
        self,
        epsilons: Sequence[float] | float,
        input_scale: float | Sequence[float] = 1.0,
        batch_to_input_target: BatchToInputTarget | None = None,
        lipschitz_fn: Callable[[Any, tuple[int, ...]], Tensor] | None = None,
    ) -> None:
        self.epsilons = _check_epsilons(epsilons)
        scale = torch.as_tensor(input_scale, dtype=torch.float64).reshape(-1)
        if scale.numel() == 0 or not bool(torch.isfinite(scale).all()) or bool((scale <= 0).any()):
            raise ValueError(f"input_scale must be finite and > 0, got {input_scale!r}")
        self.input_scale = float(scale.min())
        self.batch_to_input_target = batch_to_input_target or default_batch_to_input_target
        self.lipschitz_fn = lipschitz_fn or network_lipschitz_bound
        self.accuracy = CertifiedRobustAccuracy(self.epsilons)
        self.radius = CertifiedRadius()
        self.lipschitz: Tensor | None = None

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.accuracy.reset()
        self.radius.reset()
        self.lipschitz = None  # weights changed since the last run

    def _compute_lipschitz(self, pl_module: Any, x: Tensor) -> Tensor:
        try:
            model_lip = self.lipschitz_fn(pl_module, tuple(x.shape[1:]))
        except TypeError as exc:
            raise TypeError(
                f"certification traces {type(pl_module).__name__}.forward and could not bound "
                f"it: {exc}. Make forward map the input to the logits with supported layers "
                "(e.g. `return self.model(x)`), or register a rule with "
                "lightning_spectral.register_lipschitz_rule."
            ) from exc
        # Lipschitz constant w.r.t. the raw input: ||delta / std|| <= ||delta|| / min(std).
        return torch.as_tensor(model_lip, dtype=torch.float64).detach().cpu() / self.input_scale

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, batch: Any) -> None:
        x, y = self.batch_to_input_target(batch)
        if self.lipschitz is None:
            self.lipschitz = self._compute_lipschitz(pl_module, x)
        device = x.device
        if self.accuracy.device != device:
            self.accuracy.to(device)
            self.radius.to(device)
        with torch.no_grad():
            logits = pl_module(x)
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            raise TypeError(
                f"{type(pl_module).__name__}(x) must return (N, C) logits for certification, "
                f"got {getattr(logits, 'shape', type(logits))}"
            )
        lip = self.lipschitz.to(device)
        self.accuracy.update(logits, y, lip)
        self.radius.update(logits, y, lip)

    def compute(self) -> dict[str, Tensor]:
        """The values that are logged, by name (synchronized across processes)."""
        acc = self.accuracy.compute()
        out = {f"certified/acc@{_eps_name(e)}": acc[i] for i, e in enumerate(self.epsilons)}
        out["certified/radius"] = self.radius.compute()
        return out

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if self.lipschitz is None:
            return  # no validation batch was seen
        values = self.compute()
        values["lipschitz/network"] = self.lipschitz
        for name, value in values.items():
            # Already reduced over processes by torchmetrics: no further sync needed.
            pl_module.log(name, value.float().to(pl_module.device), on_epoch=True, on_step=False,
                          sync_dist=False, rank_zero_only=False)
