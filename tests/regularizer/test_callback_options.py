"""A new user's pass over the options: a non-project network, constructor and LightningCLI."""

from __future__ import annotations

import csv
import importlib.util
import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral import SpectralBoundRegularizer

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "examples" / "config.yaml"


class TinyVGG(LightningModule):
    """Not a project model: two convolutions and a head, on 8x8 one-channel images."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Flatten(), nn.Linear(64, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(32, 1, 8, 8, generator=g), torch.randint(0, 3, (32,), generator=g)
    return DataLoader(TensorDataset(x, y), batch_size=8)


@pytest.mark.parametrize(("kwargs", "needed"), [
    ({"target": 1.0}, "beta > 0"),
    ({"constraint_tight_every_n_steps": 2}, "without constraint"),
    ({"certified_loss": "trades"}, "without certified_eps"),
    ({"certified_weight": 0.5}, "without certified_eps"),
    ({"certified_warmup_steps": 10}, "without certified_eps"),
    ({"certify_compositional": True}, "without certify_epsilons"),
    ({"curvature_input_shape": [1, 8, 8]}, "curvature_beta > 0"),
    ({"input_scale": 0.3}, "without certify_epsilons or certified_eps"),
    ({"batch_to_input_target": lambda b: b}, "without certify_epsilons"),
])
def test_an_option_without_the_one_it_needs_warns_at_construction(kwargs, needed):
    (name,) = kwargs
    with pytest.warns(UserWarning, match=rf"{name}=.* has no effect .*{needed}"):
        SpectralBoundRegularizer(**kwargs)


@pytest.mark.parametrize("kwargs", [
    {},
    {"beta": 1e-3, "target": 1.0},
    {"constraint": 1.0, "constraint_tight_every_n_steps": 2},
    {"certified_eps": 0.3, "certified_loss": "margin", "certified_weight": 0.5,
     "certified_warmup_steps": 10, "input_scale": 0.3},
    {"curvature_beta": 1e-3, "curvature_input_shape": [1, 8, 8]},
    {"certify_epsilons": [0.1], "certify_compositional": True},
    {"certify_epsilons": [0.1], "certify_method": "curvature", "curvature_input_shape": [1, 8, 8],
     "batch_to_input_target": lambda b: b, "input_scale": 0.3},
])
def test_options_that_act_do_not_warn(kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SpectralBoundRegularizer(**kwargs)


def test_a_bad_pattern_is_reported_as_received():
    with pytest.raises(ValueError, match=r"include must be .*, got ''$"):
        SpectralBoundRegularizer(include="")


@pytest.mark.parametrize("radii", [np.array([0.1, 0.3]), torch.tensor([0.1, 0.3]),
                                   np.linspace(0.1, 0.3, 2)])
def test_certify_epsilons_takes_a_1d_array(radii):
    assert SpectralBoundRegularizer(certify_epsilons=radii).certify_epsilons == pytest.approx(
        [0.1, 0.3])
    with pytest.raises(ValueError, match="certify_epsilons must be a list"):
        SpectralBoundRegularizer(certify_epsilons=radii[0])


def test_certified_training_logs_the_documented_keys(tmp_path):
    logger = CSVLogger(tmp_path, name="run", version=0)
    trainer = Trainer(max_epochs=1, logger=logger, log_every_n_steps=1, accelerator="cpu",
                      enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False,
                      callbacks=[SpectralBoundRegularizer(certified_eps=0.3)])
    trainer.fit(TinyVGG(), _loader())
    with open(Path(logger.log_dir) / "metrics.csv") as f:
        columns = set(next(csv.reader(f)))
    for doc in ("callback.md", "certified-training.md"):
        documented = set(re.findall(r"`(certified_train/[a-z_]+)`", (ROOT / "docs" / doc)
                                    .read_text()))
        assert documented and documented <= columns, (doc, documented - columns)


def _cli_module():
    spec = importlib.util.spec_from_file_location("example_cli", CONFIG.parent / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _cli_regularizer(*overrides: str) -> SpectralBoundRegularizer:
    args = ["--config", str(CONFIG), "--trainer.logger=false",
            *(f"--trainer.callbacks.init_args.{o}" for o in overrides)]
    cli = _cli_module().main(args, run=False)
    (reg,) = [c for c in cli.trainer.callbacks if isinstance(c, SpectralBoundRegularizer)]
    return reg


def test_cli_takes_one_pattern_as_the_constructor_does():
    reg = _cli_regularizer("include=model.*", "exclude=model.fc")
    assert reg.include == ["model.*"] and reg.exclude == ["model.fc"]


@pytest.mark.parametrize(("override", "message"), [
    ("beta=-1", "beta must be a finite number >= 0.0, got -1"),
    ("n_power_iterations=0", "n_power_iterations must be an integer >= 1, got 0"),
    ("certify_epsilons=[0.1,-1]", "certify_epsilons must be a non-empty list"),
    ("exact_every_n_epochs=0", "exact_every_n_epochs must be an integer >= 1, got 0"),
])
def test_cli_bad_value_names_the_option(override, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        _cli_regularizer(override)


def test_cli_warns_about_an_option_without_the_one_it_needs():
    with pytest.warns(UserWarning, match="constraint_tight_every_n_steps=2 has no effect"):
        _cli_regularizer("constraint_tight_every_n_steps=2")
