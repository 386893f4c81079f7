"""Gradients of the transposed convolution, the vector-Jacobian product (VJP): the front
doors (`conv_transpose{1,2,3}d_vjp`, `vjp_arrays`) and the plan.

For y = conv_transpose(x, W) and a cotangent g shaped like y, per axis and per pair
(input position i, tap k) that lands inside the output at o = i*s + k*d - p:

    grad_input[n, i, ci]   = sum_{k, co} g[n, i*s + k*d - p, co] * W[co, k, ci]
    grad_weight[co, k, ci] = sum_{n, i}  x[n, i, ci] * g[n, i*s + k*d - p, co]

Both read the same cotangent rows: input position i meets, through tap k, cotangent row
i*s + k*d - p. So the work is organised over *input* positions (a strided correlation of
the cotangent, no zero-stuffing). The paths that compute it:

- `_vjp_numpy`: NumPy/BLAS (``gather``, ``shift``, ``direct``, ``indexed``), both
  gradients from one copy of the cotangent rows;
- `_vjp_native`: the compiled kernel, grad_input as a correlation of the cotangent with
  the weight (taps transposed; ``native``, or ``winograd`` pairs along D), grad_weight in
  registers, or both in one pass where grad_weight sums few values per tap.

The plan: `make_vjp_plan` chooses, once per call and before any work, the path of each
gradient (a frozen, printable `VjpPlan`: ``print(convtranspose.vjp_plan(...))``), from the
spec, the dtypes, the gradients asked for, threads, workspace and whether the kernel can
read the arrays where they lie; `run_vjp_plan` runs it and revises nothing. A channel
multiplier (`expands_to_depthwise`) runs as the depthwise layer it expands to, whose plan
its plan holds. Tiles are bounded by the same workspace rule as the forward
(`_plan.workspace_limit`).
"""

import dataclasses
import functools
import math

import numpy as np

from . import _dtypes
from . import _native_kernel as native
from . import _vjp_native as native_paths
from . import _vjp_numpy as numpy_paths
from ._algorithms import VjpAlgorithm
from ._api import ArrayLike, IntOrTuple, Padding, RecentCalls, _plain_ints, spec_for, unbatched
from ._dtypes import result_dtype
from ._execute import repeat_channels, run_jobs, sum_repeats
from ._geometry import ceil_div
from ._memory import result_empty, result_zeros
from ._native_kernel import GradWeightLayout
from ._plan import (
    COPY_BYTES_PER_S,
    ELEMENTWISE_PER_S,
    FUSE_W_BELOW_CHANNELS,
    GEMM_ALGORITHMS,
    NATIVE_PEAK_PER_LANE,
    PAIR_TRANSFORM_BYTES_PER_S,
    VJP_ALGORITHMS,
    GradStep,
    VjpPlan,
    _gemm_rate,
    avx2_build,
    expands_to_depthwise,
    get_num_threads,
    get_winograd,
    indexed_fits,
    native_mode,
    native_rate,
    per_input_channel_weight,
    winograd_axis_fits,
    workspace_limit,
)
from ._spec import VJP_NAMES as _NAMES
from ._spec import ConvSpec, as_float_array, check_bias
from ._vjp_native import grad_input_kernel_spec
from ._vjp_numpy import active_taps, shift_layout, shift_rows

# --- the plan: which path computes each gradient, chosen before any work ----------------

# A worker's gathered block stays about this size, so that it is still in cache when the
# GEMMs read it back.
VJP_TILE_BYTES = 4 * 2**20


def native_grad_input_suits(spec: ConvSpec, need_weight: bool = False) -> bool:
    """The compiled kernel for grad_input where its rate beats a GEMM's: its output
    channels are C_in/g and it reduces over C_out/g (the forward's roles swapped).

    When grad_weight is wanted too, the GEMM paths share one gathered block between both
    gradients, and taking grad_input out of them saves little: measured on W1-W8, the
    split won only at stride 1 (W5: 37 -> 32 ms); at stride 2 it lost up to 15% (W2)."""
    if not native.AVAILABLE:
        return False
    return _native_grad_input_suits(spec, need_weight)


@functools.lru_cache(maxsize=256)  # a layer asks at every call: ~8 us of modelling
def _native_grad_input_suits(spec: ConvSpec, need_weight: bool) -> bool:
    if spec.c_in_per_group == 1 and spec.c_out_per_group == 1:  # depthwise, against the
        return True  # direct path's NumPy multiply-adds: W7's grad_input 38 -> 12 ms
    swapped = grad_input_kernel_spec(spec)
    mode = native_mode(swapped, weight_in_place=False)
    if need_weight and math.prod(spec.stride) > 1:
        return False
    # 20 GFLOP/s modelled is where the GEMM paths stop winning: measured, W6's grad_input
    # (C_out = 1, modelled 32) takes 2.5 ms here against 4.4 ms through a GEMM.
    # (Modelled at AVX-512's 16 float32 lanes: the bar scales with the vectors, as the
    # GEMM paths' rate does.)
    lanes = native.layout(4)[0]
    return (mode in (native.CHANNELS, native.DOT)
            and native_rate(swapped, weight_in_place=False) >= 20e9 * lanes / 16)


def grad_input_takes_pairs(spec: ConvSpec, compute_dtype: np.dtype, limit: int, winograd: bool,
                           cotangent_in_place: bool) -> bool:
    """Whether grad_input can take Winograd F(2,3) along D (as the forward's 'winograd';
    the plan takes it where its model is the cheaper):
    `winograd_axis_fits` with grad_input's D planes as outputs and C_out/g channels
    reduced over, a cotangent read in place, and its transform V (2x the cotangent's D
    planes a pair reads) within the workspace limit. `winograd`: `get_winograd()`."""
    if (not winograd
            or not winograd_axis_fits(spec, spec.in_spatial[0], spec.c_out_per_group)
            or native_mode(dataclasses.replace(spec, c_in=spec.c_out, c_out=spec.c_in),
                           weight_in_place=False) != native.CHANNELS or not cotangent_in_place):
        return False
    return grad_input_pair_bytes(spec, compute_dtype) <= limit


def grad_input_pair_bytes(spec: ConvSpec, compute_dtype: np.dtype) -> int:
    """Size of grad_input's transformed cotangent V (N, pairs, 4, H_out, W_out, C_out)."""
    winograd_pairs = ceil_div(spec.in_spatial[0], 2)
    return (spec.batch * winograd_pairs * 4 * spec.out_spatial[1] * spec.out_spatial[2] * spec.c_out
            * compute_dtype.itemsize)


