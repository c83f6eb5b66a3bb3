"""Certified robustness during validation and test: the part of the callback that certifies.

:class:`CertificationTracker` is owned by
:class:`lightning_spectral.callback.SpectralBoundRegularizer` (``certify_epsilons=[...]``) and
driven from its validation and test hooks. Per run (each validation run, each ``trainer.test``)
it

1. computes a guaranteed bound ``L_s`` on the l2 Lipschitz constant of ``pl_module``'s forward
   (:func:`lightning_spectral.network_lipschitz_bound`, float64, eval mode) for every per-sample
   input shape ``s`` the run's batches have, once per shape and run (the weights may change
   between runs, and the bound depends on the input size: a global average over ``N``
   positions contributes ``1/sqrt(N)``);
2. on every batch, runs ``pl_module(x)`` under ``no_grad`` in eval mode (whatever mode the
   trainer left it in: the bound is for the eval-mode network), computes each sample's certified
   radius ``(f_y - max_{j != y} f_j) / (sqrt(2) L_s)`` once, and feeds it to
   :class:`~lightning_spectral.metrics.CertifiedRobustAccuracy` and
   :class:`~lightning_spectral.metrics.CertifiedRadius`;
3. logs ``certified/acc@<eps>``, ``certified/radius`` and ``lipschitz/network`` (validation)
   or the same names under ``test/`` (test). ``lipschitz/network`` is ``max_s L_s`` over the
   shapes seen in the run by any process.

Validation and test keep separate metric states, so their values never mix.

What is traced is the LightningModule's own ``forward``: it must map the input to the logits
with operations the network bound knows (``return self.model(x)`` is fine). If it cannot be
traced, the error says why; nothing is silently skipped.

Units (``input_scale``): epsilons and radii are l2 norms in "input units". If the batch holds
the data as the user thinks of it (or the model normalizes inside its forward), that is the
batch's units and ``input_scale = 1`` (the default). If the batch holds normalized inputs
``x_norm = (x - mean) / std`` and radii are wanted in units of the raw ``x``, pass
``input_scale=std``: a raw perturbation ``delta`` is a perturbation ``delta / std`` of what the
model sees, so the raw-input Lipschitz constant is ``L / std``, the one used and logged. For a
per-channel std pass the sequence: its minimum is used (``||delta / std|| <= ||delta|| /
min(std)``, valid, slightly loose).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from ._checks import check_reals
from .functional import curvature_certified_radius
from .functional.certify import certified_radius
from .lipschitz import network_lipschitz_bound
from .lipschitz.curvature import curvature_and_pairwise
from .metrics import CertifiedRadius, CertifiedRobustAccuracy
from .regularizer.monitor import float32_rounded_up

__all__ = ["CertificationTracker", "default_batch_to_input_target"]

BatchToInputTarget = Callable[[Any], "tuple[Tensor, Tensor]"]
CurvatureFn = Callable[[Any, "tuple[int, ...]"], "tuple[Tensor, Tensor]"]

_METHODS = ("lipschitz", "curvature", "both")

# Logged names per run kind: validation keeps the unprefixed names, test gets "test/".
_PREFIXES = {"validate": "", "test": "test/"}


def default_batch_to_input_target(batch: Any) -> tuple[Tensor, Tensor]:
    """``(x, y)`` from a tuple/list batch ``(x, y, ...)`` or a dict with keys ``x``/``y``
    (also ``input``/``target``, ``image``/``label``)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    if isinstance(batch, dict):
        for kx, ky in (("x", "y"), ("input", "target"), ("image", "label")):
            if kx in batch and ky in batch:
                return batch[kx], batch[ky]
    raise TypeError(
        f"cannot find (input, target) in a batch of type {type(batch).__name__}; pass "
        "batch_to_input_target=fn(batch) -> (x, y)"
    )


def _eps_name(eps: float) -> str:
    return f"{eps:g}"


