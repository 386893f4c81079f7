"""Transposed convolutions on Dask arrays: out-of-core and distributed volumes.

    >>> import numpy as np, dask.array as da
    >>> import convtranspose.dask as ctd
    >>> x = da.ones((1, 64, 64, 64, 8), chunks=(1, 16, 32, 64, 8), dtype=np.float32)
    >>> w = np.ones((4, 2, 2, 2, 8), np.float32)
    >>> y = ctd.conv_transpose3d(x, w, stride=2)      # lazy: nothing computed yet
    >>> y.shape, y.chunksize
    ((1, 128, 128, 128, 4), (1, 32, 64, 128, 4))

Each output chunk is computed from the input chunks that overlap its input slab (its own
input chunk plus a halo of floor(dilation*(k-1)/stride) positions per axis) by the in-memory
engine: no global rechunk, nothing materialised. Output chunks follow the input chunks: input
chunk boundary b maps to output boundary b*stride - padding along each spatial axis, and the
last chunk takes the remainder (output_padding included). Channels must be in one chunk; a
split channel axis is rechunked along that axis only.

This module needs the optional extra: ``pip install convtranspose[dask]``.
"""

import bisect
import itertools
import traceback
from collections.abc import Sequence
from typing import Any

import dask.array as da
import numpy as np
from dask.base import tokenize
from dask.highlevelgraph import HighLevelGraph

from ._slabs import AxisBlock, compute_block, output_bounds_from_input, spatial, spec_blocks
from ._spec import (
    OP_NAMES,
    ConvSpec,
    IntOrTuple,
    Padding,
    as_float_array,
    check_bias,
    make_spec,
)

__all__ = ["conv_transpose1d", "conv_transpose2d", "conv_transpose3d"]


def _offsets(chunks: Sequence[int]) -> list[int]:
    """Start of every chunk, plus the end: [0, c0, c0 + c1, ..., total]."""
    return [0, *itertools.accumulate(chunks)]


def _pieces(offsets: list[int], start: int, stop: int) -> list[tuple[int, slice, slice]]:
    """The input chunks that overlap [start, stop): (chunk index, slice inside the chunk,
    slice inside the slab)."""
    if start >= stop:
        return []
    first = bisect.bisect_right(offsets, start) - 1
    pieces = []
    for j in range(first, len(offsets) - 1):
        lo, hi = max(start, offsets[j]), min(stop, offsets[j + 1])
        if lo >= stop:
            break
        if lo < hi:
            pieces.append((j, slice(lo - offsets[j], hi - offsets[j]),
                           slice(lo - start, hi - start)))
    return pieces


def _block(spec: ConvSpec, parts: list, placement: list, slab_shape: tuple[int, ...],
           weight: np.ndarray, blocks: tuple[AxisBlock, ...],
           bias: np.ndarray | None = None) -> np.ndarray:
    """One output chunk: stitch its input slab from the overlapping chunks, then convolve.
    An exception (Ctrl-C's KeyboardInterrupt) leaves with the frames below cleared: Dask
    keeps it with its traceback in a reference cycle, and those frames held the chunk's
    output and slab until the cyclic collector ran (a whole output of memory held after
    an interrupted compute)."""
    if not parts:
        slab = np.empty(slab_shape, spec.input_dtype)  # no input reaches: compute_block zeros
    elif len(parts) == 1:
        slab = parts[0][placement[0][0]]  # a view: the engine never writes to its input
    else:
        slab = np.empty(slab_shape, parts[0].dtype)
        for part, (src, dst) in zip(parts, placement):
            slab[dst] = part[src]
    try:
        return compute_block(spec, slab, weight, blocks, bias)
    except BaseException as exc:
        del slab
        traceback.clear_frames(exc.__traceback__)
        raise


def _check_array(op: str, x: Any) -> da.Array:
    if not isinstance(x, da.Array):
        raise TypeError(
            f"convtranspose.dask.{op}: 'x' must be a dask.array.Array, got "
            f"{type(x).__name__}; for in-memory arrays call convtranspose.{op}, or wrap it "
            f"with dask.array.from_array(x, chunks=...)")
    if any(np.isnan(c) for axis in x.chunks for c in axis):
        raise ValueError(
            f"convtranspose.dask.{op}: 'x' has unknown chunk sizes {x.chunks}; call "
            f"x.compute_chunk_sizes() first")
    return x


