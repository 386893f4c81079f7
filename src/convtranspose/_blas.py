"""BLAS thread control.

Our worker threads are the parallelism, so each GEMM runs on one BLAS thread: otherwise
the two levels of threads fight over the cores, and OpenBLAS's busy-waiting threads
collapse on a shared machine (a layer measured 14x slower). threadpoolctl knows how to
reach OpenBLAS, MKL and BLIS inside NumPy; without it BLAS keeps its own threads.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - exercised only without the dependency
    ThreadpoolController = None

_blas_libs: list | None = None


def _libs() -> list:
    """NumPy's BLAS libraries, found once (a ThreadpoolController scan takes milliseconds)."""
    global _blas_libs
    if _blas_libs is None:
        _blas_libs = ([] if ThreadpoolController is None else
                      list(ThreadpoolController().select(user_api="blas").lib_controllers))
    return _blas_libs


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    """One BLAS thread inside the block, the caller's setting restored after it: two
    ctypes calls per library, where threadpoolctl's own context costs ~25 us a call."""
    saved = [(lib, lib.get_num_threads()) for lib in _libs()]
    for lib, threads in saved:
        if threads != 1:
            lib.set_num_threads(1)
    try:
        yield
    finally:
        for lib, threads in saved:
            if threads != 1:
                lib.set_num_threads(threads)
