"""The validation and test hooks of ``SpectralBoundRegularizer``: bounds and certificates.

At the end of each validation run (not the sanity check) the guaranteed bounds of the
selected layers are logged, with exact norms and ratios every ``exact_every_n_epochs``; with
``certify_epsilons`` the :class:`~lightning_spectral.certification.CertificationTracker`
certifies every validation and test batch and logs at the run's end (test values under
``test/``). A mixin of the callback, apart from its training hooks; it reads the callback's
``config``, layer state and tracker.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from .. import _progress
from ..certification import CertificationTracker
from . import monitor, sharding
from .config import RegularizerConfig
from .state import LayerState

__all__ = ["EvaluationHooks"]

_SENT_AWAY = (
    "SpectralBoundRegularizer: this instance was sent to worker processes (strategy='ddp_spawn' "
    "and the other spawn-based strategies pickle the Trainer) and has not run in this process: "
    "its layers, vectors and estimates stayed in the workers. Lightning brings back the trained "
    "weights and trainer.callback_metrics (the logged spectral_* values); for the vectors, save "
    "a checkpoint (ModelCheckpoint). Or call discover(model) here to select the layers of the "
    "trained model afresh. strategy='ddp' runs the callback in this process."
)


def _points(dataloaders: Any) -> str:
    """The number of samples in ``dataloaders`` (one or a list) as text, ``"the"`` if unsized."""
    loaders = dataloaders if isinstance(dataloaders, (list, tuple)) else [dataloaders]
    try:
        return str(sum(len(dl.dataset) for dl in loaders))
    except (AttributeError, TypeError):  # an iterable dataset, or no dataset attribute
        return "the"


class EvaluationHooks(Callback):
    """Validation and test hooks; the callback provides the attributes declared here."""

    config: RegularizerConfig
    _state: LayerState
    _tracker: CertificationTracker | None
    _sent_away = False  # pickled to worker processes, and nothing run in this one since

    def _check_ran_here(self) -> None:
        """Raise in the launching process of a spawn-based strategy instead of returning empty
        values (Lightning does not bring callbacks back from the workers)."""
        if self._sent_away and not self._state.layers:
            raise RuntimeError(_SENT_AWAY)

    def __getstate__(self) -> dict[str, Any]:
        # Pickling is how spawn-based strategies send the Trainer to the workers (copies do not
        # come here, see __deepcopy__): this instance stays behind, unused.
        self._sent_away = True
        return {**self.__dict__, "_sent_away": False}

    def __copy__(self) -> EvaluationHooks:
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> EvaluationHooks:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new

    @override
    def on_validation_epoch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        if self._tracker is not None and not trainer.sanity_checking:
            self._tracker.start("validate")

    @override
    def on_validation_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        self._state.remove_size_hooks()
        if self._state.layers:  # lazy layers: the first validation batch materialized them
            # In fit, a layer that validation does not call may be called by training_step.
            self._state.build_if_materialized(
                self.config.warmup_power_iterations, after_batch=trainer.state.fn != "fit"
            )
        if self._tracker is not None and not trainer.sanity_checking:
            self._tracker.update("validate", pl_module, batch)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._state.layers and not self._state.lazy_pending:
            self._log_validation_values(trainer, pl_module)
        if self._tracker is not None:
            self._tracker.log("validate", pl_module)

    # trainer.test certifies too; the tracker logs under "test/", apart from validation.

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._tracker is not None:
            self._tracker.start("test")
            points = _points(trainer.test_dataloaders)
            _progress.announce(f"certifying {points} test points at l2 radii "
                               f"{self._tracker.epsilons}", trainer)

    @override
    def on_test_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int, dataloader_idx: int = 0,
    ) -> None:
        if self._tracker is not None:
            self._tracker.update("test", pl_module, batch)

    @override
    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._tracker is not None:
            self._tracker.log("test", pl_module)

    def guaranteed_bounds(self, trainer: pl.Trainer | None = None) -> dict[str, float]:
        """Guaranteed upper bounds of every selected layer (``layer_spectral_bound``), by name.

        Uses the input size each layer saw in the first batch, when recorded (tighter for
        some layers); a layer never called gets the bound valid for every input size. Sharded
        weights are gathered whole for it: then every rank must call it (collective). Long
        computations show progress; with ``trainer``, only if its progress bar is enabled.
        """
        self._check_ran_here()
        layers = self._state.layers
        with sharding.full_weights(*layers.values()):
            return monitor.guaranteed_bounds(layers, self._state.input_sizes,
                                             self.config.bound_max_cost, trainer)

    def exact_norms(self, trainer: pl.Trainer | None = None) -> dict[str, float]:
        """Exact spectral norms at the recorded input sizes (layers never called are skipped).

        Collective when weights are sharded, like :meth:`guaranteed_bounds`; progress as there.
        """
        self._check_ran_here()
        layers = self._state.layers
        with sharding.full_weights(*layers.values()):
            return monitor.exact_norms(layers, self._state.input_sizes, trainer)

    def _log_validation_values(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        every = self.config.exact_every_n_epochs
        exact = (None if every is None or trainer.current_epoch % every
                 else self.exact_norms(trainer))
        monitor.log_validation_values(
            pl_module, self.guaranteed_bounds(trainer), exact, self.config.log_per_layer
        )

