"""``SpectralBoundRegularizer``: penalize, constrain and log the spectral bounds of layers.

The training objective of Singla & Feizi (ICLR 2021) is

    task loss + beta * sum_I u_I,

``u_I = sqrt(prod k) * min_A ||M_A||_2`` the Fantastic Four bound of the I-th convolution or
linear layer (``M_A`` the ``2^d`` matricizations of its filter, ``k`` its kernel size),
estimated during training by one power iteration per step on persistent vectors.

The callback composes the parts in :mod:`lightning_spectral.regularizer` (``config``,
``selection``, ``state``, ``penalty``, ``constraint``, ``monitor``, ``curvature``; one job
each) and its hooks live in mixins there: ``regularizer.training`` (training batches, the
penalty, the projection), ``regularizer.curvature_hooks`` (when the curvature is recorded or
checked), ``regularizer.checkpoint`` (state key and state) and ``regularizer.evaluation``
(validation and test); certification is the
:class:`~lightning_spectral.certification.CertificationTracker`'s.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from .certification import CertificationTracker
from .functional.bounds import layer_spectral_bound
from .network.pairwise import certificate_bounds
from .regularizer import selection, sharding
from .regularizer.certified import CertifiedTerm
from .regularizer.checkpoint import CheckpointHooks
from .regularizer.config import (
    CertifiedLoss,
    CertifyMethod,
    ConfigAttributes,
    Reduction,
    RegularizerConfig,
    inert_options,
)
from .regularizer.constraint import AfterStep
from .regularizer.curvature import CurvatureTerm
from .regularizer.curvature_hooks import CurvatureHooks, whole_curvature
from .regularizer.evaluation import EvaluationHooks
from .regularizer.penalty import Penalty
from .regularizer.state import LayerState
from .regularizer.training import TrainingHooks

__all__ = ["SpectralBoundRegularizer"]


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


class SpectralBoundRegularizer(
    ConfigAttributes, CheckpointHooks, TrainingHooks, CurvatureHooks, EvaluationHooks
):
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
        input_scale: float = 1.0,
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
        self._curvature_checked = False  # smoothness checked / program recorded this fit
        self._trainer: pl.Trainer | None = None
        self._wrapped: nn.Module | None = None
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

    # ------------------------------------------------------------------ Lightning hooks

    @override
    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not setup(): Lightning calls configure_model after the callbacks' setup, and the
        # optimizers the constraint hooks into exist only once the strategy is set up.
        sharding.refuse_fsdp1_strategy(trainer.strategy)
        self.discover(pl_module)
        self._trainer = trainer
        self._state.record_input_sizes()
        self._start_curvature(pl_module)
        self._certified.reset()  # recorded anew at the first batch (the model may have changed)
        self._hook_into_training(trainer, pl_module)

    @override
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit" and not self._state.layers:  # validate() without fit
            sharding.refuse_fsdp1_strategy(trainer.strategy)
            self.discover(pl_module)
            self._state.record_input_sizes()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._unhook_training()
        self._certified.capture.remove()
        self._state.remove_size_hooks()
        self._state.pending = None
        self._trainer = None
