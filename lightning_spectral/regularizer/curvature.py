"""The curvature term of the penalty: the network curvature bound as a function of the
per-layer estimates, recorded once at the start of ``fit``.

The curvature bound ``C`` of the LightningModule's forward (the Lipschitz constant of its
Jacobian, :func:`~lightning_spectral.network_curvature_bound`) is a straight-line program in
the operator norms of its layers: products, sums, squares and square roots of them and of
constants (activation constants, pooling and BatchNorm norms). It is recorded once
(:func:`~lightning_spectral.network.record_curvature`) at the input shape of the first
training batch, or ``curvature_input_shape``, and replayed every step on the power-iteration
estimates of the selected layers: a few dozen scalar operations, differentiable, no graph walk.
The value is an *estimate* (estimates approach the norms from below; BatchNorm scales and the
bounds of layers that are not selected are those at recording), logged as
``curvature_estimate/network``, never as a bound.

The recording goes into the checkpoint, so a resumed run replays the same program.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ..network import CurvatureTape, record_curvature
from ..network.tape import tape_from_state, tape_state
from . import sharding

__all__ = ["CurvatureTerm"]


class CurvatureTerm:
    """The recorded curvature program of one fit (``tape``), and its checkpointed copy."""

    def __init__(self) -> None:
        self.tape: CurvatureTape | None = None
        self.shape: tuple[int, ...] | None = None
        self._loaded: dict[str, Any] | None = None

    def reset(self) -> None:
        """A new fit records anew (the model may have changed), unless a checkpoint holds
        a recording for the same layers and input shape."""
        self.tape, self.shape = None, None

    def prepare(self, pl_module: nn.Module, layers: Mapping[str, nn.Module],
                shape: tuple[int, ...]) -> None:
        """Record the program for ``layers`` (in the order of the estimates) at ``shape``.

        Raises what the curvature walk raises, e.g. ``NonSmoothOperationError`` naming a
        ReLU node.
        """
        loaded = self._loaded
        self._loaded = None
        if loaded is not None and tuple(loaded["shape"]) == shape and list(
                loaded["layers"]) == list(layers):
            self.tape, self.shape = tape_from_state(loaded["tape"]), shape
            return
        with sharding.full_weights(pl_module):
            self.tape = record_curvature(pl_module, shape, layers)
        self.shape = shape
        names = list(layers)
        missing = [names[k] for k in self.tape.missing]
        if missing:
            rank_zero_warn(
                f"SpectralBoundRegularizer(curvature_beta > 0): the curvature bound does not "
                f"depend on the selected layer(s) {missing} (not called by forward, or bounded "
                "by a registered rule): the curvature term does not act on them")

    def replay(self, estimates: Tensor) -> Tensor:
        if self.tape is None:
            raise RuntimeError("the curvature program is recorded at the start of fit")
        return self.tape.replay(estimates)

    def state_dict(self, layers: Mapping[str, nn.Module]) -> dict[str, Any] | None:
        if self.tape is None or self.shape is None:
            return None
        return {"shape": list(self.shape), "layers": list(layers),
                "tape": tape_state(self.tape)}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self._loaded = state
