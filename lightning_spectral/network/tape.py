"""Record a graph walk once, replay it cheaply: a bound as a function of per-layer norms.

Recording. :func:`record_curvature` runs the graph walk of :func:`network_curvature_bound`
once, with the bound of every *selected* layer replaced by a placeholder that remembers every
arithmetic operation applied to it (a tensor subclass with ``__torch_function__``). Everything
else the walk computes (activation constants, pooling and BatchNorm norms, the bounds of
layers that are not selected) is recorded as a number. The result, a :class:`CurvatureTape`,
is the straight-line program ``C(n_1, ..., n_k)`` of the walk: :meth:`CurvatureTape.replay`
evaluates it on a tensor of per-layer norms in a few dozen tensor operations, differentiably,
on the device of the norms.

Replaying the guaranteed per-layer bounds the walk used gives back
:func:`network_curvature_bound` exactly (the same float64 operations in the same order).
Replaying anything else (power-iteration estimates, say) is *not* a certificate: the numbers
recorded as constants are those of the weights at recording time, and estimates approach the
norms from below.

A convolution or linear layer with an eval BatchNorm folded into it enters as
``n * (b_folded / b)``, ``b`` and ``b_folded`` its guaranteed bounds without and with the
BatchNorm at recording time: exact when ``n = b``. A placeholder whose value is read as a
Python number (``float``, ``item``) or that meets an operation the tape does not know raises
:class:`UnsupportedOperationError`, so the tape never silently freezes a layer. Control flow
of the walk that compares bounds with 0 (whether a node depends on the input) is decided once,
at recording; a selected layer whose bound is 0 then is recorded at ``2^-100``, so that it stays a
dependency.

Replay. A tape is a list of entries, each ``("leaf", k)`` (the norm of the ``k``-th selected
layer) or ``(func, args, kwargs)`` (a recorded tensor operation whose arguments refer to
earlier entries through ``_Ref``). :meth:`CurvatureTape.replay` evaluates them in order;
square roots are replayed with gradient 0 at 0; moves and copies are replayed as the identity.
:func:`tape_state` and :func:`tape_from_state` convert a tape to plain data and back.

Lipschitz programs. :func:`record_lipschitz` runs the graph walk of
:func:`network_lipschitz_bound` once with the recording placeholders above in place of the
bounds of the selected layers. The result holds two programs over the same norms: the
network's bound ``L(n)`` and, when the output is a linear head ``z = W g + b``, the bound
``L_g(n)`` of the features ``g`` feeding it. :meth:`LipschitzProgram.pairwise` then gives
``K_yj = min(sqrt(2) L, ||W_y - W_j|| L_g)`` with the head's *live* weight, differentiable
in the norms and in ``W``.

Replaying the guaranteed bounds recorded (``program.network.bounds``) gives back
:func:`network_lipschitz_bound` exactly (the same float64 operations in the same order); on
power-iteration estimates the values are estimates, not certificates (see above).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, fx, nn

from .api import check_input_shape, not_nan, walk_model
from .common import LayerBound, UnsupportedOperationError, f64, resolve_layer_bound
from .curvature import curvature_walk
from .ownership import builtin_class, curvature_rule, user_rule
from .rules.layers import folded_layer, layer_bound_of
from .tracing import known_shape, shape_of, submodule
from .walk import Walker

__all__ = [
    "CurvatureTape", "LeafBounds", "LipschitzProgram", "Recorder", "RecordingWalker",
    "record_curvature", "record_lipschitz", "tape_from_state", "tape_state",
]

# The tape and its replay.

_T = Tensor
# Operations replayed as they are (operator forms included: ``a * b`` calls ``Tensor.__mul__``).
_ARITHMETIC = frozenset({
    _T.__mul__, _T.__rmul__, _T.__add__, _T.__radd__, _T.__sub__, _T.__rsub__, _T.__truediv__,
    _T.__rtruediv__, _T.__neg__, _T.__pow__, _T.mul, _T.add, _T.sub, _T.div, _T.square,
    _T.sum, _T.max, _T.abs, _T.reshape, _T.pow, torch.mul, torch.add, torch.sub, torch.div,
    torch.square, torch.sum, torch.stack, torch.maximum, torch.minimum, torch.abs,
    torch.reshape,
})
_SQRTS = frozenset({_T.sqrt, torch.sqrt})
# Moves and copies (the walk keeps every bound a float64 CPU scalar): the identity on replay.
_IDENTITIES = frozenset({_T.detach, _T.cpu, _T.to, _T.double, _T.clone, _T.contiguous,
                         torch.as_tensor})
_REF_TAG = "__tape_ref__"


def _op_name(func: Any) -> str:
    owner = "Tensor" if getattr(Tensor, func.__name__, None) is func else "torch"
    return f"{owner}.{func.__name__}"


@dataclass(frozen=True)
class _Ref:
    """An earlier entry of the tape (an argument of a recorded operation)."""

    index: int


def _map(value: Any, fn: Callable[[Any], Any]) -> Any:
    if isinstance(value, (list, tuple)):
        return type(value)(_map(v, fn) for v in value)
    if isinstance(value, dict):
        return {k: _map(v, fn) for k, v in value.items()}
    return fn(value)


def _safe_sqrt(x: Tensor) -> Tensor:
    """``sqrt(x)``, with gradient 0 at ``x = 0`` (where the root-sum-square of bounds that
    are all 0 has none) instead of NaN; the same value everywhere."""
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(),
                       torch.zeros_like(x))


class CurvatureTape:
    """The curvature bound of a network as a function of the norms of its selected layers.

    ``replay(norms)`` evaluates the recorded walk with ``norms[k]`` in place of the bound of
    the ``k``-th selected layer. ``bounds`` holds the guaranteed bounds recorded (the walk's
    ``layer_bound`` of each selected layer at the traced input size; 0 for a layer the walk
    never met), so ``replay(bounds)`` equals :func:`network_curvature_bound` at recording.
    """

    def __init__(self, entries: list[tuple[Any, ...]], output: Any, bounds: Tensor) -> None:
        self.entries = entries
        self.output = output  # a _Ref, or the constant result when no selected layer matters
        self.bounds = bounds
        self._moved: dict[torch.device, list[tuple[Any, ...]]] = {}

    @property
    def missing(self) -> list[int]:
        """Positions of the layers the program does not depend on: not called by the traced
        forward, or bounded by a registered rule (a constant of the program)."""
        used = {e[1] for e in self.entries if e[0] == "leaf"}
        return [k for k in range(self.n_layers) if k not in used]

    @property
    def n_layers(self) -> int:
        return int(self.bounds.numel())

    def __len__(self) -> int:
        return len(self.entries)

    def replay(self, norms: Tensor) -> Tensor:
        """``C(norms)``: a 0-dim float64 tensor on ``norms``' device, differentiable w.r.t.
        ``norms`` (one entry per selected layer, in the order given to the recorder)."""
        if norms.shape != (self.n_layers,):
            raise ValueError(f"the tape needs {self.n_layers} per-layer norms (one per "
                             f"selected layer), got a tensor of shape {tuple(norms.shape)}")
        norms = norms.to(torch.float64)
        values: list[Tensor] = []
        for entry in self._entries_on(norms.device):
            values.append(norms[entry[1]] if entry[0] == "leaf" else _apply(entry, values))
        if isinstance(self.output, _Ref):
            return values[self.output.index]
        return self.output.to(norms.device)

    def _entries_on(self, device: torch.device) -> list[tuple[Any, ...]]:
        # Constants are moved once per device, not every step.
        if device not in self._moved:
            def move(v: Any) -> Any:
                return v.to(device) if isinstance(v, Tensor) else v
            self._moved[device] = [e if e[0] == "leaf" else (e[0], _map(e[1], move),
                                                             _map(e[2], move))
                                   for e in self.entries]
        return self._moved[device]


def _apply(entry: tuple[Any, ...], values: list[Tensor]) -> Tensor:
    func, args, kwargs = entry
    args = _map(args, lambda v: values[v.index] if isinstance(v, _Ref) else v)
    kwargs = _map(kwargs, lambda v: values[v.index] if isinstance(v, _Ref) else v)
    if func in _IDENTITIES:
        return args[0] if args else kwargs["data"]
    if func in _SQRTS:
        return _safe_sqrt(args[0])
    return func(*args, **kwargs)


def _encode(value: Any) -> Any:
    return _map(value, lambda v: (_REF_TAG, v.index) if isinstance(v, _Ref) else v)


def _decode(value: Any) -> Any:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == _REF_TAG:
        return _Ref(int(value[1]))
    if isinstance(value, (list, tuple)):
        return type(value)(_decode(v) for v in value)
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    return value


def tape_state(tape: CurvatureTape) -> dict[str, Any]:
    """The tape as plain data (operation names, numbers, tensors) for a checkpoint."""
    entries = [list(e) if e[0] == "leaf" else [_op_name(e[0]), _encode(e[1]), _encode(e[2])]
               for e in tape.entries]
    return {"version": 1, "entries": entries, "output": _encode(tape.output),
            "bounds": tape.bounds.clone()}


def tape_from_state(state: dict[str, Any]) -> CurvatureTape:
    """The inverse of :func:`tape_state`; an unknown operation name raises ``ValueError``."""
    ops = {_op_name(f): f for f in _ARITHMETIC | _SQRTS | _IDENTITIES}
    entries: list[tuple[Any, ...]] = []
    for e in state["entries"]:
        if e[0] == "leaf":
            entries.append(("leaf", int(e[1])))
        elif e[0] in ops:
            entries.append((ops[e[0]], _decode(e[1]), _decode(e[2])))
        else:
            raise ValueError(f"unknown operation {e[0]!r} in a saved curvature tape")
    return CurvatureTape(entries, _decode(state["output"]), state["bounds"])


# Recording.

# Stands in for a selected layer's bound of 0 at recording: positive, so the walk keeps what
# follows as input-dependent, and far from underflow when squared (``h L^2`` of activations).
_ZERO_SEED = 2.0**-100
# Reading a placeholder as a number would turn it into a constant without a trace.
_ESCAPES = frozenset({_T.__float__, _T.__int__, _T.__index__, _T.item, _T.tolist, _T.numpy})


@dataclass
class Recorder:
    """The tape being written: entries ``(func, args, kwargs)`` or ``("leaf", layer)``."""

    entries: list[tuple[Any, ...]] = field(default_factory=list)

    def add(self, entry: tuple[Any, ...], value: Tensor) -> _Traced:
        self.entries.append(entry)
        return _Traced.wrap(value, self, len(self.entries) - 1)


class _Traced(Tensor):
    """A float64 scalar whose every operation is appended to its recorder's tape."""

    _recorder: Recorder
    _index: int

    @staticmethod
    def wrap(value: Tensor, recorder: Recorder, index: int) -> _Traced:
        with torch._C.DisableTorchFunctionSubclass():
            out = value.detach().as_subclass(_Traced)
        out._recorder, out._index = recorder, index
        return out

    @classmethod
    def __torch_function__(cls, func: Any, types: Any, args: Any = (),
                           kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func in _ESCAPES:
            raise UnsupportedOperationError(
                f"the curvature tape cannot record {func.__name__} of a layer bound: a number "
                "read off a placeholder would freeze that layer")
        with torch._C.DisableTorchFunctionSubclass():
            result = func(*_plain(args), **_plain(kwargs))
        if not (isinstance(result, Tensor) and result.is_floating_point()):
            if isinstance(result, (tuple, list)) and any(
                    isinstance(r, Tensor) and r.is_floating_point() for r in result):
                raise _cannot(func)  # e.g. max(dim=...): values that would escape the tape
            return result  # a query (comparison, shape, dtype): decided now, not recorded
        recorder = _recorder_of((args, kwargs))
        if func not in _ARITHMETIC | _SQRTS | _IDENTITIES:
            raise _cannot(func)
        if func in _IDENTITIES:
            if result.dtype != torch.float64:
                raise _cannot(func)  # a cast is not replayed: the value would differ
            source = args[0] if args else kwargs.get("data")
            if not isinstance(source, _Traced):
                raise _cannot(func)
            return _Traced.wrap(result, recorder, source._index)  # no entry: nothing to do
        return recorder.add((func, _refs(args), _refs(kwargs)), result)


def _cannot(func: Any) -> UnsupportedOperationError:
    return UnsupportedOperationError(
        f"the curvature tape cannot record {getattr(func, '__name__', func)!r} applied to a "
        "layer bound")


def _plain(value: Any) -> Any:
    return _map(value, lambda v: v.as_subclass(Tensor) if isinstance(v, _Traced) else v)


def _refs(value: Any) -> Any:
    """Placeholders become references; other tensors are copied as constants."""
    def ref(v: Any) -> Any:
        if isinstance(v, _Traced):
            return _Ref(v._index)
        return v.detach().clone() if isinstance(v, Tensor) else v
    return _map(value, ref)


def _recorder_of(value: Any) -> Recorder:
    found: list[Recorder] = []
    _map(value, lambda v: found.append(v._recorder) if isinstance(v, _Traced) else None)
    return found[0]



class RecordingWalker(Walker):
    """The curvature walk, with a folded BatchNorm read as ``n * b_folded / b`` (see module)."""

    tracks_slack = False  # the tape replays C alone, which a softplus switch voids

    def visit_fold(self, bn_node: fx.Node, layer_node: fx.Node) -> Tensor:
        layer = submodule(self.gm, layer_node)
        size = known_shape(layer_node.args[0])
        folded = folded_layer(layer, submodule(self.gm, bn_node))
        inner = layer_bound_of(folded, size, self.layer_bound)  # a fresh module: a constant
        own = layer_bound_of(layer, size, self.layer_bound)
        if isinstance(own, _Traced):
            # own / b is exactly 1 when own = b: replaying the recorded bounds is exact.
            inner = own / own.as_subclass(Tensor).clone() * inner
        return inner * self.L(layer_node.args[0])


class LeafBounds:
    """The ``layer_bound`` a recording walk calls: the bound of a selected layer becomes a
    placeholder (leaf ``k``), every other bound a number; remembers the guaranteed bounds and
    the spatial input sizes of the selected layers."""

    def __init__(self, layers: Sequence[nn.Module] | Mapping[str, nn.Module],
                 layer_bound: LayerBound | None) -> None:
        if isinstance(layers, Mapping):
            layers = list(layers.values())
        self.layer_bound = resolve_layer_bound(layer_bound)
        self.position = {id(m): k for k, m in enumerate(layers)}
        self.recorder = Recorder()
        self.bounds = torch.zeros(len(layers), dtype=torch.float64)
        self.sizes: list[tuple[int, ...] | None] = [None] * len(layers)

    def __call__(self, module: nn.Module, size: tuple[int, ...] | None) -> Tensor:
        value = f64(self.layer_bound(module, size))
        k = self.position.get(id(module))
        if k is None:
            return value
        self.bounds[k] = value
        self.sizes[k] = None if size is None else tuple(int(s) for s in size)
        # A bound of 0 would make the walk treat what follows as constant: see module doc.
        seed = value if bool(value > 0) else f64(_ZERO_SEED)
        return self.recorder.add(("leaf", k), seed)

    def tape(self, result: Tensor) -> CurvatureTape:
        """The program computing ``result`` (a recorded value, or a constant) from the leaves."""
        output = _Ref(result._index) if isinstance(result, _Traced) else f64(result)
        return CurvatureTape(self.recorder.entries, output, self.bounds)


def record_curvature(
    model: nn.Module,
    input_shape: Sequence[int],
    layers: Sequence[nn.Module] | Mapping[str, nn.Module],
    *,
    layer_bound: LayerBound | None = None,
) -> CurvatureTape:
    """Record :func:`network_curvature_bound` as a function of the norms of ``layers``.

    Args:
        model: as for :func:`network_curvature_bound` (the same checks, the same refusals:
            a ReLU raises :class:`NonSmoothOperationError` naming the node).
        input_shape: the shape of one sample, without the batch axis.
        layers: the layers (modules of ``model``) whose bounds become the tape's inputs, in
            the order of the norms given to :meth:`CurvatureTape.replay`; a mapping's values
            are used. Every other layer enters as the constant bound it has now.
        layer_bound: as for :func:`network_curvature_bound`.
    """
    leaves = LeafBounds(layers, layer_bound)
    shape = check_input_shape(input_shape)
    walker = curvature_walk(model, shape, leaves, walker_class=RecordingWalker)
    return leaves.tape(not_nan(walker.curv[walker.out], "curvature"))


# Lipschitz programs.

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


def _head_module(walker: Walker) -> nn.Linear | None:
    out = walker.output
    if out is None or out.op != "call_module" or len(out.args) != 1:
        return None
    module = submodule(walker.gm, out)
    plain = user_rule(module) is None and curvature_rule(module) is None
    return cast(nn.Linear, module) if plain and builtin_class(module) is nn.Linear else None


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
    walker = walk_model(model, input_shape, leaves, walker_class=RecordingWalker)
    out_shape = shape_of(walker.output)
    if out_shape is None or len(out_shape) != 2 or out_shape[1] < 2:
        raise ValueError(f"certified training needs logits of shape (N, C) with C >= 2, the "
                         f"model outputs {None if out_shape is None else tuple(out_shape)}")
    head = _head_module(walker)
    network = leaves.tape(not_nan(walker.lip[walker.out]))
    features = None
    if head is not None:
        features = leaves.tape(not_nan(walker.lip[cast(fx.Node, walker.out.args[0])]))
    return LipschitzProgram(network, features, head, int(out_shape[1]), leaves.sizes)
