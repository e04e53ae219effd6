"""Training: one ``fit`` loop, its history, and the probe protocol.

:func:`fit` trains a classifier for a number of epochs and returns a
:class:`History` (per-epoch train, validation and test loss and accuracy, the
learning rate, the wall time and whether the run diverged). What is measured
*during* training is left to probes.

The probe protocol
------------------
A probe is any object. For each event below, ``fit`` calls
``probe.on_<event>(state)`` if the probe has such a method; a subclass of
:class:`Probe` is called only for the methods it overrides (the base class's
no-ops are skipped, so an unused event costs nothing in the training loop).
``state`` is the one :class:`FitState` that ``fit`` mutates as it runs; a probe
reads it and must not keep references to its fields past the call unless it
means to (``state.batch`` is replaced every step).

The events, in the order they fire:

``fit_start``
    Once, before the first epoch. ``epoch == 0``, ``step == 0``, ``batch`` and
    ``loss`` are ``None``, ``history`` is empty. ``epochs`` and
    ``steps_per_epoch`` (``None`` if the training data has no length) are set.
``epoch_start``
    Before the first batch of each epoch; ``epoch`` is the epoch (0-based).
``batch_start``
    Before the forward pass of each batch. ``batch`` is the batch, with
    ``batch.index`` its samples' dataset indices (``None`` if the data carries
    none), so a probe knows which samples the coming backward pass is about.
    ``step`` is the number of optimizer steps done so far (the index of the coming
    step), the learning rate of this step is already in the optimizer, and
    ``loss`` is ``None``.
``batch_end``
    After ``optimizer.step()``. ``step`` has been incremented, ``loss`` is the
    batch's loss (a 0-d tensor whose graph backward has freed), and the
    parameters' ``.grad`` still hold this step's gradients.
``epoch_end``
    After the epoch's evaluation; ``history.epochs[-1]`` is this epoch's record.
``fit_end``
    Once, always: after the last epoch, after a divergence, and also when an
    exception (a ``KeyboardInterrupt`` too) leaves ``fit``. In that last case an
    error raised by a probe's ``on_fit_end`` is logged, not raised, so that the
    original exception propagates.

When the loss of a batch is NaN or infinite, ``fit`` stops before the backward
pass of that batch (the weights keep their last finite values): the batch gets no
``batch_end``, its epoch no ``epoch_end`` and no history record, and
``history.diverged`` is set, with ``history.diverged_at`` the step index.

Probes attach their own hooks, as context managers (``with probe.attach(model):``)
so that the hooks go away also after an error; ``fit`` knows nothing of what a
probe measures and a probe nothing of the optimizer.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from neuronlib.data import Batch

logger = logging.getLogger(__name__)

EVENTS = (
    "fit_start",
    "epoch_start",
    "batch_start",
    "batch_end",
    "epoch_end",
    "fit_end",
)


@dataclass
class History:
    """What ``fit`` measured, one record per completed epoch.

    Each record is a dict with:

    - ``epoch``: the epoch, 1-based; ``step``: optimizer steps done by its end;
    - ``train_loss``, ``train_acc``: the running mean over the epoch's samples of
      the loss and accuracy of each batch, as measured during its training step
      (in train mode, with the weights of that moment);
    - ``<set>_loss``, ``<set>_acc`` for each evaluation set (``val``, ``test``),
      measured after the epoch in eval mode;
    - ``lr``: the learning rate of the first parameter group at the last step;
    - ``wall_time``: seconds since ``fit`` started, at the end of the epoch
      (evaluation and probes included).

    Attributes:
        epochs: The per-epoch records, in order.
        diverged: Whether the run stopped on a NaN or infinite loss.
        diverged_at: The step index (optimizer steps done before it) whose loss
            was not finite, or ``None``.
    """

    epochs: list[dict[str, float]] = field(default_factory=list)
    diverged: bool = False
    diverged_at: int | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict; :meth:`from_dict` reads it back.

        Returns:
            ``{"epochs": [...], "diverged": bool, "diverged_at": int | None}``.
        """
        return {
            "epochs": [dict(record) for record in self.epochs],
            "diverged": self.diverged,
            "diverged_at": self.diverged_at,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> History:
        """Build a history from the output of :meth:`to_dict`.

        Args:
            data: A dict with the keys ``epochs``, ``diverged`` and
                ``diverged_at``.

        Returns:
            The history.

        Raises:
            ValueError: If a key is missing or ``epochs`` is not a list of dicts.
        """
        missing = {"epochs", "diverged", "diverged_at"} - set(data)
        if missing:
            raise ValueError(
                f"A history dict needs the keys {sorted(missing)}; pass the output "
                "of History.to_dict()."
            )
        epochs = data["epochs"]
        if not isinstance(epochs, list) or not all(isinstance(e, dict) for e in epochs):
            raise ValueError(
                "A history dict's 'epochs' must be a list of dicts, one per epoch; "
                "pass the output of History.to_dict()."
            )
        diverged_at = data["diverged_at"]
        return cls(
            epochs=[dict(record) for record in epochs],
            diverged=bool(data["diverged"]),
            diverged_at=None if diverged_at is None else int(diverged_at),
        )

    def column(self, key: str) -> list[float]:
        """Return one quantity over the epochs, for example ``"val_acc"``.

        Args:
            key: A key of the per-epoch records.

        Returns:
            The values, one per epoch.

        Raises:
            ValueError: If some epoch has no such key.
        """
        if not all(key in record for record in self.epochs):
            known = sorted(self.epochs[0]) if self.epochs else []
            raise ValueError(f"History has no column {key!r}; use one of {known}.")
        return [record[key] for record in self.epochs]


@dataclass
class FitState:
    """What probes see; ``fit`` mutates one instance as it runs.

    Attributes:
        model: The model being trained.
        optimizer: Its optimizer.
        epoch: The current epoch, 0-based.
        step: Optimizer steps done so far (global, over all epochs).
        epochs: Number of epochs asked for.
        steps_per_epoch: Batches per epoch, or ``None`` if the data has no length.
        batch: The current batch (``x`` ``[B, ...]``, ``y`` ``[B]``, ``index``
            ``[B]`` or ``None``) from ``batch_start`` to ``batch_end``.
        loss: The current batch's loss (a 0-d tensor) at ``batch_end``.
        history: The history so far.
    """

    model: nn.Module
    optimizer: torch.optim.Optimizer
    epoch: int = 0
    step: int = 0
    epochs: int = 0
    steps_per_epoch: int | None = None
    batch: Batch | None = None
    loss: Tensor | None = None
    history: History = field(default_factory=History)


class Probe:
    """Base class of probes: every event is a no-op; override what you need.

    Subclasses that register hooks do it in :meth:`attach` and undo it in
    :meth:`remove`; ``with probe.attach(model):`` (or ``with probe:`` once
    attached) removes the hooks on exit, also after an error.
    """

    def attach(self, model: nn.Module) -> Probe:
        """Register the probe's hooks on ``model``; returns the probe."""
        return self

    def remove(self) -> None:
        """Remove every hook the probe registered; harmless when called twice."""

    def __enter__(self) -> Probe:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.remove()

    def on_fit_start(self, state: FitState) -> None:
        """Called once before the first epoch."""

    def on_epoch_start(self, state: FitState) -> None:
        """Called before the first batch of each epoch."""

    def on_batch_start(self, state: FitState) -> None:
        """Called before the forward pass of each batch."""

    def on_batch_end(self, state: FitState) -> None:
        """Called after the optimizer step of each batch."""

    def on_epoch_end(self, state: FitState) -> None:
        """Called after each epoch's evaluation."""

    def on_fit_end(self, state: FitState) -> None:
        """Called once at the end, also after a divergence or an exception."""


def fit(
    model: nn.Module,
    train: Iterable,
    *,
    optimizer: torch.optim.Optimizer,
    epochs: int,
    eval_sets: Mapping[str, Any] | None = None,
    lr_schedule: Callable[[int], float] | None = None,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    probes: Iterable[object] = (),
    progress: bool = False,
    eval_batch_size: int = 1000,
) -> History:
    """Train a classifier and return its history.

    Each step: set the learning rate from the schedule, fire ``batch_start``,
    forward, loss, check that the loss is finite, ``zero_grad(set_to_none=True)``,
    backward, ``optimizer.step()``, fire ``batch_end``. After each epoch, every
    evaluation set is evaluated (see :func:`evaluate`) and the epoch's record is
    appended to the history. The model is put in train mode at the start. The
    module docstring describes the probe events.

    Note:
        The finiteness check reads the loss every step; on the CPU this costs
        nothing, on a GPU it is one synchronisation per step. Losses and
        accuracies are otherwise summed on the device and read once per epoch.

    Args:
        model: A classifier mapping ``x`` ``[B, ...]`` to logits ``[B, K]``.
        train: The training batches: a ``neuronlib.data.Loader`` or any
            re-iterable (one epoch per ``iter()``) of batches, each a ``Batch``,
            an ``(x, y)`` or ``(x, y, index)`` tuple, or an object with ``x``,
            ``y`` (and optionally ``index``) attributes. Batches on another device
            than the model are moved to it.
        optimizer: The optimizer over the model's parameters.
        epochs: Number of epochs; 0 trains nothing.
        eval_sets: Named evaluation sets, for example ``{"val": splits.val}``,
            each with ``x`` ``[N, ...]`` and ``y`` ``[N]`` tensors (a
            ``TensorData``).
        lr_schedule: ``lr_schedule(step)`` returns the multiplier of each
            parameter group's ``initial_lr`` for the step with that index (0-based,
            counted over all epochs); it is applied before every step.
            ``initial_lr`` is set to the group's ``lr`` at the start when absent.
        loss_fn: ``loss_fn(logits, y)``, a mean-reduced 0-d loss.
        probes: Objects that receive the events (see the module docstring).
        progress: Whether to show a ``tqdm.auto`` progress bar over epochs.
        eval_batch_size: Batch size for evaluation.

    Returns:
        The history. A run whose loss became NaN or infinite stops early, with
        ``history.diverged`` set; no exception is raised for it.

    Raises:
        ValueError: If ``epochs`` or ``eval_batch_size`` is invalid, an evaluation
            set is named ``"train"`` or is empty, ``train`` is a one-shot iterator
            while ``epochs > 1``, an epoch yields no batch, or the schedule gives a
            negative or non-finite multiplier.
        TypeError: If ``probes`` is a single probe, a batch or an evaluation set
            has the wrong form, or ``optimizer`` is not an optimizer.
    """
    epochs = _non_negative_int(epochs, "epochs")
    eval_batch_size = _positive_int(eval_batch_size, "eval_batch_size")
    eval_sets = dict(eval_sets or {})
    for name, data in eval_sets.items():
        _check_eval_set(name, data)
    if not hasattr(optimizer, "param_groups"):
        raise TypeError(
            f"optimizer={optimizer!r} is not a torch optimizer; pass for example "
            "torch.optim.SGD(model.parameters(), lr=0.1)."
        )
    if isinstance(probes, Probe) or any(hasattr(probes, f"on_{e}") for e in EVENTS):
        raise TypeError("probes takes a sequence of probes; pass probes=[probe].")
    probes = list(probes)
    # Iterator, not iter(train) is train: iter() on a Loader would start an epoch.
    if epochs > 1 and isinstance(train, Iterator):
        raise ValueError(
            "train is a one-shot iterator (for example a generator), so it would be "
            "empty after the first epoch; pass a re-iterable such as a list of "
            "batches or a neuronlib Loader."
        )
    parameter = next(model.parameters(), None)
    if parameter is None:
        raise ValueError("The model has no parameters; there is nothing to train.")
    device = parameter.device
    groups = optimizer.param_groups
    for group in groups:
        group.setdefault("initial_lr", group["lr"])
    initial_lrs = [group["initial_lr"] for group in groups]
    handlers = {event: _handlers(probes, event) for event in EVENTS}
    on_batch_start = handlers["batch_start"]
    on_batch_end = handlers["batch_end"]

    start = time.perf_counter()
    history = History()
    state = FitState(
        model=model,
        optimizer=optimizer,
        epochs=epochs,
        steps_per_epoch=len(train) if hasattr(train, "__len__") else None,
        history=history,
    )
    bar = None
    finished = False
    try:
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=epochs, desc="fit", unit="epoch")
        model.train()
        _fire(handlers["fit_start"], state)
        for epoch in range(epochs):
            state.epoch = epoch
            _fire(handlers["epoch_start"], state)
            # Sums stay on the device and are read once per epoch: a .item() per
            # step would wait for the device every step.
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            seen = 0
            for item in train:
                batch = _as_batch(item)
                if batch.x.device != device:
                    batch = _to_device(batch, device)
                if lr_schedule is not None:
                    _set_lr(groups, initial_lrs, lr_schedule, state.step)
                state.batch = batch
                state.loss = None
                for handler in on_batch_start:
                    handler(state)

                output = model(batch.x)
                loss = loss_fn(output, batch.y)
                if not torch.isfinite(loss):
                    history.diverged = True
                    history.diverged_at = state.step
                    state.loss = loss
                    logger.info(
                        "Loss became %s at step %d (epoch %d); the run stops there.",
                        loss.item(),
                        state.step,
                        epoch + 1,
                    )
                    break
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()

                state.step += 1
                size = batch.y.shape[0]
                seen += size
                loss_sum.add_(loss.detach(), alpha=size)
                correct.add_((output.detach().argmax(1) == batch.y).sum())
                state.loss = loss
                for handler in on_batch_end:
                    handler(state)
            if history.diverged:
                break
            if seen == 0:
                raise ValueError(
                    f"Epoch {epoch + 1} had no batch; pass training data that yields "
                    "batches every time it is iterated."
                )

            record = {
                "epoch": epoch + 1,
                "step": state.step,
                "train_loss": loss_sum.item() / seen,
                "train_acc": correct.item() / seen,
            }
            for name, data in eval_sets.items():
                result = evaluate(
                    model, data, loss_fn=loss_fn, batch_size=eval_batch_size
                )
                record[f"{name}_loss"] = result["loss"]
                record[f"{name}_acc"] = result["acc"]
            record["lr"] = float(groups[0]["lr"])
            record["wall_time"] = time.perf_counter() - start
            history.epochs.append(record)
            _fire(handlers["epoch_end"], state)
            if bar is not None:
                bar.set_postfix(_postfix(record), refresh=False)
                bar.update(1)
        finished = True
    finally:
        state.batch = None
        if finished:
            _fire(handlers["fit_end"], state)
        else:
            _fire_quietly(handlers["fit_end"], state)
        if bar is not None:
            bar.close()

    return history


