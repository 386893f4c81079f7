"""One test per bad input listed in issue 2: each raises ValueError or TypeError (never a
crash, a hang, an internal error or a giant allocation) with a message that names the
argument, what was expected and what was given."""

from __future__ import annotations

import time
import tracemalloc

import numpy as np
import pytest
from reference import out_size

import convtranspose as ct

FUNCS = {1: ct.conv_transpose1d, 2: ct.conv_transpose2d, 3: ct.conv_transpose3d}
NDIMS = [1, 2, 3]
SETTINGS = ["stride", "padding", "dilation", "output_padding"]


def _ok(ndim, c_in=4, c_out=6, groups=1, k=3, size=5, batch=1):
    """A valid (input, weight) pair to spoil one thing at a time."""
    x = np.ones((batch, *(size,) * ndim, c_in), np.float32)
    w = np.ones((c_out, *(k,) * ndim, c_in // groups), np.float32)
    return x, w


def _message(excinfo) -> str:
    return str(excinfo.value)


def test_the_valid_baseline_runs():
    # Every test below spoils one thing of this call; unspoilt, it runs.
    for ndim in NDIMS:
        x, w = _ok(ndim)
        assert FUNCS[ndim](x, w, stride=2).shape == (1, *(11,) * ndim, 6)


# ---- ranks ----------------------------------------------------------------------------

@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("extra", [-2, 1])  # one fewer is an unbatched input
def test_wrong_input_rank_blames_input(ndim, extra):
    x, w = _ok(ndim)
    x = x.reshape(*x.shape, 1) if extra > 0 else x[0, ..., 0]
    with pytest.raises(ValueError, match=f"'input' must have {ndim + 2} dimensions") as e:
        FUNCS[ndim](x, w)
    assert "'weight'" not in _message(e)  # MLX blames the weight here; we don't
    assert str(x.shape) in _message(e)


@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("extra", [-1, 1])
def test_wrong_weight_rank_blames_weight(ndim, extra):
    x, w = _ok(ndim)
    w = w.reshape(*w.shape, 1) if extra > 0 else w[0]
    with pytest.raises(ValueError, match=f"'weight' must have {ndim + 2} dimensions") as e:
        FUNCS[ndim](x, w)
    assert str(w.shape) in _message(e)


def test_3d_function_on_2d_arrays_names_input():
    x, w = _ok(2)
    with pytest.raises(ValueError, match="conv_transpose3d: 'input'"):
        ct.conv_transpose3d(x, w)


# ---- channels and groups ----------------------------------------------------------------

@pytest.mark.parametrize("ndim", NDIMS)
def test_channel_mismatch(ndim):
    x, _ = _ok(ndim, c_in=4)
    _, w = _ok(ndim, c_in=3)
    with pytest.raises(ValueError, match="channel mismatch") as e:
        FUNCS[ndim](x, w)
    msg = _message(e)
    assert "'input'" in msg and "'weight'" in msg and "C_in=4" in msg and str(w.shape) in msg


def test_channel_mismatch_with_groups():
    x, _ = _ok(2, c_in=4)
    w = np.ones((6, 3, 3, 4), np.float32)  # should end in C_in/groups = 2
    with pytest.raises(ValueError, match=r"channel mismatch.*C_in/groups=2"):
        ct.conv_transpose2d(x, w, groups=2)


@pytest.mark.parametrize("groups", [0, -1, -4])
def test_groups_not_positive(groups):
    x, w = _ok(2)
    with pytest.raises(ValueError, match=rf"'groups' must be >= 1, got {groups}"):
        ct.conv_transpose2d(x, w, groups=groups)


@pytest.mark.parametrize("ndim", NDIMS)
def test_groups_not_dividing_c_in(ndim):
    x, _ = _ok(ndim, c_in=4)
    w = np.ones((6, *(3,) * ndim, 1), np.float32)
    with pytest.raises(ValueError, match=r"'groups'=3 must divide the input channels C_in=4"):
        FUNCS[ndim](x, w, groups=3)


@pytest.mark.parametrize("ndim", NDIMS)
def test_groups_not_dividing_c_out(ndim):
    x, _ = _ok(ndim, c_in=4)
    w = np.ones((5, *(3,) * ndim, 2), np.float32)
    with pytest.raises(ValueError, match=r"'groups'=2 must divide the output channels C_out=5"):
        FUNCS[ndim](x, w, groups=2)


# ---- settings ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["stride", "dilation"])
@pytest.mark.parametrize("value", [0, -1, (1, 0, 2), (2, 2, -3)], ids=str)
def test_stride_and_dilation_not_positive(name, value):
    x, w = _ok(3)
    with pytest.raises(ValueError, match=rf"'{name}' must be >= 1") as e:
        ct.conv_transpose3d(x, w, **{name: value})
    expected = value if isinstance(value, tuple) else (value,) * 3
    assert str(expected) in _message(e)


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("ndim,value", [(1, (1, 1)), (2, (1,)), (2, (1, 1, 1)), (3, (1, 1)),
                                        (3, [1, 1, 1, 1]), (3, ())], ids=str)
def test_tuple_of_wrong_length(name, ndim, value):
    x, w = _ok(ndim)
    with pytest.raises(ValueError, match=rf"'{name}' must be an int or a tuple of {ndim} ints")\
            as e:
        FUNCS[ndim](x, w, **{name: value})
    assert f"{len(value)} entries" in _message(e)


@pytest.mark.parametrize("name", SETTINGS + ["groups"])
@pytest.mark.parametrize("value", [1.0, 2.5, "2", True, False, None, np.float32(1),
                                   np.bool_(True)], ids=repr)
def test_non_integer_setting(name, value):
    x, w = _ok(2)
    # padding takes the strings "same" and "valid": another string is a wrong value.
    error = ValueError if name == "padding" and isinstance(value, str) else TypeError
    with pytest.raises(error, match=rf"'{name}'") as e:
        ct.conv_transpose2d(x, w, **{name: value})
    msg = _message(e)
    assert repr(value) in msg and type(value).__name__ in msg


@pytest.mark.parametrize("name", SETTINGS)
@pytest.mark.parametrize("value", [(1, 2.0), (True, 1), ("1", 1)], ids=str)
def test_non_integer_tuple_entry(name, value):
    x, w = _ok(2)
    with pytest.raises(TypeError, match=rf"'{name}' entries must be ints") as e:
        ct.conv_transpose2d(x, w, **{name: value})
    assert repr(value) in _message(e)


@pytest.mark.parametrize("name, value", [("stride", 1.0), ("stride", True),
                                         ("padding", (1.0, 1)), ("padding", (True, 1)),
                                         ("dilation", np.float64(1)), ("groups", True)],
                         ids=str)
def test_a_repeated_call_still_refuses_lookalike_settings(name, value):
    # The front door keeps the plans of recent calls by their settings, and 1.0 == True == 1
    # as keys: a call that only looks like a kept one must still be refused.
    x, w = _ok(2)
    valid = {"stride": 1, "padding": (1, 1), "dilation": 1, "groups": 1}
    cot = np.ones(ct.output_shape(x.shape, w.shape, **valid), np.float32)
    for _ in range(2):
        ct.conv_transpose2d(x, w, **valid)
        ct.conv_transpose2d_vjp(x, w, cot, **valid)
    with pytest.raises(TypeError, match=rf"'{name}'"):
        ct.conv_transpose2d(x, w, **{**valid, name: value})
    with pytest.raises(TypeError, match=rf"'{name}'"):
        ct.conv_transpose2d_vjp(x, w, cot, **{**valid, name: value})


def test_a_repeated_backward_call_still_checks_its_cotangent():
    # The spec of a repeated call is kept; the cotangent is not part of its key.
    x, w = _ok(3)
    cot = np.ones(ct.output_shape(x.shape, w.shape, stride=2), np.float32)
    for _ in range(2):
        ct.conv_transpose3d_vjp(x, w, cot, stride=2)
    with pytest.raises(ValueError, match="'cotangent'"):
        ct.conv_transpose3d_vjp(x, w, cot[:, 1:], stride=2)
    with pytest.raises(TypeError, match="'cotangent'"):
        ct.conv_transpose3d_vjp(x, w, cot.astype(np.int32), stride=2)


def test_numpy_integers_are_integers():
    # The other side of the line above: np.int64 and friends are ints, not errors.
    x, w = _ok(2)
    out = ct.conv_transpose2d(x, w, stride=np.int64(2), padding=(np.int32(1), 1),
                              groups=np.int16(1))
    np.testing.assert_array_equal(out, ct.conv_transpose2d(x, w, stride=2, padding=1))


# ---- sizes ------------------------------------------------------------------------------

@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("axis", ["kernel", "c_out", "c_in_per_group"])
def test_zero_size_weight(ndim, axis):
    # MLX aborts the whole process on a zero-size kernel; we raise.
    x, w = _ok(ndim)
    shape = list(w.shape)
    shape[{"kernel": 1, "c_out": 0, "c_in_per_group": -1}[axis]] = 0
    w = np.ones(shape, np.float32)
    with pytest.raises(ValueError, match="'weight'") as e:
        FUNCS[ndim](x, w)
    assert str(w.shape) in _message(e)


@pytest.mark.parametrize("ndim", NDIMS)
def test_zero_size_input_spatial_axis(ndim):
    x, w = _ok(ndim)
    x = np.ones((1, *(0,) + (5,) * (ndim - 1), 4), np.float32)
    with pytest.raises(ValueError, match="'input' spatial sizes must be >= 1") as e:
        FUNCS[ndim](x, w)
    assert str(x.shape) in _message(e)


@pytest.mark.parametrize("ndim", NDIMS)
@pytest.mark.parametrize("settings,smallest", [
    # out = (5 - 1) * stride - 2 * padding + (3 - 1) + output_padding + 1 on a 5-long axis, k=3
    ({"padding": 4, "output_padding": 1}, 0),
    ({"padding": 4}, -1),
    ({"stride": 2, "padding": 1, "output_padding": -11}, -2),
    ({"padding": (0, 0, 10)}, -13),
], ids=["zero", "pad4", "op-11", "pad10-last-axis"])
def test_output_size_not_positive(ndim, settings, smallest):
    x, w = _ok(ndim)
    settings = {k: v[-ndim:] if isinstance(v, tuple) else v for k, v in settings.items()}
    with pytest.raises(ValueError, match=r"the output would have spatial size") as e:
        FUNCS[ndim](x, w, **settings)
    msg = _message(e)
    assert "'padding'" in msg and "'output_padding'" in msg  # what to change
    sizes = tuple(out_size(5, 3, s, p, 1, op) for s, p, op in zip(
        *(_axes(settings.get(n, d), ndim) for n, d in
          (("stride", 1), ("padding", 0), ("output_padding", 0)))))
    assert min(sizes) == smallest
    assert f"spatial size {sizes}" in msg  # what was given


def _axes(value, ndim):
    return value if isinstance(value, tuple) else (value,) * ndim


# ---- operands that are not floating arrays ----------------------------------------------

BAD_OPERANDS = {
    "int32": np.ones((1, 4, 4, 2), np.int32),
    "int64": np.ones((1, 4, 4, 2), np.int64),
    "uint8": np.ones((1, 4, 4, 2), np.uint8),
    "bool": np.ones((1, 4, 4, 2), bool),
    "complex64": np.ones((1, 4, 4, 2), np.complex64),
    "complex128": np.ones((1, 4, 4, 2), np.complex128),
    "object": np.ones((1, 4, 4, 2), object),
    "str": np.full((1, 4, 4, 2), "a"),
    "int-list": [[[[1, 2]] * 4] * 4],
}


@pytest.mark.parametrize("which", ["input", "weight"])
@pytest.mark.parametrize("kind", list(BAD_OPERANDS))
def test_non_floating_operand(which, kind):
    good = np.ones((1, 4, 4, 2), np.float32)
    bad = BAD_OPERANDS[kind]
    args = (bad, good) if which == "input" else (good, bad)
    with pytest.raises(TypeError, match=rf"'{which}' must have a floating dtype") as e:
        ct.conv_transpose2d(*args)
    assert np.asarray(bad).dtype.name in _message(e)
    assert "float32" in _message(e)  # what would be accepted


@pytest.mark.parametrize("which", ["input", "weight"])
def test_none_operand(which):
    good = np.ones((1, 4, 4, 2), np.float32)
    args = (None, good) if which == "input" else (good, None)
    with pytest.raises(TypeError, match=rf"'{which}' must be an array, got None"):
        ct.conv_transpose2d(*args)


@pytest.mark.parametrize("which", ["input", "weight"])
def test_ragged_list(which):
    good = np.ones((1, 2, 2), np.float32)
    ragged = [[[1.0, 2.0], [3.0, 4.0]], [[1.0, 2.0]]]
    args = (ragged, good) if which == "input" else (good, ragged)
    with pytest.raises((TypeError, ValueError), match=rf"'{which}'.*ragged"):
        ct.conv_transpose1d(*args)


def test_empty_list():
    with pytest.raises(ValueError, match="'input' must have 3 dimensions"):
        ct.conv_transpose1d([], np.ones((1, 1, 1), np.float32))


# ---- outputs too large to allocate ----------------------------------------------------

def _huge_input() -> np.ndarray:
    # 10**15 elements that take no memory: every element is the same zero.
    return np.broadcast_to(np.zeros((), np.float32), (1, 100000, 100000, 100000, 1))


@pytest.mark.parametrize("how", ["call", "output_shape", "plan", "huge-channels"])
def test_output_too_large_is_refused_before_allocating(how):
    w = np.ones((1, 1, 1, 1, 1), np.float32)
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(ValueError, match="would take") as e:
            if how == "call":
                ct.conv_transpose3d(_huge_input(), w, stride=2)
            elif how == "output_shape":
                ct.output_shape((1, 100000, 100000, 100000, 1), (1, 1, 1, 1, 1), stride=2)
            elif how == "plan":
                ct.plan((1, 100000, 100000, 100000, 1), (1, 1, 1, 1, 1), stride=2)
            else:
                wide = np.broadcast_to(np.zeros((), np.float32), (10**9, 2, 2, 2, 1))
                ct.conv_transpose3d(np.ones((1, 8, 8, 8, 1), np.float32), wide, stride=2)
        elapsed = time.perf_counter() - start
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    msg = _message(e)
    # The message carries the size, in shape and in bytes.
    assert "GiB" in msg
    if how == "huge-channels":
        assert "(1, 16, 16, 16, 1000000000)" in msg
    else:
        assert "(1, 199999, 199999, 199999, 1)" in msg
    # Nothing big was allocated, and it did not compute first and fail later: a generous
    # bound that only a hang or a real computation would break.
    assert peak < 64 * 2**20, peak
    assert elapsed < 10, elapsed


# ---- the helpers' own arguments ---------------------------------------------------------

@pytest.mark.parametrize("fn", [ct.output_shape, ct.plan])
@pytest.mark.parametrize("shape", [(4,), (1, 2, 3, 4, 5, 6), ()], ids=str)
def test_output_shape_and_plan_name_input_shape(fn, shape):
    with pytest.raises(ValueError, match="'input_shape' must have 3, 4 or 5 entries"):
        fn(shape, (1, 1, 1))


def test_output_shape_validates_like_the_call():
    with pytest.raises(ValueError, match="channel mismatch"):
        ct.output_shape((1, 4, 4, 3), (2, 3, 3, 2))
    with pytest.raises(ValueError, match="'stride' must be >= 1"):
        ct.output_shape((1, 4, 4, 3), (2, 3, 3, 3), stride=(1, 0))
    with pytest.raises(TypeError, match="'padding'"):
        ct.output_shape((1, 4, 4, 3), (2, 3, 3, 3), padding=0.5)


@pytest.mark.parametrize("kwargs,name", [
    ({"algorithm": "fft"}, "algorithm"),
    ({"threads": 0}, "threads"),
    ({"threads": 1.5}, "threads"),
    ({"workspace": -1}, "workspace"),
], ids=["algorithm", "threads0", "threads-float", "workspace-negative"])
def test_plan_options(kwargs, name):
    with pytest.raises(ValueError, match=f"'{name}'"):
        ct.plan((1, 4, 4, 3), (2, 3, 3, 3), **kwargs)
