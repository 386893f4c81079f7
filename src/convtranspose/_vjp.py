"""Gradients of the transposed convolution: the vector-Jacobian product (VJP).

For y = conv_transpose(x, W) and a cotangent g shaped like y, per axis and per pair
(input position i, tap k) that lands inside the output at o = i*s + k*d - p:

    grad_input[n, i, ci]   = sum_{k, co} g[n, i*s + k*d - p, co] * W[co, k, ci]
    grad_weight[co, k, ci] = sum_{n, i}  x[n, i, ci] * g[n, i*s + k*d - p, co]

Both read the same cotangent rows: input position i meets, through tap k, cotangent row
i*s + k*d - p. So the work is organised over *input* positions (a strided correlation of
the cotangent, no zero-stuffing), in one pass for both gradients. Four algorithms:

- ``gather``: a tile of input rows copies, per tap, the cotangent rows it meets into one
  block (rows, taps * C_out/g); two GEMMs: grad_input tile = block @ W_stacked (K = taps *
  C_out/g) and grad_weight += block^T @ x_tile.
- ``shift``: the same GEMMs with a copy len(W taps) wide instead of len(taps): per (D, H)
  stride phase, the cotangent rows are laid out once (W taps side by side) on a grid with
  a halo, and every (D, H) tap of the phase is a fixed row shift of that grid.
- ``direct``: depthwise layers (one input channel per group) have no GEMM to speak of;
  they multiply-add per tap, broadcast over channels.
- ``indexed``: small calls (the forward's ``indexed`` sizes). Every (input row, tap)
  product of the forward feeds one output row or none, so the products' cotangent is one
  gather of cotangent rows, and each gradient one GEMM: no per-tap Python work.

grad_input alone is an ordinary strided correlation of the cotangent with the weight
(taps transposed): where the compiled kernel is built and the channels suit it, it
computes grad_input in registers (``native``), and the algorithms above only grad_weight.
Where the compiled grad_weight kernel sums only a few values per tap (a 16 -> 1 head), it
computes grad_input in the same pass: each cotangent value it loads feeds both.

The plan: `make_vjp_plan` chooses, once per call and before any work, the path of each
gradient (a frozen, printable `VjpPlan`: ``print(convtranspose.vjp_plan(...))``), from the
spec, the dtypes, the gradients asked for, threads, workspace and whether the kernel can
read the arrays where they lie; `run_vjp_plan` runs it and revises nothing. A channel
multiplier (`expands_to_depthwise`) runs as the depthwise layer it expands to, whose plan
its plan holds.

Tiles are bounded by the same workspace rule as the forward (`_plan.workspace_limit`) and
are spread over worker threads (NumPy and BLAS release the GIL). Each worker owns its tiles
by a fixed round-robin and its own grad_weight partial sum, and partials are added in
worker order: results are bitwise reproducible for a given thread count.
"""

import dataclasses
import functools
import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from . import _native_kernel as native
from ._api import ArrayLike, IntOrTuple, Padding, RecentCalls, _plain_ints, spec_for, unbatched
from ._dtypes import compute_dtype, result_dtype
from ._execute import (
    _zero_outside,
    checkpoint,
    padded_along_w,
    pair_input,
    pair_weight,
    run_jobs,
)
from ._geometry import tap_output_range
from ._memory import result_empty, result_zeros
from ._plan import (
    COPY_BYTES_PER_S,
    ELEMENTWISE_PER_S,
    FUSE_W_BELOW_CHANNELS,
    GEMM_ALGORITHMS,
    GW_PADDED,
    GW_WIDE,
    NATIVE_PEAK_PER_LANE,
    PAIR_TRANSFORM_BYTES_PER_S,
    SHARED_TILE_BYTES,
    VJP_ALGORITHMS,
    GradStep,
    Tile,
    VjpPlan,
    _gemm_rate,
    expands_to_depthwise,
    get_num_threads,
    get_winograd,
    indexed_fits,
    native_mode,
    native_rate,
    per_input_channel_weight,
    product_targets,
    split_tiles,
    streams_output,
    winograd_axis_fits,
    workspace_limit,
)
from ._spec import VJP_NAMES as _NAMES
from ._spec import ConvSpec, as_float_array, check_bias

# Fewer rows than this per block and the GEMMs lose speed (each call packs the whole
# weight operand) and grad_weight's partial-sum updates grow; cut the taps into chunks.
MIN_BLOCK_ROWS = 512


# --- the plan: which path computes each gradient, chosen before any work ----------------

# A worker's gathered block stays about this size, so that it is still in cache when the
# GEMMs read it back.
VJP_TILE_BYTES = 4 * 2**20


@dataclass(frozen=True)
class KernelTap:
    """One 3-D kernel tap that reaches the output from at least one input position."""

    index: int  # flat index into the kernel, (kd, kh, kw) in C order
    shift: tuple[int, int, int]  # cotangent row o = i * s + shift, per axis
    lo: tuple[int, int, int]  # input range [lo, hi) whose rows land inside the output
    hi: tuple[int, int, int]


@functools.lru_cache(maxsize=256)
def active_taps(spec: ConvSpec) -> tuple[KernelTap, ...]:
    """Taps with a non-empty input range on every axis; the others have zero gradient.
    Cached per layer: a training loop asks again every step (60 us on W9's 27 taps)."""
    per_axis = []
    for n, kk, s, p, d, o in zip(spec.in_spatial, spec.kernel, spec.stride, spec.pad_lo,
                                 spec.dilation, spec.out_spatial):
        per_axis.append([(k, k * d - p, *tap_output_range(n, k, s, p, d, o))
                         for k in range(kk)])
    taps = []
    kd, kh, kw = spec.kernel
    for a, b, c in itertools.product(*per_axis):
        lo, hi = (a[2], b[2], c[2]), (a[3], b[3], c[3])
        if all(l_ < h_ for l_, h_ in zip(lo, hi)):
            taps.append(KernelTap((a[0] * kh + b[0]) * kw + c[0], (a[1], b[1], c[1]), lo, hi))
    return tuple(taps)


def native_grad_input_suits(spec: ConvSpec, need_weight: bool = False) -> bool:
    """The compiled kernel for grad_input where its rate beats a GEMM's: its output
    channels are C_in/g and it reduces over C_out/g (the forward's roles swapped).

    When grad_weight is wanted too, the GEMM paths share one gathered block between both
    gradients, and taking grad_input out of them saves little: measured on W1-W8, the
    split won only at stride 1 (W5: 37 -> 32 ms); at stride 2 it lost up to 15% (W2)."""
    if not native.AVAILABLE:
        return False
    return _native_grad_input_suits(spec, need_weight)


def grad_input_wide_w(spec: ConvSpec) -> bool:
    """Whether grad_input sums every W tap as one (as the forward's `fuses_w_taps`): with
    dilation 1 along W, input pixel i meets cotangent pixels i*s - p + k for k in [0, kW),
    one run of kW * C_out values (one conv group) in a cotangent padded along W."""
    return (spec.groups == 1 and spec.dilation[2] == 1 and spec.kernel[2] > 1
            and spec.c_out < FUSE_W_BELOW_CHANNELS)


@functools.lru_cache(maxsize=256)
def grad_input_kernel_spec(spec: ConvSpec) -> ConvSpec:
    """grad_input as the kernel sees it: channels swapped (it sums C_out/g, writes C_in/g)
    and, with `grad_input_wide_w`, one W tap of kW * C_out channels. For the kernel's
    mode and rate only."""
    if grad_input_wide_w(spec):
        return dataclasses.replace(spec, c_in=spec.c_out * spec.kernel[2], c_out=spec.c_in,
                                   kernel=(*spec.kernel[:2], 1))
    return dataclasses.replace(spec, c_in=spec.c_out, c_out=spec.c_in)


@functools.lru_cache(maxsize=256)  # a layer asks at every call: ~8 us of modelling
def _native_grad_input_suits(spec: ConvSpec, need_weight: bool) -> bool:
    if spec.c_in_per_group == 1 and spec.c_out_per_group == 1:  # depthwise, against the
        return True  # direct path's NumPy multiply-adds: W7's grad_input 38 -> 12 ms
    swapped = grad_input_kernel_spec(spec)
    mode = native_mode(swapped, False)
    if need_weight and math.prod(spec.stride) > 1:
        return False
    # 20 GFLOP/s modelled is where the GEMM paths stop winning: measured, W6's grad_input
    # (C_out = 1, modelled 32) takes 2.5 ms here against 4.4 ms through a GEMM.
    # (Modelled at AVX-512's 16 float32 lanes: the bar scales with the vectors, as the
    # GEMM paths' rate does.)
    lanes = native.layout(4)[0]
    return (mode in (native.CHANNELS, native.DOT)
            and native_rate(swapped) >= 20e9 * lanes / 16)


def grad_input_takes_pairs(spec: ConvSpec, cd: np.dtype, limit: int, winograd: bool,
                           cotangent_in_place: bool) -> bool:
    """Whether grad_input takes Winograd F(2,3) along D (as the forward's 'winograd'):
    `winograd_axis_fits` with grad_input's D planes as outputs and C_out/g channels
    reduced over, a cotangent read in place, and its transform V (2x the cotangent's D
    planes a pair reads) within the workspace limit. `winograd`: `get_winograd()`."""
    if (not winograd
            or not winograd_axis_fits(spec, spec.in_spatial[0], spec.c_out_per_group)
            or native_mode(dataclasses.replace(spec, c_in=spec.c_out, c_out=spec.c_in))
            != native.CHANNELS or not cotangent_in_place):
        return False
    return grad_input_pair_bytes(spec, cd) <= limit


