"""SpectralBoundRegularizer under faults and unusual models.

Non-finite weights written by an optimizer step, lazy layers, two instances in one Trainer,
frozen layers, layer subclasses whose forward is not ``W x``, and what the logged keys say.
"""

from __future__ import annotations

import copy
import csv
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers.callback import (
    CONVERGED,
    Module,
    batches,
    hand_train,
    loader,
    quiet_trainer,
    tiny_net,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_spectral.callback import SpectralBoundRegularizer
from lightning_spectral.functional.bounds import layer_spectral_bound

warnings.filterwarnings("ignore", ".*does not have many workers.*")

BETA = 0.5


def _bound(module: nn.Module) -> float:
    with torch.no_grad():
        return float(layer_spectral_bound(module))


# ---------------------------------------------------------------- non-finite weights


class _NanHeadAt(Module):
    """At batch ``bad``, the head's gradient (only the head's) is NaN: SGD makes it NaN."""

    def __init__(self, net: nn.Module, bad: int) -> None:
        super().__init__(net)
        self.bad = bad

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if batch_idx == self.bad:
            loss = loss + float("nan") * self.net[7].weight.sum()
        return loss


@pytest.mark.parametrize(
    "kwargs",
    [dict(beta=0.1), dict(constraint=5.0), dict(constraint=5.0, check_finite=False)],
    ids=["penalty", "constraint", "constraint-without-check"],
)
def test_nan_from_optimizer_step_raises_before_last_ckpt_is_overwritten(tmp_path, kwargs):
    reg = SpectralBoundRegularizer(**kwargs)
    ckpt = ModelCheckpoint(dirpath=tmp_path, save_last=True, every_n_train_steps=1)
    trainer = quiet_trainer(max_steps=6, enable_checkpointing=True, callbacks=[reg, ckpt])
    with pytest.raises(RuntimeError, match=r"net\.7") as info:
        trainer.fit(_NanHeadAt(tiny_net(), bad=2), loader(8))
    assert "net.0" not in str(info.value)  # only the layer that went bad is named
    saved = torch.load(tmp_path / "last.ckpt", weights_only=False)
    assert saved["global_step"] == 2  # written after the last good step
    for name, value in saved["state_dict"].items():
        assert torch.isfinite(value).all(), name


# ---------------------------------------------------------------- lazy layers


def lazy_net() -> nn.Sequential:
    return nn.Sequential(
        nn.LazyConv2d(4, 3, padding=1),
        nn.ReLU(),
        nn.LazyConv2d(4, 3, padding=1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.LazyLinear(10),
    )


class _InitialWeights(Callback):
    """A copy of the network as the first forward materialized it, before any step."""

    net: nn.Module | None = None

    def on_before_backward(self, trainer, pl_module, loss):
        if self.net is None:
            self.net = copy.deepcopy(pl_module.net)


def test_lazy_layers_are_penalized_exactly():
    net = lazy_net()
    reg = SpectralBoundRegularizer(beta=BETA, **CONVERGED)
    initial = _InitialWeights()
    quiet_trainer(max_steps=3, callbacks=[reg, initial]).fit(Module(net), loader(8))
    assert reg.layer_names == ["net.0", "net.2", "net.5"]
    reference = initial.net
    hand_train(reference, batches(8, 3), BETA)
    for (name, p), q in zip(net.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=1e-4, rtol=1e-4, msg=name)


@pytest.mark.parametrize("sanity_steps", [0, 1])
def test_lazy_layers_constraint_and_logged_bounds(tmp_path, sanity_steps):
    c = 0.5
    net = lazy_net()
    seen = []

    class _Check(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            seen.append(max(_bound(m) for m in (net[0], net[2], net[5])))

    reg = SpectralBoundRegularizer(constraint=c)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=4, limit_val_batches=1,
                            log_every_n_steps=1, logger=CSVLogger(tmp_path, name="run"),
                            num_sanity_val_steps=sanity_steps, callbacks=[reg, _Check()])
    trainer.fit(Module(net, lr=0.5), loader(8), loader(8))
    assert len(seen) == 4 and max(seen) <= c * (1 + 1e-12)
    with open(trainer.logger.experiment.metrics_file_path) as f:
        keys = set(csv.DictReader(f).fieldnames)
    for name in reg.layer_names:
        assert {f"spectral_estimate/{name}", f"spectral_bound/{name}"} <= keys
    assert float(trainer.callback_metrics["spectral_bound/max"]) <= c * (1 + 1e-7)


def test_lazy_layers_resume_exactly(tmp_path):
    def run(epochs, ckpt_path=None, seed=0):
        torch.manual_seed(seed)
        net = lazy_net()
        reg = SpectralBoundRegularizer(beta=BETA, constraint=0.9, warmup_power_iterations=3)
        trainer = quiet_trainer(max_epochs=epochs, callbacks=[reg])
        trainer.fit(Module(net), loader(16), ckpt_path=ckpt_path)
        return net, reg, trainer

    net_a, reg_a, _ = run(4)
    _, reg_b, trainer_b = run(2)
    trainer_b.save_checkpoint(tmp_path / "mid.ckpt")
    net_c, reg_c, _ = run(4, tmp_path / "mid.ckpt", seed=5)
    for p, q in zip(net_a.parameters(), net_c.parameters(), strict=True):
        assert torch.equal(p, q)
    va, vb, vc = _vectors(reg_a), _vectors(reg_b), _vectors(reg_c)
    assert va.keys() == vc.keys() == {"net.0", "net.2", "net.5"}
    assert all(torch.equal(x, y) for n in va for x, y in zip(va[n], vc[n], strict=True))
    assert not all(torch.equal(x, y) for n in va for x, y in zip(va[n], vb[n], strict=True))


class _WithUnusedLazy(Module):
    def __init__(self, net):
        super().__init__(net)
        self.spare = nn.LazyLinear(3)  # never called: never materialized


def test_a_lazy_layer_never_called_does_not_hold_up_the_others():
    reg = SpectralBoundRegularizer(beta=0.1)
    trainer = quiet_trainer(max_steps=2, log_every_n_steps=1, callbacks=[reg])
    with pytest.warns(UserWarning, match=r"spare .*not materialized"):
        trainer.fit(_WithUnusedLazy(lazy_net()), loader(8))
    assert reg.layer_names == ["net.0", "net.2", "net.5"]
    assert float(trainer.callback_metrics["spectral_penalty"]) > 0


def test_lazy_layers_validate_only():
    reg = SpectralBoundRegularizer()
    trainer = quiet_trainer(limit_val_batches=1, callbacks=[reg])
    trainer.validate(Module(lazy_net()), loader(8), verbose=False)
    bounds = reg.guaranteed_bounds()
    assert list(bounds) == ["net.0", "net.2", "net.5"]
    assert float(trainer.callback_metrics["spectral_bound/max"]) >= max(bounds.values())


# ---------------------------------------------------------------- two instances


def _pair() -> list[SpectralBoundRegularizer]:
    return [
        SpectralBoundRegularizer(beta=BETA, include=["net.[024]"], warmup_power_iterations=3),
        SpectralBoundRegularizer(include=["net.7"], constraint=0.5, warmup_power_iterations=3),
    ]


def _vectors(reg: SpectralBoundRegularizer) -> dict:
    return {n: e["u"] + e["v"] for n, e in reg.state_dict()["layers"].items()}


def test_two_instances_checkpoint_and_resume_exactly(tmp_path):
    torch.manual_seed(1)
    net = tiny_net()
    start = copy.deepcopy(net.state_dict())
    regs_a = _pair()
    quiet_trainer(max_epochs=4, callbacks=regs_a).fit(Module(net), loader(16))

    net_b = tiny_net()
    net_b.load_state_dict(start)
    regs_b = _pair()
    trainer = quiet_trainer(max_epochs=2, callbacks=regs_b)
    trainer.fit(Module(net_b), loader(16))
    trainer.save_checkpoint(tmp_path / "mid.ckpt")
    saved = torch.load(tmp_path / "mid.ckpt", weights_only=False)["callbacks"]
    states = [v for k, v in saved.items() if "SpectralBoundRegularizer" in str(k)]
    assert [sorted(s["layers"]) for s in states] == [["net.0", "net.2", "net.4"], ["net.7"]]

    net_c = tiny_net()
    regs_c = _pair()
    quiet_trainer(max_epochs=4, callbacks=regs_c).fit(
        Module(net_c), loader(16), ckpt_path=tmp_path / "mid.ckpt"
    )
    for p, q in zip(net.parameters(), net_c.parameters(), strict=True):
        assert torch.equal(p, q)
    for a, b, c in zip(regs_a, regs_b, regs_c, strict=True):
        va, vb, vc = _vectors(a), _vectors(b), _vectors(c)
        assert va.keys() == vc.keys()
        assert all(torch.equal(x, y) for n in va for x, y in zip(va[n], vc[n], strict=True))
        assert not all(torch.equal(x, y) for n in va for x, y in zip(va[n], vb[n], strict=True))


def test_checkpoint_of_a_single_default_instance_still_loads(tmp_path):
    reg = SpectralBoundRegularizer(beta=BETA, warmup_power_iterations=3)
    assert reg.state_key == "SpectralBoundRegularizer"  # the key checkpoints always had
    trainer = quiet_trainer(max_steps=2, callbacks=[reg])
    trainer.fit(Module(tiny_net()), loader(8))
    trainer.save_checkpoint(tmp_path / "old.ckpt")

    other = SpectralBoundRegularizer(beta=BETA, include=["net.*"], warmup_power_iterations=0)
    assert other.state_key != reg.state_key
    quiet_trainer(max_steps=2, callbacks=[other]).fit(
        Module(tiny_net()), loader(8), ckpt_path=tmp_path / "old.ckpt"
    )
    # Resumed at the last step: no step ran, the vectors are the saved ones.
    va, vo = _vectors(reg), _vectors(other)
    assert all(torch.equal(x, y) for n in va for x, y in zip(va[n], vo[n], strict=True))


# ---------------------------------------------------------------- frozen layers


def _frozen_head_net() -> nn.Sequential:
    net = tiny_net()
    net[7].requires_grad_(False)
    with torch.no_grad():
        net[7].weight.mul_(10)
    return net


def test_frozen_layers_are_left_alone_by_default():
    net = _frozen_head_net()
    head = net[7].weight.detach().clone()
    reg = SpectralBoundRegularizer(beta=0.1, constraint=0.8)
    quiet_trainer(max_steps=3, callbacks=[reg]).fit(Module(net, lr=0.5), loader(8))
    assert reg.layer_names == ["net.0", "net.2", "net.4"]
    assert torch.equal(net[7].weight, head)
    assert max(_bound(net[i]) for i in (0, 2, 4)) <= 0.8


def test_include_frozen_constrains_frozen_layers():
    net = _frozen_head_net()
    assert _bound(net[7]) > 0.8
    reg = SpectralBoundRegularizer(beta=0.1, constraint=0.8, include_frozen=True)
    quiet_trainer(max_steps=3, callbacks=[reg]).fit(Module(net, lr=0.5), loader(8))
    assert reg.layer_names == ["net.0", "net.2", "net.4", "net.7"]
    assert _bound(net[7]) <= 0.8


def test_include_frozen_is_checked():
    with pytest.raises(ValueError, match="include_frozen"):
        SpectralBoundRegularizer(include_frozen="no")


# ---------------------------------------------------------------- forward overrides


class StdConv2d(nn.Conv2d):
    """Weight standardization: the layer computes with a rescaled weight, not ``self.weight``."""

    def forward(self, x):
        w = self.weight
        w = (w - w.mean((1, 2, 3), keepdim=True)) / (w.std((1, 2, 3), keepdim=True) + 1e-5)
        return F.conv2d(x, w, self.bias, self.stride, self.padding)


class GainLinear(nn.Linear):
    def forward(self, x):
        return 20 * F.linear(x, self.weight, self.bias)


class ScaledConv2d(nn.Conv2d):
    def _conv_forward(self, x, weight, bias):
        return super()._conv_forward(x, 3 * weight, bias)


def _override_net() -> nn.Sequential:
    return nn.Sequential(
        StdConv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 4, 3, padding=1), nn.ReLU(),
        ScaledConv2d(4, 4, 3, padding=1, stride=2), nn.ReLU(), nn.Flatten(), GainLinear(64, 10),
    )


def test_layers_that_override_forward_are_left_out_with_a_warning():
    net = _override_net()
    before = {i: net[i].weight.detach().clone() for i in (0, 4, 7)}
    assert min(_bound(net[i]) for i in (0, 2, 4, 7)) > 0.5
    reg = SpectralBoundRegularizer(constraint=0.5)
    with pytest.warns(UserWarning, match="override") as record:
        # lr=0: only the projection can change a weight.
        quiet_trainer(max_steps=2, callbacks=[reg]).fit(Module(net, lr=0.0), loader(8))
    message = " ".join(str(w.message) for w in record)
    for text in ("net.0 (StdConv2d)", "net.4 (ScaledConv2d)", "net.7 (GainLinear)"):
        assert text in message
    assert reg.layer_names == ["net.2"]
    assert set(reg.guaranteed_bounds()) == {"net.2"}
    assert _bound(net[2]) <= 0.5
    for i, w in before.items():
        assert torch.equal(net[i].weight, w), i


# ---------------------------------------------------------------- logged names and warnings


def test_logged_keys_say_estimate_or_guaranteed(tmp_path):
    c = 0.8
    net = tiny_net()
    reg = SpectralBoundRegularizer(beta=0.01, constraint=c)
    trainer = quiet_trainer(max_steps=4, log_every_n_steps=2,
                            logger=CSVLogger(tmp_path, name="run"), callbacks=[reg])
    trainer.fit(Module(net), loader(8))
    with open(trainer.logger.experiment.metrics_file_path) as f:
        rows = list(csv.DictReader(f))
    keys = set(rows[0])
    names = ["net.0", "net.2", "net.4", "net.7"]
    assert {"spectral_penalty", "spectral_estimate/max", "spectral_bound/step_max"} <= keys
    assert {f"spectral_estimate/{n}" for n in names} <= keys
    assert not any(k.startswith("spectral/") for k in keys)
    # The progress bar shows the guaranteed value, not the looser-looking estimate.
    bar = trainer.progress_bar_metrics
    assert "spectral_bound/step_max" in bar and "spectral_estimate/max" not in bar
    logged = [float(r["spectral_bound/step_max"]) for r in rows if r["spectral_bound/step_max"]]
    assert len(logged) == 2 and max(logged) <= c * (1 + 1e-7)  # float32, rounded up
    # It bounds the weights it was logged for (the last step's).
    with torch.no_grad():
        now = max(float(layer_spectral_bound(net[i], max_cost=0)) for i in (0, 2, 4, 7))
    assert now <= logged[-1] and logged[-1] == pytest.approx(now, rel=1e-6)


def test_without_constraint_the_progress_bar_shows_the_named_estimate():
    reg = SpectralBoundRegularizer(beta=0.01)
    trainer = quiet_trainer(max_steps=2, log_every_n_steps=1, callbacks=[reg])
    trainer.fit(Module(tiny_net()), loader(8))
    assert "spectral_estimate/max" in trainer.progress_bar_metrics
    assert "spectral_bound/step_max" not in trainer.callback_metrics


def test_no_match_warning_lists_existing_layers():
    reg = SpectralBoundRegularizer(include=["model.*"])
    with pytest.warns(UserWarning, match=r"net\.0 \(Conv2d\).*net\.7 \(Linear\)"):
        reg.discover(Module(tiny_net()))
    assert reg.layer_names == []


def test_finite_check_tells_overflowing_sums_from_non_finite_weights():
    from lightning_spectral.regularizer.constraint import check_finite

    module = Module(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    reg = SpectralBoundRegularizer(warmup_power_iterations=0)
    reg.discover(module)
    layers = dict(module.named_modules())
    layers = {n: layers[n] for n in reg.layer_names}
    with torch.no_grad():
        module.net[1].weight.fill_(3e38)  # finite, but their float32 sum is not
    check_finite(layers, torch.ones(2), "here")
    with pytest.raises(RuntimeError, match=r"estimate of layer\(s\) net\.1 .*too large"):
        check_finite(layers, torch.tensor([1.0, float("inf")]), "here")
    with torch.no_grad():
        module.net[1].weight[0, 0] = float("nan")
    with pytest.raises(RuntimeError, match=r"non-finite weights .* net\.1 .*here"):
        check_finite(layers, torch.tensor([1.0, float("inf")]), "here")
