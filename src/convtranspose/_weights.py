"""Weight layout converters between PyTorch's ConvTranspose and ours (MLX's).

PyTorch stores a transposed-convolution weight as (C_in, C_out/groups, *kernel); MLX and
convtranspose store it as (C_out, *kernel, C_in/groups). With groups the two layouts also
split the channels differently, so a plain transpose is only right for groups=1:

    W_torch[g*Cin_g + i, o, *k] == W_ours[g*Cout_g + o, *k, i]

Both functions only move elements: the dtype is kept, the result is a new C-contiguous
NumPy array, and the caller's array is never modified.
"""

import numbers
from typing import Any

import numpy as np

from ._arrays import from_framework

_TORCH_AXES = {3: "(C_in, C_out/groups, kW)", 4: "(C_in, C_out/groups, kH, kW)",
               5: "(C_in, C_out/groups, kD, kH, kW)"}
_OUR_AXES = {3: "(C_out, kW, C_in/groups)", 4: "(C_out, kH, kW, C_in/groups)",
             5: "(C_out, kD, kH, kW, C_in/groups)"}


def _as_numpy(op: str, w: Any) -> np.ndarray:
    """A NumPy view of `w` (ndarray, torch tensor, MLX array, nested list): never a write."""
    if w is None:
        raise TypeError(f"{op}: 'w' must be an array, got None")
    w = from_framework(w, to_cpu=True)
    try:
        arr = np.asarray(w)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise TypeError(
            f"{op}: 'w' could not be read as a rectangular array (a ragged list?): {exc}"
        ) from None
    if arr.dtype == object:
        raise TypeError(f"{op}: 'w' must be a numeric array, got dtype object")
    return arr


def _check(op: str, arr: np.ndarray, groups: Any, axes: dict[int, str],
           split_name: str) -> int:
    """Validate rank and groups; return groups as an int."""
    if arr.ndim not in axes:
        raise ValueError(
            f"{op}: 'w' must have 3, 4 or 5 dimensions ({axes[3]}, {axes[4]} or {axes[5]} "
            f"for a 1-D, 2-D or 3-D layer), got shape {arr.shape} with {arr.ndim}")
    if not isinstance(groups, numbers.Integral) or isinstance(groups, (bool, np.bool_)):
        raise TypeError(f"{op}: 'groups' must be an int, got {groups!r} "
                        f"({type(groups).__name__})")
    groups = int(groups)
    if groups <= 0:
        raise ValueError(f"{op}: 'groups' must be >= 1, got {groups}")
    if 0 in arr.shape:
        raise ValueError(
            f"{op}: 'w' must have no zero-size axis {axes[arr.ndim]}, got shape {arr.shape}")
    if arr.shape[0] % groups:
        raise ValueError(
            f"{op}: 'groups'={groups} must divide axis 0 of 'w' ({split_name}={arr.shape[0]}, "
            f"layout {axes[arr.ndim]}), got shape {arr.shape}")
    return groups


def _fresh(moved: np.ndarray, shape: tuple[int, ...], source: np.ndarray) -> np.ndarray:
    """`moved` as a C-contiguous array of `shape` that never aliases the caller's array
    (ascontiguousarray returns a view when the permutation is a no-op in memory)."""
    out = np.ascontiguousarray(moved).reshape(shape)
    return out.copy() if np.may_share_memory(out, source) else out


def weight_from_torch(w: Any, groups: int = 1) -> np.ndarray:
    """PyTorch ConvTranspose weight (C_in, C_out/groups, *kernel) -> ours (C_out, *kernel,
    C_in/groups), for 1-D, 2-D and 3-D layers.

    `groups` must be the layer's groups: for groups > 1 the channels are regrouped, not just
    transposed. Accepts torch tensors (detached, any requires_grad), NumPy arrays and
    array-likes; returns a new C-contiguous NumPy array of the same dtype.
    """
    op = "weight_from_torch"
    arr = _as_numpy(op, w)
    groups = _check(op, arr, groups, _TORCH_AXES, "C_in")
    c_in, c_out_g, *kernel = arr.shape
    c_in_g = c_in // groups
    k = len(kernel)
    # (g, Cin_g, Cout_g, *k) -> (g, Cout_g, *k, Cin_g) -> (C_out, *k, Cin_g)
    split = arr.reshape(groups, c_in_g, c_out_g, *kernel)
    moved = split.transpose(0, 2, *range(3, 3 + k), 1)
    return _fresh(moved, (groups * c_out_g, *kernel, c_in_g), arr)


def weight_to_torch(w: Any, groups: int = 1) -> np.ndarray:
    """Ours (C_out, *kernel, C_in/groups) -> PyTorch ConvTranspose weight (C_in,
    C_out/groups, *kernel): the exact inverse of `weight_from_torch`.

    Returns a new C-contiguous NumPy array of the same dtype; wrap it with
    `torch.from_numpy(...)` to load it into a module's state_dict.
    """
    op = "weight_to_torch"
    arr = _as_numpy(op, w)
    groups = _check(op, arr, groups, _OUR_AXES, "C_out")
    c_out, *kernel, c_in_g = arr.shape
    c_out_g = c_out // groups
    k = len(kernel)
    # (g, Cout_g, *k, Cin_g) -> (g, Cin_g, Cout_g, *k) -> (C_in, Cout_g, *k)
    split = arr.reshape(groups, c_out_g, *kernel, c_in_g)
    moved = split.transpose(0, 2 + k, 1, *range(2, 2 + k))
    return _fresh(moved, (groups * c_in_g, c_out_g, *kernel), arr)
