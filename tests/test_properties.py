"""Hypothesis property tests over random small shapes and settings."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reference import Case, conv_transpose_pads_ref, conv_transpose_ref, magnitude_ref

import convtranspose as ct

FUNCS = {1: ct.conv_transpose1d, 2: ct.conv_transpose2d, 3: ct.conv_transpose3d}
VJPS = {1: ct.conv_transpose1d_vjp, 2: ct.conv_transpose2d_vjp, 3: ct.conv_transpose3d_vjp}
PROFILE = settings(max_examples=60, deadline=None,
                   suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def _setting(draw, values: st.SearchStrategy, ndim: int):
    """An int for every axis, or a tuple of one value per axis (both forms are API)."""
    per_axis = draw(st.lists(values, min_size=ndim, max_size=ndim))
    if draw(st.booleans()) and len(set(per_axis)) == 1:
        return per_axis[0]
    return tuple(per_axis)


@st.composite
def raw_cases(draw, ndims=(1, 2, 3)) -> Case:
    """Random shapes and settings, valid or not (output sizes may be <= 0)."""
    ndim = draw(st.sampled_from(ndims))
    groups = draw(st.integers(1, 3))
    cin_g, cout_g = draw(st.integers(1, 3)), draw(st.integers(1, 3))
    kmax = 4 if ndim < 3 else 3
    in_sp = tuple(draw(st.lists(st.integers(1, 5), min_size=ndim, max_size=ndim)))
    kernel = tuple(draw(st.lists(st.integers(1, kmax), min_size=ndim, max_size=ndim)))
    return Case(
        "hyp", draw(st.integers(0, 2)), in_sp, cin_g * groups, cout_g * groups, kernel,
        stride=_setting(draw, st.integers(1, 3), ndim),
        padding=_setting(draw, st.integers(-2, 3), ndim),
        dilation=_setting(draw, st.integers(1, 3), ndim),
        output_padding=_setting(draw, st.integers(-1, 3), ndim),
        groups=groups)


def _valid(case: Case) -> bool:
    return min(case.out_spatial) >= 1


def _small(case: Case) -> bool:
    # Keeps the slow reference fast: (input positions) x (taps) x (groups) loop iterations.
    return math.prod(case.in_spatial) * math.prod(case.kernel) * case.groups <= 1500


@st.composite
def cases(draw, ndims=(1, 2, 3)) -> Case:
    case = draw(raw_cases(ndims))
    assume(_valid(case) and _small(case))
    return case


def _operands(case: Case, seed: int, dtype=np.float64):
    rng = np.random.default_rng(seed)
    return (rng.uniform(-1, 1, case.input_shape).astype(dtype),
            rng.uniform(-1, 1, case.weight_shape).astype(dtype))


seeds = st.integers(0, 2**32 - 1)


@PROFILE
@given(case=cases(), seed=seeds, dtype=st.sampled_from(["float32", "float64"]))
def test_matches_reference(case, seed, dtype, assert_close):
    x, w = _operands(case, seed, dtype)
    out = FUNCS[case.ndim](x, w, **case.kwargs)
    assert out.dtype == np.dtype(dtype)
    assert_close(out, conv_transpose_ref(x, w, **case.kwargs), dtype,
                 magnitude_ref(x, w, **case.kwargs), what=repr(case))


@PROFILE
@given(case=cases(), seed=seeds, a=st.floats(-3, 3), b=st.floats(-3, 3))
def test_linear_in_the_input(case, seed, a, b, assert_close):
    x1, w = _operands(case, seed)
    x2, _ = _operands(case, seed + 1)
    f = FUNCS[case.ndim]
    lhs = f(a * x1 + b * x2, w, **case.kwargs)
    rhs = a * f(x1, w, **case.kwargs) + b * f(x2, w, **case.kwargs)
    mag = (abs(a) * magnitude_ref(x1, w, **case.kwargs)
           + abs(b) * magnitude_ref(x2, w, **case.kwargs))
    assert_close(lhs, rhs, np.float64, mag, what=repr(case))


@PROFILE
@given(case=cases(), seed=seeds, a=st.floats(-3, 3))
def test_linear_in_the_weight(case, seed, a, assert_close):
    x, w1 = _operands(case, seed)
    _, w2 = _operands(case, seed + 1)
    f = FUNCS[case.ndim]
    lhs = f(x, a * w1 + w2, **case.kwargs)
    rhs = a * f(x, w1, **case.kwargs) + f(x, w2, **case.kwargs)
    mag = abs(a) * magnitude_ref(x, w1, **case.kwargs) + magnitude_ref(x, w2, **case.kwargs)
    assert_close(lhs, rhs, np.float64, mag, what=repr(case))


@PROFILE
@given(case=raw_cases())
def test_output_shape_agrees_with_the_call(case):
    # Valid or not: output_shape predicts the call's shape, or raises what the call raises.
    assume(math.prod(case.input_shape) * math.prod(case.weight_shape) < 20000)
    x = np.zeros(case.input_shape, np.float32)
    w = np.zeros(case.weight_shape, np.float32)
    try:
        shape = ct.output_shape(case.input_shape, case.weight_shape, **case.kwargs)
    except ValueError as exc:
        assert not _valid(case)
        expected = str(exc).split(": ", 1)[1]
        with pytest.raises(ValueError) as e:
            FUNCS[case.ndim](x, w, **case.kwargs)
        assert str(e.value).split(": ", 1)[1] == expected
        return
    assert _valid(case)
    assert shape == case.output_shape  # the formula, computed independently
    assert FUNCS[case.ndim](x, w, **case.kwargs).shape == shape


def _lift(value, ndim: int, fill: int):
    """A setting of a `ndim` call as the 3-D setting with leading singleton axes."""
    per_axis = value if isinstance(value, tuple) else (value,) * ndim
    return (fill,) * (3 - ndim) + tuple(per_axis)


@PROFILE
@given(case=cases(ndims=(1, 2)), seed=seeds)
def test_lower_rank_call_equals_3d_call_with_singleton_axes(case, seed):
    x, w = _operands(case, seed, np.float32)
    lift = 3 - case.ndim
    x3 = x.reshape(x.shape[0], *(1,) * lift, *x.shape[1:])
    w3 = w.reshape(w.shape[0], *(1,) * lift, *w.shape[1:])
    kw3 = {"stride": _lift(case.stride, case.ndim, 1),
           "padding": _lift(case.padding, case.ndim, 0),
           "dilation": _lift(case.dilation, case.ndim, 1),
           "output_padding": _lift(case.output_padding, case.ndim, 0),
           "groups": case.groups}
    low = FUNCS[case.ndim](x, w, **case.kwargs)
    high = ct.conv_transpose3d(x3, w3, **kw3)
    assert high.shape == (low.shape[0], *(1,) * lift, *low.shape[1:])
    # The same computation: equal to the last bit.
    np.testing.assert_array_equal(high.reshape(low.shape), low)


@PROFILE
@given(case=cases(), seed=seeds)
def test_batch_items_are_independent(case, seed, assert_close):
    assume(case.batch >= 1)
    x, w = _operands(case, seed, np.float32)
    whole = FUNCS[case.ndim](x, w, **case.kwargs)
    for n in range(case.batch):
        alone = FUNCS[case.ndim](x[n:n + 1], w, **case.kwargs)
        assert_close(whole[n:n + 1], alone, np.float32,
                     magnitude_ref(x[n:n + 1], w, **case.kwargs))


@st.composite
def pads_cases(draw):
    """A case with (lo, hi) pads per axis (uneven, negative ones included) or "same", in
    place of its padding and output_padding."""
    case = draw(cases())
    if draw(st.booleans()):
        return case, "same"
    pads = tuple(draw(st.lists(st.tuples(st.integers(-2, 3), st.integers(-2, 3)),
                               min_size=case.ndim, max_size=case.ndim)))
    return case, pads


@PROFILE
@given(drawn=pads_cases(), seed=seeds, unbatched=st.booleans())
def test_pads_and_bias_match_the_crop_reading(drawn, seed, unbatched, assert_close):
    """(lo, hi) pads and "same", with a bias, equal the uncropped result cropped to
    [lo, full - hi) (zeros beyond its ends) plus the bias; an unbatched input gives the
    first item of the batched call; the vjp's grad_bias is the cotangent's sum."""
    case, pads = drawn
    x, w = _operands(case, seed, np.float32)
    b = np.random.default_rng(seed).uniform(-1, 1, case.c_out).astype(np.float32)
    kw = dict(stride=case.stride, dilation=case.dilation, groups=case.groups)
    try:
        spec = ct.plan(case.input_shape, case.weight_shape, padding=pads, **kw).spec
    except ValueError as exc:
        assert "the output would have spatial size" in str(exc)
        return
    lift = 3 - case.ndim
    pairs = list(zip(spec.pad_lo[lift:], spec.pad_hi[lift:]))
    if pads == "same":
        assert spec.output_shape[1:-1] == tuple(
            n * s for n, s in zip(case.in_spatial, case.per_axis("stride")))
    out = FUNCS[case.ndim](x, w, padding=pads, bias=b, **kw)
    expected = conv_transpose_pads_ref(x, w, case.stride, pairs, case.dilation, case.groups,
                                       b)
    assert_close(out, expected, np.float32, what=repr((case, pads)))
    if unbatched and case.batch >= 1:
        alone = FUNCS[case.ndim](x[0], w, padding=pads, bias=b, **kw)
        assert_close(alone, out[0], np.float32)
        g = np.ones(out.shape[1:], np.float32)
        gx, gw, gb = VJPS[case.ndim](x[0], w, g, padding=pads, bias=b, **kw)
        assert gx.shape == x.shape[1:] and gw.shape == w.shape
        np.testing.assert_array_equal(gb, np.full(case.c_out, g[..., 0].size, np.float32))


def test_strategies_reach_the_edges():
    # The property tests are only as good as what they draw: check that the edge settings
    # do come up (a fixed-seed sample, not the tests' own draws).
    from hypothesis import find
    find(cases(), lambda c: min(c.per_axis("padding")) < 0)
    find(cases(), lambda c: min(c.per_axis("output_padding")) < 0)
    find(cases(), lambda c: any(o >= s for o, s in zip(c.per_axis("output_padding"),
                                                       c.per_axis("stride"))))
    find(cases(), lambda c: c.groups > 1 and c.ndim == 3)
    find(cases(), lambda c: c.batch == 0)
    find(raw_cases(), lambda c: not _valid(c))
