"""Intra-op threads vs. the speed of the guaranteed bounds, on a quiet and on a busy CPU.

For convolutions from 16 to 512 channels, times ``layer_spectral_bound(conv)`` with
``torch.set_num_threads(t)`` for each ``t`` of ``--threads``, interleaved (one call per thread
count per round, ``--repeats`` rounds, median reported), first as the machine is, then while a
child process keeps one core busy (``python -c "while True: pass"``, stopped afterwards). Then
the ``torch.profiler`` self-CPU time per operator of the 32-channel stride-2 layer under the
busy core, to show which operations the time goes to.

    python benchmarks/bound_threads.py                 # about 2-5 minutes on 2 busy cores
    python benchmarks/bound_threads.py --quick         # the three smallest layers only
    python benchmarks/bound_threads.py --no-limit      # torch's own threading everywhere

By default the library's thread limit applies (``lightning_spectral.functional.threads``: at
most ``BOUND_THREADS`` threads for layers of at most ``SMALL_SIDE`` channels per group);
``--no-limit`` sets ``BOUND_THREADS = None`` to measure what the limit avoids.

The table goes to stdout and to ``--output`` (default
``benchmarks/results/bound_threads_cpu.md``). The header names the CPU, its core count and the
load average: compare numbers only between runs on the same machine under similar load.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lightning_spectral.functional import layer_spectral_bound, threads

try:
    from benchmarks.machine_info import cpu_name
except ModuleNotFoundError:  # run as `python benchmarks/<name>.py`: this directory is on sys.path
    from machine_info import cpu_name  # type: ignore[no-redef]

RESULTS = Path(__file__).resolve().parent / "results" / "bound_threads_cpu.md"


def layers(quick: bool) -> list[tuple[str, nn.Module, dict]]:
    """(label, layer, keyword arguments of ``layer_spectral_bound``), smallest first.

    The last two take seconds per call: they get one round and no warm-up (see ``speed_table``).
    """
    torch.manual_seed(0)
    cases = [
        ("16x16x3x3", nn.Conv2d(16, 16, 3, padding=1), {}),
        ("32x32x3x3 stride 2", nn.Conv2d(32, 32, 3, stride=2, padding=1), {}),
        ("64x64x3x3", nn.Conv2d(64, 64, 3, padding=1), {}),
        ("128x128x3x3", nn.Conv2d(128, 128, 3, padding=1), {}),
        ("256x256x3x3", nn.Conv2d(256, 256, 3, padding=1), {}),
        ("512x512x3x3, max_cost=0", nn.Conv2d(512, 512, 3, padding=1), {"max_cost": 0}),
    ]
    return cases[:3] if quick else cases


@contextlib.contextmanager
def busy_core() -> Iterator[None]:
    """Keep one core busy with a spinning child process for the duration of the block."""
    child = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)  # let it start spinning
        yield
    finally:
        child.terminate()
        child.wait()


def timed(fn: Callable[[], object], threads: int) -> float:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def compare(
    fn: Callable[[], object], threads: list[int], repeats: int, warm_up: bool
) -> dict[int, float]:
    """Median seconds per thread count, the counts interleaved so load drifts hit all alike."""
    for t in threads if warm_up else []:
        timed(fn, t)
    samples: dict[int, list[float]] = {t: [] for t in threads}
    for _ in range(repeats):
        for t in threads:
            samples[t].append(timed(fn, t))
    return {t: statistics.median(s) for t, s in samples.items()}


def op_profile(fn: Callable[[], object], threads: int, top: int, calls: int = 3) -> dict:
    """Self CPU milliseconds per call of the ``top`` most expensive operators."""
    torch.set_num_threads(threads)
    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return {e.key: e.self_cpu_time_total / 1e3 / calls for e in events[:top]}


def speed_table(quick: bool, threads: list[int], repeats: int) -> list[str]:
    head = " | ".join(f"{t} thread{'s' * (t > 1)}" for t in threads)
    rows = [f"| layer | machine | {head} | slowest / fastest |", "|---" * (3 + len(threads)) + "|"]
    for busy in (False, True):
        with busy_core() if busy else contextlib.nullcontext():
            for i, (label, layer, kwargs) in enumerate(layers(quick)):
                small = i < 4
                with torch.no_grad():
                    med = compare(
                        lambda: layer_spectral_bound(layer, **kwargs),  # noqa: B023
                        threads,
                        repeats if small else 1,
                        warm_up=small,
                    )
                cells = " | ".join(f"{1e3 * med[t]:.0f} ms" for t in threads)
                ratio = max(med.values()) / min(med.values())
                state = "+ 1 busy core" if busy else "as is"
                rows.append(f"| {label} | {state} | {cells} | {ratio:.1f} |")
    return rows


def profile_table(threads: list[int]) -> list[str]:
    layer = nn.Conv2d(32, 32, 3, stride=2, padding=1)
    with busy_core(), torch.no_grad():
        prof = {t: op_profile(lambda: layer_spectral_bound(layer), t, top=6) for t in threads}
    ops = list(dict.fromkeys(op for p in prof.values() for op in p))
    head = " | ".join(f"{t} thread{'s' * (t > 1)}" for t in threads)
    rows = [f"| operator (self CPU, one call) | {head} |", "|---" * (1 + len(threads)) + "|"]
    for op in ops:
        cells = " | ".join(f"{prof[t][op]:.1f} ms" if op in prof[t] else "-" for t in threads)
        rows.append(f"| `{op}` | {cells} |")
    return rows


def header() -> list[str]:
    cpu = cpu_name()
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    return [
        f"Machine: {cpu}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{torch.__config__.parallel_info().splitlines()[-1].strip()}.",
        f"Load average at start: {load}.",
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--no-limit", action="store_true", help="BOUND_THREADS = None")
    args = parser.parse_args(argv)
    if args.no_limit:
        threads.BOUND_THREADS = None
    limit = f"BOUND_THREADS = {threads.BOUND_THREADS}, SMALL_SIDE = {threads.SMALL_SIDE}"
    lines = ["# Threads and bound speed (CPU)", "", *header(), f"Library setting: {limit}.", ""]
    lines += ["`layer_spectral_bound(conv)`, median of the rounds:", ""]
    lines += speed_table(args.quick, args.threads, args.repeats)
    lines += ["", "Where the time goes, 32x32x3x3 stride 2 with one busy core:", ""]
    lines += profile_table(args.threads)
    lines += ["", f"Load average at end: {', '.join(f'{x:.1f}' for x in os.getloadavg())}."]
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
