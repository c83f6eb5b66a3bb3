"""Markdown output: number formats, the value and time tables, summaries, the machine."""

from __future__ import annotations

import math
import os
import platform
import statistics

import torch

from benchmarks.boundspeed.config import Layer
from benchmarks.boundspeed.measure import ratios
from benchmarks.machine_info import cpu_model


def fmt(x: float | None, digits: int = 3) -> str:
    """``x`` to ``digits`` decimals; ``-`` where there is no value."""
    if x is None or math.isnan(x):
        return "-"
    return f"{x:.{digits}f}"


def fmt_time(t: float | None) -> str:
    """Seconds in us, ms or s, three significant digits or so."""
    if t is None:
        return "-"
    if t < 1e-3:
        return f"{t * 1e6:.0f} us"
    if t < 1:
        return f"{t * 1e3:.1f} ms"
    return f"{t:.2f} s"


def speedup(slow: float, fast: float) -> str:
    """``slow / fast`` as ``1.5x`` or, from 10 on, ``12x``."""
    r = slow / fast
    return f"{r:.1f}x" if r < 10 else f"{r:.0f}x"


def _label(layer: Layer) -> str:
    extra = f" (+{layer.count - 1})" if layer.count > 1 else ""
    return layer.name + extra


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def value_table(layers: list[Layer], methods: list[str], exact: str) -> list[str]:
    """Values of every method per layer, the winning bound, and tightness ratios."""
    head = ["layer", "shape", "n", *methods, "tightest by", "tightest/FF"]
    head += [f"FF/{exact}", f"tightest/{exact}"]
    lines = [_row(head), "|" + "---|" * len(head)]
    for layer in layers:
        v = layer.values
        ex = v.get(exact)
        n0, n1 = layer.input_size
        row = [_label(layer), layer.shape, str(n0) if n0 == n1 else f"{n0}x{n1}"]
        row += [*(fmt(v.get(m)) for m in methods), layer.winner, fmt(v["tightest"] / v["FF"])]
        row += [fmt(v["FF"] / ex if ex else None, 2), fmt(v["tightest"] / ex if ex else None, 2)]
        lines.append(_row(row))
    return lines


def _speedups(t: dict[str, float]) -> list[str]:
    return [speedup(t["FFT"], t[m]) for m in ("tightest", "FF", "FF-PI(50)")]


def time_table(layers: list[Layer], methods: list[str]) -> list[str]:
    """Median time (timed repeats) per layer and method, FFT's speed ratios, and the totals
    over every layer the representatives stand for."""
    head = ["layer", *methods, "FFT/tightest", "FFT/FF", "FFT/FF-PI(50)"]
    lines = [_row(head), "|" + "---|" * len(head)]
    for layer in layers:
        t = layer.times
        cells = [f"{fmt_time(t[m])} ({layer.repeats[m]})" if m in t else "-" for m in methods]
        lines.append(_row([_label(layer), *cells, *_speedups(t)]))
    total = {m: sum(layer.times[m] * layer.count for layer in layers) for m in methods}
    n_layers = sum(layer.count for layer in layers)
    cells = [fmt_time(total[m]) for m in methods] + [f"**{s}**" for s in _speedups(total)]
    lines.append(_row([f"**all {n_layers} layers**", *cells]))
    return lines


def summary(layers: list[Layer], exact: str) -> list[str]:
    """Mean/min/max of tightest/FF, and the mean ratios of FF and tightest to ``exact``."""
    tight_ff = ratios(layers, "tightest", "FF")
    ff_ex, ti_ex = ratios(layers, "FF", exact), ratios(layers, "tightest", exact)
    return [
        f"- tightest/FF: mean {statistics.mean(tight_ff):.3f}, "
        f"min {min(tight_ff):.3f}, max {max(tight_ff):.3f} over {len(tight_ff)} layers; "
        f"at least 10% below FF on {sum(r <= 0.9 for r in tight_ff)} of them",
        f"- FF/{exact}: mean {statistics.mean(ff_ex):.3f}; "
        f"tightest/{exact}: mean {statistics.mean(ti_ex):.3f}",
    ]


def machine() -> str:
    """CPU model, core count, torch and Python versions."""
    name = platform.processor() or platform.machine()
    model = cpu_model()
    name = f"{model} ({name})" if model else name
    return f"{name}, {os.cpu_count()} CPUs, torch {torch.__version__}, " + (
        f"Python {platform.python_version()}"
    )


def load() -> str:
    """The 1/5/15-minute load averages: times are comparable only under similar load."""
    try:
        return "load average " + ", ".join(f"{x:.1f}" for x in os.getloadavg())
    except OSError:
        return "load average unknown"
