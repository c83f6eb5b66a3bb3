"""The MNIST study: every regularization config of ``examples/configs/mnist`` trained for real.

    python -m benchmarks.mnist_study --data-dir /tmp/mnist --epochs 10 --seeds 0
    python -m benchmarks.mnist_study --report-only      # tables again from the saved JSON

Run from the repository root. ``--data-dir`` holds torchvision's layout, ``MNIST/raw/*-ubyte``.
Each run is the LightningCLI of ``examples/cli.py`` on a config of ``examples/configs/mnist``,
with the same epochs and seed for every config, a CSVLogger under ``--log-dir`` (one folder per
run: ``python -m lightning_spectral.report <folder>`` plots it), then ``trainer.test``.

Recorded per run, all from what the callback and the classifier log (nothing recomputed here):

* test accuracy, certified accuracy at the configs' l2 radii (pixels in [0, 1]) and the mean
  certified radius, with the network Lipschitz bound ``lipschitz/network`` of the test run;
* per layer, the guaranteed bound ``spectral_bound/<layer>`` and the exact norm
  ``spectral_exact/<layer>`` of the last validation run (after the last training step);
* training time per epoch: from the epoch's start to its last training batch (forward, backward,
  optimizer step, penalty, projection, data loading; not validation).

Results go to ``<out>/mnist_study_cpu.json`` (raw numbers), ``.csv`` (one row per run) and
``.md`` (tables, means over seeds). A run already in the JSON is not run again.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import json
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch

try:
    from benchmarks.machine_info import cpu_name
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`: this directory is on sys.path
    from machine_info import cpu_name  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "examples" / "configs" / "mnist"
# name -> (config file, extra CLI overrides). Same model, data and epochs for all.
STUDY: dict[str, tuple[str, list[str]]] = {
    "none": ("none.yaml", []),
    "weight_decay": ("weight_decay.yaml", []),
    "ff_beta0.01": ("ff_penalty.yaml", ["--trainer.callbacks.init_args.beta=0.01"]),
    "ff_beta0.1": ("ff_penalty.yaml", ["--trainer.callbacks.init_args.beta=0.1"]),
    "hinge": ("hinge.yaml", []),
    "constraint": ("constraint.yaml", []),
}
STAGES = ("train", "val", "test")
LAYERS = ("model.conv1", "model.conv2", "model.fc1", "model.fc2")


class EpochTimer(pl.Callback):
    """Wall time of each training epoch, from its start to the end of its last batch."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self._start = self._last = 0.0

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._start = self._last = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._last = time.perf_counter()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.seconds.append(self._last - self._start)


