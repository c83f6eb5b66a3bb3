"""The compositional (ECLipsE-Fast) chain bound against the product bound, on MNIST.

Trains an MLP 784-256-256-10 and the ``MnistCNN`` of ``lightning_spectral.demos`` briefly on
MNIST (one thread), then reports for each: the graph walk's bound
(``network_lipschitz_bound``, the product of layer bounds on a chain), the certified chain
bound (``sequential_chain_bound``; also with ``fast_start=False``, step by step), the plain
ECLipsE-Fast recursion of the paper on the dense unrolled matrices (no certificate; from
``tests/helpers/oracles.py``), and an autograd lower bound (the largest Jacobian spectral norm over
test images), with the times.

    python benchmarks/compositional_bound.py [--epochs 1] [--data /work/data]

writes ``benchmarks/results/compositional_bound_cpu.md``.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ROOT = Path(__file__).resolve().parents[1]
for path in (ROOT, ROOT / "tests"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from oracles import eclipse_fast_reference, operator_matrix  # noqa: E402

from benchmarks.machine_info import cpu_name  # noqa: E402
from lightning_spectral import network_lipschitz_bound  # noqa: E402
from lightning_spectral.demos import MNISTDataModule  # noqa: E402
from lightning_spectral.demos.models_digits import MnistCNN  # noqa: E402
from lightning_spectral.network import sequential_chain_bound  # noqa: E402

SHAPE = (1, 28, 28)


def machine() -> str:
    return f"{cpu_name()}, {torch.get_num_threads()} torch thread(s), torch {torch.__version__}"


def mlp() -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256),
                         nn.ReLU(), nn.Linear(256, 10))


def train(model: nn.Module, data: MNISTDataModule, epochs: int) -> float:
    """Adam, cross-entropy; returns the test accuracy."""
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for x, y in data.train_dataloader():
            opt.zero_grad()
            F.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    right = total = 0
    with torch.no_grad():
        for x, y in data.test_dataloader():
            right += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return right / total


def jacobian_lower_bound(model: nn.Module, images: Tensor) -> float:
    """``max ||J_f(x)||_2`` over the images: each is at most the Lipschitz constant."""
    net = model.double().eval()
    best = 0.0
    for x in images.double():
        jac = torch.autograd.functional.jacobian(lambda v: net(v[None])[0], x)
        best = max(best, float(torch.linalg.matrix_norm(jac.reshape(10, -1), 2)))
    model.float()
    return best


def dense_matrices(model: nn.Module) -> list[Tensor]:
    """The linear layers' exact matrices (convolutions unrolled by the test oracle)."""
    mats, side = [], 28
    for layer in model:
        if isinstance(layer, nn.Conv2d):
            mats.append(operator_matrix(layer, (side, side)))
            side = (side + 2 * layer.padding[0] - layer.kernel_size[0]) // layer.stride[0] + 1
        elif isinstance(layer, nn.Linear):
            mats.append(layer.weight.detach().double())
    return mats


def timed(fn):  # noqa: ANN001, ANN201 - any callable
    start = time.perf_counter()
    value = fn()
    return value, time.perf_counter() - start


def warm_up() -> None:
    """One small chain first, so that no timed call pays for loading the linear algebra."""
    small = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.ReLU(), nn.Linear(8, 2))
    sequential_chain_bound(small, SHAPE)
    network_lipschitz_bound(small, SHAPE)


def measure(name: str, model: nn.Module, accuracy: float, images: Tensor) -> dict[str, object]:
    today, t_today = timed(lambda: float(network_lipschitz_bound(model, SHAPE)))
    chain, t_chain = timed(lambda: float(sequential_chain_bound(model, SHAPE)))
    steps, t_steps = timed(lambda: float(sequential_chain_bound(model, SHAPE,
                                                                fast_start=False)))
    ref, t_ref = timed(lambda: eclipse_fast_reference(dense_matrices(model)))
    lower, t_lower = timed(lambda: jacobian_lower_bound(model, images))
    row = {"model": name, "acc": accuracy, "today": today, "t_today": t_today, "chain": chain,
           "t_chain": t_chain, "steps": steps, "t_steps": t_steps, "ref": ref, "t_ref": t_ref,
           "lower": lower, "t_lower": t_lower}
    print(row, flush=True)
    return row


def table(rows: list[dict[str, object]], epochs: int, points: int) -> str:
    lines = [
        "# Compositional (ECLipsE-Fast) chain bound vs the product bound, MNIST",
        "",
        f"Machine: {machine()} (a 2-core VM shared with other jobs: times are indicative).",
        "",
        f"Models trained {epochs} epoch(s) with Adam (lr 1e-3, batch 128). `product`: "
        "`network_lipschitz_bound` (the product of the guaranteed layer bounds); `chain`: "
        "`sequential_chain_bound`, certified in float64 (convolutions unrolled exactly; an "
        "expanding first layer and the next step certified together); `step by step`: the "
        "same with `fast_start=False` (one check per step, as before); "
        "`ECLipsE-Fast`: the paper's recursion on the dense matrices in plain float64, no "
        "certificate; `lower`: the largest autograd Jacobian norm over "
        f"{points} test images (a lower bound on the true constant).",
        "",
        "| model | test acc | product | chain | step by step | ECLipsE-Fast | lower | t product "
        "| t chain | t step by step | t ECLipsE-Fast |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['acc']:.4f} | {r['today']:.4f} | {r['chain']:.4f} | "
            f"{r['steps']:.4f} | {r['ref']:.4f} | {r['lower']:.4f} | {r['t_today']:.2f} s | "
            f"{r['t_chain']:.2f} s | {r['t_steps']:.2f} s | {r['t_ref']:.2f} s |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--data", default="/work/data")
    parser.add_argument("--points", type=int, default=100)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results"
                                            / "compositional_bound_cpu.md"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    warm_up()  # before seeding: the models trained below are the same without it
    torch.manual_seed(0)
    data = MNISTDataModule(data_dir=args.data, batch_size=128, val_size=1000, num_workers=0)
    data.setup()
    images = torch.stack([data.test_set[i][0] for i in range(args.points)])
    rows = []
    for name, model in (("MLP 784-256-256-10", mlp()), ("MnistCNN (width 16, hidden 100)",
                                                         MnistCNN())):
        accuracy = train(model, data, args.epochs)
        rows.append(measure(name, model, accuracy, images))
    Path(args.out).write_text(table(rows, args.epochs, args.points))
    print(Path(args.out).read_text())


if __name__ == "__main__":
    main()
