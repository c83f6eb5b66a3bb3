"""The curvature-based attack: closed-form trust-region oracles, a network where the gradient
direction misleads, the ball constraint, the dual lower bound, and training on attack points."""

from __future__ import annotations

import math
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_spectral import network_pairwise_curvature
from lightning_spectral.demos import DigitsDataModule
from lightning_spectral.demos.crt import CurvatureRegularizedClassifier, crt_network
from lightning_spectral.functional import SmoothSoftplus, curvature_attack

D64 = torch.float64
HYPOTHESIS = settings(max_examples=20)


class QuadraticMargin(nn.Module):
    """Logits ``(mu + g^T d + d^T A d / 2, 0)``, ``d = x - x0``: Hessian ``A`` everywhere."""

    def __init__(self, x0: torch.Tensor, mu: float, g: torch.Tensor, a: torch.Tensor) -> None:
        super().__init__()
        self.x0, self.mu, self.g, self.a = x0, mu, g, a

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = x - self.x0
        f = self.mu + d @ self.g + 0.5 * ((d @ self.a) * d).sum(1)
        return torch.stack([f, torch.zeros_like(f)], dim=1)


def _pair(k: float) -> torch.Tensor:
    return torch.tensor([[0.0, k], [k, 0.0]], dtype=D64)


def _trust_region(g: np.ndarray, a: np.ndarray, rho: float) -> tuple[np.ndarray, float]:
    """``argmin g^T d + d^T A d / 2`` over ``||d|| <= rho`` on the sphere (easy case): the
    step ``-(A + lam I)^-1 g`` whose length is ``rho``, ``lam`` by bisection in float64."""
    w, v = np.linalg.eigh(a)
    b = v.T @ g
    lo, hi = max(0.0, -w.min()), max(0.0, -w.min()) + np.linalg.norm(g) / rho + 1.0
    for _ in range(200):
        lam = 0.5 * (lo + hi)
        lo, hi = (lam, hi) if np.linalg.norm(b / (w + lam)) > rho else (lo, lam)
    return -v @ (b / (w + lam)), lam


