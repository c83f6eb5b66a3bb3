"""The rows of tables 1-3: every method run on every layer, values and times recorded."""

from __future__ import annotations

import warnings
from typing import NamedTuple

from torch import nn

from benchmarks.boundspeed.config import Config, Layer
from benchmarks.boundspeed.layers import circular_standin, representatives, trained_digits_cnn
from benchmarks.boundspeed.measure import Timing, measure
from benchmarks.boundspeed.methods import FILTER_METHODS, METHODS, Size
from lightning_spectral._progress import progress

PAPER_METHODS = ["FF-PI(1)", "FF-PI(50)", "FF", "Gram-FF", "tightest", "FFT"]
REAL_METHODS = ["FF-PI(1)", "FF-PI(50)", "FF", "Gram-FF", "tightest", "grid-Gram", "op-PI",
                "FFT"]
DIGIT_METHODS = [*REAL_METHODS, "matrix"]
# Filter-only results by layer name, shared by tables 1 and 2 (same ResNet-18 modules).
Cache = dict[str, dict[str, Timing]]


class FftCheck(NamedTuple):
    """Table 1's extrapolated FFT time checked against a measured run on the n/2 grid."""

    layer: str
    n: int
    subsample: int
    half: Timing  # measured on the n/2 grid
    predicted: float  # seconds on the n/2 grid, extrapolated from the n/subsample grid
    subgrid_value: float


def run_method(name: str, conv: nn.Conv2d, size: Size, cfg: Config) -> tuple[Timing, list[str]]:
    """``measure`` of method ``name`` on ``conv`` at ``size``, and notes on how it stopped."""
    notes = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        timing = measure(METHODS[name].build(conv, size, cfg), cfg)
    for w in caught:
        if "did not reach" in str(w.message):
            notes.append(f"{name} stopped at max_iter")
        else:  # not ours to swallow
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return timing, sorted(set(notes))


def record(layer: Layer, name: str, timing: Timing) -> None:
    """Store a method's value, median time and repeats on ``layer``."""
    layer.values[name], layer.times[name], layer.repeats[name] = timing[:3]
    if isinstance(timing.output, dict):  # the tightest bound: which one won
        layer.winner = min(timing.output, key=lambda k: float(timing.output[k]))


def fill(layer: Layer, names: list[str], cfg: Config, cache: Cache | None = None) -> None:
    """Run ``names`` on ``layer`` as it is, at its input size; filter-only ones via ``cache``."""
    cache = {} if cache is None else cache
    filter_names = [n for n in names if n in FILTER_METHODS]
    if layer.name not in cache:
        cache[layer.name] = {n: run_method(n, layer.module, None, cfg)[0] for n in filter_names}
    for name in names:
        if name in filter_names:
            record(layer, name, cache[layer.name][name])
            continue
        timing, notes = run_method(name, layer.module, layer.input_size, cfg)
        record(layer, name, timing)
        layer.notes.extend(notes)


def _rfft_nodes(n: int) -> int:
    """Frequencies the FFT method evaluates on an n x n grid (half of one axis, real filter)."""
    return n * (n // 2 + 1)


def paper_row(rep: Layer, cfg: Config, cache: Cache) -> tuple[Layer, list[FftCheck]]:
    """Table 1 row: the circular stride-1 stand-in at the paper's size n; FFT on the n/s grid."""
    n, s = cfg.paper_sizes[rep.module.out_channels], cfg.fft_subsample
    layer = Layer(rep.name, rep.module, (n, n), represents=rep.represents, bounds_on_standin=True)
    fill(layer, FILTER_METHODS, cfg, cache)
    record(layer, "tightest", run_method("tightest", circular_standin(rep.module), None, cfg)[0])
    m = n // s if n % s == 0 else n
    fft = run_method("FFT", rep.module, (m, m), cfg)[0]
    # The SVD per frequency dominates: time scales with the number of frequencies.
    record(layer, "FFT", fft._replace(seconds=fft.seconds * _rfft_nodes(n) / _rfft_nodes(m)))
    if rep.name != cfg.fft_check_layer or n % (2 * s) != 0 or s <= 2:
        return layer, []
    half = run_method("FFT", rep.module, (n // 2, n // 2), cfg)[0]
    predicted = fft.seconds * _rfft_nodes(n // 2) / _rfft_nodes(m)
    return layer, [FftCheck(rep.name, n, s, half, predicted, fft.value)]


def paper_table(
    chosen: list[Layer], cfg: Config, cache: Cache
) -> tuple[list[Layer], list[FftCheck]]:
    """Table 1 rows (one per filter shape) and the FFT extrapolation checks."""
    rows, checks = [], []
    reps = representatives(chosen, lambda lay: tuple(lay.module.weight.shape))
    for rep in progress(reps, total=len(reps), desc="table 1: paper sizes"):
        layer, check = paper_row(rep, cfg, cache)
        rows.append(layer)
        checks.extend(check)
    return rows, checks


def real_table(chosen: list[Layer], cfg: Config, cache: Cache) -> list[Layer]:
    """Table 2 rows: one per shape, stride and input size."""
    reps = representatives(
        chosen, lambda lay: (tuple(lay.module.weight.shape), lay.module.stride, lay.input_size)
    )
    for layer in progress(reps, total=len(reps), desc="table 2: ResNet-18 layers"):
        fill(layer, REAL_METHODS, cfg, cache)
    return reps


def digits_table(cfg: Config) -> tuple[list[Layer], float]:
    """Table 3 rows and the CNN's test accuracy."""
    layers, acc = trained_digits_cnn(cfg)
    for layer in progress(layers, total=len(layers), desc="table 3: digits CNN"):
        fill(layer, DIGIT_METHODS, cfg)
    return layers, acc
