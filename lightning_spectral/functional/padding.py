"""Norm factors of torch's non-zero padding modes.

``nn.ConvNd`` with ``padding_mode`` in ``circular / reflect / replicate`` computes
``conv_valid(F.pad(x, module._reversed_padding_repeated_twice, mode))``. Along one axis,
write ``n`` for the input length, ``pl, pr`` for the left/right padding, ``k, s, dil`` for
kernel size, stride and dilation, ``ext = dil * (k - 1) + 1`` for the dilated extent and
``o = (n + pl + pr - ext) // s + 1`` for the output length.

* reflect / replicate: every padded position ``p`` holds a copy of one input pixel
  ``src(p)``. Only the positions ``R = {i*s + dil*t}`` that the valid convolution reads
  matter, so the layer is ``conv_R o Pad_R`` with ``Pad_R`` the 0/1 matrix with one 1 per
  row ``p in R`` (at column ``src(p)``). Its columns have disjoint supports, so
  ``Pad_R^T Pad_R`` is diagonal with the copy counts on the diagonal and
  ``||Pad_R||_2 = sqrt(max copy count)``. In ``d`` dimensions ``Pad_R`` is the Kronecker
  product of the per-axis matrices (tensored with the identity on channels), so the
  norms multiply.
* circular: output ``i`` reads ``x[(i*s + dil*t - pl) mod n]``, which is row
  ``(i*s - pl) mod n`` of the circular convolution ``C_n`` on the ``n``-grid. Hence the
  layer is ``Sel o C_n`` with ``Sel`` a 0/1 row selection whose norm is
  ``sqrt(max multiplicity of a selected row)``; 1 for the usual same-size padding.

The factors returned here are those square roots' squares (integers); callers take
``sqrt(prod over axes)``.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["axis_count", "worst_axis_count", "padding_factor", "PADDING_MODES"]

PADDING_MODES = ("zeros", "circular", "reflect", "replicate")


def _accepted(mode: str, n: int, pl: int, pr: int, ext: int) -> bool:
    """Whether torch accepts input length ``n`` (checked against ``F.pad`` and ``conv``)."""
    if n < 1 or n + pl + pr < ext:
        return False
    if mode == "circular":
        return pl <= n and pr <= n
    if mode == "reflect":
        return pl < n and pr < n
    return True


def _src(mode: str, p: int, n: int, pl: int) -> int:
    j = p - pl
    if mode == "replicate":
        return min(max(j, 0), n - 1)
    if mode == "reflect":
        if j < 0:
            return -j
        if j >= n:
            return 2 * (n - 1) - j
        return j
    return j % n  # circular


def axis_count(
    mode: str, n: int, k: int, stride: int, dilation: int, pl: int, pr: int
) -> int | None:
    """Exact squared norm factor of one axis for input length ``n`` (None if torch rejects).

    ``zeros``: 1. ``circular``: the largest number of outputs that read the same row of
    ``C_n``. ``reflect``/``replicate``: the largest number of read padded positions that
    copy one input pixel.
    """
    if mode == "zeros":
        return 1
    ext = dilation * (k - 1) + 1
    if not _accepted(mode, n, pl, pr, ext):
        return None
    o = (n + pl + pr - ext) // stride + 1
    counts: dict[int, int] = {}
    if mode == "circular":
        for i in range(o):
            r = (i * stride - pl) % n
            counts[r] = counts.get(r, 0) + 1
    else:
        read = {i * stride + dilation * t for i in range(o) for t in range(k)}
        for p in read:
            r = _src(mode, p, n, pl)
            counts[r] = counts.get(r, 0) + 1
    return max(counts.values())


def worst_axis_count(mode: str, k: int, stride: int, dilation: int, pl: int, pr: int) -> int:
    """Largest ``axis_count`` over every input length torch accepts.

    Lengths below a threshold are enumerated exactly; above it a count that holds for
    all larger lengths is used (it ignores the stride's unread positions, so it can only
    be larger than the exact count):

    * circular, threshold ``e = pl + pr - ext + 1``: the read rows ``i*s - pl`` lie in an
      interval of ``n + e`` integers; for ``n > e`` at most two of them share a residue
      mod ``n`` (one if ``e <= 0``).
    * replicate, threshold 2: for ``n >= 2`` pixel 0 takes the ``pl`` left copies and pixel
      ``n-1`` the ``pr`` right ones, so the count is at most ``1 + max(pl, pr)``.
    * reflect, threshold ``pl + pr + 2``: beyond it the pixels copied by the left padding
      (``1..pl``) and by the right padding (``n-1-pr..n-2``) are disjoint: count <= 2.
    """
    if mode == "zeros":
        return 1
    ext = dilation * (k - 1) + 1
    if mode == "circular":
        threshold = pl + pr - ext + 1
        tail = 2 if threshold > 0 else 1
    elif mode == "replicate":
        threshold = 1
        tail = 1 + max(pl, pr)
    elif mode == "reflect":
        threshold = pl + pr + 1
        tail = 2 if max(pl, pr) > 0 else 1
    else:
        raise ValueError(f"unknown padding_mode {mode!r}; expected one of {PADDING_MODES}")
    worst = tail
    for n in range(1, max(threshold, 0) + 1):
        c = axis_count(mode, n, k, stride, dilation, pl, pr)
        if c is not None:
            worst = max(worst, c)
    return worst


def padding_factor(
    mode: str,
    kernel: Sequence[int],
    stride: Sequence[int],
    dilation: Sequence[int],
    pads: Sequence[tuple[int, int]],
    input_size: Sequence[int] | None = None,
) -> float:
    """``sqrt(prod_j count_j)``: the norm of the padding (or row selection) operator.

    With ``input_size`` the counts are exact for that size; without, they are the worst
    case over every input size torch accepts. Raises ValueError when torch would reject
    ``input_size``.
    """
    if mode not in PADDING_MODES:
        raise ValueError(f"unknown padding_mode {mode!r}; expected one of {PADDING_MODES}")
    total = 1
    for j, (k, s, dl, (pl, pr)) in enumerate(zip(kernel, stride, dilation, pads, strict=True)):
        if input_size is None:
            total *= worst_axis_count(mode, k, s, dl, pl, pr)
        else:
            c = axis_count(mode, int(input_size[j]), k, s, dl, pl, pr)
            if c is None:
                raise ValueError(
                    f"input size {tuple(input_size)} is rejected by torch for "
                    f"padding_mode={mode!r} with padding {tuple(pads)} on axis {j}"
                )
            total *= c
    return float(total) ** 0.5
