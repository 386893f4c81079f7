"""The ``winograd`` algorithm: Winograd F(2,3) along a stride-1 D axis of three taps, on
the compiled kernel. Its sums are rounded in another order than the direct sum, so it is
checked against the float64 reference within each dtype's tolerance, and against the
direct kernel within float32 rounding, on every instruction set; its bits must not depend
on the thread count's scheduling, and switching it off must give the direct kernel's bits.
CI builds the kernel: these tests fail, not skip, without it."""

from __future__ import annotations

import numpy as np
import pytest
from reference import Case, conv_transpose_ref, magnitude_ref

import convtranspose as ct
from convtranspose import _native_kernel as native
from convtranspose import _plan

# Each crosses an edge of the pairing: an odd output depth (a last pair of one output),
# D padding of 0, 2 and -1 (taps reading outside at either end, or cropped), output_padding
# along D, H/W strides and dilations (phases, merged W residues), groups, batches,
# C_out that is not whole vectors or spans several chunks of the packed weight.
CASES = [
    Case("k3s1p1", 2, (5, 3, 4), 16, 12, (3, 3, 3), padding=1),
    Case("odd-depth", 1, (6, 4, 3), 16, 24, (3, 3, 3), padding=1, output_padding=(1, 0, 0)),
    Case("pad0", 1, (4, 3, 5), 20, 17, (3, 2, 3), padding=(0, 1, 1)),
    Case("pad2", 1, (7, 3, 4), 16, 40, (3, 3, 1), padding=(2, 1, 0)),
    Case("negpad", 1, (3, 4, 4), 16, 16, (3, 3, 3), padding=(-1, 1, 1)),
    Case("in-depth-1", 2, (1, 4, 4), 16, 12, (3, 3, 3)),
    Case("aniso", 1, (4, 3, 5), 32, 13, (3, 2, 3), stride=(1, 2, 1), padding=(2, 0, 1),
         dilation=(1, 1, 2), output_padding=(0, 1, 0)),
    Case("merged-w", 1, (5, 4, 4), 16, 32, (3, 4, 4), stride=(1, 2, 2), padding=1),
    Case("groups", 3, (4, 3, 3), 32, 24, (3, 3, 3), padding=1, groups=2),
    Case("chunks", 1, (4, 3, 6), 16, 130, (3, 3, 3), padding=1),
]


def _plan_for(case: Case, dtype="float32", **kw) -> ct.Plan:
    return ct.plan(case.input_shape, case.weight_shape, **case.kwargs, dtype=dtype, **kw)


def test_every_case_fits_and_real_layers_get_it():
    for case in CASES:
        spec = _plan_for(case).spec
        assert _plan.winograd_fits(spec, _plan.workspace_limit(spec, None)), case.id
    # The planner picks it on its own where the layer is big enough (these small cases go
    # to 'indexed'): W5 and W8 of the benchmark.
    assert ct.plan((1, 16, 32, 32, 64), (64, 3, 3, 3, 64), padding=1).algorithm == "winograd"
    w8 = ct.plan((1, 8, 32, 32, 128), (64, 3, 4, 4, 128), stride=(1, 2, 2), padding=1)
    assert w8.algorithm == "winograd"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_reference_every_isa(case, isa, rng, random_array, assert_close):
    for dtype in ("float32", "float64"):
        x = random_array(rng, case.input_shape, dtype)
        w = random_array(rng, case.weight_shape, dtype)
        p = _plan_for(case, dtype, algorithm="winograd")
        out = ct.run_plan(p, x, w)
        assert out.dtype == np.dtype(dtype) and out.shape == case.output_shape
        assert_close(out, conv_transpose_ref(x, w, **case.kwargs), dtype,
                     magnitude_ref(x, w, **case.kwargs), what=f"{case.id} {isa} {dtype}")


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES[:3], ids=[c.id for c in CASES[:3]])
def test_half_precision_matches_reference(case, dtype, rng, random_array, assert_close):
    # Computed in float32 from a converted input, rounded as stored.
    x = random_array(rng, case.input_shape, dtype)
    w = random_array(rng, case.weight_shape, dtype)
    out = ct.run_plan(_plan_for(case, x.dtype, algorithm="winograd"), x, w)
    assert out.dtype == np.dtype(x.dtype)
    assert_close(out, conv_transpose_ref(x, w, **case.kwargs), out.dtype,
                 magnitude_ref(x, w, **case.kwargs), what=f"{case.id} {dtype}")


