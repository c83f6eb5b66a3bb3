"""What the regularizer logs: estimates during training, guaranteed values at validation.

Key prefixes say what a value is: ``spectral_estimate/`` a power-iteration estimate (from
below, not a bound), ``spectral_bound/`` a guaranteed upper bound (rounded *up* to the float32
that Lightning stores, so that it stays one), ``spectral_exact/`` an exact norm,
``spectral_ratio/`` bound / exact.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from .. import _progress
from ..functional.bounds import layer_spectral_bound
from ..functional.exact import conv_spectral_norm
from ..functional.opnorm import round_up_to_float32
from .anchored import tight_cost
from .selection import layer_weight

__all__ = [
    "announce_test_certification", "exact_norms", "guaranteed_bounds",
    "log_training_values", "log_validation_values", "should_log",
]

Sizes = Mapping[str, "tuple[int, ...] | None"]


def should_log(trainer: pl.Trainer, every_n_steps: int | None) -> bool:
    """Whether this optimizer step is a logging step (``None``: the trainer's cadence)."""
    # Lightning's logger connector sets log_every_n_steps; Trainer does not declare it.
    every = every_n_steps or trainer.log_every_n_steps  # type: ignore[attr-defined]
    if every == 0:
        return False
    epoch_loop = trainer.fit_loop.epoch_loop
    step = getattr(epoch_loop, "_batches_that_stepped", trainer.global_step) + 1
    return step % every == 0 or trainer.should_stop


def log_training_values(
    pl_module: pl.LightningModule,
    names: list[str],
    penalty: Tensor,
    estimates: Tensor,
    guaranteed: Tensor | None,
    per_layer: bool,
    curvature: Tensor | None = None,
) -> None:
    """Log the penalty, the estimates and the constraint's guaranteed maximum (if any).

    The progress bar shows the guaranteed value when there is one. One host transfer for
    every value, in float64: a guaranteed bound must not be rounded down on the way.
    ``curvature``, the network curvature bound evaluated on the estimates, is an estimate
    too: ``curvature_estimate/network``.
    """
    parts = [penalty.reshape(1), estimates]
    if curvature is not None:
        parts.insert(0, curvature.reshape(1).to(estimates.device))
    if guaranteed is not None:
        parts.append(guaranteed.reshape(1).to(estimates.device))
    values = torch.cat([p.double() for p in parts]).tolist()
    if curvature is not None:
        pl_module.log("curvature_estimate/network", values.pop(0), on_step=True,
                      on_epoch=False)
    layer_values = values[1:1 + len(names)]
    log = functools.partial(pl_module.log, on_step=True, on_epoch=False)
    log("spectral_penalty", values[0])
    log("spectral_estimate/max", max(layer_values), prog_bar=guaranteed is None)
    if guaranteed is not None:
        log("spectral_bound/step_max", round_up_to_float32(values[-1]), prog_bar=True)
    if per_layer:
        for name, value in zip(names, layer_values, strict=True):
            log(f"spectral_estimate/{name}", value)


def _sized(layers: Mapping[str, nn.Module], sizes: Sizes) -> str:
    n = len(layers)
    at = "at their input sizes" if any(sizes.get(k) for k in layers) else "for every input size"
    return f"{n} layer{'s' if n != 1 else ''} {at}"


@torch.no_grad()
def guaranteed_bounds(layers: Mapping[str, nn.Module], sizes: Sizes,
                      max_cost: float | None = None, trainer: Any | None = None,
                      ) -> dict[str, float]:
    """``layer_spectral_bound`` of every materialized layer at its recorded input size.

    A layer without a recorded size gets the bound valid for every input size. ``max_cost``
    is ``layer_spectral_bound``'s. When the work is large (over ``_progress.SLOW_COST``) it is
    announced, and a bar shows past a second (see :mod:`lightning_spectral._progress`;
    ``trainer`` decides whether bars are enabled).
    """
    todo = {name: m for name, m in layers.items() if not is_lazy(layer_weight(m))}
    if sum(tight_cost(m) for m in todo.values()) > _progress.SLOW_COST:
        _progress.announce(f"computing guaranteed bounds of {_sized(todo, sizes)}", trainer)
    items = _progress.progress(todo.items(), total=len(todo), desc="guaranteed bounds",
                               trainer=trainer)
    return {name: float(layer_spectral_bound(m, sizes.get(name), max_cost=max_cost))
            for name, m in items}


@torch.no_grad()
def exact_norms(layers: Mapping[str, nn.Module], sizes: Sizes, trainer: Any | None = None
                ) -> dict[str, float]:
    """Exact spectral norms at the recorded input sizes (layers never called are skipped).

    Always announced (exact norms are the slowest values here), with a bar past a second.
    """
    todo = {name: m for name, m in layers.items()
            if sizes.get(name) is not None or isinstance(m, nn.Linear)}
    _progress.announce(f"computing exact spectral norms of {_sized(todo, sizes)}", trainer)
    items = _progress.progress(todo.items(), total=len(todo), desc="exact norms",
                               trainer=trainer)
    return {name: float(conv_spectral_norm(m, sizes.get(name))) for name, m in items}


def log_validation_values(
    pl_module: pl.LightningModule,
    bounds: dict[str, float],
    exact: dict[str, float] | None,
    per_layer: bool,
) -> None:
    """Log the guaranteed bounds and, when given, exact norms and ratios bound / exact."""
    log = functools.partial(pl_module.log, on_step=False, on_epoch=True, sync_dist=True)
    up = round_up_to_float32  # logged as float32: rounded up, still an upper bound
    log("spectral_bound/max", up(max(bounds.values())), prog_bar=True)
    if per_layer:
        for name, value in bounds.items():
            log(f"spectral_bound/{name}", up(value))
    if exact is None:
        return
    ratios = {n: bounds[n] / e for n, e in exact.items() if e > 0}
    if ratios:
        log("spectral_ratio/max", max(ratios.values()))
    if per_layer:
        for name, value in exact.items():
            log(f"spectral_exact/{name}", value)
        for name, value in ratios.items():
            log(f"spectral_ratio/{name}", value)


def _points(dataloaders: Any) -> str:
    """The number of samples in ``dataloaders`` (one or a list) as text, ``"the"`` if unsized."""
    loaders = dataloaders if isinstance(dataloaders, (list, tuple)) else [dataloaders]
    try:
        return str(sum(len(dl.dataset) for dl in loaders))
    except (AttributeError, TypeError):  # an iterable dataset, or no dataset attribute
        return "the"


def announce_test_certification(trainer: pl.Trainer, epsilons: list[float]) -> None:
    """Say, at the start of ``trainer.test``, how many points are certified at which radii."""
    _progress.announce(f"certifying {_points(trainer.test_dataloaders)} test points at l2 radii "
                       f"{epsilons}", trainer)
