"""Plan -> result: the kernels. Each task is a few NumPy/BLAS calls on one output tile.

Every kernel reads the caller's arrays and writes only into the output and its own
workspace buffer: the caller's arrays are never modified.
"""

from __future__ import annotations

import contextlib
import functools
import math
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import NamedTuple

import numpy as np

from . import _native_kernel as native
from ._algorithms import Algorithm
from ._blas import single_threaded_blas
from ._geometry import PHANTOM, Phase, ceil_div, phases_3d
from ._memory import Scratch, result_empty, result_zeros
from ._plan import (
    InputSlab,
    Plan,
    Task,
    Tile,
    bordered_slab,
    expands_to_depthwise,
    finite_plan,
    make_tasks,
    native_input_box,
    native_mode,
    native_whole_input_fits,
    pair_base,
    pair_count,
    planar_chunk,
    planar_geometry,
    registry,
    streams_output,
)

_pools: dict[int, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()  # callers may be threads themselves (dask workers)


def _pool(threads: int) -> ThreadPoolExecutor:
    with _pools_lock:
        if threads not in _pools:
            _pools[threads] = ThreadPoolExecutor(max_workers=threads,
                                                 thread_name_prefix="convtranspose")
        return _pools[threads]


class Shared:
    """A job that more threads may join while it runs: `fn` divides its work among the
    calls in flight (the kernel's shared row cursor), each returning once all of it is
    taken."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable) -> None:
        self.fn = fn


def run_jobs(jobs: list, threads: int,
             make_buffer: Callable[[], np.ndarray] | None = None) -> None:
    """Run every job on up to `threads` threads: the caller's and pool workers, each taking
    the next job as it finishes one. A thread that finds none left joins a `Shared` job
    still running, so that the call ends with every thread busy (a fixed cut into jobs
    left one thread idle for up to a job at the end: about 0.5 ms of W5's 10). With
    `make_buffer`, each thread makes one buffer and calls job(buffer); else job().

    Jobs that are all `native.Task`s run on the compiled pool instead (csrc/pool.hpp): the
    same sharing, without a Python thread waiting for the GIL at each start and end.

    Jobs write disjoint blocks of the output, so who runs what changes no bit of the
    result. The caller works too, rather than waiting: a pool worker takes ~0.1 ms to
    wake, all of it idle time at the start of a call. Every GEMM runs on one BLAS thread:
    our threads are the parallelism, and BLAS threads that busy-wait collapse when the
    machine is shared (W6 went from 4 ms to 48 ms with a second process running, W4 from
    51 ms to 734 ms).

    Once a thread raises (Ctrl-C: see `checkpoint`), the others take no further job and
    leave the one they run at its next `checkpoint`; the call raises once all have left."""
    lock = threading.Lock()
    position = 0
    running: list[Shared] = []  # shared jobs that may have work left to take

    def next_job(finished: Shared | None = None):
        nonlocal position
        with lock:
            if run.stopped:
                return None
            if finished in running:
                running.remove(finished)  # a call returned: all of its work is taken
            if position < len(jobs):
                job = jobs[position]
                position += 1
                if isinstance(job, Shared):
                    running.append(job)
                return job
            return running[0] if running else None

    def drain() -> None:
        outer = getattr(_local, "run", None)
        _local.run = run
        try:
            buffer = make_buffer() if make_buffer is not None else None
            job = next_job()
            while job is not None:
                shared = isinstance(job, Shared)
                fn = job.fn if shared else job
                if buffer is None:
                    fn()
                else:
                    fn(buffer)
                checkpoint()
                job = next_job(job if shared else None)
        except _Stopped:
            pass  # another thread raised: that is the call's error
        except BaseException:
            run.stopped = True
            raise
        finally:
            _local.run = outer

    if jobs and all(isinstance(job, native.Task) for job in jobs):
        native.run_tasks(jobs, threads)  # the compiled pool: no GIL to hand over
        return
    run = _Run(native.interrupt_mark())
    jobs = [_python_job(job) if isinstance(job, native.Task) else job for job in jobs]
    sharing = any(isinstance(job, Shared) for job in jobs)
    helpers = (threads if sharing else min(threads, len(jobs))) - 1
    with single_threaded_blas():
        futures = [_pool(helpers).submit(drain) for _ in range(helpers)]
        try:
            drain()
        finally:
            # Every worker has left before the call returns or raises (its own error first).
            errors = [future.exception() for future in futures]
        for error in errors:
            if error is not None:
                raise error


class _Stopped(Exception):
    """Raised by `checkpoint` in a thread whose run_jobs call is stopping."""


class _Run:
    """One run_jobs call: whether it is stopping, and the count of SIGINTs at its start."""

    __slots__ = ("stopped", "mark")

    def __init__(self, mark: int) -> None:
        self.stopped = False
        self.mark = mark


_local = threading.local()  # .run: the run_jobs call this thread works for


def checkpoint() -> None:
    """Between the tiles of a long job: leave the job where its run_jobs call is stopping
    (another of its threads raised), or raise KeyboardInterrupt where Ctrl-C is to stop
    this call (see `native.check_interrupt`; the main thread's KeyboardInterrupt arrives by
    itself)."""
    run = getattr(_local, "run", None)
    if run is None:
        return
    if run.stopped:
        raise _Stopped
    run.mark = native.check_interrupt(run.mark)


def _python_job(task: native.Task) -> Callable | Shared:
    """A compiled-pool task as a job of run_jobs' Python threads (mixed with jobs that are
    Python code), taking a buffer it does not use."""
    def job(*_) -> None:
        task.run_here()
    return Shared(job) if task.shared else job


def _run(jobs: list, threads: int, buffer_elems: int, dtype: np.dtype) -> None:
    """run_jobs with a scratch buffer of `buffer_elems` per thread."""
    run_jobs(jobs, threads, lambda: np.empty(buffer_elems, dtype))


def _strided(residue: int, stride: int, start: int, stop: int) -> slice:
    """Output positions residue + stride*q for q in [start, stop)."""
    first = residue + stride * start
    return slice(first, first + stride * (stop - start - 1) + 1, stride)


def _out_view(out, spec, phase: Phase, task: Task):
    """The tile's positions of one phase in the output: (nn, nd, nh, qw, C_out)."""
    t = task.tile
    (sd, sh, sw), (rd, rh, rw) = spec.stride, phase.residue
    return out[t.n[0]:t.n[1], _strided(rd, sd, *t.d), _strided(rh, sh, *t.h),
               _strided(rw, sw, 0, phase.count[2]), :]


def _store(view, res, groups: int) -> None:
    """view (..., C_out) <- res (G, ..., C_out/g)."""
    if groups == 1:
        view[...] = res[0]
    else:
        view.reshape(*view.shape[:-1], groups, res.shape[-1])[...] = np.moveaxis(res, 0, -2)


def _zero_outside(block: np.ndarray, valid: tuple[tuple[int, int], ...]) -> None:
    """Zero every element of `block` (axes ..., D, H, W, C) outside the box `valid`."""
    lead = (slice(None),) * (block.ndim - 4)
    inner: tuple = ()
    for axis, (lo, hi) in enumerate(valid):
        size = block.shape[block.ndim - 4 + axis]
        if lo >= hi:
            block[lead + inner] = 0
            return
        if lo > 0:
            block[lead + inner + (slice(0, lo),)] = 0
        if hi < size:
            block[lead + inner + (slice(hi, size),)] = 0
        inner += (slice(lo, hi),)


def _fill_bordered(slab: np.ndarray, x3: np.ndarray, n: tuple[int, int],
                   first: tuple[int, int, int]) -> None:
    """slab (nn, D, H, W, C) <- the input from position `first` on, zeros outside it."""
    valid = tuple((max(0, -st), min(ext, size - st))
                  for st, ext, size in zip(first, slab.shape[1:4], x3.shape[1:4]))
    _zero_outside(slab, valid)
    if all(v0 < v1 for v0, v1 in valid):
        (va, vb), (vc, vd), (ve, vf) = valid
        slab[:, va:vb, vc:vd, ve:vf] = x3[n[0]:n[1], first[0] + va:first[0] + vb,
                                         first[1] + vc:first[1] + vd,
                                         first[2] + ve:first[2] + vf]


# --- shift -------------------------------------------------------------------------------

def _shift_weights(w3: np.ndarray, phase_group: tuple[Phase, ...],
                   groups: int) -> list[np.ndarray]:
    """Per (D, H) tap pair, (G, taps_w * C_in/g, phases * C_out/g): the W-axis taps stacked
    along K, the phases of the phase group side by side along N."""
    c_out, cig = w3.shape[0], w3.shape[-1]
    cog = c_out // groups
    first = phase_group[0]
    mats = []
    for i in range(len(first.axis_taps[0])):
        for j in range(len(first.axis_taps[1])):
            cols = []
            for phase in phase_group:
                kd, kh = phase.axis_taps[0][i].k, phase.axis_taps[1][j].k
                kw = [t.k for t in phase.axis_taps[2]]
                block = w3[:, kd, kh, kw, :]  # (C_out, taps_w, C_in/g)
                block = block.reshape(groups, cog, len(kw), cig).transpose(0, 2, 3, 1)
                cols.append(block.reshape(groups, len(kw) * cig, cog))
            mats.append(np.ascontiguousarray(np.concatenate(cols, axis=2)))
    return mats


def _phase_group_bias(bias, spec, phase_group) -> np.ndarray | None:
    """(G, phases * C_out/g): each conv group's bias, once per phase of the phase group."""
    if bias is None:
        return None
    return np.tile(bias.reshape(spec.groups, spec.c_out_per_group), (1, len(phase_group)))


def _shift_job(spec, x3, out, phase_group: tuple[Phase, ...], wmats, task: Task, bias=None):
    """The phase is a stride-1 correlation: lay the input rows it reads out once, W-axis
    taps side by side, on a grid padded by the D/H halo. Every (D, H) tap then reads a
    contiguous run of that grid at a fixed row shift, so each is one plain GEMM; the few
    grid rows that straddle the halo are computed and dropped."""
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    phase, tile = phase_group[0], task.tile
    n0, n1 = tile.n
    a, b = tile.d
    e, f = tile.h
    qw = phase.count[2]
    nn, nd, nh = n1 - n0, b - a, f - e
    dmin, dmax = phase.halo(0)
    hmin, hmax = phase.halo(1)
    wtaps = phase.axis_taps[2]
    dn, hn, tw = nd + dmax - dmin, nh + hmax - hmin, len(wtaps)
    plane = hn * qw
    grid_rows = nn * dn * plane
    length = (nn - 1) * dn * plane + nd * plane  # grid rows the GEMMs compute
    slack = (hmax - hmin) * qw  # the last shifted read runs this far past the grid
    width = len(phase_group) * cog
    in_d, in_h, in_w = spec.in_spatial
    d_lo, h_lo = a + dmin, e + hmin  # first input plane / row the grid holds
    shifts = [((td.offset - dmin) * hn + (th.offset - hmin)) * qw
              for td in phase.axis_taps[0] for th in phase.axis_taps[1]]
    x_is_grid = (tw == 1 and groups == 1 and wtaps[0].offset == 0 and qw == in_w
                 and slack == 0 and h_lo == 0 and hn == in_h and d_lo >= 0
                 and d_lo + dn <= in_d and (nn == 1 or dn == in_d))
    k = tw * cig
    sd, sh, sw = spec.stride
    # Every phase of the output, each filling it exactly: store the whole phase group at
    # once ("pixel shuffle"), with long contiguous runs instead of one strided run per phase.
    shuffle = len(phase_group) == sd * sh * sw > 1 and all(
        c * s == o for c, s, o in zip(phase.count, spec.stride, spec.out_spatial))
    if shuffle:
        views = [out[n0:n1, a * sd:b * sd, e * sh:f * sh]]
    else:
        views = [_out_view(out, spec, p, task) for p in phase_group]

    def job(buf):
        if x_is_grid:  # one tap, whole planes: the input itself is the grid
            grid = x3[n0:n1, d_lo:d_lo + dn].reshape(1, grid_rows, k)
            grid = grid.astype(spec.compute_dtype, copy=False)
            used = 0
        else:
            used = groups * (grid_rows + slack) * k
            grid = buf[:used].reshape(groups, grid_rows + slack, k)
            if slack:
                grid[:, grid_rows:] = 0
            body = grid[:, :grid_rows].reshape(groups, nn, dn, hn, qw, tw, cig)
            src_d = (max(d_lo, 0), min(d_lo + dn, in_d))
            src_h = (max(h_lo, 0), min(h_lo + hn, in_h))
            for j, wtap in enumerate(wtaps):
                dst = body[..., j, :]
                valid = ((src_d[0] - d_lo, src_d[1] - d_lo),
                         (src_h[0] - h_lo, src_h[1] - h_lo), (wtap.lo, wtap.hi))
                _zero_outside(dst, valid)
                if any(lo >= hi for lo, hi in valid):
                    continue
                src = x3[n0:n1, src_d[0]:src_d[1], src_h[0]:src_h[1],
                         wtap.lo + wtap.offset:wtap.hi + wtap.offset, :]
                src = src.reshape(*src.shape[:-1], groups, cig)
                (va, vb), (vc, vd), (ve, vf) = valid
                dst[:, :, va:vb, vc:vd, ve:vf, :] = np.moveaxis(src, -2, 0)
        acc = buf[used:used + groups * grid_rows * width].reshape(groups, grid_rows, width)
        tmp = buf[used + acc.size:used + 2 * acc.size]  # empty when one GEMM suffices
        for i, (shift, wmat) in enumerate(zip(shifts, wmats)):
            rows = grid[:, shift:shift + length]
            if i == 0:
                np.matmul(rows, wmat, out=acc[:, :length])
            else:
                part = tmp.reshape(acc.shape)[:, :length]
                np.matmul(rows, wmat, out=part)
                acc[:, :length] += part
        res = acc.reshape(groups, nn, dn, hn, qw, width)[:, :, :nd, :nh]
        if bias is not None:  # added to the sums while they are in cache
            res += bias[:, None, None, None, None, :]
        if shuffle:
            res = res.reshape(groups, nn, nd, nh, qw, sd, sh, sw, cog)
            res = res.transpose(1, 2, 5, 3, 6, 4, 7, 0, 8)  # (nn, nd, sd, nh, sh, qw, sw, G, cog)
            views[0].reshape(res.shape)[...] = res
            return
        for p, view in enumerate(views):
            _store(view, res[..., p * cog:(p + 1) * cog], groups)

    return job


# --- scatter -----------------------------------------------------------------------------

def _scatter_weights(w3: np.ndarray, phase_group: tuple[Phase, ...], groups: int) -> np.ndarray:
    """(G, taps * C_out/g, C_in/g): every tap of every phase of the phase group along M."""
    c_out, cig = w3.shape[0], w3.shape[-1]
    cog = c_out // groups
    blocks = [w3[:, td.k, th.k, tw.k, :] for p in phase_group for td, th, tw in p.taps]
    stacked = np.stack(blocks).reshape(len(blocks), groups, cog, cig).transpose(1, 0, 2, 3)
    return np.ascontiguousarray(stacked.reshape(groups, len(blocks) * cog, cig))


def _scatter_job(spec, x3, out, phase_group: tuple[Phase, ...], wmat, task: Task, bias=None):
    """One GEMM of every tap of every phase against a zero-bordered copy of the input slab
    the tile reads, channels first (G, taps, C_out/g, slab), so M = taps * C_out stays wide
    even when C_out is 1. Each phase then sums its taps' windows of that result into an
    accumulator laid on the slab's (H, W) grid, where every window is one flat shift: one
    contiguous add per tap; the grid's extra rows and columns are dropped at the store."""
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    tile = task.tile
    n0, n1 = tile.n
    a, b = tile.d
    e, f = tile.h
    nn = n1 - n0
    (sd_, sh_, sw_), first = bordered_slab(phase_group, tile)
    block = sd_ * sh_ * sw_  # one batch item's slab
    rows = nn * block
    slack = (sh_ + 1) * sw_
    taps_total = sum(p.tap_count for p in phase_group)
    sd, sh, sw = spec.stride
    parts = []  # (phase, first tap row in the GEMM, clipped d and h ranges, output view)
    row = 0
    for p in phase_group:
        pd, ph = (a, min(b, p.count[0])), (e, min(f, p.count[1]))
        if pd[0] < pd[1] and ph[0] < ph[1]:
            rd, rh, rw = p.residue
            view = out[n0:n1, _strided(rd, sd, *pd), _strided(rh, sh, *ph),
                       _strided(rw, sw, 0, p.count[2]), :]
            parts.append((p, row, pd, ph, view))
        row += p.tap_count

    def job(buf):
        slab = buf[:rows * spec.c_in].reshape(nn, sd_, sh_, sw_, spec.c_in)
        _fill_bordered(slab, x3, tile.n, first)
        used = slab.size
        y = buf[used:used + groups * taps_total * cog * (rows + slack)]
        y = y.reshape(groups, taps_total * cog, rows + slack)
        y[:, :, rows:] = 0
        xt = slab.reshape(rows, groups, cig)
        np.matmul(wmat, xt.transpose(1, 2, 0), out=y[:, :, :rows])
        y = y.reshape(groups, taps_total, cog, rows + slack)
        free = buf[used + y.size:]
        for phase, first_tap, (pa, pb), (pe, pf), view in parts:
            length = (pb - pa) * sh_ * sw_
            acc = free[:groups * cog * nn * length].reshape(groups, cog, nn, length)
            for t, (td, th, tw) in enumerate(phase.taps, start=first_tap):
                # acc[i, j, k] is output (pa + i, e + j, k); it reads slab position
                # (pa + i + td.offset, e + j + th.offset, k + tw.offset) - first.
                shift = (((pa + td.offset - first[0]) * sh_ + e + th.offset - first[1]) * sw_
                         + tw.offset - first[2])
                for n in range(nn):
                    window = y[:, t, :, n * block + shift:n * block + shift + length]
                    if t == first_tap:
                        acc[:, :, n] = window
                    else:
                        acc[:, :, n] += window
            if bias is not None:
                acc += bias.reshape(groups, cog, 1, 1)
            grid = acc.reshape(groups, cog, nn, pb - pa, sh_, sw_)
            res = grid[..., :pf - pe, :phase.count[2]]
            _store(view, np.moveaxis(res, 1, -1), groups)

    return job


# --- direct ------------------------------------------------------------------------------

def _direct_weights(w3: np.ndarray, phase: Phase, groups: int) -> np.ndarray:
    """(taps_d, taps_h, taps_w, G, multiplier), each axis ordered by rising input offset."""
    order = [sorted(axis, key=lambda t: t.offset) for axis in phase.axis_taps]
    kd, kh, kw = ([t.k for t in axis] for axis in order)
    sub = w3[:, kd][:, :, kh][:, :, :, kw][..., 0]  # (C_out, td, th, tw)
    sub = sub.reshape(groups, w3.shape[0] // groups, *sub.shape[1:])
    return np.ascontiguousarray(sub.transpose(2, 3, 4, 0, 1))


def _direct_job(spec, x3, out, phase: Phase, wtaps, task: Task, bias=None):
    """One input channel per group: copy the tile's input slab once into a zero-bordered
    buffer, then one einsum over a strided view of every tap's window multiplies and sums
    without temporaries (taps along an axis read offsets in arithmetic progression)."""
    groups, mult = spec.groups, spec.c_out_per_group
    tile = task.tile
    n0, n1 = tile.n
    a, b = tile.d
    e, f = tile.h
    qw = phase.count[2]
    nn, nd, nh = n1 - n0, b - a, f - e
    steps = [(phase.halo(i)[1] - phase.halo(i)[0]) // max(1, len(phase.axis_taps[i]) - 1)
             for i in range(3)]
    extent, start = bordered_slab((phase,), tile)
    view = _out_view(out, spec, phase, task)

    def job(buf):
        slab = buf[:nn * extent[0] * extent[1] * extent[2] * groups]
        slab = slab.reshape(nn, *extent, groups)
        _fill_bordered(slab, x3, tile.n, start)
        st = slab.strides
        windows = np.lib.stride_tricks.as_strided(
            slab, shape=(nn, nd, nh, qw, *wtaps.shape[:3], groups),
            strides=(st[0], st[1], st[2], st[3], st[1] * steps[0], st[2] * steps[1],
                     st[3] * steps[2], st[4]), writeable=False)
        # einsum into a contiguous block, then one strided store: einsum writing into the
        # strided output itself buffered every chunk (98 ms vs 72 ms on W7, one thread).
        target = buf[slab.size:slab.size + nn * nd * nh * qw * spec.c_out]
        target = target.reshape(nn, nd, nh, qw, groups, mult)
        np.einsum("ndhwabcg,abcgm->ndhwgm", windows, wtaps, out=target)
        if bias is not None:
            target += bias.reshape(groups, mult)
        view[...] = target.reshape(view.shape)

    return job


# --- native ------------------------------------------------------------------------------

class _LazyWeights:
    """One phase group's weights, per conv group. CHANNELS mode's are packed by the first
    task that needs them, as a `native.once` that compiled-pool tasks name: on the
    workers, so that phase groups pack in parallel and overlap other phase groups' tiles
    (W3 packs 8 MiB: 2.6 ms of its 25 ms on one thread before any tile started). DOT
    mode's are the weight itself, read where it lies at `offsets` (`_dot_offsets`). The
    other layouts are small and packed before any task starts (`once` None)."""

    def __init__(self, arrays: list[np.ndarray], once=None, keep=None,
                 offsets: np.ndarray | None = None) -> None:
        self.arrays = arrays
        self.once = once
        self.keep = keep  # what the once's calls read (they hold only addresses)
        self.offsets = offsets

    def get(self) -> list[np.ndarray]:
        if self.once is not None:
            native.Task((), once=self.once).run_here()
        return self.arrays


class _HashedOnce:
    """A tuple that hashes once: a cache keyed by a layer's phase groups (64 at stride 4
    in 3-D), asked once per phase group, rehashed every phase of every phase group each
    time."""

    __slots__ = ("value", "_hash")

    def __init__(self, value: tuple) -> None:
        self.value = value
        self._hash = hash(value)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _HashedOnce) and (self.value is other.value
                                                   or self.value == other.value)


PARALLEL_PACK_BYTES = 1 << 20


def pack_columns_on_threads(w: np.ndarray, tables: list[np.ndarray], rows: int,
                            row_stride: int, threads: int) -> list[np.ndarray]:
    """`native.pack_columns` of each table, in pieces that the threads pack at once where
    the arrays are big enough to pay for it (grad_input's weight of a small-wide layer:
    7.7 MB packed on one thread took 14% of 200 -> 384 k5 s3's gradients)."""
    tables = [np.ascontiguousarray(t, np.int64) for t in tables]
    item = w.dtype.itemsize
    align = 64 // item  # each array on a cache line, all in one block at equal steps
    sizes = [native.packed_size(t.shape[0], rows, t.shape[1], item) for t in tables]
    steps = [ceil_div(n, align) * align for n in sizes]
    block = native.aligned_empty(sum(steps), w.dtype)
    starts = np.cumsum([0] + steps)
    out = [block[a:a + n] for a, n in zip(starts, sizes)]
    if threads < 2 or sum(a.nbytes for a in out) < PARALLEL_PACK_BYTES:
        for t, a in zip(tables, out):
            native.fill_columns(w, t, rows, row_stride, a)
        return out
    pieces: list = []
    keep: list = []
    for t, a in zip(tables, out):
        _pack_pieces(w, t, rows, row_stride, a, 2 * threads, pieces, keep)
    native.run_tasks([native.Task((call,)) for call in pieces], threads)
    return out


def _pack_pieces(w: np.ndarray, table: np.ndarray, rows: int, row_stride: int,
                 out: np.ndarray, pieces: int, into: list, keep: list) -> None:
    """`native.fill_columns` of one packed array as up to `pieces` calls that threads can
    run at once: whole chunks of columns each (chunks lie one after the other), or, for a
    single chunk ([tap][row][column]), runs of taps. `keep` receives the arrays the
    calls read, to hold until they have run."""
    taps, cols = table.shape
    lanes, _ = native.layout(w.dtype.itemsize)
    chunk = native.chunk_columns(cols, rows, w.dtype.itemsize)
    padded = ceil_div(cols, lanes) * lanes
    if cols > chunk:
        chunks = ceil_div(cols, chunk)
        per = ceil_div(chunks, pieces) * chunk
        for c0 in range(0, cols, per):
            n1 = min(padded, c0 + per)  # padded columns of the piece
            part = np.ascontiguousarray(table[:, c0:c0 + per])
            keep.append(part)  # the prepared call holds only its address
            native.fill_columns(w, part, rows, row_stride,
                                out[taps * rows * c0:taps * rows * n1], into=into, chunk=chunk)
    else:
        per = ceil_div(taps, pieces)
        for t0 in range(0, taps, per):
            t1 = min(taps, t0 + per)
            native.fill_columns(w, table[t0:t1], rows, row_stride,
                                out[t0 * rows * padded:t1 * rows * padded], into=into)


def _native_weights(w3s: list[np.ndarray], layer: _HashedOnce, groups: int, mode: native.Mode,
                    scratch: Scratch, threads: int = 1) -> list[_LazyWeights]:
    """Per phase group of `layer`, its taps (D-major, then H, then W, as `axis_taps` orders
    them) packed for the compiled kernel from its weight w3s[i] (C_out, kD, kH, kW,
    C_in/g), the phases of a merged W group side by side along C_out (in residue order,
    as they lie in the output). One array per conv group, or one for every channel of a
    depthwise layer, all in one block of `scratch` (taken here: it is not thread-safe).
    CHANNELS mode packs lazily, by the first worker that needs a phase group; the other
    layouts now, by one gather where the phase groups share a weight (a call of a strided
    layer has a phase group per phase: 64 at stride 4 in 3-D, ~40 us each when packed one
    by one). Where fewer phase groups than `threads` pack over PARALLEL_PACK_BYTES, every
    thread packs them now, in pieces: one worker packing a big weight alone held up the rest
    (3x3x3 192 -> 384 k4: 19 MiB, 9.2 ms on one or two threads alike)."""
    w3 = w3s[0]
    item = w3.dtype.itemsize
    cog = w3.shape[0] // groups
    align = 64 // item  # each array on a cache line: the kernel loads whole vectors
    if mode == native.CHANNELS:  # gathered in one pass by the kernel's packer
        w3s = _weight_sources(w3s, mode)
        strides = [tuple(native.element_strides(w)) for w in w3s]
        lanes, _ = native.layout(item)
        tables = [_channels_tables(st, layer, groups, cog)[i] for i, st in enumerate(strides)]
        sizes = [[t.shape[0] * w.shape[-1] * ceil_div(t.shape[1], lanes) * lanes for t in per_group]
                 for w, per_group in zip(w3s, tables)]
        block = scratch.empty(sum(ceil_div(n, align) * align for per in sizes for n in per),
                              w3.dtype)
        now = (threads > 1 and len(layer.value) < threads
               and block.nbytes >= PARALLEL_PACK_BYTES)
        weights, at, pieces, keep = [], 0, [], []
        for w, st, per_group, per_size in zip(w3s, strides, tables, sizes):
            arrays, packs = [], []
            for table, n in zip(per_group, per_size):
                arrays.append(block[at:at + n])
                at += ceil_div(n, align) * align
                if now:
                    _pack_pieces(w, table, w.shape[-1], st[-1], arrays[-1], 2 * threads,
                                 pieces, keep)
                else:
                    native.fill_columns(w, table, w.shape[-1], st[-1], arrays[-1], into=packs)
            weights.append(_LazyWeights(arrays, None if now else native.once(packs),
                                        keep=(w, per_group)))
        if pieces:
            native.run_tasks([native.Task((call,)) for call in pieces], threads)
        return _PackedWeights(weights, block, None if now else _distinct(w3s))
    if mode == native.DOT:  # read where it lies: no copy (a wide weight's took longer than
        # its products on few pixels: 192 -> 256 g2 k4 s2 on 2x2x3)
        w3s = _weight_sources(w3s, mode)
        weights = [_LazyWeights([w[g * cog:(g + 1) * cog] for g in range(groups)],
                                offsets=_dot_offsets(tuple(native.element_strides(w)), layer,
                                                     cog)[i])
                   for i, w in enumerate(w3s)]
        return _PackedWeights(weights, scratch.empty(0, w3.dtype), _distinct(w3s))
    shared = all(w is w3 for w in w3s)
    parts = ([_small_layout_index(w3.shape, layer, groups, mode)] if shared else
             [_small_layout_index(w.shape, _HashedOnce((phase_group,)), groups, mode)
              for w, phase_group in zip(w3s, layer.value)])
    block = scratch.empty(sum(index.size for index, _, _ in parts), w3.dtype)
    weights, at = [], 0
    for w, (index, lengths, phantoms) in zip(w3s if not shared else [w3], parts):
        source = np.ascontiguousarray(w).reshape(-1)
        if phantoms:  # their zero, one past the weight's elements
            source = np.append(source, np.zeros(1, source.dtype))
        np.take(source, index, out=block[at:at + index.size])
        for per_group in lengths:
            arrays = []
            for n in per_group:
                arrays.append(block[at:at + n])
                at += n
            weights.append(_LazyWeights(arrays))
    return _PackedWeights(weights, block, ())


class _PackedWeights(NamedTuple):
    """`_native_weights`' result: per phase group, its weights; the block that holds them
    all; and the arrays their packing calls read when they run (None: packed already, by
    calls that ran now; empty: packed before any task)."""

    per_phase_group: list
    block: np.ndarray
    sources: tuple | None


def _weight_sources(w3s: list[np.ndarray], mode: native.Mode) -> list[np.ndarray]:
    """Per phase group, the weight the kernel reads (CHANNELS: its packer; DOT: its
    sums): w3s[i] itself where its strides are whole elements (DOT: and each output's
    channels contiguous), else one contiguous copy per distinct weight."""
    copies: dict[int, np.ndarray] = {}
    for w in w3s:
        if id(w) not in copies:
            fits = (native.reads_in_place(w, w.dtype) if mode == native.DOT
                    else native.element_strides(w) is not None)
            copies[id(w)] = w if fits else np.ascontiguousarray(w)
    return [copies[id(w)] for w in w3s]


@functools.lru_cache(maxsize=16)  # a layer's tables hold taps x C_out int64: bounded
def _dot_offsets(strides: tuple[int, ...], layer: _HashedOnce, cog: int) -> list[np.ndarray]:
    """Per phase group of a layer, where DOT mode reads each output's weight of each tap
    in a weight of these element strides, from its [0, 0, 0, 0, 0]: [tap][output], taps
    in `axis_taps` order (D, then H, then W), the outputs of merged residues (`cog` each)
    with taps of their own. Cached per layer, as `_channels_tables`."""
    s_co, s_d, s_h, s_w, _ = strides
    tables = []
    for phase_group in layer.value:
        per_phase = [np.add.outer(np.add.outer(np.add.outer(
            [t.k * s_d for t in kd], [t.k * s_h for t in kh]), [t.k * s_w for t in kw]).ravel(),
            np.arange(cog) * s_co) for kd, kh, kw in (p.axis_taps for p in phase_group)]
        table = np.ascontiguousarray(np.stack(per_phase, axis=1).reshape(-1), np.int64)
        table.flags.writeable = False  # shared by every call with these strides
        tables.append(table)
    return tables


def _distinct(arrays) -> tuple:
    return tuple({id(a): a for a in arrays}.values())


def _small_layouts(w3: np.ndarray, phase_group: tuple[Phase, ...], groups: int,
                   mode: native.Mode) -> list[np.ndarray]:
    """The DEPTHWISE ([tap][residue][channel], a merged W group's residues; a PHANTOM
    tap's elements w3.size, one past w3's) or PLANAR layout of w3 (indices: see
    `_small_layout_index`). PLANAR's is one array for
    every block of outputs (`planar_chunk` of a conv group's) and W residue of the phase
    group, [block][residue][tap][c][co], residues of their own tap counts."""
    c_out, cig = w3.shape[0], w3.shape[-1]
    cog = c_out // groups
    if mode == native.PLANAR:  # a conv group's outputs in blocks of `planar_chunk`
        chunk, parts = planar_chunk(cog), []
        for first in range(0, c_out, chunk):
            for phase in phase_group:
                kd, kh, kw = ([t.k for t in axis] for axis in phase.axis_taps)
                sub = w3[first:first + chunk][:, kd][:, :, kh][:, :, :, kw]
                parts.append(sub.reshape(chunk, phase.tap_count, cig).transpose(1, 2, 0).ravel())
        return [np.concatenate(parts)]
    assert mode == native.DEPTHWISE
    parts = []
    for phase in phase_group:  # [tap][residue][channel], the residues of a merged W group
        kd, kh, kw = ([t.k for t in axis] for axis in phase.axis_taps)
        sub = w3[:, kd][:, :, kh][:, :, :, kw]  # (C_out, td, th, tw, 1)
        phantom = np.array([k == PHANTOM for k in kw])  # (a zero: past w3's elements)
        sub = np.where(phantom[:, None], w3.size, sub)
        parts.append(sub.reshape(c_out, -1).T)
    return [np.ascontiguousarray(np.stack(parts, axis=1)).ravel()]


@functools.lru_cache(maxsize=16)  # a layer's tables hold taps x C_out int64: bounded
def _channels_tables(strides: tuple[int, ...], layer: _HashedOnce, groups: int,
                     cog: int) -> list[list[np.ndarray]]:
    """Per phase group of a layer and per conv group, the pack table of CHANNELS mode for
    a weight of these element strides: (taps, phases * C_out/g) offsets of each tap's
    [co, k, 0], -1 for a PHANTOM tap's (zeros). Cached per layer: building one took ~15
    us per phase group and call, and a cache per phase group thrashed on layers of more
    phase groups than it held (stride 4 in 3-D: 64)."""
    s_co, s_d, s_h, s_w, _ = strides
    column = np.arange(cog) * s_co
    layer_tables = []
    for phase_group in layer.value:
        tap_start = np.stack([  # (phases, taps): element offset of each tap's [0, k, 0]
            np.add.outer(np.add.outer([t.k * s_d for t in kd], [t.k * s_h for t in kh]),
                         [t.k * s_w for t in kw]).ravel()
            for kd, kh, kw in (p.axis_taps for p in phase_group)])
        phantom = np.array([[any(t.k == PHANTOM for t in tap) for tap in p.taps]
                            for p in phase_group])  # (phases, taps), as tap_start
        taps = tap_start.shape[1]
        tables = []
        for g in range(groups):
            start = tap_start[:, :, None] + column + g * cog * s_co
            table = np.ascontiguousarray(  # (-1: zeros, the packer's phantom)
                np.where(phantom[:, :, None], -1, start).transpose(1, 0, 2)
                .reshape(taps, -1), np.int64)
            table.flags.writeable = False  # shared by every call with these strides
            tables.append(table)
        layer_tables.append(tables)
    return layer_tables


@functools.lru_cache(maxsize=8)  # an index holds as many int64 as the weight: bounded
def _small_layout_index(shape: tuple[int, ...], layer: _HashedOnce, groups: int,
                        mode: native.Mode) -> tuple[np.ndarray, list[list[int]], bool]:
    """Where each packed element of every phase group of `layer` comes from in a
    C-contiguous weight of `shape`, phase groups one after the other (the layout computed
    once on the indices: a call then packs with one take), each phase group's array
    lengths, and whether PHANTOM taps read a zero one past the weight's elements."""
    indices = np.arange(math.prod(shape)).reshape(shape)
    per_phase_group = [_small_layouts(indices, phase_group, groups, mode)
                       for phase_group in layer.value]
    index = np.concatenate([a for arrays in per_phase_group for a in arrays])
    index.flags.writeable = False
    return (index, [[a.size for a in arrays] for arrays in per_phase_group],
            bool(index.size) and int(index.max()) == indices.size)


@functools.lru_cache(maxsize=256)
def _native_offsets(phase: Phase) -> native.TapOffsets:
    """Per axis, the input offset of each tap, in `axis_taps` order (the packed order)."""
    return native.TapOffsets([t.offset for t in axis] for axis in phase.axis_taps)


class _TileGeometry(NamedTuple):
    """What a native tile hands the kernel besides addresses: a pure function of the
    plan's task and the output's layout, cached, since a call of a strided layer has a
    tile per phase (64 at stride 4 in 3-D) and working it out took ~40 us a tile."""

    out_offset: int  # bytes from the output's first element to the tile's first position
    out_strides: list  # element strides (n, d, h, w) of the tile's positions
    box: tuple[int, int, int, int, int, int]
    wcount: int
    in_dims: tuple[int, ...]
    steps: tuple[int, int, int]
    pair_out: int
    cin: int  # input channels the kernel sums per conv group
    cout: int  # outputs per conv group (every residue's C_out/g for a merged group)
    input_rows: tuple[tuple[int, int], tuple[int, int]]  # `native_input_box`
    # None: a position's outputs are one run of channels; else where each lies from the
    # position, in elements (a dot-mode group merged across rows or conv groups: oout)
    out_offsets: np.ndarray | None


@functools.lru_cache(maxsize=4096)  # a few hundred bytes an entry
def _tile_geometry(spec, phase_group: tuple[Phase, ...], tile: Tile, pair_dims: tuple | None,
                   out_shape: tuple, out_strides: tuple, out_item: int) -> _TileGeometry:
    """The tile's positions in the output as a strided view of it (those of the phase
    group's first phase: a merged group's others lie at fixed offsets from them), and
    what the kernel reads."""
    phase = phase_group[0]
    n0, n1 = tile.n
    (a, b), (e, f) = tile.d, tile.h
    qw = phase.count[2]
    first_d = 2 * a if pair_dims else phase.residue[0] + a * spec.stride[0]
    step_d = 1 if pair_dims else spec.stride[0]
    first = (n0, first_d, phase.residue[1] + e * spec.stride[1], phase.residue[2])
    es = [st // out_item for st in out_strides[:4]]
    strides = [es[0], es[1] * step_d, es[2] * spec.stride[1], es[3] * spec.stride[2]]
    cog = spec.c_out_per_group
    out_offsets = None  # one phase: its outputs are one run
    if len(phase_group) > 1:
        out_offsets = np.array([sum((r - r0) * st for r, r0, st in
                                    zip(p.residue, phase.residue, es[1:])) + co
                                for p in phase_group for co in range(cog)], np.int64)
        if np.array_equal(out_offsets, np.arange(out_offsets.size)):
            out_offsets = None  # one run: a merged W group of one conv group
        else:
            out_offsets.flags.writeable = False
    w0, qw = (0, qw) if tile.w is None else (tile.w[0], tile.w[1] - tile.w[0])
    offset = (sum(i * st for i, st in zip(first, es)) + w0 * strides[3]) * out_item
    in_dims, steps, pair_out = ((pair_dims, (4, 1, 1), spec.out_spatial[0]) if pair_dims
                                else (spec.in_spatial, (1, 1, 1), 0))
    return _TileGeometry(offset, strides, (n0, n1, a, b, e, f), qw, in_dims, steps, pair_out,
                         spec.c_in_per_group, cog * len(phase_group),
                         native_input_box(spec, phase, tile), out_offsets)


# The most weight (every conv group's) for which CHANNELS mode's conv groups go to the
# kernel in one call where their outputs do not share lines (`groups_in_one_call`).
GROUPS_IN_ONE_CALL_WEIGHT_BYTES = 256 * 2**10


def groups_in_one_call(spec, mode: native.Mode, out_itemsize: int) -> bool:
    """Whether the conv groups of a DOT or CHANNELS job go to the kernel as one call (each
    row's groups in turn; `spec` as the kernel sees it). DOT mode's always (the kernel
    takes a group over every row where their weights outgrow L1). CHANNELS mode's where a
    group's channels end inside a cache line, so that a line holds several groups'
    outputs: called apart, each group wrote its part of every line of the tile, the lines
    fetched again group after group (8 -> 24 g4 k4 s2: 6 channels a group). Elsewhere
    where every group's weight stays in L2 as the row groups sweep it: called apart, each
    group read the whole tile's input again. Over 40 grouped sweep layers, alternating
    processes in both orders: 0.93x (geomean) the time of calls apart for the 22 with
    weights up to 256 KiB (4 -> 32 g2 k(2, 7, 2) 0.71x, 8 -> 64 g4 k6 s2 2-D 0.88x; 48 ->
    64 g4 k2 s(1, 2) 1.07x), 1.01x above it (2 -> 4 MB weights up to 1.12x)."""
    if mode == native.DOT:
        return True
    if mode != native.CHANNELS or spec.groups == 1:
        return False
    return (spec.c_out_per_group * out_itemsize % 64 != 0
            or spec.weight_bytes <= GROUPS_IN_ONE_CALL_WEIGHT_BYTES)


def group_stride(packed: list[np.ndarray], item: int) -> int:
    """Elements between one conv group's weight and the next's (views of one array, or
    equal arrays of one block, at equal steps)."""
    if len(packed) < 2:
        return 0
    step = native.address(packed[1]) - native.address(packed[0])
    assert all(native.address(b) - native.address(a) == step for a, b in zip(packed, packed[1:]))
    return step // item


def _native_job(spec, x3, out, phase_group: tuple[Phase, ...], weights: _LazyWeights, offsets,
                task: Task, convert_input: bool, mode: native.Mode, x_origin, threads: int,
                pair_dims: tuple | None = None, bias: np.ndarray | None = None,
                channel_stride: int = 0, residues: native.TapOffsets | None = None):
    """Hand the tile to the compiled kernel: it reads the input in place (or a converted
    copy of the planes and rows the tile reads) and writes the phase's strided output
    positions in place (or a block that is then rounded to float16/bfloat16). A merged W
    group writes s_w * C_out channels per position of its first residue. `pair_dims`: a
    ``winograd`` tile, V's dims (4 * pairs, H, W) read at D step 4: its rows are output
    pairs along D.
    `bias`: None, or the phase group's `native.bias_table`, added by the kernel as it
    stores.
    `channel_stride`, `residues`: PLANAR mode's, its input the planar copy
    (`native.planar_copy`), and the W residues of the phase group, written in one pass."""
    groups = spec.groups
    geo = _tile_geometry(spec, phase_group, task.tile, pair_dims, out.shape, out.strides,
                         out.dtype.itemsize)
    if task.tile.w is not None:  # a piece of the rows
        offsets = offsets.along_w(task.tile.w[0] * geo.steps[2])
    cig, cog, box, qw = geo.cin, geo.cout, geo.box, geo.wcount
    item = spec.compute_dtype.itemsize
    # float16 and bfloat16 the kernel rounds as it stores; anything else goes through a
    # block of the compute dtype.
    out_half = native.half_kind(out.dtype)
    round_output = out.dtype != spec.compute_dtype and not out_half
    stream = not round_output and streams_output(out.nbytes)
    # Reading and writing in place, the tile's rows are claimed through the kernel's
    # cursors (one per conv group), so that threads left without a tile can join it; a
    # tile that converts its input or rounds through a block runs on one thread.
    # one call writes whole rows: PLANAR every group and residue, DOT and CHANNELS every
    # group where `groups_in_one_call` says
    whole_rows = mode == native.PLANAR or groups_in_one_call(spec, mode, out.dtype.itemsize)
    cursors = native.RowCursors(1 if whole_rows else groups,
                                1 if convert_input or round_output else threads)
    b_addr = bias.ctypes.data if bias is not None else 0

    def calls(packed, x_addr, xs, o_addr, os_, out_item, into=None) -> None:
        if mode == native.PLANAR:  # each group's outputs in blocks of `planar_chunk`
            chunk = planar_chunk(spec.c_out_per_group)
            native.correlate(mode, item, out_half, stream, x_addr, xs, geo.in_dims, packed[0],
                             offsets, geo.steps, o_addr, os_, box, qw, cig, chunk,
                             cursors.address(0), cursors.sharers,
                             into=into, bias=b_addr, channel_stride=channel_stride,
                             groups=groups, chunks=spec.c_out_per_group // chunk,
                             residues=residues,
                             residue_stride=os_[3] // len(phase_group))
        elif mode == native.DEPTHWISE:  # a merged W group's residues as more outputs
            native.correlate(mode, item, out_half, stream, x_addr, xs, spec.in_spatial, packed[0],
                             offsets, (1, 1, 1), o_addr, os_, box, qw, spec.c_out,
                             spec.c_out * len(phase_group), cursors.address(0),
                             cursors.sharers, into=into, bias=b_addr)
        elif whole_rows:  # each row's conv groups in turn (DOT, or CHANNELS' small groups)
            native.correlate(mode, item, out_half, stream, x_addr, xs, geo.in_dims, packed[0],
                             offsets, geo.steps, o_addr, os_, box, qw, cig, cog,
                             cursors.address(0), cursors.sharers, into=into,
                             pair_out=geo.pair_out, bias=b_addr,
                             weight_offsets=weights.offsets, output_offsets=geo.out_offsets,
                             groups=groups, group_w=group_stride(packed, item),
                             group_out=spec.c_out_per_group)
        else:
            group_step = cig * (channel_stride or 1) * item
            for g in range(groups):
                native.correlate(mode, item, out_half, stream, x_addr + g * group_step, xs,
                                 geo.in_dims, packed[g], offsets, geo.steps,
                                 o_addr + g * spec.c_out_per_group * out_item, os_, box,
                                 qw, cig, cog,
                                 cursors.address(g), cursors.sharers, into=into,
                                 pair_out=geo.pair_out, bias=b_addr and b_addr + g * cog * item,
                                 channel_stride=channel_stride, output_offsets=geo.out_offsets)

    if not convert_input and not round_output:  # reads and writes in place: a pool task
        prepared: list = []
        calls(weights.arrays, *x_origin, native.address(out) + geo.out_offset,
              geo.out_strides, out.dtype.itemsize, prepared)
        # The phases of a tile with the same D and H residue write the same output rows.
        rows = hash((task.tile, phase_group[0].residue[:2])) & (2**62 - 1)
        return native.Task(tuple(prepared), cursors.sharers > 1, weights.once,
                           (cursors, weights, bias, residues, geo.out_offsets), rows)

    def job(buf):
        packed = weights.get()
        used = 0
        n0, n1 = task.tile.n
        (d0, d1), (h0, h1) = geo.input_rows
        if convert_input:
            in_w = spec.in_spatial[2]
            slab = buf[:(n1 - n0) * (d1 - d0) * (h1 - h0) * in_w * spec.c_in]
            slab = slab.reshape(n1 - n0, d1 - d0, h1 - h0, in_w, spec.c_in)
            slab[...] = x3[n0:n1, d0:d1, h0:h1]
            used = slab.size
            x_addr, xs = native.origin(slab, (n0, d0, h0))  # it holds every row read
        else:
            x_addr, xs = x_origin
        if round_output:  # the tile's positions (out is C-contiguous: `execute` made it),
            # through a block of the compute dtype
            assert geo.out_offsets is None, "a merged group's outputs are rounded as stored"
            rows_d = (min(2 * box[3], spec.out_spatial[0]) - 2 * box[2] if pair_dims
                      else box[3] - box[2])
            view = np.lib.stride_tricks.as_strided(
                out.reshape(-1)[geo.out_offset // out.dtype.itemsize:],
                (n1 - n0, rows_d, box[5] - box[4], qw, spec.c_out * len(phase_group)),
                [st * out.dtype.itemsize for st in (*geo.out_strides, 1)])
            target = buf[used:used + view.size].reshape(view.shape)
            calls(packed, x_addr, xs, *native.origin(target), target.dtype.itemsize)
            view[...] = target
        else:
            calls(packed, x_addr, xs, native.address(out) + geo.out_offset, geo.out_strides,
                  out.dtype.itemsize)

    return Shared(job) if cursors.sharers > 1 else job


# --- indexed ------------------------------------------------------------------------------

def _indexed(plan: Plan, x3, w3, out, bias=None) -> None:
    """Small calls: every (input row, tap) product in one GEMM, then a gather and a sum."""
    spec = plan.spec
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    rows = spec.batch * spec.in_spatial[0] * spec.in_spatial[1] * spec.in_spatial[2]
    taps = spec.kernel[0] * spec.kernel[1] * spec.kernel[2]
    products = np.empty(((rows * taps + 1), spec.c_out), spec.compute_dtype)
    products[-1] = 0
    xr = x3.reshape(rows, groups, cig).astype(spec.compute_dtype, copy=False)
    # One BLAS thread where the GEMM is big enough for OpenBLAS to split it: its threads,
    # spinning beside others on a busy machine, made a 384 -> 8 call of 0.3 ms take 35-50.
    with single_threaded_blas() if spec.useful_flops > 4e6 else contextlib.nullcontext():
        if groups == 1 and w3.size > rows * taps * cog:
            # The weight is the big operand (a few pixels of wide channels): multiply it as
            # it lies and transpose the smaller products, rather than copy it transposed
            # (a 2x2x2 384 -> 256 layer copied 7.8 MB of weight for 0.6 MB of products).
            wt = w3.reshape(cog * taps, cig)
            pt = np.matmul(wt, xr[:, 0].T)  # (C_out * taps, rows)
            products[:-1].reshape(rows, taps, cog)[...] = pt.reshape(cog, taps, rows).T
        else:
            wr = w3.reshape(groups, cog, taps, cig).transpose(0, 3, 2, 1).reshape(
                groups, cig, taps * cog)
            if groups == 1:
                np.matmul(xr[:, 0], wr[0], out=products[:-1].reshape(rows, taps * cog))
            else:
                y = np.matmul(xr.transpose(1, 0, 2), wr).reshape(groups, rows, taps, cog)
                products[:-1].reshape(rows, taps, groups, cog)[...] = y.transpose(1, 2, 0, 3)
    flat = out.reshape(-1, spec.c_out)
    target = flat if out.dtype == spec.compute_dtype else np.empty(flat.shape, products.dtype)
    if native.AVAILABLE:
        native.gather_sum(products, plan.table, target)
    else:
        np.add.reduce(np.take(products, plan.table, axis=0), axis=0, out=target)
    if bias is not None:  # small calls only: the sums are in cache
        target += bias
    if target is flat:
        return
    if native.AVAILABLE and native.half_kind(out.dtype) and target.dtype == np.float32:
        native.round_half(target, flat)  # summed in float32, rounded once
    else:
        flat[...] = target


# Copies (of their result's bytes) below this stay on the calling thread: waking Python
# threads for them cost more than they saved (both gradients of 24 -> 3 k3 s2 whose
# padded cotangent is 1.2 MB: 1.63 -> 1.26 ms a call; 3.8 MB: 3.01 -> 2.71).
PARALLEL_COPY_BYTES = 4 << 20


def _converted(x3: np.ndarray, dtype: np.dtype, threads: int) -> np.ndarray:
    """x3 as a C-contiguous array of `dtype`, converted by every thread (NumPy's casts
    release the GIL), into memory recycled from call to call like a result's: W2's 64 MiB
    in float32 took 14 ms on one thread from fresh pages."""
    out = result_empty(x3.shape, dtype)
    if out.nbytes < PARALLEL_COPY_BYTES:
        threads = 1
    step = ceil_div(len(x3), threads) if len(x3) >= threads else None
    if step is None:  # too few batch items: cut along D
        step_d = ceil_div(x3.shape[1], threads)
        parts = [(slice(None), slice(i, i + step_d)) for i in range(0, x3.shape[1], step_d)]
    else:
        parts = [(slice(i, i + step),) for i in range(0, len(x3), step)]

    widen = (native.AVAILABLE and dtype == np.float32 and native.half_kind(x3.dtype)
             and x3.flags.c_contiguous)

    def copy(part):
        if widen:  # F16C, or bfloat16's shift: several times NumPy's cast
            return lambda: native.widen_half(x3[part], out[part])
        return lambda: np.copyto(out[part], x3[part], casting="unsafe")

    run_jobs([copy(p) for p in parts], threads)
    return out


def _bias_tables(plan: Plan, bias) -> list:
    """Per phase group, the bias of its phases side by side (one table per width): per
    conv group (a job's outputs), or, PLANAR, whose jobs write every conv group, and
    DEPTHWISE, whose channels are the groups, the C_out channels for each residue."""
    if bias is None:
        return [None] * len(plan.phase_groups)
    whole = plan.algorithm == Algorithm.PLANAR or native_mode(plan.spec) == native.DEPTHWISE
    groups = 1 if whole else plan.spec.groups
    tables: dict[int, np.ndarray] = {}
    for g in plan.phase_groups:
        if len(g) not in tables:
            tables[len(g)] = native.bias_table(bias, len(g), groups)
    return [tables[len(g)] for g in plan.phase_groups]


def repeat_channels(a: np.ndarray, m: int, dtype: np.dtype, threads: int = 1) -> np.ndarray:
    """a's last axis with each channel repeated m times in a row, in `dtype`: by the
    compiled kernel in pieces on the threads where `a` is already C-contiguous in `dtype`
    (float32 or float64), else one strided NumPy pass per repeat (np.repeat took 2.6 ms
    where these take 1.7, 2 -> 4 channels on 1097x941 pixels; but each pass sweeps all
    of the output: 12.5 ms for 4 channels repeated 7 times on 369779 pixels)."""
    out = result_empty((*a.shape[:-1], a.shape[-1] * m), dtype)  # no fresh pages
    if (native.AVAILABLE and a.dtype == dtype and dtype.itemsize in (4, 8)
            and a.flags.c_contiguous and a.size):
        _by_pixels(native.repeat_channels, a, out, threads, out.nbytes)
        return out
    for j in range(m):
        out[..., j::m] = a
    return out


def sum_repeats(a: np.ndarray, m: int, threads: int = 1) -> np.ndarray:
    """a's last axis summed over each run of m channels, in order (((r0 + r1) + r2) ...):
    `repeat_channels`' inverse, a channel multiplier's grad_input from that of its
    depthwise layer. By the compiled kernel in pieces on the threads where `a` is
    C-contiguous float32 or float64, else one strided NumPy pass per repeat."""
    out = result_empty((*a.shape[:-1], a.shape[-1] // m), a.dtype)
    if native.AVAILABLE and a.dtype.itemsize in (4, 8) and a.flags.c_contiguous and a.size:
        _by_pixels(native.sum_repeats, a, out, threads, a.nbytes)
        return out
    repeats = a.reshape(*out.shape, m)
    np.add(repeats[..., 0], repeats[..., 1], out=out)
    for j in range(2, m):
        out += repeats[..., j]
    return out


def _by_pixels(kernel, a: np.ndarray, out: np.ndarray, threads: int, nbytes: int) -> None:
    """kernel(src, dst, p0, p1) over the pixels (all axes but the last) of `a` and `out`,
    in pieces on the threads: one a MiB of `nbytes`, up to four a thread."""
    src, dst = a.reshape(-1, a.shape[-1]), out.reshape(-1, out.shape[-1])
    pieces = max(1, min(4 * threads, nbytes >> 20)) if threads > 1 else 1
    in_row_pieces(kernel, src, dst, src.shape[0], pieces, threads)


def in_row_pieces(kernel, src: np.ndarray, dst: np.ndarray, rows: int, pieces: int,
                  threads: int, *rest) -> None:
    """kernel(src, dst, r0, r1, *rest) over rows [0, rows) cut into `pieces` ranges, run
    on the threads (the compiled copies that release the GIL: `native.repeat_channels`,
    `sum_repeats`, `split_residues`, `planar_rows`)."""
    run_jobs([functools.partial(kernel, src, dst, rows * i // pieces, rows * (i + 1) // pieces,
                                *rest) for i in range(pieces)], threads)


def _planar_copy_elems(spec, slab: InputSlab) -> int:
    _, _, height, pitch = planar_geometry(spec)
    shape = (slab.n[1] - slab.n[0], slab.d[1] - slab.d[0], *spec.in_spatial[1:], spec.c_in)
    return native.planar_size(shape, height, pitch, spec.compute_dtype.itemsize)


def _planar_slab(spec, x3, slab: InputSlab, convert: bool, into: np.ndarray, threads: int):
    """The planar copy of a slab of x3 (`native.planar_copy`) into `into`, from the
    input in the compute dtype: the origin (address and element strides) that its tasks
    address planes of the whole input at, and the channel stride."""
    (n0, n1), (d0, d1) = slab.n, slab.d
    part = x3[n0:n1, d0:d1]
    if convert:
        part = _converted(part, spec.compute_dtype, threads)
    top, left, height, pitch = planar_geometry(spec)
    address, strides, channel_stride = native.planar_copy(
        part, top, left, height, pitch, into[:_planar_copy_elems(spec, slab)], threads)
    address -= (n0 * strides[0] + d0 * strides[1]) * into.itemsize
    return (address, strides), channel_stride


def _execute_native(plan: Plan, x3, w3, out, scratch: Scratch, bias=None) -> None:
    """The compiled kernel's tasks; packed weights live in `scratch` until they return.
    A plan's tasks are prepared in Python once per layout of the arrays and recorded; later
    calls run the recording at their own arrays' addresses (`_Recording`)."""
    spec = plan.spec
    planar = plan.algorithm == Algorithm.PLANAR
    mode = native.PLANAR if planar else native_mode(spec)
    phase_groups = plan.phase_groups
    if not planar and expands_to_depthwise(spec):  # each input channel repeated for its outputs
        x3 = repeat_channels(x3, spec.c_out_per_group, spec.compute_dtype, plan.threads)
    phase_group_weights = [w3] * len(phase_groups)
    tasks, channel_stride, x_read = plan.tasks, 0, x3
    convert = not native.reads_in_place(x3, spec.compute_dtype)
    if planar:
        slabs = plan.input_slabs or (InputSlab((0, spec.batch), (0, spec.in_spatial[0]),
                                               (0, len(tasks))),)
        x_read = scratch.empty(max(_planar_copy_elems(spec, s) for s in slabs),
                               spec.compute_dtype)
        planar_origin, channel_stride = _planar_slab(spec, x3, slabs[0], convert, x_read,
                                                     plan.threads)
        converts_slabs, convert = convert, False
    elif convert and native_whole_input_fits(spec, plan.workspace_limit):
        x3 = x_read = _converted(x3, spec.compute_dtype, plan.threads)  # once, for every phase
        convert = False
    elif convert and spec.input_dtype == spec.compute_dtype:
        # Channels not contiguous, where the plan assumed the input read in place (its
        # tiles are shared and hold no copy): tiles that copy their rows instead.
        tasks, _ = make_tasks(spec, Algorithm.NATIVE, plan.phase_groups, plan.workspace_limit,
                              plan.threads, False, False, convert_input=True)
    channels = spec.c_out if mode == native.DEPTHWISE else spec.groups
    layout = (native.isa(), x_read.shape, x_read.strides, out.shape, out.strides, out.dtype,
              tuple(w.strides for w in phase_group_weights), bias is None, convert,
              streams_output(out.nbytes))  # (the threshold is a module setting)
    biases = _bias_tables(plan, bias)
    # (the tasks of a planar copy in slabs are prepared for each slab's copy)
    recording = None if convert or plan.input_slabs else _Recording.find(plan, layout)
    if recording is not None:
        if mode in (native.CHANNELS, native.DOT):  # the recorded once-calls pack into a
            # block like it (CHANNELS), or the calls read the weights where they lie (DOT)
            sources = _distinct(_weight_sources(phase_group_weights, mode))
            block = scratch.empty(recording.block_size, spec.compute_dtype)
        else:  # packed now
            packed = _native_weights(phase_group_weights, _HashedOnce(phase_groups), channels,
                                     mode, scratch, plan.threads)
            sources, block = (), packed.block
        if recording.run(plan.threads, _recorded_arrays(x_read, out, block, sources, biases)):
            return
    packed = _native_weights(phase_group_weights, _HashedOnce(phase_groups), channels, mode,
                             scratch, plan.threads)
    weights = packed.per_phase_group
    offsets = [_native_offsets(g[0]) for g in phase_groups]
    residues = [native.residue_taps(g) if planar else None for g in phase_groups]
    x_origin = (planar_origin if planar else None if convert else native.origin(x3))

    def jobs_of(tasks, x_origin) -> list:
        return [_native_job(spec, x3, out, phase_groups[t.phase_group], weights[t.phase_group],
                            offsets[t.phase_group], t, convert, mode, x_origin, plan.threads,
                            bias=biases[t.phase_group], channel_stride=channel_stride,
                            residues=residues[t.phase_group])
                for t in tasks]

    buffer = max((t.buffer_elems for t in tasks), default=0)
    if plan.input_slabs:  # a slab's copy, then its tasks, slab after slab
        for i, slab in enumerate(plan.input_slabs):
            if i:
                x_origin, _ = _planar_slab(spec, x3, slab, converts_slabs, x_read, plan.threads)
            _run(jobs_of(tasks[slice(*slab.tasks)], x_origin), plan.threads, buffer,
                 spec.compute_dtype)
        return
    jobs = jobs_of(tasks, x_origin)
    if not convert and packed.sources is not None:
        _Recording.record(plan, layout, jobs, packed.block.size,
                          _recorded_arrays(x_read, out, packed.block, packed.sources, biases),
                          (offsets, residues, [w.keep[1] for w in weights if w.keep],
                           [w.offsets for w in weights]))
    _run(jobs, plan.threads, buffer, spec.compute_dtype)


def fill_unreached(spec, out: np.ndarray, bias: np.ndarray | None, threads: int = 1,
                   axes: tuple[int, ...] = (0, 1, 2)) -> None:
    """The output positions no tap reaches (where the stride passes the kernel's reach,
    a residue along some axis that no tap lands on) set to zero, or to the bias: one
    strided fill per such residue, where zeroing the whole output before the kernel
    stored the rest wrote most of it twice (8 -> 13 k3x4 s4 2-D: 17.6 MB zeroed, 1.7 ms
    of a 2.9 ms call, where its 4 unreached rows of 16 take 0.4). Only along `axes`
    (`planar` writes its rows whole). A compiled fill (`native.fill_call`) on the pool:
    NumPy's strided fill ran a scalar loop while the pool's threads waited (48 -> 256 k1
    s(1,4) 2-D, 3/4 of an 11.7 MB output: 2.5 -> 1.4 ms a call). In pieces on the threads
    for big outputs: 40 -> 4 g4 k3 s4 2-D fills 7/16 of a 58 MB output."""
    pieces = 4 * threads if threads > 1 and out.nbytes >= FILL_THREADS_FROM_BYTES else 1
    indices = _unreached_pieces(spec, axes, pieces)
    if not indices:
        return
    o = out.reshape(spec.batch, *spec.out_spatial, spec.c_out)
    if not native.AVAILABLE:
        for index in indices:
            np.copyto(o[index], 0 if bias is None else bias)
        return
    pixel = None if bias is None else np.ascontiguousarray(bias, out.dtype)
    native.run_tasks([native.Task((native.fill_call(o[index], pixel),)) for index in indices],
                     threads)


@functools.lru_cache(maxsize=64)
def _unreached_pieces(spec, axes: tuple[int, ...], pieces: int) -> tuple[tuple, ...]:
    """`fill_unreached`'s views of the output (N, D, H, W, C) as basic indices, each cut
    into up to `pieces` along the longest of batch, D and H. Worked out once per layer:
    ~15 us a call of small layers, where the kernel takes 0.3."""
    shape = (spec.batch, *spec.out_spatial, spec.c_out)
    phases = phases_3d(spec)
    views = []
    # Each position once: along an axis, its unreached residues within the residues the
    # axes before it reach (filling each axis's residues whole wrote 1.5x the output
    # where all three skip one of two: 131 -> 384 k1 s2).
    earlier = [[slice(None)]]  # the index prefixes (batch, then the axes before) not filled
    for axis in axes:
        unreached = {p.residue[axis] for p in phases if p.size and not p.axis_taps[axis]}
        reached = sorted({p.residue[axis] for p in phases if p.size} - unreached)
        step = spec.stride[axis]
        # each prefix up to this axis (axes not in `axes` whole)
        earlier = [prefix + [slice(None)] * (axis + 1 - len(prefix)) for prefix in earlier]
        views += [prefix + [slice(r, None, step)] for prefix in earlier for r in sorted(unreached)]
        earlier = [prefix + [slice(r, None, step)] for prefix in earlier for r in reached]
    out = []
    for view in views:
        index = view + [slice(None)] * (5 - len(view))
        extent = [len(range(*sl.indices(n))) for sl, n in zip(index, shape)]
        if 0 in extent:
            continue
        axis = max(range(3), key=lambda a: extent[a])
        start, _, step = index[axis].indices(shape[axis])
        cuts = min(pieces, extent[axis])
        for k in range(cuts):  # positions [a, b) of the view along the axis
            a, b = extent[axis] * k // cuts, extent[axis] * (k + 1) // cuts
            piece = list(index)
            piece[axis] = slice(start + a * step, start + b * step, step)
            out.append(tuple(piece))
    return tuple(out)


# Smaller outputs fill in one piece: one core's stores fill the memory's bandwidth (96 ->
# 16 k2 s2 d2, 4 MB with 7/8 unreached: 3-4% slower in pieces of NumPy's fill; of the
# compiled fill, outputs of 11.7 and 10 MB 5% and 3% slower; 8 -> 8 k2 s3 on 100^3, 855
# MB: 220 -> 178 ms with them).
FILL_THREADS_FROM_BYTES = 16 << 20


def _recorded_arrays(x_read, out, block, sources, bias_tables) -> list[np.ndarray]:
    """The arrays a recording's calls address, in one order: what the kernel reads as
    input, the output, the packed weights' block, the weights they are packed from, the
    bias tables (`_bias_tables`)."""
    return [x_read, out, block, *sources, *_distinct(t for t in bias_tables if t is not None)]


def _extent(a: np.ndarray) -> tuple[int, int]:
    """(address of the lowest byte, bytes) of the memory a's elements lie in."""
    if a.size == 0:
        return native.address(a), 0
    low = high = 0
    for n, st in zip(a.shape, a.strides):
        if st < 0:
            low += (n - 1) * st
        else:
            high += (n - 1) * st
    return native.address(a) + low, high - low + a.itemsize


class _Recording:
    """A native call's tasks, recorded (`native.program`) for later calls of its plan
    with arrays of the same layout: preparing a task in Python costs ~20 us, one per
    phase (64 at stride 4 in 3-D), where a small layer's kernel time is a millisecond.
    A later call moves each recorded address into its own arrays (`native.run_program`).
    Recordings hold no array of a call: only tap offsets and pack tables, which stay."""

    # Recordings kept, the least recently used dropped first: each holds its layer's pack
    # tables (taps x C_out int64, 1 MiB for 384 outputs of a k7 kernel) past their cache.
    HELD = 16
    _held: dict = {}
    _lock = threading.Lock()

    def __init__(self, plan: Plan, program, extents: list, block_size: int, keep) -> None:
        self.plan = plan  # held, so that id(plan) names no other plan meanwhile
        self.program = program
        self.extents = extents
        self.block_size = block_size
        self.keep = keep

    @classmethod
    def find(cls, plan: Plan, layout: tuple) -> _Recording | None:
        with cls._lock:
            found = cls._held.pop((id(plan), layout), None)
            if found is not None:
                cls._held[(id(plan), layout)] = found  # the most recently used now
            return found

    @classmethod
    def record(cls, plan: Plan, layout: tuple, jobs: list, block_size: int,
               arrays: list[np.ndarray], keep) -> None:
        if not jobs or not all(isinstance(j, native.Task) for j in jobs):
            return
        extents = [_extent(a) for a in arrays]
        spans = sorted((lo, lo + n) for lo, n in extents if n)
        if any(a_hi > b_lo for (_, a_hi), (b_lo, _) in zip(spans, spans[1:])):
            return  # arrays that overlap: an address would not say which one it is in
        program = native.program(jobs, [(lo, n, lo) for lo, n in extents])
        if program is None:  # a call addresses something else: not recordable
            return
        with cls._lock:
            cls._held[(id(plan), layout)] = cls(plan, program, extents, block_size, keep)
            while len(cls._held) > cls.HELD:
                cls._held.pop(next(iter(cls._held)))

    def run(self, threads: int, arrays: list[np.ndarray]) -> bool:
        """Run at these arrays (the recorded ones' sizes); False, running nothing, where
        they differ from those recorded."""
        extents = [_extent(a) for a in arrays]
        if len(extents) != len(self.extents) or any(
                n != m for (_, n), (_, m) in zip(extents, self.extents)):
            return False
        native.run_program(self.program, threads,
                           [(lo, n, new) for (lo, n), (new, _) in zip(self.extents, extents)])
        return True


def padded_along_w(a: np.ndarray, left: int, width: int, dtype: np.dtype,
                   threads: int) -> np.ndarray:
    """a (N, D, H, W, C) in `dtype`, `left` zeros before each row and zeros after it up to
    `width`: the input that a run of W taps read as one (the gradients' W-padded
    cotangent) never leaves. `a` itself where no run leaves it and the kernel reads it in
    place (k2 s2: 44 MB of cotangent copied for nothing took half of grad_input's time).
    Row by row in the compiled kernel (the zeros, then the row), in pieces on the
    threads: NumPy's strided fills of each row's few padding values and its copy took
    1.4 ms of 64 -> 3 k4 s4's 3.6 ms grad_input (a 7 MB cotangent)."""
    n, d, h, w, c = a.shape
    if left == 0 and width == w and native.reads_in_place(a, dtype):
        return a
    padded = result_empty((n, d, h, width, c), dtype)
    if native.AVAILABLE and a.dtype == dtype and a.flags.c_contiguous:
        rows = n * d * h
        rows_in, out = a.reshape(rows, w, c), padded.reshape(rows, 1, width, c)
        pieces = 1 if padded.nbytes < PARALLEL_COPY_BYTES else max(1, min(rows, 4 * threads))
        in_row_pieces(native.split_residues, rows_in, out, rows, pieces, threads, left)
        return padded
    padded[:, :, :, :left] = 0
    padded[:, :, :, left + w:] = 0
    if padded.nbytes < PARALLEL_COPY_BYTES:  # a hand-off to the threads costs more
        np.copyto(padded[:, :, :, left:left + w], a, casting="unsafe")
        return padded
    run_jobs([functools.partial(np.copyto, padded[i, :, :, left:left + w], a[i],
                                casting="unsafe") for i in range(n)], threads)
    return padded


def pair_weight(w3: np.ndarray, order: tuple[int, int, int]) -> np.ndarray:
    """Winograd F(2,3)'s weight side along D: from the D taps g0, g1, g2 (kernel indices
    `order`, in order of input offset), the four (g0, (g0 + g1 + g2) / 2,
    (g0 - g1 + g2) / 2, g2), as a weight (C_out, 4, kH, kW, C_in/g)."""
    g0, g1, g2 = (w3[:, k] for k in order)
    u = np.empty((w3.shape[0], 4, *w3.shape[2:]), w3.dtype)
    u[:, 0] = g0
    u[:, 3] = g2
    np.add(g0, g2, out=u[:, 1])
    np.multiply(u[:, 1], 0.5, out=u[:, 1])  # halves are exact: one rounding, as in the sum
    np.multiply(g1, 0.5, out=u[:, 2])
    np.subtract(u[:, 1], u[:, 2], out=u[:, 2])
    np.add(u[:, 1], np.multiply(g1, 0.5), out=u[:, 1])
    return u


def pair_input(x3: np.ndarray, base: int, winograd_pairs: int, threads: int) -> np.ndarray:
    """Winograd F(2,3)'s input side along D (`native.pair_transform`) of x3 (N, D, H, W,
    C; the compute dtype, channels contiguous), for output pairs [0, winograd_pairs) whose
    first D tap reads input 2j + base: V (N, winograd_pairs, 4, H, W, C), by every thread."""
    n, in_d, h, w, c = x3.shape
    v = result_empty((n, winograd_pairs, 4, h, w, c), x3.dtype)
    x_addr, xs = native.origin(x3)
    cuts = [(i, j) for i in range(n) for j in range(winograd_pairs)]
    step = ceil_div(len(cuts), threads)
    transforms = []
    for first in range(0, len(cuts), step):
        calls: list = []
        (i0, j0), (i1, j1) = cuts[first], cuts[min(len(cuts), first + step) - 1]
        for i in range(i0, i1 + 1):  # a run of (item, pair)s, item by item
            native.pair_transform(x_addr, xs, in_d, base, (h, w, c), v, (i, i + 1),
                                  (j0 if i == i0 else 0,
                                   j1 + 1 if i == i1 else winograd_pairs),
                                  into=calls)
        transforms.append(native.Task(tuple(calls)))
    native.run_tasks(transforms, threads)
    return v


def _execute_winograd(plan: Plan, x3, w3, out, scratch: Scratch, bias=None) -> None:
    """Winograd F(2,3) along D: V, the input transformed along D, by every thread; then
    native tiles of the pair phases weigh V by the transformed weight."""
    spec = plan.spec
    if not native.reads_in_place(x3, spec.compute_dtype):
        x3 = _converted(x3, spec.compute_dtype, plan.threads)
    base, order = pair_base(spec)
    n, (_, h, w), c = spec.batch, spec.in_spatial, spec.c_in
    winograd_pairs = pair_count(spec)
    v = pair_input(x3, base, winograd_pairs, plan.threads)
    u = pair_weight(w3, order)
    weights = _native_weights([u] * len(plan.phase_groups), _HashedOnce(plan.phase_groups),
                              spec.groups, native.CHANNELS, scratch,
                              plan.threads).per_phase_group
    offsets = [_native_offsets(g[0]) for g in plan.phase_groups]
    v_origin = native.origin(v.reshape(n, 4 * winograd_pairs, h, w, c))
    biases = _bias_tables(plan, bias)
    jobs = [_native_job(spec, v, out, plan.phase_groups[t.phase_group], weights[t.phase_group],
                        offsets[t.phase_group], t, False, native.CHANNELS, v_origin, plan.threads,
                        pair_dims=(4 * winograd_pairs, h, w), bias=biases[t.phase_group])
            for t in plan.tasks]
    _run(jobs, plan.threads, 0, spec.compute_dtype)




def run_tiles(plan: Plan, jobs: list) -> None:
    """The plan's tile jobs on its threads, each thread with a buffer for the biggest."""
    buffer = max((t.buffer_elems for t in plan.tasks), default=0)
    _run(jobs, plan.threads, buffer, plan.spec.compute_dtype)


def _all_finite(x3: np.ndarray, threads: int) -> bool:
    """Whether x3 holds no infinity or NaN: its sum is finite (a finite sum that
    overflows reads as not: its plan is then one that is right either way). Summed in
    pieces on the threads (NumPy sums without the GIL) where it is big."""
    def total(a):
        with np.errstate(over="ignore", invalid="ignore"):  # (the answer, not a warning)
            return np.add.reduce(a, axis=None)

    if x3.nbytes < PARALLEL_COPY_BYTES or threads == 1:
        return bool(np.isfinite(total(x3)))
    flat = x3.reshape(len(x3), -1) if len(x3) >= threads else x3.reshape(-1, x3.shape[-1])
    bounds = np.linspace(0, len(flat), threads + 1).astype(int)
    sums = [0.0] * threads

    def part(i):
        return lambda: sums.__setitem__(i, total(flat[bounds[i]:bounds[i + 1]]))

    run_jobs([part(i) for i in range(threads)], threads)
    return bool(np.isfinite(total(np.array(sums))))


def execute(plan: Plan, x: np.ndarray, w: np.ndarray,
            bias: np.ndarray | None = None) -> np.ndarray:
    """Run a plan on arrays that match its spec; returns a new C-contiguous array.
    `bias`: None, or (C_out,) of the compute dtype (`_spec.check_bias`), added to every
    output as the kernels store it."""
    spec = plan.spec
    kernel = registry()[plan.algorithm]
    if kernel.compiled:
        native.warm(plan.threads)  # the pool's threads wake while this prepares their work
    # Kernels that store every output element need no zeroing (a pass over the output);
    # the others accumulate into it, or leave phases no tap reaches at zero.
    fills = kernel.writes_every_output(spec)
    alloc = result_empty if fills else result_zeros
    if bias is not None and not fills:
        alloc = result_empty
    out = alloc((spec.batch, *spec.out_spatial, spec.c_out), spec.result_dtype)
    if bias is not None and not fills:
        # Positions that no tap reaches hold the bias alone; the kernels overwrite the rest
        # with their sums plus the bias (this pass stands for the zeroing).
        out[...] = bias
    if not plan.tasks:
        return out.reshape(spec.output_shape)
    x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
    if plan.phantoms and not _all_finite(x3, plan.threads):
        plan = finite_plan(plan)
    # Read-only below: no copy when the caller's weight already has the compute dtype.
    w3 = w.reshape(spec.c_out, *spec.kernel, spec.c_in_per_group)
    w3 = w3.astype(spec.compute_dtype, copy=False)
    kernel.run(plan, x3, w3, out, bias)
    return out.reshape(spec.output_shape)
