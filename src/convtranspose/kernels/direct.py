"""``direct``: one input channel per group (depthwise, channel multiplier): a GEMM
degenerates, so multiply-add broadcast over channels.

Offered only without the compiled kernel, which runs these layers itself (depthwise mode,
multipliers expanded to depthwise). Without it, measured on a 2-core AVX2 EPYC (issue 25,
two threads), it keeps depthwise layers 1.4-5x faster than `shift` (W7 146 against
444 ms, 192 channels k3 27 against 137 ms); on one-channel ungrouped layers and some
multipliers `shift` was 1.7-2.3x faster, which its model does not yet see."""

from __future__ import annotations

import math

from .. import _execute
from .._algorithms import Algorithm
from .._plan import ELEMENTWISE_PER_S, bordered_slab, live_phases, output_write_seconds
from . import Kernel


def fits(spec, limit):
    if spec.c_in_per_group != 1:
        return ("needs one input channel per group (C_in/groups == 1), got "
                f"{spec.c_in_per_group}")
    return None


def phase_groups(spec):
    return tuple((p,) for p in live_phases(spec))


def estimate(spec):
    if not live_phases(spec):
        return output_write_seconds(spec)
    return spec.useful_flops / 2 / ELEMENTWISE_PER_S + output_write_seconds(spec)


def buffer_elems(spec, phase_group, tile, whole_input):
    """The tile's zero-bordered input slab and a contiguous block of its output."""
    nn, nd, nh = (tile.n[1] - tile.n[0], tile.d[1] - tile.d[0], tile.h[1] - tile.h[0])
    slab = nn * math.prod(bordered_slab(phase_group, tile)[0]) * spec.c_in
    return slab + nn * nd * nh * phase_group[0].count[2] * spec.c_out


def run(plan, x3, w3, out, bias):
    spec = plan.spec
    weights = [_execute._direct_weights(w3, g[0], spec.groups) for g in plan.phase_groups]
    jobs = [_execute._direct_job(spec, x3, out, plan.phase_groups[t.phase_group][0],
                                 weights[t.phase_group], t, bias) for t in plan.tasks]
    _execute.run_tiles(plan, jobs)


KERNEL = Kernel(Algorithm.DIRECT, fits, estimate, phase_groups, run, buffer_elems, fallback=True)
