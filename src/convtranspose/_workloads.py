"""The public benchmark workloads W1-W9, defined here as data, plus deterministic arrays.

A workload is one transposed-convolution layer (W1-W9 are 3-D; the bench's random sweep
also draws 1-D and 2-D ones): channels-last input (N, *spatial, C_in) and weight
(C_out, *kernel, C_in / groups), with MLX's settings. `convtranspose bench` and the tests
read them from here so that every measurement talks about the same layers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np

Dims = tuple[int, ...]  # one entry per spatial axis (1 to 3)


def _dims(value: int | Iterable[int], ndim: int) -> Dims:
    if isinstance(value, int):
        return (value,) * ndim
    out = tuple(int(v) for v in value)
    if len(out) != ndim:
        raise ValueError(f"expected an int or {ndim} ints, got {value!r}")
    return out


@dataclass(frozen=True)
class Workload:
    """One 1-D, 2-D or 3-D transposed-convolution layer to time (every tuple has one entry
    per spatial axis)."""

    name: str
    label: str
    batch: int
    in_spatial: Dims
    c_in: int
    c_out: int
    kernel: Dims
    stride: Dims = (1, 1, 1)
    padding: Dims = (0, 0, 0)
    output_padding: Dims = (0, 0, 0)
    groups: int = 1
    dilation: Dims = (1, 1, 1)

    @property
    def ndim(self) -> int:
        return len(self.in_spatial)

    @property
    def title(self) -> str:
        return f"{self.name} {self.label}"

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, *self.in_spatial, self.c_in)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.c_out, *self.kernel, self.c_in // self.groups)

    @property
    def settings(self) -> dict[str, Any]:
        """Keyword arguments of `conv_transpose{ndim}d` (and of `convtranspose.plan`)."""
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation,
                "output_padding": self.output_padding, "groups": self.groups}

    @property
    def out_spatial(self) -> Dims:
        return tuple(
            (i - 1) * s - 2 * p + d * (k - 1) + op + 1
            for i, k, s, p, d, op in zip(self.in_spatial, self.kernel, self.stride,
                                         self.padding, self.dilation, self.output_padding))

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self.batch, *self.out_spatial, self.c_out)

    @property
    def useful_flops(self) -> int:
        """2 * N * prod(in_spatial) * C_in * (C_out / groups) * prod(kernel): the multiply-adds
        that touch a real input value (no zero-stuffing), whatever the algorithm."""
        return (2 * self.batch * math.prod(self.in_spatial) * self.c_in
                * (self.c_out // self.groups) * math.prod(self.kernel))


def workload(name: str, label: str, batch: int, in_spatial: int | Iterable[int], c_in: int,
             c_out: int, kernel: int | Iterable[int], stride: int | Iterable[int] = 1,
             padding: int | Iterable[int] = 0, output_padding: int | Iterable[int] = 0,
             groups: int = 1, dilation: int | Iterable[int] = 1, ndim: int = 3) -> Workload:
    """A `Workload` of `ndim` spatial axes from ints or tuples (ints apply to every axis)."""
    return Workload(name, label, batch, _dims(in_spatial, ndim), c_in, c_out,
                    _dims(kernel, ndim), _dims(stride, ndim), _dims(padding, ndim),
                    _dims(output_padding, ndim), groups, _dims(dilation, ndim))


# The public workloads: float32 in the README's tables; any dtype here.
WORKLOADS: dict[str, Workload] = {w.name: w for w in (
    workload("W1", "unet-k2s2-16", 2, 16, 256, 128, 2, 2),
    workload("W2", "unet-k2s2-64", 1, 64, 64, 32, 2, 2),
    workload("W3", "gan-k4s2p1", 4, 8, 256, 128, 4, 2, 1),
    workload("W4", "vae-k3s2p1op1", 1, (8, 32, 32), 128, 128, 3, 2, 1, 1),
    workload("W5", "k3s1p1", 1, (16, 32, 32), 64, 64, 3, 1, 1),
    workload("W6", "head-16to1", 1, 32, 16, 1, 4, 2, 1),
    workload("W7", "depthwise", 1, 32, 64, 64, 3, 2, 1, 1, groups=64),
    workload("W8", "video-aniso", 1, (8, 32, 32), 128, 64, (3, 4, 4), (1, 2, 2), 1),
    workload("W9", "tiny", 1, 4, 8, 8, 3, 2, 1, 1),
)}


def select_workloads(names: str | Iterable[str] | None = None) -> list[Workload]:
    """Workloads by name ("W1,W3", ["W1", "w3"]); None or "all" gives all of them, in order."""
    if names is None:
        return list(WORKLOADS.values())
    if isinstance(names, str):
        if names.strip().lower() == "all":
            return list(WORKLOADS.values())
        names = names.split(",")
    wanted = [n.strip().upper() for n in names if n.strip()]
    unknown = [n for n in wanted if n not in WORKLOADS]
    if unknown or not wanted:
        raise ValueError(
            f"workload: expected a comma-separated list of {', '.join(WORKLOADS)} (or 'all'), "
            f"got {','.join(wanted) if wanted else repr(names)}"
            + (f" (unknown: {', '.join(unknown)})" if unknown else ""))
    return [WORKLOADS[n] for n in dict.fromkeys(wanted)]


DTYPES = ("float32", "float16", "bfloat16", "float64")


def resolve_dtype(dtype: Any) -> np.dtype:
    """numpy dtype for 'float32', 'float16', 'bfloat16' (ml_dtypes) or 'float64'."""
    if isinstance(dtype, str) and dtype == "bfloat16":
        try:
            import ml_dtypes
        except ImportError:
            raise ValueError("dtype: 'bfloat16' needs the ml_dtypes package "
                             "(pip install ml_dtypes)") from None
        return np.dtype(ml_dtypes.bfloat16)
    dt = np.dtype(dtype)
    if dt.name not in DTYPES:
        raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {dt.name}")
    return dt


def make_arrays(w: Workload, dtype: Any = np.float32, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic (input, weight) for a workload, channels last, in `dtype`.

    The input is standard normal; the weight is scaled by 1 / sqrt(fan-in) so that outputs
    stay of order one in every dtype (float16 must not overflow).
    """
    dt = resolve_dtype(dtype)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(w.input_shape, dtype=np.float32)
    fan_in = (w.c_in // w.groups) * math.prod(w.kernel) / math.prod(w.stride)
    wt = rng.standard_normal(w.weight_shape, dtype=np.float32) / np.float32(
        math.sqrt(max(fan_in, 1.0)))
    return x.astype(dt), wt.astype(dt)


def make_cotangent(w: Workload, dtype: Any = np.float32, seed: int = 1) -> np.ndarray:
    """A deterministic standard-normal cotangent of the workload's output shape."""
    rng = np.random.default_rng(seed)
    return rng.standard_normal(w.output_shape, dtype=np.float32).astype(resolve_dtype(dtype))
