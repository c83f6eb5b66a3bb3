"""Record the curvature walk once, replay it cheaply: ``C`` as a function of per-layer norms.

:func:`record_curvature` runs the graph walk of :func:`network_curvature_bound` once, with
the bound of every *selected* layer replaced by a placeholder that remembers every arithmetic
operation applied to it (a tensor subclass with ``__torch_function__``). Everything else the
walk computes (activation constants, pooling and BatchNorm norms, the bounds of layers that
are not selected) is recorded as a number. The result, a :class:`CurvatureTape`, is the
straight-line program ``C(n_1, ..., n_k)`` of the walk: :meth:`CurvatureTape.replay` evaluates
it on a tensor of per-layer norms in a few dozen tensor operations, differentiably, on the
device of the norms.

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
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, fx, nn

from .api import _check_input_shape, _not_nan
from .common import LayerBound, UnsupportedOperationError, _f64
from .curvature import _curvature_walk
from .modules import _folded_layer, _layer_bound_of
from .replay import (
    _ARITHMETIC,
    _IDENTITIES,
    _SQRTS,
    CurvatureTape,
    _map,
    _Ref,
    tape_from_state,
    tape_state,
)
from .tracing import _shape
from .walk import _Walker

__all__ = ["CurvatureTape", "record_curvature", "tape_from_state", "tape_state"]

_T = Tensor
# Stands in for a selected layer's bound of 0 at recording: positive, so the walk keeps what
# follows as input-dependent, and far from underflow when squared (``h L^2`` of activations).
_ZERO_SEED = 2.0**-100
# Reading a placeholder as a number would turn it into a constant without a trace.
_ESCAPES = frozenset({_T.__float__, _T.__int__, _T.__index__, _T.item, _T.tolist, _T.numpy})


@dataclass
class _Recorder:
    """The tape being written: entries ``(func, args, kwargs)`` or ``("leaf", layer)``."""

    entries: list[tuple[Any, ...]] = field(default_factory=list)

    def add(self, entry: tuple[Any, ...], value: Tensor) -> _Traced:
        self.entries.append(entry)
        return _Traced.wrap(value, self, len(self.entries) - 1)


class _Traced(Tensor):
    """A float64 scalar whose every operation is appended to its recorder's tape."""

    _recorder: _Recorder
    _index: int

    @staticmethod
    def wrap(value: Tensor, recorder: _Recorder, index: int) -> _Traced:
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


def _recorder_of(value: Any) -> _Recorder:
    found: list[_Recorder] = []
    _map(value, lambda v: found.append(v._recorder) if isinstance(v, _Traced) else None)
    return found[0]



class _RecordingWalker(_Walker):
    """The curvature walk, with a folded BatchNorm read as ``n * b_folded / b`` (see module)."""

    tracks_slack = False  # the tape replays C alone, which a softplus switch voids

    def visit_fold(self, bn_node: fx.Node, layer_node: fx.Node) -> Tensor:
        layer = self.gm.get_submodule(layer_node.target)
        size = _shape(layer_node.args[0])
        folded = _folded_layer(layer, self.gm.get_submodule(bn_node.target))
        inner = _layer_bound_of(folded, size, self.layer_bound)  # a fresh module: a constant
        own = _layer_bound_of(layer, size, self.layer_bound)
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
        if layer_bound is None:
            from ..functional.bounds import layer_spectral_bound as layer_bound
        self.layer_bound = layer_bound
        self.position = {id(m): k for k, m in enumerate(layers)}
        self.recorder = _Recorder()
        self.bounds = torch.zeros(len(layers), dtype=torch.float64)
        self.sizes: list[tuple[int, ...] | None] = [None] * len(layers)

    def __call__(self, module: nn.Module, size: tuple[int, ...] | None) -> Tensor:
        value = _f64(self.layer_bound(module, size))
        k = self.position.get(id(module))
        if k is None:
            return value
        self.bounds[k] = value
        self.sizes[k] = None if size is None else tuple(int(s) for s in size)
        # A bound of 0 would make the walk treat what follows as constant: see module doc.
        seed = value if bool(value > 0) else _f64(_ZERO_SEED)
        return self.recorder.add(("leaf", k), seed)

    def tape(self, result: Tensor) -> CurvatureTape:
        """The program computing ``result`` (a recorded value, or a constant) from the leaves."""
        output = _Ref(result._index) if isinstance(result, _Traced) else _f64(result)
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
    shape = _check_input_shape(input_shape)
    walker = _curvature_walk(model, shape, leaves, walker_class=_RecordingWalker)
    return leaves.tape(_not_nan(walker.curv[walker.output], "curvature"))