def grad_weight_wide_w(spec: ConvSpec, compute_dtype: np.dtype) -> bool:
    """Whether grad_weight sums every W tap at once: with dilation 1 along W, input pixel
    i meets one run of kW * C_out cotangent values, so a (D, H) tap's sums over the pixels
    are one product of x's C_in/g by that run (rounded up to whole vectors, the extra
    columns dropped) where per tap C_out/g alone would fill part of a vector. With groups
    the run holds every group's channels: each group's product computes them all and
    keeps its own (work times the groups, so up to four). Workers share out its (tap,
    column chunk) units, or with too few of them row tiles, a partial sum each."""
    few = spec.c_out < FUSE_W_BELOW_CHANNELS if spec.groups == 1 else spec.groups <= 4
    return few and spec.dilation[2] == 1 and spec.kernel[2] > 1


# From this grad_weight size on, the sums go straight into it (vectors along C_in) rather
# than through a packed buffer that is then unpacked: measured, W3's 8 MiB grad_weight
# 51 -> 36 ms; below it vectors along C_out are faster (W2 45 against 57 ms, W5 12.9
# against 14.3, W8 21 against 25, W4 31 against 33 with a 1.7 MiB grad_weight).
GW_IN_PLACE_BYTES = 4 << 20
# What summing along C_in costs beyond summing along C_out, as a share of the sums (from
# the same measurements). On few pixels the unpack costs more: 64 -> 32 k6 on 3x4x4x4
# spent 13% of its 2.9 ms in it.
ALONG_IN_EXTRA = 0.2
# How much faster ALONG_IN's model must be than WIDE's where C_in/g is not whole vectors
# (see `_wide_or_along_in`; its model counts the lanes it fills, not its loads, and
# flatters it).
ALONG_IN_OVER_WIDE = 1.3
# Layout PLANAR's rate as a share of the kernel's peak (the rows padded to whole vectors
# aside): one core, 8 -> 4 g2 k7 on rows of 879 pixels ran at 0.95, 3 -> 1 k4x2 s2 on 912
# at 0.46, 8 -> 3 k3 s2 on 74 at 0.36.
PLANAR_EFFICIENCY = 0.6
# Layout PLANAR's channels per group, on either side, at most (see `planar_suits`); 0
# turns it off (tests of the other layouts do).
PLANAR_MAX_CHANNELS = 8
# Whether grouped layers of few channels may run every group side by side in one pass
# (`_vjp_native.groups_side_by_side`); False turns it off (tests of the per-group paths do).
GROUPS_SIDE_BY_SIDE = True
# The side-by-side pass's rate as a share of the kernel's peak on the lanes it fills: each
# vector of cotangent values is a permute, on the port of one of the two multiply-adds.
# Both gradients of 68 sweep layers in its domain (seeds 11-55) took 1.27-2.14x (10th to
# 90th percentile, median 1.7) the time modelled at the full rate.
SIDE_BY_SIDE_EFFICIENCY = 0.6


def planar_suits(spec: ConvSpec, compute_dtype: np.dtype, max_channels: int,
                 limit: int | None) -> bool:
    """Layout PLANAR's domain: at most 8 channels a group on both sides, rows of at least 16
    pixels that fill 3/4 of their vectors, and at least 16 of them (jobs for the threads).
    Over 89 sweep layers that no channel layout fits whole, grad_weight alone, two threads,
    against the layout the models chose: inside it, planar took 0.09-0.96x the time on 20
    of 23 (8 -> 4 g2 k7 on 643x879: 60 -> 5.5 ms; 3 -> 1 k4x2 s2 on 783x912: 13.9 -> 3.3)
    and 1.05-1.20x on 3; outside it, it lost on 55 of 66 (wide channels, rows of 4-15
    pixels, 1-D rows of 10^5: up to 60x) and won on 11, left to a later rule. Up to 4
    groups (as measured), and not depthwise: vectors along the channels serve those (64
    -> 64 g64 k3: 1.6 ms against 14.8 over planar rows, a job per group). Nor where the
    stride is 3 or more along H and W and each W residue meets one W tap at most: the
    planar cotangent, split by W residue, holds s_h * s_w times the input's pixels, each
    value met by few taps, and the copy costs more than the products (both gradients,
    in-process alternating, two runs: 8 -> 1 k3 s4 2-D on 4x439x249 2.05-2.07x the time
    of the channel layouts, 8 -> 3 k3 s4 2.76-3.26x, 6 of 6 such sweep layers 1.15x or
    more; with the stride along W alone, 1 -> 3 k3 s(1, 1, 4), planar 0.85x). Nor where
    C_in/g is whole vectors, which grad_input's layout along C_in fills (as grad_weight's
    own rule has it for either side: `grad_weight_layout`). AVX2, float32, 8 input
    channels a group, two threads on a 2-core AMD EPYC Zen 3: of the 12 sweep layers of
    seeds 129-141 that planar took, both gradients ran 0.45-0.81x the time on 10 without it
    (8 -> 3 k2 s(1, 1, 4) 4.2 -> 1.9 ms), 1.04x and 1.15x on two of stride 1; on the 4 of
    seeds 142-149, drawn after, 0.56-0.76x (alternating processes). The
    planar copies must fit the workspace `limit` (None: any)."""
    lanes, _ = native.layout(compute_dtype.itemsize)
    w = spec.in_spatial[2]
    rows = spec.batch * spec.in_spatial[0] * spec.in_spatial[1]
    depthwise = spec.c_in_per_group == 1 and spec.c_out_per_group == 1
    return (max(spec.c_in_per_group, spec.c_out_per_group) <= max_channels
            and spec.c_in_per_group % lanes != 0 and w >= 16
            and 4 * w >= 3 * ceil_div(w, lanes) * lanes and rows >= 16
            and spec.groups <= 4 and not depthwise
            and not (min(spec.stride[1:]) >= 3 and spec.kernel[2] <= spec.stride[2])
            and (limit is None or native_paths.planar_bytes(spec, compute_dtype) <= limit))


