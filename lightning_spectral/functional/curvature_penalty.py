"""Differentiable curvature penalty for curvature-regularized training (CRT).

For a chain ``z = W_n s(W_{n-1} s(... s(W_1 x)))`` of linear maps (linear layers,
convolutions) and smooth elementwise activations with constants ``(g, h)``
(``g = sup|s'|``, ``h`` = Lipschitz constant of ``s'``), the Lipschitz constant ``L`` and the
Jacobian-Lipschitz constant ``C`` of the logit map obey

    L_1 = ||W_1||,  C_1 = 0,
    L_{i+1} = g_i ||W_{i+1}|| L_i,   C_{i+1} = ||W_{i+1}|| (h_i L_i^2 + g_i C_i),

the composition rule ``C(phi o psi) <= C_phi L_psi^2 + L_phi C_psi``. :func:`chain_curvature`
is this recursion as a pure, differentiable function of the layer norms: with guaranteed
upper bounds on every ``||W_i||`` it is a guaranteed bound on ``C`` (a polynomial with
non-negative coefficients is monotone in each norm).

:class:`ChainCurvaturePenalty` evaluates it every training step from power-iteration
estimates of the norms (persistent vectors, one iteration per step, gradient ``u v^T``;
for a convolution the estimate of its Fantastic Four bound). Power iteration approaches each
norm from below, so the penalty is an ESTIMATE used as a training signal, never a
certificate: certify with a guaranteed bound computed from the trained weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn

from .activations import activation_curvature
from .geometry import SupportedLayer
from .matricize import grouped_weight
from .power import fantastic_four_estimate, init_singular_vectors

__all__ = ["ChainCurvaturePenalty", "chain_curvature", "parse_chain"]

#: Layers whose operator norm the penalty estimates. Exact types: a subclass may compute
#: something else in its own ``forward``.
_LINEAR_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def chain_curvature(
    norms: Sequence[Tensor | float] | Tensor,
    activations: Sequence[tuple[float, float]],
) -> Tensor:
    """Jacobian-Lipschitz bound ``C`` of ``W_n s_{n-1}(... s_1(W_1 x))`` from the layer norms.

    Runs ``L <- g_i ||W_{i+1}|| L``, ``C <- ||W_{i+1}|| (h_i L^2 + g_i C)`` from
    ``(L, C) = (||W_1||, 0)``. Differentiable in ``norms``; monotone non-decreasing in each
    norm, so guaranteed norm bounds give a guaranteed ``C``.

    Args:
        norms: ``n >= 1`` non-negative operator norms (or bounds / estimates of them), first
            layer first; a 1-d tensor or a sequence of scalars.
        activations: ``n - 1`` pairs ``(g, h)``, the activation between layers ``i`` and
            ``i + 1`` (use ``(1, 0)`` where two linear maps follow each other).

    Returns:
        0-dim tensor ``C`` (0 for a single linear layer).
    """
    values = list(norms.unbind(0)) if isinstance(norms, Tensor) else list(norms)
    if not values:
        raise ValueError("chain_curvature needs at least one layer norm")
    if len(activations) != len(values) - 1:
        raise ValueError(
            f"{len(values)} layer norms need {len(values) - 1} activations between them, "
            f"got {len(activations)}"
        )
    for i, (g, h) in enumerate(activations):
        if not (g >= 0 and h >= 0):
            raise ValueError(f"activation {i}: (g, h) must be >= 0, got ({g}, {h})")
    lip = torch.as_tensor(values[0])
    curv = torch.zeros_like(lip)
    for norm, (g, h) in zip(values[1:], activations, strict=True):
        curv = norm * (h * lip.square() + g * curv)
        lip = g * norm * lip
    return curv


def _compose_activations(first: tuple[float, float], second: tuple[float, float]
                         ) -> tuple[float, float]:
    """``(g, h)`` of ``s2 o s1``: ``g = g1 g2`` and ``h = h2 g1^2 + g2 h1``."""
    (g1, h1), (g2, h2) = first, second
    return g1 * g2, h2 * g1 * g1 + g2 * h1


def parse_chain(model: nn.Module) -> tuple[list[SupportedLayer], list[tuple[float, float]]]:
    """Split a plain chain into its linear layers and the ``(g, h)`` between them.

    ``model`` is an ``nn.Sequential`` (nested ones are flattened) of exact ``nn.Linear`` /
    ``nn.ConvNd`` layers, smooth activations known to
    :func:`~lightning_spectral.functional.activation_curvature`, and ``nn.Flatten`` (an
    isometry). It must start and end with a linear layer. Consecutive activations are
    composed; consecutive linear layers get ``(1, 0)`` between them.

    Raises:
        ValueError: any other module (named), an activation without known constants, or a
            chain that does not start and end with a linear layer.
        NonSmoothActivationError: an activation whose derivative jumps (ReLU, ...).
    """
    layers: list[SupportedLayer] = []
    activations: list[tuple[float, float]] = []
    pending: tuple[float, float] | None = None
    for name, module in _leaves(model, ""):
        if type(module) in _LINEAR_TYPES:
            if layers:
                activations.append(pending if pending is not None else (1.0, 0.0))
            layers.append(cast(SupportedLayer, module))  # an exact _LINEAR_TYPES type
            pending = None
        elif type(module) is nn.Flatten:
            if (module.start_dim, module.end_dim) != (1, -1):
                raise ValueError(f"{name}: only nn.Flatten(start_dim=1, end_dim=-1) (all of a "
                                 f"sample's axes) is supported, got {module}")
            continue
        else:
            gh = activation_curvature(module)
            if gh is None:
                raise ValueError(
                    f"{name} ({type(module).__name__}) is neither a linear layer, nn.Flatten "
                    "nor an activation with known curvature constants: the chain recursion "
                    "does not apply to it"
                )
            if not layers:
                raise ValueError(f"the chain must start with a linear layer, got {name} first")
            pending = gh if pending is None else _compose_activations(pending, gh)
    if not layers:
        raise ValueError("the chain has no linear layer")
    if pending is not None:
        raise ValueError("the chain must end with a linear layer (the logits), not an activation")
    return layers, activations


def _leaves(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    if type(module) is not nn.Sequential:
        return [(prefix or type(module).__name__, module)]
    out: list[tuple[str, nn.Module]] = []
    for name, child in module.named_children():
        out.extend(_leaves(child, f"{prefix}.{name}" if prefix else name))
    return out


def _grouped_shape(layer: SupportedLayer) -> tuple[int, ...]:
    weight = layer.weight
    if isinstance(layer, nn.Linear):  # the 2-d weight
        return (1, *weight.shape)
    return tuple(grouped_weight(weight, int(layer.groups)).shape)


class ChainCurvaturePenalty(nn.Module):
    """Per-step, differentiable ESTIMATE of the curvature bound ``C`` of a chain network.

    Every call runs ``n_iter`` power iterations on each layer's persistent singular vectors
    (buffers of this module, so they are saved with a checkpoint and follow ``.to()``), reads
    off each norm estimate ``sigma_i = u_i^T W_i v_i`` (for a convolution, the estimate of its
    Fantastic Four bound ``sqrt(prod k) min_A ||M_A||``), and returns
    :func:`chain_curvature` of them. The gradient of each ``sigma_i`` is ``u_i v_i^T``; no
    host synchronization happens. Each ``sigma_i`` is at most the true norm (or the FF
    bound), so this is a training signal, not a certificate.

    Args:
        model: the chain (see :func:`parse_chain`); its layers are referenced, not copied.
        n_iter: power iterations per call (0 freezes the vectors: then the value is an
            exactly differentiable function of the weights, for gradient checks).
        seed: seed of the starting vectors.
    """

    def __init__(self, model: nn.Module, *, n_iter: int = 1, seed: int = 0) -> None:
        super().__init__()
        layers, self.activations = parse_chain(model)
        # A plain list: the layers belong to the model, not to the penalty's state dict.
        self._layers = list(layers)
        self.n_iter = int(n_iter)
        self._counts: list[int] = []
        for i, layer in enumerate(layers):
            w = layer.weight
            us, vs = init_singular_vectors(_grouped_shape(layer), seed=seed + i,
                                           device=w.device, dtype=w.dtype)
            self._counts.append(len(us))
            for j, (u, v) in enumerate(zip(us, vs, strict=True)):
                self.register_buffer(f"u{i}_{j}", u.unsqueeze(0))
                self.register_buffer(f"v{i}_{j}", v.unsqueeze(0))

    def _vectors(self, i: int) -> tuple[list[Tensor], list[Tensor]]:
        n = self._counts[i]
        us = [getattr(self, f"u{i}_{j}") for j in range(n)]
        vs = [getattr(self, f"v{i}_{j}") for j in range(n)]
        return us, vs

    def norm_estimates(self) -> Tensor:
        """``(n,)`` differentiable norm estimates, one per layer (advances the iteration)."""
        out = []
        for i, layer in enumerate(self._layers):
            # (1, 1, out, in) for a linear layer, (1, groups, out / groups, in, *k) for a conv
            w = layer.weight.reshape(1, *_grouped_shape(layer))
            us, vs = self._vectors(i)
            out.append(fantastic_four_estimate(w, us, vs, self.n_iter)[0])
        return torch.stack(out)

    def forward(self) -> Tensor:
        """The estimate of ``C`` (0-dim, differentiable w.r.t. every layer's weight)."""
        return chain_curvature(self.norm_estimates(), self.activations)
