"""Compiled CPU kernels for the gradient-sign recorder's hot path.

The recorder's hot path runs inside every training step. With torch operators
alone, turning a ``[B, K]`` gradient into packed codes takes several passes (sign,
conversion to bytes, masking, gathering four codes to a byte), and on a training
step each operator call costs tens of microseconds of dispatch with cold caches.
:func:`kernels` compiles, with Numba, two loops: ``encode`` reads a gradient once
and writes its packed codes straight into the record, each sample's bytes in the
sample's row; ``find_rows`` reads a batch's dataset indices (their range, and the
record row of each through a look-up table). Where Numba is
not installed or the compiled ``encode`` does not give
:func:`neuronlib.probes.signs.pack_codes`'s bytes, :func:`kernels` returns None and
the recorder keeps its torch path.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import torch

logger = logging.getLogger(__name__)

# The dtypes the kernel reads; other floating gradients are converted to float32 first
# (which keeps their sign, zero included).
KERNEL_DTYPES = (torch.float32, torch.float64)

_UNSET = object()
_kernels: object = _UNSET


class Kernels(NamedTuple):
    """The compiled kernels (see the module docstring and :func:`kernels`)."""

    encode: Callable
    find_rows: Callable


def _compile() -> Kernels | None:
    """The Numba kernels, or None when Numba cannot be imported."""
    try:
        import numba
    except ImportError:
        return None

    # The torch path's packing constant: a little-endian 32-bit word of four codes
    # below 4, times it, has code t of the word at bits 24 + 2t.
    from neuronlib.probes.signs import _GATHER

    gather = np.uint32(_GATHER)
    two = np.uint8(2)
    top = np.uint32(24)
    jit = numba.njit(nogil=True, boundscheck=False, cache=False)
    # encode is compiled for these types only (C-contiguous arrays), so that a
    # call with anything else raises TypeError rather than compiling a variant
    # in the middle of a training step; the recorder then converts and calls again.
    encode_types = [
        f"int64({grad}[:, ::1], uint8[:, ::1], int64[::1], int64, uint8[::1])"
        for grad in ("float32", "float64")
    ]

    @numba.njit(encode_types, nogil=True, boundscheck=False, cache=False)
    def encode(grad, record, rows, byte, codes):  # pragma: no cover - compiled
        # grad: float [n, K]; record: uint8 [S, >= byte + ceil(K / 4)]; rows:
        # int64 [>= n], the record row of each gradient row; codes: uint8 [4 * m]
        # with m >= ceil(K / 4), a scratch row. Returns the position of the first
        # row out of range (and writes nothing), or -1.
        count, width = grad.shape
        size = record.shape[0]
        for i in range(count):
            if rows[i] < 0 or rows[i] >= size:
                return i
        num_bytes = (width + 3) // 4
        words = codes.view(np.uint32)
        for k in range(width, 4 * num_bytes):
            codes[k] = 0  # padding neurons: NOT_RECORDED
        for i in range(count):
            # The sign plus two, one byte per neuron (NaN counts as zero, as in
            # sign_codes); a loop the compiler vectorizes.
            for k in range(width):
                value = grad[i, k]
                codes[k] = two + np.uint8(value > 0) - np.uint8(value < 0)
            # Four codes to a byte: bits 24 to 31 of word * gather. (Writing
            # through a slice of the row, not record[r, byte + j], lets the
            # compiler vectorize this loop: it is eight times faster.)
            target = record[rows[i], byte : byte + num_bytes]
            for j in range(num_bytes):
                target[j] = np.uint8((words[j] * gather) >> top)
        return -1

    @jit
    def find_rows(index, table, rows):  # pragma: no cover - compiled
        # index: int64 [n >= 1] dataset indices; table: int64 [T], dataset index ->
        # record row, or -1 (empty: the row is the index); rows: int64 [>= n], out.
        # Returns (smallest index, largest index, number of indices with a row).
        size = table.shape[0]
        low = index[0]
        high = index[0]
        found = 0
        for i in range(index.shape[0]):
            value = index[i]
            low = min(low, value)
            high = max(high, value)
            if size == 0:
                row = value
            elif 0 <= value < size:
                row = table[value]
            else:
                row = -1
            rows[i] = row
            found += row >= 0
        return low, high, found

    return Kernels(encode, find_rows)


def _reference(grad: torch.Tensor) -> torch.Tensor:
    """The packed codes of ``grad`` [n, K] by torch operators (what must come out)."""
    from neuronlib.probes.signs import pack_codes, sign_codes

    return pack_codes(sign_codes(grad))


def _agrees(compiled: Kernels) -> bool:
    """Whether the kernels give what torch gives.

    ``encode``: on every combination of four of -1, -0.0, 0, +1 and NaN, for
    float32 and float64, with a width that is not a multiple of four, an offset
    into a row and rows in another order; and a row out of range must write
    nothing. ``find_rows``: on a small example.
    """
    values = torch.tensor([-1.0, -0.0, 0.0, 1.0, float("nan")])
    grad = torch.cartesian_prod(*[values] * 4)  # [625, 4]
    grad = torch.cat([grad, grad[:, :3]], dim=1)  # width 7: one padded byte
    count = grad.shape[0]
    rows = np.arange(count, dtype=np.int64)[::-1].copy()  # reversed, and one spare
    for dtype in KERNEL_DTYPES:
        typed = grad.to(dtype)
        want = _reference(typed)
        record = np.full((count + 1, 6), 0xFF, dtype=np.uint8)
        codes = np.zeros(8, dtype=np.uint8)
        if compiled.encode(typed.numpy(), record, rows, 3, codes) != -1:
            return False
        if not np.array_equal(record[rows, 3:5], want.numpy()):
            return False
        untouched = np.ones(record.shape, dtype=bool)
        untouched[rows, 3:5] = False
        if (record[untouched] != 0xFF).any():  # other bytes and rows untouched
            return False
        stray = rows.copy()
        stray[7] = count + 1
        record[:] = 0xFF
        if compiled.encode(typed.numpy(), record, stray, 3, codes) != 7:
            return False
        if (record != 0xFF).any():
            return False

    index = np.array([5, 1, 9], dtype=np.int64)
    table = np.array([-1, 0, -1, -1, -1, 1, -1], dtype=np.int64)
    found_rows = np.empty(3, dtype=np.int64)
    answer = compiled.find_rows(index, table, found_rows)
    return tuple(answer) == (1, 9, 2) and found_rows.tolist() == [1, 0, -1]


def kernels() -> Kernels | None:
    """The compiled kernels, or None.

    ``encode(grad, record, rows, byte, codes)`` writes the packed codes of row
    ``i`` of ``grad`` (a C-contiguous float32 or float64 array ``[n, K]``) to
    bytes ``[byte, byte + ceil(K / 4))`` of row ``rows[i]`` of ``record``
    (``uint8``), using ``codes`` (``uint8``, length a multiple of four and at
    least ``4 * ceil(K / 4)``) as scratch, and returns -1; if a row is out of
    range it returns that row's position and writes nothing.
    ``find_rows(index, table, rows)`` returns the smallest and largest dataset
    index and how many have a row, and writes each one's row (-1: none) to
    ``rows``; an empty ``table`` means the row is the index.

    They are compiled and checked against torch once per process (about two
    seconds, at the first recorded batch); None means that Numba is missing, that
    the machine is not little-endian, or that the check failed (then a warning is
    logged).
    """
    global _kernels
    if _kernels is _UNSET:
        compiled = works = None
        if sys.byteorder == "little":
            try:
                compiled = _compile()
                works = compiled is not None and _agrees(compiled)
            except Exception as error:  # noqa: BLE001 - any failure means: do not use
                logger.warning("Compiled sign packing failed (%s); using torch.", error)
            else:
                if compiled is not None and not works:
                    logger.warning(
                        "Compiled sign packing disagrees with torch; using torch."
                    )
        _kernels = compiled if works else None
    return _kernels  # type: ignore[return-value]
