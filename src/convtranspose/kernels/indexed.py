"""``indexed``: for small calls, where NumPy's per-call overhead dominates: one GEMM of
every input row against every tap, then one gather of each output row's contributions
through a table the plan precomputes, and one sum."""

from __future__ import annotations

import math

from .. import _execute
from .._algorithms import Algorithm
from .._plan import (
    CHANNELS_PACK_BYTE,
    INDEXED_MAX_ELEMS,
    _gemm_rate,
    indexed_fits,
    indexed_plan,
    live_phases,
)
from . import Kernel

# The gather of the products (`native.gather_sum`, from rows still in cache): W9's 131 KB
# in ~5 us of its 18 (at COPY_BYTES_PER_S, modelled at 52 us, it lost to `native`'s 49).
GATHER_BYTES_PER_S = 20e9


def fits(spec, limit):
    if not indexed_fits(spec):
        return f"is for small calls only (its tables would exceed {INDEXED_MAX_ELEMS} elements)"
    return None


def phase_groups(spec):
    return tuple((p,) for p in live_phases(spec))


def estimate(spec):
    """One GEMM, a gather of the products, ~10 us of Python. An output row gathers at
    most as many products as its phase has taps (`gather_table`'s depth): counting every
    tap put 384 -> 197 k3 s3 at 8.1 ms, measured 1.1. The GEMM, of few rows, is bound by
    copying its weight operand into BLAS's layout (256 -> 96 k6 on 1x1x2 pixels, 21 MiB:
    modelled 0.69 ms without it, measured 4.1)."""
    n_out = spec.batch * math.prod(spec.out_spatial)
    depth = max(p.tap_count for p in live_phases(spec))
    gathered = n_out * depth * spec.c_out * spec.compute_dtype.itemsize  # at most
    taps = math.prod(spec.kernel)
    return (spec.useful_flops / _gemm_rate(min(spec.c_in_per_group, taps * spec.c_out_per_group))
            + 2 * gathered / GATHER_BYTES_PER_S + 1e-5
            + spec.c_out * spec.c_in_per_group * taps * spec.compute_dtype.itemsize
            * CHANNELS_PACK_BYTE)


def run(plan, x3, w3, out, bias):
    _execute._indexed(plan, x3, w3, out, bias)


KERNEL = Kernel(Algorithm.INDEXED, fits, estimate, phase_groups, run,
                writes_every_output=lambda spec: True, serial=True, make_plan=indexed_plan)
