"""The options users bring from PyTorch, ONNX and Keras (issue 23): `bias=`, `output_size=`,
padding as (lo, hi) per axis, "same" and "valid", and unbatched input, in the forward, the
vjp, Dask and the CLI, against PyTorch, ONNX Runtime and the slow reference."""

from __future__ import annotations

import itertools
import subprocess
import sys

import dask.array as da
import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from conftest import to_torch, weight_to_torch_layout
from onnx import TensorProto, helper, numpy_helper
from reference import conv_transpose_pads_ref, conv_transpose_ref

import convtranspose as ct
import convtranspose.dask as ctd
from convtranspose._algorithms import Algorithm

FUNCS = {1: ct.conv_transpose1d, 2: ct.conv_transpose2d, 3: ct.conv_transpose3d}
VJPS = {1: ct.conv_transpose1d_vjp, 2: ct.conv_transpose2d_vjp, 3: ct.conv_transpose3d_vjp}
DASK = {1: ctd.conv_transpose1d, 2: ctd.conv_transpose2d, 3: ctd.conv_transpose3d}
TORCH = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}
MODULES = {1: torch.nn.ConvTranspose1d, 2: torch.nn.ConvTranspose2d,
           3: torch.nn.ConvTranspose3d}

# (batch, input spatial, C_in, C_out, kernel, stride, padding, dilation, groups): 1-D, 2-D
# and 3-D with groups and dilation, and layers for each of the kernel's modes (channels
# with few and many input channels, dot, depthwise).
CASES = [
    (2, (7,), 4, 6, (3,), 2, 1, 2, 2),
    (2, (5, 6), 6, 4, (3, 2), (2, 3), (1, 0), (1, 2), 2),
    (1, (3, 4, 5), 4, 8, (3, 2, 3), (2, 1, 3), 1, (2, 1, 1), 4),
    (1, (4, 5, 6), 2, 20, (2, 2, 2), 2, 0, 1, 1),        # channels, few inputs (taps inner)
    (2, (4, 5, 6), 16, 24, (3, 3, 3), 2, 1, 1, 1),       # channels, many inputs
    (1, (5, 6, 7), 16, 1, (4, 4, 4), 2, 1, 1, 1),        # dot (a 16 -> 1 head)
    (1, (5, 6, 7), 20, 20, (3, 3, 3), 2, 1, 1, 20),      # depthwise
]
IDS = ["1d-groups-dilation", "2d-groups-dilation", "3d-groups-dilation", "3d-taps-inner",
       "3d-channels", "3d-dot", "3d-depthwise"]


