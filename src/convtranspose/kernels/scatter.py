"""``scatter``: one GEMM of every tap (of every phase) against the input rows, channels
first (taps * C_out, rows), then each phase adds its taps' shifted windows. Wins where
C_out is tiny (a 16 -> 1 head), where a GEMM with N = C_out would crawl.

Offered only without the compiled kernel (issue 25, measured on a 2-core AVX2 EPYC, two
threads): there it keeps W6 (16 -> 1 k4 s2) at 8.7 ms where `shift` takes 19.1, and a
384 -> 1 k3 layer at 21 ms against 36. Beside the compiled kernel it lost: of six random
layers the planner gave it on AVX2, `native` was 3-7x faster on three, even on two, and
15% slower on one (on AVX-512 the planner never gave it one of 4000). Its model
misjudges large kernels without the compiled kernel too (7x5x2 taps, 256 -> 213: 2.8 s
against `shift`'s 0.11 s): a model to revisit, not a reason to keep it for the kernel."""

from __future__ import annotations

from .. import _execute
from .._algorithms import Algorithm
from .._plan import COPY_BYTES_PER_S, _gemm_rate, bordered_slab, live_phases, output_write_seconds
from . import Kernel


def fits(spec, limit):
    return None  # any layer


def phase_groups(spec):
    """One GEMM for every tap: the phases share tiles."""
    live = live_phases(spec)
    return (tuple(live),) if live else ()


def estimate(spec):
    """The GEMM at its rate; the product is written, read back, and every window add
    reads and writes the accumulator along strided runs: about six passes (calibrated on
    W3 and W6)."""
    together = phase_groups(spec)
    write = output_write_seconds(spec)
    if not together:
        return write
    n_in = spec.batch * spec.in_spatial[0] * spec.in_spatial[1] * spec.in_spatial[2]
    taps = sum(p.tap_count for g in together for p in g)
    narrow = min(taps * spec.c_out_per_group, n_in)
    traffic = 6 * n_in * taps * spec.c_out * spec.compute_dtype.itemsize
    return spec.useful_flops / _gemm_rate(narrow) + traffic / COPY_BYTES_PER_S + write


def buffer_elems(spec, phase_group, tile, whole_input):
    """The zero-bordered input slab, the GEMM result on it, one accumulator."""
    nn, nd = tile.n[1] - tile.n[0], tile.d[1] - tile.d[0]
    (sd, sh, sw), _ = bordered_slab(phase_group, tile)
    rows = nn * sd * sh * sw
    taps = sum(p.tap_count for p in phase_group)
    slack = (sh + 1) * sw  # flat window reads of the last batch item run past its end
    return (rows * spec.c_in + (rows + slack) * taps * spec.c_out
            + nn * nd * sh * sw * spec.c_out)


def run(plan, x3, w3, out, bias):
    spec = plan.spec
    weights = [_execute._scatter_weights(w3, g, spec.groups) for g in plan.phase_groups]
    jobs = [_execute._scatter_job(spec, x3, out, plan.phase_groups[t.phase_group],
                                  weights[t.phase_group], t, bias) for t in plan.tasks]
    _execute.run_tiles(plan, jobs)


# One worker, measured on W6: 3.6 ms on one, 4.3-5.7 ms on two (its window adds are
# memory-bound; a bigger 16 -> 1 head gained from two, 15 vs 20 ms: not yet used).
KERNEL = Kernel(Algorithm.SCATTER, fits, estimate, phase_groups, run, buffer_elems, serial=True,
                fallback=True)
