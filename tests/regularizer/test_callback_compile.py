"""``torch.compile``d models: layer names are those of the uncompiled model.

``torch.compile(net)`` wraps ``net`` in an ``OptimizedModule`` whose ``named_modules`` read
``net._orig_mod.0``. The callback drops the ``_orig_mod`` segments for matching, logging and
checkpoint keys. The compiled runs use dynamo with the ``eager`` backend: a real
``torch.compile`` (graph capture, guards, hooks) without inductor's C++ compilation, which takes
about a minute for this tiny model on this CPU.
"""

from __future__ import annotations

import csv
import warnings

import pytest
import torch
from helpers.callback import Module, loader, quiet_trainer, tiny_net
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_spectral.callback import SpectralBoundRegularizer
from lightning_spectral.regularizer.selection import canonical_name


def _fit(tmp_path, net: nn.Module, name: str, **kwargs) -> SpectralBoundRegularizer:
    reg = SpectralBoundRegularizer(beta=0.5, warmup_power_iterations=5, **kwargs)
    trainer = quiet_trainer(
        max_steps=2, callbacks=[reg], logger=CSVLogger(tmp_path, name=name, version=0),
        log_every_n_steps=1,
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer.fit(Module(net), loader(16))
    return reg


def _logged_keys(tmp_path, name: str) -> set[str]:
    with open(tmp_path / name / "version_0" / "metrics.csv") as f:
        return {k for k in next(csv.DictReader(f)) if k.startswith("spectral")}


def test_canonical_name_drops_compile_wrappers():
    assert canonical_name("net._orig_mod.0") == "net.0"
    assert canonical_name("_orig_mod.block._orig_mod.conv") == "block.conv"
    assert canonical_name("net.orig_mod_x") == "net.orig_mod_x"


def test_compiled_model_uses_the_uncompiled_names(tmp_path):
    torch.manual_seed(0)
    plain_net = tiny_net()
    compiled_net = tiny_net()
    compiled_net.load_state_dict(plain_net.state_dict())
    compiled = torch.compile(compiled_net, backend="eager")

    plain = _fit(tmp_path, plain_net, "plain", include=["net.0", "net.4"])
    reg = _fit(tmp_path, compiled, "compiled", include=["net.0", "net.4"])

    assert reg.layer_names == plain.layer_names == ["net.0", "net.4"]
    assert set(reg.input_sizes) == {"net.0", "net.4"}
    assert reg.state_dict()["layers"].keys() == plain.state_dict()["layers"].keys()
    assert _logged_keys(tmp_path, "compiled") == _logged_keys(tmp_path, "plain")
    assert "spectral_estimate/net.4" in _logged_keys(tmp_path, "compiled")
    torch.testing.assert_close(reg.last_estimates, plain.last_estimates)
    for p, q in zip(compiled_net.parameters(), plain_net.parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_patterns_written_with_orig_mod_still_match(tmp_path):
    compiled = torch.compile(tiny_net(), backend="eager")
    reg = SpectralBoundRegularizer(include=["net._orig_mod.0"], exclude=["*.4"])
    assert reg.discover(Module(compiled)) == ["net.0"]
    reg = SpectralBoundRegularizer(exclude=["net.0", "net._orig_mod.2"])
    assert reg.discover(Module(compiled)) == ["net.4", "net.7"]


def test_checkpoint_of_a_compiled_run_loads_into_an_uncompiled_one(tmp_path):
    reg = _fit(tmp_path, torch.compile(tiny_net(), backend="eager"), "compiled")
    fresh = SpectralBoundRegularizer()
    fresh.discover(Module(tiny_net()))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a mismatch of names warns
        fresh.load_state_dict(reg.state_dict())
    for name, entry in reg.state_dict()["layers"].items():
        assert torch.equal(fresh.state_dict()["layers"][name]["u"][0], entry["u"][0])


@pytest.mark.parametrize("wrapped", ["layer", "model"])
def test_compiled_layer_inside_a_model(wrapped):
    net = tiny_net()
    if wrapped == "layer":
        net[2] = torch.compile(net[2], backend="eager")
    else:
        net = nn.Sequential(torch.compile(net, backend="eager"))
    names = SpectralBoundRegularizer().discover(Module(net))
    prefix = "net." if wrapped == "layer" else "net.0."
    assert names == [f"{prefix}{i}" for i in (0, 2, 4, 7)]
