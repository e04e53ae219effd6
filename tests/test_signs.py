"""The gradient-sign recorder against torch.autograd.grad on small models."""

import copy
from collections import OrderedDict
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuronlib.probes import GradientSignRecorder, SignRecord
from neuronlib.probes import _encode as encode_module
from neuronlib.probes import signs as signs_module
from neuronlib.probes.signs import (
    NEGATIVE,
    NOT_RECORDED,
    POSITIVE,
    ZERO,
    _pack_signs,
    pack_codes,
    sign_codes,
    unpack_codes,
)

NUM_SAMPLES = 24
BATCH_SIZE = 5


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(params=["compiled", "multiply", "generic"])
def packing(request, monkeypatch):
    """Run a test with each of the recorder's three ways of packing signs.

    "compiled": the Numba kernel of neuronlib.probes._encode, the default on the
    CPU (it must be available here); "multiply" and "generic": the torch path,
    with packing by multiplication or by shifts (where the kernel is missing).
    """
    if request.param == "compiled":
        assert encode_module.kernels() is not None
    else:
        monkeypatch.setattr(encode_module, "kernels", lambda: None)
    checked = {"cpu": False} if request.param == "generic" else {}
    monkeypatch.setattr(signs_module, "_gather_checked", checked)
    return request.param


@pytest.fixture
def torch_packing(monkeypatch):
    """Run a test on the torch path (no compiled kernel)."""
    monkeypatch.setattr(encode_module, "kernels", lambda: None)


# --- models


def mlp_model(activation=nn.ReLU, *, inplace=False, batch_norm=False, widths=(8, 7)):
    def act():
        return activation(inplace=True) if inplace else activation()

    first, second = widths
    layers = [("flatten", nn.Flatten()), ("fc1", nn.Linear(12, first))]
    if batch_norm:
        layers.append(("bn1", nn.BatchNorm1d(first)))
    layers += [("act1", act()), ("fc2", nn.Linear(first, second)), ("act2", act())]
    layers.append(("out", nn.Linear(second, 3)))
    return nn.Sequential(OrderedDict(layers))


def cnn_model(*, inplace=False, batch_norm=None):
    """Conv, [bn], relu, [bn], pool, conv, relu, pool, linear.

    ``batch_norm`` is None, ``"before"`` (conv, bn, relu) or ``"after"`` (conv,
    relu, bn): the two orders of the VGG builder.
    """
    layers = [("conv1", nn.Conv2d(2, 4, 3, padding=1))]
    if batch_norm == "before":
        layers.append(("bn1", nn.BatchNorm2d(4)))
    layers.append(("act1", nn.ReLU(inplace=inplace)))
    if batch_norm == "after":
        layers.append(("bn1", nn.BatchNorm2d(4)))
    layers += [
        ("pool1", nn.MaxPool2d(2)),
        ("conv2", nn.Conv2d(4, 5, 3, padding=1)),
        ("act2", nn.ReLU(inplace=inplace)),
        ("gap", nn.AdaptiveAvgPool2d(1)),
        ("flatten", nn.Flatten()),
        ("out", nn.Linear(5, 3)),
    ]
    return nn.Sequential(OrderedDict(layers))


def data_for(model, dtype=torch.float32, *, seed=0):
    generator = torch.Generator().manual_seed(seed)
    is_cnn = isinstance(model[0], nn.Conv2d)
    shape = (NUM_SAMPLES, 2, 4, 4) if is_cnn else (NUM_SAMPLES, 12)
    x = torch.randn(shape, generator=generator, dtype=dtype)
    y = torch.randint(0, 3, (NUM_SAMPLES,), generator=generator)
    return x, y


# --- reference


def code_of(value):
    return POSITIVE if value > 0 else NEGATIVE if value < 0 else ZERO


def channel_value(grad, reduce):
    """One channel's value from its [H, W] gradient, the slow obvious way."""
    if reduce == "sum":
        return grad.sum().item()
    positive = sum(1 for v in grad.flatten().tolist() if v > 0)
    negative = sum(1 for v in grad.flatten().tolist() if v < 0)
    return positive - negative


def reference_grads(twin, layers, x, y):
    """dLoss/dPre-activation and dLoss/dActivation by autograd.grad, no hooks."""
    captured = {}
    h = x
    for name, module in twin.named_children():
        if name in layers:
            pre = h
            h = module(h)
            captured[name] = (pre, h)
        else:
            h = module(h)
    loss = F.cross_entropy(h, y)
    tensors = [t for name in layers for t in captured[name]]
    grads = torch.autograd.grad(loss, tensors)
    return {
        (name, quantity): grads[2 * i + j]
        for i, name in enumerate(layers)
        for j, quantity in enumerate(("pre_activation", "activation"))
    }


def non_inplace_twin(model):
    """A copy without in-place activations and without any hook."""
    twin = copy.deepcopy(model)
    for module in twin.modules():
        if hasattr(module, "inplace"):
            module.inplace = False
        for attribute, value in vars(module).items():
            if "hook" in attribute and isinstance(value, dict):
                value.clear()
    return twin


@dataclass
class Expected:
    """Codes [R, S, K] built entry by entry from reference gradients."""

    samples: list
    neurons: dict
    codes: dict = field(default_factory=dict)

    def new_record(self):
        for records in self.codes.values():
            records.append(torch.zeros_like(records[0]))

    def add(self, grads, index, reduce):
        for (name, quantity), grad in grads.items():
            records = self.codes.setdefault(
                (name, quantity),
                [
                    torch.zeros(
                        len(self.samples), len(self.neurons[name]), dtype=torch.uint8
                    )
                ],
            )
            for i, dataset_index in enumerate(index.tolist()):
                if dataset_index not in self.samples:
                    continue
                row = self.samples.index(dataset_index)
                for column, neuron in enumerate(self.neurons[name]):
                    g = grad[i, neuron]
                    value = channel_value(g, reduce) if g.dim() else g.item()
                    records[-1][row, column] = code_of(value)

    def stacked(self, name, quantity):
        return torch.stack(self.codes[(name, quantity)])


