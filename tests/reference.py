"""A slow, obviously-correct reference for the transposed convolution (MLX semantics).

It is the operator's definition (docs/NUMPY_USERS.md, "What a transposed convolution
computes") read literally, with nothing clever:

    input position i and kernel tap k add into output position o = i*stride + k*dilation - padding
    (per spatial axis), kept when 0 <= o < out; group g maps input channels
    [g*Cin_g, (g+1)*Cin_g) to output channels [g*Cout_g, (g+1)*Cout_g) through
    weight[g*Cout_g:(g+1)*Cout_g].

Everything is accumulated in float64, whatever the input dtypes, and the result is float64:
tests round or compare it themselves.

Two versions, both over channels-last arrays of any spatial rank (1, 2 or 3):

- `conv_transpose_loops`: one scalar multiply-add at a time (six nested loops' worth). Only
  usable on tiny shapes; it is the check of the check.
- `conv_transpose_ref`: the same loops over input positions and taps, with the batch and the
  channels of every group done as one small product. This is what the tests use.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _per_axis(value: int | Sequence[int], ndim: int) -> tuple[int, ...]:
    if isinstance(value, (int, np.integer)):
        return (int(value),) * ndim
    value = tuple(int(v) for v in value)
    assert len(value) == ndim, (value, ndim)
    return value


def out_size(size: int, k: int, stride: int, padding: int, dilation: int,
             output_padding: int) -> int:
    """out = (in - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1."""
    return (size - 1) * stride - 2 * padding + dilation * (k - 1) + output_padding + 1


def _settings(x: np.ndarray, w: np.ndarray, stride, padding, dilation, output_padding):
    ndim = x.ndim - 2
    assert ndim in (1, 2, 3) and w.ndim == x.ndim, (x.shape, w.shape)
    s = _per_axis(stride, ndim)
    p = _per_axis(padding, ndim)
    d = _per_axis(dilation, ndim)
    op = _per_axis(output_padding, ndim)
    in_sp, kernel = x.shape[1:-1], w.shape[1:-1]
    out_sp = tuple(out_size(*a) for a in zip(in_sp, kernel, s, p, d, op))
    assert min(out_sp) >= 1, out_sp
    return ndim, s, p, d, out_sp


def conv_transpose_loops(x, w, stride=1, padding=0, dilation=1, output_padding=0,
                         groups: int = 1) -> np.ndarray:
    """The definition, one scalar product at a time. Tiny shapes only."""
    x = np.asarray(x).astype(np.float64)
    w = np.asarray(w).astype(np.float64)
    ndim, s, p, d, out_sp = _settings(x, w, stride, padding, dilation, output_padding)
    batch, c_in = x.shape[0], x.shape[-1]
    c_out, cin_g = w.shape[0], w.shape[-1]
    cout_g = c_out // groups
    assert cin_g * groups == c_in and cout_g * groups == c_out
    out = np.zeros((batch, *out_sp, c_out), np.float64)
    for n in range(batch):
        for i in itertools.product(*(range(n_) for n_ in x.shape[1:-1])):
            for k in itertools.product(*(range(n_) for n_ in w.shape[1:-1])):
                o = tuple(i[a] * s[a] + k[a] * d[a] - p[a] for a in range(ndim))
                if not all(0 <= o[a] < out_sp[a] for a in range(ndim)):
                    continue
                for co in range(c_out):
                    g = co // cout_g
                    for ci in range(cin_g):
                        out[(n, *o, co)] += x[(n, *i, g * cin_g + ci)] * w[(co, *k, ci)]
    return out


def conv_transpose_ref(x, w, stride=1, padding=0, dilation=1, output_padding=0,
                       groups: int = 1) -> np.ndarray:
    """The definition, one (input position, tap) pair at a time, float64 throughout.

    x: (N, *spatial, C_in), w: (C_out, *kernel, C_in/groups); returns (N, *out, C_out) float64.
    """
    x = np.asarray(x).astype(np.float64)
    w = np.asarray(w).astype(np.float64)
    ndim, s, p, d, out_sp = _settings(x, w, stride, padding, dilation, output_padding)
    batch, c_in = x.shape[0], x.shape[-1]
    c_out, cin_g = w.shape[0], w.shape[-1]
    cout_g = c_out // groups
    assert cin_g * groups == c_in and cout_g * groups == c_out, (x.shape, w.shape, groups)
    out = np.zeros((batch, *out_sp, c_out), np.float64)
    for i in itertools.product(*(range(n_) for n_ in x.shape[1:-1])):
        for k in itertools.product(*(range(n_) for n_ in w.shape[1:-1])):
            o = tuple(i[a] * s[a] + k[a] * d[a] - p[a] for a in range(ndim))
            if not all(0 <= o[a] < out_sp[a] for a in range(ndim)):
                continue
            # Group g: input channels [g*Cin_g, (g+1)*Cin_g) times weight rows
            # [g*Cout_g, (g+1)*Cout_g) into output channels [g*Cout_g, (g+1)*Cout_g).
            xs = x[(slice(None), *i)].reshape(batch, groups, cin_g)
            ws = w[(slice(None), *k)].reshape(groups, cout_g, cin_g)
            contrib = np.einsum("ngi,goi->ngo", xs, ws)
            out[(slice(None), *o)] += contrib.reshape(batch, c_out)
    return out


def magnitude_ref(x, w, stride=1, padding=0, dilation=1, output_padding=0,
                  groups: int = 1) -> np.ndarray:
    """Per output element, the sum of |x| * |w| over its contributions.

    Rounding errors of a sum scale with this, not with the (possibly cancelled) result,
    so tolerances are set relative to it."""
    return conv_transpose_ref(np.abs(np.asarray(x).astype(np.float64)),
                              np.abs(np.asarray(w).astype(np.float64)),
                              stride, padding, dilation, output_padding, groups)


# ---- the settings grid shared by the comparison tests ------------------------------------

@dataclass(frozen=True)
class Case:
    """One call: shapes and settings in the caller's rank (settings as ints or tuples)."""

    name: str
    batch: int
    in_spatial: tuple[int, ...]
    c_in: int
    c_out: int
    kernel: tuple[int, ...]
    stride: int | tuple[int, ...] = 1
    padding: int | tuple[int, ...] = 0
    dilation: int | tuple[int, ...] = 1
    output_padding: int | tuple[int, ...] = 0
    groups: int = 1

    @property
    def ndim(self) -> int:
        return len(self.in_spatial)

    @property
    def input_shape(self) -> tuple[int, ...]:
        return (self.batch, *self.in_spatial, self.c_in)

    @property
    def weight_shape(self) -> tuple[int, ...]:
        return (self.c_out, *self.kernel, self.c_in // self.groups)

    @property
    def kwargs(self) -> dict:
        return {"stride": self.stride, "padding": self.padding, "dilation": self.dilation,
                "output_padding": self.output_padding, "groups": self.groups}

    def per_axis(self, name: str) -> tuple[int, ...]:
        return _per_axis(getattr(self, name), self.ndim)

    @property
    def out_spatial(self) -> tuple[int, ...]:
        return tuple(out_size(*a) for a in zip(
            self.in_spatial, self.kernel, self.per_axis("stride"), self.per_axis("padding"),
            self.per_axis("dilation"), self.per_axis("output_padding")))

    @property
    def output_shape(self) -> tuple[int, ...]:
        return (self.batch, *self.out_spatial, self.c_out)

    @property
    def id(self) -> str:
        return f"{self.ndim}d-{self.name}"


_BASE_SPATIAL = {1: (7,), 2: (4, 5), 3: (3, 4, 5)}


def settings_grid(ndim: int) -> list[Case]:
    """Every setting of issue 2 and a few of their combinations, on tiny shapes.

    Channel counts are small and unequal (3 -> 4) so that a swapped axis cannot hide.
    Tuples are anisotropic; a 1-D or 2-D case takes the last entries of the 3-D tuple.
    """
    sp = _BASE_SPATIAL[ndim]

    def t(*values: int) -> tuple[int, ...]:
        return tuple(values[3 - ndim:])

    def k(n: int) -> tuple[int, ...]:
        return (n,) * ndim

    cases = [
        Case("k3s1", 2, sp, 3, 4, k(3)),
        Case("k2s2", 2, sp, 3, 4, k(2), stride=2),
        Case("k4s2p1", 1, sp, 3, 4, k(4), stride=2, padding=1),
        Case("k3s2p1op1", 1, sp, 3, 4, k(3), stride=2, padding=1, output_padding=1),
        Case("k3s3", 1, sp, 3, 4, k(3), stride=3),
        Case("k2s3-gaps", 1, sp, 3, 4, k(2), stride=3),
        Case("k1s2-gaps", 2, sp, 3, 4, k(1), stride=2),
        Case("k3s2p2-crop", 1, sp, 3, 4, k(3), stride=2, padding=2),
        Case("negpad-1", 1, sp, 3, 4, k(3), stride=2, padding=-1),
        Case("negpad-2-s1", 1, sp, 3, 4, k(2), padding=-2),
        Case("op-eq-stride", 1, sp, 3, 4, k(3), stride=2, output_padding=2),
        Case("op-gt-stride", 1, sp, 3, 4, k(3), stride=2, padding=1, output_padding=3),
        Case("op2-s1", 1, sp, 3, 4, k(3), output_padding=2),
        Case("op-negative", 1, sp, 3, 4, k(3), stride=2, padding=1, output_padding=-1),
        Case("dil2-s2", 1, sp, 3, 4, k(3), stride=2, dilation=2),
        Case("dil3-p1", 1, sp, 3, 4, k(2), padding=1, dilation=3),
        Case("dil2-s3-p2-op1", 1, sp, 3, 4, k(3), stride=3, padding=2, dilation=2,
             output_padding=1),
        Case("out-size-1", 1, (3,) * ndim, 3, 4, k(3), padding=2),
        Case("in-size-1", 2, (1,) * ndim, 3, 4, k(3), stride=2, padding=1),
        Case("one-channel", 2, sp, 1, 1, k(3), stride=2),
        Case("depthwise", 1, sp, 4, 4, k(3), stride=2, padding=1, output_padding=1, groups=4),
        Case("multiplier", 2, sp, 3, 6, k(3), stride=2, groups=3),
        Case("grouped", 1, sp, 4, 6, k(3), stride=2, padding=1, groups=2),
        Case("grouped-cout1", 1, sp, 6, 3, k(2), stride=2, groups=3),
        # padding beyond the kernel's reach, and output_padding cropping past it: where
        # MLX's own lowering pads by a negative amount (see test_mlx_parity.py)
        Case("pad-beyond-kernel", 1, sp, 3, 4, k(2), stride=2, padding=2),
        Case("op-crops-more", 1, sp, 3, 4, k(3), stride=2, padding=1, output_padding=-2),
        Case("batch0", 0, sp, 3, 4, k(3), stride=2),
        Case("batch3", 3, sp, 2, 3, k(3), stride=2, padding=1),
    ]
    if ndim > 1:
        cases += [
            Case("aniso", 1, sp, 3, 4, t(2, 3, 3), stride=t(1, 2, 3), padding=t(0, 1, -1),
                 dilation=t(1, 2, 1), output_padding=t(0, 1, 3)),
            Case("aniso-grouped", 2, sp, 4, 6, t(3, 2, 4), stride=t(2, 1, 2),
                 padding=t(1, 0, 2), dilation=t(1, 1, 2), output_padding=t(1, 0, -1),
                 groups=2),
            Case("aniso-depthwise", 1, sp, 3, 3, t(3, 3, 2), stride=t(3, 2, 1),
                 padding=t(1, -1, 0), dilation=t(2, 1, 1), output_padding=t(2, 1, 0),
                 groups=3),
        ]
    for c in cases:
        assert min(c.out_spatial) >= 1, c
    return cases


def reaches_output(case: Case) -> bool:
    """Whether any (input position, tap) pair lands inside the output at all."""
    ones_x = np.ones((1, *case.in_spatial, case.c_in))
    ones_w = np.ones(case.weight_shape)
    return bool(conv_transpose_ref(ones_x, ones_w, **case.kwargs).any())


def all_cases() -> list[Case]:
    return [c for ndim in (1, 2, 3) for c in settings_grid(ndim)]


def conv_transpose_pads_ref(x, w, stride=1, pads=None, dilation=1, groups: int = 1,
                            bias=None) -> np.ndarray:
    """The crop reading of (lo, hi) padding: the whole output (no crop), then per axis
    positions [lo, full - hi) of it, zeros beyond its ends (lo or hi < 0); plus `bias`.
    pads: one (lo, hi) per spatial axis (None: no crop)."""
    full = conv_transpose_ref(x, w, stride, 0, dilation, 0, groups)
    ndim = full.ndim - 2
    pads = pads or [(0, 0)] * ndim
    for axis, (lo, hi) in enumerate(pads):
        a = axis + 1
        if lo < 0 or hi < 0:  # extend with zeros first
            widths = [(0, 0)] * full.ndim
            widths[a] = (max(0, -lo), max(0, -hi))
            full = np.pad(full, widths)
            lo, hi = max(lo, 0), max(hi, 0)
        index = [slice(None)] * full.ndim
        index[a] = slice(lo, full.shape[a] - hi)
        full = full[tuple(index)]
    if bias is not None:
        full = full + np.asarray(bias, np.float64)
    return full
