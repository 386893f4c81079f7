"""Shared helpers for the test suite, offered as fixtures.

- `rng`: a seeded NumPy generator (a fresh one per test, so tests don't depend on order).
- `random_array(rng, shape, dtype)`: uniform values in [-1, 1) in any supported dtype.
- `tolerance(dtype)` / `assert_close(actual, expected, dtype, magnitude=None)`: honest
  per-dtype comparisons, relative to the magnitude of the output (see `assert_close`).
- `torch_conv_transpose(x, w, ...)`: our channels-last layout -> PyTorch's layout ->
  `torch.nn.functional.conv_transpose{1,2,3}d` -> back to channels last.
- `mlx_conv_transpose(x, w, ...)`: `mlx.core.conv_transpose{1,2,3}d` on the CPU.
- `isa`: parametrised over the compiled kernel's instruction sets on this CPU, each made
  current for the test (the one before is restored).
- `avx512_planner`: plans made as on the AVX-512 build (Zen 4), whatever the host: for
  the tests that pin the planner's choices on representative layers.
- `small_calls_threaded`: plans of small calls on every thread they are given (they stay
  on one otherwise); the plan cache is cleared before and after.

Nothing here is autouse, and what a fixture changes it restores, so other test files never
need to override any of it. MLX and PyTorch are imported directly: they are test dependencies, and a
comparison that cannot run must fail, not skip.
"""

from __future__ import annotations

from typing import Any

import ml_dtypes
import mlx.core as mx
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from convtranspose import _native_kernel as native
from convtranspose import _plan

BFLOAT16 = np.dtype(ml_dtypes.bfloat16)

# Relative tolerance per result dtype: about one unit in the last place of the result
# (two roundings that each err by half a unit may differ by one), and far above the
# float32 (or float64) accumulation error of the small sums the tests use.
_RTOL = {
    "float16": 2.0 ** -10,   # 9.8e-4
    "bfloat16": 2.0 ** -7,   # 7.8e-3
    "float32": 1e-5,
    "float64": 1e-12,
}


def tolerance_for(dtype: Any) -> float:
    return _RTOL[np.dtype(dtype).name]


def make_random_array(rng: np.random.Generator, shape: tuple[int, ...],
                      dtype: Any = np.float32) -> np.ndarray:
    """Uniform values in [-1, 1), drawn in float64 and rounded to `dtype`."""
    return rng.uniform(-1.0, 1.0, size=shape).astype(np.dtype(dtype))


def check_close(actual: np.ndarray, expected: np.ndarray, dtype: Any,
                magnitude: np.ndarray | None = None, what: str = "") -> None:
    """|actual - expected| <= rtol(dtype) * (|expected| + magnitude), elementwise.

    `magnitude` is the sum of |x|*|w| over each output's contributions (see
    reference.magnitude_ref): rounding errors of a sum scale with it, not with a result
    that cancelled to almost nothing. Without it, the largest |expected| stands in.
    Shapes must match exactly.
    """
    actual = np.asarray(actual).astype(np.float64)
    expected = np.asarray(expected).astype(np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert np.all(np.isfinite(actual)), f"{what}: non-finite values in the result"
    if expected.size == 0:
        return
    if magnitude is None:
        magnitude = np.full(expected.shape, np.abs(expected).max())
    rtol = tolerance_for(dtype)
    # The smallest subnormal of a half-precision result is ~6e-8: below that, only zero.
    floor = 1e-7 if np.dtype(dtype).itemsize <= 2 else 1e-300
    bound = rtol * (np.abs(expected) + np.asarray(magnitude, np.float64)) + floor
    err = np.abs(actual - expected)
    bad = err > bound
    if bad.any():
        idx = np.unravel_index(np.argmax(err / bound), err.shape)
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.size} elements differ beyond "
            f"rtol={rtol:g} ({np.dtype(dtype).name}); worst at {idx}: actual "
            f"{actual[idx]!r}, expected {expected[idx]!r}, error {err[idx]:.3g} > bound "
            f"{bound[idx]:.3g}; max error/bound {float((err / bound).max()):.3g}")


# ---- PyTorch --------------------------------------------------------------------------

_TORCH_DTYPES = {
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float32": torch.float32,
    "float64": torch.float64,
}


def to_torch(a: np.ndarray, dtype: Any = None) -> torch.Tensor:
    """A NumPy array (bfloat16 included, which torch cannot read directly) as a tensor."""
    name = np.dtype(dtype if dtype is not None else a.dtype).name
    # Every supported dtype converts exactly through float64.
    return torch.from_numpy(np.ascontiguousarray(a, np.float64)).to(_TORCH_DTYPES[name])


def weight_to_torch_layout(w: np.ndarray, groups: int) -> np.ndarray:
    """(C_out, *k, C_in/g) -> (C_in, C_out/g, *k) with
    W_torch[g*Cin_g + i, o, *k] == W_mlx[g*Cout_g + o, *k, i]."""
    c_out, *kernel, cin_g = w.shape
    cout_g = c_out // groups
    ndim = len(kernel)
    wg = w.reshape(groups, cout_g, *kernel, cin_g)
    # (G, Cout_g, *k, Cin_g) -> (G, Cin_g, Cout_g, *k)
    wg = wg.transpose(0, ndim + 2, 1, *range(2, ndim + 2))
    return wg.reshape(groups * cin_g, cout_g, *kernel)


