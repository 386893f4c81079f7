"""Memory kept from call to call for what a call packs and then drops (packed weights,
partial sums).

Fresh memory costs a page fault per 4 KiB the first time it is written, about 0.25 ms
per MiB here; after another library (or a larger layer) has handed the heap back to the
system, every call would pay it again (W3: 2.9 ms of its 29 ms went to packing 8 MiB).
A `Scratch` lends one retained buffer to one call; a call that needs more than the
buffer holds gets fresh arrays for the rest, and the buffer grows, when it is given
back, to what that call used. At most `RETAIN_BYTES` are kept per buffer, one buffer per
concurrent call, and never a view of one reaches the caller.
"""

from __future__ import annotations

import threading

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

    def __enter__(self) -> Scratch:
        return self

    def __exit__(self, *exc) -> None:
        buffer = self._buffer
        if buffer.size < self._used + _ALIGN <= RETAIN_BYTES:
            buffer = np.empty(self._used + _ALIGN, np.uint8)  # the next call fits whole
        with _lock:
            _free.append(buffer)
