"""``winograd``: native, with Winograd F(2,3) along a stride-1 D axis of three taps: each
pair of output planes from four products instead of six (the input and weight
transformed along D first), so 2/3 of the multiply-adds. Sums are rounded in another
order than the direct sum: equal within float rounding, not bit for bit (see
`set_winograd`)."""

from __future__ import annotations

from .. import _execute
from .._algorithms import Algorithm
from .._memory import Scratch
from .._plan import (
    NATIVE_CALL_SECONDS,
    PAIR_TRANSFORM_BYTES_PER_S,
    WINOGRAD_MIN_CHANNELS,
    live_phases,
    native_phase_groups,
    native_rate,
    output_write_seconds,
    pair_count,
    pair_input_bytes,
    pair_phase,
    weight_bytes,
    winograd_fits,
)
from . import Kernel
from .native import buffer_elems

WINOGRAD_WEIGHT_BYTE = 0.45e-9  # the weight's transform and copy, per byte of the weight


def fits(spec, limit):
    if not winograd_fits(spec, limit):
        return ("needs a D axis of stride 1, dilation 1 and kernel 3, at least "
                f"{WINOGRAD_MIN_CHANNELS} input channels per group, the compiled kernel, and "
                "room for its transformed input (2x the input) in the workspace; use "
                "'native' for this layer")
    return None


def phase_groups(spec):
    """Native phase groups of the pair phases (`pair_phase`)."""
    return native_phase_groups(spec, [pair_phase(p) for p in live_phases(spec)])


def estimate(spec):
    """Four products per output pair instead of six, the input's transform, and the
    weight's: made in NumPy on every call, then copied into CHANNELS mode's layout with
    4/3 as many D taps. Without the weight's, the planner took winograd on 11 of the 17
    sweep layers of seeds 20-47 where native was faster, up to 2.3x (384 -> 256 k3 on
    2x5x5x5: 8.2 ms against 3.6); with it, its choices there are within 1.04x of the
    faster (geomean; 1.24x before)."""
    products = spec.useful_flops * 4 * pair_count(spec) / (3 * spec.out_spatial[0])
    return (products / native_rate(spec) + output_write_seconds(spec) / 2
            + pair_input_bytes(spec) / PAIR_TRANSFORM_BYTES_PER_S + NATIVE_CALL_SECONDS
            + weight_bytes(spec, live_phases(spec)) * WINOGRAD_WEIGHT_BYTE)


def run(plan, x3, w3, out, bias):
    _execute.fill_unreached(plan.spec, out, bias, plan.threads)  # the tiles store the rest
    with Scratch() as scratch:
        _execute._execute_winograd(plan, x3, w3, out, scratch, bias)


KERNEL = Kernel(Algorithm.WINOGRAD, fits, estimate, phase_groups, run, buffer_elems,
                writes_every_output=lambda spec: True, compiled=True, exact=False)
