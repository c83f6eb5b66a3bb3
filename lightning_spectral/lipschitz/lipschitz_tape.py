"""Record the Lipschitz walk once, replay it every step: ``L`` and the pairwise margin bounds
``K`` as functions of the per-layer norms.

:func:`record_lipschitz` runs the graph walk of :func:`network_lipschitz_bound` once with the
recording placeholders of :mod:`.tape` in place of the bounds of the selected layers. The
result holds two programs over the same norms: the network's bound ``L(n)`` and, when the
output is a linear head ``z = W g + b``, the bound ``L_g(n)`` of the features ``g`` feeding it.
:meth:`LipschitzProgram.pairwise` then gives ``K_yj = min(sqrt(2) L, ||W_y - W_j|| L_g)``
with the head's *live* weight, differentiable in the norms and in ``W``.

Replaying the guaranteed bounds recorded (``program.network.bounds``) gives back
:func:`network_lipschitz_bound` exactly (the same float64 operations in the same order); on
power-iteration estimates the values are estimates, not certificates (see :mod:`.tape`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .api import _not_nan, _walk_model
from .common import LayerBound
from .ownership import _builtin_class, _curvature_rule, _user_rule
from .replay import CurvatureTape
from .tape import LeafBounds, _RecordingWalker
from .tracing import _shape

__all__ = ["LipschitzProgram", "record_lipschitz"]


@dataclass
class LipschitzProgram:
    """The network's Lipschitz bound (``network``) and its head's features' (``features``) as
    programs over the norms of the selected layers; ``head`` the ``nn.Linear`` producing the
    logits (``None`` without one: then ``features`` is ``None``); ``input_sizes`` the spatial
    input size of each selected layer in the walk (``None`` for linear layers or layers the
    walk never met)."""

    network: CurvatureTape
    features: CurvatureTape | None
    head: nn.Linear | None
    num_classes: int
    input_sizes: list[tuple[int, ...] | None]

    def lipschitz(self, norms: Tensor) -> Tensor:
        """``L(norms)``, 0-dim float64, differentiable."""
        return self.network.replay(norms)

    def pairwise(self, norms: Tensor) -> Tensor:
        """``K(norms)``: ``(C, C)`` float64, zero diagonal, differentiable in the norms and in
        the head's weight."""
        c = self.num_classes
        off = 1.0 - torch.eye(c, dtype=torch.float64, device=norms.device)
        k = math.sqrt(2.0) * self.network.replay(norms) * off
        if self.head is None or self.features is None:
            return k
        w = self.head.weight.to(torch.float64)
        diff = w[:, None, :] - w[None, :, :]
        # sqrt of the squared norm with the diagonal kept away from 0 (no NaN gradient there).
        rows = (diff.square().sum(-1) + (1.0 - off)).sqrt() * off
        return torch.minimum(k, rows * self.features.replay(norms))


def _head_module(walker: _RecordingWalker) -> nn.Linear | None:
    out = walker.output
    if out is None or out.op != "call_module" or len(out.args) != 1:
        return None
    module = walker.gm.get_submodule(out.target)
    plain = _user_rule(module) is None and _curvature_rule(module) is None
    return module if plain and _builtin_class(module) is nn.Linear else None


def record_lipschitz(
    model: nn.Module,
    input_shape: Sequence[int],
    layers: Sequence[nn.Module] | Mapping[str, nn.Module],
    *,
    layer_bound: LayerBound | None = None,
) -> LipschitzProgram:
    """Record :func:`network_lipschitz_bound` (and the bound of the head's features) as
    programs over the norms of ``layers`` (in the order the norms are given to replay).

    Same checks and refusals as :func:`network_lipschitz_bound`, except that an untraceable
    ``nn.Sequential`` is refused (the child-by-child fallback is not recorded). A linear head
    given as ``F.linear`` (not a module) is not used for the pairwise bounds.
    """
    leaves = LeafBounds(layers, layer_bound)
    walker = _walk_model(model, input_shape, leaves, walker_class=_RecordingWalker)
    out_shape = _shape(walker.output)
    if out_shape is None or len(out_shape) != 2 or out_shape[1] < 2:
        raise ValueError(f"certified training needs logits of shape (N, C) with C >= 2, the "
                         f"model outputs {None if out_shape is None else tuple(out_shape)}")
    head = _head_module(walker)
    network = leaves.tape(_not_nan(walker.lip[walker.output]))
    features = None
    if head is not None:
        features = leaves.tape(_not_nan(walker.lip[walker.output.args[0]]))
    return LipschitzProgram(network, features, head, int(out_shape[1]), leaves.sizes)