def train_recorded(
    model,
    recorder,
    x,
    y,
    *,
    epochs=3,
    record=lambda epoch: True,
    samples=None,
    neurons=None,
    reduce="sum",
    lr=0.5,
    keep=None,
):
    """Train with SGD, driving the recorder by hand; return reference codes.

    ``keep(epoch, index)`` may drop samples from a batch (to leave some unseen).
    """
    layers = list(recorder.layers)
    samples = list(range(NUM_SAMPLES)) if samples is None else list(samples)
    widths = {name: recorder.neuron_index[name].numel() for name in layers}
    neurons = neurons or {}
    neurons = {n: list(neurons.get(n, range(widths[n]))) for n in layers}
    expected = Expected(samples, neurons)
    twin = non_inplace_twin(model)
    generator = torch.Generator().manual_seed(1)
    first_record = True

    recorder.on_fit_start(SimpleNamespace(model=model))
    for epoch in range(epochs):
        recorder.on_epoch_start(SimpleNamespace(epoch=epoch))
        if record(epoch) and not first_record:
            expected.new_record()
        order = torch.randperm(NUM_SAMPLES, generator=generator)
        for start in range(0, NUM_SAMPLES, BATCH_SIZE):
            index = order[start : start + BATCH_SIZE]
            if keep is not None:
                index = index[keep(epoch, index)]
            xb, yb = x[index], y[index]
            if record(epoch):
                twin.load_state_dict(model.state_dict())
                grads = reference_grads(twin, layers, xb, yb)
                expected.add(grads, index, reduce)
            batch = SimpleNamespace(x=xb, y=yb, index=index)
            recorder.on_batch_start(SimpleNamespace(batch=batch))
            loss = F.cross_entropy(model(xb), yb)
            model.zero_grad()
            loss.backward()
            with torch.no_grad():  # plain SGD
                for parameter in model.parameters():
                    parameter -= lr * parameter.grad
            recorder.on_batch_end(SimpleNamespace(batch=batch))
        if record(epoch):
            first_record = False
        recorder.on_epoch_end(SimpleNamespace(epoch=epoch))
    recorder.on_fit_end(SimpleNamespace(model=model))
    return expected


# --- agreement

CASES = {
    "mlp-relu": dict(build=lambda: mlp_model()),
    "mlp-tanh": dict(build=lambda: mlp_model(nn.Tanh)),
    # 16 and 36 neurons: rows of 4 and 9 bytes (stored as int32 and uint8 words)
    "mlp-relu-wide": dict(build=lambda: mlp_model(widths=(16, 36))),
    "mlp-relu-wider": dict(build=lambda: mlp_model(widths=(64, 8))),
    "mlp-relu-inplace": dict(build=lambda: mlp_model(inplace=True)),
    # bfloat16 gradients: the compiled kernel reads them converted to float32
    "mlp-tanh-bfloat16": dict(build=lambda: mlp_model(nn.Tanh), dtype=torch.bfloat16),
    "mlp-leaky-relu-inplace-float64": dict(
        build=lambda: mlp_model(nn.LeakyReLU, inplace=True), dtype=torch.float64
    ),
    "mlp-batchnorm-train": dict(build=lambda: mlp_model(batch_norm=True, inplace=True)),
    "mlp-relu-subsets": dict(
        build=lambda: mlp_model(),
        samples=[17, 3, 8, 22, 0, 11],
        neurons={"act1": [5, 0, 7], "act2": [6, 1]},
    ),
    "cnn-sum-float64": dict(build=lambda: cnn_model(), dtype=torch.float64),
    "cnn-majority-float64": dict(
        build=lambda: cnn_model(), dtype=torch.float64, reduce="majority"
    ),
    "cnn-batchnorm-before-inplace-float64": dict(
        build=lambda: cnn_model(inplace=True, batch_norm="before"),
        dtype=torch.float64,
    ),
    "cnn-batchnorm-after-inplace-float64": dict(
        build=lambda: cnn_model(inplace=True, batch_norm="after"),
        dtype=torch.float64,
    ),
    "cnn-sum-float32-channel-subset": dict(
        build=lambda: cnn_model(), neurons=[3, 1], samples=[2, 9, 14]
    ),
}


@pytest.mark.parametrize("case", CASES.values(), ids=CASES.keys())
def test_recorded_signs_equal_autograd_signs(case, packing):
    torch.manual_seed(0)
    dtype = case.get("dtype", torch.float32)
    model = case["build"]().to(dtype)
    x, y = data_for(model, dtype)
    samples, neurons = case.get("samples"), case.get("neurons")
    reduce = case.get("reduce", "sum")
    recorder = GradientSignRecorder(
        model,
        samples=samples,
        num_samples=NUM_SAMPLES,
        neurons=neurons,
        conv_reduce=reduce,
    )
    if isinstance(neurons, list):
        neurons = dict.fromkeys(recorder.layers, neurons)

    with recorder:
        expected = train_recorded(
            model, recorder, x, y, samples=samples, neurons=neurons, reduce=reduce
        )

    assert recorder.record_epochs == [0, 1, 2]
    seen = set()
    for name in ("act1", "act2"):
        for quantity in ("activation", "pre_activation"):
            want = expected.stacked(name, quantity)
            got = recorder.codes(name, quantity)
            assert got.shape == want.shape
            assert torch.equal(got, want), (name, quantity)
            assert (got != 0).all()  # every tracked sample was seen every epoch
            seen.update(got.unique().tolist())
    assert {NEGATIVE, POSITIVE} <= seen  # not vacuous: both signs occur


def test_zero_codes_come_from_relu_not_tanh():
    torch.manual_seed(0)
    for activation, has_zeros in ((nn.ReLU, True), (nn.Tanh, False)):
        model = mlp_model(activation)
        x, y = data_for(model)
        with GradientSignRecorder(model, num_samples=NUM_SAMPLES) as recorder:
            train_recorded(model, recorder, x, y, epochs=1)
        codes = recorder.codes("act1", "pre_activation")
        assert bool((codes == ZERO).any()) == has_zeros


