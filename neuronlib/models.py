"""Model builders and the ordered list of a model's weight layers.

Two builders cover the networks of the book:

- :func:`mlp`: a multilayer perceptron (flatten, then fully connected hidden layers).
- :func:`vgg`: a VGG-style convolutional network, the C10-CNN1 family of the layer
  rotation paper (Carbonnelle and De Vleeschouwer, 2018, arXiv:1806.01603): stages
  of 3x3 convolutions, max-pooling between stages, global average pooling and a
  linear classifier.

Both return an ``nn.Sequential`` whose children carry stable names (``fc1``,
``act1``, ``conv2_1``, ``out``, ...), so the order of its children is the order of
the forward pass. :func:`weight_layers` lists the Linear and Conv layers in that
order: it is what "depth" means everywhere in the book (probes record by it and
plots colour by it). :func:`hidden_layers` names the activation module after each
hidden weight layer: its input is the pre-activation, its output the activation.
"""

from __future__ import annotations

import math
import operator
from collections import OrderedDict
from collections.abc import Sequence

import torch
from torch import nn

ACTIVATIONS = ("relu", "tanh", "sigmoid", "leaky_relu", "linear")
INITS = ("he_uniform", "he_normal", "default")
BATCH_NORMS = ("after", "before", None)
POOLS = ("max", "avg")

# Modules that count as weight layers ("depth") and as activations.
WEIGHT_LAYER_TYPES = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
# Elementwise nonlinearities: the module whose input is a pre-activation and whose
# output is an activation (the gradient-sign recorder uses the same list).
NONLINEARITY_TYPES = (
    nn.ReLU,
    nn.ReLU6,
    nn.LeakyReLU,
    nn.PReLU,
    nn.RReLU,
    nn.ELU,
    nn.SELU,
    nn.CELU,
    nn.GELU,
    nn.SiLU,
    nn.Mish,
    nn.Softplus,
    nn.Softsign,
    nn.Tanh,
    nn.Tanhshrink,
    nn.Hardtanh,
    nn.Sigmoid,
    nn.LogSigmoid,
    nn.Hardsigmoid,
    nn.Hardswish,
    nn.Threshold,
)
# The builders' activation="linear" puts an nn.Identity where the nonlinearity goes.
ACTIVATION_TYPES = (*NONLINEARITY_TYPES, nn.Identity)


def mlp(
    in_shape: Sequence[int] = (1, 28, 28),
    widths: Sequence[int] = (1024, 1024),
    num_classes: int = 10,
    *,
    activation: str = "relu",
    bias: bool = True,
    batch_norm: bool = False,
    init: str = "default",
) -> nn.Sequential:
    """Build a multilayer perceptron.

    The children are named ``flatten``, then for hidden layer ``i`` (1-based)
    ``fc{i}``, ``bn{i}`` (only with ``batch_norm``) and ``act{i}``, then ``out``.
    Batch norm sits between the linear layer and the activation, so ``act{i}``
    receives the (normalised) pre-activation.

    Args:
        in_shape: Shape of one input sample, for example ``(1, 28, 28)``; the
            input ``[N, *in_shape]`` is flattened to ``[N, prod(in_shape)]``.
        widths: Number of neurons of each hidden layer; at least one layer.
        num_classes: Number of outputs (logits) ``[N, num_classes]``.
        activation: One of ``"relu"``, ``"tanh"``, ``"sigmoid"``,
            ``"leaky_relu"`` or ``"linear"`` (an ``nn.Identity``, kept as a
            module so that probes can hook it). A fresh module per layer.
        bias: Whether the linear layers (hidden and output) have a bias.
        batch_norm: Whether to put an ``nn.BatchNorm1d`` after each hidden linear
            layer, before its activation.
        init: ``"default"`` (PyTorch's initialisation), ``"he_uniform"`` or
            ``"he_normal"``; see :func:`vgg` for what the He variants do.

    Returns:
        The model, an ``nn.Sequential`` mapping ``[N, *in_shape]`` to
        ``[N, num_classes]``. Its ``in_shape`` attribute holds ``in_shape``.

    Raises:
        ValueError: If a width, ``num_classes`` or a dimension of ``in_shape`` is
            not a positive integer, ``widths`` is empty, or ``activation`` or
            ``init`` is unknown.
    """
    in_shape = _positive_ints(in_shape, "in_shape", example="(1, 28, 28)")
    widths = _positive_ints(widths, "widths", example="(1024, 1024)")
    num_classes = _positive_int(num_classes, "num_classes")
    _check_choice(activation, ACTIVATIONS, "activation")
    _check_choice(init, INITS, "init")

    layers: dict[str, nn.Module] = {"flatten": nn.Flatten()}
    fan_in = math.prod(in_shape)
    for i, width in enumerate(widths, start=1):
        layers[f"fc{i}"] = nn.Linear(fan_in, width, bias=bias)
        if batch_norm:
            layers[f"bn{i}"] = nn.BatchNorm1d(width)
        layers[f"act{i}"] = _activation(activation)
        fan_in = width
    layers["out"] = nn.Linear(fan_in, num_classes, bias=bias)

    return _assemble(layers, init, in_shape)