def side_by_side_pays(spec: ConvSpec, compute_dtype: np.dtype) -> bool:
    """Whether the planner weighs the groups side by side (`groups_side_by_side`) at all:
    not on the AVX2 build where every group's channels together leave a partial vector
    and the stride along W is 1, whose masked loads and stores (each pixel's grad_input,
    once per tile of sums: 4 sums a tile with 16 registers) cost more than the pass saves
    there. Both gradients, two threads, a 2-core AMD EPYC Zen 3: its 4 sweep layers of
    seeds 125-159 so ran 1.36-3.06x faster without it (4 -> 2 g2 k6 on 2x1184x1261 159 ->
    54 ms; 6 -> 6 g2 k(7, 1) on 2x626x530 27 -> 12.7), and 5 hand-drawn layers of 4-6
    channels 1.47-2.41x (12 channels level; 8 and 16, whole vectors, ran 1.6-1.8x faster
    side by side or level). Strided along W it is mixed: of 6 sweep layers, 3 ran
    1.07-1.89x faster without it and 3 0.66-0.80x (4 -> 4 g2 k5 s4). With AVX-512's masks
    the pass took 52 of 73 sweep layers at 0.53x the time (`_make_vjp_plan`). Rechecked
    in session 58, after AVX2's partial stores became plain ones (the loads stay masked):
    both gradients in-process, alternating, with the pass weighed against without, 6 -> 6
    g2 k(7, 1) 10.67 against 8.78 ms and 6 -> 6 g2 k3 3-D 6.06 against 5.27; 4- and
    12-channel 2-D layers level. The rule stays."""
    lanes, _ = native.layout(compute_dtype.itemsize)
    return not (avx2_build() and spec.c_in % lanes != 0 and spec.stride[2] == 1)


def _gw_rule() -> tuple[int, float, float, int, bool]:
    """grad_weight_layout's tunable constants, read at each call (tests patch them) and
    handed to the cached plan builder as one argument."""
    return (GW_IN_PLACE_BYTES, ALONG_IN_EXTRA, ALONG_IN_OVER_WIDE, PLANAR_MAX_CHANNELS,
            GROUPS_SIDE_BY_SIDE)


def grad_weight_layout(spec: ConvSpec, compute_dtype: np.dtype, in_place: bool,
                       gw_rule: tuple[int, float, float, int, bool], limit: int | None = None
                       ) -> GradWeightLayout | None:
    """None where the compiled grad_weight kernel does not apply; DEPTHWISE for one
    channel per group; else ALONG_IN (vectors along C_in: for C_out/g that is not whole
    vectors, or a grad_weight large enough to be summed in place), ALONG_OUT, PLANAR,
    or where neither side is whole vectors WIDE or ALONG_IN (`_wide_or_along_in`).
    It reads both operands in place: `in_place`, whether they have the compute dtype and
    contiguous channels. `gw_rule`: `_gw_rule()`. `limit`: the workspace limit, which
    PLANAR's copies must fit."""
    in_place_bytes, extra, along_in_over_wide, planar_max, _ = gw_rule
    if not (native.AVAILABLE and in_place):
        return None
    lanes, _ = native.layout(compute_dtype.itemsize)
    cig, cog = spec.c_in_per_group, spec.c_out_per_group
    if cig == 1 and cog == 1:
        return GradWeightLayout.DEPTHWISE
    along_out = cog % lanes == 0
    gw_bytes = weight_bytes(spec, compute_dtype)
    # Along C_out the sums go through a packed buffer, unpacked after (a transposing
    # copy): worth it where summing along C_in would cost more than that copy.
    unpack = 2 * gw_bytes / COPY_BYTES_PER_S
    along_in_extra = extra * spec.useful_flops / (NATIVE_PEAK_PER_LANE * lanes)
    if cig % lanes == 0 and (not along_out or gw_bytes >= in_place_bytes
                             or unpack > along_in_extra):
        return GradWeightLayout.ALONG_IN
    if along_out:
        return GradWeightLayout.ALONG_OUT
    # Few channels on both sides: vectors along input pixels, by rule (the models of the
    # channel layouts were 1.4-3x off here).
    if planar_suits(spec, compute_dtype, planar_max, limit):
        return GradWeightLayout.PLANAR
    return _wide_or_along_in(spec, compute_dtype, along_in_over_wide)


def _wide_or_along_in(spec: ConvSpec, compute_dtype: np.dtype,
                      along_in_over_wide: float) -> GradWeightLayout | None:
    """Where neither C_in/g nor C_out/g is whole vectors: WIDE, ALONG_IN (C_in/g's last
    vector partial, its lanes past C_in/g computed and dropped), or neither (a 1x1x1
    kernel: the GEMM paths, but for channels under a vector on both sides).

    With groups, WIDE computes every group's columns (the work times the groups); with
    one group, C_in under half a vector and WIDE's columns (kW * C_out) filling at least
    half of theirs, ALONG_IN's few live lanes lost on all 9 such layers measured (and on
    7 -> 10 k3 s2x1x3, drawn later: 2.1 ms WIDE, 2.5 ALONG_IN); with fewer columns WIDE
    lost (3 -> 1 k2 s2 on 3x91x67x90, grad_weight: 17.4 ms WIDE, 4.0 ALONG_IN).
    Elsewhere ALONG_IN where its model is ALONG_IN_OVER_WIDE times faster. Both
    gradients, the 82 sweep layers of seeds 11-31 at this choice, each layout forced,
    alternating processes: this rule lands 1.04x over the faster of the two (geometric
    mean); ALONG_IN everywhere 1.10x, WIDE everywhere 1.34x (28 -> 5 k2 s3: 13.9 ms WIDE,
    4.4 ALONG_IN; 4 -> 12 k4: 5.2 WIDE, 9.8 ALONG_IN)."""
    lanes, _ = native.layout(compute_dtype.itemsize)
    if math.prod(spec.kernel) == 1:
        # The GEMM paths, unless both sides are under a vector: there BLAS's GEMM of
        # C_in/g x C_out/g summed over every pixel ran far below its rate (3 -> 3 on
        # 5.3M pixels, grad_weight 38.7 ms gathered, 17.1 along C_in; 15 -> 9 on 4x300x300
        # 9.2 and 2.5; 8 -> 5 on 2x100x100x60 10.9 and 11.8, the one loss of five).
        if spec.c_in_per_group < lanes and spec.c_out_per_group < lanes:
            return GradWeightLayout.ALONG_IN
        return None
    if not grad_weight_wide_w(spec, compute_dtype):
        return GradWeightLayout.ALONG_IN
    columns = spec.kernel[2] * spec.c_out
    if (spec.groups == 1 and 2 * spec.c_in_per_group < lanes
            and 2 * columns >= ceil_div(columns, lanes) * lanes):
        return GradWeightLayout.WIDE
    if (along_in_over_wide
            * _native_grad_weight_step(spec, compute_dtype, 1, GradWeightLayout.ALONG_IN)
            .est_seconds
            < _native_grad_weight_step(spec, compute_dtype, 1, GradWeightLayout.WIDE)
            .est_seconds):
        return GradWeightLayout.ALONG_IN
    return GradWeightLayout.WIDE


