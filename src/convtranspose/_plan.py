"""Spec -> plan: choose the algorithm and the tiling for one call on this machine.

Every algorithm works phase by phase (see `_geometry`): no zero-stuffed input, no multiply
by a structural zero. They differ in where the taps of a phase meet; each is one module of
`kernels/` (shift, scatter, direct, indexed, native, winograd, fan_in, planar: the members
of `_algorithms.Algorithm`), registered in `kernels.REGISTRY`, which the planner chooses
from: the fastest estimate among the kernels that fit.

Every task writes a disjoint block of the output, so tasks run on worker threads in any
order and results are bitwise identical from run to run.

The plan is a printable object: ``print(convtranspose.plan(...))``.
"""

import functools
import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np

from . import _native_kernel as native
from ._algorithms import Algorithm, VjpAlgorithm
from ._geometry import PHANTOM, AxisTap, Phase, ceil_div, phases_3d
from ._memory import RETAIN_BYTES
from ._spec import ConvSpec

INDEXED_MAX_ELEMS = 1 << 17  # indexed only while its tables and products stay this small
DEFAULT_WORKSPACE = 64 * 2**20
TILE_BYTES = 8 * 2**20
SMALL_TILE_BYTES = 2**22
# Native tiles that read and write in place are shared by every free thread (the kernel
# claims their rows), so they need not be cut for balance, only for locality: each costs
# ~40 us of Python, and W7 cut into 56 tiles of 4 MiB ran 19% slower than in 8.
SHARED_TILE_BYTES = 64 * 2**20
# Except in dot mode, where each phase sweeps its input rows for a few multiply-adds per
# byte: cut so that a tile's phases find their rows still cached, one after the other
# (one core, 64 -> 1 s3 9.4 -> 7.7 ms, 96 -> 3 k(4, 6) s4 25.5 -> 15.9 ms; 1 MiB tiles
# gained less, and CHANNELS-mode layers nothing).
SHARED_DOT_TILE_BYTES = 4 * 2**20
MIN_TILE_ROWS = 256
MIN_ROW_PIECE = 1024  # positions: shorter pieces of a cut row cost more in calls than they gain
SERIAL_BELOW_SECONDS = 2e-3
# Its tasks start with no copies: threads pay off sooner. From 0.1 ms of modelled work on one
# core, two threads took 0.68-0.85x the time of one in bench-like bursts (16 -> 16 k3 on
# 8x8x8 0.77x, 48 -> 256 k2 d2 2-D 0.67x); below, level or slower (indexed given up).
NATIVE_SERIAL_BELOW_SECONDS = 1e-4
# A native call's Python around the kernel (its recorded tasks found and moved, the
# output made): 30-45 us measured on 1x4x4x4 8 -> 8 k3 s2 (W9), whose products take 1.
NATIVE_CALL_SECONDS = 30e-6

# Rough machine model for choosing an algorithm (ratios matter, not absolutes): a GEMM
# whose narrow side is n runs at about PEAK * n / (n + 12); a strided NumPy copy moves
# about COPY_BYTES_PER_S.
GEMM_PEAK = 140e9
COPY_BYTES_PER_S = 5e9
ELEMENTWISE_PER_S = 1.5e9
# The native kernel on one core, per vector lane: its measured peak, reached with C_out/g
# a multiple of 32 or 64 and C_in/g >= 32 (W5: 172 GFLOP/s single-threaded on AVX-512's
# 16 float32 lanes; AVX2 has half the lanes and about half the rate).
NATIVE_PEAK_PER_LANE = 10e9
# Winograd's input transform (pair_transform), bytes of V written per second on one core
# (W5: 8 MiB in 1.1 ms, reading 4 MiB meanwhile).
PAIR_TRANSFORM_BYTES_PER_S = 7.5e9
# Below this many input channels per group a Winograd product is too short to pay for
# its transforms and its four slots of sums.
WINOGRAD_MIN_CHANNELS = 16

# `wide_fma_gain` below this: the CPU multiply-adds 512 bits at the rate of 256 (see
# `half_rate_fma`).
HALF_RATE_FMA_BELOW = 1.4

_threads: int | None = None
_winograd: bool | None = None


def registry() -> dict:
    """The registry (imported when first needed: its modules import this one)."""
    global _registry
    if _registry is None:
        from .kernels import REGISTRY
        _registry = REGISTRY
    return _registry


_registry: dict | None = None


def __getattr__(name: str):
    if name == "ALGORITHMS":  # the registered kernels' names, in the planner's order
        return tuple(registry())
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def set_num_threads(n: int | None) -> None:
    """Worker threads for tiles; None restores the default
    (CONVTRANSPOSE_NUM_THREADS, else every core this process may use, as the first call
    found them)."""
    global _threads
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"set_num_threads: 'n' must be an int >= 1 or None, got {n!r}")
    _threads = n


def get_num_threads() -> int:
    if _threads is not None:
        return _threads
    env = os.environ.get("CONVTRANSPOSE_NUM_THREADS")
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            pass
    return _usable_cores()


def set_winograd(enabled: bool | None) -> None:
    """Whether the planner may pick ``winograd`` (2/3 of the multiply-adds on stride-1
    k=3 D axes; results equal the direct sum within float rounding, not bit for bit).
    None restores the default: CONVTRANSPOSE_WINOGRAD=0 in the environment turns it off,
    else on. Results stay bitwise identical from run to run either way."""
    global _winograd
    if enabled is not None and not isinstance(enabled, bool):
        raise ValueError(f"set_winograd: 'enabled' must be True, False or None, got "
                         f"{enabled!r}")
    _winograd = enabled


def get_winograd() -> bool:
    if _winograd is not None:
        return _winograd
    return os.environ.get("CONVTRANSPOSE_WINOGRAD", "1").strip() not in ("0", "false", "no",
                                                                          "off")


def half_rate_fma() -> bool:
    """Whether the kernel's AVX-512 vectors multiply-add at half the rate per lane of the
    CPU the models were fitted on (a Xeon taking 512 bits a unit whole; AMD's Zen 4 runs
    them as two halves): `native.wide_fma_gain` below HALF_RATE_FMA_BELOW on the avx512
    build. CONVTRANSPOSE_HALF_RATE_FMA=0 or 1 overrides the measurement."""
    env = os.environ.get("CONVTRANSPOSE_HALF_RATE_FMA", "").strip()
    if env in ("0", "1"):
        return env == "1"
    if native.isa() != "avx512":
        return False
    gain = native.wide_fma_gain()
    return gain is not None and gain < HALF_RATE_FMA_BELOW


def avx2_build() -> bool:
    """Whether the kernel runs its AVX2 build, where the models' *_AVX2 costs (fitted on a
    2-core AMD EPYC Zen 3, session 56) stand for the AVX-512 fits."""
    return native.isa() == "avx2"