def test_user_hooks_survive_fire_and_do_not_change_the_signs(packing):
    torch.manual_seed(0)
    # PyTorch itself forbids a full backward hook on an in-place module.
    model = mlp_model()
    x, y = data_for(model)
    calls = {"forward": 0, "backward": 0, "pre": 0}

    def forward_hook(module, args, output):
        calls["forward"] += 1

    def backward_hook(module, grad_input, grad_output):
        calls["backward"] += 1

    def pre_hook(module, args):
        calls["pre"] += 1

    # A full backward hook wraps the module's inputs and outputs; the recorder's
    # tensors must still get the right gradients.
    user = [
        model.act1.register_forward_hook(forward_hook),
        model.act1.register_full_backward_hook(backward_hook),
        model.act2.register_forward_pre_hook(pre_hook),
    ]
    recorder = GradientSignRecorder(model, num_samples=NUM_SAMPLES)
    with recorder:
        expected = train_recorded(model, recorder, x, y, epochs=2)
    steps = 2 * -(-NUM_SAMPLES // BATCH_SIZE)
    assert calls == {"forward": steps, "backward": steps, "pre": steps}
    for name in ("act1", "act2"):
        for quantity in ("activation", "pre_activation"):
            want = expected.stacked(name, quantity)
            assert torch.equal(recorder.codes(name, quantity), want)

    model(x).sum().backward()
    assert calls == {"forward": steps + 1, "backward": steps + 1, "pre": steps + 1}
    for handle in user:
        handle.remove()


def test_two_recorders_run_side_by_side():
    torch.manual_seed(0)
    model = mlp_model()
    x, y = data_for(model)
    first = GradientSignRecorder(model, num_samples=NUM_SAMPLES)
    second = GradientSignRecorder(
        model, ["act2"], samples=[9, 2, 3], neurons=[4, 0], quantities="activation"
    )

    class Both:
        layers, neuron_index = first.layers, first.neuron_index

        def __getattr__(self, name):
            def call(state):
                getattr(first, name)(state)
                getattr(second, name)(state)

            return call

    with first, second:
        train_recorded(model, Both(), x, y, epochs=2)
    want = first.codes("act2")[:, [9, 2, 3]][:, :, [4, 0]]
    assert torch.equal(second.codes("act2"), want)
    assert (want != 0).all()


# --- storage


@pytest.mark.parametrize("num_neurons", range(1, 10), ids=lambda k: f"K={k}")
def test_pack_and_unpack_are_inverse(num_neurons):
    codes = torch.randint(0, 4, (3, 5, num_neurons), dtype=torch.uint8)
    packed = pack_codes(codes)
    assert packed.shape == (3, 5, -(-num_neurons // 4))
    assert torch.equal(unpack_codes(packed, num_neurons), codes)


def test_pack_layout_is_four_codes_per_byte_low_bits_first():
    codes = torch.tensor([[1, 2, 3, 0, 2]], dtype=torch.uint8)
    assert pack_codes(codes).tolist() == [[1 | 2 << 2 | 3 << 4, 2]]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_sign_codes_are_sign_plus_two(dtype):
    grad = torch.tensor([-3.0, -0.0, 0.0, 2e-30, float("nan")]).to(dtype)
    assert sign_codes(grad).tolist() == [NEGATIVE, ZERO, ZERO, POSITIVE, ZERO]


@pytest.mark.parametrize("num_bytes", [1, 3, 8])
def test_packing_signs_equals_packing_their_codes(num_bytes, packing):
    signs = torch.randint(-1, 3, (5, 4 * num_bytes), dtype=torch.int8)  # 2: padding
    code_of_sign = torch.tensor([NEGATIVE, ZERO, POSITIVE, 0], dtype=torch.uint8)
    want = pack_codes(code_of_sign[signs.long() + 1])
    assert torch.equal(_pack_signs(signs), want)
    assert signs_module._gather_checked["cpu"] == (packing != "generic")


def test_packing_by_multiplication_is_checked_before_it_is_used(monkeypatch):
    monkeypatch.setattr(signs_module, "_gather_checked", {})
    assert signs_module._gather_works(torch.device("cpu"))  # little-endian, wraps

    # A device whose multiplication does not wrap around gets the generic packing.
    def saturating(signs, *buffers):
        return torch.full(signs.view(torch.int32).shape, 255, dtype=torch.uint8)

    monkeypatch.setattr(signs_module, "_gather_checked", {})
    monkeypatch.setattr(signs_module, "_gather_pack", saturating)
    signs = torch.tensor([[-1, 0, 1, 2, 1, 1, -1, 0]], dtype=torch.int8)
    assert _pack_signs(signs).tolist() == [
        [1 | 2 << 2 | 3 << 4, 3 | 3 << 2 | 1 << 4 | 2 << 6]
    ]
    assert signs_module._gather_checked == {"cpu": False}


def test_memory_is_two_bits_per_sample_neuron_record():
    model = nn.Sequential(nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 16), nn.Tanh())
    x, y = torch.randn(NUM_SAMPLES, 12), torch.randint(0, 8, (NUM_SAMPLES,))
    with GradientSignRecorder(model, ["1", "3"], num_samples=NUM_SAMPLES) as recorder:
        for epoch in range(3):
            recorder.start_epoch(epoch)
            recorder.start_batch(torch.arange(NUM_SAMPLES))
            F.cross_entropy(model(x)[:, :8], y).backward()
            recorder.end_batch()
    per_quantity = NUM_SAMPLES * (8 + 16) * 3 // 4
    assert recorder.nbytes == 2 * per_quantity
    assert recorder.packed("3", "pre_activation").shape == (3, NUM_SAMPLES, 4)
    assert recorder.snapshot().nbytes == recorder.nbytes


def _recorded_mlp(samples, neurons):
    torch.manual_seed(0)
    model = mlp_model(widths=(8, 7))
    x, y = data_for(model)
    recorder = GradientSignRecorder(
        model, samples=samples, num_samples=NUM_SAMPLES, neurons=neurons
    )
    with recorder:
        for epoch in range(2):
            recorder.start_epoch(epoch)
            for begin in range(0, NUM_SAMPLES, BATCH_SIZE):
                index = torch.arange(begin, min(begin + BATCH_SIZE, NUM_SAMPLES))
                recorder.start_batch(index)
                model.zero_grad()
                F.cross_entropy(model(x[index]), y[index]).backward()
                recorder.end_batch()
    return recorder


@pytest.mark.parametrize("snapshot", [False, True], ids=["recorder", "record"])
def test_reading_chosen_samples_and_neurons_equals_slicing_the_whole(snapshot):
    samples = [3, 17, 0, 9, 21]
    neurons = {"act1": [5, 1, 7, 2, 6], "act2": [0, 2, 4, 6]}
    recorder = _recorded_mlp(samples, neurons)
    reader = recorder.snapshot() if snapshot else recorder
    for layer, quantity in [("act1", "activation"), ("act2", "pre_activation")]:
        whole = reader.codes(layer, quantity)
        assert set(whole.unique().tolist()) >= {NEGATIVE, POSITIVE}
        rows = [samples.index(i) for i in (21, 3, 9)]
        wanted = neurons[layer][::-1][:3]  # crosses byte boundaries, reversed
        columns = [neurons[layer].index(k) for k in wanted]
        got = reader.codes(layer, quantity, samples=[21, 3, 9], neurons=wanted)
        assert torch.equal(got, whole[:, rows][:, :, columns])
        assert torch.equal(
            reader.signs(layer, quantity, neurons=wanted),
            reader.signs(layer, quantity)[:, :, columns],
        )
        recorded = reader.recorded(layer, quantity, samples=[0])
        assert recorded.shape == (2, 1, len(neurons[layer]))
        assert recorded.all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"samples": [3, 4]}, "sample 4 was not tracked.*sample_index"),
        (
            {"neurons": [1, 3]},
            r"neuron 3 of layer 'act1' was not tracked.*neuron_index",
        ),
        ({"neurons": [[1]]}, "1-D sequence"),
        ({"samples": [3, 3]}, "repeated"),
    ],
)
def test_reading_untracked_samples_or_neurons_is_refused(kwargs, match):
    recorder = _recorded_mlp([3, 17, 0], {"act1": [5, 1, 7], "act2": [0, 2]})
    with pytest.raises(ValueError, match=match):
        recorder.codes("act1", **kwargs)


