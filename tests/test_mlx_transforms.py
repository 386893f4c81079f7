"""convtranspose.mlx as a first-class MLX operation: under mx.compile, mx.vmap, mx.jvp,
second-order mx.grad, and in compiled training steps, against MLX's own ops and layers.

The compiled primitive must be there (CI installs the `[mlx]` build tools): these tests
fail, never skip, when it cannot be built. The fallback's errors run in a subprocess with
the primitive turned off.
"""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from test_mlx_dropin import CALLS, GRAD_CALLS, GRAD_IDS, IDS, OURS, THEIRS, close, operands, rand

import convtranspose as ct
from convtranspose import mlx as ctm

# MLX has no groups in 3-D: those calls are checked group by group (see `grouped_mlx`).
MLX_CALLS = [c for c in CALLS if not (c[0] == 3 and c[5].get("groups", 1) > 1)]
MLX_IDS = [i for c, i in zip(CALLS, IDS) if c in MLX_CALLS]
GROUPED_3D = (3, (3, 4, 3), 4, 6, 3, dict(stride=2, padding=1, dilation=(1, 2, 1),
                                          output_padding=(1, 0, 1), groups=2))


@pytest.fixture(scope="module", autouse=True)
def primitive():
    """The compiled primitive, built (or found in the cache) once."""
    path = ctm.build_extension()
    assert ctm.extension_error() is None
    return path


def grouped_mlx(x, w, stride=1, padding=0, dilation=1, output_padding=0, groups=1):
    """MLX's conv_transpose3d group by group: the reference where MLX refuses groups."""
    ci, co = x.shape[-1] // groups, w.shape[0] // groups
    return mx.concatenate([
        mx.conv_transpose3d(x[..., g * ci:(g + 1) * ci], w[g * co:(g + 1) * co], stride,
                            padding, dilation, output_padding) for g in range(groups)], -1)


def reference(call):
    if call[0] == 3 and call[5].get("groups", 1) > 1:
        return grouped_mlx
    return THEIRS[call[0]]


ALL = MLX_CALLS + [GROUPED_3D]
ALL_IDS = MLX_IDS + ["3d-groups"]
# Where MLX's own gradients are right (not at negative padding or output_padding >= stride,
# where mx.vjp's grad_input has the wrong shape: see test_mlx_dropin).
GRADS = GRAD_CALLS + [GROUPED_3D]
GRAD_IDS = GRAD_IDS + ["3d-groups"]
EDGE = [CALLS[1], CALLS[5]]


@pytest.mark.parametrize("call", ALL, ids=ALL_IDS)
def test_compiled_forward_equals_mlx(call):
    x, w = operands(call)
    ours = mx.compile(lambda a, b: OURS[call[0]](a, b, **call[5]))(x, w)
    close(ours, reference(call)(x, w, **call[5]), 2e-6)


@pytest.mark.parametrize("call", GRADS, ids=GRAD_IDS)
def test_compiled_gradients_equal_mlx(call):
    x, w = operands(call)
    t = rand(reference(call)(x, w, **call[5]).shape, seed=5)

    def loss(conv):
        return lambda a, b: (conv(a, b, **call[5]) * t).sum()

    ours = mx.compile(mx.grad(loss(OURS[call[0]]), argnums=(0, 1)))(x, w)
    theirs = mx.grad(loss(reference(call)), argnums=(0, 1))(x, w)
    for a, b in zip(ours, theirs):
        close(a, b, 1e-5)


@pytest.mark.parametrize("call", EDGE, ids=["1d-negpad", "3d-op>=stride"])
def test_compiled_vjp_at_edge_settings_equals_the_numpy_engine(call):
    """Where mx.vjp's own gradient is wrong: ours equals our NumPy engine's VJP (itself
    checked against the exact adjoint of MLX's forward in test_mlx_dropin)."""
    x, w = operands(call)
    cot = rand(OURS[call[0]](x, w, **call[5]).shape, seed=4)
    vjp = mx.compile(lambda a, b, c: mx.vjp(lambda p, q: OURS[call[0]](p, q, **call[5]),
                                            [a, b], [c])[1])
    gx, gw = vjp(x, w, cot)
    want = getattr(ct, f"conv_transpose{call[0]}d_vjp")(
        np.array(x), np.array(w), np.array(cot), **call[5])
    for got, ref in zip((gx, gw), want):
        close(got, mx.array(ref), 1e-5)