def _check_input_scale(input_scale: Any) -> float:
    """The smallest std of a scalar or per-channel ``input_scale``, checked."""
    return min(check_reals("input_scale (one std, or one per channel)", input_scale, low=0.0,
                           strict=True))


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Eval mode for the duration, every submodule's own flag restored afterwards.

    The bound is for the network in eval mode; logits computed in train mode (dropout, batch
    statistics) come from another map, and a train-mode BatchNorm would also update its
    running statistics.
    """
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class _Run:
    """The state of one kind of run (validation or test), never shared with the other."""

    def __init__(self, epsilons: list[float], prefix: str) -> None:
        self.prefix = prefix
        self.accuracy = CertifiedRobustAccuracy(epsilons)
        self.radius = CertifiedRadius()
        self.lipschitz: dict[tuple[int, ...], Tensor] = {}  # per-sample input shape -> L
        self.curvature_accuracy = CertifiedRobustAccuracy(epsilons)
        self.curvature_radius = CertifiedRadius()
        # per-sample input shape -> (C, pairwise K), both in model-input units
        self.curvature: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}
        self.seen = False

    def metrics(self) -> list[Any]:
        return [self.accuracy, self.radius, self.curvature_accuracy, self.curvature_radius]

    def reset(self) -> None:
        for metric in self.metrics():
            metric.reset()
        self.lipschitz = {}  # the weights may have changed since the last run
        self.curvature = {}
        self.seen = False


class CertificationTracker:
    """Certified accuracy and radius on the validation and test sets, with guaranteed bounds.

    Args:
        epsilons: l2 radii (input units, see the module docstring) at which certified accuracy
            is reported; logged as ``certified/acc@<eps>`` (``test/certified/acc@<eps>`` in
            ``trainer.test``) with ``eps`` formatted by ``:g``.
        input_scale: the std of a normalization applied to the data *outside* the model
            (scalar, or per-channel sequence: the minimum is used); 1.0 when there is none
            or the model normalizes inside its forward.
        batch_to_input_target: ``fn(batch) -> (x, y)`` for batch layouts other than
            ``(x, y)``; see :func:`default_batch_to_input_target`.
        lipschitz_fn: ``fn(pl_module, input_shape) -> Tensor``, how ``L`` is computed for a
            per-sample input shape (default :func:`lightning_spectral.network_lipschitz_bound`);
            must be a guaranteed bound.
        method: ``"lipschitz"`` (the first-order radius above), ``"curvature"`` (the
            second-order radius of
            :func:`~lightning_spectral.functional.curvature_certified_radius`, with the
            guaranteed curvature bound ``C`` of the network and its pairwise refinement
            ``K``) or ``"both"``.
        curvature_fn: ``fn(pl_module, input_shape) -> (C, K)``, guaranteed bounds (default:
            :func:`lightning_spectral.network_curvature_bound` and
            :func:`lightning_spectral.network_pairwise_curvature`, from one graph walk).

    ``runs["validate"]`` and ``runs["test"]`` hold each run kind's metrics (``accuracy``,
    ``radius``) and its bounds by input shape (``lipschitz``).
    """

    def __init__(
        self,
        epsilons: Sequence[float] | float,
        input_scale: float | Sequence[float] = 1.0,
        batch_to_input_target: BatchToInputTarget | None = None,
        lipschitz_fn: Callable[[Any, tuple[int, ...]], Tensor] | None = None,
        method: str = "lipschitz",
        curvature_fn: CurvatureFn | None = None,
    ) -> None:
        if method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
        self.epsilons = check_reals("epsilons", epsilons, low=0.0)
        self.input_scale = _check_input_scale(input_scale)
        self.batch_to_input_target = batch_to_input_target or default_batch_to_input_target
        self.lipschitz_fn = lipschitz_fn or network_lipschitz_bound
        self.method = method
        self.curvature_fn = curvature_fn or curvature_and_pairwise
        self.runs = {stage: _Run(self.epsilons, prefix) for stage, prefix in _PREFIXES.items()}
        self._warned_precision = False

    def _run(self, stage: str) -> _Run:
        if stage not in self.runs:
            raise ValueError(f"stage must be one of {sorted(self.runs)}, got {stage!r}")
        return self.runs[stage]

    def _compute_lipschitz(self, pl_module: Any, shape: tuple[int, ...]) -> Tensor:
        try:
            model_lip = self.lipschitz_fn(pl_module, shape)
        except TypeError as exc:
            raise TypeError(
                f"certification traces {type(pl_module).__name__}.forward and could not bound "
                f"it: {exc}. Make forward map the input to the logits with supported layers "
                "(e.g. `return self.model(x)`), or register a rule with "
                "lightning_spectral.register_lipschitz_rule."
            ) from exc
        lip = torch.as_tensor(model_lip, dtype=torch.float64).detach().cpu().reshape(())
        if not bool(torch.isfinite(lip)) or bool(lip < 0):
            raise ValueError(
                f"the network Lipschitz bound of {type(pl_module).__name__} at input shape "
                f"{shape} is {float(lip)}, not a finite number >= 0: no certificate can "
                "follow from it (diverged or non-finite weights?)"
            )
        # Lipschitz constant w.r.t. the raw input: ||delta / std|| <= ||delta|| / min(std).
        return lip / self.input_scale

    def _lipschitz_for(self, run: _Run, pl_module: Any, x: Tensor) -> Tensor:
        shape = tuple(int(s) for s in x.shape[1:])
        if shape not in run.lipschitz:
            run.lipschitz[shape] = self._compute_lipschitz(pl_module, shape)
        return run.lipschitz[shape]

    def start(self, stage: str) -> None:
        """Forget the previous run of this kind: its metric states and its bounds."""
        self._run(stage).reset()

    def _curvature_for(self, run: _Run, pl_module: Any, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = tuple(int(s) for s in x.shape[1:])
        if shape not in run.curvature:
            # NonSmoothOperationError (a ReLU, max pooling, ...) names the node: passed on.
            c, k = (torch.as_tensor(v, dtype=torch.float64).detach().cpu()
                    for v in self.curvature_fn(pl_module, shape))
            if not (bool(torch.isfinite(c)) and bool(c >= 0) and bool(torch.isfinite(k).all())
                    and bool((k >= 0).all())):
                raise ValueError(
                    f"the network curvature bound of {type(pl_module).__name__} at input shape "
                    f"{shape} is {float(c)}, not a finite number >= 0: no certificate can "
                    "follow from it (diverged or non-finite weights?)")
            run.curvature[shape] = (c.reshape(()), k)
        return run.curvature[shape]

    def update(self, stage: str, pl_module: Any, batch: Any) -> None:
        """Certify one batch with the bound(s) at the batch's input shape."""
        run = self._run(stage)
        x, y = self.batch_to_input_target(batch)
        uses_lip, uses_curv = self.method != "curvature", self.method != "lipschitz"
        lip = self._lipschitz_for(run, pl_module, x) if uses_lip else None
        curvature = self._curvature_for(run, pl_module, x) if uses_curv else None
        with torch.no_grad(), _eval_mode(pl_module):
            logits = pl_module(x)
        if not isinstance(logits, Tensor) or logits.ndim != 2:
            raise TypeError(
                f"{type(pl_module).__name__}(x) must return (N, C) logits for certification, "
                f"got {getattr(logits, 'shape', type(logits))}"
            )
        if run.accuracy.device != logits.device:
            for metric in run.metrics():
                metric.to(logits.device)
        self._warn_if_low_precision(logits)
        y = y.to(logits.device)
        if lip is not None:
            radius = certified_radius(logits, y, lip.to(logits.device))
            run.accuracy.update(logits, y, radius=radius)
            run.radius.update(logits, y, radius=radius)
        if curvature is not None:
            radius = self.curvature_radii(pl_module, x, y, curvature[1])
            radius = radius.to(logits.device)
            run.curvature_accuracy.update(logits, y, radius=radius)
            run.curvature_radius.update(logits, y, radius=radius)
        run.seen = True

    def curvature_radii(self, pl_module: Any, x: Tensor, y: Tensor,
                        pairwise: Tensor) -> Tensor:
        """``curvature_certified_radius`` of the eval-mode network in float64, in input units.

        The radius is computed for the model's input and multiplied by ``input_scale`` (the
        smallest std): ``||delta / std|| <= ||delta|| / min(std)``, as for the Lipschitz radius.
        Gradients are needed (the input gradient of every margin), also inside Lightning's
        inference mode, which is left for this computation.
        """
        with torch.inference_mode(False), torch.enable_grad(), _eval_mode(pl_module):
            params = {name: t.detach().clone().double() if t.is_floating_point() else t
                      for name, t in (*pl_module.named_parameters(),
                                      *pl_module.named_buffers())}

            def forward(v: Tensor) -> Tensor:
                return torch.func.functional_call(pl_module, params, (v,))

            radius = curvature_certified_radius(forward, x.detach().clone(), y.clone(),
                                                pairwise.to(x.device))
        return radius * self.input_scale

    def _warn_if_low_precision(self, logits: Tensor) -> None:
        eps = torch.finfo(logits.dtype).eps
        if self._warned_precision or eps <= torch.finfo(torch.float32).eps:
            return
        self._warned_precision = True
        rank_zero_warn(
            f"certifying {logits.dtype} logits: the certificate holds for the network evaluated "
            "in exact arithmetic; the rounding of a half-precision forward (relative error ~"
            f"{eps:.0e} per operation) is not accounted for, so samples with small margins may "
            "be certified wrongly. Certify a float32 copy of the model for a guarantee."
        )

    def compute(self, stage: str = "validate") -> dict[str, Tensor]:
        """The values that are logged, by name (metrics synchronized across processes;
        ``lipschitz/network`` and ``curvature/network``, the max over input shapes, are this
        process's: :meth:`log` takes the max over processes)."""
        run = self._run(stage)
        p = run.prefix
        out: dict[str, Tensor] = {}
        if self.method != "curvature":
            acc = run.accuracy.compute()
            out.update({f"{p}certified/acc@{_eps_name(e)}": acc[i]
                        for i, e in enumerate(self.epsilons)})
            out[f"{p}certified/radius"] = run.radius.compute()
            if run.lipschitz:
                out[f"{p}lipschitz/network"] = torch.stack(list(run.lipschitz.values())).max()
        if self.method != "lipschitz":
            acc = run.curvature_accuracy.compute()
            out.update({f"{p}certified_curvature/acc@{_eps_name(e)}": acc[i]
                        for i, e in enumerate(self.epsilons)})
            out[f"{p}certified_curvature/radius"] = run.curvature_radius.compute()
            if run.curvature:
                # In input units: the Jacobian w.r.t. x / s changes by C / s^2 per unit of x.
                c = torch.stack([c for c, _ in run.curvature.values()]).max()
                out[f"{p}curvature/network"] = c / self.input_scale**2
        return out

    def log(self, stage: str, pl_module: Any) -> None:
        """Log :meth:`compute` through ``pl_module.log`` (nothing if no batch was seen)."""
        run = self._run(stage)
        if not run.seen:
            return
        values = self.compute(stage)
        guaranteed = {}
        for kind in ("lipschitz", "curvature"):
            name = f"{run.prefix}{kind}/network"
            if name in values:
                guaranteed[name] = float32_rounded_up(values.pop(name)).to(pl_module.device)
        for name, value in values.items():
            # Already reduced over processes by torchmetrics: no further sync needed.
            pl_module.log(name, value.float().to(pl_module.device), on_epoch=True, on_step=False,
                          sync_dist=False, rank_zero_only=False)
        for name, value in guaranteed.items():
            # Processes may have seen different input shapes: the max over all of them.
            pl_module.log(name, value, on_epoch=True, on_step=False, sync_dist=True,
                          reduce_fx="max", rank_zero_only=False)

    # Lightning-style entry points, as the callback calls them.

    def on_validation_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.start("validate")

    def on_validation_batch_end(self, trainer: Any, pl_module: Any, batch: Any) -> None:
        self.update("validate", pl_module, batch)

    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.log("validate", pl_module)

    def on_test_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self.start("test")

    def on_test_batch_end(self, trainer: Any, pl_module: Any, batch: Any) -> None:
        self.update("test", pl_module, batch)

    def on_test_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        self.log("test", pl_module)
