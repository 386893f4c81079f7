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
    vjp_plan,
)
from ._memory import get_result_cache, release_memory, set_result_cache
from ._native_kernel import isa as native_isa
from ._plan import Plan, VjpPlan, get_num_threads, get_winograd, set_num_threads, set_winograd
from ._vjp import conv_transpose1d_vjp, conv_transpose2d_vjp, conv_transpose3d_vjp
from ._weights import weight_from_torch, weight_to_torch

__version__ = "0.1.0"

__all__ = [
    "Plan",
    "conv_transpose1d",
    "conv_transpose1d_vjp",
    "conv_transpose2d",
    "conv_transpose2d_vjp",
    "conv_transpose3d",
    "conv_transpose3d_vjp",
    "get_num_threads",
    "get_result_cache",
    "get_winograd",
    "native_isa",
    "output_shape",
    "plan",
    "release_memory",
    "run_plan",
    "set_num_threads",
    "set_result_cache",
    "set_winograd",
    "VjpPlan",
    "vjp_plan",
    "weight_from_torch",
    "weight_to_torch",
]
