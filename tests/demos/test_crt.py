"""Curvature-regularized training: the differentiable penalty, the guaranteed chain bound, a
real training loop on the digits, the MNIST example end to end, and certificates vs an attack."""

from __future__ import annotations

import importlib.util
import json
import struct
import sys
from pathlib import Path

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_spectral import network_curvature_bound, network_pairwise_curvature
from lightning_spectral.demos import DigitsDataModule
from lightning_spectral.demos.crt import (
    CurvatureRegularizedClassifier,
    crt_network,
    exact_chain_curvature,
)
from lightning_spectral.functional import (
    NonSmoothActivationError,
    SmoothSoftplus,
    crc_certified_radius,
    curvature_certified_radius,
    linear_head_pairwise_curvature,
)
from lightning_spectral.functional.curvature_penalty import (
    ChainCurvaturePenalty,
    chain_curvature,
    parse_chain,
)

ROOT = Path(__file__).resolve().parents[2]


# --------------------------------------------------------------------------- the recursion
def _unrolled(norms: list[float], acts: list[tuple[float, float]]) -> float:
    """The recursion written out as a sum: hidden layer ``i`` contributes
    ``h_i Lip_i^2 * prod_{k > i} ||W_k|| * prod_{i < j} g_j`` with ``Lip_i = ||W_1||
    prod_{j < i} g_j ||W_{j+1}||``."""
    total = 0.0
    for i, (_, h) in enumerate(acts):
        lip = norms[0]
        for j in range(i):
            lip *= acts[j][0] * norms[j + 1]
        tail = np.prod(norms[i + 1 :]) * np.prod([g for g, _ in acts[i + 1 :]])
        total += h * lip**2 * tail
    return total


def test_chain_curvature_matches_the_unrolled_sum() -> None:
    norms = [1.7, 0.6, 2.3, 0.9]
    acts = [(1.0, 0.25), (0.25, 0.0962), (1.1, 0.5)]
    got = chain_curvature(torch.tensor(norms, dtype=torch.float64), acts)
    assert got.item() == pytest.approx(_unrolled(norms, acts), rel=1e-12)
    assert chain_curvature(torch.tensor([3.0]), []).item() == 0.0  # a linear map is flat


def test_chain_curvature_gradcheck() -> None:
    norms = torch.tensor([1.3, 0.7, 2.1], dtype=torch.float64, requires_grad=True)
    acts = [(1.0, 0.25), (0.9, 0.4)]
    assert torch.autograd.gradcheck(lambda n: chain_curvature(n, acts), (norms,))
    assert torch.autograd.gradgradcheck(lambda n: chain_curvature(n, acts), (norms,))


def test_chain_curvature_rejects_mismatched_arguments() -> None:
    with pytest.raises(ValueError, match="3 layer norms need 2 activations"):
        chain_curvature(torch.ones(3), [(1.0, 0.25)])
    with pytest.raises(ValueError, match="at least one layer norm"):
        chain_curvature([], [])
    with pytest.raises(ValueError, match="must be >= 0"):
        chain_curvature(torch.ones(2), [(1.0, -0.25)])


# --------------------------------------------------------------------------- parsing a chain
class _ShiftedLinear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) ** 2  # not a linear map any more


@pytest.mark.parametrize(
    ("model", "error", "match"),
    [
        (nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), NonSmoothActivationError,
         "ReLU"),
        (nn.Sequential(nn.Linear(4, 4), nn.Softplus(), nn.Linear(4, 2)),
         NonSmoothActivationError, "threshold"),
        (nn.Sequential(_ShiftedLinear(4, 4), nn.Tanh(), nn.Linear(4, 2)), ValueError,
         "_ShiftedLinear"),
        (nn.Sequential(nn.Linear(4, 4), nn.Dropout(), nn.Linear(4, 2)), ValueError, "Dropout"),
        (nn.Sequential(nn.Linear(4, 4), nn.Tanh()), ValueError, "end with a linear layer"),
        (nn.Sequential(nn.Tanh(), nn.Linear(4, 2)), ValueError, "start with a linear layer"),
        (nn.Sequential(nn.Flatten(0), nn.Linear(4, 2)), ValueError, "start_dim=1"),
    ],
)
def test_parse_chain_refuses_what_the_recursion_does_not_cover(model, error, match) -> None:
    with pytest.raises(error, match=match):
        parse_chain(model)


