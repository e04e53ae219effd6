"""Figures in the book's conventions, and the helper that puts them in the book.

Every chapter draws with the same few rules (see ``STYLE.md``):

- both axes say what they show and in which unit;
- per-layer quantities get one line per layer, coloured by depth with a sequential
  colormap, and a colourbar labelled "layer" with the layer numbers 1..L (depth is
  the order of :func:`neuronlib.models.weight_layers`);
- a figure enters the book through :func:`glue_figure` and a ``{glue:figure}``
  directive, which gives it a number, a caption and a ``{numref}`` target.

The recipe for a chapter cell that makes a figure::

    fig = plots.plot_history(history)          # any function here, or your own
    plots.glue_figure("fig-learning-curves", fig)

Tag that cell ``remove-output``. Then, in a Markdown cell::

    ```{glue:figure} fig-learning-curves
    :name: fig-learning-curves

    The training loss falls below 0.1 nats within five epochs.
    ```

and cite it in the text as::

    {numref}`fig-learning-curves`

The figure shows once in
Jupyter or Colab (as the cell's output, also where ``myst_nb`` is not installed)
and once in the built book (where the directive stands; ``remove-output`` hides
the cell's own copy, and ``myst_nb`` reads the glued figure from the outputs before
the tag is applied).
"""

from __future__ import annotations

import io
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib as mpl
import matplotlib.pyplot as plt
import numpy as np
import seaborn as sns
from matplotlib.axes import Axes
from matplotlib.cm import ScalarMappable
from matplotlib.colorbar import Colorbar
from matplotlib.colors import BoundaryNorm, Colormap, ListedColormap
from matplotlib.figure import Figure
from matplotlib.ticker import PercentFormatter

logger = logging.getLogger(__name__)

__all__ = [
    "METRIC_LABELS",
    "SET_COLORS",
    "depth_colorbar",
    "depth_colors",
    "glue_figure",
    "image_grid",
    "plot_history",
    "plot_layer_curves",
    "set_style",
]

#: Axis labels of the metrics a :class:`neuronlib.train.History` records.
METRIC_LABELS: dict[str, str] = {
    "loss": "cross-entropy loss (nats)",
    "acc": "accuracy",
    "lr": "learning rate",
    "wall_time": "wall-clock time (s)",
}

#: One colour per data split, the same in every chapter (seaborn "colorblind").
SET_COLORS: dict[str, str] = {
    "train": "#0173b2",
    "val": "#de8f05",
    "test": "#029e73",
}

# The part of a colormap that depth colours use: the brightest tenth of viridis is
# a pale yellow that is hard to see on a white background.
_DEPTH_SPAN = (0.0, 0.9)
# Above this many layers the colourbar shows a subset of the layer numbers.
_MAX_DEPTH_TICKS = 12


def set_style() -> None:
    """Apply the book's plotting theme (seaborn "whitegrid", readable fonts).

    Call it once in the setup cell of every chapter. It is idempotent.
    Figures are drawn at 100 dpi (what Jupyter and the book's HTML show), saved at
    200 dpi, and use constrained layout so that colourbars and labels fit.
    """
    sns.set_theme(
        context="notebook",
        style="whitegrid",
        palette="colorblind",
        rc={
            "figure.figsize": (6.4, 4.0),
            "figure.dpi": 100,
            "savefig.dpi": 200,
            "savefig.bbox": "tight",
            "figure.constrained_layout.use": True,
            "axes.titlesize": 13,
            "axes.labelsize": 12,
            "xtick.labelsize": 10,
            "ytick.labelsize": 10,
            "legend.fontsize": 10,
            "legend.frameon": False,
            "axes.spines.top": False,
            "axes.spines.right": False,
            "image.cmap": "viridis",
        },
    )


def _get_cmap(cmap: str | Colormap) -> Colormap:
    if isinstance(cmap, Colormap):
        return cmap
    try:
        return mpl.colormaps[cmap]
    except KeyError as error:
        raise ValueError(
            f"Unknown colormap {cmap!r}; pass a matplotlib colormap name such as "
            "'viridis', 'magma' or 'cividis'."
        ) from error


def _check_layer_count(n: int) -> None:
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"Invalid number of layers {n!r}: pass an integer >= 1.")


