"""Tests of neuronlib.explore: measures against slow loops, figures, the explorer."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
import pytest
import torch
from torch import nn

from neuronlib import data, explore, metrics, train
from neuronlib.probes import GradientSignRecorder, SignRecord
from neuronlib.probes.signs import NEGATIVE, POSITIVE, pack_codes

CLASSES = ["zero", "one", "two"]


def random_codes(records=5, samples=30, neurons=6, seed=0):
    """Random negative, zero and positive codes [R, S, K]."""
    generator = torch.Generator().manual_seed(seed)
    shape = (records, samples, neurons)
    return torch.randint(NEGATIVE, POSITIVE + 1, shape, generator=generator).to(
        torch.uint8
    )


def fake_record(records=4, samples=30, widths=(6, 3), seed=0):
    """A SignRecord with random codes: layers act1, act2; both quantities."""
    layers = [f"act{i + 1}" for i in range(len(widths))]
    quantities = ("activation", "pre_activation")
    packed = {}
    for i, (layer, width) in enumerate(zip(layers, widths, strict=True)):
        for j, quantity in enumerate(quantities):
            codes = random_codes(records, samples, width, seed=seed + 10 * i + j)
            packed[(layer, quantity)] = pack_codes(codes)
    return SignRecord(
        layers=layers,
        quantities=quantities,
        conv_reduce="sum",
        record_epochs=list(range(records)),
        sample_index=torch.arange(100, 100 + samples),
        neuron_index={
            layer: torch.arange(w) for layer, w in zip(layers, widths, strict=True)
        },
        packed=packed,
    )


def fake_labels(samples=30):
    return torch.arange(samples) % len(CLASSES)


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# ----------------------------------------------------------------------- measures


def test_shuffle_keeps_every_record_and_neuron_rates():
    codes = random_codes(records=4, samples=50, neurons=5)
    shuffled = explore.shuffle_records(
        codes, generator=torch.Generator().manual_seed(1)
    )

    assert shuffled.shape == codes.shape
    for before, after in zip(codes, shuffled, strict=True):
        # The same rows, in another order: each record's multiset of rows is kept.
        assert sorted(map(tuple, before.tolist())) == sorted(map(tuple, after.tolist()))
    assert not torch.equal(shuffled, codes)


def test_summarise_matches_the_metrics_and_a_slow_agreement_loop():
    codes = random_codes(records=6, samples=40, neurons=4)
    summary = explore.summarise(codes, generator=torch.Generator().manual_seed(0))

    torch.testing.assert_close(
        summary["consistency"], metrics.sign_consistency(codes), equal_nan=True
    )
    torch.testing.assert_close(
        summary["expected"], metrics.control_consistency(codes), equal_nan=True
    )
    assert torch.equal(summary["settle"], metrics.settle_record(codes))
    assert torch.equal(summary["categories"], metrics.categories(codes))
    torch.testing.assert_close(
        summary["zero_share"], metrics.zero_share(codes), equal_nan=True
    )

    categories = metrics.categories(codes)
    for r in range(codes.shape[0]):
        agree = total = 0
        for s in range(codes.shape[1]):
            for k in range(codes.shape[2]):
                code, category = int(codes[r, s, k]), int(categories[s, k])
                if code in (POSITIVE, NEGATIVE) and category != 0:
                    total += 1
                    agree += (code - 2) == category
        assert summary["agreement"][r].item() == pytest.approx(agree / total)


def test_summarise_of_signs_that_never_change():
    codes = torch.full((5, 8, 3), POSITIVE, dtype=torch.uint8)
    codes[:, :4] = NEGATIVE
    summary = explore.summarise(codes, generator=torch.Generator().manual_seed(0))

    assert (summary["consistency"] == 1).all()
    assert (summary["settle"] == 0).all()
    assert (summary["agreement"] == 1).all()
    assert (summary["zero_share"] == 0).all()
    # Shuffled rows mix the two groups, so the control falls below 1 somewhere.
    assert summary["control"].min() < 1


def test_summarise_refuses_codes_of_the_wrong_shape():
    with pytest.raises(ValueError, match="R, S, K"):
        explore.summarise(torch.ones(4, 5, dtype=torch.uint8))


def test_settled_share_against_a_loop():
    settle = torch.tensor([[0, 2, -1], [1, 2, 0], [3, -1, 1]])
    share = explore.settled_share(settle, 4)

    valid = [v for v in settle.flatten().tolist() if v >= 0]
    expected = [sum(v <= r for v in valid) / len(valid) for r in range(4)]
    assert share.tolist() == pytest.approx(expected)
    assert share[-1] == 1


def test_settled_share_without_any_sign_is_nan():
    assert torch.isnan(explore.settled_share(torch.full((3, 2), -1), 4)).all()


def test_class_purity_is_the_larger_category_share():
    composition = torch.tensor(
        [[[1.0, 0.0, 0.0], [0.3, 0.6, 0.1]], [[0.5, 0.5, 0.0], [0.0, 0.2, 0.8]]]
    )
    purity = explore.class_purity(composition)

    torch.testing.assert_close(purity, torch.tensor([[1.0, 0.6], [0.5, 0.2]]))


def test_typical_neuron_is_the_median_of_the_balanced_ones():
    samples = 10
    categories = torch.ones(samples, 4, dtype=torch.int8)
    categories[:5, 1:] = -1  # neurons 1..3 balanced, neuron 0 one-sided
    consistency = torch.tensor([0.99, 0.6, 0.8, 0.9]).expand(samples, 4)

    assert explore.typical_neuron(categories, consistency) == 2


def test_typical_neuron_falls_back_to_the_most_even_neuron():
    categories = torch.ones(10, 3, dtype=torch.int8)
    categories[:2, 1] = -1
    consistency = torch.ones(10, 3)

    assert explore.typical_neuron(categories, consistency, min_share=0.3) == 1


# ----------------------------------------------------------------------- figures


def _stairs(ax):
    return [p for p in ax.patches if isinstance(p, matplotlib.patches.StepPatch)]


def test_consistency_histograms_one_panel_per_quantity_normalised():
    record = fake_record()
    summaries = {
        q: {layer: explore.summarise(record.codes(layer, q)) for layer in record.layers}
        for q in record.quantities
    }
    fig = explore.plot_consistency(summaries)

    panels = [ax for ax in fig.axes if ax.get_xlabel()]
    assert len(panels) == 2
    assert "consistency" in panels[0].get_xlabel()
    assert fig.axes[-1].get_ylabel() == "layer"  # the depth colourbar
    for ax in panels:
        stairs = _stairs(ax)
        assert len(stairs) == 2 * len(record.layers)  # measured and control
        for patch in stairs:
            assert patch.get_data().values.sum() == pytest.approx(1.0)
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == list(explore.CONSISTENCY_BIN_LABELS)


def test_consistency_bins_put_tenths_and_one_where_they_belong():
    values = np.array([0.5, 0.6, np.float32(0.7), 0.8, 0.9, 0.95, 1.0])
    counts, _ = np.histogram(values, bins=explore.CONSISTENCY_BINS)

    assert counts.tolist() == [1, 1, 1, 1, 2, 1]


def test_layer_histograms_refuse_mismatched_labels():
    with pytest.raises(ValueError, match="label per bin"):
        explore.plot_layer_histograms(
            {"a": torch.rand(10)}, bins=[0, 0.5, 1], bin_labels=["x"], xlabel="x"
        )


def test_settling_figure_has_measured_and_control_lines_per_layer():
    record = fake_record(records=5)
    summaries = {
        layer: explore.summarise(record.codes(layer)) for layer in record.layers
    }
    fig = explore.plot_settling(summaries, record.record_epochs)

    left, right = fig.axes[:2]
    assert len(left.get_lines()) == 2 * len(record.layers)
    assert len(right.get_lines()) == len(record.layers)
    assert left.get_xlabel() == right.get_xlabel() == "epoch"
    assert list(left.get_lines()[0].get_xdata()) == [1, 2, 3, 4, 5]


def test_class_heatmap_has_one_neuron_by_class_image_per_layer():
    record = fake_record()
    labels = fake_labels()
    compositions = {
        layer: metrics.class_composition(
            metrics.categories(record.codes(layer)), labels, len(CLASSES)
        )
        for layer in record.layers
    }
    fig = explore.plot_class_heatmap(compositions, CLASSES)

    images = [ax.get_images()[0] for ax in fig.axes if ax.get_images()]
    assert [im.get_array().shape for im in images] == [(6, 3), (3, 3)]
    for image, composition in zip(images, compositions.values(), strict=True):
        net = (composition[..., 0] - composition[..., 1]).numpy()
        # The rows are the neurons, reordered.
        shown = np.asarray(image.get_array(), dtype=np.float32)
        assert sorted(map(tuple, shown.tolist())) == sorted(map(tuple, net.tolist()))


def test_categories_figure_shows_both_categories_with_their_sizes():
    images = torch.rand(12, 1, 8, 8)
    categories = torch.tensor([1] * 5 + [-1] * 4 + [0] * 3)
    labels = torch.arange(12) % 3
    fig = explore.plot_categories(images, categories, labels, count=4, nrow=2)

    left, right = fig.axes
    assert "5 samples" in left.get_title() and "pushed down" in left.get_title()
    assert "4 samples" in right.get_title() and "pushed up" in right.get_title()


def test_network_bars_one_bar_per_layer_and_control_ticks():
    fig = explore.plot_network_bars(
        {"a": [0.9, 0.8], "b": [0.7, 0.6, 0.5]},
        marks={"a": [0.6, 0.6], "b": [0.5, 0.5, 0.5]},
        ylabel="median sign consistency",
        annotate="{:.1f}",
    )
    ax = fig.axes[0]

    assert len(ax.patches) == 5
    assert [t.get_text() for t in ax.texts] == ["0.9", "0.8", "0.7", "0.6", "0.5"]
    assert len(ax.collections[0].get_segments()) == 2  # control ticks of "a"
    assert [t.get_text() for t in ax.get_xticklabels()] == ["a", "b"]
    assert fig.axes[-1].get_ylabel() == "layer"


# ----------------------------------------------------------------------- one neuron


def _panel_data(axes):
    """What the three panels of a neuron show, to compare two drawings."""
    first, second, third = axes
    return (
        first.get_title(),
        [round(p.get_height(), 6) for p in first.patches],
        [round(p.get_width(), 6) for p in second.patches],
        [tuple(np.round(line.get_ydata(), 6)) for line in third.get_lines()],
    )


def test_draw_neuron_panels_match_the_metrics():
    codes = random_codes(records=4, samples=30, neurons=1)[..., 0]
    labels = fake_labels()
    fig, axes = plt.subplots(1, 3)
    explore.draw_neuron(
        axes, codes, labels, classes=CLASSES, epochs=range(4), title="act1, neuron 0"
    )

    categories = metrics.categories(codes[..., None])[:, 0]
    composition = metrics.class_composition(categories[:, None], labels, 3)[0]
    widths = [p.get_width() for p in axes[1].patches]  # positive, negative, none
    assert widths == pytest.approx(composition.T.flatten().tolist())
    counted = sum(p.get_height() for p in axes[0].patches)
    assert counted == int((categories != 0).sum())
    assert axes[0].get_title().startswith("act1, neuron 0")
    assert axes[2].get_xlabel() == "epoch"


def test_draw_neuron_refuses_mismatched_shapes():
    fig, axes = plt.subplots(1, 3)
    with pytest.raises(ValueError, match="codes"):
        explore.draw_neuron(
            axes,
            torch.ones(4, 5, dtype=torch.uint8),
            torch.zeros(6),
            classes=CLASSES,
            epochs=range(4),
        )


def test_static_explorer_has_three_panels_per_chosen_neuron():
    record = fake_record()
    fig = explore.plot_neurons(
        record, [("act1", 2), ("act2", 0)], fake_labels(), classes=CLASSES
    )

    titled = [ax for ax in fig.axes if ax.get_title()]
    assert len(titled) == 6
    assert titled[0].get_title().startswith("act1, neuron 2")
    assert titled[3].get_title().startswith("act2, neuron 0")


@pytest.mark.parametrize(
    "picks, match",
    [([], "picks is empty"), ([("act1", 6)], "out of range"), ([("fc1", 0)], "fc1")],
)
def test_static_explorer_refuses_bad_picks(picks, match):
    with pytest.raises(ValueError, match=match):
        explore.plot_neurons(fake_record(), picks, fake_labels(), classes=CLASSES)


def test_labels_must_follow_the_record():
    with pytest.raises(ValueError, match="record order"):
        explore.plot_neurons(fake_record(), [("act1", 0)], torch.zeros(7))


def test_explorer_builds_and_redraws_when_a_value_changes():
    record = fake_record()
    explorer = explore.NeuronExplorer(record, fake_labels(), classes=CLASSES)

    assert explorer.draws == 1
    assert explorer.layer.options == ("act1", "act2")
    assert explorer.neuron.max == 5
    explorer.neuron.value = 4
    assert explorer.draws == 2
    assert explorer.figure.axes[0].get_title().startswith("act1, neuron 4")
    explorer.quantity.value = "pre_activation"
    assert explorer.draws == 3
    assert "partial L/\\partial z" in explorer.figure.axes[0].get_xlabel()


def test_explorer_clamps_the_neuron_to_a_narrower_layer_and_redraws_once():
    explorer = explore.NeuronExplorer(fake_record(), fake_labels(), neuron=5)
    explorer.layer.value = "act2"

    assert explorer.draws == 2
    assert explorer.neuron.max == 2 and explorer.neuron.value == 2
    assert explorer.figure.axes[0].get_title().startswith("act2, neuron 2")


def test_live_and_static_explorer_draw_the_same_panels():
    record, labels = fake_record(), fake_labels()
    explorer = explore.NeuronExplorer(
        record, labels, classes=CLASSES, layer="act2", neuron=1
    )
    static = explore.plot_neurons(record, [("act2", 1)], labels, classes=CLASSES)

    assert _panel_data(explorer.figure.axes[:3]) == _panel_data(static.axes[:3])


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"layer": "fc1"}, "not recorded"),
        ({"quantity": "weights"}, "not recorded"),
        ({"neuron": 6}, "out of range"),
    ],
)
def test_explorer_refuses_bad_choices(kwargs, match):
    with pytest.raises(ValueError, match=match):
        explore.NeuronExplorer(fake_record(), fake_labels(), **kwargs)


def test_explorer_on_a_recorded_training_run():
    torch.manual_seed(0)
    x = torch.randn(48, 1, 2, 2)
    y = (x.flatten(1).sum(1) > 0).long()
    index = torch.arange(48)
    train_set = data.TensorData(x, y, index, ("neg", "pos"), "mnist", "train")
    model = nn.Sequential(
        nn.Flatten(),
        nn.Linear(4, 5),
        nn.ReLU(),
        nn.Linear(5, 3),
        nn.Tanh(),
        nn.Linear(3, 2),
    )
    recorder = GradientSignRecorder(model, ["2", "4"], num_samples=48)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    train.fit(
        model, train_set.loader(16), optimizer=optimizer, epochs=3, probes=[recorder]
    )
    record = recorder.snapshot()

    explorer = explore.NeuronExplorer(record, y, classes=train_set.classes)
    explorer.layer.value = "4"
    assert explorer.draws == 2
    fig = explore.plot_neurons(record, [("2", 0), ("4", 2)], y)
    assert len([ax for ax in fig.axes if ax.get_title()]) == 6
