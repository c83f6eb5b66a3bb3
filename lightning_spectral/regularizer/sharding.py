"""Sharded weights (FSDP2's ``fully_shard``): every bound is computed from the *whole* weight.

Under FSDP2 a parameter is a ``DTensor`` whose local tensor is one rank's shard (rows of
the weight). A spectral norm is not a sum over rows: the norm of a shard says nothing about
the norm of the weight, so nothing here is ever computed from a shard as if it were the
weight. Instead:

* the penalty reads :func:`full_weight`, ``DTensor.full_tensor()``, an all-gather that is
  differentiable: its backward hands each rank the gradient of its own shard. Every rank
  computes the same penalty from the same gathered weight and replicated vectors, so each
  shard receives exactly the gradient the penalty has in one process; FSDP adds it to the
  (averaged) task gradient it reduce-scatters, as DDP's averaging keeps it;
* guaranteed bounds, exact norms and certificates are computed with the full weights swapped
  in (:func:`full_weights`), no-grad; the constraint rescales each rank's shard by the factor
  computed from the full weight, the same on every rank;
* the finiteness check sums the local shards and all-reduces the per-layer sums (NaN and Inf
  survive a sum), so every rank reaches the same verdict and raises together.

Everything here is collective when a weight is sharded: every rank must call it, in the same
order (the callback's hooks run on every rank). FSDP1 (``FullyShardedDataParallel``) keeps
*flat* shards that mix the parameters of a whole wrapped module; it is refused
(:func:`refuse_flat_shards`).
"""

from __future__ import annotations

import contextlib
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from typing import Any, cast

import torch
import torch.distributed as dist
from lightning.pytorch.strategies import FSDPStrategy
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel
from torch.distributed.tensor import DTensor
from torch.nn.parameter import is_lazy

from .selection import layer_weight

__all__ = [
    "any_sharded", "fsdp_modules", "full_weight", "full_weights", "local", "refuse_flat_shards",
    "refuse_fsdp1_strategy", "reshard", "sum_over_ranks",
]


def full_weight(w: Tensor) -> Tensor:
    """The whole weight: ``w.full_tensor()`` for a ``DTensor`` (differentiable), else ``w``."""
    return w.full_tensor() if isinstance(w, DTensor) else w


def local(w: Tensor) -> Tensor:
    """This rank's part of ``w`` (its local shard for a ``DTensor``), for in-place updates."""
    return w.to_local() if isinstance(w, DTensor) else w


def any_sharded(tensors: Iterable[Tensor]) -> bool:
    return any(isinstance(t, DTensor) for t in tensors)


def sum_over_ranks(t: Tensor) -> Tensor:
    """``t`` summed over all ranks (in place); every rank must call it."""
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def reshard(modules: Iterable[nn.Module]) -> None:
    """Register the sharded parameters of every FSDP2 module (a no-op where they already are).

    FSDP2 keeps the root's parameters unsharded between forward and backward; the gradient
    of a penalty read from those would reach FSDP's unsharded parameter, which FSDP may have
    reduce-scattered already. Read from the sharded ``DTensor`` instead, it is accumulated into
    the sharded gradient (FSDP gathers the weights again for the backward where needed).
    """
    for m in modules:
        if isinstance(m, FSDPModule):
            m.reshard()


def fsdp_modules(root: nn.Module) -> list[nn.Module]:
    return [m for m in root.modules() if isinstance(m, FSDPModule)]


_FSDP1_REFUSAL = (
    "SpectralBoundRegularizer does not support FSDP1 (strategy='fsdp', "
    "FullyShardedDataParallel): each rank holds a flat shard mixing the parameters of a wrapped "
    "module, and a spectral bound of a shard is not a bound of the layer. Use FSDP2: "
    "ModelParallelStrategy with torch.distributed.fsdp.fully_shard applied in configure_model."
)


def _expected_ndim(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return 2
    return len(cast(tuple[int, ...], module.kernel_size)) + 2


def refuse_flat_shards(root: nn.Module, layers: dict[str, nn.Module] | None = None) -> None:
    """Raise where weights may be flat shards: FSDP1 modules, or a weight of the wrong rank.

    FSDP1 (``use_orig_params=True``) leaves each layer's weight as a 1-d view of this rank's
    part of a flat parameter (with ``False``, a view of the gathered one during forward only).
    The rank check also catches an FSDP1 wrapper *around* ``root``, invisible from inside.
    """
    if any(isinstance(m, FullyShardedDataParallel) for m in root.modules()):
        raise RuntimeError(_FSDP1_REFUSAL)
    for name, m in (layers or {}).items():
        w = layer_weight(m)
        if not is_lazy(w) and not isinstance(w, DTensor) and w.ndim != _expected_ndim(m):
            raise RuntimeError(
                f"{_FSDP1_REFUSAL} (The weight of {name} has shape {tuple(w.shape)}, not that "
                f"of a {type(m).__name__} weight.)"
            )


def refuse_fsdp1_strategy(strategy: object) -> None:
    """Raise for Lightning's FSDP1 strategy (``strategy="fsdp"``), before any work is done."""
    if isinstance(strategy, FSDPStrategy):
        raise RuntimeError(_FSDP1_REFUSAL)


_Hooks = dict[int, Callable[..., Any]]  # a module's hook dicts, as torch types them


@contextlib.contextmanager
def full_weights(*roots: nn.Module) -> Iterator[None]:
    """Within the block, every sharded parameter under ``roots`` reads as the whole tensor.

    No-grad, for reading only (bounds, exact norms, the certificate's graph walk): each
    ``DTensor`` parameter is replaced by a gathered copy and restored afterwards, and FSDP2's
    forward hooks are suspended meanwhile, so that a forward run inside (a shape propagation)
    neither gathers nor re-registers parameters. Writes inside are lost. Collective.
    """
    swapped: list[tuple[nn.Module, str, nn.Parameter]] = []
    hooks: list[tuple[nn.Module, _Hooks, _Hooks]] = []
    with torch.no_grad():
        try:
            for m in dict.fromkeys(m for root in roots for m in root.modules()):
                for name, p in list(m._parameters.items()):
                    if isinstance(p, DTensor):
                        swapped.append((m, name, p))
                        m._parameters[name] = nn.Parameter(p.full_tensor(), requires_grad=False)
                if isinstance(m, FSDPModule):
                    hooks.append((m, m._forward_pre_hooks, m._forward_hooks))
                    m._forward_pre_hooks, m._forward_hooks = OrderedDict(), OrderedDict()
            yield
        finally:
            for m, name, p in swapped:
                m._parameters[name] = p
            for m, pre, post in hooks:
                m._forward_pre_hooks, m._forward_hooks = pre, post
