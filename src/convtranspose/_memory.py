"""Memory kept from call to call: scratch for what a call packs and then drops, and the
memory of results the caller has dropped, for the next result of the same size.

Fresh memory costs a page fault per 4 KiB the first time it is written (the system
zeroes each page then): about 60 us per MiB here. Big arrays come straight from the
system (glibc maps every allocation of 32 MiB or more afresh), and after another library
has handed its heap back, smaller ones do too. W2's 256 MiB result paid 18 ms of its
83 ms for it, W1's 32 MiB 2.3 of 22 ms; packing W3's 8 MiB of weights paid 2.9 ms.

* `Scratch` lends one retained buffer to one call; a call that needs more than the buffer
  holds gets arrays for the rest from `result_empty` (recycled memory, as results'), and
  the buffer grows, when it is given back, to what that call used. At most
  `RETAIN_BYTES` are kept per buffer, one buffer per concurrent call, and never a view of
  one reaches the caller.
* `result_empty` gives results of `RECYCLE_FROM_BYTES` or more memory that an earlier
  result of the same size held, once the caller dropped it and every view of it. At most
  `set_result_cache` bytes of dropped results are kept (oldest dropped first).

Both go back to the system once unused for `DECAY_SECONDS` (as jemalloc's and mimalloc's
decay: a process that stops calling holds nothing of ours a few seconds later, and calls
back to back or a second apart keep their saving). A daemon thread gives them back: it
sleeps until the oldest kept block's time is up (indefinitely while nothing is kept; a
block kept then wakes it), frees what is due, and asks glibc to hand back the heap pages
it freed (blocks below glibc's mmap threshold come from its heap, which keeps them
otherwise).
"""

import atexit
import ctypes
import ctypes.util
import os
import threading
import time
import weakref

import numpy as np

from ._geometry import ceil_div

RETAIN_BYTES = 64 << 20
# Unused this long, kept memory goes back to the system. Two seconds, not one: a call
# that comes 1-2 s after the last (a training step; the bench's rounds, whose slow peer
# is followed by a 1 s cooldown) found its memory given back and faulted it in again,
# on a virtual machine at up to 2-3 ms a MiB once the host has taken the pages back
# (4 -> 48 k3 s4 1-D, a 61 MB result, calls 1.5 s apart: 10-246 ms, median 18-110, at
# 1 s; 6-16 ms, median 8.4-8.8, at 2 s). Within issue 22's three seconds idle.
DECAY_SECONDS = 2.0
_ALIGN = 64  # a cache line: the kernel's vector loads stay within one

# Kept blocks, oldest kept first: (when kept, buffer). One lock for both kinds, reentrant:
# a result's drop can run inside a lease, in the same thread.
_free: list[tuple[float, np.ndarray]] = []  # scratch buffers
_lock = threading.RLock()


class Scratch:
    """Bump allocation from a retained buffer; use as a context manager."""

    def __init__(self) -> None:
        with _lock:
            self._buffer = _free.pop()[1] if _free else np.empty(0, np.uint8)
        self._used = 0

    def empty(self, count: int, dtype: np.dtype) -> np.ndarray:
        """An uninitialised 1-D array of `count` elements on a cache line boundary,
        valid until the scratch closes."""
        dtype = np.dtype(dtype)
        nbytes = count * dtype.itemsize
        start = self._used + (-(self._buffer.ctypes.data + self._used)) % _ALIGN
        self._used = start + nbytes
        if self._used <= self._buffer.size:
            return self._buffer[start:self._used].view(dtype)
        # Past the buffer: this call only, big ones in a dropped result's memory where one
        # of the size is kept (on a cache line too): a packed weight past RETAIN_BYTES
        # faulted in fresh pages at every call (384 -> 205 k7 s4 on 4x3x3, 108 MB: 25-29
        # ms a call, 130-170 after a pause of a second, once the host had taken the pages
        # back; 21-25 ms recycled).
        if _recycles(nbytes):
            return result_empty((count,), dtype)
        fresh = np.empty(nbytes + _ALIGN, np.uint8)
        skip = (-fresh.ctypes.data) % _ALIGN
        return fresh[skip:skip + nbytes].view(dtype)

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc) -> None:
        buffer = self._buffer
        if buffer.size < self._used + _ALIGN <= RETAIN_BYTES:
            buffer = np.empty(self._used + _ALIGN, np.uint8)  # the next call fits whole
        if buffer.size:
            with _lock:
                _free.append((time.monotonic(), buffer))
                _decay_soon()


# --- results -------------------------------------------------------------------------------

RECYCLE_FROM_BYTES = 1 << 18  # smaller results come from malloc's heap without faults
_PAGE = 1 << 12


def _default_result_cache() -> int:
    """1 GiB, or a sixteenth of the machine's memory where that is less."""
    try:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, OSError, ValueError):
        memory = 8 << 30
    return min(1 << 30, memory // 16)


_result_cache_bytes = _default_result_cache()
_dropped: list[tuple[float, np.ndarray]] = []  # raw blocks whose result died, oldest first
_dropped_bytes = 0


def set_result_cache(max_bytes: int | None) -> None:
    """Keep at most `max_bytes` of dropped results' memory for the next results of the
    same size (0: keep none, and give back what is kept now); None restores the default,
    1 GiB or a sixteenth of the machine's memory where that is less."""
    global _result_cache_bytes
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                  or max_bytes < 0):
        raise ValueError("set_result_cache: 'max_bytes' must be an int >= 0 or None, got "
                         f"{max_bytes!r}")
    with _lock:
        _result_cache_bytes = _default_result_cache() if max_bytes is None else max_bytes
        _trim(0)