def _margin(model: nn.Module, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    z = model(x)
    rows = torch.arange(len(y))
    return z[rows, y] - z[rows, t]


def _pgd(
    model: nn.Module, x0: torch.Tensor, y: torch.Tensor, t: torch.Tensor, rho: float, steps: int
) -> torch.Tensor:
    """The weaker attack: ``steps`` normalized-gradient steps of length ``rho / steps`` on the
    margin, each projected onto the ball (``steps = 1`` is the one-step l2 gradient attack)."""
    x = x0.clone()
    for _ in range(steps):
        x.requires_grad_(True)
        (grad,) = torch.autograd.grad(_margin(model, x, y, t).sum(), x)
        with torch.no_grad():
            x = x - (rho / steps) * grad / grad.flatten(1).norm(dim=1).clamp(min=1e-30)[:, None]
            d = x - x0
            x = x0 + d * (rho / d.norm(dim=1, keepdim=True).clamp(min=1e-30)).clamp(max=1.0)
    return _margin(model, x, y, t).detach()


# --------------------------------------------------------------------------- closed forms
@settings(HYPOTHESIS, max_examples=10)
@given(
    seed=st.integers(0, 2**16),
    dim=st.integers(2, 6),
    rho=st.floats(0.2, 2.0),
    gscale=st.floats(0.3, 5.0),
    convex=st.booleans(),
)
def test_quadratic_margin_matches_the_trust_region_minimizer(
    seed, dim, rho, gscale, convex
) -> None:
    gen = torch.Generator().manual_seed(seed)
    k = 1.5
    q, _ = torch.linalg.qr(torch.randn(dim, dim, generator=gen, dtype=D64))
    low = 0.0 if convex else -k
    eig = low + (k - low) * torch.rand(dim, generator=gen, dtype=D64)
    eig[0] = low  # the bound is attained
    a = q @ torch.diag(eig) @ q.T
    g = torch.randn(dim, generator=gen, dtype=D64)
    # The dual over eta >= K reaches the minimizer when its multiplier exceeds K: scale g so
    # that ||(A + 1.1 K I)^-1 g|| > rho, i.e. the multiplier is above 1.1 K.
    reach = torch.linalg.solve(a + 1.1 * k * torch.eye(dim, dtype=D64), g).norm()
    g = g * max(gscale, 1.2 * rho / float(reach))
    x0 = torch.randn(1, dim, generator=gen, dtype=D64)
    step, lam = _trust_region(g.numpy(), a.numpy(), rho)
    assert lam > 1.1 * k
    model = QuadraticMargin(x0[0], 0.7, g, a).eval()
    out = curvature_attack(model, x0, torch.tensor([0]), rho, _pair(k), n_bisection=30, n_inner=40)
    step = torch.from_numpy(step)
    best = 0.7 + g @ step + 0.5 * step @ a @ step
    assert float(out.margin[0]) == pytest.approx(float(best), abs=1e-6)
    torch.testing.assert_close(out.x[0] - x0[0], step, atol=1e-4, rtol=0)
    assert float((out.x - x0).norm()) <= rho
    # The dual lower bound closes the gap: the point is provably the minimum over the ball.
    assert float(out.lower_bound[0]) <= float(best) + 1e-9
    assert float(out.lower_bound[0]) == pytest.approx(float(best), abs=1e-4)


def test_convex_quadratic_with_an_interior_minimum_is_found_on_the_sphere_or_inside() -> None:
    """``A = I``, a small gradient: the unconstrained minimizer ``x0 - g`` lies inside the
    ball, where no ``eta >= K`` reaches it; the attack still returns a point in the ball and
    a margin no lower than the true minimum ``mu - ||g||^2 / 2``."""
    g = torch.tensor([0.3, -0.1, 0.2], dtype=D64)
    x0 = torch.zeros(1, 3, dtype=D64)
    model = QuadraticMargin(x0[0], 1.0, g, torch.eye(3, dtype=D64)).eval()
    out = curvature_attack(model, x0, torch.tensor([0]), 2.0, _pair(1.0))
    true_min = 1.0 - 0.5 * float(g @ g)
    assert float((out.x - x0).norm()) <= 2.0
    assert true_min - 1e-12 <= float(out.margin[0]) < 1.0
    assert float(out.lower_bound[0]) <= true_min + 1e-12


def test_linear_margin_gives_the_gradient_step() -> None:
    """``K = 0``: the inner problem is solved in one step and the answer is
    ``x0 - rho g / ||g||`` with margin ``mu - rho ||g||``, the lower bound equal to it."""
    g = torch.tensor([1.0, -2.0, 2.0], dtype=D64)
    x0 = torch.tensor([[0.5, 0.1, -0.3]], dtype=D64)
    model = QuadraticMargin(x0[0], 4.0, g, torch.zeros(3, 3, dtype=D64)).eval()
    out = curvature_attack(model, x0, torch.tensor([0]), 0.5, _pair(0.0), n_bisection=30, n_inner=1)
    torch.testing.assert_close(out.x, x0 - 0.5 * g / 3.0)
    assert float(out.margin[0]) == pytest.approx(4.0 - 1.5, abs=1e-6)
    assert float(out.lower_bound[0]) == pytest.approx(4.0 - 1.5, abs=1e-12)


# --------------------------------------------------------------------------- a real network
def _ridge(c: float = 2.0, a: float = 0.5, v: float = 1.0) -> tuple[nn.Sequential, float]:
    """``m(x) = a sp(c x1) - v (sp(c x2) + sp(-c x2)) + 3`` as a softplus network: convex and
    rising in ``x1``, a concave ridge in ``x2`` whose gradient vanishes at ``x2 = 0``. The
    Hessian is diagonal with entries in ``[0, a c^2 / 4]`` and ``[-v c^2 / 2, 0]``, so
    ``K = max(v c^2 / 2, a c^2 / 4)`` is exact. Near the ridge the gradient points along
    ``x1``, yet the margin falls fastest along ``x2``."""
    net = nn.Sequential(nn.Linear(2, 3), SmoothSoftplus(), nn.Linear(3, 2)).double()
    with torch.no_grad():
        net[0].weight.copy_(c * torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, -1.0]]))
        net[0].bias.zero_()
        net[2].weight.copy_(torch.tensor([[a, -v, -v], [0.0, 0.0, 0.0]]))
        net[2].bias.copy_(torch.tensor([3.0, 0.0]))
    return net.eval(), max(v * c * c / 2, a * c * c / 4)


def test_attack_beats_gradient_attacks_where_the_gradient_misleads() -> None:
    net, k = _ridge()
    x0 = torch.tensor([[0.0, 0.05], [0.3, -0.1], [-0.2, 0.02]], dtype=D64)
    y, t = torch.zeros(3, dtype=torch.long), torch.ones(3, dtype=torch.long)
    rho = 0.5
    out = curvature_attack(net, x0, y, rho, _pair(k))
    torch.testing.assert_close((out.x - x0).norm(dim=1), torch.full((3,), rho, dtype=D64))
    one_step, three_steps = _pgd(net, x0, y, t, rho, 1), _pgd(net, x0, y, t, rho, 3)
    assert (out.margin < one_step - 0.09).all(), (out.margin, one_step)
    assert (out.margin < three_steps - 0.02).all(), (out.margin, three_steps)
    # The dual bound is within 1e-3 of the attained margin: no attack can do better...
    assert (out.lower_bound <= out.margin + 1e-12).all()
    assert (out.margin - out.lower_bound).max() < 3e-3, out.margin - out.lower_bound
    # ...and a long PGD run indeed stays above the bound (and above the attack's margin).
    long_run = _pgd(net, x0, y, t, rho, 200)
    assert (long_run >= out.lower_bound - 1e-9).all()
    assert (long_run >= out.margin - 3e-3).all()
    # It attacks the only other class and its margin is the model's at the returned point.
    assert (out.target == 1).all()
    torch.testing.assert_close(out.margin, _margin(net, out.x, y, t).detach())


