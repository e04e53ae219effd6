"""The training loop: it learns, is deterministic, stops on divergence, fires events."""

import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from neuronlib import data, models, train

N, D, K, B = 240, 8, 3, 32


def _problem(seed=0):
    """A linearly separable 3-class problem: x [N, D], y [N]."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=generator)
    y = (x @ torch.randn(D, K, generator=generator)).argmax(1)
    return x, y


class _Batches:
    """A re-iterable of (x, y, index) batches, reshuffled each epoch from a seed."""

    def __init__(self, x, y, batch_size=B, seed=0):
        self.x, self.y, self.batch_size, self.seed, self.epoch = (
            x,
            y,
            batch_size,
            seed,
            0,
        )

    def __len__(self):
        return math.ceil(len(self.y) / self.batch_size)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1000 + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.y), generator=generator)
        for begin in range(0, len(order), self.batch_size):
            index = order[begin : begin + self.batch_size]
            yield self.x[index], self.y[index], index


def _model(seed=0, **kwargs):
    torch.manual_seed(seed)
    return models.mlp((D,), (16,), K, **kwargs)


def _sgd(model, lr=0.1):
    return torch.optim.SGD(model.parameters(), lr=lr)


class _Recorder:
    """A probe that is a plain object (no Probe base class) and logs every event."""

    def __init__(self):
        self.events = []

    def __getattr__(self, name):
        if name.startswith("on_") and name[3:] in train.EVENTS:
            return lambda state: self.events.append((name[3:], state.epoch, state.step))
        raise AttributeError(name)


# --- learning -----------------------------------------------------------------


def test_fit_lowers_the_loss():
    x, y = _problem()
    model = _model()
    initial = F.cross_entropy(model(x), y).item()

    history = train.fit(model, _Batches(x, y), optimizer=_sgd(model), epochs=20)

    assert not history.diverged
    assert len(history.epochs) == 20
    assert history.epochs[-1]["train_loss"] < 0.5 * initial
    assert history.epochs[-1]["train_acc"] > 0.9


def test_metrics_match_a_direct_computation_when_nothing_changes():
    # With lr=0 the weights stay put, so the running train metrics and the
    # evaluation metrics must equal one cross-entropy over all samples.
    x, y = _problem()
    val_x, val_y = _problem(seed=1)
    model = _model()
    logits, val_logits = model(x), model(val_x)
    val = SimpleNamespace(x=val_x, y=val_y)

    history = train.fit(
        model,
        _Batches(x, y, batch_size=50),  # a smaller last batch: weighted by size
        optimizer=_sgd(model, lr=0.0),
        epochs=1,
        eval_sets={"val": val},
        eval_batch_size=7,
    )

    record = history.epochs[0]
    assert record["train_loss"] == pytest.approx(F.cross_entropy(logits, y).item())
    assert record["train_acc"] == pytest.approx((logits.argmax(1) == y).float().mean())
    assert record["val_loss"] == pytest.approx(
        F.cross_entropy(val_logits, val_y).item()
    )
    assert record["val_acc"] == pytest.approx(
        (val_logits.argmax(1) == val_y).float().mean()
    )
    assert record["epoch"] == 1 and record["step"] == 5 and record["lr"] == 0.0
    assert record["wall_time"] > 0


def test_two_seeded_runs_are_identical():
    def run():
        x, y = _problem()
        model = _model(seed=3, batch_norm=True)
        history = train.fit(
            model,
            _Batches(x, y, seed=5),
            optimizer=torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9),
            epochs=3,
            eval_sets={"val": SimpleNamespace(x=x[:50], y=y[:50])},
        )
        return history, model.state_dict()

    (first, weights), (second, again) = run(), run()

    strip = [{k: v for k, v in r.items() if k != "wall_time"} for r in first.epochs]
    assert strip == [
        {k: v for k, v in r.items() if k != "wall_time"} for r in second.epochs
    ]
    for name in weights:
        assert torch.equal(weights[name], again[name]), name


@pytest.mark.parametrize(
    "form",
    ["pair", "triple", "attributes", "data-batch"],
)
def test_fit_accepts_each_batch_form(form):
    x, y = _problem()
    index = torch.arange(N)
    if form == "pair":
        batches = [(x[i : i + B], y[i : i + B]) for i in range(0, N, B)]
    elif form == "triple":
        batches = [
            (x[i : i + B], y[i : i + B], index[i : i + B]) for i in range(0, N, B)
        ]
    elif form == "attributes":
        batches = [
            SimpleNamespace(x=x[i : i + B], y=y[i : i + B], index=index[i : i + B])
            for i in range(0, N, B)
        ]
    else:
        batches = [
            data.Batch(x[i : i + B], y[i : i + B], index[i : i + B])
            for i in range(0, N, B)
        ]
    seen = []
    model = _model()

    class IndexProbe(train.Probe):
        def on_batch_start(self, state):
            seen.append(state.batch.index)

    train.fit(model, batches, optimizer=_sgd(model), epochs=1, probes=[IndexProbe()])

    assert len(seen) == len(batches)
    if form == "pair":
        assert all(i is None for i in seen)
    else:
        assert torch.equal(torch.cat(seen), index)


# --- divergence ---------------------------------------------------------------


def test_a_huge_learning_rate_is_marked_diverged_not_raised():
    x, y = _problem()
    model = _model()

    history = train.fit(model, _Batches(x, y), optimizer=_sgd(model, lr=1e6), epochs=5)

    assert history.diverged
    assert history.diverged_at is not None
    assert len(history.epochs) < 5


def test_a_nan_loss_stops_the_run_cleanly():
    x, y = _problem()
    model = _model()
    calls = []

    def loss_fn(logits, target):
        calls.append(None)
        loss = F.cross_entropy(logits, target)
        return loss * math.nan if len(calls) == 20 else loss

    recorder = _Recorder()
    history = train.fit(
        model,
        _Batches(x, y),
        optimizer=_sgd(model),
        epochs=5,
        loss_fn=loss_fn,
        probes=[recorder],
    )

    # 8 batches per epoch: the 20th loss (step index 19) is in the third epoch.
    assert history.diverged and history.diverged_at == 19
    assert len(history.epochs) == 2
    assert len(calls) == 20
    assert all(torch.isfinite(p).all() for p in model.parameters())
    names = [event for event, _, _ in recorder.events]
    assert names[-1] == "fit_end"
    assert names.count("batch_end") == 19 and names.count("epoch_end") == 2
    assert json.loads(json.dumps(history.to_dict())) == history.to_dict()


# --- probes -------------------------------------------------------------------


def test_probe_events_fire_in_order_with_the_right_counts():
    x, y = _problem()
    model = _model()
    recorder = _Recorder()

    train.fit(model, _Batches(x, y), optimizer=_sgd(model), epochs=2, probes=[recorder])

    steps = 8
    expected = [("fit_start", 0, 0)]
    for epoch in range(2):
        expected.append(("epoch_start", epoch, epoch * steps))
        for i in range(steps):
            step = epoch * steps + i
            expected += [("batch_start", epoch, step), ("batch_end", epoch, step + 1)]
        expected.append(("epoch_end", epoch, (epoch + 1) * steps))
    expected.append(("fit_end", 1, 2 * steps))
    assert recorder.events == expected


def test_probe_sees_the_batch_before_backward_and_its_gradients_after():
    x, y = _problem()
    model = _model()
    log = []

    class Probe(train.Probe):
        def on_fit_start(self, state):
            assert state.steps_per_epoch == 8 and state.epochs == 1
            assert state.batch is None and state.loss is None

        def on_batch_start(self, state):
            assert state.loss is None
            assert state.batch.index.shape == (len(state.batch.y),)
            # Gradients of the previous step only: none yet for this batch.
            log.append(("start", state.batch.index.clone()))

        def on_batch_end(self, state):
            assert state.loss.ndim == 0 and state.loss.grad_fn is not None
            assert all(p.grad is not None for p in state.model.parameters())
            log.append(("end", state.batch.index.clone()))

    train.fit(model, _Batches(x, y), optimizer=_sgd(model), epochs=1, probes=[Probe()])

    starts = [index for kind, index in log if kind == "start"]
    ends = [index for kind, index in log if kind == "end"]
    assert all(torch.equal(a, b) for a, b in zip(starts, ends, strict=True))
    assert sorted(torch.cat(starts).tolist()) == list(range(N))


def test_only_overridden_probe_methods_are_called(monkeypatch):
    x, y = _problem()
    model = _model()
    called = []
    monkeypatch.setattr(train.Probe, "on_batch_start", lambda self, s: called.append(1))

    class EpochOnly(train.Probe):
        def on_epoch_end(self, state):
            called.append(state.epoch)

    # The base no-op is looked up when fit starts, so the patched one is the base.
    assert train._handlers([EpochOnly()], "batch_start") == []
    train.fit(
        model, _Batches(x, y), optimizer=_sgd(model), epochs=2, probes=[EpochOnly()]
    )
    assert called == [0, 1]


def test_a_misspelt_probe_method_is_reported(caplog):
    x, y = _problem()
    model = _model()

    class Typo:
        def on_batch_ends(self, state):
            pass

    train.fit(model, _Batches(x, y), optimizer=_sgd(model), epochs=1, probes=[Typo()])

    assert "on_batch_ends" in caplog.text


def test_a_keyboard_interrupt_propagates_and_probes_still_get_fit_end():
    x, y = _problem()
    model = _model()
    recorder = _Recorder()

    class Interrupt(train.Probe):
        def on_batch_end(self, state):
            if state.step == 3:
                raise KeyboardInterrupt

        def on_fit_end(self, state):
            raise RuntimeError("a failing cleanup must not hide the interrupt")

    with pytest.raises(KeyboardInterrupt):
        train.fit(
            model,
            _Batches(x, y),
            optimizer=_sgd(model),
            epochs=2,
            probes=[Interrupt(), recorder],
        )

    assert recorder.events[-1] == ("fit_end", 0, 3)


def test_probe_base_class_is_a_context_manager():
    removed = []

    class Hooked(train.Probe):
        def remove(self):
            removed.append(True)

    with pytest.raises(RuntimeError), Hooked().attach(nn.Linear(2, 2)):
        raise RuntimeError

    assert removed == [True]


# --- learning-rate schedule ---------------------------------------------------


def test_lr_schedule_multiplies_each_groups_initial_lr_before_every_step():
    x, y = _problem()
    model = _model()
    optimizer = torch.optim.SGD(
        [
            {"params": model.fc1.parameters(), "lr": 0.1},
            {"params": model.out.parameters(), "lr": 0.02},
        ]
    )
    seen = []

    class LrProbe(train.Probe):
        def on_batch_start(self, state):
            seen.append((state.step, [g["lr"] for g in state.optimizer.param_groups]))

    history = train.fit(
        model,
        _Batches(x, y),
        optimizer=optimizer,
        epochs=2,
        lr_schedule=lambda step: 1.0 / (1 + step),
        probes=[LrProbe()],
    )

    assert len(seen) == 16
    for step, lrs in seen:
        assert lrs == pytest.approx([0.1 / (1 + step), 0.02 / (1 + step)])
    assert [g["initial_lr"] for g in optimizer.param_groups] == [0.1, 0.02]
    assert history.column("lr") == pytest.approx([0.1 / 8, 0.1 / 16])


def test_a_negative_lr_multiplier_is_refused():
    x, y = _problem()
    model = _model()

    with pytest.raises(ValueError, match="multiplier"):
        train.fit(
            model,
            _Batches(x, y),
            optimizer=_sgd(model),
            epochs=1,
            lr_schedule=lambda s: -1,
        )


# --- evaluation ---------------------------------------------------------------


def test_evaluation_changes_no_weight_and_restores_every_training_mode():
    x, y = _problem()
    model = _model(batch_norm=True)
    model.train()
    model.bn1.eval()  # a submodule deliberately frozen by the caller
    before = {k: v.clone() for k, v in model.state_dict().items()}

    result = train.evaluate(model, SimpleNamespace(x=x, y=y), batch_size=64)

    assert set(result) == {"loss", "acc"}
    assert model.training and not model.bn1.training
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key


def test_fit_evaluates_in_eval_mode_and_trains_in_train_mode():
    x, y = _problem()
    model = _model(batch_norm=True)
    modes = []
    original = model.forward

    def spy(inputs):
        modes.append((model.training, torch.is_grad_enabled()))
        return original(inputs)

    model.forward = spy
    train.fit(
        model,
        _Batches(x, y),
        optimizer=_sgd(model),
        epochs=1,
        eval_sets={"val": SimpleNamespace(x=x, y=y)},
        eval_batch_size=100,
    )

    assert modes == [(True, True)] * 8 + [(False, False)] * 3
    assert model.training


# --- progress bar -------------------------------------------------------------


def test_fit_is_silent_by_default(capfd):
    x, y = _problem()
    model = _model()

    train.fit(model, _Batches(x, y), optimizer=_sgd(model), epochs=2)

    captured = capfd.readouterr()
    assert captured.out == "" and captured.err == ""


def test_fit_shows_a_progress_bar_when_asked(capfd):
    x, y = _problem()
    model = _model()

    train.fit(model, _Batches(x, y), optimizer=_sgd(model), epochs=2, progress=True)

    captured = capfd.readouterr()
    assert "2/2" in captured.err and "loss=" in captured.err


# --- history ------------------------------------------------------------------


def test_history_round_trips_through_json():
    history = train.History(
        epochs=[{"epoch": 1, "train_loss": 0.5, "lr": 0.1}],
        diverged=True,
        diverged_at=7,
    )

    again = train.History.from_dict(json.loads(json.dumps(history.to_dict())))

    assert again == history
    assert again.column("train_loss") == [0.5]
    with pytest.raises(ValueError, match="train_loss"):
        again.column("val_acc")
    with pytest.raises(ValueError, match="History.to_dict"):
        train.History.from_dict({"epochs": []})


# --- bad input ----------------------------------------------------------------


def test_bad_arguments_are_refused_with_a_fix():
    x, y = _problem()
    model = _model()
    batches = _Batches(x, y)
    opt = _sgd(model)
    dataset = SimpleNamespace(x=x, y=y)

    with pytest.raises(ValueError, match="epochs=-1"):
        train.fit(model, batches, optimizer=opt, epochs=-1)
    with pytest.raises(ValueError, match="re-iterable"):
        train.fit(model, iter(list(batches)), optimizer=opt, epochs=2)
    with pytest.raises(TypeError, match=r"probes=\[probe\]"):
        train.fit(model, batches, optimizer=opt, epochs=1, probes=train.Probe())
    with pytest.raises(ValueError, match="train_eval"):
        train.fit(model, batches, optimizer=opt, epochs=1, eval_sets={"train": dataset})
    with pytest.raises(TypeError, match="TensorData"):
        train.fit(model, batches, optimizer=opt, epochs=1, eval_sets={"val": [1, 2]})
    with pytest.raises(ValueError, match="no batch"):
        train.fit(model, [], optimizer=opt, epochs=1)
    with pytest.raises(TypeError, match=r"\(x, y\)"):
        train.fit(model, [x], optimizer=opt, epochs=1)
    with pytest.raises(TypeError, match="optimizer"):
        train.fit(model, batches, optimizer="sgd", epochs=1)


def test_a_one_shot_iterator_is_fine_for_one_epoch():
    x, y = _problem()
    model = _model()

    history = train.fit(
        model, iter(list(_Batches(x, y))), optimizer=_sgd(model), epochs=1
    )

    assert history.epochs[0]["step"] == 8


def test_fit_runs_on_a_neuronlib_loader_with_tensor_data_eval_sets():
    x, y = _problem()
    images = x.reshape(N, 2, 2, 2)
    tensors = data.TensorData(
        images, y, torch.arange(N), ("a", "b", "c"), "mnist", "train"
    )
    model = models.mlp((2, 2, 2), (16,), K)
    seen = []

    class IndexProbe(train.Probe):
        def on_batch_start(self, state):
            seen.append(state.batch.index)

    loader = tensors.loader(B, seed=0)
    history = train.fit(
        model,
        loader,
        optimizer=_sgd(model),
        epochs=2,
        eval_sets={"val": tensors},
        probes=[IndexProbe()],
    )

    assert len(history.epochs) == 2 and "val_acc" in history.epochs[0]
    # fit starts the loader at its epoch 0, then runs epoch 1.
    assert torch.equal(torch.cat(seen[:8]), loader.permutation(0))
    assert torch.equal(torch.cat(seen[8:]), loader.permutation(1))
