"""The compiled correlation kernel (csrc/), seen from Python: weight packing and one call
per output block. `AVAILABLE` is False where the extension was not built; the planner
then never picks the ``native`` algorithm.

The kernel computes, for one phase (see `_geometry`), every output element of a block in
registers over all its taps and input channels, and stores it once. It reads the input
where it lies (channels contiguous, any other strides) and writes the output in place.

Each call hands the binding a dict of its job's fields by name, the names of the C structs
in csrc/correlate_api.h (CtJob, GwJob, PairJob) and csrc/module.cpp (PackJob); the binding
fills the struct field by field and says which field is missing or unknown.
"""

import enum
import functools
import math
from typing import Any, NamedTuple

import numpy as np

from ._dtypes import dtype_name
from ._geometry import ceil_div
from ._memory import RECYCLE_FROM_BYTES, result_empty

try:
    from . import _native
except ImportError:  # built without a C++ compiler: the NumPy kernels serve every call
    _native = None

AVAILABLE = _native is not None


def isa() -> str | None:
    """The instruction set the kernel runs on ('avx512', 'avx2', 'generic'), or None."""
    return _native.isa() if AVAILABLE else None


class Mode(enum.IntEnum):
    """How the kernel lays its vectors: `correlate`'s `mode`, valued as csrc/correlate_api.h's
    CT_MODE_* (a new mode is one member here, one there)."""

    CHANNELS = 0  # along the output channels
    DOT = 1  # along the input channels, for 1-8 output channels (DOT_MAX_OUT)
    DEPTHWISE = 2  # along the channels of a depthwise layer
    PLANAR = 3  # along a row's output pixels, for 1-8 outputs, over a planar input copy


CHANNELS, DOT, DEPTHWISE, PLANAR = Mode.CHANNELS, Mode.DOT, Mode.DEPTHWISE, Mode.PLANAR
# The most outputs per group a dot-mode or planar job takes (correlate_api.h).
DOT_MAX_OUT = _native.DOT_MAX_OUT if AVAILABLE else 0
PLANAR_MAX_OUT = _native.PLANAR_MAX_OUT if AVAILABLE else 0
PLANAR_MAX_ROW = _native.PLANAR_MAX_ROW if AVAILABLE else 0  # W residues x C_out a job writes
# Below this many input channels CHANNELS mode sums each block over every tap in registers.
TAPS_INNER_BELOW = _native.TAPS_INNER_BELOW if AVAILABLE else 0


@functools.lru_cache(maxsize=1)
def wide_fma_gain() -> float | None:
    """This CPU's 512-bit multiply-add FLOP/s over its 256-bit ones, timed once (csrc/
    module.cpp, ~0.1 ms): about 2 where each unit takes 512 bits whole (Intel's server
    cores), about 1 where it runs them as two halves (AMD's Zen 4); None without an
    AVX-512 build and CPU."""
    return _native.wide_fma_gain() if AVAILABLE else None


def layout(itemsize: int) -> tuple[int, int]:
    """(vector lanes, vectors per chunk) of the packed weight for 4- or 8-byte floats
    ((16, 4) on AVX-512 for float32); (1, 1) where the kernel is absent."""
    return _native.layout(itemsize) if AVAILABLE else (1, 1)


def packed_size(taps: int, rows: int, cols: int, itemsize: int) -> int:
    """Elements of the CHANNELS layout of (taps, rows, cols): columns padded to vectors."""
    lanes, _ = layout(itemsize)
    return taps * rows * (ceil_div(cols, lanes) * lanes)


def chunk_columns(cols: int, rows: int, itemsize: int) -> int:
    """Columns per chunk of CHANNELS mode's layout of `cols` columns and `rows` input
    channels (the kernel's run_typed cuts its outputs alike): max_vectors vectors, but
    where its blocks run a tap at a time (TAPS_INNER_BELOW channels or more), the vectors
    the columns pad to in as few chunks as hold them, of one width but the last: 9
    vectors as 3 + 3 + 3, not 4 + 4 + 1, whose one-vector chunk loads a weight vector
    per multiply-add (alternating processes, 384 -> 96 k(7,2) d2 0.85 -> 0.67 ms; with
    fewer channels, each input broadcast serving every vector of the chunk, 1 -> 96 k3
    1.14 -> 1.38)."""
    lanes, max_vectors = layout(itemsize)
    if rows < TAPS_INNER_BELOW:
        return lanes * max_vectors
    vectors = ceil_div(cols, lanes)
    return ceil_div(vectors, ceil_div(vectors, max_vectors)) * lanes


