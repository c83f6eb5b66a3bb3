"""Speed and tightness of spectral-norm bounds on real convolution layers.

Layers: every convolution of torchvision's ResNet-18 (random init, seeded) and the three
convolutions of :class:`lightning_spectral.demos.SmallCNN` trained here on scikit-learn's digits.
For each layer and method: the value and the median wall time over several repeats
(``time.perf_counter``, one process, a fixed number of threads).

Methods (``P`` = provable upper bound, ``E`` = exact, ``L`` = estimate from below):

* ``FF-PI(n)`` (L): the Fantastic Four bound estimated with ``n`` power iterations from random
  vectors (``fantastic_four_estimate``), the paper's training-time estimate.
* ``FF`` (P): the Fantastic Four bound with exact matrix norms (``fantastic_four``).
* ``Gram-FF`` (P): the same bound with each matrix norm replaced by its Gram-iteration upper
  bound (``gram_iteration_bound``, 6 steps).
* ``tightest`` (P): ``layer_spectral_bound``, the minimum of every provable bound of the library.
* ``FFT`` (E): Sedghi et al.'s exact norm of the *circular, stride-1* convolution with the same
  filter, at the table's input size. This is the stand-in the paper's notebook used for every
  layer (Singla & Feizi, ICLR 2021); for strided or zero-padded layers it is the norm of a
  different operator.
* ``op-PI`` (L): power iteration on the real layer (zero padding, its stride) through the
  convolution and its adjoint (``conv_spectral_norm(..., method="power")``).
* ``matrix`` (E): the norm of the layer's explicit operator matrix (tiny layers only).

Three tables:

1. *Paper table sizes*: every ResNet-18 convolution as the circular stride-1 operator at input
   size n = 224/112/56/28 for 64/128/256/512 output channels, as in the paper. The provable
   bounds are computed WITHOUT the input size (valid for every size). The FFT norm is computed
   on the n/4 grid (a subset of the n grid's frequencies, so a lower bound of the exact norm
   at n, and the exact norm at the layer's real size) and its time is EXTRAPOLATED to the n
   grid by the ratio of frequency counts (one small SVD per frequency); the output says so
   and checks the extrapolation on one layer against a measured n/2 run. Running the FFT at
   224 in full would take about 15 minutes on 2 cores by that extrapolation.
2. *Real input sizes*: every ResNet-18 convolution as it is (zero padding, stride) at the input
   size it sees for a 224x224 image. ``tightest`` may use that size. The real operator's norm is
   bracketed by ``op-PI`` (below) and every provable bound (above).
3. *Trained digits CNN*: the same, with the explicit operator matrix as the exact reference.

Layers of equal shape, stride and input size (random init: the same distribution) are
measured once and counted once per layer they stand for, marked ``(+k)`` in the tables.

Plus one batched power-iteration step over all ResNet-18 convolutions (grouped by equal shape,
stacked), timed against one read of all their weights: its cost in passes over memory.

Run ``python benchmarks/bound_speed.py`` (about five minutes on a 2-core CPU; the package must
be importable: ``pip install -e .`` or ``PYTHONPATH=.``) or ``--quick`` (reduced sizes, some
seconds; run by ``tests/test_benchmarks.py``). Results go to ``benchmarks/results/``. The default
of one thread is deliberate: on a shared, oversubscribed machine LAPACK with two threads ran
5-100x slower than with one.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from torch import Tensor, nn

from lightning_spectral.functional import (
    conv_spectral_norm,
    fantastic_four,
    fantastic_four_estimate,
    gram_iteration_bound,
    grouped_weight,
    init_singular_vectors,
    layer_bounds,
    matricize,
    power_iteration_,
    row_subsets,
)

# Methods in table order, with their kind (see the module docstring).
METHODS: dict[str, str] = {
    "FF-PI(1)": "L",
    "FF-PI(50)": "L",
    "FF": "P",
    "Gram-FF": "P",
    "tightest": "P",
    "FFT": "E",
    "op-PI": "L",
    "matrix": "E",
}
PROVABLE = [m for m, kind in METHODS.items() if kind == "P"]
FILTER_METHODS = ("FF-PI(1)", "FF-PI(50)", "FF", "Gram-FF")  # depend on the filter alone
PAPER_SIZES = {64: 224, 128: 112, 256: 56, 512: 28}  # the paper's input size by output channels


@dataclass
class Layer:
    name: str
    module: nn.Conv2d
    input_size: tuple[int, int]
    # Names of the layers of equal shape, stride and input size this one stands for (itself first).
    represents: list[str] = field(default_factory=list)
    values: dict[str, float] = field(default_factory=dict)
    times: dict[str, float] = field(default_factory=dict)
    repeats: dict[str, int] = field(default_factory=dict)
    winner: str = ""
    # True when the bounds were computed on the circular stride-1 stand-in, whose exact norm is FFT.
    bounds_on_standin: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def shape(self) -> str:
        return "x".join(str(s) for s in self.module.weight.shape)

    @property
    def count(self) -> int:
        return max(1, len(self.represents))


@dataclass
class Config:
    quick: bool
    threads: int
    device: torch.device
    seed: int = 0
    # Repeat a measurement until this many seconds are spent (at least once, at most max_repeats).
    time_budget: float = 1.0
    max_repeats: int = 7
    op_pi_tol: float = 1e-4
    op_pi_max_iter: int = 50
    digits_epochs: int = 15
    image_size: int = 224
    paper_sizes: dict[int, int] = field(default_factory=lambda: dict(PAPER_SIZES))
    # The FFT at the paper sizes runs on the n/fft_subsample grid (see table 1's caption).
    fft_subsample: int = 4
    # Layer whose FFT is also run on the n/2 grid to check the time extrapolation.
    fft_check_layer: str | None = "layer2.0.conv2"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _as_float(out: Tensor | dict[str, Tensor]) -> float:
    if isinstance(out, dict):
        return min(float(v) for v in out.values())
    return float(out)


def measure(
    fn: Callable[[], Tensor | dict[str, Tensor]],
    cfg: Config,
    prepare: Callable[[], None] | None = None,
) -> tuple[float, float, int, object]:
    """``(value, median seconds, repeats, last output)`` of ``fn()``.

    The first call is a warm-up, discarded unless it alone exceeds the time budget (then it is
    the only measurement); further calls run until the budget or ``max_repeats`` is reached.
    ``prepare`` runs untimed before every call.
    """
    times: list[float] = []
    spent = 0.0
    warm = False
    while True:
        if prepare is not None:
            prepare()
        _sync(cfg.device)
        start = time.perf_counter()
        out = fn()
        _sync(cfg.device)
        elapsed = time.perf_counter() - start
        spent += elapsed
        times.append(elapsed)
        if not warm and elapsed < cfg.time_budget and cfg.max_repeats > 1:
            warm = True
            times.clear()  # the warm-up call
            spent = 0.0
            continue
        warm = True
        if len(times) >= cfg.max_repeats or spent >= cfg.time_budget:
            return _as_float(out), statistics.median(times), len(times), out


def circular_standin(conv: nn.Conv2d) -> nn.Conv2d:
    """The circular, stride-1, undilated convolution with ``conv``'s filter ("same" size output).

    The paper's notebook computed every layer's "exact" norm with the FFT method, which is exact
    for this operator only.
    """
    k = conv.kernel_size
    standin = nn.Conv2d(
        conv.in_channels,
        conv.out_channels,
        k,
        padding=(k[0] // 2, k[1] // 2),
        padding_mode="circular",
        groups=conv.groups,
        bias=False,
    ).to(conv.weight.device)
    with torch.no_grad():
        standin.weight.copy_(conv.weight)
    return standin


def gram_ff(conv: nn.Conv2d) -> Tensor:
    """``sqrt(prod k) * max_g min_A gram_iteration_bound(M_A)``: FF with Gram-iteration norms."""
    w = grouped_weight(conv.weight.detach(), conv.groups)
    per_subset = torch.stack(
        [gram_iteration_bound(matricize(w, a, batch_dims=1)) for a in row_subsets(2)]
    )  # (2^d, g)
    return math.sqrt(math.prod(conv.kernel_size)) * per_subset.min(0).values.max()


def measure_ff_power(conv: nn.Conv2d, n_iter: int, cfg: Config) -> tuple:
    """FF-PI from fresh random vectors on every call; drawing them is not timed."""
    w = grouped_weight(conv.weight.detach(), conv.groups).unsqueeze(0)
    state: dict[str, tuple[list[Tensor], list[Tensor]]] = {}

    def prepare() -> None:
        us, vs = init_singular_vectors(w.shape[1:], seed=cfg.seed, device=w.device, dtype=w.dtype)
        state["uv"] = ([u.unsqueeze(0) for u in us], [v.unsqueeze(0) for v in vs])

    def run() -> Tensor:
        us, vs = state.pop("uv")
        with torch.no_grad():
            return fantastic_four_estimate(w, us, vs, n_iter=n_iter)[0]

    return measure(run, cfg, prepare)


def _put(layer: Layer, name: str, result: tuple) -> None:
    layer.values[name], layer.times[name], layer.repeats[name] = result[:3]


def filter_methods(layer: Layer, cfg: Config, cache: dict[str, dict[str, tuple]]) -> None:
    """The methods that depend on the filter alone; computed once per layer, shared by tables."""
    if layer.name not in cache:
        conv = layer.module
        w = conv.weight.detach()
        cache[layer.name] = {
            "FF-PI(1)": measure_ff_power(conv, 1, cfg),
            "FF-PI(50)": measure_ff_power(conv, 50, cfg),
            "FF": measure(lambda: fantastic_four(w, groups=conv.groups), cfg),
            "Gram-FF": measure(lambda: gram_ff(conv), cfg),
        }
    for name, result in cache[layer.name].items():
        _put(layer, name, result)


def tightest(layer: Layer, conv: nn.Conv2d, size: tuple[int, int] | None, cfg: Config) -> None:
    """``layer_spectral_bound`` = min of ``layer_bounds``, timed as one call; records the winner."""
    with torch.no_grad():
        result = measure(lambda: layer_bounds(conv, input_size=size), cfg)
    _put(layer, "tightest", result)
    bounds = result[3]
    layer.winner = min(bounds, key=lambda k: float(bounds[k]))


def fft_norm(conv: nn.Conv2d, n: int, cfg: Config) -> tuple:
    return measure(lambda: conv_spectral_norm(circular_standin(conv), (n, n), method="fft"), cfg)


def _rfft_nodes(n: int) -> int:
    """Frequencies the FFT method evaluates on an n x n grid (half of one axis, real filter)."""
    return n * (n // 2 + 1)


def op_power(layer: Layer, cfg: Config) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = measure(
            lambda: conv_spectral_norm(
                layer.module,
                layer.input_size,
                method="power",
                tol=cfg.op_pi_tol,
                max_iter=cfg.op_pi_max_iter,
                seed=cfg.seed,
            ),
            cfg,
        )
    _put(layer, "op-PI", result)
    if any("did not reach" in str(w.message) for w in caught):
        layer.notes.append("op-PI stopped at max_iter")


# --------------------------------------------------------------------------- layers


def _input_sizes(model: nn.Module, x: Tensor) -> dict[str, tuple[int, int]]:
    sizes: dict[str, tuple[int, int]] = {}
    hooks = [
        m.register_forward_hook(
            lambda mod, inp, out, name=name: sizes.__setitem__(name, tuple(inp[0].shape[-2:]))
        )
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return sizes


def resnet18_layers(cfg: Config) -> list[Layer]:
    """Every Conv2d of a seeded random-init ResNet-18 with the input size it sees."""
    from torchvision.models import resnet18

    torch.manual_seed(cfg.seed)
    model = resnet18(weights=None).eval().to(cfg.device)
    size = cfg.image_size
    sizes = _input_sizes(model, torch.zeros(1, 3, size, size, device=cfg.device))
    return [
        Layer(name, m, sizes[name], represents=[name])
        for name, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]


def representatives(layers: list[Layer], key: Callable[[Layer], tuple]) -> list[Layer]:
    """One layer per ``key`` (the first), standing for all layers with that key.

    Random-init layers of equal shape, stride and input size are draws from one distribution;
    the totals count each representative's time once per layer it stands for.
    """
    groups: dict[tuple, list[Layer]] = {}
    for layer in layers:
        groups.setdefault(key(layer), []).append(layer)
    out = []
    for members in groups.values():
        first = members[0]
        out.append(
            Layer(first.name, first.module, first.input_size, represents=[m.name for m in members])
        )
    return out


def trained_digits_cnn(cfg: Config) -> tuple[nn.Module, float]:
    """SmallCNN trained on the digits with plain SGD (seeded); returns it and its test accuracy."""
    from lightning_spectral.demos.data import DigitsDataModule
    from lightning_spectral.demos.models import SmallCNN

    torch.manual_seed(cfg.seed)
    data = DigitsDataModule(batch_size=32, seed=cfg.seed)
    data.setup()
    model = SmallCNN()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(cfg.digits_epochs):
        for x, y in data.train_dataloader():
            opt.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        correct = total = 0
        for x, y in data.test_dataloader():
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return model.to(cfg.device), correct / total


def digits_layers(model: nn.Module) -> list[Layer]:
    device = next(model.parameters()).device
    sizes = _input_sizes(model, torch.zeros(1, 1, 8, 8, device=device))
    return [
        Layer(n, m, sizes[n], represents=[n])
        for n, m in model.named_modules()
        if isinstance(m, nn.Conv2d)
    ]


# --------------------------------------------------------------------------- batched step


def batched_power_step(layers: list[Layer], cfg: Config) -> dict[str, float]:
    """One power-iteration step over every layer, grouped by shape, against one weight read."""
    groups: dict[tuple[int, ...], list[Tensor]] = {}
    for layer in layers:
        w = grouped_weight(layer.module.weight.detach(), layer.module.groups)
        groups.setdefault(tuple(w.shape), []).append(w)
    weights = [w for ws in groups.values() for w in ws]
    stacked = {shape: torch.stack(ws) for shape, ws in groups.items()}
    states = {}
    for shape, w in stacked.items():
        us, vs = init_singular_vectors(shape, seed=cfg.seed, device=w.device, dtype=w.dtype)
        n = w.shape[0]
        states[shape] = (
            [u.unsqueeze(0).repeat(n, *[1] * u.ndim) for u in us],
            [v.unsqueeze(0).repeat(n, *[1] * v.ndim) for v in vs],
        )
    n_bytes = sum(w.numel() * w.element_size() for w in weights)

    def read_once() -> Tensor:
        return torch.stack([w.sum() for w in weights]).sum()

    def step_stacked() -> Tensor:
        for shape, w in stacked.items():
            power_iteration_(w, *states[shape], n_iter=1)
        return torch.zeros(())

    def step_with_stack() -> Tensor:
        for shape, ws in groups.items():
            power_iteration_(torch.stack(ws), *states[shape], n_iter=1)
        return torch.zeros(())

    # Interleaved rounds (A, B, C, A, B, C, ...) so that load drifting on a shared machine
    # hits the three alike; medians over the rounds.
    ops = {"read": read_once, "step": step_stacked, "step_stack": step_with_stack}
    for fn in ops.values():
        fn()  # warm-up
    times: dict[str, list[float]] = {name: [] for name in ops}
    rounds = 5 if cfg.quick else 41
    for _ in range(rounds):
        for name, fn in ops.items():
            _sync(cfg.device)
            start = time.perf_counter()
            fn()
            _sync(cfg.device)
            times[name].append(time.perf_counter() - start)
    return {
        "layers": len(weights),
        "shapes": len(groups),
        "megabytes": n_bytes / 2**20,
        "rounds": rounds,
        **{name: statistics.median(t) for name, t in times.items()},
    }


# --------------------------------------------------------------------------- output


def _fmt(x: float | None, digits: int = 3) -> str:
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.{digits}f}"


def _fmt_time(t: float | None) -> str:
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.0f} us"
    if t < 1:
        return f"{t * 1e3:.1f} ms"
    return f"{t:.2f} s"


def _speedup(slow: float, fast: float) -> str:
    r = slow / fast
    return f"{r:.1f}x" if r < 10 else f"{r:.0f}x"


def _label(layer: Layer) -> str:
    extra = f" (+{layer.count - 1})" if layer.count > 1 else ""
    return layer.name + extra


def value_table(layers: list[Layer], methods: list[str], exact: str) -> list[str]:
    head = [
        "layer",
        "shape",
        "n",
        *methods,
        "tightest by",
        "tightest/FF",
        f"FF/{exact}",
        f"tightest/{exact}",
    ]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layer in layers:
        v = layer.values
        ex = v.get(exact)
        n0, n1 = layer.input_size
        row = [
            _label(layer),
            layer.shape,
            str(n0) if n0 == n1 else f"{n0}x{n1}",
            *(_fmt(v.get(m)) for m in methods),
            layer.winner,
            _fmt(v["tightest"] / v["FF"]),
            _fmt(v["FF"] / ex if ex else None, 2),
            _fmt(v["tightest"] / ex if ex else None, 2),
        ]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def totals(layers: list[Layer], methods: list[str]) -> dict[str, float]:
    """Seconds for every layer the representatives stand for."""
    return {m: sum(layer.times[m] * layer.count for layer in layers) for m in methods}


def time_table(layers: list[Layer], methods: list[str]) -> list[str]:
    head = ["layer", *methods, "FFT/tightest", "FFT/FF", "FFT/FF-PI(50)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for layer in layers:
        t = layer.times
        row = [
            _label(layer),
            *(f"{_fmt_time(t.get(m))} ({layer.repeats[m]})" if m in t else "-" for m in methods),
            _speedup(t["FFT"], t["tightest"]),
            _speedup(t["FFT"], t["FF"]),
            _speedup(t["FFT"], t["FF-PI(50)"]),
        ]
        lines.append("| " + " | ".join(row) + " |")
    total = totals(layers, methods)
    n_layers = sum(layer.count for layer in layers)
    lines.append(
        f"| **all {n_layers} layers** | "
        + " | ".join(_fmt_time(total[m]) for m in methods)
        + f" | **{_speedup(total['FFT'], total['tightest'])}** | "
        + f"**{_speedup(total['FFT'], total['FF'])}** | "
        + f"**{_speedup(total['FFT'], total['FF-PI(50)'])}** |"
    )
    return lines


def ratios(layers: list[Layer], num: str, den: str) -> list[float]:
    """Per-layer ratios, each representative repeated for the layers it stands for."""
    return [layer.values[num] / layer.values[den] for layer in layers for _ in range(layer.count)]


def summary(layers: list[Layer], exact: str) -> list[str]:
    tight_ff = ratios(layers, "tightest", "FF")
    ff_ex, ti_ex = ratios(layers, "FF", exact), ratios(layers, "tightest", exact)
    return [
        f"- tightest/FF: mean {statistics.mean(tight_ff):.3f}, "
        f"min {min(tight_ff):.3f}, max {max(tight_ff):.3f} over {len(tight_ff)} layers; "
        f"at least 10% below FF on {sum(r <= 0.9 for r in tight_ff)} of them",
        f"- FF/{exact}: mean {statistics.mean(ff_ex):.3f}; "
        f"tightest/{exact}: mean {statistics.mean(ti_ex):.3f}",
    ]


def check_soundness(layers: list[Layer]) -> list[str]:
    """Every provable bound must be >= every exact value and every estimate from below of the
    same operator. Returns the violations (there must be none)."""
    problems = []
    for layer in layers:
        v = layer.values
        # FFT is the norm of the circular stand-in: the real layer's bounds need not exceed it
        # unless the operator bounded IS that stand-in (table 1).
        refs = [m for m in ("matrix", "op-PI") if m in v]
        if layer.bounds_on_standin:
            refs.append("FFT")
        for p in PROVABLE:
            for r in refs:
                if v[p] < v[r] * (1 - 1e-9):
                    problems.append(f"{layer.name}: {p} = {v[p]:.9f} < {r} = {v[r]:.9f}")
    return problems


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = f"{line.split(':', 1)[1].strip()} ({name})"
                    break
    except OSError:
        pass
    return f"{name}, {os.cpu_count()} CPUs, torch {torch.__version__}, " + (
        f"Python {platform.python_version()}"
    )


def load() -> str:
    try:
        return "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"


# --------------------------------------------------------------------------- main


def paper_table(reps: list[Layer], cfg: Config, cache: dict) -> tuple[list[Layer], list[str]]:
    """Table 1: circular stride-1 stand-ins at the paper's sizes; FFT on the n/s subgrid."""
    s = cfg.fft_subsample
    rows, notes = [], []
    for rep in reps:
        n = cfg.paper_sizes[rep.module.out_channels]
        layer = Layer(
            rep.name, rep.module, (n, n), represents=rep.represents, bounds_on_standin=True
        )
        filter_methods(layer, cfg, cache)
        tightest(layer, circular_standin(rep.module), None, cfg)
        m = n // s if n % s == 0 else n
        value, t, reps_, _ = fft_norm(rep.module, m, cfg)
        layer.values["FFT"], layer.repeats["FFT"] = value, reps_
        # The SVD per frequency dominates: time scales with the number of frequencies.
        layer.times["FFT"] = t * _rfft_nodes(n) / _rfft_nodes(m)
        if rep.name == cfg.fft_check_layer and n % (2 * s) == 0 and s > 2:
            v2, t2, _, _ = fft_norm(rep.module, n // 2, cfg)
            notes.append(
                f"Extrapolation check on {rep.name}: FFT on the n/2 = {n // 2} grid took "
                f"{_fmt_time(t2)}, extrapolated from the n/{s} grid: "
                f"{_fmt_time(t * _rfft_nodes(n // 2) / _rfft_nodes(m))}; value "
                f"{v2:.4f} on the n/2 grid vs {value:.4f} on the n/{s} grid."
            )
        rows.append(layer)
    return rows, notes


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="markdown file (default benchmarks/results/bound_speed_<device>[_quick].md)",
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cfg = Config(quick=args.quick, threads=args.threads, device=device)
    if args.quick:
        cfg = replace(
            cfg,
            time_budget=0.0,
            max_repeats=1,
            op_pi_max_iter=30,
            digits_epochs=3,
            image_size=32,
            paper_sizes={64: 16, 128: 8, 256: 8, 512: 8},
            fft_subsample=2,
            fft_check_layer=None,
        )
    started = time.perf_counter()
    title = "# Spectral-norm bounds: speed and tightness"
    out: list[str] = [
        title + (" (--quick smoke run, reduced sizes)" if args.quick else ""),
        "",
        f"Machine: {machine()}; device {device}; torch.set_num_threads({args.threads}); "
        f"{load()} at start.",
        "",
        "Values are spectral norms: FF, Gram-FF and tightest are provable upper bounds, FFT and "
        "matrix exact norms, FF-PI and op-PI estimates from below. Times are medians over the "
        "number of timed repeats in parentheses (after one warm-up call when it is cheap). "
        "`(+k)`: this layer stands for k more layers of equal shape, stride and input size "
        "(random init: same distribution); totals and means count it k+1 times. "
        "Method definitions: `benchmarks/bound_speed.py`, `docs/benchmarks.md`.",
        "",
    ]

    def emit(lines: list[str]) -> None:
        out.extend(lines)
        print("\n".join(lines), flush=True)

    print("\n".join(out), flush=True)
    cache: dict[str, dict[str, tuple]] = {}
    layers = resnet18_layers(cfg)
    chosen = layers
    if args.quick:  # one layer of each kind: 7x7 stride 2, 3x3, 3x3 stride 2, 1x1 stride 2
        keep = {
            "conv1",
            "layer1.0.conv1",
            "layer1.0.conv2",
            "layer2.0.conv1",
            "layer2.0.downsample.0",
        }
        chosen = [layer for layer in layers if layer.name in keep]

    # Table 1: the paper's setting.
    paper_methods = ["FF-PI(1)", "FF-PI(50)", "FF", "Gram-FF", "tightest", "FFT"]
    paper_reps = representatives(chosen, lambda lay: tuple(lay.module.weight.shape))
    paper, notes = paper_table(paper_reps, cfg, cache)
    s = cfg.fft_subsample
    emit(
        [
            "## 1. ResNet-18 at the paper's table sizes (circular stride-1 operators)",
            "",
            "Each filter as the circular, stride-1 convolution at input size n (224/112/56/28 for "
            "64/128/256/512 output channels, as in the paper). The bounds are computed without n "
            "(valid at every size). FFT: the exact norm of this operator on the n/"
            f"{s} grid, whose frequencies are a subset of the n grid's, so it is a lower bound of "
            f"the exact norm at n; its time is EXTRAPOLATED to the n grid (x {s}^2, the number of "
            "frequencies; one small SVD each).",
            "",
            *value_table(paper, paper_methods, "FFT"),
            "",
            *summary(paper, "FFT"),
            "",
            "Time per layer (timed repeats); FFT extrapolated to n as above:",
            "",
            *time_table(paper, paper_methods),
            "",
            *notes,
            "",
        ]
    )

    # Table 2: the real layers at their real sizes.
    real_methods = ["FF-PI(1)", "FF-PI(50)", "FF", "Gram-FF", "tightest", "op-PI", "FFT"]
    real = representatives(
        chosen,
        lambda lay: (tuple(lay.module.weight.shape), lay.module.stride, lay.input_size),
    )
    for layer in real:
        filter_methods(layer, cfg, cache)
        tightest(layer, layer.module, layer.input_size, cfg)
        op_power(layer, cfg)
        value, t, reps_, _ = fft_norm(layer.module, layer.input_size[0], cfg)
        layer.values["FFT"], layer.times["FFT"], layer.repeats["FFT"] = value, t, reps_
    stopped = [layer.name for layer in real if layer.notes]
    emit(
        [
            f"## 2. ResNet-18 layers as they are, at their input sizes for a {cfg.image_size}x"
            f"{cfg.image_size} image",
            "",
            "Zero padding and the layer's stride; `tightest` uses the input size. op-PI: block "
            f"power iteration on the operator (rtol {cfg.op_pi_tol:g}, at most "
            f"{cfg.op_pi_max_iter} steps), a lower bound of the real norm, so bound/op-PI "
            "over-states the true ratio. FFT: the circular stride-1 stand-in at the same size, "
            "exact for that other operator, for reference (a strided layer's norm can be far "
            "below it)."
            + (f" op-PI stopped at max_iter on: {', '.join(stopped)}." if stopped else ""),
            "",
            *value_table(real, real_methods, "op-PI"),
            "",
            *summary(real, "op-PI"),
            "",
            "Time per layer (timed repeats):",
            "",
            *time_table(real, real_methods),
            "",
        ]
    )

    # Table 3: trained digits CNN, with explicit matrices.
    model, acc = trained_digits_cnn(cfg)
    digits = digits_layers(model)
    for layer in digits:
        filter_methods(layer, cfg, {})
        tightest(layer, layer.module, layer.input_size, cfg)
        op_power(layer, cfg)
        value, t, reps_, _ = fft_norm(layer.module, layer.input_size[0], cfg)
        layer.values["FFT"], layer.times["FFT"], layer.repeats["FFT"] = value, t, reps_
        result = measure(
            lambda layer=layer: conv_spectral_norm(layer.module, layer.input_size, method="matrix"),
            cfg,
        )
        _put(layer, "matrix", result)
    digit_methods = [*real_methods, "matrix"]
    emit(
        [
            f"## 3. SmallCNN trained on the digits ({cfg.digits_epochs} epochs of SGD, test "
            f"accuracy {acc:.3f})",
            "",
            "The real layers (zero padding, strides 1/2/2) at their input sizes; `matrix` is the "
            "exact norm of the explicit operator matrix.",
            "",
            *value_table(digits, digit_methods, "matrix"),
            "",
            *summary(digits, "matrix"),
            "",
            "Time per layer (timed repeats):",
            "",
            *time_table(digits, digit_methods),
            "",
        ]
    )

    # Batched power iteration over all ResNet-18 convolutions.
    step = batched_power_step(layers, cfg)
    emit(
        [
            "## 4. One batched power-iteration step over all ResNet-18 convolutions",
            "",
            f"All {step['layers']} layers, in {step['shapes']} stacks of equal shape, "
            f"{step['megabytes']:.1f} MiB of float32 weights; every matricization of every layer. "
            f"Medians of {step['rounds']} interleaved rounds.",
            "",
            "| operation | median time | passes over the weights' memory |",
            "|---|---|---|",
            f"| read every weight once (sum per tensor) | {_fmt_time(step['read'])} | 1.00 |",
            f"| power iteration step, weights pre-stacked | {_fmt_time(step['step'])} | "
            f"{step['step'] / step['read']:.2f} |",
            f"| power iteration step, stacking included | {_fmt_time(step['step_stack'])} | "
            f"{step['step_stack'] / step['read']:.2f} |",
            "",
        ]
    )

    problems = check_soundness(paper + real + digits)
    verdict = "yes" if not problems else "NO:\n" + "\n".join(f"- {p}" for p in problems)
    emit(
        [
            "## Soundness",
            "",
            "Every provable bound >= every exact value and estimate from below of its operator: "
            + verdict,
            "",
            f"Total benchmark time: {time.perf_counter() - started:.0f} s; {load()} at the end.",
            "",
        ]
    )
    text = "\n".join(out)
    output = args.output
    if output is None:
        suffix = "_quick" if args.quick else ""
        output = Path(__file__).parent / "results" / f"bound_speed_{device.type}{suffix}.md"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    if problems:
        sys.exit("provable bound below an exact value:\n" + "\n".join(problems))
    return text


if __name__ == "__main__":
    main()
