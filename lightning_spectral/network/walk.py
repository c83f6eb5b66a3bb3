"""The graph walk: one pass in topological order, each node's bound from its arguments'
bounds and the node's rule (:data:`.rules.RULES` for functions and methods,
:data:`.rules.modules.MODULE_RULES` for leaf modules), after the checks that make the rule
applicable (in-place ops, dtypes, batch axis). Asked for curvature, the same pass also gives
each node its curvature bound ``C`` and its slack ``(E, D)`` from the rule's other parts.

:class:`Walker` dispatches like an ``fx.Interpreter``: :meth:`Walker.visit` (Lipschitz),
:meth:`Walker.visit_curvature` and :meth:`Walker.visit_slack` per node, each branching on
the node's kind (placeholder, constant, folded BatchNorm, leaf module, function / method)."""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, fx, nn

from .common import BATCH, LayerBound, UnsupportedOperationError, f64
from .rules import RULES, smooth
from .rules.inplace import RANDOM, check_inplace, inplace_target
from .rules.layers import foldable, folded_layer, layer_bound_of
from .rules.modules import module_curvature, module_lip, module_slack
from .tracing import (
    BatchDependent,
    dtypes,
    known_shape,
    metadata_only,
    refuse,
    shape_of,
    static,
    submodule,
)

__all__ = ["Walker"]


