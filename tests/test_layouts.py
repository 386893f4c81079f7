"""Inputs in every memory layout and container; the result is always a new C-contiguous
ndarray, and the caller's arrays are never modified."""

from __future__ import annotations

import copy

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
import torch
from reference import all_cases, conv_transpose_ref, magnitude_ref

import convtranspose as ct

FUNCS = {1: ct.conv_transpose1d, 2: ct.conv_transpose2d, 3: ct.conv_transpose3d}
SETTINGS = {"stride": (2, 1, 2), "padding": (1, 0, 1), "dilation": (1, 2, 1),
            "output_padding": (1, 0, 0), "groups": 2}


def _flags(a: np.ndarray) -> tuple:
    return (a.flags.c_contiguous, a.flags.f_contiguous, a.flags.writeable, a.strides,
            a.shape, a.dtype)


def _check_result(out, x, w, settings, assert_close, what=""):
    """A new, C-contiguous, writeable ndarray equal to the reference."""
    assert type(out) is np.ndarray, type(out)
    assert out.flags.c_contiguous and out.flags.writeable
    for operand in (x, w):
        if isinstance(operand, np.ndarray):
            assert not np.shares_memory(out, operand)
    xv, wv = np.asarray(x), np.asarray(w)
    ref = conv_transpose_ref(xv, wv, **settings)
    assert_close(out, ref, out.dtype, magnitude_ref(xv, wv, **settings), what=what)


def _base(rng, random_array, dtype=np.float32):
    """A larger array to cut views from: (N, D, H, W, C) with room on every axis."""
    return (random_array(rng, (4, 5, 6, 7, 8), dtype),
            random_array(rng, (6, 3, 2, 3, 4), dtype))


VIEWS = {
    "batch-slice": lambda a: a[1:3],
    "spatial-steps": lambda a: a[:, ::2, 1::2, 1:6, :],
    "negative-strides": lambda a: a[::-1, :, ::-1, ::-2, :],
    "fortran-order": lambda a: np.asfortranarray(a),
    "channel-slice": lambda a: a[..., 2:6],
    "channel-steps": lambda a: a[..., ::2],
    "channels-first-storage": lambda a: np.moveaxis(np.ascontiguousarray(
        np.moveaxis(a, -1, 1)), 1, -1),
    "broadcast-zero-stride": lambda a: np.broadcast_to(a[:1, :1, :, :, :4], (3, 4, 6, 7, 4)),
    "read-only": lambda a: _read_only(a[:2, :, :, :, :4]),
}


def _read_only(a):
    a = a.copy()
    a.flags.writeable = False
    return a