def _cli_main():
    spec = importlib.util.spec_from_file_location("examples_cli", ROOT / "examples" / "cli.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.main


def cli_args(name: str, data_dir: Path, log_dir: Path, epochs: int, seed: int) -> list[str]:
    """The ``examples/cli.py`` arguments of one run (the command a user would type)."""
    config, extra = STUDY[name]
    return [
        f"--config={CONFIGS / config}",
        *extra,
        f"--seed_everything={seed}",
        f"--data.init_args.seed={seed}",
        f"--data.init_args.data_dir={data_dir}",
        f"--trainer.max_epochs={epochs}",
        f"--trainer.logger.init_args.save_dir={log_dir}",
        f"--trainer.logger.init_args.name={name}",
        f"--trainer.logger.init_args.version=seed{seed}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
    ]


def _floats(metrics: dict[str, Any], prefix: str) -> dict[str, float]:
    return {k[len(prefix) :]: float(v) for k, v in metrics.items() if k.startswith(prefix)}


def run_one(name: str, args: list[str]) -> dict[str, Any]:
    """Fit and test one config; return what was logged."""
    cli = _cli_main()(args, run=False)
    timer = EpochTimer()
    cli.trainer.callbacks.append(timer)
    start = time.perf_counter()
    cli.trainer.fit(cli.model, cli.datamodule)
    fit_seconds = time.perf_counter() - start
    val = dict(cli.trainer.callback_metrics)
    test = cli.trainer.test(cli.model, cli.datamodule, verbose=False)[0]
    return {
        "config": name,
        "args": args,
        "epochs": cli.trainer.current_epoch,
        "test_acc": float(test["test/acc"]),
        "certified_acc": _floats(test, "test/certified/acc@"),
        "certified_radius": float(test["test/certified/radius"]),
        "lipschitz_network": float(test["test/lipschitz/network"]),
        "bound": _floats(val, "spectral_bound/model."),
        "exact": _floats(val, "spectral_exact/model."),
        "val_acc": float(val["val/acc"]),
        "train_epoch_seconds": timer.seconds,
        "fit_seconds": fit_seconds,
    }


def machine() -> dict[str, str]:
    return {
        "cpu": cpu_name(),
        "threads": str(torch.get_num_threads()),
        "torch": torch.__version__,
        "lightning": pl.__version__,
        "python": platform.python_version(),
        "date": datetime.date.today().isoformat(),
    }


def _mean(values: list[float]) -> str:
    """Mean, with the spread over seeds when there are several."""
    if len(values) == 1:
        return f"{values[0]:.4g}"
    return f"{statistics.mean(values):.4g} ± {statistics.stdev(values):.2g}"


def _by_config(runs: list[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    grouped: dict[str, list[dict[str, Any]]] = {}
    for run in runs:
        grouped.setdefault(run["config"], []).append(run)
    return grouped


def summary_table(runs: list[dict[str, Any]]) -> list[str]:
    """Accuracy, network bound, certified accuracy and time, one row per config.

    Times are pooled over epochs and seeds: median and minimum, since a shared machine only
    ever slows an epoch down.
    """
    eps = list(runs[0]["certified_acc"])
    head = ["config", "seeds", "test acc", "max layer bound", "network Lipschitz bound"]
    head += [f"cert. acc @{e}" for e in eps] + ["s / train epoch: median (min)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, group in _by_config(runs).items():
        cells = [name, str(len(group)), _mean([r["test_acc"] for r in group])]
        cells.append(_mean([max(r["bound"].values()) for r in group]))
        cells.append(_mean([r["lipschitz_network"] for r in group]))
        cells += [_mean([r["certified_acc"][e] for r in group]) for e in eps]
        epochs = [t for r in group for t in r["train_epoch_seconds"]]
        cells.append(f"{statistics.median(epochs):.1f} ({min(epochs):.1f})")
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def layer_table(runs: list[dict[str, Any]]) -> list[str]:
    """Guaranteed bound / exact norm of every layer after training, one row per config."""
    layers = [name.split(".", 1)[1] for name in LAYERS]
    lines = ["| config | " + " | ".join(layers) + " |", "|---|" + "---|" * len(layers)]
    for name, group in _by_config(runs).items():
        cells = [
            f"{_mean([r['bound'][la] for r in group])} / {_mean([r['exact'][la] for r in group])}"
            for la in layers
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def write_outputs(runs: list[dict[str, Any]], info: dict[str, Any], out: Path) -> None:
    """The JSON (everything), the CSV (one row per run) and the markdown tables."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / "mnist_study_cpu"
    stem.with_suffix(".json").write_text(json.dumps({"info": info, "runs": runs}, indent=1))
    with stem.with_suffix(".csv").open("w", newline="") as f:
        writer = csv.writer(f)
        eps = list(runs[0]["certified_acc"])
        layers = list(runs[0]["bound"])
        writer.writerow(
            ["config", "seed", "test_acc", "lipschitz_network", "certified_radius"]
            + [f"cert_acc@{e}" for e in eps]
            + [f"bound/{la}" for la in layers]
            + [f"exact/{la}" for la in layers]
            + ["train_s_per_epoch"]
        )
        for r in runs:
            writer.writerow(
                [r["config"], r["seed"], r["test_acc"], r["lipschitz_network"]]
                + [r["certified_radius"]]
                + [r["certified_acc"][e] for e in eps]
                + [r["bound"][la] for la in layers]
                + [r["exact"][la] for la in layers]
                + [statistics.mean(r["train_epoch_seconds"])]
            )
    stem.with_suffix(".md").write_text("\n".join(markdown(runs, info)) + "\n")


def markdown(runs: list[dict[str, Any]], info: dict[str, Any]) -> list[str]:
    m = info["machine"]
    seeds = sorted({r["seed"] for r in runs})
    return [
        "# MNIST study on CPU: regularizers, guaranteed bounds, certified accuracy",
        "",
        f"Machine: {m['cpu']}, {m['threads']} torch thread(s) (a 2-core VM shared with other "
        f"work, so times are indicative); torch {m['torch']}, Lightning {m['lightning']}, "
        f"Python {m['python']}; {m['date']}.",
        "",
        f"Regenerate: `{info['command']}` (from the repository root; `--data-dir` holds "
        "`MNIST/raw/*-ubyte`).",
        "",
        f"MnistCNN (conv 4x4/2, conv 4x4/2, fc 100, fc 10) on MNIST, {info['epochs']} epochs "
        f"per config, seed(s) {', '.join(map(str, seeds))}, the configs of "
        "`examples/configs/mnist/` through `examples/cli.py`. 55000 training images, 5000 held "
        "out for validation, the 10000 test images for everything below. Pixels in [0, 1], "
        "not normalized: radii are l2 norms in pixel units.",
        "",
        "Certified accuracy: share of test images classified correctly with certified radius "
        "`margin / (sqrt(2) L) >= eps`, `L` the network Lipschitz bound (product of the "
        "guaranteed layer bounds along the chain). With several seeds: mean ± std. Time per "
        "training epoch: median and minimum over all epochs (the minimum is the least disturbed "
        "by other processes on the machine).",
        "",
        *summary_table(runs),
        "",
        "Per layer after training: guaranteed bound / exact spectral norm (at the 28x28 and "
        "14x14 inputs the convolutions see).",
        "",
        *layer_table(runs),
        "",
    ]


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", type=Path, help="holds MNIST/raw/*-ubyte")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--configs", nargs="+", default=list(STUDY), choices=list(STUDY))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-dir", type=Path, default=Path("lightning_logs/mnist_study"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--report-only", action="store_true", help="tables from the JSON")
    parser.add_argument("--limit-batches", type=int, help="per stage: for a quick smoke run")
    parser.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="passed to every run as --KEY=VALUE, e.g. data.init_args.batch_size=64",
    )
    args = parser.parse_args(argv)
    saved = args.out / "mnist_study_cpu.json"
    old = json.loads(saved.read_text()) if saved.exists() else {"runs": [], "info": {}}
    if args.report_only:
        if not old["runs"]:
            parser.error(f"--report-only: no runs saved in {saved}")
        write_outputs(old["runs"], old["info"], args.out)
        return old["runs"]
    if args.data_dir is None or not (args.data_dir / "MNIST" / "raw").is_dir():
        parser.error(f"--data-dir must hold MNIST/raw/*-ubyte, got {args.data_dir}")
    torch.set_num_threads(args.threads)
    info = {
        "machine": machine(),
        "epochs": args.epochs,
        "command": "python -m benchmarks.mnist_study --data-dir <dir> "
        f"--epochs {args.epochs} --seeds {' '.join(map(str, args.seeds))}",
    }
    runs = [r for r in old["runs"] if r["epochs"] == args.epochs]
    for seed in args.seeds:
        for name in args.configs:
            if any(r["config"] == name and r["seed"] == seed for r in runs):
                continue
            cli = cli_args(name, args.data_dir, args.log_dir, args.epochs, seed)
            if args.limit_batches is not None:
                cli += [f"--trainer.limit_{s}_batches={args.limit_batches}" for s in STAGES]
            cli += [f"--{kv}" for kv in args.override]
            runs.append({**run_one(name, cli), "seed": seed})
            write_outputs(runs, info, args.out)
            print(f"done {name} seed {seed}: test acc {runs[-1]['test_acc']:.4f}", flush=True)
    return runs


if __name__ == "__main__":
    main()
