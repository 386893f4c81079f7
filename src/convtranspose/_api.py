"""Front doors: thin wrappers that go arguments -> spec -> plan -> execute."""

import dataclasses
from typing import Any

import numpy as np

from ._execute import execute
from ._plan import Plan, VjpPlan, get_num_threads, get_winograd, make_plan
from ._spec import OP_NAMES as _NAMES
from ._spec import (
    ConvSpec,
    IntOrTuple,
    Padding,
    as_float_array,
    check_bias,
    check_fits_in_memory,
    check_stream,
    make_spec,
)

ArrayLike = Any


def spec_for(ndim: int, input: ArrayLike, weight: ArrayLike, stride: IntOrTuple = 1,
             padding: Padding = 0, dilation: IntOrTuple = 1,
             output_padding: IntOrTuple = 0, groups: int = 1,
             op: str | None = None, *, output_size: IntOrTuple | None = None,
             allow_unbatched: bool = False) -> tuple[ConvSpec, np.ndarray, np.ndarray]:
    """Coerce the arrays and validate the call: the one shared entry of every front door.

    With `allow_unbatched`, an input with one dimension fewer (no batch axis) is described
    as a batch of one: `x` comes back as it is (reshapes read it as the batch), and
    `unbatched(spec, x)` says that the result drops the batch axis again."""
    op = op or _NAMES[ndim]
    x = as_float_array(op, "input", input)
    w = as_float_array(op, "weight", weight)
    # One dimension fewer is an unbatched input only beside a weight of the right rank
    # (2-D arrays given to a 3-D function are an error about the input).
    alone = allow_unbatched and x.ndim == ndim + 1 and w.ndim == ndim + 2
    shape = (1, *x.shape) if alone else x.shape
    spec = make_spec(op, ndim, shape, w.shape, stride, padding, dilation, output_padding,
                     groups, x.dtype, w.dtype, output_size=output_size)
    return check_fits_in_memory(spec), x, w


def unbatched(spec: ConvSpec, x: np.ndarray) -> bool:
    """Whether `x` is the spec's input without its batch axis."""
    return x.ndim == spec.ndim + 1


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

    def clear(self) -> None:
        """Forget every value (what a test does that changes a rule the plans follow)."""
        self._values.clear()

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
                    stream, bias=None, output_size=None) -> np.ndarray:
    key = None
    if stream is None:
        key = RecentCalls.key(ndim, input, weight, stride, padding, dilation, output_padding,
                              groups)
        if key is not None and output_size is not None:
            key = key + (output_size,) if _plain_ints(output_size) else None
        if key is not None:
            key += (get_num_threads(), get_winograd())  # the plan depends on them
            planned = _recent_plans.get(key)
            if planned is not None:
                return _run(planned, input, weight, bias)
    check_stream(_NAMES[ndim], stream)
    spec, x, w = spec_for(ndim, input, weight, stride, padding, dilation, output_padding,
                          groups, output_size=output_size, allow_unbatched=True)
    planned = make_plan(spec)
    _recent_plans.put(key, planned, input, x, weight, w)
    return _run(planned, x, w, bias)


def _run(planned: Plan, x: np.ndarray, w: np.ndarray, bias: ArrayLike | None) -> np.ndarray:
    """Execute with the bias checked; drop the batch axis again for an unbatched input."""
    spec = planned.spec
    b = check_bias(spec.op, bias, spec)
    if b is None:
        y = execute(planned, x, w)
    else:
        y = execute(planned, x, w, np.ascontiguousarray(b, spec.compute_dtype))
    return y[0] if unbatched(spec, x) else y


