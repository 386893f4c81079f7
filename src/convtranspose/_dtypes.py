"""Dtype rules: which dtypes we accept, what a call returns, what it accumulates in.

bfloat16 is recognised by name so that the core never has to import ml_dtypes: a caller
who hands us a bfloat16 array already has it loaded.
"""

from __future__ import annotations

import functools

import numpy as np

SUPPORTED = ("float16", "bfloat16", "float32", "float64")


@functools.lru_cache(maxsize=64)
def dtype_name(dtype: np.dtype) -> str:
    """Cached: NumPy builds `dtype.name` afresh each time (~1.5 us, several per small call
    in half precision)."""
    return np.dtype(dtype).name


_NATIVE = frozenset(np.dtype(n) for n in ("float16", "float32", "float64"))


def is_supported_float(dtype: np.dtype) -> bool:
    return dtype in _NATIVE or dtype_name(dtype) == "bfloat16"  # set lookup: the hot path


def result_dtype(a: np.dtype, b: np.dtype) -> np.dtype:
    """MLX's promotion between two floating dtypes.

    Same dtype stays; float16 with bfloat16 meets at float32; otherwise the wider wins.
    """
    a, b = np.dtype(a), np.dtype(b)
    if a == b:
        return a
    if {dtype_name(a), dtype_name(b)} == {"float16", "bfloat16"}:
        return np.dtype(np.float32)
    return a if a.itemsize > b.itemsize else b


def compute_dtype(result: np.dtype) -> np.dtype:
    """Accumulate in float32 at least; float64 stays float64 end to end."""
    return np.dtype(np.float64) if np.dtype(result) == np.float64 else np.dtype(np.float32)