def vgg(
    in_shape: Sequence[int] = (3, 32, 32),
    stages: Sequence[Sequence[int]] = ((64, 64), (128, 128)),
    num_classes: int = 10,
    *,
    batch_norm: str | None = "after",
    bn_affine: bool = True,
    bias: bool = True,
    init: str = "he_uniform",
    activation: str = "relu",
    pool: str = "max",
) -> nn.Sequential:
    """Build a VGG-style convolutional network (the C10-CNN1 family).

    Each stage is a run of 3x3 convolutions (stride 1, padding 1, so the spatial
    size is kept); a 2x2 pooling (stride 2) halves the spatial size between two
    stages. After the last stage, global average pooling turns each channel into
    one number and a linear layer gives the logits.

    The children are named ``conv{s}_{j}``, ``bn{s}_{j}``, ``act{s}_{j}`` (stage
    ``s`` and convolution ``j`` within it, both 1-based), ``pool{s}`` (after stage
    ``s``, for every stage but the last), then ``gap``, ``flatten`` and ``out``.
    With ``batch_norm="after"`` a convolution is followed by activation then batch
    norm (conv -> relu -> bn); with ``"before"`` by batch norm then activation
    (conv -> bn -> relu); with ``None`` there is no batch norm.

    Initialisation (``init``) applies to every weight layer, the classifier
    included, and sets the biases to zero, as Keras does:

    - ``"he_uniform"``: ``nn.init.kaiming_uniform_`` with the ReLU gain and
      ``fan_in`` mode, i.e. uniform on ``[-b, b]`` with ``b = sqrt(6 / fan_in)``;
      this is exactly Keras' ``he_uniform``.
    - ``"he_normal"``: ``nn.init.kaiming_normal_`` with the ReLU gain and
      ``fan_in`` mode, i.e. a normal with standard deviation ``sqrt(2 / fan_in)``.
      Keras' ``he_normal`` draws from a *truncated* normal rescaled to the same
      variance; the two share the variance, which is what He et al. derive, and
      differ only in the tails.
    - ``"default"``: PyTorch's own initialisation, untouched.

    ``fan_in`` is ``in_channels * 3 * 3`` for a convolution and ``in_features``
    for a linear layer.

    Args:
        in_shape: Shape ``(C, H, W)`` of one input image.
        stages: For each stage, the number of filters of each of its
            convolutions; ``((64, 64), (128, 128))`` is two stages of two
            convolutions.
        num_classes: Number of outputs (logits) ``[N, num_classes]``.
        batch_norm: ``"after"``, ``"before"`` (relative to the activation) or
            ``None``.
        bn_affine: Whether batch norm has a learned scale and shift; without
            them ``BatchNorm2d`` has no parameters.
        bias: Whether the convolutions and the classifier have a bias.
        init: ``"he_uniform"``, ``"he_normal"`` or ``"default"`` (see above).
        activation: One of ``"relu"``, ``"tanh"``, ``"sigmoid"``,
            ``"leaky_relu"`` or ``"linear"``; a fresh module per layer.
        pool: ``"max"`` or ``"avg"``, the pooling between stages.

    Returns:
        The model, an ``nn.Sequential`` mapping ``[N, C, H, W]`` to
        ``[N, num_classes]``. Its ``in_shape`` attribute holds ``in_shape``.

    Raises:
        ValueError: If ``in_shape`` is not three positive integers, ``stages`` or
            one of its stages is empty, a filter count or ``num_classes`` is not a
            positive integer, the image is too small for the number of poolings,
            or ``batch_norm``, ``init``, ``activation`` or ``pool`` is unknown.
    """
    in_shape = _positive_ints(in_shape, "in_shape", example="(3, 32, 32)")
    if len(in_shape) != 3:
        raise ValueError(
            f"in_shape={in_shape} must be (channels, height, width), "
            "for example (3, 32, 32)."
        )
    if isinstance(stages, (str, bytes)) or not isinstance(stages, Sequence):
        raise ValueError(
            f"stages={stages!r} must be a sequence of stages, each a sequence of "
            "filter counts, for example ((64, 64), (128, 128))."
        )
    if len(stages) == 0:
        raise ValueError(
            "stages=() has no stage; pass at least one, for example ((64, 64),)."
        )
    stages = [
        _positive_ints(stage, f"stages[{s}]", example="(64, 64)")
        for s, stage in enumerate(stages)
    ]
    num_classes = _positive_int(num_classes, "num_classes")
    _check_choice(batch_norm, BATCH_NORMS, "batch_norm")
    _check_choice(init, INITS, "init")
    _check_choice(activation, ACTIVATIONS, "activation")
    _check_choice(pool, POOLS, "pool")
    channels, height, width = in_shape
    smallest = 2 ** (len(stages) - 1)
    if min(height, width) < smallest:
        raise ValueError(
            f"An image of {height}x{width} is too small for {len(stages)} stages "
            f"({len(stages) - 1} poolings need at least {smallest}x{smallest}); "
            "use fewer stages or larger images."
        )

    layers: dict[str, nn.Module] = {}
    for s, stage in enumerate(stages, start=1):
        for j, filters in enumerate(stage, start=1):
            layers[f"conv{s}_{j}"] = nn.Conv2d(
                channels, filters, kernel_size=3, padding=1, bias=bias
            )
            if batch_norm == "before":
                layers[f"bn{s}_{j}"] = nn.BatchNorm2d(filters, affine=bn_affine)
            layers[f"act{s}_{j}"] = _activation(activation)
            if batch_norm == "after":
                layers[f"bn{s}_{j}"] = nn.BatchNorm2d(filters, affine=bn_affine)
            channels = filters
        if s < len(stages):
            layers[f"pool{s}"] = (
                nn.MaxPool2d(2, stride=2)
                if pool == "max"
                else nn.AvgPool2d(2, stride=2)
            )
    layers["gap"] = nn.AdaptiveAvgPool2d(1)
    layers["flatten"] = nn.Flatten()
    layers["out"] = nn.Linear(channels, num_classes, bias=bias)

    return _assemble(layers, init, in_shape)


