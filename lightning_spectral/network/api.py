"""``network_lipschitz_bound``: trace, propagate shapes at two batch sizes, walk the graph,
check that the trace reproduces the model; the child-by-child fallback for an untraceable
``nn.Sequential``."""

from __future__ import annotations

import contextlib
import operator
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn

from ..functional.modules import behaves_as, evaluating
from .common import BATCH, LayerBound, UnsupportedOperationError, f64, resolve_layer_bound
from .ownership import has_rule
from .rules.layers import foldable, folded_layer, layer_bound_of
from .rules.modules import module_lip
from .tracing import (
    Propagate,
    check_hooks,
    compiled_inner,
    has_hooks,
    trace,
    uncompiled,
)
from .walk import Walker

__all__ = [
    "check_input_shape", "network_lipschitz_bound", "not_nan", "sequential_bound", "walking",
    "walk_model",
]


def _dependents(gm: fx.GraphModule) -> set[fx.Node]:
    dep: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder" or any(a in dep for a in node.all_input_nodes):
            dep.add(node)
    return dep


def check_input_shape(input_shape: Sequence[int]) -> tuple[int, ...]:
    """The per-sample shape as a tuple of ints; an entry that is not an integer (``1.5``, but
    also ``4.0`` or ``True``) is refused rather than truncated."""
    if isinstance(input_shape, int):
        input_shape = (input_shape,)
    try:
        entries = list(input_shape)
    except TypeError as exc:
        raise TypeError(f"input_shape must be a sequence of ints, got {input_shape!r}") from exc
    sizes = []
    for i, s in enumerate(entries):
        try:
            if isinstance(s, bool):
                raise TypeError
            sizes.append(operator.index(s))
        except TypeError as exc:
            raise ValueError(f"input_shape must be a sequence of ints: entry {i} is {s!r} in "
                             f"{input_shape!r}") from exc
    shape = tuple(sizes)
    if not shape or any(s <= 0 for s in shape):
        raise ValueError(f"input_shape must be a non-empty tuple of positive sizes, got {shape}")
    return shape


def _eager(model: nn.Module) -> contextlib.AbstractContextManager:
    """``torch.compile``d submodules run as plain eager code while the walk calls the model
    (no compilation for a check run). Only then: ``set_stance`` imports dynamo (seconds)."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or not any(compiled_inner(m) is not None for m in model.modules()):
        return contextlib.nullcontext()
    return set_stance("force_eager")


@contextlib.contextmanager
def walking(model: nn.Module) -> Iterator[None]:
    """Eval mode (:func:`~lightning_spectral.functional.modules.evaluating`) without autograd
    for a walk, compiled parts run eagerly; the caller's train/eval flags come back after."""
    with evaluating(model), torch.no_grad(), _eager(model):
        yield


def _untraceable(model: nn.Module, exc: Exception, register: str) -> UnsupportedOperationError:
    return UnsupportedOperationError(
        f"torch.fx could not trace {type(model).__name__}: {exc!r}. Make forward traceable (no "
        f"data-dependent control flow), or register a rule for the offending module type with "
        f"{register}."
    )


def _dummy(model: nn.Module, shape: tuple[int, ...], batch: int = BATCH) -> Tensor:
    """A random batch (own generator: the caller's random state is left alone)."""
    tensors = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    param = tensors[0] if tensors else None
    dtype = param.dtype if param is not None and param.dtype.is_floating_point else torch.float32
    device = param.device if param is not None else torch.device("cpu")
    gen = torch.Generator().manual_seed(0)
    return torch.randn(batch, *shape, generator=gen, dtype=dtype).to(device)


