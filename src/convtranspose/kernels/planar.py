"""``planar``: the compiled kernel with its vectors along a row's output pixels, for layers
of 1-8 output channels per group (CT_MODE_PLANAR, csrc/planar.hpp). The input is first
copied into a planar layout (each input row's channels one after another, each a run of
pixels padded with zeros), so that each (tap, input channel) is one broadcast weight times
whole vectors of neighbouring outputs: every lane does useful work whatever C_in/g is,
with no sums across lanes. Dot mode, the native kernel's way for such layers, runs its
vectors along C_in/g (part of a vector below 8 or 16 channels) and reduces each output
across lanes. A task writes whole output rows (every W residue and conv group) once, in
order, where the native kernel's per-phase and per-group calls each store a few values
of every output line."""

from __future__ import annotations

from .. import _execute
from .. import _native_kernel as native
from .._geometry import phases_3d
from .._memory import Scratch
from .._plan import (
    COPY_BYTES_PER_S,
    NATIVE_CALL_SECONDS,
    NATIVE_PEAK_PER_LANE,
    avx2_build,
    live_phases,
    output_write_seconds,
    planar_bytes,
    planar_chunk,
    planar_reach,
    planar_slab_planes,
)
from . import Kernel
from .native import buffer_elems

# Input channels per group up to which a block's reads of each channel's rows stay in L1
# (`planar_rate`).
PLANAR_L1_CHANNELS = 32
# On the AVX2 build the rate falls slower past them: as (PLANAR_L1_CHANNELS / C_in/g) to
# this power. Its planar layers of seeds 130-136 past 32 channels a group ran 0.6x their
# modelled time at 64-96, 0.4x at 128 and 0.1-0.7x at 192-384 (two threads, a 2-core AMD
# EPYC Zen 3), which 0.35 levels; 77 -> 3 k3 on 53x43x58 went to native at 1.4x planar's time.
PLANAR_L1_POWER_AVX2 = 0.35
# Past one register block, up to this many outputs per group in two blocks of 4 or more
# (2 -> 12 as two of 6: 0.70 ms against the native kernel's 1.32). Smaller or more blocks
# lost to its full vectors along C_out: 15 -> 17 in blocks of one, 4.6 ms against 1.1;
# 1 -> 32 in four of 8, 6.0 against 2.7; 16 in two of 8, 1.7 against 2.4 from one input
# channel, but 21 against 16 and 1.3 against 1.0 from three.
PLANAR_MAX_CHUNKED = 12


def fits(spec, limit):
    if not native.AVAILABLE:
        return "needs the compiled kernel"
    cog = spec.c_out_per_group
    if cog > native.PLANAR_MAX_OUT and (cog > PLANAR_MAX_CHUNKED
                                        or cog // planar_chunk(cog) > 2):
        return (f"takes at most {native.PLANAR_MAX_OUT} output channels per group, or two "
                f"blocks of up to {PLANAR_MAX_CHUNKED}; use 'native'")
    if spec.c_out * spec.stride[2] > native.PLANAR_MAX_ROW:
        return (f"writes at most {native.PLANAR_MAX_ROW} values per column of a row (C_out "
                "times stride_w); use 'native'")
    if spec.result_dtype != spec.compute_dtype and not native.half_kind(spec.result_dtype):
        return "stores only the compute dtype, float16 or bfloat16; use 'native'"
    groups = phase_groups(spec)
    if groups and planar_slab_planes(spec, limit) < 1 + planar_reach(groups):
        return ("would hold the input planes one output row reads, in its planar copy, "
                "beyond the workspace limit")
    return None


def _reaches_rows(phase) -> bool:
    """Whether a phase's (D, H) residue has outputs and taps: its rows are planar's."""
    return bool(phase.count[0] and phase.count[1] and phase.axis_taps[0]
                and phase.axis_taps[1])


def phase_groups(spec):
    """Per (D, H) residue whose rows some tap reaches, every W residue in order (those no
    W tap reaches included: the kernel writes them zeros), so that a task writes each
    output row whole, once."""
    rows: dict[tuple, list] = {}
    for phase in phases_3d(spec):
        if _reaches_rows(phase):
            rows.setdefault(phase.residue[:2], []).append(phase)
    return tuple(tuple(sorted(row, key=lambda p: p.residue[2])) for _, row in sorted(rows.items())
                 if any(p.tap_count and p.size for p in row))


# Vectors of pixels per register block, by output channels (planar.hpp's PlanarBlock).
def _block_vectors(cog: int, registers: int) -> int:
    if registers >= 32:
        return {1: 16, 2: 12, 3: 8, 4: 6, 5: 4, 6: 4}.get(cog, 3)
    return {1: 12, 2: 6, 3: 4, 4: 2}.get(cog, 1)


def planar_rate(spec) -> float:
    """FLOP/s on one core: lanes past a row's end wasted, and per (tap, channel) a
    broadcast per output channel and a load per vector beside the block's multiply-adds."""
    lanes, _ = native.layout(spec.compute_dtype.itemsize)
    cog = planar_chunk(spec.c_out_per_group)  # a block's outputs
    nb = _block_vectors(cog, 32 if lanes * spec.compute_dtype.itemsize == 64 else 16)
    used = total = 0.0
    for phase in live_phases(spec):  # a row's last vector runs whole
        count, work = phase.count[2], phase.size * phase.tap_count
        used += work
        total += work * -(-count // lanes) * lanes / count
    lane_use = used / total if total else 1.0
    fmas = nb * cog
    # A block reads its pixels from each input channel's image in turn: past a few dozen
    # channels those rows no longer stay in L1 between taps (dot mode, along C_in, wins
    # there: 105 -> 3 k6, 5.6 ms against 7.4; 256 -> 7 k7 s4, 1.2 against 1.6).
    power = PLANAR_L1_POWER_AVX2 if avx2_build() else 1.0
    cache = min(1.0, PLANAR_L1_CHANNELS / spec.c_in_per_group) ** power
    return NATIVE_PEAK_PER_LANE * lanes * lane_use * fmas / (max(fmas, nb + cog) + 2) * cache


def estimate(spec):
    """The multiply-adds, the planar copy (read and written), the output, written once,
    row by row, and the call's Python."""
    return (spec.useful_flops / planar_rate(spec) + 2 * planar_bytes(spec) / COPY_BYTES_PER_S
            + output_write_seconds(spec) / 2 + NATIVE_CALL_SECONDS)


def run(plan, x3, w3, out, bias):
    # Its jobs write their rows whole (every W residue): the rows of a (D, H) residue that
    # no tap reaches are the only ones left.
    _execute.fill_unreached(plan.spec, out, bias, plan.threads, axes=(0, 1))
    with Scratch() as scratch:
        _execute._execute_native(plan, x3, w3, out, scratch, bias)


KERNEL = Kernel("planar", fits, estimate, phase_groups, run, buffer_elems,
                writes_every_output=lambda spec: True, compiled=True,
                input_copy_bytes=planar_bytes)
