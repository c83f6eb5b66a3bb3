"""The curvature penalty and curvature certification of ``SpectralBoundRegularizer``, and the
recorded curvature walk (``record_curvature``) they rest on."""

from __future__ import annotations

import csv

import pytest
import torch
import torch.nn.functional as F
from helpers.callback import Module, quiet_trainer
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral import (
    SmoothSoftplus,
    network_curvature_bound,
    network_pairwise_curvature,
)
from lightning_spectral.callback import SpectralBoundRegularizer
from lightning_spectral.certify import CertificationTracker
from lightning_spectral.functional import (
    certified_radius,
    layer_spectral_bound,
    pairwise_certified_radius,
)
from lightning_spectral.network import (
    NonSmoothOperationError,
    UnsupportedOperationError,
    lipschitz_and_pairwise,
    record_curvature,
)


class ConvNet(nn.Module):
    """BatchNorm (folded and alone), a residual, average pooling and a concatenation."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.act = SmoothSoftplus()
        self.res = nn.Conv2d(4, 4, 3, padding=1)
        self.side = nn.Conv2d(4, 2, 1)
        self.bn_alone = nn.BatchNorm2d(6)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(24, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.bn(self.conv(x)))
        h = h + torch.tanh(self.res(h))
        h = torch.cat([h, torch.sigmoid(self.side(h))], dim=1)
        h = self.pool(self.bn_alone(h))
        return self.head(h.flatten(1))


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    net = ConvNet()
    for bn in (net.bn, net.bn_alone):  # non-trivial running statistics and affine
        bn.running_var.uniform_(0.5, 2.0)
        bn.running_mean.uniform_(-1.0, 1.0)
        nn.init.uniform_(bn.weight, 0.5, 1.5)
    return net.eval()


def _layers(net: nn.Module) -> dict[str, nn.Module]:
    return {n: m for n, m in net.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}


def test_replay_of_recorded_bounds_is_the_network_curvature_bound():
    net = _conv_net()
    tape = record_curvature(net, (1, 8, 8), _layers(net))
    expected = network_curvature_bound(net, (1, 8, 8))
    assert tape.n_layers == 4 and bool((tape.bounds > 0).all())
    assert torch.equal(tape.replay(tape.bounds), expected)  # bit for bit


def test_replay_tracks_the_layer_norms():
    """Doubling the head scales C by 2; a layer in front scales C at least linearly."""
    net = _conv_net()
    tape = record_curvature(net, (1, 8, 8), _layers(net))
    scaled = tape.bounds.clone()
    scaled[-1] *= 2
    assert torch.allclose(tape.replay(scaled), 2 * tape.replay(tape.bounds), rtol=1e-12)
    first = tape.bounds.clone()
    first[0] *= 2
    assert tape.replay(first) > 2 * tape.replay(tape.bounds) * (1 - 1e-12)


def test_unselected_layers_are_constants():
    net = _conv_net()
    layers = _layers(net)
    tape = record_curvature(net, (1, 8, 8), {"head": layers["head"]})
    assert tape.n_layers == 1
    expected = network_curvature_bound(net, (1, 8, 8))
    assert torch.equal(tape.replay(tape.bounds), expected)
    head = layer_spectral_bound(net.head, None).detach().double()
    assert torch.allclose(tape.bounds[0], head, rtol=1e-6)


def test_replay_is_differentiable():
    net = _conv_net()
    tape = record_curvature(net, (1, 8, 8), _layers(net))
    norms = tape.bounds.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(tape.replay, (norms,))
    tape.replay(norms).backward()
    assert bool((norms.grad > 0).all()) and bool(torch.isfinite(norms.grad).all())


def test_replay_checks_the_number_of_norms():
    net = _conv_net()
    tape = record_curvature(net, (1, 8, 8), _layers(net))
    with pytest.raises(ValueError, match="needs 4 per-layer norms"):
        tape.replay(torch.ones(3))


def test_recording_refuses_a_relu_naming_the_node():
    net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(NonSmoothOperationError, match="'1'"):
        record_curvature(net, (4,), _layers(net))


def test_placeholders_refuse_escaping_the_tape():
    """A bound read as a number, or put through an unknown operation, is refused: it would
    silently become a constant of the tape."""
    from lightning_spectral.network.tape import Recorder

    leaf = Recorder().add(("leaf", 0), torch.tensor(1.0, dtype=torch.float64))
    with pytest.raises(UnsupportedOperationError, match="__float__"):
        float(leaf)
    with pytest.raises(UnsupportedOperationError, match="exp"):
        torch.exp(leaf)
    with pytest.raises(UnsupportedOperationError, match="to"):
        leaf.to(torch.float32)  # a cast would not be replayed
    with pytest.raises(UnsupportedOperationError, match="max"):
        torch.stack([leaf, leaf]).max(dim=0)  # values outside the tape
    assert bool(leaf > 0)  # a comparison is decided at recording, not recorded


def test_a_selected_layer_with_zero_bound_stays_a_dependency():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    nn.init.zeros_(net[0].weight)
    tape = record_curvature(net, (3,), _layers(net))
    assert torch.equal(tape.replay(tape.bounds), network_curvature_bound(net, (3,)))
    assert tape.replay(torch.ones(2)) > 0  # the zero layer still enters the expression


def test_tape_state_round_trip():
    from lightning_spectral.network.tape import tape_from_state, tape_state

    net = _conv_net()
    tape = record_curvature(net, (1, 8, 8), _layers(net))
    again = tape_from_state(tape_state(tape))
    norms = torch.rand(4, dtype=torch.float64) + 0.5
    assert torch.equal(again.replay(norms), tape.replay(norms))


# ---------------------------------------------------------------- the callback


def _smooth_net() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), SmoothSoftplus(), nn.Conv2d(4, 4, 3, padding=1, stride=2),
        nn.Tanh(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(16, 3),
    )


def _data(n: int = 48, seed: int = 0) -> TensorDataset:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 1, 8, 8, generator=gen)
    y = (x[:, 0, :4].mean((1, 2)) > 0).long() + (x[:, 0, 4:].mean((1, 2)) > 0).long()
    return TensorDataset(x, y)


def _loader(batch_size: int = 16, n: int = 48) -> DataLoader:
    return DataLoader(_data(n), batch_size=batch_size, shuffle=False)


class Counting(Module):
    """Counts training steps (the refusals must come before the first one)."""

    steps = 0

    def training_step(self, batch, batch_idx):
        type(self).steps += 1
        return super().training_step(batch, batch_idx)


def _fit(curvature_beta: float, steps: int = 12, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = _smooth_net()
    reg = SpectralBoundRegularizer(curvature_beta=curvature_beta, warmup_power_iterations=20)
    quiet_trainer(max_steps=steps, callbacks=[reg]).fit(Module(net, lr=0.05), _loader())
    return net


def test_curvature_beta_lowers_the_guaranteed_curvature_bound():
    plain = network_curvature_bound(_fit(0.0), (1, 8, 8))
    penalized = network_curvature_bound(_fit(0.05), (1, 8, 8))
    assert penalized < 0.6 * plain


class _Capture(Callback):
    """Records the loss the step returned (task loss + penalty) and the callback's values."""

    def __init__(self, reg: SpectralBoundRegularizer) -> None:
        self.reg, self.rows = reg, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        x, y = batch
        with torch.no_grad():
            task = F.cross_entropy(pl_module(x), y)
        self.rows.append((outputs["loss"].detach(), task, self.reg.last_estimates.clone()))


