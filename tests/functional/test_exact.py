"""Exact references: FFT norm and operator power iteration against explicit matrices."""

from __future__ import annotations

import pytest
import torch
from helpers.oracles import operator_matrix as oracle_matrix
from helpers.oracles import operator_norm
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_spectral.functional import exact
from lightning_spectral.functional.bounds import circular_grid_norm
from lightning_spectral.functional.exact import conv_spectral_norm, operator_matrix
from lightning_spectral.functional.opnorm import ROUNDING_MARGIN

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
TCONV = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


@pytest.mark.parametrize(
    ("module", "size"),
    [
        (nn.Conv2d(2, 3, 3, padding=1, padding_mode="reflect", stride=2), (5, 4)),
        (nn.Conv1d(4, 2, 2, dilation=2, groups=2, padding=3, padding_mode="replicate"), (6,)),
        (nn.ConvTranspose2d(4, 2, 3, stride=2, padding=1, output_padding=1, groups=2), (3, 3)),
        (nn.Conv3d(1, 2, 2, padding=1, padding_mode="circular"), (2, 3, 2)),
        (nn.Linear(5, 3), None),
    ],
)
def test_operator_matrix_matches_column_by_column_construction(module, size):
    m = operator_matrix(module, size)
    assert m.dtype == torch.float64
    torch.testing.assert_close(m, oracle_matrix(module, size), rtol=1e-12, atol=1e-12)
    if size is None:
        torch.testing.assert_close(m, module.weight.double())


def test_transposed_conv_matrix_is_the_adjoint():
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=False)
    tconv = nn.ConvTranspose2d(6, 4, 3, stride=2, padding=1, groups=2, bias=False)
    tconv.weight.data.copy_(conv.weight.data)  # ConvTranspose stores the conv's filter
    forward = operator_matrix(conv, (5, 5))  # output 3 x 3
    torch.testing.assert_close(operator_matrix(tconv, (3, 3)), forward.T)


