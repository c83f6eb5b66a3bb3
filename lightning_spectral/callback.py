"""``SpectralBoundRegularizer``: penalize, constrain and log the spectral bounds of layers.

The training objective of Singla & Feizi (ICLR 2021) is

    task loss + beta * sum_I u_I,

``u_I = sqrt(prod k) * min_A ||M_A||_2`` the Fantastic Four bound of the I-th convolution or
linear layer (``M_A`` the ``2^d`` matricizations of its filter, ``k`` its kernel size),
estimated during training by one power iteration per step on persistent vectors.
This module is orchestration only: the estimate is
:func:`lightning_spectral.functional.power.fantastic_four_estimate`, the guaranteed values are
:func:`lightning_spectral.functional.bounds.layer_spectral_bound` and the exact norms
:func:`lightning_spectral.functional.exact.conv_spectral_norm`.

How the penalty enters the loss. Lightning calls ``backward`` on the loss that ``training_step``
returns, after dividing it by ``accumulate_grad_batches``, scaling it for "16-mixed" and inside
DDP's forward. The callback therefore wraps the module's ``training_step`` (for the duration of
``fit``) and adds ``beta * reduction(bounds)`` to the returned loss (a tensor or ``dict["loss"]``).
Every micro-batch of an accumulation window carries the full penalty, divided by the window
like the task loss, so the accumulated gradient is that of ``mean task loss + beta * penalty``;
the GradScaler scales both terms alike; one backward serves DDP, whose averaging leaves the
penalty's gradient unchanged because every rank computes it from identical weights and vectors.
A separate ``penalty.backward()`` would need its own scaling and would trigger DDP's reducer
twice, which is why it is not done that way.
"""

from __future__ import annotations

import fnmatch
import functools
import math
import zlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from .functional.matricize import grouped_weight
from .functional.power import fantastic_four_estimate, init_singular_vectors, power_iteration_

__all__ = ["SpectralBoundRegularizer"]

Reduction = Literal["sum", "max", "mean"]

_DEFAULT_INCLUDE = ("*",)


def _supported_layers() -> tuple[type, ...]:
    from .functional.bounds import SUPPORTED_LAYERS

    return tuple(SUPPORTED_LAYERS)


def _torch_base(module: nn.Module) -> type:
    return next(c for c in type(module).__mro__ if c in _supported_layers())


def _computes_w_x(module: nn.Module) -> bool:
    """Whether the layer runs its torch class's own ``forward`` (and ``_conv_forward``).

    Only then is its output the convolution (or matrix product) with ``module.weight`` that
    the bounds are bounds of; a subclass that rescales or standardizes its weight is not.
    """
    base = _torch_base(module)
    methods = [m for m in ("forward", "_conv_forward") if hasattr(base, m)]
    return all(getattr(type(module), m) is getattr(base, m) for m in methods)


def _round_up_to_float32(value: float) -> float:
    # Lightning stores a logged float as float32, rounding to nearest: a guaranteed upper
    # bound is rounded up instead, so that the logged value is still an upper bound.
    f32 = torch.tensor(value, dtype=torch.float32)
    if float(f32) < value:
        f32 = torch.nextafter(f32, torch.tensor(math.inf))
    return float(f32)


def _groups(module: nn.Module) -> int:
    return int(getattr(module, "groups", 1))


