"""Timing (warm-up, medians over repeats, interleaved rounds) and tightness/soundness ratios."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor

from benchmarks.boundspeed.config import Config, Layer

Output = Tensor | dict[str, Tensor]


class Job(NamedTuple):
    run: Callable[[], Output]
    prepare: Callable[[], None] | None = None  # untimed, before every call of ``run``


class Timing(NamedTuple):
    value: float
    seconds: float  # median over the timed repeats
    repeats: int
    output: Output  # of the last call


def sync(device: torch.device) -> None:
    """Wait for queued GPU work, so that a timer read measures it (no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def as_float(out: Output) -> float:
    """The value of a method's output; a dict of bounds gives its minimum, the tightest bound."""
    if isinstance(out, dict):
        return min(float(v) for v in out.values())
    return float(out)


def _timed(fn: Callable[[], object], device: torch.device) -> tuple[float, object]:
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def _timed_call(job: Job, device: torch.device) -> tuple[float, Output]:
    if job.prepare is not None:
        job.prepare()
    return _timed(job.run, device)  # type: ignore[return-value]


def measure(job: Job, cfg: Config) -> Timing:
    """Median time of ``job.run()`` over repeats, and its value.

    The first call is a warm-up, discarded unless it alone exceeds the time budget (then it is
    the only measurement) or only one repeat is allowed; further calls run until
    ``cfg.time_budget`` seconds are spent or ``cfg.max_repeats`` calls are timed.
    """
    elapsed, out = _timed_call(job, cfg.device)
    times = [elapsed]
    if elapsed < cfg.time_budget and cfg.max_repeats > 1:
        times.clear()  # the warm-up call
    while not times or (len(times) < cfg.max_repeats and sum(times) < cfg.time_budget):
        elapsed, out = _timed_call(job, cfg.device)
        times.append(elapsed)
    return Timing(as_float(out), statistics.median(times), len(times), out)


def interleaved(
    ops: dict[str, Callable[[], object]], rounds: int, device: torch.device
) -> dict[str, float]:
    """Median seconds of each op over ``rounds`` rounds run side by side (A, B, C, A, B, C, ...).

    Load drifting on a shared machine then hits every op alike. One untimed warm-up call each.
    """
    for fn in ops.values():
        fn()
    times: dict[str, list[float]] = {name: [] for name in ops}
    for _ in range(rounds):
        for name, fn in ops.items():
            times[name].append(_timed(fn, device)[0])
    return {name: statistics.median(t) for name, t in times.items()}


def ratios(layers: list[Layer], num: str, den: str) -> list[float]:
    """Per-layer ``num / den``, each representative repeated for the layers it stands for."""
    return [layer.values[num] / layer.values[den] for layer in layers for _ in range(layer.count)]


def check_soundness(layers: list[Layer], provable: list[str]) -> list[str]:
    """Violations of: every provable bound >= every exact value and estimate from below of the
    same operator (there must be none)."""
    problems = []
    for layer in layers:
        v = layer.values
        # FFT is the norm of the circular stand-in: the real layer's bounds need not exceed it
        # unless the operator bounded IS that stand-in (table 1).
        refs = [m for m in ("matrix", "op-PI") if m in v]
        if layer.bounds_on_standin:
            refs.append("FFT")
        for p in provable:
            for r in refs:
                if v[p] < v[r] * (1 - 1e-9):
                    problems.append(f"{layer.name}: {p} = {v[p]:.9f} < {r} = {v[r]:.9f}")
    return problems
