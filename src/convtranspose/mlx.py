"""MLX drop-in: `mx.array` in, `mx.array` out, computed by convtranspose's CPU engine.

    >>> import mlx.core as mx
    >>> from convtranspose import mlx as ctm
    >>> x, w = mx.ones((1, 4, 4, 4, 8)), mx.ones((16, 3, 3, 3, 8))
    >>> ctm.conv_transpose3d(x, w, stride=2, padding=1).shape
    (1, 7, 7, 7, 16)

The functions have MLX's signatures and semantics, and they are differentiable through
`mx.grad`, `mx.value_and_grad` and `mx.vjp`: each is an `mx.custom_function` whose VJP is
`convtranspose.conv_transpose*_vjp`. The layers `ConvTranspose1d/2d/3d` take the same
constructor arguments as `mlx.nn.ConvTranspose1d/2d/3d`, initialise their parameters
`weight` and `bias` the same way, and add `groups` (in every dimension, 3-D included).

Calls evaluate their inputs (the engine runs on NumPy arrays), so they do not go inside
`mx.compile`. This module imports MLX; `import convtranspose` alone never does.
"""

import functools
import math
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from ._api import spec_for
from ._execute import execute
from ._plan import make_plan
from ._spec import make_spec
from ._vjp import check_cotangent, vjp_arrays

IntOrTuple = int | tuple[int, ...]

_NAMES = {1: "conv_transpose1d", 2: "conv_transpose2d", 3: "conv_transpose3d"}


def _to_numpy(a: Any) -> np.ndarray:
    """An mx.array as a NumPy array (a view of MLX's buffer where the dtype allows).

    NumPy cannot hold MLX's bfloat16 directly: it travels as float32, which holds every
    bfloat16 value exactly, and the results are rounded back to bfloat16 by MLX."""
    if not isinstance(a, mx.array):
        a = mx.array(a)
    if a.dtype == mx.bfloat16:
        a = a.astype(mx.float32)
    return np.asarray(a)


def _to_mx(a: np.ndarray, dtype: Any) -> mx.array:
    # mx.array(float64 ndarray) would silently give float32: always name the dtype.
    if a.dtype.name == _dtype_name(dtype):
        return mx.array(a, dtype=dtype)
    return mx.array(a).astype(dtype)


def _dtype_name(dtype: Any) -> str:
    return str(dtype).rsplit(".", 1)[-1]


def _check_stream(op: str, stream: Any) -> None:
    """MLX streams and devices are accepted when they are the CPU: we compute there."""
    if stream is None:
        return
    device = getattr(stream, "device", stream)  # a Stream's device, or the Device itself
    kind = getattr(device, "type", device)  # a Device's type, or the DeviceType itself
    if (isinstance(kind, mx.DeviceType) and kind == mx.cpu) or (
            isinstance(kind, str) and kind.lower() == "cpu"):
        return
    raise ValueError(
        f"{op}: 'stream' must be None or a CPU stream/device (convtranspose computes on the "
        f"CPU), got {stream!r}")


def _settings_key(spec) -> tuple:
    lift = 3 - spec.ndim
    return (spec.ndim, spec.stride[lift:], spec.padding[lift:], spec.dilation[lift:],
            spec.output_padding[lift:], spec.groups)


@functools.lru_cache(maxsize=256)
def _primitive(ndim: int, stride: tuple, padding: tuple, dilation: tuple,
               output_padding: tuple, groups: int):
    """One differentiable MLX function per setting (custom functions take arrays only)."""
    op = _NAMES[ndim]
    settings = (stride, padding, dilation, output_padding, groups)

    @mx.custom_function
    def conv(x, w):
        spec, xn, wn = spec_for(ndim, _to_numpy(x), _to_numpy(w), *settings, op=op)
        out = execute(make_plan(spec), xn, wn)
        return _to_mx(out, mx.result_type(x, w))

    @conv.vjp
    def conv_vjp(primals, cotangent, output):
        x, w = primals
        if isinstance(cotangent, (list, tuple)):
            (cotangent,) = cotangent
        spec, xn, wn = spec_for(ndim, _to_numpy(x), _to_numpy(w), *settings, op=op)
        cot = check_cotangent(op, spec, _to_numpy(cotangent))
        gx, gw = vjp_arrays(spec, xn, wn, cot)
        return _to_mx(gx, x.dtype), _to_mx(gw, w.dtype)

    return conv


def _conv_transpose(ndim: int, input: Any, weight: Any, stride: IntOrTuple,
                    padding: IntOrTuple, dilation: IntOrTuple, output_padding: IntOrTuple,
                    groups: int, stream: Any) -> mx.array:
    op = _NAMES[ndim]
    _check_stream(op, stream)
    if not isinstance(input, mx.array):
        input = mx.array(input)
    if not isinstance(weight, mx.array):
        weight = mx.array(weight)
    # Validate now, on shapes and dtypes alone, so that a bad call fails here, named.
    spec = make_spec(op, ndim, tuple(input.shape), tuple(weight.shape), stride, padding,
                     dilation, output_padding, groups, _probe_dtype(input),
                     _probe_dtype(weight))
    return _primitive(*_settings_key(spec))(input, weight)


def _probe_dtype(a: mx.array) -> np.dtype:
    """A NumPy stand-in of a's dtype kind for validation (bfloat16 checks as float32)."""
    name = _dtype_name(a.dtype)
    if name == "bfloat16":
        return np.dtype(np.float32)
    try:
        return np.dtype(name)
    except TypeError:
        return np.dtype(np.complex64)  # any non-float kind: spec_for names the problem