def _grouped_shape(module: nn.Module) -> tuple[int, ...]:
    w = module.weight
    g = _groups(module)
    return (g, w.shape[0] // g, *w.shape[1:])


def _layer_seed(name: str) -> int:
    # A deterministic function of the name alone: every DDP rank (and a resumed run) draws the
    # same starting vectors without communicating. crc32, unlike hash(), is not salted.
    return zlib.crc32(name.encode("utf-8"))


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # Bounds are computed in at least float32, whatever precision the weights are stored in.
    return torch.float64 if dtype == torch.float64 else torch.float32


class _ShapeGroup:
    """Layers whose grouped filters share one shape, with their stacked power-iteration state."""

    def __init__(self, names: list[str], modules: list[nn.Module]) -> None:
        self.names = names
        self.modules = modules
        self.groups = _groups(modules[0])
        w = modules[0].weight
        self.dtype = _compute_dtype(w.dtype)
        per_layer = [
            init_singular_vectors(
                _grouped_shape(m), seed=_layer_seed(n), device=w.device, dtype=self.dtype
            )
            for n, m in zip(names, modules, strict=True)
        ]
        self.us = [torch.stack([p[0][i] for p in per_layer]) for i in range(len(per_layer[0][0]))]
        self.vs = [torch.stack([p[1][i] for p in per_layer]) for i in range(len(per_layer[0][1]))]

    def stacked_weights(self) -> Tensor:
        """``(L, g, c_out, c_in, *k)`` in the compute dtype; differentiable w.r.t. each weight."""
        ws = [m.weight for m in self.modules]
        if ws[0].dtype != self.dtype:
            ws = [w.to(self.dtype) for w in ws]
        ws = [grouped_weight(w, self.groups) for w in ws]
        # One layer: a view, no copy. Several: one copy, the price of a single batched iteration.
        return ws[0].unsqueeze(0) if len(ws) == 1 else torch.stack(ws)

    def to(self, device: torch.device) -> None:
        self.us = [u.to(device) for u in self.us]
        self.vs = [v.to(device) for v in self.vs]


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
            (default: ``batch[0], batch[1]``).
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
    ) -> None:
        super().__init__()
        self.beta = _check_real("beta", beta, low=0.0)
        self.n_power_iterations = _check_int("n_power_iterations", n_power_iterations, low=1)
        self.warmup_power_iterations = _check_int(
            "warmup_power_iterations", warmup_power_iterations, low=0
        )
        self.include = _check_patterns("include", include)
        self.exclude = _check_patterns("exclude", exclude)
        self.include_frozen = _check_bool("include_frozen", include_frozen)
        if reduction not in ("sum", "max", "mean"):
            raise ValueError(f"reduction must be 'sum', 'max' or 'mean', got {reduction!r}")
        self.reduction: Reduction = reduction
        self.target = None if target is None else _check_real("target", target, low=0.0)
        self.constraint = (
            None if constraint is None
            else _check_real("constraint", constraint, low=0.0, strict=True)
        )
        self.log_every_n_steps = (
            None if log_every_n_steps is None
            else _check_int("log_every_n_steps", log_every_n_steps, low=1)
        )
        self.log_per_layer = _check_bool("log_per_layer", log_per_layer)
        self.exact_every_n_epochs = (
            None if exact_every_n_epochs is None
            else _check_int("exact_every_n_epochs", exact_every_n_epochs, low=1)
        )
        self.check_finite = _check_bool("check_finite", check_finite)
        if certify_epsilons is not None:
            if isinstance(certify_epsilons, (str, bytes)) or not isinstance(
                certify_epsilons, Sequence
            ):
                raise ValueError(
                    "certify_epsilons must be a list of non-negative numbers, "
                    f"got {certify_epsilons!r}"
                )
            certify_epsilons = [
                _check_real("certify_epsilons", e, low=0.0) for e in certify_epsilons
            ]
            if not certify_epsilons:
                raise ValueError("certify_epsilons must not be empty (use None to disable)")
        self.certify_epsilons = certify_epsilons
        self.input_scale = _check_real("input_scale", input_scale, low=0.0, strict=True)
        if batch_to_input_target is not None and not callable(batch_to_input_target):
            raise ValueError(
                f"batch_to_input_target must be callable, got {batch_to_input_target!r}"
            )
        self.batch_to_input_target = batch_to_input_target
        self._tracker: Any = None
        if certify_epsilons is not None:
            from .certification import CertificationTracker

            self._tracker = CertificationTracker(
                certify_epsilons,
                input_scale=self.input_scale,
                batch_to_input_target=batch_to_input_target,
            )

        self._layers: dict[str, nn.Module] = {}
        self._shape_groups: list[_ShapeGroup] = []
        self._lazy_pending = False  # selected layers not materialized yet: no groups so far
        self._trainer: pl.Trainer | None = None
        self._last_guaranteed_max: Tensor | None = None  # the constraint's, after the last step
        self._pending_state: dict[str, Any] | None = None
        self._input_sizes: dict[str, tuple[int, ...] | None] = {}
        self._size_hooks: list[Any] = []
        self._step_hooks: list[Any] = []
        self._wrapped: pl.LightningModule | None = None
        self._last_estimates: Tensor | None = None  # (n_layers,), detached, this batch's values
        self._last_penalty: Tensor | None = None
        self._order: Tensor | None = None
        self._estimated_this_batch = False

    # ------------------------------------------------------------------ discovery

    @property
    def layer_names(self) -> list[str]:
        """Names (as in ``named_modules``) of the layers the callback acts on, in model order."""
        return list(self._layers)

    @property
    def state_key(self) -> str:
        """Checkpoint key: the class name, plus the selection arguments when not the default.

        Distinct selections (e.g. a penalty on the convolutions and a constraint on the head)
        give distinct keys, so several instances can share one Trainer and its checkpoints.
        """
        selection: dict[str, Any] = {}
        if self.include is not None and self.include != list(_DEFAULT_INCLUDE):
            selection["include"] = self.include
        if self.exclude:
            selection["exclude"] = self.exclude
        if self.include_frozen:
            selection["include_frozen"] = True
        if not selection:
            return type(self).__qualname__
        return self._generate_state_key(**selection)

    @property
    def _legacy_state_key(self) -> str:  # type: ignore[override]
        # Lightning falls back to this key when ``state_key`` is not in a checkpoint: the class
        # name, the key of every instance before the key named the selection.
        return type(self).__qualname__

    def _select(self, pl_module: nn.Module) -> dict[str, nn.Module]:
        supported = _supported_layers()
        include = self.include if self.include is not None else list(_DEFAULT_INCLUDE)
        exclude = self.exclude or []
        chosen: dict[str, nn.Module] = {}
        unsupported: list[str] = []
        overriding: list[str] = []
        frozen = 0
        for name, module in pl_module.named_modules():
            if not name or not any(fnmatch.fnmatchcase(name, p) for p in include):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in exclude):
                continue
            if isinstance(module, supported):
                if not (self.include_frozen or module.weight.requires_grad):
                    frozen += 1
                elif not _computes_w_x(module):
                    overriding.append(f"{name} ({type(module).__name__})")
                else:
                    chosen[name] = module
            elif self.include is not None and not any(True for _ in module.children()):
                w = getattr(module, "weight", None)
                if isinstance(w, Tensor) and w.ndim >= 2:
                    unsupported.append(f"{name} ({type(module).__name__})")
        self._warn_about_selection(pl_module, chosen, unsupported, overriding, frozen)
        return chosen

    def _warn_about_selection(
        self,
        pl_module: nn.Module,
        chosen: dict[str, nn.Module],
        unsupported: list[str],
        overriding: list[str],
        frozen: int,
    ) -> None:
        supported = _supported_layers()
        if unsupported:
            rank_zero_warn(
                "SpectralBoundRegularizer: include patterns match layers of unsupported types, "
                f"which are left out: {', '.join(unsupported)}. Supported: "
                + ", ".join(t.__name__ for t in supported)
            )
        if overriding:
            rank_zero_warn(
                "SpectralBoundRegularizer: left out layer(s) whose class overrides forward (or "
                "_conv_forward) of its torch class: "
                f"{', '.join(overriding)}. Such a layer need not compute W x with its stored "
                "weight (e.g. it standardizes or rescales it), so no bound of that weight is a "
                "bound on the layer: it is neither penalized, constrained nor reported."
            )
        if not chosen:
            self._warn_no_match(pl_module, frozen)

    def _warn_no_match(self, pl_module: nn.Module, frozen: int) -> None:
        # Lists the layers that do exist, so that the patterns can be fixed.
        supported = _supported_layers()
        existing = [
            f"{n} ({type(m).__name__})"
            for n, m in pl_module.named_modules() if n and isinstance(m, supported)
        ]
        found = (
            "the model has none of these types"
            if not existing
            else f"{len(existing)} exist: {', '.join(existing[:5])}"
            + (", ..." if len(existing) > 5 else "")
        )
        rank_zero_warn(
            "SpectralBoundRegularizer: no layer matches include="
            f"{list(self.include or _DEFAULT_INCLUDE)!r} exclude={list(self.exclude or [])!r} "
            "among " + ", ".join(t.__name__ for t in supported) + f" layers ({found})"
            + (
                f"; {frozen} frozen layer(s) matched but are left out (include_frozen=True "
                "selects them)" if frozen else ""
            )
            + "; the callback does nothing."
        )

    def _discover(self, pl_module: nn.Module) -> None:
        self._layers = self._select(pl_module)
        # Lazy layers have no weight shape until a forward pass materializes them; the shape
        # groups wait for that (``_build_if_materialized``).
        self._lazy_pending = any(is_lazy(m.weight) for m in self._layers.values())
        if not self._lazy_pending:
            self._build_groups()

    def _build_if_materialized(self, *, after_batch: bool = False) -> bool:
        """Build the shape groups once no selected layer is lazy; whether they exist.

        ``after_batch``: a whole batch has run, so a layer still lazy is one the model does not
        call; it leaves the selection (with a warning) instead of holding up the others.
        """
        if not self._lazy_pending:
            return True
        lazy = [n for n, m in self._layers.items() if is_lazy(m.weight)]
        if lazy and after_batch:
            rank_zero_warn(
                f"SpectralBoundRegularizer: lazy layer(s) {', '.join(lazy)} were not "
                "materialized by a whole batch (never called?) and are left out."
            )
            self._layers = {n: m for n, m in self._layers.items() if n not in lazy}
            lazy = []
        if not lazy:
            self._lazy_pending = False
            self._build_groups()
        return not self._lazy_pending

    def _build_groups(self) -> None:
        layers = self._layers
        keep = set(layers) == {n for g in self._shape_groups for n in g.names} and all(
            layers[n] is m
            for g in self._shape_groups
            for n, m in zip(g.names, g.modules, strict=True)
        )
        if not keep:  # (a second fit() on the same model continues with the vectors it has)
            self._new_groups()
        if self._pending_state is not None and self._shape_groups:
            self._apply_state(self._pending_state)
            self._pending_state = None

    def _new_groups(self) -> None:
        layers = self._layers
        by_key: dict[tuple[Any, ...], list[str]] = {}
        for name, module in layers.items():
            w = module.weight
            key = (_grouped_shape(module), w.device, _compute_dtype(w.dtype))
            by_key.setdefault(key, []).append(name)
        self._shape_groups = [
            _ShapeGroup(names, [layers[n] for n in names]) for names in by_key.values()
        ]
        if self._shape_groups:
            # Index turning the shape-grouped concatenation of estimates into model order.
            grouped = {n: i for i, n in enumerate(n for g in by_key.values() for n in g)}
            self._order = torch.tensor(
                [grouped[n] for n in layers], device=self._shape_groups[0].us[0].device
            )
        if self.warmup_power_iterations:
            with torch.no_grad():
                for group in self._shape_groups:
                    power_iteration_(
                        group.stacked_weights(), group.us, group.vs, self.warmup_power_iterations
                    )

    # ------------------------------------------------------------------ Lightning hooks

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Not setup(): Lightning calls configure_model after the callbacks' setup, and the
        # optimizers the constraint hooks into exist only once the strategy is set up.
        self._discover(pl_module)
        self._trainer = trainer
        self._record_input_sizes()
        if pl_module.automatic_optimization:
            if self._wrapped is None:
                self._wrap_training_step(pl_module)
        elif self.beta > 0:
            rank_zero_warn(
                "SpectralBoundRegularizer(beta > 0) with manual optimization: the callback cannot "
                "add the penalty to your loss. In training_step write "
                "`loss = loss + regularizer.penalty(self)` before `self.manual_backward(loss)`."
            )
        if self.constraint is not None or self.check_finite:
            # One hook does both, the check first: it names a non-finite layer before the
            # projection (or a checkpoint, written after the step) sees it.
            for opt in trainer.optimizers:
                self._step_hooks.append(opt.register_step_post_hook(self._after_optimizer_step))
        if self.constraint is not None and not self._lazy_pending:
            # Lazy layers: first projected after the first optimizer step (their first forward
            # necessarily runs with the initial weights).
            self.project(pl_module)

    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.state.fn != "fit" and not self._layers:  # trainer.validate() without fit
            self._discover(pl_module)
            self._record_input_sizes()

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if self._wrapped is not None:
            self._wrapped.__dict__.pop("training_step", None)
            self._wrapped = None
        for handle in self._step_hooks + self._size_hooks:
            handle.remove()
        self._step_hooks, self._size_hooks = [], []
        self._trainer = None
        self._pending_state = None

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._estimated_this_batch = False

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        if not self._layers:
            return
        self._build_if_materialized(after_batch=True)
        if not self._estimated_this_batch:
            if self.beta > 0 and not pl_module.automatic_optimization:
                raise RuntimeError(
                    "SpectralBoundRegularizer(beta > 0) with manual optimization: training_step "
                    "did not call `regularizer.penalty(self)`. Add it to your loss before "
                    "`self.manual_backward(loss)`, or set beta=0 to only monitor."
                )
            with torch.no_grad():
                self.penalty(pl_module)
        self._remove_size_hooks_if_done()
        if pl_module.automatic_optimization and trainer.fit_loop._should_accumulate():
            return  # Lightning writes step logs only when the optimizer steps
        if not self._should_log(trainer):
            return
        self._log_training_values(pl_module)

    def on_validation_epoch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule
    ) -> None:
        if self._tracker is not None and not trainer.sanity_checking:
            self._tracker.on_validation_epoch_start(trainer, pl_module)

    def on_validation_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._remove_size_hooks_if_done()
        if self._layers:  # lazy layers: the first validation batch materialized them
            # In fit, a layer that validation does not call may be called by training_step.
            self._build_if_materialized(after_batch=trainer.state.fn != "fit")
        if self._tracker is not None and not trainer.sanity_checking:
            self._tracker.on_validation_batch_end(trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._layers and not self._lazy_pending:
            self._log_validation_values(trainer, pl_module)
        if self._tracker is not None:
            self._tracker.on_validation_epoch_end(trainer, pl_module)

    # trainer.test certifies too; the tracker logs under "test/", apart from validation.

    def on_test_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._tracker is not None:
            self._tracker.on_test_epoch_start(trainer, pl_module)

    def on_test_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._tracker is not None:
            self._tracker.on_test_batch_end(trainer, pl_module, batch)

    def on_test_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._tracker is not None:
            self._tracker.on_test_epoch_end(trainer, pl_module)

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
        if not self._shape_groups:
            if not self._layers and not self._lazy_pending:
                self._discover(pl_module)
            if not self._build_if_materialized() or not self._shape_groups:
                return torch.zeros(())
        device = self._shape_groups[0].us[0].device
        with torch.autocast(device_type=device.type, enabled=False):
            estimates = torch.cat([
                fantastic_four_estimate(
                    g.stacked_weights(), g.us, g.vs, self.n_power_iterations
                )
                for g in self._shape_groups
            ])
            if len(self._shape_groups) > 1:
                estimates = estimates[self._order]  # back to model order
            excess = estimates if self.target is None else (estimates - self.target).clamp_min(0)
            if self.reduction == "sum":
                reduced = excess.sum()
            elif self.reduction == "mean":
                reduced = excess.mean()
            else:
                reduced = excess.max()
            penalty = self.beta * reduced
        self._last_estimates = estimates.detach()
        self._last_penalty = penalty.detach()
        self._estimated_this_batch = True
        return penalty

    def _wrap_training_step(self, pl_module: pl.LightningModule) -> None:
        original = pl_module.training_step

        @functools.wraps(original)
        def training_step(*args: Any, **kwargs: Any) -> Any:
            output = original(*args, **kwargs)
            if not self._layers:
                return output
            if self.beta == 0:
                with torch.no_grad():
                    self.penalty(pl_module)
                return output
            if output is None:  # the user skips this batch
                return output
            if isinstance(output, Tensor):
                return output + self.penalty(pl_module)
            if isinstance(output, Mapping) and "loss" in output:
                return {**output, "loss": output["loss"] + self.penalty(pl_module)}
            return output  # Lightning raises its own error for anything else

        # An instance attribute shadows the class method for this fit only (teardown removes
        # it); Lightning and DDP's forward redirection both look the method up on the instance.
        pl_module.training_step = training_step  # type: ignore[method-assign]
        self._wrapped = pl_module

    # ------------------------------------------------------------------ the constraint

    def _after_optimizer_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        # Runs inside optimizer.step(), before Lightning's on_train_batch_end hooks, where
        # ModelCheckpoint writes: a raise here keeps non-finite weights out of every checkpoint.
        if not self._layers or not self._build_if_materialized():
            return
        if self.check_finite:
            self._check_finite_after_step()
        if self.constraint is not None:
            self._project_layers()

    @torch.no_grad()
    def _check_finite_after_step(self) -> None:
        """Raise naming the layer(s) if the step left non-finite weights (or estimates).

        One on-device flag for all layers and one host sync per step; the estimates are those
        the step's loss used (non-finite with finite weights: weights too large for float32).
        The flag is the finiteness of per-layer sums: NaN and Inf propagate through a sum, and
        a sum reads each weight once (``isfinite(w).all()`` costs about 8x more on CPU). A
        sum can overflow with finite weights: then the weights are checked one by one.
        """
        sums = [m.weight.sum(dtype=_compute_dtype(m.weight.dtype)) for m in self._layers.values()]
        if self._last_estimates is not None:
            sums.append(self._last_estimates.sum())
        device = sums[0].device
        if bool(torch.isfinite(torch.stack([t.to(device) for t in sums])).all()):  # the sync
            return
        self._raise_non_finite("after the optimizer step")
        if self._last_estimates is None or bool(torch.isfinite(self._last_estimates).all()):
            return  # a sum overflowed; every weight and estimate is finite
        names = self.layer_names
        bad = [names[i] for i in torch.nonzero(~torch.isfinite(self._last_estimates)).flatten()]
        raise RuntimeError(
            f"SpectralBoundRegularizer: the spectral estimate of layer(s) {', '.join(bad)} is not "
            f"finite although the weights are ({self._where()}): the weights are too large for "
            "float32."
        )

    def _raise_non_finite(self, context: str) -> None:
        bad = [n for n, m in self._layers.items() if not bool(torch.isfinite(m.weight).all())]
        if bad:
            raise RuntimeError(
                f"SpectralBoundRegularizer: non-finite weights (NaN or Inf) in layer(s) "
                f"{', '.join(bad)} ({context}, {self._where()}); stopped before a checkpoint "
                "or anything else could use them. Lower the learning rate or beta, or clip "
                "gradients."
            )

    def _where(self) -> str:
        if self._trainer is None:
            return "outside fit"
        return f"global step {self._trainer.global_step}"

    def project(self, pl_module: nn.Module) -> None:
        """Rescale every selected layer whose guaranteed bound exceeds ``constraint``.

        A layer with guaranteed bound ``b > c`` is multiplied by ``c / b`` (times
        ``1 - 8 eps`` of the weight dtype, so rounding the product cannot push the bound
        back above ``c``). Every bound the library has is a norm of the weight, homogeneous of
        degree 1, so afterwards the guaranteed bound is ``<= c`` exactly, and
        ``min(b, c)`` is a guaranteed bound of the layer as rescaled.

        The bound used is ``layer_spectral_bound(module, max_cost=0)``: the minimum of the
        exact Fantastic Four bound and the tap-sum bound (and, for strided layers, the same two
        bounds of the polyphase filter), valid for every input size. The
        tighter optional bounds (Gram kernel, sampled frequencies) cost up to ~1e8
        multiply-adds per layer, too much for every step; since the full bound is never
        larger, it is ``<= c`` too. Cost per step: float64 norms of the ``2^d`` matricizations
        of every layer, and one host sync per layer (the bound checks its input is finite).
        Lazy layers not materialized yet are skipped.
        """
        if self.constraint is None:
            return
        if not self._layers:
            self._layers = self._select(pl_module)
        self._project_layers()

    @torch.no_grad()
    def _project_layers(self) -> None:
        from .functional.bounds import layer_spectral_bound

        assert self.constraint is not None
        after: list[Tensor] = []
        for name, module in self._layers.items():
            w = module.weight
            if is_lazy(w):
                continue
            if not isinstance(w, nn.Parameter):
                raise RuntimeError(
                    f"SpectralBoundRegularizer(constraint=...): the weight of {name} is not a "
                    "plain parameter (a parametrization?), so it cannot be rescaled in place"
                )
            try:
                bound = layer_spectral_bound(module, max_cost=0.0)
            except ValueError:
                self._raise_non_finite("found by the constraint's projection")
                raise
            margin = 8 * torch.finfo(w.dtype).eps
            scale = torch.where(
                bound > self.constraint,
                self.constraint * (1 - margin) / bound,
                torch.ones_like(bound),
            )
            w.mul_(scale.to(device=w.device, dtype=w.dtype))
            after.append(bound.clamp(max=self.constraint))
        if after:
            # Kept on the device; logged with the other training values, without a sync.
            self._last_guaranteed_max = torch.stack([a.to(after[0].device) for a in after]).max()

    # ------------------------------------------------------------------ logging

    def _should_log(self, trainer: pl.Trainer) -> bool:
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if every == 0:
            return False
        epoch_loop = trainer.fit_loop.epoch_loop
        step = getattr(epoch_loop, "_batches_that_stepped", trainer.global_step) + 1
        return step % every == 0 or trainer.should_stop

    def _log_training_values(self, pl_module: pl.LightningModule) -> None:
        """Log the penalty and the estimates, and the constraint's guaranteed maximum.

        Keys say what a value is: ``spectral_estimate/*`` are power-iteration estimates (from
        below) of the Fantastic Four bound, ``spectral_bound/step_max`` is guaranteed. The
        progress bar shows the guaranteed value when there is one.
        """
        if self._last_estimates is None or self._last_penalty is None:
            return
        parts = [self._last_penalty.reshape(1), self._last_estimates]
        guaranteed = self._last_guaranteed_max if self.constraint is not None else None
        if guaranteed is not None:
            parts.append(guaranteed.reshape(1).to(self._last_estimates.device))
        # One host transfer per logging step for every value (float64: a guaranteed bound
        # must not be rounded down on the way).
        values = torch.cat([p.double() for p in parts]).tolist()
        penalty, per_layer = values[0], values[1:1 + len(self._layers)]
        log = functools.partial(pl_module.log, on_step=True, on_epoch=False)
        log("spectral_penalty", penalty)
        log("spectral_estimate/max", max(per_layer), prog_bar=guaranteed is None)
        if guaranteed is not None:
            log("spectral_bound/step_max", _round_up_to_float32(values[-1]), prog_bar=True)
        if self.log_per_layer:
            for name, value in zip(self._layers, per_layer, strict=True):
                log(f"spectral_estimate/{name}", value)

    @torch.no_grad()
    def guaranteed_bounds(self) -> dict[str, float]:
        """Guaranteed upper bounds of every selected layer (``layer_spectral_bound``), by name.

        Uses the input size each layer saw in the first batch, when recorded (tighter for
        some layers); a layer never called gets the bound valid for every input size.
        """
        from .functional.bounds import layer_spectral_bound

        out = {}
        for name, module in self._layers.items():
            if is_lazy(module.weight):  # not materialized yet: no weight to bound
                continue
            size = self._input_sizes.get(name)
            out[name] = float(layer_spectral_bound(module, size))
        return out

    @torch.no_grad()
    def exact_norms(self) -> dict[str, float]:
        """Exact spectral norms at the recorded input sizes (layers never called are skipped)."""
        from .functional.exact import conv_spectral_norm

        out = {}
        for name, module in self._layers.items():
            size = self._input_sizes.get(name)
            if size is None and not isinstance(module, nn.Linear):
                continue
            out[name] = float(conv_spectral_norm(module, size))
        return out

    def _log_validation_values(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        bounds = self.guaranteed_bounds()
        log = functools.partial(pl_module.log, on_step=False, on_epoch=True, sync_dist=True)
        up = _round_up_to_float32  # logged as float32: rounded up, still an upper bound
        log("spectral_bound/max", up(max(bounds.values())), prog_bar=True)
        if self.log_per_layer:
            for name, value in bounds.items():
                log(f"spectral_bound/{name}", up(value))
        every = self.exact_every_n_epochs
        if every is None or trainer.current_epoch % every:
            return
        exact = self.exact_norms()
        ratios = {n: bounds[n] / e for n, e in exact.items() if e > 0}
        if ratios:
            log("spectral_ratio/max", max(ratios.values()))
        if self.log_per_layer:
            for name, value in exact.items():
                log(f"spectral_exact/{name}", value)
            for name, value in ratios.items():
                log(f"spectral_ratio/{name}", value)

    # ------------------------------------------------------------------ input sizes

    def _record_input_sizes(self) -> None:
        for handle in self._size_hooks:
            handle.remove()
        self._size_hooks = []
        for name, module in self._layers.items():
            if isinstance(module, nn.Linear) or name in self._input_sizes:
                continue

            def hook(mod: nn.Module, args: tuple[Any, ...], name: str = name) -> None:
                d = mod.weight.ndim - 2
                if args and isinstance(args[0], Tensor) and name not in self._input_sizes:
                    self._input_sizes[name] = tuple(int(s) for s in args[0].shape[-d:])

            self._size_hooks.append(module.register_forward_pre_hook(hook))

    def _remove_size_hooks_if_done(self) -> None:
        # After the first batch: layers not called by then keep the size-free bound.
        if self._size_hooks:
            for handle in self._size_hooks:
                handle.remove()
            self._size_hooks = []

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """Per-layer singular vectors (keyed by layer name) and recorded input sizes."""
        if not self._shape_groups and self._pending_state is not None:
            return self._pending_state
        layers = {}
        for group in self._shape_groups:
            for i, name in enumerate(group.names):
                layers[name] = {
                    "u": [u[i].detach().clone() for u in group.us],
                    "v": [v[i].detach().clone() for v in group.vs],
                }
        return {"version": 1, "layers": layers, "input_sizes": dict(self._input_sizes)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self._shape_groups:
            self._apply_state(state_dict)
        # Lightning usually restores callbacks before on_fit_start (re)discovers the layers:
        # keep the state to apply then.
        self._pending_state = state_dict

    def _apply_state(self, state: dict[str, Any]) -> None:
        saved = state.get("layers", {})
        self._input_sizes.update(
            {k: (None if v is None else tuple(v)) for k, v in state.get("input_sizes", {}).items()}
        )
        missing = []
        for group in self._shape_groups:
            for i, name in enumerate(group.names):
                entry = saved.get(name)
                if entry is None:
                    missing.append(name)
                    continue
                vectors = list(entry["u"]) + list(entry["v"])
                if len(vectors) != len(group.us) + len(group.vs):
                    raise ValueError(
                        f"SpectralBoundRegularizer state for layer {name}: {len(vectors)} "
                        f"vectors, the layer needs {len(group.us) + len(group.vs)}"
                    )
                for mine, theirs in zip(group.us + group.vs, vectors, strict=True):
                    if tuple(theirs.shape) != tuple(mine[i].shape):
                        raise ValueError(
                            f"SpectralBoundRegularizer state for layer {name}: vector of shape "
                            f"{tuple(theirs.shape)} does not fit the layer ({tuple(mine[i].shape)})"
                        )
                    mine[i].copy_(theirs)
        extra = sorted(set(saved) - set(self._layers))
        if missing or extra:
            rank_zero_warn(
                "SpectralBoundRegularizer: the saved state does not match the model's layers "
                f"(no saved vectors for {missing}, saved vectors for unknown layers {extra}); "
                "the former start from fresh vectors."
            )


# ---------------------------------------------------------------------- argument checks


def _check_real(name: str, value: Any, *, low: float, strict: bool = False) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    if not ok or value < low or (strict and value == low):
        bound = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


def _check_int(name: str, value: Any, *, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return value


def _check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value


def _check_patterns(name: str, value: Any) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, Sequence) or not all(isinstance(p, str) and p for p in value):
        raise ValueError(f"{name} must be a list of non-empty glob patterns, got {value!r}")
    return list(value)