def test_recording_under_create_graph_matches_autograd(packing):
    torch.manual_seed(0)
    model = mlp_model(nn.Tanh)
    x, y = data_for(model)
    index = torch.arange(BATCH_SIZE)
    want = reference_grads(
        non_inplace_twin(model), ["act1", "act2"], x[index], y[index]
    )
    with GradientSignRecorder(model, num_samples=NUM_SAMPLES) as recorder:
        recorder.start_epoch(0)
        recorder.start_batch(index)
        # As a gradient penalty does: the gradients handed to the hooks need grad.
        loss = F.cross_entropy(model(x[index]), y[index])
        torch.autograd.grad(loss, list(model.parameters()), create_graph=True)
        recorder.end_batch()
    for (layer, quantity), grad in want.items():
        got = recorder.codes(layer, quantity, samples=index)[0]
        assert torch.equal(got, sign_codes(grad)), (layer, quantity)


def test_a_second_backward_pass_of_a_batch_overwrites_the_first(packing):
    torch.manual_seed(0)
    model = mlp_model(nn.Tanh)
    x, y = data_for(model)
    index = torch.arange(BATCH_SIZE)
    twin = non_inplace_twin(model)
    first = reference_grads(twin, ["act1", "act2"], x[index], y[index])
    second = reference_grads(twin, ["act1", "act2"], x[index], (y[index] + 1) % 3)
    with GradientSignRecorder(model, num_samples=NUM_SAMPLES) as recorder:
        recorder.start_epoch(0)
        recorder.start_batch(index)
        F.cross_entropy(model(x[index]), y[index]).backward()
        F.cross_entropy(model(x[index]), (y[index] + 1) % 3).backward()
        recorder.end_batch()
    differs = False
    for key, grad in second.items():
        got = recorder.codes(*key, samples=index)[0]
        assert torch.equal(got, sign_codes(grad)), key
        differs |= not torch.equal(got, sign_codes(first[key]))
    assert differs  # not vacuous: the two passes give different signs


def test_scratch_does_not_grow_with_the_tracked_samples_per_batch(packing):
    # Batches of 5 hold 2 or 3 of the tracked (even) samples: two row counts.
    recorder = _recorded_mlp(list(range(0, NUM_SAMPLES, 2)), None)
    scratch = recorder._scratch
    assert scratch.compiled == (packing == "compiled")
    assert scratch.rows == BATCH_SIZE
    widths = {recorder.neuron_index[layer].numel() for layer in recorder.layers}
    # One torch.sign output per width on the torch path, none with the kernel.
    assert len(scratch.sign_out) == (0 if scratch.compiled else len(widths))


def test_uint8_batch_indices_are_dataset_indices_not_a_mask(packing):
    torch.manual_seed(0)
    model = mlp_model()
    x, y = data_for(model)
    samples = [1, 2, 4, 5, 7]
    index = torch.tensor([7, 3, 4, 0, 2])
    recorders = [
        GradientSignRecorder(model, samples=samples, num_samples=NUM_SAMPLES)
        for _ in range(2)
    ]
    for recorder, dtype in zip(recorders, (torch.int64, torch.uint8), strict=True):
        recorder.attach()
        recorder.start_epoch(0)
        recorder.start_batch(index.to(dtype))
    F.cross_entropy(model(x[index]), y[index]).backward()
    for recorder in recorders:
        recorder.end_batch()
        recorder.remove()
    want, got = (r.codes("act1") for r in recorders)
    assert torch.equal(got, want)
    # Samples 1 and 5 (rows 0 and 3) are not in the batch; 7, 4 and 2 are.
    assert (want[0, [0, 3]] == 0).all() and (want[0, [1, 2, 4]] != 0).all()
    with pytest.raises(ValueError, match="1-D integer tensor"):
        recorders[0].start_epoch(1)
        recorders[0].start_batch(torch.tensor([True, False]))


def test_width_not_multiple_of_four_rounds_up_to_whole_bytes(packing):
    model = mlp_model()  # act2 has 7 neurons
    recorder = GradientSignRecorder(model, ["act2"], num_samples=NUM_SAMPLES)
    recorder.start_epoch(0)
    assert recorder.packed("act2").shape == (1, NUM_SAMPLES, 2)
    assert recorder.codes("act2").shape == (1, NUM_SAMPLES, 7)


# --- schedule


@pytest.mark.parametrize(
    "epochs, recorded",
    [([1, 3], [1, 3]), (lambda e: e % 2 == 0, [0, 2]), (None, [0, 1, 2, 3])],
    ids=["list", "predicate", "every-epoch"],
)
def test_only_scheduled_epochs_are_recorded(epochs, recorded):
    torch.manual_seed(0)
    model = mlp_model()
    x, y = data_for(model)
    recorder = GradientSignRecorder(model, num_samples=NUM_SAMPLES, epochs=epochs)
    schedule = (lambda e: e in recorded) if epochs is not None else (lambda e: True)
    with recorder:
        expected = train_recorded(model, recorder, x, y, epochs=4, record=schedule)
    assert recorder.record_epochs == recorded
    assert torch.equal(recorder.codes("act2"), expected.stacked("act2", "activation"))


