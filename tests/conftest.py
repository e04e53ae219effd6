"""Paths shared by the tests (the scale is set by the repository's conftest.py)."""

from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests on one thread: tiny tensors, so it is faster, and a busy
    machine does not slow them down (use with ``pytest.mark.usefixtures``)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
