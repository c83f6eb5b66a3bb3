"""``python -m lightning_spectral.demo``: the spectral-bound regularizer in under a minute on CPU.

Trains the same small CNN (same initial weights, same data order) on scikit-learn's handwritten
digits three times: with ``SpectralBoundRegularizer(beta=0)`` (it only monitors), with the
paper's penalty ``beta * sum of layer bounds`` (Singla & Feizi, ICLR 2021), and with certified
training at radius ``--eps`` (``certified_eps``, GloRo's objective). Prints the guaranteed
per-layer bounds (``layer_spectral_bound``) at the start and the end of each run, the
guaranteed Lipschitz bound of the whole network, test accuracy and certified test accuracy at
``--eps`` (guaranteed bounds, all classes). The penalized run is logged
with a ``CSVLogger`` (estimates, guaranteed bounds, exact norms and certified accuracy per
epoch) and turned into figures and a one-page summary by :mod:`lightning_spectral.report`.
"""

from __future__ import annotations

import argparse
import copy
import logging
import time
import warnings
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger

from ..callback import SpectralBoundRegularizer
from ..functional.bounds import layer_spectral_bound
from ..network import network_lipschitz_bound
from .classifier import ImageClassifier
from .data_digits import DigitsDataModule
from .models_digits import SmallCNN


def _bounds(model: torch.nn.Module, names: list[str]) -> dict[str, float]:
    modules = dict(model.named_modules())
    with torch.no_grad():
        return {n: float(layer_spectral_bound(modules[n])) for n in names}


def _train(
    net: torch.nn.Module,
    data: DigitsDataModule,
    beta: float,
    epochs: int,
    seed: int,
    log_dir: Path | None = None,
    certified_eps: float | None = None,
    eps: float = 0.5,
) -> tuple[ImageClassifier, SpectralBoundRegularizer, float, float]:
    """One run; with ``log_dir`` it is validated and certified every epoch and logged to CSV.
    Returns the module, the callback, test accuracy and certified test accuracy at ``eps``."""
    pl.seed_everything(seed, verbose=False)
    # Certified training pulls the whole network's bound down every step: SGD at the plain
    # runs' rate diverges there, Adam at a small rate does not.
    module = (ImageClassifier(net, lr=0.05, momentum=0.9) if certified_eps is None
              else ImageClassifier(net, lr=3e-3, optimizer="adam"))
    logged = log_dir is not None
    reg = SpectralBoundRegularizer(
        beta=beta,
        exact_every_n_epochs=1 if logged else None,
        certify_epsilons=sorted({0.1, 0.25, 0.5, eps}),
        certified_eps=certified_eps,
        certified_warmup_steps=0 if certified_eps is None else 100,
        log_per_layer=logged,
    )
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=epochs,
        callbacks=[reg],
        logger=CSVLogger(str(log_dir), name="", version="") if logged else False,
        log_every_n_steps=5,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=None if logged else 0,
    )
    trainer.fit(module, data)
    (result,) = trainer.test(module, data, verbose=False)
    return module, reg, result["test/acc"], result[f"test/certified/acc@{eps:g}"]


def _quiet() -> None:
    """One thread and no progress chatter: the demo prints one table."""
    # A model this small gains nothing from intra-op threads, and loses a lot to their
    # wake-up latency when the machine is shared.
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore", ".*does not have many workers.*")
    warnings.filterwarnings("ignore", ".*LeafSpec.*")
    for name in ("lightning.pytorch", "lightning.fabric"):
        logging.getLogger(name).setLevel(logging.WARNING)


# per-layer bounds, network bound, test accuracy, certified test accuracy
Run = tuple[dict[str, float], float, float, float]


