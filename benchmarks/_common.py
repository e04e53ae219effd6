"""What both benchmarks share: the task, the model, and how a run is timed and judged.

The scripts import this module by its bare name: run as ``python benchmarks/NAME.py``,
Python puts ``benchmarks/`` first on the import path.
"""

from __future__ import annotations

import argparse
import datetime
import math
import os
import platform
import statistics
import time
from collections.abc import Callable

import torch
from torch import nn

from neuronlib import config, models

SEED = 0
BATCH_SIZE = 128
WIDTHS = (1024, 1024)
LR = 0.01
MOMENTUM = 0.9
WARMUP_STEPS = 20
# A run is quiet when other processes used at most the cores that this one leaves
# free plus this margin (0.25 cores with torch's 2 threads on 2 cores).
QUIET_MARGIN = 0.25


def build(device: torch.device) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A fresh MLP 784-1024-1024-10 from ``SEED`` and its SGD optimizer."""
    torch.manual_seed(SEED)
    model = models.mlp((1, 28, 28), WIDTHS, 10).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)
    return model, optimizer


def synchronize(device: torch.device) -> None:
    """Wait for the device, so that the clock reads finished work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def busy_seconds() -> float | None:
    """CPU seconds that all processes have spent busy since boot; None if unknown.

    Read from the first line of ``/proc/stat`` (Linux): user, nice, system, irq,
    softirq and steal time; idle and iowait do not count.
    """
    try:
        with open("/proc/stat") as stat:
            fields = [int(value) for value in stat.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    busy = sum(fields) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def own_seconds() -> float:
    """CPU seconds used by this process so far, all its threads."""
    times = os.times()
    return times.user + times.system


def quiet_runs(times: list[float], others: list[float]) -> list[float]:
    """The times of the runs during which others left this process its cores.

    Without ``/proc/stat`` (others is NaN) every run counts as quiet.
    """
    limit = quiet_limit()
    return [t for t, o in zip(times, others, strict=True) if not o > limit]


def quiet_limit() -> float:
    """The most CPU, in cores, that others may use during a quiet run."""
    free = max((os.cpu_count() or 1) - torch.get_num_threads(), 0)
    return free + QUIET_MARGIN


def load_average() -> str:
    """The 1, 5 and 15 minute load averages (other processes skew timings)."""
    return " ".join(f"{value:.2f}" for value in os.getloadavg())


def start(args: argparse.Namespace) -> torch.device:
    """Apply ``--threads`` and ``--device``, print the machine, return the device."""
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = config.get_device(args.device)

    print(f"date      {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(
        f"machine   {platform.machine()}, {os.cpu_count()} cores, "
        f"{platform.python_implementation()} {platform.python_version()}"
    )
    print(
        f"torch     {torch.__version__}, {torch.get_num_threads()} threads, "
        f"device {device}"
    )
    print(f"load avg  {load_average()} (start)")
    return device


def timed(body: Callable[[], None], device: torch.device) -> tuple[float, float]:
    """Run ``body`` once; return its wall time and what others used meanwhile.

    Returns:
        ``(seconds, others)``: the wall time, and the CPU time that other processes
        used during it divided by that wall time, in cores (NaN where
        ``/proc/stat`` cannot be read). On a 2-core machine, ``others`` near 0 means
        the run had both cores; 0.5 or more means another process took a good share
        of one, and the run's time says little.
    """
    synchronize(device)
    busy, own = busy_seconds(), own_seconds()
    start = time.perf_counter()
    body()
    synchronize(device)
    seconds = time.perf_counter() - start
    busy_after, own_after = busy_seconds(), own_seconds()

    if busy is None or busy_after is None:
        return seconds, math.nan
    others = (busy_after - busy) - (own_after - own)
    return seconds, max(others, 0.0) / seconds


def print_runs(
    label: str,
    names: list[str],
    times: dict[str, list[float]],
    others: dict[str, list[float]],
) -> dict[str, list[float]]:
    """Print each way's runs (min, median, quiet ones); return the quiet times."""
    width = max(len(label), *map(len, names))
    quiet = {name: quiet_runs(times[name], others[name]) for name in names}
    print()
    print(
        f"{label:<{width}} {'min s':>7} {'median s':>9} {'quiet':>6} "
        f"{'quiet med s':>12}   runs s (others, cores)"
    )
    for name in names:
        runs = " ".join(
            f"{t:.2f} ({o:.2f})" for t, o in zip(times[name], others[name], strict=True)
        )
        quiet_median = (
            f"{statistics.median(quiet[name]):12.2f}" if quiet[name] else f"{'-':>12}"
        )
        print(
            f"{name:<{width}} {min(times[name]):7.2f} "
            f"{statistics.median(times[name]):9.2f} "
            f"{len(quiet[name]):>2}/{len(times[name]):<3} {quiet_median}   {runs}"
        )
    print(
        f"others: CPU that other processes used during the run, in cores; quiet: runs "
        f"with others <= {quiet_limit():g}"
    )
    return quiet
