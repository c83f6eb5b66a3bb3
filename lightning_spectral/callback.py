"""``SpectralBoundRegularizer``: penalize, constrain and log the spectral bounds of layers.

The paper's objective (Singla & Feizi, ICLR 2021, section 7 of ``paper.md``) is

    task loss + beta * sum_I u_I,

``u_I = sqrt(prod k) * min_A ||M_A||_2`` the Fantastic Four bound of the I-th convolution or
linear layer, estimated during training by one power iteration per step on persistent vectors.
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

from .functional.matricize import grouped_weight
from .functional.power import fantastic_four_estimate, init_singular_vectors, power_iteration_

__all__ = ["SpectralBoundRegularizer"]

Reduction = Literal["sum", "max", "mean"]

_DEFAULT_INCLUDE = ("*",)


def _supported_layers() -> tuple[type, ...]:
    from .functional.bounds import SUPPORTED_LAYERS

    return tuple(SUPPORTED_LAYERS)


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
    so that each layer's *guaranteed* bound is at most ``constraint``, logs estimates during
    training and guaranteed bounds (and exact norms) at validation end, and certifies robustness
    (``certify_epsilons``). See ``docs/callback.md``.

    Args:
        beta: weight of the penalty; 0 monitors only.
        n_power_iterations: power iterations per training step (the paper: 1).
        warmup_power_iterations: iterations when the vectors are created, so the first steps
            already see converged estimates.
        include: glob patterns (``fnmatch``) on module names (``named_modules``) selecting layers;
            default every supported layer (``nn.Conv1d/2d/3d``, ``nn.ConvTranspose1d/2d/3d``,
            ``nn.Linear`` and subclasses).
        exclude: glob patterns removing layers from the selection.
        reduction: ``"sum"`` (the paper's objective), ``"max"`` or ``"mean"`` over layers.
        target: penalize only ``max(0, bound - target)`` per layer.
        constraint: after every optimizer step, rescale each layer whose guaranteed bound exceeds
            ``constraint`` so that it no longer does.
        log_every_n_steps: how often training values are logged, in optimizer steps (``None``:
            the trainer's ``log_every_n_steps``).
        log_per_layer: log ``spectral/<layer>`` (and the per-layer validation values), not only
            the aggregates.
        exact_every_n_epochs: every this many epochs, also log exact norms and the ratio
            bound/exact at validation end (``None``: never; exact norms can be slow).
        check_finite: before every optimizer step, raise if a layer's weights are non-finite
            (one host synchronization of one flag per step; free on CPU).
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

    def _select(self, pl_module: nn.Module) -> dict[str, nn.Module]:
        supported = _supported_layers()
        include = self.include if self.include is not None else list(_DEFAULT_INCLUDE)
        exclude = self.exclude or []
        chosen: dict[str, nn.Module] = {}
        unsupported: list[str] = []
        for name, module in pl_module.named_modules():
            if not name or not any(fnmatch.fnmatchcase(name, p) for p in include):
                continue
            if any(fnmatch.fnmatchcase(name, p) for p in exclude):
                continue
            if isinstance(module, supported):
                chosen[name] = module
            elif self.include is not None and not any(True for _ in module.children()):
                w = getattr(module, "weight", None)
                if isinstance(w, Tensor) and w.ndim >= 2:
                    unsupported.append(f"{name} ({type(module).__name__})")
        if unsupported:
            rank_zero_warn(
                "SpectralBoundRegularizer: include patterns match layers of unsupported types, "
                f"which are left out: {', '.join(unsupported)}. Supported: "
                + ", ".join(t.__name__ for t in supported)
            )
        if not chosen:
            rank_zero_warn(
                "SpectralBoundRegularizer: no layer matches include="
                f"{list(include)!r} exclude={list(exclude)!r} among "
                + ", ".join(t.__name__ for t in supported)
                + "; the callback does nothing."
            )
        return chosen

    def _discover(self, pl_module: nn.Module) -> None:
        layers = self._select(pl_module)
        old = {n: g for g in self._shape_groups for n in g.names}
        keep = (
            set(layers) == set(old)
            and all(
                layers[n] is m
                for g in self._shape_groups
                for n, m in zip(g.names, g.modules, strict=True)
            )
        )
        self._layers = layers
        if keep:  # a second fit() on the same model: continue with the vectors we have
            return
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
        if self._pending_state is not None:
            self._apply_state(self._pending_state)
            self._pending_state = None
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
        if self.constraint is not None:
            for opt in trainer.optimizers:
                self._step_hooks.append(opt.register_step_post_hook(self._after_optimizer_step))
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

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self.check_finite or self._last_estimates is None:
            return
        # One flag for all layers: a non-finite weight makes its power-iteration value
        # non-finite (NaN/inf propagate through M v), so one host sync checks them all.
        if bool(torch.isfinite(self._last_estimates).all()):
            return
        bad = [n for n, m in self._layers.items() if not bool(torch.isfinite(m.weight).all())]
        if bad:
            raise RuntimeError(
                f"SpectralBoundRegularizer: non-finite weights in layer(s) {', '.join(bad)} "
                f"(global step {trainer.global_step}); stopping before the optimizer step. "
                "Lower the learning rate or beta, or clip gradients."
            )
        names = self.layer_names
        bad = [names[i] for i in torch.nonzero(~torch.isfinite(self._last_estimates)).flatten()]
        raise RuntimeError(
            f"SpectralBoundRegularizer: the spectral estimate of layer(s) {', '.join(bad)} is not "
            f"finite although the weights are (global step {trainer.global_step}): the weights "
            "are too large for float32."
        )

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
        if self._tracker is not None and not trainer.sanity_checking:
            self._tracker.on_validation_batch_end(trainer, pl_module, batch)

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        if self._layers:
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
            if not self._layers:
                self._discover(pl_module)
            if not self._shape_groups:
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
        if self._layers:
            self._project_layers()

    def project(self, pl_module: nn.Module) -> None:
        """Rescale every selected layer whose guaranteed bound exceeds ``constraint``.

        A layer with guaranteed bound ``b > c`` is multiplied by ``c / b`` (times
        ``1 - 8 eps`` of the weight dtype, so rounding the product cannot push the bound
        back above ``c``). Every bound the library has is a norm of the weight, homogeneous of
        degree 1, so afterwards the guaranteed bound is ``<= c`` exactly.

        The bound used is ``layer_spectral_bound(module, max_cost=0)``: the minimum of the
        exact Fantastic Four bound and the tap-sum bound (and, for strided layers, the same two
        bounds of the polyphase filter), valid for every input size. The
        tighter optional bounds (Gram kernel, sampled frequencies) cost up to ~1e8
        multiply-adds per layer, too much for every step; since the full bound is never
        larger, it is ``<= c`` too. Cost per step: float64 norms of the ``2^d`` matricizations
        of every layer, and one host sync per layer (the bound checks its input is finite).
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
        for name, module in self._layers.items():
            w = module.weight
            if not isinstance(w, nn.Parameter):
                raise RuntimeError(
                    f"SpectralBoundRegularizer(constraint=...): the weight of {name} is not a "
                    "plain parameter (a parametrization?), so it cannot be rescaled in place"
                )
            bound = layer_spectral_bound(module, max_cost=0.0)
            margin = 8 * torch.finfo(w.dtype).eps
            scale = torch.where(
                bound > self.constraint,
                self.constraint * (1 - margin) / bound,
                torch.ones_like(bound),
            )
            w.mul_(scale.to(device=w.device, dtype=w.dtype))

    # ------------------------------------------------------------------ logging

    def _should_log(self, trainer: pl.Trainer) -> bool:
        every = self.log_every_n_steps or trainer.log_every_n_steps
        if every == 0:
            return False
        epoch_loop = trainer.fit_loop.epoch_loop
        step = getattr(epoch_loop, "_batches_that_stepped", trainer.global_step) + 1
        return step % every == 0 or trainer.should_stop

    def _log_training_values(self, pl_module: pl.LightningModule) -> None:
        if self._last_estimates is None or self._last_penalty is None:
            return
        # One host transfer per logging step for every value.
        values = torch.cat([self._last_penalty.reshape(1).float(), self._last_estimates.float()])
        penalty, *per_layer = values.tolist()
        pl_module.log("spectral/penalty", penalty, on_step=True, on_epoch=False)
        pl_module.log("spectral/max", max(per_layer), on_step=True, on_epoch=False, prog_bar=True)
        if self.log_per_layer:
            for name, value in zip(self._layers, per_layer, strict=True):
                pl_module.log(f"spectral/{name}", value, on_step=True, on_epoch=False)

    @torch.no_grad()
    def guaranteed_bounds(self) -> dict[str, float]:
        """Guaranteed upper bounds of every selected layer (``layer_spectral_bound``), by name.

        Uses the input size each layer saw in the first batch, when recorded (tighter for
        some layers); a layer never called gets the bound valid for every input size.
        """
        from .functional.bounds import layer_spectral_bound

        out = {}
        for name, module in self._layers.items():
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
        log("spectral_bound/max", max(bounds.values()))
        if self.log_per_layer:
            for name, value in bounds.items():
                log(f"spectral_bound/{name}", value)
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
