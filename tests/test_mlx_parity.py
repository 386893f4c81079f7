"""Ours against mlx.core.conv_transpose1d/2d/3d, the owner of the semantics.

Values, output shapes and result dtypes are compared over the settings grid, random
combinations of settings, every dtype MLX computes on the CPU, and mixed-dtype promotion.

What MLX cannot do on the CPU is checked as a fact where it matters, then worked around:
- groups in 3-D: compared against MLX run group by group (the definition of groups) and, in
  tests/test_torch_parity.py, against PyTorch;
- float64: MLX 0.32 convolves float64 on some paths (stride 1), but only to float32
  accuracy (its values are float32 numbers), and refuses others ("unsupported data type");
  we compare with float32's tolerance, against MLX's float64 result where it has one and its
  float32 result on the same values where it refuses, while our result stays float64 (and
  tests/test_reference.py holds it to float64 accuracy);
- MLX lowers conv_transpose to a convolution of the stride-dilated input padded by
  lo = dilation*(k-1) - padding and hi = lo + output_padding per axis. Where lo or hi is
  negative (padding > dilation*(k-1), or output_padding < padding - dilation*(k-1)), MLX
  either raises or returns an output whose length disagrees with its own output-size
  formula. There the definition (o = i*stride + k*dilation - padding, docs/NUMPY_USERS.md)
  is the one we follow and tests/test_reference.py checks it; MLX is compared only where it
  follows its formula.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
from reference import Case, all_cases, magnitude_ref, out_size, reaches_output

import convtranspose as ct

FUNCS = {1: ct.conv_transpose1d, 2: ct.conv_transpose2d, 3: ct.conv_transpose3d}
MLX_DTYPES = ["float16", "bfloat16", "float32"]
ALL_DTYPES = ["float16", "bfloat16", "float32", "float64"]



def mlx_follows_definition(case: Case) -> bool:
    """False where MLX's lowering pads by a negative amount (see the module docstring)."""
    for k, p, d, op in zip(case.kernel, case.per_axis("padding"), case.per_axis("dilation"),
                           case.per_axis("output_padding")):
        lo = d * (k - 1) - p
        if lo < 0 or lo + op < 0:
            return False
    return True


CASES = all_cases()
MLX_CASES = [c for c in CASES if mlx_follows_definition(c)
             and not (c.ndim == 3 and c.groups > 1)]
DIVERGENT = [c for c in CASES if not mlx_follows_definition(c)]
GROUPED_3D = [c for c in CASES if c.ndim == 3 and c.groups > 1 and mlx_follows_definition(c)]


def _operands(case: Case, rng, random_array, dtype, weight_dtype=None):
    return (random_array(rng, case.input_shape, dtype),
            random_array(rng, case.weight_shape, weight_dtype or dtype))


def _random_combinations(count: int, seed: int = 7) -> list[Case]:
    """Random mixes of every setting (negative padding, output_padding >= stride,
    dilation, groups, anisotropic tuples) that give a valid output: combinations the
    hand-written grid does not list."""
    rng = np.random.default_rng(seed)
    cases: list[Case] = []
    while len(cases) < count:
        ndim = int(rng.integers(1, 4))
        groups = int(rng.choice([1, 1, 2, 3])) if ndim < 3 else 1
        cin_g, cout_g = int(rng.integers(1, 4)), int(rng.integers(1, 4))
        in_sp = tuple(int(v) for v in rng.integers(1, 6, ndim))
        kernel = tuple(int(v) for v in rng.integers(1, 5, ndim))
        stride = tuple(int(v) for v in rng.integers(1, 4, ndim))
        padding = tuple(int(v) for v in rng.integers(-2, 3, ndim))
        dilation = tuple(int(v) for v in rng.integers(1, 4, ndim))
        out_pad = tuple(int(v) for v in rng.integers(-1, 4, ndim))
        sizes = [out_size(*a) for a in zip(in_sp, kernel, stride, padding, dilation, out_pad)]
        if min(sizes) < 1:
            continue
        case = Case(f"combo{len(cases)}", int(rng.integers(1, 3)), in_sp, cin_g * groups,
                    cout_g * groups, kernel, stride, padding, dilation, out_pad, groups)
        if not mlx_follows_definition(case) or not reaches_output(case):
            continue
        cases.append(case)
    return cases


COMBOS = _random_combinations(60)


def _check_against_mlx(case, x, w, mlx_conv_transpose, assert_close, tol_dtype=None):
    ours = FUNCS[case.ndim](x, w, **case.kwargs)
    theirs, their_dtype = mlx_conv_transpose(x, w, **case.kwargs)
    assert ours.shape == theirs.shape == case.output_shape, case.id
    assert ours.dtype.name == their_dtype, (case.id, ours.dtype, their_dtype)
    if case.batch:
        assert np.abs(theirs).max() > 0, case.id  # not a comparison of zeros
    assert_close(ours, theirs, tol_dtype or ours.dtype, magnitude_ref(x, w, **case.kwargs),
                 what=f"{case.id} vs MLX")


