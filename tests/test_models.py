"""The model builders: names, order, shapes, batch norm placement, initialisation."""

import math

import pytest
import torch
from torch import nn

from neuronlib import models


def _names(model):
    return [name for name, _ in model.named_children()]


# --- mlp ----------------------------------------------------------------------


@pytest.mark.parametrize("batch_norm", [False, True], ids=["plain", "batch_norm"])
def test_mlp_names_its_layers_in_forward_order(batch_norm):
    model = models.mlp((1, 4, 4), (8, 6), 3, batch_norm=batch_norm)

    if batch_norm:
        expected = ["flatten", "fc1", "bn1", "act1", "fc2", "bn2", "act2", "out"]
    else:
        expected = ["flatten", "fc1", "act1", "fc2", "act2", "out"]
    assert _names(model) == expected
    assert [n for n, _ in models.weight_layers(model)] == ["fc1", "fc2", "out"]
    assert models.hidden_layers(model) == ["act1", "act2"]


def test_mlp_parameter_shapes_and_output_shape():
    model = models.mlp((1, 4, 4), (8, 6), 3)

    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {
        "fc1.weight": (8, 16),
        "fc1.bias": (8,),
        "fc2.weight": (6, 8),
        "fc2.bias": (6,),
        "out.weight": (3, 6),
        "out.bias": (3,),
    }
    assert model(torch.randn(5, 1, 4, 4)).shape == (5, 3)
    assert model.in_shape == (1, 4, 4)


@pytest.mark.parametrize(
    ("activation", "module_type"),
    [
        ("relu", nn.ReLU),
        ("tanh", nn.Tanh),
        ("sigmoid", nn.Sigmoid),
        ("leaky_relu", nn.LeakyReLU),
        ("linear", nn.Identity),
    ],
    ids=lambda value: value if isinstance(value, str) else "",
)
def test_mlp_uses_a_fresh_activation_module_per_layer(activation, module_type):
    model = models.mlp((4,), (3, 3, 3), 2, activation=activation)

    acts = [model.get_submodule(name) for name in models.hidden_layers(model)]
    assert all(type(act) is module_type for act in acts)
    assert len({id(act) for act in acts}) == 3


def test_mlp_without_bias_has_no_bias_anywhere():
    model = models.mlp((4,), (3, 3), 2, bias=False)

    assert all(layer.bias is None for _, layer in models.weight_layers(model))


# --- vgg ----------------------------------------------------------------------


def test_vgg_names_its_layers_in_forward_order():
    model = models.vgg((3, 8, 8), ((4, 4), (6,)), 5, batch_norm="after")

    assert _names(model) == [
        "conv1_1",
        "act1_1",
        "bn1_1",
        "conv1_2",
        "act1_2",
        "bn1_2",
        "pool1",
        "conv2_1",
        "act2_1",
        "bn2_1",
        "gap",
        "flatten",
        "out",
    ]
    assert [n for n, _ in models.weight_layers(model)] == [
        "conv1_1",
        "conv1_2",
        "conv2_1",
        "out",
    ]
    assert models.hidden_layers(model) == ["act1_1", "act1_2", "act2_1"]


@pytest.mark.parametrize(
    ("batch_norm", "order"),
    [
        ("after", [nn.Conv2d, nn.ReLU, nn.BatchNorm2d]),
        ("before", [nn.Conv2d, nn.BatchNorm2d, nn.ReLU]),
        (None, [nn.Conv2d, nn.ReLU]),
    ],
    ids=["after", "before", "none"],
)
def test_vgg_places_batch_norm_relative_to_the_activation(batch_norm, order):
    model = models.vgg((3, 8, 8), ((4,),), 2, batch_norm=batch_norm)

    children = list(model.children())
    assert [type(m) for m in children[: len(order)]] == order
    assert models.hidden_layers(model) == ["act1_1"]


def test_vgg_parameter_shapes_and_output_shape():
    model = models.vgg((3, 8, 8), ((4, 4), (6,)), 5, batch_norm="before")

    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes["conv1_1.weight"] == (4, 3, 3, 3)
    assert shapes["conv1_2.weight"] == (4, 4, 3, 3)
    assert shapes["conv2_1.weight"] == (6, 4, 3, 3)
    assert shapes["bn2_1.weight"] == (6,)
    assert shapes["out.weight"] == (5, 6)
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 5)


def test_vgg_pools_between_stages_only():
    model = models.vgg((3, 16, 16), ((2,), (2,), (2,)), 2, batch_norm=None)

    pools = [n for n, m in model.named_children() if isinstance(m, nn.MaxPool2d)]
    assert pools == ["pool1", "pool2"]
    x = model[: list(dict(model.named_children())).index("gap")](
        torch.randn(1, 3, 16, 16)
    )
    assert x.shape == (1, 2, 4, 4)


def test_vgg_avg_pool_option():
    model = models.vgg((3, 8, 8), ((2,), (2,)), 2, pool="avg")

    assert isinstance(model.pool1, nn.AvgPool2d)


