"""Figures of gradient-sign records, and a live explorer of single neurons.

The chapter on hidden neurons as binary classifiers measures, for every hidden
neuron and training sample, how the sign of the loss gradient behaves over training
(see :mod:`neuronlib.probes.signs` and :mod:`neuronlib.metrics`). This module turns
those measurements into the book's figures:

- :func:`summarise` gathers the per-(sample, neuron) measures of one layer (sign
  consistency, its shuffled control, when the sign settles, the zero share, the
  categories), and :func:`plot_consistency`, :func:`plot_settling`,
  :func:`plot_layer_histograms`, :func:`plot_class_heatmap`,
  :func:`plot_categories` and :func:`plot_network_bars` draw them;
- :class:`NeuronExplorer` is an ``ipywidgets`` explorer: pick a layer and a neuron
  and see its categories, their class composition and its signs over training.
  :func:`plot_neurons` draws the same panels for a few chosen neurons into one
  static figure, for the rendered book. Both call :func:`draw_neuron`, so the live
  and the static views cannot drift apart.

Sign conventions: a sample is in a neuron's *positive* category when the loss
gradient with respect to the neuron's activation is mostly positive for it, so that
gradient descent pushes the activation *down* on that sample; in the *negative*
category the activation is pushed *up*.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import PercentFormatter
from torch import Tensor

from neuronlib import metrics, plots
from neuronlib.metrics import shuffle_records
from neuronlib.probes.signs import NEGATIVE, NOT_RECORDED, POSITIVE, ZERO

__all__ = [
    "CATEGORY_COLORS",
    "CONSISTENCY_BINS",
    "CONSISTENCY_BIN_LABELS",
    "NeuronExplorer",
    "class_purity",
    "draw_neuron",
    "plot_categories",
    "plot_class_heatmap",
    "plot_consistency",
    "plot_layer_histograms",
    "plot_network_bars",
    "plot_neurons",
    "plot_settling",
    "settled_share",
    "shuffle_records",
    "summarise",
    "typical_neuron",
]

#: Colours of a neuron's two categories (and of samples in neither), the same in
#: every figure: seaborn's colour-blind vermilion, blue and a light grey.
CATEGORY_COLORS: dict[str, str] = {
    "positive": "#d55e00",
    "negative": "#0173b2",
    "none": "0.78",
}

#: How each recorded quantity is written in labels: its name and its symbol.
QUANTITY_LABELS: dict[str, tuple[str, str]] = {
    "activation": ("activation", "a"),
    "pre_activation": ("pre-activation", "z"),
}

# Bins of a sign-consistency histogram. Consistency takes the values k / n (n the
# number of non-zero records), so the edges sit a hair below each tenth: 0.7 stored in
# float32 (0.69999999) still counts as 0.7. The last bin holds exactly 1 (no flip).
_TOLERANCE = 1e-6
CONSISTENCY_BINS = np.append(
    np.array([0.5, 0.6, 0.7, 0.8, 0.9, 1.0]) - _TOLERANCE, 1.0 + _TOLERANCE
)
CONSISTENCY_BIN_LABELS = (
    "[0.5, 0.6)",
    "[0.6, 0.7)",
    "[0.7, 0.8)",
    "[0.8, 0.9)",
    "[0.9, 1)",
    "1",
)


# --------------------------------------------------------------------- measures


def summarise(
    codes: Tensor, *, generator: torch.Generator | None = None
) -> dict[str, Tensor]:
    """Measure how the gradient signs of one layer behave over training.

    Args:
        codes: Sign codes ``[R, S, K]`` of one layer and quantity, as returned by
            ``record.codes(layer, quantity)``.
        generator: Random numbers for the shuffled control.

    Returns:
        A dict of tensors:

        - ``"consistency"``: float32 ``[S, K]``, :func:`metrics.sign_consistency`;
        - ``"control"``: float32 ``[S, K]``, the same measure on
          :func:`~neuronlib.metrics.shuffle_records` of the codes (one random draw);
        - ``"expected"``: float32 ``[S, K]``, the binomial control's expectation,
          :func:`metrics.control_consistency`;
        - ``"settle"`` and ``"settle_control"``: int64 ``[S, K]``,
          :func:`metrics.settle_record` of the codes and of the shuffled codes;
        - ``"zero_share"``: float32 ``[S, K]``, :func:`metrics.zero_share`;
        - ``"categories"``: int8 ``[S, K]``, :func:`metrics.categories`;
        - ``"agreement"``: float32 ``[R]``, for each record the share of its
          non-zero signs that equal the sample's category (pairs without a
          category left out): how far the signs of that moment already match
          the categories of the whole run.

    Raises:
        ValueError: If ``codes`` are not sign codes ``[R, S, K]``.
    """
    if codes.dim() != 3:
        raise ValueError(
            f"codes must be [R, S, K] (records, samples, neurons), got shape "
            f"{tuple(codes.shape)}; pass record.codes(layer, quantity)."
        )
    shuffled = shuffle_records(codes, generator=generator)
    categories = metrics.categories(codes)

    has_category = categories != 0
    agreement = []
    for record in codes:
        nonzero = ((record == POSITIVE) | (record == NEGATIVE)) & has_category
        agrees = nonzero & ((record.to(torch.int8) - 2) == categories)
        agreement.append(agrees.sum() / nonzero.sum().clamp(min=1))

    return {
        "consistency": metrics.sign_consistency(codes),
        "control": metrics.sign_consistency(shuffled),
        "expected": metrics.control_consistency(codes),
        "settle": metrics.settle_record(codes),
        "settle_control": metrics.settle_record(shuffled),
        "zero_share": metrics.zero_share(codes),
        "categories": categories,
        "agreement": torch.stack(agreement).float(),
    }


def settled_share(settle: Tensor, num_records: int) -> Tensor:
    """Share of (sample, neuron) pairs whose sign has settled, after each record.

    Args:
        settle: int ``[...]`` settle records from :func:`metrics.settle_record`
            (``-1`` for pairs without any non-zero sign, left out).
        num_records: ``R``, the number of records.

    Returns:
        float32 ``[R]``: entry ``r`` is the share of pairs whose sign never changes
        after record ``r`` (it is 1 for the last record). NaN when no pair has a
        sign.
    """
    settle = torch.as_tensor(settle)
    valid = settle[settle >= 0]
    if valid.numel() == 0:
        return torch.full((num_records,), math.nan)

    counts = torch.bincount(valid.long().flatten(), minlength=num_records)
    return (counts.cumsum(0)[:num_records].float() / valid.numel()).float()


def class_purity(composition: Tensor) -> Tensor:
    """How cleanly each class falls into one of each neuron's two categories.

    Args:
        composition: float ``[K, C, 3]`` from :func:`metrics.class_composition`
            (shares of each class in the positive category, the negative one and
            neither).

    Returns:
        float32 ``[K, C]``: the larger of the two category shares, in ``[0, 1]``
        (1: every sample of the class is in the same category; 0.5 or less: the
        class is split evenly).
    """
    composition = torch.as_tensor(composition)
    return composition[..., :2].max(-1).values.float()


def typical_neuron(
    categories: Tensor, consistency: Tensor, *, min_share: float = 0.3
) -> int:
    """Pick a typical neuron with two sizeable categories, for illustration.

    Among the neurons whose smaller category holds at least ``min_share`` of the
    samples, the one whose mean sign consistency is the median of theirs (the
    lower middle one for an even count). When no neuron qualifies, the neuron with
    the most even categories.

    Args:
        categories: int ``[S, K]`` from :func:`metrics.categories`.
        consistency: float ``[S, K]`` from :func:`metrics.sign_consistency`.
        min_share: Smallest share of samples in each category.

    Returns:
        The neuron's column in the record (position in ``neuron_index``).
    """
    positive = (categories == 1).float().mean(0)
    negative = (categories == -1).float().mean(0)
    smaller = torch.minimum(positive, negative)
    eligible = torch.nonzero(smaller >= min_share).flatten()
    if eligible.numel() == 0:
        return int(smaller.argmax())

    mean = torch.nan_to_num(consistency.float(), nan=0.0).mean(0)[eligible]
    order = torch.argsort(mean, stable=True)
    return int(eligible[order[(eligible.numel() - 1) // 2]])


# ------------------------------------------------------------- per-layer figures


def _numpy(x: Any) -> np.ndarray:
    if isinstance(x, Tensor):
        x = x.detach().cpu().numpy()
    return np.asarray(x, dtype=float)


def plot_layer_histograms(
    values: Mapping[str, Any],
    *,
    control: Mapping[str, Any] | None = None,
    bins: Sequence[float] | np.ndarray = CONSISTENCY_BINS,
    bin_labels: Sequence[str] | None = CONSISTENCY_BIN_LABELS,
    xlabel: str,
    ylabel: str = "share of (sample, neuron) pairs",
    ax: Axes | None = None,
    colorbar: bool = True,
    control_label: str = "control: shuffled samples",
) -> Figure:
    """Draw one step histogram per layer, coloured by depth, with optional controls.

    Args:
        values: Layer name -> values (any shape; NaN are left out), shallow to deep.
        control: Layer name -> control values, drawn dashed in the layer's colour.
        bins: Bin edges (by default those of sign consistency).
        bin_labels: One label per bin, to draw the bins side by side with equal
            widths (for bins of unequal widths, such as the consistency bins with
            their last bin for exactly 1); ``None`` for a numeric x axis.
        xlabel: Label of the x axis (the quantity and its unit).
        ylabel: Label of the y axis.
        ax: Axes to draw into; a new figure when ``None``.
        colorbar: Whether to add the "layer" colourbar.
        control_label: Legend entry of the dashed lines.

    Returns:
        The figure. Each histogram is normalised to sum to 1 over its bins (values
        outside the bins count in the total).

    Raises:
        ValueError: If ``values`` is empty or ``bin_labels`` does not have one
            label per bin.
    """
    edges = np.asarray(bins, dtype=float)
    if not values:
        raise ValueError("values holds no layer; pass {layer name: values}.")
    if bin_labels is not None and len(bin_labels) != len(edges) - 1:
        raise ValueError(
            f"Got {len(bin_labels)} bin labels for {len(edges) - 1} bins; pass one "
            "label per bin, or bin_labels=None for a numeric axis."
        )
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.0, 3.8))
    fig = ax.figure
    colors = plots.depth_colors(len(values))
    x = edges if bin_labels is None else np.arange(len(edges)) - 0.5

    for color, (layer, layer_values) in zip(colors, values.items(), strict=True):
        for series, style in ((layer_values, "-"), ((control or {}).get(layer), "--")):
            if series is None:
                continue
            data = _numpy(series).ravel()
            data = data[np.isfinite(data)]
            counts, _ = np.histogram(data, bins=edges)
            shares = counts / max(data.size, 1)
            ax.stairs(shares, x, color=color, linestyle=style, linewidth=1.8)

    if bin_labels is not None:
        ax.set_xticks(range(len(bin_labels)), list(bin_labels))
        ax.grid(axis="x", visible=False)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    if control:
        handles = [
            Line2D([], [], color="0.2", linestyle="-", label="measured"),
            Line2D([], [], color="0.2", linestyle="--", label=control_label),
        ]
        ax.legend(handles=handles, loc="upper left")
    if colorbar:
        plots.depth_colorbar(fig, ax, len(values))
    return fig


def plot_consistency(
    summaries: Mapping[str, Mapping[str, Mapping[str, Tensor]]],
) -> Figure:
    """Histograms of sign consistency per layer against the shuffled control.

    Args:
        summaries: Quantity (``"activation"``, ``"pre_activation"``) -> layer ->
            the dict of :func:`summarise`. One panel per quantity.

    Returns:
        The figure: x is the sign consistency (share of a pair's non-zero records
        that carry its majority sign), y the share of pairs; solid lines measured,
        dashed lines the control, colours by depth.

    Raises:
        ValueError: If ``summaries`` is empty.
    """
    if not summaries:
        raise ValueError("summaries is empty; pass {quantity: {layer: summary}}.")
    fig, axes = plt.subplots(
        1,
        len(summaries),
        figsize=(5.2 * len(summaries), 3.8),
        sharey=True,
        squeeze=False,
    )
    axes = list(axes[0])

    for i, (ax, (quantity, layers)) in enumerate(
        zip(axes, summaries.items(), strict=True)
    ):
        name, symbol = QUANTITY_LABELS.get(quantity, (quantity, "x"))
        plot_layer_histograms(
            {layer: s["consistency"] for layer, s in layers.items()},
            control={layer: s["control"] for layer, s in layers.items()},
            xlabel=rf"sign consistency of $\partial L/\partial {symbol}$",
            ax=ax,
            colorbar=i == len(axes) - 1,
        )
        ax.set_title(f"gradient w.r.t. the {name}")
        if i:
            ax.set_ylabel("")
    return fig


def plot_settling(
    summaries: Mapping[str, Mapping[str, Tensor]], epochs: Sequence[int]
) -> Figure:
    """How early signs settle, and how well each record agrees with the categories.

    Args:
        summaries: Layer -> the dict of :func:`summarise` (one quantity).
        epochs: The epoch of each record (0-based, as ``record.record_epochs``);
            the x axis shows them 1-based, as the end of that epoch.

    Returns:
        The figure. Left: the share of (sample, neuron) pairs whose sign never
        changes after each epoch, measured (solid) and for shuffled samples
        (dashed). Right: the share of each epoch's non-zero signs that equal the
        pair's category. Colours by depth.

    Raises:
        ValueError: If ``summaries`` is empty.
    """
    if not summaries:
        raise ValueError("summaries is empty; pass {layer: summary}.")
    x = np.asarray(epochs) + 1
    colors = plots.depth_colors(len(summaries))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10.5, 3.8))

    for color, summary in zip(colors, summaries.values(), strict=True):
        measured = settled_share(summary["settle"], len(x))
        control = settled_share(summary["settle_control"], len(x))
        left.plot(x, _numpy(measured), color=color, marker="o", markersize=3)
        left.plot(x, _numpy(control), color=color, linestyle="--")
        right.plot(
            x, _numpy(summary["agreement"]), color=color, marker="o", markersize=3
        )

    left.set_ylabel("share of pairs with their final sign")
    right.set_ylabel("share of signs equal to the category")
    for ax in (left, right):
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    handles = [
        Line2D([], [], color="0.2", linestyle="-", label="measured"),
        Line2D([], [], color="0.2", linestyle="--", label="control: shuffled samples"),
    ]
    left.legend(handles=handles, loc="upper left")
    plots.depth_colorbar(fig, [left, right], len(summaries))
    return fig


def _sort_neurons(net: np.ndarray) -> np.ndarray:
    """Order neurons by their class pattern: which classes lean positive, then mean."""
    pattern = (net > 0).astype(np.int64)
    code = pattern @ (2 ** np.arange(net.shape[1] - 1, -1, -1))
    return np.lexsort((-net.mean(1), code))


def plot_class_heatmap(
    compositions: Mapping[str, Tensor], classes: Sequence[str]
) -> Figure:
    """Neuron x class heatmaps: which categories each class falls into, per layer.

    Args:
        compositions: Layer -> float ``[K, C, 3]`` from
            :func:`metrics.class_composition`. One panel per layer.
        classes: The ``C`` class names.

    Returns:
        The figure. Each row is a neuron, each column a class; the colour is the
        share of the class's samples in the neuron's positive category minus the
        share in its negative category (+1: the whole class is pushed down, -1:
        pushed up, 0: split evenly). Rows are sorted by the set of classes that
        lean positive, so neurons that split the classes the same way sit
        together.

    Raises:
        ValueError: If ``compositions`` is empty.
    """
    if not compositions:
        raise ValueError("compositions is empty; pass {layer: class_composition}.")
    fig, axes = plt.subplots(
        1,
        len(compositions),
        figsize=(2.6 * len(compositions) + 1.2, 5.0),
        squeeze=False,
    )
    axes = list(axes[0])

    image = None
    for ax, (layer, composition) in zip(axes, compositions.items(), strict=True):
        shares = _numpy(composition)
        net = np.nan_to_num(shares[..., 0] - shares[..., 1])
        net = net[_sort_neurons(net)]
        image = ax.imshow(
            net, aspect="auto", cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest"
        )
        ax.set_xticks(range(len(classes)), [str(c) for c in classes], rotation=90)
        ax.set_xlabel("class")
        ax.set_title(f"{layer} ({net.shape[0]} neurons)")
        ax.grid(False)
    axes[0].set_ylabel("neuron (sorted by class pattern)")
    colorbar = fig.colorbar(image, ax=axes)
    colorbar.set_label("share pushed down − share pushed up")
    return fig


def plot_categories(
    images: Tensor,
    categories: Tensor,
    labels: Tensor,
    *,
    count: int = 40,
    nrow: int = 8,
    seed: int = 0,
    symbol: str = "a",
) -> Figure:
    """Show samples of a neuron's two categories side by side.

    Args:
        images: ``[S, C, H, W]`` images of the recorded samples, in ``[0, 1]``
            (undo the normalisation first, e.g. with ``data.denormalise``).
        categories: int ``[S]``, the neuron's column of :func:`metrics.categories`.
        labels: int ``[S]`` classes of the samples.
        count: Samples shown per category (all of them if the category is
            smaller), drawn at random and then sorted by class.
        nrow: Images per row.
        seed: Seed of the random draw.
        symbol: The quantity's symbol in the titles (``"a"`` or ``"z"``).

    Returns:
        The figure: the positive category on the left, the negative one on the
        right, each titled with its size.

    Raises:
        ValueError: If the shapes do not match.
    """
    categories = torch.as_tensor(categories).cpu()
    labels = torch.as_tensor(labels).cpu()
    if not (images.shape[0] == categories.shape[0] == labels.shape[0]):
        raise ValueError(
            f"Got {images.shape[0]} images, {categories.shape[0]} categories and "
            f"{labels.shape[0]} labels; pass one of each per recorded sample."
        )
    generator = torch.Generator().manual_seed(seed)
    fig, axes = plt.subplots(1, 2, figsize=(11, 0.9 * math.ceil(count / nrow) + 1.2))

    sides = (
        (1, f"$\\partial L/\\partial {symbol} > 0$: pushed down"),
        (-1, f"$\\partial L/\\partial {symbol} < 0$: pushed up"),
    )
    for ax, (value, title) in zip(axes, sides, strict=True):
        members = torch.nonzero(categories == value).flatten()
        if members.numel() == 0:
            ax.set_axis_off()
            ax.set_title(f"{title} (no sample)")
            continue
        chosen = members[torch.randperm(members.numel(), generator=generator)[:count]]
        chosen = chosen[torch.argsort(labels[chosen], stable=True)]
        plots.image_grid(images[chosen].cpu(), nrow=nrow, ax=ax)
        share = members.numel() / categories.numel()
        ax.set_title(f"{title} ({members.numel()} samples, {share:.0%})")
    return fig


def plot_network_bars(
    values: Mapping[str, Sequence[float]],
    *,
    marks: Mapping[str, Sequence[float]] | None = None,
    ylabel: str,
    mark_label: str = "control",
    ax: Axes | None = None,
    percent: bool = True,
    annotate: str | None = None,
) -> Figure:
    """Compare per-layer numbers of several networks: grouped bars coloured by depth.

    Args:
        values: Network name -> one number per layer, shallow to deep.
        marks: Network name -> one number per layer, drawn as a black tick across
            each bar (a control, say).
        ylabel: Label of the y axis.
        mark_label: Legend entry of the ticks.
        ax: Axes to draw into; a new figure when ``None``.
        percent: Whether the y axis shows fractions as percentages.
        annotate: A format such as ``"{:.1%}"`` to write each value above its bar
            (useful when some bars are too short to see); None writes nothing.

    Returns:
        The figure, with a "layer" colourbar up to the deepest network's depth.

    Raises:
        ValueError: If ``values`` is empty.
    """
    if not values:
        raise ValueError("values is empty; pass {network: per-layer numbers}.")
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.0, 3.8))
    fig = ax.figure
    depth = max(len(v) for v in values.values())
    colors = plots.depth_colors(depth)
    width = 0.8 / depth

    top = 0.0
    for g, (network, numbers) in enumerate(values.items()):
        numbers = _numpy(numbers)
        x = g + width * (np.arange(len(numbers)) - (len(numbers) - 1) / 2)
        bars = ax.bar(x, numbers, width=width * 0.92, color=colors[: len(numbers)])
        if annotate is not None:
            ax.bar_label(bars, [annotate.format(v) for v in numbers], fontsize=8)
        if marks is not None and network in marks:
            ax.hlines(
                _numpy(marks[network]), x - width / 2, x + width / 2, color="black"
            )
        top = max(top, float(np.nanmax(numbers, initial=0.0)))
    ax.set_xticks(range(len(values)), list(values))
    ax.set_ylabel(ylabel)
    ax.grid(axis="x", visible=False)
    # Head room for the legend and the value labels above the tallest bar.
    ax.set_ylim(0, 1.2 * top if top > 0 else 1.0)
    if percent:
        ax.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    if marks is not None:
        handles = [Line2D([], [], color="black", label=mark_label)]
        ax.legend(handles=handles, loc="upper right", fontsize=9)
    plots.depth_colorbar(fig, ax, depth)
    return fig


# --------------------------------------------------------------------- one neuron


def _neuron_label(record: Any, layer: str, column: int) -> int:
    """The neuron's own index (its column may differ when a subset was recorded)."""
    return int(record.neuron_index[layer][column])


