"""Tests for neuronlib.plots: each figure draws what its docstring says (on Agg)."""

from __future__ import annotations

import itertools
import sys
import types
import warnings
from types import SimpleNamespace

import IPython.display
import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from matplotlib.colors import to_rgba
from matplotlib.ticker import PercentFormatter

from neuronlib import plots


@pytest.fixture(autouse=True)
def _agg_and_close():
    plt.switch_backend("Agg")
    yield
    plt.close("all")


def _rows(n_epochs=3, sets=("train", "val", "test")):
    rows = []
    for epoch in range(1, n_epochs + 1):
        row = {"epoch": epoch, "lr": 0.1, "wall_time": float(epoch)}
        for k, s in enumerate(sets):
            row[f"{s}_loss"] = 2.0 / epoch + 0.1 * k
            row[f"{s}_acc"] = 0.5 + 0.1 * epoch - 0.01 * k
        rows.append(row)
    return rows


def _lines(ax):
    """Data lines of an axes (without the vertical divergence marker)."""
    return [line for line in ax.get_lines() if line.get_label() != "diverged"]


def _luminance(rgba):
    r, g, b = rgba[:3]
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def _colorbar_axes(fig, main_axes):
    return [ax for ax in fig.axes if ax not in main_axes]


# set_style


def test_set_style_sets_dpi_and_is_idempotent():
    with mpl.rc_context():
        plots.set_style()
        first = dict(mpl.rcParams)
        plots.set_style()

        assert mpl.rcParams["figure.dpi"] == 100
        assert mpl.rcParams["axes.labelsize"] >= 10
        assert dict(mpl.rcParams) == first


# depth colours


@pytest.mark.parametrize("cmap", ["viridis", "magma", "cividis"])
def test_depth_colors_darken_to_lighten_monotonically_with_depth(cmap):
    colors = plots.depth_colors(6, cmap)

    assert len(colors) == 6
    assert all(len(c) == 4 for c in colors)
    luminance = [_luminance(c) for c in colors]
    assert all(a < b for a, b in itertools.pairwise(luminance))


def test_depth_colors_single_layer_and_colormap_object():
    assert plots.depth_colors(1) == [tuple(mpl.colormaps["viridis"](0.0))]
    assert len(plots.depth_colors(3, mpl.colormaps["plasma"])) == 3


@pytest.mark.parametrize("n", [0, -1, 2.5, True])
def test_depth_colors_rejects_bad_layer_count(n):
    with pytest.raises(ValueError, match="integer >= 1"):
        plots.depth_colors(n)


def test_depth_colors_rejects_unknown_colormap():
    with pytest.raises(ValueError, match="Unknown colormap 'nope'"):
        plots.depth_colors(3, "nope")


def test_depth_colorbar_has_layer_label_and_integer_ticks():
    fig, ax = plt.subplots()
    colorbar = plots.depth_colorbar(fig, ax, 5)

    assert colorbar.ax.get_ylabel() == "layer"
    assert list(colorbar.get_ticks()) == [1, 2, 3, 4, 5]
    # one colour band per layer, the same colours as depth_colors
    assert colorbar.cmap.N == 5
    np.testing.assert_allclose(
        colorbar.cmap(np.arange(5)), np.array(plots.depth_colors(5))
    )


@pytest.mark.parametrize(
    ("n", "expected"),
    [(16, [2, 4, 6, 8, 10, 12, 14, 16]), (20, [1, 5, 10, 15, 20]), (13, None)],
)
def test_depth_colorbar_thins_ticks_for_deep_networks(n, expected):
    fig, ax = plt.subplots()
    ticks = [float(t) for t in plots.depth_colorbar(fig, ax, n).get_ticks()]

    assert all(t.is_integer() and 1 <= t <= n for t in ticks)
    assert 3 <= len(ticks) <= 9
    if expected is not None:
        assert ticks == expected


# plot_history


def test_plot_history_from_history_object_draws_each_set():
    history = SimpleNamespace(epochs=_rows(4), diverged=False)
    fig = plots.plot_history(history)

    loss_ax, acc_ax = fig.axes
    assert loss_ax.get_xlabel() == "epoch"
    assert acc_ax.get_xlabel() == "epoch"
    assert "cross-entropy loss" in loss_ax.get_ylabel()
    assert acc_ax.get_ylabel() == "accuracy"
    for ax, metric in [(loss_ax, "loss"), (acc_ax, "acc")]:
        lines = _lines(ax)
        assert [line.get_label() for line in lines] == ["train", "val", "test"]
        for line, s in zip(lines, ["train", "val", "test"], strict=True):
            np.testing.assert_allclose(line.get_xdata(), [1, 2, 3, 4])
            expected = [row[f"{s}_{metric}"] for row in history.epochs]
            np.testing.assert_allclose(line.get_ydata(), expected)
    assert isinstance(acc_ax.yaxis.get_major_formatter(), PercentFormatter)