def fill_columns(w: np.ndarray, table: np.ndarray, rows: int, row_stride: int,
                 out: np.ndarray, into: list | None = None, chunk: int | None = None) -> None:
    """Gather into `out` (`packed_size` elements, w's dtype) the weight layout of CHANNELS
    mode, in one pass from `w` where it lies (the compute dtype, any strides): element
    (tap, r, col) is w's element at table[tap, col] + r * row_stride, in elements from
    w's first. Columns are padded with zeros to whole vectors and cut into chunks of
    `chunk` columns (None: `chunk_columns`), each chunk [tap][r][column], in order.
    Releases the GIL. `into`: append the call, prepared for `once` or `Task`, instead of
    running it."""
    taps, cols = table.shape
    lanes, _ = layout(w.dtype.itemsize)
    padded = ceil_div(cols, lanes) * lanes
    chunk = chunk or chunk_columns(cols, rows, w.dtype.itemsize)
    assert out.size == taps * rows * padded and out.dtype == w.dtype
    assert table.dtype == np.int64 and table.flags.c_contiguous
    job = {"itemsize": w.dtype.itemsize, "src": _native.address(w),  # PackJob's fields
           "table": _native.address(table), "taps": taps, "cols": cols, "rows": rows,
           "row_stride": row_stride, "padded": padded, "chunk": chunk,
           "dst": _native.address(out)}
    if into is not None:
        into.append(_native.pack_call(job))
    else:
        _native.pack(job)


def aligned_empty(shape: int | tuple[int, ...], dtype) -> np.ndarray:
    """An uninitialised C-contiguous array that starts on a cache line. The kernel loads
    whole vectors from packed weights and partial sums; NumPy's big arrays start 16 bytes
    past a page, and a vector load across two lines costs two. Big ones come from the
    recycled memory of dropped results (`result_empty`, on a cache line too): a fresh
    block costs a page fault per 4 KiB at its first write, and a 1.3 ms backward call
    (24 -> 39 k5 on 7x4x4 pixels) paid 290 of them for its partial sums."""
    dtype = np.dtype(dtype)
    count = math.prod(shape) if isinstance(shape, tuple) else int(shape)
    if count * dtype.itemsize >= RECYCLE_FROM_BYTES:
        return result_empty((count,), dtype).reshape(shape)
    raw = np.empty(count * dtype.itemsize + 64, np.uint8)
    start = (-_native.address(raw)) % 64
    return raw[start:start + count * dtype.itemsize].view(dtype).reshape(shape)


def aligned_zeros(shape: int | tuple[int, ...], dtype) -> np.ndarray:
    out = aligned_empty(shape, dtype)
    out.fill(0)
    return out


def pack_columns(w: np.ndarray, table: np.ndarray, rows: int, row_stride: int,
                 chunk: int | None = None) -> np.ndarray:
    """`fill_columns` into a new array (on a cache line)."""
    table = np.ascontiguousarray(table, np.int64)
    out = aligned_empty(packed_size(table.shape[0], rows, table.shape[1], w.dtype.itemsize),
                        w.dtype)
    fill_columns(w, table, rows, row_stride, out, chunk=chunk)
    return out


def element_strides(a: np.ndarray) -> list[int] | None:
    """a's strides in elements, or None when one is not a whole number of elements."""
    strides = _element_strides(a.strides, a.dtype.itemsize)
    return None if strides is None else list(strides)


@functools.lru_cache(maxsize=1024)  # called several times per kernel call, ~2 us each
def _element_strides(strides: tuple[int, ...], item: int) -> tuple[int, ...] | None:
    out = []
    for stride in strides:
        quotient, rest = divmod(stride, item)
        if rest:
            return None
        out.append(quotient)
    return tuple(out)


def reads_in_place(a: np.ndarray, dtype: np.dtype) -> bool:
    """Whether the kernel can read `a` where it lies: the dtype it computes in, and every
    stride a whole number of elements with the channels (last axis) contiguous."""
    strides = element_strides(a) if a.dtype == dtype else None
    return strides is not None and strides[-1] == 1


def address(a: np.ndarray) -> int:
    """The address of a's first element (cheaper than `a.ctypes.data`)."""
    return _native.address(a)


def origin(a: np.ndarray, first: tuple[int, ...] = (0, 0, 0)) -> tuple[int, list[int]]:
    """(address, element strides n, d, h, w) of `a` (N, D, H, W, C), as if `a` held the
    whole array and its element [0, 0, 0] were position `first` (n, d, h) of it: a
    converted slab then stands for the full input, and the kernel reads only positions
    the slab holds."""
    strides = element_strides(a)[:4]
    shift = sum(f * st for f, st in zip(first, strides))
    return _native.address(a) - shift * a.dtype.itemsize, strides


# The output kinds the kernel rounds to as it stores (csrc/correlate_api.h, CT_HALF_*).
HALF_NONE, HALF_F16, HALF_BF16 = 0, 1, 2


def half_kind(dtype: np.dtype) -> int:
    """HALF_F16 or HALF_BF16 for an output the kernel rounds from float32, else HALF_NONE."""
    name = dtype_name(dtype)
    return HALF_F16 if name == "float16" else HALF_BF16 if name == "bfloat16" else HALF_NONE


