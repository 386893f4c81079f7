"""The planners' choices, pinned on representative layers: which algorithm the forward
runs and which path each gradient takes. A change that routes a layer elsewhere fails
here by name, and is then a decision to make (and to measure), not a side effect.

The pins are for the compiled kernel (the no-compiler planner has its own tests below);
the numbers each path gives are checked against references elsewhere (test_vjp,
test_reference, test_thin_layers)."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import forget_plans

import convtranspose as ct
from convtranspose import _native_kernel as native
from convtranspose import _plan, _vjp
from convtranspose._workloads import select_workloads

needs_kernel = pytest.mark.skipif(not native.AVAILABLE, reason="the compiled kernel's paths")

# name: (grad_input's path, grad_weight's path, grad_weight's kernel layout or None,
#        grad_input computed in grad_weight's pass)
ALONG_OUT, ALONG_IN = native.GradWeightLayout.ALONG_OUT, native.GradWeightLayout.ALONG_IN
BACKWARD_W = {
    "W1": ("native", "native", ALONG_OUT, False),
    "W2": ("native", "native", ALONG_OUT, False),
    "W3": ("native", "native", ALONG_IN, False),
    "W4": ("native", "native", ALONG_OUT, False),
    "W5": ("winograd", "native", ALONG_OUT, False),
    "W6": ("native", "native", ALONG_IN, True),  # 16 -> 1 head: few sums, one pass for both
    "W7": ("native", "native", native.GradWeightLayout.DEPTHWISE, False),
    "W8": ("winograd", "native", ALONG_OUT, False),
    "W9": ("indexed", "indexed", None, False),  # small: one gather, two GEMMs
}

# (input shape, weight shape, settings): grad_input's path, grad_weight's path. Channel
# counts that no vector width divides, so that the pins hold on AVX2 and AVX-512 alike.
BACKWARD_LAYERS = {
    # grouped, few channels per group (2 in, 17 out per group): grad_weight sums every W
    # tap's columns at once (layout WIDE)
    "grouped-few": ((1, 12, 12, 12, 4), (34, 5, 5, 5, 2), dict(stride=2, groups=2),
                    "native", "native"),
    # grouped, 19 in and 1 out per group: vectors along C_in/g, the last one partial
    # (ALONG_IN), where WIDE would compute every group's columns
    "grouped-thin-out": ((1, 12, 12, 12, 76), (4, 5, 5, 5, 19), dict(stride=2, groups=4),
                         "native", "native"),
    # a channel multiplier: run as the depthwise layer it expands to
    "multiplier": ((1, 12, 12, 12, 6), (12, 3, 3, 3, 1), dict(stride=2, groups=6),
                   "native", "native"),
    # 20 -> 20 at stride 2: neither side whole vectors: grad_weight along C_in, the last
    # vector partial
    "odd-channels-s2": ((1, 8, 24, 24, 20), (20, 3, 3, 3, 20), dict(stride=2, padding=1),
                        "native", "native"),
    # 20 -> 50 at stride 1: Winograd for grad_input
    "odd-channels-s1": ((1, 8, 24, 24, 20), (50, 3, 3, 3, 20), dict(padding=1),
                        "winograd", "native"),
    # float16 arrays the kernel cannot read in place: grad_weight on the GEMM paths, one
    # gathered copy feeding both GEMMs ...
    "half-odd-channels-s2": ((1, 8, 24, 24, 20), (20, 3, 3, 3, 20),
                             dict(stride=2, padding=1, dtype=np.float16), "gather", "gather"),
    # ... or, with wide rows (halo rows few) and 3 W taps of 50 channels, the shift grid
    "half-shift-2d": ((1, 96, 96, 20), (50, 3, 3, 20),
                      dict(stride=2, padding=1, dtype=np.float16), "shift", "shift"),
    "half-shift-2d-s1": ((1, 64, 64, 20), (50, 3, 3, 20), dict(padding=1, dtype=np.float16),
                         "native", "shift"),
    # grad_input that fans each group's one cotangent channel out to its 12 inputs: both
    # gradients as the depthwise layer's over C_in channels of the repeated cotangent ...
    "fan-out": ((1, 12, 12, 12, 72), (6, 4, 4, 4, 12), dict(stride=2, groups=6),
                "native", "native"),
    # ... but with 2 inputs a group, every group side by side in one pass for both
    "groups-side-by-side": ((1, 12, 12, 12, 8), (4, 4, 4, 4, 2), dict(stride=2, groups=4),
                            "native", "native"),
    # 3 -> 1 at stride 2 on rows of 128 pixels: grad_weight with vectors along the pixels
    "few-both": ((1, 96, 128, 3), (1, 4, 2, 3), dict(stride=2), "native", "native"),
    # thin outputs from wide inputs (105 -> 3, a tenth of a vector empty): grad_weight
    # along C_in, its few-sums tiles writing grad_input in the same pass ...
    "thin-out-wide-in": ((1, 8, 10, 9, 105), (3, 6, 6, 6, 105), dict(stride=2),
                         "native", "native"),
    # ... but with more outputs WIDE (its padded cotangent serves grad_input too), and
    # with few inputs in one group (4 -> 12 k4: 9.8 ms along C_in, 5.2 WIDE)
    "thin-out-5": ((1, 8, 10, 9, 105), (5, 6, 6, 6, 105), dict(stride=2), "native", "native"),
    "thin-out-25-in": ((1, 8, 10, 9, 25), (3, 6, 6, 6, 25), dict(stride=2), "native", "native"),
    "thin-in": ((1, 12, 10, 9, 3), (12, 4, 4, 4, 3), dict(stride=(1, 2, 1), padding=1),
                "native", "native"),
    # wide channels on a few pixels: grad_weight summed in place along C_in, where vectors
    # along C_out would spend more on unpacking its 1.7 MiB than they save (3.0 -> 1.2 ms)
    "wide-few-pixels": ((3, 4, 4, 4, 64), (32, 6, 6, 6, 64), dict(padding=2),
                        "native", "native"),
}
Layout = native.GradWeightLayout
GW_LAYOUTS = {"odd-channels-s2": Layout.ALONG_IN, "odd-channels-s1": Layout.ALONG_IN,
              "grouped-few": Layout.WIDE, "grouped-thin-out": Layout.ALONG_IN,
              "fan-out": Layout.DEPTHWISE, "multiplier": Layout.DEPTHWISE,
              "groups-side-by-side": Layout.SIDE_BY_SIDE,
              "wide-few-pixels": Layout.ALONG_IN, "few-both": Layout.PLANAR,
              "thin-out-wide-in": Layout.ALONG_IN, "thin-out-5": Layout.WIDE,
              "thin-out-25-in": Layout.ALONG_IN, "thin-in": Layout.WIDE}


def _workload(name: str):
    (wl,) = select_workloads([name])
    return wl


@needs_kernel
@pytest.mark.parametrize("name", list(BACKWARD_W))
def test_backward_paths_of_the_public_workloads(name):
    wl = _workload(name)
    p = ct.vjp_plan(wl.input_shape, wl.weight_shape, **wl.settings, threads=2)
    gx_path, gw_path, layout, fused = BACKWARD_W[name]
    assert (p.grad_input.algorithm, p.grad_weight.algorithm) == (gx_path, gw_path), p
    assert p.grad_weight.layout == layout and p.grad_input.with_grad_weight == fused, p
    assert (p.multiplier is None) and p.threads == 2
    # both by the kernel (and not in one pass): their tasks share one queue
    assert p.shared_queue == (gw_path == "native" and gx_path != "indexed" and not fused)


@needs_kernel
@pytest.mark.parametrize("name", list(BACKWARD_LAYERS))
def test_backward_paths_of_representative_layers(name, avx512_planner):
    x_shape, w_shape, settings, gx_path, gw_path = BACKWARD_LAYERS[name]
    p = ct.vjp_plan(x_shape, w_shape, **settings, threads=2)
    assert (p.grad_input.algorithm, p.grad_weight.algorithm) == (gx_path, gw_path), p
    assert p.grad_weight.layout == GW_LAYOUTS.get(name), p


@needs_kernel
def test_a_multiplier_plans_as_its_depthwise_layer():
    p = ct.vjp_plan((1, 12, 12, 12, 6), (12, 3, 3, 3, 1), stride=2, groups=6)
    assert p.multiplier is not None and p.multiplier.spec.groups == 12
    assert p.multiplier.spec.c_in == 12 and p.spec.c_in == 6
    assert "multiplier" in str(p)


def test_backward_plan_honours_what_is_asked():
    shape, w_shape = (1, 16, 16, 16, 32), (16, 2, 2, 2, 32)
    alone = ct.vjp_plan(shape, w_shape, stride=2, need_weight=False)
    assert alone.grad_weight is None and alone.grad_input is not None
    assert not alone.shared_queue
    gemm = ct.vjp_plan(shape, w_shape, stride=2, algorithm="gather")
    assert gemm.algorithm == "gather"
    assert gemm.grad_input.algorithm == gemm.grad_weight.algorithm == "gather"
    with pytest.raises(ValueError, match="'algorithm' must be one of"):
        ct.vjp_plan(shape, w_shape, stride=2, algorithm="fft")
    with pytest.raises(ValueError, match="'indexed' is for small calls"):
        ct.vjp_plan(shape, w_shape, stride=2, algorithm="indexed")
    with pytest.raises(ValueError, match="'direct' needs one input channel per group"):
        ct.vjp_plan(shape, w_shape, stride=2, algorithm="direct")
    with pytest.raises(ValueError, match="'threads' must be an int >= 1"):
        ct.vjp_plan(shape, w_shape, threads=0)


def test_print_vjp_plan_names_the_paths():
    wl = _workload("W6")
    p = ct.vjp_plan(wl.input_shape, wl.weight_shape, **wl.settings)
    text = str(p)
    assert text == repr(p)
    assert text.startswith("convtranspose backward plan for conv_transpose3d_vjp")
    for line in ("grad_input", "grad_weight", "model ms", "useful", "threads", "workspace"):
        assert f"\n  {line}" in text, line
    assert f"grad_input   {p.grad_input.algorithm}" in text
    assert f"grad_weight  {p.grad_weight.algorithm}" in text
    alone = ct.vjp_plan(wl.input_shape, wl.weight_shape, **wl.settings, need_input=False)
    assert "grad_input   not asked for" in str(alone)


def test_backward_plan_reads_like_the_sweep_expects():
    """`_sweep.predicted_seconds` reads est_seconds[algorithm], as for the forward."""
    wl = _workload("W3")
    p = ct.vjp_plan(wl.input_shape, wl.weight_shape, **wl.settings)
    total = p.est_seconds[p.algorithm]
    assert total == pytest.approx(p.grad_input.est_seconds + p.grad_weight.est_seconds)
    assert total > 0 and p.flops == 2 * p.spec.useful_flops


def test_vjp_arrays_runs_the_plan_it_is_given(rng, monkeypatch):
    """The call builds the plan once and runs it: the public plan for the same arguments is
    the one the call runs (the cache returns the very object)."""
    x = rng.standard_normal((1, 6, 6, 6, 16)).astype(np.float32)
    w = rng.standard_normal((8, 3, 3, 3, 16)).astype(np.float32)
    seen = []
    real = _vjp.run_vjp_plan

    def spy(plan, *arrays):
        seen.append(plan)
        return real(plan, *arrays)

    monkeypatch.setattr(_vjp, "run_vjp_plan", spy)
    cot = np.ones(ct.output_shape(x.shape, w.shape, stride=2), np.float32)
    ct.conv_transpose3d_vjp(x, w, cot, stride=2)
    assert seen == [ct.vjp_plan(x.shape, w.shape, stride=2)]


@needs_kernel
@pytest.mark.parametrize("algorithm", [None, "native"])
def test_fan_out_grad_input_plans_as_a_depthwise_layer(algorithm, rng):
    """One output channel per group and 6 input channels per group (fewer than a vector's
    lanes on AVX2 and AVX-512; 12 groups: more channels than side by side takes on
    either): both gradients run as the depthwise layer's over C_in channels (asked for
    by name too: the kernel has no other layout for grad_input, and returned garbage when
    forced); not where the repeated cotangent would exceed the workspace limit."""
    x_shape, w_shape, settings = (1, 12, 12, 12, 72), (12, 4, 4, 4, 6), dict(stride=2,
                                                                             groups=12)
    p = ct.vjp_plan(x_shape, w_shape, **settings, algorithm=algorithm)
    assert p.fan_out is not None and p.fan_out.spec.groups == p.spec.c_in == 72
    assert p.grad_input.fan_out and "depthwise grad_input" in str(p)
    assert p.grad_weight.fan_out and "depthwise grad_weight" in str(p)
    repeated = int(np.prod(ct.output_shape(x_shape, w_shape, **settings))) * w_shape[-1] * 4
    assert ct.vjp_plan(x_shape, w_shape, **settings, workspace=repeated - 4).fan_out is None
    x = rng.standard_normal(x_shape).astype(np.float32)
    w = rng.standard_normal(w_shape).astype(np.float32)
    cot = rng.standard_normal(ct.output_shape(x_shape, w_shape, **settings)).astype(np.float32)
    spec = p.spec
    gx, gw = _vjp.vjp_arrays(spec, x, w, cot, algorithm=algorithm)
    rx, rw = _vjp.vjp_arrays(spec, x, w, cot, algorithm="gather")
    np.testing.assert_allclose(gx, rx, rtol=0, atol=1e-5 * np.abs(rx).max())
    np.testing.assert_allclose(gw, rw, rtol=0, atol=1e-5 * np.abs(rw).max())


# --- the forward's choices ---------------------------------------------------------------

FORWARD_W = {"W1": "native", "W2": "native", "W3": "native", "W4": "native",
             "W5": "winograd", "W6": "planar", "W7": "native", "W8": "winograd",
             "W9": "indexed"}

FORWARD_LAYERS = {  # (input shape, weight shape, settings, algorithm)
    # grouped, few channels per group: the kernel (per-group vectors)
    "grouped-few": ((1, 12, 12, 12, 4), (34, 5, 5, 5, 2), dict(stride=2, groups=2), "native"),
    "grouped-thin-out": ((1, 12, 12, 12, 76), (4, 5, 5, 5, 19), dict(stride=2, groups=4),
                         "planar"),  # one core: 3.6 ms, dot mode 8.5
    "grouped-4ch": ((1, 16, 16, 16, 64), (64, 3, 3, 3, 4),
                    dict(stride=2, padding=1, groups=16), "native"),
    # rows of 24 flat positions, each cut by a W tap: lane by lane in depthwise mode
    # (two threads: 0.33 ms, planar 0.26-0.31)
    "multiplier": ((1, 12, 12, 12, 6), (12, 3, 3, 3, 1), dict(stride=2, groups=6), "planar"),
    # (two threads: 0.92-0.94 ms, planar 1.12-1.21; on 16^3 pixels of 16 channels the two
    # are within 10%)
    "depthwise": ((1, 24, 24, 24, 32), (32, 3, 3, 3, 1), dict(padding=1, groups=32),
                  "native"),
    "stride-over-kernel": ((1, 12, 12, 12, 32), (64, 2, 2, 2, 32), dict(stride=3), "native"),
    # one output per group from six inputs: vectors along the pixels (one core: 38 ms,
    # against 227 in dot mode, whose vectors hold the six channels)
    "grouped-thin-out-few-in": ((1, 38, 50, 30, 24), (4, 5, 5, 5, 6),
                                dict(stride=2, groups=4), "planar"),
    "thin-out-few-in": ((1, 32, 28, 41, 15), (3, 4, 4, 4, 15),
                        dict(stride=(2, 2, 1), dilation=2), "planar"),  # 11 ms against 37
    # thin outputs from wide inputs: one GEMM of every tap, then the gather (two threads:
    # 384 -> 3 k4, 2.4 ms against the native kernel's 5.2-5.7; 192 -> 1 k3 s3, 3.7 against
    # 13.3, alternating processes)
    "thin-out-wide-in": ((3, 12, 12, 8, 384), (3, 4, 4, 4, 384), {}, "cols"),
    "thin-out-wide-in-strided": ((1, 37, 30, 31, 192), (1, 3, 3, 3, 192),
                                 dict(stride=3, padding=1), "cols"),
    "1d-long": ((2, 4096, 32), (32, 5, 32), dict(stride=2, padding=2), "native"),
    # a 2x1x2 input of 256 channels through 7^3 taps: the kernel (0.10 ms; shift, now a
    # fallback, 0.19)
    "few-pixels-wide": ((4, 2, 1, 2, 256), (32, 7, 7, 7, 256), dict(padding=3), "native"),
    "tiny": ((1, 4, 4, 4, 8), (8, 3, 3, 3, 8), dict(stride=2, padding=1, output_padding=1),
             "indexed"),
}

# Without the compiled kernel: (forward, grad_input, grad_weight) of W1-W9.
NO_COMPILER_W = {
    "W1": ("shift", "gather", "gather"), "W2": ("shift", "gather", "gather"),
    "W3": ("shift", "gather", "gather"), "W4": ("shift", "shift", "shift"),
    "W5": ("shift", "shift", "shift"),
    "W6": ("scatter", "gather", "gather"),  # 16 -> 1 head: 2.2x faster than shift here
    "W7": ("direct", "direct", "direct"),  # depthwise: 3x faster than shift here
    "W8": ("shift", "shift", "shift"), "W9": ("indexed", "indexed", "indexed"),
}


@needs_kernel
@pytest.mark.parametrize("name", list(FORWARD_W))
def test_forward_algorithm_of_the_public_workloads(name):
    wl = _workload(name)
    assert ct.plan(wl.input_shape, wl.weight_shape, **wl.settings,
                   threads=2).algorithm == FORWARD_W[name]


@needs_kernel
@pytest.mark.parametrize("name", list(FORWARD_LAYERS))
def test_forward_algorithm_of_representative_layers(name, avx512_planner):
    x_shape, w_shape, settings, algorithm = FORWARD_LAYERS[name]
    p = ct.plan(x_shape, w_shape, **settings, threads=2)
    assert p.algorithm == algorithm, p


@needs_kernel
def test_the_multiply_add_probe_classifies_this_cpu_the_same_each_time():
    """`wide_fma_gain`: 512- over 256-bit multiply-add FLOP/s, None without AVX-512; else
    about 1 or 2 (timed chains optimised away or a ratio of the wrong things would fall
    outside 0.6-2.6), and on the same side of HALF_RATE_FMA_BELOW every time it is timed,
    so that plans do not move from run to run."""
    from convtranspose import _native, _plan
    gains = [_native.wide_fma_gain() for _ in range(3)]
    if "avx512" not in _native.available():
        assert gains == [None] * 3
        return
    assert all(0.6 < g < 2.6 for g in gains), gains
    assert len({g < _plan.HALF_RATE_FMA_BELOW for g in gains}) == 1, gains


@needs_kernel
def test_half_rate_multiply_adds_weigh_only_the_cols_gemm_more(monkeypatch):
    """Where 512-bit multiply-adds run at 256 bits' rate (`half_rate_fma`, pinned here by
    CONVTRANSPOSE_HALF_RATE_FMA), cols' GEMM is modelled HALF_RATE_GEMM times as long and
    no other estimate moves: 48 -> 4 g4 k2x5 s2 on 2x181x241 (on a 2-core Zen 4, native
    3.0 ms, cols 8.2) plans cols on the Xeon's model and native on the other."""
    from convtranspose import _plan
    from convtranspose.kernels import cols
    x_shape, w_shape, kw = (2, 181, 241, 48), (4, 2, 5, 12), dict(stride=2, groups=4)
    seen = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("CONVTRANSPOSE_HALF_RATE_FMA", flag)
        assert _plan.half_rate_fma() is (flag == "1")
        p = ct.plan(x_shape, w_shape, **kw, threads=2)
        gemm = _plan.estimate_seconds(cols.gemm_spec(p.spec), "native")
        seen[flag] = (p.algorithm, cols.estimate(p.spec), gemm,
                      _plan.estimate_seconds(p.spec, "native"))
    (alg0, cols0, gemm0, native0), (alg1, cols1, gemm1, native1) = seen["0"], seen["1"]
    assert gemm1 == gemm0 and native1 == native0
    assert cols1 - cols0 == pytest.approx((cols.HALF_RATE_GEMM - 1) * gemm0, rel=1e-12)
    if native.isa() == "avx512":  # the figures above are of that build's vectors
        assert (alg0, alg1) == ("cols", "native")


