"""Time and memory of the gradient-sign recorder on an MNIST MLP.

What is measured: the wall time of ``fit`` for ``--epochs`` epochs of an MLP
784-1024-1024-10 (SGD, lr 0.01, momentum 0.9, batch 128, float32) over the 55,000
samples of the MNIST training split, with no probe ("off") and with a
``GradientSignRecorder`` ("on") on both hidden layers (``act1``, ``act2``), every
training sample, all 2 x 1024 = 2048 neurons and the recorder's default quantities
(the sign of dLoss/dActivation and of dLoss/dPre-activation), one record per epoch.

Why: the recorder is meant to ride along with ordinary training: it reads gradients
that backpropagation computes anyway, through tensor hooks, and packs their signs
two bits each. The target (issue 3) is at most 1.05x the time of the same run
without it, and memory of exactly two bits per sample, neuron and record, that is
``samples * neurons * records / 4`` bytes per quantity. The naive way, keeping each
step's float32 gradients ``[B, K]`` for the epoch, takes ``samples * neurons * 4``
bytes per record and quantity: 16 times more by construction.

How: one model and its optimizer train through every run, one ``fit`` call per
run, off and on alternating (the order swaps at every repeat). Each run is the same
work (dense layers cost the same whatever their weights), and keeping one model
keeps its memory where it is: two freshly built copies of the same model, both
without the recorder, were measured here to differ by up to 5 % in speed, as much
as the effect measured. A short recorded warm-up runs first (it also compiles the
recorder's kernel). Building the recorder is not timed; allocating its record (at
the start of each epoch), the hooks and the packing are. ``--control`` times off
against off, with the same pairing, to show what the harness reads when there is
nothing to find; ``--torch-path`` times the recorder without its compiled kernel.
Other processes distort timings (on two cores, one busy process can slow a two-
thread epoch several times over), so each run also reports the CPU that other
processes used while it ran ("others", in cores, from ``/proc/stat``). Runs with
others <= 0.25 cores (plus the cores that ``--threads`` leaves free) count as quiet.
On a shared machine the speed of the same epoch drifts by 10 to 30 % over minutes,
more than the effect measured, so the headline is paired: each repeat times off and
on back to back, and the figure is the median, over the repeats whose two runs were
quiet (all repeats if none was), of on / off within the repeat. The ratio of the
medians and that of the minima are printed beside it.

Whole-epoch pairs still spread by +-10 % here, so the paired median of 16 repeats
resolves a 5 % effect only roughly. A second reading, in the same run, interleaves
at the finest grain: ``--interleaved-epochs`` epochs (default 2) in which the
recorder is armed on steps on, off, off, on (repeated), every step timed; an
epoch's on / off is estimated as (mean "on" step x steps + the recorder's epoch
start, which opens the record) / (mean "off" step x steps). A control run arms
nothing and reads what the harness gives when both sides run the same code. This
estimate leaves out what an "on" step leaves behind for the next one (its record
writes may push the model's data out of the caches), so it can read a little low.

After the runs, the last whole-epoch record is checked: its bytes against the
formula, and that every entry holds a sign.

Run (from the repository root; NEURONLIB_DATA names the data mirror)::

    NEURONLIB_DATA=../shared/datasets python benchmarks/recorder_overhead.py

The exit code is 0 whatever the timings; the target is printed as PASS or FAIL.
"""

from __future__ import annotations

import argparse
import statistics
import time
from importlib.metadata import version

import torch
from _common import (
    BATCH_SIZE,
    LR,
    MOMENTUM,
    SEED,
    WARMUP_STEPS,
    WIDTHS,
    build,
    load_average,
    print_runs,
    quiet_limit,
    start,
    timed,
)

from neuronlib import data as nldata
from neuronlib.probes import GradientSignRecorder, _encode
from neuronlib.probes.signs import QUANTITIES
from neuronlib.train import fit

LAYERS = ("act1", "act2")

TARGET_ON_OVER_OFF = 1.05  # at most
FLOAT32_BYTES = 4
MB = 1e6


def make_recorder(
    model: torch.nn.Module, splits: nldata.Splits, quantities: tuple[str, ...]
) -> GradientSignRecorder:
    """The recorder timed: both hidden layers, every training sample."""
    return GradientSignRecorder(
        model, list(LAYERS), samples=splits.train.index.cpu(), quantities=quantities
    )


