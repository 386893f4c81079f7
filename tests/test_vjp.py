"""conv_transpose{1,2,3}d_vjp against PyTorch autograd, mx.vjp and a loop reference.

PyTorch (float64 autograd) covers groups in 3-D, dilation and output_padding; MLX's mx.vjp
owns the edge semantics PyTorch rejects (negative padding, output_padding >= stride) and
the result dtypes; a loop reference written straight from the definition is the oracle of
the property test. Tolerances scale with the sum of |terms| of each gradient element
("magnitude"), obtained by running the same reference on |x|, |w| and |cotangent|.
"""

from __future__ import annotations

import itertools

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import convtranspose as ct
from convtranspose._api import spec_for
from convtranspose._vjp import choose_vjp_algorithm, vjp_arrays
from convtranspose._vjp_numpy import active_taps

BF16 = np.dtype(ml_dtypes.bfloat16)
VJP = {1: ct.conv_transpose1d_vjp, 2: ct.conv_transpose2d_vjp, 3: ct.conv_transpose3d_vjp}
FWD = {1: ct.conv_transpose1d, 2: ct.conv_transpose2d, 3: ct.conv_transpose3d}
MX_FWD = {1: mx.conv_transpose1d, 2: mx.conv_transpose2d, 3: mx.conv_transpose3d}
TORCH_FWD = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
MX_DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32,
             "float64": mx.float64}


def per_axis(v, ndim):
    return (v,) * ndim if isinstance(v, int) else tuple(v)


