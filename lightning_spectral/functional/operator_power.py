"""Power iteration on a layer's operator ``A`` (its linear part, at a given input size).

``A`` is what the layer computes without its bias: ``x -> W * x`` for a convolution (with its
stride, padding and padding mode, dilation and groups), the transposed convolution for
``ConvTranspose``, ``x -> W x`` for ``Linear``. Each step maps the stored vector ``u`` to
``A^T A u / ||A^T A u||`` (``A^T`` by autograd, so every padding mode is handled), and
``sigma = ||A u||`` with ``||u|| = 1`` is the estimate: a Rayleigh quotient, so
``sigma <= ||A||_2`` always, converging to it from below. The estimate is differentiable in
the weight through the last application of ``A`` (the vectors are constants, as in
``torch.nn.utils.spectral_norm``). An estimate, never a bound.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from .geometry import SupportedLayer

__all__ = ["layer_operator", "operator_norm_estimate", "operator_vector"]

_TRANSPOSED = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}


def layer_operator(module: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    """``apply(x, weight)``: the layer's linear part with ``weight`` in place of its own."""
    if isinstance(module, nn.Linear):
        return lambda x, w: F.linear(x, w)
    if isinstance(module, _ConvTransposeNd):
        transposed = _TRANSPOSED[module.weight.ndim - 2]
        # Bound to a local: a closure does not keep the narrowing of ``module`` for mypy.
        # The padding of a transposed convolution is never a string.
        tr = module
        return lambda x, w: transposed(x, w, None, tr.stride, cast(tuple[int, ...], tr.padding),
                                       tr.output_padding, tr.groups, tr.dilation)
    if isinstance(module, _ConvNd):
        conv = module
        return lambda x, w: conv._conv_forward(x, w, None)
    raise TypeError(f"no operator power iteration for {type(module).__name__}")


def operator_vector(module: nn.Module, input_size: Sequence[int] | None,
                    generator: torch.Generator | None = None) -> Tensor:
    """A random unit vector of the layer's input space (one sample, batch axis of 1)."""
    layer = cast(SupportedLayer, module)  # a layer that layer_operator accepts
    w = layer.weight
    if isinstance(layer, nn.Linear):
        shape: tuple[int, ...] = (1, w.shape[1])
    else:
        if input_size is None:
            raise ValueError(f"{type(module).__name__} needs its spatial input size")
        channels = w.shape[0] if isinstance(layer, _ConvTransposeNd) else (
            w.shape[1] * layer.groups)
        shape = (1, channels, *(int(s) for s in input_size))
    u = torch.randn(shape, generator=generator, dtype=torch.float32).to(w.device)
    return u / u.norm()


def operator_norm_estimate(module: nn.Module, u: Tensor, n_iter: int = 1) -> Tensor:
    """``n_iter`` power iterations on ``u`` (updated in place), then ``||A u||``.

    Returns a 0-dim tensor in ``u``'s dtype, differentiable w.r.t. ``module.weight``.
    """
    apply = layer_operator(module)
    weight = cast(SupportedLayer, module).weight.to(u.dtype)
    frozen = weight.detach()
    for _ in range(n_iter):
        with torch.enable_grad():
            x = u.detach().requires_grad_(True)
            y = apply(x, frozen)
            (g,) = torch.autograd.grad(y, x, grad_outputs=y.detach())
        norm = g.norm()
        # A zero operator keeps its vector; no host sync to find out.
        u.copy_(torch.where(norm > 0, g / norm.clamp_min(torch.finfo(g.dtype).tiny), u))
    return apply(u, weight).norm()
