"""Memory kept from call to call: scratch for what a call packs and then drops, and the
memory of results the caller has dropped, for the next result of the same size.

Fresh memory costs a page fault per 4 KiB the first time it is written (the system
zeroes each page then): about 60 us per MiB here. Big arrays come straight from the
system (glibc maps every allocation of 32 MiB or more afresh), and after another library
has handed its heap back, smaller ones do too. W2's 256 MiB result paid 18 ms of its
83 ms for it, W1's 32 MiB 2.3 of 22 ms; packing W3's 8 MiB of weights paid 2.9 ms.

* `Scratch` lends one retained buffer to one call; a call that needs more than the buffer
  holds gets fresh arrays for the rest, and the buffer grows, when it is given back, to
  what that call used. At most `RETAIN_BYTES` are kept per buffer, one buffer per
  concurrent call, and never a view of one reaches the caller.
* `result_empty` gives results of `RECYCLE_FROM_BYTES` or more memory that an earlier
  result of the same size held, once the caller dropped it and every view of it. At most
  `set_result_cache` bytes of dropped results are kept (oldest dropped first).
"""

import ctypes
import os
import threading
import weakref

import numpy as np

RETAIN_BYTES = 64 << 20
_ALIGN = 64  # a cache line: the kernel's vector loads stay within one

_free: list[np.ndarray] = []
_lock = threading.Lock()


class Scratch:
    """Bump allocation from a retained buffer; use as a context manager."""

    def __init__(self) -> None:
        with _lock:
            self._buffer = _free.pop() if _free else np.empty(0, np.uint8)
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
        fresh = np.empty(nbytes + _ALIGN, np.uint8)  # past the buffer: this call only
        skip = (-fresh.ctypes.data) % _ALIGN
        return fresh[skip:skip + nbytes].view(dtype)

    def __enter__(self) -> "Scratch":
        return self

    def __exit__(self, *exc) -> None:
        buffer = self._buffer
        if buffer.size < self._used + _ALIGN <= RETAIN_BYTES:
            buffer = np.empty(self._used + _ALIGN, np.uint8)  # the next call fits whole
        with _lock:
            _free.append(buffer)


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
_dropped: list[np.ndarray] = []  # raw blocks whose result died, oldest first
_dropped_bytes = 0
_results_lock = threading.RLock()  # a drop can run inside a lease, in the same thread


def set_result_cache(max_bytes: int | None) -> None:
    """Keep at most `max_bytes` of dropped results' memory for the next results of the
    same size (0: keep none, and give back what is kept now); None restores the default,
    1 GiB or a sixteenth of the machine's memory where that is less."""
    global _result_cache_bytes
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int)
                                  or max_bytes < 0):
        raise ValueError("set_result_cache: 'max_bytes' must be an int >= 0 or None, got "
                         f"{max_bytes!r}")
    with _results_lock:
        _result_cache_bytes = _default_result_cache() if max_bytes is None else max_bytes
        _trim(0)


def get_result_cache() -> int:
    """The bytes of dropped results' memory kept at most (see `set_result_cache`)."""
    return _result_cache_bytes


def release_memory() -> None:
    """Give back every buffer kept between calls: dropped results' memory and scratch."""
    global _dropped_bytes
    with _results_lock:
        _dropped.clear()
        _dropped_bytes = 0
    with _lock:
        _free.clear()


def _trim(incoming: int) -> None:
    """Drop the oldest kept blocks until `incoming` more bytes fit under the cap."""
    global _dropped_bytes
    while _dropped and _dropped_bytes + incoming > _result_cache_bytes:
        _dropped_bytes -= _dropped.pop(0).nbytes


def _give_back(raw: np.ndarray) -> None:
    global _dropped_bytes
    with _results_lock:
        if raw.nbytes <= _result_cache_bytes:
            _trim(raw.nbytes)
            _dropped.append(raw)
            _dropped_bytes += raw.nbytes


def _take(size: int) -> np.ndarray | None:
    global _dropped_bytes
    with _results_lock:
        for i in range(len(_dropped) - 1, -1, -1):
            if _dropped[i].nbytes == size:
                _dropped_bytes -= size
                return _dropped.pop(i)
    return None


def result_empty(shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
    """An uninitialised C-contiguous array for a result. From `RECYCLE_FROM_BYTES` on, its
    memory may be that of an earlier result which is gone; it returns to the cache when
    this one and every view of it are gone. Such an array does not own its memory
    (`flags.owndata` is False; numpy will not `resize` it in place)."""
    dtype = np.dtype(dtype)
    nbytes = dtype.itemsize
    for n in shape:
        nbytes *= n
    if nbytes < RECYCLE_FROM_BYTES or _result_cache_bytes == 0:
        return np.empty(shape, dtype)
    size = -(-(nbytes + _ALIGN) // _PAGE) * _PAGE
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
