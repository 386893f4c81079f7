"""BLAS thread control.

When our own workers run tiles in parallel, each GEMM must run on one BLAS thread, or the
two levels of threads fight over the cores (measured: about 1.5x slower on 2 cores).
threadpoolctl knows how to reach OpenBLAS, MKL and BLIS inside NumPy; without it we
leave BLAS alone and rely on the planner running tiles on a single worker.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

try:
    from threadpoolctl import ThreadpoolController
except ImportError:  # pragma: no cover - exercised only without the dependency
    ThreadpoolController = None

_controller = None


def _get_controller():
    global _controller
    if _controller is None and ThreadpoolController is not None:
        _controller = ThreadpoolController()
    return _controller


def blas_controllable() -> bool:
    controller = _get_controller()
    return controller is not None and bool(controller.select(user_api="blas").lib_controllers)


@contextlib.contextmanager
def single_threaded_blas() -> Iterator[None]:
    controller = _get_controller()
    if controller is None:
        yield
        return
    with controller.limit(limits=1, user_api="blas"):
        yield