def test_samples_unseen_in_an_epoch_are_not_recorded(packing):
    torch.manual_seed(0)
    model = mlp_model()
    x, y = data_for(model)

    def keep(epoch, index):  # epoch 0 sees only the even dataset indices
        return index % 2 == 0 if epoch == 0 else torch.ones_like(index, dtype=bool)

    with GradientSignRecorder(model, num_samples=NUM_SAMPLES) as recorder:
        expected = train_recorded(model, recorder, x, y, epochs=2, keep=keep)
    codes = recorder.codes("act1", "pre_activation")
    assert torch.equal(codes, expected.stacked("act1", "pre_activation"))
    assert (codes[0, 1::2] == 0).all() and (codes[0, 0::2] != 0).all()
    assert (codes[1] != 0).all()
    assert torch.equal(recorder.recorded("act1")[0, :, 0], torch.arange(24) % 2 == 0)


def test_untracked_indices_are_ignored(packing):
    model = mlp_model()
    x = torch.randn(4, 12)
    recorder = GradientSignRecorder(model, samples=[5, 7], num_samples=10)
    with recorder:
        recorder.start_epoch(0)
        recorder.start_batch(torch.tensor([7, 9, 0, 2]))
        model(x).sum().backward()
        recorder.end_batch()
    codes = recorder.codes("act1")
    assert (codes[0, 0] == 0).all()  # sample 5 not in the batch
    assert (codes[0, 1] != 0).all()  # sample 7 at position 0


@pytest.mark.parametrize(
    "index", [[7, 100, 0, 2], [7, -3, 0, 2]], ids=["beyond-size", "negative"]
)
@pytest.mark.parametrize("samples", [[5, 7], None], ids=["subset", "every"])
def test_out_of_range_batch_indices_are_a_clear_error(index, samples, packing):
    model = mlp_model()
    with GradientSignRecorder(model, samples=samples, num_samples=10) as recorder:
        recorder.start_epoch(0)
        with pytest.raises(ValueError, match=r"outside \[0, 10\).*num_samples="):
            recorder.start_batch(torch.tensor(index))


def test_indices_beyond_the_tracked_ones_are_fine_without_num_samples(packing):
    model = mlp_model()
    with GradientSignRecorder(model, samples=[1, 2]) as recorder:
        recorder.start_epoch(0)
        recorder.start_batch(torch.tensor([2, 50]))
        model(torch.randn(2, 12)).sum().backward()
        recorder.end_batch()
    assert (recorder.codes("act1")[0, 1] != 0).all()


def test_signs_and_mask():
    model = mlp_model()
    with GradientSignRecorder(model, samples=[0, 1], num_samples=4) as recorder:
        recorder.start_epoch(0)
        recorder.start_batch(torch.tensor([1, 3]))
        model(torch.randn(2, 12)).sum().backward()
        recorder.end_batch()
    signs = recorder.signs("act1", "pre_activation")
    codes = recorder.codes("act1", "pre_activation")
    assert signs.dtype == torch.int8
    want = torch.where(codes == 0, 0, codes.long() - 2).to(torch.int8)
    assert torch.equal(signs, want)
    assert torch.equal(recorder.recorded("act1"), codes != 0)


# --- when not


def test_nothing_is_recorded_without_gradients():
    model = mlp_model()
    x = torch.randn(4, 12)
    with GradientSignRecorder(model, num_samples=4) as recorder:
        recorder.start_epoch(0)
        recorder.start_batch(torch.arange(4))
        with torch.no_grad():
            model(x)
        model.eval()  # evaluation in eval mode without gradients is fine too
        with torch.no_grad():
            model(x)
        with torch.inference_mode():
            model(x)
        model.train()
        recorder.end_batch()
        model(x).sum().backward()  # not armed: outside a batch
    assert (recorder.codes("act1") == 0).all()


def test_grad_enabled_forward_in_eval_mode_raises():
    model = mlp_model()
    with GradientSignRecorder(model, num_samples=4) as recorder:
        recorder.start_epoch(0)
        recorder.start_batch(torch.arange(4))
        model.eval()
        with pytest.raises(RuntimeError, match=r"model\.train\(\)"):
            model(torch.randn(4, 12))
        model.train()
        recorder.end_batch()
        model.eval()
        model(torch.randn(4, 12))  # not armed: allowed


def test_unscheduled_epoch_records_nothing_and_arms_nothing():
    model = mlp_model()
    with GradientSignRecorder(model, num_samples=4, epochs=[1]) as recorder:
        recorder.start_epoch(0)
        recorder.start_batch(torch.arange(4))
        model.eval()
        model(torch.randn(4, 12))  # epoch 0 is not recorded: no error
    assert recorder.record_epochs == []
    assert recorder.codes("act1").shape == (0, 4, 8)


# --- bad input


def test_unknown_layer_lists_the_hidden_layers():
    with pytest.raises(ValueError, match=r"'act9'.*\['act1', 'act2'\]"):
        GradientSignRecorder(mlp_model(), ["act9"], num_samples=4)


def test_weight_layer_instead_of_activation_is_refused():
    with pytest.raises(ValueError, match=r"'fc1' is a Linear.*activation"):
        GradientSignRecorder(mlp_model(), ["fc1"], num_samples=4)


@pytest.mark.parametrize(
    "neurons, match",
    [
        ([0, 8], r"8 is out of range for layer 'act1', which has 8 neurons"),
        ({"act2": [7]}, r"7 is out of range for layer 'act2', which has 7"),
        ({"act2": [-1]}, r"negative index -1"),
        ({"act2": [1, 1]}, r"repeated"),
        ({"fc1": [0]}, r"not recorded: \['fc1'\]"),
    ],
    ids=["too-large", "too-large-mapping", "negative", "repeated", "unknown-layer"],
)
def test_bad_neuron_indices_are_refused(neurons, match):
    with pytest.raises(ValueError, match=match):
        GradientSignRecorder(mlp_model(), num_samples=4, neurons=neurons)


def test_bad_neuron_index_in_a_custom_model_is_caught_at_the_first_forward():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 5)
            self.act = nn.ReLU()

        def forward(self, x):
            return self.act(self.fc(x))

    model = Net()
    recorder = GradientSignRecorder(model, ["act"], num_samples=4, neurons=[2, 6])
    with recorder:
        recorder.start_epoch(0)
        recorder.start_batch(torch.arange(2))
        with pytest.raises(ValueError, match=r"6 is out of range for layer 'act'"):
            model(torch.randn(2, 3))


