"""The checkpoint side of ``SpectralBoundRegularizer``: its state key and its state.

The state holds the per-layer power-iteration vectors and recorded input sizes
(:class:`~lightning_spectral.regularizer.state.LayerState`) and, with ``curvature_beta``, the
recorded curvature program under ``"curvature"``
(:class:`~lightning_spectral.regularizer.curvature.CurvatureTerm`). The key names the
selection when it is not the default, so several instances can share one Trainer. A mixin of
the callback; it reads the callback's ``config``, layer state and curvature term.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from . import selection
from .certified import CertifiedTerm
from .config import RegularizerConfig
from .constraint import AfterStep
from .curvature import CurvatureTerm
from .state import LayerState

__all__ = ["CheckpointHooks"]


class CheckpointHooks(Callback):
    """State key, ``state_dict`` and ``load_state_dict``; the callback provides the attributes."""

    config: RegularizerConfig
    _state: LayerState
    _curvature: CurvatureTerm
    _certified: CertifiedTerm
    _sent_away: bool
    _after_step: AfterStep

    @property
    @override
    def state_key(self) -> str:
        """Checkpoint key: the class name, plus the selection arguments when not the default.

        Distinct selections (e.g. a penalty on the convolutions and a constraint on the head)
        give distinct keys, so several instances can share one Trainer and its checkpoints.
        """
        cfg = self.config
        chosen = {
            "include": cfg.include if cfg.include not in (None, list(selection.DEFAULT_INCLUDE))
            else None,
            "exclude": cfg.exclude or None,
            "include_frozen": cfg.include_frozen or None,
        }
        chosen = {k: v for k, v in chosen.items() if v is not None}
        return self._generate_state_key(**chosen) if chosen else type(self).__qualname__

    @property
    @override
    def _legacy_state_key(self) -> str:  # type: ignore[override]
        # Lightning falls back to this key when ``state_key`` is not in a checkpoint: the class
        # name, the key of every instance before the key named the selection.
        return type(self).__qualname__

    @override
    def state_dict(self) -> dict[str, Any]:
        """Per-layer singular vectors (keyed by layer name) and recorded input sizes.

        Does not raise in the launching process of ``ddp_spawn`` (see :attr:`layer_names`), so
        that a checkpoint of the weights can still be saved there; the state it holds is empty,
        and resuming from it warns that the layers start from fresh vectors.
        """
        state = self._state.state_dict()
        curvature = self._curvature.state_dict(self._state.layers)
        if curvature is not None:
            state["curvature"] = curvature
        if self.config.constraint is not None:
            state["constraint"] = self._after_step.projection.state_dict()
        certified = self._certified.state_dict()
        if certified is not None:
            state["certified"] = certified
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._sent_away = False
        state_dict = dict(state_dict)
        self._curvature.load_state_dict(state_dict.pop("curvature", None))
        self._certified.load_state_dict(state_dict.pop("certified", None))
        constraint = state_dict.pop("constraint", None)
        if constraint is not None:
            self._after_step.projection.load_state_dict(constraint)
        self._state.load_state_dict(state_dict)