@pytest.mark.parametrize("view", list(VIEWS), ids=list(VIEWS))
def test_input_views(view, rng, random_array, assert_close):
    big, w = _base(rng, random_array)
    x = VIEWS[view](big)
    c_in = x.shape[-1]
    w = w[..., : c_in // 2]
    before_x, before_big, flags_x = x.copy(), big.copy(), _flags(x)
    out = ct.conv_transpose3d(x, w, **SETTINGS)
    _check_result(out, x, w, SETTINGS, assert_close, what=view)
    # The same values held contiguously give the same result.
    assert_close(out, ct.conv_transpose3d(np.ascontiguousarray(x), w, **SETTINGS),
                 np.float32)
    np.testing.assert_array_equal(x, before_x)
    np.testing.assert_array_equal(big, before_big)
    assert _flags(x) == flags_x


WEIGHT_VIEWS = {
    "flipped-kernel": lambda w: w[:, ::-1, :, ::-1, :],
    "fortran-order": lambda w: np.asfortranarray(w),
    "out-channel-steps": lambda w: np.concatenate([w, w])[::2],
    "from-torch-layout": lambda w: np.ascontiguousarray(
        w.transpose(4, 0, 1, 2, 3)).transpose(1, 2, 3, 4, 0),
    "in-channel-slice": lambda w: np.concatenate([w, w], axis=-1)[..., 1:5],
}


@pytest.mark.parametrize("view", list(WEIGHT_VIEWS), ids=list(WEIGHT_VIEWS))
def test_non_contiguous_weights(view, rng, random_array, assert_close):
    big, w0 = _base(rng, random_array)
    x = big[:2]
    w = WEIGHT_VIEWS[view](w0)
    assert w.shape == w0.shape
    assert not w.flags.c_contiguous or view == "in-channel-slice" and not w.flags.owndata
    before, flags = w.copy(), _flags(w)
    out = ct.conv_transpose3d(x, w, **SETTINGS)
    _check_result(out, x, w, SETTINGS, assert_close, what=view)
    np.testing.assert_array_equal(w, before)
    assert _flags(w) == flags


@pytest.mark.parametrize("case", [c for c in all_cases() if c.name in
                                  ("k3s2p1op1", "aniso-grouped", "depthwise", "negpad-1")],
                         ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_every_dtype_and_rank_with_strided_views(case, dtype, rng, random_array,
                                                 assert_close):
    # Operands cut as negative-stride, every-other-element views of bigger arrays.
    xb = random_array(rng, tuple(2 * n + 1 for n in case.input_shape), dtype)
    wb = random_array(rng, tuple(2 * n for n in case.weight_shape), dtype)
    sl = tuple(slice(2 * n - 1 if n else 0, None, -2) if n else slice(0, 0)
               for n in case.input_shape)
    x = xb[sl]
    w = wb[tuple(slice(None, None, 2) for _ in case.weight_shape)]
    assert x.shape == case.input_shape and w.shape == case.weight_shape
    xc, wc = xb.copy(), wb.copy()
    out = FUNCS[case.ndim](x, w, **case.kwargs)
    assert out.dtype == np.dtype(dtype) and out.shape == case.output_shape
    _check_result(out, x, w, case.kwargs, assert_close, what=case.id)
    np.testing.assert_array_equal(xb, xc)
    np.testing.assert_array_equal(wb, wc)


def test_lists(rng, random_array, assert_close):
    x = random_array(rng, (2, 4, 3), np.float64)
    w = random_array(rng, (4, 3, 3), np.float64)
    xl, wl = x.tolist(), w.tolist()
    xl_copy, wl_copy = copy.deepcopy(xl), copy.deepcopy(wl)
    out = ct.conv_transpose1d(xl, wl, stride=2, padding=1)
    assert out.dtype == np.float64  # Python floats are float64
    _check_result(out, x, w, {"stride": 2, "padding": 1}, assert_close, what="lists")
    assert xl == xl_copy and wl == wl_copy
    # A tuple of tuples too, mixed with an array.
    out2 = ct.conv_transpose1d(tuple(map(tuple, x[0][None].tolist())), w, stride=2, padding=1)
    np.testing.assert_array_equal(out2, out[:1])


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_mlx_arrays(dtype, rng, random_array, assert_close):
    x = random_array(rng, (2, 3, 4, 5, 4), dtype)
    w = random_array(rng, (6, 3, 3, 2, 2), dtype)
    xm, wm = mx.array(x), mx.array(w)
    out = ct.conv_transpose3d(xm, wm, stride=2, padding=1, groups=2)
    assert type(out) is np.ndarray and out.dtype == np.dtype(dtype)
    _check_result(out, x, w, {"stride": 2, "padding": 1, "groups": 2}, assert_close)
    np.testing.assert_array_equal(np.array(xm), x)
    np.testing.assert_array_equal(np.array(wm), w)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32,
                                   torch.float64])
def test_cpu_torch_tensors(dtype, rng, random_array, assert_close):
    x = random_array(rng, (2, 6, 5, 4), np.float64)
    w = random_array(rng, (3, 2, 3, 4), np.float64)
    xt = torch.from_numpy(x).to(dtype)
    wt = torch.from_numpy(w).to(dtype)
    # A non-contiguous tensor: a channels-last view of channels-first storage.
    xt = xt.permute(0, 3, 1, 2).contiguous().permute(0, 2, 3, 1)
    assert not xt.is_contiguous()
    x_before, w_before = xt.clone(), wt.clone()
    out = ct.conv_transpose2d(xt, wt, stride=(2, 3), output_padding=(1, 2))
    assert type(out) is np.ndarray
    name = str(dtype).removeprefix("torch.")
    assert out.dtype.name == name
    as_np = {"bfloat16": lambda t: t.float().numpy().astype(ml_dtypes.bfloat16)}.get(
        name, lambda t: t.numpy())
    _check_result(out, as_np(xt), as_np(wt), {"stride": (2, 3), "output_padding": (1, 2)},
                  assert_close)
    assert torch.equal(xt, x_before) and torch.equal(wt, w_before)