def _tanh_mlp(seed: int) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 4)
    ).eval()


@HYPOTHESIS
@given(
    seed=st.integers(0, 2**16),
    rho=st.floats(0.0, 3.0),
    float64=st.booleans(),
    classes=st.sampled_from(["all", "runner_up"]),
)
def test_points_stay_in_the_ball_and_the_bound_holds(seed, rho, float64, classes) -> None:
    net = _tanh_mlp(seed % 7)
    gen = torch.Generator().manual_seed(seed)
    x0 = 2 * torch.randn(5, 6, generator=gen)
    y = torch.randint(0, 4, (5,), generator=gen)
    pairwise = network_pairwise_curvature(net, (6,))  # guaranteed, so the bound must hold
    if float64:
        net, x0 = net.double(), x0.double()
    out = curvature_attack(net, x0, y, rho, pairwise, n_bisection=6, n_inner=5, classes=classes)
    assert out.x.dtype == x0.dtype and out.x.shape == x0.shape
    dist = (out.x.double() - x0.double()).norm(dim=1)
    assert (dist <= rho).all(), dist - rho
    z = net(x0).detach().double()
    clean = z.gather(1, y[:, None])[:, 0] - z.gather(1, out.target[:, None])[:, 0]
    assert (out.margin <= clean + 1e-5).all()  # x0 itself is a candidate
    assert (out.target != y).all()
    assert (out.lower_bound <= out.margin + 1e-5).all()
    # The bound is below every point of the ball, e.g. those of a longer PGD run.
    assert (
        (_pgd(net.double(), x0.double(), y, out.target, rho, 20) >= out.lower_bound - 1e-6).all()
        if rho > 0
        else True
    )


def test_classes_all_keeps_the_lowest_targeted_margin() -> None:
    net = _tanh_mlp(3).double()
    x0 = torch.randn(4, 6, dtype=D64)
    y = net(x0).argmax(1)
    pairwise = network_pairwise_curvature(net, (6,))
    every = curvature_attack(net, x0, y, 1.0, pairwise, n_bisection=6, n_inner=5)
    per_class, bounds = [], []
    for shift in (1, 2, 3):
        t = (y + shift) % 4
        one = curvature_attack(net, x0, y, 1.0, pairwise, n_bisection=6, n_inner=5, classes=t)
        per_class.append(one.margin)
        bounds.append(one.lower_bound)
    torch.testing.assert_close(every.margin, torch.stack(per_class).min(0).values)
    torch.testing.assert_close(every.lower_bound, torch.stack(bounds).min(0).values)
    runner = net(x0).detach().scatter(1, y[:, None], -math.inf).argmax(1)
    top2 = curvature_attack(
        net, x0, y, 1.0, pairwise, n_bisection=6, n_inner=5, classes="runner_up"
    )
    assert (top2.target == runner).all()
    assert (every.margin <= top2.margin + 1e-12).all()


def test_float32_inputs_with_a_float64_solve_stay_in_the_ball() -> None:
    net = _tanh_mlp(1)
    x0 = 50 * torch.randn(16, 6)  # large coordinates: rounding to float32 matters
    y = torch.randint(0, 4, (16,))
    out = curvature_attack(net, x0, y, 1e-3, 1.0, dtype=D64, n_bisection=4, n_inner=3)
    assert out.x.dtype == torch.float32 and out.margin.dtype == D64
    assert ((out.x.double() - x0.double()).norm(dim=1) <= 1e-3).all()


def test_no_parameter_gradients_and_no_graph() -> None:
    net = _tanh_mlp(2)
    x0 = torch.randn(3, 6, requires_grad=True)
    out = curvature_attack(net, x0, torch.tensor([0, 1, 2]), 0.5, 1.0, n_bisection=3, n_inner=2)
    assert not out.x.requires_grad and not out.margin.requires_grad
    assert all(p.grad is None for p in net.parameters()) and x0.grad is None