class TapOffsets:
    """Per axis, the input offset of each tap (int64), with the addresses the kernel reads
    them at: made once per layer and reused, since each `.ctypes` lookup costs ~1 us and a
    call hands the kernel three arrays per tile."""

    __slots__ = ("arrays", "addresses", "counts", "_from")

    def __init__(self, arrays) -> None:
        self.arrays = tuple(np.ascontiguousarray(a, np.int64) for a in arrays)
        self.addresses = tuple(_native.address(a) for a in self.arrays)
        self.counts = tuple(len(a) for a in self.arrays)
        self._from: dict[int, TapOffsets] = {}

    def __getitem__(self, axis: int) -> np.ndarray:
        return self.arrays[axis]

    def along_w(self, shift: int) -> "TapOffsets":
        """These offsets with `shift` added along W: a job over a piece of its rows that
        starts at W position w0 reads, at step s, where the whole row's w0 + w would
        (shift w0 * s). Kept here while these live, as the calls read their addresses."""
        if not shift:
            return self
        if shift not in self._from:
            self._from[shift] = TapOffsets((*self.arrays[:2], self.arrays[2] + shift))
        return self._from[shift]


def residue_taps(phases) -> TapOffsets:
    """A PLANAR job's W residues (phases in residue order) as the three int64 arrays the
    kernel reads: each one's W tap count, their input offsets one residue after the
    other, and each one's output columns."""
    taps = [[t.offset for t in p.axis_taps[2]] for p in phases]
    return TapOffsets(([len(t) for t in taps], [o for t in taps for o in t] or [0],
                       [p.count[2] for p in phases]))


class RowCursors:
    """The row cursors (one per conv group) through which `sharers` threads share one tile
    of `correlate` calls; none when `sharers` is 1. Whoever calls with them keeps this
    object alive until the calls return."""

    __slots__ = ("sharers", "_array", "_base")

    def __init__(self, groups: int, sharers: int) -> None:
        self.sharers = sharers
        self._array = np.zeros(groups, np.int64) if sharers > 1 else None
        self._base = _native.address(self._array) if self._array is not None else 0

    def address(self, group: int) -> int:
        """`correlate`'s `cursor` for conv group `group` (0: not shared)."""
        return self._base and self._base + 8 * group


def correlate(mode: Mode, itemsize: int, out_half: int, stream_out: bool, x_addr: int,
              x_strides: list[int],
              in_dims: tuple[int, ...], packed: np.ndarray, offsets: TapOffsets,
              steps: tuple[int, ...], out_addr: int, out_strides: list[int],
              box: tuple[int, ...], wcount: int,
              cin: int, cout: int, cursor: int = 0, sharers: int = 1,
              into: list | None = None, pair_out: int = 0, bias: int = 0,
              channel_stride: int = 0, groups: int = 1, chunks: int = 1,
              residues: TapOffsets | None = None, residue_stride: int = 0,
              weight_offsets: np.ndarray | None = None,
              output_offsets: np.ndarray | None = None, group_w: int = 0,
              group_out: int = 0) -> None:
    """out[n, d, h, w, :cout] = sum over taps (i, j, k) and channels c of
    x[n, d*step_d + off_d[i], h*step_h + off_h[j], w*step_w + off_w[k], c] * W[(i, j, k), c, :],
    taps outside `in_dims` skipped, for n, d, h in `box` = (n0, n1, d0, d1, h0, h1) and w in
    [0, wcount). Addresses and element strides (n, d, h, w) are raw: x_addr is batch item
    0's origin, out_addr the box's first position; channels are contiguous in both.
    `out_half`: HALF_F16 or HALF_BF16 where the output is float16 or bfloat16, rounded
    from the float32 sums as they are stored.
    `stream_out`: write it with non-temporal stores (see `_plan.streams_output`).
    `cursor`: 0, and the call computes the whole box; or the address of an int64, 0 at
    first (see `RowCursors`), through which up to `sharers` concurrent calls share the
    box's rows, each returning once every row is taken. The caller keeps every array alive
    and in bounds; the GIL is released meanwhile. `into`: append the call, prepared for a
    `Task`, instead of running it.
    `pair_out`: 0, or Winograd F(2,3) along D (see `pair_transform`): x is the transformed
    input, its four D taps (offsets 0-3, step 4) weigh the transformed weight, box row d
    is the output pair (2d, 2d + 1), and output rows from `pair_out` on are not written.
    `bias`: 0, or the address of `cout` values of the compute dtype (readable in whole
    vectors past them: see `bias_table`), added to each output as it is stored.
    `channel_stride`: PLANAR mode's input (`planar_copy`), whose channels lie that many
    elements apart and its pixels next to each other (x_strides[3] == 1).
    `groups`, `chunks`, `residues` (`residue_taps`), `residue_stride`: PLANAR mode's
    rows, written whole: every W residue (offsets[2] unused; residue r's column w lies
    `residue_stride` elements after residue 0's) of each of `groups` conv groups, whose
    outputs come in `chunks` calls' worth of `cout` each (cin is a group's).
    `weight_offsets`: DOT mode's weight where it lies (`packed` a view of it from the
    job's first output, each output's channels contiguous): each (tap, output)'s offset
    in elements, [tap][output] (otherwise `packed` is [tap][co][c]).
    `output_offsets`: DOT or CHANNELS mode's outputs where they do not lie one after
    another (dot mode's residues merged across rows, W residues merged in a layer of
    several conv groups): each output's offset from its position's first, in elements.
    `groups`, `group_w`, `group_out`: DOT or CHANNELS mode's conv groups in one call
    (`packed` the first's weight, the others `group_w` elements apart; a group's outputs
    `group_out` elements after the one before's, its bias `cout` values after), each
    row's groups in turn."""
    job = {"itemsize": itemsize, "mode": mode, "out_half": out_half,  # CtJob's fields
           "stream_out": int(stream_out), "x": x_addr, "xs": x_strides, "in_dims": in_dims,
           "w": _native.address(packed), "off": offsets.addresses, "ntaps": offsets.counts,
           "step": steps, "out": out_addr, "os": out_strides, "box": box, "wcount": wcount,
           "cin": cin, "cout": cout, "cursor": cursor, "sharers": sharers,
           "pair_out": pair_out, "bias": bias, "cs": channel_stride}
    if weight_offsets is not None:
        job["wout"] = _native.address(weight_offsets)
    if output_offsets is not None:
        job["oout"] = _native.address(output_offsets)
    if mode in (DOT, CHANNELS) and groups > 1:
        job.update(groups=groups, group_w=group_w, group_out=group_out)
    if residues is not None:
        job.update(groups=groups * chunks, chunks=chunks, res=len(residues[0]),
                   res_taps=residues.addresses[0],
                   res_off=residues.addresses[1], res_count=residues.addresses[2],
                   res_stride=residue_stride)
    if into is not None:
        into.append(_native.correlate_call(job))
    else:
        _native.correlate(job)