def test_the_penalty_is_curvature_beta_times_the_replayed_estimates(tmp_path):
    torch.manual_seed(0)
    net = _smooth_net()
    reg = SpectralBoundRegularizer(curvature_beta=0.3, warmup_power_iterations=5,
                                   log_every_n_steps=1)
    capture = _Capture(reg)
    trainer = quiet_trainer(max_steps=3, callbacks=[reg, capture], logger=CSVLogger(tmp_path),
                            log_every_n_steps=1)
    # lr 0: the loss seen after the step is the one the step computed.
    trainer.fit(Module(net, lr=0.0), _loader())
    tape = reg.curvature_tape
    assert tape is not None and tape.n_layers == 3
    start = network_curvature_bound(net, (1, 8, 8))
    assert torch.equal(tape.replay(tape.bounds), start)
    for loss, task, estimates in capture.rows:
        expected = 0.3 * tape.replay(estimates).float()
        torch.testing.assert_close(loss - task, expected, rtol=1e-5, atol=1e-6)
    logged = _metrics(tmp_path)["curvature_estimate/network"]
    assert len(logged) == 3
    replayed = float(tape.replay(capture.rows[-1][2]))
    assert logged[-1] == pytest.approx(replayed, rel=1e-6)


def _metrics(tmp_path) -> dict[str, list[float]]:
    """Every logged value of metrics.csv, by column, in order (empty cells left out)."""
    (path,) = tmp_path.rglob("metrics.csv")
    columns: dict[str, list[float]] = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            for key, value in row.items():
                if value != "":
                    columns.setdefault(key, []).append(float(value))
    return columns


