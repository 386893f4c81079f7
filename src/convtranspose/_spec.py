"""Arguments -> spec: normalise and validate a call once.

The errors of the call itself are written here: its arrays (rank, dtype, channels, groups),
its settings (stride, padding, dilation, output_padding, output_size, groups, stream, bias)
and an output too large for memory. Nothing downstream re-validates them: a `ConvSpec` is a
promise that the call is well formed and its output fits in memory.

Other messages live beside what they check: the options of a plan (`algorithm`, `workspace`,
`threads`: `_plan`, `_vjp`), the cotangent (`_vjp`), the rank of a shape given to
`output_shape` or `plan` and the arrays given to `run_plan` (`_api`), what
only one front door takes (MLX streams and layers: `mlx`; Dask chunks: `dask`) and the
weight converters (`_weights`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._arrays import from_framework
from ._dtypes import SUPPORTED, compute_dtype, dtype_name, is_supported_float, result_dtype

# The public operations' names, which every message of theirs starts with.
OP_NAMES = {1: "conv_transpose1d", 2: "conv_transpose2d", 3: "conv_transpose3d"}
VJP_NAMES = {ndim: f"{name}_vjp" for ndim, name in OP_NAMES.items()}

# The settings' types in the public signatures.
IntOrTuple = int | tuple[int, ...]
# An int, one entry per spatial axis (an int or a (lo, hi) pair), "same" or "valid".
Padding = int | tuple[int | tuple[int, int], ...] | str

AXES = {1: "(N, W, C)", 2: "(N, H, W, C)", 3: "(N, D, H, W, C)"}
WEIGHT_AXES = {1: "(C_out, kW, C_in/groups)", 2: "(C_out, kH, kW, C_in/groups)",
               3: "(C_out, kD, kH, kW, C_in/groups)"}


@dataclass(frozen=True)
class ConvSpec:
    """One validated transposed convolution, always described in 3-D.

    1-D and 2-D calls are lifted to 3-D by leading spatial axes of size 1 (kernel 1,
    stride 1, padding 0, ...), so every kernel downstream handles a single case.
    `ndim` remembers the caller's rank so that results can be reshaped back.

    Every padding option (an int, `(lo, hi)` pairs, "same", "valid", `output_padding`,
    `output_size`) folds into `pad_lo` and `pad_hi` at the door: per axis, input i and tap k
    land on output o = i*stride + k*dilation - pad_lo, and the output is
    (in - 1) * stride + dilation * (k - 1) + 1 - pad_lo - pad_hi long. A negative pad_hi
    extends the output with positions that no tap reaches (zeros, or the bias).
    """

    op: str
    ndim: int
    batch: int
    in_spatial: tuple[int, int, int]
    c_in: int
    c_out: int
    kernel: tuple[int, int, int]
    stride: tuple[int, int, int]
    pad_lo: tuple[int, int, int]
    pad_hi: tuple[int, int, int]
    dilation: tuple[int, int, int]
    groups: int
    out_spatial: tuple[int, int, int]
    input_dtype: np.dtype
    weight_dtype: np.dtype
    result_dtype: np.dtype
    compute_dtype: np.dtype

    @property
    def padding(self) -> tuple[int, int, int]:
        """The crop at the start of each axis (tap k reads at offset k*dilation - padding)."""
        return self.pad_lo

    @property
    def output_padding(self) -> tuple[int, int, int]:
        """With `padding` (= pad_lo), MLX's output_padding for the same result:
        pad_lo - pad_hi (negative, or >= stride, where the pads are uneven)."""
        return tuple(lo - hi for lo, hi in zip(self.pad_lo, self.pad_hi))

    @property
    def c_in_per_group(self) -> int:
        return self.c_in // self.groups

    @property
    def c_out_per_group(self) -> int:
        return self.c_out // self.groups

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, *self.in_spatial[3 - self.ndim:], self.c_in)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.c_out, *self.kernel[3 - self.ndim:], self.c_in_per_group)

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self.batch, *self.out_spatial[3 - self.ndim:], self.c_out)

    @property
    def output_bytes(self) -> int:
        return math.prod(self.output_shape) * self.result_dtype.itemsize

    @property
    def weight_bytes(self) -> int:
        """The whole weight's size in the compute dtype."""
        return math.prod(self.weight_shape) * self.compute_dtype.itemsize

    @property
    def useful_flops(self) -> int:
        """2 * N * prod(in_spatial) * C_in * (C_out / groups) * prod(kernel)."""
        return (2 * self.batch * math.prod(self.in_spatial) * self.c_in
                * self.c_out_per_group * math.prod(self.kernel))

    @property
    def inside_flops(self) -> int:
        """useful_flops less the products that land outside the output (cropped by the
        padding): what a kernel that computes each output from the taps reaching it does."""
        pairs = math.prod(self.reaching_pairs(axis) for axis in range(3))
        return 2 * self.batch * pairs * self.c_in * self.c_out_per_group

    def reaching_pairs(self, axis: int) -> int:
        """The (input position, tap) pairs along `axis` that land inside the output: tap
        k's inputs i with 0 <= i * stride + k * dilation - pad_lo < out."""
        n, k, s, d, lo, out = (self.in_spatial[axis], self.kernel[axis], self.stride[axis],
                               self.dilation[axis], self.pad_lo[axis], self.out_spatial[axis])
        count = 0
        for tap in range(k):
            c = tap * d - lo
            first = max(0, -(c // s))  # ceil(-c / s)
            last = min(n - 1, (out - 1 - c) // s)
            count += max(0, last - first + 1)
        return count


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int,
                output_padding: int) -> int:
    """Output length along one axis: (in - 1) * s - 2 * p + d * (k - 1) + op + 1."""
    return (size - 1) * stride - 2 * padding + dilation * (kernel - 1) + output_padding + 1


def _is_int(value: Any) -> bool:
    if type(value) is int:  # the common case, without the ABC check (small calls feel it)
        return True
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def normalize_setting(op: str, name: str, value: Any, ndim: int) -> tuple[int, ...]:
    """An int, or a tuple/list with one int per spatial axis, as a tuple of ndim ints."""
    if type(value) is int:
        return (value,) * ndim
    if type(value) is tuple and len(value) == ndim and all(type(e) is int for e in value):
        return value  # the common case, already normal
    if isinstance(value, (tuple, list)):
        if len(value) != ndim:
            raise ValueError(
                f"{op}: '{name}' must be an int or a tuple of {ndim} ints (one per spatial "
                f"axis), got {value!r} with {len(value)} entries")
        for entry in value:
            if type(entry) is not int and not _is_int(entry):
                raise TypeError(
                    f"{op}: '{name}' entries must be ints, got {entry!r} "
                    f"({type(entry).__name__}) in {value!r}")
        return tuple(map(int, value))
    if _is_int(value):
        return (int(value),) * ndim
    raise TypeError(
        f"{op}: '{name}' must be an int or a tuple of {ndim} ints, got {value!r} "
        f"({type(value).__name__})")


def as_float_array(op: str, name: str, value: Any) -> np.ndarray:
    """Anything np.asarray accepts, as a floating ndarray (never a copy when it can be a view)."""
    if value is None:
        raise TypeError(f"{op}: '{name}' must be an array, got None")
    if not isinstance(value, np.ndarray):
        value = from_framework(value)
    if not isinstance(value, np.ndarray):
        try:
            value = np.asarray(value)
        except (ValueError, TypeError, RuntimeError) as exc:
            raise TypeError(
                f"{op}: '{name}' could not be read as a rectangular numeric array "
                f"(a ragged list?): {exc}") from None
    if not value.dtype.isnative and value.dtype.kind == "f":
        # Another byte order (read from a file, say): the same numbers in native order,
        # which every kernel and every result uses.
        value = value.astype(value.dtype.newbyteorder("="))
    if not is_supported_float(value.dtype):
        raise TypeError(
            f"{op}: '{name}' must have a floating dtype ({', '.join(SUPPORTED)}), got "
            f"{dtype_name(value.dtype)}; convert it first, e.g. x.astype(np.float32)")
    return value


@functools.lru_cache(maxsize=1)
def memory_limit_bytes() -> int:
    """The largest output we agree to allocate: this machine's physical memory."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 1 << 40


def check_stream(op: str, stream: Any) -> None:
    """`stream` exists for MLX drop-in compatibility; we only ever run on the CPU."""
    if stream is None or stream == "cpu" or str(stream).lower() in ("device(cpu, 0)", "cpu"):
        return
    raise ValueError(
        f"{op}: 'stream' must be None or 'cpu' (convtranspose computes on the CPU), "
        f"got {stream!r}")


PadPairs = tuple[tuple[int, int], ...]


def normalize_padding(op: str, value: Any, ndim: int) -> PadPairs | str:
    """`padding` as one (lo, hi) pair per spatial axis, or "same" (resolved with the kernel).

    An int p means (p, p) on every axis; a tuple or list has one entry per axis, each an
    int p (p, p) or a pair (lo, hi) as ONNX's pads (begins, then ends); "valid" is 0."""
    if type(value) is int:
        return ((value, value),) * ndim
    if isinstance(value, str):
        name = value.lower()
        if name == "same":
            return "same"
        if name == "valid":
            return ((0, 0),) * ndim
        raise ValueError(
            f"{op}: 'padding' must be an int, a tuple of {ndim} entries (each an int or a "
            f"(lo, hi) pair), 'same' or 'valid', got the str {value!r}")
    if isinstance(value, (tuple, list)):
        if len(value) != ndim:
            hint = (f"; for (lo, hi) on the one axis write padding=(({value[0]!r}, "
                    f"{value[1]!r}),)" if ndim == 1 and len(value) == 2 else "")
            raise ValueError(
                f"{op}: 'padding' must be an int or a tuple of {ndim} ints or (lo, hi) pairs "
                f"(one per spatial axis), 'same' or 'valid', got {value!r} with "
                f"{len(value)} entries{hint}")
        lo_hi = []
        for entry in value:
            if isinstance(entry, (tuple, list)):
                if len(entry) != 2 or not all(_is_int(e) for e in entry):
                    raise ValueError(
                        f"{op}: each 'padding' entry must be an int or a (lo, hi) pair of "
                        f"ints, got {entry!r} in {value!r}")
                lo_hi.append((int(entry[0]), int(entry[1])))
            elif _is_int(entry):
                lo_hi.append((int(entry), int(entry)))
            else:
                raise TypeError(
                    f"{op}: 'padding' entries must be ints or (lo, hi) pairs of ints, got "
                    f"{entry!r} ({type(entry).__name__}) in {value!r}")
        return tuple(lo_hi)
    if _is_int(value):
        return ((int(value), int(value)),) * ndim
    raise TypeError(
        f"{op}: 'padding' must be an int, a tuple of {ndim} entries (each an int or a "
        f"(lo, hi) pair), 'same' or 'valid', got {value!r} ({type(value).__name__})")


def make_spec(op: str, ndim: int, input_shape: tuple[int, ...], weight_shape: tuple[int, ...],
              stride: Any = 1, padding: Any = 0, dilation: Any = 1, output_padding: Any = 0,
              groups: Any = 1, input_dtype: Any = np.float32,
              weight_dtype: Any = np.float32, *, output_size: Any = None) -> ConvSpec:
    """Validate one call and describe it; every error of its arrays and settings comes
    from here.

    The settings are normalised to plain int tuples first (so that True or 2.0 can never
    pass for 1 or 2), then the rest is cached: a layer called again with the same shapes
    skips re-validation."""
    settings = tuple(normalize_setting(op, name, value, ndim) for name, value in
                     (("stride", stride), ("dilation", dilation),
                      ("output_padding", output_padding)))
    pads = normalize_padding(op, padding, ndim)
    size = None if output_size is None else normalize_setting(op, "output_size", output_size,
                                                              ndim)
    if not _is_int(groups):
        raise TypeError(f"{op}: 'groups' must be an int, got {groups!r} "
                        f"({type(groups).__name__})")
    return _make_spec(op, ndim, tuple(map(int, input_shape)),
                      tuple(map(int, weight_shape)), settings[0], pads, settings[1],
                      settings[2], int(groups), np.dtype(input_dtype), np.dtype(weight_dtype),
                      size)


def same_padding(kernel: int, stride: int, dilation: int) -> tuple[int, int]:
    """(lo, hi) of padding="same": output = input * stride. The crop d*(k-1) + 1 - s is
    split with the odd unit at the end (lo = total // 2), as TensorFlow and Keras do; where
    the dilated kernel is shorter than the stride, hi < 0 extends the output with zeros."""
    total = dilation * (kernel - 1) + 1 - stride
    if total < 0:
        return 0, total
    return total // 2, total - total // 2


def torch_layout_hint(input_shape: tuple[int, ...], weight_shape: tuple[int, ...],
                      groups: int) -> str:
    """A hint for channel errors when the shapes read as PyTorch's channels-first layout:
    input (N, C_in, *spatial), weight (C_in, C_out/groups, *kernel)."""
    if (len(input_shape) >= 3 and len(weight_shape) == len(input_shape)
            and input_shape[1] == weight_shape[0] and weight_shape[0] % groups == 0):
        return ("; these shapes fit PyTorch's channels-first layout (input (N, C_in, "
                "*spatial), weight (C_in, C_out/groups, *kernel)): convtranspose takes "
                "channels last, so pass np.moveaxis(x, 1, -1) and "
                f"convtranspose.weight_from_torch(w, groups={groups})")
    return ""


@functools.lru_cache(maxsize=512)
def _make_spec(op: str, ndim: int, input_shape: tuple[int, ...], weight_shape: tuple[int, ...],
               stride_t: tuple[int, ...], pads: PadPairs | str,
               dilation_t: tuple[int, ...], out_pad_t: tuple[int, ...], groups: int,
               in_dt: np.dtype, w_dt: np.dtype,
               output_size_t: tuple[int, ...] | None = None) -> ConvSpec:
    expected = ndim + 2
    if len(input_shape) != expected:
        raise ValueError(
            f"{op}: 'input' must have {expected} dimensions {AXES[ndim]} (channels last), or "
            f"{expected - 1} without the batch axis, got shape {input_shape} with "
            f"{len(input_shape)}")
    if len(weight_shape) != expected:
        raise ValueError(
            f"{op}: 'weight' must have {expected} dimensions {WEIGHT_AXES[ndim]}, got shape "
            f"{weight_shape} with {len(weight_shape)}")

    for name, values in (("stride", stride_t), ("dilation", dilation_t)):
        if min(values) <= 0:
            raise ValueError(f"{op}: '{name}' must be >= 1 on every axis, got {values}")
    if groups <= 0:
        raise ValueError(f"{op}: 'groups' must be >= 1, got {groups}")

    batch, *in_spatial, c_in = input_shape
    c_out, *kernel, c_in_per_group = weight_shape
    if min(in_spatial) <= 0:
        raise ValueError(f"{op}: 'input' spatial sizes must be >= 1, got shape {input_shape}")
    if min(kernel) <= 0 or c_out <= 0 or c_in_per_group <= 0:
        raise ValueError(
            f"{op}: 'weight' must have no zero-size axis {WEIGHT_AXES[ndim]}, got shape "
            f"{weight_shape}")
    hint = torch_layout_hint(input_shape, weight_shape, groups)
    if c_in % groups:
        raise ValueError(
            f"{op}: 'groups'={groups} must divide the input channels C_in={c_in} "
            f"(input shape {input_shape}){hint}")
    if c_out % groups:
        raise ValueError(
            f"{op}: 'groups'={groups} must divide the output channels C_out={c_out} "
            f"(weight shape {weight_shape}, axis 0){hint}")
    if c_in_per_group * groups != c_in:
        raise ValueError(
            f"{op}: channel mismatch: 'input' has C_in={c_in} channels, so with "
            f"groups={groups} 'weight' must end in C_in/groups={c_in // groups}, got weight "
            f"shape {weight_shape} (last axis {c_in_per_group}){hint}")

    if pads == "same":
        pads = tuple(same_padding(k, s, d) for k, s, d in zip(kernel, stride_t, dilation_t))
    pad_lo = [lo for lo, _ in pads]
    pad_hi = [hi for _, hi in pads]
    if output_size_t is not None:
        if any(out_pad_t):
            raise ValueError(
                f"{op}: give 'output_size' or 'output_padding', not both (output_size "
                f"{output_size_t} picks the output_padding), got output_padding={out_pad_t}")
        smallest = [full_size(n, k, s, d) - lo - hi for n, k, s, d, lo, hi in
                    zip(in_spatial, kernel, stride_t, dilation_t, pad_lo, pad_hi)]
        # PyTorch's rule: sizes from the smallest up to stride - 1 more.
        if any(not lo <= want <= lo + s - 1
               for want, lo, s in zip(output_size_t, smallest, stride_t)):
            ranges = ", ".join(f"{lo}..{lo + s - 1}" for lo, s in zip(smallest, stride_t))
            raise ValueError(
                f"{op}: 'output_size'={output_size_t} cannot be reached: with input "
                f"{tuple(in_spatial)}, kernel {tuple(kernel)}, stride {stride_t}, padding "
                f"{tuple(pads)} and dilation {dilation_t}, each axis's size must lie in "
                f"({ranges})")
        out_pad_t = tuple(want - lo for want, lo in zip(output_size_t, smallest))
    pad_hi = [hi - op_ for hi, op_ in zip(pad_hi, out_pad_t)]

    out_spatial = tuple(full_size(n, k, s, d) - lo - hi for n, k, s, d, lo, hi in
                        zip(in_spatial, kernel, stride_t, dilation_t, pad_lo, pad_hi))
    if min(out_spatial) <= 0:
        raise ValueError(
            f"{op}: the output would have spatial size {out_spatial} (must be >= 1 on every "
            f"axis): out = (in - 1) * stride + dilation * (k - 1) + 1 - lo - hi, with "
            f"padding (lo, hi) = {tuple(pads)} less output_padding {out_pad_t} at the end, "
            f"in={tuple(in_spatial)}, k={tuple(kernel)}, stride={stride_t}, "
            f"dilation={dilation_t}; reduce 'padding' or increase 'output_padding'")

    for name, dt in (("input", in_dt), ("weight", w_dt)):
        if not is_supported_float(dt):
            raise TypeError(f"{op}: '{name}' must have a floating dtype "
                            f"({', '.join(SUPPORTED)}), got {dtype_name(dt)}")
    res_dt = result_dtype(in_dt, w_dt)

    lift = 3 - ndim
    return ConvSpec(
        op=op, ndim=ndim, batch=batch,
        in_spatial=(1,) * lift + tuple(in_spatial), c_in=c_in, c_out=c_out,
        kernel=(1,) * lift + tuple(kernel),
        stride=(1,) * lift + stride_t, pad_lo=(0,) * lift + tuple(pad_lo),
        pad_hi=(0,) * lift + tuple(pad_hi), dilation=(1,) * lift + dilation_t,
        groups=groups, out_spatial=(1,) * lift + tuple(out_spatial),
        input_dtype=in_dt, weight_dtype=w_dt, result_dtype=res_dt,
        compute_dtype=compute_dtype(res_dt))


def full_size(size: int, kernel: int, stride: int, dilation: int) -> int:
    """Output length along one axis before any crop: (in - 1) * s + d * (k - 1) + 1."""
    return (size - 1) * stride + dilation * (kernel - 1) + 1


def slab_spec(spec: ConvSpec, batch: int, in_spatial: Sequence[int], pad_lo: Sequence[int],
              pad_hi: Sequence[int], input_dtype: Any, weight_dtype: Any) -> ConvSpec:
    """The layer of `spec` (kernel, stride, dilation, groups) on a slab of its input, with
    its own crops `pad_lo`/`pad_hi` (caller's rank; either may be negative): how `_slabs`
    computes one output block. The crops come from its arithmetic, not from a caller, so
    they skip the public arguments and their rules; only the output's size is checked."""
    lift = 3 - spec.ndim
    in3 = (1,) * lift + tuple(in_spatial)
    lo3 = (0,) * lift + tuple(pad_lo)
    hi3 = (0,) * lift + tuple(pad_hi)
    out3 = tuple(full_size(n, k, s, d) - lo - hi for n, k, s, d, lo, hi in
                 zip(in3, spec.kernel, spec.stride, spec.dilation, lo3, hi3))
    if min(out3) <= 0:
        raise ValueError(f"{spec.op}: crops lo={lo3}, hi={hi3} leave no output of a slab "
                         f"{in3} (spatial size {out3})")
    in_dt, w_dt = np.dtype(input_dtype), np.dtype(weight_dtype)
    res_dt = result_dtype(in_dt, w_dt)
    return dataclasses.replace(
        spec, batch=batch, in_spatial=in3, pad_lo=lo3, pad_hi=hi3, out_spatial=out3,
        input_dtype=in_dt, weight_dtype=w_dt, result_dtype=res_dt,
        compute_dtype=compute_dtype(res_dt))


def check_bias(op: str, bias: Any, spec: ConvSpec) -> np.ndarray | None:
    """`bias` as a floating (C_out,) array (its own dtype), or None. It does not take part
    in the result's dtype: the kernels add it in the compute dtype."""
    if bias is None:
        return None
    b = as_float_array(op, "bias", bias)
    if b.shape != (spec.c_out,):
        raise ValueError(
            f"{op}: 'bias' must have shape (C_out,) = ({spec.c_out},), one value per output "
            f"channel, got shape {b.shape}")
    return b


def check_fits_in_memory(spec: ConvSpec) -> ConvSpec:
    """In-memory calls only: refuse, before allocating, an output larger than this
    machine's memory (convtranspose.dask streams such volumes instead)."""
    out_bytes = spec.output_bytes
    limit = memory_limit_bytes()
    if out_bytes > limit:
        raise ValueError(
            f"{spec.op}: the output {spec.output_shape} {spec.result_dtype.name} would take "
            f"{out_bytes / 2**30:.1f} GiB, more than this machine's {limit / 2**30:.1f} GiB "
            f"of memory; split the batch, or use convtranspose.dask for out-of-core volumes")
    return spec