def test_plot_history_accepts_list_and_to_dict_forms():
    rows = _rows(2)
    fig_list = plots.plot_history(rows)
    fig_dict = plots.plot_history({"epochs": rows, "diverged": False})

    for fig in (fig_list, fig_dict):
        assert len(fig.axes) == 2
        assert len(_lines(fig.axes[0])) == 3


def test_plot_history_skips_missing_sets():
    fig = plots.plot_history(_rows(3, sets=("train", "val")), metrics=("loss",))

    assert [line.get_label() for line in _lines(fig.axes[0])] == ["train", "val"]


@pytest.mark.parametrize(
    ("last_loss", "stop"), [(float("nan"), 2.0), (0.5, 2.5)], ids=["nan", "finite"]
)
def test_plot_history_marks_divergence(last_loss, stop):
    rows = _rows(2)
    rows[-1]["train_loss"] = last_loss
    fig = plots.plot_history(SimpleNamespace(epochs=rows, diverged=True))

    for ax in fig.axes:
        markers = [line for line in ax.get_lines() if line.get_label() == "diverged"]
        assert len(markers) == 1
        np.testing.assert_allclose(markers[0].get_xdata(), [stop, stop])
        assert "diverged" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_plot_history_does_not_mark_runs_that_did_not_diverge():
    fig = plots.plot_history(SimpleNamespace(epochs=_rows(2), diverged=False))

    assert all(len(_lines(ax)) == len(ax.get_lines()) for ax in fig.axes)


def test_plot_history_diverged_before_first_epoch_still_draws():
    fig = plots.plot_history(SimpleNamespace(epochs=[], diverged=True))

    assert any("diverged" in t.get_text() for t in fig.axes[0].texts)


def test_plot_history_unsplit_metric_and_given_axes():
    fig, axes = plt.subplots(1, 2)
    out = plots.plot_history(_rows(3), metrics=("loss", "lr"), axes=axes)

    assert out is fig
    assert axes[1].get_ylabel() == "learning rate"
    assert len(_lines(axes[1])) == 1


def test_plot_history_errors_name_the_fix():
    with pytest.raises(ValueError, match="no column for metric 'f1'"):
        plots.plot_history(_rows(2), metrics=("f1",))
    with pytest.raises(ValueError, match="no epochs"):
        plots.plot_history([])
    with pytest.raises(ValueError, match="one Axes per metric"):
        plots.plot_history(_rows(2), axes=plt.subplots()[1])
    with pytest.raises(TypeError, match="list of per-epoch dicts"):
        plots.plot_history(3.0)


# plot_layer_curves


def test_plot_layer_curves_one_line_per_layer_coloured_by_depth():
    values = np.arange(12, dtype=float).reshape(4, 3)
    fig = plots.plot_layer_curves(values, ylabel="sign consistency")

    ax = fig.axes[0]
    lines = ax.get_lines()
    assert len(lines) == 4
    assert ax.get_xlabel() == "epoch"
    assert ax.get_ylabel() == "sign consistency"
    expected = plots.depth_colors(4)
    for line, row, color in zip(lines, values, expected, strict=True):
        np.testing.assert_allclose(line.get_xdata(), [1, 2, 3])
        np.testing.assert_allclose(line.get_ydata(), row)
        assert to_rgba(line.get_color()) == pytest.approx(color)
    luminance = [_luminance(to_rgba(line.get_color())) for line in lines]
    assert luminance == sorted(luminance)
    (colorbar_ax,) = _colorbar_axes(fig, [ax])
    assert colorbar_ax.get_ylabel() == "layer"


def test_plot_layer_curves_mapping_tensor_and_x():
    values = {"fc1": torch.tensor([0.0, 0.1]), "fc2": [0.0, 0.3], "out": (0.0, 0.5)}
    fig, ax = plt.subplots()
    out = plots.plot_layer_curves(
        values, x=[0, 5], ylabel="cosine distance to initialisation", ax=ax
    )

    assert out is fig
    assert [line.get_label() for line in ax.get_lines()] == ["fc1", "fc2", "out"]
    np.testing.assert_allclose(ax.get_lines()[2].get_xdata(), [0, 5])
    np.testing.assert_allclose(ax.get_lines()[2].get_ydata(), [0.0, 0.5])


def test_plot_layer_curves_rejects_bad_input():
    with pytest.raises(ValueError, match="has 2 values but x has 3"):
        plots.plot_layer_curves({"fc1": [1, 2]}, x=[0, 1, 2], ylabel="y")
    with pytest.raises(ValueError, match=r"\[L, T\]"):
        plots.plot_layer_curves(np.zeros(3), ylabel="y")
    with pytest.raises(ValueError, match="no layers"):
        plots.plot_layer_curves({}, ylabel="y")


# image_grid


