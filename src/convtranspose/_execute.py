"""Plan -> result: the kernels. Each one is a NumPy/BLAS call on a tile.

Every kernel reads the caller's arrays and writes only into the output and into its own
workspace buffers: the caller's arrays are never modified.
"""

from __future__ import annotations

import queue
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ._geometry import AxisTap, Phase, tap_output_range
from ._plan import Plan, Tile, split_tiles

_pools: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    if threads not in _pools:
        _pools[threads] = ThreadPoolExecutor(max_workers=threads,
                                             thread_name_prefix="convtranspose")
    return _pools[threads]


def _run_tasks(tasks: list, threads: int, buffer_elems: int, dtype: np.dtype) -> None:
    """Run `task(buffer)` for each task, on `threads` workers, each with its own buffer.

    Tasks write disjoint parts of the output, so their order does not change any bit of
    the result."""
    if not tasks:
        return
    workers = min(threads, len(tasks))
    if workers == 1:
        buf = np.empty(buffer_elems, dtype)
        for task in tasks:
            task(buf)
        return
    buffers: queue.SimpleQueue = queue.SimpleQueue()
    for _ in range(workers):
        buffers.put(np.empty(buffer_elems, dtype))

    def run(task):
        buf = buffers.get()
        try:
            task(buf)
        finally:
            buffers.put(buf)

    for future in [_pool(workers).submit(run, t) for t in tasks]:
        future.result()


def _strided(residue: int, stride: int, start: int, stop: int) -> slice:
    """Output positions residue + stride*q for q in [start, stop)."""
    first = residue + stride * start
    return slice(first, first + stride * (stop - start - 1) + 1, stride)


def _clip(tap: AxisTap, lo: int, hi: int) -> tuple[int, int]:
    return max(lo, tap.lo), min(hi, tap.hi)


