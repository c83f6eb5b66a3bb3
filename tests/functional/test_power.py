"""Power-iteration estimate of the Fantastic Four bound, against explicit matricizations."""

from __future__ import annotations

import math

import pytest
import torch
from helpers.oracles import matricize as oracle_matricize
from helpers.oracles import svd_norm
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_spectral.functional.matricize import row_subsets
from lightning_spectral.functional.power import (
    concatenated_state,
    fantastic_four_estimate,
    fantastic_four_estimate_cat,
    init_singular_vectors,
    power_iteration_,
    state_views,
)
from lightning_spectral.functional.power_plan import Plan

# (g, c_out, c_in, *k): Linear (d = 0), 1d, 2d with groups, 3d; the 5x5x5 kernel is too
# large for the dense selector and takes the one-einsum-per-subset path.
SHAPES = [
    (1, 5, 7),
    (1, 4, 3, 5),
    (3, 4, 2, 3, 2),
    (1, 6, 5, 3, 3),
    (2, 3, 2, 2, 3, 2),
    (1, 2, 3, 5, 5, 5),
]


def test_both_contraction_paths_are_exercised():
    dense = [Plan(torch.empty(1, *s)).dense for s in SHAPES]
    assert any(dense) and not all(dense)


def _state(shape, n_layers=1, seed=0, dtype=torch.float64):
    us, vs = [], []
    for layer in range(n_layers):
        u, v = init_singular_vectors(shape, seed=seed + layer, dtype=dtype)
        us.append(u)
        vs.append(v)
    return (
        [torch.stack(t) for t in zip(*us, strict=True)],
        [torch.stack(t) for t in zip(*vs, strict=True)],
    )


def _sigmas(w, us, vs):
    """``u_A^T M_A v_A`` per (layer, group, A), with ``M_A`` from the test oracle."""
    d = w.ndim - 4
    out = []
    for m, a in enumerate(row_subsets(d)):
        mat = oracle_matricize(w, a, batch_dims=2)  # (L, g, rows, cols)
        u = us[m].flatten(2)
        v = vs[m].flatten(2)
        out.append(torch.einsum("lgr,lgrc,lgc->lg", u, mat, v))
    return torch.stack(out, dim=-1)


def _exact_norms(w):
    d = w.ndim - 4
    return torch.stack(
        [svd_norm(oracle_matricize(w, a, batch_dims=2)) for a in row_subsets(d)],
        dim=-1,
    )


def _exact_ff(w):
    """Independent exact FF bound per stacked layer: sqrt(prod k) * max_g min_A ||M_A||."""
    scale = math.sqrt(math.prod(w.shape[4:]))
    return scale * _exact_norms(w).min(dim=-1).values.max(dim=-1).values


@pytest.mark.parametrize("shape", SHAPES)
def test_converges_to_every_matricization_norm(shape):
    # Convergence speed depends on the gap sigma_2 / sigma_1 of each matrix; a fixed draw
    # keeps the test deterministic (a near-tie can need thousands of iterations).
    w = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    us, vs = _state(shape, n_layers=2)
    power_iteration_(w, us, vs, n_iter=1000)
    torch.testing.assert_close(_sigmas(w, us, vs), _exact_norms(w), rtol=1e-7, atol=0)


