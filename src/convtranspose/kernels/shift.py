"""``shift``: the NumPy/BLAS workhorse. Lay the input rows a phase reads out once, with the
W-axis taps side by side (K = taps_w * C_in), then one GEMM per (D, H) tap reads that grid
at a fixed row shift and accumulates into the tile. Phases with identical geometry
(kernel == stride) share one GEMM with their weights side by side. Its extra traffic is
small next to the GEMM.

A fallback: offered only without the compiled kernel. With it, the planner chose shift on
8 of 648 sweep layers (seeds 11-28), and a compiled path was faster on 6 of them by
1.3-1.9x (48 -> 8 k2 s2 6.7 ms against cols' 5.0; 384 -> 16 k2 s2 1.07 against native's
0.56), level on one, the last a layer no tap reaches (0.01 ms)."""

from __future__ import annotations

from .. import _execute
from .._algorithms import Algorithm
from .._plan import (
    COPY_BYTES_PER_S,
    TILE_BYTES,
    _gemm_rate,
    geometry_key,
    live_phases,
    output_write_seconds,
)
from . import Kernel


def fits(spec, limit):
    return None  # any layer


def phase_groups(spec):
    """Phases of identical geometry share a GEMM."""
    merged: dict[tuple, list] = {}
    for p in live_phases(spec):
        merged.setdefault(geometry_key(p), []).append(p)
    return tuple(tuple(g) for g in merged.values())


def estimate(spec):
    """GEMM time at the shape's rate (halo rows computed and dropped included), the grid
    copy and the accumulator adds."""
    item = spec.compute_dtype.itemsize
    total = output_write_seconds(spec)
    for phase_group in phase_groups(spec):
        p = phase_group[0]
        hmin, hmax = p.halo(1)
        nd, nh, qw = p.count
        waste = (nh + hmax - hmin) / nh
        tw, tdh = len(p.axis_taps[2]), len(p.axis_taps[0]) * len(p.axis_taps[1])
        rows = spec.batch * nd * nh * qw
        narrow = min(len(phase_group) * spec.c_out_per_group, rows)
        gemm = 2 * rows * waste * tw * tdh * spec.c_in * spec.c_out_per_group * len(phase_group)
        total += gemm / _gemm_rate(narrow)
        grid_copy = 0 if tw == 1 and tdh == 1 else 2 * rows * tw * spec.c_in * item
        adds = 3 * (tdh - 1) * rows * len(phase_group) * spec.c_out * item
        total += (grid_copy + adds) / COPY_BYTES_PER_S
    return total


def buffer_elems(spec, phase_group, tile, whole_input):
    """The grid (with the slack its last shifted read runs past), the accumulator, and a
    temporary when more than one (D, H) tap adds into it."""
    phase = phase_group[0]
    nn, nd, nh = (tile.n[1] - tile.n[0], tile.d[1] - tile.d[0], tile.h[1] - tile.h[0])
    qw = phase.count[2]
    dmin, dmax = phase.halo(0)
    hmin, hmax = phase.halo(1)
    dn, hn = nd + dmax - dmin, nh + hmax - hmin
    grid_rows = nn * dn * hn * qw
    slack = (hmax - hmin) * qw
    sums = 2 if len(phase.axis_taps[0]) * len(phase.axis_taps[1]) > 1 else 1
    grid = (grid_rows + slack) * len(phase.axis_taps[2]) * spec.c_in
    return grid + sums * grid_rows * len(phase_group) * spec.c_out


def run(plan, x3, w3, out, bias):
    spec = plan.spec
    weights = [_execute._shift_weights(w3, g, spec.groups) for g in plan.phase_groups]
    biases = [_execute._phase_group_bias(bias, spec, g) for g in plan.phase_groups]
    jobs = [_execute._shift_job(spec, x3, out, plan.phase_groups[t.phase_group],
                                weights[t.phase_group], t, biases[t.phase_group])
            for t in plan.tasks]
    _execute.run_tiles(plan, jobs)


KERNEL = Kernel(Algorithm.SHIFT, fits, estimate, phase_groups, run, buffer_elems,
                tile_bytes=TILE_BYTES, fallback=True)
