"""The gradient's paths on the compiled kernel (csrc/), for the plan's choices (`_vjp`):
grad_input as a correlation of the cotangent (channels swapped; W taps as one, or Winograd
pairs along D), grad_weight in one of its layouts (`_vjp.grad_weight_layout`), or both in one
pass. Each prepares kernel calls as tasks for the compiled pool, run at once or left in a
shared queue (`defer`). Workers own disjoint units or rows, or one partial sum each added
in worker order: bitwise reproducible for a given thread count.
"""

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import numpy as np

from . import _native_kernel as native
from ._execute import (
    group_stride,
    groups_in_one_call,
    in_row_pieces,
    pack_columns_on_threads,
    padded_along_w,
    pair_input,
    pair_weight,
    run_jobs,
)
from ._geometry import ceil_div
from ._memory import Scratch
from ._native_kernel import GradWeightLayout
from ._plan import (
    FUSE_W_BELOW_CHANNELS,
    SHARED_TILE_BYTES,
    Tile,
    cut_rows,
    native_mode,
    split_tiles,
    streams_output,
)
from ._spec import ConvSpec
from ._vjp_tiles import input_tiles, sum_in_order


def grad_input_wide_w(spec: ConvSpec) -> bool:
    """Whether grad_input sums every W tap as one: with dilation 1 along W, input pixel i
    meets cotangent pixels i*s - p + k for k in [0, kW), one run of kW * C_out values (one
    conv group) in a cotangent padded along W."""
    return (spec.groups == 1 and spec.dilation[2] == 1 and spec.kernel[2] > 1
            and spec.c_out < FUSE_W_BELOW_CHANNELS)


@functools.lru_cache(maxsize=256)
def grad_input_kernel_spec(spec: ConvSpec) -> ConvSpec:
    """grad_input as the kernel sees it: channels swapped (it sums C_out/g, writes C_in/g)
    and, with `grad_input_wide_w`, one W tap of kW * C_out channels. For the kernel's
    mode and rate only."""
    if grad_input_wide_w(spec):
        return dataclasses.replace(spec, c_in=spec.c_out * spec.kernel[2], c_out=spec.c_in,
                                   kernel=(*spec.kernel[:2], 1))
    return dataclasses.replace(spec, c_in=spec.c_out, c_out=spec.c_in)


def grad_input_w_taps_as_one(spec: ConvSpec) -> bool:
    """Whether the kernel's grad_input sums W taps as one (`grad_input_wide_w`; never for
    depthwise layers)."""
    depthwise = spec.c_in_per_group == 1 and spec.c_out_per_group == 1
    return not depthwise and grad_input_wide_w(spec)


def grad_input_mode(spec: ConvSpec) -> native.Mode:
    """The kernel's vector layout for grad_input."""
    if spec.c_in_per_group == 1 and spec.c_out_per_group == 1:
        return native.DEPTHWISE
    return native_mode(grad_input_kernel_spec(spec), weight_in_place=False)


@functools.lru_cache(maxsize=64)  # a table is taps x C_in/g int64: bounded memory
def _grad_input_tables(ktot: int, cig: int, groups: int, cog: int, s_co: int, s_tap: int,
                       s_ci: int) -> tuple[np.ndarray, ...]:
    """Per conv group, the pack table of grad_input's weight [tap][co][ci]: the offset of
    each (tap, ci)'s element for co = 0, for a weight of these element strides."""
    start = np.arange(ktot)[:, None] * s_tap + np.arange(cig)[None, :] * s_ci
    tables = []
    for g in range(groups):
        table = np.ascontiguousarray(start + g * cog * s_co, np.int64)
        table.flags.writeable = False  # shared by every call with these strides
        tables.append(table)
    return tuple(tables)


@functools.lru_cache(maxsize=256)
def tap_offsets(spec: ConvSpec) -> native.TapOffsets:
    """Per axis, the cotangent offset k * dilation - padding of every tap k."""
    return native.TapOffsets(np.arange(k, dtype=np.int64) * d - p
                             for k, d, p in zip(spec.kernel, spec.dilation, spec.pad_lo))


@functools.lru_cache(maxsize=256)
def _pair_offsets(spec: ConvSpec) -> native.TapOffsets:
    """`tap_offsets` with D's taps the four planes of V (offsets 0-3, read at step 4)."""
    taps = tap_offsets(spec)
    return native.TapOffsets([np.arange(4), taps[1], taps[2]])


