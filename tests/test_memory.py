"""Memory kept from call to call.

Scratch: aligned, never shared between two open lenders, grown to what a call used, and
results that do not depend on what it held before. Results' memory: reused only once the
result and every view of it are gone, never past the cap, and only for the same size."""

from __future__ import annotations

import gc
import threading

import numpy as np
import pytest

import convtranspose as ct
from convtranspose import _memory


def test_arrays_are_aligned_disjoint_and_the_buffer_grows_to_fit():
    with _memory.Scratch() as s:
        first = s.empty(1000, np.float32)
        second = s.empty(333, np.float64)
        third = s.empty(5, np.float32)
    for a in (first, second, third):
        assert a.ctypes.data % 64 == 0
    spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in (first, second, third))
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    with _memory.Scratch() as s:  # the returned buffer now holds such a call whole
        again = [s.empty(1000, np.float32), s.empty(333, np.float64)]
        assert all(np.shares_memory(a, s._buffer) for a in again)


def test_two_open_scratches_never_share_memory():
    with _memory.Scratch() as a, _memory.Scratch() as b:
        x, y = a.empty(4096, np.float32), b.empty(4096, np.float32)
        assert not np.shares_memory(x, y)


def test_nothing_past_the_retention_cap_is_kept(monkeypatch):
    monkeypatch.setattr(_memory, "RETAIN_BYTES", 1 << 16)
    monkeypatch.setattr(_memory, "_free", [])
    with _memory.Scratch() as s:
        s.empty(1 << 20, np.float32)
    assert all(b.nbytes <= 1 << 16 for _, b in _memory._free)


def test_scratch_past_the_kept_buffer_reuses_a_dropped_blocks_memory(monkeypatch):
    """What a call needs past the retained buffer comes from the results' recycled
    memory: its block returns there when the call ends, and the next call of the same
    size gets the same pages (no fresh page faults), on a cache line."""
    monkeypatch.setattr(_memory, "RETAIN_BYTES", 1 << 16)
    monkeypatch.setattr(_memory, "_free", [])
    monkeypatch.setattr(_memory, "_dropped", [])
    monkeypatch.setattr(_memory, "_dropped_bytes", 0)
    with _memory.Scratch() as s:
        where = s.empty(1 << 20, np.float32).ctypes.data
    gc.collect()
    with _memory.Scratch() as s:
        again = s.empty(1 << 20, np.float32)
        assert again.ctypes.data == where and where % 64 == 0
        other = s.empty(1 << 20, np.float32)  # while the first is in use: other memory
        assert not np.shares_memory(again, other)


