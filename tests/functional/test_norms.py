"""Guaranteed matrix norms: exact spectral norm and Gram iteration."""

from __future__ import annotations

import pytest
import torch
from helpers.oracles import svd_norm
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_spectral.functional.norms import gram_iteration_bound, spectral_norm_exact


@pytest.mark.parametrize("shape", [(5, 5), (3, 9), (12, 2), (4, 3, 7), (2, 3, 1, 6), (1, 1)])
def test_exact_matches_svd(shape):
    m = torch.randn(shape, dtype=torch.float64)
    out = spectral_norm_exact(m)
    assert out.shape == shape[:-2] and out.dtype == torch.float64
    torch.testing.assert_close(out, svd_norm(m), rtol=1e-12, atol=0)


def test_exact_complex_and_float32_input():
    m = torch.randn(3, 4, 6, dtype=torch.complex128)
    torch.testing.assert_close(spectral_norm_exact(m), svd_norm(m), rtol=1e-12, atol=0)
    m32 = torch.randn(4, 5)
    out = spectral_norm_exact(m32)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, svd_norm(m32.double()), rtol=1e-12, atol=0)


@pytest.mark.parametrize("magnitude", [1e200, 1e-200, 1e300, 1e-300])
def test_no_overflow_or_underflow(magnitude):
    m = torch.randn(3, 6, 4, dtype=torch.float64)
    ref = svd_norm(m) * magnitude
    torch.testing.assert_close(spectral_norm_exact(m * magnitude), ref, rtol=1e-12, atol=0)
    for t in range(8):
        bound = gram_iteration_bound(m * magnitude, n_iter=t)
        assert torch.isfinite(bound).all() and (bound > 0).all()
        assert torch.all(bound >= ref * (1 - 1e-12))
    torch.testing.assert_close(gram_iteration_bound(m * magnitude, 12), ref, rtol=1e-3, atol=0)


def test_entries_spanning_orders_of_magnitude():
    m = torch.randn(5, 5, dtype=torch.float64) * torch.logspace(-150, 150, 5, dtype=torch.float64)
    ref = svd_norm(m)
    torch.testing.assert_close(spectral_norm_exact(m), ref, rtol=1e-12, atol=0)
    assert gram_iteration_bound(m, 6) >= ref * (1 - 1e-12)


@settings(max_examples=40)
@given(
    rows=st.integers(1, 8),
    cols=st.integers(1, 8),
    batch=st.integers(1, 3),
    kind=st.sampled_from(["randn", "rank1", "sparse", "tied"]),
    seed=st.integers(0, 2**16),
)
def test_gram_bound_is_above_exact_and_decreases(rows, cols, batch, kind, seed):
    gen = torch.Generator().manual_seed(seed)
    m = torch.randn(batch, rows, cols, generator=gen, dtype=torch.float64)
    if kind == "rank1":
        m = torch.randn(batch, rows, 1, generator=gen, dtype=torch.float64) @ torch.randn(
            batch, 1, cols, generator=gen, dtype=torch.float64
        )
    elif kind == "sparse":
        m = m * (torch.rand(m.shape, generator=gen, dtype=torch.float64) < 0.2)
    elif kind == "tied":  # repeated top singular value: the slowest case for Gram iteration
        eye = torch.eye(rows, cols, dtype=torch.float64)
        m = eye.expand(batch, rows, cols) * 3.0
    exact = svd_norm(m)
    prev = None
    for t in range(9):
        b = gram_iteration_bound(m, n_iter=t)
        assert b.shape == (batch,) and b.dtype == torch.float64
        assert torch.all(b >= exact * (1 - 1e-12) - 1e-300)
        if prev is not None:
            assert torch.all(b <= prev * (1 + 1e-12))
        prev = b
    # Converges: with r tied top singular values the excess is r^(1/2^(t+1)), ~1.0014 at t=8.
    assert torch.all(prev <= exact * min(rows, cols) ** (1 / 2**9) * (1 + 1e-9) + 1e-300)


def test_gram_bound_at_zero_iterations_is_frobenius():
    m = torch.randn(4, 7, dtype=torch.float64)
    torch.testing.assert_close(gram_iteration_bound(m, 0), torch.linalg.matrix_norm(m, "fro"))


def test_zero_matrix():
    z = torch.zeros(2, 3, 4, dtype=torch.float64, requires_grad=True)
    for f in (spectral_norm_exact, lambda x: gram_iteration_bound(x, 5)):
        out = f(z)
        assert torch.equal(out, torch.zeros(2, dtype=torch.float64))
        (g,) = torch.autograd.grad(out.sum(), z)
        assert torch.isfinite(g).all()


def test_gradcheck():
    m = torch.randn(2, 4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(spectral_norm_exact, (m,))
    assert torch.autograd.gradcheck(lambda x: gram_iteration_bound(x, 4), (m,))
    wide = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x: gram_iteration_bound(x, 3), (wide,))
    assert torch.autograd.gradcheck(spectral_norm_exact, (wide,))


def test_exact_gradient_is_top_singular_pair():
    m = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(spectral_norm_exact(m), m)
    u, _, vh = torch.linalg.svd(m.detach())
    torch.testing.assert_close(g, torch.outer(u[:, 0], vh[0]), rtol=1e-10, atol=1e-12)


def test_errors():
    with pytest.raises(ValueError, match="n_iter"):
        gram_iteration_bound(torch.eye(2), n_iter=-1)
    with pytest.raises(ValueError, match=r"\(\.\.\., m, n\)"):
        spectral_norm_exact(torch.ones(3))


@pytest.mark.parametrize("count", [3.0, True, "3"])
def test_iteration_counts_must_be_integers(count: object) -> None:
    # One semantics for every count (lightning_spectral._checks.check_int): no floats, no bools.
    with pytest.raises(ValueError, match=r"n_iter must be an integer >= 0, got"):
        gram_iteration_bound(torch.eye(2), n_iter=count)  # type: ignore[arg-type]
