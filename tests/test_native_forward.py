"""The compiled kernel (csrc/), forward: every instruction set this CPU has, against the
float64 reference, over the settings grid and over the shapes that exercise its register
blocks, remainders, channel chunks, modes (channels, dot, depthwise), half-precision
rounding, streamed stores and edge handling. CI must build it: these tests fail, not skip,
when the extension is missing. Gradients: test_native_grad.py; conversions and the
binding: test_native_conversions.py; threads and the pool: test_native_threads.py."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from conftest import forget_plans
from reference import all_cases, conv_transpose_ref, magnitude_ref

import convtranspose as ct
from convtranspose import _native_kernel as native
from convtranspose import _plan
from convtranspose._plan import native_mode

CASES = all_cases()


ISAS = native._native.available() if native.AVAILABLE else []


def test_the_kernel_was_built():
    assert native.AVAILABLE, (
        "convtranspose._native is missing: the install could not compile it (needs g++ or "
        "clang++ and Python's headers); the package still runs, slower, without it")
    assert native.isa() in ISAS
    if os.environ.get("CONVTRANSPOSE_ISAS") == "all":  # CI's build: the fallback too
        assert ISAS[-1] == "generic"
    assert ct.native_isa() == native.isa()


def _run_spec(spec, x, w):
    p = ct.plan(x.shape, w.shape, stride=spec.stride, padding=spec.padding,
                dilation=spec.dilation, output_padding=spec.output_padding, groups=spec.groups,
                algorithm="native", dtype=x.dtype)
    return ct.run_plan(p, x, w)


def _run(case, x, w, algorithm="native", **extra):
    p = ct.plan(case.input_shape, case.weight_shape, **case.kwargs, algorithm=algorithm,
                dtype=x.dtype, **extra)
    assert p.algorithm == algorithm
    return ct.run_plan(p, x, w)


def _compiled_algorithms(case, dtype="float32") -> list[str]:
    """native, and planar and cols where they take the layer in `dtype` (planar: few
    outputs per group and per row; cols: at most two vectors of outputs per group, its
    products within the workspace, its GEMM in CHANNELS mode)."""
    taken = ["native"]
    for algorithm in ("planar", "cols"):
        try:
            ct.plan(case.input_shape, case.weight_shape, **case.kwargs, algorithm=algorithm,
                    dtype=dtype)
        except ValueError:
            continue
        taken.append(algorithm)
    return taken


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_grid_every_isa(case, isa, rng, random_array, assert_close):
    for dtype in ("float32", "float64"):
        x = random_array(rng, case.input_shape, dtype)
        w = random_array(rng, case.weight_shape, dtype)
        for algorithm in _compiled_algorithms(case, dtype):
            out = _run(case, x, w, algorithm)
            assert out.dtype == np.dtype(dtype)
            assert_close(out, conv_transpose_ref(x, w, **case.kwargs), dtype,
                         magnitude_ref(x, w, **case.kwargs),
                         what=f"{case.id} {isa} {dtype} {algorithm}")


# Output widths 1..13 cross every remainder of the pixel blocks (6, 8, 12 or 24 wide);
# channel counts cross one to four vectors per chunk, partial vectors and several chunks.
BLOCK_SHAPES = [(wd, co) for wd in (1, 2, 5, 7, 13) for co in (1, 3, 8, 16, 17, 40, 64, 65, 130)]


# Fewer than TAPS_INNER_BELOW input channels: sums kept in registers across taps, with a
# block width picked per row length (whole blocks, masked edge pixels on either side).
TAPS_INNER_SHAPES = [(wd, ci, co) for wd in (1, 5, 12, 17, 33) for ci in (1, 2, 3, 8, 15)
                     for co in (3, 16, 40, 64, 70)]


@pytest.mark.parametrize("width,c_in,c_out", TAPS_INNER_SHAPES,
                         ids=[f"w{a}-ci{b}-co{c}" for a, b, c in TAPS_INNER_SHAPES])
def test_taps_in_registers_for_few_input_channels(width, c_in, c_out, isa, rng, assert_close):
    from reference import Case
    assert c_in < native.TAPS_INNER_BELOW
    case = Case(f"taps-inner-{width}-{c_in}-{c_out}", 1, (2, 3, width), c_in, c_out, (2, 3, 4),
                stride=(1, 2, 2), padding=(0, 1, 2), dilation=(1, 1, 2))
    x = rng.standard_normal(case.input_shape)
    w = rng.standard_normal(case.weight_shape)
    out = _run(case, x, w)
    assert_close(out, conv_transpose_ref(x, w, **case.kwargs), np.float64,
                 magnitude_ref(x, w, **case.kwargs), what=f"{case.id} {isa}")


@pytest.mark.parametrize("width,c_out", BLOCK_SHAPES, ids=[f"w{a}-c{b}" for a, b in BLOCK_SHAPES])
def test_register_blocks_and_remainders(width, c_out, isa, rng, assert_close):
    from reference import Case
    case = Case(f"blocks-{width}-{c_out}", 2, (2, 3, width), 5, c_out, (2, 3, 3), stride=(1, 2, 1),
                padding=(0, 1, 1))
    x = rng.standard_normal(case.input_shape)
    w = rng.standard_normal(case.weight_shape)
    out = _run(case, x, w)
    assert_close(out, conv_transpose_ref(x, w, **case.kwargs), np.float64,
                 magnitude_ref(x, w, **case.kwargs), what=f"{case.id} {isa}")


# One vector of outputs (CHANNELS mode, NV 1) takes every W tap of a row at once where
# the taps lie 1 or 2 input pixels apart (rows_wtaps): rows shorter than its block (24 or
# 22 pixels with 32 registers, 6-12 with 16) keep each tap's blocks; longer ones end on a
# block overlapping the one before; blocks at the row's ends read zeros past them; 70
# channels make two channel blocks at seven taps; 1300 pixels make runs of the row.
WTAPS_CASES = [  # width, c_in, kernel, stride, padding, dilation
    (9, 24, 3, 1, 1, 1), (23, 24, 2, 1, 0, 1), (25, 24, 2, 1, 0, 1), (40, 32, 3, 1, 0, 1),
    (41, 20, 5, 1, 4, 1), (30, 70, 7, 1, 3, 1), (50, 17, 4, 1, 0, 2), (37, 24, 3, 1, 2, 2),
    (33, 18, 4, 2, 1, 1), (29, 24, 7, 2, 0, 2), (1300, 16, 3, 1, 1, 1)]


WTAPS_IDS = ["w{}-ci{}-k{}-s{}-p{}-d{}".format(*c) for c in WTAPS_CASES]


@pytest.mark.parametrize("width,c_in,k,s,p,d", WTAPS_CASES, ids=WTAPS_IDS)
def test_one_vector_of_outputs_takes_every_w_tap_at_once(width, c_in, k, s, p, d, isa, rng,
                                                          assert_close):
    from reference import Case
    assert c_in >= native.TAPS_INNER_BELOW
    tested = 0
    for dtype in ("float32", "float64"):
        lanes = native.layout(np.dtype(dtype).itemsize)[0]
        for c_out in (lanes - 1, lanes):  # one vector, past what dot mode takes
            case = Case(f"wtaps-{width}", 2, (2, width), c_in, c_out, (2, k), stride=(1, s),
                        padding=(1, p), dilation=(1, d))
            plan = ct.plan(case.input_shape, case.weight_shape, **case.kwargs,
                           algorithm="native", dtype=dtype)
            if native_mode(plan.spec) == native.CHANNELS:
                break
        else:
            continue  # (AVX2's float64: four lanes, which dot mode takes)
        tested += 1
        x = rng.standard_normal(case.input_shape).astype(dtype)
        w = rng.standard_normal(case.weight_shape).astype(dtype)
        assert_close(ct.run_plan(plan, x, w), conv_transpose_ref(x, w, **case.kwargs), dtype,
                     magnitude_ref(x, w, **case.kwargs), what=f"{case.id} {isa} {dtype}")
    # (the portable build's vectors of 4 and 2 lanes are dot mode's whole)
    assert tested or native.layout(4)[0] < 8, f"{isa}: no dtype ran one vector in CHANNELS mode"


@pytest.mark.parametrize("width,k,s,d", [(40, 3, 1, 1), (45, 5, 1, 2), (60, 4, 2, 1)])
def test_grad_input_of_one_vector_takes_every_w_tap_at_once(width, k, s, d, isa, rng):
    """grad_input correlates the cotangent (C_out channels in) with the taps the other way
    round: C_in of one vector, C_out past TAPS_INNER_BELOW."""
    for dtype, tol in (("float32", 1e-4), ("float64", 1e-11)):
        lanes = native.layout(np.dtype(dtype).itemsize)[0]
        c_in, c_out = lanes - 1, native.TAPS_INNER_BELOW + 4
        kwargs = dict(stride=(1, s), padding=(0, 1), dilation=(1, d))
        x = rng.standard_normal((2, 3, width, c_in)).astype(dtype)
        w = rng.standard_normal((c_out, 2, k, c_in)).astype(dtype)
        cot = rng.standard_normal(ct.conv_transpose2d(x, w, **kwargs).shape).astype(dtype)
        gx, _ = ct.conv_transpose2d_vjp(x, w, cot, **kwargs)
        # grad_input is the adjoint of the forward (linear in x): <gx, v> = <cot, f(v)>
        for v in rng.standard_normal((3, *x.shape)):
            lhs = np.vdot(gx.astype(np.float64), v)
            rhs = np.vdot(cot.astype(np.float64), conv_transpose_ref(v, w, **kwargs))
            assert abs(lhs - rhs) <= tol * np.sqrt(np.vdot(gx, gx) * np.vdot(v, v)), (
                f"{isa} {dtype} k{k} s{s} d{d}: {lhs} against {rhs}")


def test_strided_channels_and_big_endian_input_are_read_correctly(rng, assert_close):
    # Channels not contiguous, or another byte order: the kernel reads a converted copy.
    base = rng.standard_normal((1, 6, 5, 7, 12)).astype(np.float32)
    w = rng.standard_normal((8, 3, 3, 3, 6)).astype(np.float32)
    strided = base[..., ::2]
    swapped = strided.astype(">f4")
    ref = conv_transpose_ref(strided.astype(np.float64), w.astype(np.float64), stride=2,
                             padding=1)
    mag = magnitude_ref(strided.astype(np.float64), w.astype(np.float64), stride=2, padding=1)
    for x in (strided, swapped):
        before = x.copy()
        p = ct.plan(x.shape, w.shape, stride=2, padding=1, algorithm="native")
        assert_close(ct.run_plan(p, x, w), ref, np.float32, mag, what=str(x.dtype))
        np.testing.assert_array_equal(x, before)  # never writes the caller's array


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_results_round_once(dtype, rng, random_array, assert_close):
    from reference import Case
    case = Case("half", 1, (4, 5, 6), 16, 24, (3, 3, 3), stride=2, padding=1, output_padding=1)
    x = random_array(rng, case.input_shape, dtype)
    w = random_array(rng, case.weight_shape, dtype)
    out = _run(case, x, w)
    assert out.dtype == x.dtype
    assert_close(out, conv_transpose_ref(x, w, **case.kwargs), dtype,
                 magnitude_ref(x, w, **case.kwargs), what=dtype)


def test_kernel_equal_stride_merges_w_residues_into_whole_rows(rng, assert_close):
    # k2s2: both W residues of a (D, H) residue share their taps, so they run as one phase
    # of 2 * C_out channels that writes whole output rows.
    x = rng.standard_normal((2, 3, 4, 5, 6)).astype(np.float32)
    w = rng.standard_normal((7, 2, 2, 2, 6)).astype(np.float32)
    p = ct.plan(x.shape, w.shape, stride=2, algorithm="native")
    assert len(p.phase_groups) == 4 and all(len(g) == 2 for g in p.phase_groups)
    assert [ph.residue[2] for ph in p.phase_groups[0]] == [0, 1]
    ref = conv_transpose_ref(x.astype(np.float64), w.astype(np.float64), stride=2)
    assert_close(ct.run_plan(p, x, w), ref, np.float32, what="k2s2")


# W residues merged in CHANNELS mode with several conv groups: each group's outputs of
# each residue lie C_out apart (`CtJob::oout`). (C_in, C_out, groups, kernel_w, stride_w,
# padding_w, output_padding_w): 6 outputs a group (its groups in one call), 16 (a call
# per group), 40 at stride 2 (80 columns: two chunks, the second starting inside a
# residue's run), 2 input channels a group (taps_inner), rotated residues with edges,
# stride past the kernel (residues without taps: the merged ones' outputs around a gap).
MERGED_GROUP_CASES = [
    (64, 24, 4, 3, 3, 1, 1),
    (32, 32, 2, 2, 2, 0, 0),
    (16, 80, 2, 4, 2, 0, 0),
    (6, 9, 3, 3, 3, 0, 2),
    (12, 20, 2, 6, 3, 2, 1),
    (16, 20, 2, 2, 3, 0, 1),
    (8, 26, 2, 3, 4, 1, 3),
]


@pytest.mark.parametrize("case", MERGED_GROUP_CASES, ids=[str(c) for c in MERGED_GROUP_CASES])
def test_w_residues_merged_across_conv_groups_match_the_reference(case, isa, rng,
                                                                  monkeypatch):
    # CHANNELS mode whatever the rule would pick (dot mode takes few outputs on some
    # instruction sets and dtypes)
    monkeypatch.setattr(_plan, "_native_mode", lambda *args: native.CHANNELS)
    forget_plans()
    c_in, c_out, groups, k, s, p, op = case
    kw = dict(stride=(1, 2, s), padding=(0, 1, p), output_padding=(0, 1, op), groups=groups)
    for dtype in (np.float32, np.float64):
        x = rng.standard_normal((2, 3, 4, 11, c_in)).astype(dtype)
        w = rng.standard_normal((c_out, 2, 3, k, c_in // groups)).astype(dtype)
        bias = rng.standard_normal(c_out).astype(dtype)
        plan = ct.plan(x.shape, w.shape, **kw, algorithm="native")
        assert native_mode(plan.spec) == native.CHANNELS
        assert any(len(g) > 1 for g in plan.phase_groups), "merged"
        _written_once_matches(plan, x, w, conv_transpose_ref(x, w, **kw), bias, monkeypatch,
                              rtol=1e-4 if dtype == np.float32 else 1e-10)
    # float16 outputs, rounded as the kernel stores them
    x16, w16 = x.astype(np.float16), (w / np.sqrt(w[0].size)).astype(np.float16)
    got = ct.conv_transpose3d(x16, w16, **kw)
    ref = conv_transpose_ref(x16.astype(np.float64), w16.astype(np.float64), **kw)
    np.testing.assert_allclose(got, ref, rtol=2e-2, atol=2e-2 * np.abs(ref).max())
    forget_plans()


# Dot mode (vectors along C_in, 1-8 outputs): whole and partial vectors of C_in, every
# block remainder (16 down to 2 pixels wide), groups, the outputs in one register block
# (AVX-512 up to 8) or in chunks (AVX2 and the portable build: 5 as 3 + 2, 6 as 3 + 3);
# short rows in blocks of half the pixels, rows of 40 in whole blocks of 8 to 16.
DOT_SHAPES = [(wd, ci, co, g) for wd in (3, 17, 40) for ci in (8, 16, 21, 40)
              for co in (1, 2, 3, 4, 5, 6, 7, 8) for g in (1, 2)
              if ci % g == 0 and ci // g >= 8 and (wd < 40 or co <= 2)]


@pytest.mark.parametrize("width,c_in,c_out,groups", DOT_SHAPES,
                         ids=[f"w{a}-ci{b}-co{c}-g{d}" for a, b, c, d in DOT_SHAPES])
def test_dot_mode_for_few_outputs(width, c_in, c_out, groups, isa, rng, assert_close):
    from reference import Case

    from convtranspose._plan import dot_max_out
    case = Case("dot", 2, (3, 2, width), c_in, c_out * groups, (3, 2, 4), stride=(2, 1, 2),
                padding=(1, 0, 1), groups=groups)
    # Past dot_max_out (7-8 outputs on AVX2, 5-8 on the portable build) CHANNELS mode
    # takes the layer: checked the same way.
    want = native.DOT if c_out <= dot_max_out(4) else native.CHANNELS
    assert native_mode(ct.plan(case.input_shape, case.weight_shape, **case.kwargs).spec) \
        == want
    _native_with_bias_matches(case, isa, rng, assert_close)


def _native_with_bias_matches(case, isa, rng, assert_close) -> None:
    """`native` on the case, float32 and float64, with a bias, against the reference."""
    x = rng.standard_normal(case.input_shape)
    w = rng.standard_normal(case.weight_shape)
    bias = rng.standard_normal(case.weight_shape[0])
    want = conv_transpose_ref(x, w, **case.kwargs) + bias
    for dtype in (np.float32, np.float64):
        p = ct.plan(case.input_shape, case.weight_shape, **case.kwargs, algorithm="native",
                    dtype=dtype)
        got = ct.run_plan(p, x.astype(dtype), w.astype(dtype), bias=bias.astype(dtype))
        assert_close(got, want, dtype, magnitude_ref(x, w, **case.kwargs) + np.abs(bias),
                     what=f"{case.id} {isa} {np.dtype(dtype)}")


# Dot mode's windows over W taps (forward.hpp's dot_row_window: 1-3 outputs a job, step
# 1, 2-32 W taps whose input offsets are 1 or 2 apart): (kernel_w, stride_w, dilation_w,
# C_out) with groups of 2, 3 and 4 taps (9 as 3 + 3 + 3, 7 as 3 + 4), taps one or two
# input pixels apart (dilation 2 over stride 1 or 3), merged W residues (k4 s2 of one
# output: two a job); each over C_in below a vector, whole vectors and a partial last
# one, rows shorter than a block and longer, windows past both ends of the input.
WINDOW_CASES = [(kw, sw, dw, co) for kw, sw, dw, co in
                [(2, 1, 1, 1), (3, 1, 1, 2), (4, 1, 1, 3), (5, 1, 2, 1), (7, 1, 1, 2),
                 (9, 1, 1, 1), (6, 2, 2, 3), (5, 3, 2, 1), (4, 2, 1, 1), (7, 2, 1, 2)]]


@pytest.mark.parametrize("case", WINDOW_CASES, ids=[str(c) for c in WINDOW_CASES])
@pytest.mark.parametrize("c_in", [12, 16, 21, 40])
def test_dot_mode_windows_over_w_taps(case, c_in, isa, rng, assert_close):
    from reference import Case
    kw, sw, dw, co = case
    for width in (3, 19, 41):
        c = Case("window", 2, (2, 3, width), c_in, co, (2, 2, kw), stride=(1, 2, sw),
                 padding=(0, 1, dw * (kw - 1) // 2), dilation=(1, 1, dw))
        assert native_mode(ct.plan(c.input_shape, c.weight_shape, **c.kwargs).spec) \
            == native.DOT
        _native_with_bias_matches(c, isa, rng, assert_close)


@pytest.mark.parametrize("channels", [16, 64, 70, 3])
def test_depthwise_mode_whole_and_partial_vectors(channels, isa, rng, assert_close):
    from reference import Case
    case = Case("dw", 1, (3, 4, 9), channels, channels, (3, 3, 3), stride=2, padding=1,
                output_padding=1, groups=channels)
    x = rng.standard_normal(case.input_shape).astype(np.float32)
    w = rng.standard_normal(case.weight_shape).astype(np.float32)
    assert_close(_run(case, x, w), conv_transpose_ref(x, w, **case.kwargs), np.float32,
                 magnitude_ref(x, w, **case.kwargs), what=f"{case.id} {isa}")


# Depthwise layers of pixels under 256 bytes, strided along W, merge their W residues
# into one phase group (each position's residues' outputs one run), PHANTOM taps lining
# up residues of unequal taps (k3 s2, k7 s3), rotated where the padding shifts them (k5
# s2 p1), with rows' ends apart; a multiplier (3 channels repeated twice) among them.
# Read in place along the flat index, and, from a view of a wider array (pixels further
# apart than their channels), along the channels. 40 channels of float64 and 70 stay
# apart.
DEPTHWISE_MERGED = [(c, m, k, s, p) for c, m in ((2, 1), (3, 2), (6, 1), (15, 1), (40, 1),
                                                 (70, 1))
                    for k, s, p in ((3, 2, 0), (4, 2, 1), (7, 3, 3), (5, 2, 1))]


@pytest.mark.parametrize("channels,multiplier,k,s,p", DEPTHWISE_MERGED)
def test_depthwise_merges_w_residues(channels, multiplier, k, s, p, isa, rng):
    wide = rng.standard_normal((2, 3, 17, channels + 5))
    w = rng.standard_normal((channels * multiplier, 2, k, 1))
    bias = rng.standard_normal(channels * multiplier)
    kw = dict(stride=(1, s), padding=(0, p), output_padding=(0, s - 1), groups=channels)
    want = conv_transpose_ref(wide[..., :channels], w, **kw) + bias
    for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        plan = ct.plan((2, 3, 17, channels), w.shape, **kw, algorithm="native", dtype=dtype)
        # (with the portable build's narrow vectors a multiplier runs in channels mode)
        if native_mode(plan.spec) == native.DEPTHWISE:
            merged = channels * multiplier * np.dtype(dtype).itemsize < 256
            assert any(len(g) == s for g in plan.phase_groups) == merged, plan.phase_groups
        else:
            assert multiplier > 1 and isa == "generic"
        for x in (np.ascontiguousarray(wide[..., :channels]), wide[..., :channels]):
            got = ct.run_plan(plan, x.astype(dtype, copy=False), w.astype(dtype),
                              bias=bias.astype(dtype))
            scale = np.abs(want).max()
            np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=tol,
                                       err_msg=f"{isa} {np.dtype(dtype)}")


@pytest.mark.parametrize("c_in,c_out,groups", [(8, 13, 1), (6, 6, 6), (2, 4, 2)],
                         ids=["channels", "depthwise", "multiplier"])
def test_phantom_taps_leave_infinities_and_nans_where_they_land(c_in, c_out, groups, rng):
    """A merged phase group's PHANTOM taps weigh zero: times an infinite or NaN input
    they would make NaN at outputs no tap of it reaches. Such inputs run the plan with
    its phases apart (`finite_plan`): infinities and NaNs land where the loops put them."""
    x = rng.standard_normal((1, 2, 3, 21, c_in))
    w = rng.standard_normal((c_out, 3, 3, 3, c_in // groups))
    kw = dict(stride=2, padding=1, groups=groups)
    plan = ct.plan(x.shape, w.shape, **kw, algorithm="native")
    assert plan.phantoms and not _plan.finite_plan(plan).phantoms
    for bad in (np.inf, np.nan):
        x[0, 1, 1, 5, 0] = bad
        with np.errstate(invalid="ignore"):
            want = conv_transpose_ref(x, w, **kw)
            got = ct.run_plan(plan, x, w)
        np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
        np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
        finite = np.isfinite(want)
        np.testing.assert_allclose(got[finite], want[finite], rtol=1e-10, atol=1e-10)


def test_planner_modes():
    def mode(*shapes, **kw):
        p = ct.plan(*shapes, **kw)
        return p.algorithm, native_mode(p.spec)
    wide = mode((1, 16, 32, 32, 64), (64, 3, 3, 3, 64), padding=1)
    assert wide == ("winograd", native.CHANNELS)  # stride-1 D of three taps
    strided = mode((1, 8, 16, 16, 64), (64, 3, 3, 3, 64), stride=2, padding=1)
    assert strided == ("native", native.CHANNELS)
    thin = mode((1, 16, 32, 32, 8), (64, 3, 3, 3, 8), padding=1)
    assert thin[0] == "native"  # too few input channels to pay for the transforms
    head = mode((1, 32, 32, 32, 16), (1, 4, 4, 4, 16), stride=2, padding=1)
    assert head[0] == "planar"  # vectors along the pixels (W6: 3.8 ms, dot mode 5.5)
    dw = mode((1, 32, 32, 32, 64), (64, 3, 3, 3, 1), stride=2, padding=1, groups=64)
    assert dw == ("native", native.DEPTHWISE)
    assert "native" in str(ct.plan((1, 16, 32, 32, 64), (64, 3, 3, 3, 64), padding=1))


# Planar jobs write whole rows: every W residue (their own tap counts, none past the
# kernel when stride_w > kernel_w, no column at all when W_out < stride_w) of every conv
# group, in one pass, with the bias; threads share the rows. 1-8 outputs per group in one
# register block; 10 and 12 in two blocks of 5 and 6.
PLANAR_ROWS = [(kw, sw, groups, cog, width)
               for kw, sw in ((1, 1), (3, 1), (4, 2), (5, 2), (7, 4), (2, 3), (1, 4))
               for groups, cog in ((1, 1), (1, 3), (2, 2), (3, 1), (1, 8), (2, 5), (1, 12),
                                   (1, 10))
               if groups * cog * sw <= native.PLANAR_MAX_ROW
               for width in (1, 9, 37)]


@pytest.mark.parametrize("kw,sw,groups,cog,width", PLANAR_ROWS,
                         ids=[f"k{a}-s{b}-g{c}-co{d}-w{e}" for a, b, c, d, e in PLANAR_ROWS])
def test_planar_writes_rows_whole(kw, sw, groups, cog, width, isa, rng):
    c_in = 2 * groups
    x = rng.standard_normal((2, 3, 4, width, c_in))
    w = rng.standard_normal((groups * cog, 2, 3, kw, 2))
    bias = rng.standard_normal(groups * cog)
    kw_ = dict(stride=(1, 2, sw), padding=(0, 1, kw // 2), output_padding=(0, 1, sw - 1),
               groups=groups)
    want = conv_transpose_ref(x, w, **kw_) + bias
    for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        for threads in (1, 2):
            p = ct.plan(x.shape, w.shape, **kw_, algorithm="planar", threads=threads,
                        dtype=dtype)
            got = ct.run_plan(p, x.astype(dtype), w.astype(dtype), bias=bias.astype(dtype))
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol,
                                       err_msg=f"{isa} {np.dtype(dtype)} {threads} thread(s)")


# A planar copy past the workspace limit is made in slabs of input planes, each read by
# its run of tiles: slabs of one batch item's planes (D strided, dilated, padded past the
# input) and of several whole items, from float16 (each slab converted) and float64, with
# the bias, on one and two threads.
PLANAR_SLABS = [  # (x shape, C_out, kernel, settings, planes a slab may hold)
    ((1, 9, 5, 7, 3), 2, (3, 2, 3), dict(padding=1), 3),
    ((2, 7, 4, 6, 2), 3, (4, 3, 2), dict(stride=(2, 1, 2), dilation=(2, 1, 1)), 5),
    ((1, 11, 3, 5, 4), 4, (5, 3, 3), dict(stride=3, padding=(5, 1, 1), groups=2), 2),
    ((5, 2, 4, 9, 2), 1, (2, 3, 3), dict(stride=(1, 2, 2), output_padding=(0, 1, 1)), 6),
]


@pytest.mark.parametrize("case", range(len(PLANAR_SLABS)))
def test_planar_copy_in_slabs_matches_the_loops(case, rng):
    x_shape, c_out, kernel, kw, planes = PLANAR_SLABS[case]
    groups = kw.get("groups", 1)
    x = rng.standard_normal(x_shape)
    w = rng.standard_normal((c_out, *kernel, x_shape[-1] // groups))
    bias = rng.standard_normal(c_out)
    want = conv_transpose_ref(x, w, **kw) + bias
    several_items = False
    for dtype, tol in ((np.float16, 1e-2), (np.float64, 1e-12)):
        whole = ct.plan(x.shape, w.shape, **kw, algorithm="planar", dtype=dtype)
        assert not whole.input_slabs
        limit = _plan.planar_slab_bytes(whole.spec, planes)
        for threads in (1, 2):
            p = ct.plan(x.shape, w.shape, **kw, algorithm="planar", dtype=dtype,
                        threads=threads, workspace=limit)
            assert len(p.input_slabs) >= 2 and p.workspace_bytes <= limit
            assert max((s.n[1] - s.n[0]) * (s.d[1] - s.d[0]) for s in p.input_slabs) <= planes
            several_items |= any(s.n[1] - s.n[0] > 1 for s in p.input_slabs)
            got = ct.run_plan(p, x.astype(dtype), w.astype(dtype), bias=bias.astype(dtype))
            scale = np.abs(want).max()
            np.testing.assert_allclose(got / scale, want / scale, rtol=0, atol=tol,
                                       err_msg=f"{np.dtype(dtype)} {threads} thread(s)")
    assert several_items == (x_shape[1] < planes)


@pytest.mark.parametrize("c_out,groups,algorithm",
                         [(24, 1, "native"), (2, 1, "native"), (6, 6, "native"),
                          (2, 1, "planar"), (6, 2, "planar")],
                         ids=["channels", "dot", "depthwise", "planar", "planar-grouped"])
def test_float16_results_round_like_numpy(c_out, groups, algorithm, isa, rng):
    # The kernel rounds float32 sums to float16 as it stores them (in hardware, or in
    # software on the portable build): the bits must equal NumPy's rounding of the same
    # float32 result, subnormals, overflow to inf and nan included.
    c_in = 6 if groups > 1 else 16
    x = rng.standard_normal((1, 3, 4, 21, c_in)) * np.logspace(-7, 4.5, 21)[:, None]
    x[0, 1, 2, 5, 0] = np.nan
    with np.errstate(over="ignore"):  # the largest inputs overflow float16: inf is wanted
        x = x.astype(np.float16)
    w = rng.standard_normal((c_out, 3, 3, 3, c_in // groups)).astype(np.float16)
    kw = dict(stride=2, padding=1, groups=groups)
    p16 = ct.plan(x.shape, w.shape, **kw, dtype=np.float16, algorithm=algorithm)
    p32 = ct.plan(x.shape, w.shape, **kw, dtype=np.float32, algorithm=algorithm)
    got = ct.run_plan(p16, x, w)
    with np.errstate(over="ignore"):  # the overflow to inf is part of the check
        want = ct.run_plan(p32, x.astype(np.float32), w.astype(np.float32)).astype(np.float16)
    assert got.dtype == np.float16
    assert np.isinf(want).any() and np.isnan(want).any()
    assert ((want != 0) & (np.abs(want) < np.finfo(np.float16).tiny)).any()  # subnormals
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("c_out,groups,algorithm",
                         [(24, 1, "native"), (2, 1, "native"), (6, 6, "native"),
                          (2, 1, "planar"), (6, 2, "planar")],
                         ids=["channels", "dot", "depthwise", "planar", "planar-grouped"])
def test_bfloat16_results_round_like_ml_dtypes(c_out, groups, algorithm, isa, rng):
    # The kernel rounds float32 sums to bfloat16 as it stores them: the bits must equal
    # ml_dtypes' rounding of the same float32 result (to nearest even, overflow to inf,
    # every nan the quiet nan of its sign).
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = ml_dtypes.bfloat16
    c_in = 6 if groups > 1 else 16
    x = rng.standard_normal((1, 3, 4, 21, c_in)) * np.logspace(-30, 37, 21)[:, None]
    x[0, 1, 2, 5, 0] = np.nan
    x[0, 2, 1, 7, 1] = -np.nan
    x = x.astype(bf16)
    w = rng.standard_normal((c_out, 3, 3, 3, c_in // groups)).astype(bf16) * 8
    kw = dict(stride=2, padding=1, groups=groups)
    p16 = ct.plan(x.shape, w.shape, **kw, dtype=bf16, algorithm=algorithm)
    p32 = ct.plan(x.shape, w.shape, **kw, dtype=np.float32, algorithm=algorithm)
    got = ct.run_plan(p16, x, w)
    with np.errstate(over="ignore", invalid="ignore"):
        want = ct.run_plan(p32, x.astype(np.float32), w.astype(np.float32)).astype(bf16)
    assert got.dtype == bf16
    assert np.isinf(want.astype(np.float32)).any() and np.isnan(want.astype(np.float32)).any()
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


STREAM_SHAPES = [(c_in, c_out, groups) for c_in, c_out, groups in
                 ((8, 16, 1), (8, 64, 1), (6, 17, 1), (3, 40, 1), (8, 48, 2), (16, 130, 1))]


@pytest.mark.parametrize("c_in,c_out,groups", STREAM_SHAPES,
                         ids=[f"ci{a}-co{b}-g{c}" for a, b, c in STREAM_SHAPES])
def test_streamed_outputs_hold_the_same_bits(c_in, c_out, groups, isa, rng, monkeypatch):
    """Outputs past STREAM_OUTPUT_FROM_BYTES leave the kernel by non-temporal stores where
    whole aligned vectors go out, by plain stores elsewhere (partial vectors, odd channel
    counts, float16): with the threshold at 0, every call streams and must give the bits of
    the plain path, forward and grad_input, float32 and float64."""
    from convtranspose import _plan
    from convtranspose._api import spec_for
    from convtranspose._vjp import vjp_arrays
    x = rng.standard_normal((1, 3, 4, 9, c_in))
    w = rng.standard_normal((c_out, 3, 2, 3, c_in // groups))
    kw = dict(stride=(2, 1, 2), padding=(1, 0, 1), groups=groups)
    for dtype in (np.float32, np.float64, np.float16):
        xd, wd = x.astype(dtype), w.astype(dtype)
        spec, _, _ = spec_for(3, xd, wd, **kw)

        def both(spec=spec, xd=xd, wd=wd):
            y = _run_spec(spec, xd, wd)
            return (y, *vjp_arrays(spec, xd, wd, np.cos(y), algorithm="native"))

        plain = both()
        monkeypatch.setattr(_plan, "STREAM_OUTPUT_FROM_BYTES", 0)
        streamed = both()
        monkeypatch.undo()
        for a, b in zip(plain, streamed):
            np.testing.assert_array_equal(a, b)


# Layers whose streamed outputs gather in the kernel's staging rows (forward.hpp's
# OutputStage): (input, weight, settings, algorithm).
STAGED_LAYERS = [
    # conv groups side by side, each 24 outputs: a pixel's 96 outputs one run
    ((2, 30, 21, 8), (96, 3, 3, 2), dict(stride=2, groups=4), "native"),
    # kernel == stride along W merges the residues: whole rows, cut into runs of pixels
    ((3, 1700, 3), (36, 2, 3), dict(stride=2), "native"),
    # stride past the kernel: the residues with taps merged, the tap-less one a gap
    ((2, 4, 9, 7, 5), (20, 1, 2, 2, 5), dict(stride=(1, 2, 3), padding=(0, 0, 1)), "native"),
    # one group, outputs not whole vectors (35 of a pixel's 35)
    ((1, 6, 9, 6, 24), (35, 2, 2, 3, 24), dict(stride=(1, 2, 1), padding=1), "native"),
    # Winograd pairs: each staged row group holds both outputs of a pair
    ((1, 6, 5, 7, 32), (40, 3, 3, 3, 32), dict(padding=1), "winograd"),
]


@pytest.mark.parametrize("layer", STAGED_LAYERS, ids=lambda c: f"{c[1]}-{c[3]}")
def test_staged_streamed_outputs_match_the_plain_stores(layer, isa, rng, monkeypatch,
                                                       assert_close):
    """Streamed outputs that are not whole aligned vectors a pixel (conv groups side by
    side, merged residues, ragged C_out) are staged a run of rows at a time and written
    from there: the bits of the plain stores, and the reference's values, float32 and
    float64, on one thread and on two sharing the rows."""
    x_shape, w_shape, kw, algorithm = layer
    x, w = rng.standard_normal(x_shape), rng.standard_normal(w_shape)
    want = conv_transpose_ref(x, w, **kw)
    for dtype, threads in ((np.float32, 1), (np.float64, 1), (np.float32, 2)):
        xd, wd = x.astype(dtype), w.astype(dtype)
        p = ct.plan(xd.shape, wd.shape, **kw, dtype=dtype, algorithm=algorithm,
                    threads=threads)
        plain = ct.run_plan(p, xd, wd)
        monkeypatch.setattr(_plan, "STREAM_OUTPUT_FROM_BYTES", 0)
        streamed = ct.run_plan(p, xd, wd)
        monkeypatch.undo()
        np.testing.assert_array_equal(streamed, plain)
        assert_close(streamed, want, dtype)


@pytest.mark.parametrize("c_out,groups", [(8, 1), (16, 1), (4, 2), (6, 3), (20, 1)])
def test_indexed_gather_sum_matches_numpy_take_and_reduce(c_out, groups, isa, rng,
                                                          monkeypatch):
    """Small calls sum their gathered products in C (unrolled for 4, 8 and 16 columns, on
    every instruction set) and round half-precision results there; without the extension
    NumPy's take + add.reduce and casts do it, in the same order: same bits."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    x = rng.standard_normal((2, 3, 4, 3, 6))
    w = rng.standard_normal((c_out, 3, 2, 3, 6 // groups))
    kw = dict(stride=(2, 1, 2), padding=(1, 0, 1), output_padding=(1, 0, 0), groups=groups)
    for dtype in (np.float32, np.float64, np.float16, ml_dtypes.bfloat16):
        xd, wd = x.astype(dtype), w.astype(dtype)
        p = ct.plan(xd.shape, wd.shape, **kw, dtype=dtype, algorithm="indexed")
        compiled = ct.run_plan(p, xd, wd)
        monkeypatch.setattr(native, "AVAILABLE", False)
        np.testing.assert_array_equal(ct.run_plan(p, xd, wd).view(np.uint8),
                                      compiled.view(np.uint8))
        monkeypatch.undo()


def test_channels_not_contiguous_past_the_workspace_limit_copy_tile_by_tile(rng,
                                                                          assert_close):
    """An input whose channels are strided is copied once where it fits the workspace
    limit; past it, the tiles copy their own rows, each within the limit."""
    base = rng.standard_normal((1, 8, 6, 7, 24)).astype(np.float32)
    x = base[..., ::2]
    w = rng.standard_normal((16, 3, 3, 3, 12)).astype(np.float32)
    ref = conv_transpose_ref(x.astype(np.float64), w.astype(np.float64), stride=2, padding=1)
    mag = magnitude_ref(x.astype(np.float64), w.astype(np.float64), stride=2, padding=1)
    for workspace in (None, 4096):
        p = ct.plan(x.shape, w.shape, stride=2, padding=1, algorithm="native",
                    workspace=workspace)
        assert_close(ct.run_plan(p, x, w), ref, np.float32, mag, what=str(workspace))


# Long 1-D rows that the plan cuts along W (`_plan.cut_rows`): each mode, strides with a
# phase per residue, dilation, padding at both ends, output_padding past the last tap.
CUT_ROW_CASES = [  # (C_in, C_out, kernel, groups, stride, padding, dilation, output_padding)
    (16, 24, 3, 1, 1, 1, 1, 0),  # channels mode
    (40, 2, 7, 1, 2, 3, 1, 1),   # dot mode, a phase per W residue
    (28, 4, 3, 4, 1, 2, 2, 0),   # grouped, one output per group
    (6, 6, 5, 6, 3, 0, 1, 2),    # depthwise, stride past the kernel's reach on one residue
    (8, 16, 4, 2, 2, 1, 2, 1),   # grouped, dilated
]


@pytest.mark.parametrize("case", CUT_ROW_CASES, ids=[str(c) for c in CUT_ROW_CASES])
def test_long_rows_cut_along_w_match_the_reference(case, rng, monkeypatch,
                                                   small_calls_threaded):
    """A 1-D row of 5000 pixels in pieces: each piece's taps read across its ends into its
    neighbours' input, the row's true ends still bound them, and every output is written
    once (the result starts as NaN)."""
    from convtranspose import _execute
    c_in, c_out, k, groups, stride, padding, dilation, output_padding = case
    x = rng.standard_normal((1, 5000, c_in)).astype(np.float32)
    w = rng.standard_normal((c_out, k, c_in // groups)).astype(np.float32)
    kw = dict(stride=stride, padding=padding, dilation=dilation,
              output_padding=output_padding, groups=groups)
    p = ct.plan(x.shape, w.shape, **kw, algorithm="native", threads=2)
    assert any(t.tile.w is not None and t.tile.w[0] > 0 for t in p.tasks), p.tasks
    monkeypatch.setattr(_execute, "result_empty",
                        lambda shape, dtype: np.full(shape, np.nan, dtype))
    got = ct.run_plan(p, x, w)
    ref = conv_transpose_ref(x, w, **kw)
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


# cols' gather in pieces of rows (c_in, c_out, k, groups, stride, padding, dilation,
# output_padding), each case both ways where it may: a pixel's W taps as one run
# (dilation 1 along W), and vectors of one W residue's outputs gathered tap by tap;
# stride beyond the kernel (positions no tap reaches hold the bias alone).
COLS_GATHER_CASES = [
    (24, 3, 4, 1, 2, 1, 1, 0),
    (32, 3, 7, 1, 3, 3, 1, 2),
    (8, 2, 3, 1, 4, 0, 1, 3),    # stride > kernel
    (16, 4, 3, 1, 2, 2, 2, 1),   # dilated: taps apart
    (16, 4, 5, 2, 1, 2, 1, 0),   # grouped, five W taps a position
    (16, 4, 3, 2, 2, 1, 1, 0),   # grouped, two W taps a position
    (16, 16, 3, 2, 3, 1, 1, 0),  # grouped, 8 outputs a group
    (12, 3, 3, 3, 2, 1, 1, 1),   # a group's run one channel wide
    (32, 2, 9, 1, 2, 4, 2, 1),   # dilation and stride 2: one residue of two
    (24, 4, 5, 1, 3, 0, 2, 2),   # taps on three residues
]


COLS_GATHER_WAYS = [(case, runs) for case in COLS_GATHER_CASES for runs in (True, False)
                    if case[6] == 1 or not runs]  # runs need dilation 1 along W


@pytest.mark.parametrize("case, runs", COLS_GATHER_WAYS,
                         ids=[f"{c}-{'runs' if r else 'gathers'}" for c, r in COLS_GATHER_WAYS])
def test_cols_gathers_long_rows_in_pieces(case, runs, rng, monkeypatch, small_calls_threaded):
    """A 1-D row of 2500 input pixels is one output row: cols gathers it in pieces along
    W, each adding the products of the input pixels whose taps reach it and no others,
    every output written once (the result starts as NaN), with the bias."""
    from convtranspose import _execute
    from convtranspose.kernels import cols
    from convtranspose.kernels.cols import gather_tiles
    c_in, c_out, k, groups, stride, padding, dilation, output_padding = case
    monkeypatch.setattr(cols, "runs_along_w", lambda spec: runs)
    x = rng.standard_normal((1, 2500, c_in)).astype(np.float32)
    w = rng.standard_normal((c_out, k, c_in // groups)).astype(np.float32)
    bias = rng.standard_normal(c_out).astype(np.float32)
    kw = dict(stride=stride, padding=padding, dilation=dilation,
              output_padding=output_padding, groups=groups)
    p = ct.plan(x.shape, w.shape, **kw, algorithm="cols", threads=2)
    assert len(gather_tiles(p.spec, p.threads)) > 1
    monkeypatch.setattr(_execute, "result_empty",
                        lambda shape, dtype: np.full(shape, np.nan, dtype))
    got = ct.run_plan(p, x, w, bias=bias)
    ref = conv_transpose_ref(x, w, **kw) + bias
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_grouped_gathers_go_by_runs_only_below_avx512(monkeypatch):
    """Several groups' products are added run by run where each output takes at most two
    W taps or a group has 8 outputs or more, on the builds below AVX-512 (whose gathers
    are slow); else, and on AVX-512, gathered (the cases above run both ways)."""
    from convtranspose.kernels.cols import runs_along_w

    def runs(c_in, c_out, k, groups, stride, isa):
        spec = ct.plan((1, 50, c_in), (c_out, k, c_in // groups), stride=stride,
                       groups=groups).spec  # (planned on this host's build)
        monkeypatch.setattr(native, "isa", lambda: isa)
        taken = runs_along_w(spec)
        monkeypatch.undo()
        return taken

    for isa in ("avx2", "generic"):
        assert runs(16, 4, 3, 2, 2, isa) and runs(16, 16, 5, 2, 1, isa)
        assert not runs(16, 4, 5, 2, 1, isa)  # five W taps of 2 outputs a group
    assert not runs(16, 4, 3, 2, 2, "avx512") and not runs(16, 16, 5, 2, 1, "avx512")
    assert runs(16, 4, 5, 1, 1, "avx512")  # one group: runs on every build


def test_col2im_refuses_runs_across_dilated_taps():
    """A run adds a pixel's W taps to neighbouring outputs, which dilation along W puts
    apart: the binding refuses runs there (ValueError, nothing written) and takes the
    gathers."""
    from convtranspose.kernels.cols import _geometry, cols_bytes
    spec = ct.plan((1, 40, 8), (4, 3, 8), dilation=2).spec
    cols = np.ones(cols_bytes(spec) // 4, np.float32)
    out = np.full((1, *spec.out_spatial, spec.c_out), np.nan, np.float32)
    box = np.array([0, 1, 0, 1, 0, 1, 0, spec.out_spatial[2]], np.int64)  # all of it
    with pytest.raises(ValueError, match="col2im"):
        native.col2im(cols, out, None, _geometry(spec), 1, 4, box, True)
    assert np.isnan(out).all()
    native.col2im(cols, out, None, _geometry(spec), 1, 4, box, False)
    assert not np.isnan(out).any()


# Strides past the kernel's reach along one axis or several (kernel, stride, dilation):
# whole residues of the output that no tap reaches.
# Winograd's take a D axis of kernel 3, stride 1, and channels mode.
UNREACHED_CASES = [
    ((2, 3, 3), (3, 2, 1), (1, 1, 1), "native"),
    ((1, 2, 3), (2, 3, 4), (1, 1, 1), "native"),
    ((3, 2, 2), (1, 1, 4), (1, 2, 1), "native"),
    ((3, 3, 3), (2, 4, 2), (1, 1, 1), "native"),
    ((3, 2, 2), (1, 1, 4), (1, 1, 1), "winograd"),
    ((3, 2, 3), (1, 3, 4), (1, 1, 1), "winograd"),
    ((1, 3, 2), (3, 4, 1), (1, 1, 1), "planar"),  # planar fills the rows no tap reaches
    ((2, 2, 2), (3, 1, 4), (1, 1, 1), "planar"),  # (and writes its W residues itself)
]


@pytest.mark.parametrize("case", UNREACHED_CASES, ids=[str(c) for c in UNREACHED_CASES])
def test_positions_no_tap_reaches_hold_zero_or_the_bias(case, rng, monkeypatch):
    """The kernel fills the residues no tap lands on itself (`fill_unreached`), and the
    tiles store every other position: a result that starts as NaN shows a gap."""
    from convtranspose import _execute
    kernel, stride, dilation, algorithm = case
    x = rng.standard_normal((2, 4, 4, 5, 16)).astype(np.float32)
    c_out = 24 if algorithm == "winograd" else 5  # winograd: channels mode only
    w = rng.standard_normal((c_out, *kernel, 16)).astype(np.float32)
    kw = dict(stride=stride, dilation=dilation, output_padding=tuple(s - 1 for s in stride))
    p = ct.plan(x.shape, w.shape, **kw, algorithm=algorithm, threads=2)
    monkeypatch.setattr(_execute, "result_empty",
                        lambda shape, dtype: np.full(shape, np.nan, dtype))
    monkeypatch.setattr(_execute, "FILL_THREADS_FROM_BYTES", 0)  # filled in pieces
    for bias in (None, rng.standard_normal(c_out).astype(np.float32)):
        got = ct.run_plan(p, x, w, bias=bias)
        ref = conv_transpose_ref(x, w, **kw) + (0 if bias is None else bias)
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-3 * np.abs(ref).max())


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_fill_sets_each_pixel_of_a_strided_view(dtype, rng):
    """`native.fill_call`: every pixel of a strided output view set to the bias (in the
    view's dtype) or zeros, and nothing outside the view touched."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    dt = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    out = rng.standard_normal((2, 5, 4, 9, 7)).astype(dt)
    before = out.copy()
    bias = rng.standard_normal(7).astype(dt)
    for value, index in ((bias, np.s_[:, 1::2, :, 2::3]), (None, np.s_[1:, :, 1::3]),
                         (None, np.s_[:, 3:4])):  # the last: rows of whole runs
        ref = before.copy()
        ref[index] = 0 if value is None else value
        native.run_tasks([native.Task((native.fill_call(out[index], value),))], 2)
        np.testing.assert_array_equal(out.view(np.uint8), ref.view(np.uint8))
        before = ref


# W residues merged around rotated or unequal rows (`_plan.merged_row`): (kernel_w,
# stride_w, padding_w, output_padding_w, C_out), kernel_w a multiple of stride_w.
MERGED_EDGE_CASES = [
    (4, 4, 1, 3, 13),  # rotated by the padding, the last residues one output short
    (4, 2, 1, 0, 3),   # dot mode
    (6, 3, 2, 1, 10),
    (2, 2, 0, 1, 7),   # not rotated, one residue one output longer
    (3, 3, 1, 0, 3),
    (2, 3, 0, 0, 7),   # stride past the kernel: residues 0 and 1 merge, 2 carries no tap
    (3, 4, 1, 2, 13),  # rotated, residue 2 without a tap: 3, 0, 1 merge around its gap
]


def _dot_merges_every_residue(monkeypatch) -> None:
    """Dot mode merges every residue that can merge (up to DOT_MERGE_MAX_OUT outputs),
    whatever its model says would pay."""
    def merge_all(spec, live):
        items = [(p,) for p in live]
        for axis in (2, 1, 0):
            if spec.stride[axis] > 1:
                items = _plan._merged_along(spec, items, axis, True, _plan.DOT_MERGE_MAX_OUT)
        return tuple(items)
    monkeypatch.setattr(_plan, "dot_phase_groups", merge_all)


def _written_once_matches(plan, x, w, ref, bias, monkeypatch, rtol=1e-4) -> None:
    """Every output written once (the result starts as NaN), twice over (the second call
    replays the first's recording), against `ref` (with `bias` added)."""
    from convtranspose import _execute
    monkeypatch.setattr(_execute, "result_empty",
                        lambda shape, dtype: np.full(shape, np.nan, dtype))
    ref = ref + (0 if bias is None else bias)
    for call in range(2):
        got = ct.run_plan(plan, x, w, bias=bias)
        np.testing.assert_allclose(got, ref, rtol=rtol, atol=rtol * np.abs(ref).max(),
                                   err_msg=f"call {call}")


@pytest.mark.parametrize("case", MERGED_EDGE_CASES, ids=[str(c) for c in MERGED_EDGE_CASES])
def test_w_residues_merged_with_edges_match_the_reference(case, rng, monkeypatch):
    """A merged group covers each residue's inner outputs and single phases its first and
    last: every output written once, with the bias."""
    _dot_merges_every_residue(monkeypatch)
    k, s, p, op, c_out = case
    x = rng.standard_normal((2, 3, 4, 11, 6)).astype(np.float32)
    w = rng.standard_normal((c_out, 2, 3, k, 6)).astype(np.float32)
    bias = rng.standard_normal(c_out).astype(np.float32)
    kw = dict(stride=(1, 2, s), padding=(0, 1, p), output_padding=(0, 1, op))
    plan = ct.plan(x.shape, w.shape, **kw, algorithm="native")
    assert any(len(g) > 1 for g in plan.phase_groups)
    _written_once_matches(plan, x, w, conv_transpose_ref(x, w, **kw), bias, monkeypatch)


# W residues of unequal taps merged with PHANTOM taps (`_plan.merged_row`'s `phantoms`):
# CHANNELS mode, a pixel's outputs ending inside a cache line. (kernel_w, stride_w,
# padding_w, output_padding_w, C_in, C_out, groups)
PHANTOM_MERGE_CASES = [
    (3, 2, 0, 1, 16, 22, 2),  # 2 taps and 1, two conv groups
    (5, 2, 1, 0, 24, 13, 1),  # 3 and 2, rotated by the padding: edges
    (7, 4, 2, 3, 20, 10, 1),  # 2, 2, 2 and 1
    (5, 3, 2, 2, 18, 21, 1),  # 2, 2 and 1
]


@pytest.fixture
def phantoms_everywhere(monkeypatch):
    """W residues merge with phantom taps wherever the work bound allows: outputs as small
    as the tests' merge so only when told (`phantom_work` weighs the products against the
    output's bytes). The plans made meanwhile are forgotten after."""
    monkeypatch.setattr(_plan, "phantom_work", lambda spec: _plan.PHANTOM_MAX_WORK)
    forget_plans()
    yield
    forget_plans()


def _has_phantom_taps(plan) -> bool:
    from convtranspose._geometry import PHANTOM
    return any(t.k == PHANTOM for g in plan.phase_groups for ph in g for t in ph.axis_taps[2])


@pytest.mark.parametrize("case", PHANTOM_MERGE_CASES, ids=[str(c) for c in PHANTOM_MERGE_CASES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_w_residues_merged_with_phantom_taps_match_the_reference(case, dtype, rng,
                                                                 monkeypatch,
                                                                 phantoms_everywhere):
    """A residue without a tap where the others have one reads the same input through a
    zero weight: every output written once, with the bias."""
    k, s, p, op, c_in, c_out, groups = case
    x = rng.standard_normal((2, 3, 4, 11, c_in)).astype(dtype)
    w = rng.standard_normal((c_out, 2, 3, k, c_in // groups)).astype(dtype)
    bias = rng.standard_normal(c_out).astype(dtype)
    kw = dict(stride=(1, 2, s), padding=(0, 1, p), output_padding=(0, 1, op), groups=groups)
    plan = ct.plan(x.shape, w.shape, **kw, algorithm="native")
    assert _plan.native_mode(plan.spec) == native.CHANNELS
    assert _has_phantom_taps(plan)
    _written_once_matches(plan, x, w, conv_transpose_ref(x, w, **kw), bias, monkeypatch,
                          rtol=1e-4 if dtype == np.float32 else 1e-10)


def test_winograd_w_residues_merged_with_phantom_taps_match_the_reference(
        rng, monkeypatch, phantoms_everywhere):
    """Winograd's tiles are CHANNELS mode's: its W residues merge with phantom taps too."""
    x = rng.standard_normal((1, 6, 5, 12, 32)).astype(np.float32)
    w = rng.standard_normal((22, 3, 3, 3, 32)).astype(np.float32)
    bias = rng.standard_normal(22).astype(np.float32)
    kw = dict(stride=(1, 2, 2), padding=(1, 1, 0), output_padding=(0, 1, 1))
    plan = ct.plan(x.shape, w.shape, **kw, algorithm="winograd")
    assert _has_phantom_taps(plan)
    _written_once_matches(plan, x, w, conv_transpose_ref(x, w, **kw), bias, monkeypatch)


# Dot mode's residues merged across rows and conv groups (`_plan.dot_phase_groups`): each
# output where its own residue's position lies (`CtJob::oout`), edges of rotated residues
# as phase groups of their own. (in_spatial, C_in, C_out, kernel, stride, padding,
# output_padding, dilation, groups)
DOT_MERGE_CASES = [
    ((4, 5, 6), 126, 2, 2, 2, 0, 0, 1, 2),          # kernel == stride: one tap a phase, g2
    ((3, 4, 5), 141, 1, 3, 3, (0, 0, 1), (0, 0, 1), 1, 1),
    ((5, 6, 7), 16, 3, 4, 2, 1, 0, 1, 1),           # rotated along every axis: edges
    ((5, 6, 9), 10, 2, 4, 2, 1, 0, 1, 1),           # channels part of a vector, edges
    ((5, 4, 9), 24, 4, (4, 6, 2), (2, 3, 2), (1, 2, 0), (1, 0, 1), 1, 2),
    ((6, 5, 4), 20, 2, (3, 2, 2), (1, 2, 2), (2, 1, 1), (0, 1, 1), (2, 1, 1), 1),  # dilated D
    ((3, 7, 8), 33, 6, (2, 4, 1), (2, 2, 1), (0, 1, 0), 0, 1, 3),  # 18 outputs: 3 blocks
]


@pytest.mark.parametrize("case", DOT_MERGE_CASES, ids=[str(c) for c in DOT_MERGE_CASES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_dot_residues_merged_across_rows_match_the_reference(case, dtype, rng, monkeypatch):
    """Every output written once, where its residue's position lies, its conv group's
    bias added (a float16 output rounded as stored)."""
    spatial, c_in, c_out, k, s, p, op, d, groups = case
    _dot_merges_every_residue(monkeypatch)
    x = rng.standard_normal((2, *spatial, c_in)).astype(dtype)
    kernel = k if isinstance(k, tuple) else (k,) * 3
    w = rng.standard_normal((c_out, *kernel, c_in // groups)).astype(dtype)
    bias = rng.standard_normal(c_out).astype(dtype)
    kw = dict(stride=s, padding=p, output_padding=op, dilation=d, groups=groups)
    plan = ct.plan(x.shape, w.shape, **kw, dtype=dtype, algorithm="native")
    assert native_mode(plan.spec) == native.DOT
    assert any(len({q.residue[:2] for q in g}) > 1 for g in plan.phase_groups)
    ref = conv_transpose_ref(x.astype(np.float64), w.astype(np.float64), **kw)
    _written_once_matches(plan, x, w, ref, bias, monkeypatch,
                          rtol={np.float16: 2e-3, np.float32: 1e-4, np.float64: 1e-12}[dtype])



# Dot mode's conv groups through tap windows (forward.hpp's dot_row_window), every group
# of a block of pixels in turn: 1-3 outputs a group, W taps 1 or 2 pixels apart (strides
# along D and H only, or dilation 2), windows of 2-4 taps, channels fewer than a vector,
# a vector and a part, two. (in_spatial, C_in, C_out, kernel, stride, padding, dilation,
# groups)
DOT_GROUP_WINDOW_CASES = [
    ((3, 5, 40), 48, 4, 2, 1, 0, 1, 4),                 # 12 -> 1 a group, two W taps
    ((2, 4, 37), 96, 6, (2, 3, 5), 1, 1, 1, 2),         # 48 -> 3, windows of 2 and 3
    ((3, 3, 30), 40, 8, 3, 1, 1, 2, 4),                 # 10 -> 2, dilated: taps 2 apart
    ((2, 3, 26), 36, 9, (1, 2, 7), (1, 2, 1), (0, 1, 3), 1, 3),  # 12 -> 3, windows 3 + 4
    ((2, 2, 45), 64, 2, (2, 2, 4), (2, 1, 1), 1, 1, 2),  # 32 -> 1: two whole vectors
]


@pytest.mark.parametrize("case", DOT_GROUP_WINDOW_CASES,
                         ids=[str(c) for c in DOT_GROUP_WINDOW_CASES])
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_dot_windows_of_conv_groups_match_the_reference(case, dtype, rng, monkeypatch):
    """Each group's outputs where they lie, from its own channels, weight and bias."""
    spatial, c_in, c_out, k, s, p, d, groups = case
    x = rng.standard_normal((2, *spatial, c_in)).astype(dtype)
    kernel = k if isinstance(k, tuple) else (k,) * 3
    w = rng.standard_normal((c_out, *kernel, c_in // groups)).astype(dtype)
    bias = rng.standard_normal(c_out).astype(dtype)
    kw = dict(stride=s, padding=p, dilation=d, groups=groups)
    plan = ct.plan(x.shape, w.shape, **kw, dtype=dtype, algorithm="native")
    assert native_mode(plan.spec) == native.DOT
    ref = conv_transpose_ref(x.astype(np.float64), w.astype(np.float64), **kw)
    _written_once_matches(plan, x, w, ref, bias, monkeypatch,
                          rtol={np.float16: 2e-3, np.float32: 1e-4, np.float64: 1e-12}[dtype])

# Channels mode's conv groups in one call where a group's channels end inside a cache line
# (`_execute.groups_in_one_call`): (in_spatial, C_in, C_out, kernel, stride, padding,
# groups)
CHANNELS_GROUP_CASES = [
    ((5, 4, 6), 8, 24, 4, 2, 0, 4),   # 2 channels in, 6 out a group
    ((3, 4, 3), 8, 48, 6, 3, 1, 4),
    ((4, 5, 4), 4, 42, (3, 2, 3), 1, 1, 2),
    ((2, 3, 9), 36, 60, 3, (1, 2, 2), 1, 3),
    ((3, 4, 5), 32, 64, 3, 1, 1, 2),  # whole lines a group, a weight within L2's bound
]


@pytest.mark.parametrize("case", CHANNELS_GROUP_CASES, ids=[str(c) for c in CHANNELS_GROUP_CASES])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_channels_mode_groups_in_one_call_match_the_reference(case, dtype, rng, monkeypatch):
    """Each row's conv groups in turn: every output written once, its group's bias added."""
    from convtranspose import _execute
    spatial, c_in, c_out, k, s, p, groups = case
    x = rng.standard_normal((2, *spatial, c_in)).astype(dtype)
    kernel = k if isinstance(k, tuple) else (k,) * 3
    w = rng.standard_normal((c_out, *kernel, c_in // groups)).astype(dtype)
    bias = rng.standard_normal(c_out).astype(dtype)
    kw = dict(stride=s, padding=p, groups=groups)
    plan = ct.plan(x.shape, w.shape, **kw, dtype=dtype, algorithm="native")
    assert native_mode(plan.spec) == native.CHANNELS
    assert _execute.groups_in_one_call(plan.spec, native.CHANNELS, np.dtype(dtype).itemsize)
    ref = conv_transpose_ref(x.astype(np.float64), w.astype(np.float64), **kw)
    _written_once_matches(plan, x, w, ref, bias, monkeypatch,
                          rtol=2e-3 if dtype == np.float16 else 1e-4)


def test_groups_in_one_call_keeps_big_weights_apart():
    """Groups whose outputs fill whole lines go to the kernel together only while every
    group's weight fits the bound; groups that share lines always; dot mode always."""
    from convtranspose import _execute
    bound = _execute.GROUPS_IN_ONE_CALL_WEIGHT_BYTES

    def spec(c_in, c_out, k):
        return ct.plan((1, 4, 4, 4, c_in), (c_out, k, k, k, c_in // 2), groups=2).spec
    small, big = spec(32, 64, 3), spec(128, 128, 5)  # 110 KiB and 2 MB, 16 and 64 outputs
    assert small.weight_bytes <= bound < big.weight_bytes
    assert _execute.groups_in_one_call(small, native.CHANNELS, 4)
    assert not _execute.groups_in_one_call(big, native.CHANNELS, 4)
    shared = spec(128, 120, 5)  # 60 outputs a group: groups meet inside lines
    assert _execute.groups_in_one_call(shared, native.CHANNELS, 4)
    assert _execute.groups_in_one_call(big, native.DOT, 4)


# Many outputs on few pixels: dot mode reads the weight where it lies (no copy), in
# register blocks of outputs, each block over every row (short rows) or each row over
# every block (long rows); channels whole vectors, a partial one, or fewer than a vector.
WIDE_DOT_CASES = [  # (batch, in_spatial, c_in, c_out, kernel, stride, padding, groups)
    (3, (2, 2, 3), 48, 64, 4, 2, 1, 2),
    (1, (1, 3, 3), 40, 19, 5, (3, 1, 4), 0, 1),
    (2, (1, 2, 1), 33, 40, 4, (2, 1, 2), 0, 1),
    (1, (1, 2, 9), 16, 24, 3, 1, 1, 1),
    (2, (2, 1, 2), 60, 36, 3, 2, 1, 3),
    (1, (1, 1, 12), 32, 40, (1, 2, 1), 1, 0, 1),  # rows of 12 outputs, one W tap
]


@pytest.fixture
def dot_for_many_outputs(monkeypatch):
    """Dot mode wherever the weight reuse allows it: the models take it only for weights
    of megabytes, too big for a quick test."""
    monkeypatch.setattr(_plan, "channels_seconds", lambda spec: math.inf)
    _plan._native_mode.cache_clear()
    forget_plans()
    yield
    monkeypatch.undo()
    _plan._native_mode.cache_clear()
    forget_plans()


@pytest.mark.parametrize("case", range(len(WIDE_DOT_CASES)))
def test_dot_mode_reads_many_outputs_weights_in_place(case, isa, dot_for_many_outputs, rng,
                                                      assert_close):
    batch, spatial, c_in, c_out, k, s, p, g = WIDE_DOT_CASES[case]
    k = k if isinstance(k, tuple) else (k, k, k)
    x = rng.standard_normal((batch, *spatial, c_in)).astype(np.float32)
    w_torch = rng.standard_normal((c_in, c_out // g, *k)).astype(np.float32)
    w_mlx = w_torch.reshape(g, c_in // g, c_out // g, *k).transpose(0, 2, 3, 4, 5, 1)
    w_mlx = w_mlx.reshape(c_out, *k, c_in // g)
    kw = dict(stride=s, padding=p, groups=g)
    bias = rng.standard_normal(c_out).astype(np.float32)
    ref = conv_transpose_ref(x.astype(np.float64), w_mlx.astype(np.float64), **kw) + bias
    mag = magnitude_ref(x.astype(np.float64), w_mlx.astype(np.float64), **kw)
    plan = ct.plan(x.shape, w_mlx.shape, **kw, algorithm="native")
    assert native_mode(plan.spec) == native.DOT and c_out // g > native.DOT_MAX_OUT // 2
    # the weight contiguous, and a view whose input channels are not (copied once)
    for w in (np.ascontiguousarray(w_mlx), w_mlx, w_mlx[..., ::-1][..., ::-1]):
        before = w.copy()
        for _ in range(3):  # the first call records its tasks, the others replay them
            out = ct.run_plan(plan, x, w, bias=bias)
            assert_close(out, ref, np.float32, mag, what=f"wide dot {case} {isa}")
        np.testing.assert_array_equal(w, before)


def test_a_weight_past_the_kept_scratch_is_read_in_place(monkeypatch, avx512_planner):
    """CHANNELS mode packs its weight into scratch; a packed weight past what the scratch
    keeps from call to call comes in fresh pages every call, and the model counts them:
    384 -> 384 k5 on 3x2x1x1 (74 MB, each element meeting 6 pixels) takes dot mode,
    which reads the weight where it lies. With the scratch keeping it, the pack is cheap
    enough that CHANNELS mode stays. (Shapes only: nothing is allocated.)"""
    if not native.AVAILABLE:
        pytest.skip("the compiled kernel is not built")
    shapes = ((3, 2, 1, 1, 384), (384, 5, 5, 5, 384))
    kw = dict(stride=(1, 2, 1))
    spec = ct.plan(*shapes, **kw).spec
    assert _plan.weight_bytes(spec, _plan.live_phases(spec)) > _plan.RETAIN_BYTES
    _plan._native_mode.cache_clear()
    assert native_mode(spec) == native.DOT
    monkeypatch.setattr(_plan, "RETAIN_BYTES", 1 << 30)
    _plan._native_mode.cache_clear()
    assert native_mode(spec) == native.CHANNELS
    monkeypatch.undo()
    _plan._native_mode.cache_clear()


def test_planner_reads_a_big_weight_in_place_only_on_few_pixels():
    """384 -> 96 k5: on 1x3x3 pixels each weight element meets at most 9 of them, and
    copying 18 MiB into CHANNELS mode's layout would cost more than the products; on
    8x8x8 pixels the copy is paid back."""
    w = (96, 5, 5, 5, 384)
    few = ct.plan((1, 1, 3, 3, 384), w, stride=(3, 1, 4))
    assert few.algorithm == "native" and native_mode(few.spec) == native.DOT
    many = ct.plan((1, 8, 8, 8, 384), w, stride=(3, 1, 4))
    assert native_mode(many.spec) == native.CHANNELS