def test_results_do_not_depend_on_the_scratch_contents_or_on_concurrent_calls(rng):
    """A call after others (whose packed weights filled the retained memory), and calls
    from several threads at once, give the bits of a first call."""
    x = rng.standard_normal((1, 5, 6, 7, 20)).astype(np.float32)
    w = rng.standard_normal((24, 3, 2, 3, 20)).astype(np.float32)
    kw = dict(stride=(2, 1, 2), padding=1)
    want = ct.conv_transpose3d(x, w, **kw)
    for c_out in (40, 8):  # other layers' weights through the same buffer
        ct.conv_transpose3d(x, rng.standard_normal((c_out, 2, 2, 2, 20)).astype(np.float32))
    np.testing.assert_array_equal(ct.conv_transpose3d(x, w, **kw), want)
    results = [None] * 6

    def call(i):
        results[i] = ct.conv_transpose3d(x, w, **kw)

    threads = [threading.Thread(target=call, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for r in results:
        np.testing.assert_array_equal(r, want)


BIG = (1, 8, 32, 32, 64)  # 2 MiB of float32: past RECYCLE_FROM_BYTES


@pytest.fixture
def result_cache(monkeypatch):
    """A cache of its own for the test, emptied before and after; nothing decays during
    it (a loaded machine may pause a test for a second)."""
    monkeypatch.setattr(_memory, "DECAY_SECONDS", 3600.0)
    _memory.release_memory()
    _memory.set_result_cache(64 << 20)
    yield
    _memory.set_result_cache(None)
    _memory.release_memory()


def test_a_dropped_result_lends_its_memory_to_the_next_of_its_size(result_cache):
    a = _memory.result_empty(BIG, np.float32)
    assert a.flags.c_contiguous and a.flags.writeable and a.ctypes.data % 64 == 0
    assert a.shape == BIG and a.dtype == np.float32
    address = a.ctypes.data
    del a
    gc.collect()
    b = _memory.result_empty(BIG, np.float32)
    assert b.ctypes.data == address
    other = _memory.result_empty((1, 8, 32, 32, 32), np.float32)  # another size: fresh
    assert not np.shares_memory(other, b)


def test_memory_stays_with_a_result_while_any_view_of_it_lives(result_cache):
    a = _memory.result_empty(BIG, np.float32)
    a[...] = 1.5
    view = a[0, 3:5].T
    del a
    gc.collect()
    b = _memory.result_empty(BIG, np.float32)
    b[...] = -7.0
    assert not np.shares_memory(view, b)
    assert (view == 1.5).all()
    base = view.base
    del view, base
    gc.collect()
    c = _memory.result_empty(BIG, np.float32)  # now the first block is free again
    assert not np.shares_memory(c, b)


def test_small_results_and_a_zero_cap_bypass_the_cache(result_cache):
    small = _memory.result_empty((4, 4), np.float32)
    assert small.flags.owndata
    _memory.set_result_cache(0)
    a = _memory.result_empty(BIG, np.float32)
    del a
    gc.collect()
    assert _memory._dropped == []


def test_the_cache_never_holds_more_than_its_cap(result_cache):
    _memory.set_result_cache(5 << 20)  # room for two 2 MiB blocks, not three
    blocks = [_memory.result_empty(BIG, np.float32) for _ in range(3)]
    addresses = [b.ctypes.data for b in blocks]
    while blocks:  # dropped in order: 0, 1, 2
        blocks.pop(0)
    gc.collect()
    assert sum(b.nbytes for _, b in _memory._dropped) <= 5 << 20
    assert len(_memory._dropped) == 2
    again = [_memory.result_empty(BIG, np.float32) for _ in range(2)]
    assert {a.ctypes.data for a in again} == set(addresses[1:])  # the oldest dropped went first
    _memory.set_result_cache(1 << 20)  # lowering the cap gives back what is over it
    assert _memory._dropped_bytes <= 1 << 20


@pytest.mark.parametrize("bad", [-1, 1.5, True, "1"])
def test_the_cap_must_be_a_non_negative_int(bad):
    with pytest.raises(ValueError, match="max_bytes"):
        _memory.set_result_cache(bad)


def test_a_kept_view_of_an_earlier_result_is_never_overwritten(result_cache, rng):
    """End to end: a result dropped but for a view keeps its values while later calls of
    the same shape run, and the next results are right."""
    x = rng.standard_normal((1, 8, 8, 8, 32)).astype(np.float32)
    w = rng.standard_normal((32, 2, 2, 2, 32)).astype(np.float32)
    first = ct.conv_transpose3d(x, w, stride=2)
    assert first.nbytes >= _memory.RECYCLE_FROM_BYTES
    want = first.copy()
    view = first[0, ::2]
    del first
    for scale in (2.0, -1.0):
        y = ct.conv_transpose3d(x * scale, w, stride=2)
        np.testing.assert_array_equal(y, want * scale)
        del y
        gc.collect()
    np.testing.assert_array_equal(view, want[0, ::2])
    gx, gw = ct.conv_transpose3d_vjp(x, w, want, stride=2)
    del gx, gw
    gc.collect()
    gx2, gw2 = ct.conv_transpose3d_vjp(x, w, want, stride=2)
    gx3, gw3 = ct.conv_transpose3d_vjp(x, w, want, stride=2)
    np.testing.assert_array_equal(gx2, gx3)
    np.testing.assert_array_equal(gw2, gw3)
