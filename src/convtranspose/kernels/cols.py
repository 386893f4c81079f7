"""``cols``: the forward as one GEMM and a gather (GEMM then col2im, ONNX Runtime's way).
The compiled kernel computes every input pixel's products with every tap, cols (pixels,
groups, taps, C_out/g), as a 1x1x1 layer of taps * C_out/g outputs per group (its vectors
along those columns); then each output row sums the products of the (pixel, tap) pairs
that land on it, plus the bias (`native.col2im`, on the threads by boxes of the output):
a vector of outputs of one W residue at a time, each (tap, pixel) term a gather of
neighbouring pixels' products.

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
    Tile,
    avx2_build,
    cut_rows,
    estimate_seconds,
    half_rate_fma,
    live_phases,
    make_plan,
    native_mode,
    on_threads,
    split_tiles,
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
    if spec.c_out_per_group > 2 * native.layout(spec.compute_dtype.itemsize)[0]:
        # Wider outputs fill the native kernel's vectors, and it sums each output in
        # registers where cols writes and reads back every product: of the 23 sweep
        # layers of 48-384 outputs a group that cols' model took from it (seeds 11-57),
        # 13 ran slower, up to 1.98x (16 -> 48 k3 s4; geomean 1.06x).
        return "is for few outputs per group (two vectors at most); use 'native'"
    if native_mode(gemm_spec(spec)) != native.CHANNELS:
        return ("needs a vector's worth of products per input pixel and group (taps times "
                "C_out/groups); use 'native'")
    if cols_bytes(spec) > limit:
        return "would hold every input pixel's products with every tap beyond the workspace limit"
    if spec.groups * math.prod(spec.kernel) * spec.c_out_per_group * 16 >= 2**31:
        return "gathers products of neighbouring pixels at most 2**31 / 16 elements apart"
    return None


def phase_groups(spec):
    live = live_phases(spec)
    return (tuple(live),) if live else ()


# A call's own cost: the GEMM's plan and weight, two rounds on the threads (beside the
# native kernel's one).
CALL_SECONDS = 1e-4
# The gather's time, one core: per vector of products it gathers and adds, per output value
# interleaved and per output row. Fitted on 214 thin sweep layers of seeds 11-57 (measured
# / modelled 0.86-1.26, 10th to 90th percentile).
GATHER_VECTOR_SECONDS = 4.1e-9
GATHER_OUTPUT_SECONDS = 1.1e-9
GATHER_ROW_SECONDS = 6.0e-9
# Where a pixel's W taps land on neighbouring outputs (`runs_along_w`): per run of a
# pixel's W taps, per product, per output value, per output row (fitted on 180 sweep
# layers: 0.83-1.36).
RUN_SECONDS = 7.7e-9
RUN_PRODUCT_SECONDS = 0.048e-9
RUN_OUTPUT_SECONDS = 0.22e-9
RUN_ROW_SECONDS = 22e-9


def runs_along_w(spec) -> bool:
    """Whether col2im adds each pixel's W taps as runs of the output row, rather than
    gathering each output's products: where dilation along W is 1 and a group has several
    output channels. With several groups a run holds one group's channels only; below
    AVX-512, whose gathers are slow (on Zen 3), those pay where a group has 8 outputs or
    more or each output takes at most two W taps (`cols` on 384 -> 6 g2 k3 s3: 3.0 -> 2.4
    ms; on 48 -> 8 g4 k4 s1, runs of 2 outputs and 4 taps a position: 18 -> 27 ms). With
    AVX-512, grouped runs lost to the gathers on all 8 layers tried (docs/PERFORMANCE.md)."""
    group_runs = native.isa() != "avx512" and (
        spec.c_out_per_group >= 8 or ceil_div(spec.kernel[2], spec.stride[2]) <= 2)
    return spec.dilation[2] == 1 and spec.c_out_per_group > 1 and (
        spec.groups == 1 or group_runs)


# The gather's time over the model above on the AVX2 build: its 38 cols layers of seeds
# 130-134 (two threads, a 2-core AMD EPYC Zen 3) ran 1.41x their modelled time (median),
# fitted best with the gather at 3.4x (median 1.02, rms of the log 0.47 -> 0.26); the
# planner had taken 32 -> 2 g2 k7 s2 1-D on 229377 pixels from native to cols at 3.2x its
# time.
GATHER_AVX2 = 3.4


def gather_seconds(spec) -> float:
    return _gather_model_seconds(spec) * (GATHER_AVX2 if avx2_build() else 1.0)


def _gather_model_seconds(spec) -> float:
    rows = spec.batch * spec.out_spatial[0] * spec.out_spatial[1]
    outputs = rows * spec.out_spatial[2] * spec.c_out
    pairs = spec.batch * spec.reaching_pairs(0) * spec.reaching_pairs(1)
    if runs_along_w(spec):
        runs = pairs * spec.in_spatial[2] * spec.groups
        return (runs * RUN_SECONDS + runs * spec.kernel[2] * spec.c_out * RUN_PRODUCT_SECONDS
                + outputs * RUN_OUTPUT_SECONDS + rows * RUN_ROW_SECONDS)
    lanes = native.layout(spec.compute_dtype.itemsize)[0]
    vectors = ceil_div(ceil_div(spec.out_spatial[2], spec.stride[2]), lanes)
    gathered = pairs * spec.c_out * spec.kernel[2] * vectors
    return (gathered * GATHER_VECTOR_SECONDS + outputs * GATHER_OUTPUT_SECONDS
            + rows * GATHER_ROW_SECONDS)


# The GEMM's time over its model where the CPU multiply-adds 512 bits at half the rate per
# lane (`half_rate_fma`: AMD's Zen 4), against the native kernel's dot mode, bound by its
# loads there as on the Xeon the models were fitted on. 2-core AMD EPYC (Zen 4): cols ran
# 1.51x its model over 168 dot-mode sweep layers of seeds 20-44, dot mode 1.13x; the
# planner's pick between them cost 1.07x the faster (geomean), 1.022x with the GEMM at
# 1.5x (1.2: 1.037, 2.0: 1.026). On seeds 86-95, drawn after, it moved 26 layers from cols
# (alternating processes): geomean 0.80x, 20 faster, 0.36-0.97x (48 -> 4 g4 k2x5 s2 on
# 2x181x241 8.2 -> 3.0 ms), 6 slower, 1.03-1.45x (384 -> 8 k4 s4 d2 1-D).
HALF_RATE_GEMM = 1.5


def estimate(spec):
    """The GEMM (the compiled kernel's model, its write of cols included; on a CPU of half
    rate multiply-adds, HALF_RATE_GEMM times it), its weight laid out by taps (read and
    written), then the gather."""
    gemm = estimate_seconds(gemm_spec(spec), Algorithm.NATIVE)
    return (gemm * (HALF_RATE_GEMM if half_rate_fma() else 1.0) + CALL_SECONDS
            + 2 * spec.weight_bytes / COPY_BYTES_PER_S + gather_seconds(spec))


def _gemm_plan(spec, limit: int, threads: int) -> Plan:
    return make_plan(gemm_spec(spec), algorithm=Algorithm.NATIVE, workspace=limit,
                     threads=threads)


def make_cols_plan(spec, limit: int, est: dict, threads: int) -> Plan:
    """The GEMM's tasks and threads; cols on top of its workspace."""
    gemm = _gemm_plan(spec, limit, threads)
    return Plan(spec=spec, algorithm=Algorithm.COLS, phase_groups=phase_groups(spec),
                tasks=gemm.tasks, threads=gemm.threads,
                workspace_bytes=gemm.workspace_bytes + cols_bytes(spec),
                workspace_limit=limit, est_seconds=on_threads(est, gemm.threads))


