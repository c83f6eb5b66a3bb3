"""``SpectralBoundRegularizer``: penalize, constrain and log the spectral bounds of layers.

The training objective of Singla & Feizi (ICLR 2021) is

    task loss + beta * sum_I u_I,

``u_I = sqrt(prod k) * min_A ||M_A||_2`` the Fantastic Four bound of the I-th convolution or
linear layer (``M_A`` the ``2^d`` matricizations of its filter, ``k`` its kernel size),
estimated during training by one power iteration per step on persistent vectors.

The callback composes the parts in :mod:`lightning_spectral.regularizer` (``config``,
``selection``, ``state``, ``penalty``, ``constraint``, ``monitor``; one job each), its
validation and test hooks live in ``regularizer.evaluation``, and certification is the
:class:`~lightning_spectral.certification.CertificationTracker`'s; its hooks delegate to them.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from .certification import CertificationTracker, default_batch_to_input_target
from .lipschitz import CurvatureTape, network_curvature_bound, network_lipschitz_bound
from .lipschitz.curvature import curvature_and_pairwise
from .regularizer import monitor, selection, sharding
from .regularizer.config import CertifyMethod, ConfigAttributes, Reduction, RegularizerConfig
from .regularizer.constraint import AfterStep
from .regularizer.curvature import CurvatureTerm
from .regularizer.evaluation import EvaluationHooks
from .regularizer.penalty import Penalty, unwrap_training_step, wrap_training_step
from .regularizer.state import LayerState

__all__ = ["SpectralBoundRegularizer"]

_MANUAL_OPTIMIZATION_HINT = (
    "SpectralBoundRegularizer(beta > 0) with manual optimization: the callback cannot add the "
    "penalty to your loss. In training_step write `loss = loss + regularizer.penalty(self)` "
    "before `self.manual_backward(loss)`."
)


def _whole_lipschitz(pl_module: nn.Module, shape: tuple[int, ...]) -> Tensor:
    # The certificate's bound, of the whole weights where they are sharded (collective).
    with sharding.full_weights(pl_module):
        return network_lipschitz_bound(pl_module, shape)


def _whole_curvature(pl_module: nn.Module, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    # The guaranteed curvature bound C and the pairwise bounds K, of the whole weights.
    with sharding.full_weights(pl_module):
        return curvature_and_pairwise(pl_module, shape)


class SpectralBoundRegularizer(ConfigAttributes, EvaluationHooks):
    r"""Regularize, constrain and monitor the spectral norms of convolution and linear layers.

    Adds ``beta * reduction(bounds)`` to the training loss, ``bounds`` the power-iteration
    estimates of the Fantastic Four bound ``sqrt(prod k) * min_A ||M_A||_2`` of every selected
    layer (Singla & Feizi, ICLR 2021). Optionally projects the weights after every optimizer step
    so that each layer's *guaranteed* bound is at most ``constraint``, logs estimates
    (``spectral_estimate/*``) during training and guaranteed bounds (``spectral_bound/*``, and
    exact norms) at validation end, and certifies robustness (``certify_epsilons``). See
    ``docs/callback.md``.

    Selected are the trainable layers (``weight.requires_grad``) of the supported types whose
    class runs the torch class's own ``forward``: a subclass overriding ``forward`` (or
    ``_conv_forward``), e.g. one that standardizes or rescales its weight, need not compute
    ``W x`` with its stored weight, so no bound of that weight bounds it; such layers are left
    out with a warning naming them. Lazy layers (``nn.LazyConv2d``, ...) are taken up after the
    first forward pass has materialized them.

    Args:
        beta: weight of the penalty; 0 monitors only.
        n_power_iterations: power iterations per training step (Singla & Feizi use 1).
        warmup_power_iterations: iterations when the vectors are created, so the first steps
            already see converged estimates.
        include: glob patterns (``fnmatch``) on module names (``named_modules``) selecting layers;
            default every supported layer (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``,
            ``nn.Linear`` and subclasses).
        exclude: glob patterns removing layers from the selection.
        include_frozen: also select layers whose weight does not require a gradient (e.g. a
            frozen teacher held by the module); by default they are neither penalized nor
            rescaled by the constraint. Read when the layers are discovered, at the start of
            ``fit``.
        reduction: ``"sum"`` (the objective of Singla & Feizi), ``"max"`` or ``"mean"``.
        target: penalize only ``max(0, bound - target)`` per layer.
        constraint: after every optimizer step, rescale each layer whose guaranteed bound exceeds
            ``constraint`` so that it no longer does.
        log_every_n_steps: how often training values are logged, in optimizer steps (``None``:
            the trainer's ``log_every_n_steps``).
        log_per_layer: log ``spectral_estimate/<layer>`` (and the per-layer validation values),
            not only the aggregates.
        exact_every_n_epochs: every this many epochs, also log exact norms and the ratio
            bound/exact at validation end (``None``: never; exact norms can be slow).
        check_finite: right after every optimizer step, before anything (e.g. a checkpoint)
            sees the new weights, raise naming the layer(s) whose weights (or estimates) are
            non-finite (one host synchronization of one flag per step; free on CPU).
        certify_epsilons: l2 radii at which to log certified robust accuracy at validation.
        input_scale: factor turning a radius on the model's input into the units of the
            epsilons (see :class:`lightning_spectral.certification.CertificationTracker`).
        batch_to_input_target: maps a validation batch to ``(x, y)`` for certification
            (default: ``batch[0], batch[1]``); also a training batch to its input, for the
            shape of ``curvature_beta``'s recording.
        curvature_beta: weight of the curvature term: adds ``curvature_beta * C`` to the
            loss, ``C`` the network curvature bound (Lipschitz constant of the Jacobian of the
            LightningModule's forward) evaluated on the per-layer estimates. The graph walk
            of :func:`~lightning_spectral.network_curvature_bound` is recorded once at the
            start of ``fit`` and replayed every step (see
            :mod:`lightning_spectral.regularizer.curvature`); a non-smooth network (ReLU, max
            pooling, ...) is refused there, before any training step. Logged as
            ``curvature_estimate/network``: an estimate, not a bound.
        curvature_input_shape: per-sample input shape (no batch axis) at which the curvature
            program is recorded; default: that of the first training batch.
        certify_method: ``"lipschitz"`` (first-order radius from the network Lipschitz bound),
            ``"curvature"`` (second-order radius from the guaranteed curvature bound, logged
            as ``certified_curvature/*`` and ``curvature/network``) or ``"both"``. Needs
            ``certify_epsilons``; a non-smooth network is refused at the start of ``fit``.
    """


    def __init__(
        self,
        beta: float = 0.0,
        n_power_iterations: int = 1,
        warmup_power_iterations: int = 50,
        include: list[str] | None = None,
        exclude: list[str] | None = None,
        include_frozen: bool = False,
        reduction: Reduction = "sum",
        target: float | None = None,
        constraint: float | None = None,
        log_every_n_steps: int | None = None,
        log_per_layer: bool = True,
        exact_every_n_epochs: int | None = None,
        check_finite: bool = True,
        certify_epsilons: list[float] | None = None,
        input_scale: float = 1.0,
        batch_to_input_target: Callable[[Any], tuple[Tensor, Tensor]] | None = None,
        curvature_beta: float = 0.0,
        curvature_input_shape: list[int] | None = None,
        certify_method: CertifyMethod = "lipschitz",
    ) -> None:
        # First statement: here locals() holds exactly the arguments (and self, __class__).
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.config = cfg = RegularizerConfig(**arguments)
        self._tracker = None if cfg.certify_epsilons is None else CertificationTracker(
            cfg.certify_epsilons, cfg.input_scale, cfg.batch_to_input_target, _whole_lipschitz,
            method=cfg.certify_method, curvature_fn=_whole_curvature,
        )
        self._state = LayerState()
        self._penalty = Penalty()
        self._after_step = AfterStep()
        self._curvature = CurvatureTerm()
        self._curvature_checked = False  # smoothness checked / program recorded this fit
        self._trainer: pl.Trainer | None = None
        self._wrapped: nn.Module | None = None
        self._fsdp: list[nn.Module] = []  # FSDP2 modules of the model (sharded weights)

    # ------------------------------------------------------------------ selection and state

    @property
    def layer_names(self) -> list[str]:
        """Names (as in ``named_modules``) of the layers the callback acts on, in model order."""
        self._check_ran_here()
        return list(self._state.layers)

    @property
    def input_sizes(self) -> dict[str, tuple[int, ...] | None]:
        """The spatial input size each layer saw in its first batch (by layer name)."""
        self._check_ran_here()
        return dict(self._state.input_sizes)

    @property
    def last_estimates(self) -> Tensor | None:
        """The estimates (detached, in the order of :attr:`layer_names`) of the last penalty."""
        self._check_ran_here()
        return self._penalty.last_estimates

    @property
    def curvature_tape(self) -> CurvatureTape | None:
        """The network curvature bound as a function of the per-layer norms (in the order of
        :attr:`layer_names`), recorded at the start of ``fit`` when ``curvature_beta > 0``:
        the training penalty is ``curvature_beta * curvature_tape.replay(last_estimates)``."""
        return self._curvature.tape

    def select_layers(self, pl_module: nn.Module) -> dict[str, nn.Module]:
        """The layers to act on, by name in model order; override to choose them otherwise.

        Default: :func:`lightning_spectral.regularizer.selection.select_layers` with
        ``include``, ``exclude`` and ``include_frozen``. An override must return layers of the
        supported types whose output is ``W x`` with their stored weight (a class overriding
        ``forward`` need not be one): the guaranteed bounds are bounds of that map.
        """
        cfg = self.config
        return selection.select_layers(pl_module, cfg.include, cfg.exclude, cfg.include_frozen)

    def discover(self, pl_module: nn.Module) -> list[str]:
        """Select the layers and create their vectors (``warmup_power_iterations`` run).

        Called at the start of ``fit`` (and of a ``validate`` without ``fit``); call it
        yourself only when using the callback without a Trainer. Returns :attr:`layer_names`.
        Raises for FSDP1 modules (flat shards); FSDP2's sharded weights are gathered whole.
        """
        self._sent_away = False  # this process runs it now
        layers = self.select_layers(pl_module)
        sharding.refuse_flat_shards(pl_module, layers)
        self._fsdp = sharding.fsdp_modules(pl_module)
        self._state.attach(layers, self.config.warmup_power_iterations)
        return self.layer_names

    def _materialized(self, *, after_batch: bool = False) -> bool:
        return self._state.build_if_materialized(
            self.config.warmup_power_iterations, after_batch=after_batch
        )

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
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._sent_away = False
        state_dict = dict(state_dict)
        self._curvature.load_state_dict(state_dict.pop("curvature", None))
        self._state.load_state_dict(state_dict)

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not setup(): Lightning calls configure_model after the callbacks' setup, and the
        # optimizers the constraint hooks into exist only once the strategy is set up.
        sharding.refuse_fsdp1_strategy(trainer.strategy)
        self.discover(pl_module)
        self._trainer = trainer
        self._state.record_input_sizes()
        self._curvature.reset()
        self._curvature_checked = False
        if self.config.curvature_input_shape is not None:
            self.prepare_curvature(pl_module, self.config.curvature_input_shape)
        if pl_module.automatic_optimization:
            if self._wrapped is None:
                wrap_training_step(pl_module, functools.partial(self._loss_term, pl_module))
                self._wrapped = pl_module
        elif self.config.beta > 0 or self.config.curvature_beta > 0:
            rank_zero_warn(_MANUAL_OPTIMIZATION_HINT)
        if self.config.constraint is not None or self.config.check_finite:
            self._after_step.register(trainer.optimizers, self._after_optimizer_step)
        if self.config.constraint is not None and not self._state.lazy_pending:
            # Lazy layers: first projected after the first optimizer step (their first forward
            # necessarily runs with the initial weights).
            self.project(pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit" and not self._state.layers:  # validate() without fit
            sharding.refuse_fsdp1_strategy(trainer.strategy)
            self.discover(pl_module)
            self._state.record_input_sizes()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._wrapped is not None:
            unwrap_training_step(self._wrapped)
            self._wrapped = None
        self._after_step.remove()
        self._state.remove_size_hooks()
        self._state.pending = None
        self._trainer = None

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._penalty.estimated_this_batch = False
        if not self._curvature_checked and self._needs_curvature():
            x = (self.config.batch_to_input_target or default_batch_to_input_target)(batch)[0]
            self.prepare_curvature(pl_module, tuple(x.shape[1:]))

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
        curvature = None
        if cfg.curvature_beta > 0:
            if self._curvature.tape is None:
                raise RuntimeError(
                    "SpectralBoundRegularizer(curvature_beta > 0): the curvature program is "
                    "recorded at the start of fit; outside a Trainer call "
                    "`regularizer.prepare_curvature(model, input_shape)` first")
            curvature = self._curvature.replay
        if torch.is_grad_enabled():
            sharding.reshard(self._fsdp)  # the gradient must reach the sharded parameters
        return self._penalty(state, cfg.beta, cfg.n_power_iterations, cfg.reduction, cfg.target,
                             curvature, cfg.curvature_beta)

    def _needs_curvature(self) -> bool:
        return self.config.curvature_beta > 0 or (
            self._tracker is not None and self.config.certify_method != "lipschitz")

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

    def _loss_term(self, pl_module: nn.Module) -> Tensor | None:
        """What the wrapped ``training_step`` adds to the loss (``None``: nothing)."""
        if not self._state.layers:
            return None
        if self.config.beta == 0 and self.config.curvature_beta == 0:
            # Monitoring only: estimate, no graph, nothing added.
            with torch.no_grad():
                self.penalty(pl_module)
            return None
        return self.penalty(pl_module)

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
        self._after_step.project(self._state.layers, c, self._where())

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