def test_close_to_the_direct_sum(rng):
    # Both are float32 sums of the same products: they differ by rounding only, and by
    # about as much as either differs from the exact (float64) result.
    x = rng.standard_normal((1, 8, 8, 8, 64)).astype(np.float32)
    w = rng.standard_normal((32, 3, 3, 3, 64)).astype(np.float32)
    shapes = (x.shape, w.shape)
    wino = ct.run_plan(ct.plan(*shapes, padding=1, algorithm="winograd"), x, w)
    direct = ct.run_plan(ct.plan(*shapes, padding=1, algorithm="native"), x, w)
    exact = conv_transpose_ref(x.astype(np.float64), w.astype(np.float64), padding=1)
    scale = np.abs(exact).max()
    assert not np.array_equal(wino, direct)  # really another algorithm
    assert np.abs(wino - exact).max() <= 4 * max(np.abs(direct - exact).max(), 1e-7 * scale)
    assert np.abs(wino - direct).max() <= 1e-5 * scale


def test_strided_input_and_other_dtypes(rng, assert_close):
    # Channels not contiguous, and an input of another dtype than the weight: converted
    # once, then transformed. The caller's arrays are left as they were.
    case = CASES[0]
    base = rng.standard_normal((*case.input_shape[:-1], 2 * case.c_in)).astype(np.float32)
    x = base[..., ::2]
    w = rng.standard_normal(case.weight_shape).astype(np.float64)
    x_before, w_before = x.copy(), w.copy()
    out = ct.run_plan(_plan_for(case, algorithm="winograd"), x, w)
    assert out.dtype == np.float64
    assert_close(out, conv_transpose_ref(x, w, **case.kwargs), np.float64,
                 magnitude_ref(x, w, **case.kwargs))
    assert np.array_equal(x, x_before) and np.array_equal(w, w_before)


@pytest.mark.parametrize("case", [CASES[0], CASES[7], CASES[8]],
                         ids=["k3s1p1", "merged-w", "groups"])
def test_threads_sharing_tiles_hold_the_same_bits(case, rng, small_calls_threaded,
                                                  monkeypatch):
    # Tiles are shared by threads through the kernel's row cursor: three calls claiming
    # rows at once must compute each row once, and every row the same as one thread does.
    from test_native_threads import _three_calls_per_shared_tile

    x = rng.standard_normal(case.input_shape).astype(np.float32)
    w = rng.standard_normal(case.weight_shape).astype(np.float32)
    alone = ct.run_plan(_plan_for(case, algorithm="winograd", threads=1), x, w)
    p = _plan_for(case, algorithm="winograd", threads=2)
    assert p.threads == 2
    assert np.array_equal(ct.run_plan(p, x, w), alone)
    shared_calls = _three_calls_per_shared_tile(monkeypatch)
    assert np.array_equal(ct.run_plan(p, x, w), alone)
    assert shared_calls, "no tile was shared"


