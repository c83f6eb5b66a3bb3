"""torchmetrics classes for Lipschitz-margin certificates (Tsuzuku et al. 2018).

Thin state holders around :func:`lightning_spectral.functional.certify.certified_radius`:
the math lives there once. All states declare ``dist_reduce_fx`` so that, under DDP,
``compute()`` sees the sums (and concatenations) over every process.

Units: the radii are in the units of the input the Lipschitz constant refers to. If the data
is normalized outside the model, divide the model's constant by the normalization's std (see
``input_scale`` of :class:`lightning_spectral.certify.tracker.CertificationTracker`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any, cast

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities.data import dim_zero_cat

from .._checks import check_reals
from ..functional.certify import certified_radius, check_logits_target

__all__ = ["CertifiedRobustAccuracy", "CertifiedRadius"]


def _radius_of(
    logits: Tensor,
    target: Tensor,
    lipschitz_constant: Tensor | float | None,
    radius: Tensor | None,
    refined: dict[str, Any],
) -> Tensor:
    """The certified radii of a batch: computed here, or checked when given precomputed."""
    if radius is None:
        return certified_radius(logits, target, lipschitz_constant, **refined)
    if lipschitz_constant is not None or any(v is not None for v in refined.values()):
        raise ValueError("pass either radius= or the Lipschitz constant(s), not both")
    check_logits_target(logits, target)  # `correct` is read off them below
    if not isinstance(radius, Tensor) or radius.shape != (logits.shape[0],):
        raise ValueError(
            f"radius must have shape ({logits.shape[0]},), one per row of the logits, got "
            f"{getattr(radius, 'shape', type(radius))}"
        )
    if bool(torch.isnan(radius).any()):
        raise ValueError("radius has NaN entries; compute it with certified_radius")
    return radius.detach().to(torch.float64)


class CertifiedRobustAccuracy(Metric):
    """Share of samples classified correctly with certified radius ``>= eps``, per ``eps``.

    A sample is certified at ``eps`` when ``argmax(logits) == target`` and its certified radius
    is ``>= eps``: no l2 perturbation shorter than ``eps`` can change its prediction.

    ``update(logits, target, lipschitz_constant, **refined)`` takes the arguments of
    :func:`~lightning_spectral.functional.certify.certified_radius` (keyword arguments
    ``last_layer_weight`` / ``feature_lipschitz`` select the refined certificate);
    ``update(logits, target, radius=r)`` takes radii that function already computed, so one
    computation can feed this metric and :class:`CertifiedRadius`.
    ``compute()`` returns a float tensor of shape ``(len(epsilons),)`` in the order given,
    also for a single epsilon. At ``eps = 0`` it is the clean accuracy (ties broken by
    ``argmax``, i.e. towards the lower class index); a tied sample has radius 0, so it is
    never certified at ``eps > 0``.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0
    plot_upper_bound = 1.0

    certified: Tensor
    total: Tensor

    def __init__(self, epsilons: Sequence[float] | float, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.epsilons = check_reals("epsilons", epsilons, low=0.0)
        self.add_state(
            "certified", torch.zeros(len(self.epsilons), dtype=torch.long), dist_reduce_fx="sum"
        )
        self.add_state("total", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def update(
        self,
        logits: Tensor,
        target: Tensor,
        lipschitz_constant: Tensor | float | None = None,
        *,
        radius: Tensor | None = None,
        **refined: Any,
    ) -> None:
        radius = _radius_of(logits, target, lipschitz_constant, radius, refined)
        correct = logits.argmax(dim=1) == target
        eps = torch.tensor(self.epsilons, dtype=torch.float64, device=radius.device)
        hits = correct[:, None] & (radius[:, None] >= eps[None, :])
        self.certified += hits.sum(dim=0).to(self.certified.device)
        self.total += target.numel()

    def compute(self) -> Tensor:
        return self.certified.float() / self.total.clamp_min(1).float()

    def _wrap_compute(self, compute: Callable[..., Any]) -> Callable[..., Tensor]:
        # torchmetrics squeezes one-element results to 0-dim; one value per epsilon is the
        # contract, whatever the number of epsilons.
        wrapped = super()._wrap_compute(compute)

        @functools.wraps(compute)
        def per_epsilon(*args: Any, **kwargs: Any) -> Tensor:
            return wrapped(*args, **kwargs).reshape(len(self.epsilons))

        return per_epsilon

    def plot(self, val: Tensor | None = None, ax: Any = None) -> Any:
        """Certified accuracy against epsilon (one curve); returns ``(fig, ax)``."""
        import matplotlib.pyplot as plt

        val = self.compute() if val is None else val
        fig, ax = (ax.get_figure(), ax) if ax is not None else plt.subplots()
        ax.plot(self.epsilons, val.detach().cpu().numpy(), marker="o")
        ax.set_xlabel("epsilon (l2, input units)")
        ax.set_ylabel("certified robust accuracy")
        ax.set_ylim(self.plot_lower_bound, self.plot_upper_bound)
        ax.grid(True)
        return fig, ax


class CertifiedRadius(Metric):
    """Mean certified radius, and every radius for a histogram.

    Misclassified samples count with radius 0 (their certificate is negative: nothing is
    certified), the usual "average certified radius". ``compute()`` returns that mean;
    :meth:`radii` returns all per-sample radii (clamped at 0, float64), gathered across
    processes (a ``cat`` state: memory grows with the number of samples seen since the last
    ``reset``, 8 bytes each). Samples with an infinite radius (Lipschitz bound 0) would make
    the mean infinite; they are stored as is.
    """

    is_differentiable = False
    higher_is_better = True
    full_state_update = False
    plot_lower_bound = 0.0

    radius_sum: Tensor
    count: Tensor
    # A list while accumulating; a synchronized state may be one concatenated tensor.
    radius_values: list[Tensor] | Tensor

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.add_state("radius_sum", torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("radius_values", [], dist_reduce_fx="cat")

    def update(
        self,
        logits: Tensor,
        target: Tensor,
        lipschitz_constant: Tensor | float | None = None,
        *,
        radius: Tensor | None = None,
        **refined: Any,
    ) -> None:
        """Arguments as :meth:`CertifiedRobustAccuracy.update` (``radius=`` precomputed)."""
        radius = _radius_of(logits, target, lipschitz_constant, radius, refined).clamp_min(0.0)
        self.radius_sum += radius.sum().to(self.radius_sum.device)
        self.count += radius.numel()
        cast("list[Tensor]", self.radius_values).append(radius)

    def compute(self) -> Tensor:
        return self.radius_sum / self.count.clamp_min(1)

    def radii(self) -> Tensor:
        """All radii seen (clamped at 0), synchronized across processes like ``compute``."""
        with self.sync_context(should_sync=self._to_sync and not self._is_synced):
            values = self.radius_values
            if isinstance(values, list):
                return dim_zero_cat(values) if values else torch.zeros(0, dtype=torch.float64)
            return values.clone()

    def plot(self, val: Tensor | None = None, ax: Any = None, bins: int = 30) -> Any:
        """Histogram of the radii (``val`` overrides them); returns ``(fig, ax)``."""
        import matplotlib.pyplot as plt

        val = self.radii() if val is None else val
        fig, ax = (ax.get_figure(), ax) if ax is not None else plt.subplots()
        ax.hist(val.detach().cpu().numpy(), bins=bins)
        ax.set_xlabel("certified radius (l2, input units)")
        ax.set_ylabel("samples")
        return fig, ax
