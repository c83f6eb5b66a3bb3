"""The experiment configs of examples/configs: each parses and trains through examples/cli.py.

Data are written by the test in the real formats (IDX files for MNIST, pickled batches for
CIFAR-10) and read by torchvision's own readers, so the configs run exactly as with the real
datasets, only on a few random images.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import pickle
import re
import struct
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lightning_spectral.callback import SpectralBoundRegularizer

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = sorted((ROOT / "examples" / "configs").glob("*/*.yaml"))
VARIANTS = {"none", "weight_decay", "ff_penalty", "hinge", "constraint"}


def _cli_main():
    spec = importlib.util.spec_from_file_location("example_cli", ROOT / "examples" / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def _write_idx(path: Path, array: np.ndarray) -> None:
    """IDX: magic (0, 0, 0x08 = ubyte, ndim), big-endian int32 dimensions, the raw bytes."""
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}i", *array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


def _fake_mnist(root: Path, n: int = 24) -> None:
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix in ("train", "t10k"):
        _write_idx(raw / f"{prefix}-images-idx3-ubyte", rng.integers(0, 256, (n, 28, 28)))
        _write_idx(raw / f"{prefix}-labels-idx1-ubyte", np.arange(n) % 10)


def _fake_cifar10(root: Path, per_batch: int = 4) -> None:
    """cifar-10-batches-py: pickled dicts of 'data' (n x 3072 uint8) and 'labels', and meta."""
    rng = np.random.default_rng(1)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(folder / name, "wb") as f:
            pickle.dump({"batch_label": name, "data": data, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"class{i}" for i in range(10)]}, f)


def _args(config: Path, data_dir: Path, logs: Path) -> list[str]:
    args = [
        f"--config={config}",
        f"--data.init_args.data_dir={data_dir}",
        "--data.init_args.batch_size=4",
        "--data.init_args.val_size=8",
        "--trainer.max_epochs=1",
        "--trainer.limit_train_batches=2",
        "--trainer.limit_val_batches=1",
        "--trainer.limit_test_batches=1",
        "--trainer.accelerator=cpu",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        f"--trainer.logger.init_args.save_dir={logs}",
    ]
    if config.parent.name == "cifar10":
        args.append("--data.init_args.verify_checksums=false")  # the files are not the real ones
        # Exact norms of ResNet-32's 32 layers take minutes on CPU; the MNIST configs and the
        # callback's own tests cover them.
        args.append("--trainer.callbacks.init_args.exact_every_n_epochs=null")
    return args


def test_every_dataset_has_every_variant() -> None:
    found = {(p.parent.name, p.stem) for p in CONFIGS}
    assert found == {(d, v) for d in ("mnist", "cifar10") for v in VARIANTS}


def _regularizer(cli) -> SpectralBoundRegularizer:
    (reg,) = [c for c in cli.trainer.callbacks if isinstance(c, SpectralBoundRegularizer)]
    return reg


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("data")
    _fake_mnist(root / "mnist")
    _fake_cifar10(root / "cifar10")
    return {"mnist": root / "mnist", "cifar10": root / "cifar10"}


def _build(config: Path, data_dirs: dict[str, Path], logs: Path, extra: list[str] = ()):
    args = _args(config, data_dirs[config.parent.name], logs) + list(extra)
    return _cli_main()(args, run=False)


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_builds_what_it_says(config: Path, data_dirs, tmp_path: Path) -> None:
    raw = yaml.safe_load(config.read_text())
    cli = _build(config, data_dirs, tmp_path)
    reg = _regularizer(cli)
    (entry,) = raw["trainer"]["callbacks"]
    for name, value in entry["init_args"].items():
        if name != "exact_every_n_epochs" or config.parent.name == "mnist":
            assert getattr(reg, name) == value, name
    # Radii are reported in pixel units only if the callback's scale is the data's own.
    assert reg.input_scale == pytest.approx(cli.datamodule.input_scale, abs=5e-5)
    for name, value in raw["model"].items():
        if name != "model":
            assert cli.model.hparams[name] == value, name
    assert cli.datamodule.hparams["batch_size"] == 4  # the override, over the YAML's value
    assert raw["data"]["init_args"]["batch_size"] == 128


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_config_trains_and_certifies(config: Path, data_dirs, tmp_path: Path) -> None:
    extra = ["--trainer.log_every_n_steps=1"]
    if config.parent.name == "cifar10" and config.stem != "none":
        # ResNet-32's guaranteed bounds and network bound take ~30 s on this CPU: one config
        # trains the full depth, the others ResNet-8 (same blocks, shortcuts and options).
        extra.append("--model.model.init_args.blocks_per_stage=1")
    cli = _build(config, data_dirs, tmp_path, extra)
    reg = _regularizer(cli)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # few-batch loaders, no workers: Lightning's advice
        cli.trainer.fit(cli.model, cli.datamodule)
        metrics = dict(cli.trainer.callback_metrics)  # trainer.test replaces them
        test = cli.trainer.test(cli.model, cli.datamodule, verbose=False)[0]
    assert cli.trainer.global_step == 2
    eps = reg.certify_epsilons[0]
    assert {"spectral_bound/max", "lipschitz/network", f"certified/acc@{eps:g}"} <= set(metrics)
    assert {"test/acc", "test/lipschitz/network", f"test/certified/acc@{eps:g}"} <= set(test)
    if reg.constraint is not None:
        assert metrics["spectral_bound/max"] <= reg.constraint
    penalty = metrics["spectral_penalty"]
    assert (penalty > 0) if reg.beta > 0 and reg.target is None else (penalty >= 0)
    if reg.beta == 0:
        assert penalty == 0
    rows = list(csv.DictReader(next(tmp_path.rglob("metrics.csv")).open()))
    assert any(row.get("spectral_bound/max") for row in rows)


def test_fit_then_test_subcommands_run_a_config(data_dirs, tmp_path: Path) -> None:
    # The documented commands: `python examples/cli.py fit --config ...`, then `test` with the
    # same config and the checkpoint.
    config = ROOT / "examples" / "configs" / "mnist" / "ff_penalty.yaml"
    args = _args(config, data_dirs["mnist"], tmp_path) + ["--trainer.enable_checkpointing=true"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli = _cli_main()(["fit", *args])
        assert cli.trainer.state.finished and cli.trainer.global_step == 2
        (ckpt,) = (tmp_path / "ff_penalty" / "version_0" / "checkpoints").glob("*.ckpt")
        tested = _cli_main()(["test", *args, f"--ckpt_path={ckpt}"])
    assert (tmp_path / "ff_penalty" / "version_0" / "metrics.csv").is_file()
    assert {"test/acc", "test/lipschitz/network", "test/certified/acc@1.58"} <= set(
        tested.trainer.callback_metrics
    )


def test_mnist_study_runner(data_dirs, tmp_path: Path) -> None:
    if str(ROOT) not in sys.path:  # `benchmarks` is not installed: import it from the checkout
        sys.path.insert(0, str(ROOT))
    from benchmarks import mnist_study  # noqa: PLC0415 - only importable after the insert

    args = ["--data-dir", str(data_dirs["mnist"]), "--epochs", "1", "--limit-batches", "2"]
    args += ["--configs", "none", "constraint", "--out", str(tmp_path / "out")]
    args += ["--log-dir", str(tmp_path / "logs")]
    args += ["--override", "data.init_args.val_size=8", "--override", "data.init_args.batch_size=4"]
    threads = torch.get_num_threads()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            runs = mnist_study.main(args)
            again = mnist_study.main(args)  # everything is in the JSON already: nothing reruns
    finally:
        torch.set_num_threads(threads)
    assert [r["config"] for r in runs] == ["none", "constraint"]
    assert again == json.loads((tmp_path / "out" / "mnist_study_cpu.json").read_text())["runs"]
    for run in runs:
        assert set(run["bound"]) == set(run["exact"]) == {"conv1", "conv2", "fc1", "fc2"}
        for layer, bound in run["bound"].items():
            assert run["exact"][layer] <= bound * (1 + 1e-5), layer
        assert set(run["certified_acc"]) == {"0.1", "0.5", "1", "1.58"}
        assert len(run["train_epoch_seconds"]) == 1 and run["epochs"] == 1
    assert max(runs[1]["bound"].values()) <= 1.0
    table = (tmp_path / "out" / "mnist_study_cpu.md").read_text()
    assert "| none | 1 |" in table and "| constraint | 1 |" in table
    rows = list(csv.DictReader((tmp_path / "out" / "mnist_study_cpu.csv").open()))
    assert [r["config"] for r in rows] == ["none", "constraint"]
    assert (tmp_path / "logs" / "constraint" / "seed0" / "metrics.csv").is_file()
    # The tables come back identical from the saved JSON alone; no JSON is a clear error.
    (tmp_path / "out" / "mnist_study_cpu.md").unlink()
    mnist_study.main(["--report-only", "--out", str(tmp_path / "out")])
    assert (tmp_path / "out" / "mnist_study_cpu.md").read_text() == table
    with pytest.raises(SystemExit):
        mnist_study.main(["--report-only", "--out", str(tmp_path / "empty")])


def test_results_page_names_every_config_and_only_existing_ones() -> None:
    page = (ROOT / "docs" / "results.md").read_text()
    named = set(re.findall(r"examples/configs/(\w+/\w+)\.yaml", page))
    named |= set(re.findall(r"`(mnist/\w+|cifar10/\w+)\.yaml`", page))
    assert named == {f"{p.parent.name}/{p.stem}" for p in CONFIGS}


def test_results_page_shows_the_committed_tables() -> None:
    # The tables on the page are copies of the study's output: they must not drift apart.
    page = (ROOT / "docs" / "results.md").read_text()
    results = (ROOT / "benchmarks" / "results" / "mnist_study_cpu.md").read_text()
    rows = [line for line in results.splitlines() if line.startswith("|")]
    assert len(rows) >= 8
    for row in rows:
        assert row in page.splitlines(), row


def test_certified_training_config_trains_and_certifies(data_dirs, tmp_path: Path) -> None:
    config = ROOT / "examples" / "certified_mnist.yaml"
    raw = yaml.safe_load(config.read_text())
    args = _args(config, data_dirs["mnist"], tmp_path) + ["--trainer.log_every_n_steps=1"]
    cli = _cli_main()(args, run=False)
    reg = _regularizer(cli)
    for name, value in raw["trainer"]["callbacks"][0]["init_args"].items():
        assert getattr(reg, name) == value, name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cli.trainer.fit(cli.model, cli.datamodule)
        metrics = dict(cli.trainer.callback_metrics)
        test = cli.trainer.test(cli.model, cli.datamodule, verbose=False)[0]
    assert cli.trainer.global_step == 2
    assert {"certified_train/eps", "certified_train/lipschitz_estimate"} <= set(metrics)
    assert {"test/acc", "test/lipschitz/network", "test/certified/acc@1.58"} <= set(test)


def test_results_page_shows_the_committed_certified_training_table() -> None:
    page = (ROOT / "docs" / "results.md").read_text().splitlines()
    table = (ROOT / "benchmarks" / "results" / "certified_training_mnist_cpu.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("|")]
    assert len(rows) >= 3
    for row in rows:
        assert row in page, row