def _reference_mosaic(images, per_row, pad):
    """Mosaic built by padding each image and concatenating rows and columns."""
    n = images.shape[0]
    tiles = [
        np.pad(
            img.transpose(1, 2, 0),
            ((pad, 0), (pad, 0), (0, 0)),
            "constant",
            constant_values=1.0,
        )
        for img in images
    ]
    blank = np.ones_like(tiles[0])
    rows = []
    for start in range(0, n, per_row):
        row_tiles = tiles[start : start + per_row]
        row_tiles += [blank] * (per_row - len(row_tiles))
        rows.append(np.concatenate(row_tiles, axis=1))
    mosaic = np.concatenate(rows, axis=0)
    return np.pad(mosaic, ((0, pad), (0, pad), (0, 0)), constant_values=1.0)


@pytest.mark.parametrize("channels", [1, 3], ids=["gray", "rgb"])
def test_image_grid_shows_the_mosaic_of_the_inputs(channels):
    rng = np.random.default_rng(0)
    images = rng.random((5, channels, 4, 6))
    fig = plots.image_grid(torch.from_numpy(images), nrow=2, padding=1)

    ax = fig.axes[0]
    (shown,) = ax.get_images()
    expected = _reference_mosaic(images, 2, 1)
    if channels == 1:
        expected = expected[..., 0]
    np.testing.assert_allclose(np.asarray(shown.get_array()), expected)
    assert len(ax.get_xticks()) == 0 and len(ax.get_yticks()) == 0


def test_image_grid_titles_one_per_image():
    images = np.zeros((3, 1, 8, 8))
    fig = plots.image_grid(images, nrow=3, titles=["cat", "dog", "ship"])

    assert [t.get_text() for t in fig.axes[0].texts] == ["cat", "dog", "ship"]


def test_image_grid_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        plots.image_grid(np.zeros((2, 2, 4, 4)), nrow=1)
    with pytest.raises(ValueError, match="denormalise"):
        plots.image_grid(np.full((2, 1, 4, 4), -0.5), nrow=1)
    with pytest.raises(ValueError, match="one title per image"):
        plots.image_grid(np.zeros((2, 1, 4, 4)), nrow=1, titles=["a"])
    with pytest.raises(ValueError, match="nrow"):
        plots.image_grid(np.zeros((2, 1, 4, 4)), nrow=0)


# glue_figure


def test_glue_figure_outside_ipython_closes_silently(capsys):
    fig, _ = plt.subplots()
    plots.glue_figure("fig-a", fig)

    assert plt.get_fignums() == []
    assert capsys.readouterr().out == ""


def test_glue_figure_without_myst_nb_displays_once(monkeypatch):
    shown = []
    monkeypatch.setattr(plots, "_ipython_shell", lambda: object())
    monkeypatch.setitem(sys.modules, "myst_nb", None)  # import now fails
    import IPython.display

    monkeypatch.setattr(IPython.display, "display", lambda obj: shown.append(obj))
    fig, _ = plt.subplots(figsize=(4, 3))
    plots.glue_figure("fig-b", fig)

    assert len(shown) == 1
    _assert_png_of(shown[0], fig)
    assert plt.get_fignums() == []


def _assert_png_of(image, fig):
    # A PNG image (not the bare figure, which has no formatter under Agg), rendered
    # at twice the figure's dpi and shown at the figure's size.
    assert isinstance(image, IPython.display.Image)
    assert image.format == "png" and image.data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = int.from_bytes(image.data[16:20], "big")
    assert image.width == pixels // 2
    # bbox_inches="tight" trims the white margin, so the image is a little narrower.
    on_screen = fig.get_figwidth() * fig.dpi
    assert 0.8 * on_screen <= image.width <= on_screen


def test_glue_figure_with_myst_nb_glues_and_displays(monkeypatch):
    calls = []
    fake = types.ModuleType("myst_nb")
    fake.glue = lambda name, obj, display=True: calls.append((name, obj, display))
    monkeypatch.setattr(plots, "_ipython_shell", lambda: object())
    monkeypatch.setitem(sys.modules, "myst_nb", fake)
    fig, _ = plt.subplots(figsize=(4, 3))
    plots.glue_figure("fig-c", fig)

    assert [(name, display) for name, _, display in calls] == [("fig-c", True)]
    _assert_png_of(calls[0][1], fig)
    assert plt.get_fignums() == []


def test_glue_figure_many_figures_raise_no_too_many_figures_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for i in range(25):
            plots.glue_figure(f"fig-{i}", plots.plot_layer_curves([[0, 1]], ylabel="y"))

    assert plt.get_fignums() == []


@pytest.mark.parametrize("name", ["", "two words", None])
def test_glue_figure_rejects_bad_name(name):
    fig, _ = plt.subplots()
    with pytest.raises(ValueError, match="glue name"):
        plots.glue_figure(name, fig)