@functools.lru_cache(maxsize=1)
def _usable_cores() -> int:
    """The cores this process may run on, read once (the system call cost 1 us a call)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Tile:
    """A rectangular block of a phase's output grid: batch, depth and height ranges, and
    along the width every position (w None: rows stay contiguous) or, for a native tile
    of one long row (`cut_rows`), the positions [w0, w1)."""

    n: tuple[int, int]
    d: tuple[int, int]
    h: tuple[int, int]
    w: tuple[int, int] | None = None


@dataclass(frozen=True)
class Task:
    phase_group: int  # index into Plan.phase_groups
    tile: Tile
    buffer_elems: int


class InputSlab(NamedTuple):
    """Batch items [n0, n1) and input planes [d0, d1) that PLANAR copies at once, where
    its whole copy would pass the workspace limit, and the run of the plan's tasks
    [t0, t1) that read only them."""

    n: tuple[int, int]
    d: tuple[int, int]
    tasks: tuple[int, int]

    @property
    def planes(self) -> int:
        return (self.n[1] - self.n[0]) * (self.d[1] - self.d[0])


@dataclass(frozen=True)
class Plan:
    spec: ConvSpec
    algorithm: str
    phase_groups: tuple[tuple[Phase, ...], ...]  # phases computed together
    tasks: tuple[Task, ...]
    threads: int  # worker threads the tasks run on
    workspace_bytes: int
    workspace_limit: int
    est_seconds: dict
    table: np.ndarray | None = field(default=None, repr=False, compare=False)
    # PLANAR's copy in slabs (its whole copy would pass the limit); () where made whole
    input_slabs: tuple[InputSlab, ...] = ()
    # Its phase groups hold PHANTOM taps (`merged_row`), whose zero weights times an
    # infinite or NaN input would make NaN where no tap reaches it (`finite_plan`)
    phantoms: bool = False

    @property
    def flops(self) -> int:
        return self.spec.useful_flops

    def __str__(self) -> str:
        s = self.spec
        lift = 3 - s.ndim
        phases = len(live_phases(s)) if self.phase_groups else 0  # (merged edges split some)
        total = math.prod(s.stride)
        shape = (f"{phases} of {total} phases carry taps, in {len(self.phase_groups)} phase "
                 f"group(s)"
                 if self.table is None else
                 f"one GEMM, then a gather of up to {self.table.shape[0]} products per "
                 f"output row")
        est = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in self.est_seconds.items())
        lines = [
            f"convtranspose plan for {s.op}",
            f"  input      {s.input_shape} {s.input_dtype.name}",
            f"  weight     {s.weight_shape} {s.weight_dtype.name}",
            f"  output     {s.output_shape} {s.result_dtype.name} (accumulates in "
            f"{s.compute_dtype.name})",
            f"  settings   stride={s.stride[lift:]} padding={s.padding[lift:]} "
            f"dilation={s.dilation[lift:]} output_padding={s.output_padding[lift:]} "
            f"groups={s.groups}",
            f"  algorithm  {self.algorithm}"
            f"{f' ({native.isa()})' if self._compiled else ''}: "
            f"{shape}",
            f"  model ms   {est}",
            f"  useful     {self.flops / 1e9:.3f} GFLOP",
            f"  tasks      {len(self.tasks)} on {self.threads} thread(s)",
            f"  workspace  {self.workspace_bytes / 2**20:.1f} MiB "
            f"(limit {self.workspace_limit / 2**20:.1f} MiB)"
            f"{f', the input copied in {len(self.input_slabs)} slabs' if self.input_slabs else ''}",
        ]
        return "\n".join(lines)

    @property
    def _compiled(self) -> bool:
        kernel = registry().get(self.algorithm)
        return kernel is not None and kernel.compiled

    # A notebook shows repr(): the summary, not the dataclass's dump of every tile.
    __repr__ = __str__


# The NumPy/BLAS paths; 'native' names the compiled kernel's (grad_weight's layout is
# then chosen by the rules below).
GEMM_ALGORITHMS = (VjpAlgorithm.GATHER, VjpAlgorithm.SHIFT, VjpAlgorithm.DIRECT,
                   VjpAlgorithm.INDEXED)
VJP_ALGORITHMS = (VjpAlgorithm.NATIVE, *GEMM_ALGORITHMS)


@dataclass(frozen=True)
class GradStep:
    """How one gradient is computed: its path, and what the model says it costs.

    `algorithm`: 'native', 'winograd' (grad_input only), one of GEMM_ALGORITHMS, or
    'zeros' (no tap reaches the output: nothing to sum). `layout`: for grad_weight on the
    compiled kernel, its layout (`grad_weight_layout`); for grad_input in grad_weight's
    pass, SIDE_BY_SIDE where that pass runs every group side by side. `with_grad_weight`:
    grad_input computed in grad_weight's pass (alone: its sums dropped). `wide_w`:
    grad_input's W taps summed as one (`grad_input_wide_w`). `fan_out`: the gradient as
    a depthwise layer's over C_in channels (one cotangent channel per group, repeated for
    its inputs). `planar`: grad_input with vectors along input pixels, over a planar copy
    of the cotangent."""

    algorithm: VjpAlgorithm
    flops: int
    workspace_bytes: int  # about: the model's count of its scratch memory
    threads: int
    est_seconds: float
    layout: native.GradWeightLayout | None = None
    with_grad_weight: bool = False
    wide_w: bool = False
    fan_out: bool = False
    planar: bool = False

    @property
    def native(self) -> bool:
        return self.algorithm in (VjpAlgorithm.NATIVE, VjpAlgorithm.WINOGRAD)

    def describe(self) -> str:
        """One line: the path, then how the compiled kernel lays it out."""
        name = self.algorithm
        if self.native:
            name += f" ({native.isa()})"
        how = {
            VjpAlgorithm.WINOGRAD: "F(2,3) along D on the transformed cotangent",
            VjpAlgorithm.GATHER: "GEMMs over gathered cotangent rows (one copy feeds both "
                                 "gradients)",
            VjpAlgorithm.SHIFT: "shifted GEMMs over a grid of cotangent rows (one copy feeds "
                                "both gradients)",
            VjpAlgorithm.DIRECT: "multiply-adds broadcast over channels",
            VjpAlgorithm.INDEXED: "one gather of the products' cotangent, one GEMM",
            VjpAlgorithm.ZEROS: "no tap reaches the output",
        }.get(self.algorithm, "")
        if self.fan_out:
            which = "grad_input" if self.layout is None else "grad_weight"
            how = (f"a depthwise {which} over C_in channels, each group's cotangent channel "
                   f"repeated for its inputs{'' if self.native else ' (' + how + ')'}")
        elif self.with_grad_weight:
            how = "in grad_weight's pass"
        elif self.algorithm == VjpAlgorithm.NATIVE and self.layout is not None:
            how = _LAYOUT_NAMES[self.layout]
        elif self.planar:
            how = "vectors along input pixels, over a planar copy of the cotangent"
        elif self.algorithm == VjpAlgorithm.NATIVE:
            how = "a correlation of the cotangent, channels swapped" + (
                ", W taps as one" if self.wide_w else "")
        return f"{name}: {how}" if how else name


_LAYOUT_NAMES = {
    native.GradWeightLayout.ALONG_OUT: "vectors along C_out/g, packed then unpacked",
    native.GradWeightLayout.ALONG_IN: "vectors along C_in/g, x read in place",
    native.GradWeightLayout.DEPTHWISE: "one channel per group, per-worker partial sums",
    native.GradWeightLayout.WIDE: "every W tap's columns in one run",
    native.GradWeightLayout.PLANAR: "vectors along input pixels, over planar copies",
    native.GradWeightLayout.SIDE_BY_SIDE: "vectors along every group's C_in/g side by side, "
                                          "x read in place"}


@dataclass(frozen=True)
class VjpPlan:
    """What a backward call runs: for grad_input and grad_weight separately, the path, its
    FLOPs, workspace, threads and modelled time. Built once per call (`make_vjp_plan`),
    never revised while it runs; ``print(plan)`` summarises it."""

    spec: ConvSpec
    compute_dtype: np.dtype
    grad_input: GradStep | None  # None: not asked for
    grad_weight: GradStep | None
    threads: int
    workspace_limit: int
    budget: int  # elements of scratch per worker for the NumPy/BLAS paths
    shared_queue: bool = False  # both gradients' kernel tasks in one queue
    multiplier: "VjpPlan | None" = None  # the depthwise layer's plan a multiplier runs
    fan_out: "VjpPlan | None" = None  # the depthwise plan both gradients run (GradStep.fan_out)

    @property
    def steps(self) -> tuple[GradStep, ...]:
        return tuple(s for s in (self.grad_input, self.grad_weight) if s is not None)

    @property
    def gemm_algorithm(self) -> str | None:
        """The NumPy/BLAS path that serves what the kernel does not, if any."""
        return next((s.algorithm for s in self.steps if s.algorithm in GEMM_ALGORITHMS),
                    None)

    @property
    def algorithm(self) -> str:
        """The paths in one name: 'native', 'shift', or 'native+gather' (grad_input's
        first where they differ)."""
        names = list(dict.fromkeys(s.algorithm for s in self.steps))
        return "+".join(names) or "none"

    @property
    def est_seconds(self) -> dict:
        """The model's time for the whole backward, keyed by `algorithm` (as the forward's
        Plan keys its candidates)."""
        return {self.algorithm: sum(s.est_seconds for s in self.steps)}

    @property
    def flops(self) -> int:
        return sum(s.flops for s in self.steps)

    @property
    def workspace_bytes(self) -> int:
        return sum(s.workspace_bytes for s in self.steps)

    def __str__(self) -> str:
        s = self.spec
        lift = 3 - s.ndim
        total = sum(st.est_seconds for st in self.steps)
        lines = [
            f"convtranspose backward plan for {s.op}",
            f"  input        {s.input_shape} {s.input_dtype.name}",
            f"  weight       {s.weight_shape} {s.weight_dtype.name}",
            f"  cotangent    {s.output_shape} (accumulates in {self.compute_dtype.name})",
            f"  settings     stride={s.stride[lift:]} padding={s.padding[lift:]} "
            f"dilation={s.dilation[lift:]} output_padding={s.output_padding[lift:]} "
            f"groups={s.groups}",
        ]
        if self.multiplier is not None:
            lines.append(f"  multiplier   run as a depthwise layer of {s.c_out} channels, "
                         f"each input channel repeated {s.c_out_per_group} times")
        for name, step in (("grad_input", self.grad_input), ("grad_weight", self.grad_weight)):
            lines.append(f"  {name:<12} " + ("not asked for" if step is None else
                                             step.describe()))
        est = ", ".join(f"{n} {st.est_seconds * 1e3:.2f}" for n, st in
                        (("grad_input", self.grad_input), ("grad_weight", self.grad_weight))
                        if st is not None)
        lines += [
            f"  model ms     {est} (total {total * 1e3:.2f})",
            f"  useful       {self.flops / 1e9:.3f} GFLOP",
            f"  threads      {self.threads}"
            + (" (both gradients' kernel tasks in one queue)" if self.shared_queue else ""),
            f"  workspace    about {self.workspace_bytes / 2**20:.1f} MiB "
            f"(limit {self.workspace_limit / 2**20:.1f} MiB)",
        ]
        return "\n".join(lines)

    __repr__ = __str__


def workspace_limit(spec: ConvSpec, workspace: int | None) -> int:
    """Default: max(64 MiB, 25% of the output); `workspace` (bytes) overrides it."""
    if workspace is not None:
        if isinstance(workspace, bool) or not isinstance(workspace, int) or workspace < 0:
            raise ValueError(f"plan: 'workspace' must be a number of bytes >= 0, got "
                             f"{workspace!r}")
        return workspace
    return max(DEFAULT_WORKSPACE, spec.output_bytes // 4)


def geometry_key(phase: Phase) -> tuple:
    return (phase.count, tuple(tuple((t.offset, t.lo, t.hi) for t in axis)
                               for axis in phase.axis_taps))


def live_phases(spec: ConvSpec) -> list[Phase]:
    """The phases that carry taps and have outputs."""
    return [p for p in phases_3d(spec) if p.tap_count and p.size]


def native_phase_groups(spec: ConvSpec, live: list[Phase]) -> tuple[tuple[Phase, ...], ...]:
    """The phases the native kernel computes together. Residues along an axis that read
    the same input for s neighbouring outputs (kernel a multiple of stride) merge into
    one phase group whose outputs are every residue's channels (`merged_row`): the input
    is read once for all of them. CHANNELS mode merges the W residues of one (D, H)
    residue, which lie side by side in the output (one run of s_w * C_out channels, the
    kernel writing whole output rows in order; with several conv groups, each group's
    outputs of each residue a run of their own, `CtJob::oout`). DEPTHWISE mode likewise
    where a pixel's outputs take less than four cache lines (apart, every residue wrote
    part of each line: 2 -> 2 k3 s2 2-D 0.68x the time merged, 24 -> 24 k(5, 3, 2) s2
    0.45x, 52 -> 52 k(3, 4, 3) s2 0.80x; 3 of 21 layers of 78-384 channels ran up to
    1.32x as long) and every W residue merges (its outputs then one run a position). Dot
    mode merges along every axis (`dot_phase_groups`)."""
    mode = native_mode(spec)
    if mode == native.DOT:
        return dot_phase_groups(spec, tuple(live))
    sw = spec.stride[2]
    apart = tuple((p,) for p in live)
    if sw == 1:
        return apart
    edges = _merges_w_edges(spec)
    phantoms = phantom_work(spec) if edges else 1.0
    groups = tuple(sorted(_merged_along(spec, [(p,) for p in live], 2, edges,
                                        phantom_work=phantoms),
                          key=lambda g: g[0].residue))
    if mode == native.DEPTHWISE and (spec.c_out * spec.compute_dtype.itemsize >= 256
                                     or any(1 < len(g) < sw for g in groups)):
        return apart
    return groups


def _merges_w_edges(spec: ConvSpec) -> bool:
    """Whether W residues merge with edges (residues rotated, or of unequal counts): it
    pays where a pixel's outputs end inside a cache line, so that residues written apart
    each write part of lines (8 -> 13 k3x4 s4 2-D 2.08 -> 1.21 ms, 51 -> 77 k3 s3 1-D 5.8
    -> 4.2), and its rows are long enough for the edges' own tasks and packed weights
    (323 -> 96 k4 s2 on 3x5x4: 2.4 -> 3.1 ms; 48 -> 32 k3 s3, whole lines a pixel: 4.2 ->
    4.8)."""
    return (spec.c_out * spec.compute_dtype.itemsize % 64 != 0
            and spec.in_spatial[2] >= MERGE_EDGES_FROM_WIDTH)


# Dot mode merges residues up to this many outputs a phase group (its kernel takes them
# in register blocks of up to 8, each reading the input rows again from cache).
DOT_MERGE_MAX_OUT = 32


@functools.lru_cache(maxsize=256)
def dot_phase_groups(spec: ConvSpec, live: tuple[Phase, ...]) -> tuple[tuple[Phase, ...], ...]:
    """Dot mode's phase groups: residues merged along W, then H, then D, each where it
    loads the input fewer times (`_dot_block_loads`) and the model says it pays
    (`_dot_groups_seconds`; rotated residues leave edges as phase groups of their own),
    a phase group keeping at most DOT_MERGE_MAX_OUT outputs. Its vectors run along the
    input channels: a thin layer's phases each read the whole input for an output or
    two (126 -> 2 g2 k2 s2 read it 8 times), merged they read it once. A merged group's
    outputs lie where each residue's positions do (`CtJob::oout`)."""
    def cost(phase_groups) -> tuple[int, float]:
        return _dot_block_loads(spec, phase_groups), _dot_groups_seconds(spec, phase_groups)

    items = [(p,) for p in live]
    items_cost = cost(items)
    for axis, edges in ((2, _merges_w_edges(spec)), (1, True), (0, True)):
        if spec.stride[axis] > 1:
            merged = _merged_along(spec, items, axis, edges, DOT_MERGE_MAX_OUT)
            merged_cost = cost(merged)
            if all(m < c for m, c in zip(merged_cost, items_cost)):  # both lower
                items, items_cost = merged, merged_cost
    return tuple(sorted(items, key=lambda g: g[0].residue))


