"""The gradient's NumPy/BLAS paths: both gradients from one copy of the cotangent rows
each input row meets (see `_vjp` for the sums), tile by tile on worker threads.

- ``gather``: a tile of input rows copies, per tap, the cotangent rows it meets into one
  block (rows, taps * C_out/g); two GEMMs: grad_input tile = block @ W_stacked (K = taps *
  C_out/g) and grad_weight += block^T @ x_tile.
- ``shift``: the same GEMMs with a copy len(W taps) wide instead of len(taps): per (D, H)
  stride phase, the cotangent rows are laid out once (W taps side by side) on a grid with
  a halo, and every (D, H) tap of the phase is a fixed row shift of that grid.
- ``direct``: depthwise layers (one input channel per group) have no GEMM to speak of;
  they multiply-add per tap, broadcast over channels.
- ``indexed``: small calls (the forward's ``indexed`` sizes). Every (input row, tap)
  product of the forward feeds one output row or none, so the products' cotangent is one
  gather of cotangent rows, and each gradient one GEMM: no per-tap Python work.

Each worker owns its tiles by a fixed round-robin and its own grad_weight partial sum, and
partials are added in worker order: results are bitwise reproducible for a given thread
count. `PATHS` maps each name to its function.
"""

import functools
import itertools
import math
from dataclasses import dataclass

import numpy as np

from . import _native_kernel as native
from ._algorithms import VjpAlgorithm
from ._execute import _zero_outside, checkpoint, run_jobs
from ._geometry import ceil_div, tap_output_range
from ._plan import Tile, product_targets
from ._spec import ConvSpec
from ._vjp_tiles import input_tiles, sum_in_order

# Fewer rows than this per block and the GEMMs lose speed (each call packs the whole
# weight operand) and grad_weight's partial-sum updates grow; cut the taps into chunks.
MIN_BLOCK_ROWS = 512


@dataclass(frozen=True)
class KernelTap:
    """One 3-D kernel tap that reaches the output from at least one input position."""

    index: int  # flat index into the kernel, (kd, kh, kw) in C order
    shift: tuple[int, int, int]  # cotangent row o = i * s + shift, per axis
    lo: tuple[int, int, int]  # input range [lo, hi) whose rows land inside the output
    hi: tuple[int, int, int]


@functools.lru_cache(maxsize=256)
def active_taps(spec: ConvSpec) -> tuple[KernelTap, ...]:
    """Taps with a non-empty input range on every axis; the others have zero gradient.
    Cached per layer: a training loop asks again every step (60 us on W9's 27 taps)."""
    per_axis = []
    for n, kk, s, p, d, o in zip(spec.in_spatial, spec.kernel, spec.stride, spec.pad_lo,
                                 spec.dilation, spec.out_spatial):
        per_axis.append([(k, k * d - p, *tap_output_range(n, k, s, p, d, o))
                         for k in range(kk)])
    taps = []
    kd, kh, kw = spec.kernel
    for a, b, c in itertools.product(*per_axis):
        lo, hi = (a[2], b[2], c[2]), (a[3], b[3], c[3])
        if all(l_ < h_ for l_, h_ in zip(lo, hi)):
            taps.append(KernelTap((a[0] * kh + b[0]) * kw + c[0], (a[1], b[1], c[1]), lo, hi))
    return tuple(taps)


@dataclass(frozen=True)
class ShiftLayout:
    """Taps of the shift path: the W taps side by side in every grid row; the (D, H) taps
    grouped by stride phase, each a fixed row shift of its phase's grid."""

    wtaps: tuple  # (k, shift, lo, hi) per active W tap
    # ((rd, rh), min_row_d, min_row_h, ((tap_pair, row_d, row_h), ...)) per (D, H) phase:
    # tap (kd, kh) reads cotangent phase row i + row_d (and along H) for input row i
    phases: tuple
    tap_pairs: tuple  # (kd, kh) per tap pair index
    halo: tuple[int, int]  # extra grid planes along D, rows along H
    counts: tuple[dict, dict]  # cotangent rows per phase residue, along D and H