def depth_colors(
    n: int, cmap: str | Colormap = "viridis"
) -> list[tuple[float, float, float, float]]:
    """Return one colour per layer, from shallow to deep.

    The colours are evenly spaced samples of a sequential colormap (its darkest
    90 %, so that the deepest layer stays visible on white), so the lightness
    changes monotonically with depth.

    Args:
        n: Number of layers L.
        cmap: Name of a matplotlib colormap, or a ``Colormap``.

    Returns:
        L RGBA tuples; entry ``i`` is the colour of layer ``i + 1``.

    Raises:
        ValueError: If ``n`` is not a positive integer or ``cmap`` is unknown.
    """
    _check_layer_count(n)
    colormap = _get_cmap(cmap)

    positions = np.linspace(*_DEPTH_SPAN, int(n)) if n > 1 else np.zeros(1)
    return [tuple(float(c) for c in colormap(p)) for p in positions]


def depth_colorbar(
    fig: Figure,
    ax: Axes | Sequence[Axes],
    n: int,
    cmap: str | Colormap = "viridis",
    label: str = "layer",
) -> Colorbar:
    """Add a discrete colourbar that maps the layer number 1..L to its colour.

    Args:
        fig: The figure to draw in.
        ax: The axes (or list of axes) the colourbar belongs to; space is taken
            from them.
        n: Number of layers L.
        cmap: The colormap given to :func:`depth_colors`.
        label: The colourbar's label; keep "layer" for the book's convention.

    Returns:
        The colourbar, with one colour band and an integer tick per layer (every
        2nd, 5th, 10th, ... layer number when L is above 12).

    Raises:
        ValueError: If ``n`` is not a positive integer or ``cmap`` is unknown.
    """
    colors = depth_colors(n, cmap)
    norm = BoundaryNorm(np.arange(0.5, n + 1.5), ncolors=n)
    mappable = ScalarMappable(norm=norm, cmap=ListedColormap(colors))

    ticks = _depth_ticks(n)
    colorbar = fig.colorbar(mappable, ax=ax, ticks=ticks)
    colorbar.set_label(label)
    colorbar.minorticks_off()
    return colorbar


def _depth_ticks(n: int) -> list[int]:
    """Layer numbers to label: all of 1..n, or every 2nd / 5th / 10th / ... one."""
    if n <= _MAX_DEPTH_TICKS:
        return list(range(1, n + 1))
    step = next(
        s for s in (m * 10**e for e in range(12) for m in (1, 2, 5)) if n / s <= 8
    )
    # Layer 1 is labelled too when it is not crowded by the first multiple.
    return ([1] if step >= 4 else []) + list(range(step, n + 1, step))


def _history_rows(history: Any) -> tuple[list[Mapping[str, Any]], bool]:
    """Return the per-epoch rows of a History, its dict form, or a list of rows."""
    if hasattr(history, "epochs"):
        return list(history.epochs), bool(getattr(history, "diverged", False))
    if isinstance(history, Mapping):
        if "epochs" not in history:
            raise ValueError(
                f"The mapping given as history has keys {sorted(history)} but no "
                "'epochs'; pass a History, History.to_dict(), or a list of "
                "per-epoch dicts."
            )
        return list(history["epochs"]), bool(history.get("diverged", False))
    if isinstance(history, Sequence) and not isinstance(history, str):
        if not all(isinstance(row, Mapping) for row in history):
            raise TypeError(
                "A history given as a list must hold one dict per epoch (keys such "
                "as 'epoch', 'train_loss', 'val_acc'); got "
                f"{[type(row).__name__ for row in history][:3]}."
            )
        return list(history), False
    raise TypeError(
        f"Cannot plot a history of type {type(history).__name__}; pass a History, "
        "History.to_dict(), or a list of per-epoch dicts."
    )