def draw_neuron(
    axes: Sequence[Axes],
    codes: Tensor,
    labels: Tensor,
    *,
    classes: Sequence[str],
    epochs: Sequence[int],
    title: str = "",
    quantity: str = "activation",
) -> None:
    """Draw the three panels of one neuron: categories, class composition, time.

    Shared by :class:`NeuronExplorer` (live) and :func:`plot_neurons` (static), so
    the two views cannot drift apart. The panels:

    1. the sign consistency of the samples, stacked by category (positive in
       vermilion, negative in blue); the title gives the median consistency and
       the median of the closed-form control (:func:`metrics.control_consistency`),
       the legend the number of samples without a category (a tie, or no non-zero
       sign);
    2. for each class, the shares of its samples in the positive category, the
       negative one and neither (grey);
    3. for each record, the share of the samples with a category whose non-zero
       sign equals it, and the share of zero signs.

    Args:
        axes: Three axes.
        codes: Sign codes ``[R, S]`` of one neuron (``record.codes(layer)[..., k]``).
        labels: int ``[S]`` classes of the recorded samples.
        classes: The class names.
        epochs: The epoch of each record (0-based).
        title: Printed above the first panel (the neuron's name).
        quantity: ``"activation"`` or ``"pre_activation"``, for the labels.

    Raises:
        ValueError: If there are not three axes, or the shapes do not match.
    """
    axes = list(axes)
    codes = torch.as_tensor(codes).cpu()
    labels = torch.as_tensor(labels).cpu()
    if len(axes) != 3:
        raise ValueError(f"draw_neuron needs 3 axes, got {len(axes)}.")
    if codes.dim() != 2 or codes.shape[1] != labels.shape[0]:
        raise ValueError(
            f"Expected codes [R, S] and labels [S], got shapes {tuple(codes.shape)} "
            f"and {tuple(labels.shape)}; pass record.codes(layer)[:, :, k]."
        )
    name, symbol = QUANTITY_LABELS.get(quantity, (quantity, "x"))
    consistency = metrics.sign_consistency(codes[..., None])[:, 0]
    category = metrics.categories(codes[..., None])[:, 0]
    control = metrics.control_consistency(codes[..., None])[:, 0]
    ax_cat, ax_cls, ax_time = axes

    # 1. The two categories and how consistent their samples are.
    parts = []
    for value, key, sign in ((1, "positive", ">"), (-1, "negative", "<")):
        values = _numpy(consistency[category == value])
        parts.append(
            (
                values,
                CATEGORY_COLORS[key],
                f"$\\partial L/\\partial {symbol} {sign} 0$ ({values.size})",
            )
        )
    bottom = np.zeros(len(CONSISTENCY_BIN_LABELS))
    for values, color, label in parts:
        counts, _ = np.histogram(values, bins=CONSISTENCY_BINS)
        ax_cat.bar(range(len(counts)), counts, bottom=bottom, color=color, label=label)
        bottom += counts
    ax_cat.set_xticks(range(len(CONSISTENCY_BIN_LABELS)), CONSISTENCY_BIN_LABELS)
    ax_cat.tick_params(axis="x", labelsize=8)
    ax_cat.grid(axis="x", visible=False)
    no_category = int((category == 0).sum())
    median = float(torch.nanmedian(consistency)) if consistency.numel() else math.nan
    expected = float(torch.nanmedian(control)) if control.numel() else math.nan
    ax_cat.set_title(
        f"{title}\nmedian {median:.2f}, control {expected:.2f}", fontsize=11
    )
    ax_cat.set_xlabel(rf"sign consistency of $\partial L/\partial {symbol}$")
    ax_cat.set_ylabel("samples")
    ax_cat.legend(
        title=f"no category: {no_category}",
        loc="upper left",
        fontsize=8,
        title_fontsize=8,
    )

    # 2. Which classes fall into which category.
    composition = _numpy(
        metrics.class_composition(category[:, None], labels, len(classes))[0]
    )
    left = np.zeros(len(classes))
    for j, key in enumerate(("positive", "negative", "none")):
        share = np.nan_to_num(composition[:, j])
        ax_cls.barh(range(len(classes)), share, left=left, color=CATEGORY_COLORS[key])
        left += share
    ax_cls.set_yticks(range(len(classes)), [str(c) for c in classes])
    ax_cls.invert_yaxis()
    ax_cls.set_xlim(0, 1)
    ax_cls.xaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax_cls.set_xlabel("share of the class's samples")
    ax_cls.set_ylabel("class")
    ax_cls.set_title("class composition", fontsize=11)
    ax_cls.grid(axis="y", visible=False)

    # 3. Over training: agreement of each record with the category, and zeros.
    x = np.asarray(epochs) + 1
    recorded = codes != NOT_RECORDED
    nonzero = (codes == POSITIVE) | (codes == NEGATIVE)
    agrees = nonzero & (codes.to(torch.int8) - 2 == category) & (category != 0)
    agreement = agrees.sum(1) / (nonzero & (category != 0)).sum(1).clamp(min=1)
    zeros = (codes == ZERO).sum(1) / recorded.sum(1).clamp(min=1)
    ax_time.plot(
        x,
        _numpy(agreement),
        color="0.15",
        marker="o",
        markersize=3,
        label="sign = category",
    )
    ax_time.plot(
        x,
        _numpy(zeros),
        color=CATEGORY_COLORS["none"],
        marker="s",
        markersize=3,
        label=f"zero {name} gradient",
    )
    ax_time.set_ylim(-0.02, 1.02)
    ax_time.yaxis.set_major_formatter(PercentFormatter(xmax=1.0))
    ax_time.xaxis.get_major_locator().set_params(integer=True)
    ax_time.set_xlabel("epoch")
    ax_time.set_ylabel("share of samples")
    ax_time.set_title("over training", fontsize=11)
    ax_time.legend(loc="center right", fontsize=8)


