"""The state of one kind of certification run (validation or test): its metrics and the
bounds it computed per input shape."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from .metrics import CertifiedRadius, CertifiedRobustAccuracy

__all__ = ["Run"]


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
