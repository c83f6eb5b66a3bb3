"""``bound_max_cost``: the cost cap of the reported guaranteed bounds and certificates."""

from __future__ import annotations

import pytest
import torch
from helpers.callback import Module, loader, quiet_trainer, tiny_net

from lightning_spectral import SpectralBoundRegularizer, layer_spectral_bound


def test_reported_bounds_use_the_cap() -> None:
    reg = SpectralBoundRegularizer(bound_max_cost=0, certify_epsilons=[0.1])
    trainer = quiet_trainer(max_epochs=1, limit_train_batches=2, limit_val_batches=1,
                            callbacks=[reg])
    model = Module(tiny_net())
    trainer.fit(model, loader(16), loader(16))
    bounds = reg.guaranteed_bounds()
    layers = dict(model.named_modules())
    for name, value in bounds.items():
        size = reg.input_sizes.get(name)
        capped = float(layer_spectral_bound(layers[name], size, max_cost=0))
        default = float(layer_spectral_bound(layers[name], size))
        assert value == pytest.approx(capped, rel=1e-12) and value >= default
    # The stride-2 layer at its size: the default budget finds a tighter bound than the cap.
    assert any(v > float(layer_spectral_bound(layers[n], reg.input_sizes.get(n)))
               for n, v in bounds.items())
    assert torch.isfinite(trainer.callback_metrics["lipschitz/network"])


@pytest.mark.parametrize("value", [-1.0, "cheap", float("nan")])
def test_bad_cap_is_refused(value: object) -> None:
    with pytest.raises(ValueError, match="bound_max_cost"):
        SpectralBoundRegularizer(bound_max_cost=value)