def test_switching_it_off_gives_the_direct_kernels_bits(rng, monkeypatch):
    x = rng.standard_normal((1, 12, 16, 16, 32)).astype(np.float32)  # big enough to take it
    w = rng.standard_normal((32, 3, 3, 3, 32)).astype(np.float32)
    direct = ct.run_plan(ct.plan(x.shape, w.shape, padding=1, algorithm="native"), x, w)
    wino = ct.conv_transpose3d(x, w, padding=1)  # the default plan, kept for repeats
    assert ct.get_winograd() and not np.array_equal(wino, direct)
    try:
        ct.set_winograd(False)
        assert ct.plan(x.shape, w.shape, padding=1).algorithm == "native"
        # a repeated call follows the switch (its kept plan is keyed by it)
        assert np.array_equal(ct.conv_transpose3d(x, w, padding=1), direct)
        ct.set_winograd(None)
        monkeypatch.setenv("CONVTRANSPOSE_WINOGRAD", "0")
        assert not ct.get_winograd()
        assert np.array_equal(ct.conv_transpose3d(x, w, padding=1), direct)
        monkeypatch.delenv("CONVTRANSPOSE_WINOGRAD")
        assert np.array_equal(ct.conv_transpose3d(x, w, padding=1), wino)
    finally:
        ct.set_winograd(None)
    with pytest.raises(ValueError, match="set_winograd"):
        ct.set_winograd(1)


def test_refused_where_it_does_not_fit():
    def refuse(*shapes, match="winograd", **kw):
        with pytest.raises(ValueError, match=match):
            ct.plan(*shapes, algorithm="winograd", **kw)

    refuse((1, 4, 4, 4, 16), (8, 3, 3, 3, 16), stride=2)  # D stride 2
    refuse((1, 4, 4, 4, 16), (8, 3, 3, 3, 16), dilation=(2, 1, 1))
    refuse((1, 4, 4, 4, 16), (8, 2, 3, 3, 16))  # two D taps
    refuse((1, 4, 4, 4, 8), (8, 3, 3, 3, 8))  # too few input channels
    refuse((1, 4, 6, 16), (8, 3, 3, 16))  # 2-D: D is a lifted axis of one tap
    # Its transformed input is twice the input: a workspace below that refuses it, and the
    # default planner then picks the direct kernel.
    refuse((1, 12, 16, 16, 32), (32, 3, 3, 3, 32), padding=1, workspace=1 << 16)
    tight = ct.plan((1, 12, 16, 16, 32), (32, 3, 3, 3, 32), padding=1, workspace=1 << 16)
    assert tight.algorithm == "native"
    roomy = ct.plan((1, 12, 16, 16, 32), (32, 3, 3, 3, 32), padding=1, workspace=1 << 20)
    assert roomy.algorithm == "winograd"
    assert roomy.workspace_bytes == 1 * 6 * 4 * 16 * 16 * 32 * 4  # V: (N, pairs, 4, H, W, C)
    assert "winograd" in str(roomy)


def test_kernel_refuses_pairs_outside_channels_mode(rng):
    # The kernel checks what it is handed: pairs need four D taps in channels mode.
    x = np.zeros((1, 4, 3, 3, 16), np.float32)
    out = np.zeros((1, 4, 3, 3, 16), np.float32)
    packed = np.zeros(27 * 16 * 16, np.float32)
    offsets = native.TapOffsets([[0, 1, 2], [0, 1, 2], [0, 1, 2]])
    x_addr, xs = native.origin(x)
    o_addr, os_ = native.origin(out)
    with pytest.raises(ValueError, match="Winograd"):
        native.correlate(native.CHANNELS, 4, 0, False, x_addr, xs, (4, 3, 3), packed,
                         offsets, (1, 1, 1), o_addr, os_, (0, 1, 0, 2, 0, 3), 3, 16, 16,
                         pair_out=4)


# ---- grad_input ---------------------------------------------------------------------------

# grad_input is a correlation of the cotangent (C_out channels reduced, C_in out): pairs of
# grad_input planes along D where D has stride 1 and three taps, C_out/g >= 16.
VJP_CASES = [
    Case("gx-k3s1p1", 2, (5, 3, 4), 12, 16, (3, 3, 3), padding=1),
    Case("gx-odd-depth", 1, (5, 4, 3), 24, 32, (3, 3, 3), padding=(2, 1, 1)),
    Case("gx-aniso", 1, (4, 3, 5), 13, 16, (3, 2, 3), stride=(1, 2, 1), padding=(0, 0, 1),
         dilation=(1, 1, 2), output_padding=(0, 1, 0)),
    Case("gx-groups", 2, (4, 3, 3), 24, 48, (3, 3, 3), padding=1, groups=2),
    Case("gx-negpad", 1, (6, 3, 4), 16, 16, (3, 3, 3), padding=(-1, 1, 1)),
]


