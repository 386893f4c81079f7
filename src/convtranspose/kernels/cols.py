"""``cols``: the forward as one GEMM and a gather (GEMM then col2im, ONNX Runtime's way).
The compiled kernel computes every input pixel's products with every tap, cols (pixels,
groups, taps, C_out/g), as a 1x1x1 layer of taps * C_out/g outputs per group (its vectors
along those columns); then each output pixel sums the products of the (pixel, tap) pairs
that land on it, plus the bias (`native.col2im`, on the threads by output rows, or
pieces of rows where there are few).

For thin outputs from wide inputs. There the native kernel takes dot mode, each phase a
pass over the input for a few multiply-adds per pixel, and the sums reduced across lanes:
192 -> 1 k3 s3 (27 phases, each reading all 192 channels of every pixel for one output)
ran at 25 GFLOP/s, 14 ms against ONNX Runtime's 4.6. Here each input pixel is read once
and meets every tap in registers."""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np

from .. import _execute
from .. import _native_kernel as native
from .._algorithms import Algorithm
from .._geometry import ceil_div
from .._memory import Scratch
from .._plan import (
    COPY_BYTES_PER_S,
    Plan,
    estimate_seconds,
    live_phases,
    make_plan,
    native_mode,
    on_threads,
    output_write_seconds,
)
from . import Kernel


def gemm_spec(spec):
    """The 1x1x1 layer whose output is cols: taps * C_out/g outputs per group."""
    taps = math.prod(spec.kernel)
    return dataclasses.replace(spec, c_out=spec.groups * taps * spec.c_out_per_group,
                               kernel=(1, 1, 1), stride=(1, 1, 1), dilation=(1, 1, 1),
                               pad_lo=(0, 0, 0), pad_hi=(0, 0, 0), out_spatial=spec.in_spatial)


def cols_bytes(spec) -> int:
    return (spec.batch * math.prod(spec.in_spatial) * spec.groups * math.prod(spec.kernel)
            * spec.c_out_per_group * spec.compute_dtype.itemsize)


def fits(spec, limit):
    if not native.AVAILABLE:
        return "needs the compiled kernel"
    if spec.result_dtype != spec.compute_dtype:
        return "stores only the compute dtype (float32 or float64); use 'native'"
    if native_mode(gemm_spec(spec)) != native.CHANNELS:
        return ("needs a vector's worth of products per input pixel and group (taps times "
                "C_out/groups); use 'native'")
    if cols_bytes(spec) > limit:
        return "would hold every input pixel's products with every tap beyond the workspace limit"
    return None


def phase_groups(spec):
    live = live_phases(spec)
    return (tuple(live),) if live else ()


# A call's own cost: the GEMM's plan and weight, two rounds on the threads (beside the
# native kernel's one).
CALL_SECONDS = 1e-4


# The gather's time per product it adds, one core, times the groups: measured over eight
# thin layers of one group 0.75-2.1 ns; with groups, each output pixel reads each group's
# products a pixel of cols apart, a cache line apiece (256 -> 4 g4 k6: 3.4 ns; 92 -> 4 g4
# k2 s(4,2,2): 6.7). Modelled as reading cols once at the copy rate (0.8 ns whatever the
# groups), the planner took cols for 256 -> 4 g4 k6 at 28 ms against native's 15. Over
# the 150 dot-mode layers of the dot model's fit, 1.0 ns chose best (1.2 and 0.8 lost more).
GATHER_SECONDS = 1.0e-9


def estimate(spec):
    """The GEMM (the compiled kernel's model, its write of cols included), its weight laid
    out by taps (read and written), then the gather: each product added once, a group's
    apart from the next group's, the output written once. (256 -> 23 k5 on 6x6x6 pixels:
    a 2.9 MB weight for 216 pixels.)"""
    weight = spec.c_out * math.prod(spec.kernel) * spec.c_in_per_group * spec.compute_dtype.itemsize
    products = cols_bytes(spec) // spec.compute_dtype.itemsize
    return (estimate_seconds(gemm_spec(spec), Algorithm.NATIVE) + CALL_SECONDS
            + 2 * weight / COPY_BYTES_PER_S + products * GATHER_SECONDS * spec.groups
            + output_write_seconds(spec) / 2)


def _gemm_plan(spec, limit: int, threads: int | None = None) -> Plan:
    return make_plan(gemm_spec(spec), algorithm=Algorithm.NATIVE, workspace=limit,
                     threads=threads)


def make_cols_plan(spec, limit: int, est: dict) -> Plan:
    """The GEMM's tasks and threads; cols on top of its workspace."""
    gemm = _gemm_plan(spec, limit)
    return Plan(spec=spec, algorithm=Algorithm.COLS, phase_groups=phase_groups(spec),
                tasks=gemm.tasks, threads=gemm.threads,
                workspace_bytes=gemm.workspace_bytes + cols_bytes(spec),
                workspace_limit=limit, est_seconds=on_threads(est, gemm.threads))


def _geometry(spec) -> np.ndarray:
    return np.array([spec.batch, *spec.in_spatial, *spec.out_spatial, *spec.kernel,
                     *spec.stride, *spec.dilation, *spec.pad_lo], np.int64)


def run(plan, x3, w3, out, bias):
    spec = plan.spec
    gemm = _gemm_plan(spec, plan.workspace_limit, plan.threads)
    taps, cog = math.prod(spec.kernel), spec.c_out_per_group
    # cols' output channel (g, tap, co) is weight row g * cog + co at that tap
    w_cols = (w3.reshape(spec.groups, cog, taps, spec.c_in_per_group).transpose(0, 2, 1, 3)
              .reshape(spec.groups * taps * cog, 1, 1, 1, spec.c_in_per_group))
    w_cols = np.ascontiguousarray(w_cols)
    rows = spec.batch * spec.out_spatial[0] * spec.out_spatial[1]
    with Scratch() as scratch:
        cols = scratch.empty(cols_bytes(spec) // spec.compute_dtype.itemsize,
                             spec.compute_dtype).reshape(*x3.shape[:-1], -1)
        _execute._execute_native(gemm, x3, w_cols, cols, scratch)
        out3 = out.reshape(rows, -1)
        geometry = _geometry(spec)
        _execute.run_jobs([functools.partial(native.col2im, cols, out3, bias, geometry,
                                             spec.groups, cog, *piece)
                           for piece in gather_pieces(rows, spec.out_spatial[2], plan.threads)],
                          plan.threads)


# The fewest output positions a piece of a row gathers.
MIN_GATHER_PIECE = 1024


def gather_pieces(rows: int, width: int, threads: int) -> list[tuple[int, int, int, int]]:
    """(row0, row1, w0, w1) pieces of the output for the threads, about four each: runs of
    rows, or where there are too few rows (a 1-D layer's is one), pieces of each row."""
    want = 4 * threads
    if rows >= want:
        return [(rows * i // want, rows * (i + 1) // want, 0, width) for i in range(want)]
    cuts = max(1, min(ceil_div(want, rows), width // MIN_GATHER_PIECE))
    return [(r, r + 1, width * i // cuts, width * (i + 1) // cuts)
            for r in range(rows) for i in range(cuts)]


KERNEL = Kernel(Algorithm.COLS, fits, estimate, phase_groups, run,
                writes_every_output=lambda spec: True, compiled=True,
                make_plan=make_cols_plan)
