"""Curvature-regularized training (CRT, Singla & Feizi 2020) as a LightningModule.

* :func:`crt_network`: the CRT networks, ``784-1024-10``, ``784-1024-1024-10``,
  ``784-1024-1024-1024-10`` (``"mlp2"``, ``"mlp3"``, ``"mlp4"``) and a small convolutional
  variant (``"cnn"``), all with :class:`~lightning_spectral.functional.SmoothSoftplus`
  (torch's ``nn.Softplus`` switches to the identity at its threshold, where its derivative
  jumps: the curvature certificates refuse it).
* :class:`CurvatureRegularizedClassifier`: loss ``CE(z(x), y) + gamma * K_est`` with
  ``K_est`` the per-step estimate of the network's curvature bound
  (:class:`~lightning_spectral.functional.curvature_penalty.ChainCurvaturePenalty`); with
  ``attack="curvature"`` the cross-entropy is taken on the points of the curvature-based
  attack (:func:`~lightning_spectral.functional.curvature_attack`) at radius ``rho``.
* :func:`exact_chain_curvature`: a guaranteed ``(L, C)`` for such a chain, from exact float64
  spectral norms (linear layers) and guaranteed bounds (convolutions).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional.activations import SmoothSoftplus, activation_curvature
from ..functional.bounds import layer_spectral_bound
from ..functional.crc_attack import curvature_attack
from ..functional.curvature_penalty import ChainCurvaturePenalty, parse_chain

__all__ = ["ARCHITECTURES", "ATTACKS", "CurvatureRegularizedClassifier", "crt_network",
           "exact_chain_curvature"]

ARCHITECTURES = ("mlp2", "mlp3", "mlp4", "cnn")
ATTACKS = (None, "curvature")


def crt_network(arch: str, *, in_channels: int = 1, image_size: int = 28, width: int = 1024,
                num_classes: int = 10) -> nn.Sequential:
    """A CRT network: ``mlp<k>`` has ``k - 1`` hidden layers of ``width``; ``cnn`` is
    ``conv(16, 4x4, stride 2) - conv(32, 4x4, stride 2) - fc(100) - fc(classes)``. Every
    activation is ``SmoothSoftplus()`` (``g = 1``, ``h = 1/4``)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"arch must be one of {ARCHITECTURES}, got {arch!r}")
    if arch == "cnn":
        if image_size % 4:
            raise ValueError(f"the cnn needs an image size divisible by 4, got {image_size}")
        side = image_size // 4
        return nn.Sequential(
            nn.Conv2d(in_channels, 16, 4, stride=2, padding=1), SmoothSoftplus(),
            nn.Conv2d(16, 32, 4, stride=2, padding=1), SmoothSoftplus(),
            nn.Flatten(), nn.Linear(32 * side * side, 100), SmoothSoftplus(),
            nn.Linear(100, num_classes),
        )
    depth = int(arch[3:])
    sizes = [in_channels * image_size * image_size] + [width] * (depth - 1)
    layers: list[nn.Module] = [nn.Flatten()]
    for n_in, n_out in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(n_in, n_out), SmoothSoftplus()]
    layers.append(nn.Linear(sizes[-1], num_classes))
    return nn.Sequential(*layers)


def _layer_norm_bound(layer: nn.Module, input_shape: Sequence[int]) -> Tensor:
    """Guaranteed ``||layer||_2`` in float64: exact for ``nn.Linear`` (``svdvals``), the
    library's provable bound for convolutions at this (batched) input shape."""
    if type(layer) is nn.Linear:
        return torch.linalg.matrix_norm(layer.weight.detach().to(torch.float64), ord=2)
    return layer_spectral_bound(layer, tuple(input_shape[2:])).detach().to(torch.float64)