def run(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    splits: nldata.Splits,
    device: torch.device,
    epochs: int,
    *,
    record: bool,
    quantities: tuple[str, ...] = QUANTITIES,
) -> tuple[float, float, GradientSignRecorder | None]:
    """Time ``fit`` of ``model`` with or without the recorder.

    Returns:
        ``(seconds, others, recorder)``: the wall time; the CPU time that other
        processes used meanwhile divided by it, in cores (NaN where ``/proc/stat``
        cannot be read; near 0 means the run had the machine to itself); the
        recorder, or None.
    """
    loader = splits.train.loader(BATCH_SIZE, seed=SEED)
    probes = []
    recorder = None
    if record:
        recorder = make_recorder(model, splits, quantities)
        probes.append(recorder)

    seconds, others = timed(
        lambda: fit(model, loader, optimizer=optimizer, epochs=epochs, probes=probes),
        device,
    )
    return seconds, others, recorder


class Interleaved:
    """A probe that arms the recorder on every other pair of steps and times steps.

    Steps follow the pattern on, off, off, on (repeated), so that a drift of the
    machine's speed that is linear over four steps hits both sides equally. Each
    step is timed from its ``batch_start`` to the next one (the last of an epoch to
    ``epoch_end``): forward, backward, optimizer step, the loop's bookkeeping and,
    on "on" steps, everything the recorder does for the batch. The recorder's
    hooks stay on the model throughout: on "off" steps they return at once (a
    check of one attribute per hook). What the recorder does once per epoch
    (opening a record) is timed apart, in ``epoch_seconds``. With ``arm=False``
    nothing is ever armed: both sides run the same code, a control.
    """

    def __init__(self, recorder: GradientSignRecorder, arm: bool = True):
        self.recorder = recorder
        self.arm = arm
        self.seconds: dict[str, list[float]] = {"on": [], "off": []}
        self.epoch_seconds: list[float] = []
        self._count = 0
        self._label: str | None = None
        self._started = 0.0

    def _stop_clock(self) -> None:
        if self._label is not None:
            self.seconds[self._label].append(time.perf_counter() - self._started)
            self._label = None

    def on_fit_start(self, state: object) -> None:
        self.recorder.on_fit_start(state)

    def on_epoch_start(self, state: object) -> None:
        started = time.perf_counter()
        self.recorder.on_epoch_start(state)
        self.epoch_seconds.append(time.perf_counter() - started)

    def on_batch_start(self, state: object) -> None:
        self._stop_clock()
        self._started = time.perf_counter()
        self._label = "on" if self._count % 4 in (0, 3) else "off"
        self._count += 1
        if self.arm and self._label == "on":
            self.recorder.on_batch_start(state)

    def on_batch_end(self, state: object) -> None:
        if self.arm and self._label == "on":
            self.recorder.on_batch_end(state)

    def on_epoch_end(self, state: object) -> None:
        self._stop_clock()
        self.recorder.on_epoch_end(state)

    def on_fit_end(self, state: object) -> None:
        self.recorder.on_fit_end(state)


def run_interleaved(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    splits: nldata.Splits,
    epochs: int,
    *,
    arm: bool,
    quantities: tuple[str, ...],
) -> tuple[float, float, float, int]:
    """Train ``epochs`` epochs through :class:`Interleaved`.

    Returns:
        ``(on, off, per_epoch, steps)``: the mean seconds of an "on" step and of an
        "off" step, the mean seconds of the recorder's epoch start, and the steps
        of an epoch.
    """
    loader = splits.train.loader(BATCH_SIZE, seed=SEED)
    probe = Interleaved(make_recorder(model, splits, quantities), arm=arm)
    fit(model, loader, optimizer=optimizer, epochs=epochs, probes=[probe])
    on, off = probe.seconds["on"], probe.seconds["off"]
    steps = (len(on) + len(off)) // epochs
    return (
        statistics.fmean(on),
        statistics.fmean(off),
        statistics.fmean(probe.epoch_seconds),
        steps,
    )