def _print_table(epochs: int, beta: float, eps: float, runs: list[Run]) -> None:
    print(
        f"\nSmallCNN on scikit-learn digits, {epochs} epochs, SGD lr 0.05 (certified run: Adam "
        "lr 3e-3); "
        "guaranteed spectral-norm bounds per layer (layer_spectral_bound):\n"
    )
    titles = ["start", "end, beta=0", f"end, beta={beta:g}", f"end, certified_eps={eps:g}"]
    widths = [max(8, len(t)) for t in titles]
    header = f"| {'layer':<14} | " + " | ".join(
        f"{t:>{w}}" for t, w in zip(titles, widths, strict=True)) + " |"
    print(header)
    print("|" + "|".join("-" * len(c) for c in header.split("|")[1:-1]) + "|")

    def row(label: str, cells: list[str]) -> None:
        print(f"| {label:<14} | " + " | ".join(
            f"{c:>{w}}" for c, w in zip(cells, widths, strict=True)) + " |")

    start = runs[0]
    for name in start[0]:
        row(name, [f"{run[0][name]:.3f}" for run in runs])
    row("network L", [f"{run[1]:.2f}" for run in runs])
    row("test acc", [""] + [f"{run[2]:.3f}" for run in runs[1:]])
    row(f"certified@{eps:g}", [""] + [f"{run[3]:.3f}" for run in runs[1:]])
    print("\n'network L': guaranteed l2 Lipschitz bound of the whole network (eval mode).")
    print(f"'certified@{eps:g}': share of test images classified correctly and provably at an "
          f"l2 distance\n  >= {eps:g} (pixels in [0, 1]) from any other class, from guaranteed "
          "bounds.")
    print("Next: train for a certificate on your own model with "
          "SpectralBoundRegularizer(certified_eps=...),\n  or on MNIST: "
          "python examples/certified_mnist.py --data-dir <dir with MNIST/raw>.")


def _report(log_dir: Path) -> None:
    """Figures and summary of the logged run, or how to make them without matplotlib."""
    command = f"python -m lightning_spectral.report {log_dir}"
    try:
        from ..report import make_report

        written = make_report(log_dir)
    except ImportError as exc:
        print(f"\nLogs of the penalized run: {log_dir}/metrics.csv ({exc}; then: {command}).")
        return
    print(f"\nLogs of the penalized run: {log_dir}/metrics.csv. Report ({command}):")
    for path in written:
        print(f"  {path}")
    print("Look at report.md first: guaranteed bounds per layer next to the training-time")
    print("estimates and exact norms, and certified accuracy at each radius (pixel units).")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--beta", type=float, default=0.01, help="penalty weight of run 2")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--eps", type=float, default=0.3,
                        help="radius of run 3's certified training and of the certificates")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--log-dir", type=Path, default=Path("lightning_logs/demo"),
        help="CSV logs and report of the penalized run (default: lightning_logs/demo)",
    )
    args = parser.parse_args(argv)
    _quiet()
    start = time.perf_counter()
    # Built first: without scikit-learn it raises here, before any training. Both runs share
    # it; its training loader reshuffles from ``seed`` on every call, so they see the same batches.
    data = DigitsDataModule(batch_size=64, seed=args.seed)
    pl.seed_everything(args.seed, verbose=False)
    init = SmallCNN()
    names = [f"model.{n}" for n, m in init.named_modules() if hasattr(m, "weight")]
    lip = float(network_lipschitz_bound(copy.deepcopy(init).eval(), (1, 8, 8)))
    runs: list[Run] = [(_bounds(ImageClassifier(copy.deepcopy(init)), names), lip,
                        float("nan"), float("nan"))]
    settings = ((0.0, None, None), (args.beta, args.log_dir, None), (0.0, None, args.eps))
    for beta, log_dir, certified in settings:
        module, _, acc, cert = _train(copy.deepcopy(init), data, beta, args.epochs, args.seed,
                                      log_dir, certified_eps=certified, eps=args.eps)
        lip = float(network_lipschitz_bound(copy.deepcopy(module.model).eval(), (1, 8, 8)))
        runs.append((_bounds(module, names), lip, acc, cert))
    _print_table(args.epochs, args.beta, args.eps, runs)
    _report(args.log_dir)
    print(f"Total time {time.perf_counter() - start:.1f} s.")


if __name__ == "__main__":
    main()
