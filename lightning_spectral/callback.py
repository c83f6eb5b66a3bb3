"""``SpectralBoundRegularizer``: penalize, constrain and log the spectral bounds of layers.

The training objective of Singla & Feizi (ICLR 2021) is

    task loss + beta * sum_I u_I,

``u_I = sqrt(prod k) * min_A ||M_A||_2`` the Fantastic Four bound of the I-th convolution or
linear layer (``M_A`` the ``2^d`` matricizations of its filter, ``k`` its kernel size),
estimated during training by one power iteration per step on persistent vectors.

The callback is one class: every Lightning hook and public method is here, each delegating the
work to the parts in :mod:`lightning_spectral.regularizer` that own their state (``config``
the arguments, ``selection`` the layers, ``state`` their vectors and input sizes, ``penalty``
the loss term, ``constraint`` the post-step check and projection, ``curvature`` the curvature
term, ``certified`` the certified-training term, ``monitor`` what is logged); certification is
the :class:`~lightning_spectral.certify.CertificationTracker`'s.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from .certify import CertificationTracker, CertifyMethod
from .functional.bounds import layer_spectral_bound
from .network import CurvatureTape
from .network.pairwise import certificate_bounds
from .regularizer import monitor, selection, sharding
from .regularizer.certified import CertifiedTerm
from .regularizer.config import (
    CertifiedLoss,
    Reduction,
    RegularizerConfig,
    inert_options,
    option_attributes,
)
from .regularizer.constraint import AfterStep
from .regularizer.curvature import CurvatureTerm, needs_curvature, whole_curvature
from .regularizer.penalty import Penalty, unwrap_training_step, wrap_training_step
from .regularizer.state import LayerState

__all__ = ["SpectralBoundRegularizer"]

_MANUAL_OPTIMIZATION_HINT = (
    "SpectralBoundRegularizer(beta > 0) with manual optimization: the callback cannot add the "
    "penalty to your loss. In training_step write `loss = loss + regularizer.penalty(self)` "
    "before `self.manual_backward(loss)`."
)

_SENT_AWAY = (
    "SpectralBoundRegularizer: this instance was sent to worker processes (strategy='ddp_spawn' "
    "and the other spawn-based strategies pickle the Trainer) and has not run in this process: "
    "its layers, vectors and estimates stayed in the workers. Lightning brings back the trained "
    "weights and trainer.callback_metrics (the logged spectral_* values); for the vectors, save "
    "a checkpoint (ModelCheckpoint). Or call discover(model) here to select the layers of the "
    "trained model afresh. strategy='ddp' runs the callback in this process."
)


def _whole_lipschitz(pl_module: nn.Module, shape: tuple[int, ...], max_cost: float | None = None
                     ) -> tuple[Tensor, Tensor | None]:
    # The certificate's bounds, of the whole weights where they are sharded (collective).
    layer_bound = None if max_cost is None else functools.partial(
        _layer_bound_within, max_cost=max_cost)
    with sharding.full_weights(pl_module):
        return certificate_bounds(pl_module, shape, layer_bound)


def _layer_bound_within(module: nn.Module, size: tuple[int, ...] | None, *, max_cost: float
                        ) -> Tensor:
    return layer_spectral_bound(module, size, max_cost=max_cost)


@option_attributes
class SpectralBoundRegularizer(Callback):
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
            ``constraint`` so that it no longer does. The guaranteed bound is the tight one
            for the layers due (see ``constraint_tight_every_n_steps``) and, for the others,
            the tight bound of an earlier weight plus a cheap bound of the change since.
        constraint_tight_every_n_steps: the tight bound of every layer after every this many
            optimizer steps (``1``: every step, the most expensive). ``None``: automatic,
            a round robin over the layers within a fixed budget of computation per step.
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
            epsilons: the std of a normalization applied outside the model, one number or one
            per channel (their minimum is used; see
            :class:`lightning_spectral.certify.CertificationTracker`).
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
            With ``"both"`` the per-point maximum of the two radii is also logged
            (``certified_best/*``; both radii are sound, so is their maximum).
        certified_eps: train for a certificate at this l2 radius (input units, as
            ``certify_epsilons``): adds ``certified_weight * term`` to the loss, ``term`` the
            ``certified_loss`` on the logits of the step's call of the LightningModule's
            forward, with the margin bounds ``K_yj`` of the network estimated every step (the
            Lipschitz graph walk recorded once, replayed on power-iteration estimates of every
            layer's operator norm; see :mod:`lightning_spectral.regularizer.certified`).
            Certify at any radius with ``certify_epsilons``: always guaranteed bounds.
        certified_loss: ``"gloro"`` (cross-entropy with GloRo's bottom logit
            ``max_{j != y} z_j + eps K_yj``; Leino et al., ICML 2021), ``"trades"`` (the KL
            term of GloRo's TRADES form, added to your loss) or ``"margin"`` (the
            Lipschitz-margin loss of Tsuzuku et al. 2018 with margin ``eps max K``).
        certified_weight: weight of the certified-training term.
        certified_warmup_steps: the training radius rises linearly from
            ``certified_eps / certified_warmup_steps`` to ``certified_eps`` over this many
            optimizer steps (0: ``certified_eps`` from the start).
        bound_max_cost: cost cap, in multiply-adds, of the optional bounds behind the reported
            guaranteed bounds (``spectral_bound/*``) and the certificates'
            (``layer_spectral_bound``'s ``max_cost``): ``None`` its default, a small multiple
            of the Fantastic Four cost (tightest, minutes on large networks at small inputs);
            ``0`` the tight bound only (the constraint's, several times faster).
        certify_compositional: for certification, also compute the certified ECLipsE-Fast
            chain bound (:func:`~lightning_spectral.compositional_lipschitz_bound`) when the
            forward is a chain of linear/convolution layers and slope-restricted activations
            and its check is small (a few seconds), and certify with the smaller network
            bound (pairwise bounds capped at ``sqrt(2) L``). Often half the product bound on
            ReLU chains; other models keep the product/graph bound.
    """

    if TYPE_CHECKING:  # the arguments as attributes (see option_attributes): set re-validates
        beta: float
        n_power_iterations: int
        warmup_power_iterations: int
        include: list[str] | None
        exclude: list[str] | None
        include_frozen: bool
        reduction: Reduction
        target: float | None
        constraint: float | None
        constraint_tight_every_n_steps: int | None
        log_every_n_steps: int | None
        log_per_layer: bool
        exact_every_n_epochs: int | None
        check_finite: bool
        certify_epsilons: list[float] | None
        input_scale: float
        batch_to_input_target: Callable[[Any], tuple[Tensor, Tensor]] | None
        curvature_beta: float
        curvature_input_shape: list[int] | None
        certify_method: CertifyMethod
        certified_eps: float | None
        certified_loss: CertifiedLoss
        certified_weight: float
        certified_warmup_steps: int
        bound_max_cost: float | None
        certify_compositional: bool

    _sent_away = False  # pickled to worker processes, and nothing run in this one since

    def __init__(
        self,
        beta: float = 0.0,
        n_power_iterations: int = 1,
        warmup_power_iterations: int = 50,
        include: str | list[str] | None = None,
        exclude: str | list[str] | None = None,
        include_frozen: bool = False,
        reduction: Reduction = "sum",
        target: float | None = None,
        constraint: float | None = None,
        constraint_tight_every_n_steps: int | None = None,
        log_every_n_steps: int | None = None,
        log_per_layer: bool = True,
        exact_every_n_epochs: int | None = None,
        check_finite: bool = True,
        certify_epsilons: list[float] | None = None,
        input_scale: float | Sequence[float] = 1.0,
        batch_to_input_target: Callable[[Any], tuple[Tensor, Tensor]] | None = None,
        curvature_beta: float = 0.0,
        curvature_input_shape: list[int] | None = None,
        certify_method: CertifyMethod = "lipschitz",
        certified_eps: float | None = None,
        certified_loss: CertifiedLoss = "gloro",
        certified_weight: float = 1.0,
        certified_warmup_steps: int = 0,
        bound_max_cost: float | None = None,
        certify_compositional: bool = False,
    ) -> None:
        # First statement: here locals() holds exactly the arguments (and self, __class__).
        arguments = {k: v for k, v in locals().items() if k not in ("self", "__class__")}
        super().__init__()
        self.config = cfg = RegularizerConfig(**arguments)
        for inert in inert_options(cfg):
            rank_zero_warn(f"SpectralBoundRegularizer: {inert}", category=UserWarning)
        self._tracker = None if cfg.certify_epsilons is None else CertificationTracker(
            cfg.certify_epsilons, cfg.input_scale, cfg.batch_to_input_target,
            self._certificate_bounds,
            method=cfg.certify_method, curvature_fn=whole_curvature,
            compositional=cfg.certify_compositional,
        )
        self._state = LayerState()
        self._penalty = Penalty()
        self._after_step = AfterStep()
        self._curvature = CurvatureTerm()
        self._certified = CertifiedTerm()
        self._trainer: pl.Trainer | None = None
        self._wrapped: pl.LightningModule | None = None
        self._fsdp: list[nn.Module] = []  # FSDP2 modules of the model (sharded weights)

    def _certificate_bounds(self, pl_module: nn.Module, shape: tuple[int, ...]
                            ) -> tuple[Tensor, Tensor | None]:
        # A bound method, not a closure: picklable for spawn-based strategies.
        return _whole_lipschitz(pl_module, shape, self.config.bound_max_cost)

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
        self._set_sent_away(False)  # this process runs it now
        layers = self.select_layers(pl_module)
        sharding.refuse_flat_shards(pl_module, layers)
        self._fsdp = sharding.fsdp_modules(pl_module)
        self._state.attach(layers, self.config.warmup_power_iterations)
        return self.layer_names

    def _materialized(self, *, after_batch: bool = False) -> bool:
        return self._state.build_if_materialized(
            self.config.warmup_power_iterations, after_batch=after_batch
        )

    # ------------------------------------------------------------------ the loss terms

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
        curvature = self._curvature.replay_for(cfg.curvature_beta)
        if torch.is_grad_enabled():
            sharding.reshard(self._fsdp)  # the gradient must reach the sharded parameters
        return self._penalty(state, cfg.beta, cfg.n_power_iterations, cfg.reduction, cfg.target,
                             curvature, cfg.curvature_beta)

    def prepare_curvature(self, pl_module: nn.Module, input_shape: Any) -> None:
        """Record the curvature program (``curvature_beta > 0``) and check that the network
        has a curvature bound (``certify_method`` with curvature) at the per-sample
        ``input_shape``; called at the start of ``fit``. Raises
        :class:`~lightning_spectral.NonSmoothOperationError` naming the offending node."""
        shape = tuple(int(s) for s in input_shape)
        record = self.config.curvature_beta > 0
        if record and not self._state.layers:
            self.discover(pl_module)
        self._curvature.settle(pl_module, self._state, shape, record=record,
                               check=self._needs_curvature())

    def _needs_curvature(self) -> bool:
        return needs_curvature(self.config, certifying=self._tracker is not None)

    def _loss_term(self, pl_module: nn.Module) -> Tensor | None:
        """What the wrapped ``training_step`` adds to the loss (``None``: nothing)."""
        if not self._state.layers:
            return None
        step = self._trainer.global_step if self._trainer is not None else 0
        certified = self._certified.training_term(pl_module, self.config, step)
        if self.config.beta == 0 and self.config.curvature_beta == 0:
            # Monitoring only: estimate, no graph, nothing added.
            with torch.no_grad():
                self.penalty(pl_module)
            return certified
        penalty = self.penalty(pl_module)
        return penalty if certified is None else penalty + certified

    def _estimate_without_loss(self, pl_module: pl.LightningModule) -> None:
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

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # Runs inside optimizer.step(), before Lightning's on_train_batch_end hooks, where
        # ModelCheckpoint writes: a raise here keeps non-finite weights out of every checkpoint.
        if not self._state.layers or not self._materialized():
            return
        sharding.reshard(self._fsdp)  # the projection rescales the sharded parameters
        cfg = self.config
        self._after_step.run(
            self._state.layers, self._penalty.last_estimates, check=cfg.check_finite,
            c=cfg.constraint, where=self._where(), every_n=cfg.constraint_tight_every_n_steps,
        )

    def _where(self) -> str:
        trainer = self._trainer
        return "outside fit" if trainer is None else f"global step {trainer.global_step}"

    # ------------------------------------------------------------------ guaranteed values

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

    # ------------------------------------------------------------------ Lightning hooks: fit

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not setup(): Lightning calls configure_model after the callbacks' setup, and the
        # optimizers the constraint hooks into exist only once the strategy is set up.
        sharding.refuse_fsdp1_strategy(trainer.strategy)
        self.discover(pl_module)
        self._trainer = trainer
        self._state.record_input_sizes()
        self._curvature.reset()  # a new fit records anew (the model may have changed)
        if self.config.curvature_input_shape is not None:
            self.prepare_curvature(pl_module, self.config.curvature_input_shape)
        self._certified.reset()  # recorded anew at the first batch (the model may have changed)
        self._hook_into_training(trainer, pl_module)

    def _hook_into_training(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # The loss term into training_step, the post-step hook into the optimizers (they exist
        # only once the strategy is set up), the first projection.
        cfg = self.config
        if pl_module.automatic_optimization:
            if self._wrapped is None:
                wrap_training_step(pl_module, functools.partial(self._loss_term, pl_module))
                self._wrapped = pl_module
        elif cfg.certified_eps is not None:
            raise ValueError(
                "SpectralBoundRegularizer(certified_eps=...) replaces nothing in a manual "
                "optimization loop: it adds its term to the loss training_step returns, so it "
                "needs automatic optimization")
        elif cfg.beta > 0 or cfg.curvature_beta > 0:
            rank_zero_warn(_MANUAL_OPTIMIZATION_HINT)
        if cfg.constraint is not None or cfg.check_finite:
            self._after_step.register(trainer.optimizers, self._after_optimizer_step)
        if cfg.constraint is not None and not self._state.lazy_pending:
            # Lazy layers: first projected after the first optimizer step (their first forward
            # necessarily runs with the initial weights).
            self.project(pl_module)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._penalty.estimated_this_batch = False
        # Without curvature_input_shape, the first training batch gives the per-sample shape.
        if not self._curvature.settled and self._needs_curvature():
            self.prepare_curvature(pl_module, tuple(self.config.input_target(batch)[0].shape[1:]))
        if self.config.certified_eps is not None and self._state.layers:
            self._certified.prepare_batch(pl_module, self._state, batch, self.config)

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
        cfg = self.config
        if monitor.should_log(trainer, cfg.log_every_n_steps):
            guaranteed = None if cfg.constraint is None else self._after_step.last_guaranteed_max
            self._penalty.log(pl_module, self.layer_names, guaranteed, cfg.log_per_layer,
                              curvature=cfg.curvature_beta > 0)

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._wrapped is not None:
            unwrap_training_step(self._wrapped)
            self._wrapped = None
        self._after_step.remove()
        self._certified.capture.remove()
        self._state.remove_size_hooks()
        self._state.pending = None
        self._trainer = None

    # ------------------------------------------------------------------ validation and test

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit" and not self._state.layers:  # validate() without fit
            sharding.refuse_fsdp1_strategy(trainer.strategy)
            self.discover(pl_module)
            self._state.record_input_sizes()

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
            self._materialized(after_batch=trainer.state.fn != "fit")
        if self._tracker is not None and not trainer.sanity_checking:
            self._tracker.update("validate", pl_module, batch)

    @override
    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._state.layers and not self._state.lazy_pending:
            every = self.config.exact_every_n_epochs
            exact = (None if every is None or trainer.current_epoch % every
                     else self.exact_norms(trainer))
            monitor.log_validation_values(pl_module, self.guaranteed_bounds(trainer), exact,
                                          self.config.log_per_layer)
        if self._tracker is not None:
            self._tracker.log("validate", pl_module)

    # trainer.test certifies too; the tracker logs under "test/", apart from validation.

    @override
    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._tracker is not None:
            self._tracker.start("test")
            monitor.announce_test_certification(trainer, self._tracker.epsilons)

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

    # ------------------------------------------------------------------ checkpoints

    @property
    @override
    def state_key(self) -> str:
        """Checkpoint key: the class name, plus the selection arguments when not the default.

        Distinct selections (e.g. a penalty on the convolutions and a constraint on the head)
        give distinct keys, so several instances can share one Trainer and its checkpoints.
        """
        cfg = self.config
        chosen = selection.non_default_selection(cfg.include, cfg.exclude, cfg.include_frozen)
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
        parts = {
            "curvature": self._curvature.state_dict(self._state.layers),
            "constraint": (None if self.config.constraint is None
                           else self._after_step.projection.state_dict()),
            "certified": self._certified.state_dict(),
        }
        state.update({key: part for key, part in parts.items() if part is not None})
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._set_sent_away(False)
        state_dict = dict(state_dict)
        self._curvature.load_state_dict(state_dict.pop("curvature", None))
        self._certified.load_state_dict(state_dict.pop("certified", None))
        constraint = state_dict.pop("constraint", None)
        if constraint is not None:
            self._after_step.projection.load_state_dict(constraint)
        self._state.load_state_dict(state_dict)

    # ------------------------------------------------------------------ spawn-based strategies

    def _set_sent_away(self, sent: bool) -> None:
        # The one writer of _sent_away: True once pickled to the workers of a spawn-based
        # strategy, False again as soon as this process runs the callback itself.
        self._sent_away = sent

    def _check_ran_here(self) -> None:
        """Raise in the launching process of a spawn-based strategy instead of returning empty
        values (Lightning does not bring callbacks back from the workers)."""
        if self._sent_away and not self._state.layers:
            raise RuntimeError(_SENT_AWAY)

    def __getstate__(self) -> dict[str, Any]:
        # Pickling is how spawn-based strategies send the Trainer to the workers (copies do not
        # come here, see __deepcopy__): this instance stays behind, unused; the pickled one has
        # not been sent anywhere (the class default).
        self._set_sent_away(True)
        return {k: v for k, v in self.__dict__.items() if k != "_sent_away"}

    def __copy__(self) -> SpectralBoundRegularizer:
        new = type(self).__new__(type(self))
        new.__dict__.update(self.__dict__)
        return new

    def __deepcopy__(self, memo: dict[int, Any]) -> SpectralBoundRegularizer:
        new = type(self).__new__(type(self))
        memo[id(self)] = new
        new.__dict__.update(copy.deepcopy(self.__dict__, memo))
        return new