def report_interleaved(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    splits: nldata.Splits,
    epochs: int,
    quantities: tuple[str, ...],
) -> None:
    """Measure and print the step-interleaved estimate and its control."""
    print()
    print(
        f"step-interleaved, {epochs} epoch(s) each: steps alternate on, off, off, "
        "on; an epoch's time is estimated from the mean step of each side"
    )
    print(
        f"{'run':<9} {'on ms/step':>11} {'off ms/step':>12} {'epoch start ms':>15} "
        f"{'on/off':>7}   (control: nothing armed, both sides the same)"
    )
    estimate = None
    for name, arm in (("recorder", True), ("control", False)):
        on, off, per_epoch, steps = run_interleaved(
            model, optimizer, splits, epochs, arm=arm, quantities=quantities
        )
        # An epoch with the recorder: every step "on", plus the record it opens;
        # without it: every step "off".
        ratio = (on * steps + (per_epoch if arm else 0.0)) / (off * steps)
        if arm:
            estimate = ratio
        print(
            f"{name:<9} {on * 1e3:11.3f} {off * 1e3:12.3f} {per_epoch * 1e3:15.1f} "
            f"{ratio:7.3f}"
        )
    verdict = "PASS" if estimate <= TARGET_ON_OVER_OFF else "FAIL"
    print(
        f"on / off, step-interleaved estimate: {estimate:.3f}x   target <= "
        f"{TARGET_ON_OVER_OFF:g}x   {verdict}"
    )