def exact_chain_curvature(model: nn.Module, input_shape: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Guaranteed ``(L, C)`` of a chain network (see
    :func:`~lightning_spectral.functional.curvature_penalty.parse_chain`) on inputs of
    per-sample shape ``input_shape``: Lipschitz constant ``L`` and Jacobian-Lipschitz constant
    ``C``, by the composition rule ``C(phi o psi) <= C_phi L_psi^2 + L_phi C_psi`` with exact
    norms of linear layers and guaranteed bounds for convolutions, in float64. A chain may
    end with an activation here (e.g. the features before a linear head)."""
    head, trailing = _split_trailing(model)
    layers, activations = parse_chain(head)
    x = torch.zeros(1, *input_shape, dtype=next(model.parameters()).dtype)
    norms = []
    with torch.no_grad():
        for layer in layers:
            x = x.flatten(1) if type(layer) is nn.Linear else x
            norms.append(_layer_norm_bound(layer, x.shape))
            x = layer(x)
    lip, curv = norms[0], torch.zeros((), dtype=torch.float64)
    for norm, (g, h) in zip(norms[1:], activations, strict=True):
        curv = norm * (h * lip * lip + g * curv)
        lip = g * norm * lip
    for g, h in trailing:
        curv, lip = h * lip * lip + g * curv, g * lip
    return lip, curv


def _split_trailing(model: nn.Module) -> tuple[nn.Module, list[tuple[float, float]]]:
    """The chain up to its last linear layer, and the ``(g, h)`` of the activations after it."""
    if type(model) is not nn.Sequential:
        return model, []
    children = list(model)
    trailing: list[tuple[float, float]] = []
    while children and type(children[-1]) not in (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d):
        gh = activation_curvature(children[-1])
        if gh is None:
            break  # parse_chain names it
        trailing.insert(0, gh)
        children.pop()
    return nn.Sequential(*children), trailing


class CurvatureRegularizedClassifier(pl.LightningModule):
    """``CE(model(x_train), y) + gamma * K_est``, Adam (Singla & Feizi 2020).

    ``K_est`` is the per-step power-iteration estimate of the chain curvature bound ``C`` of
    the logit map; it is logged as ``train/curvature_estimate``. With ``gamma = 0`` the
    estimate is still computed and logged (it then costs one power iteration per layer).

    ``x_train`` is the batch itself (``attack=None``, the default) or, with
    ``attack="curvature"`` and ``rho > 0``, the points of
    :func:`~lightning_spectral.functional.curvature_attack` at l2 radius ``rho`` against the
    runner-up class, with this step's ``K_est`` (detached) as the curvature (pairwise
    ``sqrt(2) K_est``) and the model in eval mode while attacking; CRT proper, which trains on
    the attack points only, with no clean term. The attack costs about
    ``attack_bisection * (attack_inner + 2)`` input gradients per step; the mean attained
    margin is logged as ``train/attack_margin`` and ``train/acc`` is measured on ``x_train``.

    Args:
        model: a chain network (:func:`crt_network`).
        gamma: weight of the curvature penalty (the published runs use 0.005 to 0.01).
        lr: Adam learning rate.
        n_iter: power iterations per step.
        attack: ``None`` (train on clean inputs) or ``"curvature"``.
        rho: attack radius (l2, input units; the published MNIST runs use 0.5 and 1.58).
        attack_bisection: bisection steps of the attack.
        attack_inner: majorize-minimize steps per bisection step.
    """

    def __init__(self, model: nn.Module, gamma: float = 0.0, lr: float = 1e-3,
                 n_iter: int = 1, attack: str | None = None, rho: float = 0.0,
                 attack_bisection: int = 8, attack_inner: int = 10) -> None:
        super().__init__()
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ValueError(f"gamma must be finite and >= 0, got {gamma!r}")
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"lr must be finite and positive, got {lr!r}")
        if attack not in ATTACKS:
            raise ValueError(f"attack must be one of {ATTACKS}, got {attack!r}")
        if not (math.isfinite(rho) and rho >= 0):
            raise ValueError(f"rho must be finite and >= 0, got {rho!r}")
        if attack_bisection < 1 or attack_inner < 1:
            raise ValueError("attack_bisection and attack_inner must be >= 1, got "
                             f"{attack_bisection}, {attack_inner}")
        self.save_hyperparameters(ignore=["model"])
        self.model = model
        self.penalty = ChainCurvaturePenalty(model, n_iter=n_iter)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x)

    def attack_points(self, x: Tensor, y: Tensor, curvature: Tensor | float) -> Tensor:
        """The curvature-attack points for ``(x, y)`` at radius ``rho`` (no parameter
        gradients; the model is put in eval mode for the attack and restored after)."""
        modes = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        try:
            result = curvature_attack(
                self.model, x, y, self.hparams["rho"], curvature, classes="runner_up",
                n_bisection=self.hparams["attack_bisection"], n_inner=self.hparams["attack_inner"])
        finally:
            for m, mode in modes:
                m.training = mode
        self.log("train/attack_margin", result.margin.mean().to(torch.float32),
                 batch_size=len(y))
        return result.x

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        curvature = self.penalty()
        if self.hparams["attack"] == "curvature" and self.hparams["rho"] > 0:
            x = self.attack_points(x, y, curvature.detach())
        logits = self(x)
        ce = F.cross_entropy(logits, y)
        loss = ce + self.hparams["gamma"] * curvature
        n = len(y)
        self.log("train/ce", ce, batch_size=n)
        self.log("train/curvature_estimate", curvature, prog_bar=True, batch_size=n)
        self.log("train/acc", (logits.argmax(1) == y).float().mean(), prog_bar=True,
                 batch_size=n)
        return loss

    def _evaluate(self, batch: tuple[Tensor, Tensor], prefix: str) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{prefix}/acc", (logits.argmax(1) == y).float().mean(), batch_size=len(y))

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.model.parameters(), lr=self.hparams["lr"])
