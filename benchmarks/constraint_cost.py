"""Per-step cost of ``SpectralBoundRegularizer(constraint=1.0)`` on CPU.

    python benchmarks/constraint_cost.py   # -> benchmarks/results/constraint_cost_cpu.md

Two networks, SGD (lr 0.01, momentum 0.9) on random data, batch 32, one torch thread:

* torchvision ``resnet18`` adapted to MNIST (conv1 with 1 input channel, fc with 10 classes;
  1 x 28 x 28 inputs), 21 layers, 11.2M parameters;
* ResNet-32 (``lightning_spectral.demos.resnet32``; 3 x 32 x 32), 34 layers, 0.47M parameters.

Three variants of one optimizer step (forward, backward, ``optimizer.step()``, and the step
post-hook the callback installs, which runs the projection) on copies of one network:

* ``none``: no constraint;
* ``automatic``: the projection as the callback runs it by default (tight bounds on a round
  robin within a budget per step, the anchored bound for the other layers);
* ``tight every step``: ``constraint_tight_every_n_steps=1``, the tight bound of every layer
  after every step (what every step cost before the anchored bound).

The variants are interleaved round by round in one process and the median step is reported
with its ratio to ``none``; the first projection (the tight bound of every layer, once at the
start of ``fit``) is outside the timing. Also reported: after the timed steps, the largest
ratio (over layers) of the tight bound to the constraint in the automatic variant, i.e. how
far below the constraint the cheaper bound leaves the layers.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from lightning_spectral.demos import resnet32
from lightning_spectral.functional.bounds import layer_bounds
from lightning_spectral.regularizer.constraint import AfterStep
from lightning_spectral.regularizer.selection import select_layers

try:
    from benchmarks.machine_info import cpu_name
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`: this directory is on sys.path
    from machine_info import cpu_name  # type: ignore[no-redef]

C = 1.0
VARIANTS = {"none": None, "automatic": None, "tight every step": 1}


def mnist_resnet18() -> nn.Module:
    """torchvision resnet18 with a 1-channel conv1 and 10 classes."""
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    model.conv1 = nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    return model


NETWORKS: dict[str, tuple[Callable[[], nn.Module], tuple[int, ...]]] = {
    "resnet18 (torchvision, MNIST 1x28x28)": (mnist_resnet18, (1, 28, 28)),
    "ResNet-32 (CIFAR 3x32x32)": (resnet32, (3, 32, 32)),
}


class Run:
    """One variant: its network copy, optimizer and (for the constraint) post-step hook."""

    def __init__(self, net: nn.Module, variant: str) -> None:
        self.net = net
        self.opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
        self.layers = select_layers(net, None, None, False)
        self.after = AfterStep()
        if variant != "none":
            every_n = VARIANTS[variant]
            self.after.project(self.layers, C, "start", every_n=every_n)
            self.after.register([self.opt], lambda *a: self.after.run(
                self.layers, None, check=True, c=C, where="step", every_n=every_n))

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        start = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        F.cross_entropy(self.net(x), y).backward()
        self.opt.step()
        return time.perf_counter() - start

    def worst_tight_ratio(self) -> float:
        with torch.no_grad():
            return max(float(torch.stack(list(layer_bounds(m, max_cost=0.0).values())).min())
                       for m in self.layers.values()) / C


def measure(name: str, rounds: int, steps: dict[str, int]) -> dict[str, object]:
    build, shape = NETWORKS[name]
    torch.manual_seed(0)
    net = build()
    runs = {v: Run(copy.deepcopy(net), v) for v in VARIANTS}
    gen = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {v: [] for v in VARIANTS}
    order = list(VARIANTS)
    for r in range(rounds):
        for v in order[r % 3:] + order[: r % 3]:
            for i in range(steps[v] + 1):
                x = torch.randn(32, *shape, generator=gen)
                y = torch.randint(0, 10, (32,), generator=gen)
                t = runs[v].step(x, y)
                if i:  # the first step of each visit warms the caches
                    times[v].append(t)
    medians = {v: statistics.median(t) for v, t in times.items()}
    params = sum(p.numel() for p in net.parameters())
    return {"name": name, "params": params, "layers": len(runs["none"].layers),
            "medians": medians, "counts": {v: len(t) for v, t in times.items()},
            "worst": runs["automatic"].worst_tight_ratio()}


def table(results: list[dict[str, object]]) -> str:
    cpu = cpu_name()
    lines = [
        "# Per-step cost of the constraint (cpu)", "",
        f"Machine: {cpu}, {torch.get_num_threads()} torch thread, torch {torch.__version__}, "
        f"Python {platform.python_version()} (shared 2-core VM).",
        "SGD, random data, batch 32, `SpectralBoundRegularizer(constraint=1.0)`'s post-step "
        "projection; median step (forward, backward, optimizer step, projection), variants "
        "interleaved round by round (`python benchmarks/constraint_cost.py`).", "",
        "| network | parameters | layers | none (ms) | automatic (ms) | automatic / none "
        "| tight every step (ms) | tight / none | steps timed | tight bound / c after |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        m, n = r["medians"], r["counts"]
        base = m["none"]
        lines.append(
            f"| {r['name']} | {r['params'] / 1e6:.2f}M | {r['layers']} | {1e3 * base:.0f} | "
            f"{1e3 * m['automatic']:.0f} | {m['automatic'] / base:.3f} | "
            f"{1e3 * m['tight every step']:.0f} | {m['tight every step'] / base:.1f} | "
            f"{n['none']}/{n['automatic']}/{n['tight every step']} | {r['worst']:.3f} |")
    lines += ["", "`tight bound / c after`: the largest ratio, over layers, of the tight bound "
              "to the constraint after the automatic variant's timed steps (1: a layer sits at "
              "the constraint; below 1: the anchored bound kept it lower than needed)."]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path,
                        default=Path(__file__).parent / "results" / "constraint_cost_cpu.md")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [
        measure(name, args.rounds, {"none": 8, "automatic": 8, "tight every step": tight})
        for name, tight in zip(NETWORKS, (1, 3), strict=True)
    ]
    text = table(results)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