def get_result_cache() -> int:
    """The bytes of dropped results' memory kept at most (see `set_result_cache`)."""
    return _result_cache_bytes


def release_memory() -> None:
    """Give back every buffer kept between calls: dropped results' memory and scratch."""
    global _dropped_bytes
    with _lock:
        _dropped.clear()
        _dropped_bytes = 0
        _free.clear()
        # The decay thread may sleep until the deadline of a block just dropped from the
        # lists: woken, it waits again for what is kept from now on (a test that had kept
        # blocks with DECAY_SECONDS at an hour left it asleep past later blocks' decay).
        _wake.notify_all()
    _trim_heap()


def _trim(incoming: int) -> None:
    """Drop the oldest kept blocks until `incoming` more bytes fit under the cap."""
    global _dropped_bytes
    while _dropped and _dropped_bytes + incoming > _result_cache_bytes:
        _dropped_bytes -= _dropped.pop(0)[1].nbytes


def _give_back(raw: np.ndarray) -> None:
    global _dropped_bytes
    with _lock:
        if raw.nbytes <= _result_cache_bytes:
            _trim(raw.nbytes)
            _dropped.append((time.monotonic(), raw))
            _dropped_bytes += raw.nbytes
            _decay_soon()


def _take(size: int) -> np.ndarray | None:
    global _dropped_bytes
    with _lock:
        for i in range(len(_dropped) - 1, -1, -1):
            if _dropped[i][1].nbytes == size:
                _dropped_bytes -= size
                return _dropped.pop(i)[1]
    return None


# --- decay ---------------------------------------------------------------------------------

_wake = threading.Condition(_lock)
_decayer: threading.Thread | None = None
_decayer_waits = False  # without a deadline: a block kept now must wake it
_closing = False


def _decay_soon() -> None:
    """Under _lock, after keeping a block: make sure the decay thread will see it."""
    global _decayer
    if _decayer is not None:
        if _decayer_waits:
            _wake.notify()
        return
    if _closing:
        return
    thread = threading.Thread(target=_decay_loop, name="convtranspose-decay", daemon=True)
    try:
        thread.start()
    except RuntimeError:  # no thread to be had (at its limit, or shutting down): keep no memory
        _expire(float("inf"))
        return
    _decayer = thread


def _expire(now: float) -> tuple[list[np.ndarray], float | None]:
    """Under _lock: take out every block kept since before now - DECAY_SECONDS; returns
    them and the time the next one is due (None: nothing kept). Both lists are in the
    order kept: leases and takes remove from anywhere, additions go at the end."""
    global _dropped_bytes
    due: list[np.ndarray] = []
    cutoff = now - DECAY_SECONDS
    while _dropped and _dropped[0][0] <= cutoff:
        due.append(_dropped.pop(0)[1])
        _dropped_bytes -= due[-1].nbytes
    while _free and _free[0][0] <= cutoff:
        due.append(_free.pop(0)[1])
    oldest = min((kept[0][0] for kept in (_dropped, _free) if kept), default=None)
    return due, None if oldest is None else oldest + DECAY_SECONDS


def _decay_loop() -> None:
    global _decayer_waits
    while True:
        with _lock:
            while True:
                if _closing:
                    return
                due, deadline = _expire(time.monotonic())
                if due:
                    break
                _decayer_waits = deadline is None
                _wake.wait(None if deadline is None else deadline - time.monotonic())
                _decayer_waits = False
        del due  # the last reference: the pages go back (big blocks are unmapped)
        _trim_heap()


def _load_trim():
    """glibc's malloc_trim, or None elsewhere."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        trim = libc.malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int
    return trim


_malloc_trim = _load_trim()


def _trim_heap() -> None:
    """Hand the heap's free pages back to the system (glibc keeps them otherwise)."""
    if _malloc_trim is not None:
        _malloc_trim(0)


def _close() -> None:
    """At exit: the decay thread ends instead of waking during the interpreter's shutdown."""
    global _closing
    with _lock:
        _closing = True
        _wake.notify_all()


def _after_fork() -> None:
    """In a forked child: the parent's decay thread and lock did not come along."""
    global _lock, _wake, _decayer, _decayer_waits, _dropped_bytes
    _lock = threading.RLock()
    _wake = threading.Condition(_lock)
    _decayer, _decayer_waits = None, False
    _dropped.clear()
    _free.clear()
    _dropped_bytes = 0


atexit.register(_close)
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork)


def _recycles(nbytes: int) -> bool:
    """Whether `result_empty` gives an array of `nbytes` recycled memory (on a cache line)."""
    return nbytes >= RECYCLE_FROM_BYTES and _result_cache_bytes > 0


def result_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array for a result. From `RECYCLE_FROM_BYTES` on, its
    memory may be that of an earlier result which is gone; it returns to the cache when
    this one and every view of it are gone. Such an array does not own its memory
    (`flags.owndata` is False; numpy will not `resize` it in place)."""
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= n
    if not _recycles(nbytes):
        return np.empty(shape, dtype)
    size = ceil_div(nbytes + _ALIGN, _PAGE) * _PAGE
    raw = _take(size)
    if raw is None:
        raw = np.empty(size, np.uint8)
    skip = (-raw.ctypes.data) % _ALIGN
    # The owner is a fresh ctypes view for this result alone: numpy keeps it alive while any
    # view of the result lives, and its death hands the block back.
    owner = (ctypes.c_ubyte * nbytes).from_buffer(raw, skip)
    weakref.finalize(owner, _give_back, raw).atexit = False
    return np.frombuffer(owner, dtype).reshape(shape)


def result_zeros(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    out = result_empty(shape, dtype)
    out.fill(0)
    return out
