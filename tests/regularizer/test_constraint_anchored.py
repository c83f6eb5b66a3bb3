"""The constraint's anchored bound: guaranteed after every step, and resumed exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers.callback import Module, loader, quiet_trainer, tiny_net
from lightning.pytorch.callbacks import Callback
from torch import nn

from lightning_spectral import SpectralBoundRegularizer
from lightning_spectral.functional.bounds import layer_bounds, layer_spectral_bound
from lightning_spectral.regularizer.anchored import anchored_bound, layer_families, new_anchor


def _explicit_norm(module: nn.Module, size: int) -> float:
    """The layer's exact norm on ``size x size`` inputs: its explicit matrix (bias left out),
    built here from ``F.conv2d`` on the basis vectors, independently of the library."""
    w = module.weight.detach().double()
    if isinstance(module, nn.Linear):
        return float(torch.linalg.matrix_norm(w, ord=2))
    n = w.shape[1] * size * size
    basis = torch.eye(n, dtype=torch.float64).reshape(n, w.shape[1], size, size)
    out = F.conv2d(basis, w, stride=module.stride, padding=module.padding)
    return float(torch.linalg.matrix_norm(out.reshape(n, -1), ord=2))


class _Guarantee(Callback):
    """After every optimizer step: every layer's exact norm and guaranteed bound are <= c."""

    def __init__(self, c: float) -> None:
        self.c, self.exact, self.bounds = c, [], []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        net = pl_module.net
        sizes = {"0": 8, "2": 8, "4": 8}  # tiny_net on 8 x 8 inputs
        exact = [_explicit_norm(net[int(k)], s) for k, s in sizes.items()]
        exact.append(_explicit_norm(net[7], 0))
        with torch.no_grad():
            bounds = [float(layer_spectral_bound(m)) for m in net if hasattr(m, "weight")]
        assert max(exact) <= self.c and max(bounds) <= self.c, (exact, bounds)
        self.exact.append(max(exact))
        self.bounds.append(max(bounds))


@pytest.mark.parametrize("every_n", [None, 1000])
def test_anchored_constraint_holds_after_every_step(every_n):
    c = 0.8
    net = tiny_net()
    reg = SpectralBoundRegularizer(constraint=c, constraint_tight_every_n_steps=every_n)
    check = _Guarantee(c)
    quiet_trainer(max_steps=8, callbacks=[reg, check]).fit(Module(net, lr=0.5), loader(8))
    assert len(check.bounds) == 8
    # Active: the layers are pushed against the constraint, not trivially below it.
    assert max(check.bounds) > 0.5 * c
    anchors = reg._after_step.projection.anchors
    assert set(anchors) == set(reg.layer_names)
    if every_n == 1000:  # only the anchored bound after the first projection: it rescaled
        assert any(float(a.sigma) < 1 for a in anchors.values())


_LAYERS = [
    nn.Conv2d(6, 8, 3, padding=1),
    nn.Conv2d(6, 8, 3, stride=2, padding=1),
    nn.Conv2d(6, 8, 5, dilation=2, padding=4, groups=2),
    nn.Conv2d(6, 8, 3, padding=1, padding_mode="reflect"),
    nn.Conv2d(6, 8, 3, padding=1, padding_mode="circular"),
    nn.Conv1d(6, 8, 4, stride=3),
    nn.Conv3d(3, 4, 3, padding=1),
    nn.ConvTranspose2d(6, 8, 3, stride=2),
    nn.Linear(20, 7),
]


@pytest.mark.parametrize("layer", _LAYERS, ids=lambda m: repr(m)[:40])
@pytest.mark.parametrize("scale", [0.0, 1e-9, 1e-3, 1.0])
def test_anchored_bound_is_at_least_the_tight_bound(layer, scale):
    torch.manual_seed(0)
    with torch.no_grad():
        bounds = layer_bounds(layer, max_cost=0.0)
        fam = layer_families(layer, list(bounds))
        anchor = new_anchor(layer.weight, torch.stack([bounds[n] for n in fam.names]))
        anchor.sigma = torch.tensor(0.7, dtype=torch.float64)
        layer.weight.mul_(0.7).add_(scale * torch.randn_like(layer.weight))
        cheap, weight_fro = anchored_bound(layer.weight, anchor, fam)
        tight = torch.stack(list(layer_bounds(layer, max_cost=0.0).values())).min()
    assert float(cheap) >= float(tight)
    assert float(weight_fro) >= float(torch.linalg.vector_norm(layer.weight.double()))
    if scale == 0.0:  # no change: the anchored bound is the rescaled tight one
        assert float(cheap) == pytest.approx(float(tight), rel=1e-5)


def _run(epochs, ckpt=None, save=None):
    # Two steps per epoch; resumed at an epoch's end, as Lightning resumes exactly.
    torch.manual_seed(0)
    net = tiny_net()
    reg = SpectralBoundRegularizer(constraint=0.8, constraint_tight_every_n_steps=3)
    trainer = quiet_trainer(max_epochs=epochs, callbacks=[reg])
    trainer.fit(Module(net, lr=0.5), loader(8, n=16), ckpt_path=ckpt)
    if save is not None:
        trainer.save_checkpoint(save)
    return net, reg


def test_anchored_constraint_resumes_exactly(tmp_path):
    net_a, reg_a = _run(4)
    net_b, _ = _run(2, save=tmp_path / "mid.ckpt")
    state = torch.load(tmp_path / "mid.ckpt", weights_only=False)["callbacks"]
    saved = state["SpectralBoundRegularizer"]["constraint"]
    assert saved["schedule"]["step"] == 4 and set(saved["anchors"]) == set(reg_a.layer_names)
    net_c, reg_c = _run(4, ckpt=tmp_path / "mid.ckpt")
    for p, q in zip(net_a.parameters(), net_c.parameters(), strict=True):
        assert torch.equal(p, q)
    assert not all(torch.equal(p, q) for p, q in zip(net_a.parameters(), net_b.parameters(),
                                                     strict=True))
    assert reg_c._after_step.projection.schedule.state_dict() == \
        reg_a._after_step.projection.schedule.state_dict()


@pytest.mark.parametrize("bad", [0, -1, 2.5, True])
def test_constraint_tight_every_n_steps_is_checked(bad):
    with pytest.raises(ValueError, match="constraint_tight_every_n_steps"):
        SpectralBoundRegularizer(constraint=1.0, constraint_tight_every_n_steps=bad)
