"""The compiled kernel (csrc/), gradients: grad_input (a correlation of the cotangent,
heads with few output channels, depthwise) and grad_weight (vectors along either side,
few sums per tap, both gradients in one pass, work split between threads, depthwise),
on every instruction set this CPU has, against the loop reference of test_vjp.py."""

from __future__ import annotations

import math

import numpy as np
import pytest

from convtranspose import _native_kernel as native
from convtranspose._plan import MIN_TILE_ROWS

# (C_in, C_out, groups): vectors along C_out (whole vectors on every instruction set:
# 32 channels), swapped along C_in (C_out below a vector), several groups, and a block
# remainder along the broadcast side (C_in = 7, 19).
GRAD_SHAPES = [(7, 32, 1), (19, 64, 1), (32, 1, 1), (64, 3, 1), (14, 64, 2), (64, 2, 2)]


@pytest.mark.parametrize("c_in,c_out,groups", GRAD_SHAPES,
                         ids=[f"ci{a}-co{b}-g{c}" for a, b, c in GRAD_SHAPES])
def test_vjp_through_the_kernel_every_isa(c_in, c_out, groups, isa, rng):
    from test_vjp import loops_vjp, make_case

    from convtranspose._api import spec_for
    from convtranspose._vjp import native_grad_weight_layout
    x, w, cot, kw = make_case(rng, 3, (3, 4, 9), c_in, c_out, (3, 2, 4), stride=(2, 1, 2),
                              padding=(1, 0, 2), dilation=(1, 2, 1), output_padding=(1, 0, 1),
                              groups=groups, batch=2)
    spec, _, _ = spec_for(3, x, w, **kw)
    x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
    c3 = cot.reshape(spec.batch, *spec.out_spatial, spec.c_out)
    assert native_grad_weight_layout(spec, x3, c3, np.dtype(np.float32)) is not None
    _assert_native_vjp(spec, x, w, cot, *loops_vjp(x, w, cot, **kw))


def _assert_native_vjp(spec, x, w, cot, rx, rw) -> None:
    """Both gradients forced onto the kernel, on one and two threads, match the loop
    reference, and the same bits come back at a thread count."""
    from convtranspose._vjp import vjp_arrays
    for threads in (1, 2):
        gx, gw = vjp_arrays(spec, x, w, cot, algorithm="native", threads=threads)
        np.testing.assert_allclose(gx, rx, atol=1e-5 * np.abs(rx).max(), rtol=0)
        np.testing.assert_allclose(gw, rw, atol=1e-5 * np.abs(rw).max(), rtol=0)
        again = vjp_arrays(spec, x, w, cot, algorithm="native", threads=threads)
        np.testing.assert_array_equal(again[0], gx)  # reproducible bit for bit
        np.testing.assert_array_equal(again[1], gw)


@pytest.mark.parametrize("groups", [1, 2])
def test_grad_input_weight_packed_on_threads_matches_the_loops(groups, rng):
    """A weight past PARALLEL_PACK_BYTES on few pixels (small and wide): grad_input's
    packed weight is cut into pieces that two threads pack at once, one thread packs it
    whole; both gradients match the loop reference either way."""
    from test_vjp import loops_vjp, make_case

    from convtranspose._api import spec_for
    from convtranspose._execute import PARALLEL_PACK_BYTES
    x, w, cot, kw = make_case(rng, 3, (2, 3, 2), 192, 130, (3, 3, 3), stride=(1, 2, 2),
                              padding=(1, 0, 1), groups=groups, batch=1)
    assert w.size * 4 > PARALLEL_PACK_BYTES
    spec, _, _ = spec_for(3, x, w, **kw)
    _assert_native_vjp(spec, x, w, cot, *loops_vjp(x, w, cot, **kw))


# (C_in/g in vectors, C_out/g, groups, input W, W kernel, W padding): few sums per tap
# (C_out/g times C_in/g's vectors below 8), where tiles of taps share each pixel's x
# vectors; one to five vectors (a chunk of four and a remainder), rows with and without
# pixels that every tap of a tile reaches (W 2 against a kernel 4 wide).
FEW_SUMS = [(1, 1, 1, 9, 4, 1), (2, 3, 1, 9, 3, 1), (5, 1, 2, 7, 2, 0), (1, 2, 3, 2, 4, 2),
            (3, 1, 1, 11, 5, 3), (4, 3, 1, 9, 3, 1), (5, 3, 2, 7, 2, 0)]


def few_sums(vectors: int, c_out: int, max_vectors: int) -> bool:
    """The kernel's rule (grad_weight.hpp): below a register block's broadcast values
    with three or four vectors of C_in/g, else below 8 sums."""
    nv = min(vectors, max_vectors)
    return c_out < {3: 8, 4: 6}[nv] if nv >= 3 else c_out * nv < 8


@pytest.mark.parametrize("vectors,c_out,groups,width,kw,pw", FEW_SUMS,
                         ids=[f"v{a}-co{b}-g{c}-w{d}-k{e}" for a, b, c, d, e, _ in FEW_SUMS])
