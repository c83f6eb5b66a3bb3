"""Certified training in the callback: the recorded Lipschitz program, the pairwise bounds, a
user's own LightningModule trained for a certificate, and certified points under attack."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral import SpectralBoundRegularizer, network_lipschitz_bound
from lightning_spectral.functional.certify import pairwise_certified_radius
from lightning_spectral.network.pairwise import lipschitz_and_pairwise, network_pairwise_lipschitz
from lightning_spectral.network.tape import record_lipschitz


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return x + 0.5 * torch.tanh(self.conv(x))


def _nets() -> dict[str, nn.Module]:
    bn = nn.BatchNorm2d(3)
    bn.running_var.uniform_(0.5, 2.0)
    bn.running_mean.uniform_(-1, 1)
    return {
        "chain": nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(),
                               nn.Linear(3 * 36, 8), nn.ReLU(), nn.Linear(8, 4)),
        "bn_fold": nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), bn, nn.ReLU(),
                                 nn.Flatten(), nn.Linear(27, 4)),
        "residual": nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), _Residual(), nn.AvgPool2d(2),
                                  nn.Flatten(), nn.Linear(27, 4)),
        "no_head": nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                 nn.AdaptiveAvgPool2d(1), nn.Flatten()),
    }


def _selected(net: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


@pytest.mark.parametrize("name", ["chain", "bn_fold", "residual", "no_head"])
def test_replay_of_the_guaranteed_bounds_is_the_network_bound_exactly(name: str) -> None:
    net = _nets()[name].eval()
    shape = (1, 6, 6)
    program = record_lipschitz(net, shape, _selected(net))
    assert float(program.lipschitz(program.network.bounds)) == float(
        network_lipschitz_bound(net, shape))
    lip, pairwise = lipschitz_and_pairwise(net, shape)
    # The head's row norms are summed in another order than torch.cdist's: rounding only.
    torch.testing.assert_close(program.pairwise(program.network.bounds).detach(), pairwise,
                               rtol=1e-12, atol=0)
    assert (program.head is None) == (name == "no_head")


def test_the_program_follows_the_norms() -> None:
    net = _nets()["chain"].eval()
    program = record_lipschitz(net, (1, 6, 6), _selected(net))
    norms = program.network.bounds.clone().requires_grad_(True)
    doubled = norms.detach().clone()
    doubled[0] *= 2
    # A chain of ReLU and layers: the bound is the product, linear in each norm.
    assert float(program.lipschitz(doubled)) == pytest.approx(2 * float(program.lipschitz(norms)))
    (grad,) = torch.autograd.grad(program.lipschitz(norms), norms)
    assert bool((grad > 0).all())
    # The pairwise bounds follow every layer before the head (the head enters by its rows).
    (grad,) = torch.autograd.grad(program.pairwise(norms).sum(), norms)
    assert bool((grad[:-1] > 0).all())


def _margin_gradient_norms(net: nn.Module, x: Tensor) -> Tensor:
    """``||grad_x (z_y - z_j)||`` at each point for every pair: (N, C, C)."""
    x = x.clone().requires_grad_(True)
    z = net(x)
    c = z.shape[1]
    out = torch.zeros(x.shape[0], c, c, dtype=torch.float64)
    for i in range(c):
        for j in range(c):
            if i != j:
                (g,) = torch.autograd.grad((z[:, i] - z[:, j]).sum(), x, retain_graph=True)
                out[:, i, j] = g.flatten(1).norm(dim=1).double()
    return out


@pytest.mark.parametrize("name", ["chain", "bn_fold", "residual"])
def test_pairwise_bounds_dominate_the_margin_gradients_and_the_global_bound(name: str) -> None:
    net = _nets()[name].eval()
    k = network_pairwise_lipschitz(net, (1, 6, 6))
    lip = network_lipschitz_bound(net, (1, 6, 6))
    local = _margin_gradient_norms(net, torch.randn(64, 1, 6, 6)).amax(0)
    assert bool((local <= k * (1 + 1e-9)).all())
    assert bool((k <= math.sqrt(2) * lip * (1 + 1e-12)).all())
    assert bool((k.diagonal() == 0).all())


class _UserModel(pl.LightningModule):
    """A user's own module: plain cross-entropy, nothing about certificates."""

    def __init__(self, call_forward: bool = True) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU())
        self.head = nn.Linear(16, 3)
        self.call_forward = call_forward

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.body(x))

    def training_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x) if self.call_forward else self.head(self.body(x))
        return F.cross_entropy(logits, y)

    def validation_step(self, batch, batch_idx) -> None:
        pass

    def test_step(self, batch, batch_idx) -> None:
        pass

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def _blobs(n: int, seed: int) -> TensorDataset:
    """Three well separated clusters in the plane (distance ~3 between centers)."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.tensor([[0.0, 0.0], [3.0, 0.0], [1.5, 2.6]])
    y = torch.randint(0, 3, (n,), generator=g)
    return TensorDataset(centers[y] + 0.3 * torch.randn(n, 2, generator=g), y)


def _fit(callback: SpectralBoundRegularizer, epochs: int = 30, **model_kwargs):
    pl.seed_everything(0)
    model = _UserModel(**model_kwargs)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, callbacks=[callback])
    trainer.fit(model, DataLoader(_blobs(256, 0), batch_size=64, shuffle=True))
    return model, trainer


def _certified_at(model: nn.Module, data: TensorDataset, eps: float) -> Tensor:
    x, y = data.tensors
    with torch.no_grad():
        logits = model.eval()(x)
    k = network_pairwise_lipschitz(model, (2,))
    return (pairwise_certified_radius(logits, y, k) > eps) & (logits.argmax(1) == y)


def test_certified_training_certifies_a_user_module_that_plain_training_does_not() -> None:
    eps, test = 0.5, _blobs(300, 1)
    plain, _ = _fit(SpectralBoundRegularizer())
    trained, trainer = _fit(SpectralBoundRegularizer(certified_eps=eps, certified_weight=1.0,
                                                     certified_warmup_steps=40))
    plain_rate = float(_certified_at(plain, test, eps).float().mean())
    rate = float(_certified_at(trained, test, eps).float().mean())
    assert rate > 0.9 and rate > plain_rate + 0.2, (rate, plain_rate)
    logged = trainer.callback_metrics
    assert float(logged["certified_train/eps"]) == pytest.approx(eps)
    assert "certified_train/lipschitz_estimate" in logged


def _pgd_breaks(model: nn.Module, x: Tensor, y: Tensor, eps: float, steps: int = 60,
                restarts: int = 4) -> Tensor:
    """Whether a PGD attack (l2 ball, every wrong class as target, random restarts) finds a
    point within ``eps`` where the prediction is not ``y``."""
    broken = torch.zeros(x.shape[0], dtype=torch.bool)
    c = model(x).shape[1]
    for target_class in range(c):
        for restart in range(restarts):
            g = torch.Generator().manual_seed(restart)
            delta = torch.randn(x.shape, generator=g)
            delta = delta / delta.norm(dim=1, keepdim=True) * eps * (0.5 if restart else 0.0)
            for _ in range(steps):
                delta.requires_grad_(True)
                z = model(x + delta)
                margin = z.gather(1, y[:, None]).squeeze(1) - z[:, target_class]
                (grad,) = torch.autograd.grad(margin.sum(), delta)
                with torch.no_grad():
                    step = grad / grad.norm(dim=1, keepdim=True).clamp_min(1e-12)
                    delta = delta - 0.1 * eps * step
                    delta = delta * (eps / delta.norm(dim=1, keepdim=True).clamp_min(eps))
            with torch.no_grad():
                broken |= model(x + delta).argmax(1) != y
    return broken


def test_certified_points_survive_an_attack() -> None:
    eps, test = 0.5, _blobs(200, 2)
    model, _ = _fit(SpectralBoundRegularizer(certified_eps=0.6, certified_warmup_steps=40))
    model.eval()
    certified = _certified_at(model, test, eps)
    assert int(certified.sum()) > 100
    x, y = test.tensors
    broken = _pgd_breaks(model, x[certified], y[certified], eps)
    assert int(broken.sum()) == 0
    # The attack is not toothless: at three times the radius it breaks some of them.
    assert int(_pgd_breaks(model, x[certified], y[certified], 3 * eps).sum()) > 0


def test_a_step_that_does_not_call_forward_is_refused() -> None:
    with pytest.raises(RuntimeError, match=r"self\(x\)"):
        _fit(SpectralBoundRegularizer(certified_eps=0.5), epochs=1, call_forward=False)


@pytest.mark.parametrize("kwargs, match", [
    (dict(certified_eps=-1.0), "certified_eps"),
    (dict(certified_eps=0.5, certified_loss="hinge"), "certified_loss"),
    (dict(certified_eps=0.5, certified_weight=-1.0), "certified_weight"),
    (dict(certified_eps=0.5, certified_warmup_steps=1.5), "certified_warmup_steps"),
])
def test_bad_options_are_named(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        SpectralBoundRegularizer(**kwargs)


def test_vectors_are_checkpointed_and_restored(tmp_path) -> None:
    callback = SpectralBoundRegularizer(certified_eps=0.5)
    _, trainer = _fit(callback, epochs=1)
    path = tmp_path / "last.ckpt"
    trainer.save_checkpoint(path)
    saved = torch.load(path, weights_only=False)["callbacks"]
    (state,) = [v for k, v in saved.items() if "SpectralBoundRegularizer" in k]
    assert set(state["certified"]) == {"body.0", "body.2", "head"}
    resumed = SpectralBoundRegularizer(certified_eps=0.5)
    resumed.load_state_dict(state)
    model = _UserModel()
    model.load_state_dict(trainer.lightning_module.state_dict())
    resumed._certified.prepare(model, {n: dict(model.named_modules())[n] for n in
                                       ["body.0", "body.2", "head"]}, (2,), warmup=0)
    for name, u in zip(resumed._certified.names, resumed._certified.vectors, strict=True):
        assert torch.equal(u, state["certified"][name])


def test_committed_mnist_results_have_the_promised_fields_and_weights() -> None:
    """The committed runs: the documented fields, fractions, and weights that load into the
    documented model with the guaranteed bound the run logged."""
    import json
    from pathlib import Path

    from lightning_spectral.demos import MaxMinCNN

    root = Path(__file__).resolve().parents[2]
    runs = json.loads((root / "benchmarks/results/certified_training_mnist_cpu.json").read_text())
    assert runs
    for run in runs:
        assert {"name", "eps", "clean_accuracy", "certified_accuracy", "sound_all_classes",
                "epochs", "train_seconds", "checkpoint"} <= set(run)
        assert run["eps"] == 1.58 and run["sound_all_classes"] is True
        assert 0 <= run["certified_accuracy"] <= run["clean_accuracy"] <= 1
        assert run["certified_accuracy"] == run["certified_accuracy_at"]["1.58"]
        saved = torch.load(root / run["checkpoint"], map_location="cpu")
        net = MaxMinCNN(width=saved["hparams"]["width"], dense=saved["hparams"]["dense"])
        net.load_state_dict(saved["state_dict"])
        lip = float(network_lipschitz_bound(net, (1, 28, 28)))
        # Logged as float32, rounded up.
        assert lip <= run["lipschitz_bound"] <= lip * (1 + 1e-6)