def fill_call(view: np.ndarray, value: np.ndarray | None) -> Any:
    """A prepared call (for `Task`) that sets every pixel of `view` (N, D, H, W, C with C
    contiguous) to `value` (C values of view's dtype, contiguous) or, None, to zeros."""
    assert view.ndim == 5 and view.strides[4] == view.itemsize
    assert value is None or (value.dtype == view.dtype and value.flags.c_contiguous
                             and value.size == view.shape[4])
    bits = f"u{view.itemsize}"  # any dtype's bytes (ml_dtypes' export no buffer)
    return _native.fill_call({  # FillJob's fields
        "dst": _native.address(view.view(bits)), "count": view.shape[:4],
        "stride": view.strides[:4], "pixel": view.shape[4] * view.itemsize,
        "value": 0 if value is None else _native.address(value.view(bits))})


def planar_copy(x: np.ndarray, top: int, left: int, height: int, pitch: int,
                out: np.ndarray, threads: int) -> tuple[int, list[int], int]:
    """Fill `out` (`planar_size` elements of x's dtype) with the input PLANAR mode reads:
    each plane (n, d) of x (N, D, H, W, C; channels contiguous) as C images of `height`
    rows of `pitch` elements, channel by channel, the plane's pixels from row `top` and
    column `left` on and zeros around them; copied by every thread. Returns the address
    and element strides (n, d, h, w) of pixel (0, 0, 0, 0) of channel 0, and the channel
    stride."""
    n, d, h, w, c = x.shape
    planes, image = n * d, planar_image(height, pitch, x.dtype.itemsize)
    assert out.size == planar_size(x.shape, height, pitch, x.dtype.itemsize)
    out[planes * c * image:] = 0  # what a run's last vectors read past the images
    job = {"itemsize": x.dtype.itemsize, "src": _native.address(x),  # PlanarJob's fields
           "xs": element_strides(x)[:4], "d": d, "h": h, "w": w, "c": c, "top": top,
           "left": left, "height": height, "pitch": pitch, "image": image,
           "dst": _native.address(out)}
    step = max(1, ceil_div(planes, 4 * threads))
    calls = []
    for job["plane0"] in range(0, planes, step):
        job["plane1"] = min(planes, job["plane0"] + step)
        calls.append(_native.planar_call(job))
    run_tasks([Task((call,)) for call in calls], threads)
    origin = _native.address(out) + (top * pitch + left) * x.dtype.itemsize
    return origin, [d * c * image, c * image, pitch, 1], image


def planar_image(height: int, pitch: int, itemsize: int) -> int:
    """Elements from one channel's image to the next in `planar_copy`: height * pitch
    rounded up to an odd number of cache lines. The kernel reads every channel at the
    same offset in turn; images a multiple of 4 KiB apart (64 x 64 pixels) all fell in
    the same few cache sets, and a 64-channel layer ran at 1/4 of its speed at 63 x 63."""
    line = 64 // itemsize
    lines = ceil_div(height * pitch, line)
    return (lines + 1 - lines % 2) * line


