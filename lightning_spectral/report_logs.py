"""Reading a run's logs for the report: the keys it knows, the log readers, key selection.

A run's log is a CSVLogger ``metrics.csv`` or a TensorBoardLogger directory; :func:`load_log`
finds and reads either into a :class:`RunLog` (every key's series of :class:`Point`). The
selection helpers pick out the keys of one kind (:data:`KEYS`) per layer, their final values
and curves, and the certified accuracies per radius. :mod:`lightning_spectral.report` writes
the report from these.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "KEYS",
    "AGGREGATES",
    "CERTIFIED_ACC",
    "CERTIFIED_RADIUS",
    "LIPSCHITZ",
    "Point",
    "RunLog",
    "read_metrics_csv",
    "read_tensorboard",
    "locate_log",
    "load_log",
    "kind_keys",
    "layer_keys",
    "final_layer_values",
    "curves",
    "certified_families",
]

# ----------------------------------------------------------------------------- key names
# Every key the report understands, in one place. Older releases logged the training-time
# estimates as ``spectral/<layer>``; both spellings are read (the first prefix wins).
KEYS: dict[str, tuple[str, ...]] = {
    "estimate": ("spectral_estimate/", "spectral/"),  # power iteration, training steps
    "bound": ("spectral_bound/",),  # guaranteed upper bound, validation end
    "exact": ("spectral_exact/",),  # exact norm, validation end (exact_every_n_epochs)
    "ratio": ("spectral_ratio/",),  # bound / exact
    "penalty": ("spectral_penalty", "spectral/penalty"),
}
#: Suffixes under the per-layer prefixes that are aggregates, not layer names.
AGGREGATES = frozenset({"max", "step_max", "penalty"})
#: ``<family>/acc@<eps>`` with a family whose last component starts with ``certified``:
#: ``certified``, ``certified_curvature``, ``test/certified``, ... (not e.g. top-k accuracy).
CERTIFIED_ACC = re.compile(r"^(?P<family>(?:.+/)?certified[^/]*)/acc@(?P<eps>[^/]+)$")
CERTIFIED_RADIUS = re.compile(r"^(?:.+/)?certified[^/]*/radius$")
LIPSCHITZ = re.compile(r"^(?:test/)?lipschitz/.+$")

CSV_NAME = "metrics.csv"
TB_GLOB = "events.out.tfevents.*"


@dataclass(frozen=True)
class Point:
    """One logged value: the trainer's global step, the epoch (None if unknown), the value."""

    step: int
    epoch: int | None
    value: float


@dataclass
class RunLog:
    """Every logged series of one run, ``key -> points`` in logging order."""

    source: Path
    series: dict[str, list[Point]]

    def last(self, key: str) -> Point | None:
        points = self.series.get(key)
        return points[-1] if points else None


# ----------------------------------------------------------------------------- reading


def _int_or_none(text: str | None) -> int | None:
    return int(float(text)) if text not in (None, "") else None


def read_metrics_csv(path: Path) -> RunLog:
    """The series of a CSVLogger ``metrics.csv`` (one row per logging call, blanks skipped)."""
    series: dict[str, list[Point]] = {}
    with open(path, newline="") as handle:
        for line, row in enumerate(csv.DictReader(handle), start=2):
            step, epoch = _int_or_none(row.get("step")), _int_or_none(row.get("epoch"))
            for key, text in row.items():
                if key is None:
                    raise ValueError(f"{path}:{line}: more values than the header has columns")
                if key in ("step", "epoch") or text in (None, ""):
                    continue
                try:
                    value = float(text)
                except ValueError:
                    raise ValueError(f"{path}:{line}: {key}={text!r} is not a number") from None
                series.setdefault(key, []).append(Point(step or 0, epoch, value))
    return RunLog(path, series)


def read_tensorboard(directory: Path) -> RunLog:
    """Scalars of the TensorBoard event files in ``directory`` (needs ``tensorboard``)."""
    try:
        from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    except ImportError:
        raise ImportError(
            f"{directory} holds TensorBoard event files, but reading them needs the "
            "'tensorboard' package (pip install tensorboard); or log with CSVLogger"
        ) from None
    acc = EventAccumulator(str(directory), size_guidance={"scalars": 0})
    acc.Reload()
    tags = acc.Tags()["scalars"]
    # Lightning logs the epoch as a scalar of its own: map each step to it.
    epochs = {e.step: int(e.value) for e in acc.Scalars("epoch")} if "epoch" in tags else {}
    series = {
        tag: [Point(e.step, epochs.get(e.step), float(e.value)) for e in acc.Scalars(tag)]
        for tag in tags
        if tag != "epoch"
    }
    return RunLog(directory, series)