@needs_kernel
def test_small_conv_groups_slow_channels_mode_on_avx2_only(monkeypatch):
    """On the AVX2 build CHANNELS mode's rate is SMALL_GROUPS_AVX2 times lower where
    several conv groups each have fewer outputs than a vector, and 8 -> 4 g4 k4 s2 1-D on
    a long signal (seed 203's S15: native 81 ms, planar 22) plans planar; one group, whole
    vectors a group, and the AVX-512 build price it as before."""
    from convtranspose._api import spec_for

    def spec(c_in, c_out, groups):
        x = np.zeros((1, 100000, c_in), np.float32)
        w = np.zeros((c_out, 4, c_in // groups), np.float32)
        return spec_for(1, x, w, stride=(2,), padding=(0,), dilation=(1,),
                        output_padding=(0,), groups=groups)[0]

    small, one, whole = spec(8, 4, 4), spec(8, 4, 1), spec(8, 32, 4)
    slower = _plan.SMALL_GROUPS_AVX2
    assert slower > 1
    for isa, lanes, slowed in (("avx2", 8, True), ("avx512", 16, False)):
        monkeypatch.setattr(native, "isa", lambda isa=isa: isa)
        monkeypatch.setattr(native, "layout", lambda item, lanes=lanes: (lanes * 4 // item, 2))
        rates = {}
        for factor in (slower, 1.0):
            monkeypatch.setattr(_plan, "SMALL_GROUPS_AVX2", factor)
            rates[factor] = [_plan.channels_rate(s) for s in (small, one, whole)]
        (small3, one3, whole3), (small1, one1, whole1) = rates.values()
        assert small3 == pytest.approx(small1 / (slower if slowed else 1))
        assert (one3, whole3) == (one1, whole1)
        monkeypatch.undo()
    if native.isa() == "avx2":  # this host's plan
        forget_plans()
        assert ct.plan((1, 1754245, 8), (4, 4, 2), stride=2, groups=4).algorithm == "planar"


@needs_kernel
def test_fallback_kernels_are_not_offered_beside_the_compiled_one():
    """'scatter', 'direct' and 'shift' serve the no-compiler install only; asked for by
    name they still run."""
    from convtranspose.kernels import REGISTRY

    assert {n for n, k in REGISTRY.items() if k.fallback} == {"scatter", "direct", "shift"}
    wl = _workload("W6")
    p = ct.plan(wl.input_shape, wl.weight_shape, **wl.settings)
    assert not {"scatter", "shift"} & set(p.est_seconds) and p.algorithm == FORWARD_W["W6"]
    assert ct.plan(wl.input_shape, wl.weight_shape, **wl.settings,
                   algorithm="scatter").algorithm == "scatter"


@pytest.fixture
def no_compiler(monkeypatch):
    """The planners as an install without the compiled kernel sees them."""
    from convtranspose import _plan

    def forget():
        _plan._make_plan.cache_clear()
        _vjp._make_vjp_plan.cache_clear()

    forget()
    monkeypatch.setattr(native, "AVAILABLE", False)
    yield
    monkeypatch.undo()
    forget()


@pytest.mark.parametrize("name", list(NO_COMPILER_W))
def test_no_compiler_choices_of_the_public_workloads(name, no_compiler):
    wl = _workload(name)
    forward, gx_path, gw_path = NO_COMPILER_W[name]
    assert ct.plan(wl.input_shape, wl.weight_shape, **wl.settings).algorithm == forward
    p = ct.vjp_plan(wl.input_shape, wl.weight_shape, **wl.settings)
    assert (p.grad_input.algorithm, p.grad_weight.algorithm) == (gx_path, gw_path), p
    assert not any(step.native for step in p.steps)


# --- the forward's registry --------------------------------------------------------------

def test_a_new_algorithm_is_one_kernel_and_one_registry_line(rng):
    """A kernel that fits every layer and claims the fastest estimate is what the planner
    picks and what execute runs (here the shift kernel's code under another name); asked
    for by name where it does not fit, its own reason is the refusal."""
    import dataclasses

    from convtranspose import _plan, kernels
    from convtranspose.kernels import shift

    ran = []

    def run(plan, x3, w3, out, bias):
        ran.append(plan.algorithm)
        shift.run(plan, x3, w3, out, bias)

    def fits(spec, limit):
        return None if spec.groups == 1 else "is for ungrouped layers only"

    dummy = dataclasses.replace(shift.KERNEL, name="dummy", fits=fits, run=run,
                                estimate=lambda spec: 1e-12, fallback=False)
    x = rng.standard_normal((1, 7, 8, 9, 16)).astype(np.float32)
    w = rng.standard_normal((16, 3, 3, 3, 16)).astype(np.float32)
    before = ct.conv_transpose3d(x, w, stride=2)  # a recent call, as a training loop makes
    kernels.register(dummy)  # the one line
    try:
        assert "dummy" in _plan.ALGORITHMS
        p = ct.plan(x.shape, w.shape, stride=2)
        assert p.algorithm == "dummy" and "dummy" in p.est_seconds
        got = ct.run_plan(p, x, w)
        again = ct.conv_transpose3d(x, w, stride=2)  # the front door plans afresh
        assert ran == ["dummy", "dummy"]
        np.testing.assert_array_equal(again, got)
        want = ct.run_plan(ct.plan(x.shape, w.shape, stride=2, algorithm="shift"), x, w)
        np.testing.assert_array_equal(got, want)
        grouped = ct.plan((1, 7, 8, 9, 16), (16, 3, 3, 3, 4), stride=2, groups=4)
        assert grouped.algorithm != "dummy" and "dummy" not in grouped.est_seconds
        with pytest.raises(ValueError, match="plan: algorithm 'dummy' is for ungrouped"):
            ct.plan((1, 7, 8, 9, 16), (16, 3, 3, 3, 4), groups=4, algorithm="dummy")
    finally:
        kernels.unregister("dummy")
    assert "dummy" not in _plan.ALGORITHMS
    assert ct.plan(x.shape, w.shape, stride=2).algorithm != "dummy"
    np.testing.assert_array_equal(ct.conv_transpose3d(x, w, stride=2), before)


def test_every_registered_kernel_states_why_it_does_not_fit():
    """Refusals come from the kernels: a layer no NumPy trick serves as 'direct', too big
    for 'indexed', and without a D axis for 'winograd'."""
    from convtranspose.kernels import REGISTRY

    spec = ct.plan((1, 16, 16, 16, 32), (16, 2, 2, 2, 32), stride=2).spec
    limit = 64 << 20
    reasons = {name: kernel.fits(spec, limit) for name, kernel in REGISTRY.items()}
    assert reasons["shift"] is None and reasons["scatter"] is None
    assert "one input channel per group" in reasons["direct"]
    assert "small calls" in reasons["indexed"]
    assert "stride 1" in reasons["winograd"]
    assert (reasons["native"] is None) == native.AVAILABLE


@needs_kernel
def test_cols_counts_its_products_and_refuses_a_workspace_below_them():
    x_shape, w_shape, settings, _ = FORWARD_LAYERS["thin-out-wide-in-strided"]
    p = ct.plan(x_shape, w_shape, **settings, algorithm="cols")
    products = int(np.prod(x_shape[:-1])) * 27 * 4  # every input pixel by every tap
    assert products <= p.workspace_bytes <= p.workspace_limit
    with pytest.raises(ValueError, match="products"):
        ct.plan(x_shape, w_shape, **settings, algorithm="cols", workspace=products // 2)
    assert ct.plan(x_shape, w_shape, **settings, workspace=products // 2).algorithm != "cols"
    assert ct.plan(x_shape, w_shape, **settings, algorithm="cols", threads=1).threads == 1


@needs_kernel
def test_planar_counts_its_copy_and_makes_it_in_slabs_below_it():
    x_shape, w_shape, settings, _ = FORWARD_LAYERS["thin-out-few-in"]
    p = ct.plan(x_shape, w_shape, **settings, algorithm="planar")
    copy = int(np.prod(x_shape)) * 4  # float32: the copy holds at least the input
    assert copy <= p.workspace_bytes <= p.workspace_limit and not p.input_slabs
    small = ct.plan(x_shape, w_shape, **settings, algorithm="planar", workspace=copy // 4)
    assert len(small.input_slabs) >= 4 and small.workspace_bytes <= copy // 4
    assert "slabs" in str(small)
    # the slabs' runs of tasks cover every task in order; each task reads its slab's planes
    runs = [s.tasks for s in small.input_slabs]
    assert runs[0][0] == 0 and runs[-1][1] == len(small.tasks)
    assert all(a[1] == b[0] for a, b in zip(runs, runs[1:]))
    for slab in small.input_slabs:
        for task in small.tasks[slice(*slab.tasks)]:
            (d0, d1), _ = _plan.native_input_box(
                small.spec, small.phase_groups[task.phase_group][0], task.tile)
            assert slab.d[0] <= d0 <= d1 <= slab.d[1] and slab.n[0] <= task.tile.n[0]
            assert task.tile.n[1] <= slab.n[1]
    # the least workspace: the planes one output row reads
    row = 1 + _plan.planar_reach(small.phase_groups)
    least = row * _plan.planar_plane_bytes(small.spec) + 4096
    assert ct.plan(x_shape, w_shape, **settings, algorithm="planar", workspace=least).input_slabs
    with pytest.raises(ValueError, match="planar copy"):
        ct.plan(x_shape, w_shape, **settings, algorithm="planar",
                workspace=least - _plan.planar_plane_bytes(small.spec))


def test_inside_flops_count_only_the_products_that_land_in_the_output():
    """Per axis, the (input, tap) pairs whose output position survives the padding's crop,
    counted one by one, on random settings; without a crop it is useful_flops."""
    import random

    from convtranspose._api import spec_for

    rnd = random.Random(3)
    checked = 0
    while checked < 60:
        k = [rnd.randint(1, 7) for _ in range(3)]
        s = [rnd.randint(1, 4) for _ in range(3)]
        d = [rnd.randint(1, 2) for _ in range(3)]
        n = [rnd.randint(1, 6) for _ in range(3)]
        p = [rnd.randint(0, d[i] * (k[i] - 1)) for i in range(3)]
        op = [rnd.randint(0, max(s[i], d[i]) - 1) for i in range(3)]
        try:
            spec, _, _ = spec_for(3, np.zeros((2, *n, 4), np.float32),
                                  np.zeros((6, *k, 2), np.float32), stride=s, padding=p,
                                  dilation=d, output_padding=op, groups=2)
        except ValueError:
            continue
        pairs = 1
        for a in range(3):
            pairs *= sum(1 for i in range(n[a]) for t in range(k[a])
                         if 0 <= i * s[a] + t * d[a] - p[a] < spec.out_spatial[a])
        assert spec.inside_flops == 2 * 2 * pairs * 4 * 3
        checked += 1
    spec, _, _ = spec_for(3, np.zeros((1, 3, 4, 5, 8), np.float32),
                          np.zeros((8, 3, 3, 3, 8), np.float32), stride=2)
    assert spec.inside_flops == spec.useful_flops