def test_torch_tensors_that_require_grad(rng, random_array, assert_close):
    x = torch.from_numpy(random_array(rng, (1, 5, 3), np.float32)).requires_grad_()
    w = torch.from_numpy(random_array(rng, (2, 3, 3), np.float32)).requires_grad_()
    out = ct.conv_transpose1d(x, w, stride=2)
    assert type(out) is np.ndarray and x.grad is None and w.grad is None
    _check_result(out, x.detach().numpy(), w.detach().numpy(), {"stride": 2}, assert_close)


def test_result_is_new_even_for_identity_like_calls(rng, random_array):
    # k = 1, stride 1, one channel: the output equals the input scaled; it must still be
    # a fresh array, never the input (or a view of it) handed back.
    x = random_array(rng, (2, 5, 1), np.float32)
    w = np.ones((1, 1, 1), np.float32)
    out = ct.conv_transpose1d(x, w)
    np.testing.assert_array_equal(out, x)
    assert not np.shares_memory(out, x)
    out[...] = 7
    assert not (x == 7).any()


def test_bfloat16_operands(rng, random_array, assert_close):
    x = random_array(rng, (1, 4, 4, 3), ml_dtypes.bfloat16)
    w = random_array(rng, (2, 3, 3, 3), ml_dtypes.bfloat16)[:, ::-1]
    out = ct.conv_transpose2d(x, w, stride=2)
    assert out.dtype == np.dtype(ml_dtypes.bfloat16) and out.flags.c_contiguous
    _check_result(out, x, w, {"stride": 2}, assert_close)


# ---- N == 0 ---------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_empty_batch(ndim, dtype, random_array, rng):
    x = np.zeros((0, *(4,) * ndim, 4), np.dtype(dtype))
    w = random_array(rng, (6, *(3,) * ndim, 2), dtype)
    settings = {"stride": 2, "padding": 1, "output_padding": 1, "groups": 2}
    out = FUNCS[ndim](x, w, **settings)
    assert out.shape == (0, *(8,) * ndim, 6)
    assert out.shape == ct.output_shape(x.shape, w.shape, **settings)
    assert out.dtype == np.dtype(dtype) and out.flags.c_contiguous
    # A view with a zero-length batch taken from a real array behaves the same.
    xv = random_array(rng, (3, *(4,) * ndim, 4), dtype)[3:]
    assert FUNCS[ndim](xv, w, **settings).shape == out.shape


# ---- stream ---------------------------------------------------------------------------

@pytest.mark.parametrize("stream", [None, "cpu"])
def test_stream_accepted(stream, rng, random_array):
    x = random_array(rng, (1, 3, 3, 2), np.float32)
    w = random_array(rng, (2, 2, 2, 2), np.float32)
    np.testing.assert_array_equal(ct.conv_transpose2d(x, w, stream=stream),
                                  ct.conv_transpose2d(x, w))


@pytest.mark.parametrize("stream", ["gpu", "cuda", 0, 1.5, object(), mx.gpu],
                         ids=["gpu", "cuda", "int", "float", "object", "mx.gpu"])
def test_stream_refused(stream):
    x = np.zeros((1, 3, 3, 3, 2), np.float32)
    w = np.zeros((2, 2, 2, 2, 2), np.float32)
    with pytest.raises(ValueError, match=r"'stream' must be None or 'cpu'"):
        ct.conv_transpose3d(x, w, stream=stream)


# ---- output_shape ---------------------------------------------------------------------

@pytest.mark.parametrize("case", all_cases(), ids=lambda c: c.id)
def test_output_shape_equals_the_computed_shape(case, rng, random_array):
    shape = ct.output_shape(case.input_shape, case.weight_shape, **case.kwargs)
    assert isinstance(shape, tuple) and all(type(n) is int for n in shape)
    out = FUNCS[case.ndim](random_array(rng, case.input_shape, np.float32),
                           random_array(rng, case.weight_shape, np.float32), **case.kwargs)
    assert out.shape == shape == case.output_shape
    assert ct.plan(case.input_shape, case.weight_shape, **case.kwargs).spec.output_shape \
        == shape