def _column(rows: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    return np.array([float(row.get(key, np.nan)) for row in rows], dtype=float)


def _as_axes_list(axes: Axes | Sequence[Axes], count: int) -> list[Axes]:
    axes_list = [axes] if isinstance(axes, Axes) else list(np.ravel(axes))
    if len(axes_list) != count:
        raise ValueError(
            f"Got {len(axes_list)} axes for {count} metrics; pass one Axes per "
            "metric, or axes=None to make a new figure."
        )
    return axes_list


def plot_history(
    history: Any,
    *,
    metrics: Sequence[str] = ("loss", "acc"),
    sets: Sequence[str] = ("train", "val", "test"),
    axes: Axes | Sequence[Axes] | None = None,
) -> Figure:
    """Draw learning curves, one panel per metric and one line per data split.

    Args:
        history: A :class:`neuronlib.train.History` (``.epochs``, a list of
            per-epoch dicts, and ``.diverged``), its ``to_dict()`` form, or a
            plain list of per-epoch dicts with keys such as ``epoch``,
            ``train_loss``, ``val_acc``.
        metrics: Metrics to draw, each in its own panel: ``"loss"``, ``"acc"``, or
            any key suffix ``m`` for which ``"<set>_m"`` columns exist. A metric
            recorded once per epoch without a split (``"lr"``, ``"wall_time"``)
            is drawn as one line.
        sets: Data splits to draw; splits missing from the history are skipped.
        axes: One Axes per metric to draw into; a new figure when ``None``.

    Returns:
        The figure. x is the epoch (1-based, from the ``epoch`` key when present);
        accuracy axes show percentages. A run that diverged is marked by a
        dashed red vertical line labelled "diverged": at its last recorded epoch
        when that epoch's training loss is not finite, else half an epoch after
        it.

    Raises:
        ValueError: If ``metrics`` is empty, a metric has no column in the
            history, the history has no epochs and did not diverge, or ``axes``
            does not hold one Axes per metric.
        TypeError: If ``history`` is not one of the accepted forms.
    """
    rows, diverged = _history_rows(history)
    metrics = list(metrics)
    if not metrics:
        raise ValueError("metrics is empty; pass at least one, e.g. ('loss', 'acc').")
    if not rows and not diverged:
        raise ValueError(
            "The history has no epochs; train for at least one epoch before "
            "plotting it."
        )
    keys = set().union(*(row.keys() for row in rows)) if rows else set()
    if rows:
        for metric in metrics:
            if metric not in keys and not any(f"{s}_{metric}" in keys for s in sets):
                raise ValueError(
                    f"The history has no column for metric {metric!r} (its keys are "
                    f"{sorted(keys)}); pick metrics from those keys."
                )

    if axes is None:
        fig, axes_array = plt.subplots(
            1,
            len(metrics),
            figsize=(4.6 * len(metrics), 3.6),
            layout="constrained",
            squeeze=False,
        )
        axes_list = list(axes_array[0])
    else:
        axes_list = _as_axes_list(axes, len(metrics))
        fig = axes_list[0].figure

    if "epoch" in keys:
        epochs = _column(rows, "epoch")
    else:
        epochs = np.arange(1, len(rows) + 1, dtype=float)
    # Where training stopped: at the last recorded epoch when that epoch's training
    # loss is already not finite, else somewhere in the epoch after it.
    if not rows:
        stop = 0.5
    elif np.isfinite(float(rows[-1].get("train_loss", 0.0))):
        stop = float(epochs[-1]) + 0.5
    else:
        stop = float(epochs[-1])

    for ax, metric in zip(axes_list, metrics, strict=True):
        columns = [(s, f"{s}_{metric}") for s in sets if f"{s}_{metric}" in keys]
        if not columns and metric in keys:
            columns = [(None, metric)]
        values_seen = []
        for split, key in columns:
            values = _column(rows, key)
            values_seen.append(values)
            ax.plot(
                epochs,
                values,
                marker="o" if len(rows) < 30 else None,
                markersize=3,
                color=SET_COLORS.get(split, "0.2") if split else "0.2",
                label=split if split else None,
            )
        if diverged:
            ax.axvline(
                stop,
                color="#d62728",
                linestyle="--",
                linewidth=1.2,
                label="diverged",
            )
            if not rows:
                ax.text(
                    0.5,
                    0.5,
                    "diverged before the first epoch ended",
                    transform=ax.transAxes,
                    ha="center",
                    va="center",
                    color="#d62728",
                )

        ax.set_xlabel("epoch")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric.replace("_", " ")))
        ax.xaxis.get_major_locator().set_params(integer=True)
        if metric == "acc" and values_seen:
            finite = np.concatenate(values_seen)
            finite = finite[np.isfinite(finite)]
            # Accuracies are fractions in [0, 1] in a neuronlib History; accept
            # histories that store percentages too.
            scale = 100.0 if finite.size and finite.max() > 1.0 else 1.0
            ax.yaxis.set_major_formatter(PercentFormatter(xmax=scale))
        if metric == "lr":
            ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
        if ax.get_legend_handles_labels()[0]:
            ax.legend()

    return fig


