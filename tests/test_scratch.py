"""Scratch memory lent from call to call: aligned, never shared between two open lenders,
grown to what a call used, and results that do not depend on what it held before."""

from __future__ import annotations

import threading

import numpy as np

import convtranspose as ct
from convtranspose import _scratch


def test_arrays_are_aligned_disjoint_and_the_buffer_grows_to_fit():
    with _scratch.Scratch() as s:
        first = s.empty(1000, np.float32)
        second = s.empty(333, np.float64)
        third = s.empty(5, np.float32)
    for a in (first, second, third):
        assert a.ctypes.data % 64 == 0
    spans = sorted((a.ctypes.data, a.ctypes.data + a.nbytes) for a in (first, second, third))
    assert all(end <= start for (_, end), (start, _) in zip(spans, spans[1:]))
    with _scratch.Scratch() as s:  # the returned buffer now holds such a call whole
        again = [s.empty(1000, np.float32), s.empty(333, np.float64)]
        assert all(np.shares_memory(a, s._buffer) for a in again)


def test_two_open_scratches_never_share_memory():
    with _scratch.Scratch() as a, _scratch.Scratch() as b:
        x, y = a.empty(4096, np.float32), b.empty(4096, np.float32)
        assert not np.shares_memory(x, y)


def test_nothing_past_the_retention_cap_is_kept(monkeypatch):
    monkeypatch.setattr(_scratch, "RETAIN_BYTES", 1 << 16)
    monkeypatch.setattr(_scratch, "_free", [])
    with _scratch.Scratch() as s:
        s.empty(1 << 20, np.float32)
    assert all(b.nbytes <= 1 << 16 for b in _scratch._free)


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