_DOC = """{n}-D transposed convolution, MLX semantics, channels last.

    Per spatial axis, input position i and kernel tap k add into output position
    o = i*stride + k*dilation - lo, kept when 0 <= o < out, with
    out = (in - 1) * stride + dilation * (k - 1) + 1 - lo - hi + output_padding
    (lo = hi = padding for an int padding: MLX's and PyTorch's formula).

    Parameters
    ----------
    input : array_like
        {xshape}, channels last; or without the batch axis, as PyTorch allows, and then
        so is the result. NumPy, PyTorch (CPU) and MLX arrays are read without a copy
        where possible.
    weight : array_like
        {wshape}. From PyTorch's layout: `weight_from_torch`.
    stride : int or tuple of {n} ints, default 1
    padding : int, tuple, "same" or "valid", default 0
        The crop of each axis's ends. An int p crops p at both ends (negative values
        extend, as MLX allows); a tuple has one entry per spatial axis, an int or a
        (lo, hi) pair (ONNX ConvTranspose's pads: begins, then ends); "same" gives
        out = in * stride (the crop d*(k-1) + 1 - stride split with lo = total // 2, the
        odd unit at the end, as TensorFlow and Keras; where the dilated kernel is shorter
        than the stride the output is extended with zeros at the end); "valid" is 0.
    dilation : int or tuple of {n} ints, default 1
    output_padding : int or tuple of {n} ints, default 0
        Extra output positions at the end of each axis (MLX also accepts values >= stride).
    groups : int, default 1
        C_in and C_out must both be divisible by it.
    stream : None or "cpu", keyword-only
        For MLX drop-in compatibility; convtranspose computes on the CPU.
    bias : array_like of shape (C_out,), optional, keyword-only
        Added to every output element as the kernel stores it (no second pass).
        Any floating dtype; it does not change the result's dtype.
    output_size : int or tuple of {n} ints, optional, keyword-only
        The spatial output size wanted, as PyTorch's ``ConvTranspose{n}d(...)(x,
        output_size=...)``: it picks output_padding, and must lie between the smallest
        size (output_padding 0) and stride - 1 more. Not with `output_padding`.

    Returns
    -------
    numpy.ndarray
        {yshape}, C-contiguous. dtype: the promotion of input's and weight's (float16,
        bfloat16, float32, float64); accumulated in float32 at least.

    Raises
    ------
    TypeError
        An array that is not floating, a setting that is not an int (or pair).
    ValueError
        Shapes or settings that do not fit together (channels, groups, a wrong number of
        dimensions, an output of size < 1, an unreachable `output_size`, a `bias` not of
        shape (C_out,)); each message names the argument and the fix. PyTorch-layout
        arrays are recognised and the message says how to convert them.

    Examples
    --------
    >>> import numpy as np, convtranspose as ct
    >>> x = np.ones({xex}, np.float32)
    >>> w = np.ones({wex}, np.float32)
    >>> ct.conv_transpose{n}d(x, w, stride=2, bias=np.zeros(4, np.float32)).shape
    {yex}
    >>> ct.conv_transpose{n}d(x, w, stride=2, padding="same").shape
    {ysame}
    """


def _doc(ndim: int) -> str:
    spatial = {1: "W", 2: "H, W", 3: "D, H, W"}[ndim]
    kernel = {1: "kW", 2: "kH, kW", 3: "kD, kH, kW"}[ndim]
    out = {1: "W_out", 2: "H_out, W_out", 3: "D_out, H_out, W_out"}[ndim]
    xex = (1, *(5,) * ndim, 3)
    return _DOC.format(
        n=ndim, xshape=f"(N, {spatial}, C_in)", wshape=f"(C_out, {kernel}, C_in/groups)",
        yshape=f"(N, {out}, C_out)", xex=xex, wex=(4, *(3,) * ndim, 3),
        yex=(1, *(11,) * ndim, 4), ysame=(1, *(10,) * ndim, 4))


def conv_transpose1d(input: ArrayLike, weight: ArrayLike, /, stride: IntOrTuple = 1,
                     padding: Padding = 0, dilation: IntOrTuple = 1,
                     output_padding: IntOrTuple = 0, groups: int = 1, *,
                     stream: Any = None, bias: ArrayLike | None = None,
                     output_size: IntOrTuple | None = None) -> np.ndarray:
    return _conv_transpose(1, input, weight, stride, padding, dilation, output_padding,
                           groups, stream, bias, output_size)


def conv_transpose2d(input: ArrayLike, weight: ArrayLike, /, stride: IntOrTuple = 1,
                     padding: Padding = 0, dilation: IntOrTuple = 1,
                     output_padding: IntOrTuple = 0, groups: int = 1, *,
                     stream: Any = None, bias: ArrayLike | None = None,
                     output_size: IntOrTuple | None = None) -> np.ndarray:
    return _conv_transpose(2, input, weight, stride, padding, dilation, output_padding,
                           groups, stream, bias, output_size)


