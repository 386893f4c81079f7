"""``fan_in``: grouped layers whose groups each sum a few input channels into one output
channel (C_out/g == 1, 1 < C_in/g < a vector's lanes: the mirror of a channel multiplier).

The compiled kernel lays its vectors along a group's output channels (one lane used) or,
in dot mode, along its few input channels (part of one vector, masked at every pixel, one
call per group). Here the layer runs as a depthwise layer over every input channel
(vectors along C_in, each channel weighed by its own group's taps), and each group's
C_in/g results are then summed, in channel order. Measured on two cores against the
kernel's own dot mode: 24 -> 4 g4 k5 s2 (38x50x30) and 48 -> 4 g4 were the seed-6
sweep's slowest layers, at 0.39-0.42x ONNX Runtime.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from .. import _execute
from .. import _native_kernel as native
from .._algorithms import Algorithm
from .._plan import (
    COPY_BYTES_PER_S,
    estimate_seconds,
    live_phases,
    make_plan,
    per_input_channel_weight,
)
from . import Kernel


def _depthwise(spec):
    """The layer's depthwise stage: every input channel its own group, results kept in
    the compute dtype for the sum that follows."""
    return dataclasses.replace(spec, c_out=spec.c_in, groups=spec.c_in,
                               weight_dtype=spec.compute_dtype,
                               result_dtype=spec.compute_dtype)


def _stage_bytes(spec) -> int:
    return (spec.batch * math.prod(spec.out_spatial) * spec.c_in
            * spec.compute_dtype.itemsize)


def fits(spec, limit):
    if not native.AVAILABLE:
        return "needs the compiled kernel"
    lanes = native.layout(spec.compute_dtype.itemsize)[0]
    if not (spec.groups > 1 and spec.c_out_per_group == 1
            and 1 < spec.c_in_per_group < lanes):
        return (f"is for grouped layers of one output channel per group and 2 to {lanes - 1} "
                "input channels per group")
    if _stage_bytes(spec) > limit:
        return "would hold its depthwise stage beyond the workspace limit"
    return None


def estimate(spec):
    """The depthwise stage on the kernel, then one pass reading it and writing the sums."""
    return (estimate_seconds(_depthwise(spec), Algorithm.NATIVE)
            + 2 * _stage_bytes(spec) / COPY_BYTES_PER_S)


def phase_groups(spec):
    return tuple((p,) for p in live_phases(spec))


def run(plan, x3, w3, out, bias):
    spec = plan.spec
    depthwise = _depthwise(spec)
    m = spec.c_in_per_group
    wd = (per_input_channel_weight(spec, w3).reshape(spec.c_in, *spec.kernel, 1)
          .astype(spec.compute_dtype))
    stage = _execute.execute(
        make_plan(depthwise, algorithm=Algorithm.NATIVE, workspace=plan.workspace_limit,
                  threads=plan.threads), x3, wd)
    sums = stage.reshape(*out.shape, m).sum(axis=-1)
    if bias is not None:
        sums += bias
    np.copyto(out, sums, casting="unsafe")


KERNEL = Kernel(Algorithm.FAN_IN, fits, estimate, phase_groups, run,
                writes_every_output=lambda spec: True)