def planar_size(shape: tuple[int, ...], height: int, pitch: int, itemsize: int) -> int:
    """Elements of `planar_copy`'s copy of an input of `shape` (N, D, H, W, C): its
    images, then a row and two vectors that a run's last vectors may read past them."""
    n, d, _, _, c = shape
    lanes, _ = layout(itemsize)
    return n * d * c * planar_image(height, pitch, itemsize) + pitch + 2 * lanes


def bias_table(bias: np.ndarray, repeats: int, groups: int = 1) -> np.ndarray:
    """`bias` (C_out,) with each conv group's part repeated `repeats` times (a merged
    group's phases lie side by side along its outputs: [group][phase][channel]), then
    zeros: the kernel loads a chunk's bias in whole vectors, up to one vector past the
    last channel."""
    lanes, _ = layout(bias.dtype.itemsize)
    out = np.zeros(bias.size * repeats + lanes, bias.dtype)
    out[:bias.size * repeats] = np.tile(bias.reshape(groups, -1), (1, repeats)).ravel()
    return out


def pair_transform(x_addr: int, x_strides: list[int], in_d: int, base: int,
                   plane: tuple[int, int, int], v: np.ndarray, items: tuple[int, int],
                   pair_range: tuple[int, int], into: list | None = None) -> None:
    """Winograd F(2,3)'s input side along D, for outputs 2j and 2j + 1 of a stride-1 axis
    whose three taps read input 2j + base + (0, 1, 2) (and one further for 2j + 1):
    v[n, j] = (x0 - x2, x1 + x2, x2 - x1, x1 - x3), xt = x[n, 2j + base + t] (zero outside
    [0, in_d)), each a whole (H, W, C) = `plane` of x (element strides n, d, h, w; channels
    contiguous). v: C-contiguous (N, J, 4, H, W, C) of the compute dtype; fills batch items
    and pairs [lo, hi) of `items` and `pair_range`. `into`: prepared for a `Task`."""
    assert v.flags.c_contiguous and v.shape[2:] == (4, *plane)
    job = {"itemsize": v.dtype.itemsize, "x": x_addr, "xs": x_strides,  # PairJob's fields
           "in_d": in_d, "base": base, "h": plane[0], "w": plane[1], "c": plane[2],
           "v": _native.address(v), "pairs": v.shape[1], "n0": items[0], "n1": items[1],
           "j0": pair_range[0], "j1": pair_range[1]}
    if into is not None:
        into.append(_native.pair_call(job))
    else:
        _native.pair_transform(job)


class Task(NamedTuple):
    """Prepared kernel calls (`into=` of `correlate`, `grad_weight`, `fill_columns`) for
    the compiled pool, which runs them without the GIL (see csrc/pool.hpp): in order on
    one thread, or, `shared`, on every thread that joins it (its calls then share their
    rows through their `RowCursors`). `once` (see `once`) runs first. `keep` holds the
    arrays the calls address (cursors, packed weights) until they have run. `rows`: -1, or
    a number shared by the tasks that write the same output rows; a thread about to start
    one first joins any such task still running (csrc/pool.hpp, `join_same_rows`)."""

    calls: tuple
    shared: bool = False
    once: Any = None
    keep: Any = None
    rows: int = -1

    def run_here(self) -> None:
        """Run the task on the calling thread (other threads may join it meanwhile)."""
        _native.run_tasks((self,), 1)


def once(calls: list) -> Any:
    """Prepared calls that the tasks naming this run once, before the first of them (a
    weight's packing): the first thread to need them runs them, the others wait."""
    return _native.once(calls)


def run_tasks(tasks: list[Task], threads: int) -> None:
    """Run the tasks on the caller and up to `threads` - 1 pool threads; returns when all
    are done. Tasks are taken in order (a thread first joins a shared task still running
    that writes the same rows, `Task.rows`); a thread that finds none left joins a shared
    task still running."""
    _native.run_tasks(tasks, threads)


def program(tasks: list[Task], arrays: list[tuple[int, int, int]]) -> Any:
    """The tasks recorded, to run again at other arrays (`run_program`), or None where a
    call addresses memory outside `arrays` ((address, bytes, the same address) each), or
    besides them only what the caller keeps alive (tap offsets, pack tables)."""
    return _native.program(tasks, arrays)


def run_program(recorded: Any, threads: int, moves: list[tuple[int, int, int]]) -> None:
    """A `program`'s tasks as `run_tasks` runs them, every address into a recorded array
    moved to where that array lies now: `moves` is (recorded address, bytes, address now)
    per array, in the recorded order. Row cursors start from zero and once-calls run once,
    as in the recorded call."""
    _native.run_program(recorded, threads, moves)


def interrupt_mark() -> int:
    """The count of SIGINTs so far, for `check_interrupt` (0 without the kernel). Calls in
    the compiled kernel notice a SIGINT by themselves (csrc/module.cpp, "Ctrl-C")."""
    return _native.interrupts() if AVAILABLE else 0


