"""convtranspose: MLX-exact transposed convolutions on NumPy arrays, fast on the CPU.

    >>> import numpy as np, convtranspose as ct
    >>> x = np.ones((1, 4, 4, 4, 8), np.float32)     # (N, D, H, W, C_in), channels last
    >>> w = np.ones((16, 2, 2, 2, 8), np.float32)    # (C_out, kD, kH, kW, C_in/groups)
    >>> ct.conv_transpose3d(x, w, stride=2).shape
    (1, 8, 8, 8, 16)
"""

from ._api import (
    conv_transpose1d,
    conv_transpose2d,
    conv_transpose3d,
    output_shape,
    plan,
    run_plan,
)
from ._plan import Plan, get_num_threads, set_num_threads

__version__ = "0.1.0"

__all__ = [
    "Plan",
    "conv_transpose1d",
    "conv_transpose2d",
    "conv_transpose3d",
    "get_num_threads",
    "output_shape",
    "plan",
    "run_plan",
    "set_num_threads",
]
