"""Exact (or converged) operator norms of convolution and linear layers: the references.

Three ways to get ``||J||_2`` of the linear map ``J`` a layer applies to inputs of a given
spatial size (bias ignored), used by tests, tightness reports and benchmarks:

* ``"fft"`` -- Sedghi, Gupta & Long (ICLR 2019). A circular convolution with stride 1 is
  block-diagonalized by the DFT: ``||J|| = max_theta ||P(theta)||_2`` with the
  ``c_out x c_in`` matrices ``P(theta) = sum_k L[:, :, k] exp(-i <theta, dil * k>)`` at
  the ``n_1 ... n_d`` frequencies ``theta_i = 2 pi f_i / n_i``. Exact; cost ``prod n``
  small eigenproblems (half of them, by the conjugate symmetry of a real filter).
* ``"power"`` -- power iteration on ``J^T J`` through the layer itself and its adjoint
  (a vector-Jacobian product, exact for any padding mode, stride, dilation, groups and
  transposed convolution; Ryu et al. 2019 do the same with ``conv_transpose``), with a
  small block of vectors for speed. It approaches the norm FROM BELOW (``||J X^T||``
  for orthonormal ``X``) and stops on a relative tolerance: a converged estimate, not a
  certificate.
* ``"matrix"`` -- the explicit matrix (the layer applied to the identity basis) and its
  exact spectral norm: ground truth for tiny sizes.
"""

from __future__ import annotations

import copy
import math
import warnings
from collections.abc import Sequence
from typing import cast

import torch
from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd

from .._checks import check_int
from .geometry import SUPPORTED_LAYERS, SupportedLayer
from .matricize import grouped_weight
from .norms import spectral_norm_exact
from .symbol import max_symbol_norm

__all__ = ["operator_matrix", "conv_spectral_norm", "MAX_MATRIX_ENTRIES"]


#: ``operator_matrix`` refuses operators with more entries than this (128 MiB in float64).
MAX_MATRIX_ENTRIES = 1 << 24
#: ``method="auto"`` uses the explicit matrix up to this many entries (an SVD-sized job).
_TINY_MATRIX_ENTRIES = 1 << 20
_METHODS = ("auto", "fft", "power", "matrix")
#: Vectors iterated together by the operator power method (one batched forward each).
_POWER_BLOCK = 8


def _supported(module: nn.Module) -> SupportedLayer:
    if not isinstance(module, SUPPORTED_LAYERS):
        names = ", ".join(f"nn.{t.__name__}" for t in SUPPORTED_LAYERS)
        raise TypeError(f"unsupported layer type {type(module).__name__}; supported: {names}")
    return cast(SupportedLayer, module)


def _input_shape(module: nn.Module, input_size: Sequence[int] | int | None) -> tuple[int, ...]:
    """``(channels, *spatial)`` of one input sample."""
    layer = _supported(module)
    if isinstance(layer, nn.Linear):
        if input_size not in (None, ()) and tuple(input_size) != ():  # type: ignore[arg-type]
            raise ValueError(f"nn.Linear takes no spatial input_size, got {input_size!r}")
        return (layer.in_features,)
    d = layer.weight.ndim - 2
    if input_size is None:
        raise ValueError(f"{type(module).__name__} needs input_size (a tuple of {d} ints)")
    size = (int(input_size),) * d if isinstance(input_size, int) else tuple(input_size)
    if len(size) != d or any(int(s) != s or s < 1 for s in size):
        raise ValueError(
            f"{type(module).__name__} needs input_size of {d} positive ints, got {input_size!r}"
        )
    return (layer.in_channels, *(int(s) for s in size))


def _float64_layer(module: SupportedLayer) -> SupportedLayer:
    """A float64 copy of the layer without bias, so that it applies exactly ``J``."""
    layer = copy.deepcopy(module)
    layer.bias = None
    layer.requires_grad_(False)
    return layer.to(torch.float64)


def _output_shape(layer: SupportedLayer, in_shape: tuple[int, ...]) -> tuple[int, ...]:
    try:  # shape inference without arithmetic
        meta = copy.deepcopy(layer).to("meta")
        return tuple(meta(torch.empty(1, *in_shape, device="meta")).shape[1:])
    except (NotImplementedError, RuntimeError):
        x = torch.zeros(1, *in_shape, dtype=torch.float64, device=layer.weight.device)
        with torch.no_grad():
            return tuple(layer(x).shape[1:])


