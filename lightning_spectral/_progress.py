"""Progress for long computations: a tqdm bar and a one-line message, where a user waits.

Inside Lightning hooks (``trainer`` given) a bar is shown only when the trainer has an enabled
progress bar (``enable_progress_bar=True``, the default) and only on global rank zero; outside
Lightning (``trainer=None``) as tqdm decides. In both cases tqdm's own rule applies as well: no
bar when standard error is not a terminal (logs, CI, pytest's capture). A bar appears only once
the work has taken :data:`DELAY_S` seconds, so quick computations print nothing.

Messages (:func:`announce`) go through Lightning's ``rank_zero_info`` (the
``lightning.pytorch`` logger, on rank zero), where Lightning prints its own notices.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

__all__ = ["DELAY_S", "SLOW_COST", "announce", "bars_enabled", "progress"]

T = TypeVar("T")

DELAY_S = 1.0
"""Seconds of work after which a bar appears (tqdm's ``delay``)."""

SLOW_COST = 2e9
"""Multiply-adds (the ``opnorm_cost`` model) above which a computation is announced: a few
seconds on one CPU thread."""

def _rank_zero(trainer: Any | None) -> bool:
    return trainer is None or bool(getattr(trainer, "is_global_zero", True))


def bars_enabled(trainer: Any | None) -> bool | None:
    """Whether a bar may be shown: ``False`` when the trainer's progress bar is disabled or
    this is not rank zero; ``None`` (tqdm decides: a terminal or not) otherwise."""
    if trainer is None:
        return None
    bar = getattr(trainer, "progress_bar_callback", None)
    if bar is None or not bar.is_enabled or not _rank_zero(trainer):
        return False
    return None


def progress(items: Iterable[T], *, total: int, desc: str, trainer: Any | None = None,
             unit: str = "layer") -> Iterator[T]:
    """``items`` with a tqdm bar (``leave=False``) when :func:`bars_enabled` allows it."""
    enabled = bars_enabled(trainer)
    disable = True if enabled is False else None  # None: tqdm disables on a non-terminal
    with tqdm(items, total=total, desc=desc, unit=unit, leave=False, delay=DELAY_S,
              disable=disable) as bar:
        yield from bar


def announce(message: str, trainer: Any | None = None) -> None:
    """Log ``message`` at INFO on rank zero (``lightning.pytorch``'s handler prints it)."""
    if _rank_zero(trainer):
        from lightning.pytorch.utilities.rank_zero import rank_zero_info

        rank_zero_info(message)
