"""Gradients of the transposed convolution: the vector-Jacobian product (VJP).

For y = conv_transpose(x, W) and a cotangent g shaped like y, per axis and per pair
(input position i, tap k) that lands inside the output at o = i*s + k*d - p:

    grad_input[n, i, ci]   = sum_{k, co} g[n, i*s + k*d - p, co] * W[co, k, ci]
    grad_weight[co, k, ci] = sum_{n, i}  x[n, i, ci] * g[n, i*s + k*d - p, co]

Both read the same cotangent rows: input position i meets, through tap k, cotangent row
i*s + k*d - p. So the work is organised over *input* positions (no phases, no
zero-stuffing): a tile of input rows gathers, per tap, the cotangent rows it meets into one
block (rows, taps * C_out/g), and that block feeds two GEMMs:

    grad_input tile  = block @ W_stacked          (K = taps * C_out/g)
    grad_weight     += x_tile^T @ block           (summed over tiles)

Depthwise layers (one input channel per group) have no GEMM to speak of; they multiply-add
per tap, broadcast over channels, as the forward's ``direct`` kernel does.

Tiles are bounded by the same workspace rule as the forward (`_plan.workspace_limit`) and
are spread over worker threads (NumPy and BLAS release the GIL). Each worker owns its tiles
by a fixed round-robin and its own grad_weight partial sum, and partials are added in
worker order: results are bitwise reproducible for a given thread count.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from ._api import ArrayLike, IntOrTuple, spec_for
from ._blas import single_threaded_blas
from ._geometry import tap_output_range
from ._plan import Tile, get_num_threads, split_tiles, workspace_limit
from ._spec import ConvSpec, as_float_array

# A worker's gathered block stays about this size, so that it is still in cache when the
# GEMMs read it back.
VJP_TILE_BYTES = 4 * 2**20
# grad_weight sums over rows: a block of fewer rows than this makes the per-tile update of
# the (taps * C_out, C_in) partial sum cost too much next to the GEMM; split taps instead.
GW_MIN_ROWS = 1024

_NAMES = {1: "conv_transpose1d_vjp", 2: "conv_transpose2d_vjp", 3: "conv_transpose3d_vjp"}

_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(max_workers=threads,
                                             thread_name_prefix="convtranspose-vjp")
    return _pools[threads]


@dataclass(frozen=True)
class _Tap:
    """One 3-D kernel tap that reaches the output from at least one input position."""

    index: int  # flat index into the kernel, (kd, kh, kw) in C order
    shift: tuple[int, int, int]  # cotangent row o = i * s + shift, per axis
    lo: tuple[int, int, int]  # input range [lo, hi) whose rows land inside the output
    hi: tuple[int, int, int]


def _active_taps(spec: ConvSpec) -> list[_Tap]:
    """Taps with a non-empty input range on every axis; the others have zero gradient."""
    per_axis = []
    for n, kk, s, p, d, o in zip(spec.in_spatial, spec.kernel, spec.stride, spec.padding,
                                 spec.dilation, spec.out_spatial):
        per_axis.append([(k, k * d - p, *tap_output_range(n, k, s, p, d, o))
                         for k in range(kk)])
    taps = []
    kd, kh, kw = spec.kernel
    for a, b, c in itertools.product(*per_axis):
        lo, hi = (a[2], b[2], c[2]), (a[3], b[3], c[3])
        if all(l_ < h_ for l_, h_ in zip(lo, hi)):
            taps.append(_Tap((a[0] * kh + b[0]) * kw + c[0], (a[1], b[1], c[1]), lo, hi))
    return taps


def _tap_box(spec: ConvSpec, tap: _Tap, tile: Tile):
    """Where tap reads inside the tile: tile-relative input box and cotangent slices."""
    box = ((max(tap.lo[0], tile.d[0]), min(tap.hi[0], tile.d[1])),
           (max(tap.lo[1], tile.h[0]), min(tap.hi[1], tile.h[1])),
           (tap.lo[2], tap.hi[2]))
    if any(a >= b for a, b in box):
        return None
    cot = tuple(slice(a * s + sh, (b - 1) * s + sh + 1, s)
                for (a, b), s, sh in zip(box, spec.stride, tap.shift))
    rel = ((box[0][0] - tile.d[0], box[0][1] - tile.d[0]),
           (box[1][0] - tile.h[0], box[1][1] - tile.h[0]), box[2])
    return rel, cot


def _zero_outside(dst: np.ndarray, rel, full: tuple[int, int, int]) -> None:
    """Zero dst (..., nd, nh, nw, c) outside the box rel: only the border slabs, so a tile
    whose taps clip the width axis does not pay for refilling its whole block."""
    (a0, a1), (b0, b1), (c0, c1) = rel
    nd, nh, nw = full
    if a0 > 0:
        dst[..., :a0, :, :, :] = 0
    if a1 < nd:
        dst[..., a1:, :, :, :] = 0
    mid = dst[..., a0:a1, :, :, :]
    if b0 > 0:
        mid[..., :b0, :, :] = 0
    if b1 < nh:
        mid[..., b1:, :, :] = 0
    mid = mid[..., b0:b1, :, :]
    if c0 > 0:
        mid[..., :c0, :] = 0
    if c1 < nw:
        mid[..., c1:, :] = 0


def check_cotangent(op: str, spec: ConvSpec, cotangent: ArrayLike) -> np.ndarray:
    """The cotangent must be a floating array shaped exactly like the forward's output."""
    cot = as_float_array(op, "cotangent", cotangent)
    if tuple(cot.shape) != tuple(spec.output_shape):
        raise ValueError(
            f"{op}: 'cotangent' must have the forward output's shape {spec.output_shape} "
            f"(input {spec.input_shape}, weight {spec.weight_shape}), got shape "
            f"{tuple(cot.shape)}")
    return cot