def operator_matrix(module: nn.Module, input_size: Sequence[int] | int | None) -> Tensor:
    """The explicit float64 matrix of the layer's linear map (bias ignored).

    Rows index the flattened output ``(c_out, *out_size)``, columns the flattened input
    ``(c_in, *input_size)``; column ``j`` is the layer applied to the ``j``-th basis
    vector, so ``operator_matrix(m, n) @ x.flatten() == (m(x) - bias).flatten()``. Works
    for every padding mode, stride, dilation, groups and output_padding since it runs the
    layer's own forward. ``nn.Linear`` takes ``input_size=None`` (its matrix is the weight).
    Raises ``ValueError`` above ``MAX_MATRIX_ENTRIES`` entries.
    """
    in_shape = _input_shape(module, input_size)
    layer = _float64_layer(_supported(module))
    out_shape = _output_shape(layer, in_shape)
    n_in, n_out = math.prod(in_shape), math.prod(out_shape)
    if n_in * n_out > MAX_MATRIX_ENTRIES:
        raise ValueError(
            f"the operator of {type(module).__name__} on input {in_shape} is a {n_out} x {n_in} "
            f"matrix, above the cap of {MAX_MATRIX_ENTRIES} entries; use method='power' "
            "(or 'fft' for circular stride-1 layers)"
        )
    eye = torch.eye(n_in, dtype=torch.float64, device=layer.weight.device)
    with torch.no_grad():
        out = layer(eye.reshape(n_in, *in_shape))
    return out.reshape(n_in, n_out).T.contiguous()


def _fft_obstacle(
    module: SupportedLayer, in_shape: tuple[int, ...], out_shape: tuple[int, ...]
) -> str | None:
    """Why the FFT formula is not the exact norm of this layer (``None`` when it is).

    The formula needs a circular convolution with stride 1 whose output grid is the input
    grid. A convolution whose kernel reaches a single tap (every ``dilation*(k-1) = 0``)
    and has no padding is one too, whatever its padding mode, transposed or not.
    """
    if isinstance(module, nn.Linear):
        return "nn.Linear has no spatial axes (its matrix is the weight: use method='matrix')"
    single_tap = all(
        dil * (k - 1) == 0 for dil, k in zip(module.dilation, module.kernel_size, strict=True)
    )
    if not (module.padding_mode == "circular" or single_tap):
        return (
            f"padding_mode={module.padding_mode!r} is not circular (the FFT method is exact "
            "for circular padding only)"
        )
    if any(s != 1 for s in module.stride):
        return f"stride={tuple(module.stride)} is not 1"
    if out_shape[1:] != in_shape[1:]:
        return f"the output size {out_shape[1:]} differs from the input size {in_shape[1:]}"
    return None


def _fft_norm(module: _ConvNd, size: tuple[int, ...]) -> Tensor:
    """Sedghi et al.: ``max_theta ||P(theta)||_2`` over the DFT grid of ``size``, per group.

    :func:`.symbol.max_symbol_norm` evaluates ``P`` with explicit phases
    ``exp(-2 pi i f (dil k) / n)``, which also handles a dilated kernel wider than the input
    (taps alias, as the circular layer wraps them). Transposing and conjugating do not
    change singular values, and neither does the circular shift that asymmetric padding
    introduces, so cross-correlation vs convolution and the padding offset are irrelevant.
    A real filter has ``P(-theta) = conj P(theta)``: only half of the last axis' frequencies
    are needed.
    """
    w = grouped_weight(module.weight.detach().to(torch.float64), module.groups)
    return max_symbol_norm(w, size, module.dilation)


