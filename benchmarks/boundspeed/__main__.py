"""``python -m benchmarks.boundspeed [--quick] [--threads N] [--device D] [--output FILE]``."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

from benchmarks.boundspeed import __doc__ as package_doc
from benchmarks.boundspeed import sections
from benchmarks.boundspeed.batched import batched_power_step
from benchmarks.boundspeed.config import Config, quick_config
from benchmarks.boundspeed.layers import chosen_layers, resnet18_layers
from benchmarks.boundspeed.measure import check_soundness
from benchmarks.boundspeed.methods import PROVABLE, SIZED_PROVABLE
from benchmarks.boundspeed.tables import digits_table, paper_table, real_table

RESULTS = Path(__file__).resolve().parents[1] / "results"


def _emit(out: list[str], lines: list[str]) -> None:
    out.extend(lines)
    print("\n".join(lines), flush=True)


def run(cfg: Config) -> tuple[str, list[str]]:
    """Every table, printed as it is done; returns the markdown and the soundness violations."""
    started = time.perf_counter()
    out: list[str] = []
    _emit(out, sections.header(cfg))
    layers = resnet18_layers(cfg)
    chosen, cache = chosen_layers(layers, cfg), {}
    paper, checks = paper_table(chosen, cfg, cache)
    _emit(out, sections.paper(paper, checks, cfg))
    real = real_table(chosen, cfg, cache)
    _emit(out, sections.real(real, cfg))
    digits, acc = digits_table(cfg)
    _emit(out, sections.digits(digits, acc, cfg))
    _emit(out, sections.batched(batched_power_step(layers, cfg)))
    problems = check_soundness(paper, PROVABLE) + check_soundness(real + digits, SIZED_PROVABLE)
    _emit(out, sections.soundness(problems, time.perf_counter() - started))
    return "\n".join(out), problems


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.boundspeed", description=package_doc.split("\n\n")[0]
    )
    parser.add_argument("--quick", action="store_true", help="seconds-long smoke run")
    parser.add_argument("--threads", type=_positive_int, default=1, help="torch.set_num_threads")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="markdown file (default benchmarks/results/bound_speed_<device>[_quick].md)",
    )
    args = parser.parse_args(argv)
    try:
        args.device = torch.device(args.device)
    except RuntimeError as err:
        parser.error(f"--device {args.device!r}: {err}")
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    suffix = "_quick" if args.quick else ""
    args.output = args.output or RESULTS / f"bound_speed_{args.device.type}{suffix}.md"
    _check_writable(parser, args.output)
    return args


def _check_writable(parser: argparse.ArgumentParser, output: Path) -> None:
    """Fail before minutes of measurement, not after, if ``output`` cannot be written."""
    if output.is_dir():
        parser.error(f"--output {output} is a directory; give a file name")
    parent = output.parent
    while not parent.exists():  # created at the end, if missing
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK):
        parser.error(f"--output {output}: {parent} is not a writable directory")


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = Config(quick=args.quick, threads=args.threads, device=args.device)
    text, problems = run(quick_config(cfg) if args.quick else cfg)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    if problems:
        sys.exit("provable bound below an exact value:\n" + "\n".join(problems))
    return text


if __name__ == "__main__":
    main()