def _check_labels(record: Any, labels: Any, classes: Sequence[str] | None) -> tuple:
    """Labels as a CPU tensor in record row order, and the class names."""
    labels = torch.as_tensor(labels).cpu()
    rows = record.sample_index.numel()
    if labels.shape != (rows,):
        raise ValueError(
            f"labels has shape {tuple(labels.shape)} but the record tracks {rows} "
            "samples; pass the labels in record order, e.g. y[rows] where "
            "record.sample_index are the samples' dataset indices."
        )
    if classes is None:
        classes = [str(c) for c in range(int(labels.max()) + 1 if rows else 0)]
    return labels, list(classes)


def plot_neurons(
    record: Any,
    picks: Sequence[tuple[str, int]],
    labels: Tensor,
    *,
    classes: Sequence[str] | None = None,
    quantity: str = "activation",
) -> Figure:
    """The static explorer: the panels of :func:`draw_neuron` for chosen neurons.

    Args:
        record: A :class:`~neuronlib.probes.SignRecord` (or a recorder).
        picks: ``(layer, column)`` pairs, one row of panels each; ``column`` is the
            neuron's position in ``record.neuron_index[layer]`` (its index when
            every neuron was recorded).
        labels: int ``[S]`` classes of the recorded samples, in record order.
        classes: Class names; ``"0"``, ``"1"``, ... by default.
        quantity: ``"activation"`` or ``"pre_activation"``.

    Returns:
        The figure, with one row of three panels per pick.

    Raises:
        ValueError: If ``picks`` is empty, a layer was not recorded, a column is
            out of range, or ``labels`` does not match the record.
    """
    if not picks:
        raise ValueError("picks is empty; pass [(layer, neuron), ...].")
    labels, classes = _check_labels(record, labels, classes)
    fig, axes = plt.subplots(
        len(picks),
        3,
        figsize=(13.5, 3.6 * len(picks)),
        squeeze=False,
        gridspec_kw={"width_ratios": [1.1, 0.9, 1.0]},
    )

    codes_of: dict[str, Tensor] = {}
    for row, (layer, column) in zip(axes, picks, strict=True):
        if layer not in codes_of:
            codes_of[layer] = record.codes(layer, quantity)
        codes = codes_of[layer]
        if not 0 <= column < codes.shape[2]:
            raise ValueError(
                f"Neuron column {column} is out of range for layer {layer!r}, which "
                f"has {codes.shape[2]} recorded neurons; use [0, {codes.shape[2]})."
            )
        draw_neuron(
            row,
            codes[:, :, column],
            labels,
            classes=classes,
            epochs=record.record_epochs,
            title=f"{layer}, neuron {_neuron_label(record, layer, column)}",
            quantity=quantity,
        )
    return fig