def _assemble(
    layers: dict[str, nn.Module], init: str, in_shape: Sequence[int]
) -> nn.Sequential:
    """The builders' last step: the Sequential, initialised, with its input shape."""
    model = nn.Sequential(OrderedDict(layers))
    _initialise(model, init)
    model.in_shape = tuple(in_shape)
    return model


def weight_layers(
    model: nn.Module, *, in_shape: Sequence[int] | None = None
) -> list[tuple[str, nn.Module]]:
    """List a model's weight layers (Linear and Conv) in forward order.

    This order is the "depth" used by every probe and plot. For a model built
    only of ``nn.Sequential`` containers (as :func:`mlp` and :func:`vgg` build),
    the order in which the modules are registered is the order in which they run,
    so it is read off the module tree. For any other model the order is found by
    a forward pass, with hooks, of a zero input ``[2, *in_shape]`` in eval mode
    and without gradients; the model's training mode is restored afterwards.

    Args:
        model: The model.
        in_shape: Shape of one input sample, needed only for a model that is not
            made of ``nn.Sequential`` containers; defaults to the model's
            ``in_shape`` attribute when it has one.

    Returns:
        ``(name, module)`` pairs, with the names of ``model.named_modules()``
        (for example ``"fc1"`` or ``"features.0"``). A layer used twice appears
        once, where it first runs; a layer that does not run in the forward pass
        does not appear.

    Raises:
        ValueError: If the forward order must be found by a forward pass and no
            input shape is known.
    """
    return [
        (name, module)
        for name, module in _leaves_in_forward_order(model, in_shape)
        if isinstance(module, WEIGHT_LAYER_TYPES)
    ]


def hidden_layers(
    model: nn.Module, *, in_shape: Sequence[int] | None = None
) -> list[str]:
    """Name the activation module of each hidden weight layer, in forward order.

    A hidden weight layer is any weight layer but the last (the output layer). Its
    activation module is the first activation (``nn.ReLU``, ``nn.Tanh``, ...,
    ``nn.Identity`` for a linear network) that runs after it and before the next
    weight layer; batch norm or pooling in between is skipped over. The input of
    that module is the neuron's pre-activation, its output the activation.

    Args:
        model: The model.
        in_shape: As for :func:`weight_layers`.

    Returns:
        Names of the activation modules, one per hidden weight layer, for example
        ``["act1", "act2"]``.

    Raises:
        ValueError: If a hidden weight layer has no activation module after it
            (the activation is applied as a function, e.g. ``F.relu``), or as for
            :func:`weight_layers`.
    """
    leaves = _leaves_in_forward_order(model, in_shape)
    weights = [
        i for i, (_, m) in enumerate(leaves) if isinstance(m, WEIGHT_LAYER_TYPES)
    ]

    names = []
    for here, following in zip(weights[:-1], weights[1:], strict=False):
        found = [
            name
            for name, module in leaves[here + 1 : following]
            if isinstance(module, ACTIVATION_TYPES)
        ]
        if not found:
            raise ValueError(
                f"Weight layer {leaves[here][0]!r} has no activation module before "
                f"the next weight layer {leaves[following][0]!r}; apply the "
                "nonlinearity as a module (nn.ReLU(), not F.relu) so that it can be "
                "hooked."
            )
        names.append(found[0])
    return names


