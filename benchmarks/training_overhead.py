"""Training-step overhead of SpectralBoundRegularizer on ResNet-32 and the MNIST CNN.

    python benchmarks/training_overhead.py                 # CPU, ResNet-32, batch 8 and 128
    python benchmarks/training_overhead.py --model mnist --batches 128
    python benchmarks/training_overhead.py --device cuda   # when a GPU is available

Three variants train the same network (``--model resnet32``: the paper's CIFAR ResNet-32 on
random CIFAR-shaped data, 3 x 32 x 32; ``--model mnist``: ``MnistCNN``, two strided 4x4
convolutions and two linear layers, on random MNIST-shaped data, 1 x 28 x 28; 10 classes, SGD)
under the same Lightning Trainer:

* ``baseline``: cross-entropy only;
* ``callback``: + ``SpectralBoundRegularizer(beta=1e-3, n_power_iterations=1)``, the paper's
  objective ``CE + beta * sum of the Fantastic Four bounds`` with one power iteration per step;
* ``per-layer loop``: the same objective written the straightforward way the paper's released
  code does: for every layer, the four reshaped matrices with their own ``u1..u4 / v1..v4``,
  one power iteration each, ``sigma = u^T M v``.

Each step is timed from ``on_train_batch_start`` to ``on_train_batch_end`` (forward, backward,
optimizer step and every hook; data loading excluded), the first steps of every run are
discarded, and the variants are interleaved round by round (A/B/C, then B/C/A, ...) in one
process so that machine noise hits them alike. Reported: median step time and its ratio to the
baseline. Targets: ratio <= 1.10 at batch 8 and <= 1.02 at batch 128 on CPU,
<= 1.05 at batch 128 on a GPU.
"""

from __future__ import annotations

import argparse
import functools
import logging
import math
import os
import platform
import statistics
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_spectral.callback import SpectralBoundRegularizer
from lightning_spectral.demos import ImageClassifier, MnistCNN, resnet32
from lightning_spectral.regularizer.constraint import check_finite

