"""Arrays of other libraries (PyTorch, MLX) read as NumPy arrays: the one reader that
every front door, the weight converters and the bench share.

Nothing here imports torch or MLX: a caller who hands us one of their arrays already has
it loaded, and `import convtranspose` alone must stay light.
"""

from __future__ import annotations

import sys
from typing import Any

import numpy as np


def bfloat16_dtype() -> np.dtype:
    """ml_dtypes' bfloat16, the NumPy dtype that stands for PyTorch's and MLX's."""
    try:
        import ml_dtypes
    except ImportError:
        raise TypeError("bfloat16 arrays need the ml_dtypes package: "
                        "pip install 'convtranspose[bf16]'") from None
    return np.dtype(ml_dtypes.bfloat16)


def from_framework(value: Any, *, to_cpu: bool = False) -> Any:
    """A torch tensor or an MLX array as an ndarray (a view where NumPy can hold its
    dtype); anything else comes back as it is.

    Torch tensors are detached (we build no autograd graph; a parameter that requires grad
    refuses `.numpy()`), and moved to the CPU first with `to_cpu`. bfloat16 is
    reinterpreted bit for bit as ml_dtypes' bfloat16: NumPy cannot read either
    framework's alone."""
    module = type(value).__module__.split(".")[0]
    if module == "torch" and hasattr(value, "detach"):
        value = value.detach()
        if to_cpu:
            value = value.cpu()
        if str(value.dtype) == "torch.bfloat16":
            return value.view(dtype=sys.modules["torch"].int16).numpy().view(bfloat16_dtype())
        return value.numpy()
    if module == "mlx" and str(getattr(value, "dtype", "")) == "mlx.core.bfloat16":
        return np.asarray(value.view(sys.modules["mlx.core"].uint16)).view(bfloat16_dtype())
    return value


def mlx_to_numpy(a: Any) -> np.ndarray:
    """An mx.array (or anything mx.array takes) as an ndarray, a view of MLX's buffer where
    the dtype allows. bfloat16 travels as float32, which holds every bfloat16 value
    exactly: the MLX drop-in needs no ml_dtypes, and MLX rounds its results back."""
    import mlx.core as mx

    if not isinstance(a, mx.array):
        a = mx.array(a)
    if a.dtype == mx.bfloat16:
        a = a.astype(mx.float32)
    return np.asarray(a)
