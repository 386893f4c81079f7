"""Sub-pixel (phase) geometry of a transposed convolution: small pure functions.

Along one axis, input position i and kernel tap k land on output o = i*s + k*d - p.
Split the output by residue r = o mod s ("phase"): o = q*s + r. A tap k reaches phase r
exactly when (r + p - k*d) is a multiple of s, and then it reads input i = q + c with
c = (r + p - k*d) // s. So each phase is an ordinary stride-1 correlation of the input
with a subset of the taps: no zero-stuffing, no multiplication by structural zeros.
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass


def ceil_div(a: int, b: int) -> int:
    """ceil(a / b) for ints, b > 0, exact at any size (no float)."""
    return -(-a // b)


PHANTOM = -1


@dataclass(frozen=True)
class AxisTap:
    """Tap `k` of one axis, reading input `q + offset` for outputs q in [lo, hi). `k`
    PHANTOM: a tap of zero weight, which lines a merged residue's taps up with the others'
    (`merged_row`)."""

    k: int
    offset: int
    lo: int
    hi: int


@dataclass(frozen=True)
class AxisPhase:
    residue: int
    count: int  # number of output positions r, r+s, r+2s, ... inside [0, out)
    taps: tuple[AxisTap, ...]


def axis_phases(size: int, kernel: int, stride: int, padding: int, dilation: int,
                out: int) -> tuple[AxisPhase, ...]:
    """Every phase of one axis with the taps that reach it (taps that read only
    outside the input are dropped: they would only multiply zeros)."""
    phases = []
    for r in range(stride):
        count = max(0, ceil_div(out - r, stride))
        taps = []
        for k in range(kernel):
            shift = r + padding - k * dilation
            if shift % stride:
                continue
            c = shift // stride
            lo, hi = max(0, -c), min(count, size - c)
            if lo < hi:
                taps.append(AxisTap(k, c, lo, hi))
        phases.append(AxisPhase(r, count, tuple(taps)))
    return tuple(phases)


@dataclass(frozen=True)
class Phase:
    """One 3-D phase: residues, output counts, and the taps of each axis that reach it.

    Its 3-D taps are every combination of one tap per axis."""

    residue: tuple[int, int, int]
    count: tuple[int, int, int]
    axis_taps: tuple[tuple[AxisTap, ...], tuple[AxisTap, ...], tuple[AxisTap, ...]]

    @functools.cached_property
    def taps(self) -> tuple[tuple[AxisTap, AxisTap, AxisTap], ...]:
        return tuple(itertools.product(*self.axis_taps))

    # Cached: phases live as long as their spec's cache entry, and small calls ask for these
    # once per tile. The hash too: caches keyed by phases would rehash every nested tap
    # (W6: 65 us a call).
    def __hash__(self) -> int:
        return self._hash

    @functools.cached_property
    def _hash(self) -> int:
        return hash((self.residue, self.count, self.axis_taps))

    @functools.cached_property
    def tap_count(self) -> int:
        return math.prod(len(axis) for axis in self.axis_taps)

    @functools.cached_property
    def size(self) -> int:
        return math.prod(self.count)

    @functools.cached_property
    def _halos(self) -> tuple[tuple[int, int], ...]:
        return tuple((min(t.offset for t in axis), max(t.offset for t in axis))
                     if axis else (0, 0) for axis in self.axis_taps)

    def halo(self, axis: int) -> tuple[int, int]:
        """(smallest, largest) input offset of the taps along one axis."""
        if not self.axis_taps[axis]:
            raise ValueError("halo: no tap reaches this phase along that axis")
        return self._halos[axis]


@functools.lru_cache(maxsize=256)
def phases_3d(spec) -> tuple[Phase, ...]:
    """The s_d * s_h * s_w phases of a spec, in a fixed order (results are deterministic).
    Cached: a call of a small layer would spend 26 us here."""
    per_axis = [
        axis_phases(n, k, s, p, d, o)
        for n, k, s, p, d, o in zip(spec.in_spatial, spec.kernel, spec.stride, spec.pad_lo,
                                    spec.dilation, spec.out_spatial)
    ]
    return tuple(
        Phase((pd.residue, ph.residue, pw.residue), (pd.count, ph.count, pw.count),
              (pd.taps, ph.taps, pw.taps))
        for pd, ph, pw in itertools.product(*per_axis)
    )


def tap_output_range(size: int, k: int, stride: int, padding: int, dilation: int,
                     out: int) -> tuple[int, int]:
    """Input range [lo, hi) whose tap-k contributions land inside [0, out)."""
    shift = k * dilation - padding  # o = i*s + shift
    lo = max(0, -(shift // stride))  # ceil(-shift / s)
    hi = min(size, (out - 1 - shift) // stride + 1)
    return lo, max(lo, hi)