def report_memory(recorder: GradientSignRecorder, epochs: int) -> None:
    """Print the record's bytes, check them against the formula and the content."""
    samples = recorder.sample_index.numel()
    neurons = sum(recorder.neuron_index[layer].numel() for layer in recorder.layers)
    records = len(recorder.record_epochs)
    quantities = len(recorder.quantities)
    assert records == epochs, (records, epochs)

    expected_per_quantity = samples * neurons * records // 4
    assert samples * neurons * records % 4 == 0
    measured = {
        quantity: sum(
            recorder.packed(layer, quantity).nbytes for layer in recorder.layers
        )
        for quantity in recorder.quantities
    }
    total = recorder.nbytes
    per_record = total // records
    naive_per_record = samples * neurons * FLOAT32_BYTES * quantities
    exact = all(m == expected_per_quantity for m in measured.values()) and (
        total == expected_per_quantity * quantities
    )
    complete = all(
        bool(recorder.recorded(layer, quantity).all())
        for layer in recorder.layers
        for quantity in recorder.quantities
    )

    print()
    print(
        f"record    {samples} samples x {neurons} neurons "
        f"({', '.join(recorder.layers)}) x {records} record(s), quantities: "
        f"{', '.join(recorder.quantities)}"
    )
    for quantity, nbytes in measured.items():
        print(
            f"  {quantity:<15} {nbytes:>13,} bytes  (samples*neurons*records/4 = "
            f"{expected_per_quantity:,})"
        )
    print(f"  per record      {per_record:>13,} bytes  ({per_record / MB:.2f} MB)")
    print(f"  whole run       {total:>13,} bytes  ({total / MB:.2f} MB)")
    print(
        f"  exactly 2 bits per sample*neuron*record*quantity: {exact}; "
        f"every entry holds a sign: {complete}"
    )
    print(
        f"naive     float32 gradients kept per step: {naive_per_record:,} bytes per "
        f"record ({naive_per_record / MB:.1f} MB; samples*neurons*4 = "
        f"{samples * neurons * FLOAT32_BYTES:,} per quantity), whole run "
        f"{naive_per_record * records / MB:.1f} MB: {naive_per_record / per_record:g}x "
        "the packed record"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run")
    parser.add_argument("--repeats", type=int, default=16, help="runs per setting")
    parser.add_argument("--device", default=None, help="default: neuronlib's choice")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--quantities",
        nargs="+",
        choices=QUANTITIES,
        default=list(QUANTITIES),
        help="what the recorder records (default: both, the recorder's default)",
    )
    parser.add_argument(
        "--control",
        action="store_true",
        help="A/A check: time off against off, paired as off against on is",
    )
    parser.add_argument(
        "--interleaved-epochs",
        type=int,
        default=2,
        help="epochs of the step-interleaved estimate and of its control (0: skip)",
    )
    parser.add_argument(
        "--torch-path",
        action="store_true",
        help="record without the compiled kernel (torch operators only)",
    )
    args = parser.parse_args()
    if args.epochs < 1 or args.repeats < 1 or args.interleaved_epochs < 0:
        parser.error(
            "--epochs and --repeats must be at least 1, --interleaved-epochs at least 0"
        )
    device = start(args)

    splits = nldata.load("mnist", device=device)
    print(
        f"task      MLP 784-{'-'.join(map(str, WIDTHS))}-10, SGD lr {LR} momentum "
        f"{MOMENTUM}, batch {BATCH_SIZE}, {len(splits.train)} samples, "
        f"{args.epochs} epoch(s) per run"
    )

    if args.torch_path:
        _encode.kernels = lambda: None  # the recorder falls back to torch operators
    kernel = _encode.kernels()
    print(
        "recorder  "
        + (
            f"compiled kernel (numba {version('numba')})"
            if kernel is not None
            else "torch operators (no compiled kernel)"
        )
        + ("; --control: both settings run WITHOUT it" if args.control else "")
    )

    # One model trains through every run (see the module docstring). Warm-up, off
    # the clock: a few recorded steps through fit.
    model, optimizer = build(device)
    warmup = list(splits.train.loader(BATCH_SIZE, seed=SEED).iter_epoch(0))
    recorder = make_recorder(model, splits, tuple(args.quantities))
    fit(model, warmup[:WARMUP_STEPS], optimizer=optimizer, epochs=1, probes=[recorder])
    del warmup, recorder

    times: dict[str, list[float]] = {"off": [], "on": []}
    others: dict[str, list[float]] = {"off": [], "on": []}
    kept = None
    for repeat in range(args.repeats):
        order = ("off", "on") if repeat % 2 == 0 else ("on", "off")
        for setting in order:
            seconds, busy, recorder = run(
                model,
                optimizer,
                splits,
                device,
                args.epochs,
                record=setting == "on" and not args.control,
                quantities=tuple(args.quantities),
            )
            times[setting].append(seconds)
            others[setting].append(busy)
            if recorder is not None:
                kept = recorder  # the last one; earlier records are freed
            del recorder
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)

    limit = quiet_limit()
    # Each repeat times off and on back to back (in alternating order), so their
    # ratio is little affected by the machine's drift over minutes; the median of
    # these paired ratios is the headline figure.
    pairs = list(zip(times["off"], times["on"], strict=True))
    pair_quiet = [
        not (others["off"][i] > limit or others["on"][i] > limit)
        for i in range(args.repeats)
    ]
    quiet_pairs = [pair for pair, calm in zip(pairs, pair_quiet, strict=True) if calm]
    use_quiet = bool(quiet_pairs)

    print_runs("recorder", ["off", "on"], times, others)
    print(
        "on / off per repeat: "
        + " ".join(
            f"{on / off:.3f}{'' if calm else '*'}"
            for (off, on), calm in zip(pairs, pair_quiet, strict=True)
        )
        + "   (* a run of the pair was not quiet)"
    )
    print()
    basis = quiet_pairs if use_quiet else pairs
    ratios = [on / off for off, on in basis]
    ratio = statistics.median(ratios)
    quartiles = (
        statistics.quantiles(ratios, n=4, method="inclusive")
        if len(ratios) > 1
        else [ratio] * 3
    )
    of_medians = statistics.median(t for _, t in basis) / statistics.median(
        t for t, _ in basis
    )
    ratio_min = min(times["on"]) / min(times["off"])
    verdict = "PASS" if ratio <= TARGET_ON_OVER_OFF else "FAIL"
    if args.control:
        verdict = "(control: nothing was recorded, so 1 is the right answer)"
    which = (
        f"the {len(basis)} quiet pairs"
        if use_quiet
        else f"all {len(basis)} pairs (none was quiet: the machine was busy, rerun "
        "when it is calm)"
    )
    print(f"on / off, median of the paired ratios of {which}:")
    print(
        f"on / off: {ratio:.3f}x (ratio of the medians {of_medians:.3f}x, of the "
        f"minima {ratio_min:.3f}x)   target <= {TARGET_ON_OVER_OFF:g}x   {verdict}"
    )
    print(
        f"paired ratios: quartiles {quartiles[0]:.3f} / {quartiles[2]:.3f}, range "
        f"{min(ratios):.3f} to {max(ratios):.3f} (the spread is the machine's; "
        "--control shows it without the recorder)"
    )

    if args.interleaved_epochs and not args.control:
        report_interleaved(
            model, optimizer, splits, args.interleaved_epochs, tuple(args.quantities)
        )
    if kept is not None:
        report_memory(kept, args.epochs)
    print(f"load avg  {load_average()} (end)")


if __name__ == "__main__":
    main()