def _dot_block_loads(spec: ConvSpec, phase_groups) -> int:
    """Pixels times register blocks of outputs over these phase groups: how often dot
    mode loads the input. A merge that leaves it as it was saves nothing (58 -> 5 k6 s2
    merged two phases of 5 outputs into blocks of 5 and 5, and ran 1.3x as long)."""
    block = native.DOT_MAX_OUT or 8
    return sum(ceil_div(len(g) * spec.c_out_per_group, block) * g[0].size for g in phase_groups)


def _merged_along(spec: ConvSpec, items: list[tuple[Phase, ...]], axis: int, edges: bool,
                  most: int | None = None, phantom_work: float = 1.0
                  ) -> list[tuple[Phase, ...]]:
    """`items` (phase groups) with the residues along `axis` of those alike elsewhere
    merged where they read the same input (`merged_row`; `phantom_work` as there), while a
    merged group holds at most `most` outputs (None: any)."""
    s, width = spec.stride[axis], spec.in_spatial[axis]
    rows: dict[tuple, list[tuple[Phase, ...]]] = {}
    for item in items:
        key = tuple((p.residue[a], p.count[a], p.axis_taps[a]) for p in item
                    for a in range(3) if a != axis)
        rows.setdefault(key, []).append(item)
    merged_items = []
    for row in rows.values():
        merged = None
        if len(row) > 1 and (most is None
                             or len(row) * len(row[0]) * spec.c_out_per_group <= most):
            merged = merged_row(sorted(row, key=lambda g: g[0].residue[axis]), axis, s, width,
                                edges, phantom_work)
        merged_items.extend(merged or row)
    return merged_items


def _axis_phase(phase: Phase, axis: int, first: int, count: int, shift: int,
                width: int) -> Phase:
    """`phase`'s outputs [shift, shift + count) along `axis` as a phase of their own: its
    first output at position `first` along it (its `residue`), its taps there reading
    from `shift` on (a tap whose reads all fall outside the input keeps an empty range:
    its outputs are still stored, as zero)."""
    taps = []
    for t in phase.axis_taps[axis]:
        offset = t.offset + shift
        lo = min(count, max(0, -offset))
        taps.append(type(t)(t.k, offset, lo, max(lo, min(count, width - offset))))

    def put(values: tuple, value) -> tuple:
        return tuple(value if a == axis else v for a, v in enumerate(values))

    return Phase(put(phase.residue, first), put(phase.count, count),
                 put(phase.axis_taps, tuple(taps)))


MERGE_EDGES_FROM_WIDTH = 8
# Residues of unequal taps merge with PHANTOM taps where that costs at most this many
# times their own products (`phantom_work`), and where their output, fetched once per
# residue apart, costs more than the phantoms' products: the output's bytes count as
# PHANTOM_FLOPS_PER_BYTE products each, twice the ratio of the kernel's rate to memory's
# (~150 GFLOP/s to ~10 GB/s on two cores). Fitted on the 55 layers of seeds 60-107 that
# merge without these limits: 15 of the 17 they keep merged ran 0.60-0.95x as long (two
# 1.15x and 1.23x); of the 38 they leave apart, 24 ran 1.01-1.42x as long merged, 14
# 0.63-0.99x.
PHANTOM_MAX_WORK = 1.5
PHANTOM_FLOPS_PER_BYTE = 7.5
# DEPTHWISE mode's products cost more (a load each, at a fifth of CHANNELS mode's rate):
# its merges with PHANTOM taps paid from 0.3 products a byte of output on (2-D k3 s2,
# k5 s2 and k4 s3 3-D, 0.66-0.90x the time apart) and lost at 0.05 (3-D k7 s2 on 54
# channels, 1.16-1.25x).
DEPTHWISE_PHANTOM_FLOPS_PER_BYTE = 1.5


def phantom_work(spec: ConvSpec) -> float:
    """How many times its residues' own products a W-merged CHANNELS or DEPTHWISE phase
    group may compute with PHANTOM taps (`merged_row`)."""
    per_byte = (DEPTHWISE_PHANTOM_FLOPS_PER_BYTE if native_mode(spec) == native.DEPTHWISE
                else PHANTOM_FLOPS_PER_BYTE)
    return min(PHANTOM_MAX_WORK, 1 + per_byte * spec.output_bytes / max(spec.useful_flops, 1))


def _with_taps(phase: Phase, axis: int, offsets: list[int]) -> Phase:
    """`phase` with a tap at each of `offsets` along `axis`: its own where it has one
    there, else a PHANTOM (zero weight)."""
    own = {t.offset: t for t in phase.axis_taps[axis]}
    taps = tuple(own.get(o) or AxisTap(PHANTOM, o, 0, 0) for o in offsets)
    return Phase(phase.residue, phase.count,
                 tuple(taps if a == axis else t for a, t in enumerate(phase.axis_taps)))


def merged_row(row: list[tuple[Phase, ...]], axis: int, s: int, width: int,
               edges: bool = True, phantom_work: float = 1.0
               ) -> list[tuple[Phase, ...]] | None:
    """The residues along `axis` of phase groups alike elsewhere (in residue order; every
    residue that carries taps, all s of them or fewer where the stride passes the
    kernel) as one merged phase group and, around it, phase groups for the outputs it
    leaves; None where they do not merge. Taking residue r0 first, output q * s + r + s *
    wrap is residue r's position q + wrap, wrap 1 where r < r0: the merged group's outputs
    at q read the same input where each residue's tap offsets plus its wrap are the same
    (padding rotates the residues: 8 -> 13 k3x4 s4 p1 2-D read residue 3 one input
    ahead, and its phases ran apart, 4.2 against 2.1 ms on one core merged). Residues
    without taps, or a rotation, leave gaps between the merged outputs (`CtJob::oout`).
    Without `edges`, only rows that merge whole (no rotation, equal counts).

    Residues whose shifted offsets differ merge too where that computes at most
    `phantom_work` times their own products, each given a PHANTOM tap at the offsets that
    only others have (a kernel not a multiple of the stride: k3 s2's residues hold 2 taps
    and 1): apart, residues that each write part of a pixel's lines fetch each line from
    memory once per residue (16 -> 22 g2 k3 s2 on 4x18x21x29: 18.6 ms on one core, 2.3x
    its 16 -> 32 twin, which stores whole lines)."""
    offsets = [[t.offset for t in group[0].axis_taps[axis]] for group in row]
    counts = [group[0].count[axis] for group in row]
    residues = [group[0].residue[axis] for group in row]
    own = sum(len(offs) for offs in offsets)
    best = None  # (offsets every residue reads, shifted; r0; wraps), the fewest first
    for r0 in residues:
        wraps = [1 if r < r0 else 0 for r in residues]
        shifted = [{o + wrap for o in offs} for offs, wrap in zip(offsets, wraps)]
        union = set().union(*shifted)
        if all(len(one) == len(union) for one in shifted):
            best = (union, r0, wraps)
            break
        if len(union) * len(row) <= phantom_work * own and (
                best is None or len(union) < len(best[0])):
            best = (union, r0, wraps)
    if best is not None:
        union, r0, wraps = best
        merged_count = min(c - wrap for c, wrap in zip(counts, wraps))
        whole = r0 == residues[0] and all(c == merged_count for c in counts)
        if merged_count <= 0 or not (whole or edges):
            return None
        order = sorted(range(len(row)), key=lambda i: residues[i] + s * wraps[i])
        reads = sorted(union, reverse=True)  # (taps in k order: falling offsets)
        merged = tuple(_axis_phase(_with_taps(p, axis, [o - wraps[i] for o in reads]), axis,
                                   residues[i] + s * wraps[i], merged_count, wraps[i], width)
                       for i in order for p in row[i])
        ends = []  # each residue's positions before and after the merged ones
        for r, group, wrap, count in zip(residues, row, wraps, counts):
            for a, b in ((0, wrap), (merged_count + wrap, count)):
                if a < b:
                    ends.append(tuple(_axis_phase(p, axis, a * s + r, b - a, a, width)
                                      for p in group))
        return [merged, *ends]
    return None


