"""What a supported layer does to its input grid, read from the module, and its polyphase form.

Every supported layer factors as ``J = Sel o C_N o E`` (see :mod:`.bounds`): :class:`Geometry`
reads the parts of that factorization from the module (kernel, stride, dilation, padding
mode and amounts, transposition) and gives the grid ``N``; :func:`polyphase_filter` rewrites a
strided convolution as a stride-1 one on a channel stack.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from ._args import check_finite
from .padding import PADDING_MODES

__all__ = ["SUPPORTED_LAYERS", "Geometry", "polyphase_filter"]

SUPPORTED_LAYERS: tuple[type, ...] = (
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
    nn.Linear,
)


class Geometry:
    """What a layer does to the grid, read from the module."""

    def __init__(self, module: nn.Module) -> None:
        if not isinstance(module, SUPPORTED_LAYERS):
            names = ", ".join(t.__name__ for t in SUPPORTED_LAYERS)
            raise TypeError(
                f"no spectral bound for {type(module).__name__}; supported layers: {names}"
            )
        weight = module.weight
        check_finite(weight, f"{type(module).__name__} weight")
        self.weight: Tensor = weight
        self.linear = isinstance(module, nn.Linear)
        if self.linear:
            return
        self.transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        self.groups = int(module.groups)
        self.kernel = [int(k) for k in weight.shape[2:]]
        d = len(self.kernel)
        self.stride = [int(s) for s in module.stride]
        self.dilation = [int(x) for x in module.dilation]
        self.mode = str(module.padding_mode)
        if self.mode not in PADDING_MODES:
            raise ValueError(f"unknown padding_mode {self.mode!r}; expected one of {PADDING_MODES}")
        if self.transposed:
            if self.mode != "zeros":
                # torch's forward refuses this too; say so before computing anything.
                raise ValueError(
                    f"{type(module).__name__} only supports padding_mode='zeros', got {self.mode!r}"
                )
            self.pads = [(int(p), int(p)) for p in module.padding]
            self.output_padding = [int(p) for p in module.output_padding]
        else:
            # F.pad order (last axis first) also holds the left/right split of 'same'.
            rev = [int(p) for p in module._reversed_padding_repeated_twice]
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
