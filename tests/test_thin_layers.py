"""The kernels' paths for the layers the random sweep found slow (thin, few-channel,
multiplier, strided), forward and gradients, against the slow reference and PyTorch.

Each class names the path the planner must take for it (so a test fails when a change
routes the class elsewhere), then checks every algorithm the planner may pick for it, and
both gradients, on small random draws of the class."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from reference import conv_transpose_ref

import convtranspose as ct
from convtranspose import _native_kernel as native
from convtranspose import _plan, _vjp, _vjp_native
from convtranspose._algorithms import Algorithm
from convtranspose._api import spec_for

pytestmark = pytest.mark.skipif(not native.AVAILABLE, reason="the compiled kernel's paths")

ALGORITHMS = tuple(Algorithm)  # every built-in kernel: a new one is tested here as it lands

# name: (C_in, C_out, groups, kernel, stride, dilation)
CLASSES = {
    "depthwise-2ch": (2, 2, 2, 5, 1, 1),
    "depthwise-16ch": (16, 16, 16, 3, 1, 1),
    "depthwise-strided": (5, 5, 5, 3, 2, 1),
    "multiplier-2": (6, 12, 6, 3, 2, 1),
    "multiplier-3": (3, 9, 3, 4, 1, 1),
    "few-in-large-k": (3, 8, 1, 7, 2, 1),
    "one-in": (1, 3, 1, 4, 2, 1),
    "thin-out": (9, 1, 1, 6, 2, 1),
    "thin-out-3": (16, 3, 1, 4, 2, 1),
    "thin-both": (3, 3, 1, 3, 2, 1),
    "stride-over-kernel": (4, 6, 1, 2, 3, 1),
    "dilated-few": (3, 5, 1, 3, 2, 2),
    "grouped-few": (4, 34, 2, 5, 2, 1),
    "grouped-thin-out": (12, 4, 4, 5, 2, 1),
    "grouped-wide-in": (76, 4, 4, 5, 2, 2),
    "dilated-odd-channels": (18, 10, 2, 3, 2, 2),
}


def _draw(rng, ndim: int, c_in: int, c_out: int, groups: int, k: int, s: int, d: int):
    spatial = tuple(int(rng.integers(3, 9)) for _ in range(ndim))
    x = rng.standard_normal((int(rng.integers(1, 3)), *spatial, c_in))
    w = rng.standard_normal((c_out, *(k,) * ndim, c_in // groups))
    settings = dict(stride=s, padding=int(rng.integers(0, d * (k - 1) // 2 + 1)),
                    dilation=d, output_padding=int(rng.integers(0, s)) if s > d else 0,
                    groups=groups)
    return x, w, settings


def _torch_vjp(x, w, cot, settings):
    ndim = x.ndim - 2
    xt = torch.from_numpy(np.moveaxis(x, -1, 1).copy()).requires_grad_(True)
    wt = torch.from_numpy(ct.weight_to_torch(w, groups=settings["groups"])).requires_grad_(True)
    y = getattr(torch.nn.functional, f"conv_transpose{ndim}d")(xt, wt, **settings)
    gx, gw = torch.autograd.grad(y, (xt, wt), torch.from_numpy(np.moveaxis(cot, -1, 1).copy()))
    return np.moveaxis(gx.numpy(), 1, -1), ct.weight_from_torch(gw.numpy(),
                                                                groups=settings["groups"])


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("name", list(CLASSES))
def test_class_forward_every_algorithm(name, ndim, assert_close):
    rng = np.random.default_rng(zlib.crc32(f"{name} {ndim}".encode()))
    x, w, settings = _draw(rng, ndim, *CLASSES[name])
    x32, w32 = x.astype(np.float32), w.astype(np.float32)
    ref = conv_transpose_ref(x, w, **settings)
    bias = rng.standard_normal(w.shape[0]).astype(np.float32)
    fn = getattr(ct, f"conv_transpose{ndim}d")
    ran = []
    for algorithm in ALGORITHMS:
        try:
            p = ct.plan(x.shape, w.shape, **settings, algorithm=algorithm)
        except ValueError:
            continue
        assert_close(ct.run_plan(p, x32, w32), ref, np.float32, what=f"{name} {ndim}-D {algorithm}")
        ran.append(algorithm)
    assert "native" in ran
    # The default plan with a bias, which the new paths add as they store.
    assert_close(fn(x32, w32, **settings, bias=bias), ref + bias, np.float32, what=f"{name} bias")


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("name", ["few-in-large-k", "one-in", "thin-both"])
def test_native_forward_on_inputs_that_outweigh_the_weight(name, ndim, assert_close,
                                                           torch_conv_transpose):
    """The native kernel on inputs bigger than the draws above (whose weights outweigh
    their inputs), against PyTorch in float64 (the loop reference takes 20 s here), with
    a bias."""
    rng = np.random.default_rng(zlib.crc32(f"{name} {ndim} wide".encode()))
    c_in, c_out, groups, k, s, d = CLASSES[name]
    spatial = {1: (100,), 2: (30, 34), 3: (24, 22, 26)}[ndim]
    x = rng.standard_normal((1, *spatial, c_in))
    w = rng.standard_normal((c_out, *(k,) * ndim, c_in))
    settings = dict(stride=s, padding=1, dilation=d, output_padding=1, groups=groups)
    p = ct.plan(x.shape, w.shape, **settings, algorithm="native")
    bias = rng.standard_normal(c_out).astype(np.float32)
    ref = torch_conv_transpose(x, w, **settings)[0] + bias
    assert_close(ct.run_plan(p, x.astype(np.float32), w.astype(np.float32), bias=bias), ref,
                 np.float32, what=f"{name} {ndim}-D")


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("name", list(CLASSES))
def test_class_gradients(name, ndim, threads):
    """On one thread too: both gradients' tasks then run in one queue in order, and a
    freed table a prepared call still pointed at showed there (the 76 -> 4 g4 layer)."""
    rng = np.random.default_rng(zlib.crc32(f"{name} {ndim} vjp".encode()))
    x, w, settings = _draw(rng, ndim, *CLASSES[name])
    out = ct.output_shape(x.shape, w.shape, **settings)
    cot = rng.standard_normal(out)
    spec, x32, w32 = spec_for(ndim, x.astype(np.float32), w.astype(np.float32),
                              settings["stride"], settings["padding"], settings["dilation"],
                              settings["output_padding"], settings["groups"])
    rx, rw = _torch_vjp(x, w, cot, settings)
    # The default, and the kernel's paths asked for: draws this small would else take
    # `indexed` alone.
    for algorithm in (None, "native"):
        gx, gw = _vjp.vjp_arrays(spec, x32, w32, cot.astype(np.float32), threads=threads,
                                 algorithm=algorithm)
        for got, want, what in ((gx, rx, "grad_input"), (gw, rw, "grad_weight")):
            scale = np.abs(want).max() + 1e-12
            assert np.abs(got - want).max() / scale < 2e-5, f"{name} {ndim}-D {what} {algorithm}"


def _spec(name: str, ndim: int = 3, spatial: int = 12):
    c_in, c_out, groups, k, s, d = CLASSES[name]
    x = np.zeros((1, *(spatial,) * ndim, c_in), np.float32)
    w = np.zeros((c_out, *(k,) * ndim, c_in // groups), np.float32)
    spec, x, w = spec_for(ndim, x, w, s, 0, d, 0, groups)
    return spec, x, w


def test_the_paths_each_class_takes(avx512_planner):
    """The routing rules, so that the tests above cover the paths they are meant to."""
    spec, *_ = _spec("multiplier-2")
    assert _plan.expands_to_depthwise(spec) and _plan.native_mode(spec) == native.DEPTHWISE
    # vectors along the pixels: one-in's three outputs (68x67x57 1 -> 3, one core: 28 ms,
    # 52 by the native kernel, its W taps then summed as one), few-in-large-k's eight
    # (40^3 3 -> 8 k7 s2, one core: 13 ms, 37 by the native kernel)
    for name, algorithm in (("few-in-large-k", "planar"), ("one-in", "planar")):
        spec, *_ = _spec(name, spatial=24)
        p = ct.plan(spec.input_shape, spec.weight_shape, stride=spec.stride,
                    dilation=spec.dilation, groups=spec.groups)
        assert p.algorithm == algorithm, name
    # few inputs: WIDE, every W tap's columns at once; with groups and more inputs per
    # group, vectors along C_in/g (WIDE would compute every group's columns)
    for name, want in (("thin-both", "WIDE"), ("one-in", "WIDE"), ("grouped-few", "WIDE"),
                       ("grouped-thin-out", "ALONG_IN")):
        spec, x, w = _spec(name)
        c3 = np.zeros((1, *spec.out_spatial, spec.c_out), np.float32)
        assert _vjp_native.grad_input_wide_w(spec) == (spec.groups == 1), name
        layout = _vjp.native_grad_weight_layout(spec, x.reshape(1, *spec.in_spatial, spec.c_in),
                                                c3, np.dtype(np.float32))
        assert layout == native.GradWeightLayout[want], name
    spec, *_ = _spec("depthwise-2ch")
    assert _plan.native_mode(spec) == native.DEPTHWISE
    # neither C_in/g nor C_out/g whole vectors, W dilated (no WIDE): vectors along C_in,
    # the last one partial
    spec, x, w = _spec("dilated-odd-channels")
    c3 = np.zeros((1, *spec.out_spatial, spec.c_out), np.float32)
    assert _vjp.native_grad_weight_layout(spec, x.reshape(1, *spec.in_spatial, spec.c_in), c3,
                                          np.dtype(np.float32)) == native.GradWeightLayout.ALONG_IN
    # one cotangent channel per group fans out to C_in/g inputs: a depthwise grad_input
    spec, *_ = _spec("grouped-thin-out")
    assert _plan.expands_to_depthwise(_vjp_native.grad_input_kernel_spec(spec))


@pytest.mark.parametrize("c_in, c_out, k, stride, shape", [
    (16, 24, 3, 1, (2, 1700)),  # channels mode, sums through a row buffer
    (3, 20, 4, 2, (1, 1900)),  # few input channels: sums in registers
    (24, 2, 3, 2, (1, 1601)),  # dot mode
    (16, 16, 3, 1, (1, 4, 2, 1000)),  # Winograd along D
])
def test_long_rows_run_in_pieces(c_in, c_out, k, stride, shape, assert_close):
    """Rows longer than the kernel's run (a 1-D signal is one row) are computed a run of
    pixels at a time: every run boundary, and each tap's reach across one, in place."""
    rng = np.random.default_rng(c_in * 100 + c_out)
    ndim = len(shape) - 1
    x = rng.standard_normal((*shape, c_in))
    w = rng.standard_normal((c_out, *(k,) * ndim, c_in))
    settings = dict(stride=stride, padding=1)
    ref = conv_transpose_ref(x, w, **settings)
    ran = []
    for algorithm in ("native", "winograd"):
        try:
            p = ct.plan(x.shape, w.shape, **settings, algorithm=algorithm)
        except ValueError:
            continue
        got = ct.run_plan(p, x.astype(np.float32), w.astype(np.float32))
        assert_close(got, ref, np.float32, what=f"{algorithm} {shape}")
        ran.append(algorithm)
    assert ran == (["native", "winograd"] if ndim == 3 else ["native"])