def pair_count(spec: ConvSpec) -> int:
    """Output pairs along D of a Winograd plan (the last may hold one output)."""
    return ceil_div(spec.out_spatial[0], 2)


def pair_phase(phase: Phase) -> Phase:
    """A phase as the ``winograd`` kernel sees it: D counts output pairs, and its taps
    are the four planes of the transformed input V (offset i, read at step 4)."""
    winograd_pairs = ceil_div(phase.count[0], 2)
    taps = tuple(AxisTap(i, i, 0, winograd_pairs) for i in range(4))
    return Phase(phase.residue, (winograd_pairs, *phase.count[1:]),
                 (taps, *phase.axis_taps[1:]))


def pair_base(spec: ConvSpec) -> tuple[int, tuple[int, int, int]]:
    """(input offset of the first D tap, the kernel indices of the three D taps in order
    of offset) of a spec that `winograd_fits`."""
    taps = sorted(phases_3d(spec)[0].axis_taps[0], key=lambda t: t.offset)
    return taps[0].offset, tuple(t.k for t in taps)


def pair_input_bytes(spec: ConvSpec) -> int:
    """Size of the transformed input V (N, pairs, 4, H, W, C_in)."""
    return (spec.batch * pair_count(spec) * 4 * spec.in_spatial[1] * spec.in_spatial[2]
            * spec.c_in * spec.compute_dtype.itemsize)


def winograd_axis_fits(spec: ConvSpec, outputs_d: int, summed_channels: int) -> bool:
    """The rule the forward and grad_input share: Winograd F(2,3) along D needs the
    compiled kernel, a D axis of stride 1, dilation 1 and three taps, at least two outputs
    along it, and enough channels summed in each product to pay for the transforms."""
    return (native.AVAILABLE and spec.stride[0] == 1 and spec.dilation[0] == 1
            and spec.kernel[0] == 3 and outputs_d >= 2
            and summed_channels >= max(WINOGRAD_MIN_CHANNELS, native.TAPS_INNER_BELOW))


def winograd_fits(spec: ConvSpec, limit: int) -> bool:
    """Whether ``winograd`` serves this layer: `winograd_axis_fits` with D's three taps
    all reaching its outputs (offsets consecutive), the native kernel runs it in channels
    mode, its tiles read and write in place, and V (with a converted input, if any) fits
    in the workspace limit."""
    if (not winograd_axis_fits(spec, spec.out_spatial[0], spec.c_in_per_group)
            or native_mode(spec) != native.CHANNELS):
        return False
    live = [p for p in phases_3d(spec) if p.tap_count and p.size]
    if not live or any(len(p.axis_taps[0]) != 3 for p in live):
        return False
    if not native_shares_tiles(spec, limit):
        return False
    converted = (spec.batch * math.prod(spec.in_spatial) * spec.c_in
                 * spec.compute_dtype.itemsize if spec.input_dtype != spec.compute_dtype else 0)
    return pair_input_bytes(spec) + converted <= limit


def buffer_elems(spec: ConvSpec, algorithm: str, phase_group: tuple[Phase, ...], tile: Tile,
                 whole_input: bool = False) -> int:
    """Workspace elements one task needs (the kernels slice their buffers the same way).
    `whole_input`: native converts the input once for every task (not in the task's
    buffer)."""
    return registry()[algorithm].buffer_elems(spec, phase_group, tile, whole_input)


def native_input_box(spec: ConvSpec, phase: Phase, tile: Tile) -> tuple[tuple[int, int],
                                                                       tuple[int, int]]:
    """Input planes and rows [lo, hi) a native tile reads (clipped to the input)."""
    (dmin, dmax), (hmin, hmax) = phase.halo(0), phase.halo(1)
    in_d, in_h = spec.in_spatial[0], spec.in_spatial[1]
    d0, h0 = min(in_d, max(0, tile.d[0] + dmin)), min(in_h, max(0, tile.h[0] + hmin))
    return ((d0, max(d0, min(in_d, tile.d[1] + dmax))),
            (h0, max(h0, min(in_h, tile.h[1] + hmax))))


# Outputs of at least this many bytes leave the compiled kernel by non-temporal stores:
# far past the L2s, normal stores would first read every line they overwrite and evict
# lines still in use. One core: W2's 256 MiB 107 -> 82 ms, W1's and W4's 32 MiB 35 -> 30
# and 54 -> 48 ms. At 8 MiB (W3, W8) the gain was 2-3%, less than a consumer would then
# lose reading the result from memory rather than from the L3.
STREAM_OUTPUT_FROM_BYTES = 16 << 20


def streams_output(nbytes: int) -> bool:
    return nbytes >= STREAM_OUTPUT_FROM_BYTES


def native_converts_whole_input(spec: ConvSpec, limit: int) -> bool:
    """An input of another dtype is converted once for every phase when that fits (see
    `native_whole_input_fits`); otherwise each task converts the planes and rows it reads
    (a phase at a time: with s^3 phases, s^3 conversions of the input; W2 in float16 took
    2.3x its float32 time so)."""
    return spec.input_dtype != spec.compute_dtype and native_whole_input_fits(spec, limit)