def test_zero_radius_and_empty_batches() -> None:
    net = _tanh_mlp(0)
    x0 = torch.randn(3, 6)
    out = curvature_attack(net, x0, torch.tensor([0, 1, 2]), 0.0, 1.0)
    torch.testing.assert_close(out.x, x0)
    torch.testing.assert_close(out.lower_bound, out.margin)
    empty = curvature_attack(net, x0[:0], torch.zeros(0, dtype=torch.long), 1.0, 1.0)
    assert empty.x.shape == (0, 6) and empty.margin.shape == (0,)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rho": -1.0}, "rho"),
        ({"rho": math.inf}, "rho"),
        ({"n_inner": 0}, "n_inner"),
        ({"classes": "top"}, "classes"),
        ({"classes": torch.tensor([1, 1])}, "differ from target"),
        ({"classes": torch.tensor([4, 0])}, "target values"),
        ({"curvature": -1.0}, "curvature"),
    ],
)
def test_bad_arguments_are_refused(kwargs, match) -> None:
    args = {"rho": 1.0, "curvature": 1.0, **kwargs}
    with pytest.raises(ValueError, match=match):
        curvature_attack(
            _tanh_mlp(0),
            torch.randn(2, 6),
            torch.tensor([1, 2]),
            args.pop("rho"),
            args.pop("curvature"),
            **args,
        )


def test_training_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="training mode"):
        curvature_attack(_tanh_mlp(0).train(), torch.randn(2, 6), torch.tensor([1, 2]), 1.0, 1.0)


# --------------------------------------------------------------------------- training
def _fit(tmp_path: Path, name: str, steps: int, **kwargs) -> nn.Sequential:
    pl.seed_everything(0, verbose=False)
    model = crt_network("mlp2", image_size=8, width=32)
    module = CurvatureRegularizedClassifier(model, lr=1e-2, **kwargs)
    trainer = pl.Trainer(
        max_steps=steps,
        accelerator="cpu",
        devices=1,
        limit_val_batches=0,
        logger=CSVLogger(tmp_path, name=name),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    return model.eval()


def test_training_on_attack_points_raises_the_attacked_margin(tmp_path: Path) -> None:
    rho = 1.0
    plain = _fit(tmp_path, "plain", 40, gamma=0.01)
    robust = _fit(tmp_path, "crt", 40, gamma=0.01, attack="curvature", rho=rho)
    metrics = (tmp_path / "crt" / "version_0" / "metrics.csv").read_text()
    assert "train/attack_margin" in metrics
    assert (
        "train/attack_margin" not in (tmp_path / "plain" / "version_0" / "metrics.csv").read_text()
    )
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    x = torch.stack([dm.test_set[i][0] for i in range(100)])
    y = torch.tensor([dm.test_set[i][1] for i in range(100)])
    margins = {}
    for name, net in (("plain", plain), ("crt", robust)):
        out = curvature_attack(
            net, x, y, rho, network_pairwise_curvature(net, (1, 8, 8)), n_bisection=8, n_inner=10
        )
        margins[name] = out.margin
        assert ((out.x - x).flatten(1).norm(dim=1) <= rho + 1e-5).all()
    robust_acc = (margins["crt"] > 0).double().mean()
    plain_acc = (margins["plain"] > 0).double().mean()
    assert robust_acc > plain_acc, (robust_acc, plain_acc)
    assert margins["crt"].median() > margins["plain"].median()


def test_default_training_is_unchanged_and_bad_attack_options_are_refused() -> None:
    module = CurvatureRegularizedClassifier(crt_network("mlp2", width=8))
    assert module.hparams.attack is None and module.hparams.rho == 0.0
    with pytest.raises(ValueError, match="attack"):
        CurvatureRegularizedClassifier(crt_network("mlp2", width=8), attack="pgd")
    with pytest.raises(ValueError, match="rho"):
        CurvatureRegularizedClassifier(crt_network("mlp2", width=8), attack="curvature", rho=-1.0)


def test_example_trains_on_the_attack(tmp_path: Path) -> None:
    from test_crt import _example, _fake_mnist

    crt = _example()
    _fake_mnist(tmp_path / "data", n_train=128, n_test=10)
    out = tmp_path / "runs"
    results = crt.main(
        [
            "--data-dir",
            str(tmp_path / "data"),
            "--gamma",
            "0.01",
            "--epochs",
            "1",
            "--attack",
            "curvature",
            "--rho",
            "0.5",
            "--test-samples",
            "10",
            "--out-dir",
            str(out),
        ]
    )
    saved = (out / "mlp2_gamma0.01_crt0.5_epochs1.json").read_text()
    assert '"attack": "curvature"' in saved and results["rho"] == 0.5
    hparams = (out / "mlp2_gamma0.01_crt0.5" / "version_0" / "hparams.yaml").read_text()
    assert "attack: curvature" in hparams and "rho: 0.5" in hparams
    with pytest.raises(SystemExit, match="--rho"):
        crt.parse_args(["--data-dir", str(tmp_path / "data"), "--rho", "-1"])
