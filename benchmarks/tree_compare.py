"""Time one source tree, to compare two side by side (e.g. before and after a refactoring).

    PYTHONPATH=/path/to/tree OMP_NUM_THREADS=1 python benchmarks/tree_compare.py

Uses only names exported by ``lightning_spectral`` and ``lightning_spectral.demos``, so the
same script runs on trees whose modules are laid out differently. Prints one JSON line of
medians in seconds: a training step of ``MnistCNN`` (batch 64, one thread) with the penalty
and the constraint, one with certified training (GloRo, eps 0.5), and the network Lipschitz
bound of ResNet-32 and of ``MnistCNN``. Run the trees alternately, several rounds each.
"""

from __future__ import annotations

import json
import logging
import statistics
import time
import warnings
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch

import lightning_spectral as ls
from lightning_spectral.demos import ImageClassifier, MnistCNN, resnet32


def _median_time(fn: Callable[[], Any], n: int) -> float:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class _StepTimer(pl.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []
        self.start = 0.0

    def on_train_batch_start(self, *args: Any) -> None:
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args: Any) -> None:
        self.times.append(time.perf_counter() - self.start)


def step_time(batches: int = 40, **options: Any) -> float:
    """Median time of a training step (the first five discarded) under the callback."""
    torch.manual_seed(0)
    x, y = torch.randn(64 * batches, 1, 28, 28), torch.randint(0, 10, (64 * batches,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=64)
    timer = _StepTimer()
    trainer = pl.Trainer(
        max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, accelerator="cpu", num_sanity_val_steps=0,
        callbacks=[ls.SpectralBoundRegularizer(**options), timer],
    )
    trainer.fit(ImageClassifier(MnistCNN(), lr=0.01), loader)
    return statistics.median(timer.times[5:])


def main() -> None:
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    resnet, cnn = resnet32().eval(), MnistCNN().eval()
    print(json.dumps({
        "step penalty+constraint": step_time(beta=1e-3, constraint=1.0),
        "step certified gloro": step_time(certified_eps=0.5),
        "network_lipschitz_bound resnet32": _median_time(
            lambda: ls.network_lipschitz_bound(resnet, (3, 32, 32)), 3),
        "network_lipschitz_bound MnistCNN": _median_time(
            lambda: ls.network_lipschitz_bound(cnn, (1, 28, 28)), 5),
    }))


if __name__ == "__main__":
    main()