def _version_number(path: Path) -> int | None:
    match = re.fullmatch(r"version_(\d+)", path.name)
    return int(match[1]) if match and path.is_dir() else None


def _has_log(directory: Path) -> bool:
    return (directory / CSV_NAME).is_file() or any(directory.glob(TB_GLOB))


def _latest_version(directory: Path) -> Path | None:
    versions = [(n, p) for p in directory.iterdir() if (n := _version_number(p)) is not None]
    versions = [(n, p) for n, p in versions if _has_log(p)]
    return max(versions)[1] if versions else None


def locate_log(path: str | Path) -> Path:
    """The metrics file or event directory that ``path`` designates (see the module doc)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"log path {str(path)!r} does not exist")
    if path.is_file():
        if path.name.startswith("events.out.tfevents."):
            return path.parent
        return path
    if _has_log(path):
        return path / CSV_NAME if (path / CSV_NAME).is_file() else path
    if (latest := _latest_version(path)) is not None:
        return locate_log(latest)
    # A logger's save_dir: <save_dir>/<name>/version_N. Only one <name> can be meant.
    roots = sorted(p for p in path.iterdir() if p.is_dir() and _latest_version(p) is not None)
    if len(roots) == 1:
        return locate_log(roots[0])
    if roots:
        names = ", ".join(str(r) for r in roots)
        raise ValueError(f"{path} holds several loggers' runs ({names}); pass one of them")
    raise FileNotFoundError(
        f"no {CSV_NAME} (CSVLogger) and no TensorBoard event file in {path} "
        "nor in its version_N subdirectories"
    )


def load_log(path: str | Path) -> RunLog:
    """Read the run that ``path`` designates; raise if it logged no spectral key."""
    found = locate_log(path)
    log = read_tensorboard(found) if found.is_dir() else read_metrics_csv(found)
    if not any(_is_known(key) for key in log.series):
        keys = ", ".join(sorted(log.series)) or "none"
        raise ValueError(
            f"{log.source} contains no spectral or certification keys (expected e.g. "
            f"spectral_bound/max, spectral_estimate/<layer>, certified/acc@<eps>); "
            f"keys found: {keys}"
        )
    return log


def _is_known(key: str) -> bool:
    prefixes = tuple(p for group in KEYS.values() for p in group)
    return key.startswith(prefixes) or bool(
        CERTIFIED_ACC.match(key) or CERTIFIED_RADIUS.match(key) or LIPSCHITZ.match(key)
    )


# ----------------------------------------------------------------------------- selecting


def kind_keys(log: RunLog, kind: str) -> dict[str, str]:
    """``suffix -> key`` for one kind in KEYS; an earlier prefix wins over a later one."""
    out: dict[str, str] = {}
    for prefix in reversed(KEYS[kind]):
        out.update({k[len(prefix) :]: k for k in log.series if k.startswith(prefix)})
    return out


def layer_keys(log: RunLog, kind: str) -> dict[str, str]:
    """``layer -> key`` of one kind, aggregates (``max``, ...) left out."""
    return {n: k for n, k in kind_keys(log, kind).items() if n and n not in AGGREGATES}


def final_layer_values(log: RunLog, kind: str) -> dict[str, float]:
    """The last logged value of each layer for one kind (``"bound"``, ``"exact"``, ...)."""
    return {n: log.series[k][-1].value for n, k in layer_keys(log, kind).items()}


def curves(log: RunLog, kind: str, by_epoch: bool) -> dict[str, tuple[list[int], list[float]]]:
    """``name -> (x, y)`` for the ``max`` and every layer of one kind, x = step or epoch."""
    keys = layer_keys(log, kind)
    if "max" in (agg := kind_keys(log, kind)):
        keys = {"max": agg["max"], **keys}
    out = {}
    for name, key in keys.items():
        points = [p for p in log.series[key] if not by_epoch or p.epoch is not None]
        # by_epoch: every point kept has an epoch (the test is for the type checker)
        xs = [p.epoch if by_epoch and p.epoch is not None else p.step for p in points]
        out[name] = (xs, [p.value for p in points])
    return out


def certified_families(log: RunLog) -> dict[str, dict[float, float]]:
    """``family -> {eps: final certified accuracy}`` for every ``<family>/acc@<eps>`` key."""
    out: dict[str, dict[float, float]] = {}
    for key, points in log.series.items():
        if match := CERTIFIED_ACC.match(key):
            try:
                eps = float(match["eps"])
            except ValueError:
                continue  # acc@<something else> is not a radius
            out.setdefault(match["family"], {})[eps] = points[-1].value
    return out