def _conv_transpose(ndim: int, x: Any, weight: Any, stride: IntOrTuple, padding: Padding,
                    dilation: IntOrTuple, output_padding: IntOrTuple,
                    groups: int, bias: Any = None,
                    output_size: IntOrTuple | None = None) -> da.Array:
    op = OP_NAMES[ndim]
    x = _check_array(op, x)
    if isinstance(weight, da.Array):
        weight = weight.compute()  # a kernel is small; every task needs all of it
    if isinstance(bias, da.Array):
        bias = bias.compute()
    w = as_float_array(op, "weight", weight)
    if x.ndim == ndim + 1:  # no batch axis: a batch of one, dropped again at the end
        return _conv_transpose(ndim, x[None], w, stride, padding, dilation, output_padding,
                               groups, bias, output_size)[0]
    spec = make_spec(op, ndim, x.shape, w.shape, stride, padding, dilation,
                     output_padding, groups, x.dtype, w.dtype, output_size=output_size)
    b = check_bias(op, bias, spec)

    if len(x.chunks[-1]) > 1:
        # Every output channel reads every input channel of its group: one chunk, and only
        # this axis is rechunked.
        x = x.rechunk({x.ndim - 1: -1})

    bounds = [output_bounds_from_input(chunks, s, p, m) for chunks, s, p, m in
              zip(x.chunks[1:-1], spatial(spec, "stride"), spatial(spec, "pad_lo"),
                  spatial(spec, "out_spatial"))]
    axis_blocks = spec_blocks(spec, bounds)
    in_offsets = [_offsets(chunks) for chunks in x.chunks[1:-1]]

    name = f"{op}-" + tokenize(x, w, spec, b)
    wkey = f"{op}-weight-" + tokenize(w)
    dsk: dict = {wkey: w}
    bkey = None
    if b is not None:
        bkey = f"{op}-bias-" + tokenize(b)
        dsk[bkey] = b
    for nb, n_size in enumerate(x.chunks[0]):
        for jdx in itertools.product(*(range(len(b)) for b in axis_blocks)):
            blocks = tuple(axis_blocks[a][j] for a, j in enumerate(jdx))
            per_axis = [_pieces(off, b.in_start, b.in_stop) for off, b in zip(in_offsets, blocks)]
            parts, placement = [], []
            if not any(b.empty for b in blocks):
                for combo in itertools.product(*per_axis):
                    parts.append((x.name, nb, *(c[0] for c in combo), 0))
                    src = (slice(None), *(c[1] for c in combo), slice(None))
                    dst = (slice(None), *(c[2] for c in combo), slice(None))
                    placement.append((src, dst))
            slab_shape = (n_size, *(b.in_stop - b.in_start for b in blocks), spec.c_in)
            dsk[(name, nb, *jdx, 0)] = (_block, spec, parts, placement, slab_shape, wkey,
                                        blocks, bkey)

    graph = HighLevelGraph.from_collections(name, dsk, dependencies=[x])
    chunks = (x.chunks[0], *(tuple(np.diff(b).tolist()) for b in bounds), (spec.c_out,))
    meta = np.empty((0,) * x.ndim, spec.result_dtype)
    return da.Array(graph, name, chunks, meta=meta)


_DOC = """{n}-D transposed convolution of a dask array; lazy, equal to
    `convtranspose.conv_transpose{n}d` (whose docstring describes every setting).

    Parameters
    ----------
    x : dask.array.Array
        {xshape}, channels last, or without the batch axis. Channels must be one chunk
        (a split channel axis is rechunked along it only).
    weight : array_like
        {wshape}; a dask array is computed (every task needs all of it).
    stride, padding, dilation, output_padding, groups
        As `convtranspose.conv_transpose{n}d`: padding may be (lo, hi) pairs per axis,
        "same" or "valid"; MLX's negative padding and output_padding >= stride too.
    bias : array_like of shape (C_out,), optional, keyword-only
        Added as each block is computed.
    output_size : int or tuple of {n} ints, optional, keyword-only
        PyTorch's rule, as `convtranspose.conv_transpose{n}d`.

    Returns
    -------
    dask.array.Array
        Output chunks follow the input chunks (boundary b -> b*stride - lo per spatial
        axis); each is computed from one input slab plus its halo.

    Raises
    ------
    TypeError, ValueError
        As the in-memory call, when the graph is built; also an `x` that is not a dask
        array or has unknown chunk sizes.

    Examples
    --------
    >>> import numpy as np, dask.array as da, convtranspose.dask as ctd
    >>> x = da.ones({xex}, chunks=2, dtype=np.float32)
    >>> w = np.ones({wex}, np.float32)
    >>> ctd.conv_transpose{n}d(x, w, stride=2, padding="same", bias=np.ones(4)).shape
    {yex}
    """


def _doc(ndim: int) -> str:
    spatial_ = {1: "W", 2: "H, W", 3: "D, H, W"}[ndim]
    kernel = {1: "kW", 2: "kH, kW", 3: "kD, kH, kW"}[ndim]
    return _DOC.format(n=ndim, xshape=f"(N, {spatial_}, C_in)",
                       wshape=f"(C_out, {kernel}, C_in/groups)", xex=(1, *(4,) * ndim, 3),
                       wex=(4, *(3,) * ndim, 3), yex=(1, *(8,) * ndim, 4))


def conv_transpose1d(x: da.Array, weight: Any, /, stride: IntOrTuple = 1,
                     padding: Padding = 0, dilation: IntOrTuple = 1,
                     output_padding: IntOrTuple = 0, groups: int = 1, *, bias: Any = None,
                     output_size: IntOrTuple | None = None) -> da.Array:
    return _conv_transpose(1, x, weight, stride, padding, dilation, output_padding, groups,
                           bias, output_size)


def conv_transpose2d(x: da.Array, weight: Any, /, stride: IntOrTuple = 1,
                     padding: Padding = 0, dilation: IntOrTuple = 1,
                     output_padding: IntOrTuple = 0, groups: int = 1, *, bias: Any = None,
                     output_size: IntOrTuple | None = None) -> da.Array:
    return _conv_transpose(2, x, weight, stride, padding, dilation, output_padding, groups,
                           bias, output_size)


def conv_transpose3d(x: da.Array, weight: Any, /, stride: IntOrTuple = 1,
                     padding: Padding = 0, dilation: IntOrTuple = 1,
                     output_padding: IntOrTuple = 0, groups: int = 1, *, bias: Any = None,
                     output_size: IntOrTuple | None = None) -> da.Array:
    return _conv_transpose(3, x, weight, stride, padding, dilation, output_padding, groups,
                           bias, output_size)


conv_transpose1d.__doc__ = _doc(1)
conv_transpose2d.__doc__ = _doc(2)
conv_transpose3d.__doc__ = _doc(3)
