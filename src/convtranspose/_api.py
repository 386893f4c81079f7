"""Front doors: thin wrappers that go arguments -> spec -> plan -> execute."""

from typing import Any

import numpy as np

from ._execute import execute
from ._plan import Plan, get_num_threads, get_winograd, make_plan
from ._spec import ConvSpec, as_float_array, check_fits_in_memory, check_stream, make_spec

IntOrTuple = int | tuple[int, ...]
ArrayLike = Any

_NAMES = {1: "conv_transpose1d", 2: "conv_transpose2d", 3: "conv_transpose3d"}


def spec_for(ndim: int, input: ArrayLike, weight: ArrayLike, stride: IntOrTuple = 1,
             padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
             output_padding: IntOrTuple = 0, groups: int = 1,
             op: str | None = None) -> tuple[ConvSpec, np.ndarray, np.ndarray]:
    """Coerce the arrays and validate the call: the one shared entry of every front door."""
    op = op or _NAMES[ndim]
    x = as_float_array(op, "input", input)
    w = as_float_array(op, "weight", weight)
    spec = make_spec(op, ndim, x.shape, w.shape, stride, padding, dilation, output_padding,
                     groups, x.dtype, w.dtype)
    return check_fits_in_memory(spec), x, w


class RecentCalls:
    """Values (specs, plans) kept for recent calls, by the call's shapes, dtypes and
    settings: a repeated small call (W9 takes ~20 us) skips ~5 us of validating and
    planning. Only calls whose arrays are ndarrays that need no conversion and whose
    settings are exact ints get a key, so a key can never stand for a call that validation
    would refuse (2.0 == 2 and True == 1 as dict keys)."""

    MAX = 256

    def __init__(self) -> None:
        self._values: dict[tuple, Any] = {}

    @staticmethod
    def key(ndim: int, input: Any, weight: Any, stride: Any, padding: Any, dilation: Any,
            output_padding: Any, groups: Any) -> tuple | None:
        if (type(input) is np.ndarray and type(weight) is np.ndarray and type(groups) is int
                and _plain_ints(stride) and _plain_ints(padding) and _plain_ints(dilation)
                and _plain_ints(output_padding)):
            return (ndim, input.shape, input.dtype, weight.shape, weight.dtype, stride,
                    padding, dilation, output_padding, groups)
        return None

    def get(self, key: tuple | None) -> Any:
        return None if key is None else self._values.get(key)

    def put(self, key: tuple | None, value: Any, input: Any, x: np.ndarray, weight: Any,
            w: np.ndarray) -> None:
        """Keep `value` for `key` if validation took the arrays as they were."""
        if key is None or x is not input or w is not weight:
            return
        if len(self._values) >= self.MAX:
            self._values.clear()
        self._values[key] = value


def _plain_ints(value: Any) -> bool:
    kind = type(value)
    return kind is int or (kind is tuple and all(type(e) is int for e in value))


_recent_plans = RecentCalls()


def _conv_transpose(ndim, input, weight, stride, padding, dilation, output_padding, groups,
                    stream) -> np.ndarray:
    key = None
    if stream is None:
        key = RecentCalls.key(ndim, input, weight, stride, padding, dilation, output_padding,
                              groups)
        if key is not None:
            key += (get_num_threads(), get_winograd())  # the plan depends on them
            planned = _recent_plans.get(key)
            if planned is not None:
                return execute(planned, input, weight)
    check_stream(_NAMES[ndim], stream)
    spec, x, w = spec_for(ndim, input, weight, stride, padding, dilation, output_padding,
                          groups)
    planned = make_plan(spec)
    _recent_plans.put(key, planned, input, x, weight, w)
    return execute(planned, x, w)


def conv_transpose1d(input: ArrayLike, weight: ArrayLike, /, stride: IntOrTuple = 1,
                     padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                     output_padding: IntOrTuple = 0, groups: int = 1, *,
                     stream: Any = None) -> np.ndarray:
    """1-D transposed convolution. input (N, W, C_in), weight (C_out, kW, C_in/groups)."""
    return _conv_transpose(1, input, weight, stride, padding, dilation, output_padding,
                           groups, stream)