def check_interrupt(mark: int) -> int:
    """Between the tiles of a call that started at `mark`: raise what Python's signal
    handlers raise (on the main thread), or KeyboardInterrupt where a SIGINT arrived since
    and Python's handler for it is the default one (on another thread: a Dask worker's
    call stops with the main thread's). Returns the mark to pass next time."""
    return _native.check_interrupt(mark) if AVAILABLE else mark


def warm(threads: int, microseconds: int = 2000) -> None:
    """Have the pool's threads for a batch of `threads` spin, ready for it, for up to
    `microseconds`: called before the Python work that prepares the batch, so that they
    have woken (~0.1 ms here) by the time it starts."""
    if AVAILABLE and threads > 1:
        _native.warm(threads, microseconds)


def widen_half(src: np.ndarray, out: np.ndarray) -> None:
    """out (float32, C-contiguous) = src (float16 or bfloat16, C-contiguous, same size),
    exactly; the GIL is released meanwhile."""
    assert out.dtype == np.float32 and src.size == out.size
    _native.widen_half(half_kind(src.dtype), src.view(np.uint16), out)


def round_half(src: np.ndarray, out: np.ndarray) -> None:
    """out (float16 or bfloat16, C-contiguous) = src (float32, C-contiguous, same size),
    rounded to nearest even exactly as the kernel stores (and as NumPy / ml_dtypes round)."""
    assert src.dtype == np.float32 and src.size == out.size
    _native.round_half(half_kind(out.dtype), src, out.view(np.uint16))


def gather_sum(rows: np.ndarray, table: np.ndarray, out: np.ndarray) -> None:
    """out[o] = sum over j, in order, of rows[table[j, o]]: C-contiguous arrays of one float
    dtype, table int64 (terms, len(out)) with every index within rows (the planner's)."""
    _native.gather_sum(rows.dtype.itemsize, rows, table, table.shape[0], table.shape[1],
                       rows.shape[1], out)


def split_residues(rows_in: np.ndarray, out: np.ndarray, row0: int, row1: int,
                   left: int) -> None:
    """out[i, r, left + j] = rows_in[i, j * s + r] for rows i in [row0, row1), zeros
    elsewhere in out's stretches: rows_in (rows, W, C) and out (rows, s, stretch, C),
    C-contiguous, of one float dtype; the GIL is released meanwhile."""
    _, w_cot, c = rows_in.shape
    _, s, stretch, _ = out.shape
    _native.split_residues(rows_in.dtype.itemsize, rows_in, out, row0, row1, w_cot, c, s, left,
                           stretch)