def evaluate(
    model: nn.Module,
    data: Any,
    *,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = F.cross_entropy,
    batch_size: int = 1000,
) -> dict[str, float]:
    """Evaluate a classifier in eval mode, without gradients, in batches.

    The training mode of every submodule is restored afterwards (not just the
    model's), and no parameter or buffer changes: batch norm uses its running
    statistics.

    Args:
        model: A classifier mapping ``x`` ``[B, ...]`` to logits ``[B, K]``.
        data: An object with tensors ``x`` ``[N, ...]`` and ``y`` ``[N]`` (a
            ``TensorData``); moved batch by batch to the model's device.
        loss_fn: ``loss_fn(logits, y)``, a mean-reduced 0-d loss.
        batch_size: Samples per forward pass.

    Returns:
        ``{"loss": mean loss, "acc": accuracy}`` over the ``N`` samples.

    Raises:
        ValueError: If ``data`` is empty or ``batch_size`` is not positive.
        TypeError: If ``data`` has no ``x`` and ``y`` tensors.
    """
    _check_eval_set("data", data)
    batch_size = _positive_int(batch_size, "batch_size")
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else data.x.device
    x, y = data.x, data.y

    modes = [module.training for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            for begin in range(0, len(y), batch_size):
                xb = x[begin : begin + batch_size].to(device)
                yb = y[begin : begin + batch_size].to(device)
                output = model(xb)
                loss_sum += loss_fn(output, yb) * len(yb)
                correct += (output.argmax(1) == yb).sum()
    finally:
        for module, mode in zip(model.modules(), modes, strict=True):
            module.training = mode

    return {"loss": loss_sum.item() / len(y), "acc": correct.item() / len(y)}


def _handlers(probes: list[object], event: str) -> list[Callable[[FitState], None]]:
    """The bound ``on_<event>`` methods of the probes that really define one."""
    name = f"on_{event}"
    base = getattr(Probe, name)
    found = []
    for probe in probes:
        method = getattr(probe, name, None)
        if method is None or getattr(method, "__func__", None) is base:
            continue
        if not callable(method):
            raise TypeError(f"{type(probe).__name__}.{name} is not callable.")
        found.append(method)
    if event == EVENTS[0]:
        for probe in probes:
            unknown = [
                attribute
                for attribute in dir(probe)
                if attribute.startswith("on_") and attribute[3:] not in EVENTS
            ]
            if unknown:
                logger.warning(
                    "%s has %s, which fit never calls; the events are %s.",
                    type(probe).__name__,
                    ", ".join(unknown),
                    ", ".join(f"on_{e}" for e in EVENTS),
                )
    return found


def _fire(handlers: list[Callable[[FitState], None]], state: FitState) -> None:
    for handler in handlers:
        handler(state)


def _fire_quietly(handlers: list[Callable[[FitState], None]], state: FitState) -> None:
    """Fire while another exception propagates: log errors instead of raising."""
    for handler in handlers:
        try:
            handler(state)
        except Exception:
            logger.exception("A probe failed in on_fit_end while fit was stopping.")


def _set_lr(
    groups: list[dict],
    initial_lrs: list[float],
    lr_schedule: Callable[[int], float],
    step: int,
) -> None:
    factor = float(lr_schedule(step))
    if not 0.0 <= factor < math.inf:
        raise ValueError(
            f"lr_schedule({step}) returned {factor}; it must return a finite "
            "multiplier >= 0 of the initial learning rate."
        )
    for group, initial_lr in zip(groups, initial_lrs, strict=True):
        group["lr"] = initial_lr * factor


def _as_batch(item: Any) -> Batch:
    """Turn one item of the training data into a Batch."""
    if isinstance(item, Batch):
        return item
    if isinstance(item, (tuple, list)):
        if len(item) == 2:
            return Batch(item[0], item[1], None)
        if len(item) == 3:
            return Batch(item[0], item[1], item[2])
    elif hasattr(item, "x") and hasattr(item, "y"):
        return Batch(item.x, item.y, getattr(item, "index", None))
    raise TypeError(
        f"A training batch of type {type(item).__name__} is not an (x, y) or "
        "(x, y, index) tuple nor an object with x and y; pass a neuronlib "
        "Loader or an iterable of such tuples."
    )


def _to_device(batch: Batch, device: torch.device) -> Batch:
    index = batch.index.to(device) if batch.index is not None else None
    return batch._replace(x=batch.x.to(device), y=batch.y.to(device), index=index)


def _postfix(record: dict[str, float]) -> dict[str, str]:
    shown = {"loss": record["train_loss"], "acc": record["train_acc"]}
    for key, value in record.items():
        if key.endswith("_acc") and key != "train_acc":
            shown[key] = value
    return {key: f"{value:.3f}" for key, value in shown.items()}


def _check_eval_set(name: str, data: Any) -> None:
    if name == "train":
        raise ValueError(
            "An evaluation set is named 'train', which clashes with the training "
            "metrics; call it 'train_eval' or similar."
        )
    x, y = getattr(data, "x", None), getattr(data, "y", None)
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise TypeError(
            f"Evaluation set {name!r} of type {type(data).__name__} has no x and y "
            "tensors; pass a TensorData (for example splits.val)."
        )
    if len(y) == 0:
        raise ValueError(f"Evaluation set {name!r} is empty; pass one with samples.")


def _non_negative_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{what}={value!r} must be an integer >= 0, for example 10.")
    return value


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"{what}={value!r} must be a positive integer, for example 1000."
        )
    return value
