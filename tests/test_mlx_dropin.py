"""convtranspose.mlx: the drop-in functions and layers against MLX's own.

Values, dtypes and gradients (mx.grad, mx.value_and_grad, mx.vjp) of the functions equal
MLX's; the layers initialise, load and train exactly like mlx.nn's; groups work in 3-D
(checked against PyTorch, since MLX has none there); `import convtranspose` stays free of
MLX.
"""

from __future__ import annotations

import subprocess
import sys

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_vjp import BF16, mlx_adjoint_vjp, torch_vjp, weight_to_torch

import convtranspose as ct
from convtranspose import mlx as ctm

OURS = {1: ctm.conv_transpose1d, 2: ctm.conv_transpose2d, 3: ctm.conv_transpose3d}
THEIRS = {1: mx.conv_transpose1d, 2: mx.conv_transpose2d, 3: mx.conv_transpose3d}
LAYERS = {1: (ctm.ConvTranspose1d, nn.ConvTranspose1d),
          2: (ctm.ConvTranspose2d, nn.ConvTranspose2d),
          3: (ctm.ConvTranspose3d, nn.ConvTranspose3d)}
MX = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32,
      "float64": mx.float64}


def name_of(dtype) -> str:
    return str(dtype).split(".")[-1]


def to_np(a: mx.array) -> np.ndarray:
    return np.array(a.astype(mx.float32) if a.dtype == mx.bfloat16 else a).astype(np.float64)


def rand(shape, dtype=mx.float32, seed=0) -> mx.array:
    rng = np.random.default_rng(seed)
    return mx.array(rng.uniform(-1, 1, shape).astype(np.float32)).astype(dtype)


def close(a: mx.array, b: mx.array, rtol: float, scale: float | None = None) -> None:
    """|a - b| <= rtol * max|b| (or * scale): results of sums that both sides round."""
    assert a.shape == b.shape, (a.shape, b.shape)
    a64, b64 = to_np(a), to_np(b)
    bound = rtol * (scale if scale is not None else max(np.abs(b64).max(), 1e-30))
    err = np.abs(a64 - b64).max()
    assert err <= bound, f"max error {err:.3g} > {bound:.3g}"


RTOL = {"float16": 4e-3, "bfloat16": 3e-2, "float32": 2e-6, "float64": 1e-12}

# (ndim, input spatial, C_in, C_out, kernel, settings for MLX's function)
CALLS = [
    (1, (9,), 4, 6, 3, dict(stride=2, padding=1, output_padding=1)),
    (1, (8,), 6, 4, 4, dict(stride=3, padding=-1, dilation=2, output_padding=3, groups=2)),
    (2, (5, 6), 4, 6, (3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))),
    (2, (4, 4), 6, 6, 3, dict(stride=2, padding=1, output_padding=1, groups=6)),
    (3, (3, 4, 5), 4, 6, 3, dict(stride=2, padding=1, output_padding=1)),
    (3, (3, 4, 4), 4, 2, (2, 3, 4), dict(stride=(1, 2, 3), padding=(0, 1, -1),
                                         output_padding=(0, 2, 3))),
    (3, (3, 3, 3), 4, 4, 2, dict(stride=2)),
]
IDS = [f"{c[0]}d-{i}" for i, c in enumerate(CALLS)]