def make_case(rng, ndim, spatial, c_in, c_out, kernel, stride=1, padding=0, dilation=1,
              output_padding=0, groups=1, batch=2, dtypes=(np.float32,) * 3):
    """Random x, w and a cotangent of the output's shape, each in [-1, 1)."""
    kernel = per_axis(kernel, ndim)
    x = rng.uniform(-1, 1, (batch, *per_axis(spatial, ndim), c_in)).astype(dtypes[0])
    w = rng.uniform(-1, 1, (c_out, *kernel, c_in // groups)).astype(dtypes[1])
    settings_ = dict(stride=stride, padding=padding, dilation=dilation,
                     output_padding=output_padding, groups=groups)
    out_shape = ct.output_shape(x.shape, w.shape, **settings_)
    cot = rng.uniform(-1, 1, out_shape).astype(dtypes[2])
    return x, w, cot, settings_


# ---- references -------------------------------------------------------------------------

def loops_vjp(x, w, cot, stride=1, padding=0, dilation=1, output_padding=0, groups=1):
    """The definition read literally, in float64: every (input position, tap) pair that
    lands inside the output adds cot[o] @ W[:, k] into grad_input[i] and x[i] (x) cot[o]
    into grad_weight[:, k]."""
    x, w, cot = (np.asarray(a).astype(np.float64) for a in (x, w, cot))
    ndim = x.ndim - 2
    s, p, d = (per_axis(v, ndim) for v in (stride, padding, dilation))
    out_sp = cot.shape[1:-1]
    c_out, cig = w.shape[0], w.shape[-1]
    cog = c_out // groups
    gx, gw = np.zeros_like(x), np.zeros_like(w)
    for i in itertools.product(*(range(n) for n in x.shape[1:-1])):
        for k in itertools.product(*(range(n) for n in w.shape[1:-1])):
            o = tuple(i[a] * s[a] + k[a] * d[a] - p[a] for a in range(ndim))
            if not all(0 <= o[a] < out_sp[a] for a in range(ndim)):
                continue
            for g in range(groups):
                co, ci = slice(g * cog, (g + 1) * cog), slice(g * cig, (g + 1) * cig)
                c = cot[(slice(None), *o, co)]  # (N, C_out/g)
                wk = w[(co, *k, slice(None))]  # (C_out/g, C_in/g)
                gx[(slice(None), *i, ci)] += c @ wk
                gw[(co, *k, slice(None))] += c.T @ x[(slice(None), *i, ci)]
    return gx, gw


def weight_from_torch(wt, groups):
    """(C_in, C_out/g, *k) -> (C_out, *k, C_in/g)."""
    c_in, cog, *kernel = wt.shape
    cig = c_in // groups
    nk = len(kernel)
    wg = wt.reshape(groups, cig, cog, *kernel)
    wg = wg.transpose(0, 2, *range(3, 3 + nk), 1)  # (G, C_out/g, *k, C_in/g)
    return wg.reshape(groups * cog, *kernel, cig)


def weight_to_torch(w, groups):
    c_out, *kernel, cig = w.shape
    nk = len(kernel)
    wg = w.reshape(groups, c_out // groups, *kernel, cig)
    wg = wg.transpose(0, nk + 2, 1, *range(2, nk + 2))  # (G, C_in/g, C_out/g, *k)
    return wg.reshape(groups * cig, c_out // groups, *kernel)


def torch_vjp(x, w, cot, stride=1, padding=0, dilation=1, output_padding=0, groups=1):
    """PyTorch autograd in float64 on our layouts."""
    ndim = x.ndim - 2
    xt = torch.tensor(np.moveaxis(x.astype(np.float64), -1, 1), requires_grad=True)
    wt = torch.tensor(weight_to_torch(w.astype(np.float64), groups), requires_grad=True)
    y = TORCH_FWD[ndim](xt, wt, stride=stride, padding=padding, dilation=dilation,
                        output_padding=output_padding, groups=groups)
    ct_ = torch.tensor(np.moveaxis(cot.astype(np.float64), -1, 1))
    assert tuple(y.shape) == ct_.shape
    gx, gw = torch.autograd.grad(y, (xt, wt), ct_)
    return np.moveaxis(gx.numpy(), 1, -1), weight_from_torch(gw.numpy(), groups)


def to_mx(a):
    if a.dtype == BF16:
        return mx.array(a.astype(np.float32)).astype(mx.bfloat16)
    return mx.array(a, dtype=MX_DTYPES[a.dtype.name])


def from_mx(a):
    return np.array(a.astype(mx.float64) if a.dtype == mx.bfloat16 else a).astype(np.float64)


def mlx_vjp(x, w, cot, stride=1, padding=0, dilation=1, output_padding=0, groups=1,
            evaluate=True):
    """mx.vjp on the CPU; returns float64 values (None unless `evaluate`) and the
    gradients' dtype names (known from the graph, before any evaluation)."""
    ndim = x.ndim - 2
    kw = dict(stride=stride, padding=padding, dilation=dilation,
              output_padding=output_padding, groups=groups)
    if ndim == 1:  # MLX's 1-D function takes ints only
        kw = {k: v if isinstance(v, int) else v[0] for k, v in kw.items()}

    def f(a, b):
        return MX_FWD[ndim](a, b, **kw, stream=mx.cpu)

    _, (gx, gw) = mx.vjp(f, [to_mx(x), to_mx(w)], [to_mx(cot)])
    names = (str(gx.dtype).split(".")[-1], str(gw.dtype).split(".")[-1])
    if not evaluate:
        return None, None, names
    mx.eval(gx, gw)
    return from_mx(gx), from_mx(gw), names


def check_grads(assert_close, got, want, magnitude, dtypes, what):
    for name, g, r, m, dt in zip(("grad_input", "grad_weight"), got, want, magnitude, dtypes):
        assert_close(g, r, dt, magnitude=m, what=f"{what} {name}")


# ---- against PyTorch autograd -----------------------------------------------------------

# (ndim, spatial, C_in, C_out, kernel, stride, padding, dilation, output_padding, groups)
TORCH_GRID = [
    (3, (3, 4, 5), 8, 6, 2, 2, 0, 1, 0, 1),                 # U-Net k2s2
    (3, (3, 4, 5), 8, 8, 3, 2, 1, 1, 1, 1),                 # VAE k3s2p1op1
    (3, (2, 3, 4), 6, 4, 4, 2, 1, 1, 0, 1),                 # GAN k4s2p1
    (3, (3, 4, 5), 4, 6, (3, 4, 4), (1, 2, 2), 1, 1, 0, 1),  # anisotropic
    (3, (3, 4, 4), 8, 6, 3, (2, 3, 1), (0, 2, 1), (2, 1, 3), (1, 2, 0), 2),
    (3, (3, 4, 5), 8, 8, 3, 2, 1, 1, 1, 8),                 # depthwise
    (3, (3, 4, 5), 4, 8, 3, 2, 1, 1, 1, 4),                 # channel multiplier
    (3, (3, 4, 5), 8, 4, 3, 2, 1, 1, 1, 4),                 # one output channel per group
    (3, (3, 4, 5), 6, 1, 4, 2, 1, 1, 0, 1),                 # a 6 -> 1 head
    (3, (2, 3, 3), 6, 9, 3, 3, 2, 2, 2, 3),                 # padding > stride, dilation
    (3, (4, 4, 4), 4, 4, 1, 1, 0, 1, 0, 1),                 # 1x1x1
    (2, (5, 6), 6, 4, 3, 2, 1, 1, 1, 2),
    (2, (4, 5), 4, 6, (2, 3), (2, 1), (0, 1), (1, 2), (1, 0), 1),
    (2, (5, 5), 4, 4, 3, 2, 1, 1, 1, 4),                    # depthwise 2-D
    (1, 7, 6, 4, 3, 2, 1, 1, 1, 2),
    (1, 9, 4, 4, 5, 3, 2, 2, 2, 1),
]


@pytest.mark.parametrize("case", TORCH_GRID, ids=lambda c: f"{c[0]}d-{c[1:]}")
def test_matches_torch_autograd(case, rng, assert_close):
    ndim, spatial, c_in, c_out, k, s, p, d, op, g = case
    x, w, cot, kw = make_case(rng, ndim, spatial, c_in, c_out, k, s, p, d, op, g)
    got = VJP[ndim](x, w, cot, **kw)
    want = torch_vjp(x, w, cot, **kw)
    magnitude = torch_vjp(np.abs(x), np.abs(w), np.abs(cot), **kw)
    assert got[0].dtype == np.float32 and got[1].dtype == np.float32
    check_grads(assert_close, got, want, magnitude, (np.float32,) * 2, f"{case}")


def test_float64_matches_torch_tightly(rng, assert_close):
    x, w, cot, kw = make_case(rng, 3, (3, 4, 5), 6, 6, 3, 2, 1, 1, 1, 3,
                              dtypes=(np.float64,) * 3)
    got = ct.conv_transpose3d_vjp(x, w, cot, **kw)
    assert got[0].dtype == np.float64 and got[1].dtype == np.float64
    want = torch_vjp(x, w, cot, **kw)
    magnitude = torch_vjp(np.abs(x), np.abs(w), np.abs(cot), **kw)
    check_grads(assert_close, got, want, magnitude, (np.float64,) * 2, "float64")


# ---- against MLX: its edge semantics, and its dtypes ------------------------------------

def mlx_adjoint_vjp(x, w, cot, stride=1, padding=0, dilation=1, output_padding=0,
                    groups=1):
    """The exact VJP of MLX's *forward*, built from two calls of that forward.

    mx.vjp cannot serve here: for negative padding or output_padding >= stride it returns a
    grad_input of the wrong shape (MLX 0.32). But the forward is linear in each operand:
    - grad_input: run the forward on every one-hot input at once (as a batch); each output
      is then a single weight value, and grad_input = <that output, cot>.
    - grad_weight: run it on x with one-hot weights, one per (tap, input channel), as
      virtual output channels; each output is a single input value (the x row that tap
      meets), and grad_weight = <cot, that output> summed over positions.
    Both forwards are exact (no sums), the contractions run in float64."""
    ndim = x.ndim - 2
    kw = dict(stride=stride, padding=padding, dilation=dilation,
              output_padding=output_padding)
    if ndim == 1:  # MLX's 1-D function takes ints only
        kw = {k: v if isinstance(v, int) else v[0] for k, v in kw.items()}
    n, *spatial, c_in = x.shape
    c_out, *kernel, cig = w.shape
    cog = c_out // groups
    cot64 = cot.astype(np.float64)

    size = int(np.prod(spatial)) * c_in
    basis = np.eye(size, dtype=np.float32).reshape(size, *spatial, c_in)
    y = MX_FWD[ndim](mx.array(basis), mx.array(w.astype(np.float32)), **kw, groups=groups,
                     stream=mx.cpu)
    assert tuple(y.shape[1:]) == cot.shape[1:], "MLX's output shape differs from ours"
    y = np.array(y).astype(np.float64).reshape(size, -1)
    gx = (cot64.reshape(n, -1) @ y.T).reshape(x.shape)

    taps = int(np.prod(kernel))
    one_hot = np.eye(taps * c_in, dtype=np.float32).reshape(taps * c_in, *kernel, c_in)
    z = MX_FWD[ndim](mx.array(x.astype(np.float32)), mx.array(one_hot), **kw, groups=1,
                     stream=mx.cpu)
    z = np.array(z).astype(np.float64).reshape(-1, taps, c_in)
    full = np.einsum("rc,rkj->ckj", cot64.reshape(-1, c_out), z)  # (C_out, taps, C_in)
    gw = np.stack([full[co, :, (co // cog) * cig:(co // cog + 1) * cig]
                   for co in range(c_out)]).reshape(w.shape)
    return gx, gw


# Settings PyTorch rejects: negative padding, output_padding >= stride (even negative),
# inside the region where MLX's forward follows the definition (see test_mlx_parity.py).
MLX_EDGE = [
    (3, (3, 4, 5), 4, 6, 3, 2, -1, 1, 0, 1),
    (3, (3, 4, 5), 4, 6, 3, 2, 1, 1, 3, 1),
    (3, (3, 3, 4), 4, 4, (2, 3, 4), (1, 2, 3), (-1, 1, 0), (2, 1, 1), (2, -1, 4), 1),
    (3, (2, 2, 2), 4, 4, 3, 1, 2, 1, 1, 1),   # tap 0 lands outside the output on every axis
    (2, (4, 5), 6, 4, 3, 2, (-2, 1), 1, (2, 3), 2),
    (2, (4, 4), 4, 8, 3, (1, 2), 1, 2, (-1, 2), 4),
    (1, 6, 4, 6, 3, 2, -2, 1, 2, 2),
    (1, 5, 6, 6, 4, 1, 2, 2, 2, 6),
]


@pytest.mark.parametrize("case", MLX_EDGE, ids=lambda c: f"{c[0]}d-{c[1:]}")
def test_edge_semantics_match_mlx(case, rng, assert_close):
    ndim, spatial, c_in, c_out, k, s, p, d, op, g = case
    x, w, cot, kw = make_case(rng, ndim, spatial, c_in, c_out, k, s, p, d, op, g)
    got = VJP[ndim](x, w, cot, **kw)
    want = mlx_adjoint_vjp(x, w, cot, **kw)
    magnitude = mlx_adjoint_vjp(np.abs(x), np.abs(w), np.abs(cot), **kw)
    check_grads(assert_close, got, want, magnitude, (np.float32,) * 2, f"{case}")
    # The loop reference agrees with MLX too: the property test's oracle is sound.
    check_grads(assert_close, loops_vjp(x, w, cot, **kw), want, magnitude,
                (np.float32,) * 2, f"{case} loops")


@pytest.mark.parametrize("case", [TORCH_GRID[1], TORCH_GRID[11], TORCH_GRID[13]],
                         ids=["3d", "2d-groups", "2d-depthwise"])
def test_mlx_adjoint_reference_agrees_with_torch(case, rng, assert_close):
    """The MLX-built reference above, checked where PyTorch can check it."""
    ndim, spatial, c_in, c_out, k, s, p, d, op, g = case
    x, w, cot, kw = make_case(rng, ndim, spatial, c_in, c_out, k, s, p, d, op, g)
    magnitude = torch_vjp(np.abs(x), np.abs(w), np.abs(cot), **kw)
    check_grads(assert_close, mlx_adjoint_vjp(x, w, cot, **kw), torch_vjp(x, w, cot, **kw),
                magnitude, (np.float32,) * 2, f"{case}")


DTYPES = [np.float16, BF16, np.float32, np.float64]


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("dtypes", [(d, d, d) for d in DTYPES]
                         + [(np.float16, np.float32, np.float32),
                            (np.float32, BF16, np.float32),
                            (BF16, np.float16, np.float32),
                            (np.float32, np.float64, np.float64)],
                         ids=lambda ds: "-".join(np.dtype(d).name for d in ds))
def test_dtypes_match_mx_vjp(ndim, dtypes, rng, assert_close):
    """grad_input has input's dtype and grad_weight weight's, as mx.vjp returns; values
    within one rounding of the float64 truth (we accumulate in float32 at least)."""
    spatial = {1: 6, 2: (4, 5), 3: (3, 4, 4)}[ndim]
    x, w, cot, kw = make_case(rng, ndim, spatial, 4, 6, 3, 2, 1, 1, 1, 2, dtypes=dtypes)
    if ndim == 3:
        kw["groups"] = 1
        w = rng.uniform(-1, 1, (6, 3, 3, 3, 4)).astype(dtypes[1])
    gx, gw = VJP[ndim](x, w, cot, **kw)
    # MLX's CPU convolution VJP cannot evaluate float64: its dtypes are still known.
    with_values = np.dtype(np.float64) not in {np.dtype(d) for d in dtypes}
    *want, names = mlx_vjp(x, w, cot, **kw, evaluate=with_values)
    assert (gx.dtype.name, gw.dtype.name) == names
    assert (gx.dtype, gw.dtype) == (np.dtype(dtypes[0]), np.dtype(dtypes[1]))
    truth = loops_vjp(x, w, cot, **kw)
    magnitude = loops_vjp(np.abs(x), np.abs(w), np.abs(cot), **kw)
    check_grads(assert_close, (gx, gw), truth, magnitude, (gx.dtype, gw.dtype), "ours")
    if with_values:
        check_grads(assert_close, want, truth, magnitude, (gx.dtype, gw.dtype), "mx.vjp")


# ---- the property test ------------------------------------------------------------------

@st.composite
def calls(draw):
    ndim = draw(st.integers(1, 3))
    axis = st.integers
    spatial = tuple(draw(axis(1, 4)) for _ in range(ndim))
    kernel = tuple(draw(axis(1, 3)) for _ in range(ndim))
    stride = tuple(draw(axis(1, 3)) for _ in range(ndim))
    dilation = tuple(draw(axis(1, 2)) for _ in range(ndim))
    padding = tuple(draw(axis(-1, 2)) for _ in range(ndim))
    output_padding = tuple(draw(axis(-1, 3)) for _ in range(ndim))
    outs = [(n - 1) * s - 2 * p + d * (k - 1) + op + 1
            for n, k, s, p, d, op in zip(spatial, kernel, stride, padding, dilation,
                                         output_padding)]
    assume(min(outs) >= 1)
    groups = draw(st.sampled_from([1, 2, 3]))
    cig, cog = draw(axis(1, 3)), draw(axis(1, 3))
    batch = draw(axis(1, 2))
    seed = draw(axis(0, 2**31))
    return (ndim, spatial, cig * groups, cog * groups, kernel, stride, padding, dilation,
            output_padding, groups, batch, seed)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.filter_too_much])
@given(calls())
def test_property_matches_loop_reference(call):
    ndim, spatial, c_in, c_out, k, s, p, d, op, g, batch, seed = call
    rng = np.random.default_rng(seed)
    x, w, cot, kw = make_case(rng, ndim, spatial, c_in, c_out, k, s, p, d, op, g, batch)
    gx, gw = VJP[ndim](x, w, cot, **kw)
    rx, rw = loops_vjp(x, w, cot, **kw)
    mx_, mw = loops_vjp(np.abs(x), np.abs(w), np.abs(cot), **kw)
    assert np.all(np.abs(gx - rx) <= 1e-5 * (mx_ + 1e-30)), call
    assert np.all(np.abs(gw - rw) <= 1e-5 * (mw + 1e-30)), call


def test_adjoint_identity(rng):
    """<conv(x, w), g> == <x, grad_input> == <w, grad_weight>: the VJP is the adjoint of
    the forward we ship (checked in float64, through the public functions only)."""
    x, w, cot, kw = make_case(rng, 3, (4, 5, 6), 6, 4, (3, 2, 4), (2, 1, 3), (1, 0, 2),
                              (1, 2, 1), (1, 0, 2), 2, dtypes=(np.float64,) * 3)
    y = ct.conv_transpose3d(x, w, **kw)
    gx, gw = ct.conv_transpose3d_vjp(x, w, cot, **kw)
    inner = float(np.vdot(y, cot))
    assert abs(inner) > 1e-3
    assert np.isclose(np.vdot(x, gx), inner, rtol=1e-12)
    assert np.isclose(np.vdot(w, gw), inner, rtol=1e-12)


# ---- tiling, threads, workspace: the same numbers however the work is cut ------------------

@pytest.mark.parametrize("algorithm", ["gather", "shift", "native", "indexed"])
@pytest.mark.parametrize("case", [TORCH_GRID[1], TORCH_GRID[4], TORCH_GRID[5], TORCH_GRID[8],
                                  TORCH_GRID[9], MLX_EDGE[2], MLX_EDGE[3]],
                         ids=["vae", "groups", "depthwise", "head", "dilated", "edge",
                              "dead-tap"])
def test_algorithms_tilings_and_threads_agree(case, algorithm, rng):
    """Every algorithm, however the work is cut (tiles, tap chunks, threads), and whichever
    gradients are asked for, gives the definition's numbers."""
    ndim, spatial, c_in, c_out, k, s, p, d, op, g = case
    x, w, cot, kw = make_case(rng, ndim, spatial, c_in, c_out, k, s, p, d, op, g, batch=3)
    spec, _, _ = spec_for(ndim, x, w, **kw)
    rx, rw = loops_vjp(x, w, cot, **kw)
    scale = max(np.abs(rx).max(), np.abs(rw).max())
    # workspace=1 byte forces one-W-line tiles and one-tap grad_weight chunks.
    for workspace in (1, 700, 9000, None):
        for threads in (1, 2, 3):
            for need in ((True, True), (True, False), (False, True)):
                gx, gw = vjp_arrays(spec, x, w, cot, need_input=need[0],
                                    need_weight=need[1], threads=threads,
                                    workspace=workspace, algorithm=algorithm)
                assert (gx is None) != need[0] and (gw is None) != need[1]
                if gx is not None:
                    np.testing.assert_allclose(gx, rx, atol=1e-5 * scale, rtol=0)
                if gw is not None:
                    np.testing.assert_allclose(gw, rw, atol=1e-5 * scale, rtol=0)


def test_direct_algorithm_for_depthwise(rng):
    x, w, cot, kw = make_case(rng, 3, (3, 4, 5), 6, 12, 3, 2, 1, 2, 1, 6, batch=3)
    spec, _, _ = spec_for(3, x, w, **kw)
    assert choose_vjp_algorithm(spec, active_taps(spec)) == "direct"
    rx, rw = loops_vjp(x, w, cot, **kw)
    for workspace, threads in ((1, 3), (5000, 2), (None, 1)):
        gx, gw = vjp_arrays(spec, x, w, cot, workspace=workspace, threads=threads,
                            algorithm="direct")
        np.testing.assert_allclose(gx, rx, atol=1e-5 * np.abs(rx).max(), rtol=0)
        np.testing.assert_allclose(gw, rw, atol=1e-5 * np.abs(rw).max(), rtol=0)
    with pytest.raises(ValueError, match="'algorithm' must be one of"):
        vjp_arrays(spec, x, w, cot, algorithm="fft")


def test_small_calls_take_indexed_and_big_ones_refuse_it(rng):
    """Small calls (the forward's indexed sizes) differentiate the gathered products; a
    call too big for its gathered cotangent refuses the algorithm by name."""
    x, w, cot, kw = make_case(rng, 3, (3, 4, 4), 8, 8, (3, 3, 3), 2, 1, 1, 1, 1)
    spec, _, _ = spec_for(3, x, w, **kw)
    from convtranspose._plan import indexed_fits
    assert indexed_fits(spec)
    rx, rw = loops_vjp(x, w, cot, **kw)
    gx, gw = vjp_arrays(spec, x, w, cot)
    np.testing.assert_allclose(gx, rx, atol=1e-5 * np.abs(rx).max(), rtol=0)
    np.testing.assert_allclose(gw, rw, atol=1e-5 * np.abs(rw).max(), rtol=0)
    big = spec_for(3, np.zeros((1, 32, 32, 32, 64), np.float32),
                   np.zeros((64, 3, 3, 3, 64), np.float32), padding=1)[0]
    assert not indexed_fits(big)
    with pytest.raises(ValueError, match="'indexed' is for small calls"):
        vjp_arrays(big, np.zeros(big.input_shape, np.float32),
                   np.zeros(big.weight_shape, np.float32),
                   np.zeros(big.output_shape, np.float32), algorithm="indexed")


def test_direct_algorithm_in_half_precision(rng, assert_close):
    x, w, cot, kw = make_case(rng, 3, (3, 4, 5), 6, 6, 3, 2, 1, 1, 1, 6,
                              dtypes=(np.float16, BF16, np.float16))
    gx, gw = ct.conv_transpose3d_vjp(x, w, cot, **kw)
    assert (gx.dtype, gw.dtype) == (np.dtype(np.float16), BF16)
    truth = loops_vjp(x, w, cot, **kw)
    magnitude = loops_vjp(np.abs(x), np.abs(w), np.abs(cot), **kw)
    check_grads(assert_close, (gx, gw), truth, magnitude, (gx.dtype, gw.dtype), "direct")


def test_shift_is_chosen_where_it_copies_less(rng, assert_close):
    """A stride-1 3x3 layer with many output channels: the shift algorithm copies 3 taps
    per row instead of 9, and is what runs by default."""
    x, w, cot, kw = make_case(rng, 2, (32, 4), 4, 64, 3, 1, 1, 1, 0, 1)
    spec, _, _ = spec_for(2, x, w, **kw)
    assert choose_vjp_algorithm(spec, active_taps(spec)) == "shift"
    got = ct.conv_transpose2d_vjp(x, w, cot, **kw)
    magnitude = torch_vjp(np.abs(x), np.abs(w), np.abs(cot), **kw)
    check_grads(assert_close, got, torch_vjp(x, w, cot, **kw), magnitude,
                (np.float32,) * 2, "shift")


def test_tap_chunks_accumulate_in_float32_for_half_precision(rng, assert_close):
    """A tiny workspace cuts the taps into chunks whose grad_input contributions are
    summed: in float32, then rounded once to the input's float16."""
    x, w, cot, kw = make_case(rng, 3, (3, 4, 5), 8, 6, 3, 2, 1, 1, 1, 2,
                              dtypes=(np.float16, BF16, np.float32))
    spec, _, _ = spec_for(3, x, w, **kw)
    gx, gw = vjp_arrays(spec, x, w, cot, workspace=700, threads=2)
    assert (gx.dtype, gw.dtype) == (np.dtype(np.float16), BF16)
    truth = loops_vjp(x, w, cot, **kw)
    magnitude = loops_vjp(np.abs(x), np.abs(w), np.abs(cot), **kw)
    check_grads(assert_close, (gx, gw), truth, magnitude, (gx.dtype, gw.dtype), "chunks")


def test_repeatable_bit_for_bit(rng):
    x, w, cot, kw = make_case(rng, 3, (4, 6, 8), 8, 8, 3, 2, 1, 1, 1, 1)
    first = ct.conv_transpose3d_vjp(x, w, cot, **kw)
    for _ in range(3):
        again = ct.conv_transpose3d_vjp(x, w, cot, **kw)
        assert all(np.array_equal(a, b) for a, b in zip(first, again))


def test_never_mutates_and_takes_any_layout(rng):
    x, w, cot, kw = make_case(rng, 3, (3, 4, 5), 8, 6, 3, 2, 1, 1, 1, 2)
    want = ct.conv_transpose3d_vjp(x, w, cot, **kw)
    copies = [a.copy() for a in (x, w, cot)]
    # Fortran-ordered copies and a strided view: same values, other memory layouts.
    xf, wf = np.asfortranarray(x), np.asfortranarray(w)
    big = np.zeros((*cot.shape[:-1], 2 * cot.shape[-1]), cot.dtype)
    big[..., ::2] = cot
    got = ct.conv_transpose3d_vjp(xf, wf, big[..., ::2], **kw)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    for a, c in zip((x, w, cot), copies):
        assert np.array_equal(a, c)
    # Lists work too (anything np.asarray reads as a float array).
    lists = ct.conv_transpose3d_vjp(x.tolist(), w.astype(np.float64).tolist(),
                                    cot.tolist(), **kw)
    np.testing.assert_allclose(lists[0], want[0], rtol=1e-5, atol=1e-5)


def test_empty_batch_gives_zero_weight_gradient(rng):
    # (mx.vjp crashes on an empty batch here, so this checks the definition directly.)
    x = np.zeros((0, 4, 5, 3), np.float32)
    w = rng.uniform(-1, 1, (6, 3, 3, 3)).astype(np.float32)
    cot = np.zeros(ct.output_shape(x.shape, w.shape, 2, 1), np.float32)
    gx, gw = ct.conv_transpose2d_vjp(x, w, cot, 2, 1)
    assert gx.shape == x.shape and gw.shape == w.shape and not gw.any()


def test_exported_at_top_level():
    for name in ("conv_transpose1d_vjp", "conv_transpose2d_vjp", "conv_transpose3d_vjp"):
        assert name in ct.__all__ and callable(getattr(ct, name))


# ---- bad calls ----------------------------------------------------------------------------

@pytest.fixture
def good(rng):
    return make_case(rng, 3, (2, 3, 4), 4, 6, 3, 2, 1, 1, 1, 2)


def test_cotangent_of_wrong_shape(good):
    x, w, cot, kw = good
    for bad in (cot[:, :-1], cot[..., :-1], cot[0], cot[None]):
        with pytest.raises(ValueError, match=r"'cotangent' must have the forward output's "
                                             r"shape \(2, 4, 6, 8, 6\).*got shape"):
            ct.conv_transpose3d_vjp(x, w, bad, **kw)


@pytest.mark.parametrize("bad", [np.zeros((2, 4, 6, 8, 6), np.int32),
                                 np.zeros((2, 4, 6, 8, 6), np.complex64),
                                 np.zeros((2, 4, 6, 8, 6), bool), None, [[1.0], [1.0, 2.0]],
                                 "cotangent"],
                         ids=["int32", "complex64", "bool", "None", "ragged", "str"])
def test_cotangent_of_wrong_kind(good, bad):
    x, w, _, kw = good
    with pytest.raises(TypeError, match=r"conv_transpose3d_vjp: 'cotangent'"):
        ct.conv_transpose3d_vjp(x, w, bad, **kw)


def test_bad_settings_and_operands_name_the_vjp(good):
    x, w, cot, kw = good
    with pytest.raises(ValueError, match=r"conv_transpose3d_vjp: 'groups'=4 must divide"):
        ct.conv_transpose3d_vjp(x, w, cot, **{**kw, "groups": 4})
    with pytest.raises(ValueError, match=r"conv_transpose2d_vjp: 'input' must have 4 dim"):
        ct.conv_transpose2d_vjp(x, w, cot)
    with pytest.raises(TypeError, match=r"conv_transpose3d_vjp: 'weight' must have a float"):
        ct.conv_transpose3d_vjp(x, w.astype(np.int64), cot, **kw)
    with pytest.raises(ValueError, match=r"'stride' must be >= 1"):
        ct.conv_transpose3d_vjp(x, w, cot, **{**kw, "stride": 0})
    with pytest.raises(TypeError):  # the arrays are positional-only, as in MLX
        ct.conv_transpose3d_vjp(input=x, weight=w, cotangent=cot)
