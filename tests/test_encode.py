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
def test_encode_writes_packed_codes_to_the_rows_at_the_offset_and_nothing_else(
    kernels, dtype, width
):
    torch.manual_seed(0)
    grad = torch.randn(9, width, dtype=dtype)
    grad[grad.abs() < 0.5] = 0.0  # exact zeros, as ReLU gives
    num_bytes = -(-width // 4)
    record = np.full((15, num_bytes + 5), 0x5A, dtype=np.uint8)
    rows = np.array([14, 0, 3, 7, 2, 9, 11, 5, 1], dtype=np.int64)
    codes = np.full(4 * (num_bytes + 2), 0xFF, dtype=np.uint8)  # stale scratch
    assert kernels.encode(grad.numpy(), record, rows, 2, codes) == -1
    want = pack_codes(sign_codes(grad)).numpy()
    assert np.array_equal(record[rows, 2 : 2 + num_bytes], want)
    # Bytes before and after the segment, and rows of no sample: untouched.
    assert (record[rows, :2] == 0x5A).all()
    assert (record[rows, 2 + num_bytes :] == 0x5A).all()
    others = np.setdiff1d(np.arange(15), rows)
    assert (record[others] == 0x5A).all()


@pytest.mark.parametrize("bad", [15, -1])
def test_encode_refuses_rows_out_of_range_and_writes_nothing(kernels, bad):
    grad = torch.randn(3, 8)
    record = np.zeros((15, 2), dtype=np.uint8)
    rows = np.array([4, bad, 6], dtype=np.int64)
    codes = np.zeros(8, dtype=np.uint8)
    assert kernels.encode(grad.numpy(), record, rows, 0, codes) == 1
    assert (record == 0).all()


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

    def off_by_one(grad, record, rows, byte, codes):
        stray = good.encode(grad, record, rows, byte, codes)
        record[rows[0], byte] ^= 1
        return stray

    monkeypatch.setattr(_encode, "_compile", lambda: good._replace(encode=off_by_one))
    with caplog.at_level(logging.WARNING, logger=_encode.__name__):
        assert _encode.kernels() is None
    assert "disagrees with torch" in caplog.text


def test_a_kernel_that_fails_is_not_used(fresh_kernels, monkeypatch, caplog):
    good = _encode._compile()

    def broken(*args):
        raise TypeError("no matching definition")

    monkeypatch.setattr(_encode, "_compile", lambda: good._replace(find_rows=broken))
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