def _power_norm(
    layer: SupportedLayer, in_shape: tuple[int, ...], tol: float, max_iter: int, seed: int
) -> Tensor:
    """Block power (subspace) iteration on ``J^T J``; returns ``||J X^T||_2``, ``X`` orthonormal.

    ``J^T y`` is the vector-Jacobian product of the (linear) layer, so the adjoint is
    exact for every padding mode, stride, output_padding and group layout. ``b`` vectors
    travel together as one batch (one forward and one backward per step, about the cost
    of a single vector for small layers), ``X <- orth(J^T J X)`` by QR, and the value is
    the top Ritz value ``||J X^T||_2``: a lower bound of ``||J||`` at every step (``X`` has
    orthonormal rows), converging like ``(sigma_{b+1} / sigma_1)^(2t)`` instead of the
    single-vector ``(sigma_2 / sigma_1)^(2t)`` -- much faster when, as for convolutions,
    many singular values crowd near the top. Stops when the value changes by at most
    ``tol`` relative to itself, which may happen before convergence: an estimate from below.
    """
    device = layer.weight.device
    n_in = math.prod(in_shape)
    block = min(_POWER_BLOCK, n_in)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    start = torch.randn(n_in, block, generator=gen, dtype=torch.float64).to(device)
    x = torch.linalg.qr(start).Q.T.reshape(block, *in_shape)
    sigma = torch.zeros((), dtype=torch.float64, device=device)
    prev = 0.0
    for _ in range(max_iter):
        with torch.enable_grad():
            x.requires_grad_(True)
            y = layer(x)
            (ata_x,) = torch.autograd.grad(y, x, grad_outputs=y.detach())
        sigma = spectral_norm_exact(y.detach().reshape(block, -1))
        value = float(sigma)
        if value == 0.0:  # J X^T = 0 for a random (full-rank) start: J = 0
            return sigma
        x = torch.linalg.qr(ata_x.detach().reshape(block, n_in).T).Q.T.reshape(block, *in_shape)
        if abs(value - prev) <= tol * value:
            return sigma
        prev = value
    warnings.warn(
        f"operator power iteration did not reach rtol={tol} in {max_iter} iterations; "
        "the value is a lower bound of the norm",
        RuntimeWarning,
        stacklevel=3,
    )
    return sigma


def conv_spectral_norm(
    module: nn.Module,
    input_size: Sequence[int] | int | None,
    *,
    method: str = "auto",
    tol: float = 1e-7,
    max_iter: int = 1000,
    seed: int = 0,
) -> Tensor:
    """Spectral norm of the layer's operator on inputs of spatial size ``input_size``.

    Returns a 0-dim float64 tensor (no gradient). ``method``:

    * ``"fft"``: exact (Sedghi et al. 2019); circular padding (or a single-tap kernel
      without padding), stride 1, output size equal to input size; any dilation/groups.
    * ``"power"``: operator power iteration to relative tolerance ``tol`` (at most
      ``max_iter`` steps, start drawn from ``seed``); any layer. An estimate from BELOW.
    * ``"matrix"``: exact norm of :func:`operator_matrix` (up to ``MAX_MATRIX_ENTRIES``).
    * ``"auto"``: ``"fft"`` when it is exact, else ``"matrix"`` when the matrix is tiny
      (at most ``2^20`` entries; always for ``nn.Linear``), else ``"power"``.

    ``input_size`` is the spatial size without batch or channel axes (``None`` for
    ``nn.Linear``). Raises ``ValueError`` for a method that does not apply, naming why.
    """
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol!r}")
    check_int("max_iter", max_iter, low=1)
    in_shape = _input_shape(module, input_size)
    if isinstance(module, nn.Linear) and method in ("auto", "matrix"):
        return spectral_norm_exact(module.weight.detach())
    checked = _supported(module)
    layer = _float64_layer(checked)
    out_shape = _output_shape(layer, in_shape)
    if method in ("auto", "fft"):
        obstacle = _fft_obstacle(checked, in_shape, out_shape)
        if obstacle is None:  # only a convolution has none
            return _fft_norm(cast(_ConvNd, checked), in_shape[1:])
        if method == "fft":
            raise ValueError(f"method='fft' does not apply: {obstacle}; use 'power' or 'matrix'")
        tiny = math.prod(in_shape) * math.prod(out_shape) <= _TINY_MATRIX_ENTRIES
        method = "matrix" if tiny else "power"
    if method == "matrix":
        return spectral_norm_exact(operator_matrix(module, in_shape[1:] or None))
    return _power_norm(layer, in_shape, float(tol), int(max_iter), seed)
