"""SpectralBoundRegularizer's extension points and the units it is composed of."""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
from helpers.callback import Module, loader, quiet_trainer, tiny_net
from torch import nn

from lightning_spectral.callback import SpectralBoundRegularizer
from lightning_spectral.functional.bounds import layer_spectral_bound
from lightning_spectral.regularizer.config import RegularizerConfig
from lightning_spectral.regularizer.selection import select_layers

warnings.filterwarnings("ignore", ".*does not have many workers.*")


class HeadOnly(SpectralBoundRegularizer):
    """Selects the classifier head by type, which no name pattern has to know."""

    def select_layers(self, pl_module: nn.Module) -> dict[str, nn.Module]:
        chosen = super().select_layers(pl_module)
        return {n: m for n, m in chosen.items() if isinstance(m, nn.Linear)}


def test_an_overridden_select_layers_decides_what_is_constrained_and_logged(tmp_path):
    from lightning.pytorch.loggers import CSVLogger

    net = tiny_net()
    with torch.no_grad():
        for m in (net[0], net[7]):
            m.weight.mul_(5)
    before = {i: float(layer_spectral_bound(net[i], max_cost=0)) for i in (0, 7)}
    assert min(before.values()) > 0.5
    reg = HeadOnly(constraint=0.5)
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, log_every_n_steps=1,
                            limit_val_batches=1,
                            logger=CSVLogger(tmp_path, name="run"), callbacks=[reg])
    trainer.fit(Module(net, lr=0.0), loader(8), loader(8))  # lr=0: only the projection acts
    assert reg.layer_names == ["net.7"]
    with torch.no_grad():
        assert float(layer_spectral_bound(net[7], max_cost=0)) <= 0.5
        assert float(layer_spectral_bound(net[0], max_cost=0)) == pytest.approx(before[0])
    with open(trainer.logger.experiment.metrics_file_path) as f:
        keys = set(next(csv.DictReader(f)))
    assert {"spectral_estimate/net.7", "spectral_bound/net.7"} <= keys
    assert not any("net.0" in k for k in keys)


def test_select_layers_is_the_selection_without_side_effects():
    module = Module(tiny_net())
    reg = SpectralBoundRegularizer(exclude=["*.7"])
    chosen = reg.select_layers(module)
    assert list(chosen) == ["net.0", "net.2", "net.4"]
    assert chosen["net.2"] is module.net[2]
    assert reg.layer_names == []  # nothing is attached until discover() / fit
    assert list(select_layers(module, None, ["*.7"], False)) == list(chosen)


def test_setting_an_option_revalidates_it():
    reg = SpectralBoundRegularizer(beta=0.1)
    with pytest.raises(ValueError, match=r"beta must be .* got -1\.0"):
        reg.beta = -1.0
    assert reg.beta == 0.1
    reg.beta = 0.3
    assert reg.config.beta == 0.3
    module = Module(tiny_net())
    reg.discover(module)
    with torch.no_grad():
        assert float(reg.penalty(module)) == pytest.approx(0.3 * float(reg.last_estimates.sum()))


def test_config_is_frozen_and_normalized():
    cfg = RegularizerConfig(beta=1, include="net.*", certify_epsilons=(0, 0.5))
    assert cfg.beta == 1.0 and isinstance(cfg.beta, float)
    assert cfg.include == ["net.*"] and cfg.certify_epsilons == [0.0, 0.5]
    with pytest.raises(AttributeError):
        cfg.beta = 2.0  # type: ignore[misc]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_second_fit_on_another_device_moves_the_vectors():
    net = tiny_net()
    reg = SpectralBoundRegularizer(beta=0.01, warmup_power_iterations=3)
    quiet_trainer(max_steps=1, callbacks=[reg]).fit(Module(net), loader(8))
    saved = reg.state_dict()["layers"]
    # The same callback and model, now on the GPU: the vectors follow the weights.
    module = Module(net)
    trainer = quiet_trainer(max_steps=1, accelerator="gpu", devices=1, callbacks=[reg])
    trainer.fit(module, loader(8))
    now = reg.state_dict()["layers"]
    assert now["net.2"]["u"][0].device.type == "cuda"
    assert set(now) == set(saved)