class Walker:
    """Bounds ``L_v`` for every node ``v`` of a shape-propagated graph (and ``C_v``, ``E_v``,
    ``D_v`` when asked for curvature). Implements :class:`.rules.base.Walk`."""

    tracks_slack = True  # False: a node that differs from its smooth twin is refused

    def __init__(self, gm: fx.GraphModule, layer_bound: LayerBound,
                 other_batch: dict[fx.Node, torch.Size], curvature: bool = False) -> None:
        self.gm = gm
        self.layer_bound = layer_bound
        self.other_batch = other_batch
        self.lip: dict[fx.Node, Tensor] = {}
        self.curvature = curvature
        # C_v (Lipschitz constant of the Jacobian of input -> v), filled when asked for.
        self.curv: dict[fx.Node, Tensor] = {}
        # With curvature, the slack against the smooth twin (the network with every finite-
        # threshold softplus replaced by SmoothSoftplus, see .rules.smooth):
        # E_v >= sup ||v - v~|| and D_v >= sup ||Dv - Dv~||.
        self.value_slack: dict[fx.Node, Tensor] = {}
        self.jacobian_slack: dict[fx.Node, Tensor] = {}
        self.output: fx.Node | None = None
        self._read = self.lip  # the table L() reads (see in_curvature)
        # The first input-dependent node computed in float16 / bfloat16, with its dtype.
        self.low_precision: tuple[fx.Node, torch.dtype] | None = None

    @property
    def out(self) -> fx.Node:
        """The output node (:attr:`output`, set by :meth:`run`)."""
        return cast(fx.Node, self.output)

    def L(self, value: Any) -> Tensor:
        """Lipschitz bound of an argument (nested args allowed: root-sum-square). Inside
        :meth:`in_curvature` it reads the curvature bounds instead."""
        return _bound(self._read, value)

    def lipschitz(self, value: Any) -> Tensor:
        """Lipschitz bound of an argument, whatever table :meth:`L` reads."""
        return _bound(self.lip, value)

    def C(self, value: Any) -> Tensor:
        """Curvature bound of an argument (nested args: root-sum-square, see ``_bound``)."""
        return _bound(self.curv, value)

    def E(self, value: Any) -> Tensor:
        """Value slack of an argument against the smooth twin (nested: root-sum-square)."""
        return _bound(self.value_slack, value)

    def D(self, value: Any) -> Tensor:
        """Jacobian slack of an argument against the smooth twin (nested: root-sum-square)."""
        return _bound(self.jacobian_slack, value)

    def in_curvature(self, rule: Callable[..., Tensor], *args: Any) -> Tensor:
        """``rule(*args)`` with ``L()`` reading the curvature bounds.

        For a linear node ``v = A(u_1, ..., u_k)`` (the only kind this is used for) the
        Lipschitz rule returns ``||A||`` applied to its inputs' bounds through sums, root-sum-
        squares and products with constants. ``Dv = A o (Du_1, ..., Du_k)``, so
        ``Dv(x) - Dv(x') = A o (Du_i(x) - Du_i(x'))_i``: the Jacobian differences go through
        the same linear map as the differences of values, and the same rule applied to the
        ``C_u`` bounds ``C_v``."""
        return self.in_table(self.curv, rule, *args)

    def in_table(self, table: dict[fx.Node, Tensor], rule: Callable[..., Tensor],
                 *args: Any) -> Tensor:
        """``rule(*args)`` with ``L()`` reading ``table`` (see :meth:`in_curvature`)."""
        self._read = table
        try:
            return rule(*args)
        finally:
            self._read = self.lip

    def in_slack(self, rule: Callable[..., Tensor], *args: Any) -> tuple[Tensor, Tensor]:
        """A linear node's ``(E, D)``: ``v - v~ = A(u - u~)`` and ``Dv - Dv~ = A o (Du - Du~)``
        (the twin computes the same linear map), so the Lipschitz rule applied to the
        inputs' slacks bounds both, as :meth:`in_curvature` argues for ``C``."""
        return (self.in_table(self.value_slack, rule, *args),
                self.in_table(self.jacobian_slack, rule, *args))

    def has_slack(self, value: Any) -> bool:
        """Whether an argument (nested allowed) differs from its smooth twin."""
        return bool(self.E(value) > 0) or bool(self.D(value) > 0)

    def dependent(self, value: Any) -> bool:
        """Whether an argument (nested allowed) depends on the input (a bound above 0)."""
        if isinstance(value, dict):
            return self.dependent(list(value.values()))
        return isinstance(value, fx.Node) and bool(self.lip[value] > 0) or (
            isinstance(value, (tuple, list)) and any(self.dependent(v) for v in value)
        )

    def only_first_dependent(self, node: fx.Node) -> None:
        """Refuses ``node`` unless only its first argument depends on the input."""
        others = list(node.args[1:]) + list(node.kwargs.values())
        if any(self.dependent(a) for a in others):
            raise refuse(node, "only its first argument may depend on the input")

    def keeps_batch(self, node: fx.Node) -> bool:
        """Whether ``node`` and its first argument have the batch axis first."""
        shapes = [shape_of(node), shape_of(node.args[0])]
        return all(s is not None and len(s) >= 1 and s[0] == BATCH for s in shapes)

    def spread(self, arg: Any, node: fx.Node) -> float:
        """``sqrt(r)``, ``r`` the number of output entries broadcasting makes from each entry
        of the input-dependent ``arg`` (1 without broadcasting)."""
        if not self.dependent(arg):
            return 1.0
        a, out = shape_of(arg), shape_of(node)
        if a is None or out is None or len(a) != len(out):
            raise refuse(node, "broadcasting an input-dependent operand against more "
                                "dimensions moves its batch axis")
        return math.sqrt(math.prod(out) / max(1, math.prod(a)))

    def constant(self, node: fx.Node, value: Any) -> Tensor:
        """The recorded value of a constant argument of ``node``, float64 on the CPU."""
        try:
            return torch.as_tensor(static(value)).detach().to("cpu", torch.float64)
        except KeyError as exc:
            raise refuse(node, f"cannot evaluate the constant {exc}: a tensor built from the "
                                "input's sizes (e.g. torch.full(..., x.shape[0])) may depend "
                                "on the batch size") from exc
        except BatchDependent as exc:
            raise refuse(node, str(exc)) from exc

    def run(self) -> Tensor:
        """Walks the graph; returns the output's Lipschitz bound."""
        nodes = list(self.gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        if len(placeholders) != 1:
            raise UnsupportedOperationError(
                f"the model's forward must take exactly one tensor input, got "
                f"{[n.target for n in placeholders]}"
            )
        fold = self.find_folds(nodes)
        for node in nodes:
            if node in fold.values():
                continue  # its only user, the BatchNorm, accounts for it
            if node.op == "output":
                out = node.args[0]
                if not isinstance(out, fx.Node) or shape_of(out) is None:
                    raise UnsupportedOperationError(
                        "the model must return a single tensor (the logits)"
                    )
                self.output = out
                self.warn_low_precision()
                return self.lip[out]
            try:
                if not self.curvature:
                    self.lip[node] = self.visit(node, fold)
                else:
                    self.lip[node], self.curv[node] = self.visit_both(node, fold)
                    self.value_slack[node], self.jacobian_slack[node] = self.visit_slack(
                        node, fold)
            except BatchDependent as exc:  # a rule read a constant taken from the batch size
                raise refuse(node, str(exc)) from exc
            self.check_batch(node)
        raise RuntimeError("graph without output")  # pragma: no cover

    def warn_low_precision(self) -> None:
        """The bound is of the network in exact arithmetic (casts are the identity). A forward
        that computes in float16 / bfloat16 (a cast inside it, or half-precision weights)
        rounds with a relative error of ~1e-3 per operation, which no Lipschitz bound of the
        exact map covers: warned, not refused, as low-precision logits are elsewhere."""
        if self.low_precision is None:
            return
        node, dtype = self.low_precision
        warnings.warn(
            f"node '{node.name}' computes in {dtype}: the bound holds for the network in exact "
            f"arithmetic; the rounding of {dtype} operations (relative error ~"
            f"{torch.finfo(dtype).eps:.0e} each) is not accounted for. Compute in float32 "
            "or float64 for a bound of what the network evaluates.",
            UserWarning,
            stacklevel=4,
        )

    def find_folds(self, nodes: list[fx.Node]) -> dict[fx.Node, fx.Node]:
        """BatchNorm node -> the conv/linear node folded into it."""
        fold = {}
        for node in nodes:
            if node.op != "call_module" or len(node.args) != 1 or node.kwargs:
                continue
            prev = node.args[0]
            if not (isinstance(prev, fx.Node) and prev.op == "call_module"
                    and len(prev.users) == 1 and len(prev.args) == 1 and not prev.kwargs):
                continue
            layer = submodule(self.gm, prev)
            bn = submodule(self.gm, node)
            out = shape_of(prev)
            if out is not None and foldable(layer, bn, len(out)) and self.keeps_batch(prev):
                fold[node] = prev
        return fold

    def check_batch(self, node: fx.Node) -> None:
        """An input-dependent tensor must have the batch axis first, at every batch size."""
        shape = shape_of(node)
        if shape is None or not bool(self.lip[node] > 0):
            return
        other = self.other_batch.get(node)
        if shape[0] != BATCH or other is None or tuple(other) != (BATCH + 1, *shape[1:]):
            raise refuse(node, f"its shape {tuple(shape)} at a batch of {BATCH} becomes "
                                f"{None if other is None else tuple(other)} at a batch of "
                                f"{BATCH + 1}: it mixes the samples")

    def check_dtypes(self, node: fx.Node) -> None:
        """Refuses an integer or boolean output; notes the first one in a float type coarser
        than float32 (:meth:`warn_low_precision`)."""
        for dtype in dtypes(node.meta.get("tensor_meta")):
            if dtype.is_floating_point and self.low_precision is None and (
                torch.finfo(dtype).eps > torch.finfo(torch.float32).eps
            ):
                self.low_precision = (node, dtype)
            if not dtype.is_floating_point:
                raise refuse(node, f"its output dtype {dtype} is not floating point: a step "
                                    "function of the input has no Lipschitz constant")

    def visit(self, node: fx.Node, fold: dict[fx.Node, fx.Node]) -> Tensor:
        """``L`` of one node, after the checks that make its rule applicable."""
        if node.op == "placeholder":
            return f64(1.0)
        if node.op == "get_attr":
            return f64(0.0)
        if node.op not in ("call_module", "call_function", "call_method"):
            raise refuse(node)
        if node in fold:
            return self.visit_fold(node, fold[node])
        if node.op != "call_module" and node.target in RANDOM:
            raise refuse(node, "random: its value differs from call to call")
        if node.kwargs.get("out") is not None:
            raise refuse(node, "out= writes the result into an existing tensor")
        inplace, target = inplace_target(self.gm, node)
        if inplace:
            check_inplace(self.gm, node)
        if not self.dependent(list(node.args) + list(node.kwargs.values())):
            return f64(0.0)  # a function of constants only (e.g. x.size(0) * 2)
        try:
            if node.op == "call_module":
                lip = self.visit_module(node)
                self.check_dtypes(node)
                return lip
            self.check_dtypes(node)
            return self.visit_call(node, target)
        except KeyError as exc:  # static of an input-dependent argument
            raise refuse(node, f"argument {exc} must not depend on the input") from exc

    def visit_fold(self, bn_node: fx.Node, layer_node: fx.Node) -> Tensor:
        """``L`` of a BatchNorm node with the layer before it folded in."""
        layer = submodule(self.gm, layer_node)
        folded = folded_layer(layer, submodule(self.gm, bn_node))
        inner = layer_bound_of(folded, known_shape(layer_node.args[0]), self.layer_bound)
        return inner * self.L(layer_node.args[0])

    def module_lip(self, module: nn.Module, in_shapes: list[torch.Size],
                   out_shape: torch.Size | None) -> Tensor:
        """``K`` of one call of a leaf module (batched shapes), at this walk's layer bound."""
        return module_lip(module, in_shapes, out_shape, self.layer_bound)

    def visit_module(self, node: fx.Node) -> Tensor:
        """``L`` of a leaf module's node."""
        module = submodule(self.gm, node)
        tensor_args = [a for a in node.args if shape_of(a) is not None]
        tensor_args += [a for a in node.kwargs.values() if shape_of(a) is not None]
        k = self.module_lip(module, [known_shape(a) for a in tensor_args], shape_of(node))
        if shape_of(node) is not None and not self.keeps_batch(node):
            raise refuse(node, "changes the batch axis")
        return k * self.L(tensor_args)

    def visit_call(self, node: fx.Node, target: Any) -> Tensor:
        """``L`` of a function / method node, by its rule."""
        if metadata_only(node):
            return f64(0.0)
        rule = RULES.get(target)
        if rule is None:
            raise refuse(node)
        return rule.lipschitz(self, node, target)

    def visit_both(self, node: fx.Node, fold: dict[fx.Node, fx.Node]
                   ) -> tuple[Tensor, Tensor]:
        """``(L, C)`` of one node. A node the Lipschitz walk refuses is refused as non-smooth
        when the activation table knows it to be (``abs``: the more useful message)."""
        try:
            lip = self.visit(node, fold)
        except UnsupportedOperationError as exc:
            why = smooth.known_jump(self, node)
            if why is not None:
                raise smooth.refusal(node, why) from exc
            raise
        return lip, self.visit_curvature(node, fold)

    def visit_curvature(self, node: fx.Node, fold: dict[fx.Node, fx.Node]) -> Tensor:
        """``C`` of one node (after its Lipschitz visit, which has made the walk's checks)."""
        if node.op in ("placeholder", "get_attr"):
            return f64(0.0)  # the input x -> x has a constant Jacobian
        if node in fold:  # a linear layer with the BatchNorm folded in
            return self.in_curvature(self.visit_fold, node, fold[node])
        if not self.dependent(list(node.args) + list(node.kwargs.values())):
            return f64(0.0)
        if node.op == "call_module":
            return module_curvature(self, node)
        if node.op not in ("call_function", "call_method"):
            raise refuse(node)
        if metadata_only(node):
            return f64(0.0)
        _, target = inplace_target(self.gm, node)
        rule = RULES.get(target)
        if rule is None or rule.curvature is None:
            raise smooth.refusal(node, smooth.why_refused(target))
        return rule.curvature(self, node, target)

    def visit_slack(self, node: fx.Node, fold: dict[fx.Node, fx.Node]
                    ) -> tuple[Tensor, Tensor]:
        """``(E, D)`` of one node against its smooth twin (after :meth:`visit_both`, which has
        made the walk's checks and refused what has no curvature rule): see
        :mod:`.rules.smooth`."""
        zero = (f64(0.0), f64(0.0))
        if node.op in ("placeholder", "get_attr"):
            return zero  # the same input and constants in both networks
        inputs = fold[node] if node in fold else node
        args = list(inputs.args) + list(inputs.kwargs.values())
        if not self.dependent(args) or not (self.has_slack(args) or smooth.switches(self, node)):
            return zero  # the node and its inputs are the same in both networks
        slack = self._slack(node, fold, zero)
        if not self.tracks_slack and (bool(slack[0] > 0) or bool(slack[1] > 0)):
            raise smooth.refusal(node, "this walk carries no slack for the switch of a softplus "
                                       "to the identity; Replace it by "
                                       "lightning_spectral.SmoothSoftplus")
        return slack

    def _slack(self, node: fx.Node, fold: dict[fx.Node, fx.Node],
               zero: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        if node in fold:
            return self.in_slack(self.visit_fold, node, fold[node])
        if node.op == "call_module":
            return module_slack(self, node)
        if metadata_only(node):
            return zero
        _, target = inplace_target(self.gm, node)
        rule = RULES.get(target)
        if rule is None or rule.slack is None:  # pragma: no cover (refused by its curvature rule)
            raise smooth.refusal(node, "no slack rule for it")
        return rule.slack(self, node, target)


def _bound(table: dict[fx.Node, Tensor], value: Any) -> Tensor:
    """The bound of a node in ``table``; of several (nested) arguments, taken together as one
    stacked vector: ``sqrt(sum b_i^2)``, since the squared norms of the parts add."""
    if isinstance(value, fx.Node):
        return table[value]
    if isinstance(value, (tuple, list)):
        parts = [_bound(table, v) for v in value]
        return torch.stack(parts).square().sum().sqrt() if parts else f64(0.0)
    if isinstance(value, dict):
        return _bound(table, list(value.values()))
    return f64(0.0)