def _check_faithful(model: nn.Module, x: Tensor, traced: Any) -> None:
    """The bound is of the traced graph; it must compute what the model computes. Tracing
    loses in-place updates written as ``a += b`` (traced as ``a + b``, so an alias of ``a``
    would miss the update) and forward hooks of modules it traces through."""
    expected = model(x)
    if not (isinstance(expected, Tensor) and isinstance(traced, Tensor)):
        return  # the walk has already refused any other output
    scale = float(expected.detach().abs().max()) if expected.numel() else 0.0
    if expected.shape != traced.shape or not torch.allclose(
        traced, expected, rtol=1e-4, atol=1e-6 * max(1.0, scale), equal_nan=True
    ):
        raise UnsupportedOperationError(
            f"the torch.fx trace of {type(model).__name__} does not reproduce its output on a "
            "random input: an in-place update of a tensor that is read elsewhere (e.g. "
            "`h += ...` on an alias of h), a forward hook on a module the trace goes through, "
            "or randomness. Write the update out of place / remove the hook."
        )


class _RecordShapes(fx.Interpreter):
    """Shapes at another batch size, and the values of the nodes whose value the first run
    recorded (``ls_value``) as ``ls_other``: ``static`` refuses a value that changed."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.shapes: dict[fx.Node, torch.Size] = {}

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, Tensor):
            self.shapes[n] = result.shape
        if "ls_value" in n.meta:
            n.meta["ls_other"] = result.detach() if isinstance(result, Tensor) else result
        return result


def _other_batch_shapes(gm: fx.GraphModule, shape: tuple[int, ...]) -> dict[fx.Node, torch.Size]:
    """Shapes at a batch of ``BATCH + 1``: an input-dependent tensor whose shape does not
    follow the batch size mixes samples with other axes (``x.view(2, -1)``, a Linear applied
    across the batch after the features were reduced away, ...). Also records the constants'
    values there, so that a constant read from the batch size is refused (see ``static``)."""
    recorder = _RecordShapes(gm)
    try:
        recorder.run(_dummy(gm, shape, BATCH + 1))
    except Exception as exc:  # the model's own error, whatever its type
        raise UnsupportedOperationError(
            f"the model runs on a batch of {BATCH} but not on a batch of {BATCH + 1} "
            f"({exc!r}): it does not treat the samples independently"
        ) from exc
    return recorder.shapes


def _graph_walk(model: nn.Module, gm: fx.GraphModule, shape: tuple[int, ...],
                layer_bound: LayerBound, curvature: bool = False,
                walker_class: type[Walker] = Walker) -> Walker:
    """The walked graph (bounds of every node; curvature bounds too when asked for)."""
    dummy = _dummy(gm, shape)
    depends = _dependents(gm)
    try:
        traced = Propagate(gm, depends).propagate(dummy.clone())  # the model may write to it
    except UnsupportedOperationError:
        raise
    except Exception as exc:  # the model's own error, whatever its type
        raise ValueError(
            f"running the model on a dummy input of per-sample shape {shape} (batch {BATCH}) "
            f"failed: {exc!r}. input_shape excludes the batch axis, e.g. (C, H, W)."
        ) from exc
    walker = walker_class(gm, layer_bound, _other_batch_shapes(gm, shape), curvature)
    walker.run()
    _check_faithful(model, dummy, traced)
    return walker


def walk_model(model: nn.Module, input_shape: Sequence[int], layer_bound: LayerBound | None,
                *, curvature: bool = False, walker_class: type[Walker] = Walker) -> Walker:
    """Check the shape, trace ``model`` in eval mode and walk its graph (no Sequential
    fallback: an untraceable model is refused naming the rule to register)."""
    shape = check_input_shape(input_shape)
    model = uncompiled(model)
    layer_bound = resolve_layer_bound(layer_bound)
    register = "register_curvature_rule" if curvature else "register_lipschitz_rule"
    with walking(model):
        try:
            gm = trace(model)
        except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError...
            raise _untraceable(model, exc, register) from exc
        return _graph_walk(model, gm, shape, layer_bound, curvature=curvature,
                           walker_class=walker_class)


def _graph_bound(model: nn.Module, gm: fx.GraphModule, shape: tuple[int, ...],
                 layer_bound: LayerBound) -> Tensor:
    walker = _graph_walk(model, gm, shape, layer_bound)
    return not_nan(walker.lip[walker.out])


def not_nan(bound: Tensor, name: str = "Lipschitz") -> Tensor:
    """``bound``, refused (``ValueError``) when it is NaN."""
    # NaN compares false with everything: passed on, it would read as "no violation".
    if bool(torch.isnan(bound)):
        raise ValueError(f"the {name} bound is NaN: some parameter or statistic is not finite "
                         "(e.g. a negative BatchNorm running_var)")
    return bound


def sequential_bound(model: nn.Sequential, shape: tuple[int, ...], layer_bound: LayerBound
                      ) -> Tensor:
    """Fallback for an untraceable nn.Sequential: product over children, each child bounded
    by its rule or, if it has none, by its own network bound (traced on its own)."""
    x = _dummy(model, shape)
    children = list(model)
    total = f64(1.0)
    i = 0
    while i < len(children):
        child = children[i]
        y = _call_checked(child, str(i), x)
        nxt = children[i + 1] if i + 1 < len(children) else None
        if nxt is not None and isinstance(y, Tensor) and foldable(child, nxt, y.ndim):
            k = layer_bound_of(folded_layer(child, nxt), x.shape, layer_bound)
            y = _call_checked(nxt, str(i + 1), y)
            i += 1
        elif has_rule(child):
            k = module_lip(child, [x.shape], getattr(y, "shape", None), layer_bound)
        else:
            k = network_lipschitz_bound(child, tuple(x.shape[1:]), layer_bound=layer_bound)
        if not isinstance(y, Tensor) or y.shape[0] != BATCH:
            raise UnsupportedOperationError(f"{type(child).__name__} changes the batch axis")
        if not y.dtype.is_floating_point:
            raise UnsupportedOperationError(
                f"{type(child).__name__} returns {y.dtype}: a step function has no Lipschitz "
                "constant"
            )
        total = total * k
        x = y
        i += 1
    return total


def _call_checked(module: nn.Module, name: str, x: Tensor) -> Any:
    if not has_hooks(module):
        return module(x)
    clone = x.clone()
    y = module(x)
    check_hooks(module, name, (clone,), {}, y)
    return y


def network_lipschitz_bound(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    layer_bound: LayerBound | None = None,
) -> Tensor:
    """A guaranteed upper bound on the l2 Lipschitz constant of ``model`` in eval mode.

    Args:
        model: any module ``torch.fx`` can trace whose forward takes one tensor and returns
            one tensor (e.g. torchvision's ResNets, a LightningModule whose forward calls its
            network); an untraceable plain ``nn.Sequential`` is handled child by child. A
            ``torch.compile``d model or submodule (an ``OptimizedModule``) is bounded as the
            module it wraps (its ``_orig_mod``): compiling changes how, not what, it computes.
        input_shape: the shape of ONE sample, without the batch axis, e.g. ``(1, 8, 8)`` for
            ``(C, H, W)`` images. The bound is for the per-sample map and depends on the input
            size (pooling, and the layer bounds when they use it).
        layer_bound: ``fn(module, input_size) -> Tensor``, a guaranteed bound on a
            convolution's / linear layer's operator norm for the spatial ``input_size`` (None
            for linear layers). Defaults to
            :func:`lightning_spectral.functional.layer_spectral_bound`.

    Returns:
        0-dim float64 tensor (CPU, no grad) ``L`` with ``||f(x) - f(x')|| <= L ||x - x'||``
        for all inputs of that shape. The model's train/eval flags are restored afterwards.

    Raises:
        UnsupportedOperationError: a module or function without a rule (named in the message).
        ValueError: ``input_shape`` invalid or the model fails on it.
    """
    shape = check_input_shape(input_shape)
    model = uncompiled(model)
    layer_bound = resolve_layer_bound(layer_bound)
    with walking(model):
        try:
            gm = trace(model)
        except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError...
            if isinstance(model, nn.Sequential) and behaves_as(model, nn.Sequential):
                return not_nan(sequential_bound(model, shape, layer_bound))
            raise _untraceable(model, exc, "register_lipschitz_rule") from exc
        return _graph_bound(model, gm, shape, layer_bound)
