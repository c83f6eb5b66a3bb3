"""Soundness and tightness of the provable bounds, against explicit operator matrices."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.oracles import fantastic_four_per_subset, operator_matrix, operator_norm
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import nn

from lightning_spectral.functional.bounds import (
    SUPPORTED_LAYERS,
    circular_grid_norm,
    fantastic_four,
    gram_kernel_bound,
    layer_bounds,
    layer_spectral_bound,
    polyphase_filter,
    sampled_symbol_bound,
    tap_sum_bound,
)

# No tolerance: every bound carries its own margin over float64 rounding (opnorm.ROUNDING_MARGIN).
REL = 0.0

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
CONV_T = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}


# ----------------------------------------------------------------------------- fantastic four


def test_fantastic_four_matches_paper_matrices_2d() -> None:
    w = torch.randn(5, 3, 2, 4, dtype=torch.float64)
    c_out, c_in, h, wd = w.shape
    r = w.permute(0, 2, 1, 3).reshape(c_out * h, c_in * wd)
    s = w.permute(0, 3, 1, 2).reshape(c_out * wd, c_in * h)
    t = w.reshape(c_out, c_in * h * wd)
    u = w.permute(0, 2, 3, 1).reshape(c_out * h * wd, c_in)
    norms = {
        n: torch.linalg.matrix_norm(m, ord=2).item() * math.sqrt(h * wd)
        for n, m in zip("RSTU", (r, s, t, u), strict=True)
    }
    got = fantastic_four(w, reduction="none")
    # row_subsets order: (), (0,), (1,), (0, 1) = T, R, S, U
    expected = [norms["T"], norms["R"], norms["S"], norms["U"]]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64))
    assert fantastic_four(w).item() == pytest.approx(min(expected), rel=1e-12)


@pytest.mark.parametrize(
    "shape, groups",
    [
        ((4, 3), 1),
        ((6, 2), 3),
        ((4, 3, 5), 1),
        ((6, 2, 3), 2),
        ((4, 2, 3, 2), 2),
        ((3, 2, 2, 3, 2), 1),
        ((4, 1, 2, 2, 3), 4),
    ],
)
def test_fantastic_four_matches_loop_reference(shape, groups) -> None:
    w = torch.randn(*shape, dtype=torch.float32)
    ref = fantastic_four_per_subset(w, groups)
    got = fantastic_four(w, groups=groups, reduction="none")
    assert got.dtype == torch.float64 and got.shape == ref.shape
    torch.testing.assert_close(got, ref)
    # "min": max over groups of the per-group minimum (never above min over A of the max)
    per_group = [
        fantastic_four_per_subset(w[g * shape[0] // groups : (g + 1) * shape[0] // groups])
        .min()
        .item()
        for g in range(groups)
    ]
    assert fantastic_four(w, groups=groups).item() == pytest.approx(max(per_group), rel=1e-10)
    assert fantastic_four(w, groups=groups).item() <= ref.min().item() * (1 + 1e-12)


def test_gradcheck() -> None:
    w = torch.randn(4, 2, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: fantastic_four(x, groups=2), (w,))
    assert torch.autograd.gradcheck(lambda x: fantastic_four(x, reduction="none"), (w,))
    assert torch.autograd.gradcheck(lambda x: tap_sum_bound(x, groups=2), (w,))
    assert torch.autograd.gradcheck(lambda x: gram_kernel_bound(x, n_steps=2), (w,))
    assert torch.autograd.gradcheck(lambda x: sampled_symbol_bound(x, (9, 7)), (w,))
    assert torch.autograd.gradcheck(lambda x: circular_grid_norm(x, (5, 4), dilation=(2, 1)), (w,))
    lin = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(fantastic_four, (lin,))


def test_layer_bound_is_differentiable() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect").double()
    bound = layer_spectral_bound(conv)
    assert bound.dtype == torch.float64 and bound.ndim == 0
    bound.backward()
    assert conv.weight.grad is not None and torch.isfinite(conv.weight.grad).all()
    assert conv.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- errors


def test_errors() -> None:
    with pytest.raises(ValueError, match="reduction"):
        fantastic_four(torch.randn(2, 2, 3), reduction="max")
    with pytest.raises(TypeError, match=r"BatchNorm2d.*Conv2d.*ConvTranspose3d.*Linear"):
        layer_spectral_bound(nn.BatchNorm2d(3))
    with pytest.raises(TypeError, match="ReLU"):
        layer_bounds(nn.ReLU())
    for bad in (float("nan"), float("inf")):
        conv = nn.Conv2d(2, 2, 3)
        with torch.no_grad():
            conv.weight[0, 0, 1, 1] = bad
        with pytest.raises(ValueError, match="non-finite.*NaN or Inf"):
            layer_spectral_bound(conv)
        with pytest.raises(ValueError, match="non-finite"):
            fantastic_four(conv.weight)
    lin = nn.Linear(3, 2)
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="Linear weight contains non-finite"):
        layer_spectral_bound(lin)
    convt = nn.ConvTranspose2d(2, 2, 3)
    convt.padding_mode = "reflect"  # the constructor refuses it; torch's forward does too
    with pytest.raises(ValueError, match="only supports padding_mode='zeros'"):
        layer_bounds(convt)
    with pytest.raises(ValueError, match="input_size"):
        layer_bounds(nn.Conv2d(2, 2, 3), (5,))
    assert nn.Conv2d in SUPPORTED_LAYERS and nn.Linear in SUPPORTED_LAYERS


def test_extreme_scales_neither_overflow_nor_underflow() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1).double()
    base = {k: v.item() for k, v in layer_bounds(conv).items()}
    base_gram = gram_kernel_bound(conv.weight, n_steps=2).item()
    w0 = conv.weight.detach().clone()
    for scale in (1e200, 1e-200):
        conv.weight.data = w0 * scale
        for name, value in layer_bounds(conv).items():
            assert value.item() / scale == pytest.approx(base[name], rel=1e-9), name
        got = gram_kernel_bound(conv.weight, n_steps=2).item() / scale
        assert got == pytest.approx(base_gram, rel=1e-9)


def test_cost_cap() -> None:
    conv = nn.Conv2d(3, 4, 3, padding=1)
    assert set(layer_bounds(conv, max_cost=0)) == {"fantastic_four", "tap_sum"}
    assert set(layer_bounds(nn.Conv2d(3, 4, 1), (5, 5), max_cost=0)) == {
        "fantastic_four",
        "tap_sum",
    }
    assert {"sampled_frequency", "fft"} <= set(layer_bounds(conv, (5, 5), max_cost=1e12))
    # the default keeps the exact grid norm off for large inputs
    assert "fft" not in layer_bounds(nn.Conv2d(16, 16, 3, padding=1), (224, 224))


# ----------------------------------------------------------------------------- tightness


@pytest.mark.parametrize("d", [1, 2, 3])
def test_pointwise_conv_is_exact(d) -> None:
    conv = CONV[d](5, 3, 1, padding=1, groups=1)
    size = (4,) * d if d < 3 else (3, 2, 2)
    exact = operator_norm(conv, size).item()
    assert fantastic_four(conv.weight).item() == pytest.approx(exact, rel=1e-9)
    assert layer_spectral_bound(conv).item() == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("d, k", [(1, 3), (1, 4), (2, 3), (2, 2)])
def test_circular_same_padding_fft_is_exact(d, k) -> None:
    size = (7,) * d
    conv = CONV[d](3, 4, k, padding="same", padding_mode="circular", dilation=2)
    bounds = layer_bounds(conv, size)
    assert bounds["fft"].item() == pytest.approx(operator_norm(conv, size).item(), rel=1e-9)
    assert layer_spectral_bound(conv, size).item() == pytest.approx(bounds["fft"].item())


def test_linear_is_exact() -> None:
    lin = nn.Linear(7, 4)
    got = layer_spectral_bound(lin)
    assert got.item() == pytest.approx(operator_norm(lin).item(), rel=1e-12)


def test_sampled_bound_is_tight_on_random_filters() -> None:
    conv = nn.Conv2d(8, 8, 3, padding=1)
    bounds = layer_bounds(conv)
    # sup_theta ||P(theta)|| on a fine grid is within the documented 5% inflation
    fine = circular_grid_norm(conv.weight, (64, 64)).item()
    assert fine <= bounds["sampled_frequency"].item() <= 1.06 * fine
    assert layer_spectral_bound(conv).item() < 0.9 * bounds["fantastic_four"].item()


def test_convtranspose_is_adjoint_of_cropped_conv() -> None:
    # ConvTranspose = (conv on the output size, same stride/padding/dilation, rows < n)^T;
    # output_padding extends the output on the right.
    for stride, pad, out_pad, dil in [(2, 1, 1, 1), (1, 2, 1, 2), (3, 0, 2, 1), (2, 3, 0, 2)]:
        convt = nn.ConvTranspose1d(
            2, 3, 3, stride=stride, padding=pad, output_padding=out_pad, dilation=dil, bias=False
        ).double()
        n = 4
        n_out = (n - 1) * stride - 2 * pad + dil * 2 + out_pad + 1
        conv = nn.Conv1d(3, 2, 3, stride=stride, padding=pad, dilation=dil, bias=False).double()
        conv.weight.data = convt.weight.data.clone()
        jt = operator_matrix(convt, (n,)).reshape(3, n_out, 2, n)
        jc = operator_matrix(conv, (n_out,))
        rows = jc.shape[0] // 2
        jc = jc.reshape(2, rows, 3, n_out)[:, :n]
        torch.testing.assert_close(jt, jc.permute(2, 3, 0, 1))


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@pytest.mark.parametrize("k, dil", [(2, 1), (4, 1), (2, 3), (3, 2), (4, 2)])
def test_same_padding_split_is_the_modules_f_pad_order(k, dil) -> None:
    # layer_bounds reads the left/right split of padding='same' from
    # _reversed_padding_repeated_twice; torch's zero-padded 'same' must agree with it.
    conv = nn.Conv1d(2, 3, k, padding="same", dilation=dil, bias=False).double()
    x = torch.randn(4, 2, 7, dtype=torch.float64)
    padded = torch.nn.functional.pad(x, conv._reversed_padding_repeated_twice)
    expected = torch.nn.functional.conv1d(padded, conv.weight, dilation=dil)
    with torch.no_grad():
        torch.testing.assert_close(conv(x), expected)


@pytest.mark.parametrize(
    "stride, dil, pl, pr, n", [(1, 1, 1, 1, 5), (2, 1, 2, 0, 6), (1, 2, 3, 1, 4), (3, 2, 0, 2, 7)]
)
def test_zero_padding_is_submatrix_of_circular(stride, dil, pl, pr, n) -> None:
    """J == rows (i*s - pl) mod N, columns [0, n) of the circular conv on the N-grid."""
    k = 3
    w = torch.randn(2, 3, k, dtype=torch.float64)
    ext = dil * (k - 1) + 1
    o = (n + pl + pr - ext) // stride + 1
    big_n = pl + max(n, (o - 1) * stride + ext - pl)

    def apply(x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "zeros":
            xp = torch.nn.functional.pad(x, (pl, pr))
        else:
            xp = torch.nn.functional.pad(x, (0, ext - 1), mode="circular")
        return torch.nn.functional.conv1d(
            xp, w, stride=stride if mode == "zeros" else 1, dilation=dil
        )

    eye = torch.eye(3 * n, dtype=torch.float64).reshape(-1, 3, n)
    j = apply(eye, "zeros").reshape(3 * n, -1).T.reshape(2, o, 3, n)
    eye_big = torch.eye(3 * big_n, dtype=torch.float64).reshape(-1, 3, big_n)
    c = apply(eye_big, "circular").reshape(3 * big_n, -1).T.reshape(2, big_n, 3, big_n)
    rows = [(i * stride - pl) % big_n for i in range(o)]
    torch.testing.assert_close(j, c[:, rows][:, :, :, :n])


# ----------------------------------------------------------------------------- soundness


def _filter(draw, shape: tuple[int, ...]) -> torch.Tensor:
    kind = draw(st.sampled_from(["random", "rank_one", "sparse", "scales"]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(*shape, generator=gen, dtype=torch.float64)
    if kind == "rank_one":
        # one output pattern times one input/tap pattern
        a = torch.randn(shape[0], generator=gen, dtype=torch.float64)
        b = torch.randn(*shape[1:], generator=gen, dtype=torch.float64)
        w = a.view(-1, *([1] * (len(shape) - 1))) * b
    elif kind == "sparse":
        w = w * (torch.rand(*shape, generator=gen) < 0.2)
    elif kind == "scales":
        w = w * torch.pow(10.0, torch.randint(-6, 7, shape, generator=gen).double())
    return w


@st.composite
def layers(draw):
    kind = draw(st.sampled_from(["conv", "conv", "conv", "convt", "linear"]))
    if kind == "linear":
        lin = nn.Linear(draw(st.integers(1, 6)), draw(st.integers(1, 6)))
        lin.weight.data = _filter(draw, tuple(lin.weight.shape))
        return lin, ()
    d = draw(st.sampled_from([1, 1, 2, 2, 3]))
    groups = draw(st.sampled_from([1, 1, 2]))
    c_in = groups * draw(st.integers(1, 3))
    c_out = groups * draw(st.integers(1, 3))
    max_k = {1: 5, 2: 3, 3: 2}[d]
    kernel = tuple(draw(st.integers(1, max_k)) for _ in range(d))
    stride = tuple(draw(st.integers(1, 3)) for _ in range(d))
    dilation = tuple(draw(st.integers(1, 2)) for _ in range(d))
    max_n = {1: 9, 2: 5, 3: 3}[d]
    size = tuple(draw(st.integers(1, max_n)) for _ in range(d))
    if kind == "convt":
        padding = tuple(draw(st.integers(0, 2)) for _ in range(d))
        out_pad = tuple(
            draw(st.integers(0, max(s, dl) - 1)) for s, dl in zip(stride, dilation, strict=True)
        )
        layer = CONV_T[d](
            c_in,
            c_out,
            kernel,
            stride=stride,
            padding=padding,
            output_padding=out_pad,
            groups=groups,
            dilation=dilation,
        )
    else:
        mode = draw(st.sampled_from(["zeros", "circular", "reflect", "replicate"]))
        padding = draw(
            st.one_of(
                st.tuples(*[st.integers(0, 3) for _ in range(d)]),
                st.sampled_from(["same", "valid"]),
            )
        )
        if padding == "same":
            stride = (1,) * d
        layer = CONV[d](
            c_in,
            c_out,
            kernel,
            stride=stride,
            padding=padding,
            dilation=dilation,
            groups=groups,
            padding_mode=mode,
        )
    layer.weight.data = _filter(draw, tuple(layer.weight.shape))
    try:  # keep only input sizes torch accepts
        with torch.no_grad():
            layer.double()(torch.zeros(1, c_in, *size, dtype=torch.float64))
    except (RuntimeError, ValueError):
        assume(False)
    return layer, size


@pytest.mark.filterwarnings("ignore:Using padding='same'")
@settings(max_examples=120)
@given(layers())
def test_every_bound_is_sound(case) -> None:
    layer, size = case
    exact = operator_norm(layer, size).item()
    for given_size in (None, size):
        bounds = layer_bounds(layer, given_size)
        for name, value in bounds.items():
            assert value.dtype == torch.float64 and value.ndim == 0
            assert value.item() >= exact * (1 - REL), (name, given_size, value.item(), exact)
        best = layer_spectral_bound(layer, given_size)
        assert best.item() == pytest.approx(min(v.item() for v in bounds.values()), rel=1e-12)
        assert best.item() <= bounds.get("fantastic_four", best).item()
    if not isinstance(layer, nn.Linear) and layer.padding_mode == "zeros":
        # the optional symbol bounds directly, whether or not the cost cap keeps them
        w, groups = layer.weight, layer.groups
        for steps in (1, 2) if w.ndim < 5 else (1,):
            assert gram_kernel_bound(w, groups=groups, n_steps=steps).item() >= exact * (1 - REL)
        coarse = [3 * (k - 1) + 1 for k in w.shape[2:]]  # inflation 1.2-1.4 per axis
        assert sampled_symbol_bound(w, coarse, groups=groups).item() >= exact * (1 - REL)


@pytest.mark.parametrize(
    ("d", "k", "stride", "dil", "groups"),
    [(1, 3, 2, 1, 1), (1, 4, 3, 2, 2), (2, 3, 2, 1, 1), (2, 5, 2, 2, 3), (3, 3, 2, 1, 1)],
)
def test_polyphase_filter_reproduces_the_strided_convolution(d, k, stride, dil, groups) -> None:
    # y = conv(x, W, stride s) must equal the stride-1 convolution of the space-to-depth
    # rearrangement of x by polyphase_filter(W): the identity the polyphase bounds rest on.
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)[d - 1]
    layer = conv(2 * groups, groups, k, stride=stride, dilation=dil, groups=groups, bias=False)
    layer = layer.double()
    n = 4 * stride + dil * (k - 1) + 1
    x = torch.randn(1, 2 * groups, *(n,) * d, dtype=torch.float64)
    y = layer(x)
    ext = dil * (k - 1) + 1
    kq = -(-ext // stride)
    m = -(-n // stride) + kq  # components long enough for every window
    xp = torch.zeros(1, 2 * groups, *(m * stride,) * d, dtype=torch.float64)
    xp[(slice(None), slice(None), *(slice(0, n),) * d)] = x
    # (N, C, m*s, ...) -> (N, C, s, ..., m, ...) -> channels (C, r_1, ..., r_d)
    shape = [1, 2 * groups]
    for _ in range(d):
        shape += [m, stride]
    parts = xp.reshape(shape)
    perm = [0, 1] + [3 + 2 * j for j in range(d)] + [2 + 2 * j for j in range(d)]
    stacked = parts.permute(perm).reshape(1, 2 * groups * stride**d, *(m,) * d)
    w_poly = polyphase_filter(layer.weight, (stride,) * d, (dil,) * d)
    assert tuple(w_poly.shape[2:]) == (kq,) * d
    fn = (torch.nn.functional.conv1d, torch.nn.functional.conv2d, torch.nn.functional.conv3d)
    z = fn[d - 1](stacked, w_poly, groups=groups)
    crop = (slice(None), slice(None), *(slice(0, s) for s in y.shape[2:]))
    torch.testing.assert_close(z[crop], y, rtol=1e-12, atol=1e-12)


def test_polyphase_bound_is_exact_for_non_overlapping_windows() -> None:
    # kernel == stride, no padding: the operator is block diagonal with one block, the
    # c_out x (c_in * k * k) matrix, which is the polyphase filter's only tap.
    layer = nn.Conv2d(3, 5, 2, stride=2, bias=False).double()
    exact = operator_norm(layer, (6, 6)).item()
    bounds = layer_bounds(layer)
    assert bounds["polyphase_fantastic_four"].item() == pytest.approx(exact, rel=1e-9)
    assert bounds["fantastic_four"].item() > exact * 1.05
    assert layer_spectral_bound(layer).item() == pytest.approx(exact, rel=1e-9)


@settings(max_examples=20)
@given(cin=st.integers(1, 3), cout=st.integers(1, 3), k=st.integers(1, 3),
       stride=st.integers(1, 2), dilation=st.integers(1, 2), size=st.integers(3, 6),
       mode=st.sampled_from(["zeros", "circular", "reflect", "replicate"]),
       transposed=st.booleans(), groups=st.sampled_from([1, 3]))
def test_explicit_matrix_bound_of_small_layers_is_the_exact_norm(
        cin, cout, k, stride, dilation, size, mode, transposed, groups) -> None:
    """For small layers at a given input size ``layer_bounds`` holds the norm of the explicit
    operator matrix: at least the exact norm, above it by the rounding margin only."""
    cin, cout = cin * groups, cout * groups
    if transposed:
        layer = nn.ConvTranspose2d(cin, cout, k, stride=stride, dilation=dilation,
                                   groups=groups)
    else:
        layer = nn.Conv2d(cin, cout, k, stride=stride, dilation=dilation, padding=1,
                          padding_mode=mode, groups=groups)
    layer = layer.double()
    exact = torch.linalg.matrix_norm(operator_matrix(layer, (size, size)), 2)
    bounds = layer_bounds(layer, (size, size))
    assert "operator_matrix" in bounds
    value = bounds["operator_matrix"]
    assert float(value) >= float(exact)
    assert float(value) == pytest.approx(float(exact), rel=1e-12)
    assert float(layer_spectral_bound(layer, (size, size))) <= float(value)
    (grad,) = torch.autograd.grad(value, layer.weight)
    assert bool(torch.isfinite(grad).all()) and float(grad.norm()) > 0