def test_parse_chain_composes_and_inserts_identities() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(4, 4), nn.Tanh(), SmoothSoftplus(2.0),
                          nn.Linear(4, 4), nn.Linear(4, 2))
    layers, acts = parse_chain(model)
    assert layers == [model[1], model[4], model[5]]
    # softplus o tanh: g = 1 * 1, h = h_sp g_tanh^2 + g_sp h_tanh = 0.5 + 0.76980036
    assert acts[0] == pytest.approx((1.0, 0.5 + 0.76980036))
    assert acts[1] == (1.0, 0.0)


# --------------------------------------------------------------------------- the penalty
def _tiny_mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), SmoothSoftplus(), nn.Linear(8, 7), nn.Tanh(),
                         nn.Linear(7, 3)).double()


def _tiny_cnn() -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), SmoothSoftplus(), nn.Flatten(),
                         nn.Linear(3 * 4 * 4, 3)).double()


@pytest.mark.parametrize("make", [_tiny_mlp, _tiny_cnn])
def test_penalty_gradcheck(make) -> None:
    model = make()
    penalty = ChainCurvaturePenalty(model, n_iter=5)
    penalty()  # move the vectors off their random start
    penalty.n_iter = 0  # frozen vectors: the value is a fixed function of the weights
    weights = [m.weight for m in parse_chain(model)[0]]
    assert torch.autograd.gradcheck(lambda *w: penalty(), weights, atol=1e-6)


def test_penalty_with_exact_norms_is_the_guaranteed_chain_bound() -> None:
    model = _tiny_mlp()
    layers, acts = parse_chain(model)
    exact = torch.stack([torch.linalg.matrix_norm(m.weight.detach(), ord=2) for m in layers])
    lip, bound = exact_chain_curvature(model, (6,))
    assert chain_curvature(exact, acts).item() == pytest.approx(bound.item(), rel=1e-12)
    # The graph walk computes the same guaranteed bound on a plain chain.
    assert network_curvature_bound(model, (6,)).item() == pytest.approx(bound.item(), rel=1e-9)
    assert lip.item() == pytest.approx(exact.prod().item(), rel=1e-12)  # g = 1 for both
    # Power iteration approaches every norm from below, so the estimate does too; with many
    # iterations it reaches the guaranteed value.
    penalty = ChainCurvaturePenalty(model, n_iter=1)
    first = penalty().item()
    penalty.n_iter = 500
    converged = penalty().item()
    assert first <= bound.item() * (1 + 1e-12)
    assert converged == pytest.approx(bound.item(), rel=1e-8)


def test_penalty_gradient_flows_to_every_weight_and_the_state_is_saved() -> None:
    model = crt_network("cnn", image_size=8)
    penalty = ChainCurvaturePenalty(model)
    penalty().backward()
    for layer in parse_chain(model)[0]:
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
    state = penalty.state_dict()
    assert state and all(k.startswith(("u", "v")) for k in state)  # vectors only, no weights


def test_exact_chain_curvature_bounds_the_jacobian_lipschitz_constant() -> None:
    for model, shape in ((_tiny_mlp(), (6,)), (_tiny_cnn(), (1, 4, 4))):
        _, bound = exact_chain_curvature(model, shape)
        jac = torch.func.vmap(torch.func.jacrev(lambda x, m=model: m(x[None])[0]))
        gen = torch.Generator().manual_seed(0)
        x = 2 * torch.randn(400, *shape, generator=gen, dtype=torch.float64)
        dx = 0.05 * torch.randn(400, *shape, generator=gen, dtype=torch.float64)
        diff = (jac(x + dx) - jac(x)).flatten(2)
        ratios = torch.linalg.matrix_norm(diff, ord=2) / dx.flatten(1).norm(dim=1)
        assert ratios.max().item() <= bound.item()
        assert ratios.max().item() > 0.05 * bound.item()  # the check is not vacuous


