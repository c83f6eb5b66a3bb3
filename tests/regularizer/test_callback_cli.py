"""LightningCLI round trip: examples/config.yaml builds the callback with every option."""

from __future__ import annotations

import importlib.util
import inspect
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from lightning_spectral.callback import SpectralBoundRegularizer

CONFIG = Path(__file__).resolve().parents[2] / "examples" / "config.yaml"


def _cli_module():
    spec = importlib.util.spec_from_file_location("example_cli", CONFIG.parent / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _regularizer(cli) -> SpectralBoundRegularizer:
    found = [c for c in cli.trainer.callbacks if isinstance(c, SpectralBoundRegularizer)]
    assert len(found) == 1
    return found[0]


def test_config_lists_every_option_and_builds_the_callback(tmp_path):
    raw = yaml.safe_load(CONFIG.read_text())
    (entry,) = raw["trainer"]["callbacks"]
    assert entry["class_path"] == "lightning_spectral.callback.SpectralBoundRegularizer"
    options = entry["init_args"]
    assert set(options) == set(inspect.signature(SpectralBoundRegularizer).parameters)

    args = ["--config", str(CONFIG), "--trainer.logger=false",
            f"--trainer.default_root_dir={tmp_path}"]
    cli = _cli_module().main(args, run=False)
    reg = _regularizer(cli)
    for name, value in options.items():
        assert getattr(reg, name) == value, name

    # Round trip: the parsed config, dumped and parsed again, builds the same callback.
    dumped = tmp_path / "dumped.yaml"
    dumped.write_text(cli.parser.dump(cli.config, skip_none=False))
    again = _regularizer(_cli_module().main(["--config", str(dumped)], run=False))
    for name in options:
        assert getattr(again, name) == getattr(reg, name), name


def test_cli_rejects_a_bad_value(tmp_path, capsys):
    args = ["--config", str(CONFIG), "--trainer.logger=false",
            "--trainer.callbacks.init_args.reduction=median"]
    with pytest.raises(SystemExit):
        _cli_module().main(args, run=False)


def test_cli_fits(tmp_path):
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    args = ["--config", str(CONFIG), "--trainer.logger=false",
            "--trainer.enable_checkpointing=false", "--trainer.enable_progress_bar=false",
            "--trainer.max_epochs=1", "--trainer.limit_train_batches=3",
            "--trainer.limit_val_batches=2", f"--trainer.default_root_dir={tmp_path}"]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            cli = _cli_module().main(args, run=False)
            cli.trainer.fit(cli.model, cli.datamodule)
    finally:
        torch.set_num_threads(n)
    metrics = cli.trainer.callback_metrics
    assert {"spectral_bound/max", "spectral_ratio/max", "certified/acc@0.1"} <= set(metrics)