def choose_vjp_algorithm(spec: ConvSpec, taps,
                         budget: int = VJP_TILE_BYTES // 4) -> VjpAlgorithm:
    """'direct' for one input channel per group; 'shift' where it copies less of the
    cotangent than 'gather' (counting its halo), its GEMMs stay wide (K >= 128) and the
    halo rows it computes and drops stay few (<= 7%); else 'gather'. `budget` is the
    workspace of one worker, in elements."""
    if spec.c_in_per_group == 1 and spec.groups > 1:
        return VjpAlgorithm.DIRECT
    layout = shift_layout(spec)
    if len(layout.wtaps) * spec.c_out_per_group < 128:
        return VjpAlgorithm.GATHER
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
        return VjpAlgorithm.SHIFT
    return VjpAlgorithm.GATHER


def make_vjp_plan(spec: ConvSpec, compute_dtype: np.dtype, *, need_input: bool = True,
                  need_weight: bool = True, threads: int | None = None,
                  workspace: int | None = None, algorithm: str | None = None,
                  input_in_place: bool = True, cotangent_in_place: bool = True) -> VjpPlan:
    """The backward's plan, summing in `compute_dtype` (`vjp_compute_dtype`). `input_in_place`,
    `cotangent_in_place`: whether the kernel can read those arrays where they lie
    (`native.reads_in_place`; C-contiguous arrays of the compute dtype can)."""
    if algorithm is not None:
        if algorithm not in VJP_ALGORITHMS:
            raise ValueError(f"vjp: 'algorithm' must be one of "
                             f"{tuple(map(str, GEMM_ALGORITHMS + (VjpAlgorithm.NATIVE,)))}, "
                             f"got {algorithm!r}")
        algorithm = VjpAlgorithm(algorithm)
    n_threads = max(1, threads or get_num_threads())
    return _make_vjp_plan(spec, compute_dtype, need_input, need_weight, n_threads,
                          workspace_limit(spec, workspace), algorithm, get_winograd(),
                          input_in_place, cotangent_in_place, _gw_rule())


@functools.lru_cache(maxsize=256)
def _make_vjp_plan(spec: ConvSpec, compute_dtype: np.dtype, need_input: bool, need_weight: bool,
                   threads: int, limit: int, algorithm: VjpAlgorithm | None, winograd: bool,
                   input_in_place: bool, cotangent_in_place: bool,
                   gw_rule: tuple[int, float, float, int, bool]) -> VjpPlan:
    """Plans are pure functions of their arguments (the tunable thresholds included), so a
    training loop's steps reuse one."""
    budget = max(1, min(VJP_TILE_BYTES, limit // threads) // compute_dtype.itemsize)
    work = bool(active_taps(spec) and spec.batch)
    if algorithm is None and work and native.AVAILABLE and expands_to_depthwise(spec):
        depthwise = dataclasses.replace(spec, c_in=spec.c_out, groups=spec.c_out)
        # grad_weight reads the repeated input, made C-contiguous in the compute dtype.
        inner = _make_vjp_plan(depthwise, compute_dtype, need_input, need_weight, threads,
                               limit, None, winograd, need_weight, cotangent_in_place,
                               gw_rule)
        return dataclasses.replace(inner, spec=spec, multiplier=inner)
    if (algorithm in (None, VjpAlgorithm.NATIVE) and work and (need_input or need_weight)
            and native.AVAILABLE and input_in_place and cotangent_in_place and gw_rule[4]
            and native_paths.groups_side_by_side(spec, *native.layout(compute_dtype.itemsize))
            and side_by_side_pays(spec, compute_dtype)):
        # Every group's channels side by side in one pass (for both gradients where both
        # are asked for), where the models say it beats the plan without it: against
        # vectors along input pixels, groups of 2-4 channels on long rows ran up to 2.5x
        # slower side by side (4 -> 4 g2 k4x7x7 on 3x53x64x45: 27.9 ms planar, 69.1),
        # fan-outs of 2-8 channels a group up to 10x faster (8 -> 4 g4 k4 s2 d2 on
        # 85x79x62: 116 -> 12). Of the 73 sweep layers of its domain (seeds 11-55) this
        # choice takes 52, which run 0.53x the time of the plans without it (geometric
        # mean; 0.075x to 1.52x: three of two groups of 2-4 channels on long rows, whose
        # planar model reads 1.5-2x high), and declines 21.
        # grad_input alone takes the pass too, its grad_weight sums dropped (a group at a
        # time, 8 -> 8 g4 k1x7 s2's grad_input took 6.5 ms, both gradients side by side 3.6).
        gw = _native_grad_weight_step(spec, compute_dtype, threads, GradWeightLayout.SIDE_BY_SIDE)
        gx = _fused_grad_input_step(spec, compute_dtype, threads, True) if need_input else None
        if gx is not None and not need_weight:  # the pass costs its sums all the same
            gx = dataclasses.replace(gx, est_seconds=gx.est_seconds + gw.est_seconds)
        side = VjpPlan(spec, compute_dtype, gx, gw if need_weight else None, threads, limit,
                       budget)
        other = _make_vjp_plan(spec, compute_dtype, need_input, need_weight, threads, limit,
                               algorithm, winograd, input_in_place, cotangent_in_place,
                               (*gw_rule[:4], False))
        return side if _total_seconds(side) < _total_seconds(other) else other
    planar = (algorithm in (None, VjpAlgorithm.NATIVE) and work and native.AVAILABLE
              and planar_suits(spec, compute_dtype, gw_rule[3], limit))
    if (algorithm in (None, VjpAlgorithm.NATIVE) and work and native.AVAILABLE and not planar
            and expands_to_depthwise(grad_input_kernel_spec(spec))
            and _repeated_cotangent_bytes(spec, compute_dtype) <= limit):
        # Each group sums its C_in/g inputs into one output channel (the mirror of a
        # multiplier): both gradients are those of the depthwise layer over C_in channels
        # whose cotangent repeats each group's channel for its inputs, so that the
        # kernel's vectors run along C_in instead of each group's single channel.
        depthwise = dataclasses.replace(spec, c_out=spec.c_in, groups=spec.c_in)
        fan_out = _make_vjp_plan(depthwise, compute_dtype, need_input, need_weight, threads,
                                 limit, None, winograd, input_in_place, True, gw_rule)
        marked = {name: dataclasses.replace(step, fan_out=True)
                  for name, step in (("grad_input", fan_out.grad_input),
                                     ("grad_weight", fan_out.grad_weight)) if step is not None}
        return dataclasses.replace(fan_out, spec=spec, fan_out=fan_out, **marked)
    if (algorithm == VjpAlgorithm.NATIVE and need_input and work and not planar
            and native_paths.grad_input_mode(spec) == native.DEPTHWISE
            and spec.c_in_per_group > 1):
        raise ValueError(
            "vjp: algorithm 'native' takes this layer's grad_input (groups that each sum "
            "C_in/g inputs into one output channel) only through a cotangent repeated for "
            f"each input, {_repeated_cotangent_bytes(spec, compute_dtype) / 2**20:.0f} MiB "
            f"here, over the workspace limit of {limit / 2**20:.0f} MiB: raise 'workspace' "
            "or leave 'algorithm' to the default")
    if algorithm is None and indexed_fits(spec):
        algorithm = VjpAlgorithm.INDEXED  # small: one gather and two GEMMs beat any tiles
    elif algorithm == VjpAlgorithm.INDEXED and not indexed_fits(spec):
        raise ValueError("vjp: algorithm 'indexed' is for small calls; this one's gathered "
                         "cotangent would be too large (leave 'algorithm' to the default)")
    if not work or not (need_input or need_weight):
        zeros = GradStep(VjpAlgorithm.ZEROS, 0, 0, 1, 0.0)
        return VjpPlan(spec, compute_dtype, zeros if need_input else None,
                       zeros if need_weight else None, threads, limit, budget)
    if algorithm == VjpAlgorithm.NATIVE and not native.AVAILABLE:
        raise ValueError("vjp: algorithm 'native' needs the compiled kernel, which this "
                         "install lacks")
    layout = (grad_weight_layout(spec, compute_dtype,
                                 input_in_place and cotangent_in_place, gw_rule, limit)
              if need_weight and algorithm in (None, VjpAlgorithm.NATIVE) else None)
    # grad_input too by the kernel: asked for, or where it beats the GEMM paths (which
    # would otherwise compute both gradients from one gathered block).
    native_gx = need_input and (planar or algorithm == VjpAlgorithm.NATIVE or (
        algorithm is None and native_grad_input_suits(spec, need_weight and layout is None)))
    if need_input and algorithm is None and not native_gx and native.AVAILABLE:
        native_gx = _native_grad_input_is_cheaper(spec, compute_dtype, threads, budget,
                                                  need_weight and layout is None,
                                                  cotangent_in_place)
    fused = (layout == GradWeightLayout.ALONG_IN and native_gx
             and native.fuses_grad_input(compute_dtype.itemsize, spec.c_in_per_group,
                                         spec.c_out_per_group)
             and native_paths.fused_pass_suits(spec, threads,
                                               native.layout(compute_dtype.itemsize)[0]))
    gemm = None
    if (need_input and not native_gx) or (need_weight and layout is None):
        gemm = (algorithm if algorithm not in (None, VjpAlgorithm.NATIVE)
                else choose_vjp_algorithm(spec, active_taps(spec), budget))
        if gemm == VjpAlgorithm.DIRECT and spec.c_in_per_group != 1:
            raise ValueError("vjp: algorithm 'direct' needs one input channel per group")
    gemm_costs = _gemm_costs(spec, compute_dtype, gemm, need_input and not native_gx,
                             need_weight and layout is None, threads, budget) if gemm else {}
    gx = gw = None
    if need_input:
        if planar:
            gx = _planar_grad_input_step(spec, compute_dtype, threads,
                                         shares_copy=layout == GradWeightLayout.PLANAR)
        elif fused:
            gx = _fused_grad_input_step(spec, compute_dtype, threads, False)
        elif native_gx:
            pairs_fit = (native_paths.grad_input_mode(spec) == native.CHANNELS
                         and not native_paths.grad_input_w_taps_as_one(spec)
                         and grad_input_takes_pairs(spec, compute_dtype, limit, winograd,
                                                    cotangent_in_place))
            gx = _native_grad_input_step(spec, compute_dtype, threads, budget, False,
                                         cotangent_in_place)
            if pairs_fit:  # taken where its model says so
                pairs = _native_grad_input_step(spec, compute_dtype, threads, budget, True,
                                                cotangent_in_place)
                gx = min(gx, pairs, key=lambda step: step.est_seconds)
        else:
            gx = gemm_costs["input"]
    if need_weight:
        gw = (_native_grad_weight_step(spec, compute_dtype, threads, layout) if layout is not None
              else gemm_costs["weight"])
    return VjpPlan(spec, compute_dtype, gx, gw, threads, limit, budget,
                   shared_queue=layout is not None and native_gx and not fused and not planar)


def _native_grad_input_is_cheaper(spec: ConvSpec, compute_dtype: np.dtype, threads: int,
                                  budget: int, shares_copy: bool,
                                  cotangent_in_place: bool) -> bool:
    """Where the rule of `native_grad_input_suits` keeps grad_input on the GEMM paths,
    whether the models still say the kernel is cheaper: against the GEMM's own time,
    and the cotangent copy too unless grad_weight's GEMMs share it (`shares_copy`).
    (4 -> 6 g2 k6 s2: the gathered rows of 3 channels took 250 ms, the kernel 5 ms.)"""
    if native_mode(grad_input_kernel_spec(spec),
                   weight_in_place=False) not in (native.CHANNELS, native.DOT):
        return False
    times, copy = _gemm_seconds(spec, compute_dtype,
                                choose_vjp_algorithm(spec, active_taps(spec), budget))
    # the copy is paid by grad_weight's GEMMs anyway where they share it
    gemm_seconds = _on_threads(times["input"] + (0.0 if shares_copy else copy), threads)
    kernel = _native_grad_input_step(spec, compute_dtype, threads, budget, False,
                                     cotangent_in_place)
    return kernel.est_seconds < gemm_seconds


def _planar_grad_input_step(spec: ConvSpec, compute_dtype: np.dtype, threads: int,
                            shares_copy: bool) -> GradStep:
    """grad_input over the planar cotangent (`planar_suits`): the products at
    PLANAR_EFFICIENCY of the kernel's peak on rows padded to whole vectors, the copy of
    the cotangent unless grad_weight's planar pass makes it (`shares_copy`), and the
    write. On the 29 sweep layers of its domain it took 0.07-0.99x the time of the
    channel-vector kernel (8 -> 4 g4 k7x3x7 on 78x69x90: 387 -> 27 ms)."""
    lanes, _ = native.layout(compute_dtype.itemsize)
    wv, _, _, _ = native_paths.planar_geometry(spec, lanes)
    cot_bytes = native_paths.planar_cotangent_bytes(spec, compute_dtype)
    write = spec.batch * math.prod(spec.in_spatial) * spec.c_in * compute_dtype.itemsize
    seconds = (spec.useful_flops * wv / spec.in_spatial[2]
               / (NATIVE_PEAK_PER_LANE * lanes * PLANAR_EFFICIENCY)
               + ((0 if shares_copy else 2 * cot_bytes) + write) / COPY_BYTES_PER_S
               + weight_traffic_seconds(spec, compute_dtype))
    return GradStep(VjpAlgorithm.NATIVE, spec.useful_flops, 0 if shares_copy else cot_bytes,
                    threads, _on_threads(seconds, threads), planar=True)


def _on_threads(seconds: float, threads: int) -> float:
    """The models are of one core; as the forward's plan, ~0.9 efficiency on more."""
    return seconds / (1 if threads == 1 else 0.9 * threads)


def pair_transform_seconds(spec: ConvSpec, compute_dtype: np.dtype) -> float:
    """What Winograd's grad_input adds: the cotangent's transform V, and the weight's (its
    three D taps into four). On a few pixels of a 7 MB weight (256 -> 256 k3 on 3x3x3)
    grad_input took 6.0 ms with them, 2.1 without, where the model had counted V alone."""
    return ((grad_input_pair_bytes(spec, compute_dtype) + 4 / 3 * weight_bytes(spec, compute_dtype))
            / PAIR_TRANSFORM_BYTES_PER_S)


def _native_grad_input_step(spec: ConvSpec, compute_dtype: np.dtype, threads: int, budget: int,
                            takes_pairs: bool, cotangent_in_place: bool) -> GradStep:
    """The kernel's grad_input: the forward's rate model on its channel-swapped spec."""
    flops = spec.useful_flops
    item = compute_dtype.itemsize
    wide = native_paths.grad_input_w_taps_as_one(spec)
    write = 2 * spec.batch * math.prod(spec.in_spatial) * spec.c_in * item / COPY_BYTES_PER_S
    products = flops
    scratch = 0 if cotangent_in_place else threads * budget * item
    extra = 0.0
    if takes_pairs:  # four products per pair of planes instead of six, and the transforms
        products = flops * 4 * ceil_div(spec.in_spatial[0], 2) / (3 * spec.in_spatial[0])
        scratch = grad_input_pair_bytes(spec, compute_dtype)
        extra = pair_transform_seconds(spec, compute_dtype)
    elif wide:  # the cotangent padded along W: whole, or a slab per tile where it is large
        cotangent = spec.batch * math.prod(spec.out_spatial) * spec.c_out * item
        scratch = (threads * budget * item if cotangent >= native_paths.PAD_BY_TILE_FROM_BYTES
                   else cotangent // spec.out_spatial[2] * (spec.out_spatial[2] + spec.kernel[2]))
    seconds = (products / native_rate(grad_input_kernel_spec(spec), weight_in_place=False)
               + write / 2 + extra
               + weight_traffic_seconds(spec, compute_dtype))
    return GradStep(VjpAlgorithm.WINOGRAD if takes_pairs else VjpAlgorithm.NATIVE, flops, scratch,
                    threads, _on_threads(seconds, threads), wide_w=wide)


def _total_seconds(plan: VjpPlan) -> float:
    return sum(step.est_seconds for step in plan.steps)


def _fused_grad_input_step(spec: ConvSpec, compute_dtype: np.dtype, threads: int,
                           side_by_side: bool) -> GradStep:
    """grad_input in grad_weight's few-sums pass (a group at a time, or every group side by
    side: `groups_side_by_side`): its products at grad_weight's rate (the same vectors and
    cotangent values; the kernel's own grad_input model, which the plans once counted
    here, was 1.5-3x this), and its write."""
    lanes, _ = native.layout(compute_dtype.itemsize)
    width = spec.c_in if side_by_side else spec.c_in_per_group
    fill = width / (ceil_div(width, lanes) * lanes)
    efficiency = SIDE_BY_SIDE_EFFICIENCY if side_by_side else 1.0
    write = spec.batch * math.prod(spec.in_spatial) * spec.c_in * compute_dtype.itemsize
    seconds = (spec.useful_flops / (NATIVE_PEAK_PER_LANE * lanes * fill * efficiency)
               + write / COPY_BYTES_PER_S + weight_traffic_seconds(spec, compute_dtype))
    return GradStep(VjpAlgorithm.NATIVE, spec.useful_flops, 0, threads,
                    _on_threads(seconds, threads), with_grad_weight=True,
                    layout=GradWeightLayout.SIDE_BY_SIDE if side_by_side else None)


def _native_grad_weight_step(spec: ConvSpec, compute_dtype: np.dtype, threads: int,
                             layout: GradWeightLayout) -> GradStep:
    """The kernel's grad_weight. It sums over pixels (many per tap), so its rate is the
    forward kernel's peak times the lanes its vector axis fills (C_in/g for ALONG_IN,
    C_out/g for ALONG_OUT, kW * C_out for WIDE, whose groups each compute every
    group's columns)."""
    lanes, _ = native.layout(compute_dtype.itemsize)
    peak = NATIVE_PEAK_PER_LANE * lanes
    gw_bytes = weight_bytes(spec, compute_dtype)
    if layout == GradWeightLayout.DEPTHWISE:
        rate, scratch = peak / 4, threads * gw_bytes
    elif layout == GradWeightLayout.PLANAR:
        wv, _, _, _ = native_paths.planar_geometry(spec, lanes)
        rate = peak * PLANAR_EFFICIENCY * spec.in_spatial[2] / wv
        scratch = native_paths.planar_bytes(spec, compute_dtype)
    else:
        width = (spec.kernel[2] * spec.c_out if layout == GradWeightLayout.WIDE
                 else spec.c_in_per_group
                 if layout == GradWeightLayout.ALONG_IN
                 else spec.c_in if layout == GradWeightLayout.SIDE_BY_SIDE
                 else spec.c_out_per_group)
        vectors = ceil_div(width, lanes)
        rate = peak * width / (vectors * lanes) / (
            spec.groups if layout == GradWeightLayout.WIDE else 1) * (
            SIDE_BY_SIDE_EFFICIENCY if layout == GradWeightLayout.SIDE_BY_SIDE else 1)
        scratch = gw_bytes * vectors * lanes // width  # C_in/g padded to whole vectors
        if layout == GradWeightLayout.ALONG_IN and width % lanes == 0:
            scratch = 0  # summed in place
        if layout == GradWeightLayout.WIDE:  # the W-padded cotangent and every group's columns
            scratch = (spec.batch * spec.out_spatial[0] * spec.out_spatial[1]
                       * (spec.out_spatial[2] + spec.kernel[2]) * spec.c_out
                       * compute_dtype.itemsize
                       + gw_bytes * spec.groups * vectors * lanes // max(1, width))
    flops = spec.useful_flops
    seconds = flops / rate + weight_traffic_seconds(spec, compute_dtype)
    if layout in (GradWeightLayout.WIDE, GradWeightLayout.PLANAR):  # its copies, written
        seconds += 2 * scratch / COPY_BYTES_PER_S  # and read
    if layout == GradWeightLayout.ALONG_OUT:  # the unpack, a transposing copy (165 -> 128
        seconds += 2 * gw_bytes / COPY_BYTES_PER_S  # k7's 29 MB: 8 ms on one core)
    return GradStep(VjpAlgorithm.NATIVE, flops, scratch, threads,
                    _on_threads(seconds, threads), layout=layout)


def _gemm_seconds(spec: ConvSpec, compute_dtype: np.dtype, algorithm: str
                  ) -> tuple[dict[str, float], float]:
    """The NumPy/BLAS paths on one core: each gradient's GEMMs at the shape's rate
    (`_gemm_rate` of their narrow side), and the copy of cotangent rows that feeds both."""
    flops = spec.useful_flops
    rows = spec.batch * math.prod(spec.in_spatial)
    cig, cog = spec.c_in_per_group, spec.c_out_per_group
    weight = weight_traffic_seconds(spec, compute_dtype)
    if algorithm == VjpAlgorithm.DIRECT:
        per_grad = flops / 2 / ELEMENTWISE_PER_S + weight
        return {"input": per_grad, "weight": per_grad}, 0.0
    if algorithm == VjpAlgorithm.SHIFT:
        layout = shift_layout(spec)
        copied, k = len(layout.phases) * len(layout.wtaps), len(layout.wtaps) * cog
    else:
        taps = len(active_taps(spec))
        copied, k = taps, taps * cog
    copy = 2 * rows * copied * spec.c_out * compute_dtype.itemsize / COPY_BYTES_PER_S
    if algorithm == VjpAlgorithm.INDEXED:
        copy += 1e-5  # a few calls of Python
    # grad_input's GEMMs write it (and add into it, tap chunk by chunk), as the kernel's
    # model counts (`_native_grad_input_step`): with few products a pixel (48 -> 4 g4 k3
    # on 181448 pixels, K = 3) that traffic is the time: 14 ms, modelled 2.4 without it.
    write = rows * spec.c_in * compute_dtype.itemsize / COPY_BYTES_PER_S
    return {"input": flops / _gemm_rate(cig) + write + weight,
            "weight": flops / _gemm_rate(min(k, cig)) + weight}, copy


def weight_traffic_seconds(spec: ConvSpec, compute_dtype: np.dtype) -> float:
    """What every path pays for the weight's size, each gradient alone: grad_input reads
    the weight, grad_weight writes one. A small call's weight may outweigh its pixels
    many times (384 -> 197 k3 s3 on 16 pixels: 8 MB, 2.1 and 1.8 ms measured where the
    GEMMs alone model 0.35 and 0.27; 96 -> 337 k7 d2 on one pixel: 44 MB, 17.6 ms for
    both, modelled 0.51). The same term in every path's model changes no comparison of
    their sums."""
    return weight_bytes(spec, compute_dtype) / COPY_BYTES_PER_S


def weight_bytes(spec: ConvSpec, compute_dtype: np.dtype) -> int:
    """The weight's (and grad_weight's) size in the compute dtype."""
    return spec.c_out * math.prod(spec.kernel) * spec.c_in_per_group * compute_dtype.itemsize


def _gemm_costs(spec: ConvSpec, compute_dtype: np.dtype, algorithm: str, want_input: bool,
                want_weight: bool, threads: int, budget: int) -> dict[str, GradStep]:
    """`_gemm_seconds` as the gradients' steps, the copy charged to the first gradient
    asked for."""
    flops = spec.useful_flops
    item = compute_dtype.itemsize
    rows = spec.batch * math.prod(spec.in_spatial)
    taps = len(active_taps(spec))
    times, copy = _gemm_seconds(spec, compute_dtype, algorithm)
    gw_bytes = weight_bytes(spec, compute_dtype)
    if algorithm == VjpAlgorithm.INDEXED:
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


# --- the front doors: check, plan, run ------------------------------------------------

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
    compute_dtype = vjp_compute_dtype(x.dtype, w.dtype, cot.dtype)
    x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
    c3 = cot.reshape(spec.batch, *spec.out_spatial, spec.c_out)
    in_place = native.AVAILABLE and native.reads_in_place(x3, compute_dtype)
    cot_in_place = native.AVAILABLE and native.reads_in_place(c3, compute_dtype)
    plan = make_vjp_plan(spec, compute_dtype, need_input=need_input, need_weight=need_weight,
                         threads=threads, workspace=workspace, algorithm=algorithm,
                         input_in_place=in_place, cotangent_in_place=cot_in_place)
    return run_vjp_plan(plan, x, w, cot)


@functools.lru_cache(maxsize=64)
def vjp_compute_dtype(*dtypes: np.dtype) -> np.dtype:
    """The dtype the gradients sum in: float32 at least (as `mx.vjp`)."""
    return _dtypes.compute_dtype(functools.reduce(result_dtype, dtypes))


def run_vjp_plan(plan: VjpPlan, x: np.ndarray, w: np.ndarray, cot: np.ndarray
                 ) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Run each step of the plan on arrays of its spec."""
    if plan.multiplier is not None:
        return _multiplier_vjp(plan, x, w, cot)
    spec, compute_dtype, threads = plan.spec, plan.compute_dtype, plan.threads
    if plan.fan_out is not None:
        return _fan_out_vjp(plan.fan_out, spec, x, w, cot)
    x3 = x.reshape(spec.batch, *spec.in_spatial, spec.c_in)
    c3 = cot.reshape(spec.batch, *spec.out_spatial, spec.c_out)
    w3 = w.reshape(spec.c_out, math.prod(spec.kernel), spec.c_in_per_group)
    gi, gwp = plan.grad_input, plan.grad_weight
    gi_native = gi is not None and gi.native
    gw_native = gwp is not None and gwp.native
    # Accumulated in the compute dtype (tap chunks add up), rounded to x's dtype at the end.
    # The native kernels write every element; the other paths accumulate into zeros.
    gx = ((result_empty if gi_native else result_zeros)(
        (spec.batch, *spec.in_spatial, spec.c_in), compute_dtype) if gi is not None else None)
    gw = ((result_empty if gw_native else result_zeros)(
        (spec.c_out, math.prod(spec.kernel), spec.c_in_per_group), compute_dtype)
        if gwp is not None else None)
    if gi_native or gw_native:
        native.warm(threads)  # the pool's threads wake while this prepares their work
    if gi_native and gi.with_grad_weight:  # few sums: one pass for both
        native_paths.both_gradients(spec, x3, c3, w3, gx, gw, threads, compute_dtype,
                                    gi.layout == GradWeightLayout.SIDE_BY_SIDE)
        return _results(spec, x, w, gx, gw)
    # Both summing W taps as one: the W-padded cotangent once, for both.
    padded = (native_paths.padded_cotangent_for_both(spec, c3, compute_dtype, threads)
              if gi_native and gi.wide_w and gw_native
              and gwp.layout == GradWeightLayout.WIDE else None)
    # A depthwise layer's cotangent split by W residue: once, for both.
    residues = (native_paths.residues_for_both(spec, c3, compute_dtype, threads)
                if gi_native and gw_native else None)
    # The planar cotangent: once, for both.
    planar = (native_paths.planar_cotangent(spec, c3, compute_dtype, threads)
              if gi is not None and gi.planar and gw_native
              and gwp.layout == GradWeightLayout.PLANAR else None)
    # Both by the kernel: one queue for both, grad_weight's bigger jobs first, so that
    # neither waits on the other's slowest tile.
    shared = [] if plan.shared_queue else None
    if gw_native:
        native_paths.grad_weight(spec, x3, c3, gw, threads, gwp.layout, compute_dtype, shared,
                                 padded, residues, planar)
    if gi_native and gi.planar:
        native_paths.planar_grad_input(spec, c3, w3, gx, threads, compute_dtype, planar)
    elif gi_native:
        native_paths.grad_input(spec, c3, w3, gx, threads, plan.budget, compute_dtype, shared,
                                gi.algorithm == VjpAlgorithm.WINOGRAD, padded, residues)
    if shared:
        run_jobs([job for jobs, _ in shared for job in jobs], threads)
        for _, finish in shared:
            finish()
    gemm = plan.gemm_algorithm
    if gemm is not None:  # what the kernel does not compute, from one copy for both
        numpy_paths.PATHS[gemm](spec, active_taps(spec), x3, c3, w3,
                                gx if gi is not None and gi.algorithm == gemm else None,
                                gw if gwp is not None and gwp.algorithm == gemm else None,
                                threads, plan.budget, compute_dtype)
    return _results(spec, x, w, gx, gw)


def _multiplier_vjp(plan: VjpPlan, x, w, cot):
    """A channel multiplier (as the forward, `expands_to_depthwise`) as a depthwise layer
    over C_out channels whose input repeats each channel C_out/g times: grad_weight is that
    layer's, and grad_input sums its grad_input over each channel's repeats (in a fixed
    order: the bits do not depend on the threads)."""
    spec, compute_dtype = plan.spec, plan.compute_dtype
    m = spec.c_out_per_group
    shape = (spec.batch, *spec.in_spatial, spec.c_out)
    if plan.grad_weight is not None:
        xe = repeat_channels(x.reshape(*shape[:-1], spec.c_in), m, compute_dtype,
                             plan.threads)
    else:  # grad_input reads no input: a stand-in of the right shape, no memory
        xe = np.broadcast_to(np.zeros((), compute_dtype), shape)
    gxe, gw = run_vjp_plan(plan.multiplier, xe, w.reshape(spec.c_out, -1, 1), cot)
    # The repeats added in order (NumPy's sum over a last axis of 2 took 24 ms of 2 -> 4
    # g2's 28 on 1097x941 pixels; strided adds 1, on one thread)
    gx = None if gxe is None else sum_repeats(gxe, m, plan.threads)
    return _results(spec, x, w, gx, gw)


def _repeated_cotangent_bytes(spec: ConvSpec, compute_dtype: np.dtype) -> int:
    """The cotangent with each group's channel repeated for its C_in/g inputs."""
    return spec.batch * math.prod(spec.out_spatial) * spec.c_in * compute_dtype.itemsize


def _fan_out_vjp(fan_out: VjpPlan, spec: ConvSpec, x, w, cot):
    """Both gradients of a layer whose groups each sum C_in/g inputs into one output
    channel, as those of a depthwise layer over C_in channels with each group's cotangent
    channel repeated for its inputs (`fan_out`: that layer's plan). One channel per
    group, the GEMM paths ran 8 -> 4 g4's grad_input at 0.5 GFLOP/s, and its grad_weight
    over x padded to whole vectors of C_in/g took 179 ms where PyTorch's backward takes
    75 (877x853 2-D, two threads)."""
    compute_dtype, depthwise = fan_out.compute_dtype, fan_out.spec
    m, taps = spec.c_in_per_group, math.prod(spec.kernel)
    wd = per_input_channel_weight(spec, w)
    shape = (spec.batch, *spec.out_spatial, spec.c_out)
    cot_rep = repeat_channels(cot.reshape(shape), m, compute_dtype, fan_out.threads)
    xin = x if fan_out.grad_weight is not None else np.broadcast_to(  # grad_input reads
        np.zeros((), compute_dtype), (spec.batch, *spec.in_spatial, spec.c_in))  # no input
    gx, gwd = run_vjp_plan(fan_out, xin, wd.reshape(depthwise.weight_shape), cot_rep)
    gw = None
    if gwd is not None:  # channel g*m + j's taps are W[g, :, j]
        gw = np.ascontiguousarray(gwd.reshape(spec.c_out, m, taps).transpose(0, 2, 1))
        gw = gw.reshape(spec.weight_shape)
    return _results(spec, x, w, gx, gw)


def _results(spec: ConvSpec, x: np.ndarray, w: np.ndarray, gx: np.ndarray | None,
             gw: np.ndarray | None) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The gradients in their shapes, rounded to the dtypes of x and w."""
    if gx is not None:
        gx = gx.reshape(spec.input_shape).astype(x.dtype, copy=False)
    if gw is not None:
        gw = gw.reshape(spec.weight_shape).astype(w.dtype, copy=False)
    return gx, gw


def native_grad_weight_layout(spec: ConvSpec, x3: np.ndarray, c3: np.ndarray,
                              compute_dtype: np.dtype) -> GradWeightLayout | None:
    """`grad_weight_layout` for these arrays: whether the kernel reads them in place."""
    return grad_weight_layout(spec, compute_dtype, native.reads_in_place(x3, compute_dtype)
                              and native.reads_in_place(c3, compute_dtype), _gw_rule())


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
    sum_dtype = _dtypes.compute_dtype(result_dtype(cot.dtype, b.dtype))
    gb = np.add.reduce(cot.reshape(-1, spec.c_out), axis=0, dtype=sum_dtype)
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
