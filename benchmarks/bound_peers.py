"""``python benchmarks/bound_peers.py [--out FILE] [--quick]``: our tightest bound against
re-implementations of the published guaranteed bounds, on ResNet-18's layers at their input
sizes (random init, zero padding, their strides) and on a small CNN trained on the digits.

Columns (all provable upper bounds but the reference):

* ``FF``: Fantastic Four, Singla & Feizi (ICLR 2021): :func:`fantastic_four`.
* ``Gram-2023``: Gram iteration on the FFT grid of the circular convolution that embeds the
  zero-padded layer (grid ``n + pl + pr``), Delattre, Barthelemy, Araujo & Allauzen (ICML
  2023): 6 iterations per frequency in complex128 as published, re-implemented here with
  ``torch.fft`` (no rounding account, no pruning; a strided layer is bounded by its stride-1
  embedding, as the paper has no strided form).
* ``Gram-kernel-2024``: the Gram iteration on the kernel, Delattre et al. (2024):
  :func:`gram_kernel_bound` with two self-correlation steps.
* ``ours``: :func:`layer_spectral_bound` at the input size (the grid Gram bounds with the
  rounding account, see ``docs/bounds.md``), and its time.
* ``ref``: the exact norm of the explicit operator matrix where it is small (``E``), else
  block power iteration on the operator (``L``: from below, rtol 1e-5 or 50 steps of a
  block of 8, so bound/ref over-states the true ratio slightly).
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root

from benchmarks.boundspeed.config import Config, quick_config  # noqa: E402
from benchmarks.boundspeed.layers import (  # noqa: E402
    representatives,
    resnet18_layers,
    trained_digits_cnn,
)
from benchmarks.boundspeed.report import load, machine  # noqa: E402
from lightning_spectral.functional import conv_spectral_norm, fantastic_four  # noqa: E402
from lightning_spectral.functional.bounds import (  # noqa: E402
    gram_kernel_bound,
    layer_bounds,
)
from lightning_spectral.functional.geometry import Geometry  # noqa: E402

_MATRIX_ENTRIES = 1 << 22


def gram_2023(conv: nn.Conv2d, size: tuple[int, int], n_iter: int = 6) -> float:
    """Gram iteration per frequency of the FFT grid of the zero-padding embedding."""
    grid = Geometry(conv).grid(size)
    w = conv.weight.detach().to(torch.float64)
    dil = conv.dilation
    k = w.shape[2:]
    dense = w.new_zeros(*w.shape[:2], *(d * (x - 1) + 1 for d, x in zip(dil, k, strict=True)))
    dense[:, :, :: dil[0], :: dil[1]] = w
    g = conv.groups
    co = w.shape[0] // g
    worst = 0.0
    for gi in range(g):
        sym = torch.fft.rfft2(dense[gi * co : (gi + 1) * co], s=grid)  # (co, ci, f1, f2)
        h = sym.permute(2, 3, 0, 1).reshape(-1, *sym.shape[:2])
        if h.shape[-1] > h.shape[-2]:
            h = h.mH
        log_bound = torch.zeros(h.shape[0], dtype=torch.float64)
        for _ in range(n_iter):
            f = torch.linalg.matrix_norm(h, "fro")
            h = h / f[:, None, None]
            log_bound = 2 * (log_bound + f.log())
            h = h.mH @ h
        log_bound = log_bound + torch.linalg.matrix_norm(h, "fro").log()
        worst = max(worst, float(torch.exp(log_bound / 2**n_iter).max()))
    return worst


def reference(conv: nn.Conv2d, size: tuple[int, int]) -> tuple[float, str]:
    n_in = conv.in_channels * math.prod(size)
    out = conv(torch.zeros(1, conv.in_channels, *size)).numel()
    if n_in * out <= _MATRIX_ENTRIES:
        return float(conv_spectral_norm(conv, size, method="matrix")), "E"
    value = conv_spectral_norm(conv, size, method="power", tol=1e-5, max_iter=50, seed=0)
    return float(value), "L"


def _timed(fn):
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def measure(name: str, conv: nn.Conv2d, size: tuple[int, int], count: int) -> dict:
    conv = conv.cpu().eval()
    with torch.no_grad():
        t_ours, bounds = _timed(lambda: layer_bounds(conv, size))
        winner = min(bounds, key=lambda key: float(bounds[key]))
        row = {
            "name": name, "count": count, "shape": "x".join(map(str, conv.weight.shape)),
            "stride": conv.stride[0], "n": size[0],
            "FF": float(fantastic_four(conv.weight, groups=conv.groups)),
            "Gram-2023": gram_2023(conv, size),
            "Gram-kernel-2024": float(gram_kernel_bound(conv.weight, groups=conv.groups)),
            "ours": float(bounds[winner]), "by": winner, "t_ours": t_ours,
        }
        row["ref"], row["ref_kind"] = reference(conv, size)
    return row


PEERS = ["FF", "Gram-2023", "Gram-kernel-2024", "ours"]


def table(rows: list[dict], title: str) -> list[str]:
    head = ["layer", "shape", "s", "n", "ref", *PEERS, "ours by", "ours time",
            *(f"{p}/ref" for p in PEERS)]
    lines = [f"### {title}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        label = r["name"] + (f" (+{r['count'] - 1})" if r["count"] > 1 else "")
        cells = [label, r["shape"], str(r["stride"]), str(r["n"]),
                 f"{r['ref']:.4f} {r['ref_kind']}", *(f"{r[p]:.4f}" for p in PEERS),
                 r["by"], f"{r['t_ours']:.2f} s", *(f"{r[p] / r['ref']:.3f}" for p in PEERS)]
        lines.append("| " + " | ".join(cells) + " |")
    weights = [r["count"] for r in rows]
    lines.append("")
    for p in PEERS:
        logs = [math.log(r[p] / r["ref"]) for r in rows]
        geo = math.exp(sum(w * x for w, x in zip(weights, logs, strict=True)) / sum(weights))
        lines.append(f"- {p}/ref: geo-mean {geo:.4f} over {sum(weights)} layers")
    times = [r["t_ours"] for r in rows]
    total = sum(w * t for w, t in zip(weights, times, strict=True))
    lines.append(f"- ours: total {total:.1f} s over {sum(weights)} layers (each distinct layer "
                 f"timed once; median {statistics.median(times):.2f} s, max {max(times):.2f} s)")
    return lines + [""]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="benchmarks/results/bound_peers_cpu.md")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cfg = Config(quick=False, threads=1, device=torch.device("cpu"))
    if args.quick:
        cfg = quick_config(cfg)
    head = [
        "# Guaranteed spectral-norm bounds against their published peers", "",
        f"Machine: {machine()}; torch.set_num_threads(1); {load()} at start.", "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/bound_peers.py"
        f"{' --quick' if args.quick else ''}`. Definitions: the module docstring of "
        "`benchmarks/bound_peers.py`. ref: `E` exact (explicit matrix), `L` operator power "
        "iteration (from below). `(+k)`: stands for k more layers of equal shape, stride and "
        "input size (random init); geo-means and the total count it k+1 times.", "",
    ]
    out = list(head)
    key = lambda la: (tuple(la.module.weight.shape), la.module.stride, la.input_size)  # noqa: E731
    resnet = representatives(resnet18_layers(cfg), key)
    rows = []
    for layer in resnet:
        rows.append(measure(layer.name, layer.module, layer.input_size, layer.count))
        print(rows[-1], flush=True)
    out += table(rows, f"ResNet-18 (random init) at its input sizes for a {cfg.image_size}^2 "
                       "image")
    digits, acc = trained_digits_cnn(cfg)
    rows = []
    for layer in digits:
        rows.append(measure(layer.name, layer.module, layer.input_size, 1))
        print(rows[-1], flush=True)
    out += table(rows, f"SmallCNN trained on the digits (test accuracy {acc:.3f})")
    Path(args.out).write_text("\n".join(out))


if __name__ == "__main__":
    main()
