"""The methods, one signature: ``(conv, size, cfg) -> Job``, ``size`` the input size or ``None``.

Kinds: ``P`` provable upper bound (``size=None``: valid at every size), ``E`` exact norm, ``L``
estimate from below. A :class:`~.measure.Job` is the call to time plus an untimed preparation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import Tensor, nn

from benchmarks.boundspeed.config import Config
from benchmarks.boundspeed.layers import circular_standin
from benchmarks.boundspeed.measure import Job
from lightning_spectral.functional import (
    conv_spectral_norm,
    fantastic_four,
    fantastic_four_estimate,
    gram_iteration_bound,
    grouped_weight,
    init_singular_vectors,
    layer_bounds,
    matricize,
    row_subsets,
)
from lightning_spectral.functional.bounds import _grid_bounds as grid_bounds
from lightning_spectral.functional.geometry import Geometry, polyphase_filter

Size = tuple[int, int] | None


def ff_power(conv: nn.Conv2d, size: Size, cfg: Config, *, n_iter: int) -> Job:
    """Fantastic Four estimated by ``n_iter`` power iterations (``fantastic_four_estimate``).

    Singla & Feizi (ICLR 2021), the training-time estimate, with Miyato et al.'s (ICLR 2018)
    power iteration. Each call starts from fresh random vectors, drawn untimed. Below FF.
    """
    w = grouped_weight(conv.weight.detach(), conv.groups).unsqueeze(0)
    state: dict[str, tuple[list[Tensor], list[Tensor]]] = {}

    def prepare() -> None:
        us, vs = init_singular_vectors(w.shape[1:], seed=cfg.seed, device=w.device, dtype=w.dtype)
        state["uv"] = ([u.unsqueeze(0) for u in us], [v.unsqueeze(0) for v in vs])

    def run() -> Tensor:
        us, vs = state.pop("uv")
        with torch.no_grad():
            return fantastic_four_estimate(w, us, vs, n_iter=n_iter)[0]

    return Job(run, prepare)


def ff(conv: nn.Conv2d, size: Size, cfg: Config) -> Job:
    """``sqrt(prod k) * min_A ||M_A||_2`` with exact matrix norms (``fantastic_four``).

    Singla & Feizi (ICLR 2021, Theorem 1): provable for the layer at every input size (zero
    padding, any stride).
    """
    w = conv.weight.detach()
    return Job(lambda: fantastic_four(w, groups=conv.groups))


def gram_ff(conv: nn.Conv2d, size: Size, cfg: Config) -> Job:
    """FF with each ``||M_A||_2`` replaced by its Gram-iteration upper bound (6 steps).

    Singla & Feizi (ICLR 2021) with the Gram iteration of Delattre, Barthelemy, Araujo &
    Allauzen (ICML 2023): ``sqrt(prod k) * max_g min_A gram_iteration_bound(M_A)``, provable.
    """

    def run() -> Tensor:
        w = grouped_weight(conv.weight.detach(), conv.groups)
        per_subset = torch.stack(
            [gram_iteration_bound(matricize(w, a, batch_dims=1)) for a in row_subsets(2)]
        )  # (2^d, g)
        return math.sqrt(math.prod(conv.kernel_size)) * per_subset.min(0).values.max()

    return Job(run)


def tightest(conv: nn.Conv2d, size: Size, cfg: Config) -> Job:
    """Every provable bound of ``layer_bounds``, by name; the table takes their minimum.

    Singla & Feizi (ICLR 2021), frequency bounds after Sedghi, Gupta & Long (ICLR 2019), the
    Gram-kernel bound of Delattre et al. (2024), and their polyphase forms for strided layers.
    """

    def run() -> dict[str, Tensor]:
        with torch.no_grad():
            return layer_bounds(conv, input_size=size)

    return Job(run)


def grid_gram(conv: nn.Conv2d, size: Size, cfg: Config) -> Job:
    """The grid Gram bound of ``layer_bounds`` alone: ``polyphase_grid_gram`` for strided
    layers, else ``grid_gram`` (Gram iteration per frequency on the circular embedding's DFT
    grid after Delattre et al., ICML 2023, with a Cholesky certificate and the rounding
    account; see ``docs/bounds.md``). Needs the input size; zero padding (factor 1)."""
    geo = Geometry(conv)
    strided = any(s > 1 for s in geo.stride)
    poly = polyphase_filter(conv.weight, geo.stride, geo.dilation) if strided else None

    def run() -> Tensor:
        with torch.no_grad():
            values = grid_bounds(geo, size, poly, None)
            if not values:  # single-tap filter: FF is its exact norm
                return fantastic_four(conv.weight, groups=conv.groups)
        return min(values.values(), key=float)

    return Job(run)


def fft(conv: nn.Conv2d, size: Size, cfg: Config) -> Job:
    """Exact norm of :func:`circular_standin` of ``conv`` at ``size`` by the FFT method.

    Sedghi, Gupta & Long (ICLR 2019). Exact for the circular stride-1 operator only: for a
    strided or zero-padded layer it is the norm of a different operator.
    """
    return Job(lambda: conv_spectral_norm(circular_standin(conv), size, method="fft"))


def op_power(conv: nn.Conv2d, size: Size, cfg: Config) -> Job:
    """Block power iteration on the real layer through the convolution and its adjoint.

    As in Farnia, Zhang & Tse (ICLR 2019) and Ryu et al. (ICML 2019); converges from below.
    """
    opts = {"tol": cfg.op_pi_tol, "max_iter": cfg.op_pi_max_iter, "seed": cfg.seed}
    return Job(lambda: conv_spectral_norm(conv, size, method="power", **opts))


def matrix(conv: nn.Conv2d, size: Size, cfg: Config) -> Job:
    """Exact norm of the layer's explicit operator matrix: the definition, no paper needed."""
    return Job(lambda: conv_spectral_norm(conv, size, method="matrix"))


@dataclass(frozen=True)
class Method:
    kind: str  # "P", "E" or "L"
    build: Callable[[nn.Conv2d, Size, Config], Job]
    filter_only: bool = False  # the value depends on the filter alone, not on the input size
    needs_size: bool = False  # only at a given input size (not in table 1)


# In table order.
METHODS: dict[str, Method] = {
    "FF-PI(1)": Method("L", partial(ff_power, n_iter=1), filter_only=True),
    "FF-PI(50)": Method("L", partial(ff_power, n_iter=50), filter_only=True),
    "FF": Method("P", ff, filter_only=True),
    "Gram-FF": Method("P", gram_ff, filter_only=True),
    "tightest": Method("P", tightest),
    "grid-Gram": Method("P", grid_gram, needs_size=True),
    "FFT": Method("E", fft),
    "op-PI": Method("L", op_power),
    "matrix": Method("E", matrix),
}
# The provable bounds of every table; SIZED_PROVABLE adds those of tables 2 and 3 only.
PROVABLE = [name for name, m in METHODS.items() if m.kind == "P" and not m.needs_size]
SIZED_PROVABLE = [name for name, m in METHODS.items() if m.kind == "P"]
FILTER_METHODS = [name for name, m in METHODS.items() if m.filter_only]
