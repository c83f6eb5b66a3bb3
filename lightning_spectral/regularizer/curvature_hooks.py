"""The curvature wiring of ``SpectralBoundRegularizer``: when and at what shape the network's
curvature is recorded or checked.

Two options need the curvature bound of the LightningModule's forward: ``curvature_beta > 0``
records its program (:class:`~lightning_spectral.regularizer.curvature.CurvatureTerm`) to
replay on the estimates every step, and a ``certify_method`` with curvature needs a network
that has one. Both are settled once per ``fit``, at its start (``curvature_input_shape``) or on
the first training batch (the per-sample shape of its input), before any optimizer step, so a
non-smooth network is refused before training time is spent. A mixin of the callback; it reads
the callback's ``config``, layer state and tracker.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from ..certification import CertificationTracker, default_batch_to_input_target
from ..network import CurvatureTape, network_curvature_bound
from ..network.curvature import curvature_and_pairwise
from . import sharding
from .config import RegularizerConfig
from .curvature import CurvatureTerm
from .state import LayerState

__all__ = ["CurvatureHooks", "whole_curvature"]


def whole_curvature(pl_module: nn.Module, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    """The guaranteed curvature bound ``C`` and the pairwise bounds ``K``, of the whole weights
    where they are sharded (collective)."""
    with sharding.full_weights(pl_module):
        return curvature_and_pairwise(pl_module, shape)


class CurvatureHooks:
    """Records or checks the curvature once per fit; the callback provides the attributes."""

    config: RegularizerConfig
    _state: LayerState
    _tracker: CertificationTracker | None
    _curvature: CurvatureTerm
    _curvature_checked: bool  # smoothness checked / program recorded this fit
    discover: Callable[[nn.Module], list[str]]

    @property
    def curvature_tape(self) -> CurvatureTape | None:
        """The network curvature bound as a function of the per-layer norms (in the order of
        :attr:`layer_names`), recorded at the start of ``fit`` when ``curvature_beta > 0``:
        the training penalty is ``curvature_beta * curvature_tape.replay(last_estimates)``."""
        return self._curvature.tape

    def _needs_curvature(self) -> bool:
        return self.config.curvature_beta > 0 or (
            self._tracker is not None and self.config.certify_method != "lipschitz")

    def _start_curvature(self, pl_module: nn.Module) -> None:
        # A new fit records anew (the model may have changed since the last one).
        self._curvature.reset()
        self._curvature_checked = False
        if self.config.curvature_input_shape is not None:
            self.prepare_curvature(pl_module, self.config.curvature_input_shape)

    def _curvature_on_first_batch(self, pl_module: nn.Module, batch: Any) -> None:
        # Without curvature_input_shape, the first training batch gives the per-sample shape.
        if not self._curvature_checked and self._needs_curvature():
            x = (self.config.batch_to_input_target or default_batch_to_input_target)(batch)[0]
            self.prepare_curvature(pl_module, tuple(x.shape[1:]))

    def prepare_curvature(self, pl_module: nn.Module, input_shape: Any) -> None:
        """Record the curvature program (``curvature_beta > 0``) and check that the network
        has a curvature bound (``certify_method`` with curvature) at the per-sample
        ``input_shape``; called at the start of ``fit``. Raises
        :class:`~lightning_spectral.NonSmoothOperationError` naming the offending node."""
        shape = tuple(int(s) for s in input_shape)
        if self.config.curvature_beta > 0:
            if not self._state.layers:
                self.discover(pl_module)
            if self._state.lazy_pending:
                raise ValueError(
                    "curvature_beta > 0 needs every selected layer materialized when fit "
                    "starts: run one forward pass of the model before fit (lazy layers)")
            self._curvature.prepare(pl_module, self._state.layers, shape)
        elif self._needs_curvature():
            with sharding.full_weights(pl_module):
                network_curvature_bound(pl_module, shape)
        self._curvature_checked = True

    def _curvature_replay(self) -> Callable[[Tensor], Tensor] | None:
        """What the penalty replays on the estimates (``None`` without ``curvature_beta``)."""
        if self.config.curvature_beta > 0:
            if self._curvature.tape is None:
                raise RuntimeError(
                    "SpectralBoundRegularizer(curvature_beta > 0): the curvature program is "
                    "recorded at the start of fit; outside a Trainer call "
                    "`regularizer.prepare_curvature(model, input_shape)` first")
            return self._curvature.replay
        return None
