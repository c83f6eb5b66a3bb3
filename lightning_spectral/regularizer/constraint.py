"""After each optimizer step: the finiteness check and the projection onto ``bound <= c``.

Both run from one optimizer step post-hook, inside ``optimizer.step()``, before Lightning's
``on_train_batch_end`` hooks (where ``ModelCheckpoint`` writes): a raise there keeps
non-finite weights out of every checkpoint. The check runs first, so it names a non-finite
layer before the projection sees it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from ..functional.bounds import layer_spectral_bound
from ..functional.power import _compute_dtype
from .sharding import any_sharded, full_weights, local, sum_over_ranks

__all__ = ["AfterStep", "check_finite", "project", "raise_if_non_finite"]


def _non_finite_layers(layers: dict[str, nn.Module]) -> list[str]:
    # Counts of non-finite entries per layer, summed over the shards of sharded weights, so
    # that every rank names the same layers (and raises together). One host sync.
    weights = [m.weight for m in layers.values()]
    device = local(weights[0]).device
    counts = torch.stack([(~torch.isfinite(local(w))).sum().to(device) for w in weights])
    if any_sharded(weights):
        sum_over_ranks(counts)
    return [n for n, c in zip(layers, counts.tolist(), strict=True) if c]


def raise_if_non_finite(layers: dict[str, nn.Module], where: str) -> None:
    """Raise ``RuntimeError`` naming the layers with a NaN or Inf weight (one host sync)."""
    bad = _non_finite_layers(layers)
    if bad:
        raise RuntimeError(
            f"SpectralBoundRegularizer: non-finite weights (NaN or Inf) in layer(s) "
            f"{', '.join(bad)} ({where}); stopped before a checkpoint or anything else could "
            "use them. Lower the learning rate or beta, or clip gradients."
        )


@torch.no_grad()
def check_finite(layers: dict[str, nn.Module], estimates: Tensor | None, where: str) -> None:
    """Raise naming the layer(s) if their weights (or ``estimates``) are not finite.

    ``estimates`` are those the step's loss used, in the order of ``layers`` (non-finite with
    finite weights: weights too large for float32). One on-device flag for all layers and one
    host sync: the finiteness of per-layer sums. NaN and Inf propagate through a sum, and a sum
    reads each weight once (``isfinite(w).all()`` costs about 8x more on CPU). A sum can
    overflow with finite weights: then the weights are checked one by one. Sharded weights: the
    sums of the local shards are summed over the ranks (one all-reduce), so every rank decides
    alike.
    """
    weights = [m.weight for m in layers.values()]
    sums = [local(w).sum(dtype=_compute_dtype(w.dtype)) for w in weights]
    device = sums[0].device
    flat = torch.stack([t.to(device) for t in sums])
    if any_sharded(weights):
        sum_over_ranks(flat)
    if estimates is not None:  # replicated: computed from the whole weights on every rank
        flat = torch.cat([flat, estimates.sum().reshape(1).to(device)])
    if bool(torch.isfinite(flat).all()):  # the sync
        return
    raise_if_non_finite(layers, f"after the optimizer step, {where}")
    if estimates is None or bool(torch.isfinite(estimates).all()):
        return  # a sum overflowed; every weight and estimate is finite
    names = list(layers)
    bad = [names[i] for i in torch.nonzero(~torch.isfinite(estimates)).flatten()]
    raise RuntimeError(
        f"SpectralBoundRegularizer: the spectral estimate of layer(s) {', '.join(bad)} is not "
        f"finite although the weights are ({where}): the weights are too large for float32."
    )


def _bound_of(name: str, layers: dict[str, nn.Module], where: str) -> Tensor:
    # Of the whole weight, gathered when sharded: the bound of a shard bounds nothing.
    module = layers[name]
    if not isinstance(module.weight, nn.Parameter):
        raise RuntimeError(
            f"SpectralBoundRegularizer(constraint=...): the weight of {name} is not a "
            "plain parameter (a parametrization?), so it cannot be rescaled in place"
        )
    try:
        with full_weights(module):
            return layer_spectral_bound(module, max_cost=0.0)
    except ValueError:  # the bound refuses non-finite weights: say which layer
        raise_if_non_finite(layers, f"found by the constraint's projection, {where}")
        raise


@torch.no_grad()
def project(layers: dict[str, nn.Module], c: float, where: str) -> Tensor | None:
    """Rescale each layer whose guaranteed bound ``b`` exceeds ``c`` by ``c / b``.

    Times ``1 - 8 eps`` of the weight dtype, so rounding the product cannot push the bound back
    above ``c``. The bounds are norms of the weight, homogeneous of degree 1, so afterwards the
    guaranteed bound is ``<= c``. A sharded weight: the bound is the whole weight's, the same on
    every rank, and each rank rescales its own shard by it. Returns ``max_I min(b_I, c)`` (on
    the device, no sync), a guaranteed bound of every layer as rescaled; ``None`` when every
    layer is still lazy.
    """
    after: list[Tensor] = []
    for name, module in layers.items():
        w = module.weight
        if is_lazy(w):
            continue
        bound = _bound_of(name, layers, where)
        margin = 8 * torch.finfo(w.dtype).eps
        scale = torch.where(bound > c, c * (1 - margin) / bound, torch.ones_like(bound))
        local(w).mul_(scale.to(device=w.device, dtype=w.dtype))
        after.append(bound.clamp(max=c))
    if not after:
        return None
    return torch.stack([a.to(after[0].device) for a in after]).max()


class AfterStep:
    """The optimizer step post-hooks of one ``fit``: the check, then the projection.

    Keeps ``last_guaranteed_max``, the projection's ``max_I min(b_I, c)``, on the device: it
    is logged with the other training values, without a sync of its own.
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self.last_guaranteed_max: Tensor | None = None

    def register(self, optimizers: Iterable[Any], hook: Callable[..., None]) -> None:
        for opt in optimizers:
            self._handles.append(opt.register_step_post_hook(hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def run(
        self, layers: dict[str, nn.Module], estimates: Tensor | None, *, check: bool,
        c: float | None, where: str,
    ) -> None:
        if check:
            check_finite(layers, estimates, where)
        if c is not None:
            self.project(layers, c, where)

    def project(self, layers: dict[str, nn.Module], c: float, where: str) -> None:
        after = project(layers, c, where)
        if after is not None:
            self.last_guaranteed_max = after