# ---- the grid and random combinations, every dtype MLX computes --------------------------

@pytest.mark.parametrize("dtype", MLX_DTYPES)
@pytest.mark.parametrize("case", MLX_CASES, ids=[c.id for c in MLX_CASES])
def test_grid_matches_mlx(case, dtype, rng, random_array, mlx_conv_transpose, assert_close):
    x, w = _operands(case, rng, random_array, dtype)
    _check_against_mlx(case, x, w, mlx_conv_transpose, assert_close)


@pytest.mark.parametrize("dtype", MLX_DTYPES)
@pytest.mark.parametrize("case", COMBOS, ids=[c.id for c in COMBOS])
def test_random_combinations_match_mlx(case, dtype, rng, random_array, mlx_conv_transpose,
                                       assert_close):
    x, w = _operands(case, rng, random_array, dtype)
    _check_against_mlx(case, x, w, mlx_conv_transpose, assert_close)


def test_random_combinations_cover_the_edge_settings():
    # The combinations really mix in what the issue lists, not only the easy cases.
    def any_axis(pred):
        return any(pred(c) for c in COMBOS)
    assert any_axis(lambda c: min(c.per_axis("padding")) < 0)
    assert any_axis(lambda c: any(o >= s for o, s in zip(c.per_axis("output_padding"),
                                                          c.per_axis("stride"))))
    assert any_axis(lambda c: min(c.per_axis("output_padding")) < 0)
    assert any_axis(lambda c: max(c.per_axis("dilation")) > 1)
    assert any_axis(lambda c: c.groups > 1)
    assert {c.ndim for c in COMBOS} == {1, 2, 3}


# ---- where MLX departs from its own output-size formula ---------------------------------

@pytest.mark.parametrize("case", DIVERGENT, ids=[c.id for c in DIVERGENT])
def test_mlx_departs_from_its_formula_where_its_padding_goes_negative(case, rng,
                                                                      random_array,
                                                                      mlx_conv_transpose):
    # A record of MLX 0.32's behaviour, which is why MLX is not compared in this region:
    # it raises, or returns a length that disagrees with
    # out = (in - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1,
    # the formula its documentation gives and we follow (checked against the reference in
    # tests/test_reference.py and, where PyTorch defines the case, against PyTorch).
    x, w = _operands(case, rng, random_array, "float32")
    ours = FUNCS[case.ndim](x, w, **case.kwargs)
    assert ours.shape == case.output_shape
    try:
        theirs, _ = mlx_conv_transpose(x, w, **case.kwargs)
    except ValueError as exc:
        assert "Spatial dimensions of input after padding" in str(exc)
        return
    assert theirs.shape != case.output_shape, "MLX now follows its formula here: widen " \
        "the MLX comparisons to this region"


def test_the_grid_reaches_the_divergent_region():
    assert {c.ndim for c in DIVERGENT} == {1, 2, 3}


# ---- groups in 3-D: MLX refuses them ---------------------------------------------------

def test_mlx_refuses_groups_in_3d():
    x = mx.zeros((1, 3, 3, 3, 4))
    w = mx.zeros((4, 2, 2, 2, 2))
    with pytest.raises(ValueError, match="groups"):
        mx.eval(mx.conv_transpose3d(x, w, groups=2, stream=mx.cpu))


@pytest.mark.parametrize("dtype", MLX_DTYPES)
@pytest.mark.parametrize("case", GROUPED_3D, ids=[c.id for c in GROUPED_3D])
def test_groups_3d_match_mlx_group_by_group(case, dtype, rng, random_array,
                                            mlx_conv_transpose, assert_close):
    # Group g is an ordinary convolution of input channels [g*Cin_g, (g+1)*Cin_g) with
    # weight rows [g*Cout_g, (g+1)*Cout_g): MLX computes each, we compare the concatenation.
    x, w = _operands(case, rng, random_array, dtype)
    ours = ct.conv_transpose3d(x, w, **case.kwargs)
    cin_g, cout_g = case.c_in // case.groups, case.c_out // case.groups
    settings = {k: v for k, v in case.kwargs.items() if k != "groups"}
    parts = [mlx_conv_transpose(x[..., g * cin_g:(g + 1) * cin_g],
                                w[g * cout_g:(g + 1) * cout_g], **settings)[0]
             for g in range(case.groups)]
    theirs = np.concatenate(parts, axis=-1)
    assert ours.shape == theirs.shape == case.output_shape
    assert_close(ours, theirs, dtype, magnitude_ref(x, w, **case.kwargs),
                 what=f"{case.id} vs MLX per group")