def native_whole_input_fits(spec: ConvSpec, limit: int) -> bool:
    """Whether a copy of the whole input in the compute dtype fits in the workspace limit
    (in half of it where tiles also need blocks to round the output)."""
    size = spec.batch * math.prod(spec.in_spatial) * spec.c_in * spec.compute_dtype.itemsize
    return size <= (limit // 2 if _rounds_blocks(spec) else limit)


def _rounds_blocks(spec: ConvSpec) -> bool:
    """Whether native tiles need a block of the compute dtype to round the output (the
    kernel rounds float16 and bfloat16 itself as it stores)."""
    return (spec.result_dtype != spec.compute_dtype
            and native.half_kind(spec.result_dtype) == native.HALF_NONE)


def native_shares_tiles(spec: ConvSpec, limit: int) -> bool:
    """Whether native tiles read the input and write the output in place (a C-contiguous
    input assumed), so that threads can share a tile: none converts its input rows nor
    rounds its output through a block."""
    converts = (spec.input_dtype != spec.compute_dtype
                and not native_converts_whole_input(spec, limit))
    return not converts and not _rounds_blocks(spec)


def native_buffer_elems(spec: ConvSpec, phase: Phase, tile: Tile, convert_input: bool,
                        phases: int = 1) -> int:
    """The native kernel reads the input and writes the output in place; it needs room
    only to convert the tile's input (another dtype, or channels not contiguous) and to
    round an output it cannot round itself as it stores (not float16 nor bfloat16)."""
    nn, nd, nh = (tile.n[1] - tile.n[0], tile.d[1] - tile.d[0], tile.h[1] - tile.h[0])
    elems = 0
    if convert_input:
        (d0, d1), (h0, h1) = native_input_box(spec, phase, tile)
        elems += nn * max(0, d1 - d0) * max(0, h1 - h0) * spec.in_spatial[2] * spec.c_in
    if _rounds_blocks(spec):
        elems += nn * nd * nh * phase.count[2] * phases * spec.c_out  # rounded by NumPy
    return elems


def bordered_slab(phase_group: tuple[Phase, ...], tile: Tile
                  ) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
    """Extent and first input position (D, H, W) of the slab a scatter or direct tile
    reads: the tile's rows widened by every phase's tap offsets (positions outside the
    input are zeros in the slab, so that every tap window is a plain shift of it)."""
    lo = [min(p.halo(i)[0] for p in phase_group) for i in range(3)]
    hi = [max(p.halo(i)[1] for p in phase_group) for i in range(3)]
    qw = max(p.count[2] for p in phase_group)
    first = (tile.d[0] + lo[0], tile.h[0] + lo[1], lo[2])
    extent = (tile.d[1] - tile.d[0] + hi[0] - lo[0], tile.h[1] - tile.h[0] + hi[1] - lo[1],
              qw + hi[2] - lo[2])
    return extent, first


def split_tiles(batch: int, count: tuple[int, int, int], max_rows: int,
                min_tiles: int = 1) -> list[Tile]:
    """Cut a (batch, D, H, W) grid into rectangular tiles of at most `max_rows` rows
    (a row is one position along W), whole along W; at least `min_tiles` when the grid
    is big enough that splitting keeps tiles >= MIN_TILE_ROWS."""
    nd, nh, nw = count
    total = batch * nd * nh * nw
    if total == 0:
        return []
    if min_tiles > 1:
        max_rows = min(max_rows, max(MIN_TILE_ROWS, ceil_div(total, min_tiles)))
    plane = nh * nw
    tiles = []
    if plane * nd <= max_rows:
        step = max(1, max_rows // (plane * nd))
        for n0 in range(0, batch, step):
            tiles.append(Tile((n0, min(batch, n0 + step)), (0, nd), (0, nh)))
    elif plane <= max_rows:
        step = max(1, max_rows // plane)
        step = ceil_div(nd, ceil_div(nd, step))  # even out the last tile
        for n0 in range(batch):
            for d0 in range(0, nd, step):
                tiles.append(Tile((n0, n0 + 1), (d0, min(nd, d0 + step)), (0, nh)))
    else:
        step = max(1, max_rows // nw)
        step = ceil_div(nh, ceil_div(nh, step))
        for n0 in range(batch):
            for d0 in range(nd):
                for h0 in range(0, nh, step):
                    tiles.append(Tile((n0, n0 + 1), (d0, d0 + 1), (h0, min(nh, h0 + step))))
    return tiles


def cut_rows(tiles: list[Tile], width: int, threads: int, max_rows: int = 0) -> list[Tile]:
    """Tiles of single rows cut along W where there are too few rows to give every thread
    several, or a row is longer than `max_rows` positions (0: no bound). A 1-D layer's one
    row ran on one core, or each conv group swept all of it: 28 -> 4 g4 on 369779 pixels,
    both gradients 54 -> 14 ms with this and `_execute.repeat_channels` on the kernel.
    Pieces keep MIN_ROW_PIECE positions at least."""
    lines = sum((t.n[1] - t.n[0]) * (t.d[1] - t.d[0]) * (t.h[1] - t.h[0]) for t in tiles)
    pieces = max(ceil_div(width, max_rows) if max_rows else 1,
                 ceil_div(4 * threads, max(lines, 1)))
    pieces = min(pieces, width // MIN_ROW_PIECE)
    if pieces <= 1:
        return tiles
    out = []
    for t in tiles:
        for n in range(*t.n):
            for d in range(*t.d):
                for h in range(*t.h):
                    out += [Tile((n, n + 1), (d, d + 1), (h, h + 1),
                                 (width * i // pieces, width * (i + 1) // pieces))
                            for i in range(pieces)]
    return out


def _gemm_rate(narrow: float) -> float:
    """GEMM_PEAK was measured with AVX-512's 16 float32 lanes: the machine's BLAS scales
    with its vectors as the native kernel does (`native_rate`), so that the two models
    keep their ratio on AVX2 (halving only the kernel's sent a 384 -> 128 layer to
    'shift' at 3.7x native's time)."""
    lanes = native.layout(4)[0] if native.AVAILABLE else 16
    return GEMM_PEAK * lanes / 16 * max(narrow, 1) / (max(narrow, 1) + 12)


def output_write_seconds(spec: ConvSpec) -> float:
    """Writing the output and reading it back once, at the copy rate."""
    n_out = spec.batch * math.prod(spec.out_spatial)
    return 2 * n_out * spec.c_out * spec.result_dtype.itemsize / COPY_BYTES_PER_S


def estimate_seconds(spec: ConvSpec, algorithm: str) -> float:
    """A coarse single-core cost model (the kernel's `estimate`): GEMM time at the shape's
    rate plus copy traffic; a layer no tap reaches costs its output's write."""
    if not live_phases(spec):
        return output_write_seconds(spec)
    return registry()[algorithm].estimate(spec)


def native_mode(spec: ConvSpec, weight_in_place: bool = True) -> native.Mode:
    """How the native kernel lays its vectors for this layer (one place for the rule).
    `weight_in_place`: dot mode reads the weight where it lies (the forward's; grad_input's
    is copied, transposed)."""
    return _native_mode(spec, weight_in_place, native.isa())


@functools.lru_cache(maxsize=1024)  # asked on every call: the rule models the weight's use
def _native_mode(spec: ConvSpec, weight_in_place: bool, isa: str) -> native.Mode:
    cig, cog = spec.c_in_per_group, spec.c_out_per_group
    if cig == 1 and (cog == 1 or expands_to_depthwise(spec)):
        return native.DEPTHWISE
    if cog > dot_max_out(spec.compute_dtype.itemsize):
        # Many outputs: CHANNELS mode copies the weight into its layout on every call, dot
        # mode reads it where it lies; where each weight element meets few input pixels,
        # the copy outweighs the products (`DOT_IN_PLACE_BELOW`), if the models agree.
        lanes = native.layout(spec.compute_dtype.itemsize)[0]
        if (weight_in_place and cig >= lanes and weight_reuse(spec) < DOT_IN_PLACE_BELOW
                and dot_seconds(spec) < channels_seconds(spec)):
            return native.DOT
        return native.CHANNELS
    if cog <= dot_max_out(spec.compute_dtype.itemsize) and cig >= 8:
        # Past four outputs each pixel reduces across lanes more often: only where each
        # output sums enough (its taps, on average over the phases, times the channels)
        # to pay for that (48 -> 32 g4 k3x2x7 s4 sums 8 values an output: 8 lane
        # reductions for 8 multiply-adds a pixel, 7.6 ms against CHANNELS mode's 6.3).
        lanes = native.layout(spec.compute_dtype.itemsize)[0]
        per_output = cig * math.prod(spec.kernel) / math.prod(spec.stride)
        if cog <= 4 or per_output >= 2 * lanes:
            return native.DOT
    return native.CHANNELS


def dot_max_out(itemsize: int) -> int:
    """The most outputs per group that dot mode takes from CHANNELS mode: up to 3/4 of a
    vector's lanes (at least four; the kernel's DOT_MAX_OUT at most). Measured, 384 -> C_out
    k5 2-D, two threads: AVX2 dot 134-156 GFLOP/s at 5-6 outputs against CHANNELS' 99-119,
    132 against 160 at 8; AVX-512 dot 195-213 at 5-8 against 65-102."""
    lanes = native.layout(itemsize)[0] if native.AVAILABLE else 0
    return max(4, min(native.DOT_MAX_OUT, 3 * lanes // 4))


def expands_to_depthwise(spec: ConvSpec) -> bool:
    """A channel multiplier (one input channel per group, fewer output channels per group
    than a vector's lanes) runs as a depthwise layer over its input with each channel
    repeated C_out/g times: one copy of the input, where channels mode would fill a
    vector of outputs per group with C_out/g lanes."""
    return (spec.groups > 1 and spec.c_in_per_group == 1
            and 1 < spec.c_out_per_group < native.layout(spec.compute_dtype.itemsize)[0])


def per_input_channel_weight(spec: ConvSpec, w: np.ndarray) -> np.ndarray:
    """A grouped layer's weight with one output channel per group (C_out, taps, m = C_in/g)
    as the depthwise weight over its C_in input channels, (C_in, taps, 1): channel g*m + j
    weighs with W[g, tap, j]. Serves the forward's `fan_in` and grad_input's fan-out, the
    two ways such a layer runs as a depthwise one."""
    m, taps = spec.c_in_per_group, math.prod(spec.kernel)
    return w.reshape(spec.c_out, taps, m).transpose(0, 2, 1).reshape(spec.c_in, taps, 1)


# Below this many channels summed a tap's multiply-adds are too few to pay for loading and
# storing the block's sums once per tap: the gradients sum a tap's W taps as one
# (`_vjp_native.grad_input_wide_w`, `_vjp.grad_weight_wide_w`).
FUSE_W_BELOW_CHANNELS = 16


@functools.lru_cache(maxsize=256)  # asked twice a call: 0.2 ms over 64 phases
def planar_geometry(spec: ConvSpec) -> tuple[int, int, int, int]:
    """(top, left, height, pitch) of the planar copy PLANAR mode reads: every output (h, w)
    of every live phase reads pixels (h + offset, w + offset) of its (H, W) taps, which
    must lie in the copy's image (`top` rows and `left` columns of zeros before the
    input's pixels, zeros after them up to `height` rows of `pitch`)."""
    pads = []
    for axis in (1, 2):
        before, reach = 0, spec.in_spatial[axis]
        for phase in live_phases(spec):
            offsets = [t.offset for t in phase.axis_taps[axis]]
            before = max(before, -min(offsets))
            reach = max(reach, phase.count[axis] + max(offsets))
        pads.append((before, before + reach))
    (top, height), (left, pitch) = pads
    return top, left, height, pitch


def planar_chunk(c_out_per_group: int) -> int:
    """Outputs per register block of a planar job: the largest divisor of C_out/g up to
    the kernel's PLANAR_MAX_OUT (12 outputs as two blocks of 6, each reading the group's
    inputs from L1)."""
    most = max(1, min(c_out_per_group, native.PLANAR_MAX_OUT))
    return max(d for d in range(1, most + 1) if c_out_per_group % d == 0)


def planar_bytes(spec: ConvSpec) -> int:
    """The planar copy's size (with the compute-dtype copy it is made from, where the
    input is of another dtype)."""
    return planar_slab_bytes(spec, spec.batch * spec.in_spatial[0])


def planar_slab_bytes(spec: ConvSpec, planes: int) -> int:
    """The size of a planar copy of `planes` input planes."""
    return planes * planar_plane_bytes(spec) + _planar_tail_bytes(spec)


def planar_plane_bytes(spec: ConvSpec) -> int:
    """The planar copy's bytes per input plane (a batch item's D position), with the
    compute-dtype copy it is made from where the input is of another dtype."""
    _, _, height, pitch = planar_geometry(spec)
    item = spec.compute_dtype.itemsize
    pixels = math.prod(spec.in_spatial[1:]) * spec.c_in
    converted = pixels * item if spec.input_dtype != spec.compute_dtype else 0
    return spec.c_in * native.planar_image(height, pitch, item) * item + converted


def _planar_tail_bytes(spec: ConvSpec) -> int:
    """What the planar copy holds past its images (`native.planar_size`)."""
    _, _, height, pitch = planar_geometry(spec)
    item = spec.compute_dtype.itemsize
    return native.planar_size((0, 0, 0, 0, spec.c_in), height, pitch, item) * item


def planar_slab_planes(spec: ConvSpec, limit: int) -> int:
    """Input planes a planar copy may hold within `limit` bytes."""
    return max(0, limit - _planar_tail_bytes(spec)) // planar_plane_bytes(spec)


def planar_reach(phase_groups: tuple[tuple[Phase, ...], ...]) -> int:
    """Input planes past a tile's output rows (along D) that some phase group's tile of
    those rows reads: one output row reads 1 + reach planes."""
    halos = [p.halo(0) for g in phase_groups for p in g]
    return max(hi for _, hi in halos) - min(lo for lo, _ in halos)


def planar_tile_rows(count: tuple[int, int, int], planes: int, reach: int) -> int:
    """The most positions a tile of a phase group with output counts `count` may cover
    where PLANAR's copy is made in slabs of `planes` input planes, so that every tile's
    planes fit one slab: a tile of one batch item reads its D rows and `reach` more; a
    tile of several items reads count[0] + reach planes of each."""
    nd, plane = count[0], count[1] * count[2]
    if nd + reach > planes:
        return max(1, planes - reach) * plane
    return planes // (nd + reach) * nd * plane


def input_slabs(spec: ConvSpec, phase_groups: tuple[tuple[Phase, ...], ...],
                tasks: list[Task], planes: int) -> tuple[InputSlab, ...]:
    """The tasks, in order, cut into runs whose input blocks (batch items by planes) fit
    `planes` planes: each run's block is the smallest holding every task's."""
    slabs: list[InputSlab] = []
    block = None  # (n0, n1, d0, d1) of the open run, which starts at task `first`
    first = 0
    for i, task in enumerate(tasks):
        (d0, d1), _ = native_input_box(spec, phase_groups[task.phase_group][0], task.tile)
        if d0 == d1:  # reads nothing
            continue
        n0, n1 = task.tile.n
        grown = ((n0, n1, d0, d1) if block is None else
                 (min(block[0], n0), max(block[1], n1), min(block[2], d0), max(block[3], d1)))
        if block is not None and (grown[1] - grown[0]) * (grown[3] - grown[2]) > planes:
            slabs.append(InputSlab(block[:2], block[2:], (first, i)))
            first, grown = i, (n0, n1, d0, d1)
        block = grown
    if block is not None:
        slabs.append(InputSlab(block[:2], block[2:], (first, len(tasks))))
    return tuple(slabs)


# Dot mode's time on one core, as costs per operation (seconds), fitted in log space on
# the 150 dot-mode layers of sweeps 30-45 (two threads, AVX-512; measured / modelled over
# them: median 1.02, 10th-90th percentile 0.64-1.48, where the rate model it replaces
# read 0.39-1.77 and sent 13 of them to an algorithm over 1.2x slower than the best, up
# to 2.4x; fitted on half, the other half's choices lost 1.042x against 1.056x):
DOT_VECTOR_FMA = 0.29e-9  # a vector multiply-add (an output, a tap, a vector of channels)
DOT_VECTOR_LOAD = 0.35e-9  # an input vector, loaded once per tap for the block's outputs
DOT_OUTPUT = 0.16e-9  # an output's sum: its lanes reduced and stored
DOT_PIXEL = 5.4e-9  # a pixel of a register block of outputs: its block's bookkeeping
DOT_REREAD_BYTE = 0.016e-9  # the input read again by each phase, where it outgrows L2
DOT_PHASE_GROUP = 31e-6  # a phase group's tiles started (fitted while its weight was packed)
DOT_WEIGHT_BYTE = 0.065e-9  # the weight read where it lies, once (more than 8 outputs)
# The AVX2 build's DOT_VECTOR_FMA, DOT_OUTPUT and DOT_PIXEL, refitted the same way on its
# 38 dot-mode layers of seeds 130-134 (two threads, a 2-core AMD EPYC Zen 3): an output's
# lanes reduced and stored cost 23x the AVX-512 fit, a multiply-add 1.5x, a block's
# bookkeeping next to nothing. The log of measured / modelled: rms 0.49 -> 0.27 (fitted on
# three seeds, the other two's 0.51 -> 0.30). The AVX-512 fit had sent 32 -> 4 k5 2-D on
# 4x74x98 to dot mode at 4.4 ms, where planar takes 1.9. Those layers had at most
# `dot_max_out` outputs a group; past it (dot mode reading a big weight in place) the two
# modes ran level on 384 -> 96 k5 on 1x3x3 and 384 -> 384 k5 on 2x1x1, as the AVX-512
# fit has them.
DOT_AVX2 = (0.44e-9, 3.7e-9, 0.036e-9)


def _dot_costs(spec: ConvSpec) -> tuple[float, float, float]:
    """(a vector multiply-add, an output's sum, a block's pixel) for this build and layer."""
    if (avx2_build()
            and spec.c_out_per_group <= dot_max_out(spec.compute_dtype.itemsize)):
        return DOT_AVX2
    return DOT_VECTOR_FMA, DOT_OUTPUT, DOT_PIXEL


# More outputs than dot mode's register block take it, reading the weight in place, where
# each weight element meets fewer input pixels than this and the two modes' models agree.
# Measured on the 167 layers of seeds 14-45 with more than 8 outputs and 16 input
# channels per group and at most 600 input pixels (one core, either mode forced): within
# 1.014x of the faster mode (geomean; CHANNELS mode alone 1.068x, this bound alone 1.012x,
# the models alone 1.018x). Dot mode won at 1-20 (0.40-0.96x CHANNELS' time: 384 -> 96 k5
# s(3,1,4) on 1x3x3 3.8 -> 1.7 ms) and lost past 30 (1.2-3.3x); the bound alone took it
# on 184 -> 147 k4 s3 on 3x2x2x2 (27 phases of a tap or two), 1.0 -> 1.8 ms, where the
# models say CHANNELS; the models alone took it where the bound keeps `winograd`.
DOT_IN_PLACE_BELOW = 20
CHANNELS_PACK_BYTE = 0.2e-9  # CHANNELS mode's weight gathered into its layout
FRESH_PAGE_BYTE = 0.057e-9  # memory the system hands over zeroed: 60 us a MiB (_memory)
L2_BYTES = 1 << 20


def dot_seconds(spec: ConvSpec) -> float:
    """Dot mode's time for the layer on one core (`DOT_*`), in its phase groups
    (`dot_phase_groups`)."""
    live = tuple(live_phases(spec))
    return _dot_groups_seconds(spec, dot_phase_groups(spec, live))


def _dot_groups_seconds(spec: ConvSpec, phase_groups) -> float:
    """Dot mode's time on one core for these phase groups: vectors run along the
    channels summed (C_in/g), every output's sum reduced across lanes; a group's phases
    (merged residues) read the same input, loaded once per register block of outputs;
    past a block, the weight is read from memory."""
    lanes = native.layout(spec.compute_dtype.itemsize)[0] if native.AVAILABLE else 16
    block = native.DOT_MAX_OUT or 8  # outputs per register block (AVX2's 4 not told apart)
    vectors = math.ceil(spec.c_in_per_group / lanes)
    cog = spec.c_out_per_group
    # A (D, H) tap that reads outside the input is skipped for the whole row (on few
    # pixels, most are); one that reads part of a row's W, computed for the whole block.
    inside = math.prod(_reading_inside(spec, axis) for axis in (0, 1))
    fma, output, pixel = _dot_costs(spec)
    seconds, most = 0.0, 0
    for group in phase_groups:
        p = group[0]
        outputs = len(group) * cog
        most = max(most, outputs)
        loads = math.ceil(outputs / block)
        per_block = _dot_block_pixels(min(outputs, block))
        taps = p.tap_count
        window = _window_loads(p, outputs, per_block)
        load_taps = taps if window is None else taps // len(p.axis_taps[2]) * window
        pixels = p.size * spec.batch * spec.groups
        # a row is computed in whole blocks of pixels (the last overlapping the one before)
        computed = _dot_row_pixels(p.count[2], per_block) / p.count[2]
        seconds += pixels * (inside * computed * vectors
                             * (taps * outputs * fma + load_taps * loads * DOT_VECTOR_LOAD)
                             + outputs * output + loads * pixel)
    item = spec.compute_dtype.itemsize
    input_bytes = spec.batch * math.prod(spec.in_spatial) * spec.c_in * item
    if input_bytes > L2_BYTES:
        seconds += input_bytes * len(phase_groups) * DOT_REREAD_BYTE
    if most > block:
        seconds += weight_bytes(spec, live_phases(spec)) * DOT_WEIGHT_BYTE
    return seconds + len(phase_groups) * DOT_PHASE_GROUP


def _window_loads(phase: Phase, outputs: int, pixels: int) -> float | None:
    """Input vectors dot mode loads per output pixel and (D, H) tap where it sums the
    phase's W taps through windows (forward.hpp's dot_row_window: up to 3 outputs, taps
    1 or 2 input pixels apart, in groups of up to 4, each window `pixels` plus the
    group's reach), or None where it takes them one at a time (a load per tap). The
    32-register build's blocks: AVX2's (2 outputs, groups of 3) are not told apart."""
    offsets = [t.offset for t in phase.axis_taps[2]]
    steps = {b - a for a, b in zip(offsets, offsets[1:])}
    if outputs > 3 or len(offsets) < 2 or len(offsets) > 32 or len(steps) != 1:
        return None
    delta = abs(steps.pop())
    if delta not in (1, 2):
        return None
    tw = len(offsets)
    count = ceil_div(tw, 4)
    return sum(1 + delta * (tw * (g + 1) // count - tw * g // count - 1) / pixels
               for g in range(count))


def _dot_block_pixels(outputs: int) -> int:
    """Pixels per register block of dot mode for this many outputs (forward.hpp's
    DotBlock, 32 vector registers)."""
    return {1: 16, 2: 8, 3: 6, 4: 5}.get(outputs, 4 if outputs <= 6 else 3)


def _dot_row_pixels(width: int, block: int) -> int:
    """Pixels dot mode computes for a row of `width`: whole blocks, or half blocks where
    those cost less (forward.hpp's dot_half_block)."""
    def cost(p: int) -> int:
        return ceil_div(width, p) * (p + 2)
    if block >= 4 and cost(block // 2) < cost(block):
        block //= 2
    return ceil_div(width, block) * block if width >= block else width


def _reading_inside(spec: ConvSpec, axis: int) -> float:
    """Of the (output, tap) pairs along `axis`, the share whose tap reads inside the input."""
    n, k, s, d = (spec.in_spatial[axis], spec.kernel[axis], spec.stride[axis],
                  spec.dilation[axis])
    lo, out = spec.pad_lo[axis], spec.out_spatial[axis]
    inside = every = 0
    for tap in range(k):
        c = tap * d - lo  # input i lands on output i * s + c
        first, last = -(c // s), (out - 1 - c) // s
        every += max(0, last - first + 1)
        inside += max(0, min(last, n - 1) - max(first, 0) + 1)
    return inside / every if every else 1.0


def weight_reuse(spec: ConvSpec) -> float:
    """Multiply-adds per weight element of the live phases' taps: the input pixels each
    element meets, on average."""
    live = live_phases(spec)
    elements = weight_bytes(spec, live) // spec.compute_dtype.itemsize
    return spec.inside_flops / 2 / elements if elements else math.inf


def weight_bytes(spec: ConvSpec, live: list[Phase]) -> int:
    """The bytes of the weight's taps that the live phases weigh (the compute dtype)."""
    taps = sum(p.tap_count for p in live)
    return taps * spec.c_out * spec.c_in_per_group * spec.compute_dtype.itemsize


def channels_seconds(spec: ConvSpec) -> float:
    """CHANNELS mode's time on one core: the products it computes at its rate, and its
    weight gathered into its layout, in fresh pages where the layout outgrows the scratch
    kept from call to call (`_memory.RETAIN_BYTES`): 384 -> 384 k5 on 3x2x1x1, 74 MB,
    spent a quarter of its 17 ms in the system zeroing pages, and dot mode, reading the
    weight where it lies, took 6.4 ms."""
    packed = weight_bytes(spec, live_phases(spec))
    fresh = packed * FRESH_PAGE_BYTE if packed > RETAIN_BYTES else 0.0
    return spec.inside_flops / channels_rate(spec) + packed * CHANNELS_PACK_BYTE + fresh


def native_rate(spec: ConvSpec, weight_in_place: bool = True) -> float:
    """FLOP/s of the native kernel on one core, in the mode it takes (`weight_in_place`
    as `native_mode`)."""
    mode = native_mode(spec, weight_in_place=weight_in_place)
    if mode == native.DEPTHWISE:  # one load per multiply-add; bound by the output's writes
        lanes = native.layout(spec.compute_dtype.itemsize)[0]
        # along the flat pixel * channel index, slower in blocks some W tap reaches in part
        base, edge = (DEPTHWISE_FLAT_AVX2 if avx2_build() and spec.c_out < 4 * lanes
                      else (1.25, 4.5))
        return NATIVE_PEAK_PER_LANE * lanes / 4 / (base + edge * _flat_edge_share(spec, lanes))
    if mode == native.DOT:  # vectors along the channels summed: its own cost model
        return max(spec.useful_flops, 1) / max(dot_seconds(spec), 1e-12)
    return channels_rate(spec)


# The AVX2 build's (1.25, 4.5) of `native_rate`'s depthwise mode along the flat index
# (fewer channels than four vectors): its 10 such layers of seeds 130-136 ran 0.5-0.85x
# their modelled time (two threads, a 2-core AMD EPYC Zen 3), and the planner sent 7 -> 7
# g7 and 8 -> 8 g8 k3 to planar at 1.3x and 1.4x native's time.
DEPTHWISE_FLAT_AVX2 = (0.7, 3.2)


def _flat_edge_share(spec: ConvSpec, lanes: int) -> float:
    """Of depthwise mode's products along the flat pixel * channel index (forward.hpp's
    depthwise_flat_rows, fewer channels than four vectors), the share it computes lane
    by lane: a W tap's reach into a block of 8 vectors that it does not cover whole.
    Measured over 32 depthwise sweep layers of seeds 30-48 (one core): their time over
    the rate alone's, 1.2-1.6 where few are cut, 3-9 where most are (rows of 33 pixels
    of 4 channels); fitted as 1.25 + 4.5 x this share."""
    channels, block = spec.c_out, 8 * lanes
    if channels >= 4 * lanes:
        return 0.0
    products = by_lane = 0.0
    for p in live_phases(spec):
        flat, taps, cut = p.count[2] * channels, p.axis_taps[2], 0
        for t in taps:  # its reach [a, b), less the whole blocks inside it
            a, b = t.lo * channels, min(t.hi * channels, flat)
            if a < b:
                cut += b - a - block * max(0, b // block - ceil_div(a, block))
        n = p.size * p.tap_count
        products += n
        by_lane += n * cut / (len(taps) * flat)
    return by_lane / products if products else 0.0


def channels_rate(spec: ConvSpec) -> float:
    """FLOP/s of CHANNELS mode on one core: lanes wasted on padding C_out/g to whole
    vectors, one-vector blocks bound by broadcasts, few channels per tap bound by the
    accumulator traffic (measured on W1-W8 and the demo's layers)."""
    lanes, max_vectors = native.layout(spec.compute_dtype.itemsize)
    peak = NATIVE_PEAK_PER_LANE * lanes  # this machine's, one core
    cog, cig = spec.c_out_per_group, spec.c_in_per_group
    vectors = ceil_div(cog, lanes)
    used = cog / (vectors * lanes)
    blocking = (0.65 + 0.2 * _w_taps_at_once_share(spec) if vectors == 1
                else 0.85 if vectors % max_vectors else 1.0)
    if avx2_build() and spec.groups > 1 and cog < lanes:
        blocking /= SMALL_GROUPS_AVX2
    if cig < native.TAPS_INNER_BELOW:  # sums in registers across taps: no accumulator
        tap = FEW_CHANNELS_TAP_AVX2 if avx2_build() else 1.6  # traffic, a tap
        return peak * used * blocking * cig / (cig + tap)  # overhead
    return peak * used * blocking * cig / (cig + 4)


# channels_rate's tap overhead below TAPS_INNER_BELOW channels on the AVX2 build, in
# channels' worth: the AVX-512 fit's 1.6 put its 56 such layers of seeds 130-134 at 0.6x
# their modelled time where C_in/g is 1 (0.7-0.8x at 2-3), and sent 1 -> 8 k5 and 1 -> 8
# k7 s3 to planar at 1.2x and 1.4x native's time (2-core AMD EPYC Zen 3).
FEW_CHANNELS_TAP_AVX2 = 0.6


# channels_rate's slowdown on the AVX2 build where several conv groups each have fewer
# outputs than a vector: 8 sweep layers so (8 -> 4 g4 k4 1-D, 8 -> 8 g4 k2 2-D, 20 -> 24
# g4 k(6,5,2), ...; seeds 182-214, two threads, a 2-core AMD EPYC Zen 3) ran 1.7-4.7x their
# modelled time, median 3.2, while planar's read 0.95-1.5 and ran 1.16-4.4x faster on
# all 8 (203's S15, 8 -> 4 g4 k4 s2 1-D on 1.75M pixels: 81 against 22 ms).
SMALL_GROUPS_AVX2 = 3.0


WTAPS_MIN_PIXELS = 24  # the kernel's block of every W tap at once (rows_wtaps), AVX-512


def _w_taps_at_once_share(spec: ConvSpec) -> float:
    """The share of the products that one vector of outputs computes with every W tap of
    a row at once (the kernel's rows_wtaps: 2-7 W taps, rows of a block or more, enough
    input channels; 96 -> 16 k2 on 2x273x203 at 197 GFLOP/s on one core, against 143 a
    tap at a time and 217 with 64 outputs)."""
    if spec.c_in_per_group < native.TAPS_INNER_BELOW:
        return 0.0
    live = live_phases(spec)
    total = sum(p.size * p.tap_count for p in live)
    fast = sum(p.size * p.tap_count for p in live
               if 2 <= len(p.axis_taps[2]) <= 7 and p.count[2] >= WTAPS_MIN_PIXELS)
    return fast / total if total else 0.0


def on_threads(est: dict, threads: int) -> dict:
    """The model is of one core: a plan predicts the call, on its threads (efficiency ~0.9
    on two), so that `print(plan)` and the sweep compare it with the clock."""
    kernels = registry()
    return {a: v / (1 if threads == 1 or kernels[a].serial else 0.9 * threads)
            for a, v in est.items()}


def indexed_fits(spec: ConvSpec) -> bool:
    rows_in = spec.batch * math.prod(spec.in_spatial)
    rows_out = spec.batch * math.prod(spec.out_spatial)
    taps = math.prod(spec.kernel)
    return (rows_in * taps * spec.c_out <= INDEXED_MAX_ELEMS
            and rows_out * taps <= INDEXED_MAX_ELEMS)


def choose_algorithm(spec: ConvSpec, limit: int, winograd: bool,
                     threads: int = 1) -> tuple[str, dict]:
    """The fastest estimate on `threads` among the kernels that fit (inexact ones only
    with `winograd`; fallbacks only without the compiled kernel): (its name, every
    candidate's estimate on one core)."""
    kernels = registry()
    est = {k.name: estimate_seconds(spec, k.name) for k in kernels.values()
           if (k.exact or winograd) and not (k.fallback and native.AVAILABLE)
           and k.fits(spec, limit) is None}
    on = {a: v if runs_serial(kernels[a], v) else v / (0.9 * threads) for a, v in est.items()}
    return min(on, key=on.get), est


def runs_serial(kernel, seconds: float) -> bool:
    """Whether a call of `kernel` estimated at `seconds` on one core stays on one thread:
    `serial` kernels always, others below a thread hand-off's worth of work."""
    below = NATIVE_SERIAL_BELOW_SECONDS if kernel.compiled else SERIAL_BELOW_SECONDS
    return kernel.serial or seconds < below


def make_plan(spec: ConvSpec, *, algorithm: str | None = None, workspace: int | None = None,
              threads: int | None = None) -> Plan:
    if algorithm is not None:
        kernels = registry()
        if algorithm not in kernels:
            raise ValueError(f"plan: 'algorithm' must be one of {tuple(map(str, kernels))}, got "
                             f"{algorithm!r}")
        reason = kernels[algorithm].fits(spec, workspace_limit(spec, workspace))
        if reason is not None:
            raise ValueError(f"plan: algorithm {str(algorithm)!r} {reason}")
        algorithm = kernels[algorithm].name  # the registry's spelling (an Algorithm)
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int)
                                or threads < 1):
        raise ValueError(f"plan: 'threads' must be an int >= 1, got {threads!r}")
    return _make_plan(spec, algorithm, workspace_limit(spec, workspace),
                      threads or get_num_threads(), get_winograd(), half_rate_fma())


def finite_plan(plan: Plan) -> Plan:
    """`plan` with its phases apart where it merged some with PHANTOM taps: the plan for
    an input that holds infinities or NaNs (a PHANTOM tap's zero weight times one is
    NaN)."""
    return _make_plan(plan.spec, plan.algorithm, plan.workspace_limit, plan.threads,
                      get_winograd(), half_rate_fma(), phantoms=False)


def _has_phantoms(phase_groups: tuple[tuple[Phase, ...], ...]) -> bool:
    return any(t.k == PHANTOM for group in phase_groups for phase in group
               for axis in phase.axis_taps for t in axis)


@functools.lru_cache(maxsize=256)
def _make_plan(spec: ConvSpec, algorithm: str | None, limit: int, threads: int,
               winograd: bool, half_rate: bool, phantoms: bool = True) -> Plan:
    """Plans are pure functions of their arguments, so repeated calls reuse them
    (`half_rate`: `half_rate_fma`, which the estimates read, in the key). `phantoms`:
    False, no phase group with PHANTOM taps (`finite_plan`)."""
    if algorithm is None:
        algorithm, est = choose_algorithm(spec, limit, winograd, threads)
    else:
        est = {algorithm: estimate_seconds(spec, algorithm)}
    kernel = registry()[algorithm]
    if kernel.make_plan is not None:  # its own plan (indexed: one task and a table)
        return kernel.make_plan(spec, limit, est, threads)
    phase_groups = kernel.phase_groups(spec)
    with_phantoms = _has_phantoms(phase_groups)
    if with_phantoms and not phantoms:
        phase_groups, with_phantoms = tuple((p,) for p in live_phases(spec)), False
    # winograd's tiles are native tiles of its pair phases (`pair_phase`), in place;
    # so are those of every compiled kernel
    takes_pairs = algorithm == Algorithm.WINOGRAD
    kind = Algorithm.NATIVE if kernel.compiled else algorithm
    whole_input = kind == Algorithm.NATIVE and (
        takes_pairs and spec.input_dtype != spec.compute_dtype
        or native_converts_whole_input(spec, limit))
    shared = kind == Algorithm.NATIVE and native_shares_tiles(spec, limit)
    copy_bytes = kernel.input_copy_bytes(spec) if kernel.input_copy_bytes else 0
    if copy_bytes:  # the copy is the input every tile reads, converted
        whole_input, shared = True, not _rounds_blocks(spec)
    # PLANAR's copy past the limit: made in slabs of input planes, each read by a run of
    # tiles cut to fit one
    slab_planes = planar_slab_planes(spec, limit) if copy_bytes > limit else 0
    # Long rows cut along W: tiles of the compiled kernel reading in place (not PLANAR's
    # whole rows).
    cut_w = shared and algorithm == Algorithm.NATIVE
    tasks, biggest = make_tasks(spec, kind, phase_groups, limit, threads, whole_input,
                                shared, cut_w=cut_w, slab_planes=slab_planes)
    slabs = input_slabs(spec, phase_groups, tasks, slab_planes) if slab_planes else ()
    if slabs:
        copy_bytes = planar_slab_bytes(spec, max(s.planes for s in slabs))
    # A thread hand-off costs tens of microseconds: small calls stay on one worker. So do
    # `serial` kernels.
    if runs_serial(kernel, est.get(algorithm, 1.0)):
        threads = 1
    est = on_threads(est, threads)
    item = spec.compute_dtype.itemsize
    workers = min(threads, len(tasks)) or 1
    converted = (copy_bytes or
                 spec.batch * math.prod(spec.in_spatial) * spec.c_in * item if whole_input
                 else 0) + (pair_input_bytes(spec) if takes_pairs else 0)
    return Plan(spec=spec, algorithm=algorithm, phase_groups=phase_groups, tasks=tuple(tasks),
                threads=threads, workspace_bytes=workers * biggest * item + converted,
                workspace_limit=limit, est_seconds=est, input_slabs=slabs,
                phantoms=with_phantoms)


def make_tasks(spec: ConvSpec, algorithm: str, phase_groups: tuple[tuple[Phase, ...], ...],
               limit: int, threads: int, whole_input: bool, shared: bool,
               convert_input: bool = False, cut_w: bool = False,
               slab_planes: int = 0) -> tuple[list[Task], int]:
    """The tiles of every phase group, each within the workspace limit, and the biggest
    task's buffer (elements). `shared`: native tiles that threads share, cut only for
    locality. `convert_input`: native tiles copy their input rows (channels not
    contiguous), which the buffers must hold. `cut_w`: long rows may be cut along W
    (`cut_rows`). `slab_planes`: PLANAR's copy made in slabs of that many input planes
    (0: whole), which each tile's planes must fit (`planar_tile_rows`)."""
    reach = planar_reach(phase_groups) if slab_planes else 0
    item = spec.compute_dtype.itemsize
    if shared:  # no workspace (the limit does not bind), and no cut for balance
        dot = len(phase_groups) > 1 and native_mode(spec) == native.DOT
        per_task = (SHARED_DOT_TILE_BYTES if dot else SHARED_TILE_BYTES) // item
        min_tiles = 1
    else:
        # Elementwise passes (direct, scatter's window adds) want their tile in L2; the
        # shift GEMMs amortise bigger tiles better (each kernel's `tile_bytes`).
        tile_bytes = registry()[algorithm].tile_bytes
        per_task = max(1, min(tile_bytes, limit // threads) // item)
        min_tiles = threads if len(phase_groups) < threads else 1
        if algorithm == Algorithm.NATIVE:
            # Its tiles cost nothing to cut (no halo copies): cut at least four per worker,
            # so that a worker slowed by a neighbour's process does not hold up the call.
            min_tiles = max(1, ceil_div(4 * threads, len(phase_groups)))
    max_rows = max(MIN_TILE_ROWS, per_task // max(1, spec.c_in + 2 * spec.c_out))
    while True:
        tasks = []
        for gi, phase_group in enumerate(phase_groups):
            count = tuple(max(p.count[i] for p in phase_group) for i in range(3))
            rows = (min(max_rows, planar_tile_rows(count, slab_planes, reach)) if slab_planes
                    else max_rows)
            tiles = split_tiles(spec.batch, count, rows, min_tiles)
            if cut_w:
                tiles = cut_rows(tiles, count[2], threads, max_rows)
            for tile in tiles:
                elems = (native_buffer_elems(spec, phase_group[0], tile, True, len(phase_group))
                         if convert_input else
                         buffer_elems(spec, algorithm, phase_group, tile, whole_input))
                tasks.append(Task(gi, tile, elems))
        if algorithm == Algorithm.NATIVE:
            # Tile-major: the phases of one tile read the same input rows and fill the same
            # output pages, so run them back to back (their tiles coincide when the counts do).
            # Within a tile, phases of one W residue first: tasks next to each other then
            # write different output rows. Phases of different W residues interleave their
            # pixels in the same rows, and two threads starting them together sent the
            # lines where they meet back and forth between the cores (8 -> 117 k3 s2 ran
            # no faster on two threads than on one).
            tasks.sort(key=lambda t: (t.tile.n, t.tile.d, t.tile.h, t.tile.w or (0, 0),
                                      phase_groups[t.phase_group][0].residue[2], t.phase_group))
        biggest = max((t.buffer_elems for t in tasks), default=0)
        if biggest <= per_task or max_rows <= 1:
            return tasks, biggest
        max_rows = max(1, max_rows * per_task // biggest if biggest > 2 * per_task
                       else max_rows // 2)


def indexed_plan(spec: ConvSpec, limit: int, est: dict, threads: int) -> Plan:
    """One task over everything; its table says which (input row, tap) products add into
    each output row (row index `rows_in * taps` is an appended zero row)."""
    rows_in = spec.batch * math.prod(spec.in_spatial)
    taps = math.prod(spec.kernel)
    table = gather_table(spec)
    item = spec.compute_dtype.itemsize
    used = ((rows_in * taps + 1) * spec.c_out + table.size * spec.c_out) * item + table.nbytes
    task = Task(0, Tile((0, spec.batch), (0, 0), (0, 0)), (rows_in * taps + 1) * spec.c_out)
    return Plan(spec=spec, algorithm=Algorithm.INDEXED, phase_groups=(), tasks=(task,),
                threads=1,
                workspace_bytes=used, workspace_limit=limit, est_seconds=est,
                table=table)


def product_targets(spec: ConvSpec) -> np.ndarray:
    """(input rows * taps,) the output row each (input row, tap) product adds into, or
    `batch * prod(out_spatial)` where it lands outside the output."""
    in_sp, out_sp, kernel = spec.in_spatial, spec.out_spatial, spec.kernel
    rows_in = spec.batch * math.prod(in_sp)
    taps = math.prod(kernel)
    pos = np.indices((spec.batch, *in_sp)).reshape(4, -1)  # (n, d, h, w) of each input row
    tap = np.indices(kernel).reshape(3, -1)
    out_idx = np.zeros((rows_in, taps), np.intp)
    inside = np.ones((rows_in, taps), bool)
    for axis in range(3):
        o = (pos[axis + 1][:, None] * spec.stride[axis] + tap[axis][None, :] * spec.dilation[axis]
             - spec.pad_lo[axis])
        inside &= (o >= 0) & (o < out_sp[axis])
        out_idx = out_idx * out_sp[axis] + o
    out_idx += pos[0][:, None] * math.prod(out_sp)
    return np.where(inside, out_idx, spec.batch * math.prod(out_sp)).ravel()


def gather_table(spec: ConvSpec) -> np.ndarray:
    """(max contributions, output rows) of row indices into the (input row, tap) products."""
    rows_in = spec.batch * math.prod(spec.in_spatial)
    taps = math.prod(spec.kernel)
    rows_out = spec.batch * math.prod(spec.out_spatial)
    targets = product_targets(spec)
    src = np.flatnonzero(targets < rows_out)
    dst = targets[src]
    order = np.argsort(dst, kind="stable")  # fixed summation order: reproducible bits
    src, dst = src[order], dst[order]
    counts = np.bincount(dst, minlength=rows_out)
    depth = int(counts.max()) if counts.size else 0
    table = np.full((max(depth, 1), rows_out), rows_in * taps, np.intp)
    first = np.concatenate(([0], np.cumsum(counts)[:-1]))
    table[np.arange(dst.size) - first[dst], dst] = src
    return table
