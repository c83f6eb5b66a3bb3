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

When. Two options need the curvature bound of the forward: ``curvature_beta > 0`` records the
program, and a ``certify_method`` with curvature needs a network that has one. Both are settled
once per ``fit`` (:meth:`CurvatureTerm.settle`), at its start (``curvature_input_shape``) or on
the first training batch (the per-sample shape of its input), before any optimizer step, so a
non-smooth network is refused before training time is spent.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ..network import CurvatureTape, network_curvature_bound, record_curvature
from ..network.curvature import curvature_and_pairwise
from ..network.tape import tape_from_state, tape_state
from . import sharding
from .config import RegularizerConfig
from .state import LayerState

__all__ = ["CurvatureTerm", "needs_curvature", "whole_curvature"]


def whole_curvature(pl_module: nn.Module, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The guaranteed curvature bound ``C`` and the pairwise bounds ``K``, of the whole weights
    where they are sharded (collective)."""
    with sharding.full_weights(pl_module):
        return curvature_and_pairwise(pl_module, shape)


def needs_curvature(cfg: RegularizerConfig, certifying: bool) -> bool:
    """Whether the fit needs the curvature: ``curvature_beta > 0``, or ``certifying`` (a
    certification tracker exists) with a ``certify_method`` other than ``"lipschitz"``."""
    return cfg.curvature_beta > 0 or (certifying and cfg.certify_method != "lipschitz")


class CurvatureTerm:
    """The recorded curvature program of one fit (``tape``), and its checkpointed copy."""

    def __init__(self) -> None:
        self.tape: CurvatureTape | None = None
        self.shape: tuple[int, ...] | None = None
        self.settled = False  # smoothness checked / program recorded this fit
        self._loaded: dict[str, Any] | None = None

    def reset(self) -> None:
        """A new fit records anew (the model may have changed), unless a checkpoint holds
        a recording for the same layers and input shape."""
        self.tape, self.shape = None, None
        self.settled = False

    def settle(self, pl_module: nn.Module, state: LayerState, shape: tuple[int, ...], *,
               record: bool, check: bool) -> None:
        """Once per fit: ``record`` the program for the selected layers at the per-sample
        ``shape`` (``curvature_beta > 0``), or else ``check`` that the network has a curvature
        bound there (``certify_method`` with curvature).

        Raises ``ValueError`` for lazy layers not materialized yet, and what the curvature walk
        raises (``NonSmoothOperationError`` naming the offending node).
        """
        if record:
            if state.lazy_pending:
                raise ValueError(
                    "curvature_beta > 0 needs every selected layer materialized when fit "
                    "starts: run one forward pass of the model before fit (lazy layers)")
            self.prepare(pl_module, state.layers, shape)
        elif check:
            with sharding.full_weights(pl_module):
                network_curvature_bound(pl_module, shape)
        self.settled = True

    def replay_for(self, curvature_beta: float) -> Callable[[Tensor], Tensor] | None:
        """What the penalty replays on the estimates (``None`` without ``curvature_beta``)."""
        if curvature_beta > 0:
            if self.tape is None:
                raise RuntimeError(
                    "SpectralBoundRegularizer(curvature_beta > 0): the curvature program is "
                    "recorded at the start of fit; outside a Trainer call "
                    "`regularizer.prepare_curvature(model, input_shape)` first")
            return self.replay
        return None

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