def operands(call, dtype=mx.float32, wdtype=None, seed=0):
    ndim, spatial, c_in, c_out, k, kw = call
    kernel = (k,) * ndim if isinstance(k, int) else k
    x = rand((2, *spatial, c_in), dtype, seed)
    w = rand((c_out, *kernel, c_in // kw.get("groups", 1)), wdtype or dtype, seed + 1)
    return x, w


# ---- the functions ------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("call", CALLS, ids=IDS)
def test_functions_equal_mlx(call, dtype):
    x, w = operands(call, MX[dtype])
    ours = OURS[call[0]](x, w, **call[5])
    theirs = THEIRS[call[0]](x, w, **call[5])
    assert isinstance(ours, mx.array)
    assert ours.dtype == theirs.dtype and ours.shape == theirs.shape
    close(ours, theirs, RTOL[dtype])


@pytest.mark.parametrize("xd, wd", [("float16", "float32"), ("bfloat16", "float16"),
                                    ("float32", "bfloat16"), ("float64", "float64")])
def test_dtype_promotion_and_gradient_dtypes_follow_mlx(xd, wd):
    call = CALLS[4]
    x, w = operands(call, MX[xd], MX[wd])
    ours = ctm.conv_transpose3d(x, w, **call[5])
    theirs = mx.conv_transpose3d(x, w, **call[5], stream=mx.cpu)
    assert ours.dtype == theirs.dtype
    cot = mx.ones(ours.shape, ours.dtype)
    _, (gx, gw) = mx.vjp(lambda a, b: ctm.conv_transpose3d(a, b, **call[5]), [x, w], [cot])
    _, (tx, tw) = mx.vjp(lambda a, b: mx.conv_transpose3d(a, b, **call[5]), [x, w], [cot])
    assert (gx.dtype, gw.dtype) == (tx.dtype, tw.dtype) == (x.dtype, w.dtype)
    if xd != "float64":
        rtol = max(RTOL[xd], RTOL[wd])
        close(ours, theirs, rtol)
        close(gx, tx, rtol)
        close(gw, tw, rtol)
    else:  # MLX's CPU convolution cannot evaluate float64 with padding: ours still does
        xn, wn = np.array(x), np.array(w)
        assert np.allclose(np.array(ours), ct.conv_transpose3d(xn, wn, **call[5]),
                           rtol=1e-12, atol=1e-12)
        ref = ct.conv_transpose3d_vjp(xn, wn, np.array(cot), **call[5])
        assert np.allclose(np.array(gx), ref[0], rtol=1e-12, atol=1e-12)
        assert np.allclose(np.array(gw), ref[1], rtol=1e-12, atol=1e-12)


# Calls inside the region where mx.vjp itself is right (no negative padding,
# output_padding < stride): there MLX's gradients are the reference.
GRAD_CALLS = [CALLS[0], CALLS[2], CALLS[3], CALLS[4], CALLS[6]]
GRAD_IDS = ["1d", "2d", "2d-depthwise", "3d", "3d-k2s2"]


@pytest.mark.parametrize("call", GRAD_CALLS, ids=GRAD_IDS)
def test_mx_grad_equals_mlx(call):
    x, w = operands(call)
    target = rand(OURS[call[0]](x, w, **call[5]).shape, seed=9)

    def loss(fn):
        return lambda a, b: (mx.sin(fn(a, b, **call[5])) * target).sum()

    ours = mx.grad(loss(OURS[call[0]]), argnums=(0, 1))(x, w)
    theirs = mx.grad(loss(THEIRS[call[0]]), argnums=(0, 1))(x, w)
    for a, b in zip(ours, theirs):
        close(a, b, 1e-5)
    # Only the weight, as a layer's training asks.
    only_w = mx.grad(loss(OURS[call[0]]), argnums=1)(x, w)
    close(only_w, theirs[1], 1e-5)


@pytest.mark.parametrize("call", GRAD_CALLS, ids=GRAD_IDS)
def test_value_and_grad_and_vjp_equal_mlx(call):
    x, w = operands(call)

    def loss(fn):
        return lambda a, b: (fn(a, b, **call[5]) ** 2).mean()

    (v1, g1) = mx.value_and_grad(loss(OURS[call[0]]), argnums=(0, 1))(x, w)
    (v2, g2) = mx.value_and_grad(loss(THEIRS[call[0]]), argnums=(0, 1))(x, w)
    close(v1, v2, 1e-6)
    for a, b in zip(g1, g2):
        close(a, b, 1e-5)
    y = OURS[call[0]](x, w, **call[5])
    cot = rand(y.shape, seed=5)
    (o1,), (gx1, gw1) = mx.vjp(lambda a, b: OURS[call[0]](a, b, **call[5]), [x, w], [cot])
    (o2,), (gx2, gw2) = mx.vjp(lambda a, b: THEIRS[call[0]](a, b, **call[5]), [x, w], [cot])
    close(o1, o2, 2e-6)
    close(gx1, gx2, 1e-5)
    close(gw1, gw2, 1e-5)


@pytest.mark.parametrize("call", [CALLS[1], CALLS[5]], ids=["1d-negpad", "3d-op>=stride"])
def test_grad_at_edge_settings_is_the_adjoint_of_mlx_forward(call):
    """Negative padding / output_padding >= stride: mx.vjp's own grad_input has the wrong
    shape there (MLX 0.32); ours is the exact VJP of MLX's forward."""
    x, w = operands(call)
    cot = rand(OURS[call[0]](x, w, **call[5]).shape, seed=4)
    _, (gx, gw) = mx.vjp(lambda a, b: OURS[call[0]](a, b, **call[5]), [x, w], [cot])
    args = [np.array(a) for a in (x, w, cot)]
    want = mlx_adjoint_vjp(*args, **call[5])
    magnitude = mlx_adjoint_vjp(*[np.abs(a) for a in args], **call[5])
    for got, ref, mag in zip((gx, gw), want, magnitude):
        assert tuple(got.shape) == ref.shape
        assert np.all(np.abs(np.array(got) - ref) <= 1e-5 * (mag + 1e-30))


def test_groups_in_3d_against_torch():
    """MLX refuses groups in 3-D; ours computes them (forward and both gradients)."""
    kw = dict(stride=2, padding=1, dilation=(1, 2, 1), output_padding=1, groups=3)
    x, w = rand((2, 3, 4, 4, 6)), rand((9, 3, 2, 3, 2), seed=1)
    with pytest.raises(ValueError):
        mx.eval(mx.conv_transpose3d(x, w, **kw))
    y = ctm.conv_transpose3d(x, w, **kw)
    cot = rand(y.shape, seed=2)
    _, (gx, gw) = mx.vjp(lambda a, b: ctm.conv_transpose3d(a, b, **kw), [x, w], [cot])
    xn, wn, cn = (np.array(a) for a in (x, w, cot))
    tx, tw = torch_vjp(xn, wn, cn, **kw)
    import torch  # the forward too, in PyTorch's layout
    ty = torch.nn.functional.conv_transpose3d(
        torch.tensor(np.moveaxis(xn, -1, 1).astype(np.float64)),
        torch.tensor(weight_to_torch(wn.astype(np.float64), 3)), **kw)
    np.testing.assert_allclose(np.array(y), np.moveaxis(ty.numpy(), 1, -1), atol=2e-5)
    np.testing.assert_allclose(np.array(gx), tx, atol=2e-5)
    np.testing.assert_allclose(np.array(gw), tw, atol=2e-5)


def test_streams_and_bad_calls():
    call = CALLS[4]
    x, w = operands(call)
    want = ctm.conv_transpose3d(x, w, **call[5])
    for stream in (mx.cpu, mx.default_stream(mx.cpu), mx.Device(mx.cpu)):
        close(ctm.conv_transpose3d(x, w, **call[5], stream=stream), want, 0)
    with pytest.raises(ValueError, match=r"conv_transpose3d: 'stream' must be None, an MLX"):
        ctm.conv_transpose3d(x, w, stream="tpu")
    with pytest.raises(ValueError, match=r"conv_transpose3d: channel mismatch"):
        ctm.conv_transpose3d(x, rand((6, 3, 3, 3, 5)))
    with pytest.raises(ValueError, match=r"conv_transpose2d: 'input' must have 4 dimensions"):
        ctm.conv_transpose2d(x, w)
    with pytest.raises(TypeError, match=r"'input' must have a floating dtype"):
        ctm.conv_transpose3d(x.astype(mx.int32), w)
    # A plain array (anything mx.array takes) is accepted, as MLX's functions accept it.
    close(ctm.conv_transpose3d(np.array(x), w, **call[5]), want, 0)


def test_non_contiguous_mlx_views():
    x = rand((2, 4, 5, 3, 4)).swapaxes(1, 2)  # strided views, as MLX hands them out
    w = rand((4, 3, 3, 3, 6), seed=1).swapaxes(0, 4)
    close(ctm.conv_transpose3d(x, w, 2, 1), mx.conv_transpose3d(x, w, 2, 1), 2e-6)
    ours = mx.grad(lambda a, b: ctm.conv_transpose3d(a, b, 2, 1).sum(), argnums=(0, 1))(x, w)
    theirs = mx.grad(lambda a, b: mx.conv_transpose3d(a, b, 2, 1).sum(), argnums=(0, 1))(x, w)
    for a, b in zip(ours, theirs):
        close(a, b, 1e-5)


def test_bfloat16_bits_survive_the_round_trip():
    """bfloat16 travels through NumPy as float32 and back: exactly MLX's rounding."""
    call = CALLS[6]
    x, w = operands(call, mx.bfloat16)
    ours = ctm.conv_transpose3d(x, w, **call[5])
    via_f32 = ctm.conv_transpose3d(x.astype(mx.float32), w.astype(mx.float32), **call[5])
    assert ours.dtype == mx.bfloat16
    assert mx.array_equal(ours, via_f32.astype(mx.bfloat16)).item()
    host = ct.conv_transpose3d(np.array(x.astype(mx.float32)).astype(BF16),
                               np.array(w.astype(mx.float32)).astype(BF16), **call[5])
    assert np.array_equal(to_np(ours), host.astype(np.float64))


# ---- the layers ---------------------------------------------------------------------------

LAYER_ARGS = {
    1: [(4, 6, 3), dict(stride=2, padding=1, output_padding=1)],
    2: [(4, 6, (3, 2)), dict(stride=(2, 1), padding=(1, 0), dilation=2)],
    3: [(4, 6, 3), dict(stride=2, padding=1, output_padding=1)],
}


@pytest.mark.parametrize("ndim", [1, 2, 3])
@pytest.mark.parametrize("bias", [True, False])
def test_layers_initialise_and_run_like_mlx(ndim, bias):
    ours_cls, theirs_cls = LAYERS[ndim]
    args, kw = LAYER_ARGS[ndim]
    mx.random.seed(123)
    theirs = theirs_cls(*args, **kw, bias=bias)
    mx.random.seed(123)
    ours = ours_cls(*args, **kw, bias=bias)
    flat_ours, flat_theirs = dict(tree_flatten(ours.parameters())), dict(
        tree_flatten(theirs.parameters()))
    assert flat_ours.keys() == flat_theirs.keys() == ({"weight", "bias"} if bias
                                                       else {"weight"})
    for key in flat_ours:
        assert mx.array_equal(flat_ours[key], flat_theirs[key]).item(), key
    for attr in ("stride", "padding", "dilation", "output_padding"):
        assert getattr(ours, attr) == getattr(theirs, attr), attr
    assert repr(ours).startswith(repr(theirs).split("(")[0])
    # Give the bias something to add, then both layers must compute the same thing.
    if bias:
        theirs.bias = rand(theirs.bias.shape, seed=3)
    ours.load_weights(list(tree_flatten(theirs.parameters())))
    x = rand((2, *(5,) * ndim, 4), seed=7)
    close(ours(x), theirs(x), 2e-6)


def test_layer_groups_and_its_checks():
    layer = ctm.ConvTranspose3d(6, 9, (2, 3, 2), stride=2, padding=1, groups=3)
    assert layer.weight.shape == (9, 2, 3, 2, 2)
    assert "groups=3" in repr(layer)
    bound = (1 / (2 * 2 * 3 * 2)) ** 0.5  # 1/sqrt(C_in/groups * prod(kernel)), as nn.Conv3d
    assert float(mx.abs(layer.weight).max()) <= bound
    x = rand((1, 3, 4, 5, 6), seed=8)
    y = layer(x)
    want = ct.conv_transpose3d(np.array(x), np.array(layer.weight), 2, 1, groups=3)
    np.testing.assert_allclose(np.array(y), want + np.array(layer.bias), atol=1e-6)
    with pytest.raises(ValueError, match=r"ConvTranspose3d: 'groups'=4 must divide"):
        ctm.ConvTranspose3d(6, 9, 3, groups=4)
    with pytest.raises(ValueError, match=r"ConvTranspose2d: 'groups' must be an int >= 1"):
        ctm.ConvTranspose2d(6, 9, 3, groups=0)


def _model(kind: str) -> nn.Module:
    mod = ctm if kind == "ours" else nn
    return nn.Sequential(
        mod.ConvTranspose3d(4, 6, 3, stride=2, padding=1, output_padding=1),
        nn.ReLU(),
        mod.ConvTranspose3d(6, 3, 2, stride=2),
    )


@pytest.mark.parametrize("make_opt", [lambda: optim.SGD(learning_rate=0.05, momentum=0.9),
                                      lambda: optim.Adam(learning_rate=1e-2)],
                         ids=["sgd", "adam"])
def test_training_steps_match_mlx_layers(make_opt):
    """Swap mlx.nn.ConvTranspose3d for ours in a small model: same initial weights, same
    data, two optimiser steps -> the same losses and the same parameters."""
    mx.random.seed(0)
    theirs = _model("theirs")
    mx.random.seed(0)
    ours = _model("ours")
    assert isinstance(ours.layers[0], ctm.ConvTranspose3d)
    for (ka, a), (kb, b) in zip(tree_flatten(ours.parameters()),
                                tree_flatten(theirs.parameters())):
        assert ka == kb and mx.array_equal(a, b).item()
    x = rand((2, 3, 3, 3, 4), seed=11)
    target = rand((2, 12, 12, 12, 3), seed=12)

    def loss_fn(model, x, y):
        return nn.losses.mse_loss(model(x), y)

    losses = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        opt = make_opt()
        step = nn.value_and_grad(model, loss_fn)
        losses[name] = []
        for _ in range(2):
            loss, grads = step(model, x, target)
            opt.update(model, grads)
            mx.eval(model.parameters(), opt.state)
            losses[name].append(loss.item())
    np.testing.assert_allclose(losses["ours"], losses["theirs"], rtol=1e-5)
    assert losses["ours"][1] != losses["ours"][0]  # the step really changed something
    for (ka, a), (kb, b) in zip(tree_flatten(ours.parameters()),
                                tree_flatten(theirs.parameters())):
        assert ka == kb
        close(a, b, 1e-4)


# ---- packaging ----------------------------------------------------------------------------

def test_importing_convtranspose_does_not_import_mlx():
    code = (
        "import sys, numpy as np\n"
        "import convtranspose as ct\n"
        "x = np.ones((1, 2, 2, 2, 2), np.float32); w = np.ones((2, 2, 2, 2, 2), np.float32)\n"
        "y = ct.conv_transpose3d(x, w, 2)\n"
        "ct.conv_transpose3d_vjp(x, w, np.ones_like(y), 2)\n"
        "assert not [m for m in sys.modules if m == 'mlx' or m.startswith('mlx.')], 'mlx'\n"
        "import convtranspose.mlx\n"
        "assert 'mlx.core' in sys.modules\n"
        "print('ok')\n"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0 and run.stdout.strip() == "ok", run.stderr
