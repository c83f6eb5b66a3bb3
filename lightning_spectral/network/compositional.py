"""``compositional_lipschitz_bound``: the graph walk's bound, or below it the certified
ECLipsE-Fast bound (:func:`~lightning_spectral.functional.compositional.chain_lipschitz_bound`)
when the model is a plain chain.

A chain is an ``nn.Sequential`` (nested ones flattened) of ``nn.Linear``, ``nn.Conv2d``
(``groups=1``, zero padding; unrolled into its exact float64 matrix), ``nn.Flatten``, dropout
(the identity in eval mode), ``nn.Identity`` and activations with slope bounds
(:func:`~lightning_spectral.functional.activations.activation_slope`). Every module must
compute what its class computes (a subclass overriding ``forward`` is not its parent, see
``behaves_as``) and carry no hooks; anything else makes the model "not a chain" and only the
graph walk's bound is returned.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TypeGuard, TypeVar, cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..functional.activations import activation_slope
from ..functional.compositional import chain_lipschitz_bound, fast_start_applies
from ..functional.modules import behaves_as
from .api import check_input_shape, network_lipschitz_bound, walking
from .common import LayerBound
from .tracing import has_hooks, trace, uncompiled

__all__ = [
    "MAX_ENTRIES", "MAX_ROWS", "chain_bound_of_forward", "check_rows",
    "compositional_lipschitz_bound", "conv2d_matrix", "sequential_chain_bound",
]

#: Largest unrolled matrix (entries) the chain bound forms; a larger layer: not a chain.
MAX_ENTRIES = 16_000_000

_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)
_Item = tuple[str, "Tensor | tuple[float, float]"]
_M = TypeVar("_M", bound=nn.Module)


def _is(module: nn.Module, klass: type[_M]) -> TypeGuard[_M]:
    """``module`` is a ``klass`` and computes what ``klass`` computes."""
    return isinstance(module, klass) and behaves_as(module, klass)


def _flat_children(model: nn.Module) -> list[nn.Module] | None:
    """The leaves of a (nested) plain ``nn.Sequential``, or None if it is not one."""
    if not _is(model, nn.Sequential) or has_hooks(model):
        return None
    leaves: list[nn.Module] = []
    for child in model:
        inner = _flat_children(child) if isinstance(child, nn.Sequential) else [child]
        if inner is None:
            return None
        leaves += inner
    return leaves


def conv2d_matrix(conv: nn.Conv2d, shape: Sequence[int]) -> Tensor | None:
    """The exact float64 matrix ``(c_out H' W', c_in H W)`` of a zero-padded ``nn.Conv2d``
    (``groups=1``) without its bias, on per-sample inputs of ``shape = (c_in, H, W)``; None
    for other convolutions. Built by gathering weights (``F.unfold`` of an image of input
    indices tells which input each tap of each output reads), so every entry is a weight
    entry or 0, with no arithmetic on it."""
    if conv.groups != 1 or conv.padding_mode != "zeros" or isinstance(conv.padding, str):
        return None
    c, h, w = shape
    index = torch.arange(1, c * h * w + 1, dtype=torch.float64).reshape(1, c, h, w)
    cols = F.unfold(index, conv.kernel_size, conv.dilation, conv.padding, conv.stride)[0]
    cols = cols.round().long() - 1  # (c k_h k_w, positions); -1: a padding zero
    positions = cols.shape[1]
    weight = conv.weight.detach().to("cpu", torch.float64).reshape(conv.out_channels, -1)
    matrix = torch.zeros(conv.out_channels, positions, c * h * w, dtype=torch.float64)
    tap, pos = torch.nonzero(cols >= 0, as_tuple=True)
    matrix[:, pos, cols[tap, pos]] = weight[:, tap]  # distinct (pos, input) pairs per tap
    return matrix.reshape(-1, c * h * w)


def _linear_item(module: nn.Module, shape: tuple[int, ...]) -> Tensor | None:
    """The matrix of a Linear / Conv2d on per-sample ``shape``; None for another module, a
    shape it does not take, or more than ``MAX_ENTRIES`` entries."""
    if _is(module, nn.Linear):
        if len(shape) != 1 or shape[0] != module.in_features:
            return None
        return module.weight.detach().to("cpu", torch.float64)
    if not (_is(module, nn.Conv2d) and len(shape) == 3 and shape[0] == module.in_channels):
        return None
    out = _conv_out(module, shape)
    if min(out) < 1 or math.prod(out) * math.prod(shape) > MAX_ENTRIES:
        return None
    return conv2d_matrix(module, shape)


def _conv_out(conv: nn.Conv2d, shape: tuple[int, ...]) -> tuple[int, ...]:
    sizes = [
        (n + 2 * p - d * (k - 1) - 1) // st + 1
        for n, p, d, k, st in zip(shape[1:], cast("tuple[int, ...]", conv.padding),
                                   conv.dilation, conv.kernel_size, conv.stride, strict=True)
    ]
    return (conv.out_channels, *sizes)


def _flatten_out(flatten: nn.Flatten, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """Per-sample shape after ``flatten`` (row-major order is kept, so the flattened vector
    is unchanged); None if it merges the batch axis."""
    y = torch.empty(2, *shape, device="meta").flatten(flatten.start_dim, flatten.end_dim)
    return tuple(y.shape[1:]) if y.shape[0] == 2 else None


def _item(module: nn.Module, shape: tuple[int, ...]) -> tuple[_Item | None, tuple[int, ...]
                                                              ] | None:
    """``(item or None for a no-op, output shape)``, or None if ``module`` breaks the chain."""
    if has_hooks(module):
        return None
    if _is(module, nn.Identity) or any(_is(module, d) for d in _DROPOUTS):
        return None, shape
    if _is(module, nn.Flatten):
        out = _flatten_out(module, shape)
        return None if out is None else (None, out)
    slope = activation_slope(module)
    if slope is not None:
        return ("act", slope), shape
    matrix = _linear_item(module, shape)
    if matrix is None:
        return None
    # A matrix for a 3-d shape: the module is a Conv2d (_linear_item).
    out = (matrix.shape[0],) if len(shape) == 1 else _conv_out(cast(nn.Conv2d, module), shape)
    return ("lin", matrix), out


def _items(model: nn.Module, shape: tuple[int, ...]) -> list[_Item] | None:
    leaves = _flat_children(model)
    if leaves is None:
        return None
    items: list[_Item] = []
    for leaf in leaves:
        got = _item(leaf, shape)
        if got is None:
            return None
        item, shape = got
        if item is not None:
            items.append(item)
    return items


def _product(a: Tensor, a_err: float, b: Tensor) -> tuple[Tensor, float]:
    """``fl(b a)`` and ``e`` with ``||b a_true - fl(b a)||_2 <= e`` when ``||a_true - a||_2 <=
    a_err``: ``||b||_2 a_err + gamma_k || |b| |a| ||_F`` (Higham, Thm 3.5 / Lemma 3.5), with
    ``|| |b| |a| ||_F <= ||b||_F ||a||_F``, all norms taken as Frobenius (larger)."""
    k = a.shape[0]
    gamma = k * 2.0**-53 / (1 - k * 2.0**-53)
    nb, na = float(torch.linalg.matrix_norm(b)), float(torch.linalg.matrix_norm(a))
    return b @ a, (nb * a_err + gamma * nb * na) * 1.01


def _alternate(items: list[_Item], dim: int
               ) -> tuple[list[Tensor], list[tuple[float, float]], list[float]]:
    """``W_1, s_1, ..., W_l`` and error bounds: two linear maps in a row multiplied (the
    rounding carried as an error bound), consecutive activations composed (slopes
    ``[a_1 a_2, b_1 b_2]``, all ``a >= 0``: the difference quotient of a composition is the
    product of the two quotients), an identity matrix before a leading / after a trailing
    activation."""
    weights: list[Tensor] = []
    errors: list[float] = []
    slopes: list[tuple[float, float]] = []
    last = "start"
    for kind, value in items:
        if kind == "lin":
            assert isinstance(value, Tensor)
            if last == "lin":
                value, err = _product(weights.pop(), errors.pop(), value)
            else:
                err = 0.0
            weights.append(value)
            errors.append(err)
            dim = value.shape[0]
        else:
            assert isinstance(value, tuple)
            if last == "act":
                a, b = slopes.pop()
                value = _compose_up((a * value[0], b * value[1]))
            elif last == "start":
                weights.append(torch.eye(dim, dtype=torch.float64))
                errors.append(0.0)
            slopes.append(value)
        last = kind
    if last == "act":
        weights.append(torch.eye(dim, dtype=torch.float64))
        errors.append(0.0)
    return weights, slopes, errors


def _compose_up(slope: tuple[float, float]) -> tuple[float, float]:
    """A product of slopes rounded outwards (the interval must contain the exact one)."""
    lo, hi = slope
    return math.nextafter(lo, -math.inf) if lo > 0 else 0.0, math.nextafter(hi, math.inf)


def check_rows(weights: Sequence[Tensor], slopes: Sequence[tuple[float, float]],
               errors: Sequence[float]) -> int:
    """Rows of the largest matrix the chain bound factors: ``d_{i-1} + d_i`` per step, ``d_0 +
    d_2`` for an expanding start taken in one check. The cost is about ``(FRACTIONS + 1)``
    times a few Cholesky factorizations of that size, so this predicts it."""
    dims = [weights[0].shape[1], *(w.shape[0] for w in weights)]
    pairs = list(zip(dims[:-1], dims[1:], strict=True))
    if fast_start_applies(list(weights), slopes, list(errors)):
        pairs = [(dims[0], dims[2]), *pairs[2:]]
    return max(a + b for a, b in pairs)


def sequential_chain_bound(model: nn.Module, input_shape: Sequence[int],
                           max_rows: int | None = None, fast_start: bool = True
                           ) -> Tensor | None:
    """The certified compositional bound of ``model`` in eval mode if it is a chain (see the
    module docstring), else None. Also None when a layer's unrolled matrix exceeds
    ``MAX_ENTRIES``, :func:`check_rows` exceeds ``max_rows`` (a cost cap) or a certification
    check fails. ``fast_start``: as in
    :func:`~lightning_spectral.functional.compositional.chain_lipschitz_bound`."""
    shape = check_input_shape(input_shape)
    model = uncompiled(model)
    with walking(model):
        items = _items(model, shape)
    if not items or not any(kind == "lin" for kind, _ in items):
        return None
    weights, slopes, errors = _alternate(items, math.prod(shape))
    if max_rows is not None and check_rows(weights, slopes, errors) > max_rows:
        return None
    return chain_lipschitz_bound(weights, slopes, errors=errors, fast_start=fast_start)


#: The cost cap of :func:`chain_bound_of_forward` (see :func:`check_rows`): a check of 2500
#: rows is a few seconds on one CPU thread for all fractions together.
MAX_ROWS = 2500


def _as_chain(model: nn.Module) -> nn.Module | None:
    """``model`` if it is an ``nn.Sequential``; else the chain its traced forward is, when
    that is a straight line of module calls each taking only the previous one's output
    (``return self.model(x)`` traces into ``self.model``'s layers); else None. The trace is
    fx's, as for the graph walk, which also checks that it reproduces the model (the tracker
    runs the walk first)."""
    model = uncompiled(model)
    if isinstance(model, nn.Sequential):
        return model
    if has_hooks(model):
        return None
    try:
        with walking(model):  # the bound is for the eval-mode forward
            graph = trace(model)
    except Exception:  # fx raises TraceError, TypeError, NotImplementedError...
        return None
    layers: list[nn.Module] = []
    previous = None
    for node in graph.graph.nodes:
        if node.op == "placeholder" and previous is None:
            previous = node
        elif node.op == "call_module" and node.args == (previous,) and not node.kwargs:
            layers.append(graph.get_submodule(node.target))
            previous = node
        elif node.op == "output" and node.args == (previous,) and layers:
            return nn.Sequential(*layers)  # holds the same modules, it does not copy them
        else:
            return None
    return None


def chain_bound_of_forward(model: nn.Module, input_shape: Sequence[int],
                           max_rows: int | None = MAX_ROWS) -> Tensor | None:
    """:func:`sequential_chain_bound` of ``model``'s forward when it is a chain (``model``
    itself, or the straight line of layers a LightningModule's ``forward`` calls) and
    :func:`check_rows` is at most ``max_rows``; else None."""
    chain = _as_chain(model)
    return None if chain is None else sequential_chain_bound(chain, input_shape, max_rows)


def compositional_lipschitz_bound(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    layer_bound: LayerBound | None = None,
) -> Tensor:
    """A guaranteed l2 Lipschitz bound of ``model`` in eval mode, never above
    :func:`~lightning_spectral.network_lipschitz_bound` and usually well below it on chains.

    ``min(network_lipschitz_bound(model, input_shape), sequential_chain_bound(model,
    input_shape))``: the second is the certified ECLipsE-Fast bound (Xu & Sivaranjani,
    NeurIPS 2024), which uses the activations' slope bounds instead of multiplying layer
    norms; it applies to plain ``nn.Sequential`` chains (see the module docstring) and is
    skipped for anything else. Both are guaranteed bounds, so their minimum is one.

    Args:
        model: as for :func:`~lightning_spectral.network_lipschitz_bound`.
        input_shape: the per-sample input shape, without the batch axis.
        layer_bound: passed on to :func:`~lightning_spectral.network_lipschitz_bound`.

    Returns:
        0-dim float64 tensor (CPU, no grad).
    """
    today = network_lipschitz_bound(model, input_shape, layer_bound=layer_bound)
    chain = sequential_chain_bound(model, input_shape)
    return today if chain is None else torch.minimum(today, chain)