try:
    from benchmarks.machine_info import cpu_name
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`: this directory is on sys.path
    from machine_info import cpu_name  # type: ignore[no-redef]

BETA = 1e-3
#: name -> (network factory, input shape, description for the table)
MODELS = {
    "resnet32": (resnet32, (3, 32, 32), "ResNet-32 (0.47M parameters, 33 conv + 1 linear "
                 "layers in 9 shapes), random CIFAR-shaped data"),
    "mnist": (MnistCNN, (1, 28, 28), "MnistCNN (2 conv + 2 linear layers, 4 shapes), random "
              "MNIST-shaped data"),
}
VARIANTS = ("baseline", "callback", "per-layer loop")


class PaperLoopClassifier(ImageClassifier):
    """ImageClassifier + the paper's penalty, computed layer by layer and matrix by matrix."""

    def __init__(self, model: nn.Module, beta: float) -> None:
        super().__init__(model, lr=0.1, momentum=0.9)
        self.beta = beta
        self.vectors: dict[str, list[list[torch.Tensor]]] = {}
        gen = torch.Generator().manual_seed(0)
        for name, m in model.named_modules():
            if isinstance(m, nn.Conv2d):
                co, ci, h, w = m.weight.shape
                shapes = [(co, ci * h * w), (co * h, ci * w), (co * w, ci * h), (co * h * w, ci)]
            elif isinstance(m, nn.Linear):
                shapes = [tuple(m.weight.shape)]
            else:
                continue
            self.vectors[name] = [
                [F.normalize(torch.randn(r, generator=gen), dim=0),
                 F.normalize(torch.randn(c, generator=gen), dim=0)]
                for r, c in shapes
            ]

    def on_fit_start(self) -> None:
        for pairs in self.vectors.values():
            for pair in pairs:
                pair[0], pair[1] = pair[0].to(self.device), pair[1].to(self.device)

    def penalty(self) -> torch.Tensor:
        total = torch.zeros((), device=self.device)
        for name, m in self.model.named_modules():
            if name not in self.vectors:
                continue
            w = m.weight
            if w.ndim == 4:
                co, ci, h, k = w.shape
                mats = [
                    w.reshape(co, ci * h * k),
                    w.permute(0, 2, 1, 3).reshape(co * h, ci * k),
                    w.permute(0, 3, 1, 2).reshape(co * k, ci * h),
                    w.permute(0, 2, 3, 1).reshape(co * h * k, ci),
                ]
                scale = math.sqrt(h * k)
            else:
                mats, scale = [w], 1.0
            sigmas = []
            for mat, pair in zip(mats, self.vectors[name], strict=True):
                with torch.no_grad():
                    v = F.normalize(mat.t() @ pair[0], dim=0)
                    u = F.normalize(mat @ v, dim=0)
                    pair[0], pair[1] = u, v
                sigmas.append(u @ mat @ v)
            total = total + scale * torch.stack(sigmas).min()
        return self.beta * total

    def training_step(self, batch, batch_idx):
        return super().training_step(batch, batch_idx) + self.penalty()


class StepTimer(Callback):
    def __init__(self, device: torch.device) -> None:
        self.device, self.times, self._t0 = device, [], 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._sync()
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._sync()
        self.times.append(time.perf_counter() - self._t0)


def run(variant: str, model: str, batch: int, steps: int, warmup: int,
        device: torch.device) -> list[float]:
    torch.manual_seed(0)
    factory, shape, _ = MODELS[model]
    net = factory()
    callbacks: list[Callback] = []
    if variant == "per-layer loop":
        module: ImageClassifier = PaperLoopClassifier(net, BETA)
    else:
        module = ImageClassifier(net, lr=0.1, momentum=0.9)
        if variant == "callback":
            callbacks.append(SpectralBoundRegularizer(beta=BETA, n_power_iterations=1))
    timer = StepTimer(device)
    n = batch * (steps + warmup)
    data = TensorDataset(torch.randn(n, *shape), torch.randint(0, 10, (n,)))
    trainer = pl.Trainer(
        accelerator=device.type,
        devices=1,
        max_steps=steps + warmup,
        callbacks=[*callbacks, timer],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=50,
    )
    trainer.fit(module, DataLoader(data, batch_size=batch))
    return timer.times[warmup:]


def penalty_cost(variant: str, model: str, device: torch.device, repeats: int = 30) -> float:
    """Median time of the added work alone: the penalty's forward and backward, no training step.

    Much less noisy than the difference of two step times on a shared machine; ``1 + cost /
    baseline step`` is the overhead ratio it implies.
    """
    torch.manual_seed(0)
    net = MODELS[model][0]().to(device)
    if variant == "per-layer loop":
        module = PaperLoopClassifier(net, BETA).to(device)
        module.on_fit_start()
        penalty = module.penalty
    else:
        module = ImageClassifier(net).to(device)
        reg = SpectralBoundRegularizer(beta=BETA, n_power_iterations=1)
        reg.discover(module)
        penalty = functools.partial(reg.penalty, module)
    times = []
    for i in range(repeats + 3):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        penalty().backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= 3:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def callback_parts(model: str, device: torch.device, repeats: int = 50) -> dict[str, float]:
    """Median time of each part of the callback's work per step, timed alone.

    ``penalty forward``: the estimates (one power iteration per layer) and the penalty;
    ``penalty backward``: its share of the backward pass; ``post-step check``: the finiteness
    check after the optimizer step (one host sync).
    """
    torch.manual_seed(0)
    module = ImageClassifier(MODELS[model][0]().to(device))
    reg = SpectralBoundRegularizer(beta=BETA, n_power_iterations=1)
    reg.discover(module)
    times: dict[str, list[float]] = {"penalty forward": [], "penalty backward": [],
                                     "post-step check": []}

    def clock() -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter()

    for i in range(repeats + 3):
        t0 = clock()
        penalty = reg.penalty(module)
        t1 = clock()
        penalty.backward()
        t2 = clock()
        check_finite(reg._state.layers, reg._penalty.last_estimates, "benchmark")
        t3 = clock()
        if i >= 3:
            for key, dt in zip(times, (t1 - t0, t2 - t1, t3 - t2), strict=True):
                times[key].append(dt)
    return {k: statistics.median(v) for k, v in times.items()}


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, torch {torch.__version__}"
    return (f"{cpu_name()}, {torch.get_num_threads()} torch threads, torch {torch.__version__}, "
            f"Python {platform.python_version()}")


def load_average() -> str:
    try:
        return ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--model", default="resnet32", choices=sorted(MODELS))
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 128])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None, help="timed steps per run")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    cost = {v: penalty_cost(v, args.model, device) for v in VARIANTS[1:]}
    print(", ".join(f"{v}: penalty fwd+bwd {1e3 * c:.1f} ms" for v, c in cost.items()), flush=True)
    rows = []
    for batch in args.batches:
        steps = args.steps or (max(5, 256 // batch) if device.type == "cpu" else 50)
        times: dict[str, list[float]] = {v: [] for v in VARIANTS}
        for r in range(args.rounds):
            order = VARIANTS[r % 3:] + VARIANTS[:r % 3]
            for variant in order:
                times[variant] += run(variant, args.model, batch, steps, warmup=2, device=device)
        med = {v: statistics.median(t) for v, t in times.items()}
        rows.append((batch, med, {v: len(t) for v, t in times.items()}))
        print(f"batch {batch}: " + ", ".join(f"{v} {1e3 * m:.1f} ms" for v, m in med.items()),
              flush=True)

    lines = [
        f"# Training overhead of SpectralBoundRegularizer ({device.type}, {args.model})",
        "",
        f"Machine: {machine(device)}; load average {load_average()} at the end.",
        f"{MODELS[args.model][2]}, SGD; beta = {BETA:g}, one power iteration per step; median "
        f"step time over {args.rounds} interleaved rounds (`python benchmarks/training_overhead.py"
        f" --model {args.model} --batches {' '.join(map(str, args.batches))}"
        f"{' --device ' + args.device if device.type != 'cpu' else ''}`).",
        "",
        "| batch | baseline (ms) | callback (ms) | callback / baseline "
        "| per-layer loop (ms) | per-layer / baseline | steps timed |",
        "|---|---|---|---|---|---|---|",
    ]
    for batch, med, counts in rows:
        base = med["baseline"]
        lines.append(
            f"| {batch} | {1e3 * base:.1f} | {1e3 * med['callback']:.1f} "
            f"| {med['callback'] / base:.3f} | {1e3 * med['per-layer loop']:.1f} "
            f"| {med['per-layer loop'] / base:.3f} | {counts['baseline']} |"
        )
    lines += [
        "",
        "The added work timed alone (median of 30: the penalty's forward and backward, outside "
        "the training step) and the overhead ratio it implies, 1 + added / baseline step:",
        "",
        "| batch | callback: added (ms) | implied ratio | per-layer loop: added (ms) "
        "| implied ratio |",
        "|---|---|---|---|---|",
    ]
    for batch, med, _ in rows:
        base = med["baseline"]
        lines.append(
            f"| {batch} | {1e3 * cost['callback']:.1f} | {1 + cost['callback'] / base:.3f} "
            f"| {1e3 * cost['per-layer loop']:.1f} | {1 + cost['per-layer loop'] / base:.3f} |"
        )
    parts = callback_parts(args.model, device)
    lines += [
        "",
        "Where the callback's time goes (each part timed alone, median of 50; its share of the "
        "baseline step of the last batch size):",
        "",
        "| part | time (ms) | share of baseline step |",
        "|---|---|---|",
    ]
    base = rows[-1][1]["baseline"]
    for part, t in parts.items():
        lines.append(f"| {part} | {1e3 * t:.2f} | {t / base:.3f} |")
    table = "\n".join(lines) + "\n"
    print()
    print(table)
    stem = "training_overhead" if args.model == "resnet32" else f"training_overhead_{args.model}"
    out = args.out or Path(__file__).parent / "results" / f"{stem}_{device.type}.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    print(f"written to {out}")


if __name__ == "__main__":
    main()