def _tap_weights(w3: np.ndarray, phase: Phase, groups: int) -> np.ndarray:
    """(groups, taps * C_in/g, C_out/g): the phase's taps stacked as one GEMM operand."""
    c_out = w3.shape[0]
    blocks = [w3[:, td.k, th.k, tw.k, :] for td, th, tw in phase.taps]  # (C_out, C_in_g) each
    stacked = np.stack(blocks, axis=0)  # (T, C_out, C_in_g)
    t, _, cig = stacked.shape
    stacked = stacked.reshape(t, groups, c_out // groups, cig).transpose(1, 0, 3, 2)
    return np.ascontiguousarray(stacked.reshape(groups, t * cig, c_out // groups))


def _tile_ranges(tile: Tile, tap) -> tuple[tuple[int, int], ...] | None:
    """The part of a tile where this 3-tap reads inside the input (None if empty)."""
    ranges = (_clip(tap[0], *tile.d), _clip(tap[1], *tile.h), (tap[2].lo, tap[2].hi))
    if any(lo >= hi for lo, hi in ranges):
        return None
    return ranges


def _gather_task(plan: Plan, x3, out, phase: Phase, wmat, tile: Tile):
    spec = plan.spec
    groups, cig = spec.groups, spec.c_in_per_group
    cog = spec.c_out_per_group
    taps = phase.taps
    n0, n1 = tile.n
    d0, d1 = tile.d
    h0, h1 = tile.h
    qw = phase.count[2]
    nn, nd, nh = n1 - n0, d1 - d0, h1 - h0
    rows = nn * nd * nh * qw
    sd, sh, sw = spec.stride
    rd, rh, rw = phase.residue
    out_view = out[n0:n1, _strided(rd, sd, d0, d1), _strided(rh, sh, h0, h1),
                   _strided(rw, sw, 0, qw), :]

    def task(buf):
        full = (tile.d, tile.h, (0, qw))
        if len(taps) == 1 and groups == 1:
            (td, th, tw), = taps
            ranges = _tile_ranges(tile, taps[0])
            if ranges == full:
                src = x3[n0:n1, d0 + td.offset:d1 + td.offset, h0 + th.offset:h1 + th.offset,
                         tw.offset:qw + tw.offset, :]
                a = src.reshape(rows, spec.c_in).astype(spec.compute_dtype, copy=False)
                res = np.matmul(a, wmat[0])
                out_view[...] = res.reshape(nn, nd, nh, qw, spec.c_out)
                return
        ntap = len(taps)
        col = buf[:rows * ntap * spec.c_in].reshape(groups, nn, nd, nh, qw, ntap, cig)
        for t, tap in enumerate(taps):
            dst = col[:, :, :, :, :, t, :]
            ranges = _tile_ranges(tile, tap)
            if ranges != full:
                dst.fill(0)
            if ranges is None:
                continue
            (a0, a1), (b0, b1), (c0, c1) = ranges
            src = x3[n0:n1, a0 + tap[0].offset:a1 + tap[0].offset,
                     b0 + tap[1].offset:b1 + tap[1].offset,
                     c0 + tap[2].offset:c1 + tap[2].offset, :]
            src = src.reshape(*src.shape[:-1], groups, cig)
            dst[:, :, a0 - d0:a1 - d0, b0 - h0:b1 - h0, c0:c1, :] = np.moveaxis(src, -2, 0)
        res = np.matmul(col.reshape(groups, rows, ntap * cig), wmat)  # (G, rows, C_out/g)
        res = res.reshape(groups, nn, nd, nh, qw, cog)
        out_view.reshape(nn, nd, nh, qw, groups, cog)[...] = np.moveaxis(res, 0, -2)

    return task


def _direct_task(plan: Plan, x3, w3, out, phase: Phase, tile: Tile):
    """Depthwise / channel multiplier: C_in/g == 1, so each tap is a broadcast multiply-add."""
    spec = plan.spec
    groups, mult = spec.groups, spec.c_out_per_group
    n0, n1 = tile.n
    d0, d1 = tile.d
    h0, h1 = tile.h
    qw = phase.count[2]
    nn, nd, nh = n1 - n0, d1 - d0, h1 - h0
    size = nn * nd * nh * qw * spec.c_out
    sd, sh, sw = spec.stride
    rd, rh, rw = phase.residue
    out_view = out[n0:n1, _strided(rd, sd, d0, d1), _strided(rh, sh, h0, h1),
                   _strided(rw, sw, 0, qw), :]
    tap_w = [w3[:, td.k, th.k, tw.k, 0].reshape(groups, mult) for td, th, tw in phase.taps]

    def task(buf):
        acc = buf[:size].reshape(nn, nd, nh, qw, groups, mult)
        tmp = buf[size:2 * size].reshape(acc.shape)
        acc.fill(0)
        for tap, wt in zip(phase.taps, tap_w):
            ranges = _tile_ranges(tile, tap)
            if ranges is None:
                continue
            (a0, a1), (b0, b1), (c0, c1) = ranges
            src = x3[n0:n1, a0 + tap[0].offset:a1 + tap[0].offset,
                     b0 + tap[1].offset:b1 + tap[1].offset,
                     c0 + tap[2].offset:c1 + tap[2].offset, :]
            src = src.reshape(*src.shape[:-1], groups, 1)
            part = (slice(None), slice(a0 - d0, a1 - d0), slice(b0 - h0, b1 - h0),
                    slice(c0, c1))
            t = tmp[part]
            np.multiply(src, wt, out=t)
            acc[part] += t
        out_view[...] = acc.reshape(nn, nd, nh, qw, spec.c_out)

    return task


def _scatter(plan: Plan, x3, w3, out) -> None:
    """One GEMM against all taps per input tile, then strided adds into the output.

    Tiles overlap in the output, so they run one after another (BLAS still uses every
    core inside each GEMM); the fixed order keeps results bitwise reproducible."""
    spec = plan.spec
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    kd, kh, kw = spec.kernel
    ktot = kd * kh * kw
    # (G, C_in/g, taps * C_out/g)
    wall = w3.reshape(groups, cog, ktot, cig).transpose(0, 3, 2, 1).reshape(groups, cig,
                                                                              ktot * cog)
    wall = np.ascontiguousarray(wall)
    ranges = [
        [tap_output_range(n, k, s, p, d, o) for k in range(kk)]
        for n, kk, s, p, d, o in zip(spec.in_spatial, spec.kernel, spec.stride, spec.padding,
                                     spec.dilation, spec.out_spatial)
    ]
    di, hi, wi = spec.in_spatial
    acc = out if out.dtype == spec.compute_dtype else np.zeros(out.shape, spec.compute_dtype)
    for tile in split_tiles(spec.batch, (di, hi, wi), plan.tile_rows):
        n0, n1 = tile.n
        d0, d1 = tile.d
        h0, h1 = tile.h
        xt = x3[n0:n1, d0:d1, h0:h1]
        rows = xt.shape[0] * xt.shape[1] * xt.shape[2] * wi
        a = xt.reshape(rows, groups, cig).astype(spec.compute_dtype, copy=False)
        y = np.matmul(np.moveaxis(a, 1, 0), wall)  # (G, rows, taps * C_out/g)
        y = y.reshape(groups, n1 - n0, d1 - d0, h1 - h0, wi, kd, kh, kw, cog)
        for a_ in range(kd):
            dl, dh = max(ranges[0][a_][0], d0), min(ranges[0][a_][1], d1)
            if dl >= dh:
                continue
            for b_ in range(kh):
                hl, hh = max(ranges[1][b_][0], h0), min(ranges[1][b_][1], h1)
                if hl >= hh:
                    continue
                for c_ in range(kw):
                    wl, wh = ranges[2][c_]
                    if wl >= wh:
                        continue
                    o = [i * s + k * dd - p for i, k, s, dd, p in
                         zip((dl, hl, wl), (a_, b_, c_), spec.stride, spec.dilation,
                             spec.padding)]
                    counts = (dh - dl, hh - hl, wh - wl)
                    sl = [slice(o_, o_ + s * (c - 1) + 1, s)
                          for o_, c, s in zip(o, counts, spec.stride)]
                    target = acc[n0:n1, sl[0], sl[1], sl[2], :]
                    target = target.reshape(*target.shape[:-1], groups, cog)
                    block = y[:, :, dl - d0:dh - d0, hl - h0:hh - h0, wl:wh, a_, b_, c_, :]
                    target += np.moveaxis(block, 0, -2)
    if acc is not out:
        out[...] = acc


def execute(plan: Plan, x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """Run a plan on arrays that match its spec; returns a new C-contiguous array."""
    spec = plan.spec
    out = np.zeros((spec.batch, *spec.out_spatial, spec.c_out), spec.result_dtype)
    if spec.batch == 0:
        return out.reshape(spec.output_shape)
    x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
    w3 = w.reshape(spec.c_out, *spec.kernel, spec.c_in_per_group).astype(spec.compute_dtype)
    if plan.algorithm == "scatter":
        _scatter(plan, x3, w3, out)
        return out.reshape(spec.output_shape)

    tasks = []
    buffer_elems = 0
    for phase in plan.phases:
        if not phase.taps or phase.size == 0:
            continue  # phases no tap reaches stay zero
        tiles = split_tiles(spec.batch, phase.count, plan.tile_rows, min_tiles=plan.threads)
        if plan.algorithm == "gather":
            wmat = _tap_weights(w3, phase, spec.groups)
            for tile in tiles:
                tasks.append(_gather_task(plan, x3, out, phase, wmat, tile))
            widest = max(_rows(t, phase) for t in tiles)
            buffer_elems = max(buffer_elems, widest * len(phase.taps) * spec.c_in)
        else:
            for tile in tiles:
                tasks.append(_direct_task(plan, x3, w3, out, phase, tile))
            widest = max(_rows(t, phase) for t in tiles)
            buffer_elems = max(buffer_elems, 2 * widest * spec.c_out)
    _run_tasks(tasks, plan.threads, buffer_elems, spec.compute_dtype)
    return out.reshape(spec.output_shape)


def _rows(tile: Tile, phase: Phase) -> int:
    return ((tile.n[1] - tile.n[0]) * (tile.d[1] - tile.d[0]) * (tile.h[1] - tile.h[0])
            * phase.count[2])