def test_vgg_batch_norm_without_affine_has_no_parameters():
    model = models.vgg((3, 8, 8), ((4,),), 2, batch_norm="after", bn_affine=False)

    assert list(model.bn1_1.parameters()) == []
    assert model.bn1_1.running_mean.shape == (4,)


def test_vgg_without_bias_has_no_bias_anywhere():
    model = models.vgg((3, 8, 8), ((4,), (4,)), 2, bias=False)

    assert all(layer.bias is None for _, layer in models.weight_layers(model))


# --- initialisation -----------------------------------------------------------


def test_he_normal_has_the_std_of_he_et_al():
    torch.manual_seed(0)
    model = models.vgg((256, 4, 4), ((256,),), 2, init="he_normal", batch_norm=None)

    weight = model.conv1_1.weight
    fan_in = 256 * 3 * 3
    assert weight.std().item() == pytest.approx(math.sqrt(2 / fan_in), rel=0.02)
    assert weight.mean().item() == pytest.approx(0.0, abs=0.002)
    assert torch.count_nonzero(model.conv1_1.bias) == 0


def test_he_uniform_matches_keras_bound():
    torch.manual_seed(0)
    model = models.vgg((256, 4, 4), ((256,),), 2, init="he_uniform", batch_norm=None)

    weight = model.conv1_1.weight
    bound = math.sqrt(6 / (256 * 3 * 3))
    assert weight.abs().max().item() <= bound
    assert weight.abs().max().item() > 0.99 * bound
    # A uniform on [-b, b] has std b / sqrt(3).
    assert weight.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.02)


def test_he_init_also_applies_to_the_classifier_and_mlp():
    torch.manual_seed(0)
    model = models.mlp((512,), (512,), 512, init="he_normal")

    for _, layer in models.weight_layers(model):
        assert layer.weight.std().item() == pytest.approx(math.sqrt(2 / 512), rel=0.03)
        assert torch.count_nonzero(layer.bias) == 0


def test_default_init_is_pytorchs():
    torch.manual_seed(0)
    model = models.vgg((3, 8, 8), ((4,),), 2, init="default")
    torch.manual_seed(0)
    reference = nn.Conv2d(3, 4, 3, padding=1)

    torch.testing.assert_close(model.conv1_1.weight, reference.weight)


# --- forward order of arbitrary models ----------------------------------------


class _Backwards(nn.Module):
    """Registers its layers in the opposite order to the one they run in."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(5, 2)
        self.act = nn.Tanh()
        self.body = nn.Sequential(nn.Linear(3, 5))
        self.unused = nn.Linear(7, 7)

    def forward(self, x):
        return self.head(self.act(self.body(x)))


def test_weight_layers_follows_the_forward_pass_not_registration():
    model = _Backwards()
    model.train()

    layers = models.weight_layers(model, in_shape=(3,))

    assert [name for name, _ in layers] == ["body.0", "head"]
    assert layers[0][1] is model.body[0]
    assert models.hidden_layers(model, in_shape=(3,)) == ["act"]
    assert model.training and model.body.training
    assert all(not m._forward_hooks for m in model.modules())


def test_weight_layers_needs_an_input_shape_for_custom_models():
    with pytest.raises(ValueError, match="in_shape="):
        models.weight_layers(_Backwards())


def test_hidden_layers_asks_for_activation_modules():
    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(2, 2)
            self.b = nn.Linear(2, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    with pytest.raises(ValueError, match="nn.ReLU"):
        models.hidden_layers(Functional(), in_shape=(2,))


# --- bad input ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"widths": (10, 0)}, "positive integer"),
        ({"widths": (-3,)}, "positive integer"),
        ({"widths": ()}, "at least one"),
        ({"widths": (2.5,)}, "positive integer"),
        ({"num_classes": 0}, "positive integer"),
        ({"in_shape": (1, 0, 28)}, "positive integer"),
        ({"activation": "swish"}, "'relu'"),
        ({"init": "xavier"}, "'he_uniform'"),
    ],
    ids=[
        "zero-width",
        "negative-width",
        "no-layers",
        "float-width",
        "no-classes",
        "zero-input",
        "activation",
        "init",
    ],
)
def test_mlp_rejects_bad_specs_with_a_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.mlp(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"stages": ()}, "at least one"),
        ({"stages": ((64,), ())}, "at least one"),
        ({"stages": ((64, 0),)}, "positive integer"),
        ({"stages": (64, 128)}, "sequence"),
        ({"batch_norm": "middle"}, "'after'"),
        ({"init": "orthogonal"}, "'he_normal'"),
        ({"activation": "gelu"}, "'tanh'"),
        ({"pool": "min"}, "'max'"),
        ({"in_shape": (32, 32)}, "channels, height, width"),
        ({"in_shape": (3, 4, 4), "stages": ((2,),) * 4}, "too small"),
    ],
    ids=[
        "no-stages",
        "empty-stage",
        "zero-filters",
        "flat-stages",
        "batch-norm",
        "init",
        "activation",
        "pool",
        "in-shape",
        "too-small",
    ],
)
def test_vgg_rejects_bad_specs_with_a_fix(kwargs, match):
    with pytest.raises(ValueError, match=match):
        models.vgg(**kwargs)
