"""``strategy="ddp_spawn"``: the callback runs in worker processes, started by pickling the
Trainer. Lightning brings the trained weights and ``trainer.callback_metrics`` back to the
launching process, not the callbacks: there the callback's accessors raise, naming the reason
and the ways out, instead of returning empty values."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from helpers.callback import Module, loader, quiet_trainer, tiny_net

from lightning_spectral.callback import SpectralBoundRegularizer


def _accessors(reg: SpectralBoundRegularizer) -> dict:
    return {
        "layer_names": lambda: reg.layer_names,
        "input_sizes": lambda: reg.input_sizes,
        "last_estimates": lambda: reg.last_estimates,
        "guaranteed_bounds": reg.guaranteed_bounds,
        "exact_norms": reg.exact_norms,
    }


def test_ddp_spawn_accessors_raise_in_the_launching_process():
    torch.manual_seed(0)
    net = tiny_net()
    before = [p.detach().clone() for p in net.parameters()]
    reg = SpectralBoundRegularizer(beta=0.5, warmup_power_iterations=5)
    trainer = quiet_trainer(
        max_steps=2, callbacks=[reg], strategy="ddp_spawn", devices=2, log_every_n_steps=1,
    )
    module = Module(net)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(module, loader(8))

    # Lightning's part: the weights and the logged values came back from rank 0.
    assert any(not torch.equal(p, q) for p, q in zip(net.parameters(), before, strict=True))
    assert "spectral_penalty" in trainer.callback_metrics
    for name, access in _accessors(reg).items():
        with pytest.raises(RuntimeError, match="ddp_spawn") as info:
            access()
        assert "worker processes" in str(info.value), name

    # Not state_dict: Lightning calls it to save a checkpoint (of the weights, which did come back).
    assert reg.state_dict()["layers"] == {}

    # Discovering again in this process (on the trained weights) makes them usable.
    assert reg.discover(module) == ["net.0", "net.2", "net.4", "net.7"]
    assert reg.guaranteed_bounds().keys() == set(reg.layer_names)


def test_a_copy_does_not_mark_the_original():
    reg = SpectralBoundRegularizer()
    copy.deepcopy(reg)
    assert reg.layer_names == []
    assert reg.state_dict()["layers"] == {}