def _arrays(rng, case, dtype=np.float32):
    batch, sp, c_in, c_out, kernel, *_, groups = case
    x = rng.uniform(-1, 1, (batch, *sp, c_in)).astype(dtype)
    w = rng.uniform(-1, 1, (c_out, *kernel, c_in // groups)).astype(dtype)
    b = rng.uniform(-1, 1, c_out).astype(dtype)
    return x, w, b


def _torch_forward(x, w, b, stride, padding, dilation, groups, output_padding=0,
                   output_size=None, unbatched=False) -> np.ndarray:
    """PyTorch's answer, channels last: F.conv_transpose*d, or nn.ConvTranspose*d called
    with output_size."""
    ndim = w.ndim - 2
    xt = to_torch(np.moveaxis(x, -1, 0 if unbatched else 1), np.float64)
    wt = to_torch(weight_to_torch_layout(w, groups), np.float64)
    bt = None if b is None else to_torch(b, np.float64)
    with torch.no_grad():
        if output_size is None:
            y = TORCH[ndim](xt, wt, bt, stride=stride, padding=padding,
                            output_padding=output_padding, groups=groups, dilation=dilation)
        else:
            m = MODULES[ndim](w.shape[-1] * groups, w.shape[0], w.shape[1:-1], stride=stride,
                              padding=padding, dilation=dilation, groups=groups,
                              bias=b is not None).double()
            m.weight.copy_(wt)
            if b is not None:
                m.bias.copy_(bt)
            y = m(xt, output_size=list(output_size))
    return np.moveaxis(y.numpy(), 0 if unbatched else 1, -1)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_bias_matches_torch(rng, assert_close, case):
    x, w, b = _arrays(rng, case)
    *_, stride, padding, dilation, groups = case
    got = FUNCS[x.ndim - 2](x, w, stride, padding, dilation, 0, groups, bias=b)
    expected = _torch_forward(x, w, b, stride, padding, dilation, groups)
    assert got.dtype == np.float32
    assert_close(got, expected, np.float32, what="bias")


@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_output_size_matches_torch(rng, assert_close, case):
    """Every reachable size (the smallest and stride - 1 more on each axis) as PyTorch's
    ConvTranspose*d(..., output_size=) gives it."""
    x, w, b = _arrays(rng, case)
    *_, stride, padding, dilation, groups = case
    ndim = x.ndim - 2
    smallest = FUNCS[ndim](x, w, stride, padding, dilation, 0, groups).shape[1:-1]
    strides = (stride,) * ndim if isinstance(stride, int) else stride
    for extra in itertools.product(*({0, s - 1} for s in strides)):
        size = tuple(m + e for m, e in zip(smallest, extra))
        got = FUNCS[ndim](x, w, stride, padding, dilation, groups=groups, bias=b,
                          output_size=size)
        assert got.shape[1:-1] == size
        expected = _torch_forward(x, w, b, stride, padding, dilation, groups, output_size=size)
        assert_close(got, expected, np.float32, what=f"output_size={size}")


@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_unbatched_matches_torch(rng, assert_close, case):
    x, w, b = _arrays(rng, case)
    *_, stride, padding, dilation, groups = case
    got = FUNCS[x.ndim - 2](x[0], w, stride, padding, dilation, 0, groups, bias=b)
    expected = _torch_forward(x[0], w, b, stride, padding, dilation, groups, unbatched=True)
    assert got.shape == expected.shape
    assert_close(got, expected, np.float32, what="unbatched")
    # The same result as the batched call's first item.
    np.testing.assert_array_equal(
        got, FUNCS[x.ndim - 2](x, w, stride, padding, dilation, 0, groups, bias=b)[0])


def _onnx_run(x, w, b, stride, pads, dilation, groups) -> np.ndarray:
    """ONNX Runtime's ConvTranspose with `pads` (begins, then ends), channels last."""
    ndim = w.ndim - 2
    wt = np.ascontiguousarray(weight_to_torch_layout(w, groups), np.float32)
    xn = np.ascontiguousarray(np.moveaxis(x, -1, 1))
    onnx_pads = [lo for lo, _ in pads] + [hi for _, hi in pads]
    inits = [numpy_helper.from_array(wt, "W")] + (
        [numpy_helper.from_array(b, "B")] if b is not None else [])
    node = helper.make_node(
        "ConvTranspose", ["X", "W"] + (["B"] if b is not None else []), ["Y"],
        kernel_shape=list(w.shape[1:-1]), strides=list(stride), pads=onnx_pads,
        dilations=list(dilation), group=groups)
    graph = helper.make_graph(
        [node], "ct", [helper.make_tensor_value_info("X", TensorProto.FLOAT, list(xn.shape))],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, None)], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = min(model.ir_version, 9)
    session = ort.InferenceSession(model.SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"X": xn})
    assert y.ndim == ndim + 2
    return np.moveaxis(y, 1, -1)


ONNX_CASES = [  # (case index, (lo, hi) per axis)
    (0, ((0, 3),)),
    (1, ((2, 0), (1, 3))),
    (2, ((0, 1), (1, 0), (3, 2))),
    (4, ((1, 2), (0, 1), (2, 0))),
]


