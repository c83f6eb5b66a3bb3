"""Certified robustness during validation and test: the part of the callback that certifies.

:class:`CertificationTracker` is owned by
:class:`lightning_spectral.callback.SpectralBoundRegularizer` (``certify_epsilons=[...]``) and
driven from its validation and test hooks through :meth:`~CertificationTracker.start`,
:meth:`~CertificationTracker.update` and :meth:`~CertificationTracker.log`. Per run (each
validation run, each ``trainer.test``) it

1. computes a guaranteed bound ``L_s`` on the l2 Lipschitz constant of ``pl_module``'s forward
   (:func:`lightning_spectral.network_lipschitz_bound`, float64, eval mode) and, with a linear
   head, the bounds ``K_yj = min(sqrt(2) L_s, ||W_y - W_j|| L_g)`` of every margin
   (:func:`lightning_spectral.network_pairwise_lipschitz`), from one graph walk, for every
   per-sample input shape ``s`` the run's batches have, once per shape and run (the weights
   may change between runs, and the bound depends on the input size: a global average over
   ``N`` positions contributes ``1/sqrt(N)``);
2. on every batch, runs ``pl_module(x)`` under ``no_grad`` in eval mode (whatever mode the
   trainer left it in: the bound is for the eval-mode network), computes each sample's certified
   radius once, the larger of ``(f_y - max_{j != y} f_j) / (sqrt(2) L_s)`` and
   ``min_{j != y} (f_y - f_j) / K_yj`` (both hold over all classes), and feeds it to
   :class:`~lightning_spectral.certify.metrics.CertifiedRobustAccuracy` and
   :class:`~lightning_spectral.certify.metrics.CertifiedRadius`;
3. logs ``certified/acc@<eps>``, ``certified/radius`` and ``lipschitz/network`` (validation)
   or the same names under ``test/`` (test). ``lipschitz/network`` is ``max_s L_s`` over the
   shapes seen in the run by any process.

Validation and test keep separate metric states, so their values never mix.

What is traced is the LightningModule's own ``forward``: it must map the input to the logits
with operations the network bound knows (``return self.model(x)`` is fine). If it cannot be
traced, the error says why; nothing is silently skipped.

Units (``input_scale``): epsilons and radii are l2 norms in "input units"; how a normalization
outside the model is accounted for is in :mod:`lightning_spectral.certify.options`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

from .. import _progress
from .._checks import check_reals
from ..functional.certify import certified_radius, pairwise_certified_radius
from ..functional.opnorm import float32_rounded_up
from ..network.curvature import curvature_and_pairwise
from ..network.pairwise import certificate_bounds
from .bounds import checked_curvature, checked_lipschitz
from .forward import curvature_radii, eval_logits, warn_if_low_precision
from .options import CertifyMethod, check_certify_method, check_input_scale
from .runs import Run

__all__ = ["CertificationTracker", "default_batch_to_input_target"]

BatchToInputTarget = Callable[[Any], "tuple[Tensor, Tensor]"]
CurvatureFn = Callable[[Any, "tuple[int, ...]"], "tuple[Tensor, Tensor]"]

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


class CertificationTracker:
    """Certified accuracy and radius on the validation and test sets, with guaranteed bounds.

    Args:
        epsilons: l2 radii (input units, see :mod:`lightning_spectral.certify.options`) at
            which certified accuracy is reported; logged as ``certified/acc@<eps>``
            (``test/certified/acc@<eps>`` in ``trainer.test``) with ``eps`` formatted by ``:g``.
        input_scale: the std of a normalization applied to the data *outside* the model
            (scalar, or per-channel sequence: the minimum is used, see
            :func:`~lightning_spectral.certify.options.check_input_scale`); 1.0 when there is
            none or the model normalizes inside its forward.
        batch_to_input_target: ``fn(batch) -> (x, y)`` for batch layouts other than
            ``(x, y)``; see :func:`default_batch_to_input_target`.
        lipschitz_fn: ``fn(pl_module, input_shape) -> L`` or ``-> (L, K)``, how the network
            Lipschitz bound ``L`` (and optionally the ``(C, C)`` bounds ``K_yj`` on the
            Lipschitz constants of the margins ``z_y - z_j``) are computed for a per-sample
            input shape; default
            :func:`lightning_spectral.network.pairwise.certificate_bounds` (with a linear
            head ``K_yj = min(sqrt(2) L, ||W_y - W_j|| L_g)``). Must be guaranteed bounds.
            Each sample's radius is the larger of ``margin / (sqrt(2) L)`` and
            ``min_{j != y} (z_y - z_j) / K_yj``: both are sound over all classes.
        method: ``"lipschitz"`` (the first-order radius above), ``"curvature"`` (the
            second-order radius of
            :func:`~lightning_spectral.functional.curvature_certified_radius`, with the
            guaranteed curvature bound ``C`` of the network and its pairwise refinement
            ``K``) or ``"both"``.
        curvature_fn: ``fn(pl_module, input_shape) -> (C, K)``, guaranteed bounds (default:
            :func:`lightning_spectral.network_curvature_bound` and
            :func:`lightning_spectral.network_pairwise_curvature`, from one graph walk).
        compositional: also compute the certified ECLipsE-Fast chain bound when the forward
            is a chain of supported layers (``return self.model(x)`` with ``self.model`` an
            ``nn.Sequential`` of Linear / Conv2d / activations / Flatten / dropout) and its
            largest check has at most
            :data:`~lightning_spectral.network.compositional.MAX_ROWS` rows (a few seconds
            on one CPU thread), and use ``L = min(L, chain)``, ``K_yj = min(K_yj, sqrt(2)
            L)``: larger certified radii, still guaranteed. Off by default.

    ``runs["validate"]`` and ``runs["test"]`` hold each run kind's metrics (``accuracy``,
    ``radius``) and its bounds by input shape (``lipschitz``).
    """

    def __init__(
        self,
        epsilons: Sequence[float] | float,
        input_scale: float | Sequence[float] = 1.0,
        batch_to_input_target: BatchToInputTarget | None = None,
        lipschitz_fn: Callable[[Any, tuple[int, ...]], Any] | None = None,
        method: CertifyMethod = "lipschitz",
        curvature_fn: CurvatureFn | None = None,
        compositional: bool = False,
    ) -> None:
        self.method = check_certify_method("method", method)
        self.epsilons = check_reals("epsilons", epsilons, low=0.0)
        self.input_scale = check_input_scale(input_scale)
        self.batch_to_input_target = batch_to_input_target or default_batch_to_input_target
        self.lipschitz_fn = lipschitz_fn or certificate_bounds
        self.curvature_fn = curvature_fn or curvature_and_pairwise
        self.compositional = compositional
        self.runs = {stage: Run(self.epsilons, prefix) for stage, prefix in _PREFIXES.items()}
        self._warned_precision = False

    def _run(self, stage: str) -> Run:
        if stage not in self.runs:
            raise ValueError(f"stage must be one of {sorted(self.runs)}, got {stage!r}")
        return self.runs[stage]

    def _lipschitz_for(self, run: Run, pl_module: Any, x: Tensor) -> tuple[Tensor, Tensor | None]:
        shape = tuple(int(s) for s in x.shape[1:])
        if shape not in run.lipschitz:
            _progress.announce(
                f"computing the network's Lipschitz bound for certification at input shape "
                f"{shape}", getattr(pl_module, "_trainer", None))
            lip, pairwise = checked_lipschitz(self.lipschitz_fn, pl_module, shape,
                                              self.compositional)
            # Lipschitz constants w.r.t. the raw input: ||delta / std|| <= ||delta|| / min(std).
            run.lipschitz[shape] = lip / self.input_scale
            run.pairwise[shape] = None if pairwise is None else pairwise / self.input_scale
        return run.lipschitz[shape], run.pairwise[shape]

    def start(self, stage: str) -> None:
        """Forget the previous run of this kind: its metric states and its bounds."""
        self._run(stage).reset()

    def _curvature_for(self, run: Run, pl_module: Any, x: Tensor) -> tuple[Tensor, Tensor]:
        shape = tuple(int(s) for s in x.shape[1:])
        if shape not in run.curvature:
            _progress.announce(
                f"computing the network's curvature bound for certification at input shape "
                f"{shape}", getattr(pl_module, "_trainer", None))
            run.curvature[shape] = checked_curvature(self.curvature_fn, pl_module, shape)
        return run.curvature[shape]

    def update(self, stage: str, pl_module: Any, batch: Any) -> None:
        """Certify one batch with the bound(s) at the batch's input shape."""
        run = self._run(stage)
        x, y = self.batch_to_input_target(batch)
        uses_lip, uses_curv = self.method != "curvature", self.method != "lipschitz"
        lip = self._lipschitz_for(run, pl_module, x) if uses_lip else None
        curvature = self._curvature_for(run, pl_module, x) if uses_curv else None
        logits = eval_logits(pl_module, x)
        self._warn_if_low_precision(logits)
        y = y.to(logits.device)
        first = second = None
        if lip is not None:
            first = certified_radius(logits, y, lip[0].to(logits.device))
            if lip[1] is not None:  # all-class pairwise certificate; both are sound
                first = torch.maximum(first, pairwise_certified_radius(logits, y, lip[1]))
            run.add(logits, y, first)
        if curvature is not None:
            second = self.curvature_radii(pl_module, x, y, curvature[1]).to(logits.device)
            run.add(logits, y, second, second_order=True)
        if first is not None and second is not None:
            run.add(logits, y, torch.maximum(first, second), family="certified_best")
        run.seen = True

    def curvature_radii(self, pl_module: Any, x: Tensor, y: Tensor,
                        pairwise: Tensor) -> Tensor:
        """``curvature_certified_radius`` of the eval-mode network in float64, in input units.

        The radius is computed for the model's input and multiplied by ``input_scale`` (the
        smallest std): ``||delta / std|| <= ||delta|| / min(std)``, as for the Lipschitz radius.
        Gradients are needed (the input gradient of every margin), also inside Lightning's
        inference mode, which is left for this computation.
        """
        radius = curvature_radii(pl_module, x, y, pairwise)
        return radius * self.input_scale

    def _warn_if_low_precision(self, logits: Tensor) -> None:
        if not self._warned_precision:
            self._warned_precision = warn_if_low_precision(logits.dtype)

    def compute(self, stage: str = "validate") -> dict[str, Tensor]:
        """The values that are logged, by name (metrics synchronized across processes;
        ``lipschitz/network`` and ``curvature/network``, the max over input shapes, are this
        process's: :meth:`log` takes the max over processes)."""
        run = self._run(stage)
        p = run.prefix
        out: dict[str, Tensor] = {}
        if self.method != "curvature":
            out.update(run.values(self.epsilons))
            if run.lipschitz:
                out[f"{p}lipschitz/network"] = torch.stack(list(run.lipschitz.values())).max()
        if self.method == "both":
            out.update(run.values(self.epsilons, family="certified_best"))
        if self.method != "lipschitz":
            out.update(run.values(self.epsilons, second_order=True))
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
