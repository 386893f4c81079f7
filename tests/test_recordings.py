"""Recorded native calls (`_execute._Recording`): a plan's tasks prepared once, run again
by later calls at their own arrays' addresses. Each layer runs three times on fresh
arrays, against the reference; a recording must hold none of a call's arrays, and arrays
that overlap are never recorded."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from reference import conv_transpose_ref

import convtranspose as ct
from convtranspose import _execute
from convtranspose import _native_kernel as native

# (input shape, weight shape, settings, algorithm): CHANNELS mode over many phases and
# merged W phases, dot mode, depthwise, a channel multiplier, fused W taps, planar, cols
LAYERS = [
    ((1, 5, 5, 6, 32), (13, 5, 5, 5, 32), dict(stride=(4, 3, 4), output_padding=(2, 1, 1)),
     "native"),
    ((2, 6, 7, 8, 24), (32, 4, 4, 4, 24), dict(stride=2, padding=1), "native"),
    ((2, 6, 7, 9, 48), (2, 3, 3, 3, 48), dict(stride=2), "native"),
    ((1, 6, 7, 9, 8), (8, 3, 3, 3, 1), dict(stride=2, groups=8), "native"),
    ((1, 6, 7, 9, 4), (8, 3, 3, 3, 1), dict(stride=(1, 2, 2), groups=4), "native"),
    ((2, 5, 6, 9, 3), (24, 3, 3, 4, 3), dict(stride=(2, 2, 2), padding=1), "native"),
    ((2, 5, 6, 30, 4), (3, 3, 3, 3, 4), dict(padding=1), "planar"),
    ((1, 4, 5, 6, 64), (3, 3, 3, 3, 64), dict(stride=2, dilation=(1, 2, 1)), "cols"),
    ((1, 4, 5, 6, 16), (24, 2, 3, 3, 8), dict(stride=(1, 2, 3), groups=2), "native"),
]


def _fresh(rng, shape, dtype=np.float32):
    return rng.standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("layer", LAYERS, ids=[f"{a}-{i}" for i, (*_, a) in enumerate(LAYERS)])
def test_later_calls_replay_the_recording_at_their_own_arrays(layer, rng, monkeypatch,
                                                               small_calls_threaded):
    x_shape, w_shape, settings, algorithm = layer
    p = ct.plan(x_shape, w_shape, **settings, algorithm=algorithm, threads=2)
    replays = []
    real = native.run_program
    monkeypatch.setattr(native, "run_program",
                        lambda *a: (replays.append(1), real(*a))[1])
    for call in range(3):
        x, w = _fresh(rng, x_shape), _fresh(rng, w_shape)
        bias = _fresh(rng, (w_shape[0],))
        out = ct.run_plan(p, x, w, bias=bias)
        ref = conv_transpose_ref(x, w, **settings) + bias
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max(),
                                   err_msg=f"call {call}")
    assert len(replays) == 2  # the first call records, the others replay


def test_a_layout_of_its_own_is_recorded_apart(rng, small_calls_threaded):
    """An input with other strides prepares its own tasks (not the contiguous one's)."""
    p = ct.plan((1, 5, 6, 7, 16), (24, 3, 3, 3, 16), stride=2, algorithm="native", threads=2)
    w = _fresh(rng, (24, 3, 3, 3, 16))
    for x in (_fresh(rng, (1, 5, 6, 7, 16)), _fresh(rng, (1, 5, 6, 7, 32))[..., ::2],
              _fresh(rng, (1, 5, 6, 7, 16)), _fresh(rng, (1, 5, 6, 14, 16))[:, :, :, ::2]):
        out = ct.run_plan(p, x, w)
        ref = conv_transpose_ref(x, w, stride=2)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_a_recording_holds_no_array_of_a_call(rng, small_calls_threaded):
    p = ct.plan((1, 5, 5, 6, 32), (13, 5, 5, 5, 32), stride=(4, 3, 4), algorithm="native",
                threads=2)
    x, w = _fresh(rng, (1, 5, 5, 6, 32)), _fresh(rng, (13, 5, 5, 5, 32))
    for _ in range(2):
        out = ct.run_plan(p, x, w, bias=_fresh(rng, (13,)))
    held = [weakref.ref(a) for a in (x, w, out)]
    del x, w, out
    gc.collect()
    assert all(r() is None for r in held)
    assert any(r.plan is p for r in _execute._Recording._held.values())


def test_overlapping_arrays_are_not_recorded(rng, monkeypatch, small_calls_threaded):
    """The input and weight as interleaved views of one buffer: an address in it would not
    say which one it points into, so each call prepares its own tasks."""
    x_shape, w_shape = (1, 4, 5, 6, 16), (24, 3, 3, 3, 16)
    p = ct.plan(x_shape, w_shape, stride=2, algorithm="native", threads=2)
    replays = []
    monkeypatch.setattr(native, "run_program", lambda *a: replays.append(1))
    n_x, n_w = int(np.prod(x_shape)), int(np.prod(w_shape))
    assert n_w > n_x
    for _ in range(2):
        # pixel by pixel (channels contiguous, read in place): x's, then w's
        buffer = _fresh(rng, (n_w // 16, 2, 16))
        x, w = buffer[:n_x // 16, 0].reshape(x_shape), buffer[:, 1].reshape(w_shape)
        assert native.reads_in_place(x, np.float32) and not np.shares_memory(x, w)
        out = ct.run_plan(p, x, w)
        ref = conv_transpose_ref(x, w, stride=2)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
    assert not replays
