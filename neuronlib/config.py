"""Scales, seeding and device choice.

Every chapter runs at one of three scales, chosen with the environment variable
``NEURONLIB_SCALE``:

- ``quick``: seconds per chapter; what CI and the test suite execute.
- ``default``: minutes per chapter on a laptop CPU; what the rendered book shows.
- ``paper``: the settings of the papers the book follows; meant for a GPU.
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import TypeVar

import numpy as np
import torch

SCALES = ("quick", "default", "paper")
T = TypeVar("T")


def get_scale(name: str | None = None) -> str:
    """Return the scale in force.

    Args:
        name: A scale to use instead of ``NEURONLIB_SCALE``.

    Returns:
        One of ``"quick"``, ``"default"`` or ``"paper"``.

    Raises:
        ValueError: If the scale is not one of those.
    """
    scale = name if name is not None else os.environ.get("NEURONLIB_SCALE", "default")
    scale = scale.strip().lower()
    if scale not in SCALES:
        raise ValueError(
            f"Unknown scale {scale!r}; set NEURONLIB_SCALE to one of "
            f"{', '.join(SCALES)} (or leave it unset for 'default')."
        )
    return scale


def by_scale(*, quick: T, default: T, paper: T, scale: str | None = None) -> T:
    """Pick the value that belongs to the scale in force.

    Args:
        quick: Value at the ``quick`` scale.
        default: Value at the ``default`` scale.
        paper: Value at the ``paper`` scale.
        scale: A scale to use instead of ``NEURONLIB_SCALE``.

    Returns:
        The value for the scale.
    """
    return {"quick": quick, "default": default, "paper": paper}[get_scale(scale)]


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch, and ask PyTorch for deterministic kernels.

    On the CPU, two runs with the same seed then give the same numbers bit for bit.
    On a GPU, cuDNN is set to deterministic mode; a few CUDA kernels have no
    deterministic version, and PyTorch warns (instead of failing) when one is used.

    Args:
        seed: A non-negative integer.

    Returns:
        A CPU ``torch.Generator`` seeded with ``seed``, for code that wants its own
        stream of random numbers.

    Raises:
        ValueError: If ``seed`` is negative or not an integer.
    """
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid seed {seed!r}: pass a non-negative integer.")

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    # cuBLAS needs this workspace setting to be deterministic; it must be set before
    # the first CUDA call, and setting it has no effect on the CPU.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")

    return torch.Generator().manual_seed(seed)


def get_device(prefer: str | None = None) -> torch.device:
    """Choose the device to train on.

    The order is: ``prefer``, then ``NEURONLIB_DEVICE``, then CUDA, then Apple's MPS,
    then the CPU.

    Args:
        prefer: A device string such as ``"cpu"`` or ``"cuda:0"``.

    Returns:
        The chosen ``torch.device``.

    Raises:
        ValueError: If the requested device is not a valid device string or is not
            available on this machine.
    """
    requested = prefer or os.environ.get("NEURONLIB_DEVICE")
    if requested:
        try:
            device = torch.device(requested)
        except RuntimeError as error:
            raise ValueError(
                f"Invalid device {requested!r}: use 'cpu', 'cuda', 'cuda:0' or 'mps'."
            ) from error
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(
                f"Device {requested!r} was requested but CUDA is not available; "
                "unset NEURONLIB_DEVICE or set it to 'cpu'."
            )
        if device.type == "mps" and not torch.backends.mps.is_available():
            raise ValueError(
                f"Device {requested!r} was requested but MPS is not available; "
                "unset NEURONLIB_DEVICE or set it to 'cpu'."
            )
        return device

    if torch.cuda.is_available():
        return torch.device("cuda")
    if torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def cache_dir() -> Path:
    """Return the folder for extracted data sets and cached runs.

    ``NEURONLIB_CACHE`` when set, else ``~/.cache/neuronlib``. Data sets are
    extracted under ``cache_dir() / "data"`` and runs cached under
    ``cache_dir() / "runs"``. The folder is not created here.

    Returns:
        The cache folder.
    """
    env = os.environ.get("NEURONLIB_CACHE")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "neuronlib"
