"""Spec -> plan: choose the algorithm and the tiling for one call on this machine.

Three algorithms, all free of zero-stuffing (their multiply-adds are the useful ones, plus
at most a border row where a tap half-overlaps the input):

- ``gather``: per output phase, copy the input rows each tap reads into a column block
  (rows, taps * C_in) and run one GEMM into that phase's strided output positions. Its extra
  memory traffic is proportional to C_in; it writes every output element exactly once, so
  tiles run on threads without locks.
- ``scatter``: one GEMM of input rows against every tap at once (rows, taps * C_out), then
  add each tap's block into its strided output positions. Its extra traffic is proportional
  to C_out, so it wins when C_out is small (a 16 -> 1 head).
- ``direct``: when each group has a single input channel (depthwise, channel multiplier)
  a GEMM degenerates; multiply-add broadcast over channels instead.

The plan is a printable object: ``print(convtranspose.plan(...))``.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from ._geometry import Phase, phases_3d
from ._spec import ConvSpec

DEFAULT_WORKSPACE = 64 * 2**20
TILE_BYTES = 4 * 2**20  # a column block of about this size stays in the last-level cache
MIN_TILE_ROWS = 256

_threads: int | None = None


def set_num_threads(n: int | None) -> None:
    """Worker threads for tiles; None restores the default
    (CONVTRANSPOSE_NUM_THREADS, else every core this process may use)."""
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
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class Tile:
    """A rectangular block of one phase's output grid: batch, depth and height ranges
    (the width axis is always whole so that rows stay contiguous)."""

    n: tuple[int, int]
    d: tuple[int, int]
    h: tuple[int, int]


@dataclass(frozen=True)
class Plan:
    spec: ConvSpec
    algorithm: str
    phases: tuple[Phase, ...]
    tile_rows: int
    threads: int
    workspace_bytes: int
    workspace_limit: int
    est_traffic: dict

    @property
    def flops(self) -> int:
        return self.spec.useful_flops

    def __str__(self) -> str:
        s = self.spec
        busy = sum(1 for p in self.phases if p.taps)
        lines = [
            f"convtranspose plan for {s.op}",
            f"  input  {s.input_shape} {s.input_dtype.name}",
            f"  weight {s.weight_shape} {s.weight_dtype.name}",
            f"  output {s.output_shape} {s.result_dtype.name} (accumulate in "
            f"{s.compute_dtype.name})",
            f"  stride={s.stride[3 - s.ndim:]} padding={s.padding[3 - s.ndim:]} "
            f"dilation={s.dilation[3 - s.ndim:]} output_padding="
            f"{s.output_padding[3 - s.ndim:]} groups={s.groups}",
            f"  algorithm  {self.algorithm} ({busy} of {len(self.phases)} phases have taps)",
            f"  useful     {self.flops / 1e9:.3f} GFLOP",
            f"  tiles      <= {self.tile_rows} rows, {self.threads} thread(s)",
            f"  workspace  {self.workspace_bytes / 2**20:.1f} MiB "
            f"(limit {self.workspace_limit / 2**20:.1f} MiB)",
        ]
        return "\n".join(lines)


def workspace_limit(spec: ConvSpec, workspace: int | None) -> int:
    """Default: max(64 MiB, 25% of the output); `workspace` (bytes) overrides it."""
    if workspace is not None:
        return workspace
    out_bytes = spec.batch * math.prod(spec.out_spatial) * spec.c_out * spec.result_dtype.itemsize
    return max(DEFAULT_WORKSPACE, out_bytes // 4)


def _traffic(spec: ConvSpec, phases: tuple[Phase, ...]) -> dict:
    """Extra elements each algorithm moves beyond reading the input and writing the output."""
    n_in = spec.batch * math.prod(spec.in_spatial)
    gather = 0
    for ph in phases:
        if len(ph.taps) > 1:
            gather += 2 * spec.batch * ph.size * len(ph.taps) * spec.c_in
    taps_total = sum(len(ph.taps) for ph in phases)
    scatter = 3 * n_in * taps_total * spec.c_out
    direct = 2 * spec.batch * taps_total * max(ph.size for ph in phases) * spec.c_out
    return {"gather": gather, "scatter": scatter, "direct": direct}


def choose_algorithm(spec: ConvSpec, traffic: dict) -> str:
    if spec.c_in_per_group == 1:
        return "direct"
    return "scatter" if traffic["scatter"] < traffic["gather"] else "gather"


def _row_width(spec: ConvSpec, algorithm: str, phases: tuple[Phase, ...]) -> int:
    """Workspace elements per output (or input) row of a tile."""
    if algorithm == "gather":
        taps = max(len(p.taps) for p in phases)
        return taps * spec.c_in + spec.c_out
    if algorithm == "scatter":
        taps = math.prod(spec.kernel)
        return taps * spec.c_out
    return 2 * spec.c_out


def make_plan(spec: ConvSpec, *, algorithm: str | None = None, workspace: int | None = None,
              threads: int | None = None) -> Plan:
    phases = phases_3d(spec)
    traffic = _traffic(spec, phases)
    algo = algorithm or choose_algorithm(spec, traffic)
    if algo not in ("gather", "scatter", "direct"):
        raise ValueError(f"algorithm must be 'gather', 'scatter' or 'direct', got {algo!r}")
    if algo == "direct" and spec.c_in_per_group != 1:
        raise ValueError("algorithm 'direct' needs one input channel per group")
    n_threads = threads or get_num_threads()
    algo_threads = 1 if algo == "scatter" else n_threads
    limit = workspace_limit(spec, workspace)
    itemsize = spec.compute_dtype.itemsize
    width = _row_width(spec, algo, phases)
    per_thread = max(1, min(TILE_BYTES, limit // algo_threads) // (width * itemsize))
    # Each worker owns one tile buffer; never below one output row of the widest axis.
    w_rows = spec.out_spatial[2] if algo != "scatter" else spec.in_spatial[2]
    tile_rows = max(per_thread, MIN_TILE_ROWS if limit >= MIN_TILE_ROWS * width * itemsize
                    else 1, w_rows)
    used = algo_threads * tile_rows * width * itemsize
    return Plan(spec=spec, algorithm=algo, phases=phases, tile_rows=tile_rows,
                threads=n_threads, workspace_bytes=used, workspace_limit=limit,
                est_traffic=traffic)


def split_tiles(batch: int, count: tuple[int, int, int], max_rows: int,
                min_tiles: int = 1) -> list[Tile]:
    """Cut a (batch, D, H, W) grid into rectangular tiles of at most `max_rows` rows
    (a row is one W line position), whole along W."""
    nd, nh, nw = count
    if batch == 0 or nd * nh * nw == 0:
        return []
    # Enough tiles to keep every thread busy, unless that makes tiles tiny.
    total = batch * nd * nh * nw
    if min_tiles > 1:
        max_rows = max(min(max_rows, -(-total // min_tiles)), min(max_rows, MIN_TILE_ROWS))
    plane = nh * nw
    tiles = []
    if plane * nd <= max_rows:
        step = max(1, max_rows // (plane * nd))
        for n0 in range(0, batch, step):
            tiles.append(Tile((n0, min(batch, n0 + step)), (0, nd), (0, nh)))
    elif plane <= max_rows:
        step = max(1, max_rows // plane)
        for n0 in range(batch):
            for d0 in range(0, nd, step):
                tiles.append(Tile((n0, n0 + 1), (d0, min(nd, d0 + step)), (0, nh)))
    else:
        step = max(1, max_rows // nw)
        for n0 in range(batch):
            for d0 in range(nd):
                for h0 in range(0, nh, step):
                    tiles.append(Tile((n0, n0 + 1), (d0, d0 + 1), (h0, min(nh, h0 + step))))
    return tiles