def grad_input(spec, c3, w3, gx, n_threads, budget, compute_dtype,
               defer: list | None = None, winograd: bool = False,
               padded: tuple[np.ndarray, int] | None = None,
               residues: tuple[np.ndarray, native.TapOffsets] | None = None) -> None:
    """grad_input[n, i, ci] = sum over taps k and co of g[n, i*s + k*d - p, co] W[co, k, ci]:
    the kernel with the cotangent as its input (step s, offsets k*d - p, every tap) and
    grad_input as its output, tile by tile on the workers. A cotangent of another dtype,
    or with channels not contiguous, is converted plane by plane as a tile needs it.
    `winograd` (the plan's choice: its grad_input step WINOGRAD): Winograd F(2,3) along D: the
    kernel reads the transformed cotangent V with the transformed weight, and a tile's
    rows are pairs of grad_input planes. `padded`: the W-padded cotangent and its left
    padding, made for both gradients (`padded_cotangent_for_both`), where W taps sum as
    one. `residues`: a depthwise layer's cotangent split by W residue, made for both
    (`residues_for_both`)."""
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    item = compute_dtype.itemsize
    offsets = tap_offsets(spec)
    ktot = math.prod(spec.kernel)
    depthwise = cig == 1 and cog == 1
    wide = grad_input_w_taps_as_one(spec)
    mode = grad_input_mode(spec)
    # (a fan-out, depthwise by its swapped spec alone, goes to `_fan_out_grad_input`)
    assert depthwise or mode != native.DEPTHWISE
    winograd_pairs = ceil_div(spec.in_spatial[0], 2) if winograd else 0  # the plan's choice
    source, in_dims, steps = c3, spec.out_spatial, spec.stride
    if depthwise and _by_residue(spec, compute_dtype):
        c3, offsets = residues or _residues_along_w(spec, c3, compute_dtype, n_threads)
        source, in_dims, steps = c3, (*in_dims[:2], c3.shape[3]), (*steps[:2], 1)
    pad = None  # (left, width): each tile pads along W the cotangent rows it reads
    if wide:  # one W tap of kW * C_out channels over the cotangent padded along W
        kw = spec.kernel[2]
        if _pads_by_tile(spec, c3, compute_dtype, padded, kw):
            left, width = pad = _cotangent_padding(spec, kw)
        else:  # padded whole (made for both gradients, or here), or read in place
            c3, left = padded or _padded_cotangent(spec, c3, compute_dtype, n_threads, kw)
            source, width = c3, c3.shape[3]
        w3 = _wide_weight(spec, w3, compute_dtype)
        in_dims = (*spec.out_spatial[:2], width - kw + 1)
        offsets, cog, ktot = _wide_offsets(spec, left), kw * spec.c_out, w3.shape[1]
    if depthwise:  # [tap][channel], every channel in one pass
        packed = [np.ascontiguousarray(w3[:, :, 0].T, dtype=compute_dtype)]
    elif mode == native.DOT:  # [tap][ci][co] per group: vectors along the co summed
        w4 = np.ascontiguousarray(w3.reshape(groups, cog, ktot, cig).transpose(0, 2, 3, 1),
                                  dtype=compute_dtype)
        packed = list(w4)
    else:  # [tap][co][ci] per group (rows co, columns ci), gathered from w3 in one pass
        w3 = w3.astype(compute_dtype, copy=False)
        if winograd_pairs:  # the D taps, in order of offset k - p, transformed into four
            w3 = pair_weight(w3.reshape(spec.c_out, *spec.kernel, cig), (0, 1, 2))
            w3 = w3.reshape(spec.c_out, -1, cig)
            ktot = w3.shape[1]
        strides = native.element_strides(w3)
        if strides is None:
            w3 = np.ascontiguousarray(w3)
            strides = native.element_strides(w3)
        s_co, s_tap, s_ci = strides
        packed = pack_columns_on_threads(
            w3, _grad_input_tables(ktot, cig, groups, cog, s_co, s_tap, s_ci), cog, s_co,
            n_threads)
    convert = pad is not None or not native.reads_in_place(c3, compute_dtype)
    per_row = spec.c_out * max(1, spec.stride[0] * spec.stride[1])  # slab elements per gx row
    if pad is not None:  # a tile at a time per thread, each padding what it reads
        tiles = _pad_tiles(spec, min(PAD_TILE_BYTES, budget * item), item, 4 * n_threads)
    elif convert:  # a tile at a time per thread, each converting what it reads
        tiles = input_tiles(spec, max(1, budget // per_row), 4 * n_threads)
    elif winograd_pairs:  # tiles of pair rows, shared as below
        tiles = split_tiles(spec.batch, (winograd_pairs, *spec.in_spatial[1:]),
                            SHARED_TILE_BYTES // (item * (spec.c_in + spec.c_out)), 1)
    else:  # threads share each tile's rows (as the forward's): cut only for locality,
        # and long rows along W (`cut_rows`)
        max_rows = SHARED_TILE_BYTES // (item * (spec.c_in + spec.c_out))
        tiles = cut_rows(input_tiles(spec, max_rows, 1), spec.in_spatial[2], n_threads,
                         max_rows)
    sharers = 1 if convert else n_threads
    oh, out_w = spec.out_spatial[1:]
    stream = streams_output(gx.nbytes)
    if winograd_pairs:
        source = pair_input(c3, int(offsets[0][0]), winograd_pairs, n_threads)
        source = source.reshape(spec.batch, 4 * winograd_pairs, *source.shape[3:])
        in_dims, steps = (4 * winograd_pairs, oh, out_w), (4, *spec.stride[1:])
        offsets = _pair_offsets(spec)

    # every conv group in one call, each row's groups in turn, where the forward's rule
    # says so (a call per group streamed the whole cotangent once per group, each reading
    # its own channels of every line: 16 -> 32 g2 k2 s2, a 25 MB cotangent, 5.8 -> 5.1 ms)
    together = groups_in_one_call(grad_input_kernel_spec(spec), mode, item)
    group_w = group_stride(packed, item)

    def job_for(tile):
        cursors = native.RowCursors(1 if together else groups, sharers)
        n0, n1 = tile.n
        box = (n0, n1, *tile.d, *tile.h)
        rows_d = (slice(2 * tile.d[0], min(2 * tile.d[1], spec.in_spatial[0])) if winograd_pairs
                  else slice(*tile.d))
        w0, w1 = tile.w or (0, spec.in_spatial[2])  # a piece of long rows (`cut_rows`)
        target = gx[n0:n1, rows_d, tile.h[0]:tile.h[1], w0:w1]
        o_addr, os_ = native.origin(target)
        at = offsets.along_w(w0 * steps[2])

        def calls(x_addr, xs, into=None) -> None:
            if depthwise:
                native.correlate(native.DEPTHWISE, item, native.HALF_NONE, stream, x_addr, xs,
                                 in_dims, packed[0], at, steps, o_addr,
                                 os_, box, w1 - w0, groups, groups,
                                 cursors.address(0), sharers, into=into)
                return
            pair_out = spec.in_spatial[0] if winograd_pairs else 0
            if together:
                native.correlate(mode, item, native.HALF_NONE, stream, x_addr, xs, in_dims,
                                 packed[0], at, steps, o_addr, os_, box, w1 - w0, cog, cig,
                                 cursors.address(0), sharers, into=into, pair_out=pair_out,
                                 groups=groups, group_w=group_w, group_out=cig)
                return
            for g in range(groups):
                native.correlate(mode, item, native.HALF_NONE, stream,
                                 x_addr + g * cog * item, xs, in_dims, packed[g],
                                 at, steps, o_addr + g * cig * item, os_, box,
                                 w1 - w0, cog, cig, cursors.address(g), sharers,
                                 into=into, pair_out=pair_out)

        if not convert:  # in place: a task for the compiled pool
            prepared: list = []
            calls(*native.origin(source), prepared)
            return native.Task(tuple(prepared), sharers > 1, None,
                               (cursors, packed, source, offsets))

        def job():  # the cotangent rows this tile's taps read, converted (and padded)
            with Scratch() as scratch:
                slab, first = _cotangent_rows(spec, c3, tile, offsets, compute_dtype, pad,
                                              scratch)
                calls(*native.origin(slab, first))  # the slab holds every row read
        return job

    _run_or_defer([job_for(t) for t in tiles], n_threads, lambda: None, defer)


def _cotangent_padding(spec: ConvSpec, reach: int) -> tuple[int, int]:
    """(left padding, width) of a cotangent padded with zeros along W so that for every
    input pixel i the `reach` cotangent pixels from i*s - p on lie inside it (the W-tap
    runs of `grad_input_wide_w` and `grad_weight_wide_w`)."""
    pad, in_w, out_w = spec.padding[2], spec.in_spatial[2], spec.out_spatial[2]
    left = max(0, pad)
    return left, max(out_w + left, (in_w - 1) * spec.stride[2] - pad + reach + left)


def _padded_cotangent(spec, c3, compute_dtype, threads, reach: int) -> tuple[np.ndarray, int]:
    """The cotangent in the compute dtype padded along W (`_cotangent_padding`), and its
    left padding."""
    left, width = _cotangent_padding(spec, reach)
    return padded_along_w(c3, left, width, compute_dtype, threads), left


def _grad_weight_reach(spec: ConvSpec, compute_dtype: np.dtype) -> int:
    """The cotangent pixels a `grad_weight_wide_w` run reads: kW * C_out values rounded
    up to whole vectors (so at least kW pixels, grad_input's run)."""
    lanes, _ = native.layout(compute_dtype.itemsize)
    return ceil_div(ceil_div(spec.kernel[2] * spec.c_out, lanes) * lanes, spec.c_out)


def padded_cotangent_for_both(spec, c3, compute_dtype, threads
                              ) -> tuple[np.ndarray, int] | None:
    """Where grad_input and grad_weight both sum W taps as one: the W-padded cotangent,
    made once, wide enough for grad_weight's runs and so for grad_input's; None where
    their tiles pad the rows they read (`_pads_by_tile`)."""
    reach = _grad_weight_reach(spec, compute_dtype)
    if _pads_by_tile(spec, c3, compute_dtype, None, reach):
        return None
    return _padded_cotangent(spec, c3, compute_dtype, threads, reach)


@functools.lru_cache(maxsize=256)  # prepared calls hold the arrays' addresses only: the
def _wide_offsets(spec: ConvSpec, left: int) -> native.TapOffsets:  # cache keeps them alive
    """The tap offsets of a W-padded cotangent read with one W tap (its run's start)."""
    base = tap_offsets(spec)
    return native.TapOffsets([base[0], base[1], np.array([left - spec.padding[2]])])


# From this size of cotangent on, W-tap runs (grad_input's, grad_weight's) read it padded
# along W by tiles, each padding the rows it reads as it copies them (as a conversion),
# not padded whole (written to memory and read back): grad_input alone, 32 -> 5 k4 s3 on a
# 38 MB cotangent 11.6 -> 10.5 ms, 3 -> 8 k3 s2 on 57 and 60 MB 13.2 -> 9.0 and 13.5 -> 8.4;
# grad_weight alone on those 15.7 -> 12.0 and 15.2 -> 10.6; both 22.1 -> 20.4 and 23.7 ->
# 21.4 (they shared one whole copy). Below it, where the copy stays in the last-level
# cache, the tiles cost more (grad_input on 4.6 MB: 3.2 -> 4.2 ms).
PAD_BY_TILE_FROM_BYTES = 32 << 20
# The padded rows of such a tile: with 1 MiB both gradients of 3 -> 8 k3 s2 ran 1.2x as
# long, each tile copying again the rows its taps share with its neighbours'.
PAD_TILE_BYTES = 4 << 20


def _pads_by_tile(spec: ConvSpec, c3: np.ndarray, compute_dtype: np.dtype,
                  padded: tuple[np.ndarray, int] | None, reach: int) -> bool:
    """Whether W-tap runs of `reach` pixels read the cotangent padded by their tiles
    (`PAD_BY_TILE_FROM_BYTES`), unless made for both gradients already, or read in place
    where no run leaves it."""
    left, width = _cotangent_padding(spec, reach)
    in_place = left == 0 and width == c3.shape[3] and native.reads_in_place(c3, compute_dtype)
    return (padded is None and not in_place
            and c3.size * compute_dtype.itemsize >= PAD_BY_TILE_FROM_BYTES)


def _wide_weight(spec: ConvSpec, w3: np.ndarray, compute_dtype: np.dtype) -> np.ndarray:
    """`grad_input_wide_w`'s weight, (kW * C_out, kD * kH, C_in): row k * C_out + co is tap
    k's channel co."""
    kd, kh, kw = spec.kernel
    w5 = w3.reshape(spec.c_out, kd, kh, kw, spec.c_in)
    wide_w = np.ascontiguousarray(w5.transpose(3, 0, 1, 2, 4), dtype=compute_dtype)
    return wide_w.reshape(kw * spec.c_out, kd * kh, spec.c_in)


def _cotangent_rows(spec: ConvSpec, c3: np.ndarray, tile: Tile, offsets: native.TapOffsets,
                    compute_dtype: np.dtype, pad: tuple[int, int] | None, scratch: Scratch
                    ) -> tuple[np.ndarray, tuple[int, int, int]]:
    """The cotangent planes and rows that a tile of input rows reads through taps at
    `offsets` (D and H), in the compute dtype and, with `pad` (left, width), padded along
    W, in `scratch` (retained memory: fresh 4 MiB slabs cost their page faults, 60 us a
    MiB, on every call); and the (n, d, h) index its first row stands for."""
    (sd, sh, _), (od, oh, out_w) = spec.stride, spec.out_spatial
    n0, n1 = tile.n
    d0 = min(od, max(0, tile.d[0] * sd + int(offsets[0][0])))
    d1 = max(d0, min(od, (tile.d[1] - 1) * sd + int(offsets[0][-1]) + 1))
    h0 = min(oh, max(0, tile.h[0] * sh + int(offsets[1][0])))
    h1 = max(h0, min(oh, (tile.h[1] - 1) * sh + int(offsets[1][-1]) + 1))
    left, width = pad or (0, out_w)
    shape = (n1 - n0, d1 - d0, h1 - h0, width, spec.c_out)
    slab = scratch.empty(math.prod(shape), compute_dtype).reshape(shape)
    slab[:, :, :, :left] = 0
    slab[:, :, :, left + out_w:] = 0
    slab[:, :, :, left:left + out_w] = c3[n0:n1, d0:d1, h0:h1]
    return slab, (n0, d0, h0)


def _pad_tiles(spec: ConvSpec, nbytes: int, item: int, min_tiles: int) -> list[Tile]:
    """Tiles of input rows whose padded cotangent rows (`_cotangent_rows`) take about
    `nbytes` (PAD_TILE_BYTES)."""
    per_row = spec.c_out * math.prod(spec.stride)  # cotangent elements per input pixel
    return input_tiles(spec, max(1, nbytes // (item * per_row)), min_tiles)


def _wide_grad_weight(spec, x3, c3, gw, n_threads, compute_dtype, defer: list | None,
                      padded_cotangent: tuple[np.ndarray, int] | None = None) -> None:
    """grad_weight by `grad_weight_wide_w`: per conv group, sums (kD * kH taps, C_in/g,
    columns) over a W-padded cotangent (`padded_cotangent`, if made already; by tiles that
    pad the rows they read where `_pads_by_tile`), columns k * C_out + co, then its own
    channels laid out as gw (C_out, taps, C_in/g)."""
    kd, kh, kw = spec.kernel
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    lanes, _ = native.layout(compute_dtype.itemsize)
    cols = ceil_div(kw * spec.c_out, lanes) * lanes
    reach = _grad_weight_reach(spec, compute_dtype)
    by_tile = _pads_by_tile(spec, c3, compute_dtype, padded_cotangent, reach)
    if by_tile:  # each tile pads the cotangent rows it reads, as grad_input's do
        (left, width), padded = _cotangent_padding(spec, reach), None
    else:
        padded, left = padded_cotangent or _padded_cotangent(spec, c3, compute_dtype,
                                                             n_threads, reach)
        width = padded.shape[3]
    taps = kd * kh
    units = native.gw_units(taps, cols, compute_dtype.itemsize)
    offsets = _wide_offsets(spec, left)

    def calls_for(part, box, ranges, zero, w=None, rows=None) -> list:
        """`rows`: the tile's padded cotangent rows and the index of the first."""
        g, first = rows or (padded, (0, 0, 0))
        calls: list = []
        for group in range(groups):
            native.grad_weight(False, x3, group * cig, g, 0, offsets, spec.stride, part, box,
                               cin=cig, cout=cols, units=ranges, zero=zero,
                               strides=(cols, cig * cols), part_offset=group * taps * cig * cols,
                               into=calls, w=w, g_first=first,
                               g_dims=(*spec.out_spatial[:2], width))
        return calls

    if by_tile:  # workers own tiles of input rows and a partial each
        tiles = _pad_tiles(spec, PAD_TILE_BYTES, compute_dtype.itemsize, n_threads)
        workers = min(n_threads, len(tiles))
        parts = [native.aligned_empty((groups * taps * cig * cols,), compute_dtype)
                 for _ in range(workers)]

        def job(j: int) -> None:
            for i, tile in enumerate(tiles[j::workers]):
                with Scratch() as scratch:
                    rows = _cotangent_rows(spec, c3, tile, offsets, compute_dtype,
                                           (left, width), scratch)
                    native.Task(tuple(calls_for(parts[j], (*tile.n, *tile.d, *tile.h),
                                                [(0, units)], i == 0, rows=rows)),
                                keep=(parts[j], rows)).run_here()

        jobs = [functools.partial(job, j) for j in range(workers)]
    elif n_threads == 1 or units >= 2 * n_threads:  # workers share out the (tap, chunk) units
        part = native.aligned_empty((groups * taps * cig * cols,), compute_dtype)
        workers = min(n_threads * (2 if defer is not None else 1), units)
        ranges = [(units * j // workers, units * (j + 1) // workers) for j in range(workers)]
        box = (0, spec.batch, 0, spec.in_spatial[0], 0, spec.in_spatial[1])
        per_group = [calls_for(part, box, [r], True) for r in ranges]
        jobs = [native.Task(tuple(calls), keep=(part, padded)) for calls in per_group]
        parts = [part]
    else:  # too few units (a 2-D layer's kH taps): workers own row tiles and a partial each
        tiles = _grad_weight_row_tiles(spec, n_threads)
        workers = min(n_threads, len(tiles))
        parts = [native.aligned_empty((groups * taps * cig * cols,), compute_dtype)
                 for _ in range(workers)]
        jobs = [native.Task(tuple(call for i, tile in enumerate(tiles[j::workers])
                                  for call in calls_for(parts[j], (*tile.n, *tile.d, *tile.h),
                                                        [(0, units)], i == 0, tile.w)),
                            keep=(parts[j], padded))
                for j in range(workers)]

    def finish() -> None:
        sums = sum_in_order(parts).reshape(groups, taps, cig, cols)[..., :kw * spec.c_out]
        sums = sums.reshape(groups, taps, cig, kw, groups, cog)
        own = sums[np.arange(groups), :, :, :, np.arange(groups)]  # (G, taps, cig, kw, cog)
        gw.reshape(groups, cog, taps, kw, cig)[...] = own.transpose(0, 4, 1, 3, 2)

    _run_or_defer(jobs, n_threads, finish, defer)


def grad_weight(spec, x3, c3, gw, n_threads, layout: GradWeightLayout, compute_dtype,
                defer: list | None = None,
                padded: tuple[np.ndarray, int] | None = None,
                residues: tuple[np.ndarray, native.TapOffsets] | None = None,
                planar: np.ndarray | None = None) -> None:
    """grad_weight as one GEMM per tap reduced along the pixels, in registers (see
    csrc/grad_weight.hpp). Workers own disjoint (tap, column chunk) units over every pixel,
    so there is no partial sum to add and the bits do not depend on the thread count;
    swapped (vectors along C_in) the sums land in gw in place, otherwise in the packed
    layout, then unpacked. With too few units to share (a 1x1x1 kernel), workers own
    fixed tiles of input rows and one partial sum each, added in worker order (bitwise
    reproducible for a thread count). `defer`: append (jobs, finish) to it instead of
    running them, to share one queue with grad_input's tiles. `padded`: for layout WIDE,
    the W-padded cotangent if made already (`padded_cotangent_for_both`); `residues`, for
    DEPTHWISE, the cotangent split by W residue (`residues_for_both`); `planar`, for
    PLANAR, the planar cotangent (`planar_cotangent`). SIDE_BY_SIDE runs as ALONG_IN over
    one group of every group's channels (`groups_side_by_side`)."""
    if layout == GradWeightLayout.DEPTHWISE:
        _depthwise_grad_weight(spec, x3, c3, gw, n_threads, compute_dtype, defer, residues)
        return
    if layout == GradWeightLayout.WIDE:
        _wide_grad_weight(spec, x3, c3, gw, n_threads, compute_dtype, defer, padded)
        return
    if layout == GradWeightLayout.PLANAR:
        _planar_grad_weight(spec, x3, c3, gw, n_threads, compute_dtype, planar)
        return
    side = layout == GradWeightLayout.SIDE_BY_SIDE
    swapped = layout in (GradWeightLayout.ALONG_IN, GradWeightLayout.SIDE_BY_SIDE)
    groups, cig, cog = ((1, spec.c_in, spec.c_out_per_group) if side
                        else (spec.groups, spec.c_in_per_group, spec.c_out_per_group))
    group_cin = spec.c_in_per_group if side else 0
    offsets = tap_offsets(spec)
    ktot = math.prod(spec.kernel)
    rows, cols = (cog, cig) if swapped else (cig, cog)
    units = native.gw_units(ktot, cols, compute_dtype.itemsize)
    # Swapped, the sums of (tap, co, ci) lie at strides (taps * width, width), width C_in/g
    # rounded up to whole vectors: in gw itself where that is C_in/g, else in a padded
    # copy whose own columns are copied out (the kernel reads x's rows where they lie).
    width = _swapped_width(cig, compute_dtype)

    def swapped_target(sums: np.ndarray, g: int) -> dict:
        return dict(part=sums, strides=(ktot * width, width), part_offset=g * cog * ktot * width)
    if n_threads == 1 or groups * units >= 2 * n_threads:  # workers share out the units
        box = (0, spec.batch, 0, spec.in_spatial[0], 0, spec.in_spatial[1])
        # Sharing a queue with grad_input's tiles, two jobs per thread balance better.
        # Units are numbered across the groups (group * units + unit), so few taps with
        # groups still keep the threads busy (8 -> 24 g4 k2 on one long row: 2 units).
        total = groups * units
        workers = min(n_threads * (2 if defer is not None else 1), total)
        bounds = [total * j // workers for j in range(workers + 1)]
        # Swapped, gw (C_out, taps, C_in/g) holds (tap, co, ci) at strides (taps * C_in/g,
        # C_in/g): the sums land in place. Otherwise in the packed layout, then unpacked.
        packed = (None if swapped
                  else native.aligned_empty((groups, ktot * rows * cols), compute_dtype))
        sums = (gw if width == cig and not side
                else native.aligned_empty((groups * cog, ktot, width), compute_dtype))

        calls_of: list[list] = [[] for _ in range(workers)]  # each worker's prepared calls
        for g in range(groups):
            target = swapped_target(sums, g) if swapped else dict(part=packed[g])
            mine = [(j, max(bounds[j] - g * units, 0), min(bounds[j + 1] - g * units, units))
                    for j in range(workers)]
            mine = [(j, u0, u1) for j, u0, u1 in mine if u0 < u1]
            calls: list = []
            native.grad_weight(swapped, x3, g * cig, c3, g * cog, offsets, spec.stride,
                               box=box, cin=cig, cout=cog, units=[(u0, u1) for _, u0, u1 in mine],
                               zero=True, into=calls, group_cin=group_cin, **target)
            for (j, _, _), call in zip(mine, calls):
                calls_of[j].append(call)

        def in_place(j):
            return native.Task(tuple(calls_of[j]), keep=(packed, sums))

        def finish_units() -> None:
            if packed is not None:
                _unpack_grad_weight(gw, packed, ktot, rows, cols, n_threads)
            elif side:
                gw[...] = from_side_by_side(spec, sums)
            elif sums is not gw:
                gw[...] = sums[..., :cig]

        _run_or_defer([in_place(j) for j in range(workers)], n_threads, finish_units, defer)
        return
    pairs = _tile_group_pairs(spec, groups, n_threads)
    workers = min(n_threads, len(pairs))
    shape = (groups * cog, ktot, width) if swapped else (groups, ktot * rows * cols)
    parts = [native.aligned_zeros(shape, compute_dtype) for _ in range(workers)]

    def job_for(j):  # worker j's (tile, group) pairs, in order, into its own partial
        calls: list = []
        for g, run in _runs_of_boxes(pairs[j::workers]):
            target = swapped_target(parts[j], g) if swapped else dict(part=parts[j][g])
            native.grad_weight(swapped, x3, g * cig, c3, g * cog, offsets, spec.stride,
                               box=[(box, False) for box in run.boxes], cin=cig, cout=cog,
                               into=calls, w=run.w, group_cin=group_cin, **target)
        return native.Task(tuple(calls))

    def finish_rows() -> None:
        if side:
            gw[...] = from_side_by_side(spec, sum_in_order(parts))
        elif swapped:
            gw[...] = sum_in_order(parts)[..., :cig]
        else:
            _unpack_grad_weight(gw, sum_in_order(parts), ktot, rows, cols, n_threads)

    _run_or_defer([job_for(j) for j in range(workers)], n_threads, finish_rows, defer)


def w_residues(spec: ConvSpec, width: int) -> tuple[int, int, list[tuple[int, int]]]:
    """The cotangent's rows split by W residue (positions w = j * stride + r), each residue
    in its own zero-padded stretch: (`left` zeros before pixel 0's element, `stretch`, and
    per W tap (its residue, the element input pixel 0 meets)), so that a tap's reads of
    `width` pixels from there, step 1, stay in its residue's stretch."""
    s, w_cot = spec.stride[2], spec.out_spatial[2]
    offs = [int(o) for o in tap_offsets(spec)[2]]
    shifts = [o // s for o in offs]  # floor: residue o - s * shift
    left = max(0, -min(shifts))
    stretch = left + max(ceil_div(w_cot, s), max(shifts) + width)
    return left, stretch, [(o - s * q, left + q) for o, q in zip(offs, shifts)]


def planar_geometry(spec: ConvSpec, lanes: int) -> tuple[int, int, int, list[tuple[int, int]]]:
    """Layout PLANAR's rows: the input row padded to whole vectors (wv), and the
    cotangent's `w_residues` for reads of wv elements."""
    wv = ceil_div(spec.in_spatial[2], lanes) * lanes
    return (wv, *w_residues(spec, wv))


def planar_cotangent_bytes(spec: ConvSpec, compute_dtype: np.dtype) -> int:
    """The cotangent's planar copy (layout PLANAR, `planar_cotangent`)."""
    _, _, stretch, _ = planar_geometry(spec, native.layout(compute_dtype.itemsize)[0])
    return (spec.batch * spec.out_spatial[0] * spec.out_spatial[1] * spec.c_out
            * spec.stride[2] * stretch * compute_dtype.itemsize)


def planar_bytes(spec: ConvSpec, compute_dtype: np.dtype) -> int:
    """The planar copies of x and of the cotangent (layout PLANAR)."""
    wv, _, _, _ = planar_geometry(spec, native.layout(compute_dtype.itemsize)[0])
    rows = spec.batch * spec.in_spatial[0] * spec.in_spatial[1]
    return (rows * spec.c_in * wv * compute_dtype.itemsize
            + planar_cotangent_bytes(spec, compute_dtype))


def _planar_copy(rows_in: np.ndarray, out: np.ndarray, res: int, left: int, stretch: int,
                 threads: int) -> None:
    """`native.planar_rows` of every row, in pieces on the threads."""
    count, width = rows_in.shape[:2]
    in_row_pieces(native.planar_rows, rows_in, out, count, min(count, 4 * threads), threads,
                  width, res, left, stretch)


def planar_cotangent(spec: ConvSpec, c3: np.ndarray, compute_dtype: np.dtype,
                     threads: int) -> np.ndarray:
    """The cotangent's planar copy for layout PLANAR (rows (n, od, oh), each channel's W
    residues `stretch` long): made once where both gradients read it."""
    lanes, _ = native.layout(compute_dtype.itemsize)
    _, left, stretch, _ = planar_geometry(spec, lanes)
    n, od, oh, w_cot = spec.batch, *spec.out_spatial
    s = spec.stride[2]
    gs = native.aligned_empty((n * od * oh, spec.c_out, s, stretch), compute_dtype)
    _planar_copy(np.ascontiguousarray(c3.reshape(n * od * oh, w_cot, spec.c_out), compute_dtype),
                 gs, s, left, stretch, threads)
    return gs


def _planar_geometry_array(spec: ConvSpec, lanes: int, group: int, row0: int, row1: int
                           ) -> np.ndarray:
    """The geometry both planar kernels take (module.cpp's parse_planar) for one group's
    input rows [row0, row1)."""
    wv, _, stretch, wtaps = planar_geometry(spec, lanes)
    s, cig, cog = spec.stride[2], spec.c_in_per_group, spec.c_out_per_group
    offsets = tap_offsets(spec)
    return np.array([spec.c_in * wv, wv, spec.c_out * s * stretch, stretch, s, spec.batch,
                     *spec.in_spatial[:2], *spec.out_spatial[:2], spec.in_spatial[2],
                     spec.c_in, *spec.kernel, *spec.stride[:2], group * cig, cig, group * cog,
                     cog, row0, row1, *offsets[0], *offsets[1],
                     *[v for pair in wtaps for v in pair]], np.int64)


def _planar_jobs(spec: ConvSpec, threads: int) -> list[tuple[int, int, int]]:
    """(group, first row, end row) of each job: rows (n, d, h) in pieces per group, enough
    for the threads to share."""
    rows = spec.batch * spec.in_spatial[0] * spec.in_spatial[1]
    per_group = max(1, min(rows, 2 * threads // spec.groups + 1))
    return [(g, rows * i // per_group, rows * (i + 1) // per_group)
            for g in range(spec.groups) for i in range(per_group)]


def _planar_grad_weight(spec, x3, c3, gw, n_threads, compute_dtype,
                        gs: np.ndarray | None = None) -> None:
    """grad_weight with vectors along input pixels (layout PLANAR, csrc/grad_planar.hpp),
    for few channels on both sides: planar copies of x and of the cotangent (the latter
    split by W residue; `gs` if made for both gradients), then jobs of input rows per
    group, each with its own vector sums, added in job order and across lanes at the end
    (bitwise reproducible for a thread count). (Vectors along either channel axis held
    3-9 of 16 lanes: 8 -> 4 g2 k7 on 643x879 took 60 ms on the GEMM path, 5.5 here.)"""
    lanes, _ = native.layout(compute_dtype.itemsize)
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    n, (d, h, w_in), c_in = spec.batch, spec.in_spatial, spec.c_in
    wv, _, _, _ = planar_geometry(spec, lanes)
    rows = n * d * h
    xs = native.aligned_empty((rows, c_in, 1, wv), compute_dtype)
    _planar_copy(np.ascontiguousarray(x3.reshape(rows, w_in, c_in), compute_dtype), xs, 1, 0,
                 wv, n_threads)
    if gs is None:
        gs = planar_cotangent(spec, c3, compute_dtype, n_threads)
    taps = math.prod(spec.kernel)
    jobs, sums = [], []
    for g, row0, row1 in _planar_jobs(spec, n_threads):
        part = native.aligned_zeros((taps, cog, cig, lanes), compute_dtype)
        jobs.append(functools.partial(native.planar_grad_weight, xs, gs, part,
                                      _planar_geometry_array(spec, lanes, g, row0, row1)))
        sums.append((g, part))
    run_jobs(jobs, n_threads)
    for g in range(groups):
        total = sum_in_order([part for owner, part in sums if owner == g]).sum(axis=-1)
        gw[g * cog:(g + 1) * cog] = total.transpose(1, 0, 2)  # (taps, co, ci) -> (co, taps, ci)


def planar_grad_input(spec, c3, w3, gx, n_threads, compute_dtype,
                      gs: np.ndarray | None = None) -> None:
    """grad_input with vectors along input pixels over the planar cotangent (`gs` if made
    for both gradients): jobs of input rows per group, each writing its rows' channels of
    the group whole (csrc/grad_planar.hpp). (The channel-vector kernel held 8 of 16 lanes
    on 8 -> 3 k3 s2.)"""
    lanes, _ = native.layout(compute_dtype.itemsize)
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    if gs is None:
        gs = planar_cotangent(spec, c3, compute_dtype, n_threads)
    taps = math.prod(spec.kernel)
    # per group [tap][co][ci]
    wt = np.ascontiguousarray(w3.reshape(groups, cog, taps, cig).transpose(0, 2, 1, 3),
                              compute_dtype)
    run_jobs([functools.partial(native.planar_grad_input, gs, wt[g], gx,
                                _planar_geometry_array(spec, lanes, g, row0, row1))
              for g, row0, row1 in _planar_jobs(spec, n_threads)], n_threads)


def both_gradients(spec, x3, c3, w3, gx, gw, n_threads, compute_dtype,
                   side_by_side: bool = False) -> None:
    """Both gradients in one pass of the grad_weight kernel, where it sums few values per
    tap (a 16 -> 1 head): each cotangent value it loads feeds a grad_weight sum and a
    grad_input pixel (see csrc/grad_weight.hpp). Workers own fixed tiles of input rows (their
    grad_input rows) and one grad_weight sum each, worker 0's in gw itself, added in worker
    order: bitwise reproducible for a thread count. `side_by_side`: one pass over every
    conv group's channels at once (`groups_side_by_side`); then `gw` may be None (grad_input
    alone: the sums are dropped)."""
    groups, cig, cog = ((1, spec.c_in, spec.c_out_per_group) if side_by_side
                        else (spec.groups, spec.c_in_per_group, spec.c_out_per_group))
    ktot = math.prod(spec.kernel)
    offsets = tap_offsets(spec)
    # The sums and the weight as (C_out, taps, width): gw's layout, C_in/g padded to
    # whole vectors (`_swapped_width`) with zeros in the weight (side by side, as
    # `to_side_by_side`).
    width = _swapped_width(cig, compute_dtype)
    weight = native.aligned_zeros((groups * cog, ktot, width), compute_dtype)
    weight[..., :cig] = (to_side_by_side(spec, w3) if side_by_side
                         else w3.reshape(spec.c_out, ktot, cig))
    # Workers own whole tiles (the plan fuses only where there are at least as many as
    # threads, `fused_pass_suits`): workers writing the groups of the same grad_input
    # pixels shared their cache lines (26 -> 8 g2 k6x3x2 on 4x13x19x14, both gradients:
    # 5.2 ms on two threads, 2.9 on one).
    tiles = _grad_weight_row_tiles(spec, n_threads)
    work = [[(tile, g) for tile in tiles[j::n_threads] for g in range(groups)]
            for j in range(min(n_threads, len(tiles)))]
    workers = len(work)
    in_gw = width == cig and not side_by_side  # worker 0 sums into gw itself
    parts = ([gw] if in_gw else []) + [native.aligned_empty(weight.shape, compute_dtype)
                                       for _ in range(workers - in_gw)]

    def job_for(j):  # worker j's (tile, group) pairs, in order, into its own sums
        calls: list = []
        mine = work[j]
        for g in set(range(groups)) - {g for _, g in mine}:  # sums it never touches
            parts[j][g * cog:(g + 1) * cog] = 0
        first: set[int] = set()
        for g, run in _runs_of_boxes(mine):
            native.grad_weight(True, x3, g * cig, c3, g * cog, offsets, spec.stride,
                               parts[j], [(box, k == 0 and g not in first)
                                          for k, box in enumerate(run.boxes)], cig, cog,
                               strides=(ktot * width, width),
                               part_offset=g * cog * ktot * width, into=calls,
                               grad_input=gx, grad_input_offset=g * cig, weight=weight,
                               w=run.w, group_cin=spec.c_in_per_group if side_by_side else 0)
            first.add(g)
        return native.Task(tuple(calls), keep=weight)

    run_jobs([job_for(j) for j in range(workers)], n_threads)
    if gw is None:
        return
    sums = sum_in_order(parts)
    if side_by_side:
        gw[...] = from_side_by_side(spec, sums)
    elif sums is not gw:
        gw[...] = sums[..., :cig]


def groups_side_by_side(spec: ConvSpec, lanes: int, max_vectors: int) -> bool:
    """Whether grad_weight's few-sums pass (and grad_input in it) can run every conv group's
    channels side by side in its vectors, lane c taking its own group's cotangent channel
    by a permute of the cotangent row (`GwJob::group_cin`): groups of fewer channels than
    a vector, whose cotangent rows fit one vector and whose input channels fit one chunk
    of `max_vectors` (`lanes` of the compute dtype; `native.layout`). Run a group at a
    time, each group's vectors held its few channels: 8 -> 8 g4 k1x7 s2 on 3x386x363, both
    gradients, 11.4 -> 3.6 ms; 32 -> 4 g4 k4 s3 on 2x622x359 60 (fan-out) -> 13."""
    depthwise = spec.c_in_per_group == 1 and spec.c_out_per_group == 1
    return (spec.groups > 1 and not depthwise and spec.c_in_per_group < lanes
            and spec.c_out <= lanes and spec.c_in <= max_vectors * lanes)


def to_side_by_side(spec: ConvSpec, w3: np.ndarray) -> np.ndarray:
    """The weight (C_out, taps, C_in/g) as the side-by-side pass's (C_out/g, taps, C_in):
    row a, column c, the weight of output channel (c // (C_in/g)) * C_out/g + a."""
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    taps = w3.shape[1]
    return (w3.reshape(groups, cog, taps, cig).transpose(1, 2, 0, 3)
            .reshape(cog, taps, spec.c_in))


def from_side_by_side(spec: ConvSpec, sums: np.ndarray) -> np.ndarray:
    """`to_side_by_side` undone: the side-by-side sums (C_out/g, taps, >= C_in) as
    grad_weight's (C_out, taps, C_in/g)."""
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    taps = sums.shape[1]
    return (sums[..., :spec.c_in].reshape(cog, taps, groups, cig).transpose(2, 0, 1, 3)
            .reshape(spec.c_out, taps, cig))


def fused_pass_suits(spec: ConvSpec, n_threads: int, lanes: int) -> bool:
    """Whether `both_gradients`' one pass keeps its workers apart and pays: a whole row
    tile for each worker (with fewer tiles, workers would split a tile's groups, whose
    grad_input pixels share cache lines, or wait), and with groups of a whole vector of
    C_in/g (`lanes`) or more, rows of at most a tile. Long 1-D grouped rows, both
    gradients, fused against apart: 64 -> 8 g4 k2 s2 on 3 x 82967 (16 channels a group)
    34.9 against 13.4 ms; with 2-8 channels a group fused won or tied on all seven timed
    (4 -> 4 g2 k3 s2 d2 on 4 x 432114: 14.3 against 22.8; 16 -> 4 g2 k3 s2 on 4 x 100000:
    4.4 against 7.4; 32 -> 8 g4: 13.8 against 14.0). The bound is measured, not derived."""
    return (len(_grad_weight_row_tiles(spec, n_threads)) >= n_threads
            and (spec.groups == 1 or spec.in_spatial[2] <= GW_TILE_PIXELS
                 or spec.c_in_per_group < lanes))


def _tile_group_pairs(spec: ConvSpec, groups: int, n_threads: int) -> list[tuple[Tile, int]]:
    """Row tiles (`_grad_weight_row_tiles`) times the `groups` run apart, tile-major: the
    jobs of grad_weight's per-worker partials, enough for the threads where groups make up
    for few rows (one long 1-D row with 4 groups ran on one thread)."""
    tiles = _grad_weight_row_tiles(spec, max(1, n_threads // groups))
    return [(tile, g) for tile in tiles for g in range(groups)]


class BoxRun(NamedTuple):
    boxes: list  # (n0, n1, d0, d1, h0, h1) of each tile, in order
    w: tuple[int, int] | None  # their W positions (pieces of long rows), or None: whole


def _runs_of_boxes(pairs: list[tuple[Tile, int]]) -> list[tuple[int, BoxRun]]:
    """(tile, group) pairs, in order, as runs of consecutive tiles of one group and one W
    piece (whole rows: all of them, one group), each prepared as one batch of calls."""
    runs: list[tuple[int, BoxRun]] = []
    for tile, g in pairs:
        box = (*tile.n, *tile.d, *tile.h)
        if runs and runs[-1][0] == g and runs[-1][1].w is None and tile.w is None:
            runs[-1][1].boxes.append(box)
        else:
            runs.append((g, BoxRun([box], tile.w)))
    return runs


def _depthwise_grad_weight(spec, x3, c3, gw, n_threads, compute_dtype,
                           defer: list | None,
                           residues: tuple[np.ndarray, native.TapOffsets] | None = None) -> None:
    """Depthwise grad_weight by the kernel: workers own fixed tiles of input rows and one
    (taps, C) partial each, added in worker order (bitwise reproducible for a thread
    count)."""
    ktot = math.prod(spec.kernel)
    tiles = _grad_weight_row_tiles(spec, n_threads)
    workers = min(n_threads, len(tiles))
    parts = [native.aligned_zeros((ktot, spec.c_out), compute_dtype) for _ in range(workers)]
    offsets, steps = tap_offsets(spec), spec.stride
    if _by_residue(spec, compute_dtype):
        c3, offsets = residues or _residues_along_w(spec, c3, compute_dtype, n_threads)
        steps = (*steps[:2], 1)

    def job_for(j):  # worker j's tiles, in order, into its own partial
        calls: list = []
        for _, run in _runs_of_boxes([(tile, 0) for tile in tiles[j::workers]]):
            native.depthwise_grad_weight(x3, c3, offsets, steps, parts[j],
                                         [(box, False) for box in run.boxes], into=calls,
                                         w=run.w)
        return native.Task(tuple(calls), keep=(c3, offsets))  # until a deferred run

    def finish() -> None:
        gw[:, :, 0] = sum_in_order(parts).T

    _run_or_defer([job_for(j) for j in range(workers)], n_threads, finish, defer)


def _by_residue(spec: ConvSpec, compute_dtype: np.dtype) -> bool:
    """Whether a depthwise layer's gradients read the cotangent split by W residue
    (`_residues_along_w`): strided along W, with fewer channels than a vector."""
    return spec.stride[2] > 1 and spec.c_out < native.layout(compute_dtype.itemsize)[0]


def residues_for_both(spec: ConvSpec, c3: np.ndarray, compute_dtype: np.dtype, threads: int
                      ) -> tuple[np.ndarray, native.TapOffsets] | None:
    """Where both depthwise gradients read the cotangent split by W residue: the split,
    made once for both (it took as long as either pass: 831x672 3 channels k6 s2)."""
    depthwise = spec.c_in_per_group == 1 and spec.c_out_per_group == 1
    if not (depthwise and _by_residue(spec, compute_dtype)):
        return None
    return _residues_along_w(spec, c3, compute_dtype, threads)


def _residues_along_w(spec: ConvSpec, c3: np.ndarray, compute_dtype: np.dtype, threads: int
                      ) -> tuple[np.ndarray, native.TapOffsets]:
    """The cotangent with each row's W residues (positions w = j * stride + r) laid one
    after the other, each in its own zero-padded stretch, and the W taps' offsets into
    that row: an input pixel p then meets the cotangent at p + offset, step 1. The
    kernel's depthwise passes run rows of fewer channels than a vector along the flat
    pixel * channel index only at step 1; at stride 2 they ran one channel at a time
    (1 -> 1 k5 s2, two threads: grad_weight 56 ms, grad_input 111; PyTorch's backward
    79 ms for both)."""
    s, w_cot = spec.stride[2], c3.shape[3]
    left, stretch, wtaps = w_residues(spec, spec.in_spatial[2])
    n, d, h, _, c = c3.shape
    # recycled memory where big: a fresh block's page faults cost as much as the split
    out = native.aligned_empty((n * d * h, s, stretch, c), compute_dtype)
    rows_in = np.ascontiguousarray(c3.reshape(n * d * h, w_cot, c), compute_dtype)

    # In pieces on the threads: one strided pass of NumPy's took 2/3 of a 2-D 3-channel
    # layer's grad_input (831x672 k6 s2: 30 of 44 ms, the zeroed buffer's page faults too),
    # and NumPy's copy of each pixel's few channels in pieces was still most of a 3 -> 3
    # g3 k4 s4x2x2 layer's time.
    in_row_pieces(native.split_residues, rows_in, out, n * d * h,
                  max(1, min(n * d * h, 4 * threads)), threads, left)
    arrays = list(tap_offsets(spec).arrays)
    arrays[2] = np.array([r * stretch + first for r, first in wtaps], np.int64)
    return out.reshape(n, d, h, s * stretch, c), native.TapOffsets(arrays)


def _run_or_defer(jobs: list, threads: int, finish: Callable[[], None],
                  defer: list | None) -> None:
    """Run the jobs, then `finish`; or leave both in `defer` for a shared queue."""
    if defer is not None:
        defer.append((jobs, finish))
        return
    run_jobs(jobs, threads)
    finish()


def _unpack_grad_weight(gw, packed, ktot: int, rows: int, cols: int, threads: int) -> None:
    """gw (C_out, taps, C_in/g) from each group's sums in the packed layout of (taps, rows,
    cols), (rows, cols) = (C_in/g, C_out/g); on the threads, in pieces of taps."""
    cog = cols
    pieces = min(ktot, 4 * threads) if gw.nbytes >= 1 << 20 else 1
    run_jobs([functools.partial(native.unpack_grad_weight, packed[g],
                                gw[g * cog:(g + 1) * cog], ktot, rows, cols,
                                ktot * i // pieces, ktot * (i + 1) // pieces)
              for g in range(len(packed)) for i in range(pieces)], threads)


def _swapped_width(cig: int, compute_dtype: np.dtype) -> int:
    """C_in/g rounded up to whole vectors: a row of the swapped (ALONG_IN) sums."""
    lanes, _ = native.layout(compute_dtype.itemsize)
    return ceil_div(cig, lanes) * lanes


GW_TILE_PIXELS = 4096


@functools.lru_cache(maxsize=256)  # asked on every call: 0.15 ms for 112 tiles
def _grad_weight_row_tiles(spec: ConvSpec, n_threads: int) -> tuple[Tile, ...]:
    """Tiles of about GW_TILE_PIXELS input pixels for grad_weight's per-worker partials:
    whole rows, or pieces of too few long ones (`cut_rows`; pieces of GW_TILE_PIXELS as
    well ran 4 -> 8 k3 s4 on 3 x 141705 1.7x slower, one for each worker 0.9x)."""
    w = spec.in_spatial[2]
    tiles = input_tiles(spec, max(1, GW_TILE_PIXELS // max(1, w)) * w, n_threads)
    return tuple(cut_rows(tiles, w, n_threads))
