"""Figures and a markdown summary of a run's spectral and certification logs.

Run as ``python -m lightning_spectral.report <log dir> [--out DIR]``. ``<log dir>`` is a
CSVLogger directory (``metrics.csv``; given the logger's root, the latest ``version_N`` is
used), the path of a ``metrics.csv`` itself, or a TensorBoardLogger directory (event files,
read when the ``tensorboard`` package is installed).

Written to ``DIR`` (default: ``report/`` next to the metrics file): ``report.md`` with the
final value of every key below, and the PNG figures of :mod:`lightning_spectral.plotting`
(``layers.png``, ``estimates.png``, ``bounds.png``, ``certified.png``; each only when its keys
were logged).

Displayed numbers are rounded to 6 significant digits *in the safe direction*: guaranteed
bounds and Lipschitz bounds up, certified accuracies and radii down, so that a value read off
the report is still a valid bound.

Reading the logs (:func:`~lightning_spectral.report_logs.load_log`, the key table
:data:`~lightning_spectral.report_logs.KEYS`, the key selection) is
:mod:`lightning_spectral.report_logs`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Sequence
from decimal import ROUND_CEILING, ROUND_FLOOR, ROUND_HALF_EVEN, Context
from pathlib import Path
from typing import TYPE_CHECKING

from ._progress import progress
from .report_logs import (
    CERTIFIED_ACC,
    CERTIFIED_RADIUS,
    KEYS,
    LIPSCHITZ,
    RunLog,
    certified_families,
    curves,
    final_layer_values,
    kind_keys,
    load_log,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["format_value", "make_report", "main", "render_markdown"]

_log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- formatting

#: Labels of the summary rows; ``test/<key>`` gets the same label prefixed with ``test:``.
LABELS: dict[str, str] = {
    "spectral_bound/max": "largest guaranteed layer bound",
    "lipschitz/network": "network Lipschitz bound",
    "certified/radius": "mean certified radius",
    "spectral_ratio/max": "largest bound / exact",
    "spectral_bound/step_max": "largest guaranteed bound after a step (constraint)",
    "spectral_estimate/max": "largest estimate (training, power iteration)",
    "spectral/max": "largest estimate (training, power iteration)",
    "spectral_penalty": "penalty (training)",
    "spectral/penalty": "penalty (training)",
}


def _rounding(key: str) -> str:
    """The safe direction for a key: bounds up, certified (lower-bound) values down."""
    if key.startswith(KEYS["bound"]) or LIPSCHITZ.match(key):
        return ROUND_CEILING
    if CERTIFIED_ACC.match(key) or CERTIFIED_RADIUS.match(key):
        return ROUND_FLOOR
    return ROUND_HALF_EVEN


def format_value(value: float, rounding: str = ROUND_HALF_EVEN, digits: int = 6) -> str:
    """``value`` to ``digits`` significant digits, rounded in the given decimal mode.

    The float is converted exactly (``Decimal`` of a binary float is exact) and rounded once,
    so a ceiling-rounded display is never below the logged value.
    """
    if value != value or value in (float("inf"), float("-inf")):
        return str(value)
    rounded = Context(prec=digits, rounding=rounding).create_decimal(value).normalize()
    # Plain notation in the usual range ("10", not "1E+1"); exponents outside it.
    return format(rounded, "f" if 1e-4 <= abs(rounded) < 1e6 or not rounded else "e")


def _summary_keys(log: RunLog) -> list[str]:
    keys = [k for k in LABELS if k in log.series]
    keys += [f"test/{k}" for k in LABELS if f"test/{k}" in log.series]
    extra = (k for k in sorted(log.series) if LIPSCHITZ.match(k) or CERTIFIED_RADIUS.match(k))
    return keys + [k for k in extra if k not in keys]


def _label(key: str) -> str:
    if key in LABELS:
        return LABELS[key]
    stripped = key.removeprefix("test/")
    return f"test: {LABELS[stripped]}" if stripped in LABELS else key


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows]


def _summary_section(log: RunLog) -> list[str]:
    rows = []
    for key in _summary_keys(log):
        p = log.series[key][-1]
        epoch = "" if p.epoch is None else str(p.epoch)
        rows.append([_label(key), f"`{key}`", format_value(p.value, _rounding(key)), epoch,
                     str(p.step)])
    return ["## Final values", "", *_table(["value", "key", "final", "epoch", "step"], rows)]


def _certified_section(log: RunLog) -> list[str]:
    families = certified_families(log)
    if not families:
        return []
    eps_all = sorted({e for points in families.values() for e in points})
    rows = [[f"{e:g}"] + [format_value(f[e], ROUND_FLOOR) if e in f else "" for f in
                                 families.values()] for e in eps_all]
    return ["## Certified accuracy", "",
            "Share of samples classified correctly with a certified l2 radius >= eps.", "",
            *_table(["eps", *families], rows)]


def _layer_section(log: RunLog) -> list[str]:
    columns = [("estimate (training)", "estimate", ROUND_HALF_EVEN),
               ("guaranteed bound", "bound", ROUND_CEILING),
               ("exact", "exact", ROUND_HALF_EVEN), ("bound / exact", "ratio", ROUND_HALF_EVEN)]
    values = {kind: final_layer_values(log, kind) for _, kind, _ in columns}
    columns = [c for c in columns if values[c[1]]]
    layers = list(dict.fromkeys(n for _, kind, _ in columns for n in values[kind]))
    if not layers:
        return []
    rows = [[f"`{n}`"] + [format_value(values[k][n], r) if n in values[k] else ""
                          for _, k, r in columns] for n in layers]
    return ["## Per layer (last logged values)", "",
            *_table(["layer", *(label for label, _, _ in columns)], rows)]


# ----------------------------------------------------------------------------- report

FigureMaker = Callable[[RunLog], "Figure | None"]


def _layers_figure(log: RunLog) -> Figure | None:
    from .plotting import plot_layer_norms

    values = {kind: final_layer_values(log, kind) for kind in ("bound", "estimate", "exact")}
    if not any(values.values()):
        return None
    return plot_layer_norms(title="Per-layer spectral norms (last logged values)", **values)


def _estimates_figure(log: RunLog) -> Figure | None:
    from .plotting import plot_curves

    data = curves(log, "estimate", by_epoch=False)
    title = "Fantastic Four estimates during training (not guaranteed)"
    return plot_curves(data, "step", "power-iteration estimate", title) if data else None


def _bounds_figure(log: RunLog) -> Figure | None:
    from .plotting import plot_curves

    # Several validations per epoch (val_check_interval) share an epoch: use steps then.
    epochs = [p.epoch for p in log.series.get(kind_keys(log, "bound").get("max", ""), [])]
    by_epoch = bool(epochs) and None not in epochs and len(set(epochs)) == len(epochs)
    data = curves(log, "bound", by_epoch=by_epoch)
    return plot_curves(data, "epoch" if by_epoch else "step", "guaranteed upper bound",
                       "Guaranteed bounds at validation") if data else None


def _certified_figure(log: RunLog) -> Figure | None:
    from .plotting import plot_certified_accuracy

    families = certified_families(log)
    return plot_certified_accuracy(families) if families else None


FIGURES: dict[str, FigureMaker] = {
    "layers.png": _layers_figure,
    "estimates.png": _estimates_figure,
    "bounds.png": _bounds_figure,
    "certified.png": _certified_figure,
}


def render_markdown(log: RunLog, figures: Sequence[str] = ()) -> str:
    """The text of ``report.md``: final values, certified accuracy, per-layer table, figures."""
    lines = [
        "# Spectral report", "",
        f"Run: `{log.source}`.", "",
        "Last logged value of each key. `spectral_estimate` values are power-iteration "
        "estimates (from below, not bounds); `spectral_bound` values are guaranteed upper "
        "bounds; `spectral_exact` values are exact norms. Bounds are rounded up, certified "
        "accuracies and radii down.", "",
        *_summary_section(log),
    ]
    for section in (_certified_section(log), _layer_section(log)):
        lines += ["", *section] if section else []
    if figures:
        lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def make_report(log_path: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write ``report.md`` and the figures of the run at ``log_path``; return their paths.

    ``out_dir`` defaults to ``report/`` next to the metrics file (or in the event directory).
    Everything is read and drawn before the first file is written.
    """
    if out_dir is not None and Path(out_dir).exists() and not Path(out_dir).is_dir():
        raise NotADirectoryError(f"--out {str(out_dir)!r} exists and is not a directory")
    _log.info("reading the logs at %s", log_path)
    log = load_log(log_path)
    base = log.source if log.source.is_dir() else log.source.parent
    out = Path(out_dir) if out_dir is not None else base / "report"
    _log.info("drawing up to %d figures of %d logged keys", len(FIGURES), len(log.series))
    drawn = progress(FIGURES.items(), total=len(FIGURES), desc="figures", unit="figure")
    figures = {name: fig for name, make in drawn if (fig := make(log)) is not None}
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "report.md"]
    written[0].write_text(render_markdown(log, list(figures)))
    for name, fig in progress(figures.items(), total=len(figures), desc="saving", unit="figure"):
        fig.savefig(out / name, dpi=100)
        written.append(out / name)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``python -m lightning_spectral.report <log dir> [--out DIR]``."""
    parser = argparse.ArgumentParser(
        prog="python -m lightning_spectral.report",
        description="Figures and a markdown summary of a run's spectral and certification logs.",
    )
    parser.add_argument("log", help="CSVLogger/TensorBoardLogger directory or a metrics.csv")
    parser.add_argument("--out", default=None, help="output directory (default: <log>/report)")
    args = parser.parse_args(argv)
    if not logging.getLogger().handlers:  # a command: say what is being done, on stderr
        logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        written = make_report(args.log, args.out)
    except (OSError, ValueError, ImportError) as err:
        print(f"{parser.prog}: error: {err}", file=sys.stderr)
        return 2
    print(f"wrote report to {written[0].parent}:")
    for path in written:
        print(f"  {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