def conv_transpose3d(input: ArrayLike, weight: ArrayLike, /, stride: IntOrTuple = 1,
                     padding: Padding = 0, dilation: IntOrTuple = 1,
                     output_padding: IntOrTuple = 0, groups: int = 1, *,
                     stream: Any = None, bias: ArrayLike | None = None,
                     output_size: IntOrTuple | None = None) -> np.ndarray:
    return _conv_transpose(3, input, weight, stride, padding, dilation, output_padding,
                           groups, stream, bias, output_size)


conv_transpose1d.__doc__ = _doc(1)
conv_transpose2d.__doc__ = _doc(2)
conv_transpose3d.__doc__ = _doc(3)


def _shape_spec(op: str, input_shape, weight_shape, stride, padding, dilation,
                output_padding, groups, dtype, output_size) -> tuple[ConvSpec, bool]:
    """The spec of a call given by shapes, and whether the input has no batch axis (one
    entry fewer than the weight)."""
    input_shape, weight_shape = tuple(input_shape), tuple(weight_shape)
    alone = len(weight_shape) in (3, 4, 5) and len(input_shape) == len(weight_shape) - 1
    ndim = len(input_shape) - (1 if alone else 2)
    if ndim not in _NAMES:
        raise ValueError(
            f"{op}: 'input_shape' must have 3, 4 or 5 entries (N, *spatial, C), or one fewer "
            f"without the batch axis, got {input_shape}")
    shape = (1, *input_shape) if alone else input_shape
    spec = make_spec(_NAMES[ndim] if op == "plan" else op, ndim, shape, weight_shape, stride,
                     padding, dilation, output_padding, groups, dtype, dtype,
                     output_size=output_size)
    return check_fits_in_memory(spec), alone


def output_shape(input_shape: tuple[int, ...], weight_shape: tuple[int, ...],
                 stride: IntOrTuple = 1, padding: Padding = 0, dilation: IntOrTuple = 1,
                 output_padding: IntOrTuple = 0, groups: int = 1, *,
                 output_size: IntOrTuple | None = None) -> tuple[int, ...]:
    """The result's shape, validated exactly as the call would be, computing nothing.

    Parameters
    ----------
    input_shape : tuple of ints
        (N, *spatial, C_in), or (*spatial, C_in) without the batch axis (then so is the
        result's shape).
    weight_shape : tuple of ints
        (C_out, *kernel, C_in/groups); its length gives the rank (1-D, 2-D or 3-D).
    stride, padding, dilation, output_padding, groups, output_size
        As for `conv_transpose3d` (padding may be (lo, hi) pairs, "same" or "valid").

    Returns
    -------
    tuple of ints

    Raises
    ------
    TypeError, ValueError
        As the call would, before any array exists.

    Examples
    --------
    >>> import convtranspose as ct
    >>> ct.output_shape((1, 8, 8, 8, 16), (4, 3, 3, 3, 16), stride=2, padding=1)
    (1, 15, 15, 15, 4)
    >>> ct.output_shape((8, 8, 8, 16), (4, 3, 3, 3, 16), stride=2, padding=1, output_size=16)
    (16, 16, 16, 4)
    """
    spec, alone = _shape_spec("output_shape", input_shape, weight_shape, stride, padding,
                              dilation, output_padding, groups, np.float32, output_size)
    return spec.output_shape[1:] if alone else spec.output_shape


def plan(input_shape: tuple[int, ...], weight_shape: tuple[int, ...], stride: IntOrTuple = 1,
         padding: Padding = 0, dilation: IntOrTuple = 1, output_padding: IntOrTuple = 0,
         groups: int = 1, dtype: Any = np.float32, *, algorithm: str | None = None,
         workspace: int | None = None, threads: int | None = None,
         output_size: IntOrTuple | None = None) -> Plan:
    """What a call would run: algorithm, useful FLOPs, tiling, workspace. Print it.

    Parameters
    ----------
    input_shape, weight_shape : tuple of ints
        As `output_shape` (the batch axis optional).
    stride, padding, dilation, output_padding, groups, output_size
        As for `conv_transpose3d`.
    dtype : dtype, default float32
        Of both arrays (float16, bfloat16, float32 or float64).
    algorithm : str, optional, keyword-only
        Force one: "native" (the compiled kernel), "winograd" (F(2,3) along D, through
        the compiled kernel), "shift", "scatter", "direct" (depthwise) or "indexed"
        (small calls). Default: the fastest that fits ("scatter" and "direct" only
        without the compiled kernel).
    workspace : int, optional, keyword-only
        Bytes of scratch memory allowed (default: a share of this machine's memory).
    threads : int, optional, keyword-only
        Default: `get_num_threads()`.

    Returns
    -------
    Plan
        Run it with `run_plan(plan, input, weight)`.

    Raises
    ------
    TypeError, ValueError
        As the call would; also an algorithm that does not fit the layer, saying why.

    Examples
    --------
    >>> import convtranspose as ct
    >>> p = ct.plan((1, 16, 16, 16, 32), (16, 2, 2, 2, 32), stride=2)
    >>> p.spec.output_shape
    (1, 32, 32, 32, 16)
    """
    spec, _ = _shape_spec("plan", input_shape, weight_shape, stride, padding, dilation,
                          output_padding, groups, dtype, output_size)
    return make_plan(spec, algorithm=algorithm, workspace=workspace, threads=threads)


