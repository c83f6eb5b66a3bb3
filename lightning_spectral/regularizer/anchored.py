"""A cheap guaranteed bound for the constraint: the bound of an anchor plus that of the change.

Every bound the projection uses (``layer_bounds(module, max_cost=0)``) is ``f * N_i(W)``, a
padding factor ``f`` times a norm ``N_i`` of the weight (Fantastic Four per matricization, tap
sum, their polyphase versions, the matrix norm of a linear layer). Norms obey the triangle
inequality and are homogeneous, so for any anchor ``A`` (the weight when its bound was last
computed tightly) and any scalar ``sigma`` (the product of the rescalings since),

    f N_i(W) <= sigma f N_i(A) + f N_i(W - sigma A),

and ``f N_i(D)`` is bounded in one pass over ``D = W - sigma A``: ``sqrt(K) ||D||_F`` bounds
``sqrt(K) ||M_A(D)||_2`` (``K`` taps, the Frobenius norm bounds the spectral one), ``sum_t
||D_t||_F`` bounds the tap sum, ``sqrt(K') ||D||_F`` the polyphase bounds (``K'`` polyphase
taps; the polyphase filter only rearranges the entries). The minimum over ``i`` of the right
side is therefore a guaranteed bound of ``min_i f N_i(W)``, the bound the tight projection
uses. Float64 rounding in computing it is covered by explicit margins (:func:`_change_bounds`).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..functional.bounds import layer_factor
from ..functional.geometry import Geometry
from ..functional.matricize import row_subsets
from ..functional.opnorm import opnorm_cost

__all__ = ["Anchor", "LayerFamilies", "anchored_bound", "tight_cost"]

_U64 = 2.0**-53  # unit roundoff of float64
_SUM_MARGIN = 1e-12  # relative margin on the final few float64 additions and products


@dataclass(frozen=True)
class LayerFamilies:
    """How each bound family of a layer bounds a change ``D`` of its weight.

    ``names`` are the keys of ``layer_bounds(module, max_cost=0)`` used; ``fro_coef[i]`` and
    ``tap_coef[i]``: family ``i`` bounds ``D`` by ``fro_coef[i] ||D||_F`` when ``tap_coef[i]``
    is 0, by ``tap_coef[i] sum_t ||D_t||_F`` otherwise. ``max_fro_coef``: the largest
    ``fro`` coefficient any family could need (for the rounding margins).
    """

    names: tuple[str, ...]
    fro_coef: tuple[float, ...]
    tap_coef: tuple[float, ...]
    max_fro_coef: float
    conv: bool


@functools.lru_cache(maxsize=256)
def _coefficients(fam: LayerFamilies, device: torch.device) -> tuple[Tensor, Tensor]:
    # Built once per layer family and device: a tensor made from a list every step would be a
    # blocking host-to-device copy per layer on a GPU.
    return (torch.tensor(fam.fro_coef, dtype=torch.float64, device=device),
            torch.tensor(fam.tap_coef, dtype=torch.float64, device=device))


def _polyphase_taps(geo: Geometry) -> int:
    taps = 1
    for k, s, dil in zip(geo.kernel, geo.stride, geo.dilation, strict=True):
        ext = dil * (k - 1) + 1
        taps *= -(-ext // s) if s > 1 else k
    return taps


def layer_families(module: nn.Module, names: list[str]) -> LayerFamilies:
    """The families among ``names`` whose change bound is known, with their coefficients."""
    geo = Geometry(module)
    if geo.linear:
        return LayerFamilies(("matrix_norm",), (1.0,), (0.0,), 1.0, conv=False)
    f = layer_factor(geo, None)
    root_k = math.sqrt(math.prod(geo.kernel))
    root_kp = math.sqrt(_polyphase_taps(geo))
    known = {
        "fantastic_four": (f * root_k, 0.0),
        "tap_sum": (0.0, f),
        "polyphase_fantastic_four": (f * root_kp, 0.0),
        "polyphase_tap_sum": (f * root_kp, 0.0),
    }
    used = [n for n in names if n in known]
    return LayerFamilies(
        tuple(used), tuple(known[n][0] for n in used), tuple(known[n][1] for n in used),
        f * max(root_k, root_kp), conv=True,
    )


#: The fixed cost of one pass of the tight bound (its eigenvalue calls and their Python side),
#: in multiply-add units: about 3 ms on one CPU thread of the machine of
#: ``benchmarks/results/constraint_cost_cpu.md`` (2.7e9 multiply-adds/s on large layers), which
#: is what a 16x16x3x3 layer's bound costs. Without it the schedule counts small layers as
#: nearly free and refreshes dozens of them per step.
PASS_OVERHEAD = 1e7


def tight_cost(module: nn.Module) -> float:
    """Multiply-adds of the tight bound of ``module`` (the ``opnorm_cost`` model): the
    ``2^d`` Fantastic-Four norms and the tap norms, twice for strided layers (polyphase),
    plus :data:`PASS_OVERHEAD` per pass."""
    geo = Geometry(module)
    w = geo.weight
    if geo.linear:
        return opnorm_cost(int(w.shape[0]), int(w.shape[1])) + PASS_OVERHEAD
    g, k = geo.groups, geo.kernel
    co, ci = w.shape[0] // g, int(w.shape[1])
    cost = math.prod(k) * g * opnorm_cost(co, ci)
    for a in row_subsets(len(k)):
        rows = co * math.prod(k[i] for i in a)
        cost += g * opnorm_cost(rows, co * ci * math.prod(k) // rows)
    return (cost + PASS_OVERHEAD) * (2 if any(s > 1 for s in geo.stride) else 1)


@dataclass
class Anchor:
    """The weight at its last tight bound, and what is known of it (all on the weight's device).

    ``weight``: a copy (weight dtype); ``sigma``: float64 0-dim, the product of the rescalings
    applied since; ``bounds``: float64 ``(F,)``, each family's guaranteed bound of ``weight``;
    ``fro``: float64 0-dim, an upper bound of ``||weight||_F``.
    """

    weight: Tensor
    sigma: Tensor
    bounds: Tensor
    fro: Tensor

    def state_dict(self) -> dict[str, Tensor]:
        return {"weight": self.weight.clone(), "sigma": self.sigma.clone(),
                "bounds": self.bounds.clone(), "fro": self.fro.clone()}

    @classmethod
    def from_state(cls, state: dict[str, Tensor], like: Tensor) -> Anchor:
        w = state["weight"].to(device=like.device, dtype=like.dtype)
        if tuple(w.shape) != tuple(like.shape):
            raise ValueError(
                f"the saved constraint anchor has shape {tuple(w.shape)}, the weight "
                f"{tuple(like.shape)}")
        def f64(t: Tensor) -> Tensor:
            return t.to(device=like.device, dtype=torch.float64)

        return cls(w.clone(), f64(state["sigma"]), f64(state["bounds"]), f64(state["fro"]))


def _fro_margin(n: int) -> float:
    # Relative error of a float64 sum of n squares and its square root (gamma_{n+2}, raised).
    return 1 + (n + 4) * _U64 * 1.01


def new_anchor(weight: Tensor, bounds: Tensor) -> Anchor:
    """An anchor at ``weight`` (copied) whose family bounds are ``bounds``."""
    w = weight.detach()
    fro = torch.linalg.vector_norm(w, dtype=torch.float64) * _fro_margin(w.numel())
    one = torch.ones((), dtype=torch.float64, device=w.device)
    return Anchor(w.clone(), one, bounds.detach().to(torch.float64), fro)


def _work_dtype(weight: Tensor) -> torch.dtype:
    # float32 weights: the change is computed in float32 (a third of float64's time on CPU),
    # with margins valid for float32; other dtypes in float64.
    return torch.float32 if weight.dtype == torch.float32 else torch.float64


def _squared_taps(d: Tensor) -> tuple[Tensor, float]:
    """``sum_{o,i} D[o, i, t]^2`` per tap ``t`` (float64 ``(K,)``) and its relative margin.

    Partial sums over the input channels in the work dtype (``n`` nonnegative terms: relative
    error at most ``(n + 1) u``), then over the output channels in float64.
    """
    u = torch.finfo(d.dtype).eps / 2
    d3 = d.reshape(d.shape[0], d.shape[1], -1)
    partial = d3.square().sum(dim=1).sum(dim=0, dtype=torch.float64)
    margin = 1 + 1.01 * ((d3.shape[1] + 2) * u + (d3.shape[0] + 4) * _U64)
    return partial, margin


def _change_bounds(weight: Tensor, anchor: Anchor, fam: LayerFamilies
                   ) -> tuple[Tensor, Tensor, Tensor]:
    """Each family's guaranteed bound of ``D = weight - sigma anchor``, and one of ``||W||_F``.

    ``sigma`` is rounded to the work dtype first (the triangle inequality holds for any
    scalar, so the bound uses the rounded one). Each entry of the computed ``D`` is off by at
    most ``u (sigma |A| + |D|)`` (two roundings, ``u`` the work dtype's unit roundoff), whose
    Frobenius norm is added (times ``sqrt(K)`` for the tap sum, by Cauchy-Schwarz); the sums
    of squares carry their own relative margin (:func:`_squared_taps`).
    """
    work = _work_dtype(weight)
    u = torch.finfo(work).eps / 2
    sigma = anchor.sigma.to(work)
    d = weight.detach().to(work) - anchor.weight.to(work) * sigma
    squares, margin = _squared_taps(d)
    sigma = sigma.to(torch.float64)
    fro = (squares.sum() * margin).sqrt() * (1 + 4 * _U64)
    taps = ((squares * margin).sqrt() * (1 + 4 * _U64)).sum() * (1 + squares.numel() * _U64)
    err = 1.01 * u * (sigma * anchor.fro + fro)
    root_k = math.sqrt(squares.numel()) if fam.conv else 1.0
    fro_coef, tap_coef = _coefficients(fam, d.device)
    change = fro_coef * (fro + err) + tap_coef * (taps + root_k * err)
    weight_fro = (sigma * anchor.fro + fro + err) * (1 + _SUM_MARGIN)
    return change, sigma, weight_fro


def anchored_bound(weight: Tensor, anchor: Anchor, fam: LayerFamilies
                   ) -> tuple[Tensor, Tensor]:
    """``min_i (sigma b_i(A) + bound_i(W - sigma A))``: a guaranteed bound of the layer.

    Returns it (float64 0-dim, on the device, no sync) and an upper bound of ``||W||_F``;
    ``anchor.sigma`` becomes the rounded ``sigma`` the bound used.
    """
    change, sigma, weight_fro = _change_bounds(weight, anchor, fam)
    anchor.sigma = sigma
    total = (sigma * anchor.bounds + change) * (1 + _SUM_MARGIN)
    return total.min(), weight_fro


def rescale_factor(bound: Tensor, weight_fro: Tensor, c: float, fam: LayerFamilies,
                   dtype: torch.dtype) -> Tensor:
    """The factor ``s`` (in ``dtype``, 1 when ``bound <= c``) that puts the layer at ``<= c``.

    ``fl(s W)`` differs from ``s W`` by at most ``eps |s W|`` per entry, whose bound in every
    family is at most ``max_fro_coef eps s ||W||_F``; so with ``s = c' / (bound + 4 max_fro_coef
    eps ||W||_F)``, ``c' = c (1 - 1e-9)``, the stored product has a guaranteed bound ``<= c'``
    (``s`` is rounded down to ``dtype``).
    """
    eps = torch.finfo(dtype).eps
    # 4 eps: the product's rounding, and the next anchored bound's own rounding terms (of the
    # same order), so that the stored weight is not found above c again (a resumed run must not
    # rescale it at the start of fit, where the uninterrupted run does not).
    slack = bound + fam.max_fro_coef * 4 * eps * weight_fro
    wanted = (c * (1 - 1e-9)) / slack
    s = wanted.to(dtype)
    s = torch.where(s.to(torch.float64) > wanted, torch.nextafter(s, torch.zeros_like(s)), s)
    return torch.where(bound > c, s, torch.ones_like(s))
