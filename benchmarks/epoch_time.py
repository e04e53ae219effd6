"""Time one MNIST training epoch three ways: neuronlib, a torchvision loop, the floor.

What is measured: the wall time of one epoch of an MLP 784-1024-1024-10 (SGD, lr
0.01, momentum 0.9, batch 128, float32) over the 55,000 samples of the training
split of ``neuronlib.data.load("mnist")``, trained

(a) through neuronlib: ``train.fit(model, splits.train.loader(128), ...)`` with no
    evaluation sets, so the epoch is the training loop and its bookkeeping (the
    loss check, the running loss and accuracy, the probe events);
(b) through the loop most PyTorch code is written with: ``torchvision.datasets.MNIST``
    over the same raw files, per-sample ``ToTensor`` and ``Normalize`` transforms, a
    ``Subset`` with the same 55,000 indices and ``DataLoader(batch_size=128,
    shuffle=True, num_workers=0)``; the loop does zero_grad, forward, loss, backward
    and step, and no bookkeeping;
(c) at the compute floor: the same model and the same batches as (a), built before
    the clock starts and held in a list on the device; the loop does zero_grad,
    forward, loss, backward and step and nothing else.

Why: the library's data path (tensors on the device, one ``index_select`` per batch)
exists to make small networks train fast on a laptop CPU. (b)/(a) says how much it
gains over per-sample PIL transforms; (a)/(c) says what the loader and ``fit`` cost
on top of the arithmetic, which no data path can avoid. The targets (issue 2): (b)/(a)
at least 4x, (a)/(c) at most 1.2x.

How: every way builds a fresh model from the same seed and its own optimizer; the
three ways are interleaved, and the order is rotated from one repeat to the next so
that no way always runs first or last; a short warm-up runs before the first timed
epoch. Setup (loading the data, building the model, the DataLoader object and the
floor's batches) is not timed; iterating the data is. Other processes distort
timings (on two cores, one busy process can slow a two-thread epoch several times
over), so each run also reports the CPU that other processes used while it ran
("others", in cores, from ``/proc/stat``). Runs with others <= 0.25 cores (plus the
cores that ``--threads`` leaves free) count as quiet; the ratios use the medians of
the quiet runs when every way has one, else of all runs. The minima are printed too.

Run (from the repository root; NEURONLIB_DATA names the data mirror)::

    NEURONLIB_DATA=../shared/datasets python benchmarks/epoch_time.py --repeats 3

The exit code is 0 whatever the timings; each target is printed as PASS or FAIL.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
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
    start,
    timed,
)
from torch import nn
from torch.utils.data import DataLoader, Subset
from torchvision import datasets, transforms

from neuronlib import config
from neuronlib import data as nldata
from neuronlib.train import fit

TARGET_DATALOADER_OVER_NEURONLIB = 4.0  # at least
TARGET_NEURONLIB_OVER_FLOOR = 1.2  # at most


def torchvision_root() -> Path:
    """The folder holding ``MNIST/raw/*-ubyte`` that ``load("mnist")`` read.

    With a mirror (``NEURONLIB_DATA``), neuronlib decompresses its files once into an
    entry of its data cache whose manifest lists the files' SHA-256 digests; that
    entry is found by those digests (call it after ``load``). Nothing is written: the
    mirror is read-only and the entry exists already. Without a mirror, neuronlib read
    torchvision's own cache folder.
    """
    mirror, _ = nldata._named_mirror(None)
    if mirror is None:
        return nldata._torchvision_root()

    files = nldata._mirror_files("mnist", mirror, debian=False)
    digests = nldata._verify(mirror, files)
    for entry in sorted((config.cache_dir() / "data").glob("mnist-*")):
        manifest = entry / "manifest.json"
        if (
            manifest.is_file()
            and json.loads(manifest.read_text()).get("sources") == digests
        ):
            return entry
    raise FileNotFoundError(
        f"No extracted MNIST entry for {mirror} under {config.cache_dir() / 'data'}; "
        "call neuronlib.data.load('mnist') first."
    )


def neuronlib_way(splits: nldata.Splits, device: torch.device) -> Callable[[], None]:
    """(a) One epoch of ``fit`` over neuronlib's loader (returns the timed part)."""
    model, optimizer = build(device)
    loader = splits.train.loader(BATCH_SIZE, seed=SEED)

    def epoch() -> None:
        fit(model, loader, optimizer=optimizer, epochs=1)

    return epoch


def dataloader_way(dataset: Subset, device: torch.device) -> Callable[[], None]:
    """(b) One epoch of the usual DataLoader loop (returns the timed part)."""
    model, optimizer = build(device)
    generator = torch.Generator().manual_seed(SEED)
    loader = DataLoader(
        dataset, batch_size=BATCH_SIZE, shuffle=True, num_workers=0, generator=generator
    )
    model.train()

    def epoch() -> None:
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()

    return epoch


def floor_loop(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[tuple[torch.Tensor, torch.Tensor]],
) -> None:
    """The bare training loop of (c)."""
    for x, y in batches:
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()


def floor_way(
    batches: list[tuple[torch.Tensor, torch.Tensor]], device: torch.device
) -> Callable[[], None]:
    """(c) One epoch over batches already on the device (returns the timed part)."""
    model, optimizer = build(device)
    model.train()

    def epoch() -> None:
        floor_loop(model, optimizer, batches)

    return epoch


def torchvision_subset(splits: nldata.Splits) -> Subset:
    """The same 55,000 training samples, read the torchvision way."""
    transform = transforms.Compose(
        [transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))]
    )
    full = datasets.MNIST(
        str(torchvision_root()), train=True, transform=transform, download=False
    )
    return Subset(full, splits.train.index.cpu().tolist())


def same_weights(splits: nldata.Splits, batches: list, device: torch.device) -> bool:
    """Whether (a) and (c) end the epoch with identical weights (same work)."""
    model_a, optimizer_a = build(device)
    loader = splits.train.loader(BATCH_SIZE, seed=SEED)
    fit(model_a, loader, optimizer=optimizer_a, epochs=1)
    model_c, optimizer_c = build(device)
    model_c.train()
    floor_loop(model_c, optimizer_c, batches)
    return all(
        torch.equal(p, q)
        for p, q in zip(model_a.parameters(), model_c.parameters(), strict=True)
    )


def print_table(
    names: list[str], times: dict[str, list[float]], others: dict[str, list[float]]
) -> dict[str, float]:
    """Print the timings; return the median time of each way that ratios use.

    A run is quiet when other processes used at most :func:`quiet_limit` cores
    during it. The ratios use the medians of the quiet runs when every way has one, else
    the medians of all runs (and say so).
    """
    quiet = print_runs("way", names, times, others)
    use_quiet = all(quiet.values())
    print()
    if use_quiet:
        print("ratios of the medians of the quiet runs:")
        return {name: statistics.median(quiet[name]) for name in names}
    print(
        "ratios of the medians of all runs (some way had no quiet run: the machine "
        "was busy, rerun when it is calm):"
    )
    return {name: statistics.median(times[name]) for name in names}


def verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None, help="default: neuronlib's choice")
    parser.add_argument("--repeats", type=int, default=3, help="epochs per way")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument(
        "--check-same",
        action="store_true",
        help="also check that (a) and (c) end with identical weights (2 more epochs)",
    )
    args = parser.parse_args()
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    device = start(args)

    splits = nldata.load("mnist", device=device)
    dataset = torchvision_subset(splits)
    batches = [
        (batch.x, batch.y)
        for batch in splits.train.loader(BATCH_SIZE, seed=SEED).iter_epoch(0)
    ]
    print(
        f"task      MLP 784-{'-'.join(map(str, WIDTHS))}-10, SGD lr {LR} momentum "
        f"{MOMENTUM}, batch {BATCH_SIZE}, {len(splits.train)} samples, "
        f"{len(batches)} steps per epoch"
    )

    # Warm-up: first calls allocate memory and pick kernels; keep that off the clock.
    model, optimizer = build(device)
    floor_loop(model, optimizer, batches[:WARMUP_STEPS])
    del model, optimizer

    ways: dict[str, Callable[[], Callable[[], None]]] = {
        "neuronlib fit": lambda: neuronlib_way(splits, device),
        "torchvision DataLoader": lambda: dataloader_way(dataset, device),
        "compute floor": lambda: floor_way(batches, device),
    }
    names = list(ways)
    times: dict[str, list[float]] = {name: [] for name in names}
    others: dict[str, list[float]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]
        for name in order:
            seconds, busy = timed(ways[name](), device)
            times[name].append(seconds)
            others[name].append(busy)
        print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)

    basis = print_table(names, times, others)
    speedup = basis["torchvision DataLoader"] / basis["neuronlib fit"]
    overhead = basis["neuronlib fit"] / basis["compute floor"]
    low = {name: min(times[name]) for name in names}
    print(
        f"DataLoader / neuronlib: {speedup:.2f}x (of minima "
        f"{low['torchvision DataLoader'] / low['neuronlib fit']:.2f}x)   target >= "
        f"{TARGET_DATALOADER_OVER_NEURONLIB:g}x   "
        f"{verdict(speedup >= TARGET_DATALOADER_OVER_NEURONLIB)}"
    )
    print(
        f"neuronlib / floor:      {overhead:.2f}x (of minima "
        f"{low['neuronlib fit'] / low['compute floor']:.2f}x)   target <= "
        f"{TARGET_NEURONLIB_OVER_FLOOR:g}x   "
        f"{verdict(overhead <= TARGET_NEURONLIB_OVER_FLOOR)}"
    )
    if args.check_same:
        same = same_weights(splits, batches, device)
        print(f"neuronlib and floor end with identical weights: {same}")
    print(f"load avg  {load_average()} (end)")


if __name__ == "__main__":
    main()