def conv_transpose2d(input: ArrayLike, weight: ArrayLike, /, stride: IntOrTuple = 1,
                     padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                     output_padding: IntOrTuple = 0, groups: int = 1, *,
                     stream: Any = None) -> np.ndarray:
    """2-D transposed convolution. input (N, H, W, C_in), weight (C_out, kH, kW, C_in/groups)."""
    return _conv_transpose(2, input, weight, stride, padding, dilation, output_padding,
                           groups, stream)


def conv_transpose3d(input: ArrayLike, weight: ArrayLike, /, stride: IntOrTuple = 1,
                     padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                     output_padding: IntOrTuple = 0, groups: int = 1, *,
                     stream: Any = None) -> np.ndarray:
    """3-D transposed convolution, MLX semantics.

    input (N, D, H, W, C_in), weight (C_out, kD, kH, kW, C_in/groups), result
    (N, D_out, H_out, W_out, C_out) with, per axis,
    out = (in - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1.
    """
    return _conv_transpose(3, input, weight, stride, padding, dilation, output_padding,
                           groups, stream)


def output_shape(input_shape: tuple[int, ...], weight_shape: tuple[int, ...],
                 stride: IntOrTuple = 1, padding: IntOrTuple = 0, dilation: IntOrTuple = 1,
                 output_padding: IntOrTuple = 0, groups: int = 1) -> tuple[int, ...]:
    """The result's shape, validated exactly as the call would be, computing nothing."""
    ndim = len(tuple(input_shape)) - 2
    if ndim not in _NAMES:
        raise ValueError(
            f"output_shape: 'input_shape' must have 3, 4 or 5 entries (N, *spatial, C), got "
            f"{tuple(input_shape)}")
    spec = make_spec("output_shape", ndim, input_shape, weight_shape, stride, padding,
                     dilation, output_padding, groups)
    return check_fits_in_memory(spec).output_shape


def plan(input_shape: tuple[int, ...], weight_shape: tuple[int, ...], stride: IntOrTuple = 1,
         padding: IntOrTuple = 0, dilation: IntOrTuple = 1, output_padding: IntOrTuple = 0,
         groups: int = 1, dtype: Any = np.float32, *, algorithm: str | None = None,
         workspace: int | None = None, threads: int | None = None) -> Plan:
    """What a call would run: algorithm, useful FLOPs, tiling, workspace. Print it."""
    ndim = len(tuple(input_shape)) - 2
    if ndim not in _NAMES:
        raise ValueError(
            f"plan: 'input_shape' must have 3, 4 or 5 entries (N, *spatial, C), got "
            f"{tuple(input_shape)}")
    spec = make_spec(_NAMES[ndim], ndim, input_shape, weight_shape, stride, padding, dilation,
                     output_padding, groups, dtype, dtype)
    return make_plan(check_fits_in_memory(spec), algorithm=algorithm, workspace=workspace,
                     threads=threads)


def run_plan(p: Plan, input: ArrayLike, weight: ArrayLike) -> np.ndarray:
    """Execute a plan from `plan(...)` on arrays of its shapes (dtypes may differ)."""
    s = p.spec
    spec, x, w = spec_for(s.ndim, input, weight, s.stride[3 - s.ndim:],
                          s.padding[3 - s.ndim:], s.dilation[3 - s.ndim:],
                          s.output_padding[3 - s.ndim:], s.groups)
    if (spec.input_shape, spec.weight_shape) != (s.input_shape, s.weight_shape):
        raise ValueError(
            f"run_plan: the plan is for input {s.input_shape} and weight {s.weight_shape}, "
            f"got {spec.input_shape} and {spec.weight_shape}")
    planned = make_plan(spec, algorithm=p.algorithm, workspace=p.workspace_limit,
                        threads=p.threads)
    return execute(planned, x, w)
