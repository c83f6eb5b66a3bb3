"""What every rule is: the :class:`NodeRule` entry of the rule table, and the
:class:`Walk` protocol, what a rule may call on the walker (so that no rule imports the
walker: :mod:`..walk` imports the rules).

A rule of a function / method node is ``fn(walk, node, target) -> Tensor``, ``target`` the
out-of-place target the node calls. Its Lipschitz part reads its arguments' bounds through
:meth:`Walk.L`; its curvature part reads :meth:`Walk.lipschitz` and :meth:`Walk.C`; its
slack part (against the smooth twin, see :mod:`.smooth`) :meth:`Walk.E` and :meth:`Walk.D`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor, fx, nn

from ..common import LayerBound

__all__ = ["NodeRule", "Rule", "SlackRule", "Walk", "linear", "rules_for"]


class Walk(Protocol):
    """The walker as the rules see it (implemented by :class:`..walk.Walker`)."""

    gm: fx.GraphModule
    layer_bound: LayerBound

    def L(self, value: Any) -> Tensor:
        """Bound of an argument in the table being read (nested: root-sum-square)."""

    def lipschitz(self, value: Any) -> Tensor:
        """Lipschitz bound of an argument, whatever table :meth:`L` reads."""

    def C(self, value: Any) -> Tensor:
        """Curvature bound of an argument."""

    def E(self, value: Any) -> Tensor:
        """Value slack of an argument against the smooth twin."""

    def D(self, value: Any) -> Tensor:
        """Jacobian slack of an argument against the smooth twin."""

    def in_curvature(self, rule: Callable[..., Tensor], *args: Any) -> Tensor:
        """``rule(*args)`` with :meth:`L` reading the curvature bounds (linear nodes)."""

    def in_slack(self, rule: Callable[..., Tensor], *args: Any) -> tuple[Tensor, Tensor]:
        """``rule(*args)`` on the value and Jacobian slacks (linear nodes)."""

    def dependent(self, value: Any) -> bool:
        """Whether an argument (nested allowed) depends on the input."""

    def only_first_dependent(self, node: fx.Node) -> None:
        """Refuses ``node`` unless only its first argument depends on the input."""

    def keeps_batch(self, node: fx.Node) -> bool:
        """Whether ``node`` and its first argument have the batch axis first."""

    def spread(self, arg: Any, node: fx.Node) -> float:
        """``sqrt(r)``, ``r`` how often broadcasting repeats an entry of ``arg``."""

    def constant(self, node: fx.Node, value: Any) -> Tensor:
        """The recorded value of a constant argument, float64 on the CPU."""

    def visit_module(self, node: fx.Node) -> Tensor:
        """``L`` of a leaf module's node (in the table :meth:`L` reads)."""

    def module_lip(self, module: nn.Module, in_shapes: list[torch.Size],
                   out_shape: torch.Size | None) -> Tensor:
        """``K`` of one call of a leaf module (its registered or built-in rule)."""


Rule = Callable[..., Tensor]
"""``fn(walk, node, target) -> Tensor``: a Lipschitz or curvature rule."""
SlackRule = Callable[..., "tuple[Tensor, Tensor]"]
"""``fn(walk, node, target) -> (E, D)``: the slack rule of a non-linear node."""


@dataclass(frozen=True)
class NodeRule:
    """The rules of one target, side by side.

    ``lipschitz(walk, node, target)``: a bound on the Lipschitz constant of input -> node,
    from ``walk.L(arg)`` of the node's arguments (with the node's recorded shapes and
    constant arguments). ``curvature(walk, node, target)``: a bound on the Lipschitz constant
    of its Jacobian, from ``walk.lipschitz(arg)`` and ``walk.C(arg)``; None where there is
    none (the curvature bound refuses the node). ``slack(walk, node, target)``: its
    ``(E, D)`` against the smooth twin; None where the curvature rule refuses the node.
    ``linear``: the node is a linear map of its input-dependent arguments, and its curvature
    and slack rules are its Lipschitz rule applied to the other tables (see :func:`linear`).
    """

    lipschitz: Rule
    curvature: Rule | None = None
    slack: SlackRule | None = None
    linear: bool = False


def linear(lipschitz: Rule) -> NodeRule:
    """The rule of a linear node ``v = A(u_1, ..., u_k)``: the Lipschitz rule applied to the
    inputs' curvature bounds bounds ``C_v`` (``Dv = A o (Du_1, ..., Du_k)``, so Jacobian
    differences go through the same linear map, see ``Walker.in_curvature``), and applied
    to their slacks bounds ``(E_v, D_v)`` (the twin computes the same linear map)."""

    def curvature(w: Walk, node: fx.Node, t: Any) -> Tensor:
        return w.in_curvature(lipschitz, w, node, t)

    def slack(w: Walk, node: fx.Node, t: Any) -> tuple[Tensor, Tensor]:
        return w.in_slack(lipschitz, w, node, t)

    return NodeRule(lipschitz, curvature, slack, linear=True)


def rules_for(targets: Iterable[Any], rule: NodeRule) -> dict[Any, NodeRule]:
    """``rule`` for every one of ``targets`` (a table fragment)."""
    return dict.fromkeys(targets, rule)