def vjp_plan(input_shape: tuple[int, ...], weight_shape: tuple[int, ...],
             stride: IntOrTuple = 1, padding: Padding = 0, dilation: IntOrTuple = 1,
             output_padding: IntOrTuple = 0, groups: int = 1, dtype: Any = np.float32, *,
             need_input: bool = True, need_weight: bool = True, algorithm: str | None = None,
             workspace: int | None = None, threads: int | None = None,
             output_size: IntOrTuple | None = None) -> VjpPlan:
    """What a gradient call (`conv_transpose3d_vjp` and kin) would run: for grad_input and
    grad_weight, the path, useful FLOPs, workspace, threads and modelled time. Print it.

    Parameters
    ----------
    input_shape, weight_shape, stride, padding, dilation, output_padding, groups, dtype,
    workspace, threads, output_size
        As for `plan` (the cotangent has the output's shape and `dtype` too; arrays
        assumed C-contiguous).
    need_input, need_weight : bool, default True, keyword-only
        The gradients asked for.
    algorithm : str, optional, keyword-only
        Force one: "native" (grad_input by the compiled kernel, grad_weight's path chosen),
        "gather", "shift", "direct" (one input channel per group) or "indexed" (small
        calls). Default: the planner's choice.

    Returns
    -------
    VjpPlan

    Raises
    ------
    TypeError, ValueError
        As the call would; also an algorithm that does not fit the layer, saying why.

    Examples
    --------
    >>> import convtranspose as ct
    >>> p = ct.vjp_plan((1, 16, 16, 16, 32), (16, 2, 2, 2, 32), stride=2)
    >>> p.grad_input is not None and p.grad_weight is not None
    True
    """
    from ._vjp import make_vjp_plan  # _vjp imports this module's front-door helpers

    spec, _ = _shape_spec("plan", input_shape, weight_shape, stride, padding, dilation,
                          output_padding, groups, dtype, output_size)
    spec = dataclasses.replace(spec, op=spec.op + "_vjp")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"vjp_plan: 'threads' must be an int >= 1, got {threads!r}")
    in_place = spec.input_dtype == spec.compute_dtype  # C-contiguous arrays assumed
    return make_vjp_plan(spec, spec.compute_dtype, need_input=need_input,
                         need_weight=need_weight, threads=threads, workspace=workspace,
                         algorithm=algorithm, input_in_place=in_place,
                         cotangent_in_place=in_place)


def run_plan(p: Plan, input: ArrayLike, weight: ArrayLike, *,
             bias: ArrayLike | None = None) -> np.ndarray:
    """Execute a plan from `plan(...)` on arrays of its shapes (dtypes may differ), with an
    optional `bias` of shape (C_out,)."""
    s = p.spec
    lift = 3 - s.ndim
    spec, x, w = spec_for(s.ndim, input, weight, s.stride[lift:],
                          tuple(zip(s.pad_lo[lift:], s.pad_hi[lift:])), s.dilation[lift:],
                          0, s.groups, allow_unbatched=True)
    if (spec.input_shape, spec.weight_shape) != (s.input_shape, s.weight_shape):
        raise ValueError(
            f"run_plan: the plan is for input {s.input_shape} and weight {s.weight_shape}, "
            f"got {spec.input_shape} and {spec.weight_shape}")
    planned = make_plan(spec, algorithm=p.algorithm, workspace=p.workspace_limit,
                        threads=p.threads)
    return _run(planned, x, w, bias)