def _layer_matrix(
    values: Mapping[str, Sequence[float]] | Any,
) -> tuple[list[np.ndarray], list[str]]:
    """Return per-layer 1-D arrays and their names, shallow to deep."""
    if isinstance(values, Mapping):
        names = [str(name) for name in values]
        series = [_to_numpy(v).astype(float).reshape(-1) for v in values.values()]
    else:
        array = _to_numpy(values).astype(float)
        if array.ndim != 2:
            raise ValueError(
                f"values has shape {tuple(array.shape)}; pass an array of shape "
                "[L, T] (layers by time points) or a mapping layer name -> sequence."
            )
        names = [f"layer {i + 1}" for i in range(array.shape[0])]
        series = list(array)
    if not series:
        raise ValueError("values holds no layers; pass at least one layer's values.")
    return series, names


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):
        x = x.detach().cpu().numpy()
    return np.asarray(x)


def plot_layer_curves(
    values: Mapping[str, Sequence[float]] | Any,
    *,
    x: Sequence[float] | Any | None = None,
    ylabel: str,
    xlabel: str = "epoch",
    ax: Axes | None = None,
    cmap: str | Colormap = "viridis",
) -> Figure:
    """Draw one line per layer, coloured by depth, with a colourbar "layer".

    This is the book's figure for every per-layer quantity over training (sign
    consistency, activation ratio, layer rotation).

    Args:
        values: Either a mapping from layer name to that layer's values, in depth
            order (shallow first), or an array / tensor of shape [L, T].
        x: The T positions on the x axis shared by all layers; ``1..T`` when
            ``None`` (pass ``x`` when the first value is at initialisation, epoch
            0).
        ylabel: The quantity and its unit, e.g. "cosine distance to
            initialisation".
        xlabel: The x quantity and its unit.
        ax: Axes to draw into; a new figure when ``None``.
        cmap: A sequential colormap for depth.

    Returns:
        The figure. Each line carries its layer name as label (for a legend when
        wanted).

    Raises:
        ValueError: If ``values`` is empty or not 2-D, or a layer's length does not
            match ``x``.
    """
    series, names = _layer_matrix(values)
    if x is not None:
        x_values = _to_numpy(x).astype(float).reshape(-1)
        for name, s in zip(names, series, strict=True):
            if s.shape[0] != x_values.shape[0]:
                raise ValueError(
                    f"Layer {name!r} has {s.shape[0]} values but x has "
                    f"{x_values.shape[0]}; pass one value per x position."
                )

    if ax is None:
        fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    else:
        fig = ax.figure

    colors = depth_colors(len(series), cmap)
    for name, s, color in zip(names, series, colors, strict=True):
        xs = x_values if x is not None else np.arange(1, s.shape[0] + 1)
        ax.plot(xs, s, color=color, label=name, linewidth=1.6)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    depth_colorbar(fig, ax, len(series), cmap)
    return fig


