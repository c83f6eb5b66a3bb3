"""Training through SpectralBoundRegularizer optimizes exactly CE + beta * sum(bounds).

The reference is a hand-written PyTorch loop whose penalty is the exact Fantastic Four bound
(explicit matricizations and SVDs, see helpers.callback); the callback runs power iteration to
convergence so that its estimate and gradient equal the exact ones.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers.callback import (
    CONVERGED,
    Module,
    batches,
    hand_train,
    layers,
    loader,
    quiet_trainer,
    tiny_net,
)
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.plugins import MixedPrecision

from lightning_spectral.callback import SpectralBoundRegularizer

warnings.filterwarnings("ignore", ".*does not have many workers.*")


BETA = 0.5


def _assert_close(a, b, atol=1e-4, rtol=1e-4):
    for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(p, q, atol=atol, rtol=rtol, msg=f"parameter {name}")


def _max_diff(a, b) -> float:
    return max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters(),
                                                          strict=True))


@pytest.mark.parametrize("output", ["tensor", "dict"])
def test_equals_hand_written_loop(output):
    net = tiny_net()
    reference, unpenalized = copy.deepcopy(net), copy.deepcopy(net)
    steps = 3
    hand_train(reference, batches(8, steps), BETA)
    hand_train(unpenalized, batches(8, steps), 0.0)

    reg = SpectralBoundRegularizer(beta=BETA, **CONVERGED)
    quiet_trainer(max_steps=steps, callbacks=[reg]).fit(Module(net, output=output), loader(8))

    _assert_close(net, reference)
    # The penalty matters: leaving it out moves the weights far beyond the tolerance.
    assert _max_diff(unpenalized, reference) > 100 * 1e-4
    # The module is left as it was: the training_step wrapper is gone after fit.
    assert "training_step" not in vars(Module(net))


def test_gradient_accumulation():
    net = tiny_net()
    reference = copy.deepcopy(net)
    hand_train(reference, batches(8, 6), BETA, accumulate=3)
    reg = SpectralBoundRegularizer(beta=BETA, **CONVERGED)
    quiet_trainer(max_steps=2, accumulate_grad_batches=3, callbacks=[reg]).fit(
        Module(net), loader(8)
    )
    _assert_close(net, reference)


class _CheckFloat32(Callback):
    """Before each optimizer step: the callback's estimates are float32 exact FF bounds."""

    def __init__(self, reg):
        self.reg, self.checked = reg, 0

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        from helpers.callback import ff_bound

        est = self.reg.last_estimates
        assert est.dtype == torch.float32
        with torch.no_grad():
            ref = torch.stack([ff_bound(m) for m in layers(pl_module)])
        # bf16 arithmetic would be off by ~1e-2; float32 power iteration matches to ~1e-6.
        torch.testing.assert_close(est, ref, rtol=1e-5, atol=1e-6)
        self.checked += 1


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_mixed_precision(precision):
    net = tiny_net()
    reference = copy.deepcopy(net)
    dtype = torch.bfloat16 if precision == "bf16-mixed" else torch.float16
    hand_train(reference, batches(8, 3), BETA, autocast_dtype=dtype)
    reg = SpectralBoundRegularizer(beta=BETA, **CONVERGED)
    check = _CheckFloat32(reg)
    # Trainer(precision="16-mixed") silently becomes bf16 on CPU; the plugin keeps float16 and
    # its GradScaler, so the penalty's gradient goes through loss scaling as on a GPU.
    precision_kwargs = (
        dict(precision=precision) if precision == "bf16-mixed"
        else dict(plugins=[MixedPrecision("16-mixed", "cpu")])
    )
    quiet_trainer(max_steps=3, callbacks=[reg, check], **precision_kwargs).fit(
        Module(net), loader(8)
    )
    assert check.checked == 3
    # Same low-precision forward in both; the loose tolerance covers bf16/fp16 rounding only.
    _assert_close(net, reference, atol=2e-3, rtol=2e-3)


def test_resume_is_exact(tmp_path):
    torch.manual_seed(1)
    net = tiny_net()
    start = copy.deepcopy(net.state_dict())

    reg_a = SpectralBoundRegularizer(beta=BETA, n_power_iterations=1, warmup_power_iterations=3)
    quiet_trainer(max_epochs=4, callbacks=[reg_a]).fit(Module(net), loader(16))

    net_b = tiny_net()
    net_b.load_state_dict(start)
    reg_b = SpectralBoundRegularizer(beta=BETA, n_power_iterations=1, warmup_power_iterations=3)
    trainer = quiet_trainer(max_epochs=2, callbacks=[reg_b])
    trainer.fit(Module(net_b), loader(16))
    trainer.save_checkpoint(tmp_path / "mid.ckpt")

    net_c = tiny_net()  # different initial weights: everything must come from the checkpoint
    reg_c = SpectralBoundRegularizer(beta=BETA, n_power_iterations=1, warmup_power_iterations=3)
    quiet_trainer(max_epochs=4, callbacks=[reg_c]).fit(
        Module(net_c), loader(16), ckpt_path=tmp_path / "mid.ckpt"
    )

    for p, q in zip(net.parameters(), net_c.parameters(), strict=True):
        assert torch.equal(p, q)
    sa, sc = reg_a.state_dict()["layers"], reg_c.state_dict()["layers"]
    assert sa.keys() == sc.keys()
    for name in sa:
        for x, y in zip(sa[name]["u"] + sa[name]["v"], sc[name]["u"] + sc[name]["v"],
                        strict=True):
            assert torch.equal(x, y), name
    # The mid-training vectors differ from the final ones: the comparison is not vacuous.
    sb = reg_b.state_dict()["layers"]
    assert not all(torch.equal(x, y) for n in sa for x, y in zip(sa[n]["u"], sb[n]["u"],
                                                                  strict=True))


class _Manual(Module):
    def __init__(self, net, reg, use_penalty):
        super().__init__(net)
        self.automatic_optimization = False
        self.reg, self.use_penalty = reg, use_penalty

    def training_step(self, batch, batch_idx):
        opt = self.optimizers()
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        if self.use_penalty:
            loss = loss + self.reg.penalty(self)
        opt.zero_grad()
        self.manual_backward(loss)
        opt.step()


def test_manual_optimization():
    net = tiny_net()
    reference = copy.deepcopy(net)
    hand_train(reference, batches(8, 3), BETA)
    reg = SpectralBoundRegularizer(beta=BETA, **CONVERGED)
    with pytest.warns(UserWarning, match="manual optimization"):
        quiet_trainer(max_steps=3, callbacks=[reg]).fit(_Manual(net, reg, True), loader(8))
    _assert_close(net, reference)

    reg = SpectralBoundRegularizer(beta=BETA)
    with pytest.raises(RuntimeError, match=r"penalty\(self\)"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        quiet_trainer(max_steps=3, callbacks=[reg]).fit(_Manual(tiny_net(), reg, False),
                                                        loader(8))
