"""The training hooks of ``SpectralBoundRegularizer``: the penalty, the constraint, the logs.

Per training batch: the wrapped ``training_step`` adds :meth:`TrainingHooks.penalty` to the
loss (or, when monitoring only, estimates without a graph); after every optimizer step the
post-hook checks finiteness and projects onto the ``constraint``; at the batch's end the
estimates are logged every ``log_every_n_steps`` optimizer steps. A mixin of the callback,
apart from its validation and test hooks; it reads the callback's ``config``, layer state,
penalty and post-step parts.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from ..certification import default_batch_to_input_target
from . import monitor, sharding
from .certified import CertifiedTerm, scheduled_eps
from .config import RegularizerConfig
from .constraint import AfterStep
from .penalty import Penalty, unwrap_training_step, wrap_training_step
from .state import LayerState

__all__ = ["TrainingHooks"]

_MANUAL_OPTIMIZATION_HINT = (
    "SpectralBoundRegularizer(beta > 0) with manual optimization: the callback cannot add the "
    "penalty to your loss. In training_step write `loss = loss + regularizer.penalty(self)` "
    "before `self.manual_backward(loss)`."
)


class TrainingHooks(Callback):
    """Training-batch hooks, penalty and projection; the callback provides the attributes."""

    config: RegularizerConfig
    _state: LayerState
    _penalty: Penalty
    _after_step: AfterStep
    _trainer: pl.Trainer | None
    _fsdp: list[nn.Module]
    _wrapped: nn.Module | None
    layer_names: list[str]
    discover: Callable[[nn.Module], list[str]]
    select_layers: Callable[[nn.Module], dict[str, nn.Module]]
    _materialized: Callable[..., bool]
    _curvature_on_first_batch: Callable[[nn.Module, Any], None]
    _curvature_replay: Callable[[], Callable[[Tensor], Tensor] | None]
    _certified: CertifiedTerm

    def _hook_into_training(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # At the start of fit: the loss term into training_step, the post-step hook into the
        # optimizers (they exist only once the strategy is set up), the first projection.
        if pl_module.automatic_optimization:
            if self._wrapped is None:
                wrap_training_step(pl_module, functools.partial(self._loss_term, pl_module))
                self._wrapped = pl_module
        elif self.config.certified_eps is not None:
            raise ValueError(
                "SpectralBoundRegularizer(certified_eps=...) replaces nothing in a manual "
                "optimization loop: it adds its term to the loss training_step returns, so it "
                "needs automatic optimization")
        elif self.config.beta > 0 or self.config.curvature_beta > 0:
            rank_zero_warn(_MANUAL_OPTIMIZATION_HINT)
        if self.config.constraint is not None or self.config.check_finite:
            self._after_step.register(trainer.optimizers, self._after_optimizer_step)
        if self.config.constraint is not None and not self._state.lazy_pending:
            # Lazy layers: first projected after the first optimizer step (their first forward
            # necessarily runs with the initial weights).
            self.project(pl_module)

    def _unhook_training(self) -> None:
        if self._wrapped is not None:
            unwrap_training_step(self._wrapped)
            self._wrapped = None
        self._after_step.remove()

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._penalty.estimated_this_batch = False
        self._curvature_on_first_batch(pl_module, batch)
        self._certified_on_batch(pl_module, batch)

    def _certified_on_batch(self, pl_module: nn.Module, batch: Any) -> None:
        # Before training_step: the program is recorded at the first batch's per-sample shape,
        # the labels kept and the forward's logits captured for the loss term.
        cfg = self.config
        if cfg.certified_eps is None or not self._state.layers:
            return
        x, y = (cfg.batch_to_input_target or default_batch_to_input_target)(batch)
        term = self._certified
        if term.program is None:
            if not self._materialized():
                raise ValueError(
                    "certified_eps needs every selected layer materialized when fit starts: "
                    "run one forward pass of the model before fit (lazy layers)")
            term.prepare(pl_module, self._state.layers, tuple(int(s) for s in x.shape[1:]),
                         cfg.warmup_power_iterations)
        term.target = y
        term.capture.install(pl_module)

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._state.layers:
            return
        self._materialized(after_batch=True)
        if not self._penalty.estimated_this_batch:
            self._estimate_without_loss(pl_module)
        self._state.remove_size_hooks()
        if pl_module.automatic_optimization and trainer.fit_loop._should_accumulate():
            return  # Lightning writes step logs only when the optimizer steps
        if monitor.should_log(trainer, self.config.log_every_n_steps):
            self._log_training_values(pl_module)

    # ------------------------------------------------------------------ the penalty

    def penalty(self, pl_module: nn.Module) -> Tensor:
        """``beta * reduction(max(0, bounds - target))``, the term added to the loss (0-dim).

        ``bounds`` are the power-iteration estimates of the Fantastic Four bound of every
        selected layer; each call runs ``n_power_iterations`` iterations per layer, batched
        over layers of equal shape, in float32 (float64 for float64 weights) outside autocast.
        Differentiable w.r.t. the weights. Call it yourself only with manual optimization:
        ``loss = loss + regularizer.penalty(self)``; with automatic optimization the callback
        adds it.
        """
        state = self._state
        if not state.ready:
            if not state.layers and not state.lazy_pending:
                self.discover(pl_module)
            if not self._materialized() or not state.ready:
                return torch.zeros(())
        cfg = self.config
        curvature = self._curvature_replay()
        if torch.is_grad_enabled():
            sharding.reshard(self._fsdp)  # the gradient must reach the sharded parameters
        return self._penalty(state, cfg.beta, cfg.n_power_iterations, cfg.reduction, cfg.target,
                             curvature, cfg.curvature_beta)

    def _loss_term(self, pl_module: nn.Module) -> Tensor | None:
        """What the wrapped ``training_step`` adds to the loss (``None``: nothing)."""
        if not self._state.layers:
            return None
        certified = self._certified_loss(pl_module)
        if self.config.beta == 0 and self.config.curvature_beta == 0:
            # Monitoring only: estimate, no graph, nothing added.
            with torch.no_grad():
                self.penalty(pl_module)
            return certified
        penalty = self.penalty(pl_module)
        return penalty if certified is None else penalty + certified

    def _certified_loss(self, pl_module: nn.Module) -> Tensor | None:
        cfg = self.config
        if cfg.certified_eps is None or self._certified.program is None:
            return None
        step = self._trainer.global_step if self._trainer is not None else 0
        eps = scheduled_eps(cfg.certified_eps, step, cfg.certified_warmup_steps)
        term = self._certified.loss(cfg.certified_loss, eps, cfg.n_power_iterations,
                                    cfg.input_scale)
        if isinstance(pl_module, pl.LightningModule) and pl_module._current_fx_name:
            pl_module.log("certified_train/eps", eps, on_step=True, on_epoch=False)
            pl_module.log("certified_train/lipschitz_estimate",
                          self._certified.last_lipschitz.float(), on_step=True, on_epoch=False)
            pl_module.log("certified_train/loss", term.detach(), on_step=True, on_epoch=True)
        return cfg.certified_weight * term

    def _estimate_without_loss(self, pl_module: nn.Module) -> None:
        # The step did not compute the penalty (manual optimization, a skipped batch): keep the
        # vectors iterating and the logged values current, without a graph.
        penalized = self.config.beta > 0 or self.config.curvature_beta > 0
        if penalized and not pl_module.automatic_optimization:
            raise RuntimeError(
                "SpectralBoundRegularizer(beta > 0) with manual optimization: training_step "
                "did not call `regularizer.penalty(self)`. Add it to your loss before "
                "`self.manual_backward(loss)`, or set beta=0 to only monitor."
            )
        with torch.no_grad():
            self.penalty(pl_module)

    # ------------------------------------------------------------------ the constraint

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # Runs inside optimizer.step(), before Lightning's on_train_batch_end hooks, where
        # ModelCheckpoint writes: a raise here keeps non-finite weights out of every checkpoint.
        if not self._state.layers or not self._materialized():
            return
        sharding.reshard(self._fsdp)  # the projection rescales the sharded parameters
        self._after_step.run(
            self._state.layers, self._penalty.last_estimates, check=self.config.check_finite,
            c=self.config.constraint, where=self._where(),
            every_n=self.config.constraint_tight_every_n_steps,
        )

    def _where(self) -> str:
        trainer = self._trainer
        return "outside fit" if trainer is None else f"global step {trainer.global_step}"

    def project(self, pl_module: nn.Module) -> None:
        """Rescale every selected layer whose guaranteed bound exceeds ``constraint``.

        A layer with guaranteed bound ``b > c`` is multiplied by ``c / b`` (slightly less, so
        that rounding cannot push it back above ``c``): afterwards its guaranteed bound is
        ``<= c``. See :func:`lightning_spectral.regularizer.constraint.project` for the bound
        used and its cost. Lazy layers not materialized yet are skipped.
        """
        c = self.config.constraint
        if c is None:
            return
        if not self._state.layers:
            layers = self.select_layers(pl_module)
            sharding.refuse_flat_shards(pl_module, layers)
            self._state.layers, self._fsdp = layers, sharding.fsdp_modules(pl_module)
        sharding.reshard(self._fsdp)
        self._after_step.project(self._state.layers, c, self._where(),
                                 every_n=self.config.constraint_tight_every_n_steps)

    # ------------------------------------------------------------------ monitoring

    def _log_training_values(self, pl_module: pl.LightningModule) -> None:
        p = self._penalty
        if p.last_estimates is None or p.last_penalty is None:
            return
        has_constraint = self.config.constraint is not None
        guaranteed = self._after_step.last_guaranteed_max if has_constraint else None
        monitor.log_training_values(
            pl_module, self.layer_names, p.last_penalty, p.last_estimates, guaranteed,
            self.config.log_per_layer,
            p.last_curvature if self.config.curvature_beta > 0 else None,
        )
