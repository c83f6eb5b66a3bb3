"""Which layers get the tight bound after an optimizer step (the others get the anchored one).

A deterministic function of the step count and of the layers' costs only (never of a timing or
of a weight), so DDP ranks agree without communicating and a resumed run refreshes the same
layers as the uninterrupted one (its state is checkpointed).

* ``every_n`` given: every layer after steps ``n, 2n, ...`` (``1``: after every step).
* ``None`` (automatic): a round robin over the layers paid for by a credit of
  :data:`CREDIT_PER_STEP` multiply-adds (the ``opnorm_cost`` model) per step: a layer is
  refreshed when the credit covers its cost (which includes a fixed overhead per bound, see
  :data:`~lightning_spectral.regularizer.anchored.PASS_OVERHEAD`). ResNet-32's layers are
  refreshed about every ten steps; on a large network each layer every few hundred steps.
"""

from __future__ import annotations

from typing import Any

__all__ = ["CREDIT_PER_STEP", "RefreshSchedule"]

#: Multiply-adds of tight bounds per optimizer step in the automatic schedule. About 20 ms of
#: float64 eigenvalue problems on one CPU thread of the machine of
#: ``benchmarks/results/constraint_cost_cpu.md``.
CREDIT_PER_STEP = 5e7


class RefreshSchedule:
    """The step count, the credit and the round robin's position (checkpointed)."""

    def __init__(self, every_n: int | None) -> None:
        self.every_n = every_n
        self.step = 0
        self.credit = 0.0
        self.position = 0

    def due(self, costs: list[float]) -> list[int]:
        """Indices (into ``costs``, one per layer) to refresh at this step; advances the step."""
        step, self.step = self.step, self.step + 1
        if self.every_n is not None:
            return list(range(len(costs))) if (step + 1) % self.every_n == 0 else []
        if not costs:
            return []
        self.credit += CREDIT_PER_STEP
        chosen: list[int] = []
        while len(chosen) < len(costs):
            i = self.position % len(costs)
            if costs[i] > self.credit:
                break
            self.credit -= costs[i]
            chosen.append(i)
            self.position = i + 1
        if len(chosen) == len(costs):  # a whole lap paid for: no credit hoarded beyond it
            self.credit = min(self.credit, CREDIT_PER_STEP)
        return chosen

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "credit": self.credit, "position": self.position}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])
        self.credit = float(state["credit"])
        self.position = int(state["position"])