def test_width_of_a_custom_model_is_learnt_at_the_first_forward():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3, 6)
            self.act = nn.Tanh()

        def forward(self, x):
            return self.act(self.fc(x)).sum()

    model = Net()
    with GradientSignRecorder(model, num_samples=4) as recorder:
        assert recorder.layers == ("act",)
        recorder.start_epoch(0)
        recorder.start_batch(torch.tensor([2, 0]))
        model(torch.randn(2, 3)).backward()
        recorder.end_batch()
    codes = recorder.codes("act")
    assert codes.shape == (1, 4, 6)
    assert (codes[0, [0, 2]] == POSITIVE).all() and (codes[0, [1, 3]] == 0).all()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(samples=[0, 4], num_samples=4), r"4 is out of range.*4 samples"),
        (dict(samples=[-2]), r"negative index -2"),
        (dict(samples=[1, 1]), r"repeated"),
        (dict(samples=[]), r"non-empty"),
        (dict(), r"num_samples=len\(train\)"),
        (dict(num_samples=0), r"num_samples"),
        (dict(num_samples=4.0), r"num_samples 4.0; pass the dataset size, an int"),
        (dict(num_samples=True), r"num_samples True"),
        (dict(num_samples=4, conv_reduce="mean"), r"conv_reduce 'mean'"),
        (dict(num_samples=4, quantities=("gradient",)), r"quantities"),
        (dict(num_samples=4, epochs=[0, -1]), r"epochs count from 0"),
    ],
    ids=[
        "sample-too-large",
        "sample-negative",
        "sample-repeated",
        "samples-empty",
        "no-samples-nor-size",
        "size-zero",
        "size-float",
        "size-bool",
        "conv-reduce",
        "quantity",
        "epoch-negative",
    ],
)
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientSignRecorder(mlp_model(), **kwargs)


@pytest.mark.parametrize(
    "size", [np.int64(NUM_SAMPLES), torch.tensor(NUM_SAMPLES)], ids=["numpy", "tensor"]
)
def test_num_samples_may_be_any_integer(size):
    recorder = GradientSignRecorder(mlp_model(), num_samples=size)
    assert recorder.sample_index.tolist() == list(range(NUM_SAMPLES))
    with recorder:
        recorder.start_epoch(0)
        with pytest.raises(ValueError, match=rf"outside \[0, {NUM_SAMPLES}\)"):
            recorder.start_batch(torch.tensor([NUM_SAMPLES]))


def test_a_sequence_activation_gets_told_which_axis_holds_the_neurons():
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 2))
    with GradientSignRecorder(model, ["1"], num_samples=4) as recorder:
        recorder.start_epoch(0)
        recorder.start_batch(torch.arange(4))
        with pytest.raises(ValueError, match=r"axis 1 as the neurons.*\[B, T, K\]"):
            model(torch.randn(4, 5, 8))  # [B, T, K]: axis 1 is T


class PlainBatch(NamedTuple):
    x: torch.Tensor
    y: torch.Tensor
    index: torch.Tensor | None


@pytest.mark.parametrize(
    "batch",
    [
        (torch.zeros(2, 12), torch.zeros(2)),
        PlainBatch(torch.zeros(2, 12), torch.zeros(2), None),
        SimpleNamespace(x=torch.zeros(2, 12), y=torch.zeros(2), index=None),
        {"x": torch.zeros(2, 12)},
    ],
    ids=["pair", "batch-without-index", "object-without-index", "mapping"],
)
def test_batches_without_dataset_indices_are_refused(batch):
    recorder = GradientSignRecorder(mlp_model(), num_samples=4)
    recorder.on_epoch_start(SimpleNamespace(epoch=0))
    with pytest.raises(ValueError, match=r"dataset indices.*TensorData\.loader"):
        recorder.on_batch_start(SimpleNamespace(batch=batch))


@pytest.mark.parametrize(
    "batch",
    [
        (torch.zeros(2, 12), torch.zeros(2), torch.tensor([1, 3])),
        PlainBatch(torch.zeros(2, 12), torch.zeros(2), torch.tensor([1, 3])),
        {"index": torch.tensor([1, 3])},
    ],
    ids=["triple", "named-tuple", "mapping"],
)
def test_batches_with_dataset_indices_are_read(batch):
    model = mlp_model()
    with GradientSignRecorder(model, num_samples=4) as recorder:
        recorder.on_epoch_start(SimpleNamespace(epoch=0))
        recorder.on_batch_start(SimpleNamespace(batch=batch))
        model(torch.randn(2, 12)).sum().backward()
    recorded = recorder.recorded("act1")[0, :, 0]
    assert recorded.tolist() == [False, True, False, True]


def test_batch_size_mismatch_is_refused():
    model = mlp_model()
    with GradientSignRecorder(model, num_samples=8) as recorder:
        recorder.start_epoch(0)
        recorder.start_batch(torch.arange(3))
        with pytest.raises(
            ValueError, match=r"3 entries but layer 'act1' got .*\(4, 8\)"
        ):
            model(torch.randn(4, 12))


@pytest.mark.parametrize("call", ["input-without-grad", "keyword"])
def test_batch_size_mismatch_is_refused_where_the_input_is_not_seen(call, packing):
    # The pre-hook cannot check these forward passes (the activation's input does
    # not need grad, or comes as a keyword); the forward hook must.
    torch.manual_seed(0)
    if call == "keyword":

        class Net(nn.Module):
            def __init__(self):
                super().__init__()
                self.fc, self.act, self.out = (
                    nn.Linear(4, 8),
                    nn.ReLU(),
                    nn.Linear(8, 2),
                )

            def forward(self, x):
                return self.out(self.act(input=self.fc(x)))

        model, layer = Net(), "act"
    else:
        model, layer = nn.Sequential(nn.PReLU(), nn.Linear(4, 2)), "0"
    with GradientSignRecorder(model, [layer], num_samples=10) as recorder:
        recorder.start_epoch(0)
        recorder.start_batch(torch.tensor([0, 1]))
        with pytest.raises(ValueError, match="2 entries but layer"):
            model(torch.randn(7, 4))


def test_the_kernel_refuses_a_gradient_that_does_not_match_the_batch():
    recorder = _recorded_mlp(None, None)
    scratch = recorder._scratch
    assert scratch.compiled
    segment = recorder._segments[("act1", "activation")]
    record = recorder._record_arrays[-1]
    rows = np.arange(4, dtype=np.int64)
    batch = signs_module._BatchRows(4, None, torch.from_numpy(rows), rows)
    before = record.copy()
    for shape in [
        (5, segment.num_neurons),
        (3, segment.num_neurons),
        (4, segment.num_neurons + 1),
        (4, segment.num_neurons, 2),
    ]:
        with pytest.raises(RuntimeError, match=r"expected \[4, 8\]"):
            signs_module._encode_into(
                scratch, segment, torch.zeros(shape), record, batch
            )
    assert np.array_equal(record, before)  # nothing written


