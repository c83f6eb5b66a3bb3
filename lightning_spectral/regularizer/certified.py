r"""Certified training: the loss term that trains for a Lipschitz certificate at radius ``eps``.

At the first training batch the Lipschitz graph walk of the LightningModule's forward is
recorded as a program over the norms of the selected layers
(:func:`~lightning_spectral.network.tape.record_lipschitz`), and every selected
layer that the walk meets gets a power-iteration vector of its input space at the input size
the walk saw. Every training step then

1. runs ``n_power_iterations`` iterations of ``u -> A^T A u`` per layer
   (:func:`~lightning_spectral.functional.operator_power.operator_norm_estimate`, ``A`` the
   layer's operator at its input size) and takes ``||A u||``, differentiable in the weight;
2. replays the program on these estimates: the network estimate ``L_est`` and, with a linear
   head ``z = W g + b``, the pairwise ``K_yj = min(sqrt(2) L_est, ||W_y - W_j|| L_g,est)``;
3. adds ``weight * term(z, y, eps_t, K / input_scale)`` to the step's loss, ``z`` the logits
   of the step's (last) call of the LightningModule's forward and ``y`` the batch's labels:
   ``"gloro"`` ``CE([z, z_bot], y)`` with ``z_bot = max_{j != y} (z_j + eps_t K_yj)``,
   ``"trades"`` the KL term of GloRo's TRADES form, ``"margin"`` the Lipschitz-margin loss with
   margin ``eps_t max_j K_yj`` (see :mod:`lightning_spectral.functional.certified_losses`).

``eps_t`` rises linearly from ``eps / warmup_steps`` to ``eps`` over the first
``warmup_steps`` optimizer steps (``global_step``, so a resumed run continues the schedule).
``L_est`` and ``K`` are estimates (power iteration approaches the norms from below): they
steer training, they never certify. Certificates at validation use guaranteed bounds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import lightning.pytorch as pl
import torch
from torch import Tensor, nn

from ..functional.certified_losses import gloro_loss, gloro_trades_kl, lipschitz_margin_loss
from ..functional.operator_power import operator_norm_estimate, operator_vector
from ..network.tape import LipschitzProgram, record_lipschitz
from . import sharding
from .config import RegularizerConfig
from .selection import layer_weight
from .state import LayerState

__all__ = ["CERTIFIED_LOSSES", "CertifiedTerm", "scheduled_eps"]

CERTIFIED_LOSSES = ("gloro", "trades", "margin")


def scheduled_eps(eps: float, step: int, warmup_steps: int) -> float:
    """``eps * min(1, (step + 1) / warmup_steps)`` (``eps`` itself without warm-up)."""
    if warmup_steps <= 0:
        return eps
    return eps * min(1.0, (step + 1) / warmup_steps)


def certified_loss(kind: str, logits: Tensor, target: Tensor, eps: float,
                   pairwise: Tensor) -> Tensor:
    """The term of one ``kind`` (see the module docstring)."""
    if kind == "gloro":
        return gloro_loss(logits, target, eps, pairwise)
    if kind == "trades":
        return gloro_trades_kl(logits, target, eps, pairwise)
    margin = eps * pairwise.detach().max()
    return lipschitz_margin_loss(logits.float(), target.long(), float(margin))


class _LogitsCapture:
    """Keeps the output of the last call of a module's forward while installed."""

    def __init__(self) -> None:
        self.logits: Tensor | None = None
        self._handle: Any = None

    def install(self, module: nn.Module) -> None:
        self.remove()
        self.logits = None
        self._handle = module.register_forward_hook(self._keep)

    def _keep(self, module: nn.Module, args: Any, output: Any) -> None:
        if isinstance(output, Tensor):
            self.logits = output

    def take(self) -> Tensor | None:
        logits, self.logits = self.logits, None
        self.remove()
        return logits

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None


