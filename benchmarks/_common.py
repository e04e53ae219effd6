"""What both benchmarks share: the task, the model, and how a run is timed and judged.

The scripts import this module by its bare name: run as ``python benchmarks/NAME.py``,
Python puts ``benchmarks/`` first on the import path.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform

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
