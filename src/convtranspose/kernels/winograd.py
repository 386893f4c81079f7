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
    winograd_fits,
)
from . import Kernel
from .native import buffer_elems


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
    """Four products per output pair instead of six, and the input's transform."""
    products = spec.useful_flops * 4 * pair_count(spec) / (3 * spec.out_spatial[0])
    return (products / native_rate(spec) + output_write_seconds(spec) / 2
            + pair_input_bytes(spec) / PAIR_TRANSFORM_BYTES_PER_S + NATIVE_CALL_SECONDS)


def run(plan, x3, w3, out, bias):
    _execute.fill_unreached(plan.spec, out, bias)  # the tiles store every other position
    with Scratch() as scratch:
        _execute._execute_winograd(plan, x3, w3, out, scratch, bias)


KERNEL = Kernel(Algorithm.WINOGRAD, fits, estimate, phase_groups, run, buffer_elems,
                writes_every_output=lambda spec: True, compiled=True, exact=False)