@pytest.mark.parametrize("call", GRADS, ids=GRAD_IDS)
def test_second_order_gradients_equal_mlx(call):
    """grad of a function of grad: both of our gradients must be differentiable again."""
    x, w = operands(call)
    v = rand(x.shape, seed=7)

    def outer(conv):
        inner = mx.grad(lambda a, b: mx.sin(conv(a, b, **call[5])).sum(), argnums=0)
        return lambda a, b: (inner(a, b) * v).sum()

    ours = mx.grad(outer(OURS[call[0]]), argnums=(0, 1))(x, w)
    theirs = mx.grad(outer(reference(call)), argnums=(0, 1))(x, w)
    for a, b in zip(ours, theirs):
        close(a, b, 1e-5)


def test_grad_of_grad_1d_stride_2_equals_mlx():
    """The case that returned a silently different result before the primitive."""
    x, w = rand((1, 7, 3)), rand((2, 3, 3), seed=1)

    def f(conv):
        return lambda a: mx.grad(lambda b: (conv(b, w, stride=2) ** 2).sum())(a).sum()

    close(mx.grad(f(ctm.conv_transpose1d))(x), mx.grad(f(mx.conv_transpose1d))(x), 1e-5)
    # And the weight's second derivative through grad_weight's own graph.
    def g(conv):
        return lambda b: mx.grad(lambda a: (conv(x, a, stride=2) ** 2).sum())(b).sum()

    close(mx.grad(g(ctm.conv_transpose1d))(w), mx.grad(g(mx.conv_transpose1d))(w), 1e-5)


@pytest.mark.parametrize("call", GRADS, ids=GRAD_IDS)
def test_jvp_equals_mlx(call):
    x, w = operands(call)
    tx, tw = rand(x.shape, seed=3), rand(w.shape, seed=4)
    (y, ty), = [mx.jvp(lambda a, b: OURS[call[0]](a, b, **call[5]), [x, w], [tx, tw])]
    # MLX's convolution has no jvp: the operation is linear in each argument, so the
    # reference is the sum of MLX's forward with each tangent in its argument's place.
    conv = partial(reference(call), **call[5])
    close(y[0], conv(x, w), 2e-6)
    close(ty[0], conv(tx, w) + conv(x, tw), 1e-5)
    # And forward-over-reverse: the jvp of a gradient.
    t = rand(y[0].shape, seed=6)
    hvp = mx.jvp(mx.grad(lambda b: (mx.sin(OURS[call[0]](x, b, **call[5])) * t).sum()),
                 [w], [tw])[1][0]
    gw = mx.grad(lambda b: (mx.sin(conv(x, b)) * t).sum())
    eps = 1e-3  # the reference: a central difference of MLX's gradient (float32: loose)
    want = (gw(w + eps * tw) - gw(w - eps * tw)) / (2 * eps)
    close(hvp, want, 2e-3)


@pytest.mark.parametrize("call", ALL, ids=ALL_IDS)
def test_vmap_over_inputs_and_weights(call):
    x, w = operands(call)
    kw = call[5]
    xs = mx.stack([x, rand(x.shape, seed=8), rand(x.shape, seed=9)], axis=1)  # mapped axis 1
    ws = mx.stack([w, rand(w.shape, seed=10)])
    ours = mx.vmap(lambda a: OURS[call[0]](a, w, **kw), in_axes=1)(xs)
    theirs = mx.stack([reference(call)(xs[:, i], w, **kw) for i in range(3)])
    close(ours, theirs, 2e-6)
    ours = mx.vmap(lambda b: OURS[call[0]](x, b, **kw))(ws)
    theirs = mx.stack([reference(call)(x, ws[i], **kw) for i in range(2)])
    close(ours, theirs, 2e-6)
    both = mx.vmap(lambda a, b: OURS[call[0]](a, b, **kw), in_axes=(1, 0))(xs[:, :2], ws)
    theirs = mx.stack([reference(call)(xs[:, i], ws[i], **kw) for i in range(2)])
    close(both, theirs, 2e-6)
    if call not in GRADS:
        return
    # Per-example gradients: vmap of grad, compiled.
    def loss(conv):
        return lambda b, a: (conv(a[None], b, **kw) ** 2).sum()

    ours = mx.compile(mx.vmap(mx.grad(loss(OURS[call[0]])), in_axes=(None, 0)))(w, x)
    theirs = mx.stack([mx.grad(loss(reference(call)))(w, x[i]) for i in range(x.shape[0])])
    close(ours, theirs, 1e-5)


# The kernel's three layouts (its vectors along the outputs, along the summed channels for
# 1-4 outputs, or along a depthwise layer's channels) in the forward and in grad_input,
# and phases no tap reaches (stride > kernel).
LAYOUTS = [
    (3, (3, 4, 4), 16, 2, 3, dict(stride=2, padding=1, output_padding=1)),
    (2, (5, 5), 3, 12, 3, dict(stride=2)),
    (3, (3, 4, 4), 8, 8, 3, dict(stride=2, padding=1, groups=8)),
    (1, (9,), 10, 1, 5, dict(stride=3, dilation=2)),
    (1, (6,), 4, 4, 2, dict(stride=4, output_padding=1)),
]


