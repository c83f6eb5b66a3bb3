"""What a supported layer does to its input grid, read from the module, and its polyphase form.

Every supported layer factors as ``J = Sel o C_N o E`` (see :mod:`.bounds`): :class:`Geometry`
reads the parts of that factorization from the module (kernel, stride, dilation, padding
mode and amounts, transposition) and gives the grid ``N``; :func:`polyphase_filter` rewrites a
strided convolution as a stride-1 one on a channel stack.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

from torch import Tensor, nn
from torch.nn.modules.conv import _ConvNd, _ConvTransposeNd

from .._checks import check_finite_weight
from .padding import PADDING_MODES

__all__ = [
    "SUPPORTED_LAYERS",
    "Geometry",
    "SupportedLayer",
    "gram_grid",
    "polyphase_filter",
    "polyphase_grid",
]

SUPPORTED_LAYERS: tuple[type, ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)
#: What ``isinstance(module, SUPPORTED_LAYERS)`` proves, for the type checker (which does not
#: narrow on a tuple held in a variable).
SupportedLayer = nn.Linear | _ConvNd


class Geometry:
    """What a layer does to the grid, read from the module."""

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, SUPPORTED_LAYERS):
            names = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
            raise TypeError(
                f"no spectral bound for {type(module).__name__}; supported layers: {names}"
            )
        layer = cast(SupportedLayer, module)
        weight = layer.weight
        check_finite_weight(weight, f"{type(module).__name__} weight")
        self.weight: Tensor = weight
        self.linear = isinstance(layer, nn.Linear)
        if isinstance(layer, nn.Linear):
            return
        self.transposed = isinstance(layer, _ConvTransposeNd)
        self.groups = int(layer.groups)
        self.kernel = [int(k) for k in weight.shape[2:]]
        d = len(self.kernel)
        self.stride = [int(s) for s in layer.stride]
        self.dilation = [int(x) for x in layer.dilation]
        self.mode = str(layer.padding_mode)
        if self.mode not in PADDING_MODES:
            raise ValueError(f"unknown padding_mode {self.mode!r}; expected one of {PADDING_MODES}")
        if self.transposed:
            if self.mode != "zeros":
                # torch's forward refuses this too; say so before computing anything.
                raise ValueError(
                    f"{type(module).__name__} only supports padding_mode='zeros', got {self.mode!r}"
                )
            self.pads = [(int(p), int(p)) for p in layer.padding]
            self.output_padding = [int(p) for p in layer.output_padding]
        else:
            # F.pad order (last axis first) also holds the left/right split of 'same'.
            rev = [int(p) for p in layer._reversed_padding_repeated_twice]
            self.pads = [(rev[2 * (d - 1 - j)], rev[2 * (d - 1 - j) + 1]) for j in range(d)]

    def ext(self, j: int) -> int:
        return self.dilation[j] * (self.kernel[j] - 1) + 1

    def grid(self, input_size: Sequence[int]) -> list[int]:
        """The ``N`` of ``J = Sel o C_N o E`` for this input size (see the module docstring)."""
        out = []
        for j, n in enumerate(input_size):
            s, ext, (pl, pr) = self.stride[j], self.ext(j), self.pads[j]
            if self.transposed:
                n_out = (n - 1) * s - pl - pr + ext + self.output_padding[j]
                if n_out < 1:
                    raise ValueError(f"input size {tuple(input_size)} gives an empty output")
                # adjoint of the conv reading j = i*s + dil*t - p, rows i < n, on n_out.
                out.append(pl + max(n_out, (n - 1) * s + ext - pl))
                continue
            o = (n + pl + pr - ext) // s + 1
            if n + pl + pr < ext:
                raise ValueError(f"input size {tuple(input_size)} is smaller than the kernel")
            if self.mode == "circular":
                out.append(n)
            elif self.mode == "zeros":
                out.append(pl + max(n, (o - 1) * s + ext - pl))
            else:  # valid conv on the padded input, restricted to the positions it reads
                out.append((o - 1) * s + ext)
        return out


def gram_grid(geo: Geometry, input_size: Sequence[int]) -> list[int]:
    """A grid ``N`` for ``J = Sel o C_N o E`` with the input embedded at ``[0, n)`` (zeros).

    Convolution reading ``x[i s + dil t - pl]`` (zero outside ``[0, n)``) for rows ``i < o``;
    the reads span ``j in [-pl, R - pl)``, ``R = (o - 1) s + ext``. Embed ``x`` at ``[0, n)``
    of the ``N``-grid and map row ``i`` to row ``(i s - pl) mod N`` of ``C_N``, which reads
    ``x~[(i s - pl + dil t) mod N]``. Claim: if ``N >= max(n + pl, R - pl)`` the non-zero rows
    of ``J`` are distinct rows of ``C_N E``, so ``||J|| <= ||C_N||`` (zero rows of ``J`` do
    not change ``J^T J``). Proof: a read ``j in [-pl, 0)`` lands on ``j + N in [N - pl, N)``,
    outside ``[0, n)`` as ``N - pl >= n``; a read ``j in [n, R - pl)`` does not wrap as
    ``R - pl <= N``; so every row reads exactly the layer's taps. A row is non-zero only if
    some read hits ``[0, n)``, i.e. ``i s in [0, pl + n - 1]``: a span below ``N``, so two
    such rows never share ``(i s - pl) mod N``. Since ``R <= n + pl + pr``, ``N = n +
    max(pl, pr)`` always qualifies, against ``n + pl + pr`` for the grid of :meth:`Geometry.grid`
    (which embeds the padded input without the shift). Transposed convolutions: the same
    for the convolution they are the adjoint of (input length ``n_out``, rows ``i < n``).
    Other padding modes: :meth:`Geometry.grid`.
    """
    base = geo.grid(input_size)  # also validates the size
    if not (geo.transposed or geo.mode == "zeros"):
        return base
    out = []
    for j, n in enumerate(input_size):
        s, ext, (pl, pr) = geo.stride[j], geo.ext(j), geo.pads[j]
        if geo.transposed:
            n_in = (n - 1) * s - pl - pr + ext + geo.output_padding[j]
            reach = (n - 1) * s + ext
        else:
            n_in = n
            reach = ((n + pl + pr - ext) // s) * s + ext
        out.append(max(n_in + pl, reach - pl, 1))
    return out


def polyphase_grid(geo: Geometry, input_size: Sequence[int]) -> list[int]:
    """``ceil(N_j / s_j)`` for the ``N`` of :meth:`Geometry.grid`: the grid of the polyphase
    filter (:func:`polyphase_filter`). Any grid at least ``N`` embeds the layer (nothing read
    wraps around), in particular ``s ceil(N / s)``; a strided circular convolution on it is a
    stride-1 circular convolution of the polyphase filter on the ``N / s`` grid of the
    channel stack, an isometric re-indexing of the input."""
    return [-(-m // s) for m, s in zip(geo.grid(input_size), geo.stride, strict=True)]


def polyphase_filter(weight: Tensor, stride: Sequence[int], dilation: Sequence[int]) -> Tensor:
    """The stride-1 filter of a strided convolution's polyphase form.

    Along an axis with stride ``s``, write the (dilated) tap offset ``dil * t = s q + r``,
    ``0 <= r < s``. Output ``y[i] = sum_t W_t xp[s i + dil t]`` of the padded input ``xp``
    becomes ``sum_r sum_q W'_{r, q} xp_r[i + q]`` with ``xp_r[m] = xp[s m + r]``: a
    stride-1, undilated convolution of the ``s``-fold channel stack ``(xp_r)_r`` by the
    filter ``W'`` of shape ``(c_out, c_in * prod s, *ceil(ext / s))``. The map
    ``xp -> (xp_r)_r`` only re-indexes pixels (an isometry), so every symbol bound of
    ``W'`` bounds the strided valid convolution, hence (times the padding factor of the
    zeros/reflect/replicate decomposition) the layer; and the adjoint for transposed
    convolutions. Channel order keeps each group's input channels together, so grouped
    filters stay block diagonal over groups. Axes with stride 1 are left as they are.
    """
    w = weight
    d = w.ndim - 2
    c_out = w.shape[0]
    for j in range(d):
        s, dil = int(stride[j]), int(dilation[j])
        if s == 1:
            continue
        ax = 2 + j
        k = w.shape[ax]
        ext = dil * (k - 1) + 1
        kq = -(-ext // s)
        shape = list(w.shape)
        shape[ax] = kq * s
        dense = w.new_zeros(shape)
        dense.narrow(ax, 0, ext)[(slice(None),) * ax + (slice(None, None, dil),)] = w
        # (.., kq * s, ..) -> (.., kq, s, ..): tap q * s + r; then r joins the channels.
        dense = dense.reshape(*shape[:ax], kq, s, *shape[ax + 1 :])
        dense = dense.movedim(ax + 1, 2)  # (c_out, c_in', s, ..., kq, ...)
        w = dense.reshape(c_out, -1, *dense.shape[3:])
    return w