class CertifiedTerm:
    """The recorded program, the per-layer vectors and the capture of one fit."""

    def __init__(self) -> None:
        self.program: LipschitzProgram | None = None
        self.modules: list[nn.Module] = []
        self.names: list[str] = []
        self.vectors: list[Tensor | None] = []
        self.capture = _LogitsCapture()
        self.target: Tensor | None = None
        self.last_lipschitz: Tensor | None = None
        self._loaded: dict[str, Any] | None = None

    def reset(self) -> None:
        self.program = None
        self.capture.remove()

    def prepare_batch(self, pl_module: nn.Module, state: LayerState, batch: Any,
                      cfg: RegularizerConfig) -> None:
        """Before ``training_step``: record the program at the first batch's per-sample shape,
        keep the batch's labels and capture the forward's logits for :meth:`training_term`."""
        x, y = cfg.input_target(batch)
        if self.program is None:
            if not state.build_if_materialized(cfg.warmup_power_iterations):
                raise ValueError(
                    "certified_eps needs every selected layer materialized when fit starts: "
                    "run one forward pass of the model before fit (lazy layers)")
            self.prepare(pl_module, state.layers, tuple(int(s) for s in x.shape[1:]),
                         cfg.warmup_power_iterations)
        self.target = y
        self.capture.install(pl_module)

    def training_term(self, pl_module: nn.Module, cfg: RegularizerConfig, step: int
                      ) -> Tensor | None:
        """``certified_weight * term`` at the scheduled radius of optimizer step ``step``,
        logged as ``certified_train/*`` (``None`` without ``certified_eps`` or program)."""
        if cfg.certified_eps is None or self.program is None:
            return None
        eps = scheduled_eps(cfg.certified_eps, step, cfg.certified_warmup_steps)
        term = self.loss(cfg.certified_loss, eps, cfg.n_power_iterations, cfg.input_scale)
        if isinstance(pl_module, pl.LightningModule) and pl_module._current_fx_name:
            assert self.last_lipschitz is not None  # set by loss()
            pl_module.log("certified_train/eps", eps, on_step=True, on_epoch=False)
            pl_module.log("certified_train/lipschitz_estimate", self.last_lipschitz.float(),
                          on_step=True, on_epoch=False)
            pl_module.log("certified_train/loss", term.detach(), on_step=True, on_epoch=True)
        return cfg.certified_weight * term

    def prepare(self, pl_module: nn.Module, layers: Mapping[str, nn.Module],
                shape: tuple[int, ...], warmup: int) -> None:
        """Record the program at the per-sample ``shape``; create (or restore) the vectors."""
        with sharding.full_weights(pl_module):
            self.program = record_lipschitz(pl_module, shape, layers)
        self.names, self.modules = list(layers), list(layers.values())
        loaded, self._loaded = self._loaded, None
        generator = torch.Generator().manual_seed(0)
        sizes = self.program.input_sizes
        self.vectors = [self._vector(name, module, size, generator, loaded or {}, warmup)
                        for name, module, size in zip(self.names, self.modules, sizes,
                                                      strict=True)]

    @staticmethod
    def _vector(name: str, module: nn.Module, size: tuple[int, ...] | None,
                generator: torch.Generator, loaded: dict[str, Any], warmup: int
                ) -> Tensor | None:
        """The layer's vector: restored from a checkpoint when it fits, else fresh and warmed
        up; ``None`` for a layer the walk never met (no input size known)."""
        if size is None and not isinstance(module, nn.Linear):
            return None
        u = operator_vector(module, size, generator)
        saved = loaded.get(name)
        if isinstance(saved, Tensor) and saved.shape == u.shape:
            return u.copy_(saved.to(u.device))
        if warmup:
            with torch.no_grad():
                operator_norm_estimate(module, u, warmup)
        return u

    def norms(self, n_iter: int) -> Tensor:
        """Per-layer estimates (float64, differentiable); recorded bounds where not walked."""
        assert self.program is not None
        recorded = self.program.network.bounds
        out = []
        for k, (module, u) in enumerate(zip(self.modules, self.vectors, strict=True)):
            if u is None:
                out.append(recorded[k].to(layer_weight(module).device))
            else:
                out.append(operator_norm_estimate(module, u, n_iter).to(torch.float64))
        return torch.stack(out)

    def loss(self, kind: str, eps: float, n_iter: int, input_scale: float) -> Tensor:
        """The term for the captured logits and the batch's labels (0-dim float32)."""
        assert self.program is not None
        logits = self.capture.take()
        target = self.target
        if logits is None:
            raise RuntimeError(
                "SpectralBoundRegularizer(certified_eps=...): training_step did not call the "
                "LightningModule's forward (`self(x)`), so the callback has no logits to train "
                "the certificate on. Compute the logits with `self(x)` (its forward is also "
                "what is certified).")
        if target is None:
            raise RuntimeError("certified training: the batch gave no labels")
        norms = self.norms(n_iter)
        with torch.autocast(device_type=norms.device.type, enabled=False):
            self.last_lipschitz = self.program.lipschitz(norms).detach()
            pairwise = self.program.pairwise(norms) / input_scale
            return certified_loss(kind, logits.float(), target.to(logits.device), eps,
                                  pairwise.float())

    def state_dict(self) -> dict[str, Any] | None:
        if self.program is None:
            return None
        return {n: u.detach().cpu().clone() for n, u in zip(self.names, self.vectors, strict=True)
                if u is not None}

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        self._loaded = state
