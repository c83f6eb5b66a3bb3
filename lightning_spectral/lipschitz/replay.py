"""Replay a recorded curvature program: :class:`CurvatureTape` and its checkpoint form.

A tape is a list of entries, each ``("leaf", k)`` (the norm of the ``k``-th selected layer) or
``(func, args, kwargs)`` (a recorded tensor operation whose arguments refer to earlier entries
through :class:`_Ref`). :meth:`CurvatureTape.replay` evaluates them in order; square roots are
replayed with gradient 0 at 0; moves and copies are replayed as the identity.
:func:`tape_state` and :func:`tape_from_state` convert a tape to plain data and back. The
recording side is :mod:`.tape`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = ["CurvatureTape", "tape_from_state", "tape_state"]

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