# ---- float64 ------------------------------------------------------------------------

F64_FALLBACKS: list[str] = []


def _mlx_float64(case, x64, w64, mlx_conv_transpose, assert_close):
    """Compare our float64 result with MLX's float64 where MLX computes it, else with MLX's
    float32 result on the same values (and float32's tolerance)."""
    ours = FUNCS[case.ndim](x64, w64, **case.kwargs)
    assert ours.dtype == np.float64
    mag = magnitude_ref(x64, w64, **case.kwargs)
    try:
        theirs, their_dtype = mlx_conv_transpose(x64, w64, **case.kwargs)
    except (ValueError, RuntimeError) as exc:
        assert "unsupported data type" in str(exc), exc
        F64_FALLBACKS.append(case.id)
        theirs, their_dtype = mlx_conv_transpose(x64.astype(np.float32),
                                                 w64.astype(np.float32), **case.kwargs)
        assert their_dtype == "float32"
        assert_close(ours, theirs, np.float32, mag, what=f"{case.id} float64 vs MLX float32")
        return
    assert their_dtype == "float64"
    # MLX's float64 path is only float32-accurate (see the module docstring).
    assert_close(ours, theirs, np.float32, mag, what=f"{case.id} float64 vs MLX float64")


@pytest.mark.parametrize("case", MLX_CASES, ids=[c.id for c in MLX_CASES])
def test_float64_matches_mlx(case, rng, random_array, mlx_conv_transpose, assert_close):
    x, w = _operands(case, rng, random_array, "float64")
    _mlx_float64(case, x, w, mlx_conv_transpose, assert_close)


def test_mlx_float64_support_is_what_the_fallback_assumes():
    # Stride 1 runs with a float64 result of float32 accuracy in MLX; stride 2 is refused.
    # If this changes, the float64 comparisons above still hold; this test only keeps the
    # docstring honest.
    rng = np.random.default_rng(3)
    x = mx.array(rng.standard_normal((1, 3, 3, 2)), dtype=mx.float64)
    w = mx.array(rng.standard_normal((2, 2, 2, 2)), dtype=mx.float64)
    y = mx.conv_transpose2d(x, w, stream=mx.cpu)
    mx.eval(y)
    assert y.dtype == mx.float64
    values = np.array(y)
    assert np.array_equal(values, values.astype(np.float32).astype(np.float64))
    with pytest.raises((ValueError, RuntimeError), match="unsupported data type"):
        mx.eval(mx.conv_transpose2d(x, w, stride=2, stream=mx.cpu))


# ---- result dtype promotion -------------------------------------------------------------

def _np_dtype(name: str) -> np.dtype:
    return np.dtype(ml_dtypes.bfloat16) if name == "bfloat16" else np.dtype(name)


PAIRS = [(a, b) for a, b in itertools.product(ALL_DTYPES, repeat=2)]


@pytest.mark.parametrize("x_dtype,w_dtype", PAIRS, ids=[f"{a}-{b}" for a, b in PAIRS])
@pytest.mark.parametrize("ndim", [1, 2, 3])
def test_result_dtype_follows_mlx_promotion(ndim, x_dtype, w_dtype, rng, random_array,
                                            mlx_conv_transpose, assert_close):
    case = Case("promote", 2, (4, 3, 5)[3 - ndim:], 3, 4, (3,) * ndim, stride=2, padding=1)
    x, w = _operands(case, rng, random_array, _np_dtype(x_dtype), _np_dtype(w_dtype))
    ours = FUNCS[ndim](x, w, **case.kwargs)
    if "float64" in (x_dtype, w_dtype):
        # MLX refuses float64 on this strided case: its promotion rule for the operands
        # (the one its convolution applies) decides the dtype, and the values are compared
        # against MLX on the same values.
        promoted = mx.array(0.0, dtype=getattr(mx, x_dtype)) + \
            mx.array(0.0, dtype=getattr(mx, w_dtype))
        assert ours.dtype.name == str(promoted.dtype).removeprefix("mlx.core.")
        _mlx_float64(case, x.astype(np.float64), w.astype(np.float64), mlx_conv_transpose,
                     assert_close)
        return
    _check_against_mlx(case, x, w, mlx_conv_transpose, assert_close)


def test_promotion_examples_from_the_issue():
    x16 = np.zeros((1, 3, 3, 3, 2), np.float16)
    w32 = np.zeros((2, 2, 2, 2, 2), np.float32)
    assert ct.conv_transpose3d(x16, w32).dtype == np.float32
    assert ct.conv_transpose3d(x16.astype(np.float64), w32).dtype == np.float64