@pytest.mark.parametrize("index, pads", ONNX_CASES)
def test_uneven_pads_match_onnx_runtime(rng, assert_close, index, pads):
    x, w, b = _arrays(rng, CASES[index])
    *_, stride, _, dilation, groups = CASES[index]
    ndim = x.ndim - 2
    per_axis = [(v,) * ndim if isinstance(v, int) else v for v in (stride, dilation)]
    got = FUNCS[ndim](x, w, stride, pads, dilation, groups=groups, bias=b)
    expected = _onnx_run(x, w, b, *per_axis[:1], pads, per_axis[1], groups)
    assert got.shape == expected.shape
    assert_close(got, expected, np.float32, what=f"pads {pads}")
    # And the crop reading of the definition, float64.
    assert_close(got, conv_transpose_pads_ref(x, w, stride, pads, dilation, groups, b),
                 np.float32, what="reference")


def _tf_same(x, w, stride, dilation, groups) -> np.ndarray:
    """TensorFlow's conv_transpose with padding 'SAME', stated independently: it is the
    gradient of a 'SAME' convolution of an input of size in * stride, which pads
    pad_total = max((in - 1) * s + dk - in * s, 0) = max(dk - s, 0) with
    pad_before = pad_total // 2 (the odd unit after); output o is the uncropped result at
    o + pad_before, and positions past the uncropped result's end are zero."""
    full = conv_transpose_ref(x, w, stride, 0, dilation, 0, groups)
    ndim = x.ndim - 2
    s = (stride,) * ndim if isinstance(stride, int) else stride
    d = (dilation,) * ndim if isinstance(dilation, int) else dilation
    out = np.zeros((x.shape[0], *(n * si for n, si in zip(x.shape[1:-1], s)), w.shape[0]))
    before = [max(di * (k - 1) + 1 - si, 0) // 2 for k, si, di in zip(w.shape[1:-1], s, d)]
    for o in itertools.product(*(range(n) for n in out.shape[1:-1])):
        src = tuple(oi + bi for oi, bi in zip(o, before))
        if all(si < n for si, n in zip(src, full.shape[1:-1])):
            out[(slice(None), *o)] = full[(slice(None), *src)]
    return out


SAME_CASES = [  # (batch, spatial, C_in, C_out, kernel, stride, dilation, groups)
    (2, (9,), 3, 4, (4,), 2, 1, 1),              # total 1: the odd unit at the end
    (1, (6,), 4, 4, (1,), 3, 1, 2),              # kernel shorter than the stride: zeros
    (1, (5, 4), 4, 6, (3, 2), (2, 3), (2, 1), 2),
    (1, (3, 4, 5), 2, 6, (3, 4, 2), (1, 2, 3), 1, 2),
    (1, (3, 3, 4), 5, 5, (2, 3, 3), (2, 2, 1), (3, 1, 2), 5),
]


@pytest.mark.parametrize("case", SAME_CASES)
def test_same_padding_matches_tensorflow_rule(rng, assert_close, case):
    batch, sp, c_in, c_out, kernel, stride, dilation, groups = case
    x = rng.uniform(-1, 1, (batch, *sp, c_in)).astype(np.float32)
    w = rng.uniform(-1, 1, (c_out, *kernel, c_in // groups)).astype(np.float32)
    got = FUNCS[len(sp)](x, w, stride, "same", dilation, groups=groups)
    s = (stride,) * len(sp) if isinstance(stride, int) else stride
    assert got.shape[1:-1] == tuple(n * si for n, si in zip(sp, s))  # out = in * stride
    assert_close(got, _tf_same(x, w, stride, dilation, groups), np.float32, what="same")
    assert ct.output_shape(x.shape, w.shape, stride, "SAME", dilation, groups=groups) \
        == got.shape
    valid = FUNCS[len(sp)](x, w, stride, "valid", dilation, groups=groups)
    np.testing.assert_array_equal(valid, FUNCS[len(sp)](x, w, stride, 0, dilation,
                                                        groups=groups))


def _algorithms(shape, w_shape, **kw) -> list[str]:
    """Every algorithm the planner accepts for this layer."""
    fits = []
    for name in Algorithm:
        try:
            ct.plan(shape, w_shape, algorithm=name, **kw)
        except ValueError:
            continue
        fits.append(name)
    return fits


BIAS_ONCE = [  # layers where taps miss outputs: stride > kernel, extended ends
    ((1, 5, 4, 6, 3), (8, 1, 2, 2, 3), dict(stride=(3, 3, 3), padding=((-1, -2), 0, (0, -3)))),
    ((2, 4, 5, 4), (4, 3, 3, 1), dict(stride=2, padding=((1, -2), (-1, 1)), groups=4)),
    ((1, 4, 4, 4, 16), (2, 2, 2, 2, 16), dict(stride=3, padding="same")),
    ((1, 6, 5, 4, 16), (24, 3, 3, 3, 16), dict(stride=1, padding=((1, 0), 1, (0, 2)))),
    ((1, 6, 5, 4, 8), (4, 3, 3, 3, 2), dict(stride=(1, 2, 2), padding=1, groups=4)),
    # thin out from wide in, as `cols` takes (27 taps by 2 outputs: whole vectors)
    ((1, 4, 5, 3, 24), (2, 3, 3, 3, 24), dict(stride=(2, 3, 2), padding=((1, -1), 0, (-2, 1)))),
]


@pytest.mark.parametrize("shape, w_shape, kw", BIAS_ONCE)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
def test_every_output_gets_the_bias_once(rng, assert_close, shape, w_shape, kw, dtype):
    """With a zero input the result is the bias alone, exactly, at every position (the
    positions no tap reaches included); with a random input, the reference plus the bias;
    for every algorithm that fits the layer."""
    x = rng.uniform(-1, 1, shape).astype(dtype)
    w = rng.uniform(-1, 1, w_shape).astype(dtype)
    b = rng.uniform(-1, 1, w_shape[0]).astype(dtype)
    ran = _algorithms(shape, w_shape, dtype=dtype, **kw)
    assert "native" in ran or not ct.native_isa()
    assert "shift" in ran
    if ct.native_isa() and dtype != np.float16 and w_shape[0] == 2:  # its gather stores
        assert "cols" in ran  # the compute dtype
    if kw["stride"] == 1 and ct.native_isa():  # Winograd's pairs add the bias as they store
        assert "winograd" in ran
    pads = ct.plan(shape, w_shape, dtype=dtype, **kw).spec
    lift = 3 - (len(shape) - 2)
    pairs = list(zip(pads.pad_lo[lift:], pads.pad_hi[lift:]))
    expected = conv_transpose_pads_ref(x, w, kw["stride"], pairs, 1, kw.get("groups", 1), b)
    for name in ran:
        p = ct.plan(shape, w_shape, dtype=dtype, algorithm=name, **kw)
        zero = ct.run_plan(p, np.zeros_like(x), w, bias=b)
        np.testing.assert_array_equal(zero, np.broadcast_to(b, zero.shape), err_msg=name)
        assert_close(ct.run_plan(p, x, w, bias=b), expected, dtype, what=name)


def test_bias_dtype_and_frameworks(rng, assert_close):
    """A bias of another floating dtype (or a torch tensor) is added in the compute dtype
    and does not change the result's dtype."""
    x, w, _ = _arrays(rng, CASES[4], np.float16)
    b64 = rng.uniform(-1, 1, w.shape[0])
    y = ct.conv_transpose3d(x, w, 2, 1, bias=b64)
    assert y.dtype == np.float16
    y_t = ct.conv_transpose3d(x, w, 2, 1, bias=torch.from_numpy(b64))
    np.testing.assert_array_equal(y, y_t)
    assert_close(y, conv_transpose_ref(x, w, 2, 1) + b64, np.float16)


# ---- vjp ------------------------------------------------------------------------------

def _torch_grads(x, w, b, g, stride, padding, dilation, groups, output_size=None,
                 unbatched=False):
    ndim = w.ndim - 2
    xt = to_torch(np.moveaxis(x, -1, 0 if unbatched else 1), np.float64).requires_grad_()
    wt = to_torch(weight_to_torch_layout(w, groups), np.float64).requires_grad_()
    bt = to_torch(b, np.float64).requires_grad_()
    if output_size is None:
        y = TORCH[ndim](xt, wt, bt, stride=stride, padding=padding, groups=groups,
                        dilation=dilation)
    else:  # nn.ConvTranspose's rule through the functional form's output_padding
        smallest = TORCH[ndim](xt, wt, None, stride=stride, padding=padding, groups=groups,
                               dilation=dilation).shape[-ndim:]
        y = TORCH[ndim](xt, wt, bt, stride=stride, padding=padding, groups=groups,
                        dilation=dilation,
                        output_padding=tuple(o - m for o, m in zip(output_size, smallest)))
    y.backward(to_torch(np.moveaxis(g, -1, 0 if unbatched else 1), np.float64))
    gx = np.moveaxis(xt.grad.numpy(), 0 if unbatched else 1, -1)
    gw = wt.grad.numpy()
    return gx, gw, bt.grad.numpy()


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_vjp_bias_matches_torch(rng, assert_close, case):
    x, w, b = _arrays(rng, case)
    *_, stride, padding, dilation, groups = case
    ndim = x.ndim - 2
    y_shape = ct.output_shape(x.shape, w.shape, stride, padding, dilation, groups=groups)
    g = rng.uniform(-1, 1, y_shape).astype(np.float32)
    gx, gw, gb = VJPS[ndim](x, w, g, stride, padding, dilation, 0, groups, bias=b)
    ex, ew, eb = _torch_grads(x, w, b, g, stride, padding, dilation, groups)
    assert gb.dtype == b.dtype and gb.shape == b.shape
    assert_close(gx, ex, np.float32, what="grad_input")
    assert_close(weight_to_torch_layout(gw, groups), ew, np.float32, what="grad_weight")
    assert_close(gb, eb, np.float32, magnitude=np.abs(g).reshape(-1, g.shape[-1]).sum(0),
                 what="grad_bias")
    # Without bias: the two gradients, unchanged.
    gx2, gw2 = VJPS[ndim](x, w, g, stride, padding, dilation, 0, groups)
    np.testing.assert_array_equal(gx, gx2)
    np.testing.assert_array_equal(gw, gw2)


@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_vjp_output_size_and_unbatched_match_torch(rng, assert_close, case):
    x, w, b = _arrays(rng, case)
    *_, stride, padding, dilation, groups = case
    ndim = x.ndim - 2
    smallest = ct.output_shape(x.shape, w.shape, stride, padding, dilation, groups=groups)
    strides = (stride,) * ndim if isinstance(stride, int) else stride
    size = tuple(m + s - 1 for m, s in zip(smallest[1:-1], strides))  # the largest
    g = rng.uniform(-1, 1, (*size, w.shape[0])).astype(np.float32)
    gx, gw, gb = VJPS[ndim](x[0], w, g, stride, padding, dilation, groups=groups, bias=b,
                            output_size=size)
    assert gx.shape == x.shape[1:]
    ex, ew, eb = _torch_grads(x[0], w, b, g, stride, padding, dilation, groups,
                              output_size=size, unbatched=True)
    assert_close(gx, ex, np.float32, what="grad_input")
    assert_close(weight_to_torch_layout(gw, groups), ew, np.float32, what="grad_weight")
    assert_close(gb, eb, np.float32, magnitude=np.abs(g).reshape(-1, g.shape[-1]).sum(0),
                 what="grad_bias")


@pytest.mark.parametrize("index, pads", ONNX_CASES)
def test_vjp_uneven_pads_match_torch_on_the_whole_output(rng, assert_close, index, pads):
    """Cropping is linear: the gradient through (lo, hi) pads is PyTorch's gradient of the
    uncropped output for the cotangent placed at [lo, full - hi), zeros around it."""
    x, w, b = _arrays(rng, CASES[index])
    *_, stride, _, dilation, groups = CASES[index]
    ndim = x.ndim - 2
    y_shape = ct.output_shape(x.shape, w.shape, stride, pads, dilation, groups=groups)
    g = rng.uniform(-1, 1, y_shape).astype(np.float32)
    gx, gw, gb = VJPS[ndim](x, w, g, stride, pads, dilation, groups=groups, bias=b)
    full = np.pad(g, [(0, 0), *pads, (0, 0)])
    ex, ew, _ = _torch_grads(x, w, b, full, stride, 0, dilation, groups)
    assert_close(gx, ex, np.float32, what="grad_input")
    assert_close(weight_to_torch_layout(gw, groups), ew, np.float32, what="grad_weight")
    assert_close(gb, g.reshape(-1, g.shape[-1]).astype(np.float64).sum(0), np.float32,
                 magnitude=np.abs(g).reshape(-1, g.shape[-1]).sum(0), what="grad_bias")


# ---- Dask -----------------------------------------------------------------------------

DASK_SETTINGS = [
    dict(bias=True),
    dict(padding="same"),
    dict(padding=((0, 2),), bias=True),
    dict(output_size=True, bias=True),
    dict(unbatched=True, bias=True, padding="same"),
]


@pytest.mark.parametrize("opts", DASK_SETTINGS, ids=lambda o: "-".join(o))
@pytest.mark.parametrize("case", CASES[:3], ids=IDS[:3])
def test_dask_options_equal_in_memory(rng, case, opts):
    x, w, b = _arrays(rng, case)
    *_, stride, padding, dilation, groups = case
    ndim = x.ndim - 2
    kw = dict(stride=stride, padding=opts.get("padding", padding), dilation=dilation,
              groups=groups)
    if isinstance(opts.get("padding"), tuple):
        kw["padding"] = opts["padding"] * ndim
    if opts.get("bias"):
        kw["bias"] = b
    if opts.get("output_size"):
        smallest = ct.output_shape(x.shape, w.shape, stride, padding, dilation, groups=groups)
        strides = (stride,) * ndim if isinstance(stride, int) else stride
        kw["output_size"] = tuple(m + s - 1 for m, s in zip(smallest[1:-1], strides))
    if opts.get("unbatched"):
        x = x[0]
    expected = FUNCS[ndim](x, w, **kw)
    lazy = DASK[ndim](da.from_array(x, chunks=(*(2,) * (x.ndim - 1), -1)), w, **kw)
    assert lazy.shape == expected.shape
    np.testing.assert_allclose(lazy.compute(), expected, rtol=1e-5, atol=1e-5)


# ---- the CLI --------------------------------------------------------------------------

@pytest.mark.parametrize("flags, kw", [
    (["--padding", "same"], dict(padding="same")),
    (["--padding", "0:1,1,2:0", "--output-size", "8,9,10"],
     dict(padding=((0, 1), 1, (2, 0)), output_size=(8, 9, 10))),
])
def test_cli_apply_padding_and_output_size(tmp_path, rng, assert_close, flags, kw):
    x = rng.uniform(-1, 1, (1, 4, 5, 5, 3)).astype(np.float32)
    w = rng.uniform(-1, 1, (4, 3, 3, 3, 3)).astype(np.float32)
    b = rng.uniform(-1, 1, 4).astype(np.float32)
    for name, a in (("x.npy", x), ("w.npy", w), ("b.npy", b)):
        np.save(tmp_path / name, a)
    res = subprocess.run([sys.executable, "-m", "convtranspose", "apply", "x.npy", "w.npy",
                          "-o", "y.npy", "--stride", "2", "--bias", "b.npy", "--chunk", "3",
                          *flags], cwd=tmp_path, capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, timeout=120)
    assert res.returncode == 0, res.stderr
    expected = ct.conv_transpose3d(x, w, 2, bias=b, **kw)
    assert_close(np.load(tmp_path / "y.npy"), expected, np.float32)


def test_cli_apply_bad_padding(tmp_path, rng):
    np.save(tmp_path / "x.npy", np.ones((1, 4, 3), np.float32))
    np.save(tmp_path / "w.npy", np.ones((2, 3, 3), np.float32))
    res = subprocess.run([sys.executable, "-m", "convtranspose", "apply", "x.npy", "w.npy",
                          "-o", "y.npy", "--padding", "full"], cwd=tmp_path,
                         capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=60)
    assert res.returncode == 2 and "--padding" in res.stderr and "LO:HI" in res.stderr


# ---- errors ---------------------------------------------------------------------------

X3 = np.ones((1, 4, 4, 4, 6), np.float32)
W3 = np.ones((4, 3, 3, 3, 6), np.float32)


@pytest.mark.parametrize("call, error, pattern", [
    (lambda: ct.conv_transpose3d(X3, W3, bias=np.ones(5, np.float32)), ValueError,
     r"'bias' must have shape \(C_out,\) = \(4,\).*got shape \(5,\)"),
    (lambda: ct.conv_transpose3d(X3, W3, bias=np.ones((1, 4), np.float32)), ValueError,
     r"'bias' must have shape \(C_out,\)"),
    (lambda: ct.conv_transpose3d(X3, W3, bias=np.ones(4, np.int64)), TypeError,
     r"'bias' must have a floating dtype"),
    (lambda: ct.conv_transpose3d_vjp(X3, W3, np.ones((1, 6, 6, 6, 4)), bias=[1.0, 2.0, 3.0]),
     ValueError, r"'bias' must have shape"),
    (lambda: ct.conv_transpose3d(X3, W3, 2, 1, output_size=17), ValueError,
     r"'output_size'=\(17, 17, 17\) cannot be reached.*\(7\.\.8, 7\.\.8, 7\.\.8\)"),
    (lambda: ct.conv_transpose2d(X3[0], W3[..., 0, :], 2, output_size=(9, 11)), ValueError,
     r"cannot be reached.*\(9\.\.10, 9\.\.10\)"),
    (lambda: ct.conv_transpose3d(X3, W3, 2, 1, 1, 1, output_size=8), ValueError,
     r"give 'output_size' or 'output_padding', not both"),
    (lambda: ct.conv_transpose3d(X3, W3, output_size=(6, 6)), ValueError,
     r"'output_size' must be an int or a tuple of 3 ints"),
    (lambda: ct.conv_transpose3d(X3, W3, padding="full"), ValueError,
     r"'padding' must be an int, a tuple of 3 entries.*'same' or 'valid', got the str 'full'"),
    (lambda: ct.conv_transpose3d(X3, W3, padding=(1, (1, 2, 3), 0)), ValueError,
     r"each 'padding' entry must be an int or a \(lo, hi\) pair"),
    (lambda: ct.conv_transpose3d(X3, W3, padding=(1, 1.5, 0)), TypeError,
     r"'padding' entries must be ints or \(lo, hi\) pairs"),
    (lambda: ct.conv_transpose3d(X3, W3, padding=((1, 2), (0, 1))), ValueError,
     r"'padding' must be an int or a tuple of 3 ints or \(lo, hi\) pairs.*with 2 entries"),
    (lambda: ct.conv_transpose1d(X3[:, 0, 0], W3[:, 0, 0], padding=(0, 1)), ValueError,
     r"for \(lo, hi\) on the one axis write padding=\(\(0, 1\),\)"),
    (lambda: ct.conv_transpose1d(X3[:, 0, 0], W3[:, 0, 0], padding=((3, 3),)), ValueError,
     r"the output would have spatial size"),
    (lambda: ct.conv_transpose3d(X3, W3, padding=None), TypeError, r"'padding' must be"),
    (lambda: ct.conv_transpose3d_vjp(X3[0], W3, np.ones((1, 6, 6, 6, 4))), ValueError,
     r"'cotangent' must have the forward output's shape \(6, 6, 6, 4\)"),
    (lambda: ct.conv_transpose3d(np.ones((4, 4, 6)), W3), ValueError,
     r"'input' must have 5 dimensions .*or 4 without the batch axis"),
    (lambda: ct.output_shape((4, 6), W3.shape), ValueError,
     r"'input_shape' must have 3, 4 or 5 entries .*or one fewer without the batch axis"),
])
def test_option_errors(call, error, pattern):
    with pytest.raises(error, match=pattern):
        call()


@pytest.mark.parametrize("ndim, groups", [(1, 1), (2, 2), (3, 1), (3, 4)])
def test_torch_layout_gets_a_hint(rng, ndim, groups):
    """PyTorch-layout arrays (input (N, C_in, *spatial), weight (C_in, C_out/g, *k)): the
    channel error says so and names the conversions."""
    xt = rng.uniform(-1, 1, (2, 8, *(5,) * ndim)).astype(np.float32)
    wt = rng.uniform(-1, 1, (8, 3, *(3,) * ndim)).astype(np.float32)
    with pytest.raises(ValueError, match=r"PyTorch's channels-first layout.*np\.moveaxis"
                                         r"\(x, 1, -1\).*weight_from_torch\(w, groups="):
        FUNCS[ndim](xt, wt, 2, groups=groups)
    # The conversions the message names make the call work, as PyTorch computes it.
    y = FUNCS[ndim](np.moveaxis(xt, 1, -1), ct.weight_from_torch(wt, groups), 2,
                    groups=groups)
    with torch.no_grad():
        yt = TORCH[ndim](torch.from_numpy(xt), torch.from_numpy(wt), stride=2, groups=groups)
    np.testing.assert_allclose(y, np.moveaxis(yt.numpy(), 1, -1), rtol=1e-4, atol=1e-4)


def test_no_hint_when_the_shapes_do_not_read_as_torch():
    with pytest.raises(ValueError, match="channel mismatch") as info:
        ct.conv_transpose3d(X3, np.ones((5, 3, 3, 3, 5), np.float32))
    assert "PyTorch" not in str(info.value)


def test_plan_and_output_shape_take_the_options():
    p = ct.plan((4, 4, 4, 6), W3.shape, 2, ((0, 1), 1, 0), output_size=(9, 8, 10))
    assert p.spec.output_shape == (1, 9, 8, 10, 4)
    assert p.spec.pad_lo == (0, 1, 0) and p.spec.pad_hi == (0, 0, -1)
    assert ct.output_shape((4, 4, 4, 6), W3.shape, 2, "same") == (8, 8, 8, 4)


@pytest.mark.parametrize("fn", [ct.conv_transpose1d, ct.conv_transpose2d, ct.conv_transpose3d,
                                ct.conv_transpose1d_vjp, ct.conv_transpose2d_vjp,
                                ct.conv_transpose3d_vjp, ct.output_shape, ct.plan,
                                ctd.conv_transpose1d, ctd.conv_transpose2d,
                                ctd.conv_transpose3d],
                         ids=lambda f: f.__module__ + "." + f.__name__)
def test_docstring_documents_options_and_its_example_runs(fn):
    import doctest
    import inspect

    doc = fn.__doc__
    for name in inspect.signature(fn).parameters:  # every parameter is documented
        if name not in ("stream", "algorithm", "workspace", "threads", "dtype"):
            assert name in doc, (fn.__name__, name)
    for section in ("Parameters", "Returns", "Raises", "Examples"):
        assert section in doc
    tests = doctest.DocTestFinder().find(fn, fn.__name__, globs={})
    runner = doctest.DocTestRunner()
    for t in tests:
        runner.run(t)
    assert runner.summarize(verbose=False).attempted >= 2
    assert runner.summarize(verbose=False).failed == 0
