"""SpectralBoundRegularizer: arguments, layer selection, constraint, errors, logged keys."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
from helpers.callback import Module, loader, quiet_trainer, tiny_net
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_spectral.callback import SpectralBoundRegularizer
from lightning_spectral.functional.bounds import fantastic_four, layer_spectral_bound

warnings.filterwarnings("ignore", ".*does not have many workers.*")


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        (dict(beta=-1.0), "beta"),
        (dict(beta=float("nan")), "beta"),
        (dict(beta="1"), "beta"),
        (dict(n_power_iterations=0), "n_power_iterations"),
        (dict(n_power_iterations=1.5), "n_power_iterations"),
        (dict(warmup_power_iterations=-1), "warmup_power_iterations"),
        (dict(include=[""]), "include"),
        (dict(include=[3]), "include"),
        (dict(exclude=5), "exclude"),
        (dict(reduction="median"), "reduction"),
        (dict(target=-0.5), "target"),
        (dict(target=float("inf")), "target"),
        (dict(constraint=0.0), "constraint"),
        (dict(constraint=-2.0), "constraint"),
        (dict(log_every_n_steps=0), "log_every_n_steps"),
        (dict(log_per_layer="yes"), "log_per_layer"),
        (dict(exact_every_n_epochs=0), "exact_every_n_epochs"),
        (dict(check_finite=1), "check_finite"),
        (dict(certify_epsilons=[]), "certify_epsilons"),
        (dict(certify_epsilons="0.1"), "certify_epsilons"),
        (dict(certify_epsilons=[0.1, -0.2]), "certify_epsilons"),
        (dict(input_scale=0.0), "input_scale"),
        (dict(batch_to_input_target="first"), "batch_to_input_target"),
    ],
)
def test_bad_arguments(kwargs, bad):
    value = next(iter(kwargs.values()))
    with pytest.raises(ValueError, match=bad) as info:
        SpectralBoundRegularizer(**kwargs)
    if not isinstance(value, list):  # the message names the value received
        assert repr(value) in str(info.value)


def test_include_exclude_and_discovery():
    net = nn.Sequential()
    net.add_module("stem", nn.Conv2d(1, 4, 3))
    net.add_module("up", nn.ConvTranspose2d(4, 4, 3, groups=2))
    net.add_module("line", nn.Conv1d(2, 3, 3))
    net.add_module("vol", nn.Conv3d(2, 3, (1, 2, 3)))
    net.add_module("norm", nn.BatchNorm2d(4))
    net.add_module("head", nn.Linear(4, 2))
    module = Module(net)

    reg = SpectralBoundRegularizer()
    reg.discover(module)
    assert reg.layer_names == ["net.stem", "net.up", "net.line", "net.vol", "net.head"]
    reg = SpectralBoundRegularizer(include=["net.s*", "*.head", "*up"], exclude=["*head"])
    reg.discover(module)
    assert reg.layer_names == ["net.stem", "net.up"]
    # Every kind of layer gets an estimate; grouped transposed conv is batched by its shape.
    reg = SpectralBoundRegularizer(warmup_power_iterations=200)
    reg.discover(module)
    with torch.no_grad():
        est = reg.penalty(module)
    assert est == 0  # beta = 0
    layers = [m for m in net if not isinstance(m, nn.BatchNorm2d)]
    ff = torch.stack([
        fantastic_four(m.weight, groups=m.groups) if m.weight.ndim > 2
        else torch.linalg.matrix_norm(m.weight.double(), 2)
        for m in layers
    ])
    # Power iteration approaches the exact FF bound from below.
    assert (reg.last_estimates.double() <= ff * (1 + 1e-5)).all()
    torch.testing.assert_close(reg.last_estimates.double(), ff, rtol=1e-3, atol=0)


def test_no_match_warns_with_patterns():
    reg = SpectralBoundRegularizer(include=["nothing*"], exclude=["x"])
    with pytest.warns(UserWarning, match=r"nothing\*"):
        reg.discover(Module(tiny_net()))
    assert reg.layer_names == []


def test_unsupported_included_layer_warns():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Embedding(3, 4))
    reg = SpectralBoundRegularizer(include=["*"])
    with pytest.warns(UserWarning, match="Embedding"):
        reg.discover(Module(net))
    assert reg.layer_names == ["net.0"]


class _CheckConstraint(Callback):
    def __init__(self, c):
        self.c, self.worst, self.steps = c, [], 0

    def _check(self, pl_module):
        bounds = [float(layer_spectral_bound(m)) for m in pl_module.modules()
                  if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert max(bounds) <= self.c * (1 + 1e-6), bounds
        self.worst.append(max(bounds))

    def on_train_start(self, trainer, pl_module):
        self._check(pl_module)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self._check(pl_module)
        self.steps += 1


def test_constraint_holds_after_every_step():
    c = 0.8
    net = tiny_net()
    with torch.no_grad():
        assert max(float(layer_spectral_bound(m)) for m in net if hasattr(m, "weight")) > c
    reg = SpectralBoundRegularizer(constraint=c)
    check = _CheckConstraint(c)
    quiet_trainer(max_steps=6, callbacks=[reg, check]).fit(Module(net, lr=0.5), loader(8))
    assert check.steps == 6
    # The constraint is active (layers sit at it), not trivially satisfied.
    assert max(check.worst) > c * 0.99


def test_constraint_with_accumulation_projects_after_the_step_only():
    c = 0.8
    net = tiny_net()
    reg = SpectralBoundRegularizer(constraint=c)
    check = _CheckConstraint(c)
    quiet_trainer(max_steps=2, accumulate_grad_batches=2, callbacks=[reg, check]).fit(
        Module(net, lr=0.5), loader(8)
    )
    assert check.steps == 4


class _Poison(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 2:
            with torch.no_grad():
                pl_module.net[2].weight[0, 0, 0, 0] = float("nan")


def test_non_finite_weights_raise_naming_the_layer():
    net = tiny_net()
    reg = SpectralBoundRegularizer(beta=0.1)
    ended = []

    class _Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            ended.append(batch_idx)

    with pytest.raises(RuntimeError, match=r"net\.2"):
        quiet_trainer(max_steps=5, callbacks=[_Poison(), reg, _Record()]).fit(
            Module(net), loader(8)
        )
    # Raised inside the poisoned batch's optimizer step: its on_train_batch_end (where
    # checkpoints are written) never ran.
    assert ended == [0, 1]


def test_csv_logger_receives_the_keys(tmp_path):
    net = tiny_net()
    reg = SpectralBoundRegularizer(beta=0.01, exact_every_n_epochs=1)
    trainer = quiet_trainer(
        max_epochs=1,
        limit_val_batches=1,
        log_every_n_steps=2,
        logger=CSVLogger(tmp_path, name="run"),
    )
    trainer.callbacks.append(reg)
    trainer.fit(Module(net), loader(8), loader(8))
    with open(trainer.logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    keys = set(rows[0])
    names = ["net.0", "net.2", "net.4", "net.7"]
    expected = {"spectral_penalty", "spectral_estimate/max", "spectral_bound/max",
                "spectral_ratio/max"}
    for n in names:
        expected |= {f"spectral_estimate/{n}", f"spectral_bound/{n}", f"spectral_exact/{n}",
                     f"spectral_ratio/{n}"}
    assert expected <= keys, expected - keys
    steps = [r for r in rows if r["spectral_penalty"]]
    assert len(steps) == 4  # 8 batches, every 2nd step
    final = next(r for r in rows if r["spectral_bound/net.2"])
    bounds = reg.guaranteed_bounds()  # float64; the weights are those validated last
    for n in names:  # the bound is never below the exact norm; ratio = bound / exact
        bound, exact = float(final[f"spectral_bound/{n}"]), float(final[f"spectral_exact/{n}"])
        assert bound >= bounds[n]  # stored as float32, rounded up: still an upper bound
        assert bound == pytest.approx(bounds[n], rel=2e-7)  # one float32 ulp
        assert bound >= exact * (1 - 1e-6)
        assert float(final[f"spectral_ratio/{n}"]) == pytest.approx(bound / exact, rel=1e-5)
    # The input sizes recorded in the first batch: 8x8 for the first two convs.
    assert reg.input_sizes["net.0"] == (8, 8) and reg.input_sizes["net.4"] == (8, 8)


def test_state_dict_round_trip_and_mismatch():
    module = Module(tiny_net())
    reg = SpectralBoundRegularizer(warmup_power_iterations=3)
    reg.discover(module)
    state = reg.state_dict()
    assert set(state["layers"]) == {"net.0", "net.2", "net.4", "net.7"}
    other = SpectralBoundRegularizer(warmup_power_iterations=0)
    other.discover(module)
    other.load_state_dict(state)
    for name, entry in other.state_dict()["layers"].items():
        for a, b in zip(entry["u"], state["layers"][name]["u"], strict=True):
            assert torch.equal(a, b)
    state["layers"]["net.2"]["u"][0] = torch.zeros(7)
    with pytest.raises(ValueError, match="net.2"):
        other.load_state_dict(state)


def test_vectors_are_seeded_by_layer_name():
    a, b = SpectralBoundRegularizer(warmup_power_iterations=0), SpectralBoundRegularizer(
        warmup_power_iterations=0
    )
    torch.manual_seed(1)
    a.discover(Module(tiny_net()))
    torch.manual_seed(2)
    b.discover(Module(tiny_net()))
    for name in a.state_dict()["layers"]:
        assert torch.equal(a.state_dict()["layers"][name]["u"][0],
                           b.state_dict()["layers"][name]["u"][0])
    assert not torch.equal(a.state_dict()["layers"]["net.2"]["u"][0],
                           a.state_dict()["layers"]["net.4"]["u"][0])


@pytest.mark.parametrize("reduction", ["sum", "max", "mean"])
@pytest.mark.parametrize("target", [None, 1.0])
def test_penalty_reduction_and_target(reduction, target):
    from helpers.callback import ff_bound, layers

    module = Module(tiny_net())
    reg = SpectralBoundRegularizer(beta=0.3, reduction=reduction, target=target,
                                   n_power_iterations=50, warmup_power_iterations=300)
    reg.discover(module)
    penalty = reg.penalty(module)
    with torch.no_grad():
        ref = torch.stack([ff_bound(m) for m in layers(module)])
    if target is not None:
        ref = (ref - target).clamp_min(0)
        assert (ref == 0).any() and (ref > 0).any()  # the hinge is active for some layers only
    expected = 0.3 * {"sum": ref.sum, "max": ref.max, "mean": ref.mean}[reduction]()
    torch.testing.assert_close(penalty.detach(), expected, rtol=1e-5, atol=1e-6)
    penalty.backward()  # differentiable w.r.t. the weights
    assert all(m.weight.grad is not None for m in layers(module))


def test_validate_only_logs_guaranteed_bounds():
    reg = SpectralBoundRegularizer(log_per_layer=False)
    trainer = quiet_trainer(limit_val_batches=1, callbacks=[reg])
    trainer.validate(Module(tiny_net()), loader(8), verbose=False)
    keys = set(trainer.callback_metrics)
    assert "spectral_bound/max" in keys
    assert not any(k.startswith("spectral_bound/net") for k in keys)