def test_the_direct_path_takes_plain_gradients_and_hands_others_on_unchanged():
    torch.manual_seed(0)
    model = mlp_model(widths=(8, 7))
    x, y = data_for(model)
    recorder = GradientSignRecorder(model, num_samples=NUM_SAMPLES).attach()
    recorder.start_epoch(0)
    index = torch.tensor([20, 3, 11, 7])
    recorder.start_batch(index)
    batch = recorder._pending
    assert batch.direct is not None  # CPU, compiled, every sample and neuron
    F.cross_entropy(model(x[index]), y[index]).backward()

    key = ("act2", "activation")
    segment = recorder._segments[key]
    byte, width = segment.byte, segment.num_neurons
    record = recorder._records[-1]
    generator = torch.Generator().manual_seed(1)
    grad = torch.randn(4, width, generator=generator, dtype=torch.float64)
    grad[grad.abs() < 0.4] = 0.0
    want = pack_codes(sign_codes(grad))
    for given in [
        grad,  # taken as it comes
        grad.float(),
        grad.t().contiguous().t(),  # not C-contiguous: TypeError, then converted
        grad.half(),  # a dtype the kernel was not compiled for
        grad.bfloat16(),  # one NumPy does not have
        grad.clone().requires_grad_(),  # create_graph=True: numpy() refuses it
        torch._neg_view(-grad),  # a lazily negated view: no NumPy view of its own
    ]:
        record[index, byte : byte + want.shape[1]] = 0
        recorder._stage(key, batch, given)
        assert torch.equal(record[index, byte : byte + want.shape[1]], want), given
    recorder.remove()


def test_a_deep_copy_taken_mid_epoch_records_into_its_own_record(packing):
    torch.manual_seed(0)
    model = mlp_model()
    x, y = data_for(model)
    recorder = GradientSignRecorder(model, num_samples=NUM_SAMPLES)

    def step(rec, index):
        rec.start_batch(index)
        F.cross_entropy(rec.model(x[index]), y[index]).backward()
        rec.end_batch()

    first, second = torch.arange(0, 10), torch.arange(10, NUM_SAMPLES)
    with recorder:
        recorder.start_epoch(0)
        step(recorder, first)
    twin = copy.deepcopy(recorder)  # as when branching a run from a checkpoint
    with twin:
        step(twin, second)
    with recorder:
        step(recorder, second)
    for layer in twin.layers:
        for quantity in twin.quantities:
            got = twin.codes(layer, quantity)
            assert (got != 0).all(), (layer, quantity)  # both halves recorded
            # The twin's model is a copy: same weights, so the same signs.
            assert torch.equal(got, recorder.codes(layer, quantity))


def test_a_deep_copy_of_an_attached_recorder_records_its_own_model(packing):
    torch.manual_seed(0)
    model = mlp_model()
    x, y = data_for(model)
    recorder = GradientSignRecorder(model, num_samples=NUM_SAMPLES).attach()
    recorder.start_epoch(0)
    twin = copy.deepcopy(recorder)
    assert twin.attached and twin.model is not model
    index = torch.arange(0, 10)
    twin.start_batch(index)
    F.cross_entropy(twin.model(x[index]), y[index]).backward()
    twin.end_batch()
    recorder.start_batch(index)  # armed, but its model does not train
    recorder.end_batch()
    for layer in recorder.layers:
        assert (twin.codes(layer)[0, :10] != NOT_RECORDED).all()
        assert (recorder.codes(layer) == NOT_RECORDED).all()  # nothing leaked in
    twin.remove()
    assert not twin.model.act1._forward_hooks and not twin.model.act1._forward_pre_hooks
    assert model.act1._forward_hooks  # the original's hooks stay on its model
    recorder.remove()


def test_reading_between_forward_and_backward_keeps_the_batch(packing):
    torch.manual_seed(0)
    model = mlp_model()
    x, y = data_for(model)
    with GradientSignRecorder(model, num_samples=NUM_SAMPLES) as recorder:
        recorder.start_epoch(0)
        index = torch.arange(4, 12)
        recorder.start_batch(index)
        loss = F.cross_entropy(model(x[index]), y[index])
        assert (recorder.codes("act1") == NOT_RECORDED).all()
        recorder.snapshot()
        loss.backward()
        recorder.end_batch()
        for layer in recorder.layers:
            for quantity in recorder.quantities:
                recorded = recorder.recorded(layer, quantity)[0]
                assert recorded[4:12].all() and not recorded[:4].any()


def test_reading_an_unrecorded_quantity_is_refused():
    recorder = GradientSignRecorder(
        mlp_model(), num_samples=4, quantities=("activation",)
    )
    with pytest.raises(ValueError, match="'pre_activation' was not recorded"):
        recorder.codes("act1", "pre_activation")
    with pytest.raises(ValueError, match="'fc1' was not recorded"):
        recorder.codes("fc1")


# --- hooks


def hook_state(model):
    """Every hook dictionary of every module, as plain copies."""
    return {
        (name, attribute): dict(value)
        for name, module in model.named_modules()
        for attribute, value in vars(module).items()
        if "hook" in attribute and isinstance(value, dict)
    }


def test_removing_leaves_the_hooks_exactly_as_before():
    model = mlp_model()
    user = model.act1.register_forward_hook(lambda *args: None)
    before = hook_state(model)
    recorder = GradientSignRecorder(model, num_samples=4)
    with recorder:
        assert hook_state(model) != before
    assert hook_state(model) == before
    recorder.remove()
    recorder.remove()  # twice: harmless
    assert hook_state(model) == before
    assert not recorder.attached
    user.remove()


def test_hooks_are_removed_after_an_error():
    model = mlp_model()
    before = hook_state(model)
    with pytest.raises(RuntimeError, match="model.train"):
        with GradientSignRecorder(model, num_samples=4) as recorder:
            recorder.start_epoch(0)
            recorder.start_batch(torch.arange(2))
            model.eval()
            model(torch.randn(2, 12))
    assert hook_state(model) == before


def test_attach_is_idempotent_and_refuses_another_model():
    model = mlp_model()
    before = hook_state(model)
    recorder = GradientSignRecorder(model, num_samples=4)
    recorder.attach(model)
    recorder.attach()
    recorder.remove()
    assert hook_state(model) == before
    with pytest.raises(ValueError, match="another model"):
        recorder.attach(mlp_model())