# --------------------------------------------------------------------------- training
def _train_digits(gamma: float, steps: int, tmp_path: Path) -> nn.Sequential:
    pl.seed_everything(0, verbose=False)
    model = crt_network("mlp2", image_size=8, width=64)
    module = CurvatureRegularizedClassifier(model, gamma=gamma, lr=1e-2)
    trainer = pl.Trainer(max_steps=steps, accelerator="cpu", devices=1, limit_val_batches=0,
                         logger=CSVLogger(tmp_path, name=f"gamma{gamma}"),
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=1)
    trainer.fit(module, datamodule=DigitsDataModule(batch_size=64))
    return model.eval()


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[float, nn.Sequential]:
    tmp = tmp_path_factory.mktemp("crt")
    return {gamma: _train_digits(gamma, 60, tmp) for gamma in (0.0, 0.5)}


def test_training_with_gamma_lowers_the_curvature_bound(trained) -> None:
    plain = exact_chain_curvature(trained[0.0], (1, 8, 8))[1].item()
    regular = exact_chain_curvature(trained[0.5], (1, 8, 8))[1].item()
    assert regular < 0.5 * plain, (regular, plain)


def test_training_logs_the_estimate(tmp_path: Path) -> None:
    _train_digits(0.1, 3, tmp_path)
    metrics = (tmp_path / "gamma0.1" / "version_0" / "metrics.csv").read_text()
    assert "train/curvature_estimate" in metrics and "train/ce" in metrics


def test_bad_hyperparameters_are_refused() -> None:
    with pytest.raises(ValueError, match="gamma"):
        CurvatureRegularizedClassifier(crt_network("mlp2", width=8), gamma=-1.0)
    with pytest.raises(ValueError, match="arch"):
        crt_network("mlp5")


# --------------------------------------------------------------------------- certificates
def _attack_distance(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int = 150,
                     lr: float = 0.05) -> torch.Tensor:
    """Distance to the nearest point found that the model classifies differently (``inf`` if
    none): for each target ``t``, normalized gradient descent on ``z_y - z_t``, then bisection
    on the segment from ``x`` to the adversarial point, keeping its misclassified end."""
    best = torch.full((len(y),), float("inf"), dtype=torch.float64)
    rows = torch.arange(len(y))
    for t in range(10):
        adv = x.clone()
        for _ in range(steps):
            adv.requires_grad_(True)
            z = model(adv)
            f = z[rows, y] - z[:, t]
            (grad,) = torch.autograd.grad(f.sum(), adv)
            with torch.no_grad():
                step = grad / grad.flatten(1).norm(dim=1).clamp(min=1e-12).view(-1, 1, 1, 1)
                adv = torch.where((f > 0).view(-1, 1, 1, 1), adv - lr * step, adv)
        with torch.no_grad():
            fooled = model(adv).argmax(1) != y
            lo = torch.zeros(len(y), dtype=torch.float64)
            hi = torch.ones(len(y), dtype=torch.float64)
            for _ in range(40):
                mid = (lo + hi) / 2
                wrong = model(x + mid.view(-1, 1, 1, 1) * (adv - x)).argmax(1) != y
                hi, lo = torch.where(wrong, mid, hi), torch.where(wrong, lo, mid)
            dist = hi * (adv - x).flatten(1).norm(dim=1)
            best = torch.where(fooled & (t != y), torch.minimum(best, dist), best)
    return best


def test_second_order_radius_never_exceeds_an_attack_distance(trained) -> None:
    model = trained[0.5].double()
    dm = DigitsDataModule(batch_size=64)
    dm.setup()
    x = torch.stack([dm.test_set[i][0] for i in range(60)]).double()
    y = torch.tensor([dm.test_set[i][1] for i in range(60)])
    correct = model(x).argmax(1) == y
    x, y = x[correct], y[correct]
    c_logits = network_curvature_bound(model, (1, 8, 8))
    pairwise = network_pairwise_curvature(model, (1, 8, 8))
    # The walk's linear-head refinement is the chain recursion's, with exact norms.
    c_features = exact_chain_curvature(model[:-1], (1, 8, 8))[1]
    folded = linear_head_pairwise_curvature(model[-1].weight, c_features)
    torch.testing.assert_close(pairwise, torch.minimum(folded, 2**0.5 * c_logits * (folded > 0)))
    radii = {
        "global": curvature_certified_radius(model, x, y, c_logits),
        "pairwise": curvature_certified_radius(model, x, y, pairwise),
        "crc": crc_certified_radius(model, x, y, pairwise),
    }
    distance = _attack_distance(model, x, y)
    assert torch.isfinite(distance).float().mean() > 0.9  # the attack does find points
    assert (radii["global"] <= radii["pairwise"] + 1e-12).all()
    assert (radii["pairwise"] <= radii["crc"] + 1e-12).all()
    assert (radii["crc"] > 0).all()
    assert (radii["crc"] <= distance).all(), (radii["crc"] - distance).max()


