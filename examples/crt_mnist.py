"""Curvature-regularized training (CRT) on MNIST, with first- and second-order certificates.

Trains a CRT network (``--arch mlp2|mlp3|mlp4|cnn``, softplus activations) with
``CE + gamma * K_est`` (``K_est``: per-step power-iteration estimate of the curvature bound;
Adam, lr 1e-3, batch 64, pixels in [0, 1] with no normalization), then certifies the test set
(or its first ``--test-samples`` images) at each ``--eps`` (l2, pixel units) with:

* first order: ``margin / (sqrt 2 L)`` with ``L = network_lipschitz_bound(model)``, and the
  refined ``min_t (z_y - z_t) / (||W_y - W_t|| L_features)`` (linear head);
* second order: ``curvature_certified_radius`` with a guaranteed curvature bound ``C`` of the
  logit map (``K_yt = sqrt 2 C``) and with the pairwise bounds (the smaller of that and the
  linear-head ``||W_y - W_t|| C_features``); optionally ``crc_certified_radius`` (pairwise) on
  the first ``--crc-samples`` images.

With ``--attack curvature --rho R`` the network trains on the points of the curvature-based
attack at l2 radius ``R`` (``curvature_attack``, runner-up class) instead of the clean images:
CRT proper.

Every certificate is taken over ALL classes ``t != y``. The guaranteed bounds come from the
graph walk: ``network_lipschitz_bound``, ``network_curvature_bound`` and
``network_pairwise_curvature``.

    python examples/crt_mnist.py --data-dir /tmp/mnist --arch mlp2 --gamma 0.01 --epochs 3

``--data-dir`` holds ``MNIST/raw/*-ubyte`` (torchvision's layout); nothing is downloaded.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import CSVLogger
from torch import Tensor, nn

from lightning_spectral import (
    network_curvature_bound,
    network_lipschitz_bound,
    network_pairwise_curvature,
)
from lightning_spectral.demos import MNISTDataModule
from lightning_spectral.demos.crt import (
    ARCHITECTURES,
    CurvatureRegularizedClassifier,
    crt_network,
)
from lightning_spectral.functional import (
    certified_radius,
    crc_certified_radius,
    curvature_certified_radius,
)

INPUT_SHAPE = (1, 28, 28)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", required=True, help="folder holding MNIST/raw/*-ubyte")
    p.add_argument("--arch", choices=ARCHITECTURES, default="mlp2")
    p.add_argument("--gamma", type=float, default=0.01, help="curvature penalty weight")
    p.add_argument("--attack", choices=("none", "curvature"), default="none",
                   help="train on clean images or on curvature-attack points")
    p.add_argument("--rho", type=float, default=1.58, help="l2 radius of the attack")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eps", type=float, nargs="+", default=[0.5, 1.58], help="l2 radii")
    p.add_argument("--test-samples", type=int, default=10000,
                   help="certify the first N test images (10000: all)")
    p.add_argument("--crc-samples", type=int, default=0,
                   help="also run the (slower) CRC certificate on the first N test images")
    p.add_argument("--limit-train-batches", type=float, default=1.0,
                   help="fraction (<= 1.0) or number (> 1) of training batches per epoch")
    p.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="crt_runs", help="logs, weights and results.json")
    p.add_argument("--load", default=None, help="state dict to start from (with --epochs 0: "
                   "certify a trained network)")
    args = p.parse_args(argv)
    _check_args(args)
    return args


def _check_args(args: argparse.Namespace) -> None:
    """Bad values stop the run before any data is read or any step is trained."""
    if not (math.isfinite(args.gamma) and args.gamma >= 0):
        raise SystemExit(f"--gamma must be finite and >= 0, got {args.gamma}")
    if not (math.isfinite(args.rho) and args.rho >= 0):
        raise SystemExit(f"--rho must be finite and >= 0, got {args.rho}")
    if args.epochs < 0 or args.batch_size < 1 or args.threads < 1:
        raise SystemExit("--epochs must be >= 0, --batch-size and --threads >= 1")
    if args.test_samples < 1 or args.crc_samples < 0:
        raise SystemExit("--test-samples must be >= 1 and --crc-samples >= 0")
    if any(not (math.isfinite(e) and e > 0) for e in args.eps):
        raise SystemExit(f"--eps values must be finite and > 0, got {args.eps}")
    raw = Path(args.data_dir) / "MNIST" / "raw"
    needed = [f"{s}-{k}-idx{d}-ubyte" for s in ("train", "t10k")
              for k, d in (("images", 3), ("labels", 1))]
    missing = [n for n in needed if not (raw / n).is_file()]
    if missing:
        raise SystemExit(f"{raw} lacks {missing}: unpack the MNIST files there "
                         "(gunzip -c f.gz > MNIST/raw/f)")


def train(args: argparse.Namespace, module: CurvatureRegularizedClassifier,
          datamodule: MNISTDataModule) -> float:
    """Fit for ``args.epochs`` epochs on the full training set; returns the seconds taken."""
    if args.epochs == 0:
        return 0.0
    limit = args.limit_train_batches
    trainer = pl.Trainer(
        max_epochs=args.epochs, accelerator="cpu", devices=1,
        logger=CSVLogger(args.out_dir, name=f"{args.arch}_gamma{args.gamma:g}{_suffix(args)}"),
        limit_train_batches=int(limit) if limit > 1 else limit, limit_val_batches=0,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
        log_every_n_steps=50,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    return time.perf_counter() - start


def _suffix(args: argparse.Namespace) -> str:
    """``""`` for clean training (the historical file names), ``_crt<rho>`` with the attack."""
    return f"_crt{args.rho:g}" if args.attack == "curvature" else ""


def test_tensors(datamodule: MNISTDataModule, n: int) -> tuple[Tensor, Tensor]:
    """The first ``n`` images of the official test set, in file order."""
    datamodule.setup("test")
    xs, ys, count = [], [], 0
    for x, y in datamodule.test_dataloader():
        xs.append(x)
        ys.append(y)
        count += len(y)
        if count >= n:
            break
    return torch.cat(xs)[:n], torch.cat(ys)[:n]


def guaranteed_curvature(model: nn.Sequential) -> tuple[Tensor, Tensor]:
    """Guaranteed Jacobian-Lipschitz bound ``C`` of the logit map (the graph walk), and the
    pairwise margin bounds ``K_yt``: the smaller of ``sqrt 2 C`` and the linear-head
    ``||W_y - W_t|| C_features``."""
    return (network_curvature_bound(model, INPUT_SHAPE),
            network_pairwise_curvature(model, INPUT_SHAPE))


def first_order_radii(model: nn.Sequential, x: Tensor, y: Tensor) -> dict[str, Tensor]:
    """Lipschitz-margin radii: global (``sqrt 2 L``) and refined with the linear head."""
    lip = network_lipschitz_bound(model, INPUT_SHAPE)
    lip_features = network_lipschitz_bound(model[:-1], INPUT_SHAPE)
    net64 = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        logits = net64(x.double())
    head = net64[-1].weight
    return {
        "lipschitz": certified_radius(logits, y, lip),
        "lipschitz_refined": certified_radius(logits, y, None, last_layer_weight=head,
                                              feature_lipschitz=lip_features),
    }


def _batched(fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor,
             size: int = 500) -> Tensor:
    # Per-sample Jacobians in float64 take N * classes * 784 * 8 bytes: go by batches.
    return torch.cat([fn(x[i:i + size], y[i:i + size]) for i in range(0, len(y), size)])


def second_order_radii(model: nn.Sequential, x: Tensor, y: Tensor, crc_samples: int
                       ) -> tuple[dict[str, Tensor], dict[str, float]]:
    """Curvature radii with the global and the pairwise (linear head) bounds, CRC optional."""
    c_logits, pairwise = guaranteed_curvature(model)
    radii = {
        "curvature": _batched(
            lambda a, b: curvature_certified_radius(model, a, b, c_logits), x, y),
        "curvature_pairwise": _batched(
            lambda a, b: curvature_certified_radius(model, a, b, pairwise), x, y),
    }
    if crc_samples:
        radii["crc_pairwise"] = crc_certified_radius(
            model, x[:crc_samples], y[:crc_samples], pairwise, outer_steps=12, inner_steps=15)
    info = {"curvature_bound": float(c_logits)}
    return radii, info


def certify(model: nn.Sequential, x: Tensor, y: Tensor, eps: Sequence[float],
            crc_samples: int = 0) -> dict:
    """Clean accuracy and certified accuracy of every certificate at every ``eps``."""
    model.eval()
    start = time.perf_counter()
    with torch.no_grad():
        correct = model(x).argmax(1) == y
    radii = first_order_radii(model, x, y)
    second, info = second_order_radii(model, x, y, crc_samples)
    radii.update(second)
    table = {}
    for name, r in radii.items():
        ok = correct[: len(r)].cpu()
        table[name] = {
            "samples": len(r),
            **{f"certified@{e:g}": float(((r >= e) & ok).double().mean()) for e in eps},
            "median_radius": float(torch.where(ok, r.clamp(min=0), 0.0).median()),
        }
    return {"clean_accuracy": float(correct.double().mean()), "certified": table,
            "lipschitz_bound": float(network_lipschitz_bound(model, INPUT_SHAPE)),
            **info, "certify_seconds": time.perf_counter() - start}


def _report(results: dict, eps: Sequence[float]) -> str:
    attack = f" attack rho={results['rho']:g}" if results["attack"] == "curvature" else ""
    lines = [f"{results['arch']} gamma={results['gamma']:g}{attack} epochs={results['epochs']}: "
             f"clean {100 * results['clean_accuracy']:.2f}% on {results['test_samples']} test "
             f"images, L <= {results['lipschitz_bound']:.4g}, C <= "
             f"{results['curvature_bound']:.4g}, "
             f"train {results['train_seconds']:.0f} s, certify {results['certify_seconds']:.0f} s"]
    for name, row in results["certified"].items():
        cells = "  ".join(f"eps {e:g}: {100 * row[f'certified@{e:g}']:6.2f}%" for e in eps)
        lines.append(f"  {name:<20} ({row['samples']:>5} images)  {cells}  "
                     f"median radius {row['median_radius']:.3f}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    pl.seed_everything(args.seed, workers=True, verbose=False)
    datamodule = MNISTDataModule(args.data_dir, batch_size=args.batch_size, val_size=0,
                                 seed=args.seed, normalize=False)
    model = crt_network(args.arch)
    if args.load:
        model.load_state_dict(torch.load(args.load, map_location="cpu"))
    attack = None if args.attack == "none" else args.attack
    module = CurvatureRegularizedClassifier(model, gamma=args.gamma, lr=args.lr, attack=attack,
                                            rho=args.rho)
    train_seconds = train(args, module, datamodule)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{args.arch}_gamma{args.gamma:g}{_suffix(args)}_epochs{args.epochs}"
    torch.save(model.state_dict(), out / f"{stem}.pt")
    x, y = test_tensors(datamodule, args.test_samples)
    results = certify(model, x, y, args.eps, args.crc_samples)
    results.update(arch=args.arch, gamma=args.gamma, epochs=args.epochs, attack=args.attack,
                   rho=args.rho if args.attack == "curvature" else None,
                   train_seconds=train_seconds, test_samples=len(y), torch=torch.__version__,
                   threads=args.threads)
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2))
    print(_report(results, args.eps), flush=True)
    return results


if __name__ == "__main__":
    main()