def _axis_taps(spec: ConvSpec, axis: int) -> list[tuple[int, int, int, int]]:
    n, kk, s, p, d, o = (spec.in_spatial[axis], spec.kernel[axis], spec.stride[axis],
                         spec.pad_lo[axis], spec.dilation[axis], spec.out_spatial[axis])
    taps = []
    for k in range(kk):
        lo, hi = tap_output_range(n, k, s, p, d, o)
        if lo < hi:
            taps.append((k, k * d - p, lo, hi))
    return taps


def shift_layout(spec: ConvSpec) -> ShiftLayout:
    (sd, sh, _), (od, oh, _) = spec.stride, spec.out_spatial
    by_phase = []
    for axis, s in ((0, sd), (1, sh)):
        by_residue: dict[int, list] = {}
        for k, shift, _, _ in _axis_taps(spec, axis):
            by_residue.setdefault(shift % s, []).append((k, shift // s))
        by_phase.append(by_residue)
    phases, tap_pairs = [], []
    halo_d = max(max(c for _, c in v) - min(c for _, c in v) for v in by_phase[0].values())
    halo_h = max(max(c for _, c in v) - min(c for _, c in v) for v in by_phase[1].values())
    for rd, dtaps in sorted(by_phase[0].items()):
        for rh, htaps in sorted(by_phase[1].items()):
            min_row_d, min_row_h = min(c for _, c in dtaps), min(c for _, c in htaps)
            members = []
            for (kd, row_d), (kh, row_h) in itertools.product(dtaps, htaps):
                members.append((len(tap_pairs), row_d, row_h))
                tap_pairs.append((kd, kh))
            phases.append(((rd, rh), min_row_d, min_row_h, tuple(members)))
    counts = tuple({r: ceil_div(o - r, s) for r in range(s)} for o, s in ((od, sd), (oh, sh)))
    return ShiftLayout(tuple(_axis_taps(spec, 2)), tuple(phases), tuple(tap_pairs),
                        (halo_d, halo_h), counts)


def shift_rows(spec: ConvSpec, layout: ShiftLayout, budget: int) -> int:
    """Input rows per shift tile: its grid, accumulator, temporary and input grid."""
    return max(1, budget // (len(layout.wtaps) * spec.c_out + 3 * spec.c_in))


def _tap_box(spec: ConvSpec, tap: KernelTap, tile: Tile):
    """Where tap reads inside the tile: the input box (absolute ranges per axis) and the
    same box relative to the tile; None if the tap reaches nothing there."""
    box = ((max(tap.lo[0], tile.d[0]), min(tap.hi[0], tile.d[1])),
           (max(tap.lo[1], tile.h[0]), min(tap.hi[1], tile.h[1])),
           (tap.lo[2], tap.hi[2]))
    if any(a >= b for a, b in box):
        return None
    rel = ((box[0][0] - tile.d[0], box[0][1] - tile.d[0]),
           (box[1][0] - tile.h[0], box[1][1] - tile.h[0]), box[2])
    return box, rel


def _cot_rows(spec: ConvSpec, tap: KernelTap, box, n: tuple[int, int], c3) -> np.ndarray:
    """The cotangent rows tap meets from the input box: o = i*s + shift per axis."""
    sl = tuple(slice(a * s + sh, (b - 1) * s + sh + 1, s)
               for (a, b), s, sh in zip(box, spec.stride, tap.shift))
    return c3[(slice(*n), *sl)]


def _rows(tile: Tile, spec: ConvSpec) -> int:
    return ((tile.n[1] - tile.n[0]) * (tile.d[1] - tile.d[0]) * (tile.h[1] - tile.h[0])
            * spec.in_spatial[2])


def _gather(spec, taps, x3, c3, w3, gx, gw, n_threads, budget, compute_dtype) -> None:
    """Gathered cotangent blocks -> GEMMs, one pass for both gradients.

    Workers own disjoint row tiles (so grad_input needs no locks) and one grad_weight
    partial sum each. A block holds every tap when that still leaves enough rows for
    efficient GEMMs; otherwise the taps are cut into chunks, processed chunk by chunk
    over the worker's rows: grad_input then adds the chunks up (cheap next to the GEMMs)
    and the chunk's slice of the grad_weight partial stays in cache while it is summed."""
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    ntap = len(taps)
    idx = [t.index for t in taps]
    total_rows = spec.batch * math.prod(spec.in_spatial)
    want_rows = min(MIN_BLOCK_ROWS, ceil_div(total_rows, n_threads))
    if budget // (ntap * spec.c_out) >= want_rows:
        chunk = ntap
        max_rows = budget // (ntap * spec.c_out)
    else:
        chunk = max(1, budget // (want_rows * spec.c_out))
        chunk = ceil_div(ntap, ceil_div(ntap, chunk))  # even chunks
        max_rows = budget // (chunk * spec.c_out)
    chunks = [(c0, min(ntap, c0 + chunk)) for c0 in range(0, ntap, chunk)]
    tiles = input_tiles(spec, max_rows, n_threads)
    workers = min(n_threads, len(tiles))
    wg = None
    if gx is not None:
        # (G, T * C_out/g, C_in/g): the active taps stacked as the grad_input GEMM operand.
        wg = w3[:, idx, :].reshape(groups, cog, ntap, cig).transpose(0, 2, 1, 3)
        wg = np.ascontiguousarray(wg.reshape(groups, ntap * cog, cig), dtype=compute_dtype)
    parts = [np.zeros((groups, ntap * cog, cig), compute_dtype) if gw is not None else None
             for _ in range(workers)]

    def job_for(j):
        def job():
            my_tiles = tiles[j::workers]
            rows = max(_rows(t, spec) for t in my_tiles)
            col = np.empty(rows * chunk * spec.c_out, compute_dtype)
            gx_tmp = np.empty(rows * spec.c_in, compute_dtype) if gx is not None else None
            gw_tmp = np.empty(groups * chunk * cog * cig, compute_dtype) if gw is not None else None
            for c0, c1 in chunks:
                wg_c = wg[:, c0 * cog:c1 * cog] if wg is not None else None
                for i, tile in enumerate(my_tiles):
                    checkpoint()
                    mat = _gather_block(spec, taps[c0:c1], tile, c3, col)
                    if gx is not None:
                        _grad_input_tile(spec, tile, mat, wg_c, gx, compute_dtype, c0 > 0, gx_tmp)
                    if gw is not None:
                        part = parts[j][:, c0 * cog:c1 * cog]
                        _grad_weight_tile(spec, tile, mat, x3, part, gw_tmp, i == 0, compute_dtype)
        return job

    run_jobs([job_for(j) for j in range(workers)], workers)
    if gw is not None:
        # (G, T * C_out/g, C_in/g) -> (C_out, T, C_in/g)
        total = sum_in_order(parts)
        blocks = total.reshape(groups, ntap, cog, cig).transpose(0, 2, 1, 3)
        gw[:, idx, :] = blocks.reshape(spec.c_out, ntap, cig)


def _gather_block(spec, taps, tile, c3, col) -> np.ndarray:
    """(G, rows, len(taps) * C_out/g): for each input row of the tile, the cotangent rows
    its taps meet (zero where a tap lands outside the output).

    The compiled kernel's `gather_cotangent` fills it where there is one and the
    cotangent is C-contiguous in the block's dtype. NumPy's copy, per tap, otherwise: with
    one output channel per group a row-major block would be written one scattered element
    at a time, so it is then stored tap-major (a transposed view is returned, which BLAS
    reads as well)."""
    groups, cog = spec.groups, spec.c_out_per_group
    n0, n1 = tile.n
    nw = spec.in_spatial[2]
    nn, nd, nh = n1 - n0, tile.d[1] - tile.d[0], tile.h[1] - tile.h[0]
    rows = nn * nd * nh * nw
    ntap = len(taps)
    if native.AVAILABLE and c3.dtype == col.dtype and c3.flags.c_contiguous:
        block = col[:rows * ntap * spec.c_out]
        native.gather_cotangent(c3, block, _gather_geometry(spec),
                                _tap_shifts(taps), np.array([n0, n1, *tile.d, *tile.h], np.int64))
        return block.reshape(groups, rows, ntap * cog)
    tap_major = cog == 1
    if tap_major:
        block = col[:rows * ntap * spec.c_out].reshape(groups, ntap, nn, nd, nh, nw, 1)
    else:
        block = col[:rows * ntap * spec.c_out].reshape(groups, nn, nd, nh, nw, ntap, cog)
    for t, tap in enumerate(taps):
        dst = block[:, t] if tap_major else block[:, :, :, :, :, t, :]
        found = _tap_box(spec, tap, tile)
        if found is None:
            dst.fill(0)
            continue
        box, rel = found
        if rel != ((0, nd), (0, nh), (0, nw)):
            _zero_outside(dst, rel)
        (a0, a1), (b0, b1), (c0, c1) = rel
        src = _cot_rows(spec, tap, box, tile.n, c3)
        if groups == 1:
            dst[0, :, a0:a1, b0:b1, c0:c1, :] = src
        else:
            src = src.reshape(*src.shape[:-1], groups, cog)
            dst[:, :, a0:a1, b0:b1, c0:c1, :] = np.moveaxis(src, -2, 0)
    if tap_major:
        return block.reshape(groups, ntap, rows).transpose(0, 2, 1)
    return block.reshape(groups, rows, ntap * cog)


@functools.lru_cache(maxsize=64)
def _gather_geometry(spec: ConvSpec) -> np.ndarray:
    return np.array([spec.batch, *spec.out_spatial, *spec.in_spatial, *spec.stride,
                     spec.groups, spec.c_out_per_group], np.int64)


@functools.lru_cache(maxsize=64)
def _tap_shifts(taps: tuple[KernelTap, ...]) -> np.ndarray:
    return np.array([t.shift for t in taps], np.int64).reshape(len(taps), 3)


def _grad_input_tile(spec, tile, mat, wg, gx, compute_dtype, accumulate, tmp) -> None:
    """grad_input tile (=, or += for later tap chunks) block @ W_stacked."""
    groups, cig = spec.groups, spec.c_in_per_group
    rows = mat.shape[1]
    n0, n1 = tile.n
    # The tile is a contiguous block of gx (whole along W, and along H when D is split).
    target = gx[n0:n1, tile.d[0]:tile.d[1], tile.h[0]:tile.h[1]].reshape(rows, groups, cig)
    if groups == 1 and not accumulate:
        np.matmul(mat[0], wg[0], out=target[:, 0, :])
        return
    res = tmp[:rows * spec.c_in].reshape(groups, rows, cig)
    np.matmul(mat, wg, out=res)
    if accumulate:
        target += np.moveaxis(res, 0, 1)
    else:
        target[...] = np.moveaxis(res, 0, 1)


def _grad_weight_tile(spec, tile, mat, x3, part, tmp, first, compute_dtype) -> None:
    """part (G, T * C_out/g, C_in/g) (=, or +=) block^T @ x_tile."""
    groups, cig = spec.groups, spec.c_in_per_group
    rows = mat.shape[1]
    n0, n1 = tile.n
    xt = x3[n0:n1, tile.d[0]:tile.d[1], tile.h[0]:tile.h[1]].reshape(rows, groups, cig)
    xt = xt.astype(compute_dtype, copy=False).transpose(1, 0, 2)  # (G, rows, C_in/g)
    # block^T @ x rather than x^T @ block: the same numbers, transposed, but with the long
    # (taps * C_out) side as BLAS's M it ran about twice as fast here.
    mat_t = mat.transpose(0, 2, 1)  # a BLAS-ready transposed view
    if first:
        np.matmul(mat_t, xt, out=part)
    else:
        res = tmp[:part.size].reshape(part.shape)
        np.matmul(mat_t, xt, out=res)
        part += res


def _shift(spec, taps, x3, c3, w3, gx, gw, n_threads, budget, compute_dtype) -> None:
    """Shifted GEMMs over a gathered grid (the cotangent rows of one (D, H) stride phase,
    W taps side by side): each (D, H) tap of the phase reads the grid at a fixed row
    shift, so the copy is len(W taps) wide instead of len(taps). grad_input adds up one
    GEMM per (D, H) tap (in cache-sized tiles); grad_weight gets one GEMM per (D, H) tap
    against the input laid out on the grid's row pitch (zeros where the grid has halo)."""
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    layout = shift_layout(spec)
    tw, n_tap_pairs = len(layout.wtaps), len(layout.tap_pairs)
    kd_, kh_, kw_ = spec.kernel
    tiles = input_tiles(spec, shift_rows(spec, layout, budget), n_threads)
    workers = min(n_threads, len(tiles))
    # (G, tap pairs, T_w * C_out/g, C_in/g): the grad_input weights of each (D, H) tap.
    flat = [[(kd * kh_ + kh) * kw_ + k for k, _, _, _ in layout.wtaps]
            for kd, kh in layout.tap_pairs]
    wp = None
    if gx is not None:
        wp = w3[:, np.array(flat).ravel(), :].reshape(groups, cog, n_tap_pairs, tw, cig)
        wp = np.ascontiguousarray(wp.transpose(0, 2, 3, 1, 4).reshape(
            groups, n_tap_pairs, tw * cog, cig), dtype=compute_dtype)
    parts = [np.zeros((groups, n_tap_pairs, tw * cog, cig), compute_dtype)
             if gw is not None else None for _ in range(workers)]
    halo_d, halo_h = layout.halo
    nw = spec.in_spatial[2]

    def grid_rows(tile):
        nn, nd, nh = tile.n[1] - tile.n[0], tile.d[1] - tile.d[0], tile.h[1] - tile.h[0]
        return nn * (nd + halo_d) * (nh + halo_h) * nw

    def job_for(j):
        def job():
            my_tiles = tiles[j::workers]
            most = max(grid_rows(t) for t in my_tiles)
            gbuf = np.empty(most * tw * spec.c_out, compute_dtype)
            acc = np.empty(most * spec.c_in, compute_dtype) if gx is not None else None
            tmp = np.empty(most * spec.c_in, compute_dtype) if gx is not None else None
            xbuf = np.empty(most * spec.c_in, compute_dtype) if gw is not None else None
            wtmp = np.empty(groups * tw * cog * cig, compute_dtype) if gw is not None else None
            for i, tile in enumerate(my_tiles):
                checkpoint()
                _shift_tile(spec, layout, tile, x3, c3, wp, gx, parts[j], i == 0,
                            (gbuf, acc, tmp, xbuf, wtmp))
        return job

    run_jobs([job_for(j) for j in range(workers)], workers)
    if gw is not None:
        total = sum_in_order(parts).reshape(groups, n_tap_pairs, tw, cog, cig)
        blocks = total.transpose(0, 3, 1, 2, 4).reshape(spec.c_out, n_tap_pairs * tw, cig)
        gw[:, np.array(flat).ravel(), :] = blocks


def _shift_tile(spec, layout, tile, x3, c3, wp, gx, part, first, bufs) -> None:
    gbuf, accbuf, tmpbuf, xbuf, wtmp = bufs
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    tw = len(layout.wtaps)
    n0, n1 = tile.n
    d0, d1 = tile.d
    h0, h1 = tile.h
    nn, nd, nh, nw = n1 - n0, d1 - d0, h1 - h0, spec.in_spatial[2]
    dn, hn = nd + layout.halo[0], nh + layout.halo[1]
    plane = hn * nw
    rows = nn * dn * plane
    # Grid rows whose results are kept: (b, a < nd, c < nh, w) -> ((b*dn + a)*hn + c)*nw + w.
    length = ((nn - 1) * dn + nd - 1) * plane + nh * nw
    sd, sh, sw = spec.stride
    grid = gbuf[:rows * tw * spec.c_out].reshape(groups, nn, dn, hn, nw, tw, cog)
    gmat = grid.reshape(groups, rows, tw * cog)
    acc = tmp = xg = None
    if gx is not None:
        acc = accbuf[:rows * spec.c_in].reshape(groups, rows, cig)
        tmp = tmpbuf[:rows * spec.c_in].reshape(groups, rows, cig)
    if part is not None:
        xgrid = xbuf[:rows * spec.c_in].reshape(nn, dn, hn, nw, spec.c_in)
        xgrid[:, :nd, :nh] = x3[n0:n1, d0:d1, h0:h1]
        xgrid[:, nd:] = 0
        xgrid[:, :nd, nh:] = 0
        xg = xgrid.reshape(rows, groups, cig)[:length].transpose(1, 0, 2)  # (G, len, C_in/g)
        wres = wtmp.reshape(groups, tw * cog, cig)
    started = False
    for (rd, rh), min_row_d, min_row_h, members in layout.phases:
        # The grid covers cotangent phase rows q = (d0 + min_row_d) + [0, dn) (and along H).
        qd0, qh0 = d0 + min_row_d, h0 + min_row_h
        vd = (max(qd0, 0), min(qd0 + dn, layout.counts[0][rd]))
        vh = (max(qh0, 0), min(qh0 + hn, layout.counts[1][rh]))
        for t, (_, shift_w, lo, hi) in enumerate(layout.wtaps):
            dst = grid[:, :, :, :, :, t, :]
            rel = ((vd[0] - qd0, vd[1] - qd0), (vh[0] - qh0, vh[1] - qh0), (lo, hi))
            if any(a >= b for a, b in rel):
                dst.fill(0)
                continue
            if rel != ((0, dn), (0, hn), (0, nw)):
                _zero_outside(dst, rel)
            src = c3[n0:n1, vd[0] * sd + rd:(vd[1] - 1) * sd + rd + 1:sd,
                     vh[0] * sh + rh:(vh[1] - 1) * sh + rh + 1:sh,
                     lo * sw + shift_w:(hi - 1) * sw + shift_w + 1:sw, :]
            (a0, a1), (b0, b1), _ = rel
            if groups == 1:
                dst[0, :, a0:a1, b0:b1, lo:hi, :] = src
            else:
                src = src.reshape(*src.shape[:-1], groups, cog)
                dst[:, :, a0:a1, b0:b1, lo:hi, :] = np.moveaxis(src, -2, 0)
        for tap_pair, row_d, row_h in members:
            shift = ((row_d - min_row_d) * hn + (row_h - min_row_h)) * nw
            a = gmat[:, shift:shift + length]
            if acc is not None:
                if not started:
                    np.matmul(a, wp[:, tap_pair], out=acc[:, :length])
                else:
                    np.matmul(a, wp[:, tap_pair], out=tmp[:, :length])
                    acc[:, :length] += tmp[:, :length]
            if part is not None:
                if first:
                    np.matmul(a.transpose(0, 2, 1), xg, out=part[:, tap_pair])
                else:
                    np.matmul(a.transpose(0, 2, 1), xg, out=wres)
                    part[:, tap_pair] += wres
            started = True
    if gx is not None:
        res = acc.reshape(groups, nn, dn, hn, nw, cig)[:, :, :nd, :nh]
        target = gx[n0:n1, d0:d1, h0:h1]
        if groups == 1:
            target[...] = res[0]
        else:
            target.reshape(nn, nd, nh, nw, groups, cig)[...] = np.moveaxis(res, 0, -2)


def _direct(spec, taps, x3, c3, w3, gx, gw, n_threads, budget, compute_dtype) -> None:
    """Depthwise: tiles of rows, each worker with its own (taps, C_out) partial."""
    ntap = len(taps)
    tiles = input_tiles(spec, budget // (2 * spec.c_out), n_threads)
    workers = min(n_threads, len(tiles))
    parts = [np.zeros((ntap, spec.c_out), compute_dtype) if gw is not None else None
             for _ in range(workers)]
    # (T, C_out)
    wt = np.ascontiguousarray(w3[:, [t.index for t in taps], 0].T.astype(compute_dtype))

    def job_for(j):
        def job():
            buf = np.empty(2 * max(_rows(t, spec) for t in tiles) * spec.c_out, compute_dtype)
            for tile in tiles[j::workers]:
                checkpoint()
                _direct_tile(spec, taps, tile, x3, c3, wt, gx, parts[j], buf)
        return job

    run_jobs([job_for(j) for j in range(workers)], workers)
    if gw is not None:
        gw[:, [t.index for t in taps], 0] = sum_in_order(parts).T


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
    # einsum's one-pass sum of products is about 3x faster than multiply-then-sum here;
    # it needs operands already in the compute dtype.
    fused = c3.dtype == tmp_all.dtype and x3.dtype == tmp_all.dtype
    for t, tap in enumerate(taps):
        found = _tap_box(spec, tap, tile)
        if found is None:
            continue
        box, ((a0, a1), (b0, b1), (c0, c1)) = found
        src = _cot_rows(spec, tap, box, tile.n, c3)
        src = src.reshape(*src.shape[:-1], groups, cog)
        tmp = tmp_all[:, a0:a1, b0:b1, c0:c1]
        if acc is not None:
            np.multiply(src, wt[t].reshape(groups, cog), out=tmp)
            if cog == 1:
                acc[:, a0:a1, b0:b1, c0:c1] += tmp[..., 0]
            else:
                acc[:, a0:a1, b0:b1, c0:c1] += tmp.sum(axis=-1)
        if part is not None and fused:
            part[t] += np.einsum("ndhwgm,ndhwg->gm", src,
                                 xt[:, a0:a1, b0:b1, c0:c1, :, 0]).reshape(spec.c_out)
        elif part is not None:
            np.multiply(src, xt[:, a0:a1, b0:b1, c0:c1], out=tmp)
            part[t] += tmp.sum(axis=(0, 1, 2, 3)).reshape(spec.c_out)
    if acc is not None:
        gx[n0:n1, d0:d1, h0:h1] = acc


@functools.lru_cache(maxsize=64)
def _product_targets(spec: ConvSpec) -> np.ndarray:
    return product_targets(spec)  # the same small call repeats: built once per layer


def _indexed(spec, taps, x3, c3, w3, gx, gw, n_threads, budget, compute_dtype) -> None:
    """The forward's ``indexed`` algorithm, differentiated: products[(r, t)] = x[r] @
    W[:, t]^T are each added into one output row or none, so their cotangent is the
    cotangent's rows gathered (a zero row for none); then grad_input = that @ W stacked
    over (tap, C_out) and grad_weight = its transpose @ x, per group."""
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    ktot = math.prod(spec.kernel)
    rows_in = x3.size // spec.c_in
    rows_out = c3.size // spec.c_out
    padded = np.empty((rows_out + 1, spec.c_out), compute_dtype)
    padded[:rows_out] = c3.reshape(rows_out, spec.c_out)
    padded[rows_out] = 0
    dprod = np.take(padded, _product_targets(spec), axis=0)  # (rows_in * taps, C_out)
    dprod = dprod.reshape(rows_in, ktot, groups, cog).transpose(2, 0, 1, 3).reshape(
        groups, rows_in, ktot * cog)
    if gx is not None:
        wg = (w3.astype(compute_dtype, copy=False).reshape(groups, cog, ktot, cig)
              .transpose(0, 2, 1, 3))
        gxg = np.matmul(dprod, wg.reshape(groups, ktot * cog, cig))  # (G, rows_in, C_in/g)
        gx.reshape(rows_in, groups, cig)[...] = gxg.transpose(1, 0, 2)
    if gw is not None:
        xg = x3.reshape(rows_in, groups, cig).astype(compute_dtype, copy=False).transpose(1, 0, 2)
        gwg = np.matmul(dprod.transpose(0, 2, 1), xg)  # (G, taps * C_out/g, C_in/g)
        gw.reshape(groups, cog, ktot, cig)[...] = gwg.reshape(
            groups, ktot, cog, cig).transpose(0, 2, 1, 3)


# The paths by name (`_plan.GEMM_ALGORITHMS`).
PATHS = {VjpAlgorithm.GATHER: _gather, VjpAlgorithm.SHIFT: _shift,
         VjpAlgorithm.DIRECT: _direct, VjpAlgorithm.INDEXED: _indexed}