@settings(max_examples=25)
@given(
    d=st.integers(1, 3),
    groups=st.integers(1, 2),
    c_out_per=st.integers(1, 3),
    c_in_per=st.integers(1, 3),
    data=st.data(),
)
def test_fft_equals_explicit_matrix_norm(d, groups, c_out_per, c_in_per, data):
    kernel = tuple(data.draw(st.integers(1, 3)) for _ in range(d))
    dilation = tuple(data.draw(st.integers(1, 2)) for _ in range(d))
    max_side = {1: 8, 2: 5, 3: 3}[d]
    # circular padding may wrap at most once: the input must be at least half the extent
    size = tuple(
        data.draw(st.integers(max(1, (dil * (k - 1) + 1) // 2 + 1), max_side + 1))
        for k, dil in zip(kernel, dilation, strict=True)
    )
    module = CONV[d](
        c_in_per * groups,
        c_out_per * groups,
        kernel,
        dilation=dilation,
        groups=groups,
        padding="same",
        padding_mode="circular",
    ).double()
    with torch.no_grad():
        module.weight.mul_(10.0 ** data.draw(st.integers(-3, 3)))
    fft = conv_spectral_norm(module, size, method="fft")
    assert fft.dtype == torch.float64 and fft.ndim == 0
    ref = operator_norm(module, size).item()
    assert fft.item() == pytest.approx(ref, rel=1e-10)
    assert conv_spectral_norm(module, size).item() == fft.item()  # auto picks fft


def test_fft_single_tap_zero_padding_and_aliasing_dilation():
    one_by_one = nn.Conv2d(3, 5, 1)
    assert conv_spectral_norm(one_by_one, (4, 4), method="fft").item() == pytest.approx(
        operator_norm(one_by_one, (4, 4)).item(), rel=1e-10
    )
    # Dilated taps wider than the input wrap around more than once in the DFT: they alias.
    wide = nn.Conv1d(2, 2, 3, dilation=4, padding=4, padding_mode="circular")
    assert conv_spectral_norm(wide, (5,), method="fft").item() == pytest.approx(
        operator_norm(wide, (5,)).item(), rel=1e-10
    )


def test_fft_matches_power_iteration_at_a_larger_size():
    module = nn.Conv2d(8, 8, 3, padding=1, padding_mode="circular")
    fft = conv_spectral_norm(module, (16, 16), method="fft").item()
    power = conv_spectral_norm(module, (16, 16), method="power", tol=1e-12, max_iter=3000).item()
    assert power <= fft * (1 + 1e-12)
    assert power == pytest.approx(fft, rel=1e-4)


@pytest.mark.parametrize(
    ("module", "size"),
    [
        (nn.Conv2d(3, 4, 3, padding=1), (6, 5)),
        (nn.Conv2d(3, 4, 3, padding=2, padding_mode="reflect"), (6, 6)),
        (nn.Conv2d(2, 4, 3, padding=1, padding_mode="replicate", stride=2), (7, 6)),
        (nn.Conv1d(4, 4, 5, stride=3, dilation=2, groups=2, padding=3), (17,)),
        (nn.Conv3d(2, 2, 2, padding=1, padding_mode="replicate"), (3, 3, 3)),
        (nn.ConvTranspose2d(3, 2, 3, stride=2, padding=1, output_padding=1), (4, 4)),
        (nn.ConvTranspose1d(4, 6, 4, stride=3, dilation=2, groups=2), (5,)),
        (nn.Linear(6, 4), None),
    ],
)
def test_power_iteration_converges_to_explicit_norm(module, size):
    ref = operator_norm(module, size).item()
    power = conv_spectral_norm(module, size, method="power", tol=1e-13, max_iter=20000).item()
    assert power <= ref * (1 + 1e-12)
    assert power == pytest.approx(ref, rel=1e-6)
    assert conv_spectral_norm(module, size, method="matrix").item() == pytest.approx(ref, rel=1e-12)


def test_auto_falls_back_to_power_for_large_operators():
    module = nn.Conv2d(4, 4, 3, padding=1)
    size = (24, 24)  # 2304 x 2304 > the 2^20-entry threshold for the explicit matrix
    auto = conv_spectral_norm(module, size, tol=1e-6)
    assert auto.item() == conv_spectral_norm(module, size, method="power", tol=1e-6).item()


def test_power_iteration_is_deterministic_and_warns_when_not_converged():
    module = nn.Conv2d(3, 3, 3, padding=1)
    a = conv_spectral_norm(module, (6, 6), method="power", seed=3)
    b = conv_spectral_norm(module, (6, 6), method="power", seed=3)
    assert a.item() == b.item()
    with pytest.warns(RuntimeWarning, match="did not reach"):
        conv_spectral_norm(module, (6, 6), method="power", tol=1e-300, max_iter=2)


def test_zero_layer():
    module = nn.Conv2d(2, 2, 3, padding=1)
    nn.init.zeros_(module.weight)
    for method in ("power", "matrix"):
        assert conv_spectral_norm(module, (4, 4), method=method).item() == 0.0


def test_errors_name_the_problem():
    zeros = nn.Conv2d(2, 2, 3, padding=1)
    with pytest.raises(ValueError, match="not circular"):
        conv_spectral_norm(zeros, (4, 4), method="fft")
    strided = nn.Conv2d(2, 2, 3, padding=1, stride=2, padding_mode="circular")
    with pytest.raises(ValueError, match="stride"):
        conv_spectral_norm(strided, (4, 4), method="fft")
    shrinking = nn.Conv2d(2, 2, 3, padding_mode="circular")
    with pytest.raises(ValueError, match="output size"):
        conv_spectral_norm(shrinking, (4, 4), method="fft")
    with pytest.raises(ValueError, match="no spatial axes"):
        conv_spectral_norm(nn.Linear(2, 2), None, method="fft")
    with pytest.raises(ValueError, match="method must be one of"):
        conv_spectral_norm(zeros, (4, 4), method="svd")
    with pytest.raises(ValueError, match="tol"):
        conv_spectral_norm(zeros, (4, 4), tol=0)
    with pytest.raises(ValueError, match="max_iter"):
        conv_spectral_norm(zeros, (4, 4), max_iter=0)
    with pytest.raises(ValueError, match="input_size of 2 positive ints"):
        conv_spectral_norm(zeros, (4,))
    with pytest.raises(ValueError, match="needs input_size"):
        operator_matrix(zeros, None)
    with pytest.raises(TypeError, match=r"unsupported layer type ReLU; supported: nn\.Conv1d"):
        conv_spectral_norm(nn.ReLU(), (4, 4))
    big = (64, 64)  # a 8192 x 8192 matrix: refused before anything is allocated
    assert 8192**2 > exact.MAX_MATRIX_ENTRIES
    with pytest.raises(ValueError, match="above the cap"):
        operator_matrix(zeros, big)
    with pytest.raises(ValueError, match="above the cap"):
        conv_spectral_norm(zeros, big, method="matrix")


def test_fft_reference_and_circular_bound_are_one_computation():
    """The exact FFT norm and the guaranteed circular-grid norm evaluate the same symbol on the
    same grid: the bound is the reference times its rounding margin, bit for bit (large
    grid and dilation, where phases reduced before or after the product differ)."""
    size = (37, 41)
    gen = torch.Generator().manual_seed(0)
    for _ in range(4):
        conv = nn.Conv2d(3, 4, 3, dilation=5, padding=5, padding_mode="circular").double()
        with torch.no_grad():
            conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen, dtype=torch.float64))
        reference = conv_spectral_norm(conv, size, method="fft")
        bound = circular_grid_norm(conv.weight.detach(), size, dilation=conv.dilation)
        assert bound.item() == (reference * (1 + ROUNDING_MARGIN)).item()
