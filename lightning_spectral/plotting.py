"""Figures of a run's spectral values, from plain data (dicts and lists, no pandas).

Every function returns a :class:`matplotlib.figure.Figure` attached to the Agg canvas: nothing
needs a screen and nothing touches ``pyplot``'s global state, so figures can be made in
tests, on servers and in notebooks alike (``fig.savefig("x.png")`` writes it).

matplotlib is an optional dependency, imported when a figure is made:
``pip install "lightning-spectral[plot]"``.

What the values mean (see ``docs/report.md``): for a layer with operator ``A``,

* the *estimate* is a power-iteration value of the Fantastic Four bound
  ``sqrt(prod k) * min_A ||M_A||_2``; it approaches that bound from below and is no certificate;
* the *guaranteed bound* ``b`` satisfies ``||A||_2 <= b`` for certain;
* the *exact norm* is ``||A||_2`` itself, so ``exact <= bound`` and ``bound / exact >= 1``
  measures how loose the bound is.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "plot_certified_accuracy",
    "plot_curves",
    "plot_layer_norms",
    "plot_overhead",
]

PLOT_EXTRA_HINT = 'pip install "lightning-spectral[plot]"'

#: A curve: x values (steps or epochs) and y values of equal length.
Curve = tuple[Sequence[float], Sequence[float]]


def _new_figure(width: float = 7.0, height: float = 4.0) -> Figure:
    """An empty Figure on the Agg canvas; the ImportError names the extra to install."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise ImportError(
            f"plotting needs matplotlib, which is not installed: {PLOT_EXTRA_HINT}"
        ) from err
    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)  # attaches itself to fig: savefig renders without a display
    return fig


def _check_numbers(what: str, values: Mapping[str, float]) -> None:
    for name, value in values.items():
        try:
            float(value)
        except (TypeError, ValueError):
            raise TypeError(
                f"{what}: value of {name!r} is {type(value).__name__} {value!r}, not a number"
            ) from None


def plot_layer_norms(
    bound: Mapping[str, float] | None = None,
    estimate: Mapping[str, float] | None = None,
    exact: Mapping[str, float] | None = None,
    title: str = "Per-layer spectral norms",
) -> Figure:
    """Grouped bars per layer: estimate, guaranteed bound and exact norm, where given.

    Layers are listed in the order they first appear in ``bound``, ``estimate``, ``exact``; a
    layer missing from one mapping has no bar there. For every layer ``exact <= bound`` holds
    for a correct bound, so an exact bar above its bound bar is a visible error.
    """
    given = [("Fantastic Four estimate (training)", estimate), ("guaranteed bound", bound),
             ("exact norm", exact)]
    series = [(label, values) for label, values in given if values]
    if not series:
        raise ValueError("plot_layer_norms: bound, estimate and exact are all empty")
    for label, values in series:
        _check_numbers(label, values)
    layers = list(dict.fromkeys(n for values in (bound, estimate, exact) if values for n in values))
    fig = _new_figure(max(6.0, 0.5 * len(layers) * len(series) + 2.0), 4.0)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for i, (label, values) in enumerate(series):
        xs = [j + (i - (len(series) - 1) / 2) * width for j, n in enumerate(layers) if n in values]
        ax.bar(xs, [values[n] for n in layers if n in values], width, label=label)
    many = len(layers) > 4  # long names overlap unless tilted
    ax.set_xticks(range(len(layers)), layers, rotation=30 if many else 0,
                  ha="right" if many else "center")
    ax.margins(y=0.25)  # room above the tallest bar for the legend
    ax.set_ylabel("spectral norm (l2 operator norm)")
    ax.set_title(title)
    ax.legend()
    return fig


def plot_curves(
    curves: Mapping[str, Curve],
    xlabel: str = "step",
    ylabel: str = "spectral norm",
    title: str = "",
    highlight: str | None = "max",
    integer_x: bool = True,
) -> Figure:
    """One line per named curve ``name -> (xs, ys)``; ``highlight`` is drawn thick and black.

    ``integer_x`` puts ticks on whole numbers only (steps and epochs are counts).

    Used for the bounds over training: the maximum over layers (``highlight``) and each layer.
    """
    if not curves:
        raise ValueError("curves: nothing to plot (empty mapping)")
    fig = _new_figure()
    ax = fig.add_subplot()
    for name, (xs, ys) in curves.items():
        if len(xs) != len(ys):
            raise ValueError(f"curve {name!r}: {len(xs)} x values but {len(ys)} y values")
        style = {"color": "black", "linewidth": 2.5} if name == highlight else {"linewidth": 1}
        ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=3, label=name, **style)
    if integer_x:
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize="small", ncols=2 if len(curves) > 8 else 1)
    return fig


def plot_certified_accuracy(
    families: Mapping[str, Mapping[float, float]],
    title: str = "Certified robust accuracy",
) -> Figure:
    """Certified accuracy against the l2 radius eps, one line per certificate kind.

    ``families`` maps a certificate kind (e.g. ``"certified"``, ``"certified_curvature"``) to
    ``{eps: accuracy}``. Each point is the share of samples classified correctly with certified
    radius ``>= eps``, so every line is non-increasing in eps for a fixed model.
    """
    if not families:
        raise ValueError("families: nothing to plot (empty mapping)")
    fig = _new_figure(6.0, 4.0)
    ax = fig.add_subplot()
    for name, points in families.items():
        if not points:
            raise ValueError(f"family {name!r}: no (eps, accuracy) points")
        eps = sorted(points)
        ax.plot(eps, [points[e] for e in eps], marker="o", label=name)
    ax.set_xlabel("eps (l2 radius)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title(title)
    ax.legend()
    return fig


def plot_overhead(seconds: Mapping[str, float], title: str = "Time per step") -> Figure:
    """Horizontal bars of ``name -> seconds`` (e.g. step time with and without the callback)."""
    if not seconds:
        raise ValueError("plot_overhead: nothing to plot (empty mapping)")
    _check_numbers("seconds", seconds)
    names = list(seconds)
    fig = _new_figure(6.0, 1.0 + 0.45 * len(names))
    ax = fig.add_subplot()
    bars = ax.barh(range(len(names)), [seconds[n] for n in names])
    ax.bar_label(bars, [_format_seconds(seconds[n]) for n in names], padding=3)
    ax.set_yticks(range(len(names)), names)
    ax.invert_yaxis()  # first entry on top, as in the mapping
    ax.set_xlabel("seconds")
    ax.set_title(title)
    return fig


def _format_seconds(value: float) -> str:
    return f"{value * 1e3:.3g} ms" if abs(value) < 1 else f"{value:.3g} s"