@pytest.mark.parametrize("call", LAYOUTS, ids=["dot", "dot-grad-input", "depthwise-3d",
                                               "dot-1d", "stride>kernel"])
def test_kernel_layouts_equal_mlx(call):
    x, w = operands(call)
    t = rand(reference(call)(x, w, **call[5]).shape, seed=5)

    def loss(conv):
        return lambda a, b: (conv(a, b, **call[5]) * t).sum()

    close(mx.compile(lambda a, b: OURS[call[0]](a, b, **call[5]))(x, w),
          reference(call)(x, w, **call[5]), 2e-6)
    ours = mx.compile(mx.grad(loss(OURS[call[0]]), argnums=(0, 1)))(x, w)
    # Against our NumPy engine's VJP (mx.vjp's grad_input has the wrong shape at stride >
    # kernel with output_padding, as at the edge settings).
    theirs = getattr(ct, f"conv_transpose{call[0]}d_vjp")(
        np.array(x), np.array(w), np.array(t), **call[5])
    for a, b in zip(ours, theirs):
        close(a, mx.array(b), 1e-5)


def test_dtypes_and_views_under_compile():
    call = CALLS[4]
    x, w = operands(call, mx.float16, mx.float32)
    f = mx.compile(lambda a, b: ctm.conv_transpose3d(a, b, **call[5]))
    ours, theirs = f(x, w), mx.conv_transpose3d(x, w, **call[5])
    assert ours.dtype == theirs.dtype == mx.float32
    close(ours, theirs, 2e-6)
    xv = rand((2, 4, 5, 3, 4)).swapaxes(1, 2)
    wv = rand((4, 3, 3, 3, 6), seed=1).swapaxes(0, 4)  # channels strided: copied
    close(mx.compile(lambda a, b: ctm.conv_transpose3d(a, b, 2, 1))(xv, wv),
          mx.conv_transpose3d(xv, wv, 2, 1), 2e-6)


# ---- compiled training steps --------------------------------------------------------------

class GroupedReference(nn.Module):
    """A layer with groups computed by MLX's functions (mlx.nn's layers have no groups; in
    3-D, through `grouped_mlx`)."""

    def __init__(self, like):
        super().__init__()
        self.weight, self.bias = like.weight, like.bias
        self.settings = dict(stride=like.stride, padding=like.padding,
                             dilation=like.dilation, output_padding=like.output_padding,
                             groups=like.groups)
        self._ndim = like._ndim

    def __call__(self, x):
        conv = grouped_mlx if self._ndim == 3 else THEIRS[self._ndim]
        return conv(x, self.weight, **self.settings) + self.bias


LAYER_CASES = [  # (ndim, C_in, C_out, kernel, settings, input spatial)
    (1, 4, 6, 3, dict(stride=2, padding=1, output_padding=1, groups=2), (7,)),
    (2, 6, 4, (3, 2), dict(stride=(2, 1), padding=(1, 0), dilation=2), (4, 5)),
    (3, 4, 3, 3, dict(stride=2, padding=1, output_padding=1), (3, 3, 4)),
    (3, 4, 6, 2, dict(stride=(2, 1, 2), dilation=2, output_padding=(1, 0, 0), groups=2),
     (3, 3, 3)),
]
MLX_LAYERS = {1: nn.ConvTranspose1d, 2: nn.ConvTranspose2d, 3: nn.ConvTranspose3d}
OUR_LAYERS = {1: ctm.ConvTranspose1d, 2: ctm.ConvTranspose2d, 3: ctm.ConvTranspose3d}


def _pair(case):
    ndim, cin, cout, k, kw, _ = case
    mx.random.seed(0)
    ours = OUR_LAYERS[ndim](cin, cout, k, **kw)
    ours.bias = rand(ours.bias.shape, seed=21) * 0.1
    if kw.get("groups", 1) > 1:
        return ours, GroupedReference(ours)
    theirs = MLX_LAYERS[ndim](cin, cout, k, **kw)
    theirs.update(ours.parameters())
    return ours, theirs


@pytest.mark.parametrize("case", LAYER_CASES, ids=["1d-groups", "2d-dilation", "3d",
                                                    "3d-groups"])