@pytest.mark.parametrize("options", [
    {"curvature_beta": 0.1},
    {"curvature_beta": 0.1, "curvature_input_shape": [1, 8, 8]},
    {"certify_epsilons": [0.1], "certify_method": "curvature"},
])
def test_a_relu_network_is_refused_before_any_training_step(options):
    Counting.steps = 0
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.Flatten(), nn.Linear(72, 3))
    reg = SpectralBoundRegularizer(**options)
    trainer = quiet_trainer(max_steps=2, callbacks=[reg], limit_val_batches=1)
    with pytest.raises(NonSmoothOperationError, match="node '.*1'"):
        trainer.fit(Counting(net), _loader(), _loader())
    assert Counting.steps == 0


def test_certify_method_needs_epsilons_and_a_known_method():
    with pytest.raises(ValueError, match="certify_epsilons"):
        SpectralBoundRegularizer(certify_method="curvature")
    with pytest.raises(ValueError, match="certify_method"):
        SpectralBoundRegularizer(certify_epsilons=[0.1], certify_method="second")
    with pytest.raises(ValueError, match="curvature_beta"):
        SpectralBoundRegularizer(curvature_beta=-1.0)
    with pytest.raises(ValueError, match="curvature_input_shape"):
        SpectralBoundRegularizer(curvature_input_shape=[1, 0, 8])


# ---------------------------------------------------------------- resume


def _bn_net() -> nn.Sequential:
    """BatchNorm folded into the first convolution: its scale is a constant of the program,
    one that training changes, so a program recorded anew on resume would differ."""
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Tanh(),
        nn.Conv2d(4, 4, 3, padding=1, stride=2), SmoothSoftplus(), nn.AvgPool2d(2),
        nn.Flatten(), nn.Linear(16, 3),
    )


def _resume_reg() -> SpectralBoundRegularizer:
    return SpectralBoundRegularizer(curvature_beta=0.05, warmup_power_iterations=3)


def test_resume_with_curvature_beta_is_exact(tmp_path):
    torch.manual_seed(1)
    net = _bn_net()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    quiet_trainer(max_epochs=4, callbacks=[_resume_reg()]).fit(Module(net), _loader())

    net_b = _bn_net()
    net_b.load_state_dict(start)
    trainer = quiet_trainer(max_epochs=2, callbacks=[_resume_reg()])
    trainer.fit(Module(net_b), _loader())
    trainer.save_checkpoint(tmp_path / "mid.ckpt")

    net_c = _bn_net()  # other initial weights: everything must come from the checkpoint
    reg_c = _resume_reg()
    quiet_trainer(max_epochs=4, callbacks=[reg_c]).fit(
        Module(net_c), _loader(), ckpt_path=tmp_path / "mid.ckpt")
    for p, q in zip(net.parameters(), net_c.parameters(), strict=True):
        assert torch.equal(p, q)
    # The program of the resumed run is the one recorded at the very start, not a new one.
    fresh = record_curvature(net_b, (1, 8, 8), _layers(net_b))
    assert not torch.equal(fresh.replay(fresh.bounds), reg_c.curvature_tape.replay(fresh.bounds))


# ---------------------------------------------------------------- certification


class _Smooth(Module):
    def test_step(self, batch, batch_idx):
        return None


def _certify(tmp_path, method: str) -> tuple[dict[str, list[float]], nn.Module]:
    torch.manual_seed(0)
    net = _smooth_net()
    reg = SpectralBoundRegularizer(certify_epsilons=[0.01, 0.1], certify_method=method,
                                   warmup_power_iterations=5)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=3, limit_val_batches=2,
                            callbacks=[reg], logger=CSVLogger(tmp_path))
    module = _Smooth(net)
    trainer.fit(module, _loader(), _loader(8, 16))
    trainer.test(module, _loader(8, 16))
    return _metrics(tmp_path), net


@pytest.mark.parametrize("method", ["curvature", "both"])
def test_certify_method_logs_the_curvature_family(tmp_path, method):
    logged, net = _certify(tmp_path, method)
    for prefix in ("", "test/"):
        family = f"{prefix}certified_curvature"
        curvature = {f"{family}/acc@0.01", f"{family}/acc@0.1", f"{family}/radius",
                     f"{prefix}curvature/network"}
        lipschitz = {f"{prefix}certified/acc@0.1", f"{prefix}lipschitz/network"}
        assert curvature <= logged.keys()
        assert (lipschitz <= logged.keys()) == (method == "both")
        assert lipschitz.isdisjoint(logged) or method == "both"
        for eps in ("0.01", "0.1"):
            (acc,) = logged[f"{prefix}certified_curvature/acc@{eps}"]
            assert 0.0 <= acc <= 1.0
        (radius,) = logged[f"{prefix}certified_curvature/radius"]
        assert radius >= 0.0
    # Guaranteed, rounded up: never below the bound of the final weights.
    bound = float(network_curvature_bound(net, (1, 8, 8)))
    (c_val,) = logged["curvature/network"]
    assert bound <= c_val <= bound * (1 + 1e-6)
    assert logged["certified_curvature/acc@0.01"][0] >= logged["certified_curvature/acc@0.1"][0]


