"""The compiled kernels of the recorder's hot path, and what happens without them."""

import logging
import sys

import numpy as np
import pytest
import torch

from neuronlib.probes import _encode
from neuronlib.probes.signs import pack_codes, sign_codes


@pytest.fixture
def fresh_kernels(monkeypatch):
    """Forget the kernels compiled (or refused) earlier in this process."""
    monkeypatch.setattr(_encode, "_kernels", _encode._UNSET)


@pytest.fixture
def kernels():
    compiled = _encode.kernels()
    assert compiled is not None  # numba is a dependency: the fast path must be on
    return compiled


def test_the_kernels_are_available_here_and_agree_with_torch(kernels):
    assert _encode._agrees(kernels)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("width", [1, 4, 7, 1024, 1027])
def test_encode_writes_packed_codes_at_the_offset_and_nothing_else(
    kernels, dtype, width
):
    torch.manual_seed(0)
    grad = torch.randn(9, width, dtype=dtype)
    grad[grad.abs() < 0.5] = 0.0  # exact zeros, as ReLU gives
    num_bytes = -(-width // 4)
    packed = np.full((12, num_bytes + 5), 0x5A, dtype=np.uint8)
    codes = np.full(4 * (num_bytes + 2), 0xFF, dtype=np.uint8)  # stale scratch
    kernels.encode(grad.numpy(), packed, 2, codes)
    want = pack_codes(sign_codes(grad)).numpy()
    assert np.array_equal(packed[:9, 2 : 2 + num_bytes], want)
    # Bytes before and after the segment, and rows beyond the gradient's: untouched.
    assert (packed[:9, :2] == 0x5A).all()
    assert (packed[:9, 2 + num_bytes :] == 0x5A).all()
    assert (packed[9:] == 0x5A).all()


def test_scatter_copies_rows_and_refuses_rows_out_of_range(kernels):
    packed = np.arange(24, dtype=np.uint8).reshape(6, 4)  # more rows than used
    record = np.zeros((10, 4), dtype=np.uint8)
    rows = np.array([9, 0, 4], dtype=np.int64)
    assert kernels.scatter(packed, record, rows) == -1
    want = np.zeros((10, 4), dtype=np.uint8)
    want[rows] = packed[:3]
    assert np.array_equal(record, want)

    for bad in (10, -1):
        before = record.copy()
        stray = kernels.scatter(packed, record, np.array([1, bad], dtype=np.int64))
        assert stray == 1
        assert np.array_equal(record, before)  # nothing copied


def test_find_rows_reads_the_range_and_looks_rows_up(kernels):
    index = np.array([12, 3, 7, 30], dtype=np.int64)
    table = np.full(20, -1, dtype=np.int64)
    table[[3, 12]] = [0, 1]
    rows = np.empty(4, dtype=np.int64)
    assert tuple(kernels.find_rows(index, table, rows)) == (3, 30, 2)
    assert rows.tolist() == [1, 0, -1, -1]  # 7 untracked, 30 beyond the table

    empty = np.empty(0, dtype=np.int64)  # no table: the row is the index
    assert tuple(kernels.find_rows(index, empty, rows)) == (3, 30, 4)
    assert rows.tolist() == index.tolist()
    negative = np.array([4, -2], dtype=np.int64)
    assert tuple(kernels.find_rows(negative, table, rows))[:2] == (-2, 4)


def test_a_kernel_that_disagrees_is_not_used(fresh_kernels, monkeypatch, caplog):
    good = _encode._compile()

    def off_by_one(grad, packed, byte, codes):
        good.encode(grad, packed, byte, codes)
        packed[0, byte] ^= 1

    monkeypatch.setattr(_encode, "_compile", lambda: good._replace(encode=off_by_one))
    with caplog.at_level(logging.WARNING, logger=_encode.__name__):
        assert _encode.kernels() is None
    assert "disagrees with torch" in caplog.text


def test_a_kernel_that_fails_is_not_used(fresh_kernels, monkeypatch, caplog):
    good = _encode._compile()

    def broken(*args):
        raise TypeError("no matching definition")

    monkeypatch.setattr(_encode, "_compile", lambda: good._replace(scatter=broken))
    with caplog.at_level(logging.WARNING, logger=_encode.__name__):
        assert _encode.kernels() is None
    assert "no matching definition" in caplog.text


def test_without_numba_there_are_no_kernels(fresh_kernels, monkeypatch):
    monkeypatch.setitem(sys.modules, "numba", None)  # import numba raises
    assert _encode._compile() is None
    assert _encode.kernels() is None


def test_the_answer_is_kept_for_the_process(fresh_kernels, monkeypatch):
    calls = []

    def compile_once():
        calls.append(1)
        return None

    monkeypatch.setattr(_encode, "_compile", compile_once)
    assert _encode.kernels() is None
    assert _encode.kernels() is None
    assert calls == [1]


def test_a_failure_while_compiling_is_not_raised_at_training(
    fresh_kernels, monkeypatch, caplog
):
    def crash():
        raise OSError("llvmlite could not load its library")

    monkeypatch.setattr(_encode, "_compile", crash)
    with caplog.at_level(logging.WARNING, logger=_encode.__name__):
        assert _encode.kernels() is None
    assert "could not load" in caplog.text