def _vjp_operands(case: Case, rng, dtype=np.float32):
    from convtranspose._api import spec_for
    x = rng.uniform(-1, 1, case.input_shape).astype(dtype)
    w = rng.uniform(-1, 1, case.weight_shape).astype(dtype)
    spec, _, _ = spec_for(3, x, w, **case.kwargs)
    cot = rng.uniform(-1, 1, spec.output_shape).astype(dtype)
    return spec, x, w, cot


def _count_pairs(monkeypatch) -> list:
    """The shapes of the cotangents grad_input pairs. These layers are small: the model's
    cost of the transforms left out, so that grad_input takes the pairs."""
    from convtranspose import _vjp, _vjp_native
    monkeypatch.setattr(_vjp, "pair_transform_seconds", lambda spec, dtype: 0.0)
    used = []
    real = _vjp_native.pair_input

    def counted(*args):
        used.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(_vjp_native, "pair_input", counted)
    return used


@pytest.mark.parametrize("case", VJP_CASES, ids=[c.id for c in VJP_CASES])
def test_grad_input_pairs_match_loops(case, isa, rng, monkeypatch, tolerance):
    from test_vjp import loops_vjp

    from convtranspose import _vjp
    used = _count_pairs(monkeypatch)
    for dtype in (np.float32, np.float64):
        spec, x, w, cot = _vjp_operands(case, rng, dtype)
        gx, _ = _vjp.vjp_arrays(spec, x, w, cot, need_weight=False, algorithm="native")
        ref, _ = loops_vjp(x, w, cot, **case.kwargs)
        scale = np.abs(ref).max()
        assert np.abs(gx - ref).max() <= 8 * tolerance(dtype) * scale, (case.id, isa, dtype)
    assert len(used) == 2, "grad_input did not take the Winograd pairs"


def test_grad_input_pairs_switched_off_give_the_direct_bits(rng, monkeypatch):
    from convtranspose import _vjp
    case = VJP_CASES[0]
    spec, x, w, cot = _vjp_operands(case, rng)
    used = _count_pairs(monkeypatch)
    wino, _ = _vjp.vjp_arrays(spec, x, w, cot, need_weight=False, algorithm="native")
    assert len(used) == 1
    try:
        ct.set_winograd(False)
        direct, _ = _vjp.vjp_arrays(spec, x, w, cot, need_weight=False, algorithm="native")
        again, _ = _vjp.vjp_arrays(spec, x, w, cot, need_weight=False, algorithm="native")
    finally:
        ct.set_winograd(None)
    assert len(used) == 1  # not taken while switched off
    assert np.array_equal(direct, again) and not np.array_equal(direct, wino)
    assert np.abs(direct - wino).max() <= 1e-5 * np.abs(direct).max()
    # and a small workspace leaves no room for the transformed cotangent
    _vjp.vjp_arrays(spec, x, w, cot, need_weight=False, algorithm="native", workspace=1024)
    assert len(used) == 1


@pytest.mark.parametrize("need_weight", [False, True])
def test_grad_input_pairs_shared_by_threads_hold_the_same_bits(need_weight, rng, monkeypatch):
    from test_native_threads import _three_calls_per_shared_tile

    from convtranspose import _vjp
    case = VJP_CASES[3]
    spec, x, w, cot = _vjp_operands(case, rng)
    used = _count_pairs(monkeypatch)
    alone = _vjp.vjp_arrays(spec, x, w, cot, need_weight=False, algorithm="native",
                            threads=1)[0].copy()
    shared_calls = _three_calls_per_shared_tile(monkeypatch)
    gx, _ = _vjp.vjp_arrays(spec, x, w, cot, need_weight=need_weight, algorithm="native",
                            threads=2)
    assert used and shared_calls
    assert np.array_equal(gx, alone)
