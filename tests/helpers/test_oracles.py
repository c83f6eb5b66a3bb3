"""The test oracles against matrices written out by hand (they check the library elsewhere)."""

from __future__ import annotations

import torch
from torch import nn

from helpers.oracles import (
    fantastic_four_per_subset,
    matricize,
    operator_matrix,
    operator_norm,
    svd_norm,
)


def test_operator_matrix_of_a_zero_padded_conv1d_is_its_toeplitz_matrix() -> None:
    conv = nn.Conv1d(1, 1, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[1.0, 2.0, 3.0]]]))
        conv.bias.fill_(5.0)
    expected = torch.tensor(
        [[2.0, 3.0, 0.0, 0.0], [1.0, 2.0, 3.0, 0.0], [0.0, 1.0, 2.0, 3.0], [0.0, 0.0, 1.0, 2.0]],
        dtype=torch.float64,
    )
    assert torch.equal(operator_matrix(conv, (4,)), expected)
    assert conv.weight.dtype == torch.float32 and conv.bias is not None  # left untouched


def test_svd_norm_of_known_matrices() -> None:
    diag = torch.diag(torch.tensor([3.0, -7.0, 2.0]))
    assert svd_norm(diag).item() == 7.0
    rank_one = torch.outer(torch.tensor([3.0, 4.0]), torch.tensor([0.0, 1.0, 0.0]))
    assert abs(svd_norm(rank_one).item() - 5.0) < 1e-12
    # circular same-size [1, 1, 1] filter: a circulant whose symbol has modulus 3 at theta = 0
    conv = nn.Conv1d(1, 1, 3, padding=1, padding_mode="circular", bias=False)
    with torch.no_grad():
        conv.weight.fill_(1.0)
    assert abs(operator_norm(conv, (6,)).item() - 3.0) < 1e-12


def test_matricize_puts_row_axes_with_c_out() -> None:
    w = torch.arange(2 * 3 * 4 * 5, dtype=torch.float64).reshape(2, 3, 4, 5)
    m = matricize(w, [1])  # rows (c_out, k_2), columns (c_in, k_1)
    assert m.shape == (2 * 5, 3 * 4)
    o, i, a, b = 1, 2, 3, 4
    assert m[o * 5 + b, i * 4 + a] == w[o, i, a, b]
    ff = fantastic_four_per_subset(w)
    assert ff.shape == (4,)
    assert abs(ff[2].item() - svd_norm(m).item() * (4 * 5) ** 0.5) < 1e-9
