"""The penalty ``beta * reduction(max(0, estimates - target))`` and how it enters the loss.

``estimates`` are power-iteration estimates of the Fantastic Four bound
``sqrt(prod k) * min_A ||M_A||_2`` of every selected layer (Singla & Feizi, ICLR 2021), one
batched :func:`~lightning_spectral.functional.power.fantastic_four_estimate` per shape group,
in float32 (float64 for float64 weights) outside autocast: estimates approach the bound from
below, so the penalty is a regularizer, never a certificate.

How it enters the loss. Lightning calls ``backward`` on what ``training_step`` returns, after
dividing it by ``accumulate_grad_batches``, scaling it for "16-mixed" and inside DDP's forward.
So :func:`wrap_training_step` adds the penalty to the returned loss (a tensor or
``dict["loss"]``): every micro-batch of an accumulation window carries the full penalty,
divided by the window like the task loss; the GradScaler scales both terms alike; one backward
serves DDP, whose averaging leaves the penalty's gradient unchanged because every rank computes
it from identical weights and vectors. A separate ``penalty.backward()`` would need its own
scaling and would trigger DDP's reducer twice.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor

from . import monitor
from .config import Reduction
from .state import LayerState

__all__ = ["Penalty", "reduce", "unwrap_training_step", "wrap_training_step"]


def reduce(estimates: Tensor, reduction: Reduction, target: float | None) -> Tensor:
    """``reduction(max(0, estimates - target))`` (no hinge when ``target`` is ``None``)."""
    excess = estimates if target is None else (estimates - target).clamp_min(0)
    if reduction == "sum":
        return excess.sum()
    if reduction == "mean":
        return excess.mean()
    return excess.max()


def estimate(state: LayerState, n_iter: int) -> Tensor:
    """Per-layer estimates in model order, after ``n_iter`` iterations on the stored vectors."""
    groups = state.shape_groups
    estimates = torch.cat([g.estimate(n_iter) for g in groups])
    if len(groups) > 1:
        estimates = estimates[state.order]  # back to model order
    return estimates


class Penalty:
    """Computes the penalty and keeps the last values (detached) for logging and checks."""

    def __init__(self) -> None:
        self.last_estimates: Tensor | None = None  # (n_layers,), model order
        self.last_penalty: Tensor | None = None
        self.last_curvature: Tensor | None = None  # curvature(estimates), when asked for
        self.estimated_this_batch = False

    def __call__(
        self, state: LayerState, beta: float, n_iter: int, reduction: Reduction,
        target: float | None, curvature: Callable[[Tensor], Tensor] | None = None,
        curvature_beta: float = 0.0,
    ) -> Tensor:
        """The 0-dim penalty, differentiable w.r.t. the weights (``state`` must be ready).

        With ``curvature`` (the recorded network curvature walk,
        :class:`~lightning_spectral.network.CurvatureTape.replay`), the penalty also holds
        ``curvature_beta * curvature(estimates)``: the curvature bound of the network evaluated
        on the same per-layer estimates, in the dtype of the estimates.
        """
        device = state.shape_groups[0].u_cat.device
        with torch.autocast(device_type=device.type, enabled=False):
            estimates = estimate(state, n_iter)
            penalty = beta * reduce(estimates, reduction, target)
            if curvature is not None:
                network = curvature(estimates).to(estimates.dtype)
                penalty = penalty + curvature_beta * network
                self.last_curvature = network.detach()
        self.last_estimates = estimates.detach()
        self.last_penalty = penalty.detach()
        self.estimated_this_batch = True
        return penalty

    def log(self, pl_module: pl.LightningModule, names: list[str], guaranteed: Tensor | None,
            per_layer: bool, curvature: bool) -> None:
        """Log the last values (:func:`~.monitor.log_training_values`), the constraint's
        ``guaranteed`` maximum and, with ``curvature``, the curvature estimate; nothing before
        the first penalty."""
        if self.last_estimates is None or self.last_penalty is None:
            return
        monitor.log_training_values(
            pl_module, names, self.last_penalty, self.last_estimates, guaranteed, per_layer,
            self.last_curvature if curvature else None,
        )


def wrap_training_step(pl_module: pl.LightningModule, term: Callable[[], Tensor | None]) -> None:
    """Make ``pl_module.training_step`` return its loss plus ``term()`` (when not ``None``).

    ``term`` runs after the user's step; ``None`` means nothing to add. A step returning
    ``None`` (a skipped batch) stays skipped and ``term`` is not called.
    """
    original = pl_module.training_step

    @functools.wraps(original)
    def training_step(*args: Any, **kwargs: Any) -> Any:
        output = original(*args, **kwargs)
        if output is None:  # the user skips this batch (on_train_batch_end still estimates)
            return output
        added = term()
        if added is None:
            return output
        if isinstance(output, Tensor):
            return output + added
        if isinstance(output, Mapping) and "loss" in output:
            return {**output, "loss": output["loss"] + added}
        return output  # Lightning raises its own error for anything else

    # An instance attribute shadows the class method for this fit only (unwrap removes it);
    # Lightning and DDP's forward redirection both look the method up on the instance.
    pl_module.training_step = training_step  # type: ignore[method-assign]


def unwrap_training_step(pl_module: pl.LightningModule) -> None:
    pl_module.__dict__.pop("training_step", None)