def _attack_distance(net: nn.Module, x: torch.Tensor, y: int) -> float:
    """The smallest step found along the gradient of some margin that changes the prediction
    (an upper bound on the distance to the decision boundary); inf when none is found."""
    best = float("inf")
    for t in range(3):
        if t == y:
            continue
        v = x.clone().requires_grad_(True)
        logits = net(v[None])[0]
        (grad,) = torch.autograd.grad(logits[y] - logits[t], v)
        step = -grad / grad.norm()
        with torch.no_grad():
            scales = torch.linspace(0, 50, 2001, dtype=torch.float64)[1:]
            preds = net(x[None] + scales[:, None, None, None] * step[None]).argmax(1)
            flipped = (preds != y).nonzero()
            if len(flipped):
                best = min(best, float(scales[flipped[0, 0]]))
    return best


def test_curvature_radii_are_below_the_distance_an_attack_finds():
    torch.manual_seed(0)
    net = _smooth_net().double().eval()
    with torch.no_grad():
        net[-1].weight.mul_(20)  # margins that flip within reach of the attack
    x = _data(8).tensors[0].double()
    with torch.no_grad():
        y = net(x).argmax(1)
    pairwise = network_pairwise_curvature(net, (1, 8, 8))
    tracker = CertificationTracker([0.1], method="curvature")
    radii = tracker.curvature_radii(Module(net), x, y, pairwise)
    distances = torch.tensor([_attack_distance(net, x[i], int(y[i])) for i in range(len(x))],
                             dtype=torch.float64)
    assert bool(torch.isfinite(distances).any())
    assert bool((radii > 0).all())
    assert bool((radii <= distances).all())
    scaled = CertificationTracker([0.1], input_scale=0.5, method="curvature")
    assert torch.allclose(scaled.curvature_radii(Module(net), x, y, pairwise), 0.5 * radii)


class _Unused(Module):
    """Holds a layer its forward never calls."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__(net)
        self.spare = nn.Linear(3, 3)


def test_a_selected_layer_the_forward_does_not_call_is_reported():
    torch.manual_seed(0)
    reg = SpectralBoundRegularizer(curvature_beta=0.01, warmup_power_iterations=2)
    with pytest.warns(UserWarning, match=r"\['spare'\]"):
        quiet_trainer(max_steps=1, callbacks=[reg]).fit(_Unused(_smooth_net()), _loader())
    assert reg.curvature_tape.missing == [3]


def test_both_methods_log_the_per_point_maximum_of_the_two_radii():
    torch.manual_seed(0)
    net = _smooth_net().double().eval()
    with torch.no_grad():
        net[-1].weight.mul_(20)
    x = _data(24).tensors[0].double()
    with torch.no_grad():
        y = net(x).argmax(1)
    y[:4] = (y[:4] + 1) % 3  # some misclassified points (negative radii)
    tracker = CertificationTracker([0.0, 0.05], method="both")
    module = Module(net)
    tracker.update("validate", module, (x, y))
    values = tracker.compute("validate")
    # The two radii computed on their own, then the maximum per point.
    lip, k = lipschitz_and_pairwise(module, (1, 8, 8))
    with torch.no_grad():
        logits = net(x)
    first = torch.maximum(certified_radius(logits, y, lip),
                          pairwise_certified_radius(logits, y, k))
    second = tracker.curvature_radii(module, x, y, network_pairwise_curvature(net, (1, 8, 8)))
    best = torch.maximum(first, second)
    correct = logits.argmax(1) == y
    for eps in (0.0, 0.05):
        expected = float((correct & (best >= eps)).double().mean())
        assert float(values[f"certified_best/acc@{eps:g}"]) == pytest.approx(expected, abs=1e-6)
    assert float(values["certified_best/radius"]) == pytest.approx(
        float(best.clamp_min(0).mean()), rel=1e-6)
    assert float(values["certified_best/radius"]) >= max(
        float(values["certified/radius"]), float(values["certified_curvature/radius"]))
    assert bool((first > second).any()) or bool((second > first).any())
