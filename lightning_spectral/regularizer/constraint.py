"""After each optimizer step: the finiteness check and the projection onto ``bound <= c``.

The projection (:class:`Projection`) bounds each layer tightly only when the refresh schedule
(:mod:`.refresh`) says so, and otherwise by the anchored bound of :mod:`.anchored` (the tight
bound of an earlier weight plus a one-pass bound of the change): guaranteed either way.

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

from ..functional.bounds import layer_bounds
from ..functional.power import compute_dtype
from .anchored import (
    Anchor,
    LayerFamilies,
    anchored_bound,
    layer_families,
    new_anchor,
    rescale_factor,
    tight_cost,
)
from .refresh import RefreshSchedule
from .selection import layer_weight
from .sharding import any_sharded, full_weights, local, sum_over_ranks

__all__ = ["AfterStep", "Projection", "check_finite", "project", "raise_if_non_finite"]


def _non_finite_layers(layers: dict[str, nn.Module]) -> list[str]:
    # Counts of non-finite entries per layer, summed over the shards of sharded weights, so
    # that every rank names the same layers (and raises together). One host sync.
    weights = [layer_weight(m) for m in layers.values()]
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
    weights = [layer_weight(m) for m in layers.values()]
    sums = [local(w).sum(dtype=compute_dtype(w.dtype)) for w in weights]
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


def _tight_bounds(name: str, layers: dict[str, nn.Module], where: str) -> dict[str, Tensor]:
    # Of the whole weight, gathered when sharded: the bound of a shard bounds nothing.
    module = layers[name]
    if not isinstance(layer_weight(module), nn.Parameter):
        raise RuntimeError(
            f"SpectralBoundRegularizer(constraint=...): the weight of {name} is not a "
            "plain parameter (a parametrization?), so it cannot be rescaled in place"
        )
    try:
        with full_weights(module):
            return layer_bounds(module, max_cost=0.0)
    except ValueError:  # the bound refuses non-finite weights: say which layer
        raise_if_non_finite(layers, f"found by the constraint's projection, {where}")
        raise


@torch.no_grad()
def project(layers: dict[str, nn.Module], c: float, where: str) -> Tensor | None:
    """Rescale each layer whose tight guaranteed bound ``b`` exceeds ``c`` by ``c / b``.

    The bound is ``layer_spectral_bound(module, max_cost=0)``, computed for every layer (the
    path of sharded weights; :class:`Projection` is the cheap one). Times ``1 - 8 eps`` of the
    weight dtype, so rounding the product cannot push the bound back above ``c``. The bounds
    are norms of the weight, homogeneous of degree 1, so afterwards the guaranteed bound is
    ``<= c``. A sharded weight: the bound is the whole weight's, the same on every rank, and
    each rank rescales its own shard by it. Returns ``max_I min(b_I, c)`` (on the device, no
    sync), a guaranteed bound of every layer as rescaled; ``None`` when every layer is lazy.
    """
    after: list[Tensor] = []
    for name, module in layers.items():
        w = layer_weight(module)
        if is_lazy(w):
            continue
        bound = torch.stack(list(_tight_bounds(name, layers, where).values())).min()
        margin = 8 * torch.finfo(w.dtype).eps
        scale = torch.where(bound > c, c * (1 - margin) / bound, torch.ones_like(bound))
        local(w).mul_(scale.to(device=w.device, dtype=w.dtype))
        after.append(bound.clamp(max=c))
    return _largest(after)


def _largest(after: list[Tensor]) -> Tensor | None:
    if not after:
        return None
    return torch.stack([a.to(after[0].device) for a in after]).max()


class Projection:
    """The constraint's projection with the anchored bound (see :mod:`.anchored`).

    After every optimizer step each layer gets a guaranteed bound: the tight one
    (``layer_bounds(module, max_cost=0)``) for the layers the :class:`RefreshSchedule` names
    and for layers seen for the first time, which become their new anchor; for the others the
    anchored bound, one pass over the weight. A layer whose bound exceeds ``c`` is rescaled so
    that its guaranteed bound is ``<= c``. No host sync, except one flag when ``verify_finite``
    (the anchored bound of a non-finite weight is not finite: then the layer is named).
    Checkpointed: the anchors and the schedule, so a resumed run projects exactly as the
    uninterrupted one.
    """

    def __init__(self) -> None:
        self.schedule = RefreshSchedule(None)
        self.anchors: dict[str, Anchor] = {}
        self._families: dict[str, LayerFamilies] = {}
        self._costs: dict[str, float] = {}
        self.pending: dict[str, Any] | None = None

    def _cost(self, name: str, layers: dict[str, nn.Module], where: str) -> float:
        if name not in self._costs:
            try:
                self._costs[name] = tight_cost(layers[name])
            except ValueError:  # the layer's geometry refuses a non-finite weight: name it
                raise_if_non_finite(layers, f"found by the constraint's projection, {where}")
                raise
        return self._costs[name]

    def _refresh(self, name: str, layers: dict[str, nn.Module], where: str) -> None:
        module = layers[name]
        bounds = _tight_bounds(name, layers, where)
        fam = self._families.get(name)
        if fam is None:
            fam = self._families[name] = layer_families(module, list(bounds))
        values = torch.stack([bounds[n] for n in fam.names])
        self.anchors[name] = new_anchor(layer_weight(module), values)

    def _stale(self, name: str, module: nn.Module) -> bool:
        anchor = self.anchors.get(name)
        w = layer_weight(module)
        return anchor is None or name not in self._families or anchor.weight.shape != w.shape \
            or anchor.weight.device != w.device or anchor.weight.dtype != w.dtype

    @torch.no_grad()
    def __call__(
        self, layers: dict[str, nn.Module], c: float, where: str, *, every_n: int | None,
        step: bool, verify_finite: bool,
    ) -> Tensor | None:
        """Project every materialized layer; ``step``: after an optimizer step (the schedule
        advances). Returns ``max_I min(b_I, c)``, a guaranteed bound of every layer as
        rescaled (on the device), or ``None`` when every layer is lazy."""
        active = {n: m for n, m in layers.items() if not is_lazy(layer_weight(m))}
        if any_sharded([layer_weight(m) for m in active.values()]):
            return project(active, c, where)
        self._apply_pending(active)
        self.schedule.every_n = every_n
        names = list(active)
        due = set()
        if step:
            costs = [self._cost(n, active, where) for n in names]
            due = {names[i] for i in self.schedule.due(costs)}
        after = []
        for name in names:
            if name in due or self._stale(name, active[name]):
                self._refresh(name, layers, where)
            after.append(self._project_one(active[name], self.anchors[name],
                                           self._families[name], c))
        if verify_finite and after and not bool(torch.isfinite(torch.stack(after)).all()):
            raise_if_non_finite(layers, f"found by the constraint's projection, {where}")
        return _largest(after)

    @staticmethod
    def _project_one(module: nn.Module, anchor: Anchor, fam: LayerFamilies, c: float) -> Tensor:
        w = layer_weight(module)
        bound, weight_fro = anchored_bound(w, anchor, fam)
        s = rescale_factor(bound, weight_fro, c, fam, w.dtype)
        w.mul_(s)
        anchor.sigma = anchor.sigma * s.to(torch.float64)
        return bound.clamp(max=c)

    # ---------------------------------------------------------------- checkpoints

    def state_dict(self) -> dict[str, Any]:
        if self.pending is not None and not self.anchors:
            return self.pending
        return {"schedule": self.schedule.state_dict(),
                "anchors": {n: {**a.state_dict(), "families": list(self._families[n].names)}
                            for n, a in self.anchors.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = state  # applied once the layers are known (the next projection)

    def _apply_pending(self, layers: dict[str, nn.Module]) -> None:
        state, self.pending = self.pending, None
        if state is None:
            return
        self.schedule.load_state_dict(state["schedule"])
        self.anchors = {}
        for name, saved in state["anchors"].items():
            if name in layers:
                module = layers[name]
                self._families[name] = layer_families(module, list(saved["families"]))
                self.anchors[name] = Anchor.from_state(saved, layer_weight(module))


class AfterStep:
    """The optimizer step post-hooks of one ``fit``: the check, then the projection.

    Keeps ``last_guaranteed_max``, the projection's ``max_I min(b_I, c)``, on the device: it
    is logged with the other training values, without a sync of its own.
    """

    def __init__(self) -> None:
        self._handles: list[Any] = []
        self.last_guaranteed_max: Tensor | None = None
        self.projection = Projection()

    def register(self, optimizers: Iterable[Any], hook: Callable[..., None]) -> None:
        for opt in optimizers:
            self._handles.append(opt.register_step_post_hook(hook))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def run(
        self, layers: dict[str, nn.Module], estimates: Tensor | None, *, check: bool,
        c: float | None, where: str, every_n: int | None = None,
    ) -> None:
        if check:
            check_finite(layers, estimates, where)
        if c is not None:
            self.project(layers, c, where, every_n=every_n, step=True, verify_finite=not check)

    def project(
        self, layers: dict[str, nn.Module], c: float, where: str, *, every_n: int | None = None,
        step: bool = False, verify_finite: bool = True,
    ) -> None:
        after = self.projection(layers, c, where, every_n=every_n, step=step,
                                verify_finite=verify_finite)
        if after is not None:
            self.last_guaranteed_max = after