def _geometry(spec) -> np.ndarray:
    return np.array([spec.batch, *spec.in_spatial, *spec.out_spatial, *spec.kernel,
                     *spec.stride, *spec.dilation, *spec.pad_lo], np.int64)


def gather_tiles(spec, threads: int) -> list[Tile]:
    """Boxes of the output for the threads, about four each: runs of whole rows, or pieces
    of each row where there are too few (a 1-D layer's is one)."""
    total = spec.batch * math.prod(spec.out_spatial)
    tiles = split_tiles(spec.batch, spec.out_spatial, total, 4 * threads)
    return cut_rows(tiles, spec.out_spatial[2], threads)


def _box(spec, tile: Tile) -> np.ndarray:
    """A gather tile as col2im's box: its n, d, h and w ranges (int64)."""
    return np.array([*tile.n, *tile.d, *tile.h, *(tile.w or (0, spec.out_spatial[2]))],
                    np.int64)


def run(plan, x3, w3, out, bias):
    spec = plan.spec
    gemm = _gemm_plan(spec, plan.workspace_limit, plan.threads)
    taps, cog = math.prod(spec.kernel), spec.c_out_per_group
    # cols' output channel (g, tap, co) is weight row g * cog + co at that tap
    w_cols = (w3.reshape(spec.groups, cog, taps, spec.c_in_per_group).transpose(0, 2, 1, 3)
              .reshape(spec.groups * taps * cog, 1, 1, 1, spec.c_in_per_group))
    w_cols = np.ascontiguousarray(w_cols)
    with Scratch() as scratch:
        cols = scratch.empty(cols_bytes(spec) // spec.compute_dtype.itemsize,
                             spec.compute_dtype).reshape(*x3.shape[:-1], -1)
        _execute._execute_native(gemm, x3, w_cols, cols, scratch)
        geometry = _geometry(spec)
        runs = runs_along_w(spec)
        _execute.run_jobs([functools.partial(native.col2im, cols, out, bias, geometry,
                                             spec.groups, cog, _box(spec, tile), runs)
                           for tile in gather_tiles(spec, plan.threads)], plan.threads)


KERNEL = Kernel(Algorithm.COLS, fits, estimate, phase_groups, run,
                writes_every_output=lambda spec: True, compiled=True,
                make_plan=make_cols_plan)