def _leaves_in_forward_order(
    model: nn.Module, in_shape: Sequence[int] | None
) -> list[tuple[str, nn.Module]]:
    """Modules without children, in the order they run."""
    if _is_plain_sequential(model):
        return [(n, m) for n, m in model.named_modules() if not any(m.children())]

    in_shape = in_shape if in_shape is not None else getattr(model, "in_shape", None)
    if in_shape is None:
        raise ValueError(
            f"{type(model).__name__} is not built only of nn.Sequential containers, "
            "so its forward order is found by a forward pass; pass in_shape=, the "
            "shape of one input sample, for example in_shape=(1, 28, 28)."
        )
    in_shape = _positive_ints(in_shape, "in_shape", example="(1, 28, 28)")
    names = {id(m): n for n, m in model.named_modules() if not any(m.children())}
    order: dict[int, tuple[str, nn.Module]] = {}

    def record(module: nn.Module, args: tuple, output: object) -> None:
        order.setdefault(id(module), (names[id(module)], module))

    handles = [
        module.register_forward_hook(record)
        for module in model.modules()
        if id(module) in names
    ]
    modes = [m.training for m in model.modules()]
    try:
        parameter = next(model.parameters(), None)
        device = parameter.device if parameter is not None else None
        dtype = parameter.dtype if parameter is not None else None
        # Two samples, so that batch norm in train mode would also work; eval
        # mode keeps the running statistics untouched.
        dummy = torch.zeros(2, *in_shape, device=device, dtype=dtype)
        model.eval()
        with torch.no_grad():
            model(dummy)
    finally:
        for handle in handles:
            handle.remove()
        for module, mode in zip(model.modules(), modes, strict=True):
            module.training = mode
    return list(order.values())


def _is_plain_sequential(model: nn.Module) -> bool:
    """Whether every module with children is an ``nn.Sequential`` as it comes."""
    return all(
        type(module).forward is nn.Sequential.forward
        for module in model.modules()
        if any(module.children())
    )


def _activation(name: str) -> nn.Module:
    return {
        "relu": nn.ReLU,
        "tanh": nn.Tanh,
        "sigmoid": nn.Sigmoid,
        "leaky_relu": nn.LeakyReLU,
        "linear": nn.Identity,
    }[name]()


def _initialise(model: nn.Module, init: str) -> None:
    if init == "default":
        return
    for module in model.modules():
        if isinstance(module, WEIGHT_LAYER_TYPES):
            if init == "he_uniform":
                nn.init.kaiming_uniform_(
                    module.weight, mode="fan_in", nonlinearity="relu"
                )
            else:
                nn.init.kaiming_normal_(
                    module.weight, mode="fan_in", nonlinearity="relu"
                )
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def _check_choice(value: object, choices: tuple, what: str) -> None:
    if value not in choices:
        raise ValueError(
            f"Unknown {what}={value!r}; use one of {', '.join(map(repr, choices))}."
        )


def _positive_int(value: object, what: str) -> int:
    try:
        number = operator.index(value)
    except TypeError:
        number = None
    if number is None or isinstance(value, bool) or number < 1:
        raise ValueError(
            f"{what}={value!r} must be a positive integer, for example 10."
        )
    return number


def _positive_ints(values: object, what: str, *, example: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise ValueError(
            f"{what}={values!r} must be a sequence of positive integers, "
            f"for example {example}."
        )
    if len(values) == 0:
        raise ValueError(
            f"{what}=() is empty; pass at least one positive integer, "
            f"for example {what}={example}."
        )
    numbers = []
    for value in values:
        try:
            number = operator.index(value)
        except TypeError:
            number = None
        if number is None or isinstance(value, bool) or number < 1:
            raise ValueError(
                f"{what}={tuple(values)!r} holds {value!r}; every entry must be a "
                f"positive integer, for example {what}={example}."
            )
        numbers.append(number)
    return tuple(numbers)