def repeat_channels(src: np.ndarray, out: np.ndarray, p0: int, p1: int) -> None:
    """out[p, c * m + j] = src[p, c] for pixels p in [p0, p1) and j < m: src (pixels, C)
    and out (pixels, C * m), C-contiguous, of one float dtype; the GIL is released."""
    _native.repeat_channels(src.dtype.itemsize, src, out, p0, p1, src.shape[1],
                            out.shape[1] // src.shape[1])


def sum_repeats(src: np.ndarray, out: np.ndarray, p0: int, p1: int) -> None:
    """out[p, c] = src[p, c * m] + src[p, c * m + 1] + ... (in that order) for pixels p in
    [p0, p1): src (pixels, C * m) and out (pixels, C), C-contiguous, of one float dtype,
    m >= 2; the GIL is released (`repeat_channels`' inverse)."""
    _native.sum_repeats(src.dtype.itemsize, src, out, p0, p1, out.shape[1],
                        src.shape[1] // out.shape[1])


def col2im(cols: np.ndarray, out: np.ndarray, bias: np.ndarray | None, geometry: np.ndarray,
           groups: int, cog: int, box: np.ndarray, runs: bool) -> None:
    """The `cols` forward's gather into the output box (int64: n0, n1, d0, d1, h0, h1, w0,
    w1): cols (batch, ID, IH, IW, groups, taps, cog) and out (batch, OD, OH, OW, groups *
    cog), C-contiguous, of one float dtype (bias too, or None); `geometry` (int64): batch,
    the input's, output's and kernel's sizes, stride, dilation and padding before, per
    axis. `runs`: add each pixel's W taps as a run of the output row (dilation 1 along W
    only), else gather each output's products. The GIL is released meanwhile."""
    _native.col2im(cols.dtype.itemsize, cols, out, bias, geometry, groups, cog, box, runs)


def gather_cotangent(cot: np.ndarray, block: np.ndarray, geometry: np.ndarray,
                     shifts: np.ndarray, tile: np.ndarray) -> None:
    """The gradient's gathered cotangent block of a tile of input pixels: block (groups,
    rows, taps * C_out/g) from cot (N, OD, OH, OW, C_out), C-contiguous, of one float
    dtype; `geometry` (int64): N, the output's and input's sizes, stride (per axis),
    groups, C_out/g; `shifts` (int64, (taps, 3)): each tap's o = i * s + shift; `tile`
    (int64): n0, n1, d0, d1, h0, h1. The GIL is released meanwhile."""
    _native.gather_cotangent(cot.dtype.itemsize, cot, block, geometry, shifts, tile)


def planar_rows(src: np.ndarray, dst: np.ndarray, row0: int, row1: int, width: int,
                res: int, left: int, stretch: int) -> None:
    """Rows [row0, row1) of src (rows, width, C) made planar in dst (rows, C, res,
    stretch): channel c's W residue r holds pixel j * res + r at element left + j, zeros
    around. C-contiguous, one float dtype; the GIL is released meanwhile."""
    _native.planar_rows(src.dtype.itemsize, src, dst, row0, row1, width, src.shape[-1], res,
                        left, stretch)


def planar_grad_weight(x: np.ndarray, g: np.ndarray, sums: np.ndarray,
                       geometry: np.ndarray) -> None:
    """sums (taps, C_out/g, C_in/g, lanes) += grad_weight's vector sums over planar rows
    (csrc/grad_planar.hpp; `_vjp_native._planar_geometry_array` lays out `geometry`).
    The GIL is released meanwhile."""
    _native.planar_grad_weight(x.dtype.itemsize, x, g, sums, geometry)


def planar_grad_input(g: np.ndarray, w: np.ndarray, gx: np.ndarray,
                      geometry: np.ndarray) -> None:
    """grad_input's channels of one group for a run of input rows, over the planar
    cotangent (csrc/grad_planar.hpp; `_vjp_native._planar_geometry_array` lays out
    `geometry`). The GIL is released meanwhile."""
    _native.planar_grad_input(g.dtype.itemsize, g, w, gx, geometry)


def unpack_grad_weight(part: np.ndarray, gw: np.ndarray, taps: int, rows: int, cols: int,
                       tap0: int, tap1: int) -> None:
    """One group's gw (C_out/g, taps, C_in/g), taps [tap0, tap1), from grad_weight's
    packed sums (the inverse of `fill_columns`, `cols` a whole number of vectors): (rows,
    cols) = (C_in/g, C_out/g). Both C-contiguous, of one float dtype; the GIL is released
    meanwhile."""
    lanes, max_vectors = layout(part.dtype.itemsize)
    _native.unpack_grad_weight(part.dtype.itemsize, part, gw, taps, rows, cols,
                               lanes * max_vectors, tap0, tap1)


class GradWeightLayout(enum.IntEnum):
    """How the compiled grad_weight lays its sums (`_vjp.grad_weight_layout`). The first
    three are `grad_weight`'s `swapped` (GwJob's, csrc/correlate_api.h: CT_GW_DEPTHWISE is
    2); WIDE, PLANAR and SIDE_BY_SIDE are built in Python (`_vjp_native`) on them and on
    `planar_grad_weight`."""

    ALONG_OUT = 0  # vectors along C_out/g, packed then unpacked
    ALONG_IN = 1  # "swapped": vectors along C_in/g (the last may be partial), x read in place
    DEPTHWISE = 2  # one channel per group, per-worker partial sums
    WIDE = 3  # ALONG_OUT over a W-padded cotangent: every W tap's columns in one run
    PLANAR = 4  # vectors along input pixels, over planar copies of x and the cotangent
    SIDE_BY_SIDE = 5  # ALONG_IN over every conv group's C_in/g at once (`group_cin`)


def grad_weight(swapped: int, x: np.ndarray, x_offset: int, g: np.ndarray, g_offset: int,
                offsets: TapOffsets, steps: tuple[int, ...], part: np.ndarray,
                box: tuple[int, ...] | list[tuple[tuple[int, ...], bool]], cin: int, cout: int,
                units: tuple[int, int] | list[tuple[int, int]] | None = None,
                zero: bool = False, strides: tuple[int, int] = (0, 0), part_offset: int = 0,
                into: list | None = None, grad_input: np.ndarray | None = None,
                grad_input_offset: int = 0, weight: np.ndarray | None = None,
                w: tuple[int, int] | None = None, group_cin: int = 0,
                g_first: tuple[int, int, int] = (0, 0, 0),
                g_dims: tuple[int, int, int] | None = None) -> None:
    """part += grad_weight of the input rows in `box` (n0, n1, d0, d1, h0, h1), laid out
    as CHANNELS packs (taps, C_in, C_out) ((taps, C_out, C_in) when `swapped`, which
    the short side C_out < vector length calls for), or, with `strides` (row, tap) in
    elements, the sum for (tap, row r, column c) at part[part_offset + tap * strides[1] +
    r * strides[0] + c]. x (N, D, H, W, C) and the cotangent g (N, D', H', W', C') have
    contiguous channels; the offsets (elements) pick a conv group's channels. `units`
    limits the work to (tap, chunk of columns) units [u0, u1), numbered tap * chunks +
    chunk (see `gw_units`); `zero`: their sums start from zero instead of part's values.
    `swapped`: GradWeightLayout.ALONG_OUT, ALONG_IN (or a bool for either) or DEPTHWISE
    (see `depthwise_grad_weight`). `into`: append the call, prepared for a `Task`, instead
    of running it; with a list of `units`, one call per entry (the arguments are worked
    out once).

    `grad_input` (N, D, H, W, C_in), with `weight` laid out as part (the same strides and
    `part_offset`): the same pass also writes grad_input's rows of the box, from channel
    `grad_input_offset` on; only where `fuses_grad_input`, swapped, over every unit.

    `w`: the box's W positions [w0, w1) of x (and grad_input) only, a row's piece.

    `g_first`, `g_dims`: where `g` holds only some rows of the cotangent, the (n, d, h)
    index its first row stands for (as `origin`), and the whole cotangent's (D', H', W').

    `box` a list of (box, zero) pairs: one prepared call per box (`into`, one unit range,
    one `w` for all), the arguments worked out once (a call's own took ~10 us: 112 tiles were
    1.1 ms of a 3.6 ms backward).

    `group_cin`: conv groups side by side (swapped, at `strides`): `cin` is every group's
    channels, group_cin of them a group, and `cout` a group's; the sum of (tap, a, c) is
    that of output channel (c // group_cin) * cout + a with input channel c % group_cin.
    Every group's cotangent channels must fit one vector."""
    item = x.dtype.itemsize
    assert x.dtype == g.dtype == part.dtype and x.strides[-1] == g.strides[-1] == item
    xs = element_strides(x)[:4]
    w0, w1 = w if w is not None else (0, x.shape[3])
    offsets = offsets.along_w(w0 * steps[2])
    job = {"itemsize": item, "swapped": int(swapped),  # GwJob's fields
           "x": _native.address(x) + (x_offset + w0 * xs[3]) * item, "xs": xs,
           "g": origin(g, g_first)[0] + g_offset * item, "gs": element_strides(g)[:4],
           "gdims": g_dims or g.shape[1:4], "off": offsets.addresses, "ntaps": offsets.counts,
           "step": steps, "part": _native.address(part) + part_offset * item,
           "pa": strides[0], "pt": strides[1], "wcount": w1 - w0, "cin": cin, "cout": cout,
           "group_cin": group_cin}
    boxes = box if isinstance(box, list) else [(box, zero)]
    job["box"], job["zero"] = boxes[0][0], int(boxes[0][1])
    if grad_input is not None:
        assert weight is not None and grad_input.dtype == weight.dtype == part.dtype
        gxs = element_strides(grad_input)[:4]
        job["gx"] = _native.address(grad_input) + (grad_input_offset + w0 * gxs[3]) * item
        job["gxs"] = gxs
        job["w"] = _native.address(weight) + part_offset * item
    if isinstance(units, list):
        assert into is not None
        for job["unit0"], job["unit1"] in units:  # each call copies the job as it prepares
            into.append(_native.grad_weight_call(job))
        return
    job["unit0"], job["unit1"] = units if units is not None else (0, 1 << 62)
    assert into is not None or len(boxes) == 1
    for job["box"], each_zero in boxes:  # each call copies the job as it prepares
        job["zero"] = int(each_zero)
        if into is not None:
            into.append(_native.grad_weight_call(job))
        else:
            _native.grad_weight(job)


def depthwise_grad_weight(x: np.ndarray, g: np.ndarray, offsets: TapOffsets,
                          steps: tuple[int, ...], part: np.ndarray,
                          box: tuple[int, ...] | list[tuple[tuple[int, ...], bool]],
                          into: list | None = None,
                          w: tuple[int, int] | None = None) -> None:
    """part (taps, C) += the depthwise grad_weight of the input rows in `box`: for each tap
    and channel c, the sum over pixels of x[p, c] * g[p * step + offset, c]. `box`: as
    `grad_weight`'s (a list: a call per box)."""
    assert part.flags.c_contiguous and x.shape[-1] == g.shape[-1]
    channels = x.shape[-1]
    grad_weight(GradWeightLayout.DEPTHWISE, x, 0, g, 0, offsets, steps, part, box, channels,
                channels, strides=(1, channels), into=into, w=w)


def fuses_grad_input(itemsize: int, cin: int, cout: int) -> bool:
    """Whether `grad_weight`, swapped, can write grad_input in the same pass: few sums
    per tap (C_out/g times the vectors of C_in/g under 8, a 16 -> 1 head), the kernel's
    rule."""
    return AVAILABLE and _native.fuses_grad_input(itemsize, cin, cout)


def gw_units(taps: int, columns: int, itemsize: int) -> int:
    """How many (tap, chunk of columns) units `grad_weight` splits its work into."""
    lanes, max_vectors = layout(itemsize)
    return taps * ceil_div(columns, lanes * max_vectors)