def run_torch(x: np.ndarray, w: np.ndarray, stride=1, padding=0, dilation=1,
              output_padding=0, groups: int = 1, dtype: Any = None) -> tuple[np.ndarray, str]:
    """torch.nn.functional.conv_transpose{1,2,3}d on our layouts.

    Both operands are cast to `dtype` (default: x's dtype), since torch wants one dtype.
    Returns the channels-last result as float64 values and torch's result dtype name."""
    ndim = x.ndim - 2
    fn = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[ndim]
    dtype = np.dtype(dtype if dtype is not None else x.dtype)
    xt = to_torch(np.moveaxis(x, -1, 1), dtype)
    wt = to_torch(weight_to_torch_layout(w, groups), dtype)
    with torch.no_grad():
        y = fn(xt, wt, stride=stride, padding=padding, output_padding=output_padding,
               groups=groups, dilation=dilation)
    name = str(y.dtype).removeprefix("torch.")
    return np.moveaxis(y.to(torch.float64).numpy(), 1, -1), name


# ---- MLX ------------------------------------------------------------------------------

_MX_DTYPES = {
    "float16": mx.float16,
    "bfloat16": mx.bfloat16,
    "float32": mx.float32,
    "float64": mx.float64,
}


def to_mlx(a: np.ndarray) -> mx.array:
    """A NumPy array as an MLX array of the same dtype (mx.array alone turns float64 into
    float32, so the dtype is always given)."""
    name = np.dtype(a.dtype).name
    if name == "bfloat16":
        # Exact: every bfloat16 value is a float32 value.
        return mx.array(np.asarray(a, np.float32)).astype(mx.bfloat16)
    return mx.array(a, dtype=_MX_DTYPES[name])


def mlx_dtype_name(dtype: mx.Dtype) -> str:
    return str(dtype).removeprefix("mlx.core.")


def run_mlx(x: np.ndarray, w: np.ndarray, stride=1, padding=0, dilation=1,
            output_padding=0, groups: int = 1) -> tuple[np.ndarray, str]:
    """mlx.core.conv_transpose{1,2,3}d on the CPU. Returns float64 values and MLX's result
    dtype name."""
    ndim = x.ndim - 2
    fn = {1: mx.conv_transpose1d, 2: mx.conv_transpose2d, 3: mx.conv_transpose3d}[ndim]
    settings = {"stride": stride, "padding": padding, "dilation": dilation,
                "output_padding": output_padding}
    if ndim == 1:  # MLX's 1-D function takes plain ints only
        settings = {k: v if isinstance(v, int) else v[0] for k, v in settings.items()}
    y = fn(to_mlx(x), to_mlx(w), **settings, groups=groups, stream=mx.cpu)
    mx.eval(y)
    name = mlx_dtype_name(y.dtype)
    return np.array(y.astype(mx.float32) if name == "bfloat16" else y).astype(np.float64), name


# ---- fixtures -------------------------------------------------------------------------

@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240601)


@pytest.fixture(scope="session")
def random_array():
    return make_random_array


@pytest.fixture(scope="session")
def tolerance():
    return tolerance_for


@pytest.fixture(scope="session")
def assert_close():
    return check_close


@pytest.fixture(scope="session")
def torch_conv_transpose():
    return run_torch


@pytest.fixture(scope="session")
def mlx_conv_transpose():
    return run_mlx


def forget_plans() -> None:
    """Plans are pure functions of their arguments for the instruction set the process
    runs (chosen once, at import) and the planner's rules; a test that switches either
    drops the plans made before (their rules count its lanes), the ones kept for recent
    calls of the same shapes included, and every other memo of the package (dot mode's
    phase groups, for one, are chosen by a model that counts the lanes)."""
    import sys

    from convtranspose import _api, _vjp
    for module in list(sys.modules.values()):
        if getattr(module, "__name__", "").startswith("convtranspose"):
            for value in list(vars(module).values()):
                if hasattr(value, "cache_clear"):
                    value.cache_clear()
    # the plans and specs kept for recent calls of the same shapes
    _api._recent_plans.clear()
    _vjp._recent_specs.clear()


@pytest.fixture(params=native._native.available() if native.AVAILABLE else [])
def isa(request):
    before = native.isa()
    native._native.set_isa(request.param)
    forget_plans()
    yield request.param
    native._native.set_isa(before)
    forget_plans()


@pytest.fixture
def avx512_planner(monkeypatch):
    """The planner as on the AVX-512 build of a CPU that runs 512-bit multiply-adds at
    256 bits' rate (a Zen 4, where the representative layers' choices were last measured),
    on any host: the planner sees the build only through `native.isa`, `native.layout` and
    CONVTRANSPOSE_HALF_RATE_FMA. For plans alone: one made so would pack its weight for
    vectors this CPU may not have, and must not run here."""
    if not native.AVAILABLE:
        pytest.skip("the compiled kernel is not built")
    monkeypatch.setattr(native, "isa", lambda: "avx512")
    monkeypatch.setattr(native, "layout", lambda itemsize: (64 // itemsize, 4))
    monkeypatch.setenv("CONVTRANSPOSE_HALF_RATE_FMA", "1")
    forget_plans()
    yield
    monkeypatch.undo()
    forget_plans()


@pytest.fixture
def small_calls_threaded(monkeypatch):
    monkeypatch.setattr(_plan, "NATIVE_SERIAL_BELOW_SECONDS", 0.0)
    forget_plans()
    yield
    forget_plans()