def conv_transpose1d(input: mx.array, weight: mx.array, /, stride: IntOrTuple = 1,
                     padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                     output_padding: IntOrTuple = 0, groups: int = 1, *,
                     stream: Any = None) -> mx.array:
    """`mx.conv_transpose1d`, computed by convtranspose. input (N, W, C_in), weight
    (C_out, kW, C_in/groups)."""
    return _conv_transpose(1, input, weight, stride, padding, dilation, output_padding,
                           groups, stream)


def conv_transpose2d(input: mx.array, weight: mx.array, /, stride: IntOrTuple = 1,
                     padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                     output_padding: IntOrTuple = 0, groups: int = 1, *,
                     stream: Any = None) -> mx.array:
    """`mx.conv_transpose2d`, computed by convtranspose. input (N, H, W, C_in), weight
    (C_out, kH, kW, C_in/groups)."""
    return _conv_transpose(2, input, weight, stride, padding, dilation, output_padding,
                           groups, stream)


def conv_transpose3d(input: mx.array, weight: mx.array, /, stride: IntOrTuple = 1,
                     padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                     output_padding: IntOrTuple = 0, groups: int = 1, *,
                     stream: Any = None) -> mx.array:
    """`mx.conv_transpose3d`, computed by convtranspose (groups work here, unlike MLX).

    input (N, D, H, W, C_in), weight (C_out, kD, kH, kW, C_in/groups)."""
    return _conv_transpose(3, input, weight, stride, padding, dilation, output_padding,
                           groups, stream)


def _as_tuple(value: Any, ndim: int) -> Any:
    return (value,) * ndim if isinstance(value, int) else value


class _ConvTransposeNd(nn.Module):
    """The shared body of the layers; parameters `weight` (C_out, *kernel, C_in/groups)
    and, with bias=True, `bias` (C_out,), initialised as MLX does."""

    _ndim = 3

    def __init__(self, in_channels: int, out_channels: int, kernel_size: IntOrTuple,
                 stride: IntOrTuple = 1, padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                 output_padding: IntOrTuple = 0, bias: bool = True, groups: int = 1):
        super().__init__()
        name = type(self).__name__
        if isinstance(groups, bool) or not isinstance(groups, int) or groups < 1:
            raise ValueError(f"{name}: 'groups' must be an int >= 1, got {groups!r}")
        if in_channels % groups or out_channels % groups:
            raise ValueError(
                f"{name}: 'groups'={groups} must divide both in_channels={in_channels} and "
                f"out_channels={out_channels}")
        kernel = _as_tuple(kernel_size, self._ndim)
        if len(tuple(kernel)) != self._ndim:
            raise ValueError(f"{name}: 'kernel_size' must be an int or a tuple of "
                             f"{self._ndim} ints, got {kernel_size!r}")
        # MLX's scale 1/sqrt(C_in * prod(kernel)), per group when groups > 1 (as nn.Conv*).
        scale = math.sqrt(1 / (in_channels // groups * math.prod(kernel)))
        self.weight = mx.random.uniform(low=-scale, high=scale,
                                        shape=(out_channels, *kernel, in_channels // groups))
        if bias:
            self.bias = mx.zeros((out_channels,))
        if self._ndim == 1:
            self.padding, self.dilation, self.stride = padding, dilation, stride
            self.output_padding = output_padding
        else:  # as MLX: ints become tuples, except dilation
            self.padding = _as_tuple(padding, self._ndim)
            self.stride = _as_tuple(stride, self._ndim)
            self.dilation = dilation
            self.output_padding = _as_tuple(output_padding, self._ndim)
        self.groups = groups

    def _extra_repr(self) -> str:
        kernel = tuple(self.weight.shape[1:-1])
        kernel_repr = kernel[0] if self._ndim == 1 else kernel
        return (f"{self.weight.shape[-1] * self.groups}, {self.weight.shape[0]}, "
                f"kernel_size={kernel_repr}, stride={self.stride}, padding={self.padding}, "
                f"dilation={self.dilation}, output_padding={self.output_padding}, "
                f"groups={self.groups}, bias={'bias' in self}")

    def __call__(self, x: mx.array) -> mx.array:
        y = _conv_transpose(self._ndim, x, self.weight, self.stride, self.padding,
                            self.dilation, self.output_padding, self.groups, None)
        if "bias" in self:
            y = y + self.bias
        return y


class ConvTranspose1d(_ConvTransposeNd):
    """`mlx.nn.ConvTranspose1d` computed by convtranspose, plus `groups`.
    Input (N, L, C_in) -> (N, L_out, C_out)."""

    _ndim = 1


class ConvTranspose2d(_ConvTransposeNd):
    """`mlx.nn.ConvTranspose2d` computed by convtranspose, plus `groups`.
    Input (N, H, W, C_in) -> (N, H_out, W_out, C_out)."""

    _ndim = 2


class ConvTranspose3d(_ConvTransposeNd):
    """`mlx.nn.ConvTranspose3d` computed by convtranspose, plus `groups` (MLX's own 3-D
    transposed convolution has none). Input (N, D, H, W, C_in) -> (N, D', H', W', C_out)."""

    _ndim = 3


__all__ = ["ConvTranspose1d", "ConvTranspose2d", "ConvTranspose3d", "conv_transpose1d",
           "conv_transpose2d", "conv_transpose3d"]