# --------------------------------------------------------------------------- the example
def _example():
    spec = importlib.util.spec_from_file_location("crt_mnist", ROOT / "examples" / "crt_mnist.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["crt_mnist"] = module
    spec.loader.exec_module(module)
    return module


def _write_idx(path: Path, array: np.ndarray) -> None:
    """LeCun's IDX format: magic (0, 0, 0x08 = ubyte, ndim), big-endian int32 sizes, bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _fake_mnist(root: Path, n_train: int = 512, n_test: int = 40) -> None:
    """Class-dependent blobs (label k lights up rows 2k..2k+7) plus noise, in MNIST's files."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = rng.integers(0, 10, size=n).astype(np.uint8)
        images = rng.integers(0, 40, size=(n, 28, 28))
        for i, k in enumerate(labels):
            images[i, 2 * k : 2 * k + 8, 4:24] += 200
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", images.astype(np.uint8))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)


@pytest.mark.parametrize(("arch", "epochs", "gamma", "min_accuracy"),
                         [("mlp2", 1, "0.01", 0.4), ("cnn", 1, "0.001", 0.0)])
def test_example_runs_end_to_end(tmp_path: Path, arch: str, epochs: int, gamma: str,
                                 min_accuracy: float) -> None:
    crt = _example()
    _fake_mnist(tmp_path / "data")
    out = tmp_path / "runs"
    results = crt.main(["--data-dir", str(tmp_path / "data"), "--arch", arch, "--gamma", gamma,
                        "--epochs", str(epochs), "--lr", "5e-3", "--test-samples", "30",
                        "--crc-samples", "5", "--out-dir", str(out)])
    saved = json.loads((out / f"{arch}_gamma{gamma}_epochs{epochs}.json").read_text())
    assert saved["clean_accuracy"] == results["clean_accuracy"] >= min_accuracy
    table = saved["certified"]
    assert set(table) == {"lipschitz", "lipschitz_refined", "curvature", "curvature_pairwise",
                          "crc_pairwise"}
    assert table["crc_pairwise"]["samples"] == 5 and table["curvature"]["samples"] == 30
    for row in table.values():
        for eps in ("0.5", "1.58"):
            assert 0.0 <= row[f"certified@{eps}"] <= saved["clean_accuracy"]
    assert table["curvature_pairwise"]["median_radius"] >= table["curvature"]["median_radius"]
    assert saved["curvature_bound"] > 0 and saved["lipschitz_bound"] > 0
    # The saved weights certify again without training, to the same numbers.
    again = crt.main(["--data-dir", str(tmp_path / "data"), "--arch", arch, "--epochs", "0",
                      "--test-samples", "30", "--out-dir", str(tmp_path / "again"),
                      "--load", str(out / f"{arch}_gamma{gamma}_epochs{epochs}.pt")])
    assert again["certified"]["curvature"] == table["curvature"]


def test_example_refuses_bad_arguments_before_training(tmp_path: Path) -> None:
    crt = _example()
    with pytest.raises(SystemExit, match="lacks.*train-images-idx3-ubyte"):
        crt.parse_args(["--data-dir", str(tmp_path)])
    _fake_mnist(tmp_path)
    with pytest.raises(SystemExit, match="--gamma"):
        crt.parse_args(["--data-dir", str(tmp_path), "--gamma", "-0.1"])
    with pytest.raises(SystemExit, match="--eps"):
        crt.parse_args(["--data-dir", str(tmp_path), "--eps", "0"])
