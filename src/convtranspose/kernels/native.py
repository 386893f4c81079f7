"""``native``: the compiled kernel (csrc/, when the install built it): per phase, every
output element is summed in registers over all its taps and input channels and stored
once, reading the input where it lies. No grid, no GEMM temporaries, no accumulation
passes; it runs at 60-100% of a core's FMA peak where C_out/groups >= 16."""

from __future__ import annotations

from .. import _execute
from .. import _native_kernel as native
from .._algorithms import Algorithm
from .._memory import Scratch
from .._plan import (
    NATIVE_CALL_SECONDS,
    channels_seconds,
    live_phases,
    native_buffer_elems,
    native_mode,
    native_phase_groups,
    native_rate,
    output_write_seconds,
)
from . import Kernel


def fits(spec, limit):
    if not native.AVAILABLE:
        return ("needs the compiled kernel, which this install lacks (it was built without "
                "a C++ compiler); reinstall with g++ or clang++ on the PATH")
    return None


def phase_groups(spec):
    return native_phase_groups(spec, live_phases(spec))


def estimate(spec):
    """The products at the kernel's rate, one pass of the output, and the call's Python.
    With vectors along the output channels, only the products it computes: none that the
    padding crops (counting them put 64 -> 97 k7 d2 p6 on 4x4x4 at 5x its time; on the 4
    sweep layers of seeds 11-30 this moves, all from winograd, 1.3-2.2x faster), and the
    weight copied into its layout (`channels_seconds`). Dot mode has its own model
    (`dot_seconds`); depthwise's rate was fitted on every product, and moved the same way
    it lost (324 -> 1: 1.66x slower than cols): it keeps them."""
    if native_mode(spec) == native.CHANNELS:  # with its weight gathered into its layout
        seconds = channels_seconds(spec)
    else:
        seconds = spec.useful_flops / native_rate(spec)
    return seconds + output_write_seconds(spec) / 2 + NATIVE_CALL_SECONDS


def buffer_elems(spec, phase_group, tile, whole_input):
    """Room only to convert the tile's input (unless converted once for every task) and
    to round an output the kernel cannot round as it stores."""
    convert = spec.input_dtype != spec.compute_dtype and not whole_input
    return native_buffer_elems(spec, phase_group[0], tile, convert, len(phase_group))


def run(plan, x3, w3, out, bias):
    _execute.fill_unreached(plan.spec, out, bias, plan.threads)  # the tiles store the rest
    with Scratch() as scratch:  # packed weights live until the tasks return
        _execute._execute_native(plan, x3, w3, out, scratch, bias)


KERNEL = Kernel(Algorithm.NATIVE, fits, estimate, phase_groups, run, buffer_elems,
                writes_every_output=lambda spec: True, compiled=True)