def test_grad_weight_few_sums_per_tap(vectors, c_out, groups, width, kw, pw, isa, rng):
    """Heads with one to three output channels: grad_weight sums tiles of taps together
    over each row. Every tap's sum must match the loop reference, and its bits must not
    depend on the thread count (which decides which taps share a tile)."""
    from test_vjp import loops_vjp, make_case

    from convtranspose._api import spec_for
    from convtranspose._vjp import native_grad_weight_layout, vjp_arrays
    lanes, max_vectors = native.layout(4)
    c_in = vectors * lanes * groups
    x, w, cot, kws = make_case(rng, 3, (3, 5, width), c_in, c_out * groups, (3, 4, kw),
                               stride=(2, 1, 2), padding=(1, 2, pw), dilation=(1, 1, 2),
                               groups=groups, batch=2)
    spec, _, _ = spec_for(3, x, w, **kws)
    x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
    c3 = cot.reshape(spec.batch, *spec.out_spatial, spec.c_out)
    assert (native_grad_weight_layout(spec, x3, c3, np.dtype(np.float32))
            == native.GradWeightLayout.ALONG_IN)
    assert few_sums(vectors, c_out, max_vectors)
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

    from convtranspose import _vjp, _vjp_native
    from convtranspose._api import spec_for
    monkeypatch.setattr(_vjp, "GROUPS_SIDE_BY_SIDE", False)  # a group at a time here
    runs = []
    real = _vjp_native.both_gradients
    monkeypatch.setattr(_vjp_native, "both_gradients",
                        lambda *a: (runs.append(a[-1]), real(*a)))
    lanes, _ = native.layout(4)
    c_in = vectors * lanes * groups
    # Enough rows for a row tile per thread (`fused_pass_suits`: the pass fuses only so),
    # tiles being at least MIN_TILE_ROWS positions.
    height = max(5, math.ceil(3 * MIN_TILE_ROWS / (2 * 3 * width)))
    for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        x, w, cot, kws = make_case(rng, 3, (3, height, width), c_in, c_out * groups, (3, 4, kw),
                                   stride=(2, 1, 2), padding=(1, 2, pw), dilation=(1, 1, 2),
                                   groups=groups, batch=2, dtypes=(dtype,) * 3)
        spec, _, _ = spec_for(3, x, w, **kws)
        rx, rw = loops_vjp(x, w, cot, **kws)
        runs.clear()
        results = [_vjp.vjp_arrays(spec, x, w, cot, threads=t, algorithm="native")
                   for t in (1, 2, 3)]  # native: these small calls would take 'indexed'
        x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
        c3 = cot.reshape(spec.batch, *spec.out_spatial, spec.c_out)
        fuses = native.fuses_grad_input(np.dtype(dtype).itemsize, c_in // groups, c_out)
        # the rule: few sums, with C_in/g in one vector or two whole ones
        dlanes, max_vectors = native.layout(np.dtype(dtype).itemsize)
        dvectors = c_in // groups // dlanes
        assert fuses == (c_out * min(dvectors, max_vectors) < 8 and dvectors <= 2)
        fused = fuses and (_vjp.native_grad_weight_layout(spec, x3, c3, np.dtype(dtype))
                           == native.GradWeightLayout.ALONG_IN)
        assert all(_vjp_native.fused_pass_suits(spec, t, dlanes) for t in (1, 2, 3))
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
    from convtranspose._vjp_native import tap_offsets
    x = rng.standard_normal((1, 4, 4, 4, 16)).astype(np.float32)
    w = rng.standard_normal((16, 2, 2, 2, 16)).astype(np.float32)
    spec, _, _ = spec_for(3, x, w, stride=2)
    cot = np.zeros(spec.output_shape, np.float32)
    assert not native.fuses_grad_input(4, 16, 16)
    part = np.zeros((16, 8, 16), np.float32)
    with pytest.raises(ValueError, match="grad_input in the same pass"):
        native.grad_weight(True, x, 0, cot, 0, tap_offsets(spec), spec.stride, part,
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
                                                                   rng, monkeypatch):
    """With ~96 or more broadcast blocks, grad_weight copies the vector side's rows of a
    batch to a line boundary when they are not on one: the bits must not depend on where
    the caller's arrays start (4 and 16 bytes past a line, or on one)."""
    from test_vjp import loops_vjp, make_case

    import convtranspose._vjp as vjp_module
    from convtranspose._api import spec_for
    # vectors along C_out wherever they fill (on so few pixels the unpack would decide)
    monkeypatch.setattr(vjp_module, "ALONG_IN_EXTRA", float("inf"))
    from convtranspose._vjp import native_grad_weight_layout, vjp_arrays
    x, w, cot, kw = make_case(rng, 3, (2, 3, 13), c_in, c_out, (2, 3, 3), stride=(1, 2, 2),
                              padding=(0, 1, 1), groups=1, batch=1)
    spec, _, _ = spec_for(3, x, w, **kw)
    layout = native_grad_weight_layout(spec, x.reshape(spec.batch, *spec.in_spatial, c_in),
                                       cot.reshape(spec.batch, *spec.out_spatial, c_out),
                                       np.dtype(np.float32))
    lanes, _ = native.layout(4)
    along_in = swapped and c_out % lanes != 0  # generic's 4 lanes take 100 whole
    assert layout == (native.GradWeightLayout.ALONG_IN if along_in
                      else native.GradWeightLayout.ALONG_OUT)
    rw = loops_vjp(x, w, cot, **kw)[1]
    results = []
    for offset in (0, 4, 16):
        _, gw = vjp_arrays(spec, _shifted(x, offset), w, _shifted(cot, offset),
                           need_input=False, algorithm="native", threads=1)
        np.testing.assert_allclose(gw, rw, atol=1e-5 * np.abs(rw).max(), rtol=0)
        results.append(gw.copy())
    for gw in results[1:]:
        np.testing.assert_array_equal(gw, results[0])


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
    else:  # through the packed layout (on so few pixels the unpack would decide)
        monkeypatch.setattr(vjp_module, "ALONG_IN_EXTRA", float("inf"))
    spec, _, _ = spec_for(3, x, w, **kw)
    x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
    c3 = cot.reshape(spec.batch, *spec.out_spatial, spec.c_out)
    layout = vjp_module.native_grad_weight_layout(spec, x3, c3, np.dtype(np.float32))
    swapped = path == "in-place"
    assert layout == (native.GradWeightLayout.ALONG_IN if swapped
                      else native.GradWeightLayout.ALONG_OUT)
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
    from convtranspose._vjp import native_grad_weight_layout, vjp_arrays
    x, w, cot, kw = make_case(rng, 3, (3, 4, 9), channels, channels, (3, 2, 4),
                              stride=(2, 1, 2), padding=(1, 0, 2), dilation=(1, 2, 1),
                              output_padding=(1, 0, 1), groups=channels, batch=2)
    for dtype in (np.float32, np.float64):
        xd, wd, cd = x.astype(dtype), w.astype(dtype), cot.astype(dtype)
        spec, _, _ = spec_for(3, xd, wd, **kw)
        x3 = xd.reshape(spec.batch, *spec.in_spatial, spec.c_in)
        c3 = cd.reshape(spec.batch, *spec.out_spatial, spec.c_out)
        assert (native_grad_weight_layout(spec, x3, c3, np.dtype(dtype))
                == native.GradWeightLayout.DEPTHWISE)
        _, rw = loops_vjp(xd, wd, cd, **kw)
        for threads in (1, 2):
            _, gw = vjp_arrays(spec, xd, wd, cd, need_input=False, algorithm="native",
                               threads=threads)
            assert gw.dtype == dtype
            np.testing.assert_allclose(gw, rw, atol=1e-5 * np.abs(rw).max(), rtol=0)
            _, again = vjp_arrays(spec, xd, wd, cd, need_input=False, algorithm="native",
                                  threads=threads)
            np.testing.assert_array_equal(again, gw)


@pytest.mark.parametrize("cot_dtype", [np.float32, np.float16])
@pytest.mark.parametrize("kernel, stride, padding", [
    (3, 2, (0, 1, 1)),  # a pixel at each end of a row reaches past it
    ((1, 2, 5), 1, (0, 1, 4)),  # four pixels at each end
])
def test_w_tap_runs_over_a_large_cotangent_pad_the_rows_each_tile_reads(
        isa, rng, monkeypatch, kernel, stride, padding, cot_dtype):
    """Both gradients summing W taps as one over a large cotangent
    (PAD_BY_TILE_FROM_BYTES, lowered here): each tile pads along W the cotangent rows it
    reads as it copies them, and nothing is padded whole. grad_input keeps the bits of the
    whole padded copy; grad_weight (a partial per worker) repeats its own; both match the
    loop reference, on one thread or two."""
    from test_vjp import loops_vjp, make_case

    from convtranspose import _vjp, _vjp_native
    from convtranspose._api import spec_for
    monkeypatch.setattr(_vjp, "ALONG_IN_OVER_WIDE", math.inf)  # WIDE, not along C_in
    x, w, cot, kw = make_case(rng, 3, (4, 6, 12), 5, 3, kernel, stride=stride, padding=padding,
                              batch=2)
    cot = cot.astype(cot_dtype)
    spec, _, _ = spec_for(3, x, w, **kw)
    plan = _vjp.make_vjp_plan(spec, np.dtype(np.float32), threads=2, algorithm="native")
    assert plan.grad_input.wide_w and plan.grad_weight.layout == native.GradWeightLayout.WIDE
    whole = {t: _vjp.vjp_arrays(spec, x, w, cot, threads=t, algorithm="native")
             for t in (1, 2)}
    widths = []
    real = _vjp_native.padded_along_w
    monkeypatch.setattr(_vjp_native, "padded_along_w",
                        lambda *a: (widths.append(a[2]), real(*a))[1])
    monkeypatch.setattr(_vjp_native, "PAD_BY_TILE_FROM_BYTES", 0)
    monkeypatch.setattr(_vjp_native, "PAD_TILE_BYTES", 4096)  # several tiles
    rx, rw = loops_vjp(x, w, cot, **kw)
    for threads in (1, 2):
        gx, gw = _vjp.vjp_arrays(spec, x, w, cot, threads=threads, algorithm="native")
        np.testing.assert_array_equal(gx, whole[threads][0])
        np.testing.assert_allclose(gw, whole[threads][1], atol=1e-6 * np.abs(rw).max(), rtol=0)
        _, again = _vjp.vjp_arrays(spec, x, w, cot, threads=threads, algorithm="native")
        np.testing.assert_array_equal(again, gw)
        np.testing.assert_allclose(gx, rx, atol=1e-5 * np.abs(rx).max(), rtol=0)
        np.testing.assert_allclose(gw, rw, atol=1e-5 * np.abs(rw).max(), rtol=0)
    assert widths == []


def test_both_gradients_summing_w_taps_as_one_pad_the_cotangent_once(isa, rng, monkeypatch):
    """Few output channels and neither side whole vectors: grad_input and grad_weight both
    sum every W tap as one run of a cotangent padded along W. It is padded once, as wide
    as grad_weight's runs need, and each gradient keeps the bits it has alone (grad_input
    alone pads less) and matches the loop reference."""
    from test_vjp import loops_vjp, make_case

    from convtranspose import _vjp, _vjp_native
    from convtranspose._api import spec_for
    monkeypatch.setattr(_vjp, "ALONG_IN_OVER_WIDE", math.inf)  # WIDE, not along C_in
    x, w, cot, kw = make_case(rng, 3, (6, 10, 12), 5, 3, (3, 3, 3), stride=2, padding=(0, 1, 1),
                              batch=2)
    spec, _, _ = spec_for(3, x, w, **kw)
    plan = _vjp.make_vjp_plan(spec, np.dtype(np.float32), threads=2)
    assert plan.grad_input.wide_w and plan.grad_weight.layout == native.GradWeightLayout.WIDE
    widths = []
    real = _vjp_native.padded_along_w
    monkeypatch.setattr(_vjp_native, "padded_along_w",
                        lambda a, left, width, *rest: (widths.append(width),
                                                       real(a, left, width, *rest))[1])
    gx, gw = _vjp.vjp_arrays(spec, x, w, cot, threads=2)
    assert len(widths) == 1
    gx_alone, _ = _vjp.vjp_arrays(spec, x, w, cot, need_weight=False, threads=2)
    _, gw_alone = _vjp.vjp_arrays(spec, x, w, cot, need_input=False, threads=2)
    assert widths[1] < widths[0] == widths[2]  # grad_input alone: a narrower padding
    np.testing.assert_array_equal(gx, gx_alone)
    np.testing.assert_array_equal(gw, gw_alone)
    rx, rw = loops_vjp(x, w, cot, **kw)
    np.testing.assert_allclose(gx, rx, atol=1e-5 * np.abs(rx).max(), rtol=0)
    np.testing.assert_allclose(gw, rw, atol=1e-5 * np.abs(rw).max(), rtol=0)


# (channels, W stride, W padding, W dilation, W output_padding): strided along W with fewer
# channels than a vector (4 lanes on the portable build), where both depthwise passes read
# the cotangent split by W residue (taps of every residue, shifts below zero and past the
# row's end).
BY_RESIDUE = [(1, 2, 0, 1, 0), (3, 2, 2, 1, 1), (1, 3, 1, 2, 2), (3, 4, 3, 1, 0), (2, 3, 0, 2, 1)]


@pytest.mark.parametrize("channels,stride,padding,dilation,output_padding", BY_RESIDUE)
def test_depthwise_gradients_by_w_residue(channels, stride, padding, dilation,
                                          output_padding, isa, rng, monkeypatch):
    """Both gradients read one split, made in pieces on the threads, and each has the
    bits it has alone."""
    from test_vjp import loops_vjp, make_case

    from convtranspose import _vjp, _vjp_native
    from convtranspose._api import spec_for
    x, w, cot, kw = make_case(rng, 3, (3, 4, 11), channels, channels, (2, 3, 5),
                              stride=(2, 1, stride), padding=(0, 1, padding),
                              dilation=(1, 1, dilation), output_padding=(1, 0, output_padding),
                              groups=channels, batch=2)
    spec, _, _ = spec_for(3, x, w, **kw)
    assert _vjp_native._by_residue(spec, np.dtype(np.float32))
    _assert_native_vjp(spec, x, w, cot, *loops_vjp(x, w, cot, **kw))
    splits = []
    real = _vjp_native._residues_along_w
    monkeypatch.setattr(_vjp_native, "_residues_along_w",
                        lambda *a: (splits.append(1), real(*a))[1])
    gx, gw = _vjp.vjp_arrays(spec, x, w, cot, algorithm="native", threads=2)
    assert len(splits) == 1
    gx_alone, _ = _vjp.vjp_arrays(spec, x, w, cot, need_weight=False, algorithm="native",
                                  threads=2)
    _, gw_alone = _vjp.vjp_arrays(spec, x, w, cot, need_input=False, algorithm="native",
                                  threads=2)
    np.testing.assert_array_equal(gx, gx_alone)
    np.testing.assert_array_equal(gw, gw_alone)


@pytest.mark.parametrize("channels", range(1, 16))
def test_depthwise_gradients_every_channel_count_below_a_vector(channels, isa, rng):
    """Every channel count below AVX-512's 16 float lanes, W at step 1 (dense rows: the
    flat pixel * channel dot, one instantiation per channel count) and at stride 2 (split
    by W residue). The cases once stopped at 7 channels, AVX2's lanes less one, and the
    AVX-512 kernel's grad_weight came back all zeros for 8 to 15 channels."""
    from test_vjp import loops_vjp, make_case

    from convtranspose._api import spec_for
    for stride in (1, 2):
        x, w, cot, kw = make_case(rng, 3, (2, 3, 7), channels, channels, (2, 2, 3),
                                  stride=(1, 2, stride), padding=(0, 1, 1),
                                  groups=channels, batch=2)
        spec, _, _ = spec_for(3, x, w, **kw)
        _assert_native_vjp(spec, x, w, cot, *loops_vjp(x, w, cot, **kw))


@pytest.mark.parametrize("shape,kernel", [((1, 40, 37), (1, 2, 3)), ((1, 1, 150), (1, 1, 2))],
                         ids=["2-D", "1-D"])
def test_wide_grad_weight_with_too_few_units_splits_rows(shape, kernel, isa, rng,
                                                         monkeypatch):
    """grad_weight summing W taps as one (WIDE) on a 2-D or 1-D layer has only kD * kH
    (tap, column chunk) units, fewer than two per thread: workers then own row tiles and a
    partial sum each (sharing the units, each streamed every pixel, and two threads ran
    8 -> 2 2-D's grad_weight 4x slower than one). (The 2-D layer's 5 -> 2 channels would
    take layout PLANAR, and with the model's choice vectors along C_in: both turned off
    here.)"""
    from test_vjp import loops_vjp, make_case

    from convtranspose import _vjp
    from convtranspose._api import spec_for
    from convtranspose._vjp import native_grad_weight_layout
    monkeypatch.setattr(_vjp, "PLANAR_MAX_CHANNELS", 0)
    monkeypatch.setattr(_vjp, "ALONG_IN_OVER_WIDE", math.inf)
    x, w, cot, kw = make_case(rng, 3, shape, 5, 2, kernel, padding=(0, 0, 1), batch=2)
    spec, _, _ = spec_for(3, x, w, **kw)
    x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
    c3 = cot.reshape(spec.batch, *spec.out_spatial, spec.c_out)
    assert native_grad_weight_layout(spec, x3, c3, np.dtype(np.float32)) == \
        native.GradWeightLayout.WIDE
    lanes = native.layout(4)[0]
    cols = math.ceil(kernel[2] * 2 / lanes) * lanes
    assert native.gw_units(kernel[0] * kernel[1], cols, 4) < 4  # the row split on 2 threads
    _assert_native_vjp(spec, x, w, cot, *loops_vjp(x, w, cot, **kw))


# Few channels on both sides (layout PLANAR): (dims, input spatial, C_in, C_out, kernel,
# settings). Strides 1-4 along W (the cotangent split by residue), dilation, padding,
# output_padding, groups, rows that fill part of their last vector.
PLANAR = [
    (3, (2, 8, 16), 3, 1, (3, 3, 3), dict(stride=2, padding=1)),
    (3, (2, 8, 30), 7, 3, (2, 3, 4), dict(stride=(1, 2, 3), padding=(0, 1, 2),
                                          output_padding=(0, 1, 2))),
    (2, (16, 47), 8, 4, (7, 7), dict(dilation=2, groups=2)),
    (2, (16, 40), 4, 6, (3, 5), dict(stride=(2, 4), padding=(1, 3), groups=2)),
    (1, (48,), 2, 5, (5,), dict(stride=2, dilation=3, padding=4)),
    (3, (2, 8, 24), 4, 2, (3, 3, 3), dict(stride=2, padding=1, groups=2)),  # a fan-out
    (3, (2, 8, 20), 8, 3, (2, 2, 2), dict(stride=(1, 1, 4))),  # AVX2 fills C_in's vectors
]


@pytest.mark.parametrize("dims,spatial,c_in,c_out,kernel,settings", PLANAR,
                         ids=[f"{p[0]}d-{p[2]}to{p[3]}-{i}" for i, p in enumerate(PLANAR)])
def test_planar_gradients_match_the_loops(dims, spatial, c_in, c_out, kernel, settings,
                                          isa, rng, monkeypatch):
    """Both gradients with vectors along input pixels over planar copies (csrc/
    grad_planar.hpp), apart and together (one cotangent copy for both): they match the
    loop reference in float32 and float64, at one to three threads, and the same bits
    come back at a thread count."""
    from test_vjp import loops_vjp, make_case

    from convtranspose import _vjp
    from convtranspose._api import spec_for
    from convtranspose._vjp import native_grad_weight_layout, vjp_arrays
    monkeypatch.setattr(_vjp, "GROUPS_SIDE_BY_SIDE", False)  # the groups would take it
    for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        batch = 16 if dims == 1 else 1  # 1-D: a row per batch item, 16 rows
        x, w, cot, kws = make_case(rng, dims, spatial, c_in, c_out, kernel, batch=batch,
                                   dtypes=(dtype,) * 3, **settings)
        spec, _, _ = spec_for(dims, x, w, **kws)
        x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
        c3 = cot.reshape(spec.batch, *spec.out_spatial, spec.c_out)
        # grad_weight takes PLANAR where no channel axis is whole vectors (an instruction
        # set of few lanes may fill them: then its channel layout, checked all the same)
        lanes = native.layout(np.dtype(dtype).itemsize)[0]
        whole = spec.c_in_per_group % lanes == 0 or spec.c_out_per_group % lanes == 0
        assert (native_grad_weight_layout(spec, x3, c3, np.dtype(dtype))
                == native.GradWeightLayout.PLANAR) != whole
        plan = _vjp.make_vjp_plan(spec, np.dtype(dtype))
        # grad_input likewise where C_in/g is not whole vectors
        assert plan.grad_input.planar == bool(spec.c_in_per_group % lanes), plan
        assert plan.fan_out is None, plan
        rx, rw = loops_vjp(x, w, cot, **kws)
        for threads in (1, 2, 3):
            gw = vjp_arrays(spec, x, w, cot, need_input=False, threads=threads)[1]
            np.testing.assert_allclose(gw, rw, atol=tol * np.abs(rw).max(), rtol=0)
            gx = vjp_arrays(spec, x, w, cot, need_weight=False, threads=threads)[0]
            np.testing.assert_allclose(gx, rx, atol=tol * np.abs(rx).max(), rtol=0)
            both = vjp_arrays(spec, x, w, cot, threads=threads)
            if plan.grad_input.planar:  # one copy of the cotangent for both: the same bits
                np.testing.assert_array_equal(both[0], gx)
                np.testing.assert_array_equal(both[1], gw)
            np.testing.assert_allclose(both[0], rx, atol=tol * np.abs(rx).max(), rtol=0)
            np.testing.assert_allclose(both[1], rw, atol=tol * np.abs(rw).max(), rtol=0)
            again = vjp_arrays(spec, x, w, cot, need_input=False, threads=threads)[1]
            np.testing.assert_array_equal(again, gw)


def test_planar_declines_strides_of_three_whose_w_residues_meet_one_tap(rng):
    """A stride of 3 or more along H and W with a W kernel no longer than its stride: the
    planar cotangent would hold s_h * s_w times the input's pixels for few products each,
    so the gradients take a channel layout, and still match the loops; with the stride
    along W alone planar stays."""
    from test_vjp import loops_vjp, make_case

    from convtranspose import _vjp
    from convtranspose._api import spec_for
    from convtranspose._vjp import vjp_arrays
    f32 = np.dtype(np.float32)
    for stride, planar in (((4, 4), False), ((3, 3), False), ((1, 4), True)):
        x, w, cot, kws = make_case(rng, 2, (16, 40), 6, 1, (3, 3), batch=1,
                                   dtypes=(np.float32,) * 3, stride=stride)
        spec, _, _ = spec_for(2, x, w, **kws)
        assert _vjp.planar_suits(spec, f32, _vjp.PLANAR_MAX_CHANNELS, None) == planar
        plan = _vjp.make_vjp_plan(spec, f32)
        assert bool(plan.grad_input and plan.grad_input.planar) == planar, plan
        rx, rw = loops_vjp(x, w, cot, **kws)
        gx, gw = vjp_arrays(spec, x, w, cot)
        np.testing.assert_allclose(gx, rx, atol=1e-5 * np.abs(rx).max(), rtol=0)
        np.testing.assert_allclose(gw, rw, atol=1e-5 * np.abs(rw).max(), rtol=0)


def test_planar_bindings_refuse_bad_sizes():
    """The planar copy and kernels check their buffers against the geometry they are given:
    a buffer too short, or a W tap reading past its residue's stretch, is a ValueError,
    never a read or write out of bounds."""
    src = np.zeros((4, 10, 3), np.float32)
    with pytest.raises(ValueError, match="planar_rows"):
        native.planar_rows(src, np.zeros((4, 3, 2, 5), np.float32)[:3], 0, 4, 10, 2, 0, 5)
    with pytest.raises(ValueError, match="planar_rows"):  # stretch too short for 10 / 2
        native.planar_rows(src, np.zeros((4, 3, 2, 4), np.float32), 0, 4, 10, 2, 0, 4)
    lanes = native.layout(4)[0]
    x = native.aligned_zeros((4, 3, lanes), np.float32)  # rows (n, d, h) = (1, 1, 4)
    g = np.zeros((4, 1, 1, lanes + 2), np.float32)
    sums = native.aligned_zeros((1, 1, 3, lanes), np.float32)
    # xrow, wv, grow, stretch, res, N, D, H, OD, OH, W, C, taps, strides, c0, cin, o0,
    # cout, row0, row1, D and H offsets, W tap (residue, first element)
    geo = [3 * lanes, lanes, lanes + 2, lanes + 2, 1, 1, 1, 4, 1, 4, lanes, 3, 1, 1, 1, 1, 1,
           0, 3, 0, 1, 0, 4, 0, 0, 0, 2]
    native.planar_grad_weight(x, g, sums, np.array(geo, np.int64))  # fits
    gx = np.zeros((4, lanes, 3), np.float32)
    w = np.zeros((1, 1, 3), np.float32)
    native.planar_grad_input(g, w, gx, np.array(geo, np.int64))  # fits
    for at, value in ((26, 3), (22, 5), (18, 4)):  # past the stretch; rows; channels
        bad = list(geo)
        bad[at] = value
        with pytest.raises(ValueError, match="planar_grad_weight"):
            native.planar_grad_weight(x, g, sums, np.array(bad, np.int64))
        with pytest.raises(ValueError, match="planar_grad_input"):
            native.planar_grad_input(g, w, gx, np.array(bad, np.int64))
    with pytest.raises(ValueError, match="planar_grad_input"):  # grad_input too short
        native.planar_grad_input(g, w, gx[:3], np.array(geo, np.int64))


# (C_in/g short of whole vectors by `spare` lanes, C_out/g, groups, kernel): grad_weight
# with vectors along C_in/g whose last vector is partial, x read where it lies: the few
# sums tiles (one to three vectors), both gradients in one pass, register blocks of many
# sums (C_out/g 20), rows copied to a line boundary (C_out/g 100), and a 1x1x1 kernel's
# per-worker partial sums.
PARTIAL = [(1, 1, 3, 1, 3), (1, 15, 2, 2, 3), (2, 1, 1, 1, 2), (3, 5, 3, 1, 2),
           (1, 1, 20, 1, 3), (2, 3, 100, 1, 2), (1, 3, 7, 2, 1)]


@pytest.mark.parametrize("vectors,spare,c_out,groups,k", PARTIAL,
                         ids=[f"v{a}-s{b}-co{c}-g{d}-k{e}" for a, b, c, d, e in PARTIAL])
def test_grad_weight_along_a_partial_last_vector(vectors, spare, c_out, groups, k, isa, rng):
    """No lane past C_in/g is written to grad_input (there lie the next pixel's channels,
    in a row another thread may own) nor left out of grad_weight: both gradients, from
    arrays filled with NaN, match the loop reference, in float32 and float64, on 1 and
    2 threads, and grad_input's bits do not depend on the thread count."""
    from test_vjp import loops_vjp, make_case

    from convtranspose import _vjp_native
    from convtranspose._api import spec_for
    for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        lanes, _ = native.layout(np.dtype(dtype).itemsize)
        cig = vectors * lanes - min(spare, lanes - 1)
        x, w, cot, kws = make_case(rng, 3, (2, 5, 9), cig * groups, c_out * groups, k,
                                   stride=(2, 1, 2), padding=(0, min(1, k - 1), 0),
                                   groups=groups, dtypes=(dtype,) * 3)
        spec, x3, w3 = spec_for(3, x, w, **kws)
        rx, rw = loops_vjp(x, w, cot, **kws)
        rw = rw.reshape(spec.c_out, -1, cig)
        fuses = native.fuses_grad_input(np.dtype(dtype).itemsize, cig, c_out)
        gxs = []
        for threads in (1, 2):
            gw = np.full(rw.shape, np.nan, dtype)
            _vjp_native.grad_weight(spec, x3, cot, gw, threads,
                                    native.GradWeightLayout.ALONG_IN, np.dtype(dtype))
            np.testing.assert_allclose(gw, rw, atol=tol * np.abs(rw).max(), rtol=0)
            if fuses:
                gx, gw = np.full(x.shape, np.nan, dtype), np.full(rw.shape, np.nan, dtype)
                _vjp_native.both_gradients(spec, x3, cot, w3, gx, gw, threads,
                                           np.dtype(dtype))
                np.testing.assert_allclose(gx, rx, atol=tol * np.abs(rx).max(), rtol=0)
                np.testing.assert_allclose(gw, rw, atol=tol * np.abs(rw).max(), rtol=0)
                gxs.append(gx)
        if fuses:
            np.testing.assert_array_equal(gxs[1], gxs[0])


@pytest.mark.parametrize("groups", [2, 3])
def test_grad_weight_on_one_row_shares_the_groups_out(groups, rng):
    """One long 1-D row has one row tile: grad_weight's jobs are (tile, group) pairs, and
    units numbered across the groups, so that the threads share the groups. Every group's
    sums are right (none left unwritten by a worker that never touched that group) on
    1-3 threads, by units and by row tiles (a 1x1x1 kernel), alone and with grad_input in
    the same pass; and 3 threads reproduce their own bits."""
    from test_vjp import loops_vjp, make_case

    from convtranspose import _vjp_native
    from convtranspose._api import spec_for
    assert len(_vjp_native._tile_group_pairs(
        spec_for(1, np.zeros((1, 500, 2 * groups), np.float32),
                 np.zeros((groups, 2, 2), np.float32), 2, 0, 1, 0, groups)[0], groups, 2)) == groups
    layout = native.GradWeightLayout.ALONG_IN
    for cig, cog, k in ((3, 1, 2), (5, 2, 1), (17, 3, 3)):
        x, w, cot, kws = make_case(rng, 3, (1, 1, 300), cig * groups, cog * groups, (1, 1, k),
                                   stride=(1, 1, 2), groups=groups)
        spec, x3, w3 = spec_for(3, x, w, **kws)
        rx, rw = loops_vjp(x, w, cot, **kws)
        rw = rw.reshape(spec.c_out, -1, cig)
        fuses = native.fuses_grad_input(4, cig, cog)
        for threads in (1, 2, 3):
            gw = np.full(rw.shape, np.nan, np.float32)
            _vjp_native.grad_weight(spec, x3, cot, gw, threads, layout, np.dtype(np.float32))
            np.testing.assert_allclose(gw, rw, atol=1e-5 * np.abs(rw).max(), rtol=0)
            if fuses:
                gx = np.full(x.shape, np.nan, np.float32)
                both = np.full(rw.shape, np.nan, np.float32)
                _vjp_native.both_gradients(spec, x3, cot, w3, gx, both, threads,
                                           np.dtype(np.float32))
                np.testing.assert_allclose(gx, rx, atol=1e-5 * np.abs(rx).max(), rtol=0)
                np.testing.assert_allclose(both, rw, atol=1e-5 * np.abs(rw).max(), rtol=0)
        again = np.empty_like(gw)
        _vjp_native.grad_weight(spec, x3, cot, again, 3, layout, np.dtype(np.float32))
        np.testing.assert_array_equal(again, gw)


@pytest.mark.parametrize("c_out,k", [(1, 2), (13, 4)])
def test_few_inputs_one_group_pick_the_layout_with_fuller_vectors(c_out, k, isa, monkeypatch):
    """One group, 3 input channels: where they are under half a vector (AVX2, AVX-512),
    WIDE where its columns (kW * C_out: 52) fill their vectors, along C_in where they
    would fill fewer lanes still (2: 3 -> 1 k2 s2's grad_weight took 17.4 ms WIDE, 4.0
    along C_in); with 4 lanes, along C_in. (PLANAR, which these would take where its
    copies fit, turned off.)"""
    from convtranspose import _vjp
    from convtranspose._api import spec_for
    monkeypatch.setattr(_vjp, "PLANAR_MAX_CHANNELS", 0)
    spec, x3, _ = spec_for(3, np.zeros((1, 8, 10, 40, 3), np.float32),
                           np.zeros((c_out, k, k, k, 3), np.float32), stride=2)
    c3 = np.zeros((1, *spec.out_spatial, spec.c_out), np.float32)
    want = "WIDE" if c_out == 13 and native.layout(4)[0] >= 8 else "ALONG_IN"
    assert (_vjp.native_grad_weight_layout(spec, x3.reshape(1, 8, 10, 40, 3), c3,
                                           np.dtype(np.float32))
            == native.GradWeightLayout[want])


# Long 1-D rows that the gradients cut along W (`_plan.cut_rows`): grouped with one output
# a group, vectors along C_out, a few-sums head (both in one pass), depthwise by W residue,
# a channel multiplier. (C_in, C_out, groups, kernel, stride, padding, dilation)
CUT_ROWS = [(28, 4, 4, 3, 1, 2, 2), (16, 16, 1, 3, 2, 1, 1), (16, 1, 1, 4, 2, 1, 1),
            (6, 6, 6, 5, 3, 0, 1), (6, 12, 6, 3, 2, 1, 1)]


@pytest.mark.parametrize("c_in,c_out,groups,k,stride,padding,dilation", CUT_ROWS,
                         ids=[str(c) for c in CUT_ROWS])
def test_gradients_over_long_rows_cut_along_w(c_in, c_out, groups, k, stride, padding,
                                              dilation, rng):
    """A row of 6000 pixels in pieces (every piece's taps reach its neighbours' cotangent,
    the row's true ends still bound them): both gradients on one and two threads match
    the loop reference, and each grad_weight layout that takes the layer does too, from
    NaN (a pixel no piece covered would show)."""
    from test_vjp import loops_vjp, make_case

    from convtranspose import _vjp_native
    from convtranspose._api import spec_for
    x, w, cot, kws = make_case(rng, 1, 6000, c_in, c_out, k, stride=stride, padding=padding,
                               dilation=dilation, output_padding=stride - 1, groups=groups,
                               batch=1)
    spec = spec_for(1, x, w, **kws)[0]
    x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
    w3 = w.reshape(spec.c_out, -1, spec.c_in_per_group)
    assert any(t.w is not None and t.w[0] > 0
               for t in _vjp_native._grad_weight_row_tiles(spec, 2))
    rx, rw = loops_vjp(x, w, cot, **kws)
    _assert_native_vjp(spec, x, w, cot, rx, rw)
    c3 = cot.reshape(spec.batch, *spec.out_spatial, spec.c_out)
    rw3 = rw.reshape(w3.shape)
    whole = spec.c_out_per_group % native.layout(4)[0] == 0  # ALONG_OUT's vectors
    layouts = ([native.GradWeightLayout.DEPTHWISE] if spec.c_in_per_group == 1
               and spec.c_out_per_group == 1 else
               [native.GradWeightLayout.ALONG_IN] + [native.GradWeightLayout.ALONG_OUT] * whole)
    for layout in layouts:
        for threads in (1, 2):
            gw = np.full(w3.shape, np.nan, np.float32)
            _vjp_native.grad_weight(spec, x3, c3, gw, threads, layout, np.dtype(np.float32))
            np.testing.assert_allclose(gw, rw3, atol=1e-5 * np.abs(rw).max(), rtol=0)
    if _vjp_native.grad_input_mode(spec) != native.DEPTHWISE:  # (else through a fan-out)
        gx = np.full(x3.shape, np.nan, np.float32)
        _vjp_native.grad_input(spec, c3, w3, gx, 2, 1 << 26, np.dtype(np.float32))
        np.testing.assert_allclose(gx.reshape(rx.shape), rx, atol=1e-5 * np.abs(rx).max(),
                                   rtol=0)


# Grouped layers of few channels a group (`groups_side_by_side`): (dims, input spatial,
# C_in, C_out, kernel, settings). Two channels a group on both sides, fan-outs of one
# output a group (C_in two whole vectors on AVX-512), three outputs a group with stride,
# padding and output_padding on every axis, C_in/g 10 (a partial second vector), a
# cotangent row of a whole vector (C_out 16), stride above the kernel, C_in of three
# and four vectors.
SIDE_BY_SIDE = [
    (3, (3, 5, 9), 8, 8, (1, 1, 7), dict(stride=2, groups=4)),
    (2, (9, 23), 32, 4, (4, 4), dict(stride=3, groups=4)),
    (3, (4, 5, 7), 6, 9, (3, 2, 3), dict(stride=(1, 2, 3), padding=(1, 0, 2),
                                         output_padding=(0, 1, 2), groups=3)),
    (1, (40,), 20, 4, (5,), dict(stride=2, dilation=2, padding=3, groups=2)),
    (2, (7, 12), 12, 16, (3, 3), dict(stride=(2, 1), groups=4)),
    (2, (5, 40), 16, 2, (2, 3), dict(stride=(1, 4), padding=(0, 1), groups=2)),
    (3, (3, 4, 5), 56, 4, (3, 3, 3), dict(stride=(2, 2, 3), groups=4)),
    (2, (6, 13), 40, 8, (3, 4), dict(stride=2, padding=1, groups=4)),
]


@pytest.mark.parametrize("dims,spatial,c_in,c_out,kernel,settings", SIDE_BY_SIDE,
                         ids=[f"{p[0]}d-{p[2]}to{p[3]}-{i}" for i, p in enumerate(SIDE_BY_SIDE)])
def test_groups_side_by_side_match_the_loops(dims, spatial, c_in, c_out, kernel, settings,
                                             isa, rng):
    """Every conv group's channels in one pass, each lane taking its own group's cotangent
    channel (`groups_side_by_side`: few channels a group, every group's cotangent
    channels in a vector, C_in in a chunk): both gradients in one pass, and grad_weight alone,
    match the loop reference in float32 and float64 at one to three threads, the same
    bits coming back; the plan takes the pass only inside that domain, and what it runs
    matches the reference too."""
    from test_vjp import loops_vjp, make_case

    from convtranspose import _vjp, _vjp_native
    from convtranspose._api import spec_for
    taken = 0
    for dtype, tol in ((np.float32, 1e-5), (np.float64, 1e-12)):
        x, w, cot, kws = make_case(rng, dims, spatial, c_in, c_out, kernel, batch=2,
                                   dtypes=(dtype,) * 3, **settings)
        spec = spec_for(dims, x, w, **kws)[0]
        lanes, vectors = native.layout(np.dtype(dtype).itemsize)
        side = _vjp_native.groups_side_by_side(spec, lanes, vectors)
        assert side == (spec.c_in_per_group < lanes and c_out <= lanes
                        and c_in <= vectors * lanes)
        plan = _vjp.make_vjp_plan(spec, np.dtype(dtype))
        if plan.grad_weight.layout == native.GradWeightLayout.SIDE_BY_SIDE:
            assert side and plan.grad_input.with_grad_weight, plan
        rx, rw = loops_vjp(x, w, cot, **kws)
        gx, gw = _vjp.vjp_arrays(spec, x, w, cot)  # the plan's choice
        np.testing.assert_allclose(gx, rx, atol=tol * np.abs(rx).max(), rtol=0)
        np.testing.assert_allclose(gw, rw, atol=tol * np.abs(rw).max(), rtol=0)
        alone = _vjp.make_vjp_plan(spec, np.dtype(dtype), need_weight=False)
        if alone.grad_input.layout == native.GradWeightLayout.SIDE_BY_SIDE:
            assert side and alone.grad_weight is None, alone  # the pass, its sums dropped
        for threads in (1, 2):
            gx_alone = _vjp.vjp_arrays(spec, x, w, cot, need_weight=False, threads=threads)[0]
            np.testing.assert_allclose(gx_alone, rx, atol=tol * np.abs(rx).max(), rtol=0)
        if not side:
            continue
        taken += 1
        x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
        c3 = cot.reshape(spec.batch, *spec.out_spatial, spec.c_out)
        w3 = w.reshape(spec.c_out, -1, spec.c_in_per_group)
        rw3 = rw.reshape(w3.shape)
        for threads in (1, 2, 3):
            runs = []
            for _ in range(2):
                gx = np.full(x3.shape, np.nan, dtype)
                gw = np.full(w3.shape, np.nan, dtype)
                _vjp_native.both_gradients(spec, x3, c3, w3, gx, gw, threads,
                                           np.dtype(dtype), side_by_side=True)
                alone = np.full(w3.shape, np.nan, dtype)
                _vjp_native.grad_weight(spec, x3, c3, alone, threads,
                                        native.GradWeightLayout.SIDE_BY_SIDE, np.dtype(dtype))
                runs.append((gx, gw, alone))
            for got, want in zip(runs[0], (rx.reshape(x3.shape), rw3, rw3)):
                np.testing.assert_allclose(got, want, atol=tol * np.abs(want).max(), rtol=0)
            for first, again in zip(*runs):
                np.testing.assert_array_equal(again, first)
    # float32 on AVX-512 takes it on every layer here
    assert taken >= (native.layout(4)[0] == 16)


def test_groups_side_by_side_weighed_on_avx2_only_for_whole_vectors(monkeypatch):
    """On the AVX2 build the planner leaves the groups side by side out where every
    group's channels together leave a partial vector and the stride along W is 1 (masked
    loads and stores of each pixel, once per tile of sums); whole vectors, strides along
    W, and AVX-512's masks keep it."""
    from convtranspose import _vjp
    from convtranspose._api import spec_for

    def spec(c_in, groups, stride=1):
        x = np.zeros((2, 40, 50, c_in), np.float32)
        w = np.zeros((c_in, 3, 3, c_in // groups), np.float32)
        return spec_for(2, x, w, stride=(1, stride), padding=(1, 1), dilation=(1, 1),
                        output_padding=(0, 0), groups=groups)[0]

    partial, whole = spec(6, 2), spec(8, 4)
    f32 = np.dtype(np.float32)
    if native.isa() == "avx2":  # this host's plan
        plan = _vjp.make_vjp_plan(partial, f32)
        assert plan.grad_weight.layout != native.GradWeightLayout.SIDE_BY_SIDE, plan
    for isa, lanes, pays_partial in (("avx2", 8, False), ("avx512", 16, True)):
        monkeypatch.setattr(native, "isa", lambda isa=isa: isa)
        monkeypatch.setattr(native, "layout", lambda item, lanes=lanes: (lanes * 4 // item, 2))
        assert _vjp.side_by_side_pays(partial, f32) == pays_partial
        assert _vjp.side_by_side_pays(whole, f32)  # 8 channels: AVX2's whole vector
        assert _vjp.side_by_side_pays(spec(16, 4), f32)
        assert _vjp.side_by_side_pays(spec(6, 2, stride=2), f32)
    monkeypatch.undo()


def test_groups_side_by_side_refuse_rows_past_a_vector(rng):
    """The kernel refuses conv groups side by side whose cotangent channels would not fit
    one vector, or whose C_in is not whole groups."""
    from convtranspose._api import spec_for
    from convtranspose._vjp_native import tap_offsets
    lanes = native.layout(4)[0]
    x = rng.standard_normal((1, 4, 4, 4, 4)).astype(np.float32)
    w = rng.standard_normal((2 * lanes, 2, 2, 2, 2)).astype(np.float32)
    spec, _, _ = spec_for(3, x, w, stride=2, groups=2)
    cot = np.zeros(spec.output_shape, np.float32)
    part = np.zeros((lanes, 8, lanes), np.float32)
    for cout, group_cin in ((lanes, 2), (1, 3)):
        with pytest.raises(ValueError, match="side by side"):
            native.grad_weight(True, x, 0, cot, 0, tap_offsets(spec), spec.stride, part,
                               (0, 1, 0, 4, 0, 4), 4, cout, strides=(8 * lanes, lanes),
                               group_cin=group_cin)