def _compute_dtype(*dtypes: np.dtype) -> np.dtype:
    """float64 if anything is float64, else float32: never accumulate below float32."""
    return np.dtype(np.float64 if any(np.dtype(d) == np.float64 for d in dtypes)
                    else np.float32)


def _run_workers(jobs: list[Callable[[], None]], threads: int) -> None:
    if len(jobs) == 1:
        jobs[0]()  # one worker: BLAS keeps its own threads
        return
    # Our workers already fill the cores: BLAS threads on top of them would fight.
    with single_threaded_blas():
        for future in [_pool(threads).submit(job) for job in jobs]:
            future.result()


def vjp_arrays(spec: ConvSpec, x: np.ndarray, w: np.ndarray, cot: np.ndarray, *,
               need_input: bool = True, need_weight: bool = True,
               threads: int | None = None, workspace: int | None = None
               ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The VJP of a validated spec. grad_input has x's dtype, grad_weight w's (as mx.vjp).

    `need_input`/`need_weight` skip the work of the gradient not wanted (None is returned
    in its place); `threads` and `workspace` (bytes) override the defaults."""
    cd = _compute_dtype(x.dtype, w.dtype, cot.dtype)
    ktot = math.prod(spec.kernel)
    x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
    c3 = cot.reshape(spec.batch, *spec.out_spatial, spec.c_out)
    w3 = w.reshape(spec.c_out, ktot, spec.c_in_per_group)
    gx = np.zeros((spec.batch, *spec.in_spatial, spec.c_in), x.dtype) if need_input else None
    gw = np.zeros((spec.c_out, ktot, spec.c_in_per_group), cd) if need_weight else None
    taps = _active_taps(spec)
    if taps and spec.batch and (need_input or need_weight):
        n_threads = max(1, threads or get_num_threads())
        budget = max(1, min(VJP_TILE_BYTES, workspace_limit(spec, workspace) // n_threads)
                     // cd.itemsize)  # elements of workspace per worker
        run = _direct if spec.c_in_per_group == 1 and spec.groups > 1 else _gather
        run(spec, taps, x3, c3, w3, gx, gw, n_threads, budget, cd)
    if gx is not None:
        gx = gx.reshape(spec.input_shape)
    if gw is not None:
        gw = gw.reshape(spec.weight_shape).astype(w.dtype, copy=False)
    return gx, gw


def _rows(tile: Tile, spec: ConvSpec) -> int:
    return ((tile.n[1] - tile.n[0]) * (tile.d[1] - tile.d[0]) * (tile.h[1] - tile.h[0])
            * spec.in_spatial[2])


def _tiles(spec: ConvSpec, max_rows: int, min_tiles: int) -> list[Tile]:
    return split_tiles(spec.batch, spec.in_spatial, max(spec.in_spatial[2], max_rows),
                       min_tiles)


def _sum_in_order(parts: list[np.ndarray]) -> np.ndarray:
    total = parts[0]
    for part in parts[1:]:
        total += part  # a fixed order: reproducible sums
    return total


def _gather(spec, taps, x3, c3, w3, gx, gw, n_threads, budget, cd) -> None:
    """Gathered cotangent blocks -> GEMMs.

    grad_input wants every tap of a row in one block (K = taps * C_out/g) and tiles over
    rows. grad_weight's reduction runs over rows, so row tiles leave partial sums of the
    whole (taps * C_out/g, C_in/g) result to add up; when that result is large, it tiles
    over taps instead (chunks of taps, each summed over all rows while it stays in cache).
    When both fit one tiling, a single pass gathers once for both GEMMs."""
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    ntap = len(taps)
    idx = [t.index for t in taps]
    total_rows = spec.batch * math.prod(spec.in_spatial)
    rows_all = budget // (ntap * spec.c_out)  # rows of a block holding every tap
    if rows_all >= min(GW_MIN_ROWS, total_rows):
        chunk = ntap
    else:
        chunk = max(1, budget // (min(GW_MIN_ROWS, total_rows) * spec.c_out))
    wg = None
    if gx is not None:
        # (G, T * C_out/g, C_in/g): the active taps stacked as the grad_input GEMM operand.
        wg = w3[:, idx, :].reshape(groups, cog, ntap, cig).transpose(0, 2, 1, 3)
        wg = np.ascontiguousarray(wg.reshape(groups, ntap * cog, cig), dtype=cd)

    total = None  # grad_weight as (G, T * C_out/g, C_in/g)
    if gx is not None or chunk == ntap:
        tiles = _tiles(spec, rows_all, n_threads)
        workers = min(n_threads, len(tiles))
        fused = gw is not None and chunk == ntap
        parts = [np.zeros((groups, ntap * cog, cig), cd) if fused else None
                 for _ in range(workers)]

        def rows_job(j):
            def job():
                col = np.empty(max(_rows(t, spec) for t in tiles) * ntap * spec.c_out, cd)
                tmp = np.empty(parts[j].shape, cd) if fused else None
                for i, tile in enumerate(tiles[j::workers]):
                    mat = _gather_block(spec, taps, tile, c3, col)
                    if gx is not None:
                        _grad_input_tile(spec, tile, mat, wg, gx, cd)
                    if fused:
                        _grad_weight_tile(spec, tile, mat, x3, parts[j], tmp, i == 0, cd)
            return job

        _run_workers([rows_job(j) for j in range(workers)], workers)
        if fused:
            total = _sum_in_order(parts)

    if gw is not None and total is None:
        chunks = [taps[i:i + chunk] for i in range(0, ntap, chunk)]
        tiles = _tiles(spec, budget // (chunk * spec.c_out), 1)
        workers = min(n_threads, max(len(chunks), len(tiles)))
        # Whole chunks to each worker when there are enough, else split each chunk's rows.
        if len(chunks) >= workers:
            plan = [[(c, tiles) for c in range(j, len(chunks), workers)]
                    for j in range(workers)]
        else:
            plan = [[(c, tiles[j::workers]) for c in range(len(chunks))]
                    for j in range(workers)]
        results: list[dict] = [{} for _ in range(workers)]

        def chunk_job(j):
            def job():
                col = np.empty(max(_rows(t, spec) for t in tiles) * chunk * spec.c_out, cd)
                tmp = np.empty((groups, chunk * cog, cig), cd)
                for c, my_tiles in plan[j]:
                    sub = chunks[c]
                    part = np.zeros((groups, len(sub) * cog, cig), cd)
                    for i, tile in enumerate(my_tiles):
                        mat = _gather_block(spec, sub, tile, c3, col)
                        _grad_weight_tile(spec, tile, mat, x3, part, tmp[:, :part.shape[1]],
                                          i == 0, cd)
                    results[j][c] = part
            return job

        _run_workers([chunk_job(j) for j in range(workers)], workers)
        total = np.concatenate(
            [_sum_in_order([r[c] for r in results if c in r]) for c in range(len(chunks))],
            axis=1)

    if gw is not None:
        # (G, T * C_out/g, C_in/g) -> (C_out, T, C_in/g)
        blocks = total.reshape(groups, ntap, cog, cig).transpose(0, 2, 1, 3)
        gw[:, idx, :] = blocks.reshape(spec.c_out, ntap, cig)


def _gather_block(spec, taps, tile, c3, col) -> np.ndarray:
    """(G, rows, len(taps) * C_out/g): for each input row of the tile, the cotangent rows
    its taps meet (zero where a tap lands outside the output)."""
    groups, cog = spec.groups, spec.c_out_per_group
    n0, n1 = tile.n
    nw = spec.in_spatial[2]
    nn, nd, nh = n1 - n0, tile.d[1] - tile.d[0], tile.h[1] - tile.h[0]
    rows = nn * nd * nh * nw
    ntap = len(taps)
    block = col[:rows * ntap * spec.c_out].reshape(groups, nn, nd, nh, nw, ntap, cog)
    for t, tap in enumerate(taps):
        dst = block[:, :, :, :, :, t, :]
        found = _tap_box(spec, tap, tile)
        if found is None:
            dst.fill(0)
            continue
        rel, (sd, sh, sw) = found
        if rel != ((0, nd), (0, nh), (0, nw)):
            _zero_outside(dst, rel, (nd, nh, nw))
        (a0, a1), (b0, b1), (c0, c1) = rel
        src = c3[n0:n1, sd, sh, sw, :]
        if groups == 1:
            dst[0, :, a0:a1, b0:b1, c0:c1, :] = src
        else:
            src = src.reshape(*src.shape[:-1], groups, cog)
            dst[:, :, a0:a1, b0:b1, c0:c1, :] = np.moveaxis(src, -2, 0)
    return block.reshape(groups, rows, ntap * cog)


def _grad_input_tile(spec, tile, mat, wg, gx, cd) -> None:
    groups, cig = spec.groups, spec.c_in_per_group
    rows = mat.shape[1]
    n0, n1 = tile.n
    # The tile is a contiguous block of gx (whole along W, and along H when D is split).
    target = gx[n0:n1, tile.d[0]:tile.d[1], tile.h[0]:tile.h[1]].reshape(rows, groups, cig)
    if groups == 1 and gx.dtype == cd:
        np.matmul(mat[0], wg[0], out=target[:, 0, :])
    else:
        target[...] = np.moveaxis(np.matmul(mat, wg), 0, 1)


def _grad_weight_tile(spec, tile, mat, x3, part, tmp, first, cd) -> None:
    """part (G, T * C_out/g, C_in/g) += block^T @ x_tile."""
    groups, cig = spec.groups, spec.c_in_per_group
    rows = mat.shape[1]
    n0, n1 = tile.n
    xt = x3[n0:n1, tile.d[0]:tile.d[1], tile.h[0]:tile.h[1]].reshape(rows, groups, cig)
    xt = xt.astype(cd, copy=False).transpose(1, 0, 2)  # (G, rows, C_in/g)
    # block^T @ x rather than x^T @ block: the same numbers, transposed, but with the long
    # (taps * C_out) side as BLAS's M it ran about twice as fast here.
    mat_t = mat.transpose(0, 2, 1)  # a BLAS-ready transposed view
    if first:
        np.matmul(mat_t, xt, out=part)
    else:
        np.matmul(mat_t, xt, out=tmp)
        part += tmp


def _direct(spec, taps, x3, c3, w3, gx, gw, n_threads, budget, cd) -> None:
    """Depthwise: tiles of rows, each worker with its own (taps, C_out) partial."""
    ntap = len(taps)
    tiles = _tiles(spec, budget // (2 * spec.c_out), n_threads)
    workers = min(n_threads, len(tiles))
    parts = [np.zeros((ntap, spec.c_out), cd) if gw is not None else None
             for _ in range(workers)]
    wt = np.ascontiguousarray(w3[:, [t.index for t in taps], 0].T.astype(cd))  # (T, C_out)

    def job_for(j):
        def job():
            buf = np.empty(2 * max(_rows(t, spec) for t in tiles) * spec.c_out, cd)
            for tile in tiles[j::workers]:
                _direct_tile(spec, taps, tile, x3, c3, wt, gx, parts[j], buf)
        return job

    _run_workers([job_for(j) for j in range(workers)], workers)
    if gw is not None:
        gw[:, [t.index for t in taps], 0] = _sum_in_order(parts).T


def _direct_tile(spec, taps, tile, x3, c3, wt, gx, part, buf) -> None:
    """C_in/g == 1: each tap is a broadcast multiply-add over channels."""
    groups, cog = spec.groups, spec.c_out_per_group
    n0, n1 = tile.n
    d0, d1 = tile.d
    h0, h1 = tile.h
    nw = spec.in_spatial[2]
    nn, nd, nh = n1 - n0, d1 - d0, h1 - h0
    size = nn * nd * nh * nw * spec.c_out
    tmp_all = buf[:size].reshape(nn, nd, nh, nw, groups, cog)
    acc = None
    if gx is not None:
        acc = buf[size:size + size // cog].reshape(nn, nd, nh, nw, groups)
        acc.fill(0)
    xt = x3[n0:n1, d0:d1, h0:h1].reshape(nn, nd, nh, nw, groups, 1)
    for t, tap in enumerate(taps):
        found = _tap_box(spec, tap, tile)
        if found is None:
            continue
        ((a0, a1), (b0, b1), (c0, c1)), (sd, sh, sw) = found
        src = c3[n0:n1, sd, sh, sw, :]
        src = src.reshape(*src.shape[:-1], groups, cog)
        tmp = tmp_all[:, a0:a1, b0:b1, c0:c1]
        if acc is not None:
            np.multiply(src, wt[t].reshape(groups, cog), out=tmp)
            if cog == 1:
                acc[:, a0:a1, b0:b1, c0:c1] += tmp[..., 0]
            else:
                acc[:, a0:a1, b0:b1, c0:c1] += tmp.sum(axis=-1)
        if part is not None:
            np.multiply(src, xt[:, a0:a1, b0:b1, c0:c1], out=tmp)
            part[t] += tmp.sum(axis=(0, 1, 2, 3)).reshape(spec.c_out)
    if acc is not None:
        gx[n0:n1, d0:d1, h0:h1] = acc


def _vjp(ndim: int, input: ArrayLike, weight: ArrayLike, cotangent: ArrayLike,
         stride: IntOrTuple, padding: IntOrTuple, dilation: IntOrTuple,
         output_padding: IntOrTuple, groups: int) -> tuple[np.ndarray, np.ndarray]:
    op = _NAMES[ndim]
    spec, x, w = spec_for(ndim, input, weight, stride, padding, dilation, output_padding,
                          groups, op=op)
    cot = check_cotangent(op, spec, cotangent)
    return vjp_arrays(spec, x, w, cot)


def conv_transpose1d_vjp(input: ArrayLike, weight: ArrayLike, cotangent: ArrayLike, /,
                         stride: IntOrTuple = 1, padding: IntOrTuple = 0,
                         dilation: IntOrTuple = 1, output_padding: IntOrTuple = 0,
                         groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of `conv_transpose1d` for a cotangent shaped like its output.

    input (N, W, C_in), weight (C_out, kW, C_in/groups), cotangent (N, W_out, C_out).
    Returns (grad_input, grad_weight) with the dtypes of input and weight, as `mx.vjp`.
    """
    return _vjp(1, input, weight, cotangent, stride, padding, dilation, output_padding,
                groups)


def conv_transpose2d_vjp(input: ArrayLike, weight: ArrayLike, cotangent: ArrayLike, /,
                         stride: IntOrTuple = 1, padding: IntOrTuple = 0,
                         dilation: IntOrTuple = 1, output_padding: IntOrTuple = 0,
                         groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of `conv_transpose2d` for a cotangent shaped like its output.

    input (N, H, W, C_in), weight (C_out, kH, kW, C_in/groups), cotangent
    (N, H_out, W_out, C_out). Returns (grad_input, grad_weight) with the dtypes of input
    and weight, as `mx.vjp`.
    """
    return _vjp(2, input, weight, cotangent, stride, padding, dilation, output_padding,
                groups)


def conv_transpose3d_vjp(input: ArrayLike, weight: ArrayLike, cotangent: ArrayLike, /,
                         stride: IntOrTuple = 1, padding: IntOrTuple = 0,
                         dilation: IntOrTuple = 1, output_padding: IntOrTuple = 0,
                         groups: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Gradients of `conv_transpose3d` for a cotangent shaped like its output.

    input (N, D, H, W, C_in), weight (C_out, kD, kH, kW, C_in/groups), cotangent
    (N, D_out, H_out, W_out, C_out). Returns (grad_input, grad_weight): the
    vector-Jacobian product that `mx.vjp` and PyTorch autograd give, with the dtypes of
    input and weight. Accumulates in float32 at least (float64 if any array is float64).
    """
    return _vjp(3, input, weight, cotangent, stride, padding, dilation, output_padding,
                groups)