def test_grouped_wide_grad_weight_beside_grad_input_on_one_thread(monkeypatch):
    """The queue of both gradients on one thread, grad_weight's tasks first: their tap
    offsets must outlive the Python call that prepared them (they were freed, and grad_input's
    arrays took their memory: every sum wrong). (WIDE forced: its model picks ALONG_IN.)"""
    monkeypatch.setattr(_vjp, "ALONG_IN_OVER_WIDE", math.inf)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 5, 6, 7, 8)).astype(np.float32)
    w = rng.standard_normal((4, 5, 5, 5, 2)).astype(np.float32)
    spec, x, w = spec_for(3, x, w, 2, 2, 1, 0, 4)
    cot = rng.standard_normal((1, *spec.out_spatial, 4)).astype(np.float32)
    assert _vjp.native_grad_weight_layout(spec, x.reshape(1, *spec.in_spatial, 8),
                                          cot.reshape(1, *spec.out_spatial, 4),
                                          np.dtype(np.float32)) == native.GradWeightLayout.WIDE
    want = _vjp.vjp_arrays(spec, x, w, cot, algorithm="gather")[1]
    for threads in (1, 2):
        got = _vjp.vjp_arrays(spec, x, w, cot, threads=threads)[1]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("channels", [1, 3, 4, 7])