def grad_input_pair_bytes(spec: ConvSpec, cd: np.dtype) -> int:
    """Size of grad_input's transformed cotangent V (N, pairs, 4, H_out, W_out, C_out)."""
    pairs = -(-spec.in_spatial[0] // 2)
    return (spec.batch * pairs * 4 * spec.out_spatial[1] * spec.out_spatial[2] * spec.c_out
            * cd.itemsize)


def grad_weight_wide_w(spec: ConvSpec, cd: np.dtype, threads: int) -> bool:
    """Whether grad_weight sums every W tap at once: with dilation 1 along W, input pixel
    i meets one run of kW * C_out cotangent values, so a (D, H) tap's sums over the pixels
    are one product of x's C_in/g by that run (rounded up to whole vectors, the extra
    columns dropped) where per tap C_out/g alone would fill part of a vector. With groups
    the run holds every group's channels: each group's product computes them all and
    keeps its own (work times the groups, so up to four). Needs enough (tap, column
    chunk) units to share among the threads."""
    lanes, _ = native.layout(cd.itemsize)
    cols = -(-spec.kernel[2] * spec.c_out // lanes) * lanes
    few = spec.c_out < FUSE_W_BELOW_CHANNELS if spec.groups == 1 else spec.groups <= 4
    return (few and spec.dilation[2] == 1 and spec.kernel[2] > 1
            and native.gw_units(spec.kernel[0] * spec.kernel[1], cols, cd.itemsize)
            >= 2 * threads)



# From this grad_weight size on, the sums go straight into it (vectors along C_in) rather
# than through a packed buffer that is then unpacked: measured, W3's 8 MiB grad_weight
# 51 -> 36 ms; below it vectors along C_out are faster (W2 45 against 57 ms, W5 12.9
# against 14.3, W8 21 against 25, W4 31 against 33 with a 1.7 MiB grad_weight).
GW_IN_PLACE_BYTES = 4 << 20


def grad_weight_side(spec: ConvSpec, cd: np.dtype, threads: int, in_place: bool,
                     in_place_bytes: int) -> bool | int | None:
    """None where the compiled grad_weight kernel does not apply; GW_DEPTHWISE for one
    channel per group; else whether it runs swapped (vectors along C_in: for C_out/g that
    is not whole vectors, or a grad_weight large enough to be summed in place), or GW_WIDE,
    or GW_PADDED (swapped over x padded to whole vectors, where neither side is).
    It reads both operands in place: `in_place`, whether they have the compute dtype and
    contiguous channels. `in_place_bytes`: GW_IN_PLACE_BYTES."""
    if not (native.AVAILABLE and in_place):
        return None
    lanes, _ = native.layout(cd.itemsize)
    cig, cog = spec.c_in_per_group, spec.c_out_per_group
    if cig == 1 and cog == 1:
        return native.GW_DEPTHWISE
    along_out = cog % lanes == 0
    if cig % lanes == 0 and (not along_out or spec.c_out * math.prod(spec.kernel) * cig
                             * cd.itemsize >= in_place_bytes):
        return True
    if along_out:
        return False
    if grad_weight_wide_w(spec, cd, threads):
        return GW_WIDE
    return GW_PADDED if math.prod(spec.kernel) > 1 else None


@dataclass(frozen=True)
class ShiftLayout:
    """Taps of the shift path: the W taps side by side in every grid row; the (D, H) taps
    grouped by stride phase, each a fixed row shift of its phase's grid."""

    wtaps: tuple  # (k, shift, lo, hi) per active W tap
    phases: tuple  # ((rd, rh), cmin_d, cmin_h, ((pair, cd, ch), ...)) per (D, H) phase
    pairs: tuple  # (kd, kh) per pair index
    halo: tuple[int, int]  # extra grid planes along D, rows along H
    counts: tuple[dict, dict]  # cotangent rows per phase residue, along D and H


def _axis_taps(spec: ConvSpec, axis: int) -> list[tuple[int, int, int, int]]:
    n, kk, s, p, d, o = (spec.in_spatial[axis], spec.kernel[axis], spec.stride[axis],
                         spec.pad_lo[axis], spec.dilation[axis], spec.out_spatial[axis])
    taps = []
    for k in range(kk):
        lo, hi = tap_output_range(n, k, s, p, d, o)
        if lo < hi:
            taps.append((k, k * d - p, lo, hi))
    return taps


def shift_layout(spec: ConvSpec) -> ShiftLayout:
    (sd, sh, _), (od, oh, _) = spec.stride, spec.out_spatial
    by_phase = []
    for axis, s in ((0, sd), (1, sh)):
        groups: dict[int, list] = {}
        for k, shift, _, _ in _axis_taps(spec, axis):
            groups.setdefault(shift % s, []).append((k, shift // s))
        by_phase.append(groups)
    phases, pairs = [], []
    halo_d = max(max(c for _, c in v) - min(c for _, c in v) for v in by_phase[0].values())
    halo_h = max(max(c for _, c in v) - min(c for _, c in v) for v in by_phase[1].values())
    for rd, dtaps in sorted(by_phase[0].items()):
        for rh, htaps in sorted(by_phase[1].items()):
            cmin_d, cmin_h = min(c for _, c in dtaps), min(c for _, c in htaps)
            members = []
            for (kd, cd), (kh, ch) in itertools.product(dtaps, htaps):
                members.append((len(pairs), cd, ch))
                pairs.append((kd, kh))
            phases.append(((rd, rh), cmin_d, cmin_h, tuple(members)))
    counts = tuple({r: -(-(o - r) // s) for r in range(s)} for o, s in ((od, sd), (oh, sh)))
    return ShiftLayout(tuple(_axis_taps(spec, 2)), tuple(phases), tuple(pairs),
                        (halo_d, halo_h), counts)


def shift_rows(spec: ConvSpec, layout: ShiftLayout, budget: int) -> int:
    """Input rows per shift tile: its grid, accumulator, temporary and input grid."""
    return max(1, budget // (len(layout.wtaps) * spec.c_out + 3 * spec.c_in))


def choose_vjp_algorithm(spec: ConvSpec, taps, budget: int = VJP_TILE_BYTES // 4) -> str:
    """'direct' for one input channel per group; 'shift' where it copies less of the
    cotangent than 'gather' (counting its halo), its GEMMs stay wide (K >= 128) and the
    halo rows it computes and drops stay few (<= 7%); else 'gather'. `budget` is the
    workspace of one worker, in elements."""
    if spec.c_in_per_group == 1 and spec.groups > 1:
        return "direct"
    layout = shift_layout(spec)
    if len(layout.wtaps) * spec.c_out_per_group < 128:
        return "gather"
    depth, height, width = spec.in_spatial
    rows = shift_rows(spec, layout, budget)  # the tile shape split_tiles will cut
    if rows >= height * width:
        nd, nh = min(depth, rows // (height * width)), height
    else:
        nd, nh = 1, max(1, rows // width)
    halo_d, halo_h = layout.halo
    waste = halo_h / nh + (halo_d / depth if spec.batch > 1 and nd == depth else 0)
    shift_copy = (len(layout.phases) * len(layout.wtaps) * (nd + halo_d) / nd
                  * (nh + halo_h) / nh)
    if waste <= 0.07 and shift_copy < len(taps):
        return "shift"
    return "gather"


def make_vjp_plan(spec: ConvSpec, cd: np.dtype, *, need_input: bool = True,
                  need_weight: bool = True, threads: int | None = None,
                  workspace: int | None = None, algorithm: str | None = None,
                  input_in_place: bool = True, cotangent_in_place: bool = True) -> VjpPlan:
    """The backward's plan, summing in `cd` (`vjp_compute_dtype`). `input_in_place`,
    `cotangent_in_place`: whether the kernel can read those arrays where they lie
    (`native.reads_in_place`; C-contiguous arrays of the compute dtype can)."""
    if algorithm is not None and algorithm not in VJP_ALGORITHMS:
        raise ValueError(f"vjp: 'algorithm' must be one of {GEMM_ALGORITHMS + ('native',)}, "
                         f"got {algorithm!r}")
    n_threads = max(1, threads or get_num_threads())
    return _make_vjp_plan(spec, cd, need_input, need_weight, n_threads,
                          workspace_limit(spec, workspace), algorithm, get_winograd(),
                          input_in_place, cotangent_in_place, GW_IN_PLACE_BYTES)


@functools.lru_cache(maxsize=256)
def _make_vjp_plan(spec: ConvSpec, cd: np.dtype, need_input: bool, need_weight: bool,
                   threads: int, limit: int, algorithm: str | None, winograd: bool,
                   input_in_place: bool, cotangent_in_place: bool,
                   in_place_bytes: int) -> VjpPlan:
    """Plans are pure functions of their arguments (the tunable threshold included), so a
    training loop's steps reuse one."""
    budget = max(1, min(VJP_TILE_BYTES, limit // threads) // cd.itemsize)
    work = bool(active_taps(spec) and spec.batch)
    if algorithm is None and work and native.AVAILABLE and expands_to_depthwise(spec):
        depthwise = dataclasses.replace(spec, c_in=spec.c_out, groups=spec.c_out)
        # grad_weight reads the repeated input, made C-contiguous in the compute dtype.
        inner = _make_vjp_plan(depthwise, cd, need_input, need_weight, threads, limit, None,
                               winograd, need_weight, cotangent_in_place, in_place_bytes)
        return dataclasses.replace(inner, spec=spec, multiplier=inner)
    if (algorithm in (None, "native") and work and need_input and native.AVAILABLE
            and expands_to_depthwise(grad_input_kernel_spec(spec))):
        # grad_input fans each group's one cotangent channel out to its C_in/g inputs (the
        # mirror of a multiplier): a depthwise grad_input over the cotangent with each
        # channel repeated C_in/g times, which reads no input; grad_weight as the default
        # plans it alone (for 'native' too).
        depthwise = dataclasses.replace(spec, c_out=spec.c_in, groups=spec.c_in)
        fan_out = _make_vjp_plan(depthwise, cd, True, False, threads, limit, None, winograd,
                                 False, True, in_place_bytes)
        rest = _make_vjp_plan(spec, cd, False, need_weight, threads, limit, None, winograd,
                              input_in_place, cotangent_in_place, in_place_bytes)
        return dataclasses.replace(
            rest, grad_input=dataclasses.replace(fan_out.grad_input, fan_out=True),
            fan_out=fan_out)
    if algorithm is None and indexed_fits(spec):
        algorithm = "indexed"  # small: one gather and two GEMMs beat any per-tile work
    elif algorithm == "indexed" and not indexed_fits(spec):
        raise ValueError("vjp: algorithm 'indexed' is for small calls; this one's gathered "
                         "cotangent would be too large (leave 'algorithm' to the default)")
    if not work or not (need_input or need_weight):
        zeros = GradStep("zeros", 0, 0, 1, 0.0)
        return VjpPlan(spec, cd, zeros if need_input else None, zeros if need_weight else None,
                       threads, limit, budget)
    if algorithm == "native" and not native.AVAILABLE:
        raise ValueError("vjp: algorithm 'native' needs the compiled kernel, which this "
                         "install lacks")
    side = (grad_weight_side(spec, cd, threads, input_in_place and cotangent_in_place,
                             in_place_bytes)
            if need_weight and algorithm in (None, "native") else None)
    # grad_input too by the kernel: asked for, or where it beats the GEMM paths (which
    # would otherwise compute both gradients from one gathered block).
    native_gx = need_input and (algorithm == "native" or (
        algorithm is None and native_grad_input_suits(spec, need_weight and side is None)))
    fused = (side is True and native_gx
             and native.fuses_grad_input(cd.itemsize, spec.c_in_per_group,
                                         spec.c_out_per_group))
    gemm = None
    if (need_input and not native_gx) or (need_weight and side is None):
        gemm = (algorithm if algorithm not in (None, "native")
                else choose_vjp_algorithm(spec, active_taps(spec), budget))
        if gemm == "direct" and spec.c_in_per_group != 1:
            raise ValueError("vjp: algorithm 'direct' needs one input channel per group")
    gemm_costs = _gemm_costs(spec, cd, gemm, need_input and not native_gx,
                             need_weight and side is None, threads, budget) if gemm else {}
    gx = gw = None
    if need_input:
        if native_gx:
            pairs = (not fused and _grad_input_mode(spec) == native.CHANNELS
                     and not _grad_input_wide(spec)
                     and grad_input_takes_pairs(spec, cd, limit, winograd, cotangent_in_place))
            gx = _native_grad_input_step(spec, cd, threads, budget, pairs, fused,
                                         cotangent_in_place)
        else:
            gx = gemm_costs["input"]
    if need_weight:
        gw = (_native_grad_weight_step(spec, cd, threads, side) if side is not None
              else gemm_costs["weight"])
    return VjpPlan(spec, cd, gx, gw, threads, limit, budget,
                   shared_queue=side is not None and native_gx and not fused)


def _grad_input_wide(spec: ConvSpec) -> bool:
    """Whether the kernel's grad_input sums W taps as one (never for depthwise layers)."""
    depthwise = spec.c_in_per_group == 1 and spec.c_out_per_group == 1
    return not depthwise and grad_input_wide_w(spec)


def _grad_input_mode(spec: ConvSpec) -> int:
    """The kernel's vector layout for grad_input."""
    if spec.c_in_per_group == 1 and spec.c_out_per_group == 1:
        return native.DEPTHWISE
    return native_mode(grad_input_kernel_spec(spec), False)


def _on_threads(seconds: float, threads: int) -> float:
    """The models are of one core; as the forward's plan, ~0.9 efficiency on more."""
    return seconds / (1 if threads == 1 else 0.9 * threads)


def _native_grad_input_step(spec: ConvSpec, cd: np.dtype, threads: int, budget: int,
                            pairs: bool, fused: bool, cotangent_in_place: bool) -> GradStep:
    """The kernel's grad_input: the forward's rate model on its channel-swapped spec."""
    flops = spec.useful_flops
    item = cd.itemsize
    wide = _grad_input_wide(spec)
    write = 2 * spec.batch * math.prod(spec.in_spatial) * spec.c_in * item / COPY_BYTES_PER_S
    products = flops
    scratch = 0 if cotangent_in_place else threads * budget * item
    extra = 0.0
    if pairs:  # four products per pair of planes instead of six, and the transform
        products = flops * 4 * -(-spec.in_spatial[0] // 2) / (3 * spec.in_spatial[0])
        scratch = grad_input_pair_bytes(spec, cd)
        extra = scratch / PAIR_TRANSFORM_BYTES_PER_S
    elif wide:  # the cotangent padded along W
        scratch = (spec.batch * spec.out_spatial[0] * spec.out_spatial[1]
                   * (spec.out_spatial[2] + spec.kernel[2]) * spec.c_out * item)
    seconds = products / native_rate(grad_input_kernel_spec(spec)) + write / 2 + extra
    return GradStep("winograd" if pairs else "native", flops, scratch, threads,
                    _on_threads(seconds, threads), with_grad_weight=fused, wide_w=wide)


def _native_grad_weight_step(spec: ConvSpec, cd: np.dtype, threads: int,
                             side: bool | int) -> GradStep:
    """The kernel's grad_weight. It sums over pixels (many per tap), so its rate is the
    forward kernel's peak times the lanes its vector axis fills (C_in/g swapped, C_out/g
    else, kW * C_out for GW_WIDE, whose groups each compute every group's columns)."""
    lanes, _ = native.layout(cd.itemsize)
    peak = NATIVE_PEAK_PER_LANE * lanes
    gw_bytes = spec.c_out * math.prod(spec.kernel) * spec.c_in_per_group * cd.itemsize
    if side == native.GW_DEPTHWISE:
        rate, scratch = peak / 4, threads * gw_bytes
    else:
        width = (spec.kernel[2] * spec.c_out if side == GW_WIDE
                 else spec.c_in_per_group if side in (True, GW_PADDED)
                 else spec.c_out_per_group)
        vectors = -(-width // lanes)
        rate = peak * width / (vectors * lanes) / (spec.groups if side == GW_WIDE else 1)
        scratch = 0 if side is True else gw_bytes
        if side == GW_PADDED:  # x and gw with C_in/g padded to whole vectors
            scratch = (spec.batch * math.prod(spec.in_spatial) * spec.groups * vectors * lanes
                       * cd.itemsize + gw_bytes * vectors * lanes // width)
        if side == GW_WIDE:  # the W-padded cotangent and every group's columns
            scratch = (spec.batch * spec.out_spatial[0] * spec.out_spatial[1]
                       * (spec.out_spatial[2] + spec.kernel[2]) * spec.c_out * cd.itemsize
                       + gw_bytes * spec.groups * vectors * lanes // max(1, width))
    flops = spec.useful_flops
    return GradStep("native", flops, scratch, threads, _on_threads(flops / rate, threads),
                    side=side)


def _gemm_costs(spec: ConvSpec, cd: np.dtype, algorithm: str, want_input: bool,
                want_weight: bool, threads: int, budget: int) -> dict[str, GradStep]:
    """The NumPy/BLAS paths: each gradient's GEMMs at the shape's rate (`_gemm_rate` of
    their narrow side), and the copy of cotangent rows that feeds both, charged to the
    first gradient asked for."""
    flops = spec.useful_flops
    item = cd.itemsize
    rows = spec.batch * math.prod(spec.in_spatial)
    cig, cog = spec.c_in_per_group, spec.c_out_per_group
    taps = len(active_taps(spec))
    if algorithm == "direct":
        per_grad, copy = flops / 2 / ELEMENTWISE_PER_S, 0.0
        times = {"input": per_grad, "weight": per_grad}
    else:
        if algorithm == "shift":
            layout = shift_layout(spec)
            copied, k = len(layout.phases) * len(layout.wtaps), len(layout.wtaps) * cog
        else:
            copied, k = taps, taps * cog
        copy = 2 * rows * copied * spec.c_out * item / COPY_BYTES_PER_S
        if algorithm == "indexed":
            copy += 1e-5  # a few calls of Python
        times = {"input": flops / _gemm_rate(cig), "weight": flops / _gemm_rate(min(k, cig))}
    gw_bytes = spec.c_out * math.prod(spec.kernel) * cig * item
    if algorithm == "indexed":
        scratch = {"input": 2 * rows * taps * spec.c_out * item, "weight": gw_bytes}
    else:
        scratch = {"input": threads * budget * item, "weight": threads * gw_bytes}
    steps = {}
    for name, wanted in (("input", want_input), ("weight", want_weight)):
        if wanted:
            seconds = times[name] + copy
            copy = 0.0
            steps[name] = GradStep(algorithm, flops, scratch[name], threads,
                                   _on_threads(seconds, threads))
    return steps


# --- running a plan ----------------------------------------------------------------------

def _tap_box(spec: ConvSpec, tap: KernelTap, tile: Tile):
    """Where tap reads inside the tile: the input box (absolute ranges per axis) and the
    same box relative to the tile; None if the tap reaches nothing there."""
    box = ((max(tap.lo[0], tile.d[0]), min(tap.hi[0], tile.d[1])),
           (max(tap.lo[1], tile.h[0]), min(tap.hi[1], tile.h[1])),
           (tap.lo[2], tap.hi[2]))
    if any(a >= b for a, b in box):
        return None
    rel = ((box[0][0] - tile.d[0], box[0][1] - tile.d[0]),
           (box[1][0] - tile.h[0], box[1][1] - tile.h[0]), box[2])
    return box, rel


def _cot_rows(spec: ConvSpec, tap: KernelTap, box, n: tuple[int, int], c3) -> np.ndarray:
    """The cotangent rows tap meets from the input box: o = i*s + shift per axis."""
    sl = tuple(slice(a * s + sh, (b - 1) * s + sh + 1, s)
               for (a, b), s, sh in zip(box, spec.stride, tap.shift))
    return c3[(slice(*n), *sl)]


def check_cotangent(op: str, spec: ConvSpec, cotangent: ArrayLike,
                    alone: bool = False) -> np.ndarray:
    """The cotangent must be a floating array shaped exactly like the forward's output
    (without its batch axis where `alone`: an unbatched input)."""
    cot = as_float_array(op, "cotangent", cotangent)
    shape = spec.output_shape[1:] if alone else spec.output_shape
    if tuple(cot.shape) != tuple(shape):
        raise ValueError(
            f"{op}: 'cotangent' must have the forward output's shape {shape} "
            f"(input {spec.input_shape[1:] if alone else spec.input_shape}, weight "
            f"{spec.weight_shape}), got shape {tuple(cot.shape)}")
    return cot


def vjp_arrays(spec: ConvSpec, x: np.ndarray, w: np.ndarray, cot: np.ndarray, *,
               need_input: bool = True, need_weight: bool = True,
               threads: int | None = None, workspace: int | None = None,
               algorithm: str | None = None
               ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The VJP of a validated spec. grad_input has x's dtype, grad_weight w's (as mx.vjp).

    `need_input`/`need_weight` skip the work of the gradient not wanted (None is returned
    in its place); `threads`, `workspace` (bytes) and `algorithm` ('gather', 'shift',
    'direct', 'indexed' for small calls, or 'native' for grad_input with the default for
    grad_weight) override the defaults. The plan (`make_vjp_plan`) decides every path
    before any work; this only runs it."""
    cd = vjp_compute_dtype(x.dtype, w.dtype, cot.dtype)
    x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
    c3 = cot.reshape(spec.batch, *spec.out_spatial, spec.c_out)
    plan = make_vjp_plan(spec, cd, need_input=need_input, need_weight=need_weight,
                         threads=threads, workspace=workspace, algorithm=algorithm,
                         input_in_place=native.AVAILABLE and native.reads_in_place(x3, cd),
                         cotangent_in_place=native.AVAILABLE and native.reads_in_place(c3, cd))
    return run_vjp_plan(plan, x, w, cot)


@functools.lru_cache(maxsize=64)
def vjp_compute_dtype(*dtypes: np.dtype) -> np.dtype:
    """The dtype the gradients sum in: float32 at least (as `mx.vjp`)."""
    return compute_dtype(functools.reduce(result_dtype, dtypes))


def run_vjp_plan(plan: VjpPlan, x: np.ndarray, w: np.ndarray, cot: np.ndarray
                 ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Run each step of the plan on arrays of its spec."""
    if plan.multiplier is not None:
        return _multiplier_vjp(plan, x, w, cot)
    spec, cd, threads = plan.spec, plan.compute_dtype, plan.threads
    if plan.fan_out is not None:  # grad_input by its own plan; the steps below grad_weight
        gx = _fan_out_grad_input(plan.fan_out, spec, w, cot)
        _, gw = run_vjp_plan(dataclasses.replace(plan, grad_input=None, fan_out=None),
                             x, w, cot)
        return _results(spec, x, w, gx, gw)
    x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
    c3 = cot.reshape(spec.batch, *spec.out_spatial, spec.c_out)
    w3 = w.reshape(spec.c_out, math.prod(spec.kernel), spec.c_in_per_group)
    gi, gwp = plan.grad_input, plan.grad_weight
    gi_native = gi is not None and gi.native
    gw_native = gwp is not None and gwp.native
    # Accumulated in the compute dtype (tap chunks add up), rounded to x's dtype at the end.
    # The native kernels write every element; the other paths accumulate into zeros.
    gx = ((result_empty if gi_native else result_zeros)(
        (spec.batch, *spec.in_spatial, spec.c_in), cd) if gi is not None else None)
    gw = ((result_empty if gw_native else result_zeros)(
        (spec.c_out, math.prod(spec.kernel), spec.c_in_per_group), cd)
        if gwp is not None else None)
    if gi_native or gw_native:
        native.warm(threads)  # the pool's threads wake while this prepares their work
    if gi_native and gi.with_grad_weight:
        _native_both(spec, x3, c3, w3, gx, gw, threads, cd)  # few sums: one pass
        return _results(spec, x, w, gx, gw)
    # Both by the kernel: one queue for both, grad_weight's bigger jobs first, so that
    # neither waits on the other's slowest tile.
    shared = [] if plan.shared_queue else None
    if gw_native:
        _native_grad_weight(spec, x3, c3, gw, threads, gwp.side, cd, shared)
    if gi_native:
        _native_grad_input(spec, c3, w3, gx, threads, plan.budget, cd, shared,
                           gi.algorithm == "winograd")
    if shared:
        run_jobs([job for jobs, _ in shared for job in jobs], threads)
        for _, finish in shared:
            finish()
    gemm = plan.gemm_algorithm
    if gemm is not None:  # what the kernel does not compute, from one copy for both
        _GEMM_PATHS[gemm](spec, active_taps(spec), x3, c3, w3,
                          gx if gi is not None and gi.algorithm == gemm else None,
                          gw if gwp is not None and gwp.algorithm == gemm else None,
                          threads, plan.budget, cd)
    return _results(spec, x, w, gx, gw)


def _multiplier_vjp(plan: VjpPlan, x, w, cot):
    """A channel multiplier (as the forward, `expands_to_depthwise`) as a depthwise layer
    over C_out channels whose input repeats each channel C_out/g times: grad_weight is that
    layer's, and grad_input sums its grad_input over each channel's repeats (in a fixed
    order: the bits do not depend on the threads)."""
    spec, cd = plan.spec, plan.compute_dtype
    m = spec.c_out_per_group
    shape = (spec.batch, *spec.in_spatial, spec.c_out)
    if plan.grad_weight is not None:
        xe = np.repeat(x.reshape(*shape[:-1], spec.c_in).astype(cd, copy=False), m, axis=-1)
    else:  # grad_input reads no input: a stand-in of the right shape, no memory
        xe = np.broadcast_to(np.zeros((), cd), shape)
    gxe, gw = run_vjp_plan(plan.multiplier, xe, w.reshape(spec.c_out, -1, 1), cot)
    gx = None
    if gxe is not None:
        gx = gxe.reshape(*shape[:-1], spec.c_in, m).sum(axis=-1)
    return _results(spec, x, w, gx, gw)


def _fan_out_grad_input(fan_out: VjpPlan, spec: ConvSpec, w, cot) -> np.ndarray:
    """grad_input where each group sums one cotangent channel into its C_in/g inputs (the
    mirror of a channel multiplier, `expands_to_depthwise` of the swapped spec): a
    depthwise grad_input over the cotangent with each channel repeated C_in/g times, so
    that the kernel's vectors run along C_in instead of each group's single channel (the
    GEMM paths ran 8 -> 4 g4 at 0.5 GFLOP/s). `fan_out`: that depthwise layer's plan."""
    cd, depthwise = fan_out.compute_dtype, fan_out.spec
    m = spec.c_in_per_group
    wd = per_input_channel_weight(spec, w)
    shape = (spec.batch, *spec.out_spatial, spec.c_out)
    cot_rep = np.repeat(cot.reshape(shape).astype(cd, copy=False), m, axis=-1)
    standin = np.broadcast_to(np.zeros((), cd), (spec.batch, *spec.in_spatial, spec.c_in))
    gx, _ = run_vjp_plan(fan_out, standin, wd.reshape(depthwise.weight_shape), cot_rep)
    return gx


def _results(spec: ConvSpec, x: np.ndarray, w: np.ndarray, gx: np.ndarray | None,
             gw: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The gradients in their shapes, rounded to the dtypes of x and w."""
    if gx is not None:
        gx = gx.reshape(spec.input_shape).astype(x.dtype, copy=False)
    if gw is not None:
        gw = gw.reshape(spec.weight_shape).astype(w.dtype, copy=False)
    return gx, gw



@functools.lru_cache(maxsize=64)  # a table is taps x C_in/g int64: bounded memory
def _grad_input_tables(ktot: int, cig: int, groups: int, cog: int, s_co: int, s_tap: int,
                       s_ci: int) -> tuple[np.ndarray, ...]:
    """Per conv group, the pack table of grad_input's weight [tap][co][ci]: the offset of
    each (tap, ci)'s element for co = 0, for a weight of these element strides."""
    start = np.arange(ktot)[:, None] * s_tap + np.arange(cig)[None, :] * s_ci
    tables = []
    for g in range(groups):
        table = np.ascontiguousarray(start + g * cog * s_co, np.int64)
        table.flags.writeable = False  # shared by every call with these strides
        tables.append(table)
    return tuple(tables)


@functools.lru_cache(maxsize=256)
def _tap_offsets(spec: ConvSpec) -> native.TapOffsets:
    """Per axis, the cotangent offset k * dilation - padding of every tap k."""
    return native.TapOffsets(np.arange(k, dtype=np.int64) * d - p
                             for k, d, p in zip(spec.kernel, spec.dilation, spec.pad_lo))


@functools.lru_cache(maxsize=256)
def _pair_offsets(spec: ConvSpec) -> native.TapOffsets:
    """_tap_offsets with D's taps the four planes of V (offsets 0-3, read at step 4)."""
    taps = _tap_offsets(spec)
    return native.TapOffsets([np.arange(4), taps[1], taps[2]])


def _native_grad_input(spec, c3, w3, gx, n_threads, budget, cd,
                       defer: list | None = None, winograd: bool = False) -> None:
    """grad_input[n, i, ci] = sum over taps k and co of g[n, i*s + k*d - p, co] W[co, k, ci]:
    the kernel with the cotangent as its input (step s, offsets k*d - p, every tap) and
    grad_input as its output, tile by tile on the workers. A cotangent of another dtype,
    or with channels not contiguous, is converted plane by plane as a tile needs it.
    `winograd` (the plan's `grad_input_takes_pairs`): Winograd F(2,3) along D: the
    kernel reads the transformed cotangent V with the transformed weight, and a tile's
    rows are pairs of grad_input planes."""
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    item = cd.itemsize
    offsets = _tap_offsets(spec)
    ktot = math.prod(spec.kernel)
    depthwise = cig == 1 and cog == 1
    wide = not depthwise and grad_input_wide_w(spec)
    mode = (native.DEPTHWISE if depthwise else native_mode(grad_input_kernel_spec(spec), False))
    # (a fan-out, depthwise by its swapped spec alone, goes to `_fan_out_grad_input`)
    assert depthwise or mode != native.DEPTHWISE
    pairs = -(-spec.in_spatial[0] // 2) if winograd else 0  # the plan's choice
    source, in_dims, steps = c3, spec.out_spatial, spec.stride
    if wide:  # one W tap of kW * C_out channels over a cotangent padded along W
        c3, w3, in_dims, offsets, cog, ktot = _wide_cotangent(spec, c3, w3, cd, n_threads)
        source = c3
    if depthwise:  # [tap][channel], every channel in one pass
        packed = [np.ascontiguousarray(w3[:, :, 0].T, dtype=cd)]
    elif mode == native.DOT:  # [tap][ci][co] per group: vectors along the co summed
        w4 = w3.reshape(groups, cog, ktot, cig)
        packed = [np.ascontiguousarray(w4[g].transpose(1, 2, 0), dtype=cd)
                  for g in range(groups)]
    else:  # [tap][co][ci] per group (rows co, columns ci), gathered from w3 in one pass
        w3 = w3.astype(cd, copy=False)
        if pairs:  # the D taps, in order of offset k - p, transformed into four
            w3 = pair_weight(w3.reshape(spec.c_out, *spec.kernel, cig), (0, 1, 2))
            w3 = w3.reshape(spec.c_out, -1, cig)
            ktot = w3.shape[1]
        strides = native.element_strides(w3)
        if strides is None:
            w3 = np.ascontiguousarray(w3)
            strides = native.element_strides(w3)
        s_co, s_tap, s_ci = strides
        packed = [native.pack_columns(w3, table, cog, s_co)
                  for table in _grad_input_tables(ktot, cig, groups, cog, s_co, s_tap, s_ci)]
    convert = not native.reads_in_place(c3, cd)
    per_row = spec.c_out * max(1, spec.stride[0] * spec.stride[1])  # slab elements per gx row
    if convert:  # a tile at a time per thread, each converting what it reads
        tiles = _tiles(spec, max(1, budget // per_row), 4 * n_threads)
    elif pairs:  # tiles of pair rows, shared as below
        tiles = split_tiles(spec.batch, (pairs, *spec.in_spatial[1:]),
                            SHARED_TILE_BYTES // (item * (spec.c_in + spec.c_out)), 1)
    else:  # threads share each tile's rows (as the forward's): cut only for locality
        tiles = _tiles(spec, SHARED_TILE_BYTES // (item * (spec.c_in + spec.c_out)), 1)
    sharers = 1 if convert else n_threads
    (sd, sh, _), (od, oh, _) = spec.stride, spec.out_spatial
    out_w = spec.out_spatial[2]
    stream = streams_output(gx.nbytes)
    if pairs:
        source = pair_input(c3, int(offsets[0][0]), pairs, n_threads)
        source = source.reshape(spec.batch, 4 * pairs, *source.shape[3:])
        in_dims, steps = (4 * pairs, oh, out_w), (4, *spec.stride[1:])
        offsets = _pair_offsets(spec)

    def job_for(tile):
        cursors = native.RowCursors(groups, sharers)
        n0, n1 = tile.n
        box = (n0, n1, *tile.d, *tile.h)
        rows_d = (slice(2 * tile.d[0], min(2 * tile.d[1], spec.in_spatial[0])) if pairs
                  else slice(*tile.d))
        target = gx[n0:n1, rows_d, tile.h[0]:tile.h[1]]
        o_addr, os_ = native.origin(target)

        def calls(x_addr, xs, into=None) -> None:
            if depthwise:
                native.correlate(native.DEPTHWISE, item, native.HALF_NONE, stream, x_addr, xs,
                                 spec.out_spatial, packed[0], offsets, spec.stride, o_addr,
                                 os_, box, spec.in_spatial[2], groups, groups,
                                 cursors.address(0), sharers, into=into)
                return
            for g in range(groups):
                native.correlate(mode, item, native.HALF_NONE, stream,
                                 x_addr + g * cog * item, xs, in_dims, packed[g],
                                 offsets, steps, o_addr + g * cig * item, os_, box,
                                 spec.in_spatial[2], cog, cig, cursors.address(g), sharers,
                                 into=into, pair_out=spec.in_spatial[0] if pairs else 0)

        if not convert:  # in place: a task for the compiled pool
            prepared: list = []
            calls(*native.origin(source), prepared)
            return native.Task(tuple(prepared), sharers > 1, None, (cursors, packed, source))

        def job():  # the cotangent planes and rows this tile's taps read, converted
            d0 = min(od, max(0, tile.d[0] * sd + int(offsets[0][0])))
            d1 = max(d0, min(od, (tile.d[1] - 1) * sd + int(offsets[0][-1]) + 1))
            h0 = min(oh, max(0, tile.h[0] * sh + int(offsets[1][0])))
            h1 = max(h0, min(oh, (tile.h[1] - 1) * sh + int(offsets[1][-1]) + 1))
            slab = np.empty((n1 - n0, d1 - d0, h1 - h0, out_w, spec.c_out), cd)
            slab[...] = c3[n0:n1, d0:d1, h0:h1]
            calls(*native.origin(slab, (n0, d0, h0)))  # the slab holds every row read
        return job

    _run_or_defer([job_for(t) for t in tiles], n_threads, lambda: None, defer)


def _padded_cotangent(spec, c3, cd, threads, reach: int) -> tuple[np.ndarray, int]:
    """The cotangent in the compute dtype padded with zeros along W, and its left padding,
    so that for every input pixel i the `reach` cotangent pixels from i*s - p on lie
    inside it (the W-tap runs of `grad_input_wide_w` and `grad_weight_wide_w`)."""
    pad, in_w, out_w = spec.padding[2], spec.in_spatial[2], spec.out_spatial[2]
    left = max(0, pad)
    width = max(out_w + left, (in_w - 1) * spec.stride[2] - pad + reach + left)
    return padded_along_w(c3, left, width, cd, threads), left


@functools.lru_cache(maxsize=256)  # prepared calls hold the arrays' addresses only: the
def _wide_offsets(spec: ConvSpec, left: int) -> native.TapOffsets:  # cache keeps them alive
    """The tap offsets of a W-padded cotangent read with one W tap (its run's start)."""
    base = _tap_offsets(spec)
    return native.TapOffsets([base[0], base[1], np.array([left - spec.padding[2]])])


def _wide_cotangent(spec, c3, w3, cd, threads):
    """`grad_input_wide_w`: the padded cotangent; the weight as (kW * C_out, kD * kH, C_in)
    (row k * C_out + co: tap k's channel co); the kernel's input dims, tap offsets, channels
    summed and taps."""
    kd, kh, kw = spec.kernel
    padded, left = _padded_cotangent(spec, c3, cd, threads, kw)
    w5 = w3.reshape(spec.c_out, kd, kh, kw, spec.c_in)
    wide_w = np.ascontiguousarray(w5.transpose(3, 0, 1, 2, 4), dtype=cd)
    wide_w = wide_w.reshape(kw * spec.c_out, kd * kh, spec.c_in)
    od, oh, width = padded.shape[1:4]
    return (padded, wide_w, (od, oh, width - kw + 1), _wide_offsets(spec, left),
            kw * spec.c_out, kd * kh)



def _wide_grad_weight(spec, x3, c3, gw, n_threads, cd, defer: list | None) -> None:
    """grad_weight by `grad_weight_wide_w`: per conv group, sums (kD * kH taps, C_in/g,
    columns) over a W-padded cotangent, columns k * C_out + co, then its own channels laid
    out as gw (C_out, taps, C_in/g)."""
    kd, kh, kw = spec.kernel
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    lanes, _ = native.layout(cd.itemsize)
    cols = -(-kw * spec.c_out // lanes) * lanes
    padded, left = _padded_cotangent(spec, c3, cd, n_threads, -(-cols // spec.c_out))
    taps = kd * kh
    part = native.aligned_empty((groups * taps * cig * cols,), cd)
    units = native.gw_units(taps, cols, cd.itemsize)
    workers = min(n_threads * (2 if defer is not None else 1), units)
    ranges = [(units * j // workers, units * (j + 1) // workers) for j in range(workers)]
    box = (0, spec.batch, 0, spec.in_spatial[0], 0, spec.in_spatial[1])
    per_group = []
    for g in range(groups):
        calls: list = []
        native.grad_weight(False, x3, g * cig, padded, 0, _wide_offsets(spec, left),
                           spec.stride, part, box, cin=cig, cout=cols, units=ranges,
                           zero=True, strides=(cols, cig * cols),
                           part_offset=g * taps * cig * cols, into=calls)
        per_group.append(calls)
    jobs = [native.Task(tuple(calls[j] for calls in per_group), keep=(part, padded))
            for j in range(workers)]

    def finish() -> None:
        sums = part.reshape(groups, taps, cig, cols)[..., :kw * spec.c_out]
        sums = sums.reshape(groups, taps, cig, kw, groups, cog)
        own = sums[np.arange(groups), :, :, :, np.arange(groups)]  # (G, taps, cig, kw, cog)
        gw.reshape(groups, cog, taps, kw, cig)[...] = own.transpose(0, 4, 1, 3, 2)

    _run_or_defer(jobs, n_threads, finish, defer)


def native_grad_weight_side(spec: ConvSpec, x3: np.ndarray, c3: np.ndarray,
                            cd: np.dtype, threads: int = 1) -> bool | int | None:
    """`grad_weight_side` for these arrays: whether the kernel reads them in place."""
    return grad_weight_side(spec, cd, threads, native.reads_in_place(x3, cd)
                            and native.reads_in_place(c3, cd), GW_IN_PLACE_BYTES)


def _native_grad_weight(spec, x3, c3, gw, n_threads, swapped: bool | int, cd,
                        defer: list | None = None) -> None:
    """grad_weight as one GEMM per tap reduced along the pixels, in registers (see
    csrc/correlate.hpp). Workers own disjoint (tap, column chunk) units over every pixel,
    so there is no partial sum to add and the bits do not depend on the thread count;
    swapped (vectors along C_in) the sums land in gw in place, otherwise in the packed
    layout, then unpacked. With too few units to share (a 1x1x1 kernel), workers own
    fixed tiles of input rows and one partial sum each, added in worker order (bitwise
    reproducible for a thread count). `defer`: append (jobs, finish) to it instead of
    running them, to share one queue with grad_input's tiles."""
    if swapped == native.GW_DEPTHWISE:
        _native_depthwise_grad_weight(spec, x3, c3, gw, n_threads, cd, defer)
        return
    if swapped == GW_WIDE:
        _wide_grad_weight(spec, x3, c3, gw, n_threads, cd, defer)
        return
    if swapped == GW_PADDED:
        _padded_grad_weight(spec, x3, c3, gw, n_threads, cd, defer)
        return
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    offsets = _tap_offsets(spec)
    ktot = math.prod(spec.kernel)
    rows, cols = (cog, cig) if swapped else (cig, cog)
    units = native.gw_units(ktot, cols, cd.itemsize)
    if n_threads == 1 or units >= 2 * n_threads:  # workers share out the units
        box = (0, spec.batch, 0, spec.in_spatial[0], 0, spec.in_spatial[1])
        # Sharing a queue with grad_input's tiles, two jobs per thread balance better.
        workers = min(n_threads * (2 if defer is not None else 1), units)
        bounds = [units * j // workers for j in range(workers + 1)]
        # Swapped, gw (C_out, taps, C_in/g) holds (tap, co, ci) at strides (taps * C_in/g,
        # C_in/g): the sums land in place. Otherwise in the packed layout, then unpacked.
        packed = None if swapped else native.aligned_empty((groups, ktot * rows * cols), cd)

        ranges = [(bounds[j], bounds[j + 1]) for j in range(workers)]
        per_group = []  # per conv group, one prepared call per worker's units
        for g in range(groups):
            target = (dict(part=gw, strides=(ktot * cig, cig),
                           part_offset=g * cog * ktot * cig) if swapped
                      else dict(part=packed[g]))
            calls: list = []
            native.grad_weight(swapped, x3, g * cig, c3, g * cog, offsets, spec.stride,
                               box=box, cin=cig, cout=cog, units=ranges, zero=True,
                               into=calls, **target)
            per_group.append(calls)

        def in_place(j):
            return native.Task(tuple(calls[j] for calls in per_group), keep=packed)

        def finish_units() -> None:
            if packed is not None:
                _unpack_grad_weight(gw, packed, ktot, rows, cols, swapped)

        _run_or_defer([in_place(j) for j in range(workers)], n_threads, finish_units, defer)
        return
    tiles = _grad_weight_row_tiles(spec, n_threads)
    workers = min(n_threads, len(tiles))
    parts = [native.aligned_zeros((groups, ktot * rows * cols), cd) for _ in range(workers)]

    def job_for(j):  # worker j's tiles, in order, into its own partial
        calls: list = []
        for tile in tiles[j::workers]:
            box = (*tile.n, *tile.d, *tile.h)
            for g in range(groups):
                native.grad_weight(swapped, x3, g * cig, c3, g * cog, offsets, spec.stride,
                                   parts[j][g], box, cig, cog, into=calls)
        return native.Task(tuple(calls))

    def finish_rows() -> None:
        _unpack_grad_weight(gw, _sum_in_order(parts), ktot, rows, cols, swapped)

    _run_or_defer([job_for(j) for j in range(workers)], n_threads, finish_rows, defer)


def _padded_grad_weight(spec, x3, c3, gw, n_threads, cd, defer: list | None) -> None:
    """grad_weight where neither C_in/g nor C_out/g is whole vectors (`GW_PADDED`): the
    kernel's swapped sums (vectors along C_in) over a copy of x whose groups' channels are
    padded with zeros to whole vectors, into a gw as padded; its own channels copied out.
    The copy is one pass over x; the GEMM paths it replaces ran such layers at a third of
    the kernel's rate (260 -> 24 g2 k4 d2)."""
    lanes, _ = native.layout(cd.itemsize)
    groups, cig = spec.groups, spec.c_in_per_group
    padded_cig = -(-cig // lanes) * lanes
    padded = dataclasses.replace(spec, c_in=groups * padded_cig)
    xp = native.aligned_zeros((*x3.shape[:-1], groups, padded_cig), cd)
    xp[..., :cig] = x3.reshape(*x3.shape[:-1], groups, cig)
    xp = xp.reshape(*x3.shape[:-1], groups * padded_cig)
    gwp = native.aligned_empty((spec.c_out, math.prod(spec.kernel), padded_cig), cd)
    queue: list = []
    _native_grad_weight(padded, xp, c3, gwp, n_threads, True, cd, queue)
    (jobs, finish), = queue

    def copy_out() -> None:
        finish()
        gw[...] = gwp[:, :, :cig]

    _run_or_defer([native.Task(job.calls, job.shared, job.once, (job.keep, xp, gwp))
                   for job in jobs], n_threads, copy_out, defer)


def _native_both(spec, x3, c3, w3, gx, gw, n_threads, cd) -> None:
    """Both gradients in one pass of the grad_weight kernel, where it sums few values per
    tap (a 16 -> 1 head): each cotangent value it loads feeds a grad_weight sum and a
    grad_input pixel (see csrc/correlate.hpp). Workers own fixed tiles of input rows (their
    grad_input rows) and one grad_weight sum each, worker 0's in gw itself, added in worker
    order: bitwise reproducible for a thread count."""
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    ktot = math.prod(spec.kernel)
    offsets = _tap_offsets(spec)
    weight = np.ascontiguousarray(w3, dtype=cd)  # laid out as gw: (C_out, taps, C_in/g)
    tiles = _grad_weight_row_tiles(spec, n_threads)
    workers = min(n_threads, len(tiles))
    parts = [gw] + [native.aligned_empty(gw.shape, cd) for _ in range(workers - 1)]

    def job_for(j):  # worker j's tiles, in order, into its own sums
        calls: list = []
        for i, tile in enumerate(tiles[j::workers]):
            for g in range(groups):
                native.grad_weight(True, x3, g * cig, c3, g * cog, offsets, spec.stride,
                                   parts[j], (*tile.n, *tile.d, *tile.h), cig, cog,
                                   zero=i == 0, strides=(ktot * cig, cig),
                                   part_offset=g * cog * ktot * cig, into=calls,
                                   grad_input=gx, grad_input_offset=g * cig, weight=weight)
        return native.Task(tuple(calls), keep=weight)

    run_jobs([job_for(j) for j in range(workers)], n_threads)
    _sum_in_order(parts)


def _native_depthwise_grad_weight(spec, x3, c3, gw, n_threads, cd,
                                  defer: list | None) -> None:
    """Depthwise grad_weight by the kernel: workers own fixed tiles of input rows and one
    (taps, C) partial each, added in worker order (bitwise reproducible for a thread
    count)."""
    ktot = math.prod(spec.kernel)
    tiles = _grad_weight_row_tiles(spec, n_threads)
    workers = min(n_threads, len(tiles))
    parts = [native.aligned_zeros((ktot, spec.c_out), cd) for _ in range(workers)]
    offsets = _tap_offsets(spec)

    def job_for(j):  # worker j's tiles, in order, into its own partial
        calls: list = []
        for tile in tiles[j::workers]:
            native.depthwise_grad_weight(x3, c3, offsets, spec.stride, parts[j],
                                         (*tile.n, *tile.d, *tile.h), into=calls)
        return native.Task(tuple(calls))

    def finish() -> None:
        gw[:, :, 0] = _sum_in_order(parts).T

    _run_or_defer([job_for(j) for j in range(workers)], n_threads, finish, defer)


def _run_or_defer(jobs: list, threads: int, finish: Callable[[], None],
                  defer: list | None) -> None:
    """Run the jobs, then `finish`; or leave both in `defer` for a shared queue."""
    if defer is not None:
        defer.append((jobs, finish))
        return
    run_jobs(jobs, threads)
    finish()


def _unpack_grad_weight(gw, packed, ktot: int, rows: int, cols: int, swapped: bool) -> None:
    """gw (C_out, taps, C_in/g) from each group's sums in the packed layout of (taps, rows,
    cols): (rows, cols) = (C_in/g, C_out/g), or (C_out/g, C_in/g) swapped."""
    cog = rows if swapped else cols
    for g in range(len(packed)):
        block = native.unpack(packed[g], ktot, rows, cols)  # (taps, rows, cols)
        block = block.transpose(1, 0, 2) if swapped else block.transpose(2, 0, 1)
        gw[g * cog:(g + 1) * cog] = block  # (C_out/g, taps, C_in/g)


def _rows(tile: Tile, spec: ConvSpec) -> int:
    return ((tile.n[1] - tile.n[0]) * (tile.d[1] - tile.d[0]) * (tile.h[1] - tile.h[0])
            * spec.in_spatial[2])


def _tiles(spec: ConvSpec, max_rows: int, min_tiles: int) -> list[Tile]:
    return split_tiles(spec.batch, spec.in_spatial, max(spec.in_spatial[2], max_rows),
                       min_tiles)


def _grad_weight_row_tiles(spec: ConvSpec, n_threads: int) -> list[Tile]:
    """Tiles of about 4096 input pixels (whole rows) for grad_weight's per-worker partials."""
    return _tiles(spec, max(1, 4096 // max(1, spec.in_spatial[2])) * spec.in_spatial[2],
                  n_threads)


def _sum_in_order(parts: list[np.ndarray]) -> np.ndarray:
    total = parts[0]
    for part in parts[1:]:
        total += part  # a fixed order: reproducible sums
    return total


def _gather(spec, taps, x3, c3, w3, gx, gw, n_threads, budget, cd) -> None:
    """Gathered cotangent blocks -> GEMMs, one pass for both gradients.

    Workers own disjoint row tiles (so grad_input needs no locks) and one grad_weight
    partial sum each. A block holds every tap when that still leaves enough rows for
    efficient GEMMs; otherwise the taps are cut into chunks, processed chunk by chunk
    over the worker's rows: grad_input then adds the chunks up (cheap next to the GEMMs)
    and the chunk's slice of the grad_weight partial stays in cache while it is summed."""
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    ntap = len(taps)
    idx = [t.index for t in taps]
    total_rows = spec.batch * math.prod(spec.in_spatial)
    want_rows = min(MIN_BLOCK_ROWS, -(-total_rows // n_threads))
    if budget // (ntap * spec.c_out) >= want_rows:
        chunk = ntap
        max_rows = budget // (ntap * spec.c_out)
    else:
        chunk = max(1, budget // (want_rows * spec.c_out))
        chunk = -(-ntap // -(-ntap // chunk))  # even chunks
        max_rows = budget // (chunk * spec.c_out)
    chunks = [(c0, min(ntap, c0 + chunk)) for c0 in range(0, ntap, chunk)]
    tiles = _tiles(spec, max_rows, n_threads)
    workers = min(n_threads, len(tiles))
    wg = None
    if gx is not None:
        # (G, T * C_out/g, C_in/g): the active taps stacked as the grad_input GEMM operand.
        wg = w3[:, idx, :].reshape(groups, cog, ntap, cig).transpose(0, 2, 1, 3)
        wg = np.ascontiguousarray(wg.reshape(groups, ntap * cog, cig), dtype=cd)
    parts = [np.zeros((groups, ntap * cog, cig), cd) if gw is not None else None
             for _ in range(workers)]

    def job_for(j):
        def job():
            my_tiles = tiles[j::workers]
            rows = max(_rows(t, spec) for t in my_tiles)
            col = np.empty(rows * chunk * spec.c_out, cd)
            gx_tmp = np.empty(rows * spec.c_in, cd) if gx is not None else None
            gw_tmp = np.empty(groups * chunk * cog * cig, cd) if gw is not None else None
            for c0, c1 in chunks:
                wg_c = wg[:, c0 * cog:c1 * cog] if wg is not None else None
                for i, tile in enumerate(my_tiles):
                    checkpoint()
                    mat = _gather_block(spec, taps[c0:c1], tile, c3, col)
                    if gx is not None:
                        _grad_input_tile(spec, tile, mat, wg_c, gx, cd, c0 > 0, gx_tmp)
                    if gw is not None:
                        part = parts[j][:, c0 * cog:c1 * cog]
                        _grad_weight_tile(spec, tile, mat, x3, part, gw_tmp, i == 0, cd)
        return job

    run_jobs([job_for(j) for j in range(workers)], workers)
    if gw is not None:
        # (G, T * C_out/g, C_in/g) -> (C_out, T, C_in/g)
        total = _sum_in_order(parts)
        blocks = total.reshape(groups, ntap, cog, cig).transpose(0, 2, 1, 3)
        gw[:, idx, :] = blocks.reshape(spec.c_out, ntap, cig)


def _gather_block(spec, taps, tile, c3, col) -> np.ndarray:
    """(G, rows, len(taps) * C_out/g): for each input row of the tile, the cotangent rows
    its taps meet (zero where a tap lands outside the output).

    With one output channel per group, a row-major block would be written one scattered
    element at a time; the block is then stored tap-major (a transposed view is returned,
    which BLAS reads as well)."""
    groups, cog = spec.groups, spec.c_out_per_group
    n0, n1 = tile.n
    nw = spec.in_spatial[2]
    nn, nd, nh = n1 - n0, tile.d[1] - tile.d[0], tile.h[1] - tile.h[0]
    rows = nn * nd * nh * nw
    ntap = len(taps)
    tap_major = cog == 1
    if tap_major:
        block = col[:rows * ntap * spec.c_out].reshape(groups, ntap, nn, nd, nh, nw, 1)
    else:
        block = col[:rows * ntap * spec.c_out].reshape(groups, nn, nd, nh, nw, ntap, cog)
    for t, tap in enumerate(taps):
        dst = block[:, t] if tap_major else block[:, :, :, :, :, t, :]
        found = _tap_box(spec, tap, tile)
        if found is None:
            dst.fill(0)
            continue
        box, rel = found
        if rel != ((0, nd), (0, nh), (0, nw)):
            _zero_outside(dst, rel)
        (a0, a1), (b0, b1), (c0, c1) = rel
        src = _cot_rows(spec, tap, box, tile.n, c3)
        if groups == 1:
            dst[0, :, a0:a1, b0:b1, c0:c1, :] = src
        else:
            src = src.reshape(*src.shape[:-1], groups, cog)
            dst[:, :, a0:a1, b0:b1, c0:c1, :] = np.moveaxis(src, -2, 0)
    if tap_major:
        return block.reshape(groups, ntap, rows).transpose(0, 2, 1)
    return block.reshape(groups, rows, ntap * cog)


def _grad_input_tile(spec, tile, mat, wg, gx, cd, accumulate, tmp) -> None:
    """grad_input tile (=, or += for later tap chunks) block @ W_stacked."""
    groups, cig = spec.groups, spec.c_in_per_group
    rows = mat.shape[1]
    n0, n1 = tile.n
    # The tile is a contiguous block of gx (whole along W, and along H when D is split).
    target = gx[n0:n1, tile.d[0]:tile.d[1], tile.h[0]:tile.h[1]].reshape(rows, groups, cig)
    if groups == 1 and not accumulate:
        np.matmul(mat[0], wg[0], out=target[:, 0, :])
        return
    res = tmp[:rows * spec.c_in].reshape(groups, rows, cig)
    np.matmul(mat, wg, out=res)
    if accumulate:
        target += np.moveaxis(res, 0, 1)
    else:
        target[...] = np.moveaxis(res, 0, 1)


def _grad_weight_tile(spec, tile, mat, x3, part, tmp, first, cd) -> None:
    """part (G, T * C_out/g, C_in/g) (=, or +=) block^T @ x_tile."""
    groups, cig = spec.groups, spec.c_in_per_group
    rows = mat.shape[1]
    n0, n1 = tile.n
    xt = x3[n0:n1, tile.d[0]:tile.d[1], tile.h[0]:tile.h[1]].reshape(rows, groups, cig)
    xt = xt.astype(cd, copy=False).transpose(1, 0, 2)  # (G, rows, C_in/g)
    # block^T @ x rather than x^T @ block: the same numbers, transposed, but with the long
    # (taps * C_out) side as BLAS's M it ran about twice as fast here.
    mat_t = mat.transpose(0, 2, 1)  # a BLAS-ready transposed view
    if first:
        np.matmul(mat_t, xt, out=part)
    else:
        res = tmp[:part.size].reshape(part.shape)
        np.matmul(mat_t, xt, out=res)
        part += res



def _shift(spec, taps, x3, c3, w3, gx, gw, n_threads, budget, cd) -> None:
    """Shifted GEMMs over a gathered grid (the cotangent rows of one (D, H) stride phase,
    W taps side by side): each (D, H) tap of the phase reads the grid at a fixed row
    shift, so the copy is len(W taps) wide instead of len(taps). grad_input adds up one
    GEMM per (D, H) tap (in cache-sized tiles); grad_weight gets one GEMM per (D, H) tap
    against the input laid out on the grid's row pitch (zeros where the grid has halo)."""
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    layout = shift_layout(spec)
    tw, npair = len(layout.wtaps), len(layout.pairs)
    kd_, kh_, kw_ = spec.kernel
    tiles = _tiles(spec, shift_rows(spec, layout, budget), n_threads)
    workers = min(n_threads, len(tiles))
    # (G, pairs, T_w * C_out/g, C_in/g): the grad_input weights of each (D, H) tap.
    flat = [[(kd * kh_ + kh) * kw_ + k for k, _, _, _ in layout.wtaps]
            for kd, kh in layout.pairs]
    wp = None
    if gx is not None:
        wp = w3[:, np.array(flat).ravel(), :].reshape(groups, cog, npair, tw, cig)
        wp = np.ascontiguousarray(wp.transpose(0, 2, 3, 1, 4).reshape(
            groups, npair, tw * cog, cig), dtype=cd)
    parts = [np.zeros((groups, npair, tw * cog, cig), cd) if gw is not None else None
             for _ in range(workers)]
    halo_d, halo_h = layout.halo
    nw = spec.in_spatial[2]

    def grid_rows(tile):
        nn, nd, nh = tile.n[1] - tile.n[0], tile.d[1] - tile.d[0], tile.h[1] - tile.h[0]
        return nn * (nd + halo_d) * (nh + halo_h) * nw

    def job_for(j):
        def job():
            my_tiles = tiles[j::workers]
            most = max(grid_rows(t) for t in my_tiles)
            gbuf = np.empty(most * tw * spec.c_out, cd)
            acc = np.empty(most * spec.c_in, cd) if gx is not None else None
            tmp = np.empty(most * spec.c_in, cd) if gx is not None else None
            xbuf = np.empty(most * spec.c_in, cd) if gw is not None else None
            wtmp = np.empty(groups * tw * cog * cig, cd) if gw is not None else None
            for i, tile in enumerate(my_tiles):
                checkpoint()
                _shift_tile(spec, layout, tile, x3, c3, wp, gx, parts[j], i == 0,
                            (gbuf, acc, tmp, xbuf, wtmp))
        return job

    run_jobs([job_for(j) for j in range(workers)], workers)
    if gw is not None:
        total = _sum_in_order(parts).reshape(groups, npair, tw, cog, cig)
        blocks = total.transpose(0, 3, 1, 2, 4).reshape(spec.c_out, npair * tw, cig)
        gw[:, np.array(flat).ravel(), :] = blocks


def _shift_tile(spec, layout, tile, x3, c3, wp, gx, part, first, bufs) -> None:
    gbuf, accbuf, tmpbuf, xbuf, wtmp = bufs
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    tw = len(layout.wtaps)
    n0, n1 = tile.n
    d0, d1 = tile.d
    h0, h1 = tile.h
    nn, nd, nh, nw = n1 - n0, d1 - d0, h1 - h0, spec.in_spatial[2]
    dn, hn = nd + layout.halo[0], nh + layout.halo[1]
    plane = hn * nw
    rows = nn * dn * plane
    # Grid rows whose results are kept: (b, a < nd, c < nh, w) -> ((b*dn + a)*hn + c)*nw + w.
    length = ((nn - 1) * dn + nd - 1) * plane + nh * nw
    sd, sh, sw = spec.stride
    grid = gbuf[:rows * tw * spec.c_out].reshape(groups, nn, dn, hn, nw, tw, cog)
    gmat = grid.reshape(groups, rows, tw * cog)
    acc = tmp = xg = None
    if gx is not None:
        acc = accbuf[:rows * spec.c_in].reshape(groups, rows, cig)
        tmp = tmpbuf[:rows * spec.c_in].reshape(groups, rows, cig)
    if part is not None:
        xgrid = xbuf[:rows * spec.c_in].reshape(nn, dn, hn, nw, spec.c_in)
        xgrid[:, :nd, :nh] = x3[n0:n1, d0:d1, h0:h1]
        xgrid[:, nd:] = 0
        xgrid[:, :nd, nh:] = 0
        xg = xgrid.reshape(rows, groups, cig)[:length].transpose(1, 0, 2)  # (G, len, C_in/g)
        wres = wtmp.reshape(groups, tw * cog, cig)
    started = False
    for (rd, rh), cmin_d, cmin_h, members in layout.phases:
        # The grid covers cotangent phase rows q = (d0 + cmin_d) + [0, dn) (and along H).
        qd0, qh0 = d0 + cmin_d, h0 + cmin_h
        vd = (max(qd0, 0), min(qd0 + dn, layout.counts[0][rd]))
        vh = (max(qh0, 0), min(qh0 + hn, layout.counts[1][rh]))
        for t, (_, shift_w, lo, hi) in enumerate(layout.wtaps):
            dst = grid[:, :, :, :, :, t, :]
            rel = ((vd[0] - qd0, vd[1] - qd0), (vh[0] - qh0, vh[1] - qh0), (lo, hi))
            if any(a >= b for a, b in rel):
                dst.fill(0)
                continue
            if rel != ((0, dn), (0, hn), (0, nw)):
                _zero_outside(dst, rel)
            src = c3[n0:n1, vd[0] * sd + rd:(vd[1] - 1) * sd + rd + 1:sd,
                     vh[0] * sh + rh:(vh[1] - 1) * sh + rh + 1:sh,
                     lo * sw + shift_w:(hi - 1) * sw + shift_w + 1:sw, :]
            (a0, a1), (b0, b1), _ = rel
            if groups == 1:
                dst[0, :, a0:a1, b0:b1, lo:hi, :] = src
            else:
                src = src.reshape(*src.shape[:-1], groups, cog)
                dst[:, :, a0:a1, b0:b1, lo:hi, :] = np.moveaxis(src, -2, 0)
        for pair, cd_, ch_ in members:
            shift = ((cd_ - cmin_d) * hn + (ch_ - cmin_h)) * nw
            a = gmat[:, shift:shift + length]
            if acc is not None:
                if not started:
                    np.matmul(a, wp[:, pair], out=acc[:, :length])
                else:
                    np.matmul(a, wp[:, pair], out=tmp[:, :length])
                    acc[:, :length] += tmp[:, :length]
            if part is not None:
                if first:
                    np.matmul(a.transpose(0, 2, 1), xg, out=part[:, pair])
                else:
                    np.matmul(a.transpose(0, 2, 1), xg, out=wres)
                    part[:, pair] += wres
            started = True
    if gx is not None:
        res = acc.reshape(groups, nn, dn, hn, nw, cig)[:, :, :nd, :nh]
        target = gx[n0:n1, d0:d1, h0:h1]
        if groups == 1:
            target[...] = res[0]
        else:
            target.reshape(nn, nd, nh, nw, groups, cig)[...] = np.moveaxis(res, 0, -2)


def _direct(spec, taps, x3, c3, w3, gx, gw, n_threads, budget, cd) -> None:
    """Depthwise: tiles of rows, each worker with its own (taps, C_out) partial."""
    ntap = len(taps)
    tiles = _tiles(spec, budget // (2 * spec.c_out), n_threads)
    workers = min(n_threads, len(tiles))
    parts = [np.zeros((ntap, spec.c_out), cd) if gw is not None else None
             for _ in range(workers)]
    wt = np.ascontiguousarray(w3[:, [t.index for t in taps], 0].T.astype(cd))  # (T, C_out)

    def job_for(j):
        def job():
            buf = np.empty(2 * max(_rows(t, spec) for t in tiles) * spec.c_out, cd)
            for tile in tiles[j::workers]:
                checkpoint()
                _direct_tile(spec, taps, tile, x3, c3, wt, gx, parts[j], buf)
        return job

    run_jobs([job_for(j) for j in range(workers)], workers)
    if gw is not None:
        gw[:, [t.index for t in taps], 0] = _sum_in_order(parts).T


def _direct_tile(spec, taps, tile, x3, c3, wt, gx, part, buf) -> None:
    """C_in/g == 1: each tap is a broadcast multiply-add over channels."""
    groups, cog = spec.groups, spec.c_out_per_group
    n0, n1 = tile.n
    d0, d1 = tile.d
    h0, h1 = tile.h
    nw = spec.in_spatial[2]
    nn, nd, nh = n1 - n0, d1 - d0, h1 - h0
    size = nn * nd * nh * nw * spec.c_out
    tmp_all = buf[:size].reshape(nn, nd, nh, nw, groups, cog)
    acc = None
    if gx is not None:
        acc = buf[size:size + size // cog].reshape(nn, nd, nh, nw, groups)
        acc.fill(0)
    xt = x3[n0:n1, d0:d1, h0:h1].reshape(nn, nd, nh, nw, groups, 1)
    # einsum's one-pass sum of products is about 3x faster than multiply-then-sum here;
    # it needs operands already in the compute dtype.
    fused = c3.dtype == tmp_all.dtype and x3.dtype == tmp_all.dtype
    for t, tap in enumerate(taps):
        found = _tap_box(spec, tap, tile)
        if found is None:
            continue
        box, ((a0, a1), (b0, b1), (c0, c1)) = found
        src = _cot_rows(spec, tap, box, tile.n, c3)
        src = src.reshape(*src.shape[:-1], groups, cog)
        tmp = tmp_all[:, a0:a1, b0:b1, c0:c1]
        if acc is not None:
            np.multiply(src, wt[t].reshape(groups, cog), out=tmp)
            if cog == 1:
                acc[:, a0:a1, b0:b1, c0:c1] += tmp[..., 0]
            else:
                acc[:, a0:a1, b0:b1, c0:c1] += tmp.sum(axis=-1)
        if part is not None and fused:
            part[t] += np.einsum("ndhwgm,ndhwg->gm", src,
                                 xt[:, a0:a1, b0:b1, c0:c1, :, 0]).reshape(spec.c_out)
        elif part is not None:
            np.multiply(src, xt[:, a0:a1, b0:b1, c0:c1], out=tmp)
            part[t] += tmp.sum(axis=(0, 1, 2, 3)).reshape(spec.c_out)
    if acc is not None:
        gx[n0:n1, d0:d1, h0:h1] = acc


@functools.lru_cache(maxsize=64)
def _product_targets(spec: ConvSpec) -> np.ndarray:
    return product_targets(spec)  # the same small call repeats: built once per layer


def _indexed(spec, taps, x3, c3, w3, gx, gw, n_threads, budget, cd) -> None:
    """The forward's ``indexed`` algorithm, differentiated: products[(r, t)] = x[r] @
    W[:, t]^T are each added into one output row or none, so their cotangent is the
    cotangent's rows gathered (a zero row for none); then grad_input = that @ W stacked
    over (tap, C_out) and grad_weight = its transpose @ x, per group."""
    groups, cig, cog = spec.groups, spec.c_in_per_group, spec.c_out_per_group
    ktot = math.prod(spec.kernel)
    rows_in = x3.size // spec.c_in
    rows_out = c3.size // spec.c_out
    padded = np.empty((rows_out + 1, spec.c_out), cd)
    padded[:rows_out] = c3.reshape(rows_out, spec.c_out)
    padded[rows_out] = 0
    dprod = np.take(padded, _product_targets(spec), axis=0)  # (rows_in * taps, C_out)
    dprod = dprod.reshape(rows_in, ktot, groups, cog).transpose(2, 0, 1, 3).reshape(
        groups, rows_in, ktot * cog)
    if gx is not None:
        wg = w3.astype(cd, copy=False).reshape(groups, cog, ktot, cig).transpose(0, 2, 1, 3)
        gxg = np.matmul(dprod, wg.reshape(groups, ktot * cog, cig))  # (G, rows_in, C_in/g)
        gx.reshape(rows_in, groups, cig)[...] = gxg.transpose(1, 0, 2)
    if gw is not None:
        xg = x3.reshape(rows_in, groups, cig).astype(cd, copy=False).transpose(1, 0, 2)
        gwg = np.matmul(dprod.transpose(0, 2, 1), xg)  # (G, taps * C_out/g, C_in/g)
        gw.reshape(groups, cog, ktot, cig)[...] = gwg.reshape(
            groups, ktot, cog, cig).transpose(0, 2, 1, 3)


# The NumPy/BLAS paths by name (`_vjp_plan.GEMM_ALGORITHMS`).
_GEMM_PATHS = {"gather": _gather, "shift": _shift, "direct": _direct, "indexed": _indexed}


def _vjp(ndim: int, input: ArrayLike, weight: ArrayLike, cotangent: ArrayLike,
         stride: IntOrTuple, padding: Padding, dilation: IntOrTuple,
         output_padding: IntOrTuple, groups: int, bias: ArrayLike | None = None,
         output_size: IntOrTuple | None = None) -> tuple[np.ndarray, ...]:
    op = _NAMES[ndim]
    key = RecentCalls.key(ndim, input, weight, stride, padding, dilation, output_padding,
                          groups)
    if key is not None and output_size is not None:
        key = key + (output_size,) if _plain_ints(output_size) else None
    spec = _recent_specs.get(key)
    if spec is not None:
        x, w = input, weight
    else:
        spec, x, w = spec_for(ndim, input, weight, stride, padding, dilation, output_padding,
                              groups, op=op, output_size=output_size, allow_unbatched=True)
        _recent_specs.put(key, spec, input, x, weight, w)
    b = check_bias(op, bias, spec)
    alone = unbatched(spec, x)
    cot = check_cotangent(op, spec, cotangent, alone)
    gx, gw = vjp_arrays(spec, x, w, cot)
    if alone:
        gx = gx[0]
    if b is None:
        return gx, gw
    # The bias's gradient: the cotangent summed over every position (the compute dtype).
    cd = compute_dtype(result_dtype(cot.dtype, b.dtype))
    gb = np.add.reduce(cot.reshape(-1, spec.c_out), axis=0, dtype=cd)
    return gx, gw, gb.astype(b.dtype, copy=False)


_recent_specs = RecentCalls()

_VJP_DOC = """Gradients of `conv_transpose{n}d` for a cotangent shaped like its output.

    The vector-Jacobian product that ``mx.vjp`` and PyTorch autograd give.

    Parameters
    ----------
    input : array_like
        {xshape}, or without the batch axis (then so are the cotangent and grad_input).
    weight : array_like
        {wshape}.
    cotangent : array_like
        {yshape}: the forward output's shape.
    stride, padding, dilation, output_padding, groups
        As for `conv_transpose{n}d` (padding may be (lo, hi) pairs, "same" or "valid").
    bias : array_like of shape (C_out,), optional, keyword-only
        The forward's bias. Given, the result also holds grad_bias (the cotangent summed
        over the batch and every position), in bias's dtype.
    output_size : int or tuple of {n} ints, optional, keyword-only
        As for `conv_transpose{n}d`.

    Returns
    -------
    (grad_input, grad_weight) or (grad_input, grad_weight, grad_bias)
        numpy.ndarrays with the shapes and dtypes of input, weight (and bias). Accumulated
        in float32 at least (float64 if any array is float64).

    Raises
    ------
    TypeError, ValueError
        As the forward call; also a cotangent not shaped like its output.

    Examples
    --------
    >>> import numpy as np, convtranspose as ct
    >>> x = np.ones({xex}, np.float32)
    >>> w = np.ones({wex}, np.float32)
    >>> g = np.ones({yex}, np.float32)
    >>> gx, gw, gb = ct.conv_transpose{n}d_vjp(x, w, g, stride=2, bias=np.zeros(4, np.float32))
    >>> gx.shape, gw.shape, gb.shape
    ({xex}, {wex}, (4,))
    """


def _vjp_doc(ndim: int) -> str:
    spatial = {1: "W", 2: "H, W", 3: "D, H, W"}[ndim]
    kernel = {1: "kW", 2: "kH, kW", 3: "kD, kH, kW"}[ndim]
    out = {1: "W_out", 2: "H_out, W_out", 3: "D_out, H_out, W_out"}[ndim]
    return _VJP_DOC.format(
        n=ndim, xshape=f"(N, {spatial}, C_in)", wshape=f"(C_out, {kernel}, C_in/groups)",
        yshape=f"(N, {out}, C_out)", xex=(1, *(5,) * ndim, 3), wex=(4, *(3,) * ndim, 3),
        yex=(1, *(11,) * ndim, 4))


def conv_transpose1d_vjp(input: ArrayLike, weight: ArrayLike, cotangent: ArrayLike, /,
                         stride: IntOrTuple = 1, padding: Padding = 0,
                         dilation: IntOrTuple = 1, output_padding: IntOrTuple = 0,
                         groups: int = 1, *, bias: ArrayLike | None = None,
                         output_size: IntOrTuple | None = None) -> tuple[np.ndarray, ...]:
    return _vjp(1, input, weight, cotangent, stride, padding, dilation, output_padding,
                groups, bias, output_size)


def conv_transpose2d_vjp(input: ArrayLike, weight: ArrayLike, cotangent: ArrayLike, /,
                         stride: IntOrTuple = 1, padding: Padding = 0,
                         dilation: IntOrTuple = 1, output_padding: IntOrTuple = 0,
                         groups: int = 1, *, bias: ArrayLike | None = None,
                         output_size: IntOrTuple | None = None) -> tuple[np.ndarray, ...]:
    return _vjp(2, input, weight, cotangent, stride, padding, dilation, output_padding,
                groups, bias, output_size)


def conv_transpose3d_vjp(input: ArrayLike, weight: ArrayLike, cotangent: ArrayLike, /,
                         stride: IntOrTuple = 1, padding: Padding = 0,
                         dilation: IntOrTuple = 1, output_padding: IntOrTuple = 0,
                         groups: int = 1, *, bias: ArrayLike | None = None,
                         output_size: IntOrTuple | None = None) -> tuple[np.ndarray, ...]:
    return _vjp(3, input, weight, cotangent, stride, padding, dilation, output_padding,
                groups, bias, output_size)


conv_transpose1d_vjp.__doc__ = _vjp_doc(1)
conv_transpose2d_vjp.__doc__ = _vjp_doc(2)
conv_transpose3d_vjp.__doc__ = _vjp_doc(3)
