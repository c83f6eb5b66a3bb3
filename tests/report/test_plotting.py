"""The plotting helpers draw exactly the data they are given, off-screen, and fail clearly."""

from __future__ import annotations

import re
import sys

import numpy as np
import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from lightning_spectral.plotting import (
    plot_certified_accuracy,
    plot_curves,
    plot_layer_norms,
    plot_overhead,
)


def _assert_valid_png(fig: Figure, path) -> np.ndarray:
    fig.savefig(path)
    image = imread(path)
    assert image.ndim == 3 and image.shape[2] in (3, 4)
    assert image.shape[0] > 100 and image.shape[1] > 100
    # Not blank: many distinct colours (axes, text and the data's colours).
    colours = np.unique(image[..., :3].reshape(-1, 3), axis=0)
    assert len(colours) > 10
    return image


def test_layer_norms_draws_one_bar_per_given_value(tmp_path):
    bound = {"conv1": 1.5, "conv2": 0.9, "fc": 0.7}
    estimate = {"conv1": 1.4, "conv2": 0.8, "fc": 0.6}
    exact = {"conv1": 1.2, "fc": 0.7}  # conv2 not computed: no bar
    fig = plot_layer_norms(bound, estimate, exact)
    (ax,) = fig.axes
    heights = sorted(round(p.get_height(), 9) for p in ax.patches)
    assert heights == sorted([*bound.values(), *estimate.values(), *exact.values()])
    assert [t.get_text() for t in ax.get_xticklabels()] == ["conv1", "conv2", "fc"]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "Fantastic Four estimate (training)", "guaranteed bound", "exact norm"]
    _assert_valid_png(fig, tmp_path / "layers.png")


def test_layer_norms_with_estimates_only(tmp_path):
    fig = plot_layer_norms(estimate={"a": 2.0, "b": 1.0})
    assert sorted(p.get_height() for p in fig.axes[0].patches) == [1.0, 2.0]
    _assert_valid_png(fig, tmp_path / "est.png")


def test_curves_plot_the_given_points(tmp_path):
    curves = {"max": ([0, 1, 2], [2.0, 1.8, 1.5]), "conv1": ([0, 1, 2], [2.0, 1.8, 1.5]),
              "fc": ([0, 1, 2], [0.5, 0.6, 0.4])}
    fig = plot_curves(curves, xlabel="epoch", title="bounds")
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == list(curves)
    for line, (xs, ys) in zip(lines, curves.values(), strict=True):
        assert list(line.get_xdata()) == xs and list(line.get_ydata()) == ys
    assert lines[0].get_linewidth() > lines[1].get_linewidth()  # the max stands out
    assert all(float(t).is_integer() for t in fig.axes[0].get_xticks())
    _assert_valid_png(fig, tmp_path / "curves.png")


def test_certified_accuracy_one_line_per_family_sorted_by_eps(tmp_path):
    families = {"certified": {0.5: 0.1, 0.1: 0.6, 0.25: 0.3},
                "certified_curvature": {0.1: 0.7, 0.5: 0.2}}
    fig = plot_certified_accuracy(families)
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == list(families)
    assert list(lines[0].get_xdata()) == [0.1, 0.25, 0.5]
    assert list(lines[0].get_ydata()) == [0.6, 0.3, 0.1]
    _assert_valid_png(fig, tmp_path / "cert.png")


def test_overhead_bars_have_the_given_lengths(tmp_path):
    seconds = {"without callback": 0.120, "with callback": 0.126, "constraint": 1.5}
    fig = plot_overhead(seconds)
    (ax,) = fig.axes
    assert [p.get_width() for p in ax.patches] == list(seconds.values())
    labels = [t.get_text() for t in ax.texts]
    assert labels == ["120 ms", "126 ms", "1.5 s"]
    _assert_valid_png(fig, tmp_path / "overhead.png")


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: plot_layer_norms(), "all empty"),
        (lambda: plot_layer_norms({"a": "big"}), "'a' is str"),
        (lambda: plot_curves({}), "nothing to plot"),
        (lambda: plot_curves({"a": ([0, 1], [1.0])}), "2 x values but 1 y values"),
        (lambda: plot_certified_accuracy({}), "nothing to plot"),
        (lambda: plot_certified_accuracy({"certified": {}}), "no (eps, accuracy) points"),
        (lambda: plot_overhead({}), "nothing to plot"),
        (lambda: plot_overhead({"step": None}), "'step' is NoneType"),
    ],
)
def test_bad_input_is_named(call, message):
    with pytest.raises((ValueError, TypeError), match=re.escape(message)):
        call()


def test_missing_matplotlib_names_the_extra(monkeypatch):
    # A None entry in sys.modules makes the import fail as if matplotlib were not installed.
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ImportError, match=r'pip install "lightning-spectral\[plot\]"'):
        plot_overhead({"step": 0.1})
