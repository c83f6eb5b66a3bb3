"""Oracles for the network curvature bound: exact Hessians, Jacobian differences, and a
gradient ascent on the curvature of ``u^T z`` over the input, the direction and ``u``."""

from __future__ import annotations

import torch
from torch import nn

D64 = torch.float64


def exact_layer_bound(module: nn.Module, input_size: tuple[int, ...] | None) -> torch.Tensor:
    """Exact norms of linear layers: the walk then equals the hand recursion."""
    if not isinstance(module, nn.Linear):
        raise TypeError(f"exact_layer_bound is for nn.Linear, got {type(module).__name__}")
    return torch.linalg.matrix_norm(module.weight.detach().double(), ord=2)


def logit_fn(net: nn.Module, shape: tuple[int, ...]):
    """Flat per-sample input ``(D,)`` -> logits ``(C,)``."""
    return lambda v: net(v.reshape(1, *shape))[0]


def hessians(net: nn.Module, shape: tuple[int, ...], x: torch.Tensor) -> torch.Tensor:
    """``(C, D, D)`` exact Hessians of every logit at the flat point ``x``."""
    # Reverse over reverse: forward AD lacks some activation backwards (silu).
    return torch.func.jacrev(torch.func.jacrev(logit_fn(net, shape)))(x.reshape(-1))


def curvature_seen(net: nn.Module, shape: tuple[int, ...], x: torch.Tensor) -> dict[str, float]:
    """Largest Hessian norm of a logit, of a logit difference, and the pairwise ratios
    ``||Hess(z_y - z_t)|| / K`` need K; returned as the raw ``(C, C)`` matrix too."""
    with torch.no_grad():  # torch.func differentiates anyway; no graph to the parameters
        h = hessians(net, shape, x)
    logit = torch.linalg.matrix_norm(h, ord=2).max()
    diff = torch.linalg.matrix_norm(h[:, None] - h[None, :], ord=2)
    return {"logit": float(logit), "pair": diff}


def jacobian_ratio(net: nn.Module, shape: tuple[int, ...], x: torch.Tensor,
                   x2: torch.Tensor) -> float:
    """``||J(x) - J(x2)||_2 / ||x - x2||``, a lower bound on the Jacobian's Lipschitz
    constant."""
    fn = logit_fn(net, shape)
    with torch.no_grad():
        j1 = torch.func.jacrev(fn)(x.reshape(-1))
        j2 = torch.func.jacrev(fn)(x2.reshape(-1))
    return float(torch.linalg.matrix_norm(j1 - j2, ord=2) / (x - x2).norm())


def ascend_curvature(net: nn.Module, shape: tuple[int, ...], num_outputs: int, *,
                     starts: int = 3, steps: int = 60, scale: float = 2.0,
                     seed: int = 0) -> float:
    """Largest ``|v^T Hess(u^T z)(x) v|`` over unit ``u, v`` found by Adam on ``(x, u, v)``
    (each a lower bound on ``C``), from several random starts."""
    gen = torch.Generator().manual_seed(seed)
    fn = logit_fn(net, shape)
    dim = int(torch.tensor(shape).prod())
    best = 0.0
    for _ in range(starts):
        x = (scale * torch.randn(dim, generator=gen, dtype=D64)).requires_grad_()
        v = torch.randn(dim, generator=gen, dtype=D64).requires_grad_()
        u = torch.randn(num_outputs, generator=gen, dtype=D64).requires_grad_()
        opt = torch.optim.Adam([x, u, v], lr=0.05)
        for _ in range(steps):
            value = _vhv(fn, x, u, v)
            best = max(best, abs(float(value.detach())))
            opt.zero_grad()
            (-value.abs()).backward()
            opt.step()
        best = max(best, abs(float(_vhv(fn, x, u, v).detach())))
    return best


def _vhv(fn, x: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    un, vn = u / u.norm(), v / v.norm()
    f = fn(x) @ un
    (grad,) = torch.autograd.grad(f, x, create_graph=True)
    (hv,) = torch.autograd.grad(grad @ vn, x, create_graph=True, allow_unused=True)
    if hv is None:  # an affine map: its gradient does not depend on x
        return (0.0 * vn).sum()
    return hv @ vn


def randomize_bn(model: nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            n = m.num_features
            m.running_mean = torch.randn(n, generator=gen, dtype=D64)
            m.running_var = 0.3 + torch.rand(n, generator=gen, dtype=D64)
            with torch.no_grad():
                m.weight.copy_(torch.randn(n, generator=gen, dtype=D64))
                m.bias.copy_(torch.randn(n, generator=gen, dtype=D64))
