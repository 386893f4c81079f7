"""Halo and slab arithmetic shared by `convtranspose.dask` and `convtranspose apply`.

A transposed convolution is local: along one axis, input position i and tap k land on output
o = i*s + k*d - p. So any output block [o0, o1) is computed from one input slab
[i0, i1) alone, by the in-memory engine run on that slab with the crops (lo, hi) that make
its output exactly [o0, o1) (the definition keeps only 0 <= o' < out', which is precisely a
crop; hi < 0 extends the output where no input of the slab reaches). These are small pure
functions; nothing here imports dask or zarr.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from ._execute import execute
from ._geometry import ceil_div
from ._plan import make_plan
from ._spec import ConvSpec, as_float_array, slab_spec


@dataclass(frozen=True)
class AxisBlock:
    """One output block along one spatial axis and the input slab that feeds it.

    `pad_lo`/`pad_hi` are the crops for which a transposed convolution of the slab
    [in_start, in_stop) outputs exactly the positions [out_start, out_stop).
    An empty slab (in_start == in_stop) means no input reaches the block: it is all zeros.
    """

    out_start: int
    out_stop: int
    in_start: int
    in_stop: int
    pad_lo: int
    pad_hi: int

    @property
    def empty(self) -> bool:
        return self.in_start >= self.in_stop


def input_range(out_start: int, out_stop: int, size: int, kernel: int, stride: int,
                padding: int, dilation: int) -> tuple[int, int]:
    """Input positions [i0, i1) that can reach outputs [out_start, out_stop).

    Input i reaches o through some tap k in [0, kernel) when o = i*s + k*d - p, so
    i*s lies in [out_start + p - d*(kernel-1), out_stop - 1 + p]. Clipped to [0, size);
    an empty range comes back as (i0, i0).
    """
    lo = ceil_div(out_start + padding - dilation * (kernel - 1), stride)
    hi = (out_stop - 1 + padding) // stride + 1
    lo = min(max(0, lo), size)
    return lo, max(lo, min(size, hi))


def slab_settings(out_start: int, out_stop: int, in_start: int, in_stop: int, kernel: int,
                  stride: int, padding: int, dilation: int) -> tuple[int, int]:
    """(lo, hi) crops that make the slab's transposed convolution output exactly
    [out_start, out_stop) of the whole one (`padding`: the whole one's lo).

    In the slab, input i' = i - in_start lands on o' = i'*s + k*d - lo and must equal
    o - out_start, so lo = p + out_start - in_start*s; hi then fixes the size:
    (n - 1) * s + d * (k - 1) + 1 - lo - hi = out_stop - out_start. Either may be negative.
    """
    lo = padding + out_start - in_start * stride
    n = in_stop - in_start
    hi = (n - 1) * stride + dilation * (kernel - 1) + 1 - lo - (out_stop - out_start)
    return lo, hi


def axis_block(out_start: int, out_stop: int, size: int, kernel: int, stride: int,
               padding: int, dilation: int) -> AxisBlock:
    i0, i1 = input_range(out_start, out_stop, size, kernel, stride, padding, dilation)
    if i0 >= i1:
        return AxisBlock(out_start, out_stop, i0, i0, 0, 0)
    pad, out_pad = slab_settings(out_start, out_stop, i0, i1, kernel, stride, padding,
                                 dilation)
    return AxisBlock(out_start, out_stop, i0, i1, pad, out_pad)


def output_bounds_from_input(in_chunks: Sequence[int], stride: int, padding: int,
                             out_size: int) -> list[int]:
    """Output block boundaries that follow the input chunks along one axis.

    Input boundary b maps to output b*s - p, where input b's first tap lands: that choice
    gives the smallest halo, floor(d*(k-1)/s) input positions per block. The first block
    starts at 0, the last one ends at `out_size` (taking output_padding), and blocks that
    clipping leaves empty are dropped.
    """
    bounds = [0]
    edge = 0
    for chunk in list(in_chunks)[:-1]:
        edge += chunk
        b = min(max(edge * stride - padding, 0), out_size)
        if b > bounds[-1]:
            bounds.append(b)
    if out_size > bounds[-1]:
        bounds.append(out_size)
    return bounds


def even_bounds(size: int, chunk: int) -> list[int]:
    """[0, chunk, 2*chunk, ..., size]."""
    return [*range(0, size, max(1, chunk)), size]


def axis_blocks(bounds: Sequence[int], size: int, kernel: int, stride: int, padding: int,
                dilation: int) -> list[AxisBlock]:
    """One AxisBlock per consecutive pair of output boundaries."""
    return [axis_block(a, b, size, kernel, stride, padding, dilation)
            for a, b in zip(bounds[:-1], bounds[1:])]


def spatial(spec: ConvSpec, name: str) -> tuple[int, ...]:
    """A per-axis 3-tuple of the spec in the caller's rank."""
    return getattr(spec, name)[3 - spec.ndim:]


def spec_blocks(spec: ConvSpec, bounds: Sequence[Sequence[int]]) -> list[list[AxisBlock]]:
    """AxisBlocks for each spatial axis (caller's rank) of a spec, given output boundaries."""
    args = zip(bounds, spatial(spec, "in_spatial"), spatial(spec, "kernel"),
               spatial(spec, "stride"), spatial(spec, "pad_lo"), spatial(spec, "dilation"))
    return [axis_blocks(b, n, k, s, p, d) for b, n, k, s, p, d in args]


def compute_block(spec: ConvSpec, slab: np.ndarray, weight: np.ndarray,
                  blocks: Sequence[AxisBlock], bias: np.ndarray | None = None) -> np.ndarray:
    """The output block (batch, *block spatial, C_out) from its input slab
    (batch, *slab spatial, C_in), one AxisBlock per spatial axis, plus `bias` (C_out,).

    The block's crops go into its spec as they are (`slab_spec`), then plan and execute:
    not through the public arguments, whose padding and output_padding rules are the
    caller's, not this arithmetic's."""
    shape = (slab.shape[0], *(b.out_stop - b.out_start for b in blocks), spec.c_out)
    if any(b.empty for b in blocks) or slab.shape[0] == 0:
        out = np.zeros(shape, spec.result_dtype)
        if bias is not None:
            out[...] = bias
        return out
    # Native byte order, as the kernels read (a .npy of another order is read as it lies).
    x = as_float_array(spec.op, "input", slab)
    w = as_float_array(spec.op, "weight", weight)
    block = slab_spec(spec, x.shape[0], x.shape[1:-1], [b.pad_lo for b in blocks],
                      [b.pad_hi for b in blocks], x.dtype, w.dtype)
    b = None if bias is None else np.ascontiguousarray(bias, block.compute_dtype)
    out = execute(make_plan(block), x, w, b)
    assert out.shape == shape, (out.shape, shape)  # guaranteed by slab_settings
    return out
