"""Training-step cost of certified training next to the plain penalty, on the MNIST 4C3F net.

    python benchmarks/certified_overhead.py --out benchmarks/results/certified_overhead_cpu.md

Three variants train the same network (``examples/certified_mnist.py``'s 4C3F layout with
MaxMin, width 16, dense 256; Adam) on random MNIST-shaped data (1 x 28 x 28, 10 classes):

* ``baseline``: cross-entropy only, no callback;
* ``penalty``: ``SpectralBoundRegularizer(beta=1e-3)`` (one power iteration per step);
* ``certified``: ``SpectralBoundRegularizer(certified_eps=1.58)``, the GloRo term with the
  recorded Lipschitz program replayed on per-step operator-norm estimates (its default
  monitoring estimates included).

Steps are timed from ``on_train_batch_start`` to ``on_train_batch_end`` (everything but data
loading), the first steps of every run are discarded, and the variants are interleaved round by
round in one process. Reported: median step time and the ratio to the baseline.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import statistics
import sys
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral import SpectralBoundRegularizer

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from training_overhead import StepTimer, machine  # noqa: E402

VARIANTS = ("baseline", "penalty", "certified")


def _example():
    spec = importlib.util.spec_from_file_location(
        "certified_mnist", HERE.parent / "examples" / "certified_mnist.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _callbacks(variant: str) -> list[pl.Callback]:
    if variant == "penalty":
        return [SpectralBoundRegularizer(beta=1e-3, log_per_layer=False)]
    if variant == "certified":
        return [SpectralBoundRegularizer(certified_eps=1.58, log_per_layer=False)]
    return []


def run(variant: str, batch: int, steps: int, warmup: int) -> list[float]:
    torch.manual_seed(0)
    model = _example().Classifier(width=16, dense=256, lr=1e-3, epochs=1)
    timer = StepTimer(torch.device("cpu"))
    n = batch * (steps + warmup)
    data = TensorDataset(torch.rand(n, 1, 28, 28), torch.randint(0, 10, (n,)))
    trainer = pl.Trainer(accelerator="cpu", devices=1, max_epochs=1,
                         callbacks=[*_callbacks(variant), timer], logger=False,
                         enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, log_every_n_steps=50)
    trainer.fit(model, DataLoader(data, batch_size=batch))
    return timer.times[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(args.rounds):
        for variant in VARIANTS[r % 3:] + VARIANTS[:r % 3]:
            times[variant] += run(variant, args.batch, args.steps, warmup=3)
    med = {v: statistics.median(t) for v, t in times.items()}
    base = med["baseline"]
    lines = [
        "# Certified training: cost per step (cpu)",
        "",
        f"Machine: {machine(torch.device('cpu'))}.",
        f"MNIST 4C3F (width 16, dense 256, MaxMin), Adam, batch {args.batch}, random "
        f"MNIST-shaped data; median step time over {args.rounds} interleaved rounds of "
        f"{args.steps} timed steps (`python benchmarks/certified_overhead.py`).",
        "",
        "| variant | median step (ms) | ratio to baseline | steps timed |",
        "|---|---|---|---|",
    ]
    for v in VARIANTS:
        lines.append(f"| {v} | {1e3 * med[v]:.1f} | {med[v] / base:.3f} | {len(times[v])} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.write_text(text)


if __name__ == "__main__":
    main()