def image_grid(
    x: Any,
    *,
    nrow: int,
    titles: Sequence[str] | None = None,
    ax: Axes | None = None,
    cmap: str | Colormap = "gray",
    padding: int = 2,
) -> Figure:
    """Show a batch of images as one mosaic, optionally with a title per image.

    Args:
        x: Images of shape [N, C, H, W] (C = 1 or 3) or [N, H, W], values in
            [0, 1] (use :func:`neuronlib.data.denormalise` on normalised
            inputs); a tensor or an array.
        nrow: Number of images in each row of the mosaic (as in torchvision's
            ``make_grid``); the mosaic has ``ceil(N / nrow)`` rows.
        titles: N short strings drawn above the images (class names,
            predictions).
        ax: Axes to draw into; a new figure when ``None``.
        cmap: Colormap for 1-channel images (shown with 0 black and 1 white for
            "gray").
        padding: White pixels between images and around the mosaic. With titles
            the gaps between rows are widened to make room for the text.

    Returns:
        The figure; the mosaic is its axes' only image, with no ticks.

    Raises:
        ValueError: If the shape, ``nrow``, ``padding`` or the number of titles is
            invalid, or values lie outside [0, 1].
    """
    images = _to_numpy(x).astype(float)
    if images.ndim == 3:
        images = images[:, None]
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(
            f"x has shape {tuple(images.shape)}; pass images of shape [N, C, H, W] "
            "with N >= 1 and C = 1 or 3."
        )
    if isinstance(nrow, bool) or not isinstance(nrow, (int, np.integer)) or nrow < 1:
        raise ValueError(f"Invalid nrow {nrow!r}: pass the number of images per row.")
    if isinstance(padding, bool) or not isinstance(padding, int) or padding < 0:
        raise ValueError(f"Invalid padding {padding!r}: pass an integer >= 0.")
    n, channels, height, width = images.shape
    if titles is not None and len(titles) != n:
        raise ValueError(
            f"Got {len(titles)} titles for {n} images; pass one title per image."
        )
    low, high = np.nanmin(images), np.nanmax(images)
    if low < -1e-3 or high > 1 + 1e-3:
        raise ValueError(
            f"Image values span [{low:.3g}, {high:.3g}], outside [0, 1]; undo the "
            "normalisation first, e.g. with neuronlib.data.denormalise(x, name)."
        )
    images = np.clip(images, 0.0, 1.0)

    columns = min(int(nrow), n)
    rows = math.ceil(n / columns)
    # Room above each row for a title of about a third of an image's height.
    gap = max(padding, math.ceil(0.35 * height)) if titles is not None else padding
    mosaic = np.ones(
        (rows * (height + gap) + padding, columns * (width + padding) + padding, 3)
    )
    for i in range(n):
        top = gap + (i // columns) * (height + gap)
        left = padding + (i % columns) * (width + padding)
        mosaic[top : top + height, left : left + width] = images[i].transpose(1, 2, 0)
    if channels == 1:
        mosaic = mosaic[..., 0]

    if ax is None:
        scale = 1.1 if titles is not None else 0.9
        fig, ax = plt.subplots(
            figsize=(
                max(2.0, scale * columns * (width + padding) / height),
                max(1.2, scale * rows * (height + gap) / height),
            ),
            layout="constrained",
        )
    else:
        fig = ax.figure

    if channels == 1:
        ax.imshow(
            mosaic, cmap=_get_cmap(cmap), vmin=0.0, vmax=1.0, interpolation="nearest"
        )
    else:
        ax.imshow(mosaic, interpolation="nearest")
    if titles is not None:
        for i, title in enumerate(titles):
            top = gap + (i // columns) * (height + gap)
            center = padding + (i % columns) * (width + padding) + (width - 1) / 2
            ax.text(center, top - 1, str(title), ha="center", va="bottom", fontsize=8)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.grid(False)
    for spine in ax.spines.values():
        spine.set_visible(False)
    return fig


def glue_figure(name: str, fig: Figure) -> None:
    """Show a figure once in the notebook and store it for ``{glue:figure}``.

    Inside a Jupyter kernel the figure is rendered to a PNG image first (at twice
    its dpi, shown at its natural size), so that it shows whatever matplotlib
    backend is in force: with ``MPLBACKEND=Agg``, for instance, IPython has no
    formatter for a bare figure and would show only its text ``repr``. With
    ``myst_nb`` importable the image is glued with ``myst_nb.glue(name, image)``,
    which also displays it as the cell's output; without it (a reader's Jupyter or
    Colab) it is displayed with ``IPython.display.display``. Outside IPython
    nothing is displayed, except that a GUI backend shows it with ``plt.show()``.
    The figure is then closed, so the inline backend does not show it a second
    time and open figures do not pile up.

    Note:
        In the book, tag the cell ``remove-output``: ``myst_nb`` collects glued
        outputs from every cell before it applies the tag, so the figure then
        appears once, where the ``{glue:figure}`` directive stands. Without the
        tag it appears twice (under the cell and at the directive). Keep other
        output you want to show out of that cell.

    Args:
        name: The glue key, used as the argument of ``{glue:figure}``; a label
            such as ``"fig-sign-consistency"`` (unique within the book).
        fig: The figure; it is closed afterwards.

    Raises:
        ValueError: If ``name`` is empty or contains whitespace.
    """
    if not isinstance(name, str) or not name or any(c.isspace() for c in name):
        raise ValueError(
            f"Invalid glue name {name!r}: pass a non-empty key without spaces, "
            "e.g. 'fig-learning-curves'."
        )

    shell = _ipython_shell()
    if shell is not None:
        image = _png_image(fig)
        try:
            from myst_nb import glue
        except ImportError:
            glue = None
        if glue is not None:
            glue(name, image, display=True)
        else:
            from IPython.display import display

            display(image)
    elif getattr(fig.canvas, "required_interactive_framework", None):
        plt.show()
    else:
        logger.debug("Not in IPython and no GUI backend: figure %r not shown.", name)

    plt.close(fig)


def _png_image(fig: Figure) -> Any:
    """Render a figure as an ``IPython.display.Image``, crisp on high-dpi screens."""
    from IPython.display import Image

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=2 * fig.dpi, bbox_inches="tight")
    data = buffer.getvalue()
    # A PNG stores its width in bytes 16-19; show the image at half its pixel width,
    # the size the figure has on screen.
    width = int.from_bytes(data[16:20], "big") // 2
    return Image(data=data, format="png", width=width)


def _ipython_shell() -> Any:
    """Return the running IPython shell, or None outside IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return get_ipython()