def test_fit_start_attaches_and_fit_end_removes():
    model = mlp_model()
    before = hook_state(model)
    recorder = GradientSignRecorder(model, num_samples=4)
    recorder.on_fit_start(SimpleNamespace(model=model))
    assert recorder.attached
    recorder.on_fit_end(SimpleNamespace(model=model))
    assert hook_state(model) == before
    with recorder:  # a recorder attached by the caller stays attached
        recorder.on_fit_start(SimpleNamespace(model=model))
        recorder.on_fit_end(SimpleNamespace(model=model))
        assert recorder.attached


# --- layers


def test_default_layers_are_the_hidden_activation_modules():
    recorder = GradientSignRecorder(mlp_model(), num_samples=4)
    assert recorder.layers == ("act1", "act2")
    assert [k.numel() for k in recorder.neuron_index.values()] == [8, 7]
    recorder = GradientSignRecorder(cnn_model(batch_norm="before"), num_samples=4)
    assert recorder.layers == ("act1", "act2")
    assert [k.numel() for k in recorder.neuron_index.values()] == [4, 5]


def test_default_layers_with_neuronlib_models():
    models = pytest.importorskip("neuronlib.models")
    model = models.mlp((1, 4, 4), (6, 5), 3)
    recorder = GradientSignRecorder(model, num_samples=4)
    assert list(recorder.layers) == models.hidden_layers(model)
    assert [k.numel() for k in recorder.neuron_index.values()] == [6, 5]


# --- storage out


def test_record_round_trips_through_npz(tmp_path):
    torch.manual_seed(0)
    model = mlp_model()
    x, y = data_for(model)
    recorder = GradientSignRecorder(
        model, samples=[4, 2, 9], neurons={"act2": [6, 0, 3]}, epochs=[0, 2]
    )
    with recorder:
        train_recorded(model, recorder, x, y, epochs=3, samples=[4, 2, 9])

    np.savez(tmp_path / "r.npz", other=np.zeros(2), **recorder.to_arrays("run"))
    with np.load(tmp_path / "r.npz", allow_pickle=False) as arrays:
        record = SignRecord.from_arrays(dict(arrays), prefix="run")

    assert record.layers == recorder.layers
    assert record.quantities == recorder.quantities
    assert record.conv_reduce == "sum"
    assert record.record_epochs == [0, 2]
    assert torch.equal(record.sample_index, torch.tensor([4, 2, 9]))
    assert torch.equal(record.neuron_index["act2"], torch.tensor([6, 0, 3]))
    assert record.nbytes == recorder.nbytes
    for name in record.layers:
        for quantity in record.quantities:
            assert torch.equal(
                record.codes(name, quantity), recorder.codes(name, quantity)
            )
    # Numbers may come back from a cache as tensors, strings as arrays.
    tensors = {
        key: value if value.dtype.kind == "U" else torch.as_tensor(value)
        for key, value in recorder.to_arrays().items()
    }
    assert torch.equal(
        SignRecord.from_arrays(tensors).codes("act1"), recorder.codes("act1")
    )
    with pytest.raises(ValueError, match="'run.layers'"):
        SignRecord.from_arrays({}, prefix="run")


def test_snapshot_is_a_copy():
    model = mlp_model()
    with GradientSignRecorder(model, num_samples=4) as recorder:
        recorder.start_epoch(0)
        record = recorder.snapshot()
        recorder.start_batch(torch.arange(2))
        model(torch.randn(2, 12)).sum().backward()
    assert (record.codes("act1") == 0).all()
    assert (recorder.codes("act1")[0, :2] != 0).all()


# --- fit


def test_recording_through_fit_matches_autograd(packing):
    train = pytest.importorskip("neuronlib.train")
    torch.manual_seed(0)
    model = mlp_model(inplace=True)
    x, y = data_for(model)
    index = torch.arange(NUM_SAMPLES)
    batches = [
        (x[i : i + BATCH_SIZE], y[i : i + BATCH_SIZE], index[i : i + BATCH_SIZE])
        for i in range(0, NUM_SAMPLES, BATCH_SIZE)
    ]

    class Snapshots:
        """Keeps the weights and batch of every step, for the reference."""

        def __init__(self):
            self.steps = []

        def on_batch_start(self, state):
            weights = copy.deepcopy(state.model.state_dict())
            self.steps.append((state.epoch, weights, state.batch))

    before = hook_state(model)
    recorder = GradientSignRecorder(model, num_samples=NUM_SAMPLES, epochs=[1, 2])
    snapshots = Snapshots()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    train.fit(
        model, batches, optimizer=optimizer, epochs=3, probes=[snapshots, recorder]
    )
    assert hook_state(model) == before  # attached by fit, removed by fit

    twin = non_inplace_twin(model)
    expected = Expected(list(range(NUM_SAMPLES)), {"act1": range(8), "act2": range(7)})
    previous = None
    for epoch, weights, batch in snapshots.steps:
        if epoch == 0:
            continue
        if previous is not None and epoch != previous:
            expected.new_record()
        previous = epoch
        twin.load_state_dict(weights)
        grads = reference_grads(twin, ["act1", "act2"], batch[0], batch[1])
        expected.add(grads, batch[2], "sum")

    assert recorder.record_epochs == [1, 2]
    for name in ("act1", "act2"):
        for quantity in ("activation", "pre_activation"):
            assert torch.equal(
                recorder.codes(name, quantity), expected.stacked(name, quantity)
            )


def test_fit_with_a_neuronlib_loader_and_evaluation_records_every_sample():
    data = pytest.importorskip("neuronlib.data")
    train = pytest.importorskip("neuronlib.train")
    models = pytest.importorskip("neuronlib.models")
    torch.manual_seed(0)
    x = torch.randn(40, 1, 4, 4)
    y = torch.randint(0, 3, (40,))
    index = torch.arange(100, 140)  # dataset indices need not start at 0
    split = data.TensorData(x, y, index, ("a", "b", "c"), "mnist", "train")
    model = models.mlp((1, 4, 4), (6, 5), 3)
    recorder = GradientSignRecorder(model, samples=[139, 100, 117])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with recorder:
        train.fit(
            model,
            split.loader(16, seed=1),
            optimizer=optimizer,
            epochs=2,
            eval_sets={"val": split},  # evaluated in eval mode without gradients
            probes=[recorder],
        )
    assert recorder.record_epochs == [0, 1]
    for name in ("act1", "act2"):
        assert (recorder.codes(name, "pre_activation") != 0).all()
