"""The compiled kernel (csrc/): every instruction set this CPU has, against the float64
reference, over the settings grid and over the shapes that exercise its register blocks,
remainders, channel chunks and edge handling. CI must build it: these tests fail, not
skip, when the extension is missing."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
from reference import all_cases, conv_transpose_ref, magnitude_ref

import convtranspose as ct
from convtranspose import _native_kernel as native
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


def _run(case, x, w, **extra):
    p = ct.plan(case.input_shape, case.weight_shape, **case.kwargs, algorithm="native",
                dtype=x.dtype, **extra)
    assert p.algorithm == "native"
    return ct.run_plan(p, x, w)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_grid_every_isa(case, isa, rng, random_array, assert_close):
    for dtype in ("float32", "float64"):
        x = random_array(rng, case.input_shape, dtype)
        w = random_array(rng, case.weight_shape, dtype)
        out = _run(case, x, w)
        assert out.dtype == np.dtype(dtype)
        assert_close(out, conv_transpose_ref(x, w, **case.kwargs), dtype,
                     magnitude_ref(x, w, **case.kwargs), what=f"{case.id} {isa} {dtype}")


# Output widths 1..13 cross every remainder of the pixel blocks (6, 8, 12 or 24 wide);
# channel counts cross one to four vectors per chunk, partial vectors and several chunks.
BLOCK_SHAPES = [(wd, co) for wd in (1, 2, 5, 7, 13) for co in (1, 3, 8, 16, 17, 40, 64, 65, 130)]


# Fewer than TAPS_INNER_BELOW input channels: sums kept in registers across taps, with a
# block width picked per row length (whole blocks, masked edge pixels on either side).
TAPS_INNER_SHAPES = [(wd, ci, co) for wd in (1, 5, 12, 17, 33) for ci in (1, 2, 3)
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
    assert len(p.groups) == 4 and all(len(g) == 2 for g in p.groups)
    assert [ph.residue[2] for ph in p.groups[0]] == [0, 1]
    ref = conv_transpose_ref(x.astype(np.float64), w.astype(np.float64), stride=2)
    assert_close(ct.run_plan(p, x, w), ref, np.float32, what="k2s2")
    # Not merged with groups > 1: a position's channels of one group are not one run.
    p = ct.plan((1, 3, 4, 5, 6), (8, 2, 2, 2, 3), stride=2, groups=2, algorithm="native")
    assert all(len(g) == 1 for g in p.groups)


# Dot mode (vectors along C_in, 1-4 outputs): whole and partial vectors of C_in, every
# block remainder (16, 8 or 4 pixels wide), groups.
DOT_SHAPES = [(wd, ci, co, g) for wd in (3, 17) for ci in (8, 16, 21, 40) for co in (1, 2, 3, 4)
              for g in (1, 2) if ci % g == 0 and ci // g >= 8]


@pytest.mark.parametrize("width,c_in,c_out,groups", DOT_SHAPES,
                         ids=[f"w{a}-ci{b}-co{c}-g{d}" for a, b, c, d in DOT_SHAPES])
def test_dot_mode_for_few_outputs(width, c_in, c_out, groups, isa, rng, assert_close):
    from reference import Case
    case = Case("dot", 2, (3, 2, width), c_in, c_out * groups, (3, 2, 4), stride=(2, 1, 2),
                padding=(1, 0, 1), groups=groups)
    assert native_mode(ct.plan(case.input_shape, case.weight_shape, **case.kwargs).spec) \
        == native.DOT
    x = rng.standard_normal(case.input_shape)
    w = rng.standard_normal(case.weight_shape)
    assert_close(_run(case, x, w), conv_transpose_ref(x, w, **case.kwargs), np.float64,
                 magnitude_ref(x, w, **case.kwargs), what=f"{case.id} {isa}")


@pytest.mark.parametrize("channels", [16, 64, 70, 3])
def test_depthwise_mode_whole_and_partial_vectors(channels, isa, rng, assert_close):
    from reference import Case
    case = Case("dw", 1, (3, 4, 9), channels, channels, (3, 3, 3), stride=2, padding=1,
                output_padding=1, groups=channels)
    x = rng.standard_normal(case.input_shape).astype(np.float32)
    w = rng.standard_normal(case.weight_shape).astype(np.float32)
    assert_close(_run(case, x, w), conv_transpose_ref(x, w, **case.kwargs), np.float32,
                 magnitude_ref(x, w, **case.kwargs), what=f"{case.id} {isa}")


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
    assert head == ("native", native.DOT)
    dw = mode((1, 32, 32, 32, 64), (64, 3, 3, 3, 1), stride=2, padding=1, groups=64)
    assert dw == ("native", native.DEPTHWISE)
    assert "native" in str(ct.plan((1, 16, 32, 32, 64), (64, 3, 3, 3, 64), padding=1))


# ---- gradients through the kernel ------------------------------------------------------

# (C_in, C_out, groups): vectors along C_out (whole vectors on every instruction set:
# 32 channels), swapped along C_in (C_out below a vector), several groups, and a block
# remainder along the broadcast side (C_in = 7, 19).
GRAD_SHAPES = [(7, 32, 1), (19, 64, 1), (32, 1, 1), (64, 3, 1), (14, 64, 2), (64, 2, 2)]


@pytest.mark.parametrize("c_in,c_out,groups", GRAD_SHAPES,
                         ids=[f"ci{a}-co{b}-g{c}" for a, b, c in GRAD_SHAPES])
def test_vjp_through_the_kernel_every_isa(c_in, c_out, groups, isa, rng):
    from test_vjp import loops_vjp, make_case

    from convtranspose._api import spec_for
    from convtranspose._vjp import native_grad_weight_side, vjp_arrays
    x, w, cot, kw = make_case(rng, 3, (3, 4, 9), c_in, c_out, (3, 2, 4), stride=(2, 1, 2),
                              padding=(1, 0, 2), dilation=(1, 2, 1), output_padding=(1, 0, 1),
                              groups=groups, batch=2)
    spec, _, _ = spec_for(3, x, w, **kw)
    x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
    c3 = cot.reshape(spec.batch, *spec.out_spatial, spec.c_out)
    assert native_grad_weight_side(spec, x3, c3, np.dtype(np.float32)) is not None
    rx, rw = loops_vjp(x, w, cot, **kw)
    for threads in (1, 2):
        gx, gw = vjp_arrays(spec, x, w, cot, algorithm="native", threads=threads)
        np.testing.assert_allclose(gx, rx, atol=1e-5 * np.abs(rx).max(), rtol=0)
        np.testing.assert_allclose(gw, rw, atol=1e-5 * np.abs(rw).max(), rtol=0)
        again = vjp_arrays(spec, x, w, cot, algorithm="native", threads=threads)
        np.testing.assert_array_equal(again[1], gw)  # reproducible bit for bit


# (C_in/g in vectors, C_out/g, groups, input W, W kernel, W padding): few sums per tap
# (C_out/g times C_in/g's vectors below 8), where tiles of taps share each pixel's x
# vectors; one to five vectors (a chunk of four and a remainder), rows with and without
# pixels that every tap of a tile reaches (W 2 against a kernel 4 wide).
FEW_SUMS = [(1, 1, 1, 9, 4, 1), (2, 3, 1, 9, 3, 1), (5, 1, 2, 7, 2, 0), (1, 2, 3, 2, 4, 2),
            (3, 1, 1, 11, 5, 3)]


@pytest.mark.parametrize("vectors,c_out,groups,width,kw,pw", FEW_SUMS,
                         ids=[f"v{a}-co{b}-g{c}-w{d}-k{e}" for a, b, c, d, e, _ in FEW_SUMS])
def test_grad_weight_few_sums_per_tap(vectors, c_out, groups, width, kw, pw, isa, rng):
    """Heads with one to three output channels: grad_weight sums tiles of taps together
    over each row. Every tap's sum must match the loop reference, and its bits must not
    depend on the thread count (which decides which taps share a tile)."""
    from test_vjp import loops_vjp, make_case

    from convtranspose._api import spec_for
    from convtranspose._vjp import native_grad_weight_side, vjp_arrays
    lanes, max_vectors = native.layout(4)
    c_in = vectors * lanes * groups
    x, w, cot, kws = make_case(rng, 3, (3, 5, width), c_in, c_out * groups, (3, 4, kw),
                               stride=(2, 1, 2), padding=(1, 2, pw), dilation=(1, 1, 2),
                               groups=groups, batch=2)
    spec, _, _ = spec_for(3, x, w, **kws)
    x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
    c3 = cot.reshape(spec.batch, *spec.out_spatial, spec.c_out)
    assert native_grad_weight_side(spec, x3, c3, np.dtype(np.float32)) is True
    assert c_out * min(vectors, max_vectors) < 8
    _, rw = loops_vjp(x, w, cot, **kws)
    results = [vjp_arrays(spec, x, w, cot, need_input=False, algorithm="native",
                          threads=t)[1] for t in (1, 2, 3)]
    np.testing.assert_allclose(results[0], rw, atol=1e-5 * np.abs(rw).max(), rtol=0)
    np.testing.assert_array_equal(results[1], results[0])
    np.testing.assert_array_equal(results[2], results[0])


@pytest.mark.parametrize("vectors,c_out,groups,width,kw,pw", FEW_SUMS,
                         ids=[f"v{a}-co{b}-g{c}-w{d}-k{e}" for a, b, c, d, e, _ in FEW_SUMS])
def test_both_gradients_in_one_pass_for_few_sums(vectors, c_out, groups, width, kw, pw, isa,
                                                 rng, monkeypatch):
    """Where grad_weight sums few values per tap, grad_input comes from the same pass (each
    cotangent value loaded feeds both). Both must match the loop reference at every thread
    count, in float32 and float64; grad_input's bits must not depend on the thread count,
    nor grad_weight's from one call to the next."""
    from test_vjp import loops_vjp, make_case

    from convtranspose import _vjp
    from convtranspose._api import spec_for
    runs = []
    real = _vjp._native_both
    monkeypatch.setattr(_vjp, "_native_both", lambda *a: (runs.append(a[-1]), real(*a)))
    lanes, _ = native.layout(4)
    c_in = vectors * lanes * groups
    for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        x, w, cot, kws = make_case(rng, 3, (3, 5, width), c_in, c_out * groups, (3, 4, kw),
                                   stride=(2, 1, 2), padding=(1, 2, pw), dilation=(1, 1, 2),
                                   groups=groups, batch=2, dtypes=(dtype,) * 3)
        spec, _, _ = spec_for(3, x, w, **kws)
        rx, rw = loops_vjp(x, w, cot, **kws)
        runs.clear()
        results = [_vjp.vjp_arrays(spec, x, w, cot, threads=t, algorithm="native")
                   for t in (1, 2, 3)]  # native: these small calls would take 'indexed'
        x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
        c3 = cot.reshape(spec.batch, *spec.out_spatial, spec.c_out)
        fused = (_vjp.native_grad_weight_side(spec, x3, c3, np.dtype(dtype)) is True
                 and native.fuses_grad_input(np.dtype(dtype).itemsize, c_in // groups, c_out))
        assert fused or dtype == np.float64  # float32's few sums always fuse
        assert len(runs) == (3 if fused else 0)
        for gx, gw in results:
            np.testing.assert_allclose(gx, rx, atol=tol * np.abs(rx).max(), rtol=0)
            np.testing.assert_allclose(gw, rw, atol=tol * np.abs(rw).max(), rtol=0)
        np.testing.assert_array_equal(results[1][0], results[0][0])
        np.testing.assert_array_equal(results[2][0], results[0][0])
        again = _vjp.vjp_arrays(spec, x, w, cot, threads=2, algorithm="native")
        np.testing.assert_array_equal(again[1], results[1][1])


def test_grad_input_in_the_grad_weight_pass_only_for_few_sums(rng):
    """The kernel refuses grad_input beside sums it does not take few at a time."""
    from convtranspose._api import spec_for
    from convtranspose._vjp import _tap_offsets
    x = rng.standard_normal((1, 4, 4, 4, 16)).astype(np.float32)
    w = rng.standard_normal((16, 2, 2, 2, 16)).astype(np.float32)
    spec, _, _ = spec_for(3, x, w, stride=2)
    cot = np.zeros(spec.output_shape, np.float32)
    assert not native.fuses_grad_input(4, 16, 16)
    part = np.zeros((16, 8, 16), np.float32)
    with pytest.raises(ValueError, match="grad_input in the same pass"):
        native.grad_weight(True, x, 0, cot, 0, _tap_offsets(spec), spec.stride, part,
                           (0, 1, 0, 4, 0, 4), 16, 16, strides=(128, 16),
                           grad_input=np.zeros_like(x), weight=np.zeros_like(part))


# (C_out/g, W stride, groups, width): grad_input of heads with one to three output
# channels runs the kernel with that many input channels, unrolled, and with the pixel
# stride known where the channels are contiguous (strides 1 and 2, one group).
HEAD_GRAD_INPUT = [(co, s, g, wd) for co in (1, 2, 3) for s in (1, 2, 3) for g in (1, 2)
                   for wd in (5, 33)]


@pytest.mark.parametrize("c_out,stride,groups,width", HEAD_GRAD_INPUT,
                         ids=[f"co{a}-s{b}-g{c}-w{d}" for a, b, c, d in HEAD_GRAD_INPUT])
def test_grad_input_of_few_output_channels(c_out, stride, groups, width, isa, rng):
    from test_vjp import loops_vjp, make_case

    from convtranspose._api import spec_for
    from convtranspose._vjp import vjp_arrays
    for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        x, w, cot, kw = make_case(rng, 3, (2, 3, width), 16 * groups, c_out * groups,
                                  (2, 3, 4), stride=(1, 2, stride), padding=(0, 1, 2),
                                  dilation=(1, 1, 2), groups=groups, batch=2,
                                  dtypes=(dtype,) * 3)
        spec, _, _ = spec_for(3, x, w, **kw)
        rx, _ = loops_vjp(x, w, cot, **kw)
        gx, _ = vjp_arrays(spec, x, w, cot, need_weight=False, algorithm="native", threads=2)
        np.testing.assert_allclose(gx, rx, atol=tol * np.abs(rx).max(), rtol=0)


def _shifted(a: np.ndarray, offset_bytes: int) -> np.ndarray:
    """A copy of `a` that starts `offset_bytes` past a cache line boundary."""
    buf = np.empty(a.nbytes + 64 + offset_bytes, np.uint8)
    start = (-buf.ctypes.data) % 64 + offset_bytes
    out = buf[start:start + a.nbytes].view(a.dtype).reshape(a.shape)
    out[...] = a
    return out


@pytest.mark.parametrize("c_in,c_out,swapped", [(112, 32, False), (32, 100, True)],
                         ids=["cotangent-side", "input-side"])
def test_grad_weight_reads_vector_rows_off_the_line_boundary_alike(c_in, c_out, swapped, isa,
                                                                   rng):
    """With ~96 or more broadcast blocks, grad_weight copies the vector side's rows of a
    batch to a line boundary when they are not on one: the bits must not depend on where
    the caller's arrays start (4 and 16 bytes past a line, or on one)."""
    from test_vjp import loops_vjp, make_case

    from convtranspose._api import spec_for
    from convtranspose._vjp import native_grad_weight_side, vjp_arrays
    x, w, cot, kw = make_case(rng, 3, (2, 3, 13), c_in, c_out, (2, 3, 3), stride=(1, 2, 2),
                              padding=(0, 1, 1), groups=1, batch=1)
    spec, _, _ = spec_for(3, x, w, **kw)
    side = native_grad_weight_side(spec, x.reshape(spec.batch, *spec.in_spatial, c_in),
                                   cot.reshape(spec.batch, *spec.out_spatial, c_out),
                                   np.dtype(np.float32))
    lanes, _ = native.layout(4)
    assert side is (swapped and c_out % lanes != 0)  # generic's 4 lanes take 100 whole
    rw = loops_vjp(x, w, cot, **kw)[1]
    results = []
    for offset in (0, 4, 16):
        _, gw = vjp_arrays(spec, _shifted(x, offset), w, _shifted(cot, offset),
                           need_input=False, algorithm="native", threads=1)
        np.testing.assert_allclose(gw, rw, atol=1e-5 * np.abs(rw).max(), rtol=0)
        results.append(gw.copy())
    for gw in results[1:]:
        np.testing.assert_array_equal(gw, results[0])


@pytest.mark.parametrize("c_out,groups", [(24, 1), (2, 1), (6, 6)],
                         ids=["channels", "dot", "depthwise"])
def test_float16_results_round_like_numpy(c_out, groups, isa, rng):
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
    p16 = ct.plan(x.shape, w.shape, **kw, dtype=np.float16, algorithm="native")
    p32 = ct.plan(x.shape, w.shape, **kw, dtype=np.float32, algorithm="native")
    got = ct.run_plan(p16, x, w)
    with np.errstate(over="ignore"):  # the overflow to inf is part of the check
        want = ct.run_plan(p32, x.astype(np.float32), w.astype(np.float32)).astype(np.float16)
    assert got.dtype == np.float16
    assert np.isinf(want).any() and np.isnan(want).any()
    assert ((want != 0) & (np.abs(want) < np.finfo(np.float16).tiny)).any()  # subnormals
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


@pytest.mark.parametrize("c_out,groups", [(24, 1), (2, 1), (6, 6)],
                         ids=["channels", "dot", "depthwise"])
def test_bfloat16_results_round_like_ml_dtypes(c_out, groups, isa, rng):
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
    p16 = ct.plan(x.shape, w.shape, **kw, dtype=bf16, algorithm="native")
    p32 = ct.plan(x.shape, w.shape, **kw, dtype=np.float32, algorithm="native")
    got = ct.run_plan(p16, x, w)
    with np.errstate(over="ignore", invalid="ignore"):
        want = ct.run_plan(p32, x.astype(np.float32), w.astype(np.float32)).astype(bf16)
    assert got.dtype == bf16
    assert np.isinf(want.astype(np.float32)).any() and np.isnan(want.astype(np.float32)).any()
    np.testing.assert_array_equal(got.view(np.uint16), want.view(np.uint16))


def test_binding_fills_each_job_by_field_name():
    """The binding (csrc/module.cpp) fills a job's C struct field by field from a dict of
    its names: a missing field, a name the struct lacks, an array of the wrong length or a
    value that is not an int is an error naming it; keys need not be interned."""
    a = np.zeros(64, np.float32)
    table = np.zeros((1, 4), np.int64)
    pack = {"itemsize": 4, "src": native._native.address(a),
            "table": native._native.address(table), "taps": 1, "cols": 4, "rows": 1,
            "row_stride": 1, "padded": 16, "chunk": 16, "dst": native._native.address(a)}
    assert native._native.pack_call(pack) is not None
    built = {"".join(("ro", "ws")) if k == "rows" else k: v for k, v in pack.items()}
    assert native._native.pack_call(built) is not None
    with pytest.raises(TypeError, match="pack: missing field 'rows'"):
        native._native.pack_call({k: v for k, v in pack.items() if k != "rows"})
    with pytest.raises(TypeError, match="pack: unknown field 'colums'"):
        native._native.pack_call({**pack, "colums": 4})
    with pytest.raises(TypeError, match="pack: field 'taps' takes ints"):
        native._native.pack_call({**pack, "taps": 1.0})
    with pytest.raises(TypeError, match="takes a dict of the fields of a PackJob"):
        native._native.pack_call(tuple(pack.values()))
    with pytest.raises(TypeError, match="correlate: field 'xs' takes a tuple or list of 4"):
        native._native.correlate_call({"itemsize": 4, "xs": (1, 2, 3)})


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("transposed,scattered", [(False, False), (True, False), (True, True)],
                         ids=["rows-contiguous", "rows-strided", "rows-strided-cols-permuted"])
@pytest.mark.parametrize("cols", [1, 7, 16, 70, 130])
def test_pack_columns_gathers_the_documented_layout(dtype, transposed, scattered, cols, rng):
    """Element (tap, r, col) = w.flat-by-strides[table[tap, col] + r * row_stride], columns
    padded with zeros to whole vectors, cut into chunks [tap][r][column]: checked against
    a NumPy gather, from a strided source either way round, with the columns adjacent in
    the source (copied as runs) or not."""
    taps, rows = 3, 21
    lanes, max_vectors = native.layout(np.dtype(dtype).itemsize)
    base = rng.standard_normal((cols + 3, taps, rows * 2)).astype(dtype)
    src = base[1:cols + 1, :, ::2]  # (cols, taps, rows), not contiguous
    if transposed:  # rows strided, columns adjacent
        src = np.ascontiguousarray(src.transpose(1, 2, 0)).transpose(2, 0, 1)
    s_col, s_tap, s_row = native.element_strides(src)
    order = rng.permutation(cols) if scattered else np.arange(cols)
    table = np.arange(taps)[:, None] * s_tap + order[None, :] * s_col
    packed = native.pack_columns(src, table, rows, s_row)
    padded = -(-cols // lanes) * lanes
    want = np.zeros((taps, rows, padded), dtype)
    want[..., :cols] = src.transpose(1, 2, 0)[..., order]
    chunk = lanes * max_vectors
    expect = np.concatenate([want[..., c:c + chunk].ravel() for c in range(0, padded, chunk)])
    np.testing.assert_array_equal(packed, expect)
    np.testing.assert_array_equal(native.unpack(packed, taps, rows, padded), want)


@pytest.mark.parametrize("path", ["units", "in-place", "rows"])
def test_grad_weight_work_splits_agree_and_units_ignore_the_thread_count(path, rng,
                                                                        monkeypatch):
    """Workers share out (tap, column chunk) units, summing into grad_weight in place
    (vectors along C_in) or through the packed layout; with too few units to share (a
    1x1x1 kernel) they split the rows and add partial sums. Each matches the loop
    reference; the units split gives the same bits at any thread count."""
    from test_vjp import loops_vjp, make_case

    import convtranspose._vjp as vjp_module
    from convtranspose._api import spec_for
    kernel = (1, 1, 1) if path == "rows" else (3, 2, 4)
    x, w, cot, kw = make_case(rng, 3, (3, 4, 9), 32, 64, kernel, stride=(2, 1, 2),
                              padding=(0, 0, 0) if path == "rows" else (1, 0, 2),
                              groups=2, batch=2)
    if path == "in-place":
        monkeypatch.setattr(vjp_module, "GW_IN_PLACE_BYTES", 0)
    spec, _, _ = spec_for(3, x, w, **kw)
    x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
    c3 = cot.reshape(spec.batch, *spec.out_spatial, spec.c_out)
    swapped = vjp_module.native_grad_weight_side(spec, x3, c3, np.dtype(np.float32))
    assert swapped is (path == "in-place")
    units = native.gw_units(math.prod(kernel), 16 if swapped else 32, 4)
    assert (units < 4) is (path == "rows")
    _, rw = loops_vjp(x, w, cot, **kw)
    results = [vjp_module.vjp_arrays(spec, x, w, cot, need_input=False, threads=t)[1]
               for t in (1, 2, 3)]
    for gw in results:
        np.testing.assert_allclose(gw, rw, atol=1e-5 * np.abs(rw).max(), rtol=0)
    if path != "rows":
        np.testing.assert_array_equal(results[0], results[1])
        np.testing.assert_array_equal(results[0], results[2])


@pytest.mark.parametrize("channels", [5, 16, 70])
def test_depthwise_grad_input_through_the_kernel(channels, isa, rng):
    """A depthwise layer's grad_input is a depthwise correlation of the cotangent: the
    kernel's depthwise mode with the stride as its step (whole and partial vectors)."""
    from test_vjp import loops_vjp, make_case

    from convtranspose._api import spec_for
    from convtranspose._vjp import native_grad_input_suits, vjp_arrays
    x, w, cot, kw = make_case(rng, 3, (3, 4, 9), channels, channels, (3, 2, 4),
                              stride=(2, 1, 2), padding=(1, 0, 2), dilation=(1, 2, 1),
                              output_padding=(1, 0, 1), groups=channels, batch=2)
    spec, _, _ = spec_for(3, x, w, **kw)
    assert native_grad_input_suits(spec, need_weight=True)
    rx, rw = loops_vjp(x, w, cot, **kw)
    for threads in (1, 2):
        gx, _ = vjp_arrays(spec, x, w, cot, need_weight=False, algorithm="native",
                           threads=threads)
        np.testing.assert_allclose(gx, rx, atol=1e-5 * np.abs(rx).max(), rtol=0)
    gx, gw = vjp_arrays(spec, x, w, cot)  # the default: indexed, or kernel + direct
    np.testing.assert_allclose(gx, rx, atol=1e-5 * np.abs(rx).max(), rtol=0)
    np.testing.assert_allclose(gw, rw, atol=1e-5 * np.abs(rw).max(), rtol=0)


@pytest.mark.parametrize("channels", [1, 5, 16, 20, 64])
def test_depthwise_grad_weight_through_the_kernel(channels, isa, rng):
    """A depthwise layer's grad_weight: per tap and channel, a sum over pixels of input
    times cotangent, vectors along the channels (whole and partial vectors), rows split
    between workers with one partial each: right for 1 and 2 threads, float32 and
    float64, and the same bits again at a thread count."""
    from test_vjp import loops_vjp, make_case

    from convtranspose._api import spec_for
    from convtranspose._vjp import native_grad_weight_side, vjp_arrays
    x, w, cot, kw = make_case(rng, 3, (3, 4, 9), channels, channels, (3, 2, 4),
                              stride=(2, 1, 2), padding=(1, 0, 2), dilation=(1, 2, 1),
                              output_padding=(1, 0, 1), groups=channels, batch=2)
    for dtype in (np.float32, np.float64):
        xd, wd, cd = x.astype(dtype), w.astype(dtype), cot.astype(dtype)
        spec, _, _ = spec_for(3, xd, wd, **kw)
        x3 = xd.reshape(spec.batch, *spec.in_spatial, spec.c_in)
        c3 = cd.reshape(spec.batch, *spec.out_spatial, spec.c_out)
        assert native_grad_weight_side(spec, x3, c3, np.dtype(dtype)) == native.GW_DEPTHWISE
        _, rw = loops_vjp(xd, wd, cd, **kw)
        for threads in (1, 2):
            _, gw = vjp_arrays(spec, xd, wd, cd, need_input=False, algorithm="native",
                               threads=threads)
            assert gw.dtype == dtype
            np.testing.assert_allclose(gw, rw, atol=1e-5 * np.abs(rw).max(), rtol=0)
            _, again = vjp_arrays(spec, xd, wd, cd, need_input=False, algorithm="native",
                                  threads=threads)
            np.testing.assert_array_equal(again, gw)


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
        p = ct.plan(xd.shape, wd.shape, **kw, dtype=dtype)
        assert p.algorithm == "indexed"
        compiled = ct.run_plan(p, xd, wd)
        monkeypatch.setattr(native, "AVAILABLE", False)
        np.testing.assert_array_equal(ct.run_plan(p, xd, wd).view(np.uint8),
                                      compiled.view(np.uint8))
        monkeypatch.undo()


def test_widen_half_converts_every_bit_pattern_exactly(isa):
    """A float16/bfloat16 input converted for the kernel (F16C, or software on the portable
    build): every one of the 65536 bit patterns gives NumPy's / ml_dtypes' float32, bit
    for bit (nans: a nan; F16C quiets signalling ones)."""
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    for dtype in (np.float16, ml_dtypes.bfloat16):
        src = bits.view(dtype)
        out = np.empty(bits.size, np.float32)
        native.widen_half(src, out)
        want = src.astype(np.float32)
        nan = np.isnan(want)
        np.testing.assert_array_equal(out.view(np.uint32)[~nan], want.view(np.uint32)[~nan])
        assert np.isnan(out[nan]).all()


# --- tiles shared by threads ------------------------------------------------------------

def _poisoned(monkeypatch):
    """Results start as NaN (not recycled memory that may hold the right answer), so a row
    that no call computes shows."""
    from convtranspose import _execute
    monkeypatch.setattr(_execute, "result_empty",
                        lambda shape, dtype: np.full(shape, np.nan, dtype))


SHARED_SHAPES = [  # (C_in, C_out, groups, stride): the three kernel modes, one phase or eight
    (16, 24, 1, 1), (16, 24, 1, 2), (8, 2, 1, 1), (12, 12, 12, 2), (8, 16, 2, 1)]


@pytest.mark.parametrize("c_in,c_out,groups,stride", SHARED_SHAPES,
                         ids=[f"ci{a}-co{b}-g{c}-s{d}" for a, b, c, d in SHARED_SHAPES])
def test_threads_sharing_a_tile_compute_every_row_once(c_in, c_out, groups, stride, rng,
                                                       monkeypatch, small_calls_threaded):
    """Three calls start together on each tile and claim its rows through one cursor: the
    result holds the bits of one call computing every row, whichever call took which."""
    x = rng.standard_normal((2, 5, 9, 7, c_in)).astype(np.float32)
    w = rng.standard_normal((c_out, 3, 3, 3, c_in // groups)).astype(np.float32)
    kw = dict(stride=stride, padding=1, groups=groups)
    p = ct.plan(x.shape, w.shape, **kw, algorithm="native", threads=1)
    alone = ct.run_plan(p, x, w).copy()
    shared_calls = _three_calls_per_shared_tile(monkeypatch)
    _poisoned(monkeypatch)
    shared = ct.run_plan(ct.plan(x.shape, w.shape, **kw, algorithm="native", threads=2), x, w)
    assert shared_calls, "the plan on two threads made no tile shared"
    np.testing.assert_array_equal(shared, alone)


@pytest.mark.parametrize("c_in,c_out,groups,stride", SHARED_SHAPES,
                         ids=[f"ci{a}-co{b}-g{c}-s{d}" for a, b, c, d in SHARED_SHAPES])
def test_grad_input_tiles_shared_by_threads_hold_the_same_bits(c_in, c_out, groups, stride,
                                                              rng, monkeypatch):
    from convtranspose import _vjp
    from convtranspose._api import spec_for

    x = rng.standard_normal((2, 5, 9, 7, c_in)).astype(np.float32)
    w = rng.standard_normal((c_out, 3, 3, 3, c_in // groups)).astype(np.float32)
    spec, _, _ = spec_for(3, x, w, stride=stride, padding=1, groups=groups)
    cot = rng.standard_normal(spec.output_shape).astype(np.float32)
    # Alone, or beside grad_weight (in one queue with its units, or in its pass where
    # grad_weight sums few values per tap: another order of sums, so its own reference).
    alone = {need_weight: _vjp.vjp_arrays(spec, x, w, cot, need_weight=need_weight,
                                          algorithm="native", threads=1)[0].copy()
             for need_weight in (False, True)}
    shared_calls = _three_calls_per_shared_tile(monkeypatch)
    monkeypatch.setattr(_vjp, "result_empty", lambda shape, dtype: np.full(shape, np.nan, dtype))
    for need_weight in (False, True):
        gx, _ = _vjp.vjp_arrays(spec, x, w, cot, need_weight=need_weight, algorithm="native",
                                threads=2)
        np.testing.assert_array_equal(gx, alone[need_weight])
    assert shared_calls


def _three_calls_per_shared_tile(monkeypatch) -> list:
    """Run each shared tile as three calls started together, on Python threads, so that
    they claim its rows concurrently (on either path: kernel calls made by Python jobs, or
    tasks for the compiled pool); returns the list of the tiles so run."""
    import threading

    real = native.correlate
    shared_calls = []

    def three_at_once(fn) -> None:
        start = threading.Barrier(3)

        def one():
            start.wait()
            fn()

        workers = [threading.Thread(target=one) for _ in range(3)]
        for t in workers:
            t.start()
        for t in workers:
            t.join()

    def correlate(*args, into=None, **kw):
        *head, cursor, sharers = args
        if not cursor or into is not None:
            return real(*args, into=into, **kw)
        shared_calls.append(args)
        three_at_once(lambda: real(*head, cursor, 3, **kw))

    def run_tasks(tasks, threads):
        for task in tasks:
            if task.shared:
                shared_calls.append(task)
                three_at_once(task.run_here)
            else:
                task.run_here()

    monkeypatch.setattr(native, "correlate", correlate)
    monkeypatch.setattr(native, "run_tasks", run_tasks)
    return shared_calls


def test_a_call_computes_only_the_rows_left_unclaimed(rng, monkeypatch, small_calls_threaded):
    """With the first k rows of the tile claimed already (by another thread, as far as the
    kernel knows), a call computes the others and leaves those k alone."""
    import ctypes

    x = rng.standard_normal((1, 4, 6, 5, 8)).astype(np.float32)
    w = rng.standard_normal((16, 3, 3, 3, 8)).astype(np.float32)
    p = ct.plan(x.shape, w.shape, padding=1, algorithm="native", threads=2)
    assert len(p.tasks) == 1  # stride 1: one phase, one tile whose rows are (n, d, h)
    full = ct.run_plan(ct.plan(x.shape, w.shape, padding=1, algorithm="native", threads=1),
                       x, w).copy()
    real = native.correlate
    rows = 4 * 6
    for claimed in (0, 7, rows):
        def pre_claimed(*args, claimed=claimed, **kw):
            *head, cursor, sharers = args
            assert cursor and sharers == 2
            ctypes.c_int64.from_address(cursor).value = claimed  # before the call runs
            return real(*args, **kw)

        with monkeypatch.context() as patch:
            _poisoned(patch)
            patch.setattr(native, "correlate", pre_claimed)
            out = ct.run_plan(p, x, w).reshape(rows, -1)
        assert np.isnan(out[:claimed]).all()
        np.testing.assert_array_equal(out[claimed:], full.reshape(rows, -1)[claimed:])


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


def test_threads_left_without_a_job_join_a_shared_one():
    """run_jobs: every job runs; a thread that finds no job left joins a Shared one still
    running (here: units taken under a lock, 1 ms each); an error in one surfaces."""
    import threading
    import time

    from convtranspose._execute import Shared, run_jobs

    lock = threading.Lock()
    units = list(range(20))
    done: list[tuple[int, int]] = []
    plain: list[str] = []

    def shared_work():
        while True:
            with lock:
                if not units:
                    return
                unit = units.pop()
            time.sleep(1e-3)
            done.append((unit, threading.get_ident()))

    run_jobs([lambda: plain.append("a"), Shared(shared_work), lambda: plain.append("b")], 2)
    assert sorted(u for u, _ in done) == list(range(20)) and sorted(plain) == ["a", "b"]
    assert len({ident for _, ident in done}) == 2  # both threads worked on it

    def broken():
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_jobs([Shared(broken), lambda: None], 2)


# --- the compiled pool (csrc/pool.hpp) -------------------------------------------------------

@pytest.fixture
def two_threads():
    before = ct._plan._threads
    ct.set_num_threads(2)
    yield
    ct.set_num_threads(before)


def test_pool_packs_each_weight_once_before_any_tile_reads_it(rng, monkeypatch,
                                                              small_calls_threaded):
    """Stride 2: eight phase groups, each packing its weights (a `native.once`) as the first
    of its tiles needs them, on whichever pool thread that is. The packed buffers start as
    NaN, so a tile that read them before the packing was done would show; and a packing
    run twice would still give the right answer, so the packs are counted."""
    from convtranspose import _memory

    x = rng.standard_normal((2, 6, 7, 5, 8)).astype(np.float32)
    w = rng.standard_normal((16, 3, 3, 3, 8)).astype(np.float32)
    kw = dict(stride=2, padding=1)
    alone = ct.run_plan(ct.plan(x.shape, w.shape, **kw, algorithm="native", threads=1), x, w)
    real_empty = _memory.Scratch.empty
    monkeypatch.setattr(_memory.Scratch, "empty", lambda self, count, dtype: np.full(
        real_empty(self, count, dtype).shape, np.nan, dtype))
    onces = []
    real_once = native.once
    monkeypatch.setattr(native, "once", lambda calls: onces.append(len(calls))
                        or real_once(calls))
    tasks_run = []
    real_run = native.run_tasks
    monkeypatch.setattr(native, "run_tasks", lambda tasks, threads: tasks_run.append(
        (len(tasks), threads)) or real_run(tasks, threads))
    p = ct.plan(x.shape, w.shape, **kw, algorithm="native", threads=3)
    for _ in range(5):
        np.testing.assert_array_equal(ct.run_plan(p, x, w), alone)
    assert len(onces) == 5 * len(p.groups) and len(p.groups) > 1
    assert tasks_run and all(n >= len(p.groups) and t == 3 for n, t in tasks_run)


def test_pool_tiles_of_one_weight_wait_for_its_packing(rng, monkeypatch, small_calls_threaded):
    """One phase group cut into many tiles (tiles shared by threads are normally cut only
    for locality): the threads start on different tiles of the same weight together, and
    all but the one packing it must wait for the packing (into NaN-filled memory)."""
    from convtranspose import _memory, _plan

    x = rng.standard_normal((2, 12, 12, 8, 64)).astype(np.float32)
    w = rng.standard_normal((64, 3, 3, 3, 64)).astype(np.float32)
    alone = ct.run_plan(ct.plan(x.shape, w.shape, padding=1, algorithm="native", threads=1),
                        x, w)
    monkeypatch.setattr(_plan, "SHARED_TILE_BYTES", 1)
    _plan._make_plan.cache_clear()
    real_empty = _memory.Scratch.empty
    monkeypatch.setattr(_memory.Scratch, "empty", lambda self, count, dtype: np.full(
        real_empty(self, count, dtype).shape, np.nan, dtype))
    p = ct.plan(x.shape, w.shape, padding=1, algorithm="native", threads=3)
    assert len(p.groups) == 1 and len(p.tasks) >= 6
    for _ in range(40):
        np.testing.assert_array_equal(ct.run_plan(p, x, w), alone)


def test_pool_serves_concurrent_callers(rng, two_threads):
    """Two Python threads call at once, each on two threads: one batch has the pool's
    threads, the other runs on its caller; both give the bits of a call alone."""
    import threading

    x = rng.standard_normal((1, 8, 16, 16, 32)).astype(np.float32)
    w = rng.standard_normal((32, 3, 3, 3, 32)).astype(np.float32)
    alone = ct.conv_transpose3d(x, w, stride=2, padding=1).copy()
    failures = []

    def caller():
        for _ in range(10):
            y = ct.conv_transpose3d(x, w, stride=2, padding=1)
            if not np.array_equal(y, alone):
                failures.append(1)

    callers = [threading.Thread(target=caller) for _ in range(2)]
    for t in callers:
        t.start()
    for t in callers:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in callers) and not failures


def _forked_call(queue) -> None:
    x = np.ones((1, 8, 16, 16, 32), np.float32)
    w = np.ones((32, 3, 3, 3, 32), np.float32)
    queue.put(float(ct.conv_transpose3d(x, w, stride=2, padding=1).sum()))


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork is POSIX")
def test_pool_works_in_a_forked_child(two_threads):
    """A child forked after the pool started has none of its threads (and may hold a
    copy of a lock that a parent thread held at the fork): its calls still finish, with
    the parent's result, on a pool of its own."""
    import multiprocessing

    x = np.ones((1, 8, 16, 16, 32), np.float32)
    w = np.ones((32, 3, 3, 3, 32), np.float32)
    expected = float(ct.conv_transpose3d(x, w, stride=2, padding=1).sum())
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_forked_call, args=(queue,))
    child.start()
    child.join(timeout=60)
    hung = child.is_alive()
    if hung:
        child.kill()
    assert not hung and child.exitcode == 0
    assert queue.get(timeout=5) == expected