def test_compiled_adam_step_matches_mlx(case):
    """The mlx-examples pattern: a compiled step with the model's and the optimiser's state
    as inputs=/outputs=; ours against MLX's layer with the same initial weights."""
    ours, theirs = _pair(case)
    x = rand((2, *case[5], case[1]), seed=30)
    target = theirs(x) * 0.5 + 0.1
    mx.eval(target)
    results = {}
    for name, model in (("ours", ours), ("theirs", theirs)):
        opt = optim.Adam(learning_rate=1e-2)
        state = [model.state, opt.state]

        def loss_fn(model, x, y):
            return nn.losses.mse_loss(model(x), y)

        @partial(mx.compile, inputs=state, outputs=state)
        def step(x, y, model=model, opt=opt):
            loss, grads = nn.value_and_grad(model, loss_fn)(model, x, y)
            opt.update(model, grads)
            return loss

        losses = []
        for _ in range(3):
            losses.append(step(x, target).item())
            mx.eval(state)
        results[name] = losses
    np.testing.assert_allclose(results["ours"], results["theirs"], rtol=1e-5)
    assert results["ours"][2] < results["ours"][0]  # it trained
    for (ka, a), (kb, b) in zip(tree_flatten(ours.parameters()),
                                tree_flatten(theirs.parameters())):
        assert ka == kb
        # Adam divides each gradient by its own running size: an element whose gradient
        # is near zero carries its float32 rounding into a step of up to the learning rate.
        close(a, b, 1e-3 * 1e-2, scale=1.0)


# ---- streams and the fallback -------------------------------------------------------------

def test_groups_in_3d_on_a_gpu_stream_raise_naming_the_stream():
    x, w = operands(GROUPED_3D)
    with pytest.raises(ValueError, match=r"conv_transpose3d: groups=2 on stream=.*gpu.*"
                                         r"stream=mx\.cpu"):
        ctm.conv_transpose3d(x, w, **GROUPED_3D[5], stream=mx.gpu)


FALLBACK = r"""
import mlx.core as mx, numpy as np
from convtranspose import mlx as ctm
x = mx.array(np.random.default_rng(0).uniform(-1, 1, (1, 7, 3)).astype(np.float32))
w = mx.array(np.random.default_rng(1).uniform(-1, 1, (2, 3, 3)).astype(np.float32))
assert "CONVTRANSPOSE_MLX_EXTENSION=0" in ctm.extension_error()
f = lambda a, b: (ctm.conv_transpose1d(a, b, stride=2) ** 2).sum()
g = lambda a, b: (mx.conv_transpose1d(a, b, stride=2) ** 2).sum()
# Eager calls and first-order gradients keep working.
assert np.allclose(ctm.conv_transpose1d(x, w, stride=2), mx.conv_transpose1d(x, w, stride=2),
                   atol=1e-6)
for a, b in zip(mx.grad(f, argnums=(0, 1))(x, w), mx.grad(g, argnums=(0, 1))(x, w)):
    assert np.allclose(a, b, atol=1e-5)
def refused(fn):
    try:
        mx.eval(fn())
    except RuntimeError as exc:
        assert "needs convtranspose's compiled MLX primitive" in str(exc), exc
        assert "CONVTRANSPOSE_MLX_EXTENSION=0" in str(exc) and "pip install" in str(exc), exc
        return str(exc).split(": ", 1)[1].split(" needs ")[0]  # what was refused
    raise AssertionError("no error")
print(refused(lambda: mx.compile(lambda a: ctm.conv_transpose1d(a, w, stride=2))(x)))
print(refused(lambda: mx.vmap(lambda a: ctm.conv_transpose1d(a, w, stride=2))(x[None])))
print(refused(lambda: mx.grad(lambda a: mx.grad(f)(a, w).sum())(x)))
print(refused(lambda: mx.grad(lambda b: mx.grad(f, argnums=1)(x, b).sum())(w)))
"""


def test_fallback_serves_eager_calls_and_refuses_transformations():
    env = dict(os.environ, CONVTRANSPOSE_MLX_EXTENSION="0")
    run = subprocess.run([sys.executable, "-c", FALLBACK], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split("\n")[:4] == [
        "a call under mx.compile or mx.vmap", "a call under mx.compile or mx.vmap",
        "a second-order gradient", "a second-order gradient"], run.stdout


def test_a_failed_build_is_reported_with_its_cause(tmp_path):
    """No working C++ compiler: the reason names the failed build and its log, and eager
    calls still compute."""
    code = ("from convtranspose import mlx as ctm\nimport mlx.core as mx\n"
            "err = ctm.extension_error()\nassert 'the build failed (log: ' in err, err\n"
            "y = ctm.conv_transpose1d(mx.ones((1, 3, 2)), mx.ones((2, 2, 2)))\n"
            "print(y.shape)\n")
    env = dict(os.environ, CXX=str(tmp_path / "no-compiler"),
               CONVTRANSPOSE_CACHE_DIR=str(tmp_path))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env=env, timeout=300)
    assert run.returncode == 0 and run.stdout.strip() == "(1, 4, 2)", run.stderr