def test_depthwise_grad_weight_of_few_channels_along_the_rows(channels, dtype):
    """Depthwise grad_weight with fewer channels than a vector sums along each row's flat
    pixel * channel index, whole steps of lanes * C values, then the rest one by one: rows
    long enough for both, against PyTorch in float64."""
    rng = np.random.default_rng(channels)
    x = rng.standard_normal((2, 4, 5, 90, channels))  # past `indexed`'s small calls
    w = rng.standard_normal((channels, 3, 3, 5, 1))
    settings = dict(stride=(2, 1, 1), padding=(1, 0, 2), dilation=1, output_padding=(1, 0, 0),
                    groups=channels)
    cot = rng.standard_normal(ct.output_shape(x.shape, w.shape, **settings))
    spec, xs, ws = spec_for(3, x.astype(dtype), w.astype(dtype), settings["stride"],
                            settings["padding"], 1, settings["output_padding"], channels)
    assert not _plan.indexed_fits(spec)
    _, gw = _vjp.vjp_arrays(spec, xs, ws, cot.astype(dtype), need_input=False)
    _, want = _torch_vjp(x, w, cot, settings)
    tol = 2e-5 if dtype == np.float32 else 1e-12
    assert np.abs(gw - want).max() / np.abs(want).max() < tol