@pytest.mark.parametrize("shape", SHAPES)
def test_batched_equals_one_at_a_time(shape):
    n_layers = 3
    w = torch.randn(n_layers, *shape, dtype=torch.float64)
    us, vs = _state(shape, n_layers=n_layers)
    singles = [
        ([u[i : i + 1].clone() for u in us], [v[i : i + 1].clone() for v in vs])
        for i in range(n_layers)
    ]
    batched = fantastic_four_estimate(w, us, vs, n_iter=3)
    for i, (u1, v1) in enumerate(singles):
        one = fantastic_four_estimate(w[i : i + 1], u1, v1, n_iter=3)
        torch.testing.assert_close(one[0], batched[i], rtol=1e-14, atol=0)
        for a, b in zip(u1 + v1, us + vs, strict=True):
            torch.testing.assert_close(a[0], b[i], rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("shape", SHAPES)
def test_gradient_after_convergence_is_the_exact_bound_gradient(shape):
    w = torch.randn(2, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    us, vs = _state(shape, n_layers=2, seed=3)
    power_iteration_(w, us, vs, n_iter=1000)
    w1 = w.clone().requires_grad_(True)
    est = fantastic_four_estimate(w1, us, vs, n_iter=1)
    w2 = w.clone().requires_grad_(True)
    exact = _exact_ff(w2)
    torch.testing.assert_close(est, exact.detach(), rtol=1e-9, atol=0)
    weights = torch.tensor([0.7, -1.3], dtype=torch.float64)
    (g_est,) = torch.autograd.grad((est * weights).sum(), w1)
    (g_exact,) = torch.autograd.grad((exact * weights).sum(), w2)
    torch.testing.assert_close(g_est, g_exact, rtol=1e-6, atol=1e-8)


def test_gradient_is_rank_one_outer_product_of_the_selected_pair():
    """Before convergence the gradient is still exactly d(u^T M v)/dW of the selected pair."""
    shape = (2, 4, 3, 3, 2)
    w = torch.randn(1, *shape, dtype=torch.float64, requires_grad=True)
    us, vs = _state(shape)
    est = fantastic_four_estimate(w, us, vs, n_iter=1)
    (g,) = torch.autograd.grad(est.sum(), w)
    # Reference: autograd through sqrt(K) * max_g min_A u_A^T M_A v_A with u, v frozen.
    w2 = w.detach().clone().requires_grad_(True)
    ref = math.sqrt(6) * _sigmas(w2, us, vs).min(dim=-1).values.max(dim=-1).values
    torch.testing.assert_close(est.detach(), ref.detach(), rtol=1e-12, atol=0)
    (g_ref,) = torch.autograd.grad(ref.sum(), w2)
    torch.testing.assert_close(g, g_ref, rtol=1e-12, atol=1e-14)


def test_gradient_reaches_stacked_parameters():
    convs = [torch.nn.Conv2d(3, 4, 3) for _ in range(2)]
    w = torch.stack([c.weight for c in convs]).unsqueeze(1)  # (L, g=1, ...)
    us, vs = _state((1, 4, 3, 3, 3), n_layers=2, dtype=torch.float32)
    fantastic_four_estimate(w, us, vs).sum().backward()
    assert all(c.weight.grad is not None and c.weight.grad.abs().sum() > 0 for c in convs)


@settings(max_examples=25)
@given(
    d=st.integers(0, 3),
    g=st.integers(1, 3),
    c_out=st.integers(1, 5),
    c_in=st.integers(1, 5),
    k=st.lists(st.integers(1, 3), min_size=3, max_size=3),
    n_iter=st.integers(0, 3),
    seed=st.integers(0, 2**16),
)
def test_estimate_is_below_exact_bound(d, g, c_out, c_in, k, n_iter, seed):
    shape = (g, c_out, c_in, *k[:d])
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(2, *shape, generator=gen, dtype=torch.float64)
    us, vs = _state(shape, n_layers=2, seed=seed)
    est = fantastic_four_estimate(w, us, vs, n_iter=n_iter)
    assert est.shape == (2,)
    assert torch.all(est <= _exact_ff(w) * (1 + 1e-12))
    assert torch.all(est > 0)


def test_updates_in_place_and_n_iter_zero_does_not():
    shape = (1, 4, 3, 3, 3)
    w = torch.randn(1, *shape)
    us, vs = _state(shape, dtype=torch.float32)
    ptrs = [t.data_ptr() for t in us + vs]
    before = [t.clone() for t in us + vs]
    est0 = fantastic_four_estimate(w, us, vs, n_iter=0)
    assert all(torch.equal(a, b) for a, b in zip(before, us + vs, strict=True))
    # n_iter = 0 still reports ||M_A v_A|| for the stored v_A.
    ref = (
        3
        * torch.stack(
            [
                (oracle_matricize(w, a, batch_dims=2).flatten(0, 1) @ vs[m].flatten(1).T).norm()
                for m, a in enumerate(row_subsets(2))
            ]
        ).min()
    )
    torch.testing.assert_close(est0[0], ref)
    power_iteration_(w, us, vs, n_iter=2)
    assert [t.data_ptr() for t in us + vs] == ptrs
    assert not any(torch.equal(a, b) for a, b in zip(before, us + vs, strict=True))
    for t in us + vs:  # unit norm per (layer, group)
        torch.testing.assert_close(t.flatten(2).norm(dim=-1), torch.ones(t.shape[:2]))


def test_buffers_in_a_state_dict_are_updated():
    module = torch.nn.Module()
    us, vs = init_singular_vectors((1, 3, 2, 3), seed=0)
    for m, (u, v) in enumerate(zip(us, vs, strict=True)):
        module.register_buffer(f"u{m}", u.unsqueeze(0))
        module.register_buffer(f"v{m}", v.unsqueeze(0))
    before = {k: t.clone() for k, t in module.state_dict().items()}
    w = torch.randn(1, 1, 3, 2, 3)
    power_iteration_(w, [module.u0, module.u1], [module.v0, module.v1])
    after = module.state_dict()
    assert all(not torch.equal(before[k], after[k]) for k in before)


def test_zero_weights_keep_unit_vectors_and_give_zero():
    shape = (2, 3, 2, 3)
    us, vs = _state(shape)
    w = torch.zeros(1, *shape, dtype=torch.float64, requires_grad=True)
    est = fantastic_four_estimate(w, us, vs, n_iter=2)
    assert est.item() == 0.0
    est.sum().backward()
    assert torch.isfinite(w.grad).all()
    for t in us + vs:
        assert torch.isfinite(t).all()
        torch.testing.assert_close(
            t.flatten(2).norm(dim=-1), torch.ones(t.shape[:2], dtype=t.dtype)
        )


def test_init_is_deterministic_per_seed_and_follows_dtype():
    a_u, a_v = init_singular_vectors((2, 4, 3, 3, 2), seed=7)
    b_u, b_v = init_singular_vectors((2, 4, 3, 3, 2), seed=7)
    c_u, _ = init_singular_vectors((2, 4, 3, 3, 2), seed=8)
    assert all(torch.equal(x, y) for x, y in zip(a_u + a_v, b_u + b_v, strict=True))
    assert not torch.equal(a_u[0], c_u[0])
    assert [tuple(u.shape) for u in a_u] == [(2, 4), (2, 4, 3), (2, 4, 2), (2, 4, 3, 2)]
    assert [tuple(v.shape) for v in a_v] == [(2, 3, 3, 2), (2, 3, 2), (2, 3, 3), (2, 3)]
    assert all(t.dtype == torch.get_default_dtype() for t in a_u + a_v)
    d_u, d_v = init_singular_vectors((2, 4, 3, 3, 2), seed=7, dtype=torch.float64, device="cpu")
    assert all(t.dtype == torch.float64 and t.device.type == "cpu" for t in d_u + d_v)
    # The float64 draw is the same sequence, cast afterwards.
    torch.testing.assert_close(d_u[1].float(), a_u[1])
    for t in d_u + d_v:
        torch.testing.assert_close(t.flatten(1).norm(dim=1), torch.ones(2, dtype=torch.float64))


def test_autocast_and_half_precision_weights_iterate_in_float32():
    shape = (1, 6, 4, 3, 3)
    w = torch.randn(1, *shape)
    us, vs = _state(shape, dtype=torch.float32)
    us2, vs2 = [u.clone() for u in us], [v.clone() for v in vs]
    ref = fantastic_four_estimate(w, us, vs, n_iter=3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        w1 = w.clone().requires_grad_(True)
        out = fantastic_four_estimate(w1, us2, vs2, n_iter=3)
        out.sum().backward()
    assert out.dtype == torch.float32 and w1.grad.dtype == torch.float32
    torch.testing.assert_close(out, ref, rtol=1e-6, atol=0)
    # bfloat16 weights: the value is the float32 iteration on the rounded weights.
    wb = w.to(torch.bfloat16).requires_grad_(True)
    us3, vs3 = _state(shape, dtype=torch.float32)
    us4, vs4 = _state(shape, dtype=torch.float32)
    out_b = fantastic_four_estimate(wb, us3, vs3, n_iter=3)
    ref_b = fantastic_four_estimate(wb.detach().float(), us4, vs4, n_iter=3)
    assert out_b.dtype == torch.bfloat16
    torch.testing.assert_close(out_b.float(), ref_b, rtol=1e-2, atol=0)
    out_b.sum().backward()
    assert wb.grad.dtype == torch.bfloat16 and torch.isfinite(wb.grad.float()).all()
    with pytest.raises(ValueError, match="floating point"):
        power_iteration_(torch.ones(1, *shape, dtype=torch.int64), us3, vs3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_runs_on_the_weights_device():
    shape = (1, 8, 4, 3, 3)
    us, vs = _state(shape, dtype=torch.float32)
    us = [u.cuda() for u in us]
    vs = [v.cuda() for v in vs]
    w = torch.randn(1, *shape, device="cuda", requires_grad=True)
    est = fantastic_four_estimate(w, us, vs, n_iter=200)
    est.sum().backward()
    assert est.device.type == "cuda" and w.grad.device.type == "cuda"
    torch.testing.assert_close(
        est.double().cpu(), _exact_ff(w.detach().double().cpu()), rtol=1e-4, atol=0
    )


def test_bad_state_is_rejected_with_a_message():
    shape = (1, 3, 2, 3, 3)
    us, vs = _state(shape)
    w = torch.randn(1, *shape, dtype=torch.float64)
    with pytest.raises(ValueError, match="4 matricizations"):
        power_iteration_(w, us[:2], vs[:2])
    with pytest.raises(ValueError, match="needs u of shape"):
        power_iteration_(w, [us[0].unsqueeze(-1), *us[1:]], vs)
    with pytest.raises(ValueError, match="n_iter"):
        fantastic_four_estimate(w, us, vs, n_iter=-1)
    with pytest.raises(ValueError, match="weights must be"):
        power_iteration_(w[0, 0, 0], us, vs)
    with pytest.raises(ValueError, match="grouped_shape"):
        init_singular_vectors((3, 0, 2), seed=0)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("n_iter", [0, 1, 3])
def test_concatenated_state_gives_the_same_estimates_and_vectors(shape, n_iter):
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(2, *shape, generator=gen, dtype=torch.float64, requires_grad=True)
    us, vs = _state(shape, n_layers=2)
    u_cat, v_cat = concatenated_state(w.shape, us, vs)
    views_u, views_v = state_views(w.shape, u_cat, v_cat)
    for a, b in zip(views_u + views_v, us + vs, strict=True):
        assert torch.equal(a, b)
    ref = fantastic_four_estimate(w, us, vs, n_iter)
    (grad_ref,) = torch.autograd.grad(ref.sum(), w)
    got = fantastic_four_estimate_cat(w, u_cat, v_cat, n_iter)
    (grad,) = torch.autograd.grad(got.sum(), w)
    assert torch.equal(got, ref) and torch.equal(grad, grad_ref)
    # the state moved on exactly as the list state did, seen through the views
    for a, b in zip(views_u + views_v, us + vs, strict=True):
        assert torch.equal(a, b)


def test_views_of_a_concatenated_state_write_through():
    shape = (1, 3, 2, 3, 3)
    us, vs = _state(shape)
    u_cat, v_cat = concatenated_state((1, *shape), us, vs)
    views_u, _ = state_views((1, *shape), u_cat, v_cat)
    views_u[1].fill_(7.0)
    assert (u_cat == 7.0).sum() == views_u[1].numel()


def test_concatenated_state_of_the_wrong_shape_is_rejected():
    shape = (1, 3, 2, 3, 3)
    us, vs = _state(shape)
    u_cat, v_cat = concatenated_state((1, *shape), us, vs)
    with pytest.raises(ValueError, match="need u_cat"):
        fantastic_four_estimate_cat(torch.randn(1, 1, 3, 2, 3, 2), u_cat, v_cat)