def _ipython_shell() -> Any:
    try:
        from IPython import get_ipython
    except ImportError:  # pragma: no cover - IPython comes with ipywidgets
        return None
    return get_ipython()


def _enable_colab_widgets() -> None:
    """Colab renders ipywidgets 8 only through its custom widget manager."""
    try:
        from google.colab import output
    except ImportError:
        return
    output.enable_custom_widget_manager()


class NeuronExplorer:
    """Pick a layer and a neuron of a sign record and see its panels, live.

    A dropdown chooses the layer, a slider the neuron, toggle buttons the quantity
    (gradient with respect to the activation or the pre-activation); each change
    redraws the panels of :func:`draw_neuron` into an ``ipywidgets.Output``. Put the
    explorer last in a notebook cell (or ``display`` it) to show it; in Colab the
    custom widget manager is switched on. The unpacked codes of a layer are kept
    after their first use, so moving the slider redraws without unpacking again.

    Example::

        explorer = NeuronExplorer(record, y[rows], classes=train.classes)
        explorer  # shows the widget
        explorer.neuron.value = 12  # redraws, as moving the slider does

    Args:
        record: A :class:`~neuronlib.probes.SignRecord` (or a recorder).
        labels: int ``[S]`` classes of the recorded samples, in record order.
        classes: Class names; ``"0"``, ``"1"``, ... by default.
        layer: The layer shown first; the first recorded layer by default.
        neuron: The neuron column shown first.
        quantity: ``"activation"`` or ``"pre_activation"``, shown first.

    Attributes:
        layer: The ``ipywidgets.Dropdown`` of layers.
        neuron: The ``ipywidgets.IntSlider`` of neuron columns.
        quantity: The ``ipywidgets.ToggleButtons`` of quantities.
        output: The ``ipywidgets.Output`` the panels are drawn into.
        widget: The whole explorer, an ``ipywidgets.VBox``.
        figure: The last figure drawn (closed to pyplot; kept for inspection).
        draws: How many times the panels were drawn.

    Raises:
        ValueError: If ``layer`` or ``quantity`` was not recorded, ``neuron`` is out
            of range, or ``labels`` does not match the record.
    """

    def __init__(
        self,
        record: Any,
        labels: Tensor,
        *,
        classes: Sequence[str] | None = None,
        layer: str | None = None,
        neuron: int = 0,
        quantity: str = "activation",
    ):
        import ipywidgets as widgets

        self.record = record
        self.labels, self.classes = _check_labels(record, labels, classes)
        layer = record.layers[0] if layer is None else layer
        if layer not in record.layers:
            raise ValueError(
                f"Layer {layer!r} was not recorded; pick one of {list(record.layers)}."
            )
        if quantity not in record.quantities:
            raise ValueError(
                f"Quantity {quantity!r} was not recorded; pick one of "
                f"{list(record.quantities)}."
            )
        width = self._width(layer)
        if not 0 <= neuron < width:
            raise ValueError(
                f"Neuron column {neuron} is out of range for layer {layer!r}, which "
                f"has {width} recorded neurons; use [0, {width})."
            )
        self._codes: dict[tuple[str, str], Tensor] = {}
        self._updating = False
        self.figure: Figure | None = None
        self.draws = 0

        self.layer = widgets.Dropdown(
            options=list(record.layers), value=layer, description="layer"
        )
        self.neuron = widgets.IntSlider(
            value=neuron,
            min=0,
            max=width - 1,
            description="neuron",
            continuous_update=False,
        )
        self.quantity = widgets.ToggleButtons(
            options=[(f"∂L/∂{QUANTITY_LABELS[q][1]}", q) for q in record.quantities],
            value=quantity,
            description="gradient",
        )
        self.output = widgets.Output()
        self.widget = widgets.VBox(
            [widgets.HBox([self.layer, self.quantity]), self.neuron, self.output]
        )
        for control in (self.layer, self.neuron, self.quantity):
            control.observe(self._on_change, names="value")
        _enable_colab_widgets()
        self.redraw()

    def _width(self, layer: str) -> int:
        return int(self.record.neuron_index[layer].numel())

    def _on_change(self, change: Mapping[str, Any]) -> None:
        if self._updating:
            return
        if change["owner"] is self.layer:
            # A narrower layer would clamp the slider and fire a second change.
            self._updating = True
            try:
                width = self._width(self.layer.value)
                self.neuron.value = min(self.neuron.value, width - 1)
                self.neuron.max = width - 1
            finally:
                self._updating = False
        self.redraw()

    def codes(self, layer: str, quantity: str) -> Tensor:
        """Return the sign codes of a layer, unpacked on first use and then kept.

        Args:
            layer: A recorded layer.
            quantity: ``"activation"`` or ``"pre_activation"``.

        Returns:
            ``uint8`` codes ``[R, S, K]``, as ``record.codes(layer, quantity)``.
        """
        key = (layer, quantity)
        if key not in self._codes:
            self._codes[key] = self.record.codes(layer, quantity)
        return self._codes[key]

    def redraw(self) -> Figure:
        """Draw the panels of the selected neuron (into the output, in a notebook).

        Returns:
            The new figure.
        """
        layer, column, quantity = (
            self.layer.value,
            self.neuron.value,
            self.quantity.value,
        )
        fig, axes = plt.subplots(
            1, 3, figsize=(13.5, 3.6), gridspec_kw={"width_ratios": [1.1, 0.9, 1.0]}
        )
        draw_neuron(
            axes,
            self.codes(layer, quantity)[:, :, column],
            self.labels,
            classes=self.classes,
            epochs=self.record.record_epochs,
            title=f"{layer}, neuron {_neuron_label(self.record, layer, column)}",
            quantity=quantity,
        )
        self.figure = fig
        self.draws += 1

        if _ipython_shell() is not None:
            from IPython.display import display

            with self.output:
                self.output.clear_output(wait=True)
                display(fig)
        plt.close(fig)
        return fig

    def _ipython_display_(self) -> None:
        from IPython.display import display

        display(self.widget)
